// Package proxy serves the registry API: it routes each request to an
// upstream, answers from the cache where it can, and fills the cache from
// the upstream where it must.
package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/mux"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/ocimirror/ocimirror/auth"
	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/cluster"
	"github.com/ocimirror/ocimirror/config"
	"github.com/ocimirror/ocimirror/internal/flight"
	"github.com/ocimirror/ocimirror/internal/lru"
	"github.com/ocimirror/ocimirror/referrers"
	"github.com/ocimirror/ocimirror/upstream"
)

// Header names.
const (
	HeaderAPIVersion     = "Docker-Distribution-API-Version"
	HeaderContentDigest  = "Docker-Content-Digest"
	HeaderNamespace      = "OCI-Namespace"
	HeaderFiltersApplied = "OCI-Filters-Applied"
	HeaderSubject        = "OCI-Subject"
)

// upstreamFetchTimeout bounds a manifest, tag or tag-list fetch. Blob fills
// have no overall bound: the upstream client cuts a body that stalls.
const upstreamFetchTimeout = 2 * time.Minute

// Memory bounds of what clients and upstreams can make the server keep;
// README "Trust and limits" lists them.
const (
	// defaultTagListBytes bounds the upstream tag lists kept in memory.
	defaultTagListBytes = 16 << 20
	// maxTagListBytes bounds one upstream tag list, all pages together.
	maxTagListBytes = 16 << 20
	// negativeBytes bounds each memory of what was found missing: fallback
	// tags, referrer candidates.
	negativeBytes = 4 << 20
)

// Upstream is one mirrored registry.
type Upstream struct {
	Client *upstream.Client
	// TagTTL is how long a tag is served from cache before revalidation.
	TagTTL time.Duration
	// Forward writes pushes through to the upstream as well.
	Forward bool
	// MaxFills bounds the blob fills from this upstream that run at once
	// (config.DefaultMaxFills if 0); the others wait in order.
	MaxFills int
}

// Options configures a Server.
type Options struct {
	Store     cache.Store
	Upstreams []Upstream
	// DefaultUpstream names the upstream for names without ns or prefix.
	DefaultUpstream string
	// Hosted are the repository prefixes ("ci/") ocimirror is the registry for.
	Hosted []string
	// ReadOnly refuses every push and delete.
	ReadOnly bool
	// MaxUploads bounds the upload sessions open at once (4096 if 0);
	// MaxUploadsPerClient bounds those of one client address (64 if 0).
	MaxUploads          int
	MaxUploadsPerClient int
	// UploadIdle discards a session unused for this long (5m if 0).
	UploadIdle time.Duration
	// BodyIdle cuts a request body that sends nothing for this long (30s if 0).
	BodyIdle time.Duration
	// Sync are repositories the mirror keeps warm, and pinned.
	Sync []SyncRule
	// Pins are the images eviction keeps, as clients name them
	// (docker.io/library/alpine:3.20, ghcr.io/org/app@sha256:...).
	Pins []string
	// TagListBytes bounds the upstream tag lists held in memory (32 MiB if 0).
	TagListBytes   int64
	Logger         *slog.Logger
	TracerProvider trace.TracerProvider
	// MeterProvider receives the API's metrics (none if nil).
	MeterProvider metric.MeterProvider
	// Auth authenticates and authorizes every request, and serves the
	// token endpoint (/auth/token); nil: everyone may do everything.
	Auth *auth.Authenticator
	// Clock is the time source (tests); time.Now if nil.
	Clock func() time.Time
	// Cluster, when set, makes this server one replica of several: a
	// blob missed here is read from the digest's owner replica, which
	// alone fills it from the upstream. With a Store that is a
	// cache.SharedBlobs, blobs are read from and put in the shared tier.
	Cluster *cluster.Cluster
}

// upstreamState is one upstream registry as a source of repositories.
type upstreamState struct {
	s         *Server
	client    *upstream.Client
	name      string
	tagTTL    time.Duration
	dockerHub bool
	forward   bool
	// fillSlots bound the fills running at once (MaxFills).
	fillSlots chan struct{}
}

