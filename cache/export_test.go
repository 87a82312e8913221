package cache

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
)

// PutRaw and DeleteRaw write the database directly, as an older version
// of ocimirror would have.
func (s *Badger) PutRaw(key, value []byte) error {
	return s.db.Update(func(txn *badger.Txn) error { return txn.Set(key, value) })
}

func (s *Badger) DeleteRaw(key []byte) error {
	return s.db.Update(func(txn *badger.Txn) error { return txn.Delete(key) })
}

// MaxPendingAccess is maxPendingAccess.
const MaxPendingAccess = maxPendingAccess

// PendingAccess is how many access times wait in memory for a flush.
func (s *Badger) PendingAccess() int {
	s.accessMu.Lock()
	defer s.accessMu.Unlock()
	return len(s.accessed)
}

// KeyCount counts the keys under a prefix.
func (s *Badger) KeyCount(prefix []byte) int {
	n := 0
	_ = s.scan(prefix, false, func([]byte, []byte) error { n++; return nil })
	return n
}

// WriteLayout1 writes a data directory as ocimirror wrote it before blob
// files: the database in dir itself, each blob in chunks of chunkSize (the
// last one's first byte flipped when damageLast), a fill that never
// committed, and the raw keys of extra.
func WriteLayout1(dir string, blobs [][]byte, chunkSize int, damageLast bool, extra map[string][]byte) error {
	db, err := badger.Open(badger.DefaultOptions(dir).WithLogger(nil).WithValueThreshold(1 << 10))
	if err != nil {
		return err
	}
	defer db.Close()
	wb := db.NewWriteBatch()
	defer wb.Cancel()
	for i, b := range blobs {
		var fill [16]byte
		fill[0], fill[1] = byte(i), byte(i>>8)
		meta := []byte{encodingV1}
		meta = append(meta, fill[:]...)
		meta = binary.AppendUvarint(meta, uint64(len(b)))
		meta = binary.AppendUvarint(meta, uint64(chunkSize))
		if err := wb.Set(blobKey(digest.FromBytes(b)), meta); err != nil {
			return err
		}
		for idx := 0; idx*chunkSize < len(b); idx++ {
			chunk := append([]byte(nil), b[idx*chunkSize:min(len(b), (idx+1)*chunkSize)]...)
			if damageLast && i == len(blobs)-1 && idx == 0 {
				chunk[0] ^= 0xff
			}
			if err := wb.Set(layout1ChunkKey(fill, int64(idx)), chunk); err != nil {
				return err
			}
		}
	}
	// An unfinished fill: a pending marker and a chunk.
	orphan := [16]byte{0xff}
	if err := wb.Set(append([]byte{kindPending}, orphan[:]...), nil); err != nil {
		return err
	}
	if err := wb.Set(layout1ChunkKey(orphan, 0), []byte("never committed")); err != nil {
		return err
	}
	for k, v := range extra {
		if err := wb.Set([]byte(k), v); err != nil {
			return err
		}
	}
	return wb.Flush()
}

// SetImportChunks bounds each transaction of an import to bytes (an
// estimate) and calls after with each chunk committed.
func (s *Badger) SetImportChunks(bytes int, after func(chunk int)) {
	s.importChunkBytes, s.afterImportChunk = bytes, after
}

// ScaleSpec describes a store generated for the scale benchmark: cached
// content only (linked from one upstream's repositories), every manifest
// and blob derived from its index, so that a benchmark can name any of
// them without keeping a list.
type ScaleSpec struct {
	Upstream  string
	Manifests int
	Blobs     int
	// Repos is how many repositories share the content: manifest i and
	// blob i are in ScaleRepo(i).
	Repos int
	// TagEvery: manifest i is tagged v<i> when i%TagEvery == 0.
	TagEvery int
	BlobSize int
	// Now is the last access of the newest entry; entry i was used
	// Manifests-i (or Blobs-i) seconds before.
	Now time.Time
}

// ScaleRepo is the repository that holds manifest and blob i.
func (sp ScaleSpec) ScaleRepo(i int) string { return fmt.Sprintf("lib/app%05d", i%sp.Repos) }

