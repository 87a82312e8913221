// Package config holds ocimirror's configuration: the YAML file, its
// built-in defaults, and the validation that names a bad field and value.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/Masterminds/semver/v3"
	"github.com/dustin/go-humanize"
	"go.yaml.in/yaml/v3"
)

// Config is the whole configuration of one ocimirror process.
type Config struct {
	// Listen is the address the registry API is served on.
	Listen string `yaml:"listen"`
	// TLS, when set, serves the API over HTTPS instead of plain HTTP.
	TLS ServerTLS `yaml:"tls"`
	// Storage is where cached content is kept.
	Storage Storage `yaml:"storage"`
	// Cache tunes the in-memory layer above the store.
	Cache Cache `yaml:"cache"`
	// Uploads bounds the blob upload sessions clients can open.
	Uploads Uploads `yaml:"uploads"`
	// DefaultUpstream names the upstream for requests with no ns and no host prefix.
	DefaultUpstream string `yaml:"defaultUpstream"`
	// Upstreams are the registries ocimirror mirrors.
	Upstreams []Upstream `yaml:"upstreams"`
	// Hosted are repository prefixes ("ci/") that ocimirror itself is the
	// registry for, with pushes, tags and deletes.
	Hosted []string `yaml:"hosted"`
	// ReadOnly turns every push and delete away with 405.
	ReadOnly bool `yaml:"readOnly"`
	// Offline sends no request to any upstream: everything is answered from the cache.
	Offline bool `yaml:"offline"`
	// Admin is the listener for health, readiness and administration, never exposed with the registry API.
	Admin Admin `yaml:"admin"`
	// Auth, when set, authenticates clients and enforces Access; unset, anyone may pull and push.
	Auth *Auth `yaml:"auth"`
	// Access are the rules of who may pull, push and delete what (with Auth).
	Access []AccessRule `yaml:"access"`
	// Sync are repositories the mirror keeps warm by itself; what it syncs is pinned.
	Sync []Sync `yaml:"sync"`
	// Log sets the format and level of the log on standard error.
	Log Log `yaml:"log"`
	// ShutdownTimeout bounds how long SIGTERM waits for in-flight work.
	ShutdownTimeout Duration `yaml:"shutdownTimeout"`
	// Cluster, when set, makes this process one replica of several sharing storage.s3.
	Cluster *Cluster `yaml:"cluster"`
}

// Sync is a repository the mirror keeps warm: its matching tags are
// fetched with every platform (or those listed), blobs and referrers, and
// pinned.
type Sync struct {
	// Repository is written as a client pulls it through ocimirror: docker.io/library/alpine.
	Repository string `yaml:"repository"`
	// Tags is a regular expression a tag must match whole (default: any).
	Tags string `yaml:"tags"`
	// Semver is a version range (">=1.2, <2"): only tags that are versions in it.
	Semver string `yaml:"semver"`
	// Interval is how often the upstream is checked for new tags (1h).
	Interval Duration `yaml:"interval"`
	// Platforms are os/arch[/variant] to fetch of an index (default: every one).
	Platforms []string `yaml:"platforms"`
	// MaxTags bounds the tags kept: the highest versions (or names) first (default 20).
	MaxTags int `yaml:"maxTags"`
}

// Admin configures the admin listener.
type Admin struct {
	// Listen is its address (127.0.0.1:5001); "off" disables it.
	Listen string `yaml:"listen"`
}

// DefaultAdminListen is the admin listener's address unless configured.
const DefaultAdminListen = "127.0.0.1:5001"

// ServerTLS is the certificate ocimirror serves with.
type ServerTLS struct {
	// CertFile is a PEM certificate chain.
	CertFile string `yaml:"certFile"`
	// KeyFile is the PEM private key of CertFile.
	KeyFile string `yaml:"keyFile"`
}

// maxPins bounds storage.pin: each pass walks every pinned image.
const maxPins = 1000

// Storage configures the on-disk store.
type Storage struct {
	// Path is the data directory: blob files, and the database in db/.
	Path string `yaml:"path"`
	// MaxSize bounds the store's disk use (blob files plus the database); unset, no bound.
	MaxSize Size `yaml:"maxSize"`
	// HighWatermark and LowWatermark are percentages of MaxSize: eviction starts at the high one and frees down to the low one (95, 85).
	HighWatermark int `yaml:"highWatermark"`
	LowWatermark  int `yaml:"lowWatermark"`
	// MinFree is free space to keep on the filesystem, for a shared disk; unset, none.
	MinFree Size `yaml:"minFree"`
	// GCGrace is how long data nothing references any more stays before it is deleted (24h).
	GCGrace Duration `yaml:"gcGrace"`
	// Pin are images eviction keeps, as a client pulls them through ocimirror (docker.io/library/alpine:3.20, ghcr.io/org/app@sha256:...): the image, every platform of an index, and all their referrers.
	Pin []string `yaml:"pin"`
	// S3, when set, is the shared tier of a cluster: an S3-compatible bucket under the local store (README "Scale out").
	S3 *S3 `yaml:"s3"`
}