func (u *upstreamState) storeName() string { return u.name }
func (u *upstreamState) logName() string   { return u.name }

// Server is the registry API.
type Server struct {
	store           cache.Store
	upstreams       map[string]*upstreamState
	defaultUpstream *upstreamState
	hosted          *hostedSource
	hostedPrefixes  []string
	readOnly        bool
	log             *slog.Logger
	tracer          trace.Tracer
	metrics         *serverMetrics
	auth            *auth.Authenticator
	// internalSecret authorizes the internal listener's requests (sync).
	internalSecret string
	// shared is the store's shared tier of blobs (nil without one);
	// cluster, the other replicas (nil for a single node).
	shared  cache.SharedBlobs
	cluster *cluster.Cluster
	now     func() time.Time

	// flight coalesces manifest, tag and referrer fetches; fills
	// coalesces blobs.
	flight flight.Group[string, any]
	fills  fills
	// syncRules keep repositories warm (sync.go); stopSync ends them.
	syncRules []syncRule
	stopSync  func()
	syncWG    sync.WaitGroup
	pins      []pin
	// spills are the slots of fills streaming past a full store;
	// fullWarned is when that was last logged (unix nanoseconds).
	spills chan struct{}
	// commits lets one large fill commit at a time.
	commits    chan struct{}
	fullWarned atomic.Int64
	tagLists   *lru.Sized[string, tagList]
	uploads    uploads
	bodyIdle   time.Duration
	// refCaps is each upstream repository's referrers API state;
	// fallbackAbsent remembers when a fallback tag was last found missing;
	// refMisses, which referrer candidates failed their check.
	refCaps        *referrers.Capabilities
	fallbackAbsent *lru.Sized[cache.TagKey, time.Time]
	refMisses      *lru.Sized[refMissKey, refMiss]
	// fallbackLocks serializes ocimirror's own updates of one upstream
	// fallback tag index.
	fallbackLocks keyedMutex

	// ctx is the server's lifetime: fills run under it, detached from the
	// clients that started them.
	ctx    context.Context
	cancel context.CancelFunc
	work   sync.WaitGroup
}

