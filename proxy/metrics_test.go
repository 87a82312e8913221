package proxy_test

import (
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ocimirror/ocimirror/internal/metrictest"
	"github.com/ocimirror/ocimirror/internal/registrytest"
	"github.com/opencontainers/go-digest"
)

// What an operator reads of a cold pull by four clients, a warm one, a
// tag within and past its TTL, a failing upstream and an offline one:
// exact counts of cache results, bytes by source, upstream requests and
// bytes, fills and their followers.
func TestProxy_Metrics_CacheAndUpstream(t *testing.T) {
	m := metrictest.New(t)
	reg := registrytest.New(t)
	off := registrytest.New(t)
	e, _ := start(t, withMeter(m.Provider),
		withUpstream(upstreamDef{name: reg.Host, reg: reg, ttl: time.Minute}),
		withUpstream(upstreamDef{name: "offline.example", reg: off, offline: true}),
		withDefault(reg.Host))
	img := reg.PushImage(t, "app", "v1", 300<<10)
	layer, size := img.LayerDigests[0], float64(len(img.Layers[0]))
	reg.ResetCounts()

	// A cold pull of one layer by 4 clients: one fill, 3 followers.
	open := make(chan struct{})
	reg.Intercept(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, layer.String()) {
			<-open
		}
		return false
	})
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if r := e.get("/v2/app/blobs/" + layer.String()); r.status != 200 || digest.FromBytes(r.body) != layer {
				t.Errorf("cold pull: %d, %d bytes", r.status, len(r.body))
			}
		}()
	}
	waitFor(t, "4 clients waiting on the fill", func() bool { return m.Value("ocimirror_fill_waiters") == 4 })
	m.Want("ocimirror_fills_in_flight", 1)
	close(open)
	wg.Wait()
	reg.Intercept(nil)
	m.Want("ocimirror_cache_requests_total", 1, "kind=blob", "result=miss")
	m.Want("ocimirror_cache_requests_total", 3, "kind=blob", "result=coalesced")
	m.Want("ocimirror_served_bytes_total", 4*size, "source=upstream")
	m.Want("ocimirror_upstream_bytes_total", size, "upstream="+reg.Host)
	m.Want("ocimirror_upstream_requests_total", 1, "upstream="+reg.Host, "method=GET", "code=200")
	m.Want("ocimirror_upstream_request_duration_seconds", 1, "upstream="+reg.Host)
	// The fill ends (commits, links, leaves the set) as its clients get
	// their last byte.
	waitFor(t, "the fill to end", func() bool { return m.Value("ocimirror_fills_in_flight") == 0 })
	m.Want("ocimirror_fill_waiters", 0)

	// Warm: from the store, nothing upstream.
	if r := e.get("/v2/app/blobs/" + layer.String()); r.status != 200 {
		t.Fatalf("warm pull: %d", r.status)
	}
	m.Want("ocimirror_cache_requests_total", 1, "kind=blob", "result=hit")
	m.Want("ocimirror_served_bytes_total", size, "source=cache")
	m.Want("ocimirror_upstream_bytes_total", size, "upstream="+reg.Host)

	// A tag: fetched, then within its TTL, then revalidated past it.
	mpath := "/v2/app/manifests/v1"
	for range 2 {
		if r := e.get(mpath); r.status != 200 || digest.FromBytes(r.body) != img.Digest {
			t.Fatalf("tag: %d", r.status)
		}
	}
	m.Want("ocimirror_cache_requests_total", 1, "kind=tag", "result=miss")
	m.Want("ocimirror_cache_requests_total", 1, "kind=tag", "result=hit")
	e.clock.Advance(2 * time.Minute)
	e.get(mpath)
	m.Want("ocimirror_cache_requests_total", 1, "kind=tag", "result=revalidated")
	// By digest: held.
	e.get("/v2/app/manifests/" + img.Digest.String())
	m.Want("ocimirror_cache_requests_total", 1, "kind=manifest", "result=hit")

	// Referrers: named by the upstream's fallback tag (no API), then also
	// found in the index ocimirror keeps.
	sig := reg.PushArtifact(t, "app", img.Descriptor(), "application/vnd.example.sig", nil)
	reg.PushFallbackIndex(t, "app", img.Digest, sig)
	for i := range 2 {
		if _, ds := e.referrersOf("/v2/app/referrers/" + img.Digest.String()); len(ds) != 1 || ds[0].Digest != sig.Digest {
			t.Fatalf("referrers %d: %v", i, ds)
		}
	}
	m.Want("ocimirror_referrers_sources_total", 2, "source=fallback_tag")
	m.Want("ocimirror_referrers_sources_total", 1, "source=local")
	m.Want("ocimirror_referrers_sources_total", 0, "source=api")

	// The upstream fails: the tag is answered stale, a new one is a miss
	// (502), and both upstream answers are counted by code.
	reg.Intercept(func(w http.ResponseWriter, r *http.Request) bool {
		w.WriteHeader(http.StatusServiceUnavailable)
		return true
	})
	e.clock.Advance(2 * time.Minute)
	if r := e.get(mpath); r.status != 200 {
		t.Fatalf("stale tag: %d", r.status)
	}
	m.Want("ocimirror_cache_requests_total", 1, "kind=tag", "result=stale")
	if r := e.get("/v2/app/manifests/v2"); r.status != http.StatusBadGateway {
		t.Fatalf("a new tag with the upstream failing: %d", r.status)
	}
	m.Want("ocimirror_cache_requests_total", 2, "kind=tag", "result=miss")
	if m.Value("ocimirror_upstream_requests_total", "upstream="+reg.Host, "code=503") == 0 {
		t.Error("the upstream's 503 answers are not counted")
	}
	m.Want("ocimirror_http_requests_total", 1, "route=manifest", "method=GET", "code=502")

	// An offline upstream: not held, not asked.
	if r := e.get("/v2/offline.example/app/blobs/" + layer.String()); r.status != http.StatusNotFound {
		t.Fatalf("offline miss: %d", r.status)
	}
	m.Want("ocimirror_cache_requests_total", 1, "kind=blob", "result=offline_miss")
	m.Want("ocimirror_upstream_requests_total", 0, "upstream=offline.example")
	m.Want("ocimirror_upstream_up", 0, "upstream=offline.example")
	m.Want("ocimirror_upstream_up", 1, "upstream="+reg.Host)

	// Every request by route, method and code; a bad one is no cache request.
	m.Want("ocimirror_http_requests_total", 5, "route=blob", "method=GET", "code=200")
	m.Want("ocimirror_http_request_duration_seconds", 6, "route=blob")
	before := m.Value("ocimirror_cache_requests_total")
	if r := e.get("/v2/app/blobs/sha256:nothex"); r.status != http.StatusBadRequest {
		t.Fatalf("a bad digest: %d", r.status)
	}
	e.do("BREW", "/v2/app/blobs/"+layer.String())
	e.get("/v2/_catalog")
	m.Want("ocimirror_cache_requests_total", before)
	m.Want("ocimirror_http_requests_total", 1, "route=blob", "method=GET", "code=400")
	m.Want("ocimirror_http_requests_total", 1, "route=base", "method=other", "code=405")
	m.Want("ocimirror_http_requests_total", 1, "route=catalog", "method=GET", "code=404")
}
