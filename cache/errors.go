package cache

import "errors"

var (
	// ErrNotFound is returned for content the store does not hold.
	ErrNotFound = errors.New("cache: not found")
	// ErrCorrupt is returned when stored bytes cannot be decoded.
	ErrCorrupt = errors.New("cache: corrupt entry")
	// ErrWriterDone is returned by a BlobWriter used after Commit or Cancel.
	ErrWriterDone = errors.New("cache: blob writer already committed or cancelled")
	// ErrFull is returned when the store has no room for more content:
	// its budget is used by what cannot be evicted (data, pins, blobs
	// being read), or the filesystem is full (ENOSPC).
	ErrFull = errors.New("cache: store full")
	// ErrSharedDown is returned for a write the shared tier must take (a
	// push to a hosted repository) while it does not answer.
	ErrSharedDown = errors.New("cache: the shared tier does not answer")
)

// ErrHosted is returned for a purge of a hosted repository: its content
// is data, never purged.
var ErrHosted = errors.New("cache: a hosted repository's content is data, never purged")
