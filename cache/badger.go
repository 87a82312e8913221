package cache

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/dgraph-io/badger/v4/options"
	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
	"go.opentelemetry.io/otel/metric"
)

// Key layout. Every key starts with a one-byte kind.
//
//	b<digest>                  blob index: size (the bytes are a file, see files.go)
//	a<digest>                  blob last access (unix seconds)
//	m<digest>                  manifest: media type and bytes
//	t<upstream>0<repo>0<tag>   tag entry
//	r<upstream>0<repo>0<subject>0<referrer>   referrer descriptor (JSON)
//	u<upstream>0<repo>0<subject>   the upstream referrers API's answer
//	l<upstream>0<repo>0<kind><digest>   a repository's link to content it holds (origin)
//	L<kind><digest>0<upstream>0<repo>   the same link, reversed: who holds a digest
//	P<upstream>0<repo>0<name>  a pin: the digest a tag (or digest) named when pinned (pins.go)
//	J<sequence>                an import being committed, replayed at open (import.go)
//	D<kind><digest>            content that is data (a hosted or pushed link), never evicted
//	g<kind><digest>            content no repository holds: since when (garbage after a grace)
//	!schema                    the key layout's version
//
// Layout 1 (before blob files) also had c<fill ID><index> blob chunks and
// p<fill ID> pending fills; see layout.go.
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
	kindData     = 'D'
	kindUnheld   = 'g'
	kindUpRefs   = 'u'
	kindUpTags   = 'T'
	kindPin      = 'P'
	kindJournal  = 'J'

	encodingV1 = 1
)

// BadgerOptions configures OpenBadger.
type BadgerOptions struct {
	// Path is the data directory: the database in db/, blob files in
	// blobs/ and tmp/.
	Path string
	// Logger receives Badger's warnings and the store's own.
	Logger *slog.Logger
	// GCInterval is how often the value log is garbage collected (10m if 0).
	GCInterval time.Duration
	// AccessFlushInterval is how often last-access times are written (30s if 0).
	AccessFlushInterval time.Duration
	// Budget bounds the disk use; eviction passes keep to it.
	Budget Budget
	// GCGrace is how long data nothing references stays before it is
	// collected (DefaultGCGrace if 0); CollectInterval is how often a
	// collection runs (1h if 0, none if negative).
	GCGrace         time.Duration
	CollectInterval time.Duration
	// Clock is the time source of access times (tests); time.Now if nil.
	Clock func() time.Time
	// WaitForPins holds every eviction pass until SetPins is called: no
	// pass may run before the pins are known.
	WaitForPins bool
	// MeterProvider receives the store's metrics (none if nil).
	MeterProvider metric.MeterProvider
}

// Badger is the on-disk Store: blob bytes in content-addressed files,
// everything else (the blob index, manifests, tags, referrers, links) in a
// Badger database.
type Badger struct {
	db    *badger.DB
	dbDir string
	files *blobFiles
	log   *slog.Logger

	// blobBytes is the size of every committed blob file; blobDisk, the
	// disk they take (whole blocks).
	blobBytes atomic.Int64
	blobDisk  atomic.Int64
	// commitLocks serialize the writes of one digest's bytes and links
	// (by its first byte).
	commitLocks [digestLocks]sync.Mutex

	accessMu sync.Mutex
	accessed map[digest.Digest]int64
	// accessFull asks for a flush before the interval: accessed is at
	// maxPendingAccess.
	accessFull chan struct{}
	now        func() time.Time

	// readers counts the open readers of each blob: eviction spares them.
	readersMu sync.Mutex
	readers   map[digest.Digest]int

	pins    atomic.Pointer[func(context.Context) (map[digest.Digest]struct{}, error)]
	onEvict atomic.Pointer[func(LinkKind, digest.Digest)]
	kick    chan struct{}
	budget  bool
	limits  Budget
	// waitPins: no pass before SetPins.
	waitPins bool
	metrics  *storeMetrics
	// passMu runs one eviction pass at a time: the background one, or
	// one that Reserve runs to make room.
	passMu sync.Mutex
	// reserved is room held by Reserve for content being written;
	// reserveMu makes a check and a reservation one step.
	reserved  atomic.Int64
	reserveMu sync.Mutex
	// fullUntil (unix nanoseconds) is until when Reserve answers ErrFull
	// without another pass: the last one found nothing to evict.
	fullUntil atomic.Int64

	// importChunkBytes, when set, replaces the bound of an import's
	// transactions, and afterImportChunk hears of each one committed
	// (tests).
	importChunkBytes int
	afterImportChunk func(chunk int)

	// ctx ends when the store closes: background passes stop with it.
	ctx    context.Context
	cancel context.CancelFunc
	stop   chan struct{}
	wg     sync.WaitGroup
}

