package proxy_test

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/internal/registrytest"
	"github.com/ocimirror/ocimirror/proxy"
)

// Offline: after a warm pull and a restart with the upstream offline, and
// past every TTL, the tag, its manifest and blobs, the tag list (kept in
// the store, not memory) and the referrers are served without one request
// upstream; a miss is a 404 with the usual code and a detail saying the
// mirror is offline.
func TestProxy_Offline(t *testing.T) {
	e, reg := start(t)
	img := reg.PushImage(t, "app", "v1", 1000)
	reg.PushImage(t, "app", "v2", 10)
	sig := reg.PushArtifact(t, "app", img.Descriptor(), "application/vnd.test.sig", nil)
	reg.PushFallbackIndex(t, "app", img.Digest, sig)
	accept := "Accept: " + v1.MediaTypeImageManifest
	expect(t, "warm tag", e.get("/v2/app/manifests/v1", accept), 200, img.Manifest)
	expect(t, "warm layer", e.get("/v2/app/blobs/"+img.LayerDigests[0].String()), 200, img.Layers[0])
	expect(t, "warm tag list", e.get("/v2/app/tags/list"), 200, nil)
	if r, refs := e.referrersOf("/v2/app/referrers/" + img.Digest.String()); r.status != 200 || len(refs) != 1 {
		t.Fatalf("warm referrers: %d %v", r.status, refs)
	}

	e.upstreams[0].offline = true
	e.restart()
	e.clock.Advance(24 * time.Hour)
	reg.ResetCounts()

	expect(t, "tag", e.get("/v2/app/manifests/v1", accept), 200, img.Manifest)
	expect(t, "HEAD tag", e.do(http.MethodHead, "/v2/app/manifests/v1", accept), 200, nil)
	expect(t, "layer", e.get("/v2/app/blobs/"+img.LayerDigests[0].String()), 200, img.Layers[0])
	r := e.get("/v2/app/tags/list")
	var tl struct{ Tags []string }
	if r.status != 200 || json.Unmarshal(r.body, &tl) != nil || strings.Join(tl.Tags, ",") != "sha256-"+img.Digest.Encoded()+",v1,v2" {
		t.Fatalf("tag list offline: %d %s", r.status, r.body)
	}
	if r, refs := e.referrersOf("/v2/app/referrers/" + img.Digest.String()); r.status != 200 || len(refs) != 1 || refs[0].Digest != sig.Digest {
		t.Fatalf("referrers offline: %d %v", r.status, refs)
	}
	for _, miss := range []struct{ path, code string }{
		{"/v2/app/manifests/v2", "MANIFEST_UNKNOWN"},
		{"/v2/app/manifests/" + digest.FromString("x").String(), "MANIFEST_UNKNOWN"},
		{"/v2/app/blobs/" + digest.FromString("y").String(), "BLOB_UNKNOWN"},
		{"/v2/other/blobs/" + img.LayerDigests[0].String(), "BLOB_UNKNOWN"}, // held for app only
	} {
		r := e.get(miss.path)
		if r.status != 404 || errorCode(t, r.body) != miss.code || !strings.Contains(string(r.body), "offline") {
			t.Errorf("%s offline: %d %s", miss.path, r.status, r.body)
		}
	}
	if n := reg.Total(); n != 0 {
		t.Fatalf("an offline mirror sent %d requests upstream", n)
	}
}

// The circuit breaker: a blackholed upstream (it accepts and never
// answers) is marked down after its failures; warm pulls of a stale tag
// then send nothing more to it.
func TestProxy_Breaker_WarmPullsSkipADownUpstream(t *testing.T) {
	reg := registrytest.New(t)
	e, _ := start(t, withUpstream(upstreamDef{name: reg.Host, reg: reg, ttl: time.Second, breaker: 2, breakerBackoff: time.Hour}), withDefault(reg.Host))
	img := reg.PushImage(t, "app", "v1", 100)
	expect(t, "warm", e.get("/v2/app/manifests/v1"), 200, img.Manifest)
	expect(t, "warm layer", e.get("/v2/app/blobs/"+img.LayerDigests[0].String()), 200, img.Layers[0])
	reg.Close() // connections refused from now on
	for range 20 {
		e.clock.Advance(2 * time.Second)
		expect(t, "stale tag", e.get("/v2/app/manifests/v1"), 200, img.Manifest)
		expect(t, "cached layer", e.get("/v2/app/blobs/"+img.LayerDigests[0].String()), 200, img.Layers[0])
	}
	if st := e.clients[reg.Host].State(); !st.Down {
		t.Fatalf("the upstream is not marked down: %+v", st)
	}
}

// A slow upstream does not slow warm pulls: a client waits a bounded time
// for a stale tag's revalidation, then gets the last good answer while
// the revalidation goes on; once it ends, the tag is fresh again.
func TestProxy_Tag_SlowRevalidationServesLastGood(t *testing.T) {
	defer proxy.SetRevalidateWait(100 * time.Millisecond)()
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
	for range 5 {
		r := e.get("/v2/app/manifests/v1")
		if r.status != 200 || !bytes.Equal(r.body, img.Manifest) {
			t.Fatalf("stale tag with a slow upstream: %d", r.status)
		}
	}
	if n := heads.Load(); n != 1 {
		t.Fatalf("%d revalidations upstream for 5 clients, want 1 (shared, still running)", n)
	}
	close(release)
	waitFor(t, "the tag fresh again", func() bool {
		before := heads.Load()
		r := e.get("/v2/app/manifests/v1")
		return r.status == 200 && heads.Load() == before
	})
}

// Offline, a subject whose referrers answer the store keeps (an import
// keeps one for every manifest of a bundle, none often) and that has no
// fallback tag stored is answered without a warning that the list may be
// incomplete; one with nothing kept still warns.
func TestProxy_Offline_KeptAnswerNoWarning(t *testing.T) {
	e, reg := start(t)
	img := reg.PushImage(t, "app", "v1", 100)
	expect(t, "warm tag", e.get("/v2/app/manifests/v1"), 200, img.Manifest)
	e.upstreams[0].offline = true
	e.restart()
	key := cache.ReferrerKey{Upstream: reg.Host, Repo: "app", Subject: img.Digest}
	r, _ := e.referrersOf("/v2/app/referrers/" + img.Digest.String())
	if r.status != 200 || len(r.header.Values("Warning")) == 0 {
		t.Fatalf("nothing kept: %d, warnings %q (want some)", r.status, r.header.Values("Warning"))
	}
	if err := e.store.PutUpstreamReferrers(context.Background(), key, cache.UpstreamReferrers{Descriptors: []v1.Descriptor{}, CheckedAt: time.Unix(0, 0)}); err != nil {
		t.Fatal(err)
	}
	r, refs := e.referrersOf("/v2/app/referrers/" + img.Digest.String())
	if r.status != 200 || len(refs) != 0 || len(r.header.Values("Warning")) != 0 {
		t.Fatalf("an answer kept: %d %v, warnings %q", r.status, refs, r.header.Values("Warning"))
	}
}
