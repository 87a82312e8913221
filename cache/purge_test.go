package cache_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/cache"
)

// A purge drops a repository's tags, upstream links (more than one
// chunk's worth), referrers entries, stored upstream answers and pins;
// keeps what was pushed, the content bytes, and every other repository
// (those whose names extend its name included); refuses hosted ones; and
// purging again drops nothing. Counts see the change.
func TestStore_Purge(t *testing.T) {
	for _, sc := range stores() {
		t.Run(sc.name, func(t *testing.T) {
			s, closeFn := sc.open(t, t.TempDir())
			defer closeFn()
			ctx := context.Background()
			app := cache.RepoKey{Upstream: "up", Repo: "app"}
			others := []cache.RepoKey{{Upstream: "up", Repo: "app/sub"}, {Upstream: "up", Repo: "app2"}, {Upstream: "other", Repo: "app"}}
			must := func(err error) {
				t.Helper()
				if err != nil {
					t.Fatal(err)
				}
			}
			layer := writeBlob(t, s, randomBytes(1000))
			pushed := writeBlob(t, s, randomBytes(100))
			var fake []digest.Digest
			for i := range 300 {
				fake = append(fake, digest.FromString(fmt.Sprint("blob ", i)))
			}
			body := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"a/b","digest":"` +
				layer.String() + `","size":1000},"layers":[]}`)
			m := cache.Manifest{Digest: digest.FromBytes(body), MediaType: v1.MediaTypeImageManifest, Data: body}
			must(s.PutManifest(ctx, m))
			ref := v1.Descriptor{MediaType: v1.MediaTypeImageManifest, Digest: digest.FromString("sig"), Size: 2}
			pushedRef := v1.Descriptor{MediaType: v1.MediaTypeImageManifest, Digest: digest.FromString("pushed sig"), Size: 2}
			for _, k := range append([]cache.RepoKey{app}, others...) {
				must(s.Link(ctx, k, cache.LinkBlob, layer, cache.OriginUpstream))
				must(s.Link(ctx, k, cache.LinkManifest, m.Digest, cache.OriginUpstream))
				must(s.PutTag(ctx, cache.TagKey{Upstream: k.Upstream, Repo: k.Repo, Tag: "v1"}, cache.TagEntry{Digest: m.Digest, CheckedAt: time.Now()}))
				must(s.PutUpstreamTags(ctx, k.Upstream, k.Repo, cache.UpstreamTags{Tags: []string{"v1"}}))
				rk := cache.ReferrerKey{Upstream: k.Upstream, Repo: k.Repo, Subject: m.Digest}
				must(s.PutReferrer(ctx, rk, ref))
				must(s.PutUpstreamReferrers(ctx, rk, cache.UpstreamReferrers{Descriptors: []v1.Descriptor{ref}}))
				must(s.PutPin(ctx, cache.Pin{Repo: k, Name: "v1", Digest: m.Digest}))
			}
			for _, d := range fake {
				must(s.Link(ctx, app, cache.LinkBlob, d, cache.OriginUpstream))
			}
			must(s.PutTag(ctx, cache.TagKey{Upstream: "up", Repo: "app", Tag: "v2"}, cache.TagEntry{Digest: m.Digest}))
			must(s.Link(ctx, app, cache.LinkBlob, pushed, cache.OriginPushed))
			must(s.Link(ctx, app, cache.LinkManifest, pushedRef.Digest, cache.OriginPushed))
			must(s.PutReferrer(ctx, cache.ReferrerKey{Upstream: "up", Repo: "app", Subject: m.Digest}, pushedRef))
			hosted := cache.RepoKey{Repo: "ci/app"}
			must(s.Link(ctx, hosted, cache.LinkBlob, layer, cache.OriginPushed))

			before, err := s.(cache.Counter).Count(ctx)
			if err != nil || before.Repositories != 5 || before.Blobs != 2 || before.Manifests != 1 || before.Tags != 5 || before.Pins != 4 {
				t.Fatalf("count before: %+v %v", before, err)
			}

			pg := s.(cache.Purger)
			if _, err := pg.PurgeRepo(ctx, hosted); !errors.Is(err, cache.ErrHosted) {
				t.Fatalf("purge of a hosted repository: %v", err)
			}
			if _, err := pg.PurgeTag(ctx, cache.TagKey{Repo: "ci/app", Tag: "v1"}); !errors.Is(err, cache.ErrHosted) {
				t.Fatalf("purge of a hosted tag: %v", err)
			}
			p, err := pg.PurgeTag(ctx, cache.TagKey{Upstream: "up", Repo: "app", Tag: "v2"})
			if err != nil || p != (cache.Purged{Tags: 1}) {
				t.Fatalf("purge tag: %+v %v", p, err)
			}
			if _, err := s.GetTag(ctx, cache.TagKey{Upstream: "up", Repo: "app", Tag: "v2"}); !errors.Is(err, cache.ErrNotFound) {
				t.Fatalf("purged tag still there: %v", err)
			}
			p, err = pg.PurgeRepo(ctx, app)
			want := cache.Purged{Tags: 1, Manifests: 1, Blobs: 301, Referrers: 1, UpstreamReferrers: 1, TagLists: 1, Pins: 1}
			if err != nil || p != want {
				t.Fatalf("purge repo: %+v %v, want %+v", p, err, want)
			}
			if _, ok, _ := s.Linked(ctx, app, cache.LinkBlob, layer); ok {
				t.Fatal("an upstream link survived")
			}
			if _, ok, _ := s.Linked(ctx, app, cache.LinkManifest, m.Digest); ok {
				t.Fatal("an upstream manifest link survived")
			}
			if _, ok, _ := s.Linked(ctx, app, cache.LinkBlob, fake[299]); ok {
				t.Fatal("a link past the first chunk survived")
			}
			if _, ok, _ := s.Linked(ctx, app, cache.LinkBlob, pushed); !ok {
				t.Fatal("a pushed link was purged")
			}
			if refs, _ := s.ListReferrers(ctx, cache.ReferrerKey{Upstream: "up", Repo: "app", Subject: m.Digest}); len(refs) != 1 || refs[0].Digest != pushedRef.Digest {
				t.Fatalf("referrers after purge: %v", refs)
			}
			if _, err := s.GetUpstreamTags(ctx, "up", "app"); !errors.Is(err, cache.ErrNotFound) {
				t.Fatal("the stored tag list survived")
			}
			if _, err := s.GetUpstreamReferrers(ctx, cache.ReferrerKey{Upstream: "up", Repo: "app", Subject: m.Digest}); !errors.Is(err, cache.ErrNotFound) {
				t.Fatal("the stored referrers answer survived")
			}
			if _, err := s.StatBlob(ctx, layer); err != nil {
				t.Fatal("content other repositories hold went")
			}
			for _, k := range others {
				if _, ok, _ := s.Linked(ctx, k, cache.LinkBlob, layer); !ok {
					t.Fatalf("%v lost its link", k)
				}
				if _, err := s.GetTag(ctx, cache.TagKey{Upstream: k.Upstream, Repo: k.Repo, Tag: "v1"}); err != nil {
					t.Fatalf("%v lost its tag", k)
				}
				if _, err := s.GetUpstreamTags(ctx, k.Upstream, k.Repo); err != nil {
					t.Fatalf("%v lost its tag list", k)
				}
			}
			if pins, _ := s.ListPins(ctx); len(pins) != 3 {
				t.Fatalf("pins after purge: %v", pins)
			}
			if p, err := pg.PurgeRepo(ctx, app); err != nil || p != (cache.Purged{}) {
				t.Fatalf("purge again: %+v %v", p, err)
			}
			after, err := s.(cache.Counter).Count(ctx)
			if err != nil || after.Repositories != 5 || after.Tags != 3 || after.Pins != 3 {
				t.Fatalf("count after: %+v %v", after, err) // app still holds its pushed content
			}
		})
	}
}

// What a purge leaves held by nothing is garbage once the grace passes.
func TestBadger_PurgeLeavesGarbage(t *testing.T) {
	b, err := cache.OpenBadger(cache.BadgerOptions{Path: t.TempDir(), CollectInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	ctx := context.Background()
	k := cache.RepoKey{Upstream: "up", Repo: "app"}
	d := writeBlob(t, b, randomBytes(5000))
	if err := b.Link(ctx, k, cache.LinkBlob, d, cache.OriginUpstream); err != nil {
		t.Fatal(err)
	}
	if c, _ := b.CollectGarbage(ctx, 0, true); len(c.Items) != 0 {
		t.Fatalf("held content is garbage: %+v", c)
	}
	if _, err := b.PurgeRepo(ctx, k); err != nil {
		t.Fatal(err)
	}
	c, err := b.CollectGarbage(ctx, 0, false)
	if err != nil || len(c.Items) != 1 || c.Items[0].Digest != d {
		t.Fatalf("after purge: %+v %v", c, err)
	}
}
