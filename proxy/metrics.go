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
type serverMetrics struct {
	requests   metric.Int64Counter
	duration   metric.Float64Histogram
	cacheReqs  metric.Int64Counter
	served     metric.Int64Counter
	refSources metric.Int64Counter
	reg        metric.Registration

	// The attribute sets, built once: by route; by route, method and
	// status code (built on first use: a bounded set); by kind and
	// result; by source.
	byRoute     map[string]metric.RecordOption
	reqMu       sync.RWMutex
	byRequest   map[requestLabels]metric.AddOption
	byCache     map[[2]string]metric.AddOption
	bySource    map[string]metric.AddOption
	byRefSource [3]metric.AddOption

	// Gauges read at collection.
	fillsRunning atomic.Int64
	fillWaiters  atomic.Int64
}

type requestLabels struct {
	route, method string
	code          int
}

// routes are the values of the route label.
var routes = []string{"manifest", "blob", "tags", "referrers", "upload", "catalog", "base"}

func newServerMetrics(m metric.Meter, s *Server) (*serverMetrics, error) {
	sm := &serverMetrics{
		byRoute:   map[string]metric.RecordOption{},
		byRequest: map[requestLabels]metric.AddOption{},
		byCache:   map[[2]string]metric.AddOption{},
		bySource:  map[string]metric.AddOption{},
	}
	for _, r := range routes {
		sm.byRoute[r] = metric.WithAttributeSet(attribute.NewSet(attribute.String("route", r)))
	}
	for _, k := range []string{"manifest", "blob", "tag", "referrers", "taglist"} {
		for _, r := range []string{cacheHit, cacheMiss, cacheCoalesced, cacheRevalidated, cacheStale, cacheOfflineMiss, cachePassthrough} {
			sm.byCache[[2]string{k, r}] = metric.WithAttributeSet(attribute.NewSet(attribute.String("kind", k), attribute.String("result", r)))
		}
	}
	for _, src := range []string{"cache", "upstream", "passthrough"} {
		sm.bySource[src] = metric.WithAttributeSet(attribute.NewSet(attribute.String("source", src)))
	}
	for i, src := range []string{"api", "fallback_tag", "local"} {
		sm.byRefSource[i] = metric.WithAttributeSet(attribute.NewSet(attribute.String("source", src)))
	}
	var err error
	if sm.requests, err = m.Int64Counter("ocimirror_http_requests_total",
		metric.WithDescription("Registry API requests answered, by route, method and status code.")); err != nil {
		return nil, err
	}
	if sm.duration, err = m.Float64Histogram("ocimirror_http_request_duration_seconds", metric.WithUnit("s"),
		metric.WithDescription("Time to answer a registry API request, body included, by route."),
		metric.WithExplicitBucketBoundaries(upstream.DurationBuckets...)); err != nil {
		return nil, err
	}
	if sm.cacheReqs, err = m.Int64Counter("ocimirror_cache_requests_total",
		metric.WithDescription("Requests for mirrored content, by kind (manifest by digest, blob, tag, referrers, taglist) and how the cache answered.")); err != nil {
		return nil, err
	}
	if sm.served, err = m.Int64Counter("ocimirror_served_bytes_total", metric.WithUnit("By"),
		metric.WithDescription("Response body bytes of manifests, blobs, tag lists and referrers served, by source: cache (the store), upstream (fetched for the request, or streamed during a fill), passthrough (streamed past a full store).")); err != nil {
		return nil, err
	}
	if sm.refSources, err = m.Int64Counter("ocimirror_referrers_sources_total",
		metric.WithDescription("Referrers answers of mirrored repositories that drew on each source: the upstream's referrers API, its fallback tag, the index ocimirror keeps.")); err != nil {
		return nil, err
	}
	inFlight, err := m.Int64ObservableGauge("ocimirror_fills_in_flight",
		metric.WithDescription("Blob fills from an upstream running now."))
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
	sm.reg, err = m.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		o.ObserveInt64(inFlight, sm.fillsRunning.Load())
		o.ObserveInt64(waiters, sm.fillWaiters.Load())
		o.ObserveInt64(uploads, int64(s.uploads.open()))
		return nil
	}, inFlight, waiters, uploads)
	return sm, err
}

// requestAttrs is the attribute set of one route, method and code.
func (sm *serverMetrics) requestAttrs(route, method string, code int) metric.AddOption {
	k := requestLabels{route, method, code}
	sm.reqMu.RLock()
	o, ok := sm.byRequest[k]
	sm.reqMu.RUnlock()
	if ok {
		return o
	}
	sm.reqMu.Lock()
	defer sm.reqMu.Unlock()
	if o, ok := sm.byRequest[k]; ok {
		return o
	}
	o = metric.WithAttributeSet(attribute.NewSet(attribute.String("route", route), attribute.String("method", method),
		attribute.String("code", strconv.Itoa(code))))
	sm.byRequest[k] = o
	return o
}

// record counts a finished request.
func (sm *serverMetrics) record(ctx context.Context, r *http.Request, q *request, status int, bytes int64, seconds float64, err error) {
	route := routeLabel(q.op, r)
	if status < 100 || status > 599 {
		status = 0
	}
	sm.requests.Add(ctx, 1, sm.requestAttrs(route, methodLabel(r.Method), status))
	sm.duration.Record(ctx, seconds, sm.byRoute[route])
	if q.up == nil || (r.Method != http.MethodGet && r.Method != http.MethodHead) {
		return // hosted content, and writes, are not the cache's
	}
	kind := cacheKind(q)
	if kind == "" {
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
	if o, ok := sm.byCache[[2]string{kind, result}]; ok {
		sm.cacheReqs.Add(ctx, 1, o)
	}
	if bytes > 0 && status >= 200 && status < 300 {
		src := "cache"
		switch result {
		case cacheMiss, cacheCoalesced:
			src = "upstream"
		case cachePassthrough:
			src = "passthrough"
		}
		sm.served.Add(ctx, bytes, sm.bySource[src])
	}
}

// referrerSources counts the sources an answer drew on.
func (sm *serverMetrics) referrerSources(ctx context.Context, sources uint8) {
	for i := range sm.byRefSource {
		if sources&(1<<i) != 0 {
			sm.refSources.Add(ctx, 1, sm.byRefSource[i])
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

// cacheKind is what a request of a mirrored repository asked the cache
// for: a manifest by digest, a tag, a blob, referrers or a tag list.
func cacheKind(q *request) string {
	switch q.op {
	case "manifest":
		if q.dgst != "" {
			return "manifest"
		}
		if q.ref != "" {
			return "tag"
		}
	case "blob":
		if q.dgst != "" {
			return "blob"
		}
	case "referrers":
		if q.dgst != "" {
			return "referrers"
		}
	case "tags":
		return "taglist"
	}
	return ""
}

// routeLabel is the route label of a request: its endpoint, catalog for
// /v2/_catalog (which ocimirror does not serve), base for /v2/ and any
// path that is no endpoint.
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

// methodLabel is the method when it is one of the API's, else "other".
func methodLabel(m string) string {
	switch m {
	case http.MethodGet, http.MethodHead, http.MethodPut, http.MethodPost, http.MethodPatch, http.MethodDelete:
		return m
	}
	return "other"
}
