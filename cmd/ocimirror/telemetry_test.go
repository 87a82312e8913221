package main

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/ocimirror/ocimirror/internal/registrytest"
)

// With an OTLP endpoint in the environment, the metrics are pushed there
// too (OTLP/HTTP, protobuf), besides /metrics.
func TestServe_MetricsOverOTLP(t *testing.T) {
	var mu sync.Mutex
	var pushed [][]byte
	collector := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		if r.URL.Path == "/v1/metrics" {
			mu.Lock()
			pushed = append(pushed, b)
			mu.Unlock()
		}
		w.Header().Set("Content-Type", "application/x-protobuf")
	}))
	defer collector.Close()
	t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.URL)
	t.Setenv("OTEL_METRIC_EXPORT_INTERVAL", "100")
	t.Setenv("OTEL_TRACES_EXPORTER", "none")
	reg := registrytest.New(t)
	addr, stop := serveProcess(t, "--data", t.TempDir(), "--upstream", reg.Host+"="+reg.URL, "--default-upstream", reg.Host)
	defer stop()
	mirrorGet(t, addr, "/v2/app/manifests/v1")
	found := func() bool {
		mu.Lock()
		defer mu.Unlock()
		for _, b := range pushed {
			if bytes.Contains(b, []byte("ocimirror_http_requests_total")) && bytes.Contains(b, []byte("ocimirror_upstream_up")) {
				return true
			}
		}
		return false
	}
	for i := 0; i < 300 && !found(); i++ {
		time.Sleep(20 * time.Millisecond)
	}
	if !found() {
		t.Fatalf("no OTLP push of ocimirror's metrics (%d pushes)", len(pushed))
	}
}

func TestOTLPMetricsWanted(t *testing.T) {
	for _, c := range []struct {
		name string
		env  map[string]string
		want bool
	}{
		{"nothing set", nil, false},
		{"an endpoint", map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, true},
		{"a metrics endpoint", map[string]string{"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://c:4318/v1/metrics"}, true},
		{"exporter otlp", map[string]string{"OTEL_METRICS_EXPORTER": "prometheus, otlp"}, true},
		{"exporter none", map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_METRICS_EXPORTER": "none"}, false},
		{"sdk disabled", map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			for _, k := range []string{"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_METRICS_EXPORTER", "OTEL_SDK_DISABLED"} {
				t.Setenv(k, c.env[k])
			}
			if got := otlpMetricsWanted(); got != c.want {
				t.Errorf("otlpMetricsWanted() = %v, want %v", got, c.want)
			}
		})
	}
}
