// Package tiered puts a shared tier, an S3 bucket several replicas use,
// under each replica's local store. The local store (Badger and blob files,
// with its memory layer) stays the hot tier with its own budget; the
// bucket holds what every replica must see:
//
//   - hosted/: what clients pushed. Blobs and manifests by digest, and the
//     hosted repositories' links, tags and referrers. The bucket is the
//     truth for these: a replica reads a hosted tag, link or tag list from
//     it on every request, so a push through one replica is pullable
//     through any other at once. A push is acknowledged only once its
//     bytes and its link are in the bucket.
//   - cache/: what upstreams delivered. Blobs and manifests by digest, and
//     the links of proxied repositories to them, so that a replica with an
//     empty disk serves them without asking the upstream. The referrers
//     ocimirror has seen for proxied subjects. Proxied tags stay per
//     replica, on their TTL.
//
// Everything under cache/ is a cache: losing any object of it (a bucket
// lifecycle rule, an operator) costs a refetch, never a wrong answer.
//
// When the bucket does not answer, reads fall back to the local tier and
// proxied writes are skipped (logged); hosted writes fail, so a push is
// never acknowledged without the bucket. After a failure the bucket is
// not asked again for downFor, then probed again.
package tiered

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/cache/s3"
)

// Bounds of what one request may make a replica read from the bucket.
const (
	// opTimeout bounds one metadata request to the bucket.
	opTimeout = 5 * time.Second
	// downFor is how long the bucket is left alone after a failure.
	downFor = 5 * time.Second
	// maxReferrers bounds the referrers of one subject.
	maxReferrers = 10_000
	// referrerReads bounds the referrer descriptors read at once.
	referrerReads = 8
)

// maxTags bounds the tags of one hosted repository listed (a variable
// for tests).
var maxTags = 100_000

// Store is a local store over a shared bucket. It is a cache.Store.
type Store struct {
	*cache.LRU
	cached *s3.Store
	hosted *s3.Store
	log    *slog.Logger
	opts   Options
	gc     gcState
	// conditional: the bucket honours If-Match (ProbeConditional).
	conditional bool

	downUntil atomic.Int64 // unix nanoseconds; 0: up
	mu        sync.Mutex
	lastErr   error
}

var (
	_ cache.Store       = (*Store)(nil)
	_ cache.SharedBlobs = (*Store)(nil)
)

// Options configure a Store.
type Options struct {
	// Self names this replica (its URL) as the holder of the eviction lease.
	Self string
	// MaxSize bounds the shared tier's cached content (0: no bound).
	MaxSize int64
	// GCInterval is how often the lease holder evicts (DefaultGCInterval if 0).
	GCInterval time.Duration
	Logger     *slog.Logger
}

// DefaultGCInterval is how often the shared tier is checked against its size.
const DefaultGCInterval = 10 * time.Minute

// New puts bucket under local, and starts recording accesses and (with
// MaxSize) evicting; Close stops both. It probes whether the bucket
// honours conditional writes (hosted tag deletes and the eviction lease
// use them); a bucket that does not answer yet is taken to honour them.
func New(ctx context.Context, local *cache.LRU, bucket *s3.Store, o Options) *Store {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.GCInterval <= 0 {
		o.GCInterval = DefaultGCInterval
	}
	log := o.Logger
	s := &Store{LRU: local, cached: bucket.Sub("cache/"), hosted: bucket.Sub("hosted/"), log: log, opts: o, conditional: true}
	defer s.startGC()
	pctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	if c, err := bucket.ProbeConditional(pctx); err == nil {
		s.conditional = c.IfMatch
		if !c.IfMatch {
			log.Warn("the shared tier's bucket ignores If-Match: a manifest deleted through one replica while another re-tags it may lose that tag")
		}
	} else {
		s.fail(err)
	}
	return s
}

// pingTimeout bounds Ping's request.
const pingTimeout = 2 * time.Second

// Ping reports whether the bucket answers (for /readyz): the last failure
// while the bucket is left alone after it, else a request now.
func (s *Store) Ping(ctx context.Context) error {
	if !s.up() {
		return s.down(nil)
	}
	ctx, cancel := context.WithTimeout(ctx, pingTimeout)
	defer cancel()
	err := s.cached.Ping(ctx)
	if err != nil {
		s.fail(err)
		return err
	}
	s.downUntil.Store(0)
	return nil
}

