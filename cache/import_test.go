package cache_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/cache"
)

func TestStore_Pins(t *testing.T) {
	for _, sc := range stores() {
		t.Run(sc.name, func(t *testing.T) {
			ctx := context.Background()
			dir := t.TempDir()
			s, closeFn := sc.open(t, dir)
			k := cache.RepoKey{Upstream: "docker.io", Repo: "library/alpine"}
			d1, d2 := digest.FromString("one"), digest.FromString("two")
			at := time.Unix(1700000000, 0)
			for _, p := range []cache.Pin{
				{Repo: k, Name: "3", Digest: d1, At: at},
				{Repo: k, Name: d2.String(), Digest: d2, At: at},
				{Repo: cache.RepoKey{Upstream: "ghcr.io", Repo: "org/app"}, Name: "v1", Digest: d1, At: at},
				{Repo: k, Name: "3", Digest: d2, At: at}, // moves the pin
			} {
				if err := s.PutPin(ctx, p); err != nil {
					t.Fatal(err)
				}
			}
			closeFn()
			s, closeFn = sc.open(t, dir)
			defer closeFn()
			got, err := s.ListPins(ctx)
			if err != nil {
				t.Fatal(err)
			}
			want := []cache.Pin{
				{Repo: k, Name: "3", Digest: d2, At: at},
				{Repo: k, Name: d2.String(), Digest: d2, At: at},
				{Repo: cache.RepoKey{Upstream: "ghcr.io", Repo: "org/app"}, Name: "v1", Digest: d1, At: at},
			}
			if !slices.EqualFunc(got, want, func(a, b cache.Pin) bool {
				return a.Repo == b.Repo && a.Name == b.Name && a.Digest == b.Digest && a.At.Equal(b.At)
			}) {
				t.Fatalf("pins after a restart:\n got  %+v\n want %+v", got, want)
			}
			if err := s.DeletePin(ctx, k, "3"); err != nil {
				t.Fatal(err)
			}
			if got, _ := s.ListPins(ctx); len(got) != 2 || got[0].Name != d2.String() {
				t.Fatalf("after a delete: %+v", got)
			}
		})
	}
}

// importFixture stores an image (a manifest naming two blobs) and an
// artifact referring to it, unlinked, and returns the import that makes
// them visible in repository k.
type importFixture struct {
	k                  cache.RepoKey
	image, sbom        cache.Manifest
	layer, config, art digest.Digest
	im                 *cache.Import
}

func storeImportFixture(t *testing.T, s cache.Store, k cache.RepoKey) importFixture {
	t.Helper()
	ctx := context.Background()
	f := importFixture{k: k}
	f.config = writeBlob(t, s, []byte(`{"architecture":"amd64","os":"linux"}`))
	f.layer = writeBlob(t, s, randomBytes(3*testChunk))
	f.art = writeBlob(t, s, []byte("an sbom"))
	body := fmt.Sprintf(`{"schemaVersion":2,"mediaType":%q,"config":{"mediaType":%q,"digest":%q,"size":37},"layers":[{"mediaType":%q,"digest":%q,"size":%d}]}`,
		v1.MediaTypeImageManifest, v1.MediaTypeImageConfig, f.config, v1.MediaTypeImageLayerGzip, f.layer, 3*testChunk)
	f.image = cache.Manifest{Digest: digest.FromString(body), MediaType: v1.MediaTypeImageManifest, Data: []byte(body)}
	body = fmt.Sprintf(`{"schemaVersion":2,"mediaType":%q,"artifactType":"application/vnd.test.sbom","config":{"mediaType":%q,"digest":%q,"size":37},"layers":[{"mediaType":"text/plain","digest":%q,"size":7}],"subject":{"mediaType":%q,"digest":%q,"size":%d}}`,
		v1.MediaTypeImageManifest, v1.MediaTypeEmptyJSON, f.config, f.art, v1.MediaTypeImageManifest, f.image.Digest, len(f.image.Data))
	f.sbom = cache.Manifest{Digest: digest.FromString(body), MediaType: v1.MediaTypeImageManifest, Data: []byte(body)}
	for _, m := range []cache.Manifest{f.image, f.sbom} {
		if err := s.PutManifest(ctx, m); err != nil {
			t.Fatal(err)
		}
	}
	f.im = &cache.Import{
		Links: []cache.ImportLink{
			{Repo: k, Kind: cache.LinkBlob, Digest: f.config},
			{Repo: k, Kind: cache.LinkBlob, Digest: f.layer},
			{Repo: k, Kind: cache.LinkManifest, Digest: f.image.Digest},
			{Repo: k, Kind: cache.LinkBlob, Digest: f.art},
			{Repo: k, Kind: cache.LinkManifest, Digest: f.sbom.Digest},
		},
		Referrers: []cache.ImportReferrer{{
			Key:        cache.ReferrerKey{Upstream: k.Upstream, Repo: k.Repo, Subject: f.image.Digest},
			Descriptor: v1.Descriptor{MediaType: v1.MediaTypeImageManifest, Digest: f.sbom.Digest, Size: int64(len(f.sbom.Data)), ArtifactType: "application/vnd.test.sbom"},
		}},
		Tags: []cache.ImportTag{{
			Key:   cache.TagKey{Upstream: k.Upstream, Repo: k.Repo, Tag: "v1"},
			Entry: cache.TagEntry{Digest: f.image.Digest, MediaType: f.image.MediaType, Size: int64(len(f.image.Data)), CheckedAt: time.Unix(1700000000, 0)},
		}},
		Pins: []cache.Pin{{Repo: k, Name: "v1", Digest: f.image.Digest, At: time.Unix(1700000000, 0)}},
	}
	return f
}

