#!/usr/bin/env bash
# The storage benchmarks of issue 8, with the median of each figure over
# several runs:
#   BenchmarkScale       (cache/)  a store of 1,000,000 manifests and 200,000
#                                  blobs: start-up, RssAnon, hits per second
#                                  against a store of 1,000 of each, one
#                                  eviction pass
#   BenchmarkEvictStall  (proxy/)  p50/p99 of warm manifest GETs with no
#                                  eviction and while a pass removes 10,000
#                                  entries
#
#   test/bench/scale.sh                      3 runs of each
#   test/bench/scale.sh --runs 5 --dir /var/tmp/scale   keep the generated store
#   test/bench/scale.sh --only stall         BenchmarkEvictStall alone
#   test/bench/scale.sh --wait-idle          on a shared machine: before each
#                                            run, wait (up to 10 min) for 2 s
#                                            of 90 % idle CPU
#
# The big store is generated once (about a minute, 1.7 GB) into --dir, or
# into a temporary directory removed at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."

runs=3 dir="" only="" wait_idle=""
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    --only) only="$2"; shift 2 ;;
    --wait-idle) wait_idle=1; shift ;;
    *) echo "usage: $0 [--runs N] [--dir DIR] [--only scale|stall] [--wait-idle]" >&2; exit 2 ;;
  esac
done

# idle waits for 2 s in which the CPUs were 90 % idle (Linux /proc/stat).
idle() {
  [ -n "$wait_idle" ] || return 0
  local i t1 i1 t2 i2 u n s id w x y z
  for i in $(seq 300); do
    read -r _ u n s id w x y z _ </proc/stat; t1=$((u + n + s + id + w + x + y + z)) i1=$((id + w))
    sleep 2
    read -r _ u n s id w x y z _ </proc/stat; t2=$((u + n + s + id + w + x + y + z)) i2=$((id + w))
    [ $((100 * (i2 - i1) / (t2 - t1))) -lt 90 ] || return 0
  done
  echo "the machine was never idle; measuring anyway" >&2
}
tmpdir=""
if [ -z "$dir" ]; then
  tmpdir=$(mktemp -d) dir=$tmpdir
fi
mkdir -p "$dir"
out=$(mktemp)
trap 'rm -f "$out"; [ -z "$tmpdir" ] || rm -rf "$tmpdir"' EXIT

for run in $(seq "$runs"); do
  if [ "$only" != stall ]; then
    idle
    echo "BenchmarkScale, run $run of $runs (store in $dir)" >&2
    OCIMIRROR_BENCH_SCALE=1 OCIMIRROR_SCALE_DIR="$dir" \
      go test ./cache -run '^$' -bench '^BenchmarkScale$' -benchtime 1x -timeout 0 | tee -a "$out" >&2
  fi
  if [ "$only" != scale ]; then
    idle
    echo "BenchmarkEvictStall, run $run of $runs" >&2
    go test ./proxy -run '^$' -bench '^BenchmarkEvictStall$' -benchtime 1x -timeout 0 | tee -a "$out" >&2
  fi
done

# Benchmark lines are: name, iterations, then value-unit pairs.
echo
echo "medians of $runs runs:"
awk '/^Benchmark/ { sub(/-[0-9]+$/, "", $1); for (i = 3; i < NF; i += 2) if ($(i+1) != "ns/op") print $1, $(i+1), $i }' "$out" |
  sort -k1,1 -k2,2 -k3,3g |
  awk '{ key = $1 " " $2; v[key, ++n[key]] = $3; if (!(key in seen)) { seen[key] = 1; order[++k] = key } }
       END { for (j = 1; j <= k; j++) { key = order[j]; c = n[key]
               m = (c % 2) ? v[key, (c + 1) / 2] : (v[key, c / 2] + v[key, c / 2 + 1]) / 2
               split(key, p, " "); printf "%-28s %-26s %g\n", p[1], p[2], m } }'