// New builds a Server.
func New(o Options) (*Server, error) {
	if o.Store == nil {
		return nil, errors.New("proxy: no store")
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.TracerProvider == nil {
		o.TracerProvider = noop.NewTracerProvider()
	}
	if o.Clock == nil {
		o.Clock = time.Now
	}
	if o.MeterProvider == nil {
		o.MeterProvider = metricnoop.NewMeterProvider()
	}
	if o.TagListBytes <= 0 {
		o.TagListBytes = defaultTagListBytes
	}
	s := &Server{
		auth:     o.Auth,
		store:    o.Store,
		readOnly: o.ReadOnly,
		log:      o.Logger,
		tracer:   o.TracerProvider.Tracer("github.com/ocimirror/ocimirror/proxy"),
		now:      o.Clock,
		tagLists: lru.New(o.TagListBytes, 0, func(k string, l tagList) int64 {
			n := int64(len(k)) + entryOverhead
			for _, t := range l.tags {
				n += int64(len(t)) + 16
			}
			return n
		}),
		refCaps: referrers.NewCapabilities(time.Hour),
		fallbackAbsent: lru.New(negativeBytes, 0, func(k cache.TagKey, _ time.Time) int64 {
			return int64(len(k.Upstream)+len(k.Repo)+len(k.Tag)) + entryOverhead
		}),
		refMisses: lru.New(negativeBytes, 0, func(k refMissKey, _ refMiss) int64 {
			return int64(len(k.repo.Upstream)+len(k.repo.Repo)+len(k.digest)+len(k.subject)) + entryOverhead
		}),
	}
	s.hosted = &hostedSource{s: s}
	s.shared, _ = o.Store.(cache.SharedBlobs)
	s.cluster = o.Cluster
	if o.Auth != nil {
		o.Auth.SetCanonical(s.CanonicalNames)
	}
	s.upstreams = map[string]*upstreamState{}
	for _, p := range o.Hosted {
		s.hostedPrefixes = append(s.hostedPrefixes, strings.TrimSuffix(p, "/")+"/")
	}
	s.fills.m = map[fillKey]*blobFill{}
	s.spills = make(chan struct{}, maxSpills)
	s.commits = make(chan struct{}, 1)
	s.uploads = newUploads(o.MaxUploads, o.MaxUploadsPerClient, o.UploadIdle)
	s.bodyIdle = o.BodyIdle
	if s.bodyIdle <= 0 {
		s.bodyIdle = defaultBodyIdle
	}
	for _, u := range o.Upstreams {
		name := strings.ToLower(u.Client.Name())
		if _, dup := s.upstreams[name]; dup {
			return nil, fmt.Errorf("proxy: upstream %s configured twice", name)
		}
		ttl := u.TagTTL
		if ttl <= 0 {
			ttl = config.DefaultTagTTL
		}
		maxFills := u.MaxFills
		if maxFills <= 0 {
			maxFills = config.DefaultMaxFills
		}
		s.upstreams[name] = &upstreamState{s: s, client: u.Client, name: name, tagTTL: ttl, dockerHub: name == config.DockerHub,
			forward: u.Forward, fillSlots: make(chan struct{}, maxFills)}
	}
	if o.DefaultUpstream != "" {
		s.defaultUpstream = s.upstreams[strings.ToLower(o.DefaultUpstream)]
		if s.defaultUpstream == nil {
			return nil, fmt.Errorf("proxy: default upstream %s is not configured", o.DefaultUpstream)
		}
	}
	var err error
	if s.metrics, err = newServerMetrics(o.MeterProvider.Meter("github.com/ocimirror/ocimirror/proxy"), s); err != nil {
		return nil, fmt.Errorf("proxy: metrics: %w", err)
	}
	for _, ref := range o.Pins {
		p, err := s.parsePin(ref)
		if err != nil {
			return nil, err
		}
		s.pins = append(s.pins, p)
	}
	for _, r := range o.Sync {
		y, err := s.parseSync(r)
		if err != nil {
			return nil, err
		}
		s.syncRules = append(s.syncRules, y)
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	if len(s.syncRules) > 0 {
		if err := s.startSync(); err != nil {
			s.cancel()
			return nil, err
		}
	}
	go s.expireUploads()
	return s, nil
}

// entryOverhead approximates what a map or LRU entry costs beyond its
// strings.
const entryOverhead = 128

// Shutdown waits for background fills to finish, or cancels them when ctx
// ends first. Call it after the HTTP server has shut down.
func (s *Server) Shutdown(ctx context.Context) error {
	if s.stopSync != nil {
		s.stopSync()
	}
	done := make(chan struct{})
	go func() { s.work.Wait(); close(done) }()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		err = ctx.Err()
	}
	s.cancel()
	<-done
	s.uploads.cancelAll(s.log)
	_ = s.metrics.reg.Unregister()
	return err
}

// Handler returns the HTTP handler of the registry API.
func (s *Server) Handler() http.Handler {
	r := mux.NewRouter().SkipClean(true).UseEncodedPath()
	get := []string{http.MethodGet, http.MethodHead}
	r.Handle("/v2/", s.handle("base", s.base)).Methods(get...)
	r.Handle("/v2", s.handle("base", s.base)).Methods(get...)
	r.Handle("/v2/{name:.+}/manifests/{reference}", s.handle("manifest", s.manifest)).Methods(get...)
	r.Handle("/v2/{name:.+}/manifests/{reference}", s.handle("manifest", s.writing(s.putManifest))).Methods(http.MethodPut)
	r.Handle("/v2/{name:.+}/manifests/{reference}", s.handle("manifest", s.writing(s.deleteManifest))).Methods(http.MethodDelete)
	r.Handle("/v2/{name:.+}/blobs/uploads/", s.handle("upload", s.writing(s.startUpload))).Methods(http.MethodPost)
	r.Handle("/v2/{name:.+}/blobs/uploads/{id}", s.forwardUploads(s.handle("upload", s.uploadStatus))).Methods(get...)
	r.Handle("/v2/{name:.+}/blobs/uploads/{id}", s.forwardUploads(s.handle("upload", s.writing(s.patchUpload)))).Methods(http.MethodPatch)
	r.Handle("/v2/{name:.+}/blobs/uploads/{id}", s.forwardUploads(s.handle("upload", s.writing(s.putUpload)))).Methods(http.MethodPut)
	r.Handle("/v2/{name:.+}/blobs/uploads/{id}", s.forwardUploads(s.handle("upload", s.writing(s.cancelUpload)))).Methods(http.MethodDelete)
	r.Handle("/v2/{name:.+}/blobs/{digest}", s.handle("blob", s.blob)).Methods(get...)
	r.Handle("/v2/{name:.+}/blobs/{digest}", s.handle("blob", s.writing(s.deleteBlob))).Methods(http.MethodDelete)
	r.Handle("/v2/{name:.+}/tags/list", s.handle("tags", s.tags)).Methods(get...)
	r.Handle("/v2/{name:.+}/referrers/{digest}", s.handle("referrers", s.referrers)).Methods(get...)
	if s.auth != nil {
		r.Handle("/auth/token", s.handle("token", func(w http.ResponseWriter, r *http.Request, _ *request) error {
			s.auth.ServeToken(w, r)
			return nil
		})).Methods(http.MethodGet, http.MethodPost)
	}
	r.MethodNotAllowedHandler = s.handle("", s.unsupported)
	r.NotFoundHandler = s.handle("", func(w http.ResponseWriter, r *http.Request, q *request) error {
		return &Error{Code: CodeUnsupported, Status: http.StatusNotFound, Message: "no such endpoint", Detail: map[string]string{"path": r.URL.Path}}
	})
	return r
}

type handlerFunc func(w http.ResponseWriter, r *http.Request, q *request) error

// handle is the edge every request passes: it resolves the route, traces,
// runs the handler, maps its error to an OCI error body, and logs one line.
func (s *Server) handle(op string, h handlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		rw := &responseWriter{ResponseWriter: w}
		rw.Header().Set(HeaderAPIVersion, "registry/2.0")
		// No answer of a registry is a page to render: never sniff one.
		rw.Header().Set("X-Content-Type-Options", "nosniff")
		ctx, span := s.tracer.Start(r.Context(), r.Method+" "+op, trace.WithSpanKind(trace.SpanKindServer),
			trace.WithAttributes(attribute.String("http.request.method", r.Method), attribute.String("url.path", r.URL.Path)))
		r = r.WithContext(ctx)
		q := &request{op: op}
		var err error
		defer func() {
			if p := recover(); p != nil {
				err = fmt.Errorf("panic: %v\n%s", p, debug.Stack())
				if !rw.wroteHeader {
					s.writeError(rw, r, q, &Error{Code: CodeUnknown, Err: err})
				}
			}
			s.finish(r, rw, q, span, start, err)
			if _, abort := errors.AsType[errAbort](err); abort {
				panic(http.ErrAbortHandler)
			}
		}()
		if vars := mux.Vars(r); vars["name"] != "" {
			err = s.resolve(r, q, vars["name"])
		}
		if err == nil && op == "blob" && s.cluster != nil && (r.Method == http.MethodGet || r.Method == http.MethodHead) {
			// Another replica asking for a blob as its owner: the
			// cluster secret stands for the client's credentials,
			// checked by that replica.
			q.peer, q.fromPeer, err = s.cluster.Peer(r)
			switch {
			case errors.Is(err, cluster.ErrSelf):
				err = errPeerCycle // its own name: it asks the next
			case err != nil:
				err = &Error{Code: CodeUnauthorized, Message: "wrong cluster secret", Err: err}
			}
		}
		if err == nil && op != "token" && !q.fromPeer {
			err = s.authorize(r, q)
		}
		if err == nil {
			if q.ns != "" {
				rw.Header().Set(HeaderNamespace, q.ns)
			}
			err = h(rw, r, q)
		}
		if err != nil && !rw.wroteHeader {
			s.writeError(rw, r, q, err)
		}
	})
}

