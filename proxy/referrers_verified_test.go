package proxy_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/internal/registrytest"
)

// fakeReferrers makes an upstream name candidates for one subject: its
// referrers API answers api, its fallback tag holds an index of fallback
// (written as given, however malformed). next sees every other request.
// It returns a count of requests by path.
type fakeReferrers struct {
	mu     sync.Mutex
	counts map[string]int
}

func (f *fakeReferrers) count(path string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.counts[path]
}

func serveFakeReferrers(reg *registrytest.Registry, repo string, subject digest.Digest, api, fallback []v1.Descriptor,
	next func(w http.ResponseWriter, r *http.Request) bool) *fakeReferrers {
	f := &fakeReferrers{counts: map[string]int{}}
	index := func(ds []v1.Descriptor) []byte {
		b, _ := json.Marshal(v1.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageIndex, Manifests: ds})
		return b
	}
	apiBody, fbBody := index(api), index(fallback)
	fbDigest := digest.FromBytes(fbBody)
	reg.Intercept(func(w http.ResponseWriter, r *http.Request) bool {
		f.mu.Lock()
		f.counts[r.Method+" "+r.URL.Path]++
		f.mu.Unlock()
		var body []byte
		switch r.URL.Path {
		case "/v2/" + repo + "/referrers/" + subject.String():
			if api == nil {
				return false
			}
			body = apiBody
		case "/v2/" + repo + "/manifests/sha256-" + subject.Encoded(), "/v2/" + repo + "/manifests/" + fbDigest.String():
			if fallback == nil {
				return false
			}
			body = fbBody
			w.Header().Set("Docker-Content-Digest", fbDigest.String())
		default:
			return next != nil && next(w, r)
		}
		w.Header().Set("Content-Type", v1.MediaTypeImageIndex)
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		if r.Method == http.MethodGet {
			_, _ = w.Write(body)
		}
		return true
	})
	return f
}

// missingReferrers are n well-formed fallback index entries naming
// manifests that exist nowhere.
func missingReferrers(n int) []v1.Descriptor {
	var ds []v1.Descriptor
	for i := range n {
		ds = append(ds, v1.Descriptor{MediaType: v1.MediaTypeImageManifest, Digest: digest.FromString(strconv.Itoa(i)), Size: 100})
	}
	return ds
}

// Every listed referrer was verified: fetched, an OCI manifest with the
// subject, described from its own bytes. Entries that do not exist, are
// blobs, name another subject or are malformed are never listed, and cost
// nothing again within the TTL; one that fails transiently is left out
// with a Warning, and joins once it can be fetched.
func TestProxy_Referrers_OnlyVerified(t *testing.T) {
	reg := registrytest.New(t, registrytest.WithReferrersAPI())
	e, _ := start(t, withUpstream(upstreamDef{name: "up.test", reg: reg, ttl: time.Minute}), withDefault("up.test"))
	img := reg.PushImage(t, "app", "v1", 10)
	other := reg.PushImage(t, "app", "other", 10)
	valid := reg.PushArtifact(t, "app", img.Descriptor(), sigType, map[string]string{"real": "yes"})
	flaky := reg.PushArtifact(t, "app", img.Descriptor(), sigType, nil)
	elsewhere := reg.PushArtifact(t, "app", other.Descriptor(), sigType, nil)
	layer := reg.PushBlob(t, "app", []byte("a layer, not a manifest"))
	missing := digest.FromString("never pushed")

	// The upstream's claims: wrong sizes and types, a sbom that does not exist.
	claimed := valid
	claimed.ArtifactType, claimed.Size, claimed.Annotations = sbomType, 1, map[string]string{"claimed": "by the upstream"}
	api := []v1.Descriptor{
		claimed,
		{MediaType: v1.MediaTypeImageManifest, Digest: missing, Size: 300, ArtifactType: sbomType},
		{MediaType: v1.MediaTypeImageManifest, Digest: "md5:" + digest.Digest(strings.Repeat("0", 32)), Size: 10},
		{MediaType: v1.MediaTypeImageManifest, Digest: "sha256:xyz", Size: 10},
	}
	fallback := []v1.Descriptor{
		{MediaType: v1.MediaTypeImageLayer, Digest: layer, Size: 23},
		elsewhere,
		flaky,
		{MediaType: "", Digest: digest.FromString("no media type"), Size: 10},
		{MediaType: v1.MediaTypeImageManifest, Digest: digest.FromString("negative"), Size: -5},
	}
	var down atomic.Bool
	down.Store(true)
	fake := serveFakeReferrers(reg, "app", img.Digest, api, fallback, func(w http.ResponseWriter, r *http.Request) bool {
		if down.Load() && strings.HasSuffix(r.URL.Path, "/manifests/"+flaky.Digest.String()) {
			w.WriteHeader(http.StatusServiceUnavailable)
			return true
		}
		return false
	})
	path := "/v2/app/referrers/" + img.Digest.String()

	r, got := e.referrersOf(path)
	sameDescriptors(t, got, valid)
	if w := r.header.Get("Warning"); !strings.HasPrefix(w, `299 - "`) || !strings.Contains(w, "incomplete") {
		t.Fatalf("no Warning for the flaky candidate: %q", w)
	}
	_, got = e.referrersOf(path + "?artifactType=" + url.QueryEscape(sbomType))
	sameDescriptors(t, got) // the upstream's claims are not filtered on
	_, got = e.referrersOf(path + "?artifactType=" + url.QueryEscape(sigType))
	sameDescriptors(t, got, valid)

	// Within the TTL: nothing is asked again of what is not a referrer.
	never := []string{"/v2/app/manifests/md5:" + strings.Repeat("0", 32), "/v2/app/manifests/sha256:xyz",
		"/v2/app/manifests/" + layer.String(), "/v2/app/blobs/" + layer.String(),
		"/v2/app/manifests/" + digest.FromString("no media type").String(), "/v2/app/manifests/" + digest.FromString("negative").String()}
	once := []string{"/v2/app/manifests/" + missing.String(), "/v2/app/manifests/" + elsewhere.Digest.String()}
	e.clock.Advance(time.Second)
	e.referrersOf(path)
	for _, p := range never {
		if n := fake.count("GET "+p) + fake.count("HEAD "+p); n != 0 {
			t.Errorf("%s: %d upstream requests for a malformed entry", p, n)
		}
	}
	for _, p := range once {
		if n := fake.count("GET " + p); n != 1 {
			t.Errorf("%s: %d upstream GETs, want 1 within the TTL", p, n)
		}
	}

	// The flaky one works again: once the retry delay passes it is listed.
	down.Store(false)
	e.clock.Advance(10 * time.Second)
	r, got = e.referrersOf(path)
	sameDescriptors(t, got, valid, flaky)
	if w := r.header.Get("Warning"); w != "" {
		t.Errorf("Warning on a complete answer: %q", w)
	}
	e.restart()
	_, got = e.referrersOf(path)
	sameDescriptors(t, got, valid, flaky)
}

