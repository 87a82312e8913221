package cache

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"sync"

	"github.com/opencontainers/go-digest"

	"github.com/ocimirror/ocimirror/internal/lru"
)

// entryOverhead approximates what an LRU entry costs beyond its strings and
// bytes: list element, map slot, headers.
const entryOverhead = 128

// LRUOptions bounds the memory of an LRU.
type LRUOptions struct {
	// ManifestBytes bounds the manifests held, by their size.
	ManifestBytes int64
	// MetadataBytes bounds the tags, blob sizes and repository links held.
	MetadataBytes int64
	// ManifestEntries and MetadataEntries also bound the counts (0: no
	// count bound).
	ManifestEntries int
	MetadataEntries int
}

// LRU keeps hot manifests, tags, blob sizes and repository links of a Store
// in memory, each bounded in bytes. Writes go to the store first, then to
// memory, so memory never holds what the store does not. Only positive
// answers are kept.
type LRU struct {
	Store
	manifests guarded[digest.Digest, Manifest]
	tags      guarded[TagKey, TagEntry]
	blobs     guarded[digest.Digest, BlobInfo]
	links     guarded[linkRef, LinkOrigin]
}

// guarded is an LRU in front of the store. A miss reads the store and
// fills the LRU under a read lock; a write changes the store and the LRU
// under the write lock, so a miss that read the store before a write can
// never put the old value back after it (a deleted link served again, a
// moved tag moved back).
type guarded[K comparable, V any] struct {
	mu sync.RWMutex
	l  *lru.Sized[K, V]
	// own returns k and v with strings of their own: the caller's are
	// often slices of a request's line, which the LRU would otherwise
	// keep whole (and its cost estimate would not count).
	own func(K, V) (K, V)
}

func (g *guarded[K, V]) get(k K, load func() (V, error)) (V, error) {
	if v, ok := g.l.Get(k); ok {
		return v, nil
	}
	g.mu.RLock()
	defer g.mu.RUnlock()
	v, err := load()
	if err == nil {
		g.l.Add(g.own(k, v))
	}
	return v, err
}

// write runs store; on success the LRU holds *v (or nothing when v is nil).
func (g *guarded[K, V]) write(k K, v *V, store func() error) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.l.Remove(k)
	err := store()
	if err == nil && v != nil {
		g.l.Add(g.own(k, *v))
	}
	return err
}

type linkRef struct {
	repo   RepoKey
	kind   LinkKind
	digest digest.Digest
}

var (
	_ Store   = (*LRU)(nil)
	_ Toucher = (*LRU)(nil)
)

// NewLRU wraps s with in-memory LRUs. The metadata budget is shared out:
// half to tags, a quarter each to blob sizes and links.
func NewLRU(s Store, o LRUOptions) *LRU {
	c := &LRU{Store: s}
	c.manifests.l = lru.New(o.ManifestBytes, o.ManifestEntries, func(d digest.Digest, m Manifest) int64 {
		return int64(len(d)+len(m.MediaType)+len(m.Data)) + entryOverhead
	})
	c.tags.l = lru.New(o.MetadataBytes/2, o.MetadataEntries, func(k TagKey, e TagEntry) int64 {
		return int64(len(k.Upstream)+len(k.Repo)+len(k.Tag)+len(e.Digest)+len(e.MediaType)) + entryOverhead
	})
	c.blobs.l = lru.New(o.MetadataBytes/4, o.MetadataEntries, func(d digest.Digest, _ BlobInfo) int64 {
		return int64(2*len(d)) + entryOverhead
	})
	c.links.l = lru.New(o.MetadataBytes/4, o.MetadataEntries, func(l linkRef, _ LinkOrigin) int64 {
		return int64(len(l.repo.Upstream)+len(l.repo.Repo)+len(l.digest)) + entryOverhead
	})
	c.manifests.own = func(d digest.Digest, m Manifest) (digest.Digest, Manifest) {
		d = digest.Digest(strings.Clone(string(d)))
		m.Digest = d
		if cap(m.Data)-len(m.Data) > len(m.Data)/4 { // a read buffer, with room to spare
			m.Data = bytes.Clone(m.Data)
		}
		return d, m
	}
	c.tags.own = func(k TagKey, e TagEntry) (TagKey, TagEntry) {
		k.Upstream, k.Repo, k.Tag = strings.Clone(k.Upstream), strings.Clone(k.Repo), strings.Clone(k.Tag)
		return k, e
	}
	c.blobs.own = func(d digest.Digest, info BlobInfo) (digest.Digest, BlobInfo) {
		d = digest.Digest(strings.Clone(string(d)))
		info.Digest = d
		return d, info
	}
	c.links.own = func(l linkRef, o LinkOrigin) (linkRef, LinkOrigin) {
		l.repo.Upstream, l.repo.Repo = strings.Clone(l.repo.Upstream), strings.Clone(l.repo.Repo)
		l.digest = digest.Digest(strings.Clone(string(l.digest)))
		return l, o
	}
	if e, ok := s.(interface {
		OnEvict(func(LinkKind, digest.Digest))
	}); ok {
		e.OnEvict(c.forget)
	}
	return c
}

