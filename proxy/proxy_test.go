package proxy_test

import (
	"bytes"
	"fmt"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/internal/registrytest"
	"github.com/ocimirror/ocimirror/upstream"
)

func TestProxy_Base(t *testing.T) {
	e, reg := start(t)
	for _, m := range []string{http.MethodGet, http.MethodHead} {
		r := e.do(m, "/v2/")
		if r.status != 200 || r.header.Get("Docker-Distribution-API-Version") != "registry/2.0" {
			t.Errorf("%s /v2/: %d %v", m, r.status, r.header)
		}
	}
	if n := reg.Total(); n != 0 {
		t.Errorf("/v2/ made %d upstream requests", n)
	}
}

func TestProxy_Routing(t *testing.T) {
	def := registrytest.New(t)
	other := registrytest.New(t)
	e, _ := start(t,
		withUpstream(upstreamDef{name: "default.test", reg: def}),
		withUpstream(upstreamDef{name: "other.test:5000", reg: other}),
		withDefault("default.test"))
	imgDef := def.PushImage(t, "team/app", "v1", 10)
	imgOther := other.PushImage(t, "team/app", "v1", 10)

	tests := []struct {
		name      string
		path      string
		want      []byte
		namespace string
		hits      *registrytest.Registry
	}{
		{name: "default", path: "/v2/team/app/manifests/v1", want: imgDef.Manifest, hits: def},
		{name: "prefix", path: "/v2/other.test:5000/team/app/manifests/v1", want: imgOther.Manifest, hits: other},
		{name: "ns", path: "/v2/team/app/manifests/v1?ns=other.test:5000", want: imgOther.Manifest, namespace: "other.test:5000", hits: other},
		{name: "ns default", path: "/v2/team/app/manifests/v1?ns=default.test", want: imgDef.Manifest, namespace: "default.test", hits: def},
		{name: "prefix of default", path: "/v2/default.test/team/app/manifests/v1", want: imgDef.Manifest, hits: def},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			def.ResetCounts()
			other.ResetCounts()
			e.clock.Advance(time.Hour) // every case revalidates its tag
			r := e.get(tc.path)
			if r.status != 200 || !bytes.Equal(r.body, tc.want) {
				t.Fatalf("status %d body %q", r.status, r.body)
			}
			if got := r.header.Get("OCI-Namespace"); got != tc.namespace {
				t.Errorf("OCI-Namespace %q, want %q", got, tc.namespace)
			}
			if tc.hits.Count(http.MethodHead, "manifests")+tc.hits.Count(http.MethodGet, "manifests") == 0 {
				t.Error("the expected upstream saw no request")
			}
			if def.Total()+other.Total() != tc.hits.Total() {
				t.Error("the other upstream was called")
			}
		})
	}

	t.Run("unknown ns", func(t *testing.T) {
		def.ResetCounts()
		other.ResetCounts()
		r := e.get("/v2/team/app/manifests/v1?ns=unknown.example")
		if r.status != 404 || errorCode(t, r.body) != "NAME_UNKNOWN" {
			t.Fatalf("status %d body %s", r.status, r.body)
		}
		if n := def.Total() + other.Total(); n != 0 {
			t.Errorf("%d upstream requests for an unknown ns", n)
		}
	})
}

func TestProxy_DockerHubLibrary(t *testing.T) {
	hub := registrytest.New(t)
	e, _ := start(t, withUpstream(upstreamDef{name: "docker.io", reg: hub}), withDefault("docker.io"))
	img := hub.PushImage(t, "library/alpine", "3", 10)
	for _, path := range []string{
		"/v2/alpine/manifests/3",                            // Docker's registry-mirrors, no library/
		"/v2/library/alpine/manifests/3",                    // Docker's registry-mirrors as it really sends
		"/v2/alpine/manifests/3?ns=docker.io",               // containerd
		"/v2/library/alpine/manifests/3?ns=index.docker.io", // containerd with Docker Hub's other name
		"/v2/docker.io/alpine/manifests/3",                  // prefix
		"/v2/alpine/blobs/" + img.LayerDigests[0].String(),  // blob, short name
		"/v2/library/alpine/blobs/" + img.Digest.String(),   // manifest digest is not a blob
	} {
		r := e.get(path)
		want := img.Manifest
		if path == "/v2/alpine/blobs/"+img.LayerDigests[0].String() {
			want = img.Layers[0]
		}
		if path == "/v2/library/alpine/blobs/"+img.Digest.String() {
			if r.status != 404 || errorCode(t, r.body) != "BLOB_UNKNOWN" {
				t.Errorf("%s: status %d %s", path, r.status, r.body)
			}
			continue
		}
		if r.status != 200 || !bytes.Equal(r.body, want) {
			t.Errorf("%s: status %d body %.80q", path, r.status, r.body)
		}
	}
}