// S3 is an S3-compatible bucket (AWS S3, SeaweedFS, MinIO, Ceph RGW).
type S3 struct {
	// Endpoint is the store's host:port or http(s)://host:port.
	Endpoint string `yaml:"endpoint"`
	// Bucket holds everything the shared tier stores; it must exist.
	Bucket string `yaml:"bucket"`
	// Region is the bucket's region (us-east-1).
	Region string `yaml:"region"`
	// AccessKeyFile and SecretKeyFile hold the credentials; unset, the standard AWS environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ~/.aws/credentials), else anonymous.
	AccessKeyFile string `yaml:"accessKeyFile"`
	SecretKeyFile string `yaml:"secretKeyFile"`
	// PathStyle addresses the bucket as endpoint/bucket, as SeaweedFS and MinIO need (false: bucket.endpoint).
	PathStyle bool `yaml:"pathStyle"`
	// TLS speaks HTTPS to a host:port endpoint (true); an http:// or https:// endpoint says it itself.
	TLS *bool `yaml:"tls"`
	// MaxSize bounds what the bucket holds of upstream content, least recently accessed evicted first by one replica at a time; unset, no bound (hosted content is never evicted).
	MaxSize Size `yaml:"maxSize"`
	// GCInterval is how often the bucket is checked against MaxSize (10m).
	GCInterval Duration `yaml:"gcInterval"`
}

// Cluster makes this process one of several replicas (README "Scale out").
type Cluster struct {
	// Self is this replica's registry URL as the others reach it (http://10.0.0.5:5000); --cluster-self sets it.
	Self string `yaml:"self"`
	// Peers are the replicas' registry URLs, self included, or dns+http://name:port for every address a DNS name has (a Kubernetes headless service), re-resolved every Refresh.
	Peers []string `yaml:"peers"`
	// SecretFile holds the shared secret that authenticates the calls between replicas.
	SecretFile string `yaml:"secretFile"`
	// Refresh is how often DNS peers are resolved again (10s).
	Refresh Duration `yaml:"refresh"`
}

// Secret reads the cluster's shared secret.
func (c Cluster) Secret(log *slog.Logger) (string, error) {
	v, err := secret("", "cluster.secretFile", c.SecretFile, "", "", log)
	if err == nil && len(v) < 16 {
		return "", fmt.Errorf("cluster.secretFile: %q holds %d characters; want at least 16", c.SecretFile, len(v))
	}
	return v, err
}

// Cache configures what is held in memory above the store. Every part is
// bounded in bytes: entries vary in size.
type Cache struct {
	// ManifestBytes bounds the manifests held in memory (default 32MiB).
	ManifestBytes Size `yaml:"manifestBytes"`
	// MetadataBytes bounds the tags, blob sizes and repository links held in memory (default 16MiB).
	MetadataBytes Size `yaml:"metadataBytes"`
	// TagListBytes bounds the upstream tag lists held in memory (default 16MiB).
	TagListBytes Size `yaml:"tagListBytes"`
	// ManifestEntries, when set, also bounds the count of manifests held.
	ManifestEntries int `yaml:"manifestEntries"`
	// MetadataEntries, when set, also bounds the count of each kind of metadata held.
	MetadataEntries int `yaml:"metadataEntries"`
}

// Uploads bounds blob upload sessions.
type Uploads struct {
	// Max is how many sessions may be open at once (default 4096).
	Max int `yaml:"max"`
	// PerClient is how many of them one client address may hold (default 64).
	PerClient int `yaml:"perClient"`
	// Idle discards a session unused for this long (default 5m).
	Idle Duration `yaml:"idle"`
}

// Upstream is one registry ocimirror mirrors.
type Upstream struct {
	// Name is the registry host as clients write it (docker.io, ghcr.io, 127.0.0.1:5002).
	Name string `yaml:"name"`
	// URL is where the registry API is reached; defaults to https://<name>.
	URL string `yaml:"url"`
	// TagTTL is how long a tag is answered from cache before it is revalidated.
	TagTTL Duration `yaml:"tagTTL"`
	// Username and Password are basic credentials, also used for token requests.
	Username string `yaml:"username"`
	Password string `yaml:"password"`
	// PasswordFile is a file holding the password instead (trailing newlines trimmed).
	PasswordFile string `yaml:"passwordFile"`
	// PasswordEnv names an environment variable holding the password instead.
	PasswordEnv string `yaml:"passwordEnv"`
	// Token is a static bearer token sent with every request.
	Token string `yaml:"token"`
	// TokenFile is a file holding the token instead (trailing newlines trimmed).
	TokenFile string `yaml:"tokenFile"`
	// TokenEnv names an environment variable holding the token instead.
	TokenEnv string `yaml:"tokenEnv"`
	// DockerConfig is a Docker config.json to take this registry's credentials from.
	DockerConfig string `yaml:"dockerConfig"`
	// TLS configures how the upstream's certificate is checked.
	TLS UpstreamTLS `yaml:"tls"`
	// Push says what a push to this upstream's repositories does: local
	// (kept by ocimirror only, the default) or forward (also written to
	// the upstream).
	Push PushMode `yaml:"push"`
	// Offline sends no request to this upstream: its repositories are answered from the cache.
	Offline bool `yaml:"offline"`
	// Timeout bounds the wait for the upstream's answer to a request (60s); a timeout counts toward marking it down.
	Timeout Duration `yaml:"timeout"`
	// MaxFills bounds the blob fills from this upstream that run at once (default 32); more wait in order.
	MaxFills int `yaml:"maxFills"`
}

