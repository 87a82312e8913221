package cache

import (
	"context"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
)

// Why an eviction pass ran: usage reached the high watermark of the
// maximum size, the filesystem's free space fell under its minimum, or a
// write needed room now.
const (
	evictHighWatermark = "high_watermark"
	evictMinFree       = "min_free"
	evictMakeRoom      = "make_room"
)

// storeMetrics are the store's series: its size against its budget, and
// what eviction and collection removed.
type storeMetrics struct {
	evictions metric.Int64Counter
	evicted   metric.Int64Counter
	gcDeleted metric.Int64Counter
	reasons   map[string]metric.AddOption
	reg       metric.Registration
}

func newStoreMetrics(mp metric.MeterProvider, s *Badger) (*storeMetrics, error) {
	if mp == nil {
		mp = metricnoop.NewMeterProvider()
	}
	m := mp.Meter("github.com/ocimirror/ocimirror/cache")
	sm := &storeMetrics{reasons: map[string]metric.AddOption{}}
	for _, r := range []string{evictHighWatermark, evictMinFree, evictMakeRoom} {
		sm.reasons[r] = metric.WithAttributeSet(attribute.NewSet(attribute.String("reason", r)))
	}
	var err error
	if sm.evictions, err = m.Int64Counter("ocimirror_evictions_total",
		metric.WithDescription("Cached blobs and manifests evicted, by why the pass ran (high_watermark, min_free, make_room).")); err != nil {
		return nil, err
	}
	if sm.evicted, err = m.Int64Counter("ocimirror_evicted_bytes_total", metric.WithUnit("By"),
		metric.WithDescription("Disk space freed by eviction.")); err != nil {
		return nil, err
	}
	if sm.gcDeleted, err = m.Int64Counter("ocimirror_gc_deleted_bytes_total", metric.WithUnit("By"),
		metric.WithDescription("Bytes of unreferenced data deleted by garbage collection.")); err != nil {
		return nil, err
	}
	size, err := m.Int64ObservableGauge("ocimirror_store_bytes", metric.WithUnit("By"),
		metric.WithDescription("Disk use of the store: blob files and database, as du counts it."))
	if err != nil {
		return nil, err
	}
	budget, err := m.Int64ObservableGauge("ocimirror_store_budget_bytes", metric.WithUnit("By"),
		metric.WithDescription("The store's maximum size (storage.maxSize); 0 when it has none."))
	if err != nil {
		return nil, err
	}
	sm.reg, err = m.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		o.ObserveInt64(size, s.Usage())
		o.ObserveInt64(budget, max(s.limits.MaxSize, 0))
		return nil
	}, size, budget)
	return sm, err
}

// evictedBy counts what a pass evicted.
func (sm *storeMetrics) evictedBy(reason string, ev Evicted) {
	if ev.Bytes == 0 && ev.Blobs+ev.Manifests == 0 {
		return
	}
	ctx := context.Background()
	sm.evictions.Add(ctx, int64(ev.Blobs+ev.Manifests), sm.reasons[reason])
	sm.evicted.Add(ctx, ev.Bytes)
}

func (sm *storeMetrics) close() {
	if sm.reg != nil {
		_ = sm.reg.Unregister()
	}
}
