# ocimirror: a static binary on an empty base, run as a non-root user, with
# its cache on the /data volume.
#
#   docker build -t ocimirror .
#   docker run -p 5000:5000 -v ocimirror-data:/data ocimirror
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -buildvcs=false -ldflags "-s -w -X main.version=${VERSION}" -o /out/ocimirror ./cmd/ocimirror
RUN mkdir -p /out/data && /out/ocimirror version

FROM scratch
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/ocimirror /ocimirror
COPY --from=build --chown=65532:65532 /out/data /data
USER 65532:65532
VOLUME /data
EXPOSE 5000
ENTRYPOINT ["/ocimirror"]
CMD ["serve", "--data", "/data"]
