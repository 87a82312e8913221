package cache

import "github.com/dgraph-io/badger/v4"

// ChunkCount counts the blob chunks in the store, committed or not.
func (s *Badger) ChunkCount() int {
	n := 0
	_ = s.scan([]byte{kindChunk}, false, func([]byte, []byte) error { n++; return nil })
	return n
}

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