func TestProxy_ManifestHeaders(t *testing.T) {
	e, reg := start(t)
	img := reg.PushImage(t, "app", "v1", 100)
	want := http.Header{
		"Content-Type":          {v1.MediaTypeImageManifest},
		"Content-Length":        {strconv.Itoa(len(img.Manifest))},
		"Docker-Content-Digest": {img.Digest.String()},
	}
	for _, tc := range []struct{ method, ref string }{
		{"HEAD", "v1"}, {"GET", "v1"}, {"HEAD", img.Digest.String()}, {"GET", img.Digest.String()},
		{"GET", "v1"}, {"HEAD", "v1"},
	} {
		r := e.do(tc.method, "/v2/app/manifests/"+tc.ref)
		if r.status != 200 {
			t.Fatalf("%s %s: %d %s", tc.method, tc.ref, r.status, r.body)
		}
		for k, v := range want {
			if r.header.Get(k) != v[0] {
				t.Errorf("%s %s: %s = %q, want %q", tc.method, tc.ref, k, r.header.Get(k), v[0])
			}
		}
		if tc.method == "GET" && !bytes.Equal(r.body, img.Manifest) {
			t.Errorf("%s %s: body differs from the upstream's", tc.method, tc.ref)
		}
		if tc.method == "HEAD" && len(r.body) != 0 {
			t.Errorf("HEAD has a body")
		}
	}
	// HEAD by tag, then GET by tag (by digest is cached), then one more round.
	if got := reg.Count("HEAD", "manifests"); got != 1 {
		t.Errorf("upstream manifest HEADs: %d, want 1", got)
	}
	if got := reg.Count("GET", "manifests"); got != 1 {
		t.Errorf("upstream manifest GETs: %d, want 1", got)
	}
}

func TestProxy_ManifestAccept(t *testing.T) {
	e, reg := start(t)
	img := reg.PushImage(t, "app", "v1", 10)
	tests := []struct {
		name   string
		accept []string
		status int
	}{
		{"none", nil, 200},
		{"exact", []string{"Accept: " + v1.MediaTypeImageManifest}, 200},
		{"list", []string{"Accept: " + upstream.MediaTypeDockerManifest + ", " + v1.MediaTypeImageManifest + ";q=0.5"}, 200},
		{"wildcard", []string{"Accept: */*"}, 200},
		{"docker only", []string{"Accept: " + upstream.MediaTypeDockerManifest}, 404},
		{"index only", []string{"Accept: " + v1.MediaTypeImageIndex, "Accept: " + upstream.MediaTypeDockerManifestList}, 404},
	}
	for _, tc := range tests {
		for _, ref := range []string{"v1", img.Digest.String()} {
			r := e.get("/v2/app/manifests/"+ref, tc.accept...)
			if r.status != tc.status {
				t.Errorf("%s %s: status %d, want %d", tc.name, ref, r.status, tc.status)
			}
			if tc.status == 404 && errorCode(t, r.body) != "MANIFEST_UNKNOWN" {
				t.Errorf("%s: code %s", tc.name, r.body)
			}
		}
	}
	// The narrow Accept never reached the upstream: one full-Accept GET.
	if got := reg.Count("GET", "manifests"); got != 1 {
		t.Errorf("upstream manifest GETs: %d, want 1", got)
	}
}