// finish records the request on its span and logs it.
func (s *Server) finish(r *http.Request, rw *responseWriter, q *request, span trace.Span, start time.Time, err error) {
	status := rw.status
	if status == 0 {
		status = http.StatusOK
	}
	elapsed := time.Since(start)
	s.metrics.record(r.Context(), r, q, status, rw.bytes, elapsed.Seconds(), err)
	span.SetAttributes(attribute.Int("http.response.status_code", status))
	if q.src != nil {
		span.SetAttributes(attribute.String("ocimirror.upstream", q.src.logName()), attribute.String("ocimirror.repo", q.repo))
	}
	if q.cache != "" {
		span.SetAttributes(attribute.String("ocimirror.cache", q.cache))
	}
	level := slog.LevelInfo
	if err != nil {
		span.RecordError(err)
		if status >= 500 || rw.wroteHeader && status < 300 {
			span.SetStatus(codes.Error, err.Error())
			level = slog.LevelWarn
		}
	}
	span.End()
	if !s.log.Enabled(r.Context(), level) {
		return
	}
	attrs := make([]slog.Attr, 0, 12)
	attrs = append(attrs,
		slog.String("method", r.Method),
		slog.String("path", r.URL.Path),
		slog.Int("status", status),
		slog.Int64("bytes", rw.bytes),
		slog.Duration("duration", elapsed))
	if q.src != nil {
		attrs = append(attrs, slog.String("upstream", q.src.logName()), slog.String("repo", q.repo))
	}
	if q.ns != "" {
		attrs = append(attrs, slog.String("ns", q.ns))
	}
	if q.dgst != "" {
		attrs = append(attrs, slog.String("digest", q.dgst.String()))
	} else if q.ref != "" {
		attrs = append(attrs, slog.String("tag", q.ref))
	}
	if q.cache != "" {
		attrs = append(attrs, slog.String("cache", q.cache))
	}
	if err != nil {
		attrs = append(attrs, slog.String("err", err.Error()))
	}
	s.log.LogAttrs(r.Context(), level, "request", attrs...)
}

