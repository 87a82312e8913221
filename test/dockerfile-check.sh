#!/usr/bin/env bash
# No Docker engine runs here, so the Dockerfile is checked by running its
# build stage's RUN commands outside Docker, in a copy of the context, with
# /out in a temporary directory; then the result and the final stage are
# checked: a static binary that runs, a non-root user, /data, port 5000.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src" "$work/out"
git ls-files -z | xargs -0 cp --parents -t "$work/src"
# ARG defaults of the build stage, then its RUN lines (continuations joined).
script=$(awk '
  /^FROM /{stage++}
  stage==1 && /^ARG /{sub(/^ARG /,""); print "export " $0; next}
  stage==1 && /^RUN /{sub(/^RUN /,""); line=$0; while (line ~ /\\$/) {sub(/\\$/,"",line); getline nxt; line=line nxt}; print line}
' Dockerfile)
script=${script//\/out/$work/out}
echo "$script" | sed 's/^/dockerfile-check: /' >&2
(cd "$work/src" && bash -euo pipefail -c "$script")
bin="$work/out/ocimirror"
if ldd "$bin" >/dev/null 2>&1; then
  echo "dockerfile-check: $bin is dynamically linked" >&2; exit 1
fi
final=$(awk '/^FROM /{stage++} stage==2' Dockerfile)
grep -q '^USER 65532' <<<"$final" || { echo "dockerfile-check: final stage does not run as non-root" >&2; exit 1; }
grep -q '^VOLUME /data' <<<"$final" || { echo "dockerfile-check: no /data volume" >&2; exit 1; }
grep -q '^EXPOSE 5000' <<<"$final" || { echo "dockerfile-check: port 5000 not exposed" >&2; exit 1; }
grep -q '^FROM scratch' <<<"$final" || { echo "dockerfile-check: final stage is not scratch" >&2; exit 1; }
[ -f /etc/ssl/certs/ca-certificates.crt ] || { echo "dockerfile-check: no CA bundle at the copied path" >&2; exit 1; }
echo "dockerfile-check: ok ($("$bin" version))" >&2
