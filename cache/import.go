package cache

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
)

// Import is what loading a bundle makes visible, all at once: the links of
// repositories to content already stored (blobs committed, manifests put),
// their referrers index, their tags and pins. Until it is committed the
// stored content is held by no repository, so no client sees any of it.
type Import struct {
	// Links are in the order they may become visible: what a manifest
	// names (blobs, an index's children) before the manifest.
	Links     []ImportLink     `json:"links"`
	Referrers []ImportReferrer `json:"referrers,omitempty"`
	// Answers are referrers answers to keep as the upstream's last (what
	// an offline mirror answers from, with the referrers index).
	Answers []ImportAnswer `json:"answers,omitempty"`
	Tags    []ImportTag    `json:"tags,omitempty"`
	Pins    []Pin          `json:"pins,omitempty"`
}

// ImportAnswer is the referrers answer for a subject, as the bundle's
// source gave it (its referrers, or none).
type ImportAnswer struct {
	Key    ReferrerKey       `json:"key"`
	Answer UpstreamReferrers `json:"answer"`
}

// ImportLink links content to a repository, with the upstream origin:
// the repository serves it as it serves what it pulled.
type ImportLink struct {
	Repo   RepoKey       `json:"repo"`
	Kind   LinkKind      `json:"kind"`
	Digest digest.Digest `json:"digest"`
}

// ImportReferrer is an entry of the referrers index.
type ImportReferrer struct {
	Key        ReferrerKey   `json:"key"`
	Descriptor v1.Descriptor `json:"descriptor"`
}

// ImportTag is a tag and what it points at. Its name is also added to
// the repository's last known upstream tag list.
type ImportTag struct {
	Key   TagKey   `json:"key"`
	Entry TagEntry `json:"entry"`
}

// Importer commits imports. It is an optional power of a store, found by
// type assertion.
type Importer interface {
	// CommitImport makes im visible in one step. It fails, changing
	// nothing, when content im links is not stored (ErrNotFound).
	CommitImport(ctx context.Context, im *Import) error
}

var _ Importer = (*Badger)(nil)

// importChunkBytes bounds the writes of one transaction of an import (an
// estimate): Badger refuses transactions past 15% of a memtable (1.2 MiB
// here). An import that fits is one transaction; a larger one is
// journaled first (see CommitImport).
const importChunkBytes = 256 << 10

// CommitImport implements Importer. Everything is checked first: every
// linked blob and manifest, every tagged, pinned or indexed manifest is
// stored. An import that fits in one transaction is written in one. A
// larger one is written to a journal key first, in one transaction, then
// applied in order (pins, then links with what a manifest names before
// it, the referrers index, tags) and the journal removed: a process
// killed meanwhile applies the journal again when the store opens, before
// anything is served. No eviction pass runs while an import commits, and
// the next one knows its pins.
func (s *Badger) CommitImport(_ context.Context, im *Import) error {
	s.passMu.Lock()
	defer s.passMu.Unlock()
	unlock := s.lockAll()
	defer unlock()
	if err := s.checkImport(im); err != nil {
		return err
	}
	chunks := s.importChunks(im)
	if len(chunks) <= 1 {
		return s.db.Update(func(txn *badger.Txn) error {
			for _, c := range chunks {
				if err := c(txn); err != nil {
					return err
				}
			}
			return nil
		})
	}
	data, err := json.Marshal(im)
	if err != nil {
		return fmt.Errorf("cache: import journal: %w", err)
	}
	key := binary.BigEndian.AppendUint64([]byte{kindJournal}, uint64(time.Now().UnixNano()))
	if err := s.db.Update(func(txn *badger.Txn) error { return txn.Set(key, data) }); err != nil {
		return fmt.Errorf("cache: import journal: %w", err)
	}
	if err := s.applyChunks(chunks); err != nil {
		return fmt.Errorf("cache: import: %w (it is applied again when the store next opens)", err)
	}
	if err := s.db.Update(func(txn *badger.Txn) error { return txn.Delete(key) }); err != nil {
		return fmt.Errorf("cache: import journal: %w", err)
	}
	return nil
}

// lockAll takes every digest lock, in order (each other holder takes one).
func (s *Badger) lockAll() func() {
	for i := range s.commitLocks {
		s.commitLocks[i].Lock()
	}
	return func() {
		for i := range s.commitLocks {
			s.commitLocks[i].Unlock()
		}
	}
}

// checkImport checks that everything im names is stored.
func (s *Badger) checkImport(im *Import) error {
	return s.db.View(func(txn *badger.Txn) error {
		has := func(key []byte, what string, d digest.Digest) error {
			_, err := txn.Get(key)
			if errors.Is(err, badger.ErrKeyNotFound) {
				return fmt.Errorf("cache: import: %s %s is not stored: %w", what, d, ErrNotFound)
			}
			return err
		}
		for _, l := range im.Links {
			var err error
			switch l.Kind {
			case LinkBlob:
				err = has(blobKey(l.Digest), "blob", l.Digest)
			case LinkManifest:
				err = has(manifestKey(l.Digest), "manifest", l.Digest)
			default:
				err = fmt.Errorf("cache: import: link of unknown kind %q", l.Kind)
			}
			if err != nil {
				return err
			}
		}
		for _, r := range im.Referrers {
			if err := has(manifestKey(r.Descriptor.Digest), "referrer", r.Descriptor.Digest); err != nil {
				return err
			}
		}
		for _, t := range im.Tags {
			if err := has(manifestKey(t.Entry.Digest), "tagged manifest", t.Entry.Digest); err != nil {
				return err
			}
		}
		for _, p := range im.Pins {
			if err := has(manifestKey(p.Digest), "pinned manifest", p.Digest); err != nil {
				return err
			}
		}
		return nil
	})
}