// writeError answers err in the OCI error format. Upstream failures are
// mapped here, once: not found and denied become the operation's unknown
// code (an upstream's 401 is never forwarded as a challenge the client
// cannot answer), 429 passes on with its Retry-After, the rest is 502/504.
func (s *Server) writeError(w http.ResponseWriter, r *http.Request, q *request, err error) {
	e := s.apiError(q, err)
	h := w.Header()
	for k, v := range e.Header {
		h[k] = v
	}
	body := errorBody(e)
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	h.Del("Docker-Content-Digest")
	w.WriteHeader(e.status())
	if r.Method != http.MethodHead {
		_, _ = w.Write(body)
	}
}

// errorBody is e in the OCI error format: {"errors":[{code, message, detail}]}.
func errorBody(e *Error) []byte {
	body, _ := json.Marshal(struct {
		Errors []any `json:"errors"`
	}{[]any{struct {
		Code    Code   `json:"code"`
		Message string `json:"message"`
		Detail  any    `json:"detail,omitempty"`
	}{e.Code, e.message(), e.Detail}}})
	return body
}

func (s *Server) apiError(q *request, err error) *Error {
	if e, ok := errors.AsType[*Error](err); ok {
		return e
	}
	if e, ok := errors.AsType[*auth.Error](err); ok {
		if e.Status == http.StatusForbidden {
			return &Error{Code: CodeDenied, Message: e.Message}
		}
		ae := &Error{Code: CodeUnauthorized, Message: e.Message, Header: http.Header{}}
		if e.Challenge != "" {
			ae.Header.Set("WWW-Authenticate", e.Challenge)
		}
		return ae
	}
	detail := map[string]string{"name": q.name}
	unknown := ErrNameUnknown
	switch q.op {
	case "manifest":
		detail, unknown = map[string]string{"name": q.name, "reference": q.ref}, ErrManifestUnknown
	case "blob", "upload":
		detail, unknown = map[string]string{"digest": q.ref}, ErrBlobUnknown
	}
	if errors.Is(err, upstream.ErrOffline) {
		// Not in the cache, and the upstream is not asked: a plain miss,
		// so that containerd tries its next host.
		detail["offline"] = "the mirror is offline for " + q.upName() + ": it answers from its cache only"
		return unknown(detail)
	}
	switch {
	case errors.Is(err, upstream.ErrNotFound), errors.Is(err, upstream.ErrDenied):
		return unknown(detail)
	case errors.Is(err, cache.ErrNotFound):
		// Content deleted between a check and its read.
		return unknown(detail)
	case errors.Is(err, upstream.ErrTooManyRequests):
		e := &Error{Code: CodeTooManyRequests, Header: http.Header{}}
		if se, ok := errors.AsType[*upstream.StatusError](err); ok {
			for k, v := range se.Header {
				if lk := strings.ToLower(k); lk == "retry-after" || strings.HasPrefix(lk, "ratelimit-") || strings.HasPrefix(lk, "x-ratelimit-") || lk == "docker-ratelimit-source" {
					e.Header[k] = v
				}
			}
		}
		return e
	case errors.Is(err, cache.ErrSharedDown):
		// A push the cluster's bucket must take first: retry later.
		s.log.Warn("shared tier down: a write refused", "err", err, "op", q.op)
		return &Error{Code: CodeUnavailable, Status: http.StatusServiceUnavailable, Message: "the registry's shared storage does not answer; retry later",
			Header: http.Header{"Retry-After": {"5"}}}
	case errors.Is(err, context.DeadlineExceeded):
		return &Error{Code: CodeUnavailable, Status: http.StatusGatewayTimeout, Message: "upstream registry timed out"}
	case errors.Is(err, upstream.ErrUnavailable), errors.Is(err, upstream.ErrInvalidResponse),
		errors.Is(err, errDigestMismatch), errors.Is(err, errSizeMismatch):
		return &Error{Code: CodeUnavailable, Detail: map[string]string{"upstream": q.upName()}}
	case errors.As(err, new(*upstream.StatusError)) && isClientError(err):
		// A forwarded push the upstream refused: its answer is the answer.
		return relayedError(err)
	case errors.Is(err, cache.ErrFull):
		// A push (data) the disk has no room for: 507, and the log says so.
		s.log.Error("store full: a write failed", "err", err, "op", q.op)
		return &Error{Code: CodeUnavailable, Status: http.StatusInsufficientStorage, Message: "the registry's disk is full"}
	case errors.Is(err, context.Canceled):
		// The client went away; nobody reads this answer.
		return &Error{Code: CodeUnknown, Status: 499, Message: "request cancelled"}
	}
	s.log.Error("internal error", "err", err, "op", q.op)
	return &Error{Code: CodeUnknown}
}

