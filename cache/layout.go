package cache

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"
)

// Layout 1 (ocimirror before blob files) kept its Badger database in the
// data directory itself, and blob bytes in it, as chunks:
//
//	b<digest>                  1, fill ID (16 bytes), size, chunk size (uvarints)
//	c<fill ID><index>          one chunk (index: 4 bytes, big-endian)
//	p<fill ID>                 a fill that never committed
//
// Badger's value log never gave the space of deleted chunks back, which is
// why blobs are files now.

// migrateChunkedLayout moves a layout 1 data directory to the current one:
// every committed blob is read from its chunks, checked against its digest,
// and written as a file; every other key is copied into a new database in
// db/. The old database is read, never changed, until the new one is
// complete and renamed into place: a migration cut short starts again at
// the next start. Then the old database's files are removed.
func migrateChunkedLayout(o BadgerOptions, files *blobFiles) error {
	root := o.Path
	if _, err := os.Stat(filepath.Join(root, "MANIFEST")); errors.Is(err, fs.ErrNotExist) {
		return nil // no layout 1 database here
	}
	dbDir := filepath.Join(root, "db")
	if _, err := os.Stat(filepath.Join(dbDir, "MANIFEST")); err == nil {
		// Migrated; the old files outlived an interrupted clean-up.
		return removeLayout1(root)
	}
	work := filepath.Join(root, "db.migrating")
	if err := os.RemoveAll(work); err != nil {
		return fmt.Errorf("cache: migrate: %w", err)
	}
	o.Logger.Info("migrating the data directory: blobs from database chunks to files", "path", root)
	start := time.Now()
	old, err := badger.Open(badgerOptions(o, root))
	if err != nil {
		return fmt.Errorf("cache: migrate: open the old database: %w", err)
	}
	defer old.Close()
	neu, err := badger.Open(badgerOptions(o, work))
	if err != nil {
		return fmt.Errorf("cache: migrate: create the new database: %w", err)
	}
	m := &migration{log: o.Logger, old: old, files: files, wb: neu.NewWriteBatch(), last: time.Now()}
	err = m.run()
	if err == nil {
		err = m.wb.Flush()
	} else {
		m.wb.Cancel()
	}
	if cerr := neu.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("cache: migrate: %w", err)
	}
	if err := old.Close(); err != nil {
		return fmt.Errorf("cache: migrate: %w", err)
	}
	if err := os.Rename(work, dbDir); err != nil {
		return fmt.Errorf("cache: migrate: %w", err)
	}
	o.Logger.Info("data directory migrated", "blobs", m.blobs, "bytes", m.bytes, "skipped", m.skipped,
		"keys", m.keys, "duration", time.Since(start).Round(time.Millisecond))
	return removeLayout1(root)
}

type migration struct {
	log   interface{ Info(string, ...any) }
	old   *badger.DB
	files *blobFiles
	wb    *badger.WriteBatch

	blobs, skipped, keys int
	bytes                int64
	last                 time.Time
}

func (m *migration) run() error {
	return m.old.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{PrefetchValues: false})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			item := it.Item()
			key := item.KeyCopy(nil)
			switch key[0] {
			case kindChunk, kindPending:
				continue // blob bytes go with their blob; unfinished fills go
			}
			v, err := item.ValueCopy(nil)
			if err != nil {
				return err
			}
			if key[0] == kindBlob {
				if err := m.blob(txn, digest.Digest(key[1:]), v); err != nil {
					return err
				}
				continue
			}
			if err := m.wb.Set(key, v); err != nil {
				return err
			}
			m.keys++
		}
		return nil
	})
}

// blob writes one layout 1 blob as a file and indexes it. A blob whose
// chunks are missing or do not hash to its digest is left out (and logged):
// it could not have been served either.
func (m *migration) blob(txn *badger.Txn, d digest.Digest, meta []byte) error {
	fill, size, chunk, ok := decodeLayout1Blob(meta)
	if !ok || d.Validate() != nil {
		m.skipped++
		return nil
	}
	tmp, err := m.files.create()
	if err != nil {
		return err
	}
	defer func() {
		tmp.Close()
		_ = os.Remove(tmp.Name())
	}()
	h := d.Algorithm().Hash()
	var written int64
	for idx := int64(0); written < size; idx++ {
		item, err := txn.Get(layout1ChunkKey(fill, idx))
		if err != nil {
			break
		}
		err = item.Value(func(v []byte) error {
			if int64(len(v)) > chunk {
				return errors.New("chunk larger than its blob's chunk size")
			}
			h.Write(v)
			_, err := tmp.Write(v)
			written += int64(len(v))
			return err
		})
		if err != nil {
			return err
		}
	}
	if written != size || digest.NewDigest(d.Algorithm(), h) != d {
		m.skipped++
		m.log.Info("a blob of the old layout is incomplete or corrupt; left out", "digest", d, "size", size, "read", written)
		return nil
	}
	if err := m.files.place(tmp, d); err != nil {
		return err
	}
	if err := m.wb.Set(blobKey(d), encodeBlobSize(size)); err != nil {
		return err
	}
	m.blobs++
	m.bytes += size
	if time.Since(m.last) > 10*time.Second {
		m.last = time.Now()
		m.log.Info("migrating the data directory", "blobs", m.blobs, "bytes", m.bytes)
	}
	return nil
}

func decodeLayout1Blob(b []byte) (fill [16]byte, size, chunk int64, ok bool) {
	if len(b) < 1+len(fill) || b[0] != encodingV1 {
		return fill, 0, 0, false
	}
	copy(fill[:], b[1:])
	r := b[1+len(fill):]
	s, n := binary.Uvarint(r)
	if n <= 0 {
		return fill, 0, 0, false
	}
	c, n2 := binary.Uvarint(r[n:])
	if n2 <= 0 || c == 0 {
		return fill, 0, 0, false
	}
	return fill, int64(s), int64(c), true
}

func layout1ChunkKey(fill [16]byte, idx int64) []byte {
	k := make([]byte, 1+len(fill)+4)
	k[0] = kindChunk
	copy(k[1:], fill[:])
	binary.BigEndian.PutUint32(k[1+len(fill):], uint32(idx))
	return k
}

// removeLayout1 removes the files of a layout 1 database from the data
// directory (not its subdirectories).
func removeLayout1(root string) error {
	entries, err := os.ReadDir(root)
	if err != nil {
		return err
	}
	for _, e := range entries {
		n := e.Name()
		if e.IsDir() {
			continue
		}
		switch {
		case n == "MANIFEST", n == "KEYREGISTRY", n == "DISCARD", n == "LOCK",
			strings.HasSuffix(n, ".sst"), strings.HasSuffix(n, ".vlog"), strings.HasSuffix(n, ".mem"):
			if err := os.Remove(filepath.Join(root, n)); err != nil {
				return fmt.Errorf("cache: remove the old database: %w", err)
			}
		}
	}
	return nil
}
