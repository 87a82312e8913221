package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime/debug"
	"sort"
	"strings"
	"time"

	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/ocimirror/ocimirror/admin"
	"github.com/ocimirror/ocimirror/auth"
	"github.com/ocimirror/ocimirror/bundle"
	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/cache/s3"
	"github.com/ocimirror/ocimirror/cache/tiered"
	"github.com/ocimirror/ocimirror/cluster"
	"github.com/ocimirror/ocimirror/config"
	"github.com/ocimirror/ocimirror/proxy"
	"github.com/ocimirror/ocimirror/upstream"
)

const serveUsage = `Usage: ocimirror serve [flags]

Runs the mirror. With no flags it listens on :5000, keeps its data in
./ocimirror-data, and mirrors docker.io (the default upstream), ghcr.io,
quay.io and registry.k8s.io. Flags override the config file.

Flags:
`

func runServe(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		configFile = fs.String("config", "", "YAML configuration `file`")
		listen     = fs.String("listen", "", "`address` to serve the registry API on (default \":5000\")")
		data       = fs.String("data", "", "`directory` of the cache (default \"./ocimirror-data\")")
		maxSize    = fs.String("max-size", "", "bound the cache's disk use to `SIZE` (such as 500GiB); least recently used cached content is evicted")
		defaultUp  = fs.String("default-upstream", "", "`name` of the upstream for requests without ns or host prefix (default \"docker.io\")")
		logFormat  = fs.String("log-format", "", "log `format`: text or json (default \"text\")")
		logLevel   = fs.String("log-level", "", "log `level`: debug, info, warn or error (default \"info\")")
		readOnly   = fs.Bool("read-only", false, "refuse every push and delete (405)")
		offline    = fs.Bool("offline", false, "send nothing to any upstream: answer from the cache only")
		adminAddr  = fs.String("admin-listen", "", "`address` of the admin listener (health, readiness, metrics, admin commands), or off (default \"127.0.0.1:5001\")")
		ups        upstreamFlags
		hosted     listFlag
		self       = fs.String("cluster-self", "", "this replica's registry `URL` as the other replicas reach it (cluster.self), e.g. http://$(POD_IP):5000")
	)
	fs.Var(&hosted, "hosted", "serve repositories under `PREFIX` (such as ci/) as ocimirror's own, with pushes (repeatable)")
	fs.Var(&ups, "upstream", "add or replace an upstream as `NAME=URL` (repeatable), e.g. 127.0.0.1:5002=http://127.0.0.1:5002")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), serveUsage)
		fs.PrintDefaults()
	}
	if code, done := parseFlags(fs, args, stdout); done {
		return code
	}
	cfg, err := loadConfig(*configFile, *listen, *data, *defaultUp, *logFormat, *logLevel, *self, ups)
	if err == nil && (len(hosted) > 0 || *readOnly || *maxSize != "" || *offline || *adminAddr != "") {
		cfg.Hosted = append(cfg.Hosted, hosted...)
		cfg.ReadOnly = cfg.ReadOnly || *readOnly
		cfg.Offline = cfg.Offline || *offline
		if *adminAddr != "" {
			cfg.Admin.Listen = *adminAddr
		}
		if *maxSize != "" {
			err = cfg.Storage.MaxSize.UnmarshalText([]byte(*maxSize))
		}
		if err == nil {
			err = cfg.Validate() // a bad --max-size is named as storage.maxSize
		}
	}
	if err != nil {
		fmt.Fprintf(stderr, "ocimirror: %v\n", err)
		return 1
	}
	logger := newLogger(cfg.Log, stderr)
	if err := serve(ctx, cfg, logger); err != nil {
		logger.Error("ocimirror stopped", "err", err)
		return 1
	}
	return 0
}