var (
	_ Store   = (*Badger)(nil)
	_ Toucher = (*Badger)(nil)
)

// OpenBadger opens (or creates) the store at opts.Path. A data directory
// of the chunked layout is migrated first; then what unfinished writers
// left behind is discarded, and the blob index is checked against the
// files.
func OpenBadger(opts BadgerOptions) (*Badger, error) {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.GCInterval <= 0 {
		opts.GCInterval = 10 * time.Minute
	}
	if opts.AccessFlushInterval <= 0 {
		opts.AccessFlushInterval = 30 * time.Second
	}
	if opts.Clock == nil {
		opts.Clock = time.Now
	}
	if opts.GCGrace <= 0 {
		opts.GCGrace = DefaultGCGrace
	}
	if opts.CollectInterval == 0 {
		opts.CollectInterval = time.Hour
	}
	if err := checkBudget(&opts.Budget); err != nil {
		return nil, err
	}
	files, err := newBlobFiles(opts.Path)
	if err != nil {
		return nil, err
	}
	if err := migrateChunkedLayout(opts, files); err != nil {
		return nil, err
	}
	dbDir := filepath.Join(opts.Path, "db")
	db, err := badger.Open(badgerOptions(opts, dbDir))
	if err != nil {
		return nil, fmt.Errorf("cache: open %s: %w", opts.Path, err)
	}
	s := &Badger{
		db:         db,
		dbDir:      dbDir,
		files:      files,
		log:        opts.Logger,
		accessed:   map[digest.Digest]int64{},
		accessFull: make(chan struct{}, 1),
		now:        opts.Clock,
		readers:    map[digest.Digest]int{},
		kick:       make(chan struct{}, 1),
		budget:     opts.Budget.MaxSize > 0 || opts.Budget.MinFree > 0,
		limits:     opts.Budget,
		waitPins:   opts.WaitForPins,
		stop:       make(chan struct{}),
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	if err := s.migrate(); err != nil {
		db.Close()
		return nil, err
	}
	if n, err := files.sweepTemp(); err != nil {
		db.Close()
		return nil, fmt.Errorf("cache: sweep unfinished blobs: %w", err)
	} else if n > 0 {
		s.log.Info("discarded unfinished blob writes", "count", n)
	}
	if err := s.checkBlobs(); err != nil {
		db.Close()
		return nil, err
	}
	if err := s.replayImports(); err != nil {
		db.Close()
		return nil, err
	}
	lsm, vlog := db.Size()
	s.log.Info("store opened", "path", opts.Path, "blob_bytes", s.blobBytes.Load(), "db_bytes", lsm+vlog,
		"max_size", opts.Budget.MaxSize, "min_free", opts.Budget.MinFree)
	if s.metrics, err = newStoreMetrics(opts.MeterProvider, s); err != nil {
		db.Close()
		return nil, fmt.Errorf("cache: metrics: %w", err)
	}
	s.wg.Add(2)
	go s.every(opts.GCInterval, nil, s.gcValueLog)
	go s.every(opts.AccessFlushInterval, s.accessFull, s.flushAccess)
	if s.budget {
		s.wg.Add(1)
		go s.keepBudget(opts.Budget)
		s.kickBudget()
	}
	if opts.CollectInterval > 0 {
		s.wg.Add(1)
		go s.every(opts.CollectInterval, nil, func() { s.collectOnce(opts.GCGrace) })
	}
	return s, nil
}

// badgerOptions sizes Badger for a proxy's metadata: the LSM tree holds
// keys and small values, manifests go to the value log (memory-mapped
// files, page cache rather than heap), and the memtables are small.
// Badger's defaults (64 MiB memtables x 5, 256 MiB block cache) are for a
// database server.
func badgerOptions(o BadgerOptions, dir string) badger.Options {
	return badger.DefaultOptions(dir).
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
	s.metrics.close()
	close(s.stop)
	s.cancel()
	s.wg.Wait()
	s.flushAccess()
	return s.db.Close()
}

// every runs f every d, and whenever kick (if not nil) says so.
func (s *Badger) every(d time.Duration, kick <-chan struct{}, f func()) {
	defer s.wg.Done()
	t := time.NewTicker(d)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
		case <-kick:
		}
		f()
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

// --- blobs ---

// blobEncodingV2 is a blob index entry of the file layout: its size. (In
// layout 1 an entry named the chunks holding the bytes; see layout.go.)
const blobEncodingV2 = 2

func encodeBlobSize(size int64) []byte {
	return binary.AppendUvarint([]byte{blobEncodingV2}, uint64(size))
}

func decodeBlobSize(v []byte) (int64, error) {
	if len(v) < 2 || v[0] != blobEncodingV2 {
		return 0, ErrCorrupt
	}
	size, n := binary.Uvarint(v[1:])
	if n <= 0 {
		return 0, ErrCorrupt
	}
	return int64(size), nil
}

func blobKey(d digest.Digest) []byte { return append([]byte{kindBlob}, d...) }
func accessKey(d digest.Digest) []byte {
	return append([]byte{kindAccess}, d...)
}

// StatBlob implements BlobStore.
func (s *Badger) StatBlob(_ context.Context, d digest.Digest) (BlobInfo, error) {
	var size int64
	err := s.get(blobKey(d), func(v []byte) error {
		var err error
		size, err = decodeBlobSize(v)
		return err
	})
	if err != nil {
		return BlobInfo{}, err
	}
	return BlobInfo{Digest: d, Size: size}, nil
}

// OpenBlob implements BlobStore: the blob's file, open. A blob whose file
// is gone is not found.
//
// A file under blobs/ is always a committed, verified blob (it is renamed
// there only after its check), so the file alone answers: no index read
// on the request path.
func (s *Badger) OpenBlob(_ context.Context, d digest.Digest) (BlobReader, error) {
	if len(d.Encoded()) < 2 { // callers pass parsed digests; never a short path
		return nil, ErrNotFound
	}
	f, err := s.files.open(d)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("cache: open blob %s: %w", d, err)
	}
	info, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("cache: open blob %s: %w", d, err)
	}
	s.readersMu.Lock()
	s.readers[d]++
	s.readersMu.Unlock()
	return &fileReader{s: s, d: d, f: f, size: info.Size()}, nil
}

