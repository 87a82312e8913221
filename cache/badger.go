package cache

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/dgraph-io/badger/v4/options"
	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
)

// Key layout. Every key starts with a one-byte kind.
//
//	b<digest>                  blob metadata: fill ID, size, chunk size
//	c<fill ID><chunk index>    blob bytes, one chunk
//	p<fill ID>                 a fill not yet committed (swept at open)
//	a<digest>                  blob last access (unix seconds)
//	m<digest>                  manifest: media type and bytes
//	t<upstream>0<repo>0<tag>   tag entry
//	r<upstream>0<repo>0<subject>0<referrer>   referrer descriptor (JSON)
//	u<upstream>0<repo>0<subject>   the upstream referrers API's answer
//	l<upstream>0<repo>0<kind><digest>   a repository's link to content it holds (origin)
//	L<kind><digest>0<upstream>0<repo>   the same link, reversed: who holds a digest
//	!schema                    the key layout's version
const (
	kindBlob     = 'b'
	kindChunk    = 'c'
	kindPending  = 'p'
	kindAccess   = 'a'
	kindManifest = 'm'
	kindTag      = 't'
	kindReferrer = 'r'
	kindLink     = 'l'
	kindHolder   = 'L'
	kindUpRefs   = 'u'

	encodingV1 = 1
)

// DefaultChunkSize is the size of one stored piece of a blob. Readers hold
// at most one chunk in memory.
const DefaultChunkSize = 256 << 10

type fillID [16]byte

// BadgerOptions configures OpenBadger.
type BadgerOptions struct {
	// Path is the database directory.
	Path string
	// Logger receives Badger's warnings and the store's own.
	Logger *slog.Logger
	// ChunkSize is the blob chunk size for new blobs (DefaultChunkSize if 0).
	ChunkSize int
	// GCInterval is how often the value log is garbage collected (10m if 0).
	GCInterval time.Duration
	// AccessFlushInterval is how often last-access times are written (30s if 0).
	AccessFlushInterval time.Duration
}

// Badger is the on-disk Store.
type Badger struct {
	db        *badger.DB
	log       *slog.Logger
	chunkSize int

	accessMu sync.Mutex
	accessed map[digest.Digest]int64

	stop chan struct{}
	wg   sync.WaitGroup
}

var (
	_ Store   = (*Badger)(nil)
	_ Toucher = (*Badger)(nil)
)

// OpenBadger opens (or creates) the store at opts.Path and discards what
// unfinished fills left behind.
func OpenBadger(opts BadgerOptions) (*Badger, error) {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.ChunkSize <= 0 {
		opts.ChunkSize = DefaultChunkSize
	}
	if opts.GCInterval <= 0 {
		opts.GCInterval = 10 * time.Minute
	}
	if opts.AccessFlushInterval <= 0 {
		opts.AccessFlushInterval = 30 * time.Second
	}
	db, err := badger.Open(badgerOptions(opts))
	if err != nil {
		return nil, fmt.Errorf("cache: open %s: %w", opts.Path, err)
	}
	s := &Badger{
		db:        db,
		log:       opts.Logger,
		chunkSize: opts.ChunkSize,
		accessed:  map[digest.Digest]int64{},
		stop:      make(chan struct{}),
	}
	if err := s.migrate(); err != nil {
		db.Close()
		return nil, err
	}
	if err := s.sweepPending(); err != nil {
		db.Close()
		return nil, err
	}
	s.wg.Add(2)
	go s.every(opts.GCInterval, s.gcValueLog)
	go s.every(opts.AccessFlushInterval, s.flushAccess)
	return s, nil
}

// badgerOptions sizes Badger for a proxy: blob chunks go to the value log
// (memory-mapped files, page cache rather than heap), the LSM tree holds only
// keys and small values, and the memtables are small. Badger's defaults
// (64 MiB memtables x 5, 256 MiB block cache) are for a database server.
func badgerOptions(o BadgerOptions) badger.Options {
	return badger.DefaultOptions(o.Path).
		WithLogger(badgerLogger{o.Logger}).
		WithMemTableSize(8 << 20).
		WithNumMemtables(2).
		WithNumLevelZeroTables(2).
		WithNumLevelZeroTablesStall(8).
		WithValueThreshold(1 << 10).
		WithValueLogFileSize(256 << 20).
		WithCompression(options.None).
		WithBlockCacheSize(0).
		WithIndexCacheSize(0).
		WithNumCompactors(2).
		WithNumGoroutines(2).
		WithDetectConflicts(false).
		WithMetricsEnabled(false)
}

