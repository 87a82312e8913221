package s3

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/opencontainers/go-digest"
)

// Keyed objects are small objects under a name of the caller's choosing
// (hosted tags, the eviction lease), written with HTTP preconditions so that two
// replicas updating one key do not lose one another's write.
//
// A store may ignore the preconditions: then PutIfAbsent overwrites and
// CompareAndSwap replaces whatever is there, and the last writer wins.
// ProbeConditional reports which of the two a store honours.
//
// SeaweedFS (7506e5f91cd6, weed server with -s3, anonymous, no versioning)
// honours both, as AWS S3 does (TestSeaweedFS/Conditional):
//   - PUT If-None-Match: * on an existing key: 412 PreconditionFailed;
//     on a new key: 200.
//   - PUT If-Match: "<etag>" with a stale ETag: 412 PreconditionFailed;
//     with the current one: 200 and a new ETag (the MD5 of the bytes).
//   - PUT If-Match (an ETag or *) on an absent key: 404 NoSuchKey, which
//     CompareAndSwap reports as ErrPrecondition.
//   - DELETE If-Match: "<stale etag>": 412 (not used yet).
//   - Racing writers: of 8 concurrent conditional PUTs to one key (all
//     If-None-Match: * on a new key, or all If-Match on the same ETag),
//     exactly one gets 200 and seven get 412, but SeaweedFS answers the
//     losers one by one about 1 s apart (the last after about 5 s), while
//     8 unconditional PUTs to one key all finish within 70 ms. A hot
//     key contended by N replicas costs its losers up to N-1 seconds.

// reserved are the prefixes the store keeps for content by digest.
var reserved = []string{"blobs/", "manifests/"}

func checkKey(key string) error {
	if key == "" || strings.HasPrefix(key, "/") {
		return fmt.Errorf("s3: key %q: want a relative name", key)
	}
	for _, p := range reserved {
		if strings.HasPrefix(key, p) {
			return fmt.Errorf("s3: key %q: %s is the store's own", key, p)
		}
	}
	return nil
}

// Get returns the object key and its ETag, or cache.ErrNotFound.
func (s *Store) Get(ctx context.Context, key string) (data []byte, etag string, err error) {
	if err := checkKey(key); err != nil {
		return nil, "", err
	}
	data, info, err := s.get(ctx, s.prefix+key)
	if err != nil {
		return nil, "", err
	}
	return data, info.ETag, nil
}

// PutIfAbsent writes key only if no object has that name
// (If-None-Match: *), and returns the new ETag. It returns ErrPrecondition
// when the key exists, on a store that honours the precondition.
func (s *Store) PutIfAbsent(ctx context.Context, key string, data []byte) (etag string, err error) {
	opts := minio.PutObjectOptions{DisableMultipart: true}
	opts.SetMatchETagExcept("*")
	return s.putKey(ctx, key, data, opts)
}

// CompareAndSwap replaces key only if its ETag is still oldETag
// (If-Match), and returns the new ETag. It returns ErrPrecondition when
// the object changed or is gone, on a store that honours the
// precondition.
func (s *Store) CompareAndSwap(ctx context.Context, key, oldETag string, data []byte) (etag string, err error) {
	if oldETag == "" || oldETag == "*" {
		return "", fmt.Errorf("s3: key %q: CompareAndSwap needs the ETag read", key)
	}
	opts := minio.PutObjectOptions{DisableMultipart: true}
	opts.SetMatchETag(oldETag)
	etag, err = s.putKey(ctx, key, data, opts)
	if errors.Is(err, errNoSuchKey) {
		return "", fmt.Errorf("s3: %s: gone: %w", key, ErrPrecondition)
	}
	return etag, err
}

// DeleteKey removes key; an absent key is not an error.
func (s *Store) DeleteKey(ctx context.Context, key string) error {
	if err := checkKey(key); err != nil {
		return err
	}
	key = s.prefix + key
	return s.wrap(s.client.RemoveObject(ctx, s.bucket, key, minio.RemoveObjectOptions{}), key)
}

// PutKey writes key whatever is there: the last writer wins.
func (s *Store) PutKey(ctx context.Context, key string, data []byte) (etag string, err error) {
	return s.putKey(ctx, key, data, minio.PutObjectOptions{DisableMultipart: true})
}

// StatKey returns the size of the object key, or cache.ErrNotFound.
func (s *Store) StatKey(ctx context.Context, key string) (int64, error) {
	if err := checkKey(key); err != nil {
		return 0, err
	}
	key = s.prefix + key
	info, err := s.client.StatObject(ctx, s.bucket, key, minio.StatObjectOptions{})
	if err != nil {
		return 0, s.wrap(err, key)
	}
	return info.Size, nil
}

// Object is a key and its size, as List gives them.
type Object struct {
	Key      string // relative to the view's prefix and the listed prefix
	Size     int64
	Modified time.Time
}

