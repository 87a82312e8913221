// Package upstream is ocimirror's client for the registries it mirrors:
// token and basic authentication, retries with backoff for idempotent
// requests, rate-limit backoff, redirects that never carry credentials to
// another host, and no transparent decompression.
package upstream

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/ocimirror/ocimirror/internal/idle"
)

// Docker's media types, which image-spec does not define.
const (
	MediaTypeDockerManifest     = "application/vnd.docker.distribution.manifest.v2+json"
	MediaTypeDockerManifestList = "application/vnd.docker.distribution.manifest.list.v2+json"
)

// ManifestAccept is sent with every manifest request. Registries answer a
// tag with a different manifest (or 404) when the list types are missing, so
// the full list is always sent and a client's narrower Accept is applied by
// the proxy, never passed upstream.
var ManifestAccept = strings.Join([]string{
	v1.MediaTypeImageIndex,
	v1.MediaTypeImageManifest,
	MediaTypeDockerManifestList,
	MediaTypeDockerManifest,
	"*/*",
}, ", ")

// maxRateLimitWait caps how long a 429 keeps requests from the upstream.
const maxRateLimitWait = 10 * time.Minute

// Options configures a Client.
type Options struct {
	// Name is the registry host as clients write it (docker.io).
	Name string
	// URL is the registry's base URL (https://registry-1.docker.io).
	URL string
	// Credentials are presented to the upstream and its token server.
	Credentials Credentials
	// CAFile is a PEM bundle trusted besides the system roots.
	CAFile string
	// InsecureSkipVerify accepts any TLS certificate.
	InsecureSkipVerify bool
	// Transport replaces the default transport (tests).
	Transport http.RoundTripper
	// Logger receives retries and backoffs.
	Logger *slog.Logger
	// TracerProvider traces every upstream call (none if nil).
	TracerProvider trace.TracerProvider
	// MeterProvider counts every upstream call (none if nil).
	MeterProvider metric.MeterProvider
	// UserAgent is sent with every request.
	UserAgent string
	// MaxAttempts bounds tries of an idempotent request (3 if 0).
	MaxAttempts int
	// RetryBackoff is the first retry's delay, doubled each time (250ms if 0).
	RetryBackoff time.Duration
	// IdleTimeout cuts a response body that delivers nothing for this long (60s if 0).
	IdleTimeout time.Duration
	// MaxTokens bounds the scopes whose bearer tokens are cached, least
	// recently used dropped first (4096 if 0).
	MaxTokens int
	// Offline sends nothing: every call fails with ErrOffline.
	Offline bool
	// ResponseTimeout bounds the wait for an answer's headers, and the
	// connection (60s if 0). A request that times out is not retried: an
	// upstream that accepts and never answers would only make it wait
	// longer, and the circuit breaker learns sooner.
	ResponseTimeout time.Duration
	// BreakerFailures is how many connection failures or timeouts in a
	// row mark the upstream down (DefaultBreakerFailures if 0; -1: never).
	// Down, calls fail at once with ErrDown, but for one probe at a time
	// after BreakerMinBackoff, doubling up to BreakerMaxBackoff.
	BreakerFailures   int
	BreakerMinBackoff time.Duration
	BreakerMaxBackoff time.Duration
}

// Client talks to one upstream registry. It is safe for concurrent use.
type Client struct {
	name        string
	base        string
	baseHost    string
	hc          *http.Client
	auth        *authenticator
	log         *slog.Logger
	tracer      trace.Tracer
	userAgent   string
	maxAttempts int
	backoff     time.Duration
	idle        time.Duration
	// limitedUntil is when a 429's Retry-After ends (unix nanoseconds).
	limitedUntil atomic.Int64
	offline      bool
	breaker      *breaker
}