// DefaultMaxFills bounds the blob fills from one upstream that run at once.
const DefaultMaxFills = 32

// PushMode is what happens to a push to a proxied repository.
type PushMode string

// The push modes.
const (
	PushLocal   PushMode = "local"
	PushForward PushMode = "forward"
)

// UnmarshalText accepts local or forward.
func (p *PushMode) UnmarshalText(b []byte) error {
	switch v := PushMode(strings.ToLower(string(b))); v {
	case PushLocal, PushForward:
		*p = v
		return nil
	}
	return fmt.Errorf("push: %q is not local or forward", b)
}

// UpstreamTLS configures the client side of TLS toward an upstream. Plain
// HTTP is chosen with an http:// URL.
type UpstreamTLS struct {
	// CAFile is a PEM bundle trusted in addition to the system roots.
	CAFile string `yaml:"caFile"`
	// InsecureSkipVerify accepts any certificate. For tests only.
	InsecureSkipVerify bool `yaml:"insecureSkipVerify"`
}

// Log configures logging.
type Log struct {
	// Format is text or json.
	Format LogFormat `yaml:"format"`
	// Level is debug, info, warn or error.
	Level LogLevel `yaml:"level"`
}

// LogFormat is the log encoding.
type LogFormat string

// The log formats.
const (
	LogText LogFormat = "text"
	LogJSON LogFormat = "json"
)

// UnmarshalText accepts text or json.
func (f *LogFormat) UnmarshalText(b []byte) error {
	switch v := LogFormat(strings.ToLower(string(b))); v {
	case LogText, LogJSON:
		*f = v
		return nil
	}
	return fmt.Errorf("log.format: %q is not text or json", b)
}

// LogLevel is the least severe level logged.
type LogLevel string

// UnmarshalText accepts debug, info, warn or error.
func (l *LogLevel) UnmarshalText(b []byte) error {
	switch v := LogLevel(strings.ToLower(string(b))); v {
	case "debug", "info", "warn", "error":
		*l = v
		return nil
	}
	return fmt.Errorf("log.level: %q is not debug, info, warn or error", b)
}

// Duration is a time.Duration written as "5m" or "30s". It keeps what was
// written so that Validate can name a bad value with its field.
type Duration struct {
	time.Duration
	raw string
}

// UnmarshalText records the text; Validate parses it.
func (d *Duration) UnmarshalText(b []byte) error {
	d.raw = string(b)
	d.Duration = 0
	return nil
}

// MarshalText writes the duration back as text.
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.Duration.String()), nil }

func (d *Duration) parse(field string) error {
	if d.raw == "" {
		return nil
	}
	v, err := time.ParseDuration(d.raw)
	if err != nil || v < 0 {
		return fmt.Errorf("%s: invalid duration %q (use a value such as 30s or 5m)", field, d.raw)
	}
	d.Duration, d.raw = v, ""
	return nil
}

// Size is a byte count written as 64MiB, 1GB or 1048576. It keeps what was
// written so that Validate can name a bad value with its field.
type Size struct {
	Bytes int64
	raw   string
}

// UnmarshalText records the text; Validate parses it.
func (s *Size) UnmarshalText(b []byte) error {
	s.raw = string(b)
	s.Bytes = 0
	return nil
}

// MarshalText writes the size in bytes.
func (s Size) MarshalText() ([]byte, error) { return []byte(strconv.FormatInt(s.Bytes, 10)), nil }

// parse reads the size, which must lie between 1 KiB and max.
func (s *Size) parse(field string, max uint64) error {
	if s.raw == "" {
		return nil
	}
	v, err := humanize.ParseBytes(s.raw)
	if err != nil || v < 1<<10 || v > max {
		return fmt.Errorf("%s: invalid size %q (use a value such as 64MiB, between 1KiB and %s)", field, s.raw, humanize.IBytes(max))
	}
	s.Bytes, s.raw = int64(v), ""
	return nil
}

// Bounds of sizes: memory budgets, and disk ones.
const (
	maxMemorySize = 1 << 40
	maxDiskSize   = 1 << 60
)

// Bytes returns a Size of n bytes.
func Bytes(n int64) Size { return Size{Bytes: n} }

