package proxy_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"

	"github.com/ocimirror/ocimirror/auth"
	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/cache/s3"
	"github.com/ocimirror/ocimirror/cache/tiered"
	"github.com/ocimirror/ocimirror/cluster"
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
	name    string
	reg     *registrytest.Registry
	ttl     time.Duration
	creds   upstream.Credentials
	url     string // overrides reg.URL
	forward bool
	offline bool
	// breaker is the failures that mark the upstream down (0: never, as
	// most tests fail an upstream on purpose), probed every breakerBackoff.
	breaker        int
	breakerBackoff time.Duration
	// maxFills bounds the fills at once (the default if 0).
	maxFills int
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
	meter       metric.MeterProvider
	auth        *auth.Authenticator
	// headers are sent with every request that does not set them (credentials).
	headers    []string
	hosted     []string
	readOnly   bool
	maxUploads int
	perClient  int
	uploadIdle time.Duration
	bodyIdle   time.Duration
	wrapStore  func(cache.Store) cache.Store
	lruBytes   int64
	budget     cache.Budget
	pins       []string
	sync       []proxy.SyncRule
	// bucket is the shared tier (withShared); addr, self, peers and
	// secret make the server a cluster replica (withCluster).
	bucket  *s3.Store
	addr    string
	peers   []string
	secret  string
	tiered  *tiered.Store
	members *cluster.Cluster

	badger  *cache.Badger
	store   cache.Store
	clients map[string]*upstream.Client
	srv     *proxy.Server
	ts      *httptest.Server
	// requests counts the requests that reached ocimirror.
	requests atomic.Int64
}

type option func(*env)

func withUpstream(u upstreamDef) option    { return func(e *env) { e.upstreams = append(e.upstreams, u) } }
func withDefault(name string) option       { return func(e *env) { e.defaultName = name } }
func withHosted(prefixes ...string) option { return func(e *env) { e.hosted = prefixes } }
func withReadOnly() option                 { return func(e *env) { e.readOnly = true } }
func withMaxUploads(n int) option          { return func(e *env) { e.maxUploads = n } }
func withUploadLimits(total, perClient int, idle, body time.Duration) option {
	return func(e *env) { e.maxUploads, e.perClient, e.uploadIdle, e.bodyIdle = total, perClient, idle, body }
}
func withStore(wrap func(cache.Store) cache.Store) option { return func(e *env) { e.wrapStore = wrap } }
func withLRUBytes(n int64) option                         { return func(e *env) { e.lruBytes = n } }
func withBudget(b cache.Budget) option                    { return func(e *env) { e.budget = b } }
func withDir(dir string) option                           { return func(e *env) { e.dir = dir } }
func withSync(rules ...proxy.SyncRule) option             { return func(e *env) { e.sync = rules } }
func withPins(refs ...string) option                      { return func(e *env) { e.pins = refs } }
func withMeter(mp metric.MeterProvider) option            { return func(e *env) { e.meter = mp } }
func withAuth(a *auth.Authenticator) option               { return func(e *env) { e.auth = a } }
func withShared(b *s3.Store) option                       { return func(e *env) { e.bucket = b } }

// withCluster makes the server the replica at addr of a cluster of peers
// (addresses), all with the same secret.
func withCluster(addr string, peers []string, secret string) option {
	return func(e *env) { e.addr, e.peers, e.secret = addr, peers, secret }
}
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
	e.badger, err = cache.OpenBadger(cache.BadgerOptions{Path: e.dir, Logger: testLogger(t), Budget: e.budget, Clock: e.clock.Now, CollectInterval: -1, WaitForPins: true, MeterProvider: e.meter})
	if err != nil {
		t.Fatal(err)
	}
	lruBytes := e.lruBytes
	if lruBytes == 0 {
		lruBytes = 1 << 20
	}
	lru := cache.NewLRU(e.badger, cache.LRUOptions{ManifestBytes: lruBytes, MetadataBytes: lruBytes})
	e.store = lru
	if e.bucket != nil {
		e.tiered = tiered.New(context.Background(), lru, e.bucket, tiered.Options{Self: e.addr, Logger: testLogger(t)})
		e.store = e.tiered
	}
	e.members = nil
	if e.addr != "" {
		peers := make([]string, len(e.peers))
		for i, p := range e.peers {
			peers[i] = "http://" + p
		}
		e.members, err = cluster.New(context.Background(), cluster.Options{Self: "http://" + e.addr, Peers: peers, Secret: e.secret, Logger: testLogger(t)})
		if err != nil {
			t.Fatal(err)
		}
	}
	if e.wrapStore != nil {
		e.store = e.wrapStore(e.store)
	}
	var ups []proxy.Upstream
	e.clients = map[string]*upstream.Client{}
	for _, u := range e.upstreams {
		url := u.url
		if url == "" {
			url = u.reg.URL
		}
		breaker := u.breaker
		if breaker == 0 {
			breaker = -1
		}
		c, err := upstream.New(upstream.Options{Name: u.name, URL: url, Credentials: u.creds,
			RetryBackoff: time.Millisecond, MaxAttempts: 2, Logger: testLogger(t), TracerProvider: e.tracer, MeterProvider: e.meter,
			Offline: u.offline, BreakerFailures: breaker, BreakerMinBackoff: u.breakerBackoff, BreakerMaxBackoff: 4 * u.breakerBackoff})
		if err != nil {
			t.Fatal(err)
		}
		e.clients[u.name] = c
		ups = append(ups, proxy.Upstream{Client: c, TagTTL: u.ttl, Forward: u.forward, MaxFills: u.maxFills})
	}
	e.srv, err = proxy.New(proxy.Options{Store: e.store, Upstreams: ups, DefaultUpstream: e.defaultName,
		Hosted: e.hosted, ReadOnly: e.readOnly, MaxUploads: e.maxUploads, MaxUploadsPerClient: e.perClient,
		UploadIdle: e.uploadIdle, BodyIdle: e.bodyIdle, Pins: e.pins, Sync: e.sync,
		Logger: testLogger(t), Clock: e.clock.Now, TracerProvider: e.tracer, MeterProvider: e.meter, Auth: e.auth, Cluster: e.members})
	if err != nil {
		t.Fatal(err)
	}
	e.badger.SetPins(e.srv.Pinned)
	h := e.srv.Handler()
	// Served as cmd/ocimirror serves it: behind OCIErrorListener.
	e.ts = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		e.requests.Add(1)
		h.ServeHTTP(w, r)
	}))
	if e.addr != "" {
		// A replica keeps its address across restarts: the others
		// know it by that.
		ln, err := net.Listen("tcp", e.addr)
		for i := 0; err != nil && i < 50; i++ {
			time.Sleep(20 * time.Millisecond) // the last close may linger
			ln, err = net.Listen("tcp", e.addr)
		}
		if err != nil {
			t.Fatal(err)
		}
		e.ts.Listener.Close()
		e.ts.Listener = ln
	}
	e.ts.Listener = proxy.OCIErrorListener(e.ts.Listener)
	e.ts.Start()
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
	if e.tiered != nil {
		e.tiered.Stop() // its access marks; the store is closed below
	}
	if err := e.badger.Close(); err != nil {
		e.t.Errorf("close store: %v", err)
	}
	if e.members != nil {
		e.members.Close()
	}
	e.ts = nil
}