func isClientError(err error) bool {
	se, _ := errors.AsType[*upstream.StatusError](err)
	return se.Status >= 400 && se.Status < 500
}

// relayedError passes on an upstream's 4xx with its first OCI error code.
func relayedError(err error) *Error {
	se, _ := errors.AsType[*upstream.StatusError](err)
	var body struct {
		Errors []struct {
			Code    Code   `json:"code"`
			Message string `json:"message"`
		} `json:"errors"`
	}
	e := &Error{Code: CodeUnknown, Status: se.Status, Message: "the upstream registry refused the request", Err: err}
	if json.Unmarshal(se.Body, &body) == nil && len(body.Errors) > 0 && body.Errors[0].Code != "" {
		e.Code, e.Message = body.Errors[0].Code, body.Errors[0].Message
	}
	return e
}

func (q *request) upName() string {
	if q.up == nil {
		return ""
	}
	return q.up.name
}

func (s *Server) base(w http.ResponseWriter, r *http.Request, _ *request) error {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", "2")
	if r.Method != http.MethodHead {
		_, _ = w.Write([]byte("{}"))
	}
	return nil
}

func (s *Server) unsupported(http.ResponseWriter, *http.Request, *request) error {
	return ErrUnsupported(nil)
}

// writing guards a handler that changes content: a read-only mirror
// refuses it.
func (s *Server) writing(h handlerFunc) handlerFunc {
	return func(w http.ResponseWriter, r *http.Request, q *request) error {
		if s.readOnly {
			return &Error{Code: CodeUnsupported, Message: "this mirror is read-only"}
		}
		return h(w, r, q)
	}
}

