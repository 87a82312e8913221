package bundle

import (
	"archive/tar"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
)

// ErrSize is a blob whose bytes are more or fewer than its descriptor says.
var ErrSize = errors.New("bundle: blob size differs from its descriptor")

// Writer writes an OCI image layout to a tar stream: oci-layout first,
// each blob when it is added (its tar header written from its
// descriptor's size, its bytes copied straight through), and index.json
// at Close. Entries carry a fixed time, so the same content makes the
// same archive. A Writer is not safe for concurrent use.
type Writer struct {
	tw      *tar.Writer
	written map[digest.Digest]bool
	dirs    map[string]bool
	index   []v1.Descriptor
	// untagged remembers the untagged index.json entries, by digest.
	untagged map[digest.Digest]bool
	// Bytes counts the blob bytes written.
	Bytes int64
	err   error
}

// entryTime is every entry's modification time.
var entryTime = time.Unix(0, 0).UTC()

// NewWriter starts a layout on w.
func NewWriter(w io.Writer) (*Writer, error) {
	bw := &Writer{tw: tar.NewWriter(w), written: map[digest.Digest]bool{}, dirs: map[string]bool{}, untagged: map[digest.Digest]bool{}}
	data, _ := json.Marshal(v1.ImageLayout{Version: layoutVersion})
	if err := bw.file(layoutFile, data); err != nil {
		return nil, err
	}
	return bw, nil
}

// Has reports whether blob d was written.
func (w *Writer) Has(d digest.Digest) bool { return w.written[d] }

// WriteBytes writes a blob held in memory (a manifest), checking its digest.
func (w *Writer) WriteBytes(d digest.Digest, data []byte) error {
	if got := d.Algorithm().FromBytes(data); got != d {
		return fmt.Errorf("bundle: %s: the bytes hash to %s", d, got)
	}
	return w.WriteBlob(v1.Descriptor{Digest: d, Size: int64(len(data))}, func(to io.Writer) error {
		_, err := to.Write(data)
		return err
	})
}

// WriteBlob writes blob desc: a header for desc.Size bytes, then what
// fill writes. fill must check the digest of what it copies (and fail
// otherwise); WriteBlob checks the size. A blob already written is not
// written again. After an error the archive is unusable: the Writer fails
// every later call.
func (w *Writer) WriteBlob(desc v1.Descriptor, fill func(io.Writer) error) error {
	if w.err != nil {
		return w.err
	}
	if w.written[desc.Digest] {
		return nil
	}
	if err := desc.Digest.Validate(); err != nil {
		return fmt.Errorf("bundle: blob %q: %w", desc.Digest, err)
	}
	if desc.Size < 0 {
		return fmt.Errorf("bundle: blob %s: negative size", desc.Digest)
	}
	p := blobPath(desc.Digest)
	if err := w.dir(blobsDir + "/"); err != nil {
		return err
	}
	if err := w.dir(blobsDir + "/" + desc.Digest.Algorithm().String() + "/"); err != nil {
		return err
	}
	if err := w.tw.WriteHeader(&tar.Header{Name: p, Mode: 0o644, Size: desc.Size, ModTime: entryTime, Typeflag: tar.TypeReg}); err != nil {
		return w.fail(err)
	}
	cw := &countWriter{w: w.tw, max: desc.Size}
	if err := fill(cw); err != nil {
		return w.fail(fmt.Errorf("bundle: blob %s: %w", desc.Digest, err))
	}
	if cw.n != desc.Size {
		return w.fail(fmt.Errorf("%w: %s: %d bytes, the descriptor says %d", ErrSize, desc.Digest, cw.n, desc.Size))
	}
	w.written[desc.Digest] = true
	w.Bytes += desc.Size
	return nil
}

// Index adds an entry to index.json. An untagged entry (no ref.name) is
// added once per digest.
func (w *Writer) Index(desc v1.Descriptor) {
	if desc.Annotations[v1.AnnotationRefName] == "" {
		if w.untagged[desc.Digest] {
			return
		}
		w.untagged[desc.Digest] = true
	}
	w.index = append(w.index, desc)
}

// Close writes index.json and ends the archive. It does not close the
// underlying writer.
func (w *Writer) Close() error {
	if w.err != nil {
		return w.err
	}
	idx := v1.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageIndex, Manifests: w.index}
	if idx.Manifests == nil {
		idx.Manifests = []v1.Descriptor{}
	}
	data, err := json.MarshalIndent(idx, "", "  ")
	if err != nil {
		return w.fail(err)
	}
	if err := w.file(indexFile, append(data, '\n')); err != nil {
		return err
	}
	if err := w.tw.Close(); err != nil {
		return w.fail(err)
	}
	w.err = errors.New("bundle: writer closed")
	return nil
}

func (w *Writer) fail(err error) error {
	if w.err == nil {
		w.err = err
	}
	return err
}

func (w *Writer) file(name string, data []byte) error {
	if err := w.tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(data)), ModTime: entryTime, Typeflag: tar.TypeReg}); err != nil {
		return w.fail(err)
	}
	if _, err := w.tw.Write(data); err != nil {
		return w.fail(err)
	}
	return nil
}

func (w *Writer) dir(name string) error {
	if w.dirs[name] {
		return nil
	}
	w.dirs[name] = true
	if err := w.tw.WriteHeader(&tar.Header{Name: name, Mode: 0o755, ModTime: entryTime, Typeflag: tar.TypeDir}); err != nil {
		return w.fail(err)
	}
	return nil
}

// countWriter counts what passes and refuses more than max bytes.
type countWriter struct {
	w   io.Writer
	n   int64
	max int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	if c.n+int64(len(p)) > c.max {
		return 0, fmt.Errorf("%w: more than %d bytes", ErrSize, c.max)
	}
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}