// restartEmpty stops ocimirror and starts it again on an empty data
// directory of tb's, which it closes before tb removes the directory.
func (e *env) restartEmpty(tb testing.TB) {
	e.close()
	e.dir = tb.TempDir()
	tb.Cleanup(e.close) // before the directory goes (cleanups run last first)
	e.open()
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

// do sends a request without a body to ocimirror.
func (e *env) do(method, path string, headers ...string) response {
	e.t.Helper()
	return e.send(method, path, nil, headers...)
}

// send sends a request to ocimirror; headers are "Name: value" strings.
func (e *env) send(method, path string, body []byte, headers ...string) response {
	e.t.Helper()
	req, err := http.NewRequest(method, e.ts.URL+path, bytes.NewReader(body))
	if err != nil {
		e.t.Fatal(err)
	}
	for _, h := range headers {
		k, v, _ := strings.Cut(h, ":")
		req.Header.Add(k, strings.TrimSpace(v))
	}
	for _, h := range e.headers {
		if k, v, _ := strings.Cut(h, ":"); req.Header.Get(k) == "" {
			req.Header.Set(k, strings.TrimSpace(v))
		}
	}
	resp, err := e.ts.Client().Do(req)
	if err != nil {
		e.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, rerr := io.ReadAll(resp.Body)
	return response{status: resp.StatusCode, header: resp.Header, body: b, err: rerr}
}

// pushBlob pushes a blob through ocimirror in one POST.
func (e *env) pushBlob(repo string, data []byte) digest.Digest {
	e.t.Helper()
	d := digest.FromBytes(data)
	r := e.send(http.MethodPost, "/v2/"+repo+"/blobs/uploads/?digest="+d.String(), data)
	if r.status != http.StatusCreated {
		e.t.Fatalf("push blob to %s: %d %s", repo, r.status, r.body)
	}
	return d
}

// pushArtifact pushes an artifact with a subject through ocimirror by
// digest and returns the PUT's response and the descriptor.
func (e *env) pushArtifact(repo string, subject v1.Descriptor, artifactType string, annotations map[string]string) (response, v1.Descriptor) {
	e.t.Helper()
	data, blobs := registrytest.Artifact(subject, artifactType, annotations)
	for _, b := range blobs {
		e.pushBlob(repo, b)
	}
	d := digest.FromBytes(data)
	r := e.send(http.MethodPut, "/v2/"+repo+"/manifests/"+d.String(), data, "Content-Type: "+v1.MediaTypeImageManifest)
	return r, v1.Descriptor{MediaType: v1.MediaTypeImageManifest, Digest: d, Size: int64(len(data)), ArtifactType: artifactType, Annotations: annotations}
}

// referrersOf GETs a referrers answer and decodes it.
func (e *env) referrersOf(path string) (response, []v1.Descriptor) {
	e.t.Helper()
	r := e.get(path)
	if r.status != http.StatusOK || r.header.Get("Content-Type") != v1.MediaTypeImageIndex {
		e.t.Fatalf("%s: %d %q %s", path, r.status, r.header.Get("Content-Type"), r.body)
	}
	var idx v1.Index
	if err := json.Unmarshal(r.body, &idx); err != nil || idx.SchemaVersion != 2 || idx.MediaType != v1.MediaTypeImageIndex || idx.Manifests == nil {
		e.t.Fatalf("%s: not an OCI index: %s", path, r.body)
	}
	return r, idx.Manifests
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
