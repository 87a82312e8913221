#!/usr/bin/env bash
# Runs every Go fuzz target of the packages that parse untrusted input
# (names, digests, ranges, routing; manifests; referrers answers; the YAML
# configuration), one after another, each for a bounded time: 20s, or the
# first argument (test/fuzz.sh 5s; any -fuzztime value, 10000x too).
# Prints one line per target and stops at the first failure, with Go's
# output; the failing input is then in <pkg>/testdata/fuzz/<target>/, to
# fix and commit as a regression seed. Minimizing a new input may take 5s
# at most (Go's default, 60s, can eat a whole run's time).
set -euo pipefail
cd "$(dirname "$0")/.."
fuzztime=${1:-20s}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for pkg in ./proxy/ ./manifest/ ./referrers/ ./config/; do
  if ! list=$(go test -list '^Fuzz' "$pkg" 2>&1); then
    echo "fuzz: FAIL $pkg: listing its fuzz targets"
    echo "$list"
    exit 1
  fi
  targets=$(grep '^Fuzz' <<<"$list" || true)
  if [ -z "$targets" ]; then
    echo "fuzz: no fuzz targets in $pkg" >&2
    exit 1
  fi
  for name in $targets; do
    start=$(date +%s)
    corpus="${pkg%/}/testdata/fuzz/$name"
    for attempt in 1 2; do
      before=$(ls "$corpus" 2>/dev/null | sort || true)
      if go test -run '^$' -fuzz "^$name\$" -fuzztime "$fuzztime" -fuzzminimizetime 5s "$pkg" >"$log" 2>&1; then
        break
      fi
      after=$(ls "$corpus" 2>/dev/null | sort || true)
      # Go's coordinator (go.dev/issue/75804, fixed in Go 1.27) can fail a
      # target at the -fuzztime deadline with a bare "context deadline
      # exceeded" and no failing input. That, once, is retried; a written
      # input, any other failure, or the same thing twice, fails the run.
      if [ "$attempt" = 1 ] && [ "$before" = "$after" ] &&
        grep -q '^    context deadline exceeded$' "$log" &&
        ! grep -q -e 'Failing input written' -e '^panic:' -e '--- FAIL: .*#' "$log"; then
        echo "fuzz: $pkg $name hit Go's fuzz deadline race (go.dev/issue/75804) with no failing input; retrying once"
        continue
      fi
      echo "fuzz: FAIL $pkg $name after $(( $(date +%s) - start ))s"
      cat "$log"
      exit 1
    done
    execs=$(grep -o 'execs: [0-9]*' "$log" | tail -n 1 | cut -d' ' -f2 || true)
    echo "fuzz: ok   $pkg $name: ${execs:-?} execs in $fuzztime ($(( $(date +%s) - start ))s with the build)"
  done
done