// CreateBlob implements BlobStore: a temporary file.
func (s *Badger) CreateBlob(context.Context) (BlobWriter, error) {
	f, err := s.files.create()
	if err != nil {
		return nil, fmt.Errorf("cache: create blob: %w", err)
	}
	return &fileWriter{s: s, f: f}, nil
}

// commitFile puts a verified temporary file in place as blob d and indexes
// it, unless d is committed already.
func (s *Badger) commitFile(f *os.File, d digest.Digest, size int64) error {
	unlock := s.lockDigest(d)
	defer unlock()
	if _, err := s.StatBlob(context.Background(), d); err == nil {
		return nil // another writer's copy stays; this one goes at Close
	} else if !errors.Is(err, ErrNotFound) {
		return err
	}
	if err := s.files.place(f, d); err != nil {
		return err
	}
	err := s.db.Update(func(txn *badger.Txn) error {
		if err := txn.Set(blobKey(d), encodeBlobSize(size)); err != nil {
			return err
		}
		return markHolders(txn, LinkBlob, d, s.now())
	})
	if err != nil {
		return err
	}
	s.blobBytes.Add(size)
	s.blobDisk.Add(onDisk(size))
	if s.budget {
		s.kickBudget()
	}
	return nil
}

// reading reports whether a client has blob d open.
func (s *Badger) reading(d digest.Digest) bool {
	s.readersMu.Lock()
	defer s.readersMu.Unlock()
	return s.readers[d] > 0
}

