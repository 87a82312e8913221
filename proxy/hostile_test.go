package proxy_test

import (
	"bytes"
	"context"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/internal/registrytest"
)

const portal = "<html><body>Please log in to the guest network</body></html>"

// portalFor answers every manifest request of the upstream with a captive
// portal's page: 200 text/html, and no digest header.
func portalFor(reg *registrytest.Registry) {
	reg.Intercept(func(w http.ResponseWriter, r *http.Request) bool {
		if !strings.Contains(r.URL.Path, "/manifests/") {
			return false
		}
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.WriteHeader(http.StatusOK)
		if r.Method == http.MethodGet {
			_, _ = w.Write([]byte(portal))
		}
		return true
	})
}

// An upstream's HTML page never becomes a manifest: a tag keeps its last
// good manifest, the page is served under no digest, and errors and
// manifests say nosniff.
func TestProxy_Hostile_HTMLIsNotAManifest(t *testing.T) {
	e, reg := start(t)
	img := reg.PushImage(t, "app", "v1", 100)
	expect(t, "warm", e.get("/v2/app/manifests/v1"), 200, img.Manifest)

	portalFor(reg)
	e.clock.Advance(time.Hour)
	for _, accept := range []string{"", "text/html", "*/*"} {
		r := e.get("/v2/app/manifests/v1", "Accept: "+accept)
		if accept == "text/html" {
			// The client accepts only HTML: the stored manifest is not that.
			if r.status != 404 || r.header.Get("Content-Type") != "application/json" {
				t.Fatalf("Accept text/html: %d %q", r.status, r.header.Get("Content-Type"))
			}
			continue
		}
		expect(t, "tag during the portal, Accept "+accept, r, 200, img.Manifest)
		if r.header.Get("X-Content-Type-Options") != "nosniff" {
			t.Errorf("manifest without nosniff: %v", r.header)
		}
	}
	// A tag never seen before: an upstream error, nothing stored.
	reg.PushManifest(t, "app", "v2", v1.MediaTypeImageManifest, img.Manifest)
	r := e.get("/v2/app/manifests/v2")
	if r.status != 502 || r.header.Get("X-Content-Type-Options") != "nosniff" || errorCode(t, r.body) != "UNAVAILABLE" {
		t.Fatalf("new tag during the portal: %d %v %s", r.status, r.header, r.body)
	}
	pageDigest := digest.FromString(portal)
	if r := e.get("/v2/app/manifests/" + pageDigest.String()); r.status == 200 {
		t.Fatalf("the page is served under its digest")
	}
	// Then the upstream fails outright: the last good manifest is still there.
	reg.Intercept(func(w http.ResponseWriter, _ *http.Request) bool { w.WriteHeader(500); return true })
	e.clock.Advance(time.Hour)
	expect(t, "tag during the outage", e.get("/v2/app/manifests/v1"), 200, img.Manifest)
	reg.Intercept(nil)
	e.clock.Advance(time.Hour)
	expect(t, "healed", e.get("/v2/app/manifests/v2"), 200, img.Manifest)
}

