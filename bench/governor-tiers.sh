#!/usr/bin/env bash
# RSS and decode speed of a real `gemmad serve` in each governor tier, RSS before and
# after each transition down, and after a generation in the tier (steady state) (the tiers pinned in turn, full -> critical, as an admin
# would: `gemmactl governor pin TIER`). Release binaries; run on a quiet machine.
#
#   bench/governor-tiers.sh MODEL_DIR [QUANT] [CACHE_DIR]
#   e.g. bench/governor-tiers.sh /work/synth/e4b q4_0 /tmp/gemmad-cache
set -euo pipefail
model=${1:?model dir}
quant=${2:-q4_0}
cache=${3:-/tmp/gemmad-cache}
bin=$(cd "$(dirname "$0")/.." && pwd)/target/release
dir=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
cat > "$dir/gemmad.toml" <<TOML
[model]
quant = "$quant"
cache_dir = "$cache"
threads = 2
max_context = 4096
[access]
allowed_uids = [$(id -u)]
[governor]
enabled = true
interval_ms = 100
[governor.policy]
min_dwell_ms = 0
TOML
"$bin/gemmad" serve --model "$model" --config "$dir/gemmad.toml" --socket "$dir/s" 2> "$dir/log" &
pid=$!
export GEMMAD_SOCKET="$dir/s"
for _ in $(seq 600); do "$bin/gemmactl" health >/dev/null 2>&1 && break; sleep 0.5; done
status() { "$bin/gemmactl" status --json; }
field() { python3 -c "import json,sys; v=json.load(sys.stdin); print(eval(sys.argv[1]))" "$1"; }
rss() { status | field 'round(v["memory"]["process_rss"]/2**30, 3)'; }
gen() {
  "$bin/gemmactl" generate --json --seed 1 --max-tokens 40 "Write a long story about the sea." |
    field 'round(v["timings"]["decode_tokens_per_s"], 2)'
}
gen >/dev/null # warm-up
printf '%-9s %-34s %10s %10s %10s %12s\n' tier slice rss_before rss_after after_run decode_tok_s
for tier in full balanced saver critical; do
  before=$(rss)
  "$bin/gemmactl" governor pin "$tier" >/dev/null
  for _ in $(seq 100); do
    [ "$(status | field 'v["governor"]["tier"]')" = "$tier" ] && break
    sleep 0.1
  done
  sleep 3 # the page-release thread
  after=$(rss)
  slice=$(status | field 'v["active_slice"]')
  tps=$(gen)
  run=$(rss)
  printf '%-9s %-34s %10s %10s %10s %12s\n' "$tier" "$slice" "$before" "$after" "$run" "$tps"
done
