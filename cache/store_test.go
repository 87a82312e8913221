package cache_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/internal/metrictest"
)

// testChunk sizes the test blobs: odd sizes around it exercise the edges
// of reads.
const testChunk = 1000

type storeCase struct {
	name string
	// open opens the store at dir; reopening the same dir is a restart.
	open func(t *testing.T, dir string) (cache.Store, func())
}

func stores() []storeCase {
	openBadger := func(t *testing.T, dir string) (*cache.Badger, func()) {
		b, err := cache.OpenBadger(cache.BadgerOptions{Path: dir})
		if err != nil {
			t.Fatal(err)
		}
		return b, func() {
			if err := b.Close(); err != nil {
				t.Errorf("close: %v", err)
			}
		}
	}
	return []storeCase{
		{"badger", func(t *testing.T, dir string) (cache.Store, func()) { return openBadger(t, dir) }},
		{"lru", func(t *testing.T, dir string) (cache.Store, func()) {
			b, closeFn := openBadger(t, dir)
			return cache.NewLRU(b, cache.LRUOptions{ManifestBytes: 4 << 10, MetadataBytes: 4 << 10, ManifestEntries: 4, MetadataEntries: 4}), closeFn
		}},
	}
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

func writeBlob(t *testing.T, s cache.Store, data []byte) digest.Digest {
	t.Helper()
	ctx := context.Background()
	w, err := s.CreateBlob(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// Write in uneven pieces to cross chunk edges.
	for rest := data; len(rest) > 0; {
		n := min(len(rest), 777)
		if _, err := w.Write(rest[:n]); err != nil {
			t.Fatal(err)
		}
		rest = rest[n:]
	}
	d := digest.FromBytes(data)
	if err := w.Commit(ctx, d, int64(len(data))); err != nil {
		t.Fatal(err)
	}
	return d
}

func readBlob(t *testing.T, s cache.Store, d digest.Digest) []byte {
	t.Helper()
	r, err := s.OpenBlob(context.Background(), d)
	if err != nil {
		t.Fatal(err)
	}
	out, err := io.ReadAll(io.NewSectionReader(r, 0, r.Size()))
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestStore(t *testing.T) {
	for _, sc := range stores() {
		t.Run(sc.name, func(t *testing.T) {
			ctx := context.Background()

			t.Run("blob round trip", func(t *testing.T) {
				s, closeFn := sc.open(t, t.TempDir())
				defer closeFn()
				for _, size := range []int{0, 1, testChunk - 1, testChunk, testChunk + 1, 10*testChunk + 3} {
					data := randomBytes(size)
					d := writeBlob(t, s, data)
					info, err := s.StatBlob(ctx, d)
					if err != nil || info.Size != int64(size) {
						t.Fatalf("size %d: stat %v %v", size, info, err)
					}
					if got := readBlob(t, s, d); !bytes.Equal(got, data) {
						t.Fatalf("size %d: bytes differ", size)
					}
				}
			})

			t.Run("ReadAt at every offset", func(t *testing.T) {
				s, closeFn := sc.open(t, t.TempDir())
				defer closeFn()
				data := randomBytes(3*testChunk + 17)
				d := writeBlob(t, s, data)
				r, err := s.OpenBlob(ctx, d)
				if err != nil {
					t.Fatal(err)
				}
				for _, off := range []int{0, 1, testChunk - 1, testChunk, 2*testChunk + 500, len(data) - 1} {
					for _, n := range []int{1, 10, testChunk, 2 * testChunk} {
						buf := make([]byte, n)
						got, err := r.ReadAt(buf, int64(off))
						want := min(n, len(data)-off)
						if got != want || !bytes.Equal(buf[:got], data[off:off+got]) {
							t.Fatalf("ReadAt(%d, %d) = %d, want %d", n, off, got, want)
						}
						if got < n && !errors.Is(err, io.EOF) {
							t.Fatalf("short ReadAt without EOF: %v", err)
						}
					}
				}
				if _, err := r.ReadAt(make([]byte, 1), int64(len(data))); !errors.Is(err, io.EOF) {
					t.Fatalf("ReadAt at the end: %v", err)
				}
			})

			t.Run("uncommitted blob is invisible", func(t *testing.T) {
				s, closeFn := sc.open(t, t.TempDir())
				defer closeFn()
				data := randomBytes(5 * testChunk)
				d := digest.FromBytes(data)
				w, err := s.CreateBlob(ctx)
				if err != nil {
					t.Fatal(err)
				}
				_, _ = w.Write(data)
				if _, err := s.StatBlob(ctx, d); !errors.Is(err, cache.ErrNotFound) {
					t.Fatalf("stat before commit: %v", err)
				}
				// The writer's own readers see everything written.
				if w.Size() != 5*testChunk {
					t.Fatalf("size %d", w.Size())
				}
				buf := make([]byte, testChunk)
				if _, err := w.ReadAt(buf, testChunk); err != nil || !bytes.Equal(buf, data[testChunk:2*testChunk]) {
					t.Fatalf("writer ReadAt: %v", err)
				}
				if err := w.Cancel(ctx); err != nil {
					t.Fatal(err)
				}
				if _, err := s.StatBlob(ctx, d); !errors.Is(err, cache.ErrNotFound) {
					t.Fatalf("stat after cancel: %v", err)
				}
				if _, err := w.Write([]byte("x")); !errors.Is(err, cache.ErrWriterDone) {
					t.Fatalf("write after cancel: %v", err)
				}
			})

			t.Run("delete", func(t *testing.T) {
				s, closeFn := sc.open(t, t.TempDir())
				defer closeFn()
				d := writeBlob(t, s, randomBytes(3*testChunk))
				if _, err := s.StatBlob(ctx, d); err != nil {
					t.Fatal(err)
				}
				if err := s.DeleteBlob(ctx, d); err != nil {
					t.Fatal(err)
				}
				if _, err := s.StatBlob(ctx, d); !errors.Is(err, cache.ErrNotFound) {
					t.Fatalf("stat after delete: %v", err)
				}
				if _, err := s.OpenBlob(ctx, d); !errors.Is(err, cache.ErrNotFound) {
					t.Fatalf("open after delete: %v", err)
				}
				if err := s.DeleteBlob(ctx, d); err != nil {
					t.Fatalf("second delete: %v", err)
				}
				body := []byte("{}")
				m := cache.Manifest{Digest: digest.FromBytes(body), MediaType: "x", Data: body}
				_ = s.PutManifest(ctx, m)
				_, _ = s.GetManifest(ctx, m.Digest)
				if err := s.DeleteManifest(ctx, m.Digest); err != nil {
					t.Fatal(err)
				}
				if _, err := s.GetManifest(ctx, m.Digest); !errors.Is(err, cache.ErrNotFound) {
					t.Fatalf("manifest after delete: %v", err)
				}
			})

			t.Run("commit checks the length", func(t *testing.T) {
				s, closeFn := sc.open(t, t.TempDir())
				defer closeFn()
				w, _ := s.CreateBlob(ctx)
				_, _ = w.Write([]byte("abc"))
				if err := w.Commit(ctx, digest.FromString("abc"), 4); err == nil {
					t.Fatal("commit with a wrong length succeeded")
				}
			})

			t.Run("concurrent readers follow a writer", func(t *testing.T) {
				s, closeFn := sc.open(t, t.TempDir())
				defer closeFn()
				data := randomBytes(50 * testChunk)
				w, _ := s.CreateBlob(ctx)
				var wg sync.WaitGroup
				errs := make(chan error, 4)
				for i := 0; i < 4; i++ {
					wg.Add(1)
					go func() {
						defer wg.Done()
						var got []byte
						buf := make([]byte, 333)
						for deadline := time.Now().Add(10 * time.Second); len(got) < len(data) && time.Now().Before(deadline); {
							if f := w.Size(); int64(len(got)) < f {
								n := min(int64(len(buf)), f-int64(len(got)))
								if _, err := w.ReadAt(buf[:n], int64(len(got))); err != nil {
									errs <- err
									return
								}
								got = append(got, buf[:n]...)
							}
						}
						if !bytes.Equal(got, data) {
							errs <- fmt.Errorf("reader got %d bytes, differing", len(got))
						}
					}()
				}
				for rest := data; len(rest) > 0; rest = rest[min(len(rest), 100):] {
					_, _ = w.Write(rest[:min(len(rest), 100)])
				}
				if err := w.Commit(ctx, digest.FromBytes(data), int64(len(data))); err != nil {
					t.Fatal(err)
				}
				wg.Wait()
				close(errs)
				for err := range errs {
					t.Error(err)
				}
			})

			t.Run("manifests and tags", func(t *testing.T) {
				s, closeFn := sc.open(t, t.TempDir())
				defer closeFn()
				body := []byte(`{"schemaVersion":2}`)
				m := cache.Manifest{Digest: digest.FromBytes(body), MediaType: "application/vnd.oci.image.manifest.v1+json", Data: body}
				if _, err := s.GetManifest(ctx, m.Digest); !errors.Is(err, cache.ErrNotFound) {
					t.Fatalf("unknown manifest: %v", err)
				}
				if err := s.PutManifest(ctx, m); err != nil {
					t.Fatal(err)
				}
				got, err := s.GetManifest(ctx, m.Digest)
				if err != nil || got.MediaType != m.MediaType || !bytes.Equal(got.Data, body) || got.Digest != m.Digest {
					t.Fatalf("manifest: %+v %v", got, err)
				}
				k := cache.TagKey{Upstream: "docker.io", Repo: "library/alpine", Tag: "3"}
				other := cache.TagKey{Upstream: "ghcr.io", Repo: "library/alpine", Tag: "3"}
				e := cache.TagEntry{Digest: m.Digest, MediaType: m.MediaType, Size: 19, CheckedAt: time.Unix(1700000000, 123)}
				if err := s.PutTag(ctx, k, e); err != nil {
					t.Fatal(err)
				}
				if got, err := s.GetTag(ctx, k); err != nil || got != e {
					t.Fatalf("tag: %+v %v", got, err)
				}
				if _, err := s.GetTag(ctx, other); !errors.Is(err, cache.ErrNotFound) {
					t.Fatalf("tag of another upstream: %v", err)
				}
				if err := s.DeleteTag(ctx, k); err != nil {
					t.Fatal(err)
				}
				if _, err := s.GetTag(ctx, k); !errors.Is(err, cache.ErrNotFound) {
					t.Fatalf("deleted tag: %v", err)
				}
			})

			t.Run("tag listing", func(t *testing.T) {
				s, closeFn := sc.open(t, t.TempDir())
				defer closeFn()
				d := digest.FromString("m")
				for _, k := range []cache.TagKey{
					{Upstream: "u", Repo: "a", Tag: "v2"}, {Upstream: "u", Repo: "a", Tag: "v1"},
					{Upstream: "u", Repo: "a/b", Tag: "x"}, {Upstream: "", Repo: "a", Tag: "hosted"},
				} {
					if err := s.PutTag(ctx, k, cache.TagEntry{Digest: d, Size: int64(len(k.Tag))}); err != nil {
						t.Fatal(err)
					}
				}
				tags, err := s.ListTags(ctx, "u", "a")
				if err != nil || len(tags) != 2 || tags[0].Name != "v1" || tags[1].Name != "v2" || tags[0].Digest != d || tags[1].Size != 2 {
					t.Fatalf("ListTags: %+v %v", tags, err)
				}
				if tags, _ := s.ListTags(ctx, "", "a"); len(tags) != 1 || tags[0].Name != "hosted" {
					t.Fatalf("hosted tags: %+v", tags)
				}
				if tags, _ := s.ListTags(ctx, "u", "none"); len(tags) != 0 {
					t.Fatalf("unknown repo: %+v", tags)
				}
			})

			t.Run("referrer index", func(t *testing.T) {
				s, closeFn := sc.open(t, t.TempDir())
				defer closeFn()
				subj := digest.FromString("subject")
				k := cache.ReferrerKey{Upstream: "u", Repo: "r", Subject: subj}
				var want []digest.Digest
				for i := 0; i < 3; i++ {
					d := digest.FromString(strconv.Itoa(i))
					want = append(want, d)
					err := s.PutReferrer(ctx, k, v1.Descriptor{MediaType: "m", Digest: d, Size: int64(i), ArtifactType: "a", Annotations: map[string]string{"i": strconv.Itoa(i)}})
					if err != nil {
						t.Fatal(err)
					}
				}
				_ = s.PutReferrer(ctx, cache.ReferrerKey{Upstream: "u", Repo: "r2", Subject: subj}, v1.Descriptor{Digest: digest.FromString("other repo")})
				slices.Sort(want)
				got, err := s.ListReferrers(ctx, k)
				if err != nil || len(got) != 3 {
					t.Fatalf("list: %v %v", got, err)
				}
				for i, d := range got {
					if d.Digest != want[i] || d.ArtifactType != "a" || d.Annotations["i"] == "" {
						t.Errorf("referrer %d: %+v", i, d)
					}
				}
				if err := s.DeleteReferrer(ctx, k, want[0]); err != nil {
					t.Fatal(err)
				}
				if got, _ := s.ListReferrers(ctx, k); len(got) != 2 {
					t.Fatalf("after delete: %v", got)
				}
				if got, err := s.ListReferrers(ctx, cache.ReferrerKey{Upstream: "u", Repo: "r", Subject: digest.FromString("none")}); err != nil || got == nil || len(got) != 0 {
					t.Fatalf("unknown subject: %#v %v", got, err)
				}
			})

			t.Run("repository links", func(t *testing.T) {
				s, closeFn := sc.open(t, t.TempDir())
				defer closeFn()
				d := digest.FromString("x")
				a := cache.RepoKey{Upstream: "up", Repo: "a"}
				if _, ok, err := s.Linked(ctx, a, cache.LinkBlob, d); ok || err != nil {
					t.Fatalf("before link: %v %v", ok, err)
				}
				if ok, _ := s.UpstreamHolds(ctx, "up", cache.LinkBlob, d); ok {
					t.Fatal("upstream holds before any link")
				}
				_ = s.Link(ctx, a, cache.LinkBlob, d, cache.OriginPushed)
				if o, ok, _ := s.Linked(ctx, a, cache.LinkBlob, d); !ok || o != cache.OriginPushed {
					t.Fatalf("link: %c %v", o, ok)
				}
				if ok, _ := s.UpstreamHolds(ctx, "up", cache.LinkBlob, d); ok {
					t.Fatal("a pushed link counts as the upstream's")
				}
				for _, other := range []struct {
					k    cache.RepoKey
					kind cache.LinkKind
				}{
					{cache.RepoKey{Upstream: "up", Repo: "a/b"}, cache.LinkBlob},
					{cache.RepoKey{Upstream: "up", Repo: "b"}, cache.LinkBlob},
					{cache.RepoKey{Upstream: "up", Repo: "a"}, cache.LinkManifest},
					{cache.RepoKey{Upstream: "other", Repo: "a"}, cache.LinkBlob},
					{cache.RepoKey{Repo: "a"}, cache.LinkBlob},
				} {
					if _, ok, _ := s.Linked(ctx, other.k, other.kind, d); ok {
						t.Errorf("link leaks to %+v %c", other.k, other.kind)
					}
				}
				// The upstream's confirmation upgrades the origin; a later push keeps it.
				_ = s.Link(ctx, a, cache.LinkBlob, d, cache.OriginUpstream)
				_ = s.Link(ctx, a, cache.LinkBlob, d, cache.OriginPushed)
				if o, _, _ := s.Linked(ctx, a, cache.LinkBlob, d); o != cache.OriginUpstream {
					t.Fatalf("origin after upstream then push: %c", o)
				}
				if ok, _ := s.UpstreamHolds(ctx, "up", cache.LinkBlob, d); !ok {
					t.Fatal("upstream does not hold after an upstream link")
				}
				for _, u := range []string{"u", "upx", ""} {
					if ok, _ := s.UpstreamHolds(ctx, u, cache.LinkBlob, d); ok {
						t.Errorf("upstream %q holds", u)
					}
				}
				if existed, err := s.Unlink(ctx, a, cache.LinkBlob, d); !existed || err != nil {
					t.Fatalf("unlink: %v %v", existed, err)
				}
				if existed, _ := s.Unlink(ctx, a, cache.LinkBlob, d); existed {
					t.Fatal("second unlink found a link")
				}
				if ok, _ := s.UpstreamHolds(ctx, "up", cache.LinkBlob, d); ok {
					t.Fatal("upstream holds after unlink")
				}
			})

			t.Run("readers see the tail", func(t *testing.T) {
				s, closeFn := sc.open(t, t.TempDir())
				defer closeFn()
				data := randomBytes(2*testChunk + 300)
				w, _ := s.CreateBlob(ctx)
				_, _ = w.Write(data)
				if w.Size() != int64(len(data)) {
					t.Fatalf("size %d", w.Size())
				}
				// Another goroutine reads the unflushed tail too.
				done := make(chan error)
				go func() {
					got, err := io.ReadAll(io.NewSectionReader(w, 0, w.Size()))
					if err == nil && !bytes.Equal(got, data) {
						err = errors.New("read back differs")
					}
					done <- err
				}()
				if err := <-done; err != nil {
					t.Fatal(err)
				}
				buf := make([]byte, 500)
				if n, err := w.ReadAt(buf, 2*testChunk-100); n != 400 || !errors.Is(err, io.EOF) || !bytes.Equal(buf[:n], data[2*testChunk-100:]) {
					t.Fatalf("read across the flush edge: %d %v", n, err)
				}
				_ = w.Cancel(ctx)
			})

			t.Run("a removed blob reads on", func(t *testing.T) {
				s, closeFn := sc.open(t, t.TempDir())
				defer closeFn()
				data := randomBytes(3*testChunk + 1)
				d := writeBlob(t, s, data)
				r, err := s.OpenBlob(ctx, d)
				if err != nil {
					t.Fatal(err)
				}
				defer r.Close()
				if err := s.DeleteBlob(ctx, d); err != nil {
					t.Fatal(err)
				}
				got, err := io.ReadAll(io.NewSectionReader(r, 0, r.Size()))
				if err != nil || !bytes.Equal(got, data) {
					t.Fatalf("an open reader lost its blob: %v", err)
				}
			})

			t.Run("readers follow a commit", func(t *testing.T) {
				s, closeFn := sc.open(t, t.TempDir())
				defer closeFn()
				data := randomBytes(2*testChunk + 7)
				w, _ := s.CreateBlob(ctx)
				_, _ = w.Write(data)
				d := digest.FromBytes(data)
				if err := w.Commit(ctx, d, int64(len(data))); err != nil {
					t.Fatal(err)
				}
				// A follower still reading the fill reads on after the commit.
				got, err := io.ReadAll(io.NewSectionReader(w, 0, w.Size()))
				if err != nil || !bytes.Equal(got, data) {
					t.Fatalf("read after commit: %v", err)
				}
				if err := w.Close(); err != nil {
					t.Fatal(err)
				}
				if got := readBlob(t, s, d); !bytes.Equal(got, data) {
					t.Fatal("committed blob differs")
				}
				// A second writer of the same digest loses the race quietly.
				w2, _ := s.CreateBlob(ctx)
				_, _ = w2.Write(data)
				if err := w2.Commit(ctx, d, int64(len(data))); err != nil {
					t.Fatal(err)
				}
				_ = w2.Close()
				if got := readBlob(t, s, d); !bytes.Equal(got, data) {
					t.Fatal("blob differs after a lost race")
				}
			})

			t.Run("restart", func(t *testing.T) {
				dir := t.TempDir()
				s, closeFn := sc.open(t, dir)
				data := randomBytes(7*testChunk + 5)
				d := writeBlob(t, s, data)
				body := []byte(`{"mediaType":"x"}`)
				m := cache.Manifest{Digest: digest.FromBytes(body), MediaType: "x", Data: body}
				_ = s.PutManifest(ctx, m)
				k := cache.TagKey{Upstream: "u", Repo: "r", Tag: "t"}
				e := cache.TagEntry{Digest: m.Digest, MediaType: "x", Size: int64(len(body)), CheckedAt: time.Unix(42, 0)}
				_ = s.PutTag(ctx, k, e)
				w, _ := s.CreateBlob(ctx) // never committed
				_, _ = w.Write(randomBytes(3 * testChunk))
				closeFn()

				s, closeFn = sc.open(t, dir)
				defer closeFn()
				if got := readBlob(t, s, d); !bytes.Equal(got, data) {
					t.Fatal("blob lost in restart")
				}
				if got, err := s.GetManifest(ctx, m.Digest); err != nil || !bytes.Equal(got.Data, body) {
					t.Fatalf("manifest lost in restart: %v", err)
				}
				if got, err := s.GetTag(ctx, k); err != nil || got != e {
					t.Fatalf("tag lost in restart: %+v %v", got, err)
				}
			})
		})
	}
}

func TestBadger_LastAccess(t *testing.T) {
	dir := t.TempDir()
	b, err := cache.OpenBadger(cache.BadgerOptions{Path: dir})
	if err != nil {
		t.Fatal(err)
	}
	d := writeBlob(t, b, []byte("hello"))
	before := time.Now().Add(-time.Second)
	if got := b.LastAccess(d); got.Before(before) {
		t.Fatalf("last access after commit: %v", got)
	}
	b.Close()
	b, err = cache.OpenBadger(cache.BadgerOptions{Path: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if got := b.LastAccess(d); got.Before(before) {
		t.Fatalf("last access after restart: %v", got)
	}
}

// TestBadger_KilledMidFill kills a process with SIGKILL while it writes a
// blob, then opens its store: the blob is not visible and its chunks are
// swept.
// Access times wait in memory for the next flush, but not without bound:
// touching many digests between two flushes writes them at once.
func TestBadger_PendingAccessBounded(t *testing.T) {
	b, err := cache.OpenBadger(cache.BadgerOptions{Path: t.TempDir(), AccessFlushInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	var first digest.Digest
	for i := range cache.MaxPendingAccess {
		d := digest.FromString(strconv.Itoa(i))
		if i == 0 {
			first = d
		}
		b.Touch(d)
	}
	// The flush writes them (the first one too) long before the hour.
	for i := 0; b.PendingAccess() >= cache.MaxPendingAccess || b.LastAccess(first).IsZero(); i++ {
		if i == 1000 {
			t.Fatalf("%d access times still pending, the first one's: %v", b.PendingAccess(), b.LastAccess(first))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestBadger_KilledMidFill(t *testing.T) {
	if dir := os.Getenv("OCIMIRROR_KILL_CHILD_DIR"); dir != "" {
		killChild(dir)
		return
	}
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^TestBadger_KilledMidFill$")
	cmd.Env = append(os.Environ(), "OCIMIRROR_KILL_CHILD_DIR="+dir)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// The child prints the committed blob's digest, then "filling" once it
	// has written part of the second blob.
	var committed, filling string
	if _, err := fmt.Fscanln(out, &committed); err != nil {
		t.Fatal(err)
	}
	if _, err := fmt.Fscanln(out, &filling); err != nil || filling == "" {
		t.Fatal(err)
	}
	_ = cmd.Process.Kill()
	_ = cmd.Wait()

	b, err := cache.OpenBadger(cache.BadgerOptions{Path: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	ctx := context.Background()
	if _, err := b.StatBlob(ctx, digest.Digest(committed)); err != nil {
		t.Fatalf("committed blob lost: %v", err)
	}
	if _, err := b.StatBlob(ctx, digest.Digest(filling)); !errors.Is(err, cache.ErrNotFound) {
		t.Fatalf("blob killed mid-fill is visible: %v", err)
	}
	// Its temporary file was removed at open; the committed blob's file
	// is the only one, and the byte count is its size.
	if tmp, _ := os.ReadDir(filepath.Join(dir, "tmp")); len(tmp) != 0 {
		t.Errorf("%d temporary files after the restart", len(tmp))
	}
	if n := b.BlobBytes(); n != 3*testChunk {
		t.Errorf("blob bytes after the restart: %d, want %d", n, 3*testChunk)
	}
}

func killChild(dir string) {
	b, err := cache.OpenBadger(cache.BadgerOptions{Path: dir})
	if err != nil {
		panic(err)
	}
	ctx := context.Background()
	data := randomBytes(3 * testChunk)
	w, _ := b.CreateBlob(ctx)
	_, _ = w.Write(data)
	d := digest.FromBytes(data)
	if err := w.Commit(ctx, d, int64(len(data))); err != nil {
		panic(err)
	}
	fmt.Println(d)
	w, _ = b.CreateBlob(ctx)
	big := randomBytes(100 * testChunk)
	_, _ = w.Write(big[:50*testChunk])
	fmt.Println(digest.FromBytes(big))
	for i := 0; ; i++ { // keep writing until killed
		_, _ = w.Write(big[50*testChunk+i%testChunk : 50*testChunk+i%testChunk+1])
		time.Sleep(time.Millisecond)
		if i > 1e6 {
			os.Exit(3)
		}
	}
}

func TestLRU_ServesFromMemory(t *testing.T) {
	b, err := cache.OpenBadger(cache.BadgerOptions{Path: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	l := cache.NewLRU(b, cache.LRUOptions{ManifestBytes: 1 << 20, MetadataBytes: 1 << 20})
	ctx := context.Background()
	body := []byte("{}")
	m := cache.Manifest{Digest: digest.FromBytes(body), MediaType: "x", Data: body}
	_ = l.PutManifest(ctx, m)
	k := cache.TagKey{Upstream: "u", Repo: "r", Tag: strconv.Itoa(1)}
	_ = l.PutTag(ctx, k, cache.TagEntry{Digest: m.Digest})
	// With the store closed, what is hot is still answered.
	b.Close()
	if got, err := l.GetManifest(ctx, m.Digest); err != nil || !bytes.Equal(got.Data, body) {
		t.Fatalf("manifest from memory: %v", err)
	}
	if got, err := l.GetTag(ctx, k); err != nil || got.Digest != m.Digest {
		t.Fatalf("tag from memory: %v", err)
	}
}

// What the LRU keeps shares no memory with the request it was read for:
// a digest sliced from a request line would keep the whole line, which
// the LRU's cost estimate does not count.
func TestLRU_KeepsNoRequestMemory(t *testing.T) {
	b, err := cache.OpenBadger(cache.BadgerOptions{Path: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	l := cache.NewLRU(b, cache.LRUOptions{ManifestBytes: 1 << 20, MetadataBytes: 1 << 20})
	ctx := context.Background()
	body := []byte("{}")
	d := digest.FromBytes(body)
	if err := b.PutManifest(ctx, cache.Manifest{Digest: d, MediaType: "x", Data: body}); err != nil {
		t.Fatal(err)
	}
	blob := writeBlob(t, b, []byte("blob"))
	// The request's line, and what a router slices from it.
	line := "GET /v2/r/manifests/" + d.String() + " " + blob.String() + " HTTP/1.1"
	reqManifest := digest.Digest(line[len("GET /v2/r/manifests/"):][:len(d)])
	reqBlob := digest.Digest(line[len(line)-len(" HTTP/1.1")-len(blob) : len(line)-len(" HTTP/1.1")])
	inLine := func(s string) bool {
		start := uintptr(unsafe.Pointer(unsafe.StringData(line)))
		p := uintptr(unsafe.Pointer(unsafe.StringData(s)))
		return p >= start && p < start+uintptr(len(line))
	}
	// A miss fills the LRU; the hit that follows answers what it kept.
	_, _ = l.GetManifest(ctx, reqManifest)
	_, _ = l.StatBlob(ctx, reqBlob)
	b.Close()
	m, err := l.GetManifest(ctx, reqManifest)
	if err != nil || inLine(string(m.Digest)) {
		t.Fatalf("manifest: %v, kept digest in the request line: %v", err, inLine(string(m.Digest)))
	}
	info, err := l.StatBlob(ctx, reqBlob)
	if err != nil || inLine(string(info.Digest)) {
		t.Fatalf("blob: %v, kept digest in the request line: %v", err, inLine(string(info.Digest)))
	}
}

// A store written by layout 1 (links of hosted repositories only, keyed
// l<repo>0<kind><digest>) keeps its links after the migration to layout 2.
func TestBadger_MigratesLayout1Links(t *testing.T) {
	dir := t.TempDir()
	b, err := cache.OpenBadger(cache.BadgerOptions{Path: dir})
	if err != nil {
		t.Fatal(err)
	}
	d := digest.FromString("hosted layer")
	old := append([]byte("lci/app\x00b"), d...)
	if err := b.PutRaw(old, nil); err != nil {
		t.Fatal(err)
	}
	if err := b.DeleteRaw([]byte("!schema")); err != nil {
		t.Fatal(err)
	}
	b.Close()

	b, err = cache.OpenBadger(cache.BadgerOptions{Path: dir})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	o, ok, err := b.Linked(ctx, cache.RepoKey{Repo: "ci/app"}, cache.LinkBlob, d)
	if err != nil || !ok || o != cache.OriginPushed {
		t.Fatalf("migrated link: %c %v %v", o, ok, err)
	}
	if n := b.KeyCount(old); n != 0 {
		t.Fatal("the layout 1 key is still there")
	}
	// A newer layout is refused rather than misread.
	if err := b.PutRaw([]byte("!schema"), []byte{99}); err != nil {
		t.Fatal(err)
	}
	b.Close()
	if b, err := cache.OpenBadger(cache.BadgerOptions{Path: dir}); err == nil {
		b.Close()
		t.Fatal("a store of a newer layout opened")
	}
}

// A data directory of the chunked layout keeps working: its blobs come
// through as files, whole (hosted content included), its other keys as
// they were, and the old database's files are gone.
func TestBadger_MigratesChunkedLayout(t *testing.T) {
	dir := t.TempDir()
	blobs := [][]byte{randomBytes(0), randomBytes(1), randomBytes(3*testChunk + 17), randomBytes(300 << 10)}
	corrupt := randomBytes(2 * testChunk)
	hosted := blobs[2]
	hd := digest.FromBytes(hosted)
	body := []byte(`{"schemaVersion":2}`)
	md := digest.FromBytes(body)
	extra := map[string][]byte{
		"l" + "ci/app\x00b" + string(hd): nil, // a hosted repository's link, layout 1
		"m" + string(md):                 append([]byte{1, byte(len("x/y"))}, append([]byte("x/y"), body...)...),
	}
	// The last blob's chunk is damaged: it is left out, never served wrong.
	if err := cache.WriteLayout1(dir, append(blobs, corrupt), testChunk, true, extra); err != nil {
		t.Fatal(err)
	}

	b, err := cache.OpenBadger(cache.BadgerOptions{Path: dir})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	var total int64
	for _, data := range blobs {
		if got := readBlob(t, b, digest.FromBytes(data)); !bytes.Equal(got, data) {
			t.Fatalf("blob of %d bytes differs after the migration", len(data))
		}
		total += int64(len(data))
	}
	if _, err := b.StatBlob(ctx, digest.FromBytes(corrupt)); !errors.Is(err, cache.ErrNotFound) {
		t.Fatalf("a blob whose chunks do not hash to its digest was migrated: %v", err)
	}
	if n := b.BlobBytes(); n != total {
		t.Fatalf("blob bytes %d, want %d", n, total)
	}
	if _, ok, _ := b.Linked(ctx, cache.RepoKey{Repo: "ci/app"}, cache.LinkBlob, hd); !ok {
		t.Fatal("the hosted link was lost")
	}
	if m, err := b.GetManifest(ctx, md); err != nil || !bytes.Equal(m.Data, body) || m.MediaType != "x/y" {
		t.Fatalf("manifest after the migration: %+v %v", m, err)
	}
	for _, old := range []string{"MANIFEST", "KEYREGISTRY"} {
		if _, err := os.Stat(filepath.Join(dir, old)); err == nil {
			t.Errorf("the old database's %s is still there", old)
		}
	}
	b.Close()
	// And again: a migrated directory opens as it is.
	b, err = cache.OpenBadger(cache.BadgerOptions{Path: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if got := readBlob(t, b, hd); !bytes.Equal(got, hosted) {
		t.Fatal("hosted blob after a second start")
	}
	if n := b.BlobBytes(); n != total {
		t.Fatalf("blob bytes after a second start %d, want %d", n, total)
	}
}

// At start the index and the files are held to each other: an entry whose
// file went is dropped, a stray file is removed, and the byte count is
// what remains.
func TestBadger_ChecksFilesAtStart(t *testing.T) {
	dir := t.TempDir()
	b, err := cache.OpenBadger(cache.BadgerOptions{Path: dir})
	if err != nil {
		t.Fatal(err)
	}
	keep := writeBlob(t, b, randomBytes(5000))
	gone := writeBlob(t, b, randomBytes(7000))
	b.Close()
	if err := os.Remove(filepath.Join(dir, "blobs", "sha256", gone.Encoded()[:2], gone.Encoded())); err != nil {
		t.Fatal(err)
	}
	stray := digest.FromString("stray")
	strayPath := filepath.Join(dir, "blobs", "sha256", stray.Encoded()[:2], stray.Encoded())
	_ = os.MkdirAll(filepath.Dir(strayPath), 0o755)
	if err := os.WriteFile(strayPath, []byte("stray"), 0o644); err != nil {
		t.Fatal(err)
	}
	b, err = cache.OpenBadger(cache.BadgerOptions{Path: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	ctx := context.Background()
	if _, err := b.StatBlob(ctx, keep); err != nil {
		t.Fatal(err)
	}
	if _, err := b.StatBlob(ctx, gone); !errors.Is(err, cache.ErrNotFound) {
		t.Fatalf("an entry without its file: %v", err)
	}
	if _, err := os.Stat(strayPath); err == nil {
		t.Fatal("the stray file is still there")
	}
	if n := b.BlobBytes(); n != 5000 {
		t.Fatalf("blob bytes %d, want 5000", n)
	}
}

// The start-up check walks the files and the index side by side: it must
// keep every blob whose file is there, whatever lies between them in
// digest order.
func TestBadger_ChecksFilesAtStart_Interleaved(t *testing.T) {
	dir := t.TempDir()
	b, err := cache.OpenBadger(cache.BadgerOptions{Path: dir})
	if err != nil {
		t.Fatal(err)
	}
	path := func(d digest.Digest) string {
		return filepath.Join(dir, "blobs", d.Algorithm().String(), d.Encoded()[:2], d.Encoded())
	}
	var kept, gone []digest.Digest
	var keptBytes int64
	for i := range 60 {
		data := randomBytes(100 + i)
		d := writeBlob(t, b, data)
		switch {
		case i%5 == 0:
			gone = append(gone, d) // its file goes
		case i%7 == 0:
			gone = append(gone, d) // its file is cut short
		default:
			kept = append(kept, d)
			keptBytes += int64(len(data))
		}
	}
	sha512 := digest.SHA512.FromBytes([]byte("another algorithm"))
	b.Close()
	for i, d := range gone {
		if i%2 == 0 {
			if err := os.Remove(path(d)); err != nil {
				t.Fatal(err)
			}
		} else if err := os.Truncate(path(d), 10); err != nil {
			t.Fatal(err)
		}
	}
	// Strays between the blobs: files of digests nothing indexes, a name
	// that is no digest, a blob's file in another's directory, a file of
	// another algorithm.
	var strays []string
	for i := range 20 {
		strays = append(strays, path(digest.FromString(fmt.Sprint("stray", i))))
	}
	strays = append(strays,
		filepath.Join(filepath.Dir(path(kept[0])), "not-a-digest"),
		filepath.Join(dir, "blobs", "sha256", "zz", kept[1].Encoded()),
		path(sha512),
		filepath.Join(dir, "blobs", "junk"))
	for _, p := range strays {
		_ = os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte("stray"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	b, err = cache.OpenBadger(cache.BadgerOptions{Path: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	ctx := context.Background()
	for _, d := range kept {
		if _, err := b.StatBlob(ctx, d); err != nil {
			t.Fatalf("blob %s lost: %v", d, err)
		}
		if _, err := os.Stat(path(d)); err != nil {
			t.Fatalf("file of blob %s lost: %v", d, err)
		}
	}
	for _, d := range gone {
		if _, err := b.StatBlob(ctx, d); !errors.Is(err, cache.ErrNotFound) {
			t.Fatalf("blob %s without its whole file: %v", d, err)
		}
		if _, err := os.Stat(path(d)); err == nil {
			t.Fatalf("the short file of %s is still there", d)
		}
	}
	for _, p := range strays {
		if _, err := os.Stat(p); err == nil {
			t.Fatalf("stray %s is still there", p)
		}
	}
	if n := b.BlobBytes(); n != keptBytes {
		t.Fatalf("blob bytes %d, want %d", n, keptBytes)
	}
}

// Deleting a blob gives its disk space back at once.
func TestBadger_DeleteFreesDisk(t *testing.T) {
	dir := t.TempDir()
	b, err := cache.OpenBadger(cache.BadgerOptions{Path: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	d := writeBlob(t, b, randomBytes(8<<20))
	before := dirSize(t, dir)
	if err := b.DeleteBlob(context.Background(), d); err != nil {
		t.Fatal(err)
	}
	if freed := before - dirSize(t, dir); freed < 8<<20 {
		t.Fatalf("deleting 8 MiB freed %d bytes", freed)
	}
	if n := b.BlobBytes(); n != 0 {
		t.Fatalf("blob bytes %d after the delete", n)
	}
}

// dirSize is what du counts: the blocks the files of dir use.
func dirSize(t *testing.T, dir string) int64 {
	t.Helper()
	var n int64
	err := filepath.WalkDir(dir, func(p string, e fs.DirEntry, err error) error {
		if err != nil || e.IsDir() {
			return err
		}
		info, err := e.Info()
		if err != nil {
			return err
		}
		if st, ok := info.Sys().(*syscall.Stat_t); ok {
			n += st.Blocks * 512
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// Eviction removes cached content (held through an upstream only), least
// recently used first; never data (hosted, pushed), a blob being read, or
// what keep names. Links stay: the content comes back on its next request.
func TestBadger_Evict(t *testing.T) {
	dir := t.TempDir()
	now := time.Unix(1_000_000, 0)
	var clockMu sync.Mutex
	clock := func() time.Time { clockMu.Lock(); defer clockMu.Unlock(); return now }
	tick := func() { clockMu.Lock(); now = now.Add(time.Minute); clockMu.Unlock() }
	b, err := cache.OpenBadger(cache.BadgerOptions{Path: dir, Clock: clock})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	ctx := context.Background()
	proxied := cache.RepoKey{Upstream: "up", Repo: "app"}
	blob := func(origin cache.LinkOrigin, k cache.RepoKey) digest.Digest {
		tick()
		d := writeBlob(t, b, randomBytes(1000))
		if k.Repo != "" {
			if err := b.Link(ctx, k, cache.LinkBlob, d, origin); err != nil {
				t.Fatal(err)
			}
		}
		return d
	}
	var cached []digest.Digest
	for range 5 {
		cached = append(cached, blob(cache.OriginUpstream, proxied))
	}
	hosted := blob(cache.OriginPushed, cache.RepoKey{Repo: "ci/app"})
	pushed := blob(cache.OriginPushed, proxied)
	unlinked := blob(0, cache.RepoKey{})
	// A cached referrer manifest, indexed under its subject.
	subject := digest.FromString("subject")
	body := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"a/b","digest":"` +
		digest.FromString("c").String() + `","size":1},"subject":{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"` + subject.String() + `","size":1}}`)
	m := cache.Manifest{Digest: digest.FromBytes(body), MediaType: v1.MediaTypeImageManifest, Data: body}
	tick()
	_ = b.PutManifest(ctx, m)
	_ = b.Link(ctx, proxied, cache.LinkManifest, m.Digest, cache.OriginUpstream)
	rk := cache.ReferrerKey{Upstream: "up", Repo: "app", Subject: subject}
	_ = b.PutReferrer(ctx, rk, v1.Descriptor{MediaType: m.MediaType, Digest: m.Digest, Size: int64(len(body))})
	// Access makes cached[0] the most recent; cached[1] is being read.
	tick()
	b.Touch(cached[0])
	r, err := b.OpenBlob(ctx, cached[1])
	if err != nil {
		t.Fatal(err)
	}

	// Eviction counts disk: 1000-byte blobs take a 4 KiB block each.
	ev, err := b.Evict(ctx, 3*4096, nil)
	if err != nil || ev.Blobs != 3 || ev.Bytes != 3*4096 {
		t.Fatalf("evict three blobs' disk: %+v %v", ev, err)
	}
	gone := []digest.Digest{cached[2], cached[3], cached[4]}
	for _, d := range gone {
		if _, err := b.StatBlob(ctx, d); !errors.Is(err, cache.ErrNotFound) {
			t.Errorf("%s was not evicted", d)
		}
		if _, ok, _ := b.Linked(ctx, proxied, cache.LinkBlob, d); !ok {
			t.Errorf("eviction dropped the link of %s", d)
		}
	}
	// unlinked content is the oldest cache after those? No: it is newer
	// than cached[2..4] and older than the manifest.
	for _, d := range []digest.Digest{cached[0], cached[1], hosted, pushed, unlinked} {
		if _, err := b.StatBlob(ctx, d); err != nil {
			t.Errorf("%s was evicted too early: %v", d, err)
		}
	}
	// Everything that can go: the unlinked blob, the manifest (and its
	// referrers entry), cached[0] unless kept; never data or what is read.
	ev, err = b.Evict(ctx, 1<<30, func(kind cache.LinkKind, d digest.Digest) bool { return d == cached[0] })
	if err != nil || ev.Blobs != 1 || ev.Manifests != 1 {
		t.Fatalf("evict all: %+v %v", ev, err)
	}
	for _, d := range []digest.Digest{cached[0], cached[1], hosted, pushed} {
		if _, err := b.StatBlob(ctx, d); err != nil {
			t.Errorf("%s was evicted: %v", d, err)
		}
	}
	if _, err := b.GetManifest(ctx, m.Digest); !errors.Is(err, cache.ErrNotFound) {
		t.Error("the manifest was not evicted")
	}
	if refs, _ := b.ListReferrers(ctx, rk); len(refs) != 0 {
		t.Errorf("the evicted manifest is still a referrer: %v", refs)
	}
	r.Close()
	// Data turns into cache when its last data link goes.
	_, _ = b.Unlink(ctx, cache.RepoKey{Repo: "ci/app"}, cache.LinkBlob, hosted)
	ev, _ = b.Evict(ctx, 1<<30, nil)
	if _, err := b.StatBlob(ctx, hosted); !errors.Is(err, cache.ErrNotFound) {
		t.Errorf("unlinked hosted content was not evicted: %+v", ev)
	}
	if _, err := b.StatBlob(ctx, pushed); err != nil {
		t.Error("a push kept locally was evicted")
	}
	if n := b.BlobBytes(); n != 1000 {
		t.Errorf("blob bytes after eviction: %d, want the pushed blob's 1000", n)
	}
}

// The budget: past the high watermark a pass frees down to the low one;
// the data directory (du) ends under the budget.
func TestBadger_Budget(t *testing.T) {
	dir := t.TempDir()
	const max = 4 << 20
	m := metrictest.New(t)
	b, err := cache.OpenBadger(cache.BadgerOptions{Path: dir, Budget: cache.Budget{MaxSize: max, Interval: 20 * time.Millisecond}, MeterProvider: m.Provider})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	ctx := context.Background()
	for range 12 {
		d := writeBlob(t, b, randomBytes(512<<10))
		_ = b.Link(ctx, cache.RepoKey{Upstream: "up", Repo: "app"}, cache.LinkBlob, d, cache.OriginUpstream)
	}
	deadline := time.Now().Add(10 * time.Second)
	for float64(b.Usage()) > 0.95*max && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if u := b.Usage(); u > max {
		t.Fatalf("usage %d over the budget %d", u, max)
	}
	if du := dirSize(t, dir); du > max {
		t.Fatalf("du %d over the budget %d", du, max)
	}
	// An operator sees the store against its budget, and what went.
	m.Want("ocimirror_store_budget_bytes", max)
	if got, want := m.Value("ocimirror_store_bytes"), float64(b.Usage()); got < want*0.9 || got > want*1.1 {
		t.Errorf("ocimirror_store_bytes %v, usage %v", got, want)
	}
	evicted := m.Value("ocimirror_evictions_total", "reason=high_watermark") + m.Value("ocimirror_evictions_total", "reason=make_room")
	if evicted < 4 || evicted > 12 {
		t.Errorf("%v evictions counted, of 12 blobs of which at most 8 fit", evicted)
	}
	if freed := m.Value("ocimirror_evicted_bytes_total"); freed < 2<<20 {
		t.Errorf("%v evicted bytes counted", freed)
	}
	m.Want("ocimirror_evictions_total", 0, "reason=min_free")
}

// Garbage collection of data: a blob pushed to a repository that no
// manifest of it names, and content no repository holds, go once they have
// been so for the grace period; referenced data, cached content and
// uploads in progress stay. A dry run changes nothing.
func TestBadger_CollectGarbage(t *testing.T) {
	dir := t.TempDir()
	now := time.Unix(2_000_000, 0)
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
	mr := metrictest.New(t)
	b, err := cache.OpenBadger(cache.BadgerOptions{Path: dir, Clock: clock, CollectInterval: -1, MeterProvider: mr.Provider})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	ctx := context.Background()
	hosted := cache.RepoKey{Repo: "ci/app"}
	link := func(k cache.RepoKey, d digest.Digest, o cache.LinkOrigin) {
		if err := b.Link(ctx, k, cache.LinkBlob, d, o); err != nil {
			t.Fatal(err)
		}
	}
	layer := writeBlob(t, b, randomBytes(3<<20))
	link(hosted, layer, cache.OriginPushed)
	cfg := writeBlob(t, b, []byte("{}"))
	link(hosted, cfg, cache.OriginPushed)
	orphan := writeBlob(t, b, randomBytes(2<<20)) // uploaded, never named by a manifest
	link(hosted, orphan, cache.OriginPushed)
	deleted := writeBlob(t, b, randomBytes(1<<20)) // pushed, then DELETEd
	link(hosted, deleted, cache.OriginPushed)
	_, _ = b.Unlink(ctx, hosted, cache.LinkBlob, deleted)
	cached := writeBlob(t, b, randomBytes(1000)) // a proxied repository's
	link(cache.RepoKey{Upstream: "up", Repo: "app"}, cached, cache.OriginUpstream)
	body := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"a/b","digest":"` +
		cfg.String() + `","size":2},"layers":[{"mediaType":"a/c","digest":"` + layer.String() + `","size":3145728}]}`)
	m := cache.Manifest{Digest: digest.FromBytes(body), MediaType: v1.MediaTypeImageManifest, Data: body}
	_ = b.PutManifest(ctx, m)
	_ = b.Link(ctx, hosted, cache.LinkManifest, m.Digest, cache.OriginPushed)
	upload, _ := b.CreateBlob(ctx) // in progress
	_, _ = upload.Write(randomBytes(1000))
	defer upload.Cancel(ctx)

	advance(time.Hour)
	if c, err := b.CollectGarbage(ctx, 24*time.Hour, false); err != nil || len(c.Items) != 0 {
		t.Fatalf("within the grace: %+v %v", c, err)
	}
	advance(24 * time.Hour)
	dry, err := b.CollectGarbage(ctx, 24*time.Hour, true)
	if err != nil || len(dry.Items) != 2 || dry.Bytes != 3<<20 {
		t.Fatalf("dry run: %+v %v", dry, err)
	}
	for _, d := range []digest.Digest{orphan, deleted} {
		if _, err := b.StatBlob(ctx, d); err != nil {
			t.Fatalf("a dry run deleted %s", d)
		}
	}
	before := dirSize(t, dir)
	c, err := b.CollectGarbage(ctx, 24*time.Hour, false)
	if err != nil || len(c.Items) != 2 || c.Bytes != 3<<20 {
		t.Fatalf("collection: %+v %v", c, err)
	}
	mr.Want("ocimirror_gc_deleted_bytes_total", 3<<20) // not the dry run's
	if freed := before - dirSize(t, dir); freed < 3<<20 {
		t.Fatalf("the collection freed %d bytes of disk", freed)
	}
	for _, d := range []digest.Digest{orphan, deleted} {
		if _, err := b.StatBlob(ctx, d); !errors.Is(err, cache.ErrNotFound) {
			t.Errorf("%s survived", d)
		}
	}
	for _, d := range []digest.Digest{layer, cfg, cached} {
		if _, err := b.StatBlob(ctx, d); err != nil {
			t.Errorf("%s was collected", d)
		}
	}
	if _, ok, _ := b.Linked(ctx, hosted, cache.LinkBlob, orphan); ok {
		t.Error("the orphan's link survived")
	}
	if _, err := b.GetManifest(ctx, m.Digest); err != nil {
		t.Error("the manifest was collected")
	}
	if upload.Size() != 1000 {
		t.Error("the upload in progress was touched")
	}
	// A manifest deleted from its repository goes too, after the grace.
	_, _ = b.Unlink(ctx, hosted, cache.LinkManifest, m.Digest)
	advance(25 * time.Hour)
	c, _ = b.CollectGarbage(ctx, 24*time.Hour, false)
	if _, err := b.GetManifest(ctx, m.Digest); !errors.Is(err, cache.ErrNotFound) {
		t.Errorf("an unlinked manifest survived: %+v", c)
	}
}

// Reserve makes room by evicting cached content; with everything pinned
// (or data) it answers ErrFull, and reservations count until released.
// Accounting survives a restart.
func TestBadger_Reserve(t *testing.T) {
	dir := t.TempDir()
	open := func(max int64) *cache.Badger {
		b, err := cache.OpenBadger(cache.BadgerOptions{Path: dir, Budget: cache.Budget{MaxSize: max, Interval: time.Hour}, WaitForPins: true})
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	b := open(0)
	b.SetPins(func(context.Context) (map[digest.Digest]struct{}, error) { return nil, nil })
	ctx := context.Background()
	if release, err := b.Reserve(ctx, 1<<40); err != nil {
		t.Fatalf("no budget: %v", err)
	} else {
		release()
	}
	var cached []digest.Digest
	for range 8 {
		d := writeBlob(t, b, randomBytes(512<<10))
		_ = b.Link(ctx, cache.RepoKey{Upstream: "up", Repo: "app"}, cache.LinkBlob, d, cache.OriginUpstream)
		cached = append(cached, d)
	}
	usage, blobs := b.Usage(), b.BlobBytes()
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	// The budget is what is stored: a new blob needs an eviction.
	b = open(usage + 64<<10)
	if got := b.BlobBytes(); got != blobs {
		t.Fatalf("blob bytes %d after a restart, %d before", got, blobs)
	}
	pinned := map[digest.Digest]struct{}{}
	for _, d := range cached {
		pinned[d] = struct{}{}
	}
	b.SetPins(func(context.Context) (map[digest.Digest]struct{}, error) { return pinned, nil })
	if _, err := b.Reserve(ctx, 512<<10); !errors.Is(err, cache.ErrFull) {
		t.Fatalf("everything pinned: %v, want ErrFull", err)
	}
	pinned2 := map[digest.Digest]struct{}{}
	for _, d := range cached[2:] {
		pinned2[d] = struct{}{}
	}
	// A pass that found nothing holds for a few seconds; a new store
	// (the same data) asks again at once.
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	b = open(usage + 64<<10)
	defer b.Close()
	b.SetPins(func(context.Context) (map[digest.Digest]struct{}, error) { return pinned2, nil })
	release, err := b.Reserve(ctx, 512<<10)
	if err != nil {
		t.Fatalf("two blobs evictable: %v", err)
	}
	for _, d := range cached[2:] {
		if _, err := b.StatBlob(ctx, d); err != nil {
			t.Fatalf("a pinned blob went: %v", err)
		}
	}
	// What is reserved counts: with nothing left to evict, a second
	// reservation of everything free fails.
	keep := func(_ cache.LinkKind, d digest.Digest) bool { _, ok := pinned2[d]; return ok }
	if _, err := b.Evict(ctx, 1<<40, keep); err != nil {
		t.Fatal(err)
	}
	free := usage + 64<<10 - b.Usage()
	if _, err := b.Reserve(ctx, free); !errors.Is(err, cache.ErrFull) {
		t.Fatalf("reserving %d with 512 KiB reserved of it: %v", free, err)
	}
	release()
	release() // twice is harmless
	if r2, err := b.Reserve(ctx, 512<<10); err != nil {
		t.Fatalf("after the release: %v", err)
	} else {
		r2()
	}
	// A failing pin lookup skips the pass rather than evict a pin.
	b.SetPins(func(context.Context) (map[digest.Digest]struct{}, error) { return nil, errors.New("store read failed") })
	if _, err := b.Reserve(ctx, 4*free); !errors.Is(err, cache.ErrFull) {
		t.Fatalf("pins unreadable: %v", err)
	}
	for _, d := range cached[2:] {
		if _, err := b.StatBlob(ctx, d); err != nil {
			t.Fatalf("a pinned blob went while the pins could not be read: %v", err)
		}
	}
}