func TestProxy_BlobHeadersAndRange(t *testing.T) {
	e, reg := start(t)
	img := reg.PushImage(t, "app", "v1", 1000)
	layer, d := img.Layers[0], img.LayerDigests[0]
	path := "/v2/app/blobs/" + d.String()
	size := len(layer)

	// A range on a miss is served from the fill.
	r := e.get(path, "Range: bytes=100-199")
	if r.status != 206 || !bytes.Equal(r.body, layer[100:200]) || r.header.Get("Content-Range") != fmt.Sprintf("bytes 100-199/%d", size) {
		t.Fatalf("range on miss: %d %q", r.status, r.header.Get("Content-Range"))
	}
	waitFor(t, "fill to commit", func() bool { return e.get(path).status == 200 && reg.Count("GET", "blobs") == 1 })

	r = e.get(path)
	if !bytes.Equal(r.body, layer) {
		t.Fatal("body differs")
	}
	for k, v := range map[string]string{
		"Content-Type": "application/octet-stream", "Content-Length": strconv.Itoa(size),
		"Docker-Content-Digest": d.String(), "Accept-Ranges": "bytes",
	} {
		if got := r.header.Get(k); got != v {
			t.Errorf("GET %s = %q, want %q", k, got, v)
		}
	}
	h := e.do("HEAD", path)
	if h.status != 200 || h.header.Get("Content-Length") != strconv.Itoa(size) || h.header.Get("Docker-Content-Digest") != d.String() {
		t.Errorf("HEAD: %d %v", h.status, h.header)
	}

	tests := []struct {
		rng        string
		status     int
		from, to   int // expected body layer[from:to]
		contentRng string
	}{
		{"bytes=0-9", 206, 0, 10, "bytes 0-9/1000"},
		{"bytes=990-", 206, 990, 1000, "bytes 990-999/1000"},
		{"bytes=-5", 206, 995, 1000, "bytes 995-999/1000"},
		{"bytes=500-5000", 206, 500, 1000, "bytes 500-999/1000"},
		{"bytes=-5000", 206, 0, 1000, "bytes 0-999/1000"},
		{"bytes=1000-", 416, 0, 0, "bytes */1000"},
		{"bytes=-0", 416, 0, 0, "bytes */1000"},
		{"bytes=0-1,5-6", 200, 0, 1000, ""},
		{"items=0-1", 200, 0, 1000, ""},
		{"bytes=9-2", 200, 0, 1000, ""},
	}
	for _, tc := range tests {
		r := e.get(path, "Range: "+tc.rng)
		if r.status != tc.status || r.header.Get("Content-Range") != tc.contentRng {
			t.Errorf("%s: %d %q, want %d %q", tc.rng, r.status, r.header.Get("Content-Range"), tc.status, tc.contentRng)
			continue
		}
		if tc.status == 416 {
			if errorCode(t, r.body) != "RANGE_INVALID" {
				t.Errorf("%s: %s", tc.rng, r.body)
			}
			continue
		}
		if !bytes.Equal(r.body, layer[tc.from:tc.to]) || r.header.Get("Content-Length") != strconv.Itoa(tc.to-tc.from) {
			t.Errorf("%s: wrong bytes or length %s", tc.rng, r.header.Get("Content-Length"))
		}
	}
	if got := reg.Count("GET", "blobs"); got != 1 {
		t.Errorf("upstream blob GETs: %d, want 1", got)
	}
}

func TestProxy_BlobHeadMissIsHeadUpstream(t *testing.T) {
	e, reg := start(t)
	img := reg.PushImage(t, "app", "v1", 5000)
	d := img.LayerDigests[0]
	r := e.do("HEAD", "/v2/app/blobs/"+d.String())
	if r.status != 200 || r.header.Get("Content-Length") != "5000" || r.header.Get("Docker-Content-Digest") != d.String() {
		t.Fatalf("HEAD: %d %v", r.status, r.header)
	}
	if reg.Count("HEAD", "blobs") != 1 || reg.Count("GET", "blobs") != 0 {
		t.Errorf("upstream HEAD %d GET %d, want 1 and 0", reg.Count("HEAD", "blobs"), reg.Count("GET", "blobs"))
	}
	missing := digest.FromString("nothing")
	if r := e.do("HEAD", "/v2/app/blobs/"+missing.String()); r.status != 404 {
		t.Errorf("HEAD of unknown blob: %d", r.status)
	}
	if r := e.get("/v2/app/blobs/" + missing.String()); r.status != 404 || errorCode(t, r.body) != "BLOB_UNKNOWN" {
		t.Errorf("GET of unknown blob: %d %s", r.status, r.body)
	}
}

