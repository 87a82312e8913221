package proxy_test

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.opentelemetry.io/otel/trace"

	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/internal/registrytest"
	"github.com/ocimirror/ocimirror/proxy"
	"github.com/ocimirror/ocimirror/upstream"
)

// clock is a settable time source for TTL tests.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

type upstreamDef struct {
	name  string
	reg   *registrytest.Registry
	ttl   time.Duration
	creds upstream.Credentials
	url   string // overrides reg.URL
}

// env is ocimirror on a real Badger store in a temporary directory, in front
// of in-process registries, served on 127.0.0.1.
type env struct {
	t           testing.TB
	dir         string
	clock       *clock
	upstreams   []upstreamDef
	defaultName string
	tracer      trace.TracerProvider

	badger *cache.Badger
	store  cache.Store
	srv    *proxy.Server
	ts     *httptest.Server
	// requests counts the requests that reached ocimirror.
	requests atomic.Int64
}

type option func(*env)

func withUpstream(u upstreamDef) option { return func(e *env) { e.upstreams = append(e.upstreams, u) } }
func withDefault(name string) option    { return func(e *env) { e.defaultName = name } }
func withTracer(tp trace.TracerProvider) option {
	return func(e *env) { e.tracer = tp }
}

// start runs ocimirror. Without options it has one upstream, a fresh
// registry named by its host:port, which is also the default.
func start(t testing.TB, opts ...option) (*env, *registrytest.Registry) {
	t.Helper()
	e := &env{t: t, dir: t.TempDir(), clock: &clock{now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}}
	for _, o := range opts {
		o(e)
	}
	var reg *registrytest.Registry
	if len(e.upstreams) == 0 {
		reg = registrytest.New(t)
		e.upstreams = []upstreamDef{{name: reg.Host, reg: reg}}
		e.defaultName = reg.Host
	} else {
		reg = e.upstreams[0].reg
	}
	e.open()
	t.Cleanup(e.close)
	return e, reg
}

func (e *env) open() {
	t := e.t
	var err error
	e.badger, err = cache.OpenBadger(cache.BadgerOptions{Path: e.dir, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	e.store, err = cache.NewLRU(e.badger, 64, 256)
	if err != nil {
		t.Fatal(err)
	}
	var ups []proxy.Upstream
	for _, u := range e.upstreams {
		url := u.url
		if url == "" {
			url = u.reg.URL
		}
		c, err := upstream.New(upstream.Options{Name: u.name, URL: url, Credentials: u.creds,
			RetryBackoff: time.Millisecond, MaxAttempts: 2, Logger: testLogger(t), TracerProvider: e.tracer})
		if err != nil {
			t.Fatal(err)
		}
		ups = append(ups, proxy.Upstream{Client: c, TagTTL: u.ttl})
	}
	e.srv, err = proxy.New(proxy.Options{Store: e.store, Upstreams: ups, DefaultUpstream: e.defaultName,
		Logger: testLogger(t), Clock: e.clock.Now, TracerProvider: e.tracer})
	if err != nil {
		t.Fatal(err)
	}
	h := e.srv.Handler()
	e.ts = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		e.requests.Add(1)
		h.ServeHTTP(w, r)
	}))
}

func (e *env) close() {
	if e.ts == nil {
		return
	}
	e.ts.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.srv.Shutdown(ctx); err != nil {
		e.t.Errorf("shutdown: %v", err)
	}
	if err := e.badger.Close(); err != nil {
		e.t.Errorf("close store: %v", err)
	}
	e.ts = nil
}

// restart stops ocimirror and starts it again on the same data.
func (e *env) restart() {
	e.close()
	e.open()
}

type response struct {
	status int
	header http.Header
	body   []byte
	err    error // from reading the body: a cut connection
}

// do sends a request to ocimirror; headers are "Name: value" strings.
func (e *env) do(method, path string, headers ...string) response {
	e.t.Helper()
	req, err := http.NewRequest(method, e.ts.URL+path, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	for _, h := range headers {
		k, v, _ := strings.Cut(h, ":")
		req.Header.Add(k, strings.TrimSpace(v))
	}
	resp, err := e.ts.Client().Do(req)
	if err != nil {
		e.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	body, rerr := io.ReadAll(resp.Body)
	return response{status: resp.StatusCode, header: resp.Header, body: body, err: rerr}
}

func (e *env) get(path string, headers ...string) response {
	e.t.Helper()
	return e.do(http.MethodGet, path, headers...)
}

// errorCode returns the first OCI error code of a body.
func errorCode(t *testing.T, body []byte) string {
	t.Helper()
	var b struct {
		Errors []struct {
			Code string `json:"code"`
		} `json:"errors"`
	}
	if err := json.Unmarshal(body, &b); err != nil || len(b.Errors) == 0 {
		t.Fatalf("not an OCI error body: %q", body)
	}
	return b.Errors[0].Code
}

func testLogger(t testing.TB) *slog.Logger {
	if os.Getenv("OCIMIRROR_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// waitFor polls cond every 10 ms for at most 10 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for i := 0; i < 1000; i++ {
		if cond() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}
