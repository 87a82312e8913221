package proxy_test

import (
	"testing"

	"go.opentelemetry.io/otel/attribute"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
)

func TestProxy_Tracing(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	e, reg := start(t, withTracer(tp))
	reg.PushImage(t, "app", "v1", 10)
	if r := e.get("/v2/app/manifests/v1"); r.status != 200 {
		t.Fatal(r.status)
	}
	var server, client sdktrace.ReadOnlySpan
	for _, s := range rec.Ended() {
		switch s.SpanKind() {
		case trace.SpanKindServer:
			server = s
		case trace.SpanKindClient:
			client = s
		}
	}
	if server == nil || client == nil {
		t.Fatalf("spans: server %v client %v", server, client)
	}
	if server.Name() != "GET manifest" || client.Name() != "upstream GET" {
		t.Errorf("span names %q %q", server.Name(), client.Name())
	}
	if client.Parent().SpanID() != server.SpanContext().SpanID() {
		t.Error("the upstream call is not a child of the request's span")
	}
	want := map[attribute.Key]string{"ocimirror.upstream": reg.Host, "ocimirror.repo": "app", "ocimirror.cache": "miss"}
	for _, kv := range server.Attributes() {
		if w, ok := want[kv.Key]; ok {
			if kv.Value.AsString() != w {
				t.Errorf("%s = %q, want %q", kv.Key, kv.Value.AsString(), w)
			}
			delete(want, kv.Key)
		}
	}
	if len(want) > 0 {
		t.Errorf("server span lacks %v", want)
	}
}
