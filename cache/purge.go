package cache

import (
	"bytes"
	"context"
	"errors"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"
)

// Purged counts what a purge dropped.
type Purged struct {
	// Tags are tag entries; Manifests and Blobs, the repository's links
	// to them (the content stays until nothing holds it: then eviction
	// or garbage collection takes it, as for any unheld content).
	Tags      int `json:"tags"`
	Manifests int `json:"manifests"`
	Blobs     int `json:"blobs"`
	// Referrers are entries of the local referrers index;
	// UpstreamReferrers, the upstream referrers API's stored answers;
	// TagLists, the upstream's stored tag list.
	Referrers         int `json:"referrers"`
	UpstreamReferrers int `json:"upstreamReferrers"`
	TagLists          int `json:"tagLists"`
	// Pins are store pins (those of imported bundles).
	Pins int `json:"pins"`
}

// Purger drops what a store holds of an upstream's tag or repository, so
// that the next request for it goes to the upstream. Hosted repositories
// (Upstream "") are refused with ErrHosted. Purging what is not held is
// no error: nothing is dropped.
type Purger interface {
	// PurgeTag drops a tag and its store pin.
	PurgeTag(ctx context.Context, k TagKey) (Purged, error)
	// PurgeRepo drops a repository's tags, its links to content the
	// upstream delivered (a push kept locally is data and stays, with the
	// referrers index entries of what stays), its stored upstream tag
	// list and referrers answers, and its store pins.
	PurgeRepo(ctx context.Context, k RepoKey) (Purged, error)
}

// Counts are how many entries of each kind a store holds.
type Counts struct {
	Blobs     int64 `json:"blobs"`
	Manifests int64 `json:"manifests"`
	Tags      int64 `json:"tags"`
	// Repositories hold content (hosted ones included).
	Repositories int64 `json:"repositories"`
	Referrers    int64 `json:"referrers"`
	Pins         int64 `json:"pins"`
}

// Counter counts what a store holds: a scan of its keys, not free, but in
// bounded memory.
type Counter interface {
	Count(ctx context.Context) (Counts, error)
}

var (
	_ Purger  = (*Badger)(nil)
	_ Counter = (*Badger)(nil)
)

// purgeChunk bounds the keys one transaction of a purge changes (Badger
// refuses a transaction that grows too large).
const purgeChunk = 256

// repoGroup is <upstream>0<repo>0, the part of the keys of a repository
// after their kind.
func repoGroup(kind byte, k RepoKey) []byte {
	b := make([]byte, 0, 3+len(k.Upstream)+len(k.Repo))
	b = append(b, kind)
	b = append(b, k.Upstream...)
	b = append(b, 0)
	b = append(b, k.Repo...)
	return append(b, 0)
}

