// Package s3 keeps the shared tier of a cluster of ocimirror replicas in an
// S3-compatible object store (AWS S3, SeaweedFS, MinIO, Ceph RGW): blobs
// and manifests by digest, small keyed objects written conditionally
// (hosted tags, links, referrers, the eviction lease), and listings by
// prefix. cache/tiered lays them out; Sub gives a view under a prefix.
//
// Blobs live under blobs/<algorithm>/<first two hex>/<hex>, manifests under
// manifests/<algorithm>/<first two hex>/<hex> with their media type as the
// object's Content-Type. A blob is written only after its caller has
// verified it, and S3 makes a PUT visible whole or not at all, so a reader
// never sees a partial blob.
//
// The store never lists multipart uploads: SeaweedFS's listing lags
// (seaweedfs#10321, #10270). A failed multipart upload is aborted by the
// upload ID the client holds; the bucket's lifecycle rule for incomplete
// uploads cleans what a crash leaves.
package s3

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
	"github.com/opencontainers/go-digest"

	"github.com/ocimirror/ocimirror/cache"
)

// Config says where the shared tier is: storage.s3 of the configuration
// (config.S3), which cmd maps onto it.
type Config struct {
	// Endpoint is the store's host:port (s3.amazonaws.com, 127.0.0.1:8333); a URL's scheme, if given, decides TLS.
	Endpoint string
	// Bucket holds everything the tier stores; it must exist.
	Bucket string
	// Region is the bucket's region (us-east-1).
	Region string
	// AccessKeyFile and SecretKeyFile hold the credentials; unset, the standard AWS environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ~/.aws/credentials), else anonymous.
	AccessKeyFile, SecretKeyFile string
	// PathStyle addresses the bucket as endpoint/bucket rather than bucket.endpoint, as SeaweedFS and MinIO need.
	PathStyle bool
	// TLS speaks HTTPS to a host:port endpoint.
	TLS bool
}

// partSize is where Put switches from one PUT to a multipart upload, and
// the size of each part. A Put from a reader that is not an io.ReaderAt
// buffers one part in memory; from an *os.File the parts go up in parallel
// without a buffer.
const partSize = 16 << 20

// maxManifest bounds a manifest's size, as oras and regclient do.
const maxManifest = 4 << 20

// Store is the shared tier on one bucket. It is safe for concurrent use.
type Store struct {
	client *minio.Client
	bucket string
	// prefix is prepended to every key (Sub).
	prefix string
}

// Sub returns a view of the store whose keys all live under prefix
// ("hosted/"): content by digest, keyed objects and lists alike.
func (s *Store) Sub(prefix string) *Store {
	c := *s
	c.prefix += prefix
	return &c
}

// New connects to the bucket cfg names. It makes no request: Ping does.
func New(cfg Config) (*Store, error) {
	if cfg.Bucket == "" {
		return nil, errors.New("s3: bucket is required")
	}
	endpoint, secure, err := parseEndpoint(cfg.Endpoint, cfg.TLS)
	if err != nil {
		return nil, err
	}
	creds, err := loadCredentials(cfg.AccessKeyFile, cfg.SecretKeyFile)
	if err != nil {
		return nil, err
	}
	lookup := minio.BucketLookupAuto
	if cfg.PathStyle {
		lookup = minio.BucketLookupPath
	}
	client, err := minio.New(endpoint, &minio.Options{
		Creds:        creds,
		Secure:       secure,
		Region:       cfg.Region,
		BucketLookup: lookup,
		// Two retries, not ten: a store that does not answer is known
		// within a second, and the callers have sources to go on with.
		MaxRetries: 3,
	})
	if err != nil {
		return nil, fmt.Errorf("s3: endpoint %q: %w", cfg.Endpoint, err)
	}
	return &Store{client: client, bucket: cfg.Bucket}, nil
}