func (s *Badger) closedReader(d digest.Digest) {
	s.readersMu.Lock()
	defer s.readersMu.Unlock()
	if s.readers[d]--; s.readers[d] <= 0 {
		delete(s.readers, d)
	}
}

// DeleteBlob implements BlobStore: the index entry goes, then the file.
// Readers that have the file open read on.
func (s *Badger) DeleteBlob(_ context.Context, d digest.Digest) error {
	unlock := s.lockDigest(d)
	defer unlock()
	return s.deleteLocked(LinkBlob, d)
}

// blockSize is the filesystem block a file's size is rounded up to on disk.
const blockSize = 4096

func onDisk(size int64) int64 { return (size + blockSize - 1) / blockSize * blockSize }

// BlobBytes is the size of the committed blob files.
func (s *Badger) BlobBytes() int64 { return s.blobBytes.Load() }

// checkBlobs holds the blob index and the files to each other at start: an
// entry whose file is missing (or of another size) is dropped, a file
// without an entry (a crash between the rename and the index write, or a
// stray) is removed, and the byte count is taken from what remains.
//
// The files are walked in lexical order, which is the index's digest
// order (blobs/<algorithm>/<first two hex>/<hex>, and a name that is not
// its directory's digest is a stray), so one walk of each, side by side,
// does it: no lookup per file or per entry.
func (s *Badger) checkBlobs() error {
	var missing [][]byte
	var total, disk, strays, strayBytes int64
	err := s.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{kindBlob}, PrefetchValues: false})
		defer it.Close()
		it.Rewind()
		err := s.files.walk(func(path string, d digest.Digest, size int64) error {
			// Entries before the file's digest have no file.
			for ; it.Valid() && string(it.Item().Key()[1:]) < string(d); it.Next() {
				missing = append(missing, it.Item().KeyCopy(nil))
			}
			if d != "" && it.Valid() && string(it.Item().Key()[1:]) == string(d) {
				item := it.Item()
				var indexed int64
				err := item.Value(func(v []byte) error {
					var err error
					indexed, err = decodeBlobSize(v)
					return err
				})
				if err == nil && indexed == size {
					total += size
					disk += onDisk(size)
					it.Next()
					return nil
				}
				missing = append(missing, item.KeyCopy(nil))
				it.Next()
			}
			strays++
			strayBytes += size
			return os.Remove(path)
		})
		for ; err == nil && it.Valid(); it.Next() {
			missing = append(missing, it.Item().KeyCopy(nil))
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("cache: check blobs: %w", err)
	}
	if len(missing) > 0 {
		wb := s.db.NewWriteBatch()
		defer wb.Cancel()
		for _, k := range missing {
			if err := wb.Delete(k); err != nil {
				return err
			}
		}
		if err := wb.Flush(); err != nil {
			return fmt.Errorf("cache: check blobs: %w", err)
		}
		s.log.Warn("blob index entries without their file dropped", "count", len(missing))
	}
	if strays > 0 {
		s.log.Warn("blob files without an index entry removed", "count", strays, "bytes", strayBytes)
	}
	s.blobBytes.Store(total)
	s.blobDisk.Store(disk)
	return nil
}

// maxPendingAccess bounds the access times kept in memory between two
// flushes (about 8 MB): at this many, a flush runs at once.
const maxPendingAccess = 1 << 16

// Touch implements Toucher. Times are kept in memory and written in batches,
// so serving a blob costs no write. A digest seen for the first time since
// the last flush is copied: the caller's is often a slice of a request's
// line, which the map would otherwise keep whole.
func (s *Badger) Touch(d digest.Digest) {
	now := s.now().Unix()
	s.accessMu.Lock()
	if _, ok := s.accessed[d]; !ok {
		d = digest.Digest(strings.Clone(string(d)))
	}
	s.accessed[d] = now
	full := len(s.accessed) >= maxPendingAccess
	s.accessMu.Unlock()
	if full {
		select {
		case s.accessFull <- struct{}{}:
		default:
		}
	}
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
	err := s.db.Update(func(txn *badger.Txn) error {
		if err := txn.Set(manifestKey(m.Digest), v); err != nil {
			return err
		}
		return markHolders(txn, LinkManifest, m.Digest, s.now())
	})
	if err != nil {
		return fmt.Errorf("cache: put manifest %s: %w", m.Digest, err)
	}
	s.Touch(m.Digest)
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
	v, err := a.encode()
	if err != nil {
		return err
	}
	return s.db.Update(func(txn *badger.Txn) error { return txn.Set(upstreamReferrersKey(k), v) })
}