// up reports whether the bucket is worth asking.
func (s *Store) up() bool {
	t := s.downUntil.Load()
	return t == 0 || time.Now().UnixNano() >= t
}

// failed reports whether err is the bucket failing (not an answer such
// as not found, or a listing over its bound), and if so leaves the
// bucket alone for a while.
func (s *Store) failed(err error) bool {
	if err == nil || errors.Is(err, cache.ErrNotFound) || errors.Is(err, s3.ErrPrecondition) || errors.Is(err, context.Canceled) ||
		errors.Is(err, s3.ErrTooMany) || errors.Is(err, cache.ErrCorrupt) {
		return false
	}
	s.fail(err)
	return true
}

func (s *Store) fail(err error) {
	if s.downUntil.Swap(time.Now().Add(downFor).UnixNano()) == 0 {
		s.log.Warn("shared tier down: serving from the local tier", "err", err)
	}
	s.mu.Lock()
	s.lastErr = err
	s.mu.Unlock()
}

func opCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, opTimeout)
}

// down is the error for a hosted write the bucket did not take.
func (s *Store) down(err error) error {
	if err == nil {
		s.mu.Lock()
		err = s.lastErr
		s.mu.Unlock()
	}
	if err == nil {
		return cache.ErrSharedDown
	}
	return fmt.Errorf("%w: %w", cache.ErrSharedDown, err)
}

// tier is the bucket view of repository upstream: hosted/ or cache/.
func (s *Store) tier(upstream string) *s3.Store {
	if upstream == "" {
		return s.hosted
	}
	return s.cached
}

// repoPath names a repository in keys. "_" cannot start a path component
// of a repository name, so "<repo>/_x/" never prefixes another
// repository's keys.
func repoPath(k cache.RepoKey) string {
	if k.Upstream == "" {
		return k.Repo
	}
	return k.Upstream + "/" + k.Repo
}

func linkKey(k cache.RepoKey, kind cache.LinkKind, d digest.Digest) string {
	return "links/" + repoPath(k) + "/_" + string(kind) + "/" + d.String()
}

func tagKey(k cache.TagKey) string {
	return "tags/" + repoPath(cache.RepoKey{Upstream: k.Upstream, Repo: k.Repo}) + "/_t/" + k.Tag
}

func referrersPrefix(k cache.ReferrerKey) string {
	return "referrers/" + repoPath(cache.RepoKey{Upstream: k.Upstream, Repo: k.Repo}) + "/_r/" + k.Subject.String() + "/"
}

// GetManifest reads the local tier, then the bucket (hosted, then cached
// content), keeping what the bucket gives locally.
func (s *Store) GetManifest(ctx context.Context, d digest.Digest) (cache.Manifest, error) {
	m, err := s.LRU.GetManifest(ctx, d)
	if !errors.Is(err, cache.ErrNotFound) || !s.up() {
		return m, err
	}
	for _, t := range []*s3.Store{s.hosted, s.cached} {
		octx, cancel := opCtx(ctx)
		data, mt, gerr := t.GetManifest(octx, d)
		cancel()
		if gerr == nil {
			m = cache.Manifest{Digest: d, MediaType: mt, Data: data}
			if perr := s.LRU.PutManifest(ctx, m); perr != nil {
				s.log.Warn("keeping a manifest from the shared tier", "digest", d, "err", perr)
			}
			return m, nil
		}
		if s.failed(gerr) {
			break
		}
	}
	return cache.Manifest{}, err
}

// Link records the link locally and in the bucket, with the content it
// needs there: a hosted repository's blob or manifest, a proxied
// repository's manifest (proxied blobs go up through ShareBlob, by the
// replica that fetched them). A hosted link the bucket does not take is
// an error.
func (s *Store) Link(ctx context.Context, k cache.RepoKey, kind cache.LinkKind, d digest.Digest, origin cache.LinkOrigin) error {
	if err := s.LRU.Link(ctx, k, kind, d, origin); err != nil {
		return err
	}
	err := s.share(ctx, k, kind, d, origin)
	if err == nil {
		return nil
	}
	if k.Upstream == "" {
		return s.down(err)
	}
	s.log.Debug("shared tier: proxied link not shared", "upstream", k.Upstream, "repo", k.Repo, "digest", d, "err", err)
	return nil
}

