package cache

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"

	"github.com/ocimirror/ocimirror/manifest"
)

// Budget bounds the store's disk use: blob files plus the database.
type Budget struct {
	// MaxSize is the most the store may use; 0 is no bound.
	MaxSize int64
	// High and Low are fractions of MaxSize: at High an eviction pass
	// starts, and it frees space down to Low.
	High, Low float64
	// MinFree is free space to keep on the filesystem (0: none). Below it
	// a pass starts too, and frees until both hold.
	MinFree int64
	// Interval is how often usage is checked besides after commits (10s
	// if 0).
	Interval time.Duration
}

// Evicted says what an eviction pass removed.
type Evicted struct {
	Blobs, Manifests int
	Bytes            int64
}

// evictBatch is how many candidates one scan of the store collects: the
// oldest, by last access. Memory stays bounded whatever the store holds.
const evictBatch = 4096

type candidate struct {
	kind LinkKind
	d    digest.Digest
	size int64
	at   int64
}

// Evict removes cached content, least recently used first, until want
// bytes are freed or nothing more can go. Cached content is what
// repositories hold only through an upstream (fetched or confirmed there):
// it comes back on its next request. Data (what a hosted repository holds,
// or a push kept locally) is never evicted, nor a blob a client is
// reading, nor what keep (pins) names. Evicting a manifest drops its
// entries in the referrers index; repository links and tags stay, and a
// tag whose manifest went is fetched again.
func (s *Badger) Evict(ctx context.Context, want int64, keep func(LinkKind, digest.Digest) bool) (Evicted, error) {
	var ev Evicted
	s.flushAccess()
	for ev.Bytes < want {
		batch, err := s.oldest(ctx, keep)
		if err != nil {
			return ev, err
		}
		evicted := false
		for _, c := range batch {
			if ev.Bytes >= want || ctx.Err() != nil {
				break
			}
			if c.kind == LinkBlob && s.reading(c.d) {
				continue // opened since the scan
			}
			ok, err := s.evictOne(ctx, c)
			if err != nil {
				return ev, err
			}
			if !ok {
				continue
			}
			evicted = true
			ev.Bytes += onDisk(c.size)
			if c.kind == LinkBlob {
				ev.Blobs++
			} else {
				ev.Manifests++
			}
		}
		if !evicted || ctx.Err() != nil {
			return ev, ctx.Err()
		}
	}
	return ev, nil
}

// oldest collects up to evictBatch candidates, the least recently used
// first: blobs and manifests without a data marker, not kept, not being
// read (so that old pinned content never fills the batch). One scan walks
// the index, the data markers and the access times together: all three
// are ordered by digest.
func (s *Badger) oldest(ctx context.Context, keep func(LinkKind, digest.Digest) bool) ([]candidate, error) {
	var heap []candidate // the newest of the kept ones on top
	push := func(c candidate) {
		if len(heap) == evictBatch && c.at >= heap[0].at {
			return
		}
		if len(heap) == evictBatch {
			heap[0] = c
			siftDown(heap, 0)
			return
		}
		heap = append(heap, c)
		siftUp(heap, len(heap)-1)
	}
	err := s.db.View(func(txn *badger.Txn) error {
		for _, kind := range []LinkKind{LinkBlob, LinkManifest} {
			prefix := []byte{kindBlob}
			if kind == LinkManifest {
				prefix = []byte{kindManifest}
			}
			data := newCursor(txn, []byte{kindData, byte(kind)}, false)
			access := newCursor(txn, []byte{kindAccess}, true)
			it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix, PrefetchValues: false})
			for it.Rewind(); it.Valid(); it.Next() {
				if ctx.Err() != nil {
					break
				}
				item := it.Item()
				d := item.Key()[len(prefix):]
				if data.find(d) {
					continue
				}
				c := candidate{kind: kind, d: digest.Digest(d)}
				if keep != nil && keep(kind, c.d) || kind == LinkBlob && s.reading(c.d) {
					continue
				}
				if access.find(d) && len(access.value) == 8 {
					c.at = int64(binary.BigEndian.Uint64(access.value))
				}
				if kind == LinkBlob {
					_ = item.Value(func(v []byte) error {
						c.size, _ = decodeBlobSize(v)
						return nil
					})
				} else {
					c.size = item.ValueSize()
				}
				push(c)
			}
			it.Close()
			data.close()
			access.close()
		}
		return ctx.Err()
	})
	slices.SortFunc(heap, func(a, b candidate) int { return int(a.at - b.at) })
	return heap, err
}

func siftUp(h []candidate, i int) {
	for i > 0 {
		p := (i - 1) / 2
		if h[p].at >= h[i].at {
			return
		}
		h[p], h[i] = h[i], h[p]
		i = p
	}
}

func siftDown(h []candidate, i int) {
	for {
		l, big := 2*i+1, i
		if l < len(h) && h[l].at > h[big].at {
			big = l
		}
		if r := l + 1; r < len(h) && h[r].at > h[big].at {
			big = r
		}
		if big == i {
			return
		}
		h[i], h[big] = h[big], h[i]
		i = big
	}
}