func TestProxy_TagTTLAndRevalidation(t *testing.T) {
	reg := registrytest.New(t)
	e, _ := start(t, withUpstream(upstreamDef{name: "reg.test", reg: reg, ttl: time.Minute}), withDefault("reg.test"))
	img := reg.PushImage(t, "app", "v1", 10)

	if r := e.get("/v2/app/manifests/v1"); !bytes.Equal(r.body, img.Manifest) {
		t.Fatal("first pull")
	}
	reg.ResetCounts()
	e.clock.Advance(59 * time.Second)
	if r := e.get("/v2/app/manifests/v1"); !bytes.Equal(r.body, img.Manifest) {
		t.Fatal("within TTL")
	}
	if n := reg.Total(); n != 0 {
		t.Errorf("within the TTL: %d upstream requests, want 0", n)
	}

	e.clock.Advance(2 * time.Second)
	if r := e.get("/v2/app/manifests/v1"); !bytes.Equal(r.body, img.Manifest) {
		t.Fatal("after TTL, same digest")
	}
	if reg.Count("HEAD", "manifests") != 1 || reg.Count("GET", "manifests") != 0 {
		t.Errorf("revalidation: HEAD %d GET %d, want 1 and 0", reg.Count("HEAD", "manifests"), reg.Count("GET", "manifests"))
	}
	// The revalidation restarted the TTL.
	reg.ResetCounts()
	e.clock.Advance(30 * time.Second)
	e.get("/v2/app/manifests/v1")
	if n := reg.Total(); n != 0 {
		t.Errorf("after revalidation, within TTL: %d upstream requests", n)
	}

	// The tag moves upstream.
	img2 := reg.PushImage(t, "app", "v1", 20)
	reg.ResetCounts()
	e.clock.Advance(time.Minute)
	r := e.get("/v2/app/manifests/v1")
	if !bytes.Equal(r.body, img2.Manifest) || r.header.Get("Docker-Content-Digest") != img2.Digest.String() {
		t.Fatal("moved tag not followed")
	}
	if reg.Count("HEAD", "manifests") != 1 || reg.Count("GET", "manifests") != 1 {
		t.Errorf("moved tag: HEAD %d GET %d, want 1 and 1", reg.Count("HEAD", "manifests"), reg.Count("GET", "manifests"))
	}
	// The old digest is still served by digest, from cache.
	reg.ResetCounts()
	if r := e.get("/v2/app/manifests/" + img.Digest.String()); !bytes.Equal(r.body, img.Manifest) || reg.Total() != 0 {
		t.Error("old manifest by digest not served from cache")
	}
}

func TestProxy_StaleIfError(t *testing.T) {
	reg := registrytest.New(t)
	e, _ := start(t, withUpstream(upstreamDef{name: "reg.test", reg: reg, ttl: time.Minute}), withDefault("reg.test"))
	img := reg.PushImage(t, "app", "v1", 10)
	e.get("/v2/app/manifests/v1")
	e.get("/v2/app/blobs/" + img.LayerDigests[0].String())
	e.get("/v2/app/tags/list")

	failures := []struct {
		name   string
		answer func(w http.ResponseWriter)
	}{
		{"503", func(w http.ResponseWriter) { w.WriteHeader(503) }},
		{"429", func(w http.ResponseWriter) { w.Header().Set("Retry-After", "0"); w.WriteHeader(429) }},
		{"connection reset", func(w http.ResponseWriter) { panic(http.ErrAbortHandler) }},
	}
	for _, f := range failures {
		t.Run(f.name, func(t *testing.T) {
			reg.Intercept(func(w http.ResponseWriter, r *http.Request) bool { f.answer(w); return true })
			defer reg.Intercept(nil)
			e.clock.Advance(2 * time.Minute)
			for _, method := range []string{"GET", "HEAD"} {
				r := e.do(method, "/v2/app/manifests/v1")
				if r.status != 200 || r.header.Get("Docker-Content-Digest") != img.Digest.String() {
					t.Fatalf("%s: stale tag not served: %d %s", method, r.status, r.body)
				}
			}
			if r := e.get("/v2/app/tags/list"); r.status != 200 {
				t.Errorf("stale tag list not served: %d", r.status)
			}
			if r := e.get("/v2/app/blobs/" + img.LayerDigests[0].String()); !bytes.Equal(r.body, img.Layers[0]) {
				t.Error("cached blob not served")
			}
			if r := e.get("/v2/app/manifests/v2"); r.status < 429 {
				t.Errorf("uncached tag with upstream down: %d", r.status)
			}
		})
	}

	t.Run("upstream stopped", func(t *testing.T) {
		e2, reg2 := start(t)
		img := reg2.PushImage(t, "app", "v1", 10)
		e2.get("/v2/app/manifests/v1")
		reg2.Close()
		e2.clock.Advance(time.Hour)
		r := e2.get("/v2/app/manifests/v1")
		if r.status != 200 || !bytes.Equal(r.body, img.Manifest) {
			t.Fatalf("stale tag with upstream stopped: %d %s", r.status, r.body)
		}
		r = e2.get("/v2/app/manifests/other")
		if r.status != 502 || errorCode(t, r.body) != "UNAVAILABLE" {
			t.Errorf("uncached tag with upstream stopped: %d %s", r.status, r.body)
		}
	})

	t.Run("deleted upstream is not stale", func(t *testing.T) {
		reg.Intercept(func(w http.ResponseWriter, r *http.Request) bool {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(404)
			fmt.Fprint(w, `{"errors":[{"code":"MANIFEST_UNKNOWN","message":"gone"}]}`)
			return true
		})
		defer reg.Intercept(nil)
		e.clock.Advance(2 * time.Minute)
		if r := e.get("/v2/app/manifests/v1"); r.status != 404 || errorCode(t, r.body) != "MANIFEST_UNKNOWN" {
			t.Errorf("tag deleted upstream: %d %s", r.status, r.body)
		}
	})
}