func (s *Store) share(ctx context.Context, k cache.RepoKey, kind cache.LinkKind, d digest.Digest, origin cache.LinkOrigin) error {
	if !s.up() {
		return s.down(nil)
	}
	t := s.tier(k.Upstream)
	var err error
	switch {
	case kind == cache.LinkManifest:
		err = s.shareManifest(ctx, t, d)
	case k.Upstream == "":
		err = s.shareBlob(ctx, t, d)
	}
	if err == nil {
		octx, cancel := opCtx(ctx)
		_, err = t.PutKey(octx, linkKey(k, kind, d), []byte{byte(origin)})
		cancel()
	}
	s.failed(err)
	return err
}

func (s *Store) shareManifest(ctx context.Context, t *s3.Store, d digest.Digest) error {
	m, err := s.LRU.GetManifest(ctx, d)
	if err != nil {
		return err
	}
	octx, cancel := opCtx(ctx)
	defer cancel()
	return t.PutManifest(octx, d, m.MediaType, m.Data)
}

// shareBlob uploads the local blob d to t unless t holds it.
func (s *Store) shareBlob(ctx context.Context, t *s3.Store, d digest.Digest) error {
	rd, err := s.LRU.OpenBlob(ctx, d)
	if err != nil {
		return err
	}
	defer rd.Close()
	var r io.Reader = io.NewSectionReader(rd, 0, rd.Size())
	if fb, ok := rd.(cache.FileBlob); ok {
		// An *os.File goes up in parallel parts, without a buffer.
		f := fb.OSFile()
		if _, err := f.Seek(0, io.SeekStart); err != nil {
			return err
		}
		r = f
	}
	return t.Put(ctx, d, rd.Size(), r)
}

// ShareBlob uploads the committed local blob d to the bucket's cached
// content, unless it is there.
func (s *Store) ShareBlob(ctx context.Context, d digest.Digest) error {
	if !s.up() {
		return s.down(nil)
	}
	err := s.shareBlob(ctx, s.cached, d)
	s.failed(err)
	return err
}

// StatShared returns the size of blob d in the bucket (hosted or cached
// content), or cache.ErrNotFound; an unreachable bucket is not found.
func (s *Store) StatShared(ctx context.Context, d digest.Digest) (int64, error) {
	if !s.up() {
		return 0, cache.ErrNotFound
	}
	for _, t := range []*s3.Store{s.hosted, s.cached} {
		octx, cancel := opCtx(ctx)
		size, err := t.Stat(octx, d)
		cancel()
		if err == nil {
			return size, nil
		}
		if s.failed(err) {
			return 0, cache.ErrNotFound
		}
		if !errors.Is(err, cache.ErrNotFound) {
			return 0, err
		}
	}
	return 0, cache.ErrNotFound
}

// OpenShared reads blob d from the bucket from offset on.
func (s *Store) OpenShared(ctx context.Context, d digest.Digest, offset int64) (io.ReadCloser, error) {
	if !s.up() {
		return nil, s.down(nil)
	}
	var err error
	for _, t := range []*s3.Store{s.hosted, s.cached} {
		var body io.ReadCloser
		if body, err = t.Open(ctx, d, offset); err == nil {
			return body, nil
		}
		if s.failed(err) || !errors.Is(err, cache.ErrNotFound) {
			return nil, err
		}
	}
	return nil, err
}

// Unlink removes the link locally and from the bucket.
func (s *Store) Unlink(ctx context.Context, k cache.RepoKey, kind cache.LinkKind, d digest.Digest) (bool, error) {
	had, err := s.LRU.Unlink(ctx, k, kind, d)
	if err != nil {
		return had, err
	}
	if k.Upstream == "" {
		// The bucket's link is the truth: its absence here says nothing.
		if !s.up() {
			return had, s.down(nil)
		}
		octx, cancel := opCtx(ctx)
		defer cancel()
		if _, serr := s.hosted.StatKey(octx, linkKey(k, kind, d)); serr == nil {
			had = true
		} else if s.failed(serr) {
			return had, s.down(serr)
		}
		if derr := s.hosted.DeleteKey(octx, linkKey(k, kind, d)); s.failed(derr) {
			return had, s.down(derr)
		}
		return had, nil
	}
	if s.up() {
		octx, cancel := opCtx(ctx)
		defer cancel()
		s.failed(s.cached.DeleteKey(octx, linkKey(k, kind, d)))
	}
	return had, nil
}