func loadConfig(file, listen, data, defaultUp, logFormat, logLevel, clusterSelf string, ups upstreamFlags) (config.Config, error) {
	cfg := config.Default()
	if file != "" {
		var err error
		if cfg, err = config.LoadUnchecked(file); err != nil {
			return cfg, err
		}
	}
	if clusterSelf != "" {
		if cfg.Cluster == nil {
			return cfg, errors.New("--cluster-self: the configuration has no cluster section")
		}
		cfg.Cluster.Self = clusterSelf
	}
	if listen != "" {
		cfg.Listen = listen
	}
	if data != "" {
		cfg.Storage.Path = data
	}
	for _, u := range ups {
		cfg.SetUpstream(u[0], u[1])
	}
	if defaultUp != "" {
		cfg.DefaultUpstream = defaultUp
	}
	if logFormat != "" {
		if err := cfg.Log.Format.UnmarshalText([]byte(logFormat)); err != nil {
			return cfg, fmt.Errorf("--log-format: %w", err)
		}
	}
	if logLevel != "" {
		if err := cfg.Log.Level.UnmarshalText([]byte(logLevel)); err != nil {
			return cfg, fmt.Errorf("--log-level: %w", err)
		}
	}
	if err := cfg.Validate(); err != nil {
		if file != "" {
			return cfg, fmt.Errorf("config %s: %w", file, err)
		}
		return cfg, err
	}
	return cfg, nil
}

