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

// Option configures New.
type Option func(*options)

type options struct {
	middleware []func(http.Handler) http.Handler
	referrers  bool
}

// WithMiddleware wraps the registry (auth, for example); counted requests
// are those that reach the middleware.
func WithMiddleware(m func(http.Handler) http.Handler) Option {
	return func(o *options) { o.middleware = append(o.middleware, m) }
}

// WithReferrersAPI turns on the registry's referrers API (off by default,
// like Docker Hub, GHCR and distribution).
func WithReferrersAPI() Option { return func(o *options) { o.referrers = true } }

// New starts a registry on 127.0.0.1, stopped when the test ends. The Push
// methods go to the registry directly, past middleware and counts.
func New(t testing.TB, opts ...Option) *Registry {
	t.Helper()
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	r := &Registry{counts: map[string]int{}}
	r.inner = registry.New(registry.Logger(log.New(io.Discard, "", 0)), registry.WithReferrersSupport(o.referrers))
	h := r.inner
	for _, m := range o.middleware {
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

// Artifact builds an OCI artifact manifest (empty config, one small layer)
// with a subject, an artifact type and annotations.
func Artifact(subject v1.Descriptor, artifactType string, annotations map[string]string) (manifest []byte, blobs [][]byte) {
	config := []byte("{}")
	layer := []byte(rand.Text())
	m := v1.Manifest{
		Versioned:    specs.Versioned{SchemaVersion: 2},
		MediaType:    v1.MediaTypeImageManifest,
		ArtifactType: artifactType,
		Config:       v1.Descriptor{MediaType: v1.MediaTypeEmptyJSON, Digest: digest.FromBytes(config), Size: int64(len(config))},
		Layers:       []v1.Descriptor{{MediaType: "application/octet-stream", Digest: digest.FromBytes(layer), Size: int64(len(layer))}},
		Subject:      &subject,
		Annotations:  annotations,
	}
	data, _ := json.Marshal(m)
	return data, [][]byte{config, layer}
}

// PushArtifact pushes an artifact with a subject by digest, as oras attach
// does, and returns its descriptor as a referrers answer lists it.
func (r *Registry) PushArtifact(t testing.TB, repo string, subject v1.Descriptor, artifactType string, annotations map[string]string) v1.Descriptor {
	t.Helper()
	data, blobs := Artifact(subject, artifactType, annotations)
	for _, b := range blobs {
		r.PushBlob(t, repo, b)
	}
	d := r.PushManifest(t, repo, digest.FromBytes(data).String(), v1.MediaTypeImageManifest, data)
	return v1.Descriptor{MediaType: v1.MediaTypeImageManifest, Digest: d, Size: int64(len(data)), ArtifactType: artifactType, Annotations: annotations}
}

// PushFallbackIndex writes the referrers fallback tag index of subject
// (sha256-<hex>), as clients do on a registry without the referrers API.
func (r *Registry) PushFallbackIndex(t testing.TB, repo string, subject digest.Digest, ds ...v1.Descriptor) digest.Digest {
	t.Helper()
	idx := v1.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageIndex, Manifests: ds}
	if idx.Manifests == nil {
		idx.Manifests = []v1.Descriptor{}
	}
	data, _ := json.Marshal(idx)
	return r.PushManifest(t, repo, subject.Algorithm().String()+"-"+subject.Encoded(), v1.MediaTypeImageIndex, data)
}

// Get fetches a path from the registry itself (not counted).
func (r *Registry) Get(path string, accept ...string) *http.Response {
	req := httptest.NewRequest(http.MethodGet, path, nil)
	for _, a := range accept {
		req.Header.Add("Accept", a)
	}
	rec := httptest.NewRecorder()
	r.inner.ServeHTTP(rec, req)
	return rec.Result()
}

// Descriptor is the descriptor of a pushed image's manifest.
func (img Image) Descriptor() v1.Descriptor {
	return v1.Descriptor{MediaType: v1.MediaTypeImageManifest, Digest: img.Digest, Size: int64(len(img.Manifest))}
}

// RandomBytes returns n random bytes.
func RandomBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}