// Linked answers a hosted repository's link from the bucket (the local
// tier when the bucket does not answer), a proxied one's from the local
// tier, then the bucket.
func (s *Store) Linked(ctx context.Context, k cache.RepoKey, kind cache.LinkKind, d digest.Digest) (cache.LinkOrigin, bool, error) {
	if k.Upstream != "" {
		origin, ok, err := s.LRU.Linked(ctx, k, kind, d)
		if err != nil || ok || !s.up() {
			return origin, ok, err
		}
		octx, cancel := opCtx(ctx)
		_, serr := s.cached.StatKey(octx, linkKey(k, kind, d))
		cancel()
		if serr != nil {
			s.failed(serr)
			return origin, false, nil
		}
		// The upstream delivered it to some replica for this repository.
		if err := s.LRU.Link(ctx, k, kind, d, cache.OriginUpstream); err != nil {
			return origin, false, err
		}
		return cache.OriginUpstream, true, nil
	}
	if s.up() {
		octx, cancel := opCtx(ctx)
		data, _, err := s.hosted.Get(octx, linkKey(k, kind, d))
		cancel()
		switch {
		case err == nil:
			origin := cache.OriginPushed
			if len(data) == 1 && cache.LinkOrigin(data[0]) == cache.OriginUpstream {
				origin = cache.OriginUpstream
			}
			// Kept locally too, for when the bucket does not answer.
			if _, ok, err := s.LRU.Linked(ctx, k, kind, d); err == nil && !ok {
				if err := s.LRU.Link(ctx, k, kind, d, origin); err != nil {
					s.log.Warn("keeping a hosted link locally", "repo", k.Repo, "digest", d, "err", err)
				}
			}
			return origin, true, nil
		case errors.Is(err, cache.ErrNotFound):
			return 0, false, nil
		}
		s.failed(err)
	}
	return s.LRU.Linked(ctx, k, kind, d)
}

// GetTag reads a hosted tag from the bucket (the local tier when the
// bucket does not answer); a proxied one from the local tier.
func (s *Store) GetTag(ctx context.Context, k cache.TagKey) (cache.TagEntry, error) {
	if k.Upstream != "" || !s.up() {
		return s.LRU.GetTag(ctx, k)
	}
	e, _, err := s.getTag(ctx, k)
	if s.failed(err) {
		return s.LRU.GetTag(ctx, k)
	}
	if err == nil {
		// Kept locally too, for when the bucket does not answer.
		if old, lerr := s.LRU.GetTag(ctx, k); lerr != nil || old.Digest != e.Digest {
			if perr := s.LRU.PutTag(ctx, k, e); perr != nil {
				s.log.Warn("keeping a hosted tag locally", "repo", k.Repo, "tag", k.Tag, "err", perr)
			}
		}
	}
	return e, err
}

// sharedTag is a hosted tag's object: its entry as JSON. An empty object
// is a tag deleted by DeleteTagIf.
type sharedTag struct {
	Digest    digest.Digest `json:"digest"`
	MediaType string        `json:"mediaType"`
	Size      int64         `json:"size"`
	At        time.Time     `json:"at"`
}

func (s *Store) getTag(ctx context.Context, k cache.TagKey) (cache.TagEntry, string, error) {
	octx, cancel := opCtx(ctx)
	defer cancel()
	data, etag, err := s.hosted.Get(octx, tagKey(k))
	if err != nil {
		return cache.TagEntry{}, "", err
	}
	if len(data) == 0 {
		return cache.TagEntry{}, etag, fmt.Errorf("tag %s: deleted: %w", k.Tag, cache.ErrNotFound)
	}
	var t sharedTag
	if err := json.Unmarshal(data, &t); err != nil || t.Digest.Validate() != nil {
		return cache.TagEntry{}, etag, fmt.Errorf("shared tier: tag %s: %w", k.Tag, cache.ErrCorrupt)
	}
	return cache.TagEntry{Digest: t.Digest, MediaType: t.MediaType, Size: t.Size, CheckedAt: t.At}, etag, nil
}