// Bodies that are not manifests of their Content-Type are refused, from an
// upstream and from a client.
func TestProxy_Hostile_ManifestChecks(t *testing.T) {
	e, reg := start(t, withHosted("ci/"))
	cfg := e.pushBlob("ci/app", []byte("{}"))
	good := `{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.empty.v1+json","digest":"` + cfg.String() + `","size":2},"layers":[]}`
	bad := []struct {
		name, contentType, body string
		pushOnly                bool // an upstream's image with odd descriptors is still its image
	}{
		{"html", "text/html", portal, false},
		{"octet-stream", "application/octet-stream", good, false},
		{"index body as manifest", v1.MediaTypeImageManifest, `{"schemaVersion":2,"manifests":[]}`, false},
		{"manifest body as index", v1.MediaTypeImageIndex, good, false},
		{"mediaType differs", v1.MediaTypeImageIndex, strings.Replace(good, `"layers":[]`, `"manifests":[]`, 1), false},
		{"schema 1", v1.MediaTypeImageManifest, strings.Replace(good, `"schemaVersion":2`, `"schemaVersion":1`, 1), false},
		{"ambiguous", v1.MediaTypeImageManifest, strings.Replace(good, `"layers":[]`, `"layers":[],"manifests":[]`, 1), false},
		{"JSON array", v1.MediaTypeImageManifest, `[1,2]`, false},
		{"docker without mediaType", "application/vnd.docker.distribution.manifest.v2+json", strings.Replace(good, `"mediaType":"application/vnd.oci.image.manifest.v1+json",`, ``, 1), false},
		{"bad subject", v1.MediaTypeImageManifest, strings.Replace(good, `"layers":[]`, `"layers":[],"subject":{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:zz","size":2}`, 1), true},
		{"bad layer digest", v1.MediaTypeImageManifest, strings.Replace(good, `"layers":[]`, `"layers":[{"mediaType":"a/b","digest":"md5:00","size":1}]`, 1), true},
	}
	for _, tc := range bad {
		t.Run("push "+tc.name, func(t *testing.T) {
			r := e.send(http.MethodPut, "/v2/ci/app/manifests/"+digest.FromString(tc.body).String(), []byte(tc.body), "Content-Type: "+tc.contentType)
			if r.status != 400 || errorCode(t, r.body) != "MANIFEST_INVALID" || r.header.Get(`OCI-Subject`) != "" {
				t.Fatalf("%d %s %v", r.status, r.body, r.header)
			}
		})
		t.Run("upstream "+tc.name, func(t *testing.T) {
			if tc.pushOnly {
				t.Skip("checked for pushes only")
			}
			d := digest.FromString(tc.body)
			reg.Intercept(func(w http.ResponseWriter, r *http.Request) bool {
				if !strings.HasSuffix(r.URL.Path, "/manifests/"+d.String()) {
					return false
				}
				w.Header().Set("Content-Type", tc.contentType)
				w.Header().Set("Docker-Content-Digest", d.String())
				_, _ = w.Write([]byte(tc.body))
				return true
			})
			defer reg.Intercept(nil)
			if r := e.get("/v2/app/manifests/" + d.String()); r.status != 502 {
				t.Fatalf("%d %s", r.status, r.body)
			}
			if _, err := e.store.GetManifest(context.Background(), d); err == nil {
				t.Fatal("stored")
			}
		})
	}
	expect(t, "a good manifest", e.send(http.MethodPut, "/v2/ci/app/manifests/v1", []byte(good), "Content-Type: "+v1.MediaTypeImageManifest), 201, nil)
}

// A tag moves only once its new manifest is checked and stored: a HEAD
// naming a new digest whose GET fails leaves the last good answer, which
// the next outage still serves.
func TestProxy_Tag_LastGoodSurvivesAFailedMove(t *testing.T) {
	e, reg := start(t)
	old := reg.PushImage(t, "app", "v1", 100)
	expect(t, "warm", e.get("/v2/app/manifests/v1"), 200, old.Manifest)
	newer := reg.PushImage(t, "app", "v1", 100)
	failNew := func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/manifests/"+newer.Digest.String()) {
			w.WriteHeader(http.StatusBadGateway)
			return true
		}
		return false
	}
	reg.Intercept(failNew)
	e.clock.Advance(time.Hour)
	r := e.get("/v2/app/manifests/v1")
	expect(t, "tag moved upstream, new manifest unavailable", r, 200, old.Manifest)
	if r.header.Get("Docker-Content-Digest") != old.Digest.String() {
		t.Fatalf("digest %s", r.header.Get("Docker-Content-Digest"))
	}
	// The next outage: the last good manifest, not a 502.
	reg.Intercept(func(w http.ResponseWriter, _ *http.Request) bool { w.WriteHeader(503); return true })
	e.clock.Advance(time.Hour)
	expect(t, "outage", e.get("/v2/app/manifests/v1"), 200, old.Manifest)
	reg.Intercept(nil)
	e.clock.Advance(time.Hour)
	expect(t, "healed", e.get("/v2/app/manifests/v1"), 200, newer.Manifest)
}