func parseEndpoint(endpoint string, tls bool) (hostport string, secure bool, err error) {
	if endpoint == "" {
		return "", false, errors.New("s3: endpoint is required")
	}
	if !strings.Contains(endpoint, "://") {
		return endpoint, tls, nil
	}
	u, err := url.Parse(endpoint)
	if err != nil {
		return "", false, fmt.Errorf("s3: endpoint %q: %w", endpoint, err)
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || strings.Trim(u.Path, "/") != "" {
		return "", false, fmt.Errorf("s3: endpoint %q: want host:port or http(s)://host:port", endpoint)
	}
	return u.Host, u.Scheme == "https", nil
}

func loadCredentials(accessKeyFile, secretKeyFile string) (*credentials.Credentials, error) {
	if (accessKeyFile == "") != (secretKeyFile == "") {
		return nil, fmt.Errorf("s3: accessKeyFile %q and secretKeyFile %q: set both or neither", accessKeyFile, secretKeyFile)
	}
	if accessKeyFile == "" {
		// The standard AWS environment, else anonymous requests.
		return credentials.NewChainCredentials([]credentials.Provider{
			&credentials.EnvAWS{},
			&credentials.FileAWSCredentials{},
		}), nil
	}
	read := func(name string) (string, error) {
		b, err := os.ReadFile(name)
		if err != nil {
			return "", fmt.Errorf("s3: %w", err)
		}
		return strings.TrimSpace(string(b)), nil
	}
	access, err := read(accessKeyFile)
	if err != nil {
		return nil, err
	}
	secret, err := read(secretKeyFile)
	if err != nil {
		return nil, err
	}
	return credentials.NewStaticV4(access, secret, ""), nil
}

// Ping checks that the bucket answers (for /readyz).
func (s *Store) Ping(ctx context.Context) error {
	ok, err := s.client.BucketExists(ctx, s.bucket)
	if err != nil {
		return fmt.Errorf("s3: bucket %q: %w", s.bucket, err)
	}
	if !ok {
		return fmt.Errorf("s3: bucket %q: %w", s.bucket, cache.ErrNotFound)
	}
	return nil
}

func (s *Store) digestKey(kind string, d digest.Digest) (string, error) {
	if err := d.Validate(); err != nil {
		return "", fmt.Errorf("s3: digest %q: %w", d, err)
	}
	hex := d.Encoded()
	return s.prefix + kind + "/" + d.Algorithm().String() + "/" + hex[:2] + "/" + hex, nil
}

// Stat returns the size of the blob d, or cache.ErrNotFound.
func (s *Store) Stat(ctx context.Context, d digest.Digest) (int64, error) {
	key, err := s.digestKey("blobs", d)
	if err != nil {
		return 0, err
	}
	info, err := s.client.StatObject(ctx, s.bucket, key, minio.StatObjectOptions{})
	if err != nil {
		return 0, s.wrap(err, key)
	}
	return info.Size, nil
}

// Open reads the blob d from offset on, with one ranged GET. An offset at
// the blob's end gives an empty reader; past it, an error.
func (s *Store) Open(ctx context.Context, d digest.Digest, offset int64) (io.ReadCloser, error) {
	key, err := s.digestKey("blobs", d)
	if err != nil {
		return nil, err
	}
	if offset < 0 {
		return nil, fmt.Errorf("s3: negative offset %d", offset)
	}
	var opts minio.GetObjectOptions
	if offset > 0 {
		if err := opts.SetRange(offset, 0); err != nil {
			return nil, err
		}
	}
	core := minio.Core{Client: s.client}
	body, _, header, err := core.GetObject(ctx, s.bucket, key, opts)
	if err != nil {
		if errorCode(err) == "InvalidRange" {
			// bytes=N- of an N-byte object is unsatisfiable in HTTP;
			// a reader resuming at the end wants nothing more.
			if size, serr := s.Stat(ctx, d); serr == nil && size == offset {
				return io.NopCloser(bytes.NewReader(nil)), nil
			}
		}
		return nil, s.wrap(err, key)
	}
	// A store that ignored the range would send the blob from its start:
	// wrong bytes at the offset asked for.
	if want := fmt.Sprintf("bytes %d-", offset); offset > 0 && !strings.HasPrefix(header.Get("Content-Range"), want) {
		body.Close()
		return nil, fmt.Errorf("s3: %s: ranged GET answered with Content-Range %q, want %q...", key, header.Get("Content-Range"), want)
	}
	return body, nil
}

// Put uploads size bytes from r as the blob d. The caller has verified
// that they have digest d. A blob already present with that size is kept
// and r is not read. At most partSize bytes go in one PUT; more go up as a
// multipart upload, aborted by its ID if it fails.
func (s *Store) Put(ctx context.Context, d digest.Digest, size int64, r io.Reader) error {
	key, err := s.digestKey("blobs", d)
	if err != nil {
		return err
	}
	if size < 0 {
		return fmt.Errorf("s3: %s: size %d: the size must be known", key, size)
	}
	if have, err := s.Stat(ctx, d); err == nil && have == size {
		return nil
	} else if err != nil && !errors.Is(err, cache.ErrNotFound) {
		return err
	}
	info, err := s.client.PutObject(ctx, s.bucket, key, r, size, minio.PutObjectOptions{
		ContentType: "application/octet-stream",
		PartSize:    partSize,
	})
	if err != nil {
		return s.wrap(err, key)
	}
	if info.Size != size {
		return fmt.Errorf("s3: %s: stored %d bytes, want %d: %w", key, info.Size, size, ErrSize)
	}
	return nil
}

// Delete removes the blob d. Deleting an absent blob is not an error (S3
// answers 204 either way).
func (s *Store) Delete(ctx context.Context, d digest.Digest) error {
	key, err := s.digestKey("blobs", d)
	if err != nil {
		return err
	}
	return s.wrap(s.client.RemoveObject(ctx, s.bucket, key, minio.RemoveObjectOptions{}), key)
}

// PutManifest stores a manifest under its digest, with its media type as
// the object's Content-Type. It checks the digest itself: the bytes are
// at hand.
func (s *Store) PutManifest(ctx context.Context, d digest.Digest, mediaType string, data []byte) error {
	key, err := s.digestKey("manifests", d)
	if err != nil {
		return err
	}
	if len(data) > maxManifest {
		return fmt.Errorf("s3: %s: %d bytes, more than a manifest's %d", key, len(data), maxManifest)
	}
	if d.Algorithm().FromBytes(data) != d {
		return fmt.Errorf("s3: %s: %w", key, ErrDigest)
	}
	if mediaType == "" {
		return fmt.Errorf("s3: %s: no media type", key)
	}
	_, err = s.client.PutObject(ctx, s.bucket, key, bytes.NewReader(data), int64(len(data)), minio.PutObjectOptions{
		ContentType:      mediaType,
		DisableMultipart: true,
	})
	return s.wrap(err, key)
}

// GetManifest returns the manifest d and its media type, or
// cache.ErrNotFound.
func (s *Store) GetManifest(ctx context.Context, d digest.Digest) (data []byte, mediaType string, err error) {
	key, err := s.digestKey("manifests", d)
	if err != nil {
		return nil, "", err
	}
	data, info, err := s.get(ctx, key)
	if err != nil {
		return nil, "", err
	}
	if d.Algorithm().FromBytes(data) != d {
		return nil, "", fmt.Errorf("s3: %s: %w", key, cache.ErrCorrupt)
	}
	return data, info.ContentType, nil
}

// DeleteManifest removes the manifest d; an absent one is not an error.
func (s *Store) DeleteManifest(ctx context.Context, d digest.Digest) error {
	key, err := s.digestKey("manifests", d)
	if err != nil {
		return err
	}
	return s.wrap(s.client.RemoveObject(ctx, s.bucket, key, minio.RemoveObjectOptions{}), key)
}

// get reads a small object whole, capped at maxManifest bytes.
func (s *Store) get(ctx context.Context, key string) ([]byte, minio.ObjectInfo, error) {
	core := minio.Core{Client: s.client}
	body, info, _, err := core.GetObject(ctx, s.bucket, key, minio.GetObjectOptions{})
	if err != nil {
		return nil, minio.ObjectInfo{}, s.wrap(err, key)
	}
	defer body.Close()
	data, err := io.ReadAll(io.LimitReader(body, maxManifest+1))
	if err != nil {
		return nil, minio.ObjectInfo{}, fmt.Errorf("s3: %s: %w", key, err)
	}
	if len(data) > maxManifest {
		return nil, minio.ObjectInfo{}, fmt.Errorf("s3: %s: more than %d bytes", key, maxManifest)
	}
	return data, info, nil
}

// errorCode is the S3 error code of err ("NoSuchKey"), or "".
func errorCode(err error) string {
	var resp minio.ErrorResponse
	if errors.As(err, &resp) {
		return resp.Code
	}
	return ""
}

// wrap names the key in err and maps a missing object to
// cache.ErrNotFound and a failed precondition to ErrPrecondition.
func (s *Store) wrap(err error, key string) error {
	if err == nil {
		return nil
	}
	var resp minio.ErrorResponse
	if errors.As(err, &resp) {
		switch {
		case resp.Code == minio.NoSuchKey:
			return fmt.Errorf("s3: %s: %w", key, cache.ErrNotFound)
		case resp.StatusCode == http.StatusPreconditionFailed,
			// AWS answers a conditional write that races another with 409.
			resp.Code == "ConditionalRequestConflict":
			return fmt.Errorf("s3: %s: %w (%s)", key, ErrPrecondition, resp.Code)
		}
	}
	return fmt.Errorf("s3: %s: %w", key, err)
}