// Close flushes access times and closes the database.
func (s *Badger) Close() error {
	close(s.stop)
	s.wg.Wait()
	s.flushAccess()
	return s.db.Close()
}

func (s *Badger) every(d time.Duration, f func()) {
	defer s.wg.Done()
	t := time.NewTicker(d)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
			f()
		}
	}
}

func (s *Badger) gcValueLog() {
	for i := 0; i < 16; i++ {
		if err := s.db.RunValueLogGC(0.5); err != nil {
			if !errors.Is(err, badger.ErrNoRewrite) && !errors.Is(err, badger.ErrRejected) {
				s.log.Warn("value log gc", "err", err)
			}
			return
		}
	}
}

// sweepPending deletes the chunks of fills that never committed: a crash or
// kill mid-fill leaves them behind, invisible but taking space.
func (s *Badger) sweepPending() error {
	var ids []fillID
	err := s.scan([]byte{kindPending}, false, func(key, _ []byte) error {
		var id fillID
		if copy(id[:], key[1:]) == len(id) {
			ids = append(ids, id)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("cache: sweep unfinished fills: %w", err)
	}
	for _, id := range ids {
		if err := s.deleteFill(id); err != nil {
			return fmt.Errorf("cache: sweep unfinished fills: %w", err)
		}
	}
	if len(ids) > 0 {
		s.log.Info("discarded unfinished blob fills", "count", len(ids))
	}
	return nil
}

// get calls f with the value of key, valid only during the call; a
// missing key is ErrNotFound.
func (s *Badger) get(key []byte, f func(value []byte) error) error {
	err := s.db.View(func(txn *badger.Txn) error {
		item, err := txn.Get(key)
		if err != nil {
			return err
		}
		return item.Value(f)
	})
	if errors.Is(err, badger.ErrKeyNotFound) {
		return ErrNotFound
	}
	return err
}

// scan calls f for every key under prefix, in key order, with its value
// when withValues is set. key and value are valid only during the call.
func (s *Badger) scan(prefix []byte, withValues bool, f func(key, value []byte) error) error {
	return s.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix, PrefetchValues: withValues, PrefetchSize: 100})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			item := it.Item()
			var err error
			if withValues {
				err = item.Value(func(v []byte) error { return f(item.Key(), v) })
			} else {
				err = f(item.Key(), nil)
			}
			if err != nil {
				return err
			}
		}
		return nil
	})
}

// deleteFill deletes every chunk of a fill and its pending marker.
func (s *Badger) deleteFill(id fillID) error {
	var keys [][]byte
	err := s.scan(append([]byte{kindChunk}, id[:]...), false, func(key, _ []byte) error {
		keys = append(keys, bytes.Clone(key))
		return nil
	})
	if err != nil {
		return err
	}
	wb := s.db.NewWriteBatch()
	defer wb.Cancel()
	for _, k := range keys {
		if err := wb.Delete(k); err != nil {
			return err
		}
	}
	if err := wb.Delete(pendingKey(id)); err != nil {
		return err
	}
	return wb.Flush()
}

// --- blobs ---

type blobMeta struct {
	fill      fillID
	size      int64
	chunkSize int64
}

func (m blobMeta) encode() []byte {
	b := make([]byte, 0, 1+16+2*binary.MaxVarintLen64)
	b = append(b, encodingV1)
	b = append(b, m.fill[:]...)
	b = binary.AppendUvarint(b, uint64(m.size))
	return binary.AppendUvarint(b, uint64(m.chunkSize))
}

func decodeBlobMeta(b []byte) (blobMeta, error) {
	var m blobMeta
	if len(b) < 1+len(m.fill) || b[0] != encodingV1 {
		return m, ErrCorrupt
	}
	copy(m.fill[:], b[1:])
	r := b[1+len(m.fill):]
	size, n := binary.Uvarint(r)
	if n <= 0 {
		return m, ErrCorrupt
	}
	chunk, n2 := binary.Uvarint(r[n:])
	if n2 <= 0 || chunk == 0 {
		return m, ErrCorrupt
	}
	m.size, m.chunkSize = int64(size), int64(chunk)
	return m, nil
}

func blobKey(d digest.Digest) []byte { return append([]byte{kindBlob}, d...) }
func accessKey(d digest.Digest) []byte {
	return append([]byte{kindAccess}, d...)
}
func pendingKey(id fillID) []byte { return append([]byte{kindPending}, id[:]...) }