func (a UpstreamReferrers) encode() ([]byte, error) {
	ds, err := json.Marshal(a.Descriptors)
	if err != nil {
		return nil, err
	}
	v := binary.AppendVarint([]byte{encodingV1}, a.CheckedAt.UnixNano())
	return append(v, ds...), nil
}

func upstreamTagsKey(upstream, repo string) []byte {
	key := tagKey(TagKey{Upstream: upstream, Repo: repo})
	key[0] = kindUpTags
	return key
}

// GetUpstreamTags implements TagLister.
func (s *Badger) GetUpstreamTags(_ context.Context, upstream, repo string) (UpstreamTags, error) {
	var l UpstreamTags
	err := s.get(upstreamTagsKey(upstream, repo), func(v []byte) error {
		var err error
		l, err = decodeUpstreamTags(v)
		return err
	})
	return l, err
}

func decodeUpstreamTags(v []byte) (UpstreamTags, error) {
	var l UpstreamTags
	if len(v) < 1 || v[0] != encodingV1 {
		return l, ErrCorrupt
	}
	at, n := binary.Varint(v[1:])
	if n <= 0 {
		return l, ErrCorrupt
	}
	l.CheckedAt = time.Unix(0, at)
	if err := json.Unmarshal(v[1+n:], &l.Tags); err != nil {
		return l, fmt.Errorf("%w: upstream tags: %v", ErrCorrupt, err)
	}
	return l, nil
}

func (l UpstreamTags) encode() ([]byte, error) {
	tags, err := json.Marshal(l.Tags)
	if err != nil {
		return nil, err
	}
	return append(binary.AppendVarint([]byte{encodingV1}, l.CheckedAt.UnixNano()), tags...), nil
}

// PutUpstreamTags implements TagLister.
func (s *Badger) PutUpstreamTags(_ context.Context, upstream, repo string, l UpstreamTags) error {
	v, err := l.encode()
	if err != nil {
		return err
	}
	return s.db.Update(func(txn *badger.Txn) error { return txn.Set(upstreamTagsKey(upstream, repo), v) })
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

// Link implements RepoLinks. The forward and the reverse key, and the
// content's data marker, are written in one transaction.
func (s *Badger) Link(_ context.Context, k RepoKey, kind LinkKind, d digest.Digest, origin LinkOrigin) error {
	unlock := s.lockDigest(d)
	defer unlock()
	return s.db.Update(func(txn *badger.Txn) error { return linkTxn(txn, k, kind, d, origin, s.now()) })
}

// linkTxn writes a link in txn; the digest's lock is held.
func linkTxn(txn *badger.Txn, k RepoKey, kind LinkKind, d digest.Digest, origin LinkOrigin, now time.Time) error {
	key := linkKey(k, kind, d)
	if item, err := txn.Get(key); err == nil {
		var old LinkOrigin
		_ = item.Value(func(v []byte) error {
			old = linkOrigin(v)
			return nil
		})
		if old == origin || old == OriginUpstream {
			return nil
		}
	} else if !errors.Is(err, badger.ErrKeyNotFound) {
		return err
	}
	v := linkValue(origin, now)
	if err := txn.Set(key, v); err != nil {
		return err
	}
	if err := txn.Set(holderKey(k, kind, d), v); err != nil {
		return err
	}
	return markHolders(txn, kind, d, now)
}

// Unlink implements RepoLinks.
func (s *Badger) Unlink(_ context.Context, k RepoKey, kind LinkKind, d digest.Digest) (bool, error) {
	unlock := s.lockDigest(d)
	defer unlock()
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
		if err := txn.Delete(holderKey(k, kind, d)); err != nil {
			return err
		}
		return markHolders(txn, kind, d, s.now())
	})
	return existed, err
}