func newLogger(c config.Log, w io.Writer) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(c.Level))
	opts := &slog.HandlerOptions{Level: level}
	if c.Format == config.LogJSON {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// serve runs the mirror until ctx ends, then shuts down gracefully:
// in-flight requests and fills finish (within the shutdown timeout) and the
// store is closed.
// defaultMemoryLimit is the Go runtime's soft memory limit unless
// GOMEMLIMIT says otherwise: with the default caches full, it keeps the
// process's anonymous memory under 128 MiB whatever the store holds (the
// collector runs sooner instead of doubling the heap).
const defaultMemoryLimit = 100 << 20

func serve(ctx context.Context, cfg config.Config, logger *slog.Logger) error {
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(defaultMemoryLimit)
	}
	tp, shutdownTracing, err := newTracerProvider(ctx)
	if err != nil {
		return err
	}
	defer shutdownTracing()
	tel, err := newTelemetry(ctx)
	if err != nil {
		return err
	}
	defer tel.shutdown()

	badger, err := cache.OpenBadger(cache.BadgerOptions{Path: cfg.Storage.Path, Logger: logger, Budget: cache.Budget{
		MaxSize: cfg.Storage.MaxSize.Bytes, MinFree: cfg.Storage.MinFree.Bytes,
		High: float64(cfg.Storage.HighWatermark) / 100, Low: float64(cfg.Storage.LowWatermark) / 100,
	}, GCGrace: cfg.Storage.GCGrace.Duration, WaitForPins: true, MeterProvider: tel.provider})
	if err != nil {
		return err
	}
	defer func() {
		if err := badger.Close(); err != nil {
			logger.Error("closing the store", "err", err)
		}
	}()
	lru := cache.NewLRU(badger, cache.LRUOptions{
		ManifestBytes: cfg.Cache.ManifestBytes.Bytes, MetadataBytes: cfg.Cache.MetadataBytes.Bytes,
		ManifestEntries: cfg.Cache.ManifestEntries, MetadataEntries: cfg.Cache.MetadataEntries,
	})
	var store cache.Store = lru
	var shared *tiered.Store
	if c := cfg.Storage.S3; c != nil {
		tls := c.TLS == nil || *c.TLS
		bucket, err := s3.New(s3.Config{Endpoint: c.Endpoint, Bucket: c.Bucket, Region: c.Region,
			AccessKeyFile: config.ExpandHome(c.AccessKeyFile), SecretKeyFile: config.ExpandHome(c.SecretKeyFile), PathStyle: c.PathStyle, TLS: tls})
		if err != nil {
			return err
		}
		self := ""
		if cfg.Cluster != nil {
			self = cfg.Cluster.Self
		}
		shared = tiered.New(ctx, lru, bucket, tiered.Options{Self: self, MaxSize: c.MaxSize.Bytes, GCInterval: c.GCInterval.Duration, Logger: logger})
		defer shared.Stop() // before the store closes (deferred above)
		store = shared
		if err := shared.Ping(ctx); err != nil {
			logger.Warn("shared tier: the bucket does not answer yet; serving from the local tier", "err", err)
		}
	}
	if err := tel.observeShared(shared); err != nil {
		return err
	}
	var members *cluster.Cluster
	if c := cfg.Cluster; c != nil {
		secret, err := c.Secret(logger)
		if err != nil {
			return err
		}
		if members, err = cluster.New(ctx, cluster.Options{Self: c.Self, Peers: c.Peers, Secret: secret, Refresh: c.Refresh.Duration, Logger: logger}); err != nil {
			return err
		}
		defer members.Close()
	}

	var ups []proxy.Upstream
	clients := map[string]*upstream.Client{}
	for _, u := range cfg.Upstreams {
		password, token, err := u.Secrets(logger.With("upstream", u.Name))
		if err != nil {
			return fmt.Errorf("upstream %s: %w", u.Name, err)
		}
		creds := upstream.Credentials{Username: u.Username, Password: password, Token: token}
		if u.DockerConfig != "" {
			if creds, err = upstream.DockerConfigCredentials(config.ExpandHome(u.DockerConfig), u.Name); err != nil {
				return fmt.Errorf("upstream %s: %w", u.Name, err)
			}
		}
		c, err := upstream.New(upstream.Options{
			Name: u.Name, URL: u.URL, Credentials: creds,
			CAFile: u.TLS.CAFile, InsecureSkipVerify: u.TLS.InsecureSkipVerify,
			Logger: logger, TracerProvider: tp, MeterProvider: tel.provider, UserAgent: "ocimirror/" + version,
			Offline: cfg.Offline || u.Offline, ResponseTimeout: u.Timeout.Duration,
		})
		if err != nil {
			return err
		}
		clients[c.Name()] = c
		ups = append(ups, proxy.Upstream{Client: c, TagTTL: u.TagTTL.Duration, Forward: u.Push == config.PushForward, MaxFills: u.MaxFills})
	}
	authn, closeAuth, err := newAuthenticator(cfg, logger, tel)
	if err != nil {
		return err
	}
	defer closeAuth()
	var syncs []proxy.SyncRule
	for _, y := range cfg.Sync {
		syncs = append(syncs, proxy.SyncRule{Repository: y.Repository, Tags: y.Tags, Semver: y.Semver,
			Interval: y.Interval.Duration, Platforms: y.Platforms, MaxTags: y.MaxTags})
	}
	srv, err := proxy.New(proxy.Options{
		Store: store, Upstreams: ups, DefaultUpstream: cfg.DefaultUpstream,
		Hosted: cfg.Hosted, ReadOnly: cfg.ReadOnly, Pins: cfg.Storage.Pin, Sync: syncs,
		MaxUploads: cfg.Uploads.Max, MaxUploadsPerClient: cfg.Uploads.PerClient, UploadIdle: cfg.Uploads.Idle.Duration,
		TagListBytes: cfg.Cache.TagListBytes.Bytes, Auth: authn,
		Logger: logger, TracerProvider: tp, MeterProvider: tel.provider, Cluster: members,
	})
	if err != nil {
		return err
	}
	badger.SetPins(srv.Pinned)
	stopPinned, err := tel.observePinned(srv.PinnedBytes, logger)
	if err != nil {
		return err
	}
	defer stopPinned()

	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return err
	}
	// Requests net/http rejects before any handler runs are answered in
	// the OCI error format too. Under TLS the listener is below TLS and
	// rewrites only the answer to plain HTTP on the TLS port.
	ln = proxy.OCIErrorListener(ln)
	hs := &http.Server{
		Handler:           srv.Handler(),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          log.New(slogWriter{logger}, "", 0),
	}
	errc := make(chan error, 2)
	var as *http.Server
	if cfg.Admin.Listen != "off" {
		aln, err := net.Listen("tcp", cfg.Admin.Listen)
		if err != nil {
			ln.Close()
			return fmt.Errorf("admin.listen: %w", err)
		}
		upstreams := make([]string, 0, len(clients))
		for n := range clients {
			upstreams = append(upstreams, strings.ToLower(n))
		}
		sort.Strings(upstreams)
		importBundle := func(ctx context.Context, r io.Reader, repository string) (*bundle.ImportResult, error) {
			res, err := bundle.Import(ctx, r, lru, bundle.ImportOptions{Repository: repository, Upstreams: upstreams})
			if err != nil {
				logger.Warn("bundle import refused", "err", err)
			} else {
				logger.Info("bundle imported", "images", len(res.Images), "manifests", res.Manifests, "blobs", res.Blobs, "bytes", res.Bytes)
			}
			return res, err
		}
		ao := admin.Options{Ping: badger.Ping, Upstreams: clients, Offline: cfg.Offline, Import: importBundle, Metrics: tel.handler,
			Stats: func(ctx context.Context) (admin.StoreStats, error) {
				return storeStats(ctx, badger, srv, cfg.Storage.MaxSize.Bytes)
			},
			Purge: func(ctx context.Context, ref string) (admin.PurgeResult, error) { return purge(ctx, srv, ref) },
			Pins:  func(ctx context.Context) ([]admin.Pin, error) { return pins(ctx, srv) },
		}
		if shared != nil {
			ao.Shared = shared.Ping
		}
		if members != nil {
			ao.Members = members.Members
		}
		as = &http.Server{
			Handler:           admin.Handler(ao),
			ReadHeaderTimeout: 10 * time.Second,
			ErrorLog:          log.New(slogWriter{logger}, "", 0),
		}
		go func() { errc <- as.Serve(aln) }()
		logger.Info("admin listening", "addr", aln.Addr().String())
	}
	go func() {
		if cfg.TLS.CertFile != "" {
			errc <- hs.ServeTLS(ln, cfg.TLS.CertFile, cfg.TLS.KeyFile)
		} else {
			errc <- hs.Serve(ln)
		}
	}()
	names := make([]string, 0, len(cfg.Upstreams))
	for _, u := range cfg.Upstreams {
		names = append(names, u.Name+"="+u.URL)
	}
	logger.Info("ocimirror listening", "addr", ln.Addr().String(), "data", cfg.Storage.Path,
		"default_upstream", cfg.DefaultUpstream, "upstreams", names, "hosted", cfg.Hosted, "read_only", cfg.ReadOnly,
		"offline", cfg.Offline, "version", version)

	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	logger.Info("shutting down", "timeout", cfg.ShutdownTimeout.Duration)
	sctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout.Duration)
	defer cancel()
	if err := hs.Shutdown(sctx); err != nil {
		logger.Warn("requests still running at shutdown timeout", "err", err)
		hs.Close()
	}
	if as != nil {
		_ = as.Shutdown(sctx)
	}
	if err := srv.Shutdown(sctx); err != nil {
		logger.Warn("blob fills cancelled at shutdown timeout", "err", err)
	}
	servers := 1
	if as != nil {
		servers++
	}
	for range servers {
		if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
			return err
		}
	}
	return nil
}

