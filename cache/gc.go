package cache

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"

	"github.com/ocimirror/ocimirror/manifest"
)

// DefaultGCGrace is how long data stays after nothing references it.
const DefaultGCGrace = 24 * time.Hour

// Garbage is one piece of content a collection removes (or, dry, would).
type Garbage struct {
	Kind LinkKind
	// Repo is set for a link dropped because no manifest of its
	// repository names the blob.
	Repo   RepoKey
	Digest digest.Digest
	Size   int64
	// Since is when it became garbage.
	Since time.Time
}

// Collected sums up a collection.
type Collected struct {
	Items []Garbage
	Bytes int64
}

// maxGarbageItems bounds the items a collection reports one by one.
const maxGarbageItems = 10000

// CollectGarbage deletes data that nothing references any more, once it
// has been so for the grace period:
//   - a blob linked to a repository only as pushed (a hosted repository,
//     or a push kept locally by a proxied one) that no manifest of that
//     repository names: its link goes;
//   - blobs and manifests that no repository holds (after a DELETE, or
//     such a link's going): their bytes go.
//
// Cached content is not its business (eviction's is), nor uploads in
// progress (temporary files), nor a blob a client is reading. With dry,
// nothing changes and the result says what would go.
func (s *Badger) CollectGarbage(ctx context.Context, grace time.Duration, dry bool) (Collected, error) {
	var c Collected
	cutoff := s.now().Add(-grace)
	err := s.unreferencedLinks(ctx, cutoff, dry, &c)
	if err == nil {
		err = s.unheldContent(ctx, cutoff, dry, &c)
	}
	if !dry && c.Bytes > 0 {
		s.metrics.gcDeleted.Add(c.Bytes)
	}
	return c, err
}

func (c *Collected) add(g Garbage) {
	c.Bytes += g.Size
	if len(c.Items) < maxGarbageItems {
		c.Items = append(c.Items, g)
	}
}

// unreferencedLinks drops the pushed blob links that no manifest of their
// repository names, made before cutoff. Links of an older layout have no
// time: they are given one now, and a grace from now.
func (s *Badger) unreferencedLinks(ctx context.Context, cutoff time.Time, dry bool, c *Collected) error {
	type blobLink struct {
		d  digest.Digest
		at time.Time
	}
	var (
		repo      []byte // l<upstream>0<repo>0 of the group being read
		manifests []digest.Digest
		blobs     []blobLink
		stamp     [][]byte
	)
	flush := func() error {
		if repo == nil || len(blobs) == 0 {
			return nil
		}
		k := repoKeyOf(repo)
		named := map[digest.Digest]bool{}
		for _, md := range manifests {
			m, err := s.GetManifest(ctx, md)
			if err != nil {
				continue
			}
			p, err := manifest.Parse(m.MediaType, m.Data)
			if err != nil {
				continue
			}
			if p.Config != nil {
				named[p.Config.Digest] = true
			}
			for _, l := range p.Layers {
				named[l.Digest] = true
			}
		}
		for _, b := range blobs {
			if named[b.d] || b.at.After(cutoff) {
				continue
			}
			size := int64(0)
			if info, err := s.StatBlob(ctx, b.d); err == nil {
				size = info.Size
			}
			g := Garbage{Kind: LinkBlob, Repo: k, Digest: b.d, Size: size, Since: b.at}
			if !dry {
				if _, err := s.Unlink(ctx, k, LinkBlob, b.d); err != nil {
					return err
				}
				// Held nowhere else now? Its grace has passed: it goes.
				if ok, err := s.collectUnheld(ctx, LinkBlob, b.d, s.now()); err != nil || !ok {
					g.Size = 0
					if err != nil {
						return err
					}
				}
			}
			c.add(g)
		}
		return nil
	}
	err := s.scan([]byte{kindLink}, true, func(key, v []byte) error {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		up, rest, ok1 := bytes.Cut(key[1:], []byte{0})
		name, rest, ok2 := bytes.Cut(rest, []byte{0})
		if !ok1 || !ok2 || len(rest) < 2 {
			return nil
		}
		group := key[:1+len(up)+1+len(name)+1]
		if !bytes.Equal(group, repo) {
			if err := flush(); err != nil {
				return err
			}
			repo, manifests, blobs = bytes.Clone(group), manifests[:0], blobs[:0]
		}
		kind, d := LinkKind(rest[0]), digest.Digest(rest[1:])
		if kind == LinkManifest {
			manifests = append(manifests, d)
			return nil
		}
		hosted := len(up) == 0
		if linkOrigin(v) != OriginPushed && !hosted {
			return nil // the upstream's: cache, not data
		}
		at := linkTime(v)
		if at.IsZero() {
			stamp = append(stamp, bytes.Clone(key))
			return nil
		}
		blobs = append(blobs, blobLink{d: d, at: at})
		return nil
	})
	if err == nil {
		err = flush()
	}
	if err != nil || dry || len(stamp) == 0 {
		return err
	}
	return s.stampLinks(stamp)
}