// dataKey marks content that is data, not cache: some repository holds it
// as pushed, or a hosted repository holds it. Data is never evicted.
func dataKey(kind LinkKind, d digest.Digest) []byte {
	return append([]byte{kindData, byte(kind)}, d...)
}

// isDataLink reports whether a holder key's link makes content data.
func isDataLink(holder []byte, origin LinkOrigin, prefixLen int) bool {
	return origin != OriginUpstream || len(holder) > prefixLen && holder[prefixLen] == 0 // upstream "": hosted
}

// markHolders keeps content's markers true to its holders: the data
// marker when a hosted or pushed link holds it, the unheld marker (since
// when nothing holds it: garbage after the grace period) when none does.
func markHolders(txn *badger.Txn, kind LinkKind, d digest.Digest, now time.Time) error {
	prefix := holderPrefix(kind, d)
	it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix, PrefetchValues: false})
	data, held := false, false
	for it.Rewind(); it.Valid() && !data; it.Next() {
		item := it.Item()
		held = true
		_ = item.Value(func(v []byte) error {
			data = isDataLink(item.Key(), linkOrigin(v), len(prefix))
			return nil
		})
	}
	it.Close()
	if data {
		if err := txn.Set(dataKey(kind, d), nil); err != nil {
			return err
		}
	} else if err := txn.Delete(dataKey(kind, d)); err != nil {
		return err
	}
	if held {
		return txn.Delete(unheldKey(kind, d))
	}
	if _, err := txn.Get(unheldKey(kind, d)); err == nil {
		return nil // unheld since earlier
	} else if !errors.Is(err, badger.ErrKeyNotFound) {
		return err
	}
	return txn.Set(unheldKey(kind, d), binary.BigEndian.AppendUint64(nil, uint64(now.Unix())))
}

// unheldKey marks content that no repository holds, with since when.
func unheldKey(kind LinkKind, d digest.Digest) []byte {
	return append([]byte{kindUnheld, byte(kind)}, d...)
}

// A link's value: its origin, then (since layout 3) when it was made, in
// unix seconds.
func linkValue(origin LinkOrigin, at time.Time) []byte {
	return binary.BigEndian.AppendUint64([]byte{byte(origin)}, uint64(at.Unix()))
}

func linkOrigin(v []byte) LinkOrigin {
	if len(v) == 0 {
		return OriginPushed // links written before origins were kept were pushes
	}
	return LinkOrigin(v[0])
}

// linkTime is when a link was made; zero for links older than layout 3.
func linkTime(v []byte) time.Time {
	if len(v) < 9 {
		return time.Time{}
	}
	return time.Unix(int64(binary.BigEndian.Uint64(v[1:9])), 0)
}

// digestLocks is how many locks the digests' writes are spread over.
const digestLocks = 64

// lockDigest serializes the writes of one digest's links and bytes.
func (s *Badger) lockDigest(d digest.Digest) func() {
	mu := &s.commitLocks[lockIndex(d)]
	mu.Lock()
	return mu.Unlock
}

// lockIndex is the lock of a digest's writes: by its first byte.
func lockIndex(d digest.Digest) int {
	var b byte
	if enc := d.Encoded(); enc != "" {
		b = enc[0]
	}
	return int(b) % digestLocks
}

// lockDigests takes the locks of several digests' writes, in the locks'
// order: two such calls cannot deadlock, and every other caller holds
// one lock at a time.
func (s *Badger) lockDigests(cs []candidate) func() {
	var held [digestLocks]bool
	for _, c := range cs {
		held[lockIndex(c.d)] = true
	}
	for i, h := range held {
		if h {
			s.commitLocks[i].Lock()
		}
	}
	return func() {
		for i, h := range held {
			if h {
				s.commitLocks[i].Unlock()
			}
		}
	}
}