// New builds a Client.
func New(o Options) (*Client, error) {
	base, err := url.Parse(strings.TrimSuffix(o.URL, "/"))
	if err != nil || base.Host == "" {
		return nil, fmt.Errorf("upstream %s: bad URL %q", o.Name, o.URL)
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.TracerProvider == nil {
		o.TracerProvider = noop.NewTracerProvider()
	}
	if o.MeterProvider == nil {
		o.MeterProvider = metricnoop.NewMeterProvider()
	}
	if o.UserAgent == "" {
		o.UserAgent = "ocimirror"
	}
	if o.MaxAttempts <= 0 {
		o.MaxAttempts = 3
	}
	if o.RetryBackoff <= 0 {
		o.RetryBackoff = 250 * time.Millisecond
	}
	if o.IdleTimeout <= 0 {
		o.IdleTimeout = 60 * time.Second
	}
	if o.ResponseTimeout <= 0 {
		o.ResponseTimeout = 60 * time.Second
	}
	if o.BreakerFailures == 0 {
		o.BreakerFailures = DefaultBreakerFailures
	}
	if o.BreakerMinBackoff <= 0 {
		o.BreakerMinBackoff = DefaultBreakerMinBackoff
	}
	if o.BreakerMaxBackoff < o.BreakerMinBackoff {
		o.BreakerMaxBackoff = max(DefaultBreakerMaxBackoff, o.BreakerMinBackoff)
	}
	rt := o.Transport
	if rt == nil {
		t, err := newTransport(o)
		if err != nil {
			return nil, err
		}
		rt = t
	}
	hc := &http.Client{CheckRedirect: checkRedirect}
	c := &Client{
		name:        o.Name,
		base:        base.String(),
		baseHost:    base.Host,
		hc:          hc,
		log:         o.Logger.With("upstream", o.Name),
		tracer:      o.TracerProvider.Tracer("github.com/ocimirror/ocimirror/upstream"),
		userAgent:   o.UserAgent,
		maxAttempts: o.MaxAttempts,
		backoff:     o.RetryBackoff,
		idle:        o.IdleTimeout,
		offline:     o.Offline,
		breaker: &breaker{name: o.Name, log: o.Logger, threshold: max(o.BreakerFailures, 0),
			min: o.BreakerMinBackoff, max: o.BreakerMaxBackoff},
	}
	m, err := newClientMetrics(o.MeterProvider.Meter("github.com/ocimirror/ocimirror/upstream"), c)
	if err != nil {
		return nil, fmt.Errorf("upstream %s: metrics: %w", o.Name, err)
	}
	hc.Transport = meteredTransport{next: rt, m: m}
	c.auth, err = newAuthenticator(base.Host, o.Credentials, hc, o.UserAgent, o.MaxTokens)
	if err != nil {
		return nil, fmt.Errorf("upstream %s: %w", o.Name, err)
	}
	return c, nil
}

func newTransport(o Options) (*http.Transport, error) {
	tc := &tls.Config{InsecureSkipVerify: o.InsecureSkipVerify, MinVersion: tls.VersionTLS12}
	if o.CAFile != "" {
		pem, err := os.ReadFile(o.CAFile)
		if err != nil {
			return nil, fmt.Errorf("upstream %s: CA file: %w", o.Name, err)
		}
		pool, err := x509.SystemCertPool()
		if err != nil {
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("upstream %s: CA file %s holds no PEM certificate", o.Name, o.CAFile)
		}
		tc.RootCAs = pool
	}
	return &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          256,
		MaxIdleConnsPerHost:   64,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: o.ResponseTimeout,
		ExpectContinueTimeout: time.Second,
		// Blobs are content-addressed: a gzip layer must arrive as stored,
		// never re-encoded or decoded on the way.
		DisableCompression: true,
		TLSClientConfig:    tc,
	}, nil
}

// checkRedirect follows up to 10 redirects and drops credentials whenever
// the target host differs from the upstream's (Docker Hub sends blobs to a
// CDN with a signed URL).
func checkRedirect(req *http.Request, via []*http.Request) error {
	if len(via) >= 10 {
		return fmt.Errorf("%w: more than 10 redirects", ErrInvalidResponse)
	}
	if req.URL.Host != via[0].URL.Host {
		req.Header.Del("Authorization")
		req.Header.Del("Cookie")
	}
	return nil
}