// visible reports what a client of repository k would see of f: each
// link, the tag, the referrers index, the pin and the tag list.
func (f importFixture) visible(t *testing.T, s cache.Store) []string {
	t.Helper()
	ctx := context.Background()
	var seen []string
	for _, l := range f.im.Links {
		if _, ok, err := s.Linked(ctx, l.Repo, l.Kind, l.Digest); err != nil {
			t.Fatal(err)
		} else if ok {
			seen = append(seen, "link "+l.Digest.String())
		}
	}
	if e, err := s.GetTag(ctx, cache.TagKey{Upstream: f.k.Upstream, Repo: f.k.Repo, Tag: "v1"}); err == nil && e.Digest == f.image.Digest {
		seen = append(seen, "tag")
	}
	if rs, _ := s.ListReferrers(ctx, cache.ReferrerKey{Upstream: f.k.Upstream, Repo: f.k.Repo, Subject: f.image.Digest}); len(rs) == 1 && rs[0].Digest == f.sbom.Digest {
		seen = append(seen, "referrer")
	}
	if ps, _ := s.ListPins(ctx); len(ps) == 1 && ps[0].Digest == f.image.Digest {
		seen = append(seen, "pin")
	}
	if l, err := s.GetUpstreamTags(ctx, f.k.Upstream, f.k.Repo); err == nil && slices.Contains(l.Tags, "v1") {
		seen = append(seen, "tag list")
	}
	return seen
}

const allVisible = 9 // 5 links, tag, referrer, pin, tag list

func TestStore_CommitImport(t *testing.T) {
	for _, sc := range stores() {
		t.Run(sc.name, func(t *testing.T) {
			ctx := context.Background()
			s, closeFn := sc.open(t, t.TempDir())
			defer closeFn()
			k := cache.RepoKey{Upstream: "up.test", Repo: "team/app"}
			f := storeImportFixture(t, s, k)
			if got := f.visible(t, s); len(got) != 0 {
				t.Fatalf("stored content is visible before the commit: %v", got)
			}
			// An older tag list is kept, and the new tag joins it.
			if err := s.PutUpstreamTags(ctx, k.Upstream, k.Repo, cache.UpstreamTags{Tags: []string{"old", "zz"}, CheckedAt: time.Unix(5, 0)}); err != nil {
				t.Fatal(err)
			}
			// An old answer in memory (LRU) for the tag is replaced.
			old := cache.TagEntry{Digest: f.sbom.Digest, MediaType: f.sbom.MediaType, Size: 1, CheckedAt: time.Unix(1, 0)}
			_ = s.PutTag(ctx, cache.TagKey{Upstream: k.Upstream, Repo: k.Repo, Tag: "v1"}, old)
			if err := s.(cache.Importer).CommitImport(ctx, f.im); err != nil {
				t.Fatal(err)
			}
			if got := f.visible(t, s); len(got) != allVisible {
				t.Fatalf("after the commit, visible: %v", got)
			}
			l, _ := s.GetUpstreamTags(ctx, k.Upstream, k.Repo)
			if !slices.Equal(l.Tags, []string{"old", "v1", "zz"}) || !l.CheckedAt.Equal(time.Unix(5, 0)) {
				t.Errorf("tag list: %+v", l)
			}
			if origin, _, _ := s.Linked(ctx, k, cache.LinkBlob, f.layer); origin != cache.OriginUpstream {
				t.Errorf("imported content links with origin %q, want the upstream's", origin)
			}
		})
	}
}