// PurgeTag implements Purger.
func (s *Badger) PurgeTag(ctx context.Context, k TagKey) (Purged, error) {
	var p Purged
	if k.Upstream == "" {
		return p, ErrHosted
	}
	err := s.db.Update(func(txn *badger.Txn) error {
		for _, c := range []struct {
			key []byte
			n   *int
		}{{tagKey(k), &p.Tags}, {pinKey(RepoKey{Upstream: k.Upstream, Repo: k.Repo}, k.Tag), &p.Pins}} {
			if _, err := txn.Get(c.key); errors.Is(err, badger.ErrKeyNotFound) {
				continue
			} else if err != nil {
				return err
			}
			*c.n = 1
			if err := txn.Delete(c.key); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return Purged{}, err
	}
	return p, ctx.Err()
}

// PurgeRepo implements Purger. The links go first: once they are gone the
// repository serves nothing from the store, whatever else is left if the
// purge is cut short.
func (s *Badger) PurgeRepo(ctx context.Context, k RepoKey) (Purged, error) {
	var p Purged
	if k.Upstream == "" {
		return p, ErrHosted
	}
	if err := s.purgeLinks(ctx, k, &p); err != nil {
		return p, err
	}
	var err error
	if p.Tags, err = s.deletePrefix(ctx, repoGroup(kindTag, k), nil); err != nil {
		return p, err
	}
	// An index entry stays while the repository still holds the referrer
	// (a push kept locally).
	p.Referrers, err = s.deletePrefix(ctx, repoGroup(kindReferrer, k), func(txn *badger.Txn, key []byte) bool {
		i := bytes.LastIndexByte(key, 0)
		_, err := txn.Get(linkKey(k, LinkManifest, digest.Digest(key[i+1:])))
		return err == nil
	})
	if err != nil {
		return p, err
	}
	if p.UpstreamReferrers, err = s.deletePrefix(ctx, repoGroup(kindUpRefs, k), nil); err != nil {
		return p, err
	}
	if p.Pins, err = s.deletePrefix(ctx, repoGroup(kindPin, k), nil); err != nil {
		return p, err
	}
	// The stored tag list's key is the group itself: no other key starts
	// with it.
	p.TagLists, err = s.deletePrefix(ctx, repoGroup(kindUpTags, k), nil)
	return p, err
}

// purgeLinks drops a repository's links to content the upstream
// delivered, a chunk at a time, each under its digests' locks, keeping
// the content's markers true (what nothing holds any more is unheld).
func (s *Badger) purgeLinks(ctx context.Context, k RepoKey, p *Purged) error {
	prefix := repoGroup(kindLink, k)
	start := prefix
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		var chunk []candidate
		var next []byte
		err := s.db.View(func(txn *badger.Txn) error {
			it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix, PrefetchValues: true, PrefetchSize: 100})
			defer it.Close()
			for it.Seek(start); it.Valid(); it.Next() {
				item := it.Item()
				if len(chunk) == purgeChunk {
					next = item.KeyCopy(nil)
					return nil
				}
				rest := item.Key()[len(prefix):]
				if len(rest) < 2 {
					continue
				}
				var origin LinkOrigin
				_ = item.Value(func(v []byte) error { origin = linkOrigin(v); return nil })
				if origin == OriginUpstream {
					chunk = append(chunk, candidate{kind: LinkKind(rest[0]), d: digest.Digest(rest[1:])})
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
		if len(chunk) > 0 {
			if err := s.unlinkChunk(k, chunk, p); err != nil {
				return err
			}
		}
		if next == nil {
			return nil
		}
		start = next
	}
}

// unlinkChunk removes upstream links of a repository in one transaction.
func (s *Badger) unlinkChunk(k RepoKey, chunk []candidate, p *Purged) error {
	unlock := s.lockDigests(chunk)
	defer unlock()
	var blobs, manifests int
	err := s.db.Update(func(txn *badger.Txn) error {
		blobs, manifests = 0, 0
		for _, c := range chunk {
			key := linkKey(k, c.kind, c.d)
			item, err := txn.Get(key)
			if errors.Is(err, badger.ErrKeyNotFound) {
				continue
			} else if err != nil {
				return err
			}
			var origin LinkOrigin
			_ = item.Value(func(v []byte) error { origin = linkOrigin(v); return nil })
			if origin != OriginUpstream {
				continue // pushed meanwhile: data now
			}
			if err := txn.Delete(key); err != nil {
				return err
			}
			if err := txn.Delete(holderKey(k, c.kind, c.d)); err != nil {
				return err
			}
			if err := markHolders(txn, c.kind, c.d, s.now()); err != nil {
				return err
			}
			if c.kind == LinkBlob {
				blobs++
			} else {
				manifests++
			}
		}
		return nil
	})
	if err == nil {
		p.Blobs += blobs
		p.Manifests += manifests
	}
	return err
}

// deletePrefix deletes the keys under prefix that keep (if set) does not
// keep, a chunk per transaction, and returns how many went.
func (s *Badger) deletePrefix(ctx context.Context, prefix []byte, keep func(txn *badger.Txn, key []byte) bool) (int, error) {
	n := 0
	start := prefix
	for {
		if err := ctx.Err(); err != nil {
			return n, err
		}
		var keys [][]byte
		var next []byte
		err := s.db.View(func(txn *badger.Txn) error {
			it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix, PrefetchValues: false})
			defer it.Close()
			for it.Seek(start); it.Valid(); it.Next() {
				key := it.Item().Key()
				if len(keys) == purgeChunk {
					next = it.Item().KeyCopy(nil)
					return nil
				}
				if keep != nil && keep(txn, key) {
					continue
				}
				keys = append(keys, it.Item().KeyCopy(nil))
			}
			return nil
		})
		if err != nil {
			return n, err
		}
		if len(keys) > 0 {
			err := s.db.Update(func(txn *badger.Txn) error {
				for _, key := range keys {
					if err := txn.Delete(key); err != nil {
						return err
					}
				}
				return nil
			})
			if err != nil {
				return n, err
			}
			n += len(keys)
		}
		if next == nil {
			return n, nil
		}
		start = next
	}
}

// Count implements Counter: one key-only scan per kind. Repositories are
// counted from the link keys, which come grouped by repository.
func (s *Badger) Count(ctx context.Context) (Counts, error) {
	var c Counts
	for _, k := range []struct {
		kind byte
		n    *int64
	}{{kindBlob, &c.Blobs}, {kindManifest, &c.Manifests}, {kindTag, &c.Tags}, {kindReferrer, &c.Referrers}, {kindPin, &c.Pins}} {
		err := s.scan([]byte{k.kind}, false, func([]byte, []byte) error {
			*k.n++
			if *k.n%4096 == 0 {
				return ctx.Err()
			}
			return nil
		})
		if err != nil {
			return c, err
		}
	}
	var last []byte
	err := s.scan([]byte{kindLink}, false, func(key, _ []byte) error {
		up, rest, ok1 := bytes.Cut(key[1:], []byte{0})
		name, _, ok2 := bytes.Cut(rest, []byte{0})
		if !ok1 || !ok2 {
			return nil
		}
		group := key[:1+len(up)+1+len(name)+1]
		if !bytes.Equal(group, last) {
			last = append(last[:0], group...)
			c.Repositories++
		}
		return ctx.Err()
	})
	return c, err
}