// Dur returns a Duration of v.
func Dur(v time.Duration) Duration { return Duration{Duration: v} }

// DockerHub is the name clients use for Docker Hub.
const DockerHub = "docker.io"

// Default returns the built-in configuration: listen on :5000, data in
// ./ocimirror-data, and the four big public registries with Docker Hub as
// the default.
func Default() Config {
	return Config{
		Listen:          ":5000",
		Admin:           Admin{Listen: DefaultAdminListen},
		Storage:         Storage{Path: "./ocimirror-data", HighWatermark: 95, LowWatermark: 85, GCGrace: Dur(24 * time.Hour)},
		Cache:           Cache{ManifestBytes: Bytes(32 << 20), MetadataBytes: Bytes(16 << 20), TagListBytes: Bytes(16 << 20)},
		Uploads:         Uploads{Max: 4096, PerClient: 64, Idle: Dur(5 * time.Minute)},
		DefaultUpstream: DockerHub,
		Upstreams: []Upstream{
			{Name: DockerHub, URL: "https://registry-1.docker.io"},
			{Name: "ghcr.io", URL: "https://ghcr.io"},
			{Name: "quay.io", URL: "https://quay.io"},
			{Name: "registry.k8s.io", URL: "https://registry.k8s.io"},
		},
		Log:             Log{Format: LogText, Level: "info"},
		ShutdownTimeout: Dur(30 * time.Second),
	}
}

// DefaultTagTTL is how long a tag is trusted when an upstream sets no tagTTL.
const DefaultTagTTL = 5 * time.Minute

