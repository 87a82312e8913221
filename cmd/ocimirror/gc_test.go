package main

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/ocimirror/ocimirror/cache"
)

// ocimirror gc on a stopped mirror: --dry-run says what would go and
// deletes nothing; then it deletes that, and keeps what is referenced.
func TestRun_GC(t *testing.T) {
	dir := t.TempDir()
	store, err := cache.OpenBadger(cache.BadgerOptions{Path: dir, CollectInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	write := func(data []byte) digest.Digest {
		w, _ := store.CreateBlob(ctx)
		_, _ = w.Write(data)
		d := digest.FromBytes(data)
		if err := w.Commit(ctx, d, int64(len(data))); err != nil {
			t.Fatal(err)
		}
		_ = w.Close()
		return d
	}
	garbage := write(bytes.Repeat([]byte("g"), 5000))
	kept := write([]byte("kept"))
	if err := store.Link(ctx, cache.RepoKey{Upstream: "up", Repo: "app"}, cache.LinkBlob, kept, cache.OriginUpstream); err != nil {
		t.Fatal(err)
	}
	store.Close()

	var out, errOut bytes.Buffer
	if code := run(ctx, []string{"gc", "--data", dir, "--dry-run", "--grace", "0s"}, &out, &errOut); code != 0 {
		t.Fatalf("dry run: %d %s", code, errOut.String())
	}
	if !strings.Contains(out.String(), "would delete blob "+garbage.String()) || strings.Contains(out.String(), kept.String()) {
		t.Fatalf("dry run said:\n%s", out.String())
	}
	out.Reset()
	if code := run(ctx, []string{"gc", "--data", dir, "--grace", "0s"}, &out, &errOut); code != 0 {
		t.Fatalf("gc: %d %s", code, errOut.String())
	}
	if !strings.Contains(out.String(), "deleted blob "+garbage.String()) || !strings.Contains(out.String(), "deleted 1 items") {
		t.Fatalf("gc said:\n%s", out.String())
	}
	store, err = cache.OpenBadger(cache.BadgerOptions{Path: dir, CollectInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	if _, err := store.StatBlob(ctx, garbage); !errors.Is(err, cache.ErrNotFound) {
		t.Fatal("the garbage survived")
	}
	if _, err := store.StatBlob(ctx, kept); err != nil {
		t.Fatal("referenced content was collected")
	}
}
