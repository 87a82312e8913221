package s3

import "errors"

var (
	// ErrPrecondition is returned by PutIfAbsent when the key exists, and
	// by CompareAndSwap when the object is no longer the one the caller
	// read: another writer got there first.
	ErrPrecondition = errors.New("s3: conditional write lost: the object exists or changed")
	// ErrSize is returned by Put when the store holds a different number
	// of bytes than the caller said it was sending.
	ErrSize = errors.New("s3: stored size differs from the size given")
	// ErrDigest is returned by PutManifest for bytes that do not have the
	// digest they are stored under.
	ErrDigest = errors.New("s3: content does not match its digest")
)
