package cache

import (
	"context"

	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/opencontainers/go-digest"
)

// maxLRUManifest is the largest manifest kept in memory; bigger ones (rare:
// huge indexes) are read from the store each time.
const maxLRUManifest = 256 << 10

// LRU keeps hot manifests, tags and blob sizes of a Store in memory. Writes
// go to the store first, then to memory, so memory never holds what the
// store does not.
type LRU struct {
	Store
	manifests *lru.Cache[digest.Digest, Manifest]
	tags      *lru.Cache[TagKey, TagEntry]
	blobs     *lru.Cache[digest.Digest, BlobInfo]
}

var (
	_ Store   = (*LRU)(nil)
	_ Toucher = (*LRU)(nil)
)

// NewLRU wraps s with LRUs of the given entry counts.
func NewLRU(s Store, manifestEntries, metadataEntries int) (*LRU, error) {
	m, err := lru.New[digest.Digest, Manifest](manifestEntries)
	if err != nil {
		return nil, err
	}
	t, err := lru.New[TagKey, TagEntry](metadataEntries)
	if err != nil {
		return nil, err
	}
	b, err := lru.New[digest.Digest, BlobInfo](metadataEntries)
	if err != nil {
		return nil, err
	}
	return &LRU{Store: s, manifests: m, tags: t, blobs: b}, nil
}

// GetManifest implements ManifestStore.
func (c *LRU) GetManifest(ctx context.Context, d digest.Digest) (Manifest, error) {
	if m, ok := c.manifests.Get(d); ok {
		return m, nil
	}
	m, err := c.Store.GetManifest(ctx, d)
	if err == nil && len(m.Data) <= maxLRUManifest {
		c.manifests.Add(d, m)
	}
	return m, err
}

// PutManifest implements ManifestStore.
func (c *LRU) PutManifest(ctx context.Context, m Manifest) error {
	if err := c.Store.PutManifest(ctx, m); err != nil {
		return err
	}
	if len(m.Data) <= maxLRUManifest {
		c.manifests.Add(m.Digest, m)
	}
	return nil
}

// DeleteManifest implements ManifestStore.
func (c *LRU) DeleteManifest(ctx context.Context, d digest.Digest) error {
	c.manifests.Remove(d)
	return c.Store.DeleteManifest(ctx, d)
}

// DeleteBlob implements BlobStore.
func (c *LRU) DeleteBlob(ctx context.Context, d digest.Digest) error {
	c.blobs.Remove(d)
	return c.Store.DeleteBlob(ctx, d)
}

// GetTag implements TagStore.
func (c *LRU) GetTag(ctx context.Context, k TagKey) (TagEntry, error) {
	if e, ok := c.tags.Get(k); ok {
		return e, nil
	}
	e, err := c.Store.GetTag(ctx, k)
	if err == nil {
		c.tags.Add(k, e)
	}
	return e, err
}

// PutTag implements TagStore.
func (c *LRU) PutTag(ctx context.Context, k TagKey, e TagEntry) error {
	if err := c.Store.PutTag(ctx, k, e); err != nil {
		c.tags.Remove(k)
		return err
	}
	c.tags.Add(k, e)
	return nil
}

// DeleteTag implements TagStore.
func (c *LRU) DeleteTag(ctx context.Context, k TagKey) error {
	c.tags.Remove(k)
	return c.Store.DeleteTag(ctx, k)
}

// StatBlob implements BlobStore.
func (c *LRU) StatBlob(ctx context.Context, d digest.Digest) (BlobInfo, error) {
	if b, ok := c.blobs.Get(d); ok {
		return b, nil
	}
	b, err := c.Store.StatBlob(ctx, d)
	if err == nil {
		c.blobs.Add(d, b)
	}
	return b, err
}

// CreateBlob implements BlobStore; a commit also enters the LRU.
func (c *LRU) CreateBlob(ctx context.Context) (BlobWriter, error) {
	w, err := c.Store.CreateBlob(ctx)
	if err != nil {
		return nil, err
	}
	return &lruWriter{BlobWriter: w, c: c}, nil
}

type lruWriter struct {
	BlobWriter
	c *LRU
}

func (w *lruWriter) Commit(ctx context.Context, d digest.Digest, size int64) error {
	if err := w.BlobWriter.Commit(ctx, d, size); err != nil {
		return err
	}
	w.c.blobs.Add(d, BlobInfo{Digest: d, Size: size})
	return nil
}

// Touch implements Toucher when the store does.
func (c *LRU) Touch(d digest.Digest) {
	if t, ok := c.Store.(Toucher); ok {
		t.Touch(d)
	}
}