// PutTag writes a hosted tag to the bucket, then locally: one PUT, which
// S3 makes visible whole, so of two replicas tagging at once one wins and
// neither is torn.
func (s *Store) PutTag(ctx context.Context, k cache.TagKey, e cache.TagEntry) error {
	if k.Upstream != "" {
		return s.LRU.PutTag(ctx, k, e)
	}
	if !s.up() {
		return s.down(nil)
	}
	data, err := json.Marshal(sharedTag{Digest: e.Digest, MediaType: e.MediaType, Size: e.Size, At: e.CheckedAt})
	if err != nil {
		return err
	}
	octx, cancel := opCtx(ctx)
	_, err = s.hosted.PutKey(octx, tagKey(k), data)
	cancel()
	if err != nil {
		s.failed(err)
		return s.down(err)
	}
	return s.LRU.PutTag(ctx, k, e)
}

// DeleteTag deletes a hosted tag from the bucket too.
func (s *Store) DeleteTag(ctx context.Context, k cache.TagKey) error {
	if err := s.LRU.DeleteTag(ctx, k); err != nil || k.Upstream != "" {
		return err
	}
	if !s.up() {
		return s.down(nil)
	}
	octx, cancel := opCtx(ctx)
	defer cancel()
	if err := s.hosted.DeleteKey(octx, tagKey(k)); s.failed(err) {
		return s.down(err)
	}
	return nil
}

// DeleteTagIf deletes a hosted tag only while it points at d: the tag
// object is swapped for an empty one with If-Match on the ETag read, so a
// replica that re-tagged it meanwhile keeps its tag. On a bucket that
// ignores If-Match the check and the delete are two steps.
func (s *Store) DeleteTagIf(ctx context.Context, k cache.TagKey, d digest.Digest) error {
	if k.Upstream != "" {
		if e, err := s.LRU.GetTag(ctx, k); err != nil || e.Digest != d {
			return nil
		}
		return s.LRU.DeleteTag(ctx, k)
	}
	if !s.up() {
		return s.down(nil)
	}
	e, etag, err := s.getTag(ctx, k)
	if errors.Is(err, cache.ErrNotFound) {
		return s.LRU.DeleteTag(ctx, k)
	}
	if err != nil {
		s.failed(err)
		return s.down(err)
	}
	if e.Digest != d {
		return nil
	}
	octx, cancel := opCtx(ctx)
	defer cancel()
	if s.conditional {
		_, err = s.hosted.CompareAndSwap(octx, tagKey(k), etag, nil)
	} else {
		err = s.hosted.DeleteKey(octx, tagKey(k))
	}
	if errors.Is(err, s3.ErrPrecondition) {
		return nil // re-tagged meanwhile: the newer tag stands
	}
	if err != nil {
		s.failed(err)
		return s.down(err)
	}
	return s.LRU.DeleteTag(ctx, k)
}

// ListTags lists a hosted repository's tags from the bucket, by name only
// (each entry is read by GetTag); a proxied repository's from the local
// tier.
func (s *Store) ListTags(ctx context.Context, upstream, repo string) ([]cache.Tag, error) {
	if upstream != "" || !s.up() {
		return s.LRU.ListTags(ctx, upstream, repo)
	}
	prefix := tagKey(cache.TagKey{Repo: repo})
	octx, cancel := opCtx(ctx)
	objs, err := s.hosted.List(octx, prefix, maxTags)
	cancel()
	if err != nil {
		if s.failed(err) {
			return s.LRU.ListTags(ctx, upstream, repo)
		}
		return nil, err
	}
	tags := make([]cache.Tag, 0, len(objs))
	for _, o := range objs {
		if o.Size > 0 && !strings.Contains(o.Key, "/") {
			tags = append(tags, cache.Tag{Name: o.Key})
		}
	}
	slices.SortFunc(tags, func(a, b cache.Tag) int { return strings.Compare(a.Name, b.Name) })
	return tags, nil
}