// ScaleManifest is manifest i: an OCI image manifest of about 450 bytes.
func (sp ScaleSpec) ScaleManifest(i int) ([]byte, digest.Digest) {
	b := fmt.Appendf(nil, `{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",`+
		`"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%064x","size":%d},`+
		`"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%064x","size":%d}]}`,
		2*i, 1000+i%1000, 2*i+1, 100000+i)
	return b, digest.FromBytes(b)
}

// ScaleBlob is blob i: BlobSize bytes that start with i.
func (sp ScaleSpec) ScaleBlob(i int) ([]byte, digest.Digest) {
	b := make([]byte, sp.BlobSize)
	binary.BigEndian.PutUint64(b, uint64(i))
	for k := 8; k < len(b); k++ {
		b[k] = byte(i*31 + k)
	}
	return b, digest.FromBytes(b)
}

// GenerateScale writes sp's content into the store at dir the fast way:
// the database in write batches, blob files without an fsync each. With
// onlyMissing, what is there stays and only what is missing (evicted) is
// written again. The store is opened and closed as ocimirror would.
func GenerateScale(dir string, sp ScaleSpec, onlyMissing bool) error {
	s, err := OpenBadger(BadgerOptions{Path: dir, CollectInterval: -1})
	if err != nil {
		return err
	}
	defer s.Close()
	for i := range 256 {
		if err := os.MkdirAll(filepath.Join(s.files.blobs, "sha256", fmt.Sprintf("%02x", i)), 0o755); err != nil {
			return err
		}
	}
	wb := s.db.NewWriteBatch()
	defer wb.Cancel()
	set := func(k, v []byte) error {
		if err := wb.Set(k, v); err != nil {
			return fmt.Errorf("generate: %w", err)
		}
		return nil
	}
	exists := func(key []byte) bool {
		if !onlyMissing {
			return false
		}
		return s.get(key, func([]byte) error { return nil }) == nil
	}
	link := func(i int, kind LinkKind, d digest.Digest, at time.Time) error {
		k := RepoKey{Upstream: sp.Upstream, Repo: sp.ScaleRepo(i)}
		v := linkValue(OriginUpstream, at)
		if err := set(linkKey(k, kind, d), v); err != nil {
			return err
		}
		return set(holderKey(k, kind, d), v)
	}
	access := func(d digest.Digest, at time.Time) error {
		return set(accessKey(d), binary.BigEndian.AppendUint64(nil, uint64(at.Unix())))
	}
	const workers = 4
	errs := make(chan error, workers)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- func() error {
				for i := w; i < sp.Manifests; i += workers {
					data, d := sp.ScaleManifest(i)
					if exists(manifestKey(d)) {
						continue
					}
					at := sp.Now.Add(-time.Duration(sp.Manifests-i) * time.Second)
					v := append([]byte{encodingV1}, appendString(nil, v1.MediaTypeImageManifest)...)
					if err := set(manifestKey(d), append(v, data...)); err != nil {
						return err
					}
					if err := access(d, at); err != nil {
						return err
					}
					if err := link(i, LinkManifest, d, at); err != nil {
						return err
					}
					if sp.TagEvery > 0 && i%sp.TagEvery == 0 {
						k := TagKey{Upstream: sp.Upstream, Repo: sp.ScaleRepo(i), Tag: fmt.Sprintf("v%d", i)}
						e := TagEntry{Digest: d, MediaType: v1.MediaTypeImageManifest, Size: int64(len(data)), CheckedAt: at}
						if err := set(tagKey(k), e.encode()); err != nil {
							return err
						}
					}
				}
				for i := w; i < sp.Blobs; i += workers {
					data, d := sp.ScaleBlob(i)
					if exists(blobKey(d)) {
						continue
					}
					if err := os.WriteFile(s.files.path(d), data, 0o644); err != nil {
						return err
					}
					at := sp.Now.Add(-time.Duration(sp.Blobs-i) * time.Second)
					if err := set(blobKey(d), encodeBlobSize(int64(len(data)))); err != nil {
						return err
					}
					if err := access(d, at); err != nil {
						return err
					}
					if err := link(i, LinkBlob, d, at); err != nil {
						return err
					}
				}
				return nil
			}()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			return err
		}
	}
	if err := wb.Flush(); err != nil {
		return err
	}
	// Compact what was written, as a store that has been in service a
	// while is: the benchmark measures the store, not its first compactions.
	return s.db.Flatten(2)
}
