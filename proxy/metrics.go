package proxy

import (
	"context"
	"errors"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/ocimirror/ocimirror/upstream"
)

// Cache results of a request, as ocimirror_cache_requests_total counts
// them. A request sets one with q.setCache; offline_miss and passthrough
// are found at the edge.
const (
	cacheHit         = "hit"
	cacheMiss        = "miss"
	cacheCoalesced   = "coalesced"
	cacheRevalidated = "revalidated"
	cacheStale       = "stale"
	cacheOfflineMiss = "offline_miss"
	cachePassthrough = "passthrough"
)

// Where the referrers of an answer came from.
const (
	refSourceAPI uint8 = 1 << iota
	refSourceFallbackTag
	refSourceLocal
)

// serverMetrics are the registry API's series. Every label takes its
// value from a fixed set: never a repository, tag or digest, which a
// client chooses.
//
// A request is counted with atomic adds, read by observable counters
// when metrics are collected: an SDK counter's Add hashes its attribute
// set and takes a lock on every call, which on a cache hit costs a
// tenth of the request; and every fixed label set is exported from zero.
// Only the duration histogram is recorded as requests finish.
type serverMetrics struct {
	duration metric.Float64Histogram
	reg      metric.Registration

	byRoute map[string]metric.RecordOption

	// requests are counted by route, method and status code: a bounded
	// set (routes x methods x codes ocimirror answers), each entry made
	// on first use.
	requests sync.Map // requestLabels -> *requestCount
	// cache counts [kind][result]; served, [source].
	cache      [len(cacheKinds)][len(cacheResults)]atomic.Int64
	served     [len(servedSources)]atomic.Int64
	refSources [len(refSources)]atomic.Int64

	// Gauges read at collection.
	fillsRunning atomic.Int64
	fillsQueued  atomic.Int64
	fillWaiters  atomic.Int64

	// fillSources counts where fills read blobs from.
	fillSources struct{ shared, peer, upstream atomic.Int64 }
}

type requestLabels struct {
	route, method string
	code          int
}

type requestCount struct {
	n     atomic.Int64
	attrs metric.ObserveOption
}

// The values of the route, kind, result and source labels.
var (
	routes        = []string{"manifest", "blob", "tags", "referrers", "upload", "catalog", "base"}
	cacheKinds    = [...]string{"manifest", "blob", "tag", "referrers", "taglist"}
	cacheResults  = [...]string{cacheHit, cacheMiss, cacheCoalesced, cacheRevalidated, cacheStale, cacheOfflineMiss, cachePassthrough}
	servedSources = [...]string{"cache", "upstream", "passthrough"}
	refSources    = [...]string{"api", "fallback_tag", "local"} // the order of the refSource* bits
)