// Load reads a YAML file over the defaults. Fields the file leaves out keep
// their default; a file that lists upstreams replaces the default list.
func Load(path string) (Config, error) {
	c, err := LoadUnchecked(path)
	if err == nil {
		err = c.Validate()
	}
	if err != nil {
		return Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

// LoadUnchecked reads a file as Load does, without validating it: flags
// may complete it (--cluster-self), and the caller validates after.
func LoadUnchecked(path string) (Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("config: %w", err)
	}
	c, err := parse(b)
	if err != nil {
		return Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

// Parse reads YAML over the defaults and validates the result.
func Parse(b []byte) (Config, error) {
	c, err := parse(b)
	if err != nil {
		return Config{}, err
	}
	if err := c.Validate(); err != nil {
		return Config{}, err
	}
	return c, nil
}

func parse(b []byte) (Config, error) {
	c := Default()
	var file Config
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&file); err != nil && !errors.Is(err, io.EOF) {
		return Config{}, err
	}
	c.merge(file)
	return c, nil
}

// merge takes every field that f sets.
func (c *Config) merge(f Config) {
	if f.Listen != "" {
		c.Listen = f.Listen
	}
	if f.TLS != (ServerTLS{}) {
		c.TLS = f.TLS
	}
	if f.Storage.Path != "" {
		c.Storage.Path = f.Storage.Path
	}
	if f.Storage.MaxSize.raw != "" || f.Storage.MaxSize.Bytes != 0 {
		c.Storage.MaxSize = f.Storage.MaxSize
	}
	if f.Storage.MinFree.raw != "" || f.Storage.MinFree.Bytes != 0 {
		c.Storage.MinFree = f.Storage.MinFree
	}
	if f.Storage.GCGrace.raw != "" || f.Storage.GCGrace.Duration != 0 {
		c.Storage.GCGrace = f.Storage.GCGrace
	}
	if f.Storage.Pin != nil {
		c.Storage.Pin = f.Storage.Pin
	}
	if f.Storage.S3 != nil {
		c.Storage.S3 = f.Storage.S3
	}
	if f.Cluster != nil {
		c.Cluster = f.Cluster
	}
	if f.Storage.HighWatermark != 0 {
		c.Storage.HighWatermark = f.Storage.HighWatermark
	}
	if f.Storage.LowWatermark != 0 {
		c.Storage.LowWatermark = f.Storage.LowWatermark
	}
	for _, p := range []struct{ dst, src *Size }{
		{&c.Cache.ManifestBytes, &f.Cache.ManifestBytes},
		{&c.Cache.MetadataBytes, &f.Cache.MetadataBytes},
		{&c.Cache.TagListBytes, &f.Cache.TagListBytes},
	} {
		if p.src.raw != "" || p.src.Bytes != 0 {
			*p.dst = *p.src
		}
	}
	if f.Cache.ManifestEntries != 0 {
		c.Cache.ManifestEntries = f.Cache.ManifestEntries
	}
	if f.Cache.MetadataEntries != 0 {
		c.Cache.MetadataEntries = f.Cache.MetadataEntries
	}
	if f.Uploads.Max != 0 {
		c.Uploads.Max = f.Uploads.Max
	}
	if f.Uploads.PerClient != 0 {
		c.Uploads.PerClient = f.Uploads.PerClient
	}
	if f.Uploads.Idle.raw != "" || f.Uploads.Idle.Duration != 0 {
		c.Uploads.Idle = f.Uploads.Idle
	}
	if f.DefaultUpstream != "" {
		c.DefaultUpstream = f.DefaultUpstream
	}
	if f.Upstreams != nil {
		c.Upstreams = f.Upstreams
		if f.DefaultUpstream == "" && len(f.Upstreams) > 0 && c.Upstream(c.DefaultUpstream) == nil {
			c.DefaultUpstream = ""
		}
	}
	if f.Hosted != nil {
		c.Hosted = f.Hosted
	}
	c.ReadOnly = c.ReadOnly || f.ReadOnly
	c.Offline = c.Offline || f.Offline
	if f.Auth != nil {
		c.Auth = f.Auth
	}
	if f.Access != nil {
		c.Access = f.Access
	}
	if f.Sync != nil {
		c.Sync = f.Sync
	}
	if f.Admin.Listen != "" {
		c.Admin.Listen = f.Admin.Listen
	}
	if f.Log.Format != "" {
		c.Log.Format = f.Log.Format
	}
	if f.Log.Level != "" {
		c.Log.Level = f.Log.Level
	}
	if f.ShutdownTimeout.raw != "" || f.ShutdownTimeout.Duration != 0 {
		c.ShutdownTimeout = f.ShutdownTimeout
	}
}

// SetUpstream adds an upstream, or replaces the URL of the one with that name
// (the --upstream NAME=URL flag).
func (c *Config) SetUpstream(name, rawURL string) {
	for i := range c.Upstreams {
		if c.Upstreams[i].Name == name {
			c.Upstreams[i].URL = rawURL
			return
		}
	}
	c.Upstreams = append(c.Upstreams, Upstream{Name: name, URL: rawURL})
}

// Upstream returns the upstream with that name, or nil.
func (c *Config) Upstream(name string) *Upstream {
	for i := range c.Upstreams {
		if c.Upstreams[i].Name == name {
			return &c.Upstreams[i]
		}
	}
	return nil
}

// Validate checks every field, fills derived defaults (upstream URLs and
// TTLs), and names the first bad field and its value.
func (c *Config) Validate() error {
	if c.Listen == "" {
		return errors.New("listen: must not be empty")
	}
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		return fmt.Errorf("listen: %q is not host:port (%v)", c.Listen, err)
	}
	if a := c.Admin.Listen; a != "off" {
		if a == "" {
			c.Admin.Listen = DefaultAdminListen
		} else if _, _, err := net.SplitHostPort(a); err != nil {
			return fmt.Errorf("admin.listen: %q is not host:port or off (%v)", a, err)
		}
	}
	if (c.TLS.CertFile == "") != (c.TLS.KeyFile == "") {
		return fmt.Errorf("tls: certFile %q and keyFile %q must be set together", c.TLS.CertFile, c.TLS.KeyFile)
	}
	if c.Storage.Path == "" {
		return errors.New("storage.path: must not be empty")
	}
	if err := c.validateScaleOut(); err != nil {
		return err
	}
	if err := c.Storage.MaxSize.parse("storage.maxSize", maxDiskSize); err != nil {
		return err
	}
	if err := c.Storage.MinFree.parse("storage.minFree", maxDiskSize); err != nil {
		return err
	}
	if err := c.Storage.GCGrace.parse("storage.gcGrace"); err != nil {
		return err
	}
	if c.Storage.GCGrace.Duration < time.Minute {
		return fmt.Errorf("storage.gcGrace: %s must be at least 1m", c.Storage.GCGrace.Duration)
	}
	if len(c.Storage.Pin) > maxPins {
		return fmt.Errorf("storage.pin: %d references, at most %d", len(c.Storage.Pin), maxPins)
	}
	for i, p := range c.Storage.Pin {
		if strings.TrimSpace(p) == "" || len(p) > 512 {
			return fmt.Errorf("storage.pin[%d]: %q is not an image reference", i, p)
		}
	}
	for i := range c.Sync {
		y := &c.Sync[i]
		field := fmt.Sprintf("sync[%d]", i)
		if strings.TrimSpace(y.Repository) == "" {
			return fmt.Errorf("%s.repository: must name a repository, such as docker.io/library/alpine", field)
		}
		if err := y.Interval.parse(field + ".interval"); err != nil {
			return err
		}
		if y.Interval.Duration == 0 {
			y.Interval = Dur(time.Hour)
		}
		if y.Interval.Duration < time.Minute {
			return fmt.Errorf("%s.interval: %s must be at least 1m", field, y.Interval.Duration)
		}
		if _, err := regexp.Compile(y.Tags); err != nil {
			return fmt.Errorf("%s.tags: %q is not a regular expression (%v)", field, y.Tags, err)
		}
		if y.Semver != "" {
			if _, err := semver.NewConstraint(y.Semver); err != nil {
				return fmt.Errorf("%s.semver: %q is not a version range such as \">=1.2, <2\" (%v)", field, y.Semver, err)
			}
		}
		if y.MaxTags < 0 || y.MaxTags > 1000 {
			return fmt.Errorf("%s.maxTags: %d, want 1 to 1000 (default 20)", field, y.MaxTags)
		}
	}
	if h, l := c.Storage.HighWatermark, c.Storage.LowWatermark; h < 1 || h > 100 || l < 1 || l >= h {
		return fmt.Errorf("storage.highWatermark: %d with storage.lowWatermark %d: want 0 < low < high <= 100 (percent of maxSize)", h, l)
	}
	for _, f := range []struct {
		name string
		v    *Size
	}{{"cache.manifestBytes", &c.Cache.ManifestBytes}, {"cache.metadataBytes", &c.Cache.MetadataBytes}, {"cache.tagListBytes", &c.Cache.TagListBytes}} {
		if err := f.v.parse(f.name, maxMemorySize); err != nil {
			return err
		}
	}
	if c.Cache.ManifestEntries < 0 {
		return fmt.Errorf("cache.manifestEntries: %d must not be negative (0: no count bound)", c.Cache.ManifestEntries)
	}
	if c.Cache.MetadataEntries < 0 {
		return fmt.Errorf("cache.metadataEntries: %d must not be negative (0: no count bound)", c.Cache.MetadataEntries)
	}
	if c.Uploads.Max < 1 {
		return fmt.Errorf("uploads.max: %d must be at least 1", c.Uploads.Max)
	}
	if c.Uploads.PerClient < 1 {
		return fmt.Errorf("uploads.perClient: %d must be at least 1", c.Uploads.PerClient)
	}
	if err := c.Uploads.Idle.parse("uploads.idle"); err != nil {
		return err
	}
	if c.Uploads.Idle.Duration < time.Second {
		return fmt.Errorf("uploads.idle: %s must be at least 1s", c.Uploads.Idle.Duration)
	}
	if err := c.ShutdownTimeout.parse("shutdownTimeout"); err != nil {
		return err
	}
	for i, h := range c.Hosted {
		p := strings.Trim(h, "/")
		if p == "" || !validRepoPrefix(p) {
			return fmt.Errorf("hosted[%d]: %q is not a repository prefix such as ci/ or local/", i, h)
		}
		c.Hosted[i] = p + "/"
	}
	seen := map[string]bool{}
	for i := range c.Upstreams {
		u := &c.Upstreams[i]
		field := fmt.Sprintf("upstreams[%d]", i)
		if err := u.validate(field); err != nil {
			return err
		}
		if seen[u.Name] {
			return fmt.Errorf("%s.name: %q is configured twice", field, u.Name)
		}
		seen[u.Name] = true
	}
	c.DefaultUpstream = strings.ToLower(c.DefaultUpstream)
	if c.DefaultUpstream != "" && !seen[c.DefaultUpstream] {
		return fmt.Errorf("defaultUpstream: %q is not the name of a configured upstream", c.DefaultUpstream)
	}
	return c.validateAuth()
}

func (u *Upstream) validate(field string) error {
	if !validHost(u.Name) {
		return fmt.Errorf("%s.name: %q is not a registry host such as docker.io or 127.0.0.1:5002", field, u.Name)
	}
	u.Name = strings.ToLower(u.Name) // host names compare case-insensitively
	if u.URL == "" {
		u.URL = "https://" + u.Name
		if u.Name == DockerHub {
			u.URL = "https://registry-1.docker.io"
		}
	}
	// A base URL: the client appends /v2/..., so a query or a fragment
	// (even an empty one) would swallow the path.
	p, err := url.Parse(u.URL)
	if err != nil || (p.Scheme != "http" && p.Scheme != "https") || p.Hostname() == "" || strings.ContainsAny(u.URL, "?#") {
		return fmt.Errorf("%s.url: %q is not an http:// or https:// registry URL", field, u.URL)
	}
	// url.Parse takes the scheme in any case; write it in lower case, and
	// without trailing slashes, so that validating again changes nothing.
	u.URL = p.Scheme + strings.TrimRight(u.URL[len(p.Scheme):], "/")
	if u.MaxFills == 0 {
		u.MaxFills = DefaultMaxFills
	}
	if u.MaxFills < 1 || u.MaxFills > 4096 {
		return fmt.Errorf("%s.maxFills: %d, want 1 to 4096 (default %d)", field, u.MaxFills, DefaultMaxFills)
	}
	if err := u.Timeout.parse(field + ".timeout"); err != nil {
		return err
	}
	if err := u.TagTTL.parse(field + ".tagTTL"); err != nil {
		return err
	}
	if u.TagTTL.Duration == 0 {
		u.TagTTL = Dur(DefaultTagTTL)
	}
	if u.Push == "" {
		u.Push = PushLocal
	}
	passwords := setFields([]string{"password", u.Password}, []string{"passwordFile", u.PasswordFile}, []string{"passwordEnv", u.PasswordEnv})
	tokens := setFields([]string{"token", u.Token}, []string{"tokenFile", u.TokenFile}, []string{"tokenEnv", u.TokenEnv})
	if len(passwords) > 1 {
		return fmt.Errorf("%s.%s: set one of password, passwordFile and passwordEnv, not %s", field, passwords[1], strings.Join(passwords, " and "))
	}
	if len(tokens) > 1 {
		return fmt.Errorf("%s.%s: set one of token, tokenFile and tokenEnv, not %s", field, tokens[1], strings.Join(tokens, " and "))
	}
	if len(tokens) > 0 && (u.Username != "" || len(passwords) > 0) {
		return fmt.Errorf("%s.%s: set either a token or username/password, not both", field, tokens[0])
	}
	if len(passwords) > 0 && u.Username == "" {
		return fmt.Errorf("%s.username: %s is set without a username", field, passwords[0])
	}
	if u.DockerConfig != "" && (u.PasswordFile != "" || u.PasswordEnv != "" || u.TokenFile != "" || u.TokenEnv != "") {
		return fmt.Errorf("%s.dockerConfig: %q: the credentials come from it, so %s must not be set too", field, u.DockerConfig, append(passwords, tokens...)[0])
	}
	for _, e := range [][2]string{{"passwordEnv", u.PasswordEnv}, {"tokenEnv", u.TokenEnv}} {
		if e[1] != "" && strings.ContainsAny(e[1], "= \t\x00") {
			return fmt.Errorf("%s.%s: %q is not an environment variable name", field, e[0], e[1])
		}
	}
	if u.DockerConfig != "" {
		if _, err := os.Stat(expandHome(u.DockerConfig)); err != nil {
			return fmt.Errorf("%s.dockerConfig: %q: %v", field, u.DockerConfig, err)
		}
	}
	if u.TLS.CAFile != "" {
		if _, err := os.Stat(u.TLS.CAFile); err != nil {
			return fmt.Errorf("%s.tls.caFile: %q: %v", field, u.TLS.CAFile, err)
		}
	}
	return nil
}

// setFields names the fields, given as name and value, that are set.
func setFields(fields ...[]string) []string {
	var set []string
	for _, f := range fields {
		if f[1] != "" {
			set = append(set, f[0])
		}
	}
	return set
}

// maxSecretFile bounds a passwordFile or tokenFile: a secret is small, and
// a bigger file is the wrong one.
const maxSecretFile = 64 << 10

// Secrets returns the upstream's password and token, from the
// configuration itself, a file (its content without trailing newlines) or
// an environment variable, so that they need not sit in the YAML. A file,
// a variable, that is missing or empty is an error naming the field, never
// the secret. A file that users other than its owner may read works, with
// a warning on log: a Kubernetes secret is mounted 0644 unless its
// defaultMode says otherwise.
func (u Upstream) Secrets(log *slog.Logger) (password, token string, err error) {
	if password, err = secret(u.Password, "passwordFile", u.PasswordFile, "passwordEnv", u.PasswordEnv, log); err != nil {
		return "", "", err
	}
	if token, err = secret(u.Token, "tokenFile", u.TokenFile, "tokenEnv", u.TokenEnv, log); err != nil {
		return "", "", err
	}
	return password, token, nil
}

func secret(value, fileField, file, envField, env string, log *slog.Logger) (string, error) {
	switch {
	case file != "":
		file = expandHome(file)
		f, err := os.Open(file)
		if err != nil {
			return "", fmt.Errorf("%s: %w", fileField, err)
		}
		defer f.Close()
		fi, err := f.Stat()
		if err != nil {
			return "", fmt.Errorf("%s: %w", fileField, err)
		}
		b, err := io.ReadAll(io.LimitReader(f, maxSecretFile+1))
		if err != nil {
			return "", fmt.Errorf("%s: %w", fileField, err)
		}
		if len(b) > maxSecretFile {
			return "", fmt.Errorf("%s: %q is over %d bytes: not a secret", fileField, file, maxSecretFile)
		}
		v := strings.TrimRight(string(b), "\r\n")
		if v == "" {
			return "", fmt.Errorf("%s: %q is empty", fileField, file)
		}
		if m := fi.Mode().Perm(); m&0o077 != 0 && log != nil {
			log.Warn("a secret file is readable by users other than its owner; chmod 600 it", "field", fileField, "path", file, "mode", fmt.Sprintf("%#o", m))
		}
		return v, nil
	case env != "":
		v, ok := os.LookupEnv(env)
		if !ok {
			return "", fmt.Errorf("%s: environment variable %q is not set", envField, env)
		}
		if v == "" {
			return "", fmt.Errorf("%s: environment variable %q is empty", envField, env)
		}
		return v, nil
	}
	return value, nil
}

// validHost accepts a registry host: DNS name or IP, with an optional port.
func validHost(h string) bool {
	if h == "" || strings.ContainsAny(h, "/ @?#") {
		return false
	}
	host := h
	if hh, port, err := net.SplitHostPort(h); err == nil {
		if port == "" {
			return false
		}
		host = hh
	}
	if net.ParseIP(host) != nil {
		return true
	}
	for _, label := range strings.Split(host, ".") {
		if label == "" || len(label) > 63 {
			return false
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-') {
				return false
			}
		}
	}
	return true
}

