#!/usr/bin/env bash
# Checks the systemd files in systemd/ (CI runs it; `make check-units`):
#   1. `systemd-analyze verify` on the system and user units, alone and with each example
#      drop-in of systemd/dropins/gemmad.{service,socket}.d/: any output but the known
#      lines below fails;
#   2. `systemd-analyze security --offline=yes --threshold=20` on systemd/gemmad.service
#      (exposure <= 2.0), printing the score and the remaining exposures; the drop-ins'
#      scores are printed for information;
#   3. systemd-sysusers and systemd-tmpfiles on the sysusers/tmpfiles files, into a
#      temporary root;
#   4. the socket path agreeing across the socket unit, the config example and the
#      daemon's default, and the D-Bus activation file naming gemmad.service.
# Needs systemd-analyze, systemd-sysusers, systemd-tmpfiles (package "systemd"); no
# running systemd, no root, no built binary.
#
# `verify` insists that ExecStart='s binary exists: the units are checked as copies in a
# temporary directory whose /usr/bin/gemmad is rewritten to a stub there (the same
# rewrite `make install BINDIR=...` does). Drop-ins are picked up from gemmad.service.d/
# and gemmad.socket.d/ next to the copy.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in systemd-analyze systemd-sysusers systemd-tmpfiles; do
  command -v "$tool" >/dev/null || { echo "check-units: $tool not found (install systemd)" >&2; exit 1; }
done
echo "check-units: $(systemd-analyze --version | head -1)"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf '#!/bin/sh\nexit 0\n' > "$tmp/gemmad"
chmod 755 "$tmp/gemmad"
# The user manager's verify wants a runtime directory.
mkdir -m 700 "$tmp/xdg-runtime"

failed=0
fail() {
  echo "check-units: FAIL: $*" >&2
  failed=1
}

# Lines verify may print: keys newer than the systemd at hand.
# MemoryPressureWatch= is systemd >= 254 (older ones ignore it: the governor then falls
# back to /proc/pressure/memory).
known='Unknown key( name)? .MemoryPressureWatch. in section .Service., ignoring\.$'

# stage DIR SRCDIR [DROPIN]: copies the units of SRCDIR with the stub binary, and the
# drop-in (a file in systemd/dropins/UNIT.d/) under UNIT.d/.
stage() {
  local dir=$1 src=$2 dropin=${3:-}
  rm -rf "$dir"
  mkdir -p "$dir"
  for u in gemmad.service gemmad.socket; do
    sed "s|/usr/bin/gemmad|$tmp/gemmad|g" "$src/$u" > "$dir/$u"
  done
  if [ -n "$dropin" ]; then
    local unitdir
    unitdir=$(basename "$(dirname "$dropin")")
    mkdir -p "$dir/$unitdir"
    cp "$dropin" "$dir/$unitdir/"
  fi
}
dropins=(systemd/dropins/gemmad.service.d/*.conf systemd/dropins/gemmad.socket.d/*.conf)
# the drop-in's name for the output: gemmad.service.d/tcp.conf
label() { echo "$(basename "$(dirname "$1")")/$(basename "$1")"; }

# verify LABEL DIR [--user]
verify() {
  local label=$1 dir=$2
  shift 2
  local out rc=0
  out=$(XDG_RUNTIME_DIR="$tmp/xdg-runtime" systemd-analyze "$@" verify --man=no --generators=no \
          "$dir/gemmad.service" "$dir/gemmad.socket" 2>&1) || rc=$?
  local unexpected
  unexpected=$(printf '%s\n' "$out" | grep -v -E "$known" | grep -v '^$' || true)
  if [ $rc -ne 0 ] || [ -n "$unexpected" ]; then
    fail "verify $label (exit $rc):"
    printf '%s\n' "$out" | sed "s|$tmp|<tmp>|g" >&2
  else
    echo "verify $label: ok${out:+ (known: $(printf '%s\n' "$out" | grep -c .) line(s) about keys newer than this systemd)}"
  fi
}

# --- 1. verify -----------------------------------------------------------------------
stage "$tmp/system" systemd
verify "system units" "$tmp/system"
for d in "${dropins[@]}"; do
  stage "$tmp/system" systemd "$d"
  verify "system units + $(label "$d")" "$tmp/system"
done
stage "$tmp/user" systemd/user
verify "user units" "$tmp/user" --user

# --- 2. security ---------------------------------------------------------------------
echo "security (systemd/gemmad.service, threshold 20 = exposure 2.0):"
rc=0
sec=$(systemd-analyze security --offline=yes --threshold=20 --no-pager systemd/gemmad.service 2>&1) || rc=$?
printf '%s\n' "$sec" | grep -E '^✗|Overall exposure' | sed 's/^/  /'
if [ $rc -ne 0 ]; then
  fail "systemd-analyze security: exposure above 2.0 (exit $rc)"
  printf '%s\n' "$sec" >&2
fi
for d in systemd/dropins/gemmad.service.d/*.conf; do
  stage "$tmp/system" systemd "$d"
  score=$(systemd-analyze security --offline=yes --no-pager "$tmp/system/gemmad.service" 2>/dev/null |
            grep 'Overall exposure' | sed 's/.*: //')
  echo "  with $(label "$d"): $score (information only)"
done

# --- 3. sysusers, tmpfiles -----------------------------------------------------------
root="$tmp/root"
mkdir -p "$root/etc"
if out=$(systemd-sysusers --root="$root" "$PWD/systemd/gemmad.sysusers" 2>&1) &&
   grep -q '^gemmad:' "$root/etc/passwd"; then
  echo "sysusers: ok ($(grep '^gemmad:' "$root/etc/passwd"))"
else
  fail "systemd-sysusers systemd/gemmad.sysusers: $out"
fi
if out=$(systemd-tmpfiles --root="$root" --create "$PWD/systemd/gemmad.tmpfiles" 2>&1) &&
   [ -d "$root/run/gemmad" ] && [ -d "$root/var/cache/gemmad" ] && [ -d "$root/var/lib/gemmad" ]; then
  echo "tmpfiles: ok ($(cd "$root" && stat -c '%A %u:%g /%n' run/gemmad var/lib/gemmad var/cache/gemmad | tr '\n' ' '))"
else
  fail "systemd-tmpfiles systemd/gemmad.tmpfiles: $out"
fi

# --- 4. consistency ------------------------------------------------------------------
sock=$(sed -n 's/^ListenStream=//p' systemd/gemmad.socket)
grep -q "^socket = \"$sock\"" systemd/gemmad.toml ||
  fail "gemmad.socket ListenStream=$sock is not [server].socket of systemd/gemmad.toml"
grep -q "DEFAULT_SOCKET: &str = \"$sock\"" daemon/src/config.rs ||
  fail "gemmad.socket ListenStream=$sock is not DEFAULT_SOCKET of daemon/src/config.rs"
grep -q '^FileDescriptorName=grpc$' systemd/gemmad.socket systemd/user/gemmad.socket ||
  fail "the socket units must name their socket \"grpc\" (FileDescriptorName=)"
act=systemd/org.gemmad.Gemmad1.service
if [ -f "$act" ]; then
  grep -q '^SystemdService=gemmad.service$' "$act" ||
    fail "$act must activate through SystemdService=gemmad.service"
  grep -q '^User=gemmad$' "$act" || fail "$act must name User=gemmad (the unit's User=)"
else
  echo "consistency: $act not present; its check skipped"
fi
[ $failed -eq 0 ] && echo "consistency: ok"

if [ $failed -ne 0 ]; then
  echo "check-units: FAILED" >&2
  exit 1
fi
echo "check-units: passed"