// Linked implements RepoLinks.
func (s *Badger) Linked(_ context.Context, k RepoKey, kind LinkKind, d digest.Digest) (LinkOrigin, bool, error) {
	var origin LinkOrigin
	err := s.get(linkKey(k, kind, d), func(v []byte) error {
		origin = linkOrigin(v)
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
		if len(v) > 0 && linkOrigin(v) == OriginUpstream {
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
// repository alone (hosted repositories only) and had no holder keys;
// version 2 had no data markers.
const schemaVersion = 3

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
	if version < 2 {
		if err := s.migrateLinks(); err != nil {
			return fmt.Errorf("cache: migrate links: %w", err)
		}
	}
	if err := s.markAllData(); err != nil {
		return fmt.Errorf("cache: mark data: %w", err)
	}
	if err := s.markAllUnheld(); err != nil {
		return fmt.Errorf("cache: mark unheld content: %w", err)
	}
	return s.db.Update(func(txn *badger.Txn) error { return txn.Set(schemaKey, []byte{schemaVersion}) })
}

// migrateLinks rewrites version 1 link keys, l<repo>0<kind><digest> of
// hosted repositories only, whose names hold a '/', which upstream names
// never do.
func (s *Badger) migrateLinks() error {
	var old [][]byte
	err := s.scan([]byte{kindLink}, false, func(key, _ []byte) error {
		seg, _, ok := bytes.Cut(key[1:], []byte{0})
		if ok && bytes.IndexByte(seg, '/') >= 0 {
			old = append(old, bytes.Clone(key))
		}
		return nil
	})
	if err != nil {
		return err
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
	if err := wb.Flush(); err != nil {
		return err
	}
	if len(old) > 0 {
		s.log.Info("store migrated: links", "links", len(old))
	}
	return nil
}

// markAllUnheld marks the blobs and manifests that no repository holds
// (content an older version cached or unlinked): garbage after the grace
// period, counted from now.
func (s *Badger) markAllUnheld() error {
	wb := s.db.NewWriteBatch()
	defer wb.Cancel()
	since := binary.BigEndian.AppendUint64(nil, uint64(s.now().Unix()))
	marked := 0
	err := s.db.View(func(txn *badger.Txn) error {
		holders := txn.NewIterator(badger.IteratorOptions{PrefetchValues: false})
		defer holders.Close()
		for _, kind := range []LinkKind{LinkBlob, LinkManifest} {
			prefix := []byte{kindBlob}
			if kind == LinkManifest {
				prefix = []byte{kindManifest}
			}
			it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix, PrefetchValues: false})
			for it.Rewind(); it.Valid(); it.Next() {
				d := digest.Digest(it.Item().Key()[1:])
				hp := holderPrefix(kind, d)
				holders.Seek(hp)
				if holders.ValidForPrefix(hp) {
					continue
				}
				marked++
				if err := wb.Set(unheldKey(kind, d), since); err != nil {
					it.Close()
					return err
				}
			}
			it.Close()
		}
		return nil
	})
	if err != nil {
		return err
	}
	if marked > 0 {
		s.log.Info("store migrated: unheld content marked", "count", marked)
	}
	return wb.Flush()
}

// markAllData writes the data marker of all content that some hosted or
// pushed link holds, from the holder keys (sorted, so one content's
// holders come together).
func (s *Badger) markAllData() error {
	wb := s.db.NewWriteBatch()
	defer wb.Cancel()
	var last []byte
	marked := 0
	err := s.scan([]byte{kindHolder}, true, func(key, v []byte) error {
		i := bytes.IndexByte(key[2:], 0)
		if i < 0 {
			return nil
		}
		content := key[:2+i] // L<kind><digest>
		if !isDataLink(key, linkOrigin(v), len(content)+1) || bytes.Equal(content, last) {
			return nil
		}
		last = bytes.Clone(content)
		marked++
		return wb.Set(dataKey(LinkKind(content[1]), digest.Digest(content[2:])), nil)
	})
	if err != nil {
		return err
	}
	if err := wb.Flush(); err != nil {
		return err
	}
	if marked > 0 {
		s.log.Info("store migrated: data marked", "count", marked)
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

// pingKey is written and read back by Ping.
var pingKey = []byte("!ping")

// Ping checks that the store is open and writable: a small write, read
// back.
func (s *Badger) Ping(context.Context) error {
	v := binary.AppendVarint(nil, time.Now().UnixNano())
	if err := s.db.Update(func(txn *badger.Txn) error { return txn.Set(pingKey, v) }); err != nil {
		return fmt.Errorf("cache: store not writable: %w", err)
	}
	return s.get(pingKey, func([]byte) error { return nil })
}