// Name is the upstream's registry host as clients write it.
func (c *Client) Name() string { return c.name }

// Request is one call to the registry API under /v2/<Repo>/.
type Request struct {
	Method string
	Repo   string
	// Path follows /v2/<repo>/, for example "manifests/v1" or "tags/list".
	Path string
	// URL, when set, is used instead of Repo and Path: an upload Location
	// the upstream returned, absolute or relative to its base URL.
	URL    string
	Query  url.Values
	Header http.Header
	// Body opens the request body; it is called again for a retry after
	// authentication. ContentLength is its length.
	Body          func() io.Reader
	ContentLength int64
	// Push asks for a token with push access to Repo.
	Push bool
}

// Do sends r with authentication and retries. A 2xx or 3xx answer is
// returned with its body open; anything else is a *StatusError (or a
// transport error wrapped in ErrUnavailable), with the body closed.
func (c *Client) Do(ctx context.Context, r Request) (*http.Response, error) {
	if c.offline {
		return nil, fmt.Errorf("%w: %s %s/%s not sent", ErrOffline, r.Method, r.Repo, r.Path)
	}
	probe, err := c.breaker.allow()
	if err != nil {
		return nil, fmt.Errorf("%w: %s %s/%s not sent", err, r.Method, r.Repo, r.Path)
	}
	resp, err := c.send(ctx, r)
	c.breaker.done(probe, err)
	return resp, err
}

// State says whether the upstream is offline, or marked down.
func (c *Client) State() State {
	s := c.breaker.state()
	s.Offline = c.offline
	return s
}

func (c *Client) send(ctx context.Context, r Request) (*http.Response, error) {
	if wait := time.Until(time.Unix(0, c.limitedUntil.Load())); wait > 0 {
		return nil, &StatusError{Method: r.Method, URL: r.Path, Status: http.StatusTooManyRequests, RetryAfter: wait,
			Header: http.Header{"Retry-After": {strconv.Itoa(int(wait.Seconds() + 0.999))}}}
	}
	u, err := c.requestURL(r)
	if err != nil {
		return nil, err
	}
	ctx, span := c.tracer.Start(ctx, "upstream "+r.Method, trace.WithSpanKind(trace.SpanKindClient),
		trace.WithAttributes(
			attribute.String("ocimirror.upstream", c.name),
			attribute.String("http.request.method", r.Method),
			attribute.String("url.full", u)))
	defer span.End()
	resp, err := c.do(ctx, r, u)
	if err != nil {
		span.RecordError(err)
		span.SetStatus(codes.Error, err.Error())
		return nil, err
	}
	span.SetAttributes(attribute.Int("http.response.status_code", resp.StatusCode))
	return resp, nil
}

// requestURL is the URL of r: the API path of its repository, or the
// Location it carries, resolved against the base URL, with r.Query added.
func (c *Client) requestURL(r Request) (string, error) {
	if r.URL == "" {
		u := c.base + "/v2/" + r.Repo + "/" + r.Path
		if len(r.Query) > 0 {
			u += "?" + r.Query.Encode()
		}
		return u, nil
	}
	base, _ := url.Parse(c.base + "/")
	loc, err := base.Parse(r.URL)
	if err != nil {
		return "", fmt.Errorf("%w: bad location %q", ErrInvalidResponse, r.URL)
	}
	if len(r.Query) > 0 {
		q := loc.Query()
		for k, v := range r.Query {
			q[k] = v
		}
		loc.RawQuery = q.Encode()
	}
	return loc.String(), nil
}