// cursor walks the keys under a prefix in order, for merging with another
// walk in the same (digest) order.
type cursor struct {
	it     *badger.Iterator
	prefix []byte
	value  []byte
}

func newCursor(txn *badger.Txn, prefix []byte, values bool) *cursor {
	c := &cursor{it: txn.NewIterator(badger.IteratorOptions{Prefix: prefix, PrefetchValues: values}), prefix: prefix}
	c.it.Rewind()
	return c
}

// find moves to suffix (never back) and reports whether it is there, with
// its value.
func (c *cursor) find(suffix []byte) bool {
	for ; c.it.Valid(); c.it.Next() {
		switch cmp := bytes.Compare(c.it.Item().Key()[len(c.prefix):], suffix); {
		case cmp < 0:
			continue
		case cmp > 0:
			return false
		}
		c.value = c.value[:0]
		_ = c.it.Item().Value(func(v []byte) error {
			c.value = append(c.value, v...)
			return nil
		})
		return true
	}
	return false
}

func (c *cursor) close() { c.it.Close() }

// evictOne removes one candidate unless it became data meanwhile. The LRU
// above is told after the digest's lock is released: its own lock is
// taken before the digest's on commits.
func (s *Badger) evictOne(ctx context.Context, c candidate) (bool, error) {
	ok, err := s.evictLocked(ctx, c)
	if ok {
		if hook := s.onEvict.Load(); hook != nil {
			(*hook)(c.kind, c.d)
		}
	}
	return ok, err
}

func (s *Badger) evictLocked(ctx context.Context, c candidate) (bool, error) {
	unlock := s.lockDigest(c.d)
	defer unlock()
	if err := s.get(dataKey(c.kind, c.d), func([]byte) error { return nil }); err == nil {
		return false, nil
	} else if !errors.Is(err, ErrNotFound) {
		return false, err
	}
	if c.kind == LinkBlob {
		return true, s.deleteBlobLocked(ctx, c.d)
	}
	return true, s.deleteManifestLocked(ctx, c.d)
}

