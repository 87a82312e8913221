package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlpmetric/otlpmetrichttp"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	"go.opentelemetry.io/otel/metric"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/resource"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"

	"github.com/ocimirror/ocimirror/cache/tiered"
)

// telemetry is the process's metrics: one OpenTelemetry meter provider
// whose instruments every package creates from, read by the Prometheus
// exporter (served at the admin listener's /metrics) and, when the
// standard OTEL_* variables ask for it, pushed over OTLP/HTTP too.
type telemetry struct {
	provider *sdkmetric.MeterProvider
	// handler serves the Prometheus text format: ocimirror's series, the
	// Go runtime's (go_*) and the process's (process_*).
	handler  http.Handler
	shutdown func()
}

func newTelemetry(ctx context.Context) (*telemetry, error) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	// No otel_scope_* labels and no target_info: the series are named
	// ocimirror_* already, and a scrape target is one process.
	prom, err := otelprom.New(otelprom.WithRegisterer(reg), otelprom.WithoutScopeInfo(), otelprom.WithoutTargetInfo())
	if err != nil {
		return nil, fmt.Errorf("prometheus exporter: %w", err)
	}
	opts := []sdkmetric.Option{sdkmetric.WithReader(prom)}
	if otlpMetricsWanted() {
		exp, err := otlpmetrichttp.New(ctx)
		if err != nil {
			return nil, fmt.Errorf("otlp metric exporter: %w", err)
		}
		res, err := resource.Merge(resource.Default(), resource.NewSchemaless(semconv.ServiceName("ocimirror"), semconv.ServiceVersion(version)))
		if err != nil {
			res = resource.Default()
		}
		opts = append(opts, sdkmetric.WithReader(sdkmetric.NewPeriodicReader(exp)), sdkmetric.WithResource(res))
	}
	mp := sdkmetric.NewMeterProvider(opts...)
	info, err := mp.Meter("github.com/ocimirror/ocimirror/cmd").Int64ObservableGauge("ocimirror_build_info",
		metric.WithDescription("1, with the version of ocimirror running as a label."))
	if err != nil {
		return nil, err
	}
	byVersion := metric.WithAttributes(attribute.String("version", version))
	if _, err := mp.Meter("github.com/ocimirror/ocimirror/cmd").RegisterCallback(func(_ context.Context, o metric.Observer) error {
		o.ObserveInt64(info, 1, byVersion)
		return nil
	}, info); err != nil {
		return nil, err
	}
	return &telemetry{
		provider: mp,
		handler:  promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError}),
		shutdown: func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = mp.Shutdown(ctx)
		},
	}, nil
}

// otlpMetricsWanted follows the OpenTelemetry environment variables: an
// OTLP endpoint, or OTEL_METRICS_EXPORTER=otlp, turns the push on; the
// SDK disabled, or OTEL_METRICS_EXPORTER=none (or prometheus), keeps it
// off. The Prometheus endpoint is served either way.
func otlpMetricsWanted() bool {
	if os.Getenv("OTEL_SDK_DISABLED") == "true" {
		return false
	}
	exporters := os.Getenv("OTEL_METRICS_EXPORTER")
	if exporters != "" {
		for _, e := range strings.Split(exporters, ",") {
			if strings.TrimSpace(e) == "otlp" {
				return true
			}
		}
		return false
	}
	return os.Getenv("OTEL_EXPORTER_OTLP_ENDPOINT") != "" || os.Getenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") != ""
}

// pinnedRefresh is how often ocimirror_store_pinned_bytes is recomputed:
// it walks every pinned image in the store, too much for every scrape.
var pinnedRefresh = time.Minute

// observePinned exports ocimirror_store_pinned_bytes: the last figure of
// pinned, recomputed in the background when a collection finds it older
// than pinnedRefresh (a collection never waits for the walk). stop ends
// it and waits for a walk under way: call it before the store closes.
func (t *telemetry) observePinned(pinned func(context.Context) (int64, error), log *slog.Logger) (stop func(), err error) {
	m := t.provider.Meter("github.com/ocimirror/ocimirror/cmd")
	g, err := m.Int64ObservableGauge("ocimirror_store_pinned_bytes", metric.WithUnit("By"),
		metric.WithDescription("Size of what the pins keep from eviction (storage.pin, sync, imports), recomputed at most once a minute."))
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	var (
		mu      sync.Mutex
		wg      sync.WaitGroup
		value   int64
		at      time.Time
		running bool
	)
	refresh := func() {
		defer wg.Done()
		rctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		n, err := pinned(rctx)
		mu.Lock()
		defer mu.Unlock()
		running, at = false, time.Now()
		if err != nil {
			log.Warn("measuring what the pins keep", "err", err)
			return
		}
		value = n
	}
	start := func() { // with mu held
		if !running && ctx.Err() == nil {
			running = true
			wg.Add(1)
			go refresh()
		}
	}
	reg, err := m.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		mu.Lock()
		defer mu.Unlock()
		if time.Since(at) >= pinnedRefresh {
			start()
		}
		o.ObserveInt64(g, value)
		return nil
	}, g)
	if err != nil {
		cancel()
		return nil, err
	}
	mu.Lock()
	start() // a figure before the first scrape
	mu.Unlock()
	return func() {
		_ = reg.Unregister()
		mu.Lock()
		cancel()
		mu.Unlock()
		wg.Wait()
	}, nil
}

// observeShared exports the shared tier's eviction figures (zero without
// one: the board and the rules find the series either way).
func (t *telemetry) observeShared(s *tiered.Store) error {
	m := t.provider.Meter("github.com/ocimirror/ocimirror/cmd")
	size, err := m.Int64ObservableGauge("ocimirror_shared_bytes", metric.WithUnit("By"),
		metric.WithDescription("Size of the upstream content the shared tier held after its last eviction run (by the replica holding the lease; 0 elsewhere)."))
	if err != nil {
		return err
	}
	evicted, err := m.Int64ObservableCounter("ocimirror_shared_evicted_bytes_total", metric.WithUnit("By"),
		metric.WithDescription("Bytes of upstream content this replica evicted from the shared tier (storage.s3.maxSize)."))
	if err != nil {
		return err
	}
	_, err = m.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		var st tiered.GCStats
		if s != nil {
			st = s.GCStats()
		}
		o.ObserveInt64(size, st.Bytes)
		o.ObserveInt64(evicted, st.EvictedBytes)
		return nil
	}, size, evicted)
	return err
}