func newServerMetrics(m metric.Meter, s *Server) (*serverMetrics, error) {
	sm := &serverMetrics{byRoute: map[string]metric.RecordOption{}}
	for _, r := range routes {
		sm.byRoute[r] = metric.WithAttributeSet(attribute.NewSet(attribute.String("route", r)))
	}
	var cacheAttrs [len(cacheKinds)][len(cacheResults)]metric.ObserveOption
	for k, kind := range cacheKinds {
		for r, result := range cacheResults {
			cacheAttrs[k][r] = metric.WithAttributeSet(attribute.NewSet(attribute.String("kind", kind), attribute.String("result", result)))
		}
	}
	var servedAttrs [len(servedSources)]metric.ObserveOption
	for i, src := range servedSources {
		servedAttrs[i] = metric.WithAttributeSet(attribute.NewSet(attribute.String("source", src)))
	}
	var refAttrs [len(refSources)]metric.ObserveOption
	for i, src := range refSources {
		refAttrs[i] = metric.WithAttributeSet(attribute.NewSet(attribute.String("source", src)))
	}
	var err error
	requests, err := m.Int64ObservableCounter("ocimirror_http_requests_total",
		metric.WithDescription("Registry API requests answered, by route, method and status code."))
	if err != nil {
		return nil, err
	}
	if sm.duration, err = m.Float64Histogram("ocimirror_http_request_duration_seconds", metric.WithUnit("s"),
		metric.WithDescription("Time to answer a registry API request, body included, by route."),
		metric.WithExplicitBucketBoundaries(upstream.DurationBuckets...)); err != nil {
		return nil, err
	}
	cacheReqs, err := m.Int64ObservableCounter("ocimirror_cache_requests_total",
		metric.WithDescription("Requests for mirrored content, by kind (manifest by digest, blob, tag, referrers, taglist) and how the cache answered."))
	if err != nil {
		return nil, err
	}
	served, err := m.Int64ObservableCounter("ocimirror_served_bytes_total", metric.WithUnit("By"),
		metric.WithDescription("Response body bytes of manifests, blobs, tag lists and referrers of mirrored repositories, by source: cache (the store), upstream (fetched for the request, or streamed during a fill), passthrough (streamed past a full store)."))
	if err != nil {
		return nil, err
	}
	refSrc, err := m.Int64ObservableCounter("ocimirror_referrers_sources_total",
		metric.WithDescription("Referrers answers of mirrored repositories that drew on each source: the upstream's referrers API, its fallback tag, the index ocimirror keeps."))
	if err != nil {
		return nil, err
	}
	inFlight, err := m.Int64ObservableGauge("ocimirror_fills_in_flight",
		metric.WithDescription("Blob fills running now (from an upstream, the shared tier or a peer replica)."))
	if err != nil {
		return nil, err
	}
	queued, err := m.Int64ObservableGauge("ocimirror_fills_queued",
		metric.WithDescription("Blob fills waiting for a slot: an upstream's maxFills are running."))
	if err != nil {
		return nil, err
	}
	waiters, err := m.Int64ObservableGauge("ocimirror_fill_waiters",
		metric.WithDescription("Clients being served a blob as a fill delivers it."))
	if err != nil {
		return nil, err
	}
	uploads, err := m.Int64ObservableGauge("ocimirror_uploads_open",
		metric.WithDescription("Blob upload sessions open."))
	if err != nil {
		return nil, err
	}
	sources, err := m.Int64ObservableCounter("ocimirror_fill_sources_total",
		metric.WithDescription("Blob fill reads by source: the shared tier, a peer replica (the digest's owner), the upstream; a fill that hands over mid-blob counts each."))
	if err != nil {
		return nil, err
	}
	sourceAttrs := [3]metric.ObserveOption{}
	for i, n := range []string{"shared", "peer", "upstream"} {
		sourceAttrs[i] = metric.WithAttributes(attribute.String("source", n))
	}
	sm.reg, err = m.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		o.ObserveInt64(sources, sm.fillSources.shared.Load(), sourceAttrs[0])
		o.ObserveInt64(sources, sm.fillSources.peer.Load(), sourceAttrs[1])
		o.ObserveInt64(sources, sm.fillSources.upstream.Load(), sourceAttrs[2])
		sm.requests.Range(func(_, v any) bool {
			c := v.(*requestCount)
			o.ObserveInt64(requests, c.n.Load(), c.attrs)
			return true
		})
		// Every kind and result from zero: a rate or a ratio is defined
		// before the first miss.
		for k := range sm.cache {
			for r := range sm.cache[k] {
				o.ObserveInt64(cacheReqs, sm.cache[k][r].Load(), cacheAttrs[k][r])
			}
		}
		for i := range sm.served {
			o.ObserveInt64(served, sm.served[i].Load(), servedAttrs[i])
		}
		for i := range sm.refSources {
			o.ObserveInt64(refSrc, sm.refSources[i].Load(), refAttrs[i])
		}
		o.ObserveInt64(inFlight, sm.fillsRunning.Load())
		o.ObserveInt64(waiters, sm.fillWaiters.Load())
		o.ObserveInt64(queued, sm.fillsQueued.Load())
		o.ObserveInt64(uploads, int64(s.uploads.open()))
		return nil
	}, requests, cacheReqs, served, refSrc, inFlight, queued, waiters, uploads, sources)
	return sm, err
}

