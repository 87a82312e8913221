package proxy_test

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/internal/registrytest"
	"github.com/ocimirror/ocimirror/proxy"
)

// sync: the mirror keeps the tags a rule picks warm by itself (highest
// versions in the range, at most MaxTags), with their blobs and
// referrers; a new matching tag upstream is fetched at the next interval;
// what it synced is pinned, so a budget that everything else overflows
// keeps it; and with the upstream down it is all served.
func TestProxy_Sync(t *testing.T) {
	reg := registrytest.New(t)
	imgs := map[string]registrytest.Image{}
	for _, tag := range []string{"1.0.0", "1.1.0", "1.2.0", "2.0.0", "latest", "1.1.0-rc1"} {
		imgs[tag] = reg.PushImage(t, "app", tag, 64<<10)
	}
	sig := reg.PushArtifact(t, "app", imgs["1.2.0"].Descriptor(), "application/vnd.test.sig", nil)
	reg.PushFallbackIndex(t, "app", imgs["1.2.0"].Digest, sig)

	const budget = 4 << 20
	e, _ := start(t, withUpstream(upstreamDef{name: reg.Host, reg: reg}), withDefault(reg.Host),
		withBudget(cache.Budget{MaxSize: budget, Interval: 20 * time.Millisecond}),
		withSync(proxy.SyncRule{Repository: reg.Host + "/app", Semver: ">=1.1.0, <3", MaxTags: 2, Interval: 300 * time.Millisecond}))
	held := func(d digest.Digest) bool {
		_, err := e.badger.StatBlob(context.Background(), d)
		return err == nil
	}
	waitFor(t, "2.0.0 and 1.2.0 synced", func() bool {
		return held(imgs["2.0.0"].LayerDigests[0]) && held(imgs["1.2.0"].LayerDigests[0])
	})
	waitFor(t, "the signature of 1.2.0 synced", func() bool {
		_, err := e.badger.GetManifest(context.Background(), sig.Digest)
		return err == nil
	})
	for _, tag := range []string{"1.0.0", "1.1.0", "latest", "1.1.0-rc1"} {
		if held(imgs[tag].LayerDigests[0]) {
			t.Errorf("tag %s synced: not picked by the rule", tag)
		}
	}
	// A new version upstream: fetched at the next interval; 1.2.0 leaves
	// the picks (it stays cached, no longer pinned).
	next := reg.PushImage(t, "app", "2.1.0", 64<<10)
	waitFor(t, "2.1.0 synced", func() bool { return held(next.LayerDigests[0]) })

	// Everything else overflows the budget many times; the synced images stay.
	for i := range 30 {
		d := reg.PushBlob(t, "other", registrytest.RandomBytes(256<<10+i))
		expect(t, "another blob", e.get("/v2/other/blobs/"+d.String()), 200, nil)
	}
	waitFor(t, "the budget", func() bool { return float64(e.badger.Usage()) <= 0.95*budget })
	for _, img := range []registrytest.Image{next, imgs["2.0.0"]} {
		if !held(img.LayerDigests[0]) || !held(digest.FromBytes(img.Config)) {
			t.Fatalf("a synced image %s was evicted", img.Digest)
		}
	}
	reg.Close()
	e.clock.Advance(time.Hour)
	expect(t, "synced tag, upstream down", e.get("/v2/app/manifests/2.1.0"), 200, next.Manifest)
	expect(t, "synced layer, upstream down", e.get("/v2/app/blobs/"+next.LayerDigests[0].String()), 200, next.Layers[0])
	if r := e.get("/v2/app/manifests/1.0.0"); r.status == http.StatusOK {
		t.Fatalf("1.0.0 was never synced, yet served with the upstream down")
	}
}

// With access control, sync still pulls what it keeps warm (its own
// requests carry the process's secret, on its internal listener only),
// while clients stay bound by the rules.
func TestProxy_Sync_WithAuth(t *testing.T) {
	reg := registrytest.New(t)
	img := reg.PushImage(t, "private/app", "1.0.0", 64<<10)
	e, _ := start(t, withUpstream(upstreamDef{name: reg.Host, reg: reg}), withDefault(reg.Host), withAuth(newAuth(t, reg.Host)),
		withSync(proxy.SyncRule{Repository: reg.Host + "/private/app", Interval: time.Hour}))
	waitFor(t, "1.0.0 synced", func() bool {
		_, err := e.badger.StatBlob(context.Background(), img.LayerDigests[0])
		return err == nil
	})
	if r := e.get("/v2/private/app/manifests/1.0.0"); r.status != http.StatusUnauthorized {
		t.Fatalf("an anonymous client reads a synced private image: %d", r.status)
	}
	if r := e.get("/v2/private/app/manifests/1.0.0", basic("bob")); r.status != http.StatusForbidden {
		t.Fatalf("bob reads a synced private image: %d", r.status)
	}
	expect(t, "root reads it", e.get("/v2/private/app/manifests/1.0.0", basic("root")), 200, img.Manifest)
}

// Rules that cannot work stop start-up, naming the rule.
func TestProxy_Sync_BadRules(t *testing.T) {
	b, err := cache.OpenBadger(cache.BadgerOptions{Path: t.TempDir(), CollectInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	reg := registrytest.New(t)
	e, _ := start(t, withUpstream(upstreamDef{name: reg.Host, reg: reg}), withDefault(reg.Host))
	for _, r := range []proxy.SyncRule{
		{Repository: "ci/app"}, // hosted
		{Repository: reg.Host + "/app:v1"},
		{Repository: reg.Host + "/app", Tags: "("},
		{Repository: reg.Host + "/app", Semver: "not a range"},
		{Repository: reg.Host + "/app", Platforms: []string{"amd64"}},
	} {
		_, err := proxy.New(proxy.Options{Store: b, Upstreams: []proxy.Upstream{{Client: e.clients[reg.Host]}}, Hosted: []string{"ci/"},
			DefaultUpstream: reg.Host, Sync: []proxy.SyncRule{r}})
		if err == nil || !strings.Contains(err.Error(), r.Repository) {
			t.Errorf("sync rule %+v: %v", r, err)
		}
	}
}
