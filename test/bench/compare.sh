#!/usr/bin/env bash
# Side-by-side comparison of ocimirror and distribution v3's proxy mode in
# front of the same distribution v3 upstream (see test/bench/compare).
#
#   test/bench/compare.sh                        3 runs, 10 s of wrk per measure
#   test/bench/compare.sh --runs 1 --duration 3s a quick look (CI)
#   test/bench/compare.sh --baseline REF         also manifest hits of ocimirror
#                                                built at git REF, same run
#   test/bench/compare.sh --auth                 also manifest hits with access
#                                                control: anonymous, bearer token
#
# Installs distribution v3 into .tools/bin and wrk (apt-get) when missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
test/tools/install.sh registry
command -v wrk >/dev/null || test/tools/install.sh
exec go run ./test/bench/compare --registry .tools/bin/registry "$@"
