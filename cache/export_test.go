package cache

import (
	"encoding/binary"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"
)

// PutRaw and DeleteRaw write the database directly, as an older version
// of ocimirror would have.
func (s *Badger) PutRaw(key, value []byte) error {
	return s.db.Update(func(txn *badger.Txn) error { return txn.Set(key, value) })
}

func (s *Badger) DeleteRaw(key []byte) error {
	return s.db.Update(func(txn *badger.Txn) error { return txn.Delete(key) })
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