// ErrTooMany is returned by List when more than max objects match.
var ErrTooMany = errors.New("s3: more objects than the limit")

// List returns the objects whose keys start with prefix, ordered by key,
// with prefix cut from their names. More than max of them is ErrTooMany:
// a listing is bounded by construction.
func (s *Store) List(ctx context.Context, prefix string, max int) ([]Object, error) {
	if err := checkKey(prefix); err != nil {
		return nil, err
	}
	objs, more, err := s.list(ctx, prefix, max)
	if err == nil && more {
		err = fmt.Errorf("s3: %s: %w (%d)", s.prefix+prefix, ErrTooMany, max)
	}
	return objs, err
}

// ListContent returns the blobs (kind "blobs") or manifests ("manifests")
// the view holds, by digest, with sizes and times: the first max of them,
// and whether there are more.
func (s *Store) ListContent(ctx context.Context, kind string, max int) (_ []Content, more bool, _ error) {
	if kind != "blobs" && kind != "manifests" {
		return nil, false, fmt.Errorf("s3: no content kind %q", kind)
	}
	objs, more, err := s.list(ctx, kind+"/", max)
	if err != nil {
		return nil, false, err
	}
	out := make([]Content, 0, len(objs))
	for _, o := range objs {
		// <algorithm>/<two hex>/<hex>
		alg, rest, _ := strings.Cut(o.Key, "/")
		_, hex, _ := strings.Cut(rest, "/")
		d := digest.NewDigestFromEncoded(digest.Algorithm(alg), hex)
		if d.Validate() != nil {
			continue // not ours
		}
		out = append(out, Content{Digest: d, Size: o.Size, Modified: o.Modified})
	}
	return out, more, nil
}

// Content is a blob or manifest as ListContent gives it.
type Content struct {
	Digest   digest.Digest
	Size     int64
	Modified time.Time
}

// list returns the first max objects under prefix, and whether there
// are more.
func (s *Store) list(ctx context.Context, prefix string, max int) ([]Object, bool, error) {
	full := s.prefix + prefix
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var out []Object
	for o := range s.client.ListObjects(ctx, s.bucket, minio.ListObjectsOptions{Prefix: full, Recursive: true}) {
		if o.Err != nil {
			return nil, false, s.wrap(o.Err, full)
		}
		if len(out) == max {
			return out, true, nil
		}
		out = append(out, Object{Key: strings.TrimPrefix(o.Key, full), Size: o.Size, Modified: o.LastModified})
	}
	return out, false, nil
}

var errNoSuchKey = errors.New("no such key")

func (s *Store) putKey(ctx context.Context, key string, data []byte, opts minio.PutObjectOptions) (string, error) {
	if err := checkKey(key); err != nil {
		return "", err
	}
	if len(data) > maxManifest {
		return "", fmt.Errorf("s3: key %q: %d bytes, more than %d", key, len(data), maxManifest)
	}
	opts.ContentType = "application/octet-stream"
	key = s.prefix + key
	info, err := s.client.PutObject(ctx, s.bucket, key, bytes.NewReader(data), int64(len(data)), opts)
	if errorCode(err) == minio.NoSuchKey {
		// AWS answers If-Match on an absent key with 404.
		return "", fmt.Errorf("s3: %s: %w", key, errNoSuchKey)
	}
	if err != nil {
		return "", s.wrap(err, key)
	}
	return info.ETag, nil
}

// Conditional says which write preconditions a store honours.
type Conditional struct {
	// IfNoneMatch: a PUT with If-None-Match: * fails on an existing key.
	IfNoneMatch bool
	// IfMatch: a PUT with If-Match: <other ETag> fails.
	IfMatch bool
}

// ProbeConditional finds out which preconditions the store honours, with
// writes to a key of its own under probe/ that it removes after.
func (s *Store) ProbeConditional(ctx context.Context) (Conditional, error) {
	key := "probe/conditional-" + rand.Text()
	defer s.DeleteKey(context.WithoutCancel(ctx), key)
	var c Conditional
	etag, err := s.PutIfAbsent(ctx, key, []byte("1"))
	if err != nil {
		return c, err
	}
	switch _, err := s.PutIfAbsent(ctx, key, []byte("2")); {
	case errors.Is(err, ErrPrecondition):
		c.IfNoneMatch = true
	case err != nil:
		return c, err
	}
	// The ETag of "1" is stale once "2" is written; on a store that
	// refused "2", write "3" to make it stale.
	if c.IfNoneMatch {
		if _, err := s.client.PutObject(ctx, s.bucket, key, strings.NewReader("3"), 1, minio.PutObjectOptions{DisableMultipart: true}); err != nil {
			return c, s.wrap(err, key)
		}
	}
	switch _, err := s.CompareAndSwap(ctx, key, etag, []byte("4")); {
	case errors.Is(err, ErrPrecondition):
		c.IfMatch = true
	case err != nil:
		return c, err
	}
	return c, nil
}