func (c *Client) do(ctx context.Context, r Request, u string) (*http.Response, error) {
	scope := "repository:" + r.Repo + ":pull"
	if r.Push {
		scope += ",push"
	}
	idempotent := r.Method == http.MethodGet || r.Method == http.MethodHead
	reauthed := false
	for attempt := 1; ; attempt++ {
		reqCtx, cancel := context.WithCancel(ctx)
		var body io.Reader
		if r.Body != nil {
			body = r.Body()
		}
		req, err := http.NewRequestWithContext(reqCtx, r.Method, u, body)
		if err != nil {
			cancel()
			return nil, err
		}
		if r.Body != nil {
			req.ContentLength = r.ContentLength
			if r.ContentLength == 0 {
				req.Body = http.NoBody
			}
		}
		for k, v := range r.Header {
			req.Header[k] = v
		}
		req.Header.Set("User-Agent", c.userAgent)
		// Credentials go only to the upstream's own host, whatever URL an
		// upload Location names.
		if req.URL.Host == c.baseHost {
			if err := c.auth.authorize(ctx, req, scope); err != nil {
				cancel()
				return nil, err
			}
		}
		resp, err := c.hc.Do(req)
		if err != nil {
			cancel()
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			if ne, ok := errors.AsType[net.Error](err); ok && ne.Timeout() {
				return nil, fmt.Errorf("%w: %s %s: no answer: %v", ErrUnavailable, r.Method, u, err)
			}
			if idempotent && attempt < c.maxAttempts {
				c.log.Debug("upstream request failed, retrying", "url", u, "attempt", attempt, "err", err)
				if err := c.sleep(ctx, attempt); err != nil {
					return nil, err
				}
				continue
			}
			return nil, fmt.Errorf("%w: %s %s: %v", ErrUnavailable, r.Method, u, err)
		}
		switch code := resp.StatusCode; {
		case code < 400:
			resp.Body = idle.Body(resp.Body, c.idle, cancel)
			return resp, nil
		case code == http.StatusUnauthorized && !reauthed:
			retry, err := c.auth.handleChallenge(ctx, resp, scope)
			drain(resp)
			cancel()
			if err != nil {
				return nil, err
			}
			if retry {
				reauthed = true
				attempt--
				continue
			}
			return nil, &StatusError{Method: r.Method, URL: u, Status: code, Header: resp.Header}
		case code >= 500 && idempotent && attempt < c.maxAttempts:
			drain(resp)
			cancel()
			c.log.Debug("upstream answered 5xx, retrying", "url", u, "status", code, "attempt", attempt)
			if err := c.sleep(ctx, attempt); err != nil {
				return nil, err
			}
			continue
		default:
			se := &StatusError{Method: r.Method, URL: u, Status: code, Header: resp.Header}
			se.Body, _ = io.ReadAll(io.LimitReader(resp.Body, 4096))
			drain(resp)
			cancel()
			if code == http.StatusTooManyRequests {
				se.RetryAfter = retryAfter(resp.Header)
				if se.RetryAfter > 0 {
					until := time.Now().Add(min(se.RetryAfter, maxRateLimitWait))
					c.limitedUntil.Store(until.UnixNano())
				}
				c.log.Warn("upstream rate limit", "retry_after", se.RetryAfter)
			}
			return nil, se
		}
	}
}