// deleteManifestLocked deletes a manifest, its access time and its entries
// in the referrers index of every repository that holds it; the digest's
// lock is held.
func (s *Badger) deleteManifestLocked(ctx context.Context, d digest.Digest) error {
	m, err := s.GetManifest(ctx, d)
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	var subject digest.Digest
	if p, err := manifest.Parse(m.MediaType, m.Data); err == nil && p.Subject != nil && manifest.Referrer(m.MediaType) {
		subject = p.Subject.Digest
	}
	var refs [][]byte
	if subject != "" {
		prefix := holderPrefix(LinkManifest, d)
		err := s.scan(prefix, false, func(key, _ []byte) error {
			up, repo, ok := bytes.Cut(key[len(prefix):], []byte{0})
			if ok {
				k := ReferrerKey{Upstream: string(up), Repo: string(repo), Subject: subject}
				refs = append(refs, append(referrerPrefix(k), d...))
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	return s.db.Update(func(txn *badger.Txn) error {
		for _, k := range refs {
			if err := txn.Delete(k); err != nil {
				return err
			}
		}
		if err := txn.Delete(accessKey(d)); err != nil {
			return err
		}
		return txn.Delete(manifestKey(d))
	})
}

// OnEvict registers a function called with what each pass evicts (the
// LRU above the store forgets it).
func (s *Badger) OnEvict(f func(LinkKind, digest.Digest)) { s.onEvict.Store(&f) }

// SetPins sets what tells each eviction pass the digests it must keep
// besides data: pinned images. It is called at the start of every pass;
// when it fails, the pass is skipped rather than risk a pinned image.
func (s *Badger) SetPins(f func(context.Context) (map[digest.Digest]struct{}, error)) {
	s.pins.Store(&f)
	if s.budget {
		s.kickBudget()
	}
}

// errPinsUnknown skips a pass of a store opened with WaitForPins before
// SetPins is called.
var errPinsUnknown = errors.New("cache: eviction pass skipped: the pins are not known yet")

// pass runs one eviction pass, keeping the pins, of what want says once
// no other pass runs (nothing when that is 0: one that ran meanwhile made
// the room).
func (s *Badger) pass(ctx context.Context, want func() int64) (Evicted, error) {
	s.passMu.Lock()
	defer s.passMu.Unlock()
	n := want()
	if n <= 0 {
		return Evicted{}, nil
	}
	var keep func(LinkKind, digest.Digest) bool
	f := s.pins.Load()
	if f == nil && s.waitPins {
		return Evicted{}, errPinsUnknown
	}
	if f != nil {
		pinned, err := (*f)(ctx)
		if err != nil {
			return Evicted{}, fmt.Errorf("cache: eviction pass skipped: reading the pins: %w", err)
		}
		if len(pinned) > 0 {
			keep = func(_ LinkKind, d digest.Digest) bool { _, ok := pinned[d]; return ok }
		}
	}
	ev, err := s.Evict(ctx, n, keep)
	if ev.Bytes == 0 && err == nil {
		// Nothing to evict: Reserve answers full for a while without
		// scanning again (the budget loop checks anew meanwhile).
		s.fullUntil.Store(time.Now().Add(fullRecheck).UnixNano())
	} else if ev.Bytes > 0 {
		s.fullUntil.Store(0)
	}
	return ev, err
}

// fullRecheck is how long a pass that found nothing to evict makes
// Reserve answer ErrFull without another pass.
const fullRecheck = 5 * time.Second

// Reserve implements BlobStore. Without a maximum size it holds nothing.
// Room is the maximum less usage and what other writers hold; when that
// is short, one pass evicts down to the low watermark (or what the write
// needs beyond it), and ErrFull is answered if it could not.
func (s *Badger) Reserve(ctx context.Context, size int64) (func(), error) {
	b := s.limits
	if b.MaxSize <= 0 {
		return func() {}, nil
	}
	size = max(size, 0)
	need := onDisk(size)
	fits := func() bool {
		return s.Usage()+s.reserved.Load()+need <= b.MaxSize
	}
	reserve := func() bool {
		s.reserveMu.Lock()
		defer s.reserveMu.Unlock()
		if !fits() {
			return false
		}
		s.reserved.Add(need)
		return true
	}
	if !reserve() {
		if time.Now().UnixNano() < s.fullUntil.Load() {
			return nil, ErrFull
		}
		var want int64
		ev, err := s.pass(ctx, func() int64 {
			if fits() {
				return 0
			}
			want = s.Usage() + s.reserved.Load() + need - int64(b.Low*float64(b.MaxSize))
			return want
		})
		if err != nil && ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if ev.Bytes > 0 || err != nil {
			s.log.Info("eviction pass to make room", "freed", ev.Bytes, "wanted", want, "blobs", ev.Blobs,
				"manifests", ev.Manifests, "usage_after", s.Usage(), "err", errString(err))
		}
		if !reserve() {
			return nil, ErrFull
		}
	}
	var once sync.Once
	return func() { once.Do(func() { s.reserved.Add(-need) }) }, nil
}

// Usage is the store's disk use as du counts it: the blocks of the blob
// files, plus those of the database's files (read from the filesystem:
// Badger's own figure is refreshed once a minute).
func (s *Badger) Usage() int64 {
	return s.blobDisk.Load() + s.dbDisk()
}

func (s *Badger) dbDisk() int64 {
	var n int64
	entries, err := os.ReadDir(s.dbDir)
	if err != nil {
		lsm, vlog := s.db.Size()
		return lsm + vlog
	}
	for _, e := range entries {
		if info, err := e.Info(); err == nil {
			if st, ok := info.Sys().(*syscall.Stat_t); ok {
				n += st.Blocks * 512
			} else {
				n += info.Size()
			}
		}
	}
	return n
}

// freeSpace is the free space of the data directory's filesystem.
func (s *Badger) freeSpace() (int64, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(s.files.blobs, &st); err != nil {
		return 0, err
	}
	return int64(st.Bavail) * int64(st.Bsize), nil
}

// toFree is how much a pass must free now: down to the low watermark once
// usage reaches the high one, and up to the free space to keep.
func (s *Badger) toFree(b Budget) int64 {
	var want int64
	if b.MaxSize > 0 {
		if usage := s.Usage(); float64(usage) >= b.High*float64(b.MaxSize) {
			want = usage - int64(b.Low*float64(b.MaxSize))
		}
	}
	if b.MinFree > 0 {
		if free, err := s.freeSpace(); err == nil && free < b.MinFree {
			want = max(want, b.MinFree-free+int64((b.High-b.Low)*float64(b.MaxSize)))
		}
	}
	return want
}

// keepBudget runs eviction passes whenever usage reaches the budget's
// high watermark (checked every interval, and when a commit kicks it).
func (s *Badger) keepBudget(b Budget) {
	defer s.wg.Done()
	t := time.NewTicker(b.Interval)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
		case <-s.kick:
		}
		want := s.toFree(b)
		if want <= 0 {
			continue
		}
		start, before := time.Now(), s.Usage()
		ev, err := s.pass(s.ctx, func() int64 { return want })
		level := s.log.Info
		if err != nil || ev.Bytes < want {
			level = s.log.Warn
		}
		level("eviction pass", "freed", ev.Bytes, "wanted", want, "blobs", ev.Blobs, "manifests", ev.Manifests,
			"usage_before", before, "usage_after", s.Usage(), "max_size", b.MaxSize,
			"duration", time.Since(start).Round(time.Millisecond), "err", errString(err))
	}
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// kickBudget asks for a check of the budget now (after a commit).
func (s *Badger) kickBudget() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// checkBudget validates a budget and fills its defaults.
func checkBudget(b *Budget) error {
	if b.High == 0 {
		b.High = 0.95
	}
	if b.Low == 0 {
		b.Low = 0.85
	}
	if b.Interval <= 0 {
		b.Interval = 10 * time.Second
	}
	if b.MaxSize < 0 || b.MinFree < 0 || b.Low <= 0 || b.High > 1 || b.Low >= b.High {
		return fmt.Errorf("cache: bad budget: max %d, high %.2f, low %.2f, min free %d", b.MaxSize, b.High, b.Low, b.MinFree)
	}
	return nil
}
