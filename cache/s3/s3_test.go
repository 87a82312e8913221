package s3

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/cache"
)

func TestConfig_Endpoint(t *testing.T) {
	tests := []struct {
		name       string
		endpoint   string
		tls        bool
		wantHost   string
		wantSecure bool
		wantErr    bool
	}{
		{name: "host:port keeps tls", endpoint: "127.0.0.1:8333", tls: true, wantHost: "127.0.0.1:8333", wantSecure: true},
		{name: "host:port without tls", endpoint: "127.0.0.1:8333", wantHost: "127.0.0.1:8333"},
		{name: "http URL", endpoint: "http://127.0.0.1:8333", tls: true, wantHost: "127.0.0.1:8333"},
		{name: "https URL", endpoint: "https://s3.amazonaws.com", wantHost: "s3.amazonaws.com", wantSecure: true},
		{name: "URL with a path", endpoint: "http://127.0.0.1:8333/bucket", wantErr: true},
		{name: "other scheme", endpoint: "ftp://127.0.0.1", wantErr: true},
		{name: "empty", endpoint: "", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			host, secure, err := parseEndpoint(tt.endpoint, tt.tls)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, want error %v", err, tt.wantErr)
			}
			if err == nil && (host != tt.wantHost || secure != tt.wantSecure) {
				t.Errorf("= %q, %v; want %q, %v", host, secure, tt.wantHost, tt.wantSecure)
			}
		})
	}
}

func TestConfig_Credentials(t *testing.T) {
	dir := t.TempDir()
	access := filepath.Join(dir, "access")
	secret := filepath.Join(dir, "secret")
	os.WriteFile(access, []byte("AKID\n"), 0o600)
	os.WriteFile(secret, []byte("SECRET\n"), 0o600)
	creds, err := loadCredentials(access, secret)
	if err != nil {
		t.Fatal(err)
	}
	v, err := creds.Get()
	if err != nil {
		t.Fatal(err)
	}
	if v.AccessKeyID != "AKID" || v.SecretAccessKey != "SECRET" {
		t.Errorf("credentials = %q, %q; want the files' trimmed contents", v.AccessKeyID, v.SecretAccessKey)
	}
	if _, err := loadCredentials(access, ""); err == nil {
		t.Error("an access key file without a secret key file: no error")
	}
	if _, err := loadCredentials(access, filepath.Join(dir, "absent")); err == nil {
		t.Error("an absent secret key file: no error")
	}
	if _, err := New(Config{Endpoint: "127.0.0.1:1"}); err == nil {
		t.Error("no bucket: no error")
	}
}

func randomBlob(t *testing.T, size int) ([]byte, digest.Digest) {
	t.Helper()
	b := make([]byte, size)
	rand.Read(b)
	return b, digest.FromBytes(b)
}

// onlyReader hides io.ReaderAt: the client then buffers each part.
type onlyReader struct{ r io.Reader }

func (o onlyReader) Read(p []byte) (int, error) { return o.r.Read(p) }