// sleep waits before retry number attempt: backoff doubled each time, with
// jitter, at most 5 s.
func (c *Client) sleep(ctx context.Context, attempt int) error {
	d := min(c.backoff<<(attempt-1), 5*time.Second)
	d = d/2 + rand.N(d/2+1)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

func drain(resp *http.Response) {
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
}

// retryAfter reads Retry-After as seconds or an HTTP date.
func retryAfter(h http.Header) time.Duration {
	v := h.Get("Retry-After")
	if v == "" {
		return 0
	}
	if s, err := strconv.Atoi(v); err == nil && s >= 0 {
		return time.Duration(s) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		return max(time.Until(t), 0)
	}
	return 0
}

// Manifest fetches (GET) or checks (HEAD) a manifest by tag or digest with
// the full Accept list.
func (c *Client) Manifest(ctx context.Context, method, repo, ref string) (*http.Response, error) {
	return c.Do(ctx, Request{Method: method, Repo: repo, Path: "manifests/" + ref,
		Header: http.Header{"Accept": {ManifestAccept}}})
}

// Blob fetches (GET) or checks (HEAD) a blob. With offset > 0 it asks for
// the rest from offset; when the size is known (size > 0) the range is
// closed, which registries that only parse "bytes=a-b" understand too.
func (c *Client) Blob(ctx context.Context, method, repo string, d digest.Digest, offset, size int64) (*http.Response, error) {
	r := Request{Method: method, Repo: repo, Path: "blobs/" + d.String()}
	if offset > 0 {
		rng := "bytes=" + strconv.FormatInt(offset, 10) + "-"
		if size > 0 {
			rng += strconv.FormatInt(size-1, 10)
		}
		r.Header = http.Header{"Range": {rng}}
	}
	return c.Do(ctx, r)
}

// PutManifest writes a manifest's exact bytes under ref (a tag or its
// digest) and returns the upstream's response header (OCI-Subject tells
// whether it has the referrers API).
func (c *Client) PutManifest(ctx context.Context, repo, ref, mediaType string, data []byte) (http.Header, error) {
	resp, err := c.Do(ctx, Request{Method: http.MethodPut, Repo: repo, Path: "manifests/" + ref, Push: true,
		Header:        http.Header{"Content-Type": {mediaType}},
		Body:          func() io.Reader { return bytes.NewReader(data) },
		ContentLength: int64(len(data))})
	if err != nil {
		return nil, err
	}
	drain(resp)
	return resp.Header, nil
}

// PushBlob uploads a blob unless the repository has it already: POST an
// upload, then PUT the bytes (open is called for each attempt).
func (c *Client) PushBlob(ctx context.Context, repo string, d digest.Digest, size int64, open func() io.Reader) error {
	if resp, err := c.Do(ctx, Request{Method: http.MethodHead, Repo: repo, Path: "blobs/" + d.String(), Push: true}); err == nil {
		resp.Body.Close()
		return nil
	} else if !errors.Is(err, ErrNotFound) {
		return err
	}
	resp, err := c.Do(ctx, Request{Method: http.MethodPost, Repo: repo, Path: "blobs/uploads/", Push: true,
		Body: func() io.Reader { return http.NoBody }})
	if err != nil {
		return err
	}
	drain(resp)
	loc := resp.Header.Get("Location")
	if resp.StatusCode != http.StatusAccepted || loc == "" {
		return fmt.Errorf("%w: upload start answered %d, location %q", ErrInvalidResponse, resp.StatusCode, loc)
	}
	resp, err = c.Do(ctx, Request{Method: http.MethodPut, Repo: repo, URL: loc, Push: true,
		Query:         url.Values{"digest": {d.String()}},
		Header:        http.Header{"Content-Type": {"application/octet-stream"}},
		Body:          open,
		ContentLength: size})
	if err != nil {
		return err
	}
	drain(resp)
	return nil
}

// Delete sends DELETE for a path under the repository (manifests/<ref> or
// blobs/<digest>).
func (c *Client) Delete(ctx context.Context, repo, path string) error {
	resp, err := c.Do(ctx, Request{Method: http.MethodDelete, Repo: repo, Path: path, Push: true})
	if err != nil {
		return err
	}
	drain(resp)
	return nil
}

// ReadLimited reads a metadata body of at most 4 MiB and closes it.
func ReadLimited(resp *http.Response) ([]byte, error) {
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxMetadata+1))
	if err != nil {
		return nil, fmt.Errorf("%w: reading body: %v", ErrUnavailable, err)
	}
	if len(b) > maxMetadata {
		return nil, fmt.Errorf("%w: body larger than %d bytes", ErrInvalidResponse, maxMetadata)
	}
	return b, nil
}
