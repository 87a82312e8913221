package cache

import "github.com/dgraph-io/badger/v4"

// ChunkCount counts the blob chunks in the store, committed or not.
func (s *Badger) ChunkCount() int {
	n := 0
	_ = s.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{kindChunk}})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			n++
		}
		return nil
	})
	return n
}