// A fallback index naming 300 referrers that do not exist costs each one
// upstream GET once per TTL, not per request, and at most
// maxCandidateFetches per answer (the cut is said in a Warning).
func TestProxy_Referrers_Amplification(t *testing.T) {
	reg := registrytest.New(t)
	e, _ := start(t, withUpstream(upstreamDef{name: "up.test", reg: reg, ttl: time.Minute}), withDefault("up.test"))
	img := reg.PushImage(t, "app", "v1", 10)
	fallback := missingReferrers(300)
	var gets atomic.Int32
	serveFakeReferrers(reg, "app", img.Digest, nil, fallback, func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/manifests/sha256:") {
			gets.Add(1)
		}
		return false
	})
	path := "/v2/app/referrers/" + img.Digest.String()
	per := []int32{}
	cut := false
	for range 5 {
		before := gets.Load()
		r, got := e.referrersOf(path)
		per = append(per, gets.Load()-before)
		sameDescriptors(t, got)
		cut = cut || strings.Contains(r.header.Get("Warning"), "not checked yet")
		e.clock.Advance(time.Second)
	}
	if per[0] > 128 || !cut {
		t.Fatalf("first answer made %d GETs (bound 128), cut said: %v", per[0], cut)
	}
	if total := gets.Load(); total != 300 {
		t.Fatalf("%d GETs for 300 missing referrers, want each once: %v", total, per)
	}
	if per[3] != 0 || per[4] != 0 {
		t.Fatalf("repeats within the TTL made GETs: %v", per)
	}
}

// With an upstream answering 500, failures are remembered too: repeats
// within the retry delay cost nothing.
func TestProxy_Referrers_FailingUpstreamRemembered(t *testing.T) {
	reg := registrytest.New(t)
	e, _ := start(t, withUpstream(upstreamDef{name: "up.test", reg: reg, ttl: time.Minute}), withDefault("up.test"))
	img := reg.PushImage(t, "app", "v1", 10)
	fallback := missingReferrers(50)
	var gets atomic.Int32
	serveFakeReferrers(reg, "app", img.Digest, nil, fallback, func(w http.ResponseWriter, r *http.Request) bool {
		if strings.Contains(r.URL.Path, "/manifests/sha256:") {
			gets.Add(1)
			w.WriteHeader(http.StatusInternalServerError)
			return true
		}
		return false
	})
	path := "/v2/app/referrers/" + img.Digest.String()
	r, _ := e.referrersOf(path)
	if !strings.Contains(r.header.Get("Warning"), "incomplete") {
		t.Fatalf("no Warning: %v", r.header)
	}
	first := gets.Load()
	if first == 0 || first > 50*2 {
		t.Fatalf("%d GETs for 50 candidates (2 attempts each at most)", first)
	}
	for range 3 {
		e.clock.Advance(time.Second)
		e.referrersOf(path)
	}
	if n := gets.Load(); n != first {
		t.Fatalf("repeats made %d more GETs", n-first)
	}
}

