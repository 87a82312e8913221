package cache

import (
	"context"
	"encoding/binary"
	"fmt"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"
)

// Pin is an image that eviction keeps, recorded in the store: a
// repository's tag (or digest) and the manifest it named when pinned.
// Imported bundles are pinned this way; the configuration's pins and the
// sync rules are not stored (they are read again at each start).
type Pin struct {
	Repo RepoKey
	// Name is the tag, or the digest for an image pinned by digest. One
	// name has one pin: pinning it again moves the pin.
	Name   string
	Digest digest.Digest
	// At is when it was pinned.
	At time.Time
}

// PinStore keeps pins.
type PinStore interface {
	// PutPin records a pin, replacing the one of the same repository and name.
	PutPin(ctx context.Context, p Pin) error
	// DeletePin removes a pin; removing none is no error.
	DeletePin(ctx context.Context, k RepoKey, name string) error
	// ListPins returns every pin, ordered by repository and name.
	ListPins(ctx context.Context) ([]Pin, error)
}

func pinKey(k RepoKey, name string) []byte {
	b := make([]byte, 0, 3+len(k.Upstream)+len(k.Repo)+len(name))
	b = append(b, kindPin)
	b = append(b, k.Upstream...)
	b = append(b, 0)
	b = append(b, k.Repo...)
	b = append(b, 0)
	return append(b, name...)
}

func (p Pin) encode() []byte {
	b := appendString([]byte{encodingV1}, string(p.Digest))
	return binary.AppendVarint(b, p.At.Unix())
}

func decodePin(key, v []byte) (Pin, error) {
	var p Pin
	up, rest, ok := cutZero(key[1:])
	if !ok {
		return p, ErrCorrupt
	}
	repo, name, ok := cutZero(rest)
	if !ok {
		return p, ErrCorrupt
	}
	if len(v) < 1 || v[0] != encodingV1 {
		return p, ErrCorrupt
	}
	d, rest, ok := readString(v[1:])
	if !ok {
		return p, ErrCorrupt
	}
	at, n := binary.Varint(rest)
	if n <= 0 {
		return p, ErrCorrupt
	}
	return Pin{Repo: RepoKey{Upstream: string(up), Repo: string(repo)}, Name: string(name), Digest: digest.Digest(d), At: time.Unix(at, 0)}, nil
}

func cutZero(b []byte) (before, after []byte, ok bool) {
	for i, c := range b {
		if c == 0 {
			return b[:i], b[i+1:], true
		}
	}
	return b, nil, false
}

// PutPin implements PinStore.
func (s *Badger) PutPin(_ context.Context, p Pin) error {
	return s.db.Update(func(txn *badger.Txn) error { return txn.Set(pinKey(p.Repo, p.Name), p.encode()) })
}

// DeletePin implements PinStore.
func (s *Badger) DeletePin(_ context.Context, k RepoKey, name string) error {
	return s.db.Update(func(txn *badger.Txn) error { return txn.Delete(pinKey(k, name)) })
}

// ListPins implements PinStore.
func (s *Badger) ListPins(context.Context) ([]Pin, error) {
	var out []Pin
	err := s.scan([]byte{kindPin}, true, func(key, v []byte) error {
		p, err := decodePin(key, v)
		if err != nil {
			return fmt.Errorf("%w: pin %q", err, key)
		}
		out = append(out, p)
		return nil
	})
	return out, err
}