// validRepoPrefix accepts repository path components: lower-case letters,
// digits and the separators . _ - between them.
func validRepoPrefix(p string) bool {
	for _, comp := range strings.Split(p, "/") {
		if comp == "" {
			return false
		}
		for i, r := range comp {
			alnum := r >= 'a' && r <= 'z' || r >= '0' && r <= '9'
			if !alnum && (i == 0 || i == len(comp)-1 || !strings.ContainsRune("._-", r)) {
				return false
			}
		}
	}
	return true
}

func expandHome(p string) string {
	if strings.HasPrefix(p, "~/") {
		if home, err := os.UserHomeDir(); err == nil {
			return home + p[1:]
		}
	}
	return p
}

// ExpandHome resolves a leading ~/ in a configured path.
func ExpandHome(p string) string { return expandHome(p) }

// validateScaleOut checks storage.s3 and cluster.
func (c *Config) validateScaleOut() error {
	if s := c.Storage.S3; s != nil {
		if s.Endpoint == "" {
			return errors.New("storage.s3.endpoint: must not be empty")
		}
		if strings.Contains(s.Endpoint, "://") {
			u, err := url.Parse(s.Endpoint)
			if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || strings.Trim(u.Path, "/") != "" {
				return fmt.Errorf("storage.s3.endpoint: %q: want host:port or http(s)://host:port", s.Endpoint)
			}
		}
		if s.Bucket == "" {
			return errors.New("storage.s3.bucket: must not be empty")
		}
		if (s.AccessKeyFile == "") != (s.SecretKeyFile == "") {
			return fmt.Errorf("storage.s3.accessKeyFile: %q and secretKeyFile %q: set both or neither", s.AccessKeyFile, s.SecretKeyFile)
		}
		if s.Region == "" {
			s.Region = "us-east-1"
		}
		if err := s.MaxSize.parse("storage.s3.maxSize", 1<<60); err != nil {
			return err
		}
		if err := s.GCInterval.parse("storage.s3.gcInterval"); err != nil {
			return err
		}
		if d := s.GCInterval.Duration; d != 0 && d < time.Minute {
			return fmt.Errorf("storage.s3.gcInterval: %s must be at least 1m", d)
		}
	}
	cl := c.Cluster
	if cl == nil {
		return nil
	}
	if c.Storage.S3 == nil {
		return errors.New("cluster: needs storage.s3, the tier the replicas share")
	}
	if cl.Self == "" {
		return errors.New("cluster.self: must not be empty (or give --cluster-self)")
	}
	if err := memberURL(cl.Self); err != nil {
		return fmt.Errorf("cluster.self: %w", err)
	}
	if len(cl.Peers) == 0 {
		return errors.New("cluster.peers: must not be empty")
	}
	if len(cl.Peers) > maxPeers {
		return fmt.Errorf("cluster.peers: %d entries, at most %d", len(cl.Peers), maxPeers)
	}
	for i, p := range cl.Peers {
		if rest, ok := strings.CutPrefix(p, "dns+"); ok {
			u, err := url.Parse(rest)
			if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Hostname() == "" || u.Port() == "" || strings.Trim(u.Path, "/") != "" {
				return fmt.Errorf("cluster.peers[%d]: %q: want dns+http(s)://name:port", i, p)
			}
			continue
		}
		if err := memberURL(p); err != nil {
			return fmt.Errorf("cluster.peers[%d]: %w", i, err)
		}
	}
	if cl.SecretFile == "" {
		return errors.New("cluster.secretFile: must not be empty")
	}
	if c.Auth != nil && c.Auth.SigningKey == "" {
		// Each replica would make a key of its own: a token one signs,
		// the others refuse.
		return errors.New("auth.signingKey: a cluster's replicas must share the key that signs tokens: set it to one file they all mount")
	}
	if err := cl.Refresh.parse("cluster.refresh"); err != nil {
		return err
	}
	if cl.Refresh.Duration != 0 && cl.Refresh.Duration < time.Second {
		return fmt.Errorf("cluster.refresh: %s must be at least 1s", cl.Refresh.Duration)
	}
	return nil
}

// maxPeers bounds cluster.peers.
const maxPeers = 256

// memberURL checks a replica's URL: http(s)://host:port and nothing more.
func memberURL(s string) error {
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || strings.Trim(u.Path, "/") != "" || u.RawQuery != "" || u.User != nil {
		return fmt.Errorf("%q: want http(s)://host:port", s)
	}
	return nil
}