// MemoryBytes is what the LRUs hold, by their cost estimate.
func (c *LRU) MemoryBytes() int64 {
	return c.manifests.l.Bytes() + c.tags.l.Bytes() + c.blobs.l.Bytes() + c.links.l.Bytes()
}

// GetManifest implements ManifestStore.
func (c *LRU) GetManifest(ctx context.Context, d digest.Digest) (Manifest, error) {
	return c.manifests.get(d, func() (Manifest, error) { return c.Store.GetManifest(ctx, d) })
}

// PutManifest implements ManifestStore.
func (c *LRU) PutManifest(ctx context.Context, m Manifest) error {
	return c.manifests.write(m.Digest, &m, func() error { return c.Store.PutManifest(ctx, m) })
}

// DeleteManifest implements ManifestStore.
func (c *LRU) DeleteManifest(ctx context.Context, d digest.Digest) error {
	return c.manifests.write(d, nil, func() error { return c.Store.DeleteManifest(ctx, d) })
}

// StatBlob implements BlobStore.
func (c *LRU) StatBlob(ctx context.Context, d digest.Digest) (BlobInfo, error) {
	return c.blobs.get(d, func() (BlobInfo, error) { return c.Store.StatBlob(ctx, d) })
}

// OpenBlob implements BlobStore. A blob the store no longer has (evicted
// or collected between a stat and this open) leaves the LRU at once.
func (c *LRU) OpenBlob(ctx context.Context, d digest.Digest) (BlobReader, error) {
	r, err := c.Store.OpenBlob(ctx, d)
	if errors.Is(err, ErrNotFound) {
		c.forget(LinkBlob, d)
	}
	return r, err
}

// DeleteBlob implements BlobStore.
func (c *LRU) DeleteBlob(ctx context.Context, d digest.Digest) error {
	return c.blobs.write(d, nil, func() error { return c.Store.DeleteBlob(ctx, d) })
}

// GetTag implements TagStore.
func (c *LRU) GetTag(ctx context.Context, k TagKey) (TagEntry, error) {
	return c.tags.get(k, func() (TagEntry, error) { return c.Store.GetTag(ctx, k) })
}

// PutTag implements TagStore.
func (c *LRU) PutTag(ctx context.Context, k TagKey, e TagEntry) error {
	return c.tags.write(k, &e, func() error { return c.Store.PutTag(ctx, k, e) })
}

// DeleteTag implements TagStore.
func (c *LRU) DeleteTag(ctx context.Context, k TagKey) error {
	return c.tags.write(k, nil, func() error { return c.Store.DeleteTag(ctx, k) })
}

// Link implements RepoLinks. The store decides the origin (an upstream
// link is never downgraded), so the LRU learns it at the next read.
func (c *LRU) Link(ctx context.Context, k RepoKey, kind LinkKind, d digest.Digest, origin LinkOrigin) error {
	return c.links.write(linkRef{k, kind, d}, nil, func() error { return c.Store.Link(ctx, k, kind, d, origin) })
}

