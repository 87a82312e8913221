// Package registrytest runs a real registry (go-containerregistry's
// pkg/registry) in-process on 127.0.0.1 for tests, counts the requests that
// reach it, and lets a test push content and inject faults.
package registrytest

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
)

// Registry is a running upstream registry.
type Registry struct {
	*httptest.Server
	// Host is host:port of the server.
	Host string

	mu        sync.Mutex
	counts    map[string]int
	intercept func(w http.ResponseWriter, r *http.Request) bool
	handler   http.Handler // the registry behind the middleware
	inner     http.Handler // the registry itself, for pushes
}

// New starts a registry on 127.0.0.1, stopped when the test ends.
// Middleware, when given, wraps the registry (auth, for example); counted
// requests are those that reach the middleware. The Push methods go to the
// registry directly, past middleware and counts.
func New(t testing.TB, middleware ...func(http.Handler) http.Handler) *Registry {
	t.Helper()
	r := &Registry{counts: map[string]int{}}
	r.inner = registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	h := r.inner
	for _, m := range middleware {
		h = m(h)
	}
	r.handler = h
	r.Server = httptest.NewServer(http.HandlerFunc(r.serve))
	r.Host = strings.TrimPrefix(r.Server.URL, "http://")
	t.Cleanup(r.Server.Close)
	return r
}

func (r *Registry) serve(w http.ResponseWriter, req *http.Request) {
	r.mu.Lock()
	r.counts[req.Method+" "+Kind(req.URL.Path)]++
	icpt := r.intercept
	r.mu.Unlock()
	if icpt != nil && icpt(w, req) {
		return
	}
	r.handler.ServeHTTP(w, req)
}

// Kind names the API a path belongs to: manifests, blobs, uploads, tags,
// referrers, base or other.
func Kind(path string) string {
	switch {
	case path == "/v2/" || path == "/v2":
		return "base"
	case strings.Contains(path, "/blobs/uploads/"):
		return "uploads"
	case strings.Contains(path, "/manifests/"):
		return "manifests"
	case strings.Contains(path, "/blobs/"):
		return "blobs"
	case strings.HasSuffix(path, "/tags/list"):
		return "tags"
	case strings.Contains(path, "/referrers/"):
		return "referrers"
	}
	return "other"
}

// Count returns how many requests of method to kind arrived, for example
// Count("GET", "blobs").
func (r *Registry) Count(method, kind string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.counts[method+" "+kind]
}

// Total returns how many requests arrived, pushes included.
func (r *Registry) Total() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, c := range r.counts {
		n += c
	}
	return n
}

// ResetCounts forgets the counts so far.
func (r *Registry) ResetCounts() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.counts = map[string]int{}
}

// Intercept makes f see every request first; when f returns true it has
// answered and the registry does not. Pass nil to stop.
func (r *Registry) Intercept(f func(w http.ResponseWriter, r *http.Request) bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.intercept = f
}

// direct sends a request to the registry itself, in process.
func (r *Registry) direct(method, target, contentType string, body []byte) *http.Response {
	req := httptest.NewRequest(method, target, bytes.NewReader(body))
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	rec := httptest.NewRecorder()
	r.inner.ServeHTTP(rec, req)
	return rec.Result()
}

// PushBlob uploads a blob (monolithic POST then PUT) and returns its digest.
func (r *Registry) PushBlob(t testing.TB, repo string, data []byte) digest.Digest {
	t.Helper()
	d := digest.FromBytes(data)
	resp := r.direct(http.MethodPost, "/v2/"+repo+"/blobs/uploads/", "", nil)
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("start upload: %s", resp.Status)
	}
	loc := strings.TrimPrefix(resp.Header.Get("Location"), r.URL)
	sep := "?"
	if strings.Contains(loc, "?") {
		sep = "&"
	}
	resp = r.direct(http.MethodPut, loc+sep+"digest="+d.String(), "application/octet-stream", data)
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("finish upload: %s", resp.Status)
	}
	return d
}

// PushManifest puts a manifest under ref (a tag or its digest) and returns
// its digest.
func (r *Registry) PushManifest(t testing.TB, repo, ref, mediaType string, data []byte) digest.Digest {
	t.Helper()
	resp := r.direct(http.MethodPut, "/v2/"+repo+"/manifests/"+ref, mediaType, data)
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("put manifest %s:%s: %s", repo, ref, resp.Status)
	}
	return digest.FromBytes(data)
}

// Image is a pushed single-platform image.
type Image struct {
	Manifest []byte
	Digest   digest.Digest
	Config   []byte
	Layers   [][]byte
	// LayerDigests are the digests of Layers, in order.
	LayerDigests []digest.Digest
}

// PushImage pushes an OCI image with random layers of the given sizes and
// tags it.
func (r *Registry) PushImage(t testing.TB, repo, tag string, layerSizes ...int) Image {
	t.Helper()
	img := Image{Config: []byte(fmt.Sprintf(`{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"n":%q}`, rand.Text()))}
	m := v1.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: v1.MediaTypeImageManifest,
		Config:    v1.Descriptor{MediaType: v1.MediaTypeImageConfig, Digest: r.PushBlob(t, repo, img.Config), Size: int64(len(img.Config))},
	}
	for _, n := range layerSizes {
		layer := make([]byte, n)
		_, _ = rand.Read(layer)
		d := r.PushBlob(t, repo, layer)
		img.Layers = append(img.Layers, layer)
		img.LayerDigests = append(img.LayerDigests, d)
		m.Layers = append(m.Layers, v1.Descriptor{MediaType: v1.MediaTypeImageLayerGzip, Digest: d, Size: int64(n)})
	}
	var err error
	if img.Manifest, err = json.Marshal(m); err != nil {
		t.Fatal(err)
	}
	img.Digest = r.PushManifest(t, repo, tag, v1.MediaTypeImageManifest, img.Manifest)
	return img
}

// RandomBytes returns n random bytes.
func RandomBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}