func chunkKey(id fillID, idx int64) []byte {
	k := make([]byte, 1+len(id)+4)
	k[0] = kindChunk
	copy(k[1:], id[:])
	binary.BigEndian.PutUint32(k[1+len(id):], uint32(idx))
	return k
}

func (s *Badger) blobMeta(d digest.Digest) (blobMeta, error) {
	var m blobMeta
	err := s.get(blobKey(d), func(v []byte) error {
		var err error
		m, err = decodeBlobMeta(v)
		return err
	})
	return m, err
}

// StatBlob implements BlobStore.
func (s *Badger) StatBlob(_ context.Context, d digest.Digest) (BlobInfo, error) {
	m, err := s.blobMeta(d)
	if err != nil {
		return BlobInfo{}, err
	}
	return BlobInfo{Digest: d, Size: m.size}, nil
}

// OpenBlob implements BlobStore.
func (s *Badger) OpenBlob(_ context.Context, d digest.Digest) (BlobReader, error) {
	m, err := s.blobMeta(d)
	if err != nil {
		return nil, err
	}
	return &chunkReader{db: s.db, fill: m.fill, chunk: m.chunkSize, size: func() int64 { return m.size }}, nil
}

// DeleteBlob implements BlobStore.
func (s *Badger) DeleteBlob(_ context.Context, d digest.Digest) error {
	m, err := s.blobMeta(d)
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	// Unpublish first, then drop the chunks as an unfinished fill would be.
	err = s.db.Update(func(txn *badger.Txn) error {
		if err := txn.Delete(blobKey(d)); err != nil {
			return err
		}
		if err := txn.Delete(accessKey(d)); err != nil {
			return err
		}
		return txn.Set(pendingKey(m.fill), nil)
	})
	if err != nil {
		return err
	}
	return s.deleteFill(m.fill)
}

// Touch implements Toucher. Times are kept in memory and written in batches,
// so serving a blob costs no write.
func (s *Badger) Touch(d digest.Digest) {
	now := time.Now().Unix()
	s.accessMu.Lock()
	s.accessed[d] = now
	s.accessMu.Unlock()
}

func (s *Badger) flushAccess() {
	s.accessMu.Lock()
	pending := s.accessed
	s.accessed = map[digest.Digest]int64{}
	s.accessMu.Unlock()
	if len(pending) == 0 {
		return
	}
	wb := s.db.NewWriteBatch()
	defer wb.Cancel()
	for d, t := range pending {
		if err := wb.Set(accessKey(d), binary.BigEndian.AppendUint64(nil, uint64(t))); err != nil {
			s.log.Warn("write blob access times", "err", err)
			return
		}
	}
	if err := wb.Flush(); err != nil {
		s.log.Warn("write blob access times", "err", err)
	}
}

// LastAccess returns when a blob was last served or committed (zero if never
// recorded).
func (s *Badger) LastAccess(d digest.Digest) time.Time {
	s.accessMu.Lock()
	t, ok := s.accessed[d]
	s.accessMu.Unlock()
	if ok {
		return time.Unix(t, 0)
	}
	_ = s.get(accessKey(d), func(v []byte) error {
		if len(v) == 8 {
			t = int64(binary.BigEndian.Uint64(v))
		}
		return nil
	})
	if t == 0 {
		return time.Time{}
	}
	return time.Unix(t, 0)
}

// chunkReader reads a blob's chunks. size is a function so that the same
// reader serves a blob still being written.
type chunkReader struct {
	db    *badger.DB
	fill  fillID
	chunk int64
	size  func() int64
}

func (r *chunkReader) Size() int64 { return r.size() }