// The candidates' upstream work stops when the client that waits for it
// hangs up: no detached retries after it has gone.
func TestProxy_Referrers_WorkStopsWithTheClient(t *testing.T) {
	reg := registrytest.New(t)
	e, _ := start(t, withUpstream(upstreamDef{name: "up.test", reg: reg, ttl: time.Minute}), withDefault("up.test"))
	img := reg.PushImage(t, "app", "v1", 10)
	fallback := missingReferrers(50)
	var started, cancelled atomic.Int32
	serveFakeReferrers(reg, "app", img.Digest, nil, fallback, func(w http.ResponseWriter, r *http.Request) bool {
		if strings.Contains(r.URL.Path, "/manifests/sha256:") {
			started.Add(1)
			select {
			case <-r.Context().Done():
				cancelled.Add(1)
			case <-time.After(10 * time.Second):
			}
			return true
		}
		return false
	})
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, e.ts.URL+"/v2/app/referrers/"+img.Digest.String(), nil)
		if resp, err := e.ts.Client().Do(req); err == nil {
			resp.Body.Close()
		}
	}()
	waitFor(t, "candidate fetches", func() bool { return started.Load() == 4 })
	cancel()
	waitFor(t, "the fetches to be cancelled", func() bool { return cancelled.Load() == 4 })
	time.Sleep(200 * time.Millisecond)
	if n := started.Load(); n != 4 {
		t.Fatalf("%d candidate requests after the client left, want the 4 in flight only", n)
	}
}

// Concurrent answers share the upstream's (cached) list: none may write
// into it (run under -race).
func TestProxy_Referrers_ConcurrentAnswers(t *testing.T) {
	reg := registrytest.New(t, registrytest.WithReferrersAPI())
	e, _ := start(t, withUpstream(upstreamDef{name: "up.test", reg: reg, ttl: time.Minute}), withDefault("up.test"))
	img := reg.PushImage(t, "app", "v1", 10)
	var want []v1.Descriptor
	for range 5 {
		want = append(want, reg.PushArtifact(t, "app", img.Descriptor(), sigType, nil))
	}
	reg.PushFallbackIndex(t, "app", img.Digest, want[:2]...)
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, got := e.referrersOf("/v2/app/referrers/" + img.Digest.String())
			sameDescriptors(t, got, slices.Clone(want)...)
		}()
	}
	wg.Wait()
}

// ocimirror's own updates of upstream fallback indexes are serialized per
// subject: one held up at the upstream does not hold up another subject's.
func TestProxy_Referrers_FallbackUpdatesPerSubject(t *testing.T) {
	fwd := registrytest.New(t)
	e, _ := start(t, withUpstream(upstreamDef{name: "up.test", reg: fwd, forward: true}), withDefault("up.test"))
	a := fwd.PushImage(t, "app", "a", 10)
	b := fwd.PushImage(t, "app", "b", 10)
	held := make(chan struct{})
	release := make(chan struct{})
	var once sync.Once
	fwd.Intercept(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method == http.MethodPut && strings.HasSuffix(r.URL.Path, "/manifests/sha256-"+a.Digest.Encoded()) {
			once.Do(func() { close(held) })
			<-release
		}
		return false
	})
	// The artifacts' blobs first, then the manifests.
	aData, aBlobs := registrytest.Artifact(a.Descriptor(), sigType, nil)
	bData, bBlobs := registrytest.Artifact(b.Descriptor(), sigType, nil)
	for _, blob := range append(aBlobs, bBlobs...) {
		e.pushBlob("app", blob)
	}
	first := make(chan int, 1)
	go func() {
		req, _ := http.NewRequest(http.MethodPut, e.ts.URL+"/v2/app/manifests/"+digest.FromBytes(aData).String(), strings.NewReader(string(aData)))
		req.Header.Set("Content-Type", v1.MediaTypeImageManifest)
		resp, err := e.ts.Client().Do(req)
		if err != nil {
			first <- -1
			return
		}
		resp.Body.Close()
		first <- resp.StatusCode
	}()
	<-held
	r := e.send(http.MethodPut, "/v2/app/manifests/"+digest.FromBytes(bData).String(), bData, "Content-Type: "+v1.MediaTypeImageManifest)
	expect(t, "the other subject's attach while the first is held", r, 201, nil)
	close(release)
	if s := <-first; s != 201 {
		t.Fatalf("the held attach: %d", s)
	}
}
