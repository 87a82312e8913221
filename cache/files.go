package cache

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/opencontainers/go-digest"
)

// blobFiles keeps blob bytes in content-addressed files:
//
//	<root>/blobs/<algorithm>/<first two hex>/<hex>   committed blobs
//	<root>/tmp/<random>                               blobs being written
//
// A blob is written to a temporary file, and renamed into place only after
// it is fsynced and its digest checked by the caller: a file under blobs/
// is always whole and verified. Removing a blob's file never cuts a reader
// that has it open.
type blobFiles struct {
	blobs string
	tmp   string
}

func newBlobFiles(root string) (*blobFiles, error) {
	f := &blobFiles{blobs: filepath.Join(root, "blobs"), tmp: filepath.Join(root, "tmp")}
	for _, d := range []string{f.blobs, f.tmp} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("cache: %w", err)
		}
	}
	return f, nil
}

// path is where blob d lives once committed.
func (f *blobFiles) path(d digest.Digest) string {
	enc := d.Encoded()
	return filepath.Join(f.blobs, d.Algorithm().String(), enc[:2], enc)
}

// create opens a new temporary file.
func (f *blobFiles) create() (*os.File, error) {
	var id [12]byte
	_, _ = rand.Read(id[:])
	return os.OpenFile(filepath.Join(f.tmp, hex.EncodeToString(id[:])), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
}

// place fsyncs a temporary file and renames it to blob d's path, then
// fsyncs the directory, so that a committed blob survives a crash.
func (f *blobFiles) place(tmp *os.File, d digest.Digest) error {
	if err := tmp.Sync(); err != nil {
		return err
	}
	dst := f.path(d)
	dir := filepath.Dir(dst)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), dst); err != nil {
		return err
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// open opens committed blob d; fs.ErrNotExist when there is no file.
func (f *blobFiles) open(d digest.Digest) (*os.File, error) { return os.Open(f.path(d)) }

// remove deletes blob d's file; readers that have it open read on.
func (f *blobFiles) remove(d digest.Digest) error {
	err := os.Remove(f.path(d))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

// sweepTemp removes every temporary file: what writers left when the
// process stopped, by a crash or a kill, was never committed.
func (f *blobFiles) sweepTemp() (int, error) {
	entries, err := os.ReadDir(f.tmp)
	if err != nil {
		return 0, err
	}
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(f.tmp, e.Name())); err != nil {
			return 0, err
		}
	}
	return len(entries), nil
}

// walk calls fn for every committed blob file, with its size. A file whose
// name is not a digest of its directory's algorithm is passed with d "".
func (f *blobFiles) walk(fn func(path string, d digest.Digest, size int64) error) error {
	return filepath.WalkDir(f.blobs, func(path string, e fs.DirEntry, err error) error {
		if err != nil || e.IsDir() {
			return err
		}
		info, err := e.Info()
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(f.blobs, path)
		parts := strings.Split(filepath.ToSlash(rel), "/")
		var d digest.Digest
		if len(parts) == 3 {
			d = digest.NewDigestFromEncoded(digest.Algorithm(parts[0]), parts[2])
			if d.Validate() != nil || parts[1] != parts[2][:min(2, len(parts[2]))] {
				d = ""
			}
		}
		return fn(path, d, info.Size())
	})
}

// fileReader reads a committed blob from its open file.
type fileReader struct {
	s    *Badger
	d    digest.Digest
	f    *os.File
	size int64
	once sync.Once
}

func (r *fileReader) ReadAt(p []byte, off int64) (int, error) { return r.f.ReadAt(p, off) }
func (r *fileReader) Size() int64                             { return r.size }

func (r *fileReader) Close() error {
	r.once.Do(func() { r.s.closedReader(r.d) })
	return r.f.Close()
}

// OSFile implements FileBlob: net/http sends an *os.File with sendfile.
func (r *fileReader) OSFile() *os.File { return r.f }

// fileWriter writes a blob to a temporary file. Any goroutine may ReadAt
// what has been written; the file stays open (and readable) after Commit
// until Close.
type fileWriter struct {
	s    *Badger
	f    *os.File
	size atomic.Int64
	done atomic.Bool
	// committed is the digest the file was committed as ("" before).
	committed atomic.Pointer[digest.Digest]

	closeOnce sync.Once
	closeErr  error
}

var _ BlobWriter = (*fileWriter)(nil)

func (w *fileWriter) Write(p []byte) (int, error) {
	if w.done.Load() {
		return 0, ErrWriterDone
	}
	n, err := w.f.Write(p)
	w.size.Add(int64(n))
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return n, fmt.Errorf("%w: write blob: %w", ErrFull, err)
	}
	if err != nil {
		return n, fmt.Errorf("cache: write blob: %w", err)
	}
	return n, nil
}

func (w *fileWriter) Size() int64 { return w.size.Load() }

// ReadAt reads what has been written so far.
func (w *fileWriter) ReadAt(p []byte, off int64) (int, error) {
	size := w.size.Load()
	if off >= size {
		return 0, io.EOF
	}
	want := p
	if rest := size - off; int64(len(p)) > rest {
		want = p[:rest]
	}
	n, err := w.f.ReadAt(want, off)
	if err == nil && n < len(p) {
		err = io.EOF
	}
	return n, err
}

// OpenFile implements FileOpener: the temporary file, or once committed
// the blob's file (the same bytes).
func (w *fileWriter) OpenFile() (*os.File, error) {
	f, err := os.Open(w.f.Name())
	if errors.Is(err, fs.ErrNotExist) {
		if d := w.committed.Load(); d != nil {
			return w.s.files.open(*d)
		}
	}
	return f, err
}

var _ FileOpener = (*fileWriter)(nil)

// Commit fsyncs the file and renames it into place, then indexes it. When
// another writer committed the same digest first, that copy stays and this
// file goes at Close.
func (w *fileWriter) Commit(_ context.Context, d digest.Digest, size int64) error {
	if w.done.Load() {
		return ErrWriterDone
	}
	if got := w.size.Load(); got != size {
		return fmt.Errorf("cache: commit %s: wrote %d bytes, want %d", d, got, size)
	}
	if err := w.s.commitFile(w.f, d, size); err != nil {
		return fmt.Errorf("cache: commit %s: %w", d, err)
	}
	w.committed.Store(&d)
	w.done.Store(true)
	w.s.Touch(d)
	return nil
}

// Cancel discards the file. It is a no-op after Commit.
func (w *fileWriter) Cancel(context.Context) error {
	if w.done.Swap(true) {
		return nil
	}
	return w.Close()
}

// Close releases the file: after Commit, once its readers are done; a
// temporary file that was not committed is removed.
func (w *fileWriter) Close() error {
	w.closeOnce.Do(func() {
		w.done.Store(true)
		w.closeErr = w.f.Close()
		// A committed file was renamed away; what is still at the
		// temporary name was never committed (or lost a commit race).
		if err := os.Remove(w.f.Name()); err != nil && !errors.Is(err, fs.ErrNotExist) && w.closeErr == nil {
			w.closeErr = err
		}
	})
	return w.closeErr
}
