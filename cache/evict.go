package cache

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

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

// One scan of the store collects the oldest candidates, by last access:
// as many as the pass may still need (each frees at least a block), from
// evictBatch to evictBatchMax. A scan reads the whole index, so a pass
// that wants much makes few of them; memory stays bounded whatever the
// store holds (evictBatchMax candidates take about 8 MB).
const (
	evictBatch    = 4096
	evictBatchMax = 65536
)

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
	p := newPacer()
	for ev.Bytes < want {
		limit := int(min(max((want-ev.Bytes)/blockSize+1, evictBatch), evictBatchMax))
		batch, err := s.oldest(ctx, keep, p, limit)
		if err != nil {
			return ev, err
		}
		evicted := false
		for len(batch) > 0 && ev.Bytes < want && ctx.Err() == nil {
			// As many candidates as may still be needed, up to a chunk.
			n, sum := 0, ev.Bytes
			for n < len(batch) && n < evictChunkSize && sum < want {
				sum += onDisk(batch[n].size)
				n++
			}
			gone, err := s.evictChunk(batch[:n])
			batch = batch[n:]
			for _, c := range gone {
				evicted = true
				ev.Bytes += onDisk(c.size)
				if c.kind == LinkBlob {
					ev.Blobs++
				} else {
					ev.Manifests++
				}
			}
			if err != nil {
				return ev, err
			}
			if err := p.pace(ctx); err != nil {
				return ev, err
			}
		}
		if !evicted || ctx.Err() != nil {
			return ev, ctx.Err()
		}
	}
	return ev, nil
}