// newTracerProvider exports traces over OTLP/HTTP when the standard
// OTEL_EXPORTER_OTLP_ENDPOINT (or _TRACES_ENDPOINT) or
// OTEL_TRACES_EXPORTER=otlp is set; otherwise tracing is off.
func newTracerProvider(ctx context.Context) (trace.TracerProvider, func(), error) {
	enabled := os.Getenv("OTEL_EXPORTER_OTLP_ENDPOINT") != "" || os.Getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") != "" ||
		os.Getenv("OTEL_TRACES_EXPORTER") == "otlp"
	if !enabled || os.Getenv("OTEL_SDK_DISABLED") == "true" || os.Getenv("OTEL_TRACES_EXPORTER") == "none" {
		return noop.NewTracerProvider(), func() {}, nil
	}
	exp, err := otlptracehttp.New(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("otlp exporter: %w", err)
	}
	res, err := resource.Merge(resource.Default(), resource.NewSchemaless(semconv.ServiceName("ocimirror"), semconv.ServiceVersion(version)))
	if err != nil {
		res = resource.Default()
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp), sdktrace.WithResource(res))
	return tp, func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = tp.Shutdown(ctx)
	}, nil
}

// slogWriter routes net/http's own error log (TLS handshake errors and the
// like) into the structured log.
type slogWriter struct{ l *slog.Logger }

func (w slogWriter) Write(p []byte) (int, error) {
	w.l.Warn("http server", "msg", string(p[:len(p)-min(len(p), 1)]))
	return len(p), nil
}