// detached returns a context for work that outlives the client's request:
// it keeps the request's trace, ends with the server, and has a deadline.
func (s *Server) detached(ctx context.Context, timeout time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(trace.ContextWithSpanContext(s.ctx, trace.SpanContextFromContext(ctx)), timeout)
}

// flightDo runs fn once for concurrent callers of key, detached from them:
// a client that hangs up neither cancels the work nor loses it for the
// others. Each caller stops waiting when its own context ends.
func (s *Server) flightDo(ctx context.Context, key string, fn func(context.Context) (any, error)) (any, error, bool) {
	return s.flight.Do(ctx, key, s.work4(ctx), s.tracked(fn))
}

// flightAbandonable is flightDo for work worth doing only while a client
// waits for it: it is cancelled when the last one hangs up.
func (s *Server) flightAbandonable(ctx context.Context, key string, fn func(context.Context) (any, error)) (any, error, bool) {
	return s.flight.Abandonable(ctx, key, s.work4(ctx), s.tracked(fn))
}

func (s *Server) work4(ctx context.Context) flight.Work {
	return func() (context.Context, context.CancelFunc) { return s.detached(ctx, upstreamFetchTimeout) }
}

// tracked counts fn as background work that Shutdown waits for.
func (s *Server) tracked(fn func(context.Context) (any, error)) func(context.Context) (any, error) {
	return func(ctx context.Context) (any, error) {
		s.work.Add(1)
		defer s.work.Done()
		return fn(ctx)
	}
}

// keyedMutex is a mutex per key, held only while in use.
type keyedMutex struct {
	mu sync.Mutex
	m  map[string]*keyedEntry
}

type keyedEntry struct {
	sync.Mutex
	users int
}

// lock locks key and returns its unlock.
func (k *keyedMutex) lock(key string) func() {
	k.mu.Lock()
	if k.m == nil {
		k.m = map[string]*keyedEntry{}
	}
	e := k.m[key]
	if e == nil {
		e = &keyedEntry{}
		k.m[key] = e
	}
	e.users++
	k.mu.Unlock()
	e.Lock()
	return func() {
		e.Unlock()
		k.mu.Lock()
		if e.users--; e.users == 0 {
			delete(k.m, key)
		}
		k.mu.Unlock()
	}
}

// responseWriter records the status and byte count for the log line.
type responseWriter struct {
	http.ResponseWriter
	status      int
	bytes       int64
	wroteHeader bool
}

func (w *responseWriter) WriteHeader(code int) {
	if !w.wroteHeader {
		w.status, w.wroteHeader = code, true
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *responseWriter) Write(p []byte) (int, error) {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	n, err := w.ResponseWriter.Write(p)
	w.bytes += int64(n)
	return n, err
}

// ReadFrom passes a copy on to net/http's own, which sends an *os.File
// with sendfile.
func (w *responseWriter) ReadFrom(r io.Reader) (int64, error) {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	var n int64
	var err error
	if rf, ok := w.ResponseWriter.(io.ReaderFrom); ok {
		n, err = rf.ReadFrom(r)
	} else {
		n, err = io.Copy(struct{ io.Writer }{w.ResponseWriter}, r)
	}
	w.bytes += n
	return n, err
}

// Unwrap lets http.ResponseController reach the connection.
func (w *responseWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