func TestProxy_TooManyRequestsPassedOn(t *testing.T) {
	e, reg := start(t)
	reg.Intercept(func(w http.ResponseWriter, r *http.Request) bool {
		w.Header().Set("Retry-After", "30")
		w.Header().Set("RateLimit-Limit", "100;w=21600")
		w.Header().Set("RateLimit-Remaining", "0;w=21600")
		w.WriteHeader(429)
		return true
	})
	r := e.get("/v2/app/manifests/v1")
	if r.status != 429 || errorCode(t, r.body) != "TOOMANYREQUESTS" {
		t.Fatalf("status %d %s", r.status, r.body)
	}
	if r.header.Get("Retry-After") != "30" || r.header.Get("RateLimit-Remaining") != "0;w=21600" {
		t.Errorf("rate limit headers not passed on: %v", r.header)
	}
	// Retry-After is honoured: the next request does not reach the upstream.
	reg.ResetCounts()
	r = e.get("/v2/app/blobs/" + digest.FromString("x").String())
	if r.status != 429 || reg.Total() != 0 {
		t.Errorf("during Retry-After: status %d, %d upstream requests", r.status, reg.Total())
	}
	if ra, _ := strconv.Atoi(r.header.Get("Retry-After")); ra < 1 || ra > 30 {
		t.Errorf("Retry-After during backoff: %q", r.header.Get("Retry-After"))
	}
}

func TestProxy_UpstreamDeniedIsNotFound(t *testing.T) {
	e, reg := start(t)
	reg.Intercept(func(w http.ResponseWriter, r *http.Request) bool {
		w.Header().Set("WWW-Authenticate", `Basic realm="upstream"`)
		w.WriteHeader(401)
		return true
	})
	for _, tc := range []struct{ path, code string }{
		{"/v2/private/app/manifests/v1", "MANIFEST_UNKNOWN"},
		{"/v2/private/app/blobs/" + digest.FromString("x").String(), "BLOB_UNKNOWN"},
		{"/v2/private/app/tags/list", "NAME_UNKNOWN"},
	} {
		r := e.get(tc.path)
		if r.status != 404 || errorCode(t, r.body) != tc.code || r.header.Get("WWW-Authenticate") != "" {
			t.Errorf("%s: %d %s %v", tc.path, r.status, r.body, r.header)
		}
	}
}

func TestProxy_Restart(t *testing.T) {
	e, reg := start(t)
	img := reg.PushImage(t, "app", "v1", 300_000, 10)
	e.get("/v2/app/manifests/v1")
	for _, d := range img.LayerDigests {
		e.get("/v2/app/blobs/" + d.String())
	}
	e.restart()
	reg.Close() // nothing may come from upstream now

	r := e.get("/v2/app/manifests/v1")
	if r.status != 200 || !bytes.Equal(r.body, img.Manifest) {
		t.Fatalf("tag after restart: %d %s", r.status, r.body)
	}
	if r := e.get("/v2/app/manifests/" + img.Digest.String()); !bytes.Equal(r.body, img.Manifest) {
		t.Fatal("manifest by digest after restart")
	}
	for i, d := range img.LayerDigests {
		r := e.get("/v2/app/blobs/" + d.String())
		if r.status != 200 || !bytes.Equal(r.body, img.Layers[i]) {
			t.Fatalf("blob %d after restart: %d", i, r.status)
		}
		r = e.get("/v2/app/blobs/"+d.String(), "Range: bytes=5-")
		if r.status != 206 || !bytes.Equal(r.body, img.Layers[i][5:]) {
			t.Fatalf("blob %d range after restart: %d", i, r.status)
		}
	}
}
