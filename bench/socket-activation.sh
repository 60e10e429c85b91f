#!/usr/bin/env bash
# Socket activation, start to first token: systemd-socket-activate holds the listening
# socket; the first gemmactl call starts gemmad on it (model load included) and waits
# for one generated token. Prints each run and the median of N (default 20).
#
#   cargo build --release -p gemmad -p gemmad-client
#   bench/socket-activation.sh [N] [MODEL_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-20}
model=${2:-engine/tests/fixtures/text}
bin=target/release
command -v systemd-socket-activate >/dev/null || { echo "needs systemd-socket-activate (package systemd)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$tmp"' EXIT
printf '[governor]\nenabled = false\n[log]\nlevel = "warn"\n' > "$tmp/gemmad.toml"
times=()
for i in $(seq 1 "$n"); do
  rm -f "$tmp/s.sock"
  systemd-socket-activate -l "$tmp/s.sock" --fdname=grpc \
    "$PWD/$bin/gemmad" serve --dbus off --model "$PWD/$model" \
    --config "$tmp/gemmad.toml" --socket "$tmp/s.sock" 2>>"$tmp/log" &
  pid=$!
  while [ ! -S "$tmp/s.sock" ]; do sleep 0.01; done
  t0=$(date +%s%N)
  "$bin/gemmactl" --socket "$tmp/s.sock" generate --max-tokens 1 --seed 1 "Hello" >/dev/null
  t1=$(date +%s%N)
  ms=$(( (t1 - t0) / 1000000 ))
  times+=("$ms")
  echo "run $i: ${ms} ms"
  kill -TERM "$pid"
  wait "$pid" || true
done
median=$(printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}')
echo "socket activation, connect to first token (model load included): median ${median} ms of $n ($model)"
