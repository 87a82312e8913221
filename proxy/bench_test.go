package proxy_test

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/internal/metrictest"
	"github.com/ocimirror/ocimirror/internal/registrytest"
)

// discard is a ResponseWriter that keeps nothing, so a benchmark measures
// the server's work and not a recorder's buffer.
type discard struct{ h http.Header }

func (d *discard) Header() http.Header         { return d.h }
func (d *discard) Write(p []byte) (int, error) { return len(p), nil }
func (d *discard) WriteHeader(int)             {}

// benchServe measures serving a cached path: setup pushes content upstream
// and names the path; one request warms the cache, then the handler is
// driven directly from parallel goroutines. It runs without metrics and
// with them (an OpenTelemetry SDK meter provider, as serve has), to show
// what they cost.
func benchServe(b *testing.B, setup func(reg *registrytest.Registry) (path string, size int64)) {
	b.Run("metrics=off", func(b *testing.B) { benchServeWith(b, setup) })
	b.Run("metrics=on", func(b *testing.B) { benchServeWith(b, setup, withMeter(metrictest.New(b).Provider)) })
}

func benchServeWith(b *testing.B, setup func(reg *registrytest.Registry) (path string, size int64), opts ...option) {
	e, reg := start(b, opts...)
	path, size := setup(reg)
	const accept = v1.MediaTypeImageManifest + ", " + v1.MediaTypeImageIndex
	if r := e.get(path, "Accept: "+accept); r.status != 200 {
		b.Fatalf("warm-up: %d %s", r.status, r.body)
	}
	h := e.srv.Handler()
	if size > 0 {
		b.SetBytes(size)
	}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		req, _ := http.NewRequest(http.MethodGet, path, nil)
		req.Header.Set("Accept", accept)
		w := &discard{h: http.Header{}}
		for pb.Next() {
			clear(w.h)
			h.ServeHTTP(w, req)
		}
	})
	b.StopTimer()
	if n := reg.Count("GET", "blobs") + reg.Count("GET", "manifests"); n > 1 {
		b.Fatalf("%d upstream GETs while serving from cache", n)
	}
}

func BenchmarkServeManifestByTag(b *testing.B) {
	benchServe(b, func(reg *registrytest.Registry) (string, int64) {
		reg.PushImage(b, "app", "v1", 10)
		return "/v2/app/manifests/v1", 0
	})
}

func BenchmarkServeManifestByDigest(b *testing.B) {
	benchServe(b, func(reg *registrytest.Registry) (string, int64) {
		img := reg.PushImage(b, "app", "v1", 10)
		return "/v2/app/manifests/" + img.Digest.String(), 0
	})
}

func BenchmarkServeBlob1MiB(b *testing.B) {
	benchServe(b, func(reg *registrytest.Registry) (string, int64) {
		img := reg.PushImage(b, "app", "v1", 1<<20)
		return "/v2/app/blobs/" + img.LayerDigests[0].String(), 1 << 20
	})
}

func BenchmarkServeBlob32MiB(b *testing.B) {
	benchServe(b, func(reg *registrytest.Registry) (string, int64) {
		img := reg.PushImage(b, "app", "v1", 32<<20)
		return "/v2/app/blobs/" + img.LayerDigests[0].String(), 32 << 20
	})
}

// BenchmarkServeManifestAuth measures a manifest hit by digest with
// access control: anonymous (a rule grants anonymous pulls), with a bearer
// token, and with Basic credentials (checked once, then remembered by the
// users' file; here a map); without auth for reference.
func BenchmarkServeManifestAuth(b *testing.B) {
	for _, mode := range []string{"off", "anonymous", "bearer", "basic"} {
		b.Run("auth="+mode, func(b *testing.B) {
			reg := registrytest.New(b)
			opts := []option{withUpstream(upstreamDef{name: reg.Host, reg: reg}), withDefault(reg.Host)}
			if mode != "off" {
				opts = append(opts, withAuth(newAuth(b, reg.Host)))
			}
			e, _ := start(b, opts...)
			img := reg.PushImage(b, "library/alpine", "3", 10)
			path := "/v2/library/alpine/manifests/" + img.Digest.String()
			var header string
			switch mode {
			case "bearer":
				r := e.get("/auth/token?service=ocimirror&scope=repository:library/alpine:pull", basic("alice"))
				var a tokenAnswer
				if err := json.Unmarshal(r.body, &a); err != nil || a.Token == "" {
					b.Fatalf("token: %d %s", r.status, r.body)
				}
				header = "Bearer " + a.Token
			case "basic":
				header = strings.TrimPrefix(basic("alice"), "Authorization: ")
			}
			const accept = v1.MediaTypeImageManifest + ", " + v1.MediaTypeImageIndex
			if header != "" {
				e.headers = []string{"Authorization: " + header}
			}
			if r := e.get(path, "Accept: "+accept); r.status != 200 {
				b.Fatalf("warm-up: %d %s", r.status, r.body)
			}
			h := e.srv.Handler()
			b.ReportAllocs()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				req, _ := http.NewRequest(http.MethodGet, path, nil)
				req.Header.Set("Accept", accept)
				if header != "" {
					req.Header.Set("Authorization", header)
				}
				w := &discard{h: http.Header{}}
				for pb.Next() {
					clear(w.h)
					h.ServeHTTP(w, req)
				}
			})
		})
	}
}
