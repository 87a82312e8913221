// Package metrictest reads OpenTelemetry metrics in tests, as a scrape
// would: a meter provider whose series are collected on demand.
package metrictest

import (
	"context"
	"strings"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
)

// Reader is a meter provider read on demand.
type Reader struct {
	t        testing.TB
	reader   *sdkmetric.ManualReader
	Provider *sdkmetric.MeterProvider
}

// New returns a Reader; pass its Provider as a MeterProvider.
func New(t testing.TB) *Reader {
	r := sdkmetric.NewManualReader()
	return &Reader{t: t, reader: r, Provider: sdkmetric.NewMeterProvider(sdkmetric.WithReader(r))}
}

// Value sums the data points of a series whose attributes include every
// "key=value" given: counters and gauges by value, histograms by count.
func (m *Reader) Value(name string, labels ...string) float64 {
	m.t.Helper()
	var rm metricdata.ResourceMetrics
	if err := m.reader.Collect(context.Background(), &rm); err != nil {
		m.t.Fatal(err)
	}
	match := func(set attribute.Set) bool {
		for _, l := range labels {
			k, v, _ := strings.Cut(l, "=")
			if got, ok := set.Value(attribute.Key(k)); !ok || got.Emit() != v {
				return false
			}
		}
		return true
	}
	var sum float64
	for _, sm := range rm.ScopeMetrics {
		for _, md := range sm.Metrics {
			if md.Name != name {
				continue
			}
			switch d := md.Data.(type) {
			case metricdata.Sum[int64]:
				for _, p := range d.DataPoints {
					if match(p.Attributes) {
						sum += float64(p.Value)
					}
				}
			case metricdata.Gauge[int64]:
				for _, p := range d.DataPoints {
					if match(p.Attributes) {
						sum += float64(p.Value)
					}
				}
			case metricdata.Histogram[float64]:
				for _, p := range d.DataPoints {
					if match(p.Attributes) {
						sum += float64(p.Count)
					}
				}
			default:
				m.t.Fatalf("%s: unexpected data %T", name, md.Data)
			}
		}
	}
	return sum
}

// Want fails the test unless Value(name, labels...) is want, or becomes
// it within 5 s: a request is counted as its handler returns, which may
// be after the client has read the whole answer.
func (m *Reader) Want(name string, want float64, labels ...string) {
	m.t.Helper()
	got := m.Value(name, labels...)
	for i := 0; i < 500 && got != want; i++ {
		time.Sleep(10 * time.Millisecond)
		got = m.Value(name, labels...)
	}
	if got != want {
		m.t.Errorf("%s%v = %v, want %v", name, labels, got, want)
	}
}