// storeStats are the store's figures for the admin listener.
func storeStats(ctx context.Context, b *cache.Badger, srv *proxy.Server, budget int64) (admin.StoreStats, error) {
	st := admin.StoreStats{Bytes: b.Usage(), BudgetBytes: budget}
	var err error
	if st.PinnedBytes, err = srv.PinnedBytes(ctx); err != nil {
		return st, fmt.Errorf("pinned bytes: %w", err)
	}
	if st.Counts, err = b.Count(ctx); err != nil {
		return st, fmt.Errorf("counting the store: %w", err)
	}
	return st, nil
}

// purge runs a purge for the admin listener, its errors marked for it.
func purge(ctx context.Context, srv *proxy.Server, ref string) (admin.PurgeResult, error) {
	r, err := srv.Purge(ctx, ref)
	switch {
	case errors.Is(err, proxy.ErrPurgeInvalid):
		return admin.PurgeResult{}, marked{err, admin.ErrInvalid}
	case errors.Is(err, proxy.ErrPurgeHosted):
		return admin.PurgeResult{}, marked{err, admin.ErrRefused}
	case err != nil:
		return admin.PurgeResult{}, err
	}
	return admin.PurgeResult{Upstream: r.Upstream, Repository: r.Repository, Tag: r.Tag, Dropped: r.Dropped}, nil
}

// marked is err, also matching mark (for the admin listener's status),
// with err's message alone.
type marked struct{ err, mark error }

func (m marked) Error() string   { return m.err.Error() }
func (m marked) Unwrap() []error { return []error{m.err, m.mark} }

// pins lists the pins for the admin listener.
func pins(ctx context.Context, srv *proxy.Server) ([]admin.Pin, error) {
	ps, err := srv.Pins(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]admin.Pin, 0, len(ps))
	for _, p := range ps {
		out = append(out, admin.Pin{Ref: p.Ref, Source: p.Source, Upstream: p.Upstream, Repository: p.Repository,
			Tag: p.Tag, Digest: p.Digest.String(), At: p.At})
	}
	return out, nil
}

// newAuthenticator builds the client authentication of cfg.Auth: the
// users of its htpasswd file, the access rules, and the token signing key
// (generated in the data directory at first start unless configured).
// Without an auth section it returns nil: everyone may pull and push.
func newAuthenticator(cfg config.Config, logger *slog.Logger, tel *telemetry) (*auth.Authenticator, func(), error) {
	if cfg.Auth == nil {
		logger.Warn("no auth section: every client that reaches ocimirror may pull what its upstream credentials can read, and push to hosted repositories")
		return nil, func() {}, nil
	}
	users, err := auth.LoadUsers(config.ExpandHome(cfg.Auth.Htpasswd), logger)
	if err != nil {
		return nil, nil, fmt.Errorf("auth.htpasswd: %w", err)
	}
	keyPath, create := config.ExpandHome(cfg.Auth.SigningKey), false
	if keyPath == "" {
		keyPath, create = filepath.Join(cfg.Storage.Path, "auth", "signing-key.pem"), true
	}
	key, err := auth.LoadOrCreateKey(keyPath, create)
	if err != nil {
		users.Close()
		return nil, nil, err
	}
	a, err := auth.New(auth.Options{Users: users, Rules: auth.NewRules(cfg.Access, cfg.Auth.Groups),
		Tokens: auth.NewTokens(key, cfg.Auth.TokenTTL.Duration, nil), Realm: cfg.Auth.Realm,
		Logger: logger, MeterProvider: tel.provider})
	if err != nil {
		users.Close()
		return nil, nil, err
	}
	if cfg.TLS.CertFile == "" && !loopback(cfg.Listen) {
		logger.Warn("auth is on over plain HTTP on a non-loopback address: passwords and tokens cross the network in clear; serve TLS (tls.certFile) or put a TLS proxy in front",
			"listen", cfg.Listen)
	}
	logger.Info("auth on", "rules", len(cfg.Access), "token_ttl", cfg.Auth.TokenTTL.Duration, "signing_key", keyPath)
	return a, func() { a.Close(); users.Close() }, nil
}

// loopback reports whether a listen address only accepts local clients.
func loopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