// containerd HEADs a tag, then GETs the manifest by digest: the HEAD's
// answer waits as pending, and once the manifest is held the tag serves
// from cache with no further upstream request; the last good answer
// stays until then.
func TestProxy_Tag_HeadThenDigest(t *testing.T) {
	e, reg := start(t)
	img := reg.PushImage(t, "app", "v1", 100)
	h := e.do(http.MethodHead, "/v2/app/manifests/v1")
	if h.status != 200 || h.header.Get("Docker-Content-Digest") != img.Digest.String() {
		t.Fatalf("HEAD: %d %v", h.status, h.header)
	}
	expect(t, "by digest", e.get("/v2/app/manifests/"+img.Digest.String()), 200, img.Manifest)
	reg.ResetCounts()
	for _, m := range []string{http.MethodHead, http.MethodGet} {
		if r := e.do(m, "/v2/app/manifests/v1"); r.status != 200 || r.header.Get("Docker-Content-Digest") != img.Digest.String() {
			t.Fatalf("%s after the pull: %d", m, r.status)
		}
	}
	if n := reg.Total(); n != 0 {
		t.Fatalf("%d upstream requests after the pull", n)
	}
	// The tag moves upstream; a HEAD learns it, the upstream then fails:
	// a GET still has the last good manifest.
	newer := reg.PushImage(t, "app", "v1", 100)
	e.clock.Advance(time.Hour)
	if h := e.do(http.MethodHead, "/v2/app/manifests/v1"); h.header.Get("Docker-Content-Digest") != newer.Digest.String() {
		t.Fatalf("HEAD after the move: %v", h.header)
	}
	reg.Intercept(func(w http.ResponseWriter, _ *http.Request) bool { w.WriteHeader(503); return true })
	expect(t, "GET, upstream down", e.get("/v2/app/manifests/v1"), 200, img.Manifest)
	reg.Intercept(nil)
	expect(t, "GET, upstream back", e.get("/v2/app/manifests/v1"), 200, newer.Manifest)
}

// Concurrent revalidations share one HEAD, which runs for all of them: the
// first client hanging up does not fail the others.
func TestProxy_Tag_FirstClientLeaves(t *testing.T) {
	e, reg := start(t)
	img := reg.PushImage(t, "app", "v1", 100)
	expect(t, "warm", e.get("/v2/app/manifests/v1"), 200, img.Manifest)
	release := make(chan struct{})
	var heads atomic.Int32
	reg.Intercept(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method == http.MethodHead && strings.HasSuffix(r.URL.Path, "/manifests/v1") {
			heads.Add(1)
			<-release
		}
		return false
	})
	e.clock.Advance(time.Hour)
	ctx, cancel := context.WithCancel(context.Background())
	first := make(chan error, 1)
	go func() {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, e.ts.URL+"/v2/app/manifests/v1", nil)
		resp, err := e.ts.Client().Do(req)
		if err == nil {
			resp.Body.Close()
		}
		first <- err
	}()
	waitFor(t, "the shared HEAD", func() bool { return heads.Load() == 1 })
	second := make(chan response, 1)
	go func() { second <- e.get("/v2/app/manifests/v1") }()
	time.Sleep(50 * time.Millisecond) // let the second client join
	cancel()
	<-first
	close(release)
	r := <-second
	expect(t, "second client", r, 200, img.Manifest)
	if r.header.Get("Docker-Content-Digest") != img.Digest.String() {
		t.Fatal("wrong digest")
	}
}

// A blob whose bytes trickle from the upstream: the client has the headers
// and the first bytes before the upstream sends the rest.
func TestProxy_Fill_HeadersAndBytesBeforeTheEnd(t *testing.T) {
	e, reg := start(t)
	data := []byte("0123456789abcdef0123456789abcdef")
	d := reg.PushBlob(t, "app", data)
	release := holdBlob(reg, d, data, 4)
	defer release()
	resp, err := http.Get(e.ts.URL + "/v2/app/blobs/" + d.String())
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Docker-Content-Digest") != d.String() {
		t.Fatalf("headers: %d %v", resp.StatusCode, resp.Header)
	}
	first := make([]byte, 4)
	if _, err := resp.Body.Read(first[:4]); err != nil || !bytes.Equal(first, data[:4]) {
		t.Fatalf("first bytes while the upstream holds the rest: %q %v", first, err)
	}
	release()
	rest := new(bytes.Buffer)
	if _, err := rest.ReadFrom(resp.Body); err != nil || !bytes.Equal(rest.Bytes(), data[4:]) {
		t.Fatalf("rest: %q %v", rest.Bytes(), err)
	}
}

// notFoundStore answers ErrNotFound when a blob is opened: content deleted
// between its stat and its read.
type notFoundStore struct{ cache.Store }

func (s notFoundStore) OpenBlob(context.Context, digest.Digest) (cache.BlobReader, error) {
	return nil, cache.ErrNotFound
}

func TestProxy_DeleteRaceIsNotFound(t *testing.T) {
	e, _ := start(t, withHosted("ci/"), withStore(func(s cache.Store) cache.Store { return notFoundStore{s} }))
	d := e.pushBlob("ci/app", []byte("raced"))
	r := e.get("/v2/ci/app/blobs/" + d.String())
	if r.status != 404 || errorCode(t, r.body) != "BLOB_UNKNOWN" {
		t.Fatalf("%d %s", r.status, r.body)
	}
}
