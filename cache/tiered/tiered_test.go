package tiered

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/cache/s3"
	"github.com/ocimirror/ocimirror/internal/weedtest"
)

func testLogger() *slog.Logger {
	if os.Getenv("OCIMIRROR_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// newStore is a replica's store: a Badger of its own over the bucket.
func newStore(t *testing.T, bucket *s3.Store, o Options) *Store {
	t.Helper()
	b, err := cache.OpenBadger(cache.BadgerOptions{Path: t.TempDir(), Logger: testLogger(), CollectInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	o.Logger = testLogger()
	s := New(context.Background(), cache.NewLRU(b, cache.LRUOptions{ManifestBytes: 1 << 20, MetadataBytes: 1 << 20}), bucket, o)
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Error(err)
		}
	})
	return s
}

func TestTiered(t *testing.T) {
	if testing.Short() {
		t.Skip("starts SeaweedFS")
	}
	w := weedtest.Start(t)
	root, err := s3.New(s3.Config{Endpoint: w.S3, Bucket: w.Bucket, Region: "us-east-1", PathStyle: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()

	// Of two replicas, a conditional tag delete through one does not
	// undo a re-tag through the other; a deleted tag leaves the list.
	t.Run("HostedTags", func(t *testing.T) {
		bucket := root.Sub("tags/")
		a, b := newStore(t, bucket, Options{Self: "a"}), newStore(t, bucket, Options{Self: "b"})
		m1, m2 := digest.FromString("m1"), digest.FromString("m2")
		k := cache.TagKey{Repo: "ci/app", Tag: "latest"}
		if err := a.PutTag(ctx, k, cache.TagEntry{Digest: m1, MediaType: "x", Size: 1}); err != nil {
			t.Fatal(err)
		}
		if e, err := b.GetTag(ctx, k); err != nil || e.Digest != m1 {
			t.Fatalf("tag via b = %v, %v; want %s", e.Digest, err, m1)
		}
		if err := b.PutTag(ctx, k, cache.TagEntry{Digest: m2, MediaType: "x", Size: 1}); err != nil {
			t.Fatal(err)
		}
		if err := a.DeleteTagIf(ctx, k, m1); err != nil {
			t.Fatal(err)
		}
		if e, err := a.GetTag(ctx, k); err != nil || e.Digest != m2 {
			t.Fatalf("after a's delete of the old digest, the tag via a = %v, %v; want %s", e.Digest, err, m2)
		}
		if err := a.PutTag(ctx, cache.TagKey{Repo: "ci/app", Tag: "v1"}, cache.TagEntry{Digest: m1, MediaType: "x", Size: 1}); err != nil {
			t.Fatal(err)
		}
		if err := a.PutTag(ctx, cache.TagKey{Repo: "ci/app/sub", Tag: "v9"}, cache.TagEntry{Digest: m1, MediaType: "x", Size: 1}); err != nil {
			t.Fatal(err)
		}
		if err := b.DeleteTagIf(ctx, cache.TagKey{Repo: "ci/app", Tag: "v1"}, m1); err != nil {
			t.Fatal(err)
		}
		tags, err := a.ListTags(ctx, "", "ci/app")
		if err != nil || len(tags) != 1 || tags[0].Name != "latest" {
			t.Fatalf("tags of ci/app = %v, %v; want [latest]", tags, err)
		}
		if _, err := a.GetTag(ctx, cache.TagKey{Repo: "ci/app", Tag: "v1"}); err == nil {
			t.Error("a deleted tag is found")
		}
		// A tag list over its bound is an error of that list, not a
		// bucket that does not answer.
		defer func(old int) { maxTags = old }(maxTags)
		maxTags = 1
		if err := a.PutTag(ctx, cache.TagKey{Repo: "ci/app", Tag: "v2"}, cache.TagEntry{Digest: m1, MediaType: "x", Size: 1}); err != nil {
			t.Fatal(err)
		}
		if _, err := a.ListTags(ctx, "", "ci/app"); !errors.Is(err, s3.ErrTooMany) {
			t.Errorf("ListTags over maxTags: %v, want ErrTooMany", err)
		}
		if !a.up() {
			t.Error("a tag list over its bound marked the bucket down")
		}
	})

	// Over maxSize, the lease holder evicts the least recently accessed
	// upstream content down to 90%; content a replica served is kept;
	// hosted content is never touched; another replica does not run at
	// the same time.
	t.Run("Eviction", func(t *testing.T) {
		defer func(old time.Duration) { minAge = old }(minAge)
		minAge = 0
		bucket := root.Sub("gc/")
		a := newStore(t, bucket, Options{Self: "a", MaxSize: 5000, GCInterval: time.Hour})
		b := newStore(t, bucket, Options{Self: "b", MaxSize: 5000, GCInterval: time.Hour})
		cached, hosted := bucket.Sub("cache/"), bucket.Sub("hosted/")
		var ds []digest.Digest
		for i := range 10 {
			data := bytes.Repeat([]byte{byte(i)}, 1000)
			d := digest.FromBytes(data)
			ds = append(ds, d)
			if err := cached.Put(ctx, d, 1000, bytes.NewReader(data)); err != nil {
				t.Fatal(err)
			}
			if i == 0 {
				if err := hosted.Put(ctx, d, 1000, bytes.NewReader(data)); err != nil {
					t.Fatal(err)
				}
			}
			time.Sleep(1100 * time.Millisecond) // S3 times are to the second
		}
		// b serves the two oldest: they are the most recently accessed now.
		b.Touch(ds[0])
		b.Touch(ds[1])
		b.flushAccess(ctx)

		c, err := a.Collect(ctx)
		if err != nil || !c.Ran {
			t.Fatalf("Collect via a = %+v, %v", c, err)
		}
		if c.Bytes != 10000 || c.Evicted != 6 || c.EvictedBytes != 6000 {
			t.Errorf("Collect = %+v; want 10000 bytes seen, 6 evicted (down to 4500 of 5000)", c)
		}
		kept := map[int]bool{0: true, 1: true, 8: true, 9: true}
		for i, d := range ds {
			_, err := cached.Stat(ctx, d)
			if kept[i] != (err == nil) {
				t.Errorf("blob %d: Stat %v; want kept=%v", i, err, kept[i])
			}
		}
		if _, err := hosted.Stat(ctx, ds[0]); err != nil {
			t.Errorf("hosted blob: %v", err)
		}
		if c, err := b.Collect(ctx); err != nil || c.Ran {
			t.Errorf("Collect via b while a holds the lease = %+v, %v; want not run", c, err)
		}
		if c, err := a.Collect(ctx); err != nil || !c.Ran || c.Evicted != 0 || c.Bytes != 4000 {
			t.Errorf("a's second Collect = %+v, %v; want 4000 bytes, nothing evicted", c, err)
		}
		if st := a.GCStats(); st.Runs != 2 || st.EvictedBytes != 6000 || st.Bytes != 4000 {
			t.Errorf("GCStats = %+v", st)
		}
	})

	// With the bucket stopped, the store says so, and reads fall back to
	// the local tier. Last: it stops the server.
	t.Run("Down", func(t *testing.T) {
		a := newStore(t, root.Sub("down/"), Options{Self: "a"})
		k := cache.TagKey{Repo: "ci/app", Tag: "v1"}
		d := digest.FromString("m")
		if err := a.PutTag(ctx, k, cache.TagEntry{Digest: d, MediaType: "x", Size: 1}); err != nil {
			t.Fatal(err)
		}
		w.Stop()
		if err := a.Ping(ctx); err == nil {
			t.Fatal("Ping: no error with the bucket stopped")
		}
		if e, err := a.GetTag(ctx, k); err != nil || e.Digest != d {
			t.Errorf("GetTag from the local tier = %v, %v", e.Digest, err)
		}
		if err := a.PutTag(ctx, k, cache.TagEntry{Digest: d, MediaType: "x", Size: 1}); err == nil {
			t.Error("a hosted tag written with the bucket down: no error")
		}
		if _, err := a.StatShared(ctx, d); err == nil {
			t.Error("StatShared with the bucket down: no error")
		}
	})
}
