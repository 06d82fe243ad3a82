#!/usr/bin/env bash
# Idle daemon benchmark: 10 providers whose price feeds are polled every minute, 20 services
# evaluated every minute. Measures resident memory and CPU share of the daemon over a window
# (default 180 s, or $1). Targets: RSS under 30 MiB, CPU under 0.5 %.
set -euo pipefail
cd "$(dirname "$0")/.."
window=${1:-180}
cargo build --release --locked --quiet
bin=target/release/fluidcloud
dir=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

{
  echo "provider,region,flavor,vcpus,memory_gib,price_per_hour,storage_price_per_gib_month,egress_price_per_gib,currency"
  for p in $(seq 0 9); do
    for f in $(seq 1 40); do
      echo "p$p,r$p,f$f,$(( (f % 8) + 1 )),$(( (f % 8 + 1) * 4 )),0.$(( 100 + p * 7 + f )),0.05,0.01,USD"
    done
  done
} > "$dir/catalogue.csv"
cp policies/cheapest.rhai "$dir/"
{
  echo "[daemon]"
  echo "state_dir = \"$dir/state\""
  echo "listen = \"127.0.0.1:$port\""
  echo "[broker]"
  echo "evaluate_schedule = \"30 * * * * *\""
  for p in $(seq 0 9); do
    echo "[providers.p$p]"
    echo "driver = \"local\""
    echo "region = \"r$p\""
    echo "region_info = { country = \"DE\", eu = true, eea = true }"
    echo "[providers.p$p.pricing]"
    echo "format = \"csv\""
    echo "url = \"file://$dir/catalogue.csv\""
    echo "schedule = \"0 * * * * *\""
    echo "ttl_secs = 0"
  done
  echo "[policies.cheapest]"
  echo "file = \"$dir/cheapest.rhai\""
  for s in $(seq 0 19); do
    echo "[services.s$s]"
    echo "provider = \"p$(( s % 10 ))\""
    echo "policy = \"cheapest\""
    echo "vcpus = 2"
    echo "memory_gib = 8"
  done
} > "$dir/fluidcloud.toml"

"$bin" daemon --config "$dir/fluidcloud.toml" 2>"$dir/daemon.log" &
pid=$!
for _ in $(seq 100); do
  curl -sf "127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  sleep 0.2
done
sleep 5 # let start-up settle
ticks=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }
c0=$(cpu); t0=$(date +%s.%N); peak=0
end=$(( $(date +%s) + window ))
while [ "$(date +%s)" -lt "$end" ]; do
  r=$(rss_kib); [ "$r" -gt "$peak" ] && peak=$r
  sleep 1
done
c1=$(cpu); t1=$(date +%s.%N)
polls=$(curl -s "127.0.0.1:$port/metrics" | awk '/^fluidcloud_poll_runs_total/ {s += $2} END {print s}')
evals=$(curl -s "127.0.0.1:$port/metrics" | awk '/^fluidcloud_policy_evaluations_total/ {s += $2} END {print s}')
python3 - "$c0" "$c1" "$t0" "$t1" "$ticks" "$peak" "$(rss_kib)" "$polls" "$evals" "$window" <<'PY'
import sys
c0, c1, t0, t1, hz, peak, now, polls, evals, window = sys.argv[1:]
cpu = (float(c1) - float(c0)) / float(hz) / (float(t1) - float(t0)) * 100
print(f"idle daemon, 10 providers polled every minute, 20 services, {window} s window")
print(f"  polls {polls}, policy evaluations {evals}")
print(f"  RSS now {int(now)/1024:.1f} MiB, peak {int(peak)/1024:.1f} MiB (target < 30 MiB)")
print(f"  CPU {cpu:.3f} % of one core (target < 0.5 %)")
PY
