#!/usr/bin/env bash
# Installs what the end-to-end tests and the benchmark need, pinned, into
# .tools/bin (Go-built tools) and through apt-get (Debian packages, when run
# as root). Safe to run again: present tools are kept.
#
#   test/tools/install.sh            everything
#   test/tools/install.sh registry   only the named Go tools
set -euo pipefail
cd "$(dirname "$0")/../.."
bin="$PWD/.tools/bin"
mkdir -p "$bin"

declare -A modules=(
  [registry]=github.com/distribution/distribution/v3/cmd/registry@v3.1.2
  [oras]=oras.land/oras/cmd/oras@v1.3.6
  [regctl]=github.com/regclient/regclient/cmd/regctl@v0.11.7
  [crane]=github.com/google/go-containerregistry/cmd/crane@v0.22.1
  [cosign]=github.com/sigstore/cosign/v3/cmd/cosign@v3.1.3
)
conformance=github.com/opencontainers/distribution-spec/conformance@v0.0.0-20260831232431-97274622c111
# SeaweedFS: the S3-compatible store of the shared tier's tests (issue 12).
seaweedfs=github.com/seaweedfs/seaweedfs
seaweedfs_version=v0.0.0-20261109003541-7506e5f91cd6

wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || wanted=(registry oras regctl crane cosign oci-conformance weed)
for name in "${wanted[@]}"; do
  if [ -x "$bin/$name" ]; then continue; fi
  if [ "$name" = oci-conformance ]; then
    # The suite is a main package with its own go.mod: build it in place.
    echo "installing oci-conformance ($conformance)" >&2
    dir=$(go mod download -json "$conformance" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
    (cd "$dir" && GOFLAGS=-mod=mod go build -o "$bin/oci-conformance" .)
    continue
  fi
  if [ "$name" = weed ]; then
    # go install refuses SeaweedFS (its go.mod has a replace directive):
    # build it in a scratch module that copies that replace. The module
    # stays in .tools/weed-build, so a rebuild reuses its go.sum. About
    # 4 minutes; the binary is about 230 MB.
    echo "installing weed ($seaweedfs@$seaweedfs_version, about 4 minutes)" >&2
    scratch="$PWD/.tools/weed-build"
    mkdir -p "$scratch"
    if [ ! -f "$scratch/go.mod" ]; then
      printf '%s\n' \
        'module ocimirror.test/weed-build' '' 'go 1.26' '' \
        "require $seaweedfs $seaweedfs_version" '' \
        'replace github.com/tyler-smith/go-bip39 => github.com/cosmos/go-bip39 v1.0.0' \
        >"$scratch/go.mod"
    fi
    # A go mod tidy over a file importing weed/command misses modules;
    # go get of the main package resolves them all.
    (cd "$scratch" &&
      GOFLAGS=-mod=mod go get "$seaweedfs/weed@$seaweedfs_version" &&
      GOFLAGS="-mod=mod -buildvcs=false" go build -o "$bin/weed.tmp" "$seaweedfs/weed")
    mv "$bin/weed.tmp" "$bin/weed"
    continue
  fi
  echo "installing $name (${modules[$name]})" >&2
  GOBIN="$bin" GOFLAGS=-buildvcs=false go install "${modules[$name]}"
done

if [ $# -eq 0 ]; then
  packages=()
  command -v wrk >/dev/null || packages+=(wrk)
  command -v docker-registry >/dev/null || packages+=(docker-registry)
  command -v containerd >/dev/null || packages+=(containerd)
  command -v skopeo >/dev/null || packages+=(skopeo)
  # prometheus and promtool: the observability tests scrape ocimirror with it.
  command -v prometheus >/dev/null && command -v promtool >/dev/null || packages+=(prometheus)
  if [ ${#packages[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
      echo "installing Debian packages: ${packages[*]}" >&2
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}") >&2
    else
      echo "missing: ${packages[*]} (install with: sudo apt-get install -y ${packages[*]})" >&2
      exit 1
    fi
  fi
fi