func (r *chunkReader) ReadAt(p []byte, off int64) (int, error) {
	size := r.size()
	if off < 0 {
		return 0, fmt.Errorf("cache: negative offset %d", off)
	}
	if off >= size {
		return 0, io.EOF
	}
	want := len(p)
	if rest := size - off; int64(want) > rest {
		want = int(rest)
	}
	n := 0
	err := r.db.View(func(txn *badger.Txn) error {
		for n < want {
			idx, within := off/r.chunk, off%r.chunk
			item, err := txn.Get(chunkKey(r.fill, idx))
			if err != nil {
				if errors.Is(err, badger.ErrKeyNotFound) {
					return fmt.Errorf("%w: chunk %d of a blob is missing", ErrCorrupt, idx)
				}
				return err
			}
			err = item.Value(func(v []byte) error {
				if within >= int64(len(v)) {
					return fmt.Errorf("%w: chunk %d is %d bytes", ErrCorrupt, idx, len(v))
				}
				c := copy(p[n:want], v[within:])
				n += c
				off += int64(c)
				return nil
			})
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return n, err
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// CreateBlob implements BlobStore.
func (s *Badger) CreateBlob(_ context.Context) (BlobWriter, error) {
	w := &badgerWriter{s: s}
	if _, err := rand.Read(w.fill[:]); err != nil {
		return nil, err
	}
	w.reader = chunkReader{db: s.db, fill: w.fill, chunk: int64(s.chunkSize), size: w.inChunks}
	stamp := binary.BigEndian.AppendUint64(nil, uint64(time.Now().Unix()))
	if err := s.db.Update(func(txn *badger.Txn) error { return txn.Set(pendingKey(w.fill), stamp) }); err != nil {
		return nil, fmt.Errorf("cache: create blob: %w", err)
	}
	return w, nil
}

// badgerWriter writes a blob as chunks. Whole chunks go to Badger; the
// tail is held in buf, or, while parked, written as a partial chunk.
// Readers may read everything written, tail included, concurrently.
type badgerWriter struct {
	s      *Badger
	fill   fillID
	reader chunkReader
	done   atomic.Bool

	mu      sync.RWMutex // guards buf's bytes against concurrent readers
	buf     []byte
	next    int64        // index of the chunk buf will become
	flushed atomic.Int64 // bytes in whole chunks
	parked  atomic.Int64 // bytes of the tail written as a partial chunk
}

var _ Parker = (*badgerWriter)(nil)

// inChunks is how many bytes the chunks in Badger hold.
func (w *badgerWriter) inChunks() int64 { return w.flushed.Load() + w.parked.Load() }

func (w *badgerWriter) Write(p []byte) (int, error) {
	if w.done.Load() {
		return 0, ErrWriterDone
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.unpark(); err != nil {
		return 0, err
	}
	if w.buf == nil && len(p) > 0 {
		// Allocated at the first byte: an upload session that sends nothing costs no chunk.
		w.buf = make([]byte, 0, w.s.chunkSize)
	}
	n := 0
	for len(p) > 0 {
		c := copy(w.buf[len(w.buf):cap(w.buf)], p)
		w.buf = w.buf[:len(w.buf)+c]
		p, n = p[c:], n+c
		if len(w.buf) == cap(w.buf) {
			if err := w.flush(); err != nil {
				return n, err
			}
		}
	}
	return n, nil
}

// flush writes buf as the next chunk. The caller holds mu.
func (w *badgerWriter) flush() error {
	if len(w.buf) == 0 {
		return nil
	}
	key := chunkKey(w.fill, w.next)
	if err := w.s.db.Update(func(txn *badger.Txn) error { return txn.Set(key, w.buf) }); err != nil {
		return fmt.Errorf("cache: write blob chunk: %w", err)
	}
	w.next++
	w.flushed.Add(int64(len(w.buf)))
	w.buf = w.buf[:0]
	return nil
}

// Park implements Parker: the tail is written as a partial chunk and the
// buffer released, so an idle upload session holds no memory.
func (w *badgerWriter) Park() error {
	if w.done.Load() {
		return ErrWriterDone
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.buf) == 0 {
		w.buf = nil
		return nil
	}
	key := chunkKey(w.fill, w.next)
	if err := w.s.db.Update(func(txn *badger.Txn) error { return txn.Set(key, w.buf) }); err != nil {
		return fmt.Errorf("cache: park blob tail: %w", err)
	}
	w.parked.Store(int64(len(w.buf)))
	w.buf = nil
	return nil
}

// unpark reads a parked tail back into a buffer. The caller holds mu.
func (w *badgerWriter) unpark() error {
	n := w.parked.Load()
	if n == 0 {
		return nil
	}
	buf := make([]byte, n, w.s.chunkSize)
	if _, err := w.reader.ReadAt(buf, w.flushed.Load()); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("cache: unpark blob tail: %w", err)
	}
	w.buf = buf
	w.parked.Store(0)
	return nil
}

func (w *badgerWriter) Size() int64 {
	w.mu.RLock()
	defer w.mu.RUnlock()
	return w.inChunks() + int64(len(w.buf))
}

// ReadAt reads what has been written: chunks from Badger, the tail from
// the buffer. Any goroutine may call it while another writes.
func (w *badgerWriter) ReadAt(p []byte, off int64) (int, error) {
	n := 0
	for n < len(p) {
		w.mu.RLock()
		inChunks := w.inChunks()
		if off >= inChunks {
			tail := off - inChunks
			if tail >= int64(len(w.buf)) {
				w.mu.RUnlock()
				return n, io.EOF
			}
			n += copy(p[n:], w.buf[tail:])
			w.mu.RUnlock()
			if n < len(p) {
				return n, io.EOF
			}
			return n, nil
		}
		w.mu.RUnlock()
		// Chunks below inChunks never change until the writer ends.
		want := min(int64(len(p)-n), inChunks-off)
		m, err := w.reader.ReadAt(p[n:n+int(want)], off)
		n, off = n+m, off+int64(m)
		if err != nil && !errors.Is(err, io.EOF) {
			return n, err
		}
		if m == 0 {
			return n, io.EOF
		}
	}
	return n, nil
}

func (w *badgerWriter) Commit(_ context.Context, d digest.Digest, size int64) error {
	if w.done.Load() {
		return ErrWriterDone
	}
	w.mu.Lock()
	err := w.unpark()
	if err == nil {
		err = w.flush()
	}
	w.mu.Unlock()
	if err != nil {
		return err
	}
	if got := w.flushed.Load(); got != size {
		return fmt.Errorf("cache: commit %s: wrote %d bytes, want %d", d, got, size)
	}
	meta := blobMeta{fill: w.fill, size: size, chunkSize: int64(w.s.chunkSize)}.encode()
	err = w.s.db.Update(func(txn *badger.Txn) error {
		if _, err := txn.Get(blobKey(d)); err == nil {
			// Already committed by another writer: keep that one. This
			// writer's chunks stay readable for its followers and are
			// swept at the next open, as the pending marker remains.
			return nil
		} else if !errors.Is(err, badger.ErrKeyNotFound) {
			return err
		}
		if err := txn.Set(blobKey(d), meta); err != nil {
			return err
		}
		return txn.Delete(pendingKey(w.fill))
	})
	if err != nil {
		return fmt.Errorf("cache: commit %s: %w", d, err)
	}
	w.done.Store(true)
	w.mu.Lock()
	w.buf = nil
	w.mu.Unlock()
	w.s.Touch(d)
	return nil
}

func (w *badgerWriter) Cancel(_ context.Context) error {
	if w.done.Swap(true) {
		return nil
	}
	w.mu.Lock()
	w.buf = nil
	w.mu.Unlock()
	return w.s.deleteFill(w.fill)
}

// --- manifests ---

func manifestKey(d digest.Digest) []byte { return append([]byte{kindManifest}, d...) }

// GetManifest implements ManifestStore.
func (s *Badger) GetManifest(_ context.Context, d digest.Digest) (Manifest, error) {
	m := Manifest{Digest: d}
	err := s.get(manifestKey(d), func(v []byte) error {
		if len(v) < 1 || v[0] != encodingV1 {
			return ErrCorrupt
		}
		mt, rest, ok := readString(v[1:])
		if !ok {
			return ErrCorrupt
		}
		m.MediaType = mt
		m.Data = append([]byte(nil), rest...)
		return nil
	})
	if errors.Is(err, ErrNotFound) {
		return Manifest{}, err
	}
	if err != nil {
		return Manifest{}, fmt.Errorf("cache: manifest %s: %w", d, err)
	}
	return m, nil
}

// PutManifest implements ManifestStore.
func (s *Badger) PutManifest(_ context.Context, m Manifest) error {
	v := make([]byte, 0, 1+binary.MaxVarintLen64+len(m.MediaType)+len(m.Data))
	v = append(v, encodingV1)
	v = appendString(v, m.MediaType)
	v = append(v, m.Data...)
	if err := s.db.Update(func(txn *badger.Txn) error { return txn.Set(manifestKey(m.Digest), v) }); err != nil {
		return fmt.Errorf("cache: put manifest %s: %w", m.Digest, err)
	}
	return nil
}

// DeleteManifest implements ManifestStore.
func (s *Badger) DeleteManifest(_ context.Context, d digest.Digest) error {
	return s.db.Update(func(txn *badger.Txn) error { return txn.Delete(manifestKey(d)) })
}

// --- tags ---

func tagKey(k TagKey) []byte {
	b := make([]byte, 0, 3+len(k.Upstream)+len(k.Repo)+len(k.Tag))
	b = append(b, kindTag)
	b = append(b, k.Upstream...)
	b = append(b, 0)
	b = append(b, k.Repo...)
	b = append(b, 0)
	return append(b, k.Tag...)
}

// Tag entries: version 1 has digest, media type, size and check time;
// version 2 adds the pending digest, its media type and size.
const tagEncodingV2 = 2

func (e TagEntry) encode() []byte {
	b := make([]byte, 0, 80+len(e.Digest)+len(e.MediaType)+len(e.Pending)+len(e.PendingType))
	b = append(b, tagEncodingV2)
	b = appendString(b, string(e.Digest))
	b = appendString(b, e.MediaType)
	b = binary.AppendVarint(b, e.Size)
	b = binary.AppendVarint(b, e.CheckedAt.UnixNano())
	b = appendString(b, string(e.Pending))
	b = appendString(b, e.PendingType)
	return binary.AppendVarint(b, e.PendingSize)
}

func decodeTagEntry(v []byte) (TagEntry, error) {
	var e TagEntry
	if len(v) < 1 || v[0] != encodingV1 && v[0] != tagEncodingV2 {
		return e, ErrCorrupt
	}
	d, rest, ok := readString(v[1:])
	if !ok {
		return e, ErrCorrupt
	}
	mt, rest, ok := readString(rest)
	if !ok {
		return e, ErrCorrupt
	}
	size, n := binary.Varint(rest)
	if n <= 0 {
		return e, ErrCorrupt
	}
	rest = rest[n:]
	at, n := binary.Varint(rest)
	if n <= 0 {
		return e, ErrCorrupt
	}
	rest = rest[n:]
	e = TagEntry{Digest: digest.Digest(d), MediaType: mt, Size: size, CheckedAt: time.Unix(0, at)}
	if v[0] == encodingV1 {
		return e, nil
	}
	pd, rest, ok := readString(rest)
	if !ok {
		return e, ErrCorrupt
	}
	pt, rest, ok := readString(rest)
	if !ok {
		return e, ErrCorrupt
	}
	ps, n := binary.Varint(rest)
	if n <= 0 {
		return e, ErrCorrupt
	}
	e.Pending, e.PendingType, e.PendingSize = digest.Digest(pd), pt, ps
	return e, nil
}

// GetTag implements TagStore.
func (s *Badger) GetTag(_ context.Context, k TagKey) (TagEntry, error) {
	var e TagEntry
	err := s.get(tagKey(k), func(v []byte) error {
		var err error
		e, err = decodeTagEntry(v)
		return err
	})
	return e, err
}

// PutTag implements TagStore.
func (s *Badger) PutTag(_ context.Context, k TagKey, e TagEntry) error {
	return s.db.Update(func(txn *badger.Txn) error { return txn.Set(tagKey(k), e.encode()) })
}

// DeleteTag implements TagStore.
func (s *Badger) DeleteTag(_ context.Context, k TagKey) error {
	return s.db.Update(func(txn *badger.Txn) error { return txn.Delete(tagKey(k)) })
}

// ListTags implements TagLister.
func (s *Badger) ListTags(_ context.Context, upstream, repo string) ([]Tag, error) {
	prefix := tagKey(TagKey{Upstream: upstream, Repo: repo})
	var out []Tag
	err := s.scan(prefix, true, func(key, v []byte) error {
		e, err := decodeTagEntry(v)
		if err == nil {
			out = append(out, Tag{Name: string(key[len(prefix):]), TagEntry: e})
		}
		return err
	})
	return out, err
}

// --- referrers ---

func referrerPrefix(k ReferrerKey) []byte {
	b := make([]byte, 0, 4+len(k.Upstream)+len(k.Repo)+len(k.Subject))
	b = append(b, kindReferrer)
	b = append(b, k.Upstream...)
	b = append(b, 0)
	b = append(b, k.Repo...)
	b = append(b, 0)
	b = append(b, k.Subject...)
	return append(b, 0)
}

// PutReferrer implements ReferrerIndex.
func (s *Badger) PutReferrer(_ context.Context, k ReferrerKey, d v1.Descriptor) error {
	v, err := json.Marshal(d)
	if err != nil {
		return err
	}
	key := append(referrerPrefix(k), d.Digest...)
	return s.db.Update(func(txn *badger.Txn) error { return txn.Set(key, v) })
}

// DeleteReferrer implements ReferrerIndex.
func (s *Badger) DeleteReferrer(_ context.Context, k ReferrerKey, referrer digest.Digest) error {
	key := append(referrerPrefix(k), referrer...)
	return s.db.Update(func(txn *badger.Txn) error { return txn.Delete(key) })
}

// ListReferrers implements ReferrerIndex.
func (s *Badger) ListReferrers(_ context.Context, k ReferrerKey) ([]v1.Descriptor, error) {
	out := []v1.Descriptor{}
	err := s.scan(referrerPrefix(k), true, func(_, v []byte) error {
		var d v1.Descriptor
		if err := json.Unmarshal(v, &d); err != nil {
			return fmt.Errorf("%w: referrer: %v", ErrCorrupt, err)
		}
		out = append(out, d)
		return nil
	})
	return out, err
}

func upstreamReferrersKey(k ReferrerKey) []byte {
	key := referrerPrefix(k)
	key[0] = kindUpRefs
	return key[:len(key)-1]
}

// GetUpstreamReferrers implements ReferrerIndex.
func (s *Badger) GetUpstreamReferrers(_ context.Context, k ReferrerKey) (UpstreamReferrers, error) {
	var a UpstreamReferrers
	err := s.get(upstreamReferrersKey(k), func(v []byte) error {
		if len(v) < 1 || v[0] != encodingV1 {
			return ErrCorrupt
		}
		at, n := binary.Varint(v[1:])
		if n <= 0 {
			return ErrCorrupt
		}
		a.CheckedAt = time.Unix(0, at)
		if err := json.Unmarshal(v[1+n:], &a.Descriptors); err != nil {
			return fmt.Errorf("%w: upstream referrers: %v", ErrCorrupt, err)
		}
		return nil
	})
	return a, err
}

// PutUpstreamReferrers implements ReferrerIndex.
func (s *Badger) PutUpstreamReferrers(_ context.Context, k ReferrerKey, a UpstreamReferrers) error {
	ds, err := json.Marshal(a.Descriptors)
	if err != nil {
		return err
	}
	v := binary.AppendVarint([]byte{encodingV1}, a.CheckedAt.UnixNano())
	v = append(v, ds...)
	return s.db.Update(func(txn *badger.Txn) error { return txn.Set(upstreamReferrersKey(k), v) })
}

// --- repository links ---

func linkKey(k RepoKey, kind LinkKind, d digest.Digest) []byte {
	b := make([]byte, 0, 4+len(k.Upstream)+len(k.Repo)+len(d))
	b = append(b, kindLink)
	b = append(b, k.Upstream...)
	b = append(b, 0)
	b = append(b, k.Repo...)
	b = append(b, 0, byte(kind))
	return append(b, d...)
}

// holderPrefix is the start of the reverse link keys of d: who holds it.
func holderPrefix(kind LinkKind, d digest.Digest) []byte {
	b := make([]byte, 0, 3+len(d))
	b = append(b, kindHolder, byte(kind))
	b = append(b, d...)
	return append(b, 0)
}

func holderKey(k RepoKey, kind LinkKind, d digest.Digest) []byte {
	b := holderPrefix(kind, d)
	b = append(b, k.Upstream...)
	b = append(b, 0)
	return append(b, k.Repo...)
}

// Link implements RepoLinks. The forward and the reverse key are written
// in one transaction.
func (s *Badger) Link(_ context.Context, k RepoKey, kind LinkKind, d digest.Digest, origin LinkOrigin) error {
	key := linkKey(k, kind, d)
	return s.db.Update(func(txn *badger.Txn) error {
		if item, err := txn.Get(key); err == nil {
			var old LinkOrigin
			_ = item.Value(func(v []byte) error {
				if len(v) == 1 {
					old = LinkOrigin(v[0])
				}
				return nil
			})
			if old == origin || old == OriginUpstream {
				return nil
			}
		} else if !errors.Is(err, badger.ErrKeyNotFound) {
			return err
		}
		v := []byte{byte(origin)}
		if err := txn.Set(key, v); err != nil {
			return err
		}
		return txn.Set(holderKey(k, kind, d), v)
	})
}

// Unlink implements RepoLinks.
func (s *Badger) Unlink(_ context.Context, k RepoKey, kind LinkKind, d digest.Digest) (bool, error) {
	existed := false
	err := s.db.Update(func(txn *badger.Txn) error {
		key := linkKey(k, kind, d)
		if _, err := txn.Get(key); errors.Is(err, badger.ErrKeyNotFound) {
			return nil
		} else if err != nil {
			return err
		}
		existed = true
		if err := txn.Delete(key); err != nil {
			return err
		}
		return txn.Delete(holderKey(k, kind, d))
	})
	return existed, err
}

// Linked implements RepoLinks.
func (s *Badger) Linked(_ context.Context, k RepoKey, kind LinkKind, d digest.Digest) (LinkOrigin, bool, error) {
	var origin LinkOrigin
	err := s.get(linkKey(k, kind, d), func(v []byte) error {
		origin = OriginPushed // links written before origins were kept were pushes
		if len(v) == 1 {
			origin = LinkOrigin(v[0])
		}
		return nil
	})
	if errors.Is(err, ErrNotFound) {
		return 0, false, nil
	}
	return origin, err == nil, err
}

// UpstreamHolds implements RepoLinks with one prefix scan of d's holders
// in the upstream.
func (s *Badger) UpstreamHolds(_ context.Context, upstream string, kind LinkKind, d digest.Digest) (bool, error) {
	prefix := append(holderPrefix(kind, d), upstream...)
	prefix = append(prefix, 0)
	found := false
	err := s.scan(prefix, true, func(_, v []byte) error {
		if len(v) == 1 && LinkOrigin(v[0]) == OriginUpstream {
			found = true
			return errStopScan
		}
		return nil
	})
	if errors.Is(err, errStopScan) {
		err = nil
	}
	return found, err
}

var errStopScan = errors.New("stop scan")

// schemaVersion is the layout of the keys. Version 1 keyed links by the
// repository alone (hosted repositories only) and had no holder keys.
const schemaVersion = 2

var schemaKey = []byte("!schema")

// migrate brings a store written by an older version to schemaVersion.
func (s *Badger) migrate() error {
	version := 1
	err := s.get(schemaKey, func(v []byte) error {
		if len(v) == 1 {
			version = int(v[0])
		}
		return nil
	})
	if err != nil && !errors.Is(err, ErrNotFound) {
		return err
	}
	if version > schemaVersion {
		return fmt.Errorf("cache: the store was written by a newer ocimirror (layout %d, this one knows %d)", version, schemaVersion)
	}
	if version == schemaVersion {
		return nil
	}
	// Version 1 link keys: l<repo>0<kind><digest>, hosted repositories
	// only. Their names hold a '/', which upstream names never do.
	var old [][]byte
	err = s.scan([]byte{kindLink}, false, func(key, _ []byte) error {
		seg, _, ok := bytes.Cut(key[1:], []byte{0})
		if ok && bytes.IndexByte(seg, '/') >= 0 {
			old = append(old, bytes.Clone(key))
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("cache: migrate links: %w", err)
	}
	wb := s.db.NewWriteBatch()
	defer wb.Cancel()
	for _, key := range old {
		repo, rest, _ := bytes.Cut(key[1:], []byte{0})
		if len(rest) < 2 {
			continue
		}
		k, kind, d := RepoKey{Repo: string(repo)}, LinkKind(rest[0]), digest.Digest(rest[1:])
		v := []byte{byte(OriginPushed)}
		if err := wb.Delete(key); err != nil {
			return err
		}
		if err := wb.Set(linkKey(k, kind, d), v); err != nil {
			return err
		}
		if err := wb.Set(holderKey(k, kind, d), v); err != nil {
			return err
		}
	}
	if err := wb.Set(schemaKey, []byte{schemaVersion}); err != nil {
		return err
	}
	if err := wb.Flush(); err != nil {
		return fmt.Errorf("cache: migrate links: %w", err)
	}
	if len(old) > 0 {
		s.log.Info("store migrated", "layout", schemaVersion, "links", len(old))
	}
	return nil
}

// --- encoding helpers ---

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

func readString(b []byte) (string, []byte, bool) {
	n, w := binary.Uvarint(b)
	if w <= 0 || uint64(len(b)-w) < n {
		return "", nil, false
	}
	return string(b[w : w+int(n)]), b[w+int(n):], true
}

// badgerLogger sends Badger's log to slog. Badger's info lines (compactions,
// replays) are debug-level noise for a proxy operator.
type badgerLogger struct{ l *slog.Logger }

func (b badgerLogger) Errorf(f string, a ...any)   { b.l.Error("badger: " + fmt.Sprintf(f, a...)) }
func (b badgerLogger) Warningf(f string, a ...any) { b.l.Warn("badger: " + fmt.Sprintf(f, a...)) }
func (b badgerLogger) Infof(f string, a ...any)    { b.l.Debug("badger: " + fmt.Sprintf(f, a...)) }
func (b badgerLogger) Debugf(f string, a ...any)   { b.l.Debug("badger: " + fmt.Sprintf(f, a...)) }