// countRequest adds a request to its route, method and code.
func (sm *serverMetrics) countRequest(route, method string, code int) {
	k := requestLabels{route, method, code}
	v, ok := sm.requests.Load(k)
	if !ok {
		v, _ = sm.requests.LoadOrStore(k, &requestCount{attrs: metric.WithAttributeSet(attribute.NewSet(
			attribute.String("route", route), attribute.String("method", method), attribute.String("code", strconv.Itoa(code))))})
	}
	v.(*requestCount).n.Add(1)
}

// record counts a finished request.
func (sm *serverMetrics) record(ctx context.Context, r *http.Request, q *request, status int, bytes int64, seconds float64, err error) {
	route := routeLabel(q.op, r)
	if status < 100 || status > 599 {
		status = 0
	}
	sm.countRequest(route, upstream.MethodLabel(r.Method), status)
	sm.duration.Record(ctx, seconds, sm.byRoute[route])
	if q.up == nil || (r.Method != http.MethodGet && r.Method != http.MethodHead) {
		return // hosted content, and writes, are not the cache's
	}
	kind := cacheKindIndex(q)
	if kind < 0 {
		return
	}
	result := q.cache
	if err != nil && (result == "" || result == cacheMiss || result == cacheCoalesced) {
		switch {
		case errors.Is(err, upstream.ErrOffline), errors.Is(err, upstream.ErrDown):
			result = cacheOfflineMiss // not held, and the upstream not asked
		case result == "" && fromUpstream(err):
			result = cacheMiss
		}
	}
	res := cacheResultIndex(result)
	if res < 0 {
		return
	}
	sm.cache[kind][res].Add(1)
	if bytes > 0 && status >= 200 && status < 300 {
		src := 0 // cache
		switch result {
		case cacheMiss, cacheCoalesced:
			src = 1 // upstream
		case cachePassthrough:
			src = 2
		}
		sm.served[src].Add(bytes)
	}
}

func cacheResultIndex(r string) int {
	for i, v := range cacheResults {
		if v == r {
			return i
		}
	}
	return -1
}

// referrerSources counts the sources an answer drew on.
func (sm *serverMetrics) referrerSources(sources uint8) {
	for i := range sm.refSources {
		if sources&(1<<i) != 0 {
			sm.refSources[i].Add(1)
		}
	}
}

// fromUpstream reports whether err is an upstream's answer or failure.
func fromUpstream(err error) bool {
	if _, ok := errors.AsType[*upstream.StatusError](err); ok {
		return true
	}
	return errors.Is(err, upstream.ErrNotFound) || errors.Is(err, upstream.ErrDenied) || upstream.Transient(err)
}

// cacheKindIndex is what a request of a mirrored repository asked the
// cache for, as an index of cacheKinds: a manifest by digest, a blob, a
// tag, referrers or a tag list; -1 for none (a malformed request).
func cacheKindIndex(q *request) int {
	switch q.op {
	case "manifest":
		if q.dgst != "" {
			return 0
		}
		if q.ref != "" {
			return 2
		}
	case "blob":
		if q.dgst != "" {
			return 1
		}
	case "referrers":
		if q.dgst != "" {
			return 3
		}
	case "tags":
		return 4
	}
	return -1
}

// routeLabel is the route label of a request: its endpoint, catalog for
// /v2/_catalog (which ocimirror does not serve), base for /v2/, the token
// endpoint and any path that is no endpoint.
func routeLabel(op string, r *http.Request) string {
	switch op {
	case "manifest", "blob", "tags", "referrers", "upload":
		return op
	}
	if r.URL.Path == "/v2/_catalog" {
		return "catalog"
	}
	return "base"
}