// repoKeyOf reads a link key group l<upstream>0<repo>0.
func repoKeyOf(group []byte) RepoKey {
	up, rest, _ := bytes.Cut(group[1:], []byte{0})
	return RepoKey{Upstream: string(up), Repo: string(bytes.TrimSuffix(rest, []byte{0}))}
}

// stampLinks gives links of an older layout the time of now.
func (s *Badger) stampLinks(keys [][]byte) error {
	return s.db.Update(func(txn *badger.Txn) error {
		for _, key := range keys {
			item, err := txn.Get(key)
			if err != nil {
				continue
			}
			var origin LinkOrigin
			_ = item.Value(func(v []byte) error { origin = linkOrigin(v); return nil })
			if err := txn.Set(key, linkValue(origin, s.now())); err != nil {
				return err
			}
		}
		return nil
	})
}

// unheldContent deletes the content no repository has held since before
// cutoff.
func (s *Badger) unheldContent(ctx context.Context, cutoff time.Time, dry bool, c *Collected) error {
	var found []Garbage
	err := s.scan([]byte{kindUnheld}, true, func(key, v []byte) error {
		if len(key) < 3 || len(v) != 8 {
			return nil
		}
		since := time.Unix(int64(binary.BigEndian.Uint64(v)), 0)
		if since.After(cutoff) {
			return nil
		}
		found = append(found, Garbage{Kind: LinkKind(key[1]), Digest: digest.Digest(key[2:]), Since: since})
		return ctx.Err()
	})
	if err != nil {
		return err
	}
	for _, g := range found {
		if g.Kind == LinkBlob {
			if info, err := s.StatBlob(ctx, g.Digest); err == nil {
				g.Size = info.Size
			}
		} else if m, err := s.GetManifest(ctx, g.Digest); err == nil {
			g.Size = int64(len(m.Data))
		}
		if !dry {
			ok, err := s.collectUnheld(ctx, g.Kind, g.Digest, cutoff)
			if err != nil {
				return err
			}
			if !ok {
				continue
			}
		}
		c.add(g)
	}
	return nil
}

// collectUnheld deletes content that is still held by nothing, unheld
// since before cutoff, and not being read. It reports whether it did.
func (s *Badger) collectUnheld(ctx context.Context, kind LinkKind, d digest.Digest, cutoff time.Time) (bool, error) {
	if kind == LinkBlob && s.reading(d) {
		return false, nil
	}
	ok, err := s.collectLocked(kind, d, cutoff)
	if ok {
		if hook := s.onEvict.Load(); hook != nil {
			(*hook)(kind, d)
		}
	}
	return ok, err
}

func (s *Badger) collectLocked(kind LinkKind, d digest.Digest, cutoff time.Time) (bool, error) {
	unlock := s.lockDigest(d)
	defer unlock()
	var since time.Time
	err := s.get(unheldKey(kind, d), func(v []byte) error {
		if len(v) == 8 {
			since = time.Unix(int64(binary.BigEndian.Uint64(v)), 0)
		}
		return nil
	})
	if errors.Is(err, ErrNotFound) || since.IsZero() || since.After(cutoff) {
		return false, nil // held again, or not for long enough
	}
	if err != nil {
		return false, err
	}
	if err := s.deleteLocked(kind, d); err != nil {
		return false, err
	}
	return true, s.db.Update(func(txn *badger.Txn) error { return txn.Delete(unheldKey(kind, d)) })
}

// collectOnce runs a collection in the background and logs what it did.
func (s *Badger) collectOnce(grace time.Duration) {
	start := time.Now()
	c, err := s.CollectGarbage(s.ctx, grace, false)
	if err != nil || len(c.Items) > 0 {
		s.log.Info("garbage collected", "items", len(c.Items), "bytes", c.Bytes,
			"duration", time.Since(start).Round(time.Millisecond), "err", errString(err))
	}
}