// importChunks turns im into transactions' work, in order, each chunk
// about importChunkBytes of writes at most.
func (s *Badger) importChunks(im *Import) []func(*badger.Txn) error {
	limit := importChunkBytes
	if s.importChunkBytes > 0 {
		limit = s.importChunkBytes
	}
	now := s.now()
	type op struct {
		size int
		run  func(*badger.Txn) error
	}
	var ops []op
	// entry is Badger's cost of a key and value, roughly.
	entry := func(key, value int) int { return key + value + 32 }
	for _, p := range im.Pins {
		key, v := pinKey(p.Repo, p.Name), p.encode()
		ops = append(ops, op{entry(len(key), len(v)), func(txn *badger.Txn) error { return txn.Set(key, v) }})
	}
	for _, l := range im.Links {
		n := len(linkKey(l.Repo, l.Kind, l.Digest))
		ops = append(ops, op{2*entry(n, 9) + 2*entry(len(l.Digest)+2, 8), func(txn *badger.Txn) error {
			return linkTxn(txn, l.Repo, l.Kind, l.Digest, OriginUpstream, now)
		}})
	}
	for _, r := range im.Referrers {
		key := append(referrerPrefix(r.Key), r.Descriptor.Digest...)
		v, err := json.Marshal(r.Descriptor)
		if err != nil {
			continue // a descriptor always marshals
		}
		ops = append(ops, op{entry(len(key), len(v)), func(txn *badger.Txn) error { return txn.Set(key, v) }})
	}
	for _, a := range im.Answers {
		key := upstreamReferrersKey(a.Key)
		v, err := a.Answer.encode()
		if err != nil {
			continue // descriptors always marshal
		}
		ops = append(ops, op{entry(len(key), len(v)), func(txn *badger.Txn) error { return txn.Set(key, v) }})
	}
	lists := map[RepoKey][]string{}
	for _, t := range im.Tags {
		key, v := tagKey(t.Key), t.Entry.encode()
		ops = append(ops, op{entry(len(key), len(v)), func(txn *badger.Txn) error { return txn.Set(key, v) }})
		rk := RepoKey{Upstream: t.Key.Upstream, Repo: t.Key.Repo}
		lists[rk] = append(lists[rk], t.Key.Tag)
	}
	for rk, tags := range lists {
		key := upstreamTagsKey(rk.Upstream, rk.Repo)
		size := entry(len(key), 64)
		for _, t := range tags {
			size += len(t) + 3
		}
		ops = append(ops, op{2 * size, func(txn *badger.Txn) error { return mergeTagList(txn, key, tags) }})
	}

	var chunks []func(*badger.Txn) error
	for len(ops) > 0 {
		n, size := 0, 0
		for n < len(ops) && (n == 0 || size+ops[n].size <= limit) {
			size += ops[n].size
			n++
		}
		part := ops[:n]
		ops = ops[n:]
		chunks = append(chunks, func(txn *badger.Txn) error {
			for _, o := range part {
				if err := o.run(txn); err != nil {
					return err
				}
			}
			return nil
		})
	}
	return chunks
}

// mergeTagList adds tags to a stored upstream tag list (kept sorted),
// keeping when it was fetched; a repository without one gets a list
// fetched never (the Unix epoch), which an online upstream refreshes.
func mergeTagList(txn *badger.Txn, key []byte, tags []string) error {
	l := UpstreamTags{CheckedAt: time.Unix(0, 0)}
	item, err := txn.Get(key)
	switch {
	case err == nil:
		err = item.Value(func(v []byte) error {
			var err error
			l, err = decodeUpstreamTags(v)
			return err
		})
		if err != nil {
			return err
		}
	case !errors.Is(err, badger.ErrKeyNotFound):
		return err
	}
	l.Tags = append(l.Tags, tags...)
	slices.Sort(l.Tags)
	l.Tags = slices.Compact(l.Tags)
	v, err := l.encode()
	if err != nil {
		return err
	}
	return txn.Set(key, v)
}

// applyChunks runs each chunk in a transaction of its own.
func (s *Badger) applyChunks(chunks []func(*badger.Txn) error) error {
	for i, c := range chunks {
		if err := s.db.Update(c); err != nil {
			return err
		}
		if s.afterImportChunk != nil {
			s.afterImportChunk(i)
		}
	}
	return nil
}

// replayImports applies the journals of imports a stopped process did not
// finish committing, then removes them.
func (s *Badger) replayImports() error {
	type journal struct {
		key []byte
		im  Import
	}
	var js []journal
	err := s.scan([]byte{kindJournal}, true, func(key, v []byte) error {
		var j journal
		if err := json.Unmarshal(v, &j.im); err != nil {
			return fmt.Errorf("%w: import journal %x: %v", ErrCorrupt, key, err)
		}
		j.key = slices.Clone(key)
		js = append(js, j)
		return nil
	})
	if err != nil {
		return err
	}
	for _, j := range js {
		if err := s.applyChunks(s.importChunks(&j.im)); err != nil {
			return fmt.Errorf("cache: replaying an import: %w", err)
		}
		if err := s.db.Update(func(txn *badger.Txn) error { return txn.Delete(j.key) }); err != nil {
			return err
		}
		s.log.Info("an interrupted import was completed", "links", len(j.im.Links), "tags", len(j.im.Tags), "pins", len(j.im.Pins))
	}
	return nil
}