// PutReferrer records the referrer locally and in the bucket; a hosted
// one the bucket does not take is an error.
func (s *Store) PutReferrer(ctx context.Context, k cache.ReferrerKey, d v1.Descriptor) error {
	if err := s.LRU.PutReferrer(ctx, k, d); err != nil {
		return err
	}
	err := s.putReferrer(ctx, k, d)
	if err != nil && k.Upstream == "" {
		return s.down(err)
	}
	return nil
}

func (s *Store) putReferrer(ctx context.Context, k cache.ReferrerKey, d v1.Descriptor) error {
	if !s.up() {
		return s.down(nil)
	}
	data, err := json.Marshal(d)
	if err != nil {
		return err
	}
	octx, cancel := opCtx(ctx)
	defer cancel()
	_, err = s.tier(k.Upstream).PutKey(octx, referrersPrefix(k)+d.Digest.String(), data)
	s.failed(err)
	return err
}

// DeleteReferrer removes the referrer locally and from the bucket.
func (s *Store) DeleteReferrer(ctx context.Context, k cache.ReferrerKey, referrer digest.Digest) error {
	if err := s.LRU.DeleteReferrer(ctx, k, referrer); err != nil {
		return err
	}
	if !s.up() {
		if k.Upstream == "" {
			return s.down(nil)
		}
		return nil
	}
	octx, cancel := opCtx(ctx)
	defer cancel()
	if err := s.tier(k.Upstream).DeleteKey(octx, referrersPrefix(k)+referrer.String()); s.failed(err) && k.Upstream == "" {
		return s.down(err)
	}
	return nil
}

// ListReferrers returns the subject's referrers the bucket holds, with
// (for a proxied repository) those of the local tier; the local tier's
// alone when the bucket does not answer.
func (s *Store) ListReferrers(ctx context.Context, k cache.ReferrerKey) ([]v1.Descriptor, error) {
	local, err := s.LRU.ListReferrers(ctx, k)
	if err != nil || !s.up() {
		return local, err
	}
	shared, serr := s.listReferrers(ctx, k)
	if serr != nil {
		if s.failed(serr) {
			return local, nil
		}
		return nil, serr
	}
	if k.Upstream == "" {
		return shared, nil
	}
	seen := make(map[digest.Digest]bool, len(shared))
	for _, d := range shared {
		seen[d.Digest] = true
	}
	for _, d := range local {
		if !seen[d.Digest] {
			shared = append(shared, d)
		}
	}
	slices.SortFunc(shared, func(a, b v1.Descriptor) int { return strings.Compare(string(a.Digest), string(b.Digest)) })
	return shared, nil
}

func (s *Store) listReferrers(ctx context.Context, k cache.ReferrerKey) ([]v1.Descriptor, error) {
	t := s.tier(k.Upstream)
	octx, cancel := opCtx(ctx)
	defer cancel()
	objs, err := t.List(octx, referrersPrefix(k), maxReferrers)
	if err != nil {
		return nil, err
	}
	out := make([]v1.Descriptor, len(objs))
	errs := make([]error, len(objs))
	sem := make(chan struct{}, referrerReads)
	var wg sync.WaitGroup
	for i, o := range objs {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			data, _, err := t.Get(octx, referrersPrefix(k)+o.Key)
			if err != nil {
				errs[i] = err
				return
			}
			var d v1.Descriptor
			if err := json.NewDecoder(bytes.NewReader(data)).Decode(&d); err != nil || d.Digest.String() != o.Key || d.Digest.Validate() != nil {
				errs[i] = fmt.Errorf("shared tier: referrer %s: %w", o.Key, cache.ErrCorrupt)
				return
			}
			out[i] = d
		}()
	}
	wg.Wait()
	kept := out[:0]
	for i, d := range out {
		switch err := errs[i]; {
		case err == nil:
			kept = append(kept, d)
		case errors.Is(err, cache.ErrNotFound):
			// deleted between the listing and the read
		case errors.Is(err, cache.ErrCorrupt):
			s.log.Warn("shared tier: skipping a corrupt referrer", "subject", k.Subject, "err", err)
		default:
			return nil, err
		}
	}
	return kept, nil
}