func readBlob(t *testing.T, s *Store, d digest.Digest, offset int64) []byte {
	t.Helper()
	rc, err := s.Open(context.Background(), d, offset)
	if err != nil {
		t.Fatalf("Open(%d): %v", offset, err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatalf("reading from %d: %v", offset, err)
	}
	return b
}

// TestSeaweedFS runs the store against a real SeaweedFS (one server for
// all the subtests: it takes about 15 s to start).
func TestSeaweedFS(t *testing.T) {
	w := startWeed(t)
	s := newWeedStore(t, w)
	ctx := context.Background()

	t.Run("Blob", func(t *testing.T) {
		tests := []struct {
			name string
			size int
			// reader gives Put its bytes; the file is what a verified fill
			// hands over.
			reader func(t *testing.T, b []byte) io.Reader
		}{
			{name: "small, one PUT", size: 1000, reader: func(t *testing.T, b []byte) io.Reader { return onlyReader{bytes.NewReader(b)} }},
			{name: "20 MiB multipart from a file", size: 20 << 20, reader: func(t *testing.T, b []byte) io.Reader {
				p := filepath.Join(t.TempDir(), "blob")
				if err := os.WriteFile(p, b, 0o600); err != nil {
					t.Fatal(err)
				}
				f, err := os.Open(p)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { f.Close() })
				return f
			}},
			{name: "20 MiB multipart from a stream", size: 20 << 20, reader: func(t *testing.T, b []byte) io.Reader { return onlyReader{bytes.NewReader(b)} }},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				b, d := randomBlob(t, tt.size)
				if _, err := s.Stat(ctx, d); !errors.Is(err, cache.ErrNotFound) {
					t.Fatalf("Stat before Put: %v, want ErrNotFound", err)
				}
				start := time.Now()
				if err := s.Put(ctx, d, int64(len(b)), tt.reader(t, b)); err != nil {
					t.Fatal(err)
				}
				t.Logf("Put of %d bytes: %v", len(b), time.Since(start).Round(time.Millisecond))
				size, err := s.Stat(ctx, d)
				if err != nil || size != int64(len(b)) {
					t.Fatalf("Stat = %d, %v; want %d", size, err, len(b))
				}
				if got := readBlob(t, s, d, 0); digest.FromBytes(got) != d {
					t.Fatalf("read %d bytes with digest %s, want %d bytes of %s", len(got), digest.FromBytes(got), len(b), d)
				}
				for _, off := range []int64{1, int64(len(b)) / 2, int64(len(b)) - 1, int64(len(b))} {
					if got := readBlob(t, s, d, off); !bytes.Equal(got, b[off:]) {
						t.Errorf("Open(%d): %d bytes, want the %d from the offset", off, len(got), len(b[off:]))
					}
				}
				if _, err := s.Open(ctx, d, int64(len(b))+1); err == nil {
					t.Error("Open past the end: no error")
				}
				// Put of a blob present with its size reads nothing.
				if err := s.Put(ctx, d, int64(len(b)), errReader{}); err != nil {
					t.Errorf("second Put: %v", err)
				}
				if err := s.Delete(ctx, d); err != nil {
					t.Fatal(err)
				}
				if _, err := s.Stat(ctx, d); !errors.Is(err, cache.ErrNotFound) {
					t.Errorf("Stat after Delete: %v, want ErrNotFound", err)
				}
				if _, err := s.Open(ctx, d, 0); !errors.Is(err, cache.ErrNotFound) {
					t.Errorf("Open after Delete: %v, want ErrNotFound", err)
				}
			})
		}
	})

	t.Run("Blob/ShortReader", func(t *testing.T) {
		for _, size := range []int{1000, 20 << 20} {
			b, d := randomBlob(t, size)
			if err := s.Put(ctx, d, int64(size)+10, onlyReader{bytes.NewReader(b)}); err == nil {
				t.Errorf("Put of %d bytes announced as %d: no error", size, size+10)
			}
			if _, err := s.Stat(ctx, d); !errors.Is(err, cache.ErrNotFound) {
				t.Errorf("a short Put of %d bytes left an object: Stat = %v", size, err)
			}
		}
	})

	t.Run("NotFound", func(t *testing.T) {
		d := digest.FromString("never stored")
		if _, err := s.Stat(ctx, d); !errors.Is(err, cache.ErrNotFound) {
			t.Errorf("Stat: %v", err)
		}
		if _, err := s.Open(ctx, d, 0); !errors.Is(err, cache.ErrNotFound) {
			t.Errorf("Open: %v", err)
		}
		if _, err := s.Open(ctx, d, 5); !errors.Is(err, cache.ErrNotFound) {
			t.Errorf("Open at an offset: %v", err)
		}
		if _, _, err := s.GetManifest(ctx, d); !errors.Is(err, cache.ErrNotFound) {
			t.Errorf("GetManifest: %v", err)
		}
		if _, _, err := s.Get(ctx, "tags/never"); !errors.Is(err, cache.ErrNotFound) {
			t.Errorf("Get: %v", err)
		}
		if err := s.Delete(ctx, d); err != nil {
			t.Errorf("Delete of an absent blob: %v", err)
		}
	})

	t.Run("Manifest", func(t *testing.T) {
		data := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}`)
		d := digest.FromBytes(data)
		if err := s.PutManifest(ctx, d, v1.MediaTypeImageManifest, data); err != nil {
			t.Fatal(err)
		}
		got, mt, err := s.GetManifest(ctx, d)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, data) || mt != v1.MediaTypeImageManifest {
			t.Errorf("GetManifest = %q, %q; want %q, %q", got, mt, data, v1.MediaTypeImageManifest)
		}
		if _, err := s.Stat(ctx, d); !errors.Is(err, cache.ErrNotFound) {
			t.Errorf("a manifest shows as a blob: Stat = %v", err)
		}
		if err := s.PutManifest(ctx, digest.FromString("other"), v1.MediaTypeImageManifest, data); !errors.Is(err, ErrDigest) {
			t.Errorf("PutManifest under a wrong digest: %v, want ErrDigest", err)
		}
		if err := s.DeleteManifest(ctx, d); err != nil {
			t.Fatal(err)
		}
		if _, _, err := s.GetManifest(ctx, d); !errors.Is(err, cache.ErrNotFound) {
			t.Errorf("GetManifest after delete: %v", err)
		}
	})

	t.Run("Conditional", func(t *testing.T) {
		// What SeaweedFS (7506e5f91cd6) was seen to do, written down at
		// the top of conditional.go.
		c, err := s.ProbeConditional(ctx)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("ProbeConditional = %+v", c)
		if !c.IfNoneMatch || !c.IfMatch {
			t.Errorf("ProbeConditional = %+v; SeaweedFS was seen to honour both", c)
		}

		key := "tags/" + rand.Text()
		etag1, err := s.PutIfAbsent(ctx, key, []byte("v1"))
		if err != nil {
			t.Fatalf("PutIfAbsent of a new key: %v", err)
		}
		if _, err := s.PutIfAbsent(ctx, key, []byte("v1 again")); !errors.Is(err, ErrPrecondition) {
			t.Errorf("PutIfAbsent of an existing key: %v, want ErrPrecondition", err)
		}
		data, etag, err := s.Get(ctx, key)
		if err != nil || string(data) != "v1" || etag != etag1 {
			t.Fatalf("Get = %q, %q, %v; want v1, %q", data, etag, err, etag1)
		}
		etag2, err := s.CompareAndSwap(ctx, key, etag1, []byte("v2"))
		if err != nil {
			t.Fatalf("CompareAndSwap with the current ETag: %v", err)
		}
		if etag2 == etag1 {
			t.Errorf("ETag unchanged by a new content: %q", etag2)
		}
		if _, err := s.CompareAndSwap(ctx, key, etag1, []byte("v3")); !errors.Is(err, ErrPrecondition) {
			t.Errorf("CompareAndSwap with a stale ETag: %v, want ErrPrecondition", err)
		}
		if data, _, _ := s.Get(ctx, key); string(data) != "v2" {
			t.Errorf("after a lost CompareAndSwap the key holds %q, want v2", data)
		}
		if _, err := s.CompareAndSwap(ctx, "tags/"+rand.Text(), etag1, []byte("x")); !errors.Is(err, ErrPrecondition) {
			t.Errorf("CompareAndSwap of an absent key: %v, want ErrPrecondition", err)
		}

		// Racing writers, as two replicas pushing one tag: of 4 writes
		// from the same state, one wins and the key holds its bytes.
		race := func(name, key string, write func(v []byte) error) {
			t.Helper()
			var (
				wg   sync.WaitGroup
				mu   sync.Mutex
				wins []string
				errs []error
			)
			start := time.Now()
			for i := range 4 {
				wg.Go(func() {
					v := []byte{'w', byte('0' + i)}
					err := write(v)
					mu.Lock()
					defer mu.Unlock()
					if err == nil {
						wins = append(wins, string(v))
					} else if !errors.Is(err, ErrPrecondition) {
						errs = append(errs, err)
					}
				})
			}
			wg.Wait()
			t.Logf("4 racing %s: %v", name, time.Since(start).Round(time.Millisecond))
			if len(errs) > 0 {
				t.Fatalf("racing %s: %v", name, errs)
			}
			data, _, err := s.Get(ctx, key)
			if err != nil || len(wins) != 1 || string(data) != wins[0] {
				t.Errorf("racing %s: winners %q, key holds %q (%v); want one winner, held", name, wins, data, err)
			}
		}
		race("CompareAndSwaps", key, func(v []byte) error {
			_, err := s.CompareAndSwap(ctx, key, etag2, v)
			return err
		})
		fresh := "tags/" + rand.Text()
		race("PutIfAbsents", fresh, func(v []byte) error {
			_, err := s.PutIfAbsent(ctx, fresh, v)
			return err
		})
		for _, k := range []string{key, fresh} {
			if err := s.DeleteKey(ctx, k); err != nil {
				t.Fatal(err)
			}
		}
		if _, _, err := s.Get(ctx, key); !errors.Is(err, cache.ErrNotFound) {
			t.Errorf("Get after DeleteKey: %v", err)
		}
		if _, err := s.PutIfAbsent(ctx, "blobs/sha256/x", nil); err == nil {
			t.Error("PutIfAbsent under blobs/: no error")
		}
	})

	t.Run("ConcurrentPut", func(t *testing.T) {
		for _, size := range []int{1000, 20 << 20} {
			b, d := randomBlob(t, size)
			var wg sync.WaitGroup
			errs := make([]error, 4)
			for i := range 4 {
				wg.Go(func() { errs[i] = s.Put(ctx, d, int64(size), onlyReader{bytes.NewReader(b)}) })
			}
			wg.Wait()
			for i, err := range errs {
				if err != nil {
					t.Errorf("Put %d of %d bytes: %v", i, size, err)
				}
			}
			if n, err := s.Stat(ctx, d); err != nil || n != int64(size) {
				t.Errorf("Stat = %d, %v; want %d", n, err, size)
			}
			if got := readBlob(t, s, d, 0); digest.FromBytes(got) != d {
				t.Errorf("after 4 concurrent Puts: %d bytes of %s, want %d of %s", len(got), digest.FromBytes(got), size, d)
			}
		}
	})

	// Sub views keep to their prefix; List gives keys under a prefix,
	// with sizes, bounded.
	t.Run("SubAndList", func(t *testing.T) {
		a, b := s.Sub("a/"), s.Sub("b/")
		blob, d := randomBlob(t, 100)
		if err := a.Put(ctx, d, 100, bytes.NewReader(blob)); err != nil {
			t.Fatal(err)
		}
		if _, err := b.Stat(ctx, d); !errors.Is(err, cache.ErrNotFound) {
			t.Errorf("blob put through a/ is seen through b/: %v", err)
		}
		if n, err := a.Stat(ctx, d); err != nil || n != 100 {
			t.Errorf("a/ Stat = %d, %v", n, err)
		}
		for _, k := range []string{"tags/x/_t/v1", "tags/x/_t/v2", "tags/x/y/_t/v9"} {
			if _, err := a.PutKey(ctx, k, []byte(k)); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := a.PutKey(ctx, "tags/x/_t/gone", nil); err != nil {
			t.Fatal(err)
		}
		objs, err := a.List(ctx, "tags/x/_t/", 10)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, o := range objs {
			got = append(got, fmt.Sprintf("%s:%d", o.Key, o.Size))
			if time.Since(o.Modified) > time.Minute || time.Until(o.Modified) > time.Minute {
				t.Errorf("%s modified at %v", o.Key, o.Modified)
			}
		}
		if want := "[gone:0 v1:12 v2:12]"; fmt.Sprint(got) != want {
			t.Errorf("List = %v, want %v", got, want)
		}
		content, more, err := a.ListContent(ctx, "blobs", 10)
		if err != nil || more || len(content) != 1 || content[0].Digest != d || content[0].Size != 100 {
			t.Errorf("ListContent(blobs) = %+v, %v, %v; want %s of 100 bytes", content, more, err, d)
		}
		if content, more, err := a.ListContent(ctx, "blobs", 0); err != nil || !more || len(content) != 0 {
			t.Errorf("ListContent(blobs, 0) = %+v, %v, %v; want none and more", content, more, err)
		}
		if _, err := a.List(ctx, "tags/x/", 3); !errors.Is(err, ErrTooMany) {
			t.Errorf("List of 4 with max 3: %v, want ErrTooMany", err)
		}
		if objs, err := b.List(ctx, "tags/", 10); err != nil || len(objs) != 0 {
			t.Errorf("b/ List = %v, %v; want nothing", objs, err)
		}
		if n, err := a.StatKey(ctx, "tags/x/_t/v1"); err != nil || n != 12 {
			t.Errorf("StatKey = %d, %v", n, err)
		}
		if _, err := b.StatKey(ctx, "tags/x/_t/v1"); !errors.Is(err, cache.ErrNotFound) {
			t.Errorf("b/ StatKey: %v, want ErrNotFound", err)
		}
		if _, err := a.List(ctx, "blobs/", 10); err == nil {
			t.Error("List of blobs/: no error")
		}
	})
}

type errReader struct{}

func (errReader) Read([]byte) (int, error) { return 0, errors.New("read") }
