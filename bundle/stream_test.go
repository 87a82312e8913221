package bundle_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/bundle"
	"github.com/ocimirror/ocimirror/graph"
	"github.com/ocimirror/ocimirror/internal/registrytest"
)

// bigRepo is a repository with one image whose layer is large and made
// as it is read: a block of random bytes, repeated.
type bigRepo struct {
	block    []byte
	repeats  int
	layer    v1.Descriptor
	manifest []byte
	desc     v1.Descriptor
}

func newBigRepo(size int) *bigRepo {
	r := &bigRepo{block: registrytest.RandomBytes(1 << 20), repeats: size >> 20}
	d := digest.SHA256.Digester()
	r.write(d.Hash())
	r.layer = v1.Descriptor{MediaType: v1.MediaTypeImageLayerGzip, Digest: d.Digest(), Size: int64(len(r.block) * r.repeats)}
	config := []byte("{}")
	m := v1.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageManifest,
		Config: v1.Descriptor{MediaType: v1.MediaTypeEmptyJSON, Digest: digest.FromBytes(config), Size: 2},
		Layers: []v1.Descriptor{r.layer}}
	r.manifest, _ = json.Marshal(m)
	r.desc = v1.Descriptor{MediaType: v1.MediaTypeImageManifest, Digest: digest.FromBytes(r.manifest), Size: int64(len(r.manifest))}
	return r
}

func (r *bigRepo) write(w io.Writer) (int64, error) {
	var n int64
	for range r.repeats {
		k, err := w.Write(r.block)
		n += int64(k)
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

func (r *bigRepo) Resolve(context.Context, string) (v1.Descriptor, error) { return r.desc, nil }

func (r *bigRepo) Manifest(_ context.Context, d digest.Digest) (string, []byte, error) {
	if d != r.desc.Digest {
		return "", nil, graph.ErrNotFound
	}
	return r.desc.MediaType, r.manifest, nil
}

func (r *bigRepo) Referrers(context.Context, digest.Digest) ([]v1.Descriptor, error) { return nil, nil }

func (r *bigRepo) Blob(_ context.Context, desc v1.Descriptor, w io.Writer) (int64, error) {
	if desc.Digest == r.layer.Digest {
		v := desc.Digest.Verifier()
		n, err := r.write(io.MultiWriter(w, v))
		if err == nil && !v.Verified() {
			err = fmt.Errorf("digest mismatch")
		}
		return n, err
	}
	n, err := w.Write([]byte("{}"))
	return int64(n), err
}

// allocated returns the bytes f allocates on the heap.
func allocated(f func()) uint64 {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	f()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

// Export and import stream: a 128 MiB layer passes through a few MiB of
// allocations at most, each way.
func TestBundle_Streams(t *testing.T) {
	if testing.Short() {
		t.Skip("hashes 128 MiB several times")
	}
	const size = 128 << 20
	repo := newBigRepo(size)
	path := filepath.Join(t.TempDir(), "big.tar")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	name, _ := bundle.ParseName("registry.example/team/big:v1")
	var exportErr error
	n := allocated(func() {
		w, err := bundle.NewWriter(f)
		if err != nil {
			exportErr = err
			return
		}
		if _, err := (&bundle.Exporter{W: w}).Image(context.Background(), repo, name); err != nil {
			exportErr = err
			return
		}
		exportErr = w.Close()
	})
	f.Close()
	if exportErr != nil {
		t.Fatal(exportErr)
	}
	if n > 8<<20 {
		t.Errorf("exporting a %d MiB layer allocated %d MiB", size>>20, n>>20)
	}
	s := openStore(t)
	var res *bundle.ImportResult
	n = allocated(func() {
		f, err := os.Open(path)
		if err != nil {
			exportErr = err
			return
		}
		defer f.Close()
		res, exportErr = bundle.Import(context.Background(), f, s, bundle.ImportOptions{})
	})
	if exportErr != nil {
		t.Fatal(exportErr)
	}
	if n > 16<<20 {
		t.Errorf("importing a %d MiB layer allocated %d MiB", size>>20, n>>20)
	}
	if info, err := s.StatBlob(context.Background(), repo.layer.Digest); err != nil || info.Size != size || res.Blobs != 2 {
		t.Fatalf("the layer after the import: %+v %v (%+v)", info, err, res)
	}
	t.Logf("%d MiB layer: import allocated %d KiB", size>>20, n>>10)
}