// An import naming content the store does not hold commits nothing.
func TestBadger_CommitImportMissingContent(t *testing.T) {
	for _, chunk := range []int{0, 200} {
		t.Run(fmt.Sprintf("chunk %d", chunk), func(t *testing.T) {
			ctx := context.Background()
			b, err := cache.OpenBadger(cache.BadgerOptions{Path: t.TempDir()})
			if err != nil {
				t.Fatal(err)
			}
			defer b.Close()
			b.SetImportChunks(chunk, nil)
			f := storeImportFixture(t, b, cache.RepoKey{Upstream: "up.test", Repo: "team/app"})
			missing := digest.FromString("not stored")
			f.im.Links = append(f.im.Links, cache.ImportLink{Repo: f.k, Kind: cache.LinkBlob, Digest: missing})
			err = b.CommitImport(ctx, f.im)
			if !errors.Is(err, cache.ErrNotFound) || !strings.Contains(err.Error(), missing.String()) {
				t.Fatalf("commit with a missing blob: %v", err)
			}
			if got := f.visible(t, b); len(got) != 0 {
				t.Fatalf("a refused import left visible: %v", got)
			}
		})
	}
}

// An import larger than a transaction is journaled, applied in chunks,
// pins first and tags last, and the journal removed.
func TestBadger_CommitImportChunked(t *testing.T) {
	ctx := context.Background()
	b, err := cache.OpenBadger(cache.BadgerOptions{Path: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	f := storeImportFixture(t, b, cache.RepoKey{Upstream: "up.test", Repo: "team/app"})
	var during [][]string
	b.SetImportChunks(200, func(int) {
		if n := b.KeyCount([]byte{'J'}); n != 1 {
			t.Errorf("%d journal keys while applying", n)
		}
		during = append(during, f.visible(t, b))
	})
	if err := b.CommitImport(ctx, f.im); err != nil {
		t.Fatal(err)
	}
	if len(during) < 3 {
		t.Fatalf("%d chunks: the test proves nothing", len(during))
	}
	if got := during[0]; !slices.Equal(got, []string{"pin"}) {
		t.Errorf("first chunk made visible %v, want the pin alone", got)
	}
	for i, seen := range during {
		if slices.Contains(seen, "tag") && len(seen) < 7 { // 5 links, referrer, pin
			t.Errorf("the tag was visible after chunk %d of %d, before all it names: %v", i, len(during), seen)
		}
	}
	if slices.Contains(during[len(during)-3], "tag") {
		t.Errorf("the tag came before the last chunks: %v", during)
	}
	if got := f.visible(t, b); len(got) != allVisible {
		t.Fatalf("after the commit, visible: %v", got)
	}
	if n := b.KeyCount([]byte{'J'}); n != 0 {
		t.Errorf("%d journal keys left", n)
	}
}

// A process killed while applying a journaled import: the store completes
// it when it opens again.
func TestBadger_KilledMidImport(t *testing.T) {
	if dir := os.Getenv("OCIMIRROR_IMPORT_CHILD_DIR"); dir != "" {
		importChild(dir)
		return
	}
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^TestBadger_KilledMidImport$")
	cmd.Env = append(os.Environ(), "OCIMIRROR_IMPORT_CHILD_DIR="+dir)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var line string
	if _, err := fmt.Fscanln(out, &line); err != nil || line != "applying" {
		t.Fatalf("child: %q %v", line, err)
	}
	_ = cmd.Process.Kill()
	_ = cmd.Wait()

	b, err := cache.OpenBadger(cache.BadgerOptions{Path: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	f := importFixture{k: cache.RepoKey{Upstream: "up.test", Repo: "team/app"}}
	// The child's fixture, read back: the pinned image and its referrer.
	ps, _ := b.ListPins(context.Background())
	if len(ps) != 1 {
		t.Fatalf("pins after the restart: %+v", ps)
	}
	rs, _ := b.ListReferrers(context.Background(), cache.ReferrerKey{Upstream: f.k.Upstream, Repo: f.k.Repo, Subject: ps[0].Digest})
	e, err := b.GetTag(context.Background(), cache.TagKey{Upstream: f.k.Upstream, Repo: f.k.Repo, Tag: "v1"})
	if err != nil || e.Digest != ps[0].Digest || len(rs) != 1 {
		t.Fatalf("the import was not completed at open: tag %+v %v, referrers %v", e, err, rs)
	}
	if n := b.KeyCount([]byte{'J'}); n != 0 {
		t.Errorf("%d journal keys left", n)
	}
}

func importChild(dir string) {
	b, err := cache.OpenBadger(cache.BadgerOptions{Path: dir})
	if err != nil {
		panic(err)
	}
	f := storeImportFixture(&testing.T{}, b, cache.RepoKey{Upstream: "up.test", Repo: "team/app"})
	b.SetImportChunks(200, func(chunk int) {
		if chunk == 1 {
			fmt.Println("applying")
			time.Sleep(time.Hour) // killed here
		}
	})
	_ = b.CommitImport(context.Background(), f.im)
	os.Exit(3)
}