// oldest collects up to limit candidates, the least recently used first:
// blobs and manifests without a data marker, not kept, not being read (so
// that old pinned content never fills the batch). One scan walks the blob
// and manifest indexes, their data markers and the access times
// together: all are ordered by digest.
func (s *Badger) oldest(ctx context.Context, keep func(LinkKind, digest.Digest) bool, p *pacer, limit int) ([]candidate, error) {
	var heap []candidate // the newest of the kept ones on top
	push := func(c candidate) {
		if len(heap) == limit {
			heap[0] = c
			siftDown(heap, 0)
			return
		}
		heap = append(heap, c)
		siftUp(heap, len(heap)-1)
	}
	err := s.db.View(func(txn *badger.Txn) error {
		type index struct {
			kind LinkKind
			it   *badger.Iterator
			data *cursor
		}
		var indexes []*index
		for _, kind := range []LinkKind{LinkBlob, LinkManifest} {
			prefix := []byte{kindBlob}
			if kind == LinkManifest {
				prefix = []byte{kindManifest}
			}
			x := &index{kind: kind, data: newCursor(txn, []byte{kindData, byte(kind)}, false),
				it: txn.NewIterator(badger.IteratorOptions{Prefix: prefix, PrefetchValues: false})}
			defer x.it.Close()
			defer x.data.close()
			x.it.Rewind()
			indexes = append(indexes, x)
		}
		access := newCursor(txn, []byte{kindAccess}, false)
		defer access.close()
		consider := func(kind LinkKind, data *cursor, item *badger.Item) {
			d := item.Key()[1:]
			if data.find(d) {
				return
			}
			var at int64
			if access.find(d) && len(access.value) == 8 {
				at = int64(binary.BigEndian.Uint64(access.value))
			}
			if len(heap) == limit && at >= heap[0].at {
				return // newer than the whole batch: no need to look further
			}
			c := candidate{kind: kind, d: digest.Digest(d), at: at}
			if keep != nil && keep(kind, c.d) || kind == LinkBlob && s.reading(c.d) {
				return
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
		for n := 1; ; n++ {
			if n%64 == 0 && p.pace(ctx) != nil {
				break
			}
			// The index whose next digest comes first (keys are one
			// kind byte, then the digest).
			var x *index
			for _, y := range indexes {
				if y.it.Valid() && (x == nil || bytes.Compare(y.it.Item().Key()[1:], x.it.Item().Key()[1:]) < 0) {
					x = y
				}
			}
			if x == nil {
				break
			}
			consider(x.kind, x.data, x.it.Item())
			x.it.Next()
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

// evictChunkSize is how many candidates one transaction removes. Their
// digests' locks are held together meanwhile: a commit waits for at most
// one chunk.
const evictChunkSize = 16

// evictChunk removes the candidates that are still cached content, in one
// transaction under their digests' locks, and returns them with their
// sizes. The LRU above is told after the locks are released: its own
// lock is taken before a digest's on commits.
func (s *Badger) evictChunk(chunk []candidate) ([]candidate, error) {
	unlock := s.lockDigests(chunk)
	gone, err := s.evictLocked(chunk)
	if errors.Is(err, badger.ErrTxnTooBig) && len(chunk) > 1 {
		// Manifests held by many repositories (their referrer entries
		// go too): one at a time.
		gone, err = nil, nil
		for i := range chunk {
			var g []candidate
			if g, err = s.evictLocked(chunk[i : i+1]); err != nil {
				break
			}
			gone = append(gone, g...)
		}
	}
	unlock()
	if hook := s.onEvict.Load(); hook != nil {
		for _, c := range gone {
			(*hook)(c.kind, c.d)
		}
	}
	return gone, err
}

// evictLocked is evictChunk with the locks held. A blob a client opened
// since the scan stays, and so does content that became data.
func (s *Badger) evictLocked(chunk []candidate) ([]candidate, error) {
	var gone []candidate
	err := s.db.Update(func(txn *badger.Txn) error {
		gone = gone[:0]
		for _, c := range chunk {
			if c.kind == LinkBlob && s.reading(c.d) {
				continue
			}
			if _, err := txn.Get(dataKey(c.kind, c.d)); err == nil {
				continue
			} else if !errors.Is(err, badger.ErrKeyNotFound) {
				return err
			}
			size, found, err := deleteContent(txn, c.kind, c.d)
			if err != nil {
				return err
			}
			if found {
				c.size = size
				gone = append(gone, c)
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return gone, s.deleted(gone)
}

// deleteLocked deletes a blob (index entry, then file) or a manifest; the
// digest's lock is held. Readers that have a blob's file open read on.
func (s *Badger) deleteLocked(kind LinkKind, d digest.Digest) error {
	var size int64
	var found bool
	err := s.db.Update(func(txn *badger.Txn) error {
		var err error
		size, found, err = deleteContent(txn, kind, d)
		return err
	})
	if err != nil || !found {
		return err
	}
	return s.deleted([]candidate{{kind: kind, d: d, size: size}})
}

// deleteContent deletes, in txn, a blob's index entry or a manifest, with
// its access time and (a manifest's) entries in the referrers index of
// every repository that holds it. found is false when it was not there;
// size is the blob's, or the manifest's stored value's.
func deleteContent(txn *badger.Txn, kind LinkKind, d digest.Digest) (size int64, found bool, err error) {
	if kind == LinkBlob {
		item, err := txn.Get(blobKey(d))
		if errors.Is(err, badger.ErrKeyNotFound) {
			return 0, false, nil
		} else if err != nil {
			return 0, false, err
		}
		if err := item.Value(func(v []byte) error {
			size, err = decodeBlobSize(v)
			return err
		}); err != nil {
			return 0, false, err
		}
		if err := txn.Delete(blobKey(d)); err != nil {
			return 0, false, err
		}
		return size, true, txn.Delete(accessKey(d))
	}
	item, err := txn.Get(manifestKey(d))
	if errors.Is(err, badger.ErrKeyNotFound) {
		return 0, false, nil
	} else if err != nil {
		return 0, false, err
	}
	var subject digest.Digest
	err = item.Value(func(v []byte) error {
		if len(v) < 1 || v[0] != encodingV1 {
			return nil // a corrupt entry goes all the same
		}
		if mt, data, ok := readString(v[1:]); ok {
			subject = subjectOf(mt, data)
		}
		return nil
	})
	if err != nil {
		return 0, false, err
	}
	size = item.ValueSize()
	if subject != "" {
		prefix := holderPrefix(LinkManifest, d)
		it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix, PrefetchValues: false})
		var refs [][]byte
		for it.Rewind(); it.Valid(); it.Next() {
			key := it.Item().Key()
			if up, repo, ok := bytes.Cut(key[len(prefix):], []byte{0}); ok {
				k := ReferrerKey{Upstream: string(up), Repo: string(repo), Subject: subject}
				refs = append(refs, append(referrerPrefix(k), d...))
			}
		}
		it.Close()
		for _, k := range refs {
			if err := txn.Delete(k); err != nil {
				return 0, false, err
			}
		}
	}
	if err := txn.Delete(accessKey(d)); err != nil {
		return 0, false, err
	}
	return size, true, txn.Delete(manifestKey(d))
}

// subjectOf is the subject of a stored manifest, "" when it has none
// (or its media type cannot be a referrer's). The manifest passed
// manifest.Parse when it was stored: reading the one field is enough,
// and costs a fraction of the whole check.
func subjectOf(mt string, data []byte) digest.Digest {
	if !manifest.Referrer(mt) {
		return ""
	}
	var m struct {
		Subject *v1.Descriptor `json:"subject"`
	}
	if json.Unmarshal(data, &m) != nil || m.Subject == nil || m.Subject.Digest.Validate() != nil {
		return ""
	}
	return m.Subject.Digest
}

// deleted follows up a committed deletion: pending access times are
// dropped, and blob files removed (the digests' locks are still held, so
// that no commit of the same digest places its file meanwhile).
func (s *Badger) deleted(gone []candidate) error {
	s.accessMu.Lock()
	for _, c := range gone {
		delete(s.accessed, c.d)
	}
	s.accessMu.Unlock()
	var first error
	for _, c := range gone {
		if c.kind != LinkBlob {
			continue
		}
		s.blobBytes.Add(-c.size)
		s.blobDisk.Add(-onDisk(c.size))
		if err := s.files.remove(c.d); err != nil && first == nil {
			first = err
		}
	}
	return first
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
func (s *Badger) pass(ctx context.Context, reason string, want func() int64) (Evicted, error) {
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
	s.metrics.evictedBy(reason, ev)
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
// is short, one pass evicts what the write needs (the budget's own pass
// then frees down to the low watermark), and ErrFull is answered if it
// could not.
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
		ev, err := s.pass(ctx, evictMakeRoom, func() int64 {
			if fits() {
				return 0
			}
			// Only the room this write needs: the fill waits for this pass
			// (paced, so that serving goes on), and the background pass
			// kicked below frees down to the low watermark.
			want = s.Usage() + s.reserved.Load() + need - b.MaxSize
			return want
		})
		s.kickBudget()
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
func (s *Badger) toFree(b Budget) (int64, string) {
	var want int64
	reason := evictHighWatermark
	if b.MaxSize > 0 {
		if usage := s.Usage(); float64(usage) >= b.High*float64(b.MaxSize) {
			want = usage - int64(b.Low*float64(b.MaxSize))
		}
	}
	if b.MinFree > 0 {
		if free, err := s.freeSpace(); err == nil && free < b.MinFree {
			if w := b.MinFree - free + int64((b.High-b.Low)*float64(b.MaxSize)); w > want {
				want, reason = w, evictMinFree
			}
		}
	}
	return want, reason
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
		want, reason := s.toFree(b)
		if want <= 0 {
			continue
		}
		start, before := time.Now(), s.Usage()
		ev, err := s.pass(s.ctx, reason, func() int64 { return want })
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

// pacer keeps a background pass from delaying requests. Go's scheduler
// polls the network when a processor runs out of work (or every 10 ms):
// a goroutine that stays busy for 2 ms delays requests on a small machine
// by about as much. After every slice of work the pass sleeps at least as
// long as the slice took, so that it takes at most half a CPU in short
// bursts and leaves the scheduler idle time to poll.
type pacer struct {
	start time.Time
}

// paceSlice is the work between two sleeps.
const paceSlice = 200 * time.Microsecond

func newPacer() *pacer { return &pacer{start: time.Now()} }

// pace sleeps once a slice of work is done.
func (p *pacer) pace(ctx context.Context) error {
	worked := time.Since(p.start)
	if worked < paceSlice {
		return nil
	}
	t := time.NewTimer(worked)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
	}
	p.start = time.Now()
	return nil
}
