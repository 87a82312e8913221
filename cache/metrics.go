package cache

import (
	"context"
	"sync/atomic"

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
// what eviction and collection removed. The counters are atomics read at
// collection, so that each is exported from zero.
type storeMetrics struct {
	evictions [len(evictReasons)]atomic.Int64
	evicted   atomic.Int64
	gcDeleted atomic.Int64
	reg       metric.Registration
}

var evictReasons = [...]string{evictHighWatermark, evictMinFree, evictMakeRoom}

func newStoreMetrics(mp metric.MeterProvider, s *Badger) (*storeMetrics, error) {
	if mp == nil {
		mp = metricnoop.NewMeterProvider()
	}
	m := mp.Meter("github.com/ocimirror/ocimirror/cache")
	sm := &storeMetrics{}
	var byReason [len(evictReasons)]metric.ObserveOption
	for i, r := range evictReasons {
		byReason[i] = metric.WithAttributeSet(attribute.NewSet(attribute.String("reason", r)))
	}
	evictions, err := m.Int64ObservableCounter("ocimirror_evictions_total",
		metric.WithDescription("Cached blobs and manifests evicted, by why the pass ran (high_watermark, min_free, make_room)."))
	if err != nil {
		return nil, err
	}
	evicted, err := m.Int64ObservableCounter("ocimirror_evicted_bytes_total", metric.WithUnit("By"),
		metric.WithDescription("Disk space freed by eviction."))
	if err != nil {
		return nil, err
	}
	gcDeleted, err := m.Int64ObservableCounter("ocimirror_gc_deleted_bytes_total", metric.WithUnit("By"),
		metric.WithDescription("Bytes of unreferenced data deleted by garbage collection."))
	if err != nil {
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
		for i := range sm.evictions {
			o.ObserveInt64(evictions, sm.evictions[i].Load(), byReason[i])
		}
		o.ObserveInt64(evicted, sm.evicted.Load())
		o.ObserveInt64(gcDeleted, sm.gcDeleted.Load())
		o.ObserveInt64(size, s.Usage())
		o.ObserveInt64(budget, max(s.limits.MaxSize, 0))
		return nil
	}, evictions, evicted, gcDeleted, size, budget)
	return sm, err
}

// evictedBy counts what a pass evicted.
func (sm *storeMetrics) evictedBy(reason string, ev Evicted) {
	for i, r := range evictReasons {
		if r == reason {
			sm.evictions[i].Add(int64(ev.Blobs + ev.Manifests))
		}
	}
	sm.evicted.Add(ev.Bytes)
}

func (sm *storeMetrics) close() {
	if sm.reg != nil {
		_ = sm.reg.Unregister()
	}
}
