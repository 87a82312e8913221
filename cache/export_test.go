package cache

// ChunkCount counts the blob chunks in the store, committed or not.
func (s *Badger) ChunkCount() int {
	n := 0
	_ = s.scan([]byte{kindChunk}, false, func([]byte, []byte) error { n++; return nil })
	return n
}