// Unlink implements RepoLinks.
func (c *LRU) Unlink(ctx context.Context, k RepoKey, kind LinkKind, d digest.Digest) (bool, error) {
	var existed bool
	err := c.links.write(linkRef{k, kind, d}, nil, func() error {
		var err error
		existed, err = c.Store.Unlink(ctx, k, kind, d)
		return err
	})
	return existed, err
}

// Linked implements RepoLinks; only links that exist are remembered.
func (c *LRU) Linked(ctx context.Context, k RepoKey, kind LinkKind, d digest.Digest) (LinkOrigin, bool, error) {
	o, err := c.links.get(linkRef{k, kind, d}, func() (LinkOrigin, error) {
		o, ok, err := c.Store.Linked(ctx, k, kind, d)
		if err == nil && !ok {
			err = ErrNotFound
		}
		return o, err
	})
	if errors.Is(err, ErrNotFound) {
		return 0, false, nil
	}
	return o, err == nil, err
}

// forget drops what the store evicted.
func (c *LRU) forget(kind LinkKind, d digest.Digest) {
	if kind == LinkBlob {
		_ = c.blobs.write(d, nil, func() error { return nil })
	} else {
		_ = c.manifests.write(d, nil, func() error { return nil })
	}
}

// Touch implements Toucher when the store does.
func (c *LRU) Touch(d digest.Digest) {
	if t, ok := c.Store.(Toucher); ok {
		t.Touch(d)
	}
}

var _ Importer = (*LRU)(nil)

// CommitImport implements Importer when the store does. The tags and links
// the import writes are forgotten in memory, under the write locks, so no
// miss that read the store before the commit puts an old answer back.
func (c *LRU) CommitImport(ctx context.Context, im *Import) error {
	imp, ok := c.Store.(Importer)
	if !ok {
		return errors.New("cache: the store cannot commit imports")
	}
	c.tags.mu.Lock()
	defer c.tags.mu.Unlock()
	c.links.mu.Lock()
	defer c.links.mu.Unlock()
	err := imp.CommitImport(ctx, im)
	for _, t := range im.Tags {
		c.tags.l.Remove(t.Key)
	}
	for _, l := range im.Links {
		c.links.l.Remove(linkRef{l.Repo, l.Kind, l.Digest})
	}
	return err
}

var (
	_ Purger  = (*LRU)(nil)
	_ Counter = (*LRU)(nil)
)

// PurgeTag implements Purger when the store does; the tag leaves memory
// under the write lock, as for any write.
func (c *LRU) PurgeTag(ctx context.Context, k TagKey) (Purged, error) {
	pg, ok := c.Store.(Purger)
	if !ok {
		return Purged{}, errors.New("cache: the store cannot purge")
	}
	var p Purged
	err := c.tags.write(k, nil, func() error {
		var err error
		p, err = pg.PurgeTag(ctx, k)
		return err
	})
	return p, err
}

// PurgeRepo implements Purger when the store does. The repository's tags
// and links leave memory under the write locks, after the store's purge,
// so no miss that read the store before it puts an old answer back.
// Manifests and blob sizes are kept by digest: a repository serves them
// only through a link.
func (c *LRU) PurgeRepo(ctx context.Context, k RepoKey) (Purged, error) {
	pg, ok := c.Store.(Purger)
	if !ok {
		return Purged{}, errors.New("cache: the store cannot purge")
	}
	c.tags.mu.Lock()
	defer c.tags.mu.Unlock()
	c.links.mu.Lock()
	defer c.links.mu.Unlock()
	p, err := pg.PurgeRepo(ctx, k)
	c.tags.l.RemoveFunc(func(t TagKey) bool { return t.Upstream == k.Upstream && t.Repo == k.Repo })
	c.links.l.RemoveFunc(func(l linkRef) bool { return l.repo == k })
	return p, err
}

// Count implements Counter when the store does.
func (c *LRU) Count(ctx context.Context) (Counts, error) {
	if n, ok := c.Store.(Counter); ok {
		return n.Count(ctx)
	}
	return Counts{}, errors.New("cache: the store cannot count")
}
