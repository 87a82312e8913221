package upstream

import (
	"context"
	"io"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

// DurationBuckets are the histogram bounds of request durations, in
// seconds: from a cached answer on loopback to a slow upstream's layer.
var DurationBuckets = []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120}

// clientMetrics are one upstream's series. Labels are the upstream's
// configured name, the method and the status code: a bounded set.
type clientMetrics struct {
	requests metric.Int64Counter
	duration metric.Float64Histogram
	bytes    metric.Int64Counter
	up       metric.Int64ObservableGauge

	name     attribute.KeyValue
	byName   metric.MeasurementOption
	reg      metric.Registration
	mu       sync.Mutex
	reqAttrs map[reqAttrKey]metric.AddOption
}

type reqAttrKey struct {
	method string
	code   int
}

func newClientMetrics(m metric.Meter, c *Client) (*clientMetrics, error) {
	cm := &clientMetrics{name: attribute.String("upstream", c.name), reqAttrs: map[reqAttrKey]metric.AddOption{}}
	cm.byName = metric.WithAttributeSet(attribute.NewSet(cm.name))
	var err error
	if cm.requests, err = m.Int64Counter("ocimirror_upstream_requests_total",
		metric.WithDescription("HTTP requests sent to an upstream (token requests and redirects included), by status code (error: no answer).")); err != nil {
		return nil, err
	}
	if cm.duration, err = m.Float64Histogram("ocimirror_upstream_request_duration_seconds", metric.WithUnit("s"),
		metric.WithDescription("Time an upstream took to answer a request (its headers)."),
		metric.WithExplicitBucketBoundaries(DurationBuckets...)); err != nil {
		return nil, err
	}
	if cm.bytes, err = m.Int64Counter("ocimirror_upstream_bytes_total", metric.WithUnit("By"),
		metric.WithDescription("Response body bytes received from an upstream.")); err != nil {
		return nil, err
	}
	if cm.up, err = m.Int64ObservableGauge("ocimirror_upstream_up",
		metric.WithDescription("1 when the upstream is up, 0 when its circuit breaker marked it down or it is configured offline.")); err != nil {
		return nil, err
	}
	cm.reg, err = m.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		st := c.State()
		v := int64(1)
		if st.Down || st.Offline {
			v = 0
		}
		o.ObserveInt64(cm.up, v, cm.byName)
		return nil
	}, cm.up)
	return cm, err
}

// requestAttrs are the attributes of one (method, code), built once.
func (cm *clientMetrics) requestAttrs(method string, code int) metric.AddOption {
	k := reqAttrKey{method, code}
	cm.mu.Lock()
	defer cm.mu.Unlock()
	if o, ok := cm.reqAttrs[k]; ok {
		return o
	}
	c := "error"
	if code > 0 {
		c = strconv.Itoa(code)
	}
	o := metric.WithAttributeSet(attribute.NewSet(cm.name, attribute.String("method", method), attribute.String("code", c)))
	cm.reqAttrs[k] = o
	return o
}

// meteredTransport counts every round trip to the upstream, its time to
// answer, and the body bytes read.
type meteredTransport struct {
	next http.RoundTripper
	m    *clientMetrics
}

func (t meteredTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	start := time.Now()
	resp, err := t.next.RoundTrip(req)
	ctx := req.Context()
	t.m.duration.Record(ctx, time.Since(start).Seconds(), t.m.byName)
	code := 0
	if err == nil {
		code = resp.StatusCode
		if code < 100 || code > 599 {
			code = 0
		}
	}
	t.m.requests.Add(ctx, 1, t.m.requestAttrs(MethodLabel(req.Method), code))
	if err == nil && resp.Body != nil && resp.Body != http.NoBody {
		resp.Body = &countingBody{ReadCloser: resp.Body, m: t.m}
	}
	return resp, err
}

// MethodLabel is a method as a metric label: one of the registry API's,
// else "other" (a client chooses the method: the label set stays bounded).
func MethodLabel(m string) string {
	switch m {
	case http.MethodGet, http.MethodHead, http.MethodPut, http.MethodPost, http.MethodPatch, http.MethodDelete:
		return m
	}
	return "other"
}

// countingBody adds what is read to the upstream's byte counter, in
// batches of at least 256 KiB (and at Close), so that a large blob costs
// few additions.
type countingBody struct {
	io.ReadCloser
	m       *clientMetrics
	pending atomic.Int64 // Close may come from another goroutine
}

const countBatch = 256 << 10

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if b.pending.Add(int64(n)) >= countBatch || err != nil {
		b.flush()
	}
	return n, err
}

func (b *countingBody) flush() {
	if n := b.pending.Swap(0); n > 0 {
		b.m.bytes.Add(context.Background(), n, b.m.byName)
	}
}

func (b *countingBody) Close() error {
	b.flush()
	return b.ReadCloser.Close()
}
