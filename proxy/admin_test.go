package proxy_test

import (
	"context"
	"errors"
	"net/http"
	"testing"
	"time"

	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/proxy"
)

// A purged tag is asked of the upstream at the next request, within its
// TTL: a tag moved upstream is seen at once, with the new bytes.
func TestProxy_Purge_Tag(t *testing.T) {
	e, reg := start(t)
	old := reg.PushImage(t, "app", "v1", 1000)
	accept := "Accept: " + v1.MediaTypeImageManifest
	expect(t, "warm", e.get("/v2/app/manifests/v1", accept), 200, old.Manifest)
	moved := reg.PushImage(t, "app", "v1", 1000)
	reg.ResetCounts()
	expect(t, "within the TTL", e.get("/v2/app/manifests/v1", accept), 200, old.Manifest)
	if n := reg.Total(); n != 0 {
		t.Fatalf("%d upstream requests within the TTL", n)
	}

	res, err := e.srv.Purge(context.Background(), reg.Host+"/app:v1")
	if err != nil || res.Dropped != (cache.Purged{Tags: 1}) || res.Upstream != reg.Host || res.Repository != "app" || res.Tag != "v1" {
		t.Fatalf("purge: %+v %v", res, err)
	}
	expect(t, "after the purge", e.get("/v2/app/manifests/v1", accept), 200, moved.Manifest)
	if n := reg.Count(http.MethodGet, "manifests"); n != 1 {
		t.Fatalf("%d manifest GETs upstream after the purge, want 1", n)
	}
	// The old image's content stays for its digest (the repository holds it).
	reg.ResetCounts()
	expect(t, "old by digest", e.get("/v2/app/manifests/"+old.Digest.String(), accept), 200, old.Manifest)
	if n := reg.Total(); n != 0 {
		t.Fatalf("%d upstream requests for content the repository holds", n)
	}
	// Something never cached: nothing dropped, no error.
	if res, err := e.srv.Purge(context.Background(), "app:nope"); err != nil || res.Dropped != (cache.Purged{}) {
		t.Fatalf("purge of what is not cached: %+v %v", res, err)
	}
}

// A purged repository asks the upstream again for its manifests and
// blobs by digest, and its tag list; another repository holding the same
// blob keeps serving it from the store.
func TestProxy_Purge_Repository(t *testing.T) {
	e, reg := start(t)
	img := reg.PushImage(t, "app", "v1", 3000)
	reg.PushBlob(t, "other", img.Layers[0])
	accept := "Accept: " + v1.MediaTypeImageManifest
	layer := "/blobs/" + img.LayerDigests[0].String()
	expect(t, "warm manifest", e.get("/v2/app/manifests/"+img.Digest.String(), accept), 200, img.Manifest)
	expect(t, "warm tag", e.get("/v2/app/manifests/v1", accept), 200, img.Manifest)
	expect(t, "warm layer", e.get("/v2/app"+layer), 200, img.Layers[0])
	expect(t, "warm other", e.get("/v2/other"+layer), 200, img.Layers[0])
	expect(t, "warm tag list", e.get("/v2/app/tags/list"), 200, nil)
	reg.ResetCounts()
	expect(t, "hit", e.get("/v2/app"+layer), 200, img.Layers[0])
	expect(t, "tag list hit", e.get("/v2/app/tags/list"), 200, nil)
	if n := reg.Total(); n != 0 {
		t.Fatalf("%d upstream requests when warm", n)
	}

	res, err := e.srv.Purge(context.Background(), "app")
	want := cache.Purged{Tags: 1, Manifests: 1, Blobs: 1, TagLists: 1} // the config was never pulled
	if err != nil || res.Dropped != want || res.Tag != "" {
		t.Fatalf("purge: %+v %v, want %+v", res, err, want)
	}
	expect(t, "manifest by digest", e.get("/v2/app/manifests/"+img.Digest.String(), accept), 200, img.Manifest)
	if n := reg.Count(http.MethodGet, "manifests"); n != 1 {
		t.Fatalf("%d manifest GETs upstream, want 1", n)
	}
	expect(t, "layer", e.get("/v2/app"+layer), 200, img.Layers[0])
	if n := reg.Count(http.MethodGet, "blobs") + reg.Count(http.MethodHead, "blobs"); n != 1 {
		t.Fatalf("%d blob requests upstream, want 1", n)
	}
	expect(t, "tag list", e.get("/v2/app/tags/list"), 200, nil)
	if n := reg.Count(http.MethodGet, "tags"); n != 1 {
		t.Fatalf("%d tag list GETs upstream, want 1", n)
	}
	reg.ResetCounts()
	expect(t, "other repository", e.get("/v2/other"+layer), 200, img.Layers[0])
	expect(t, "warm again", e.get("/v2/app/manifests/"+img.Digest.String(), accept), 200, img.Manifest)
	if n := reg.Total(); n != 0 {
		t.Fatalf("%d upstream requests after the refill", n)
	}
}

// Hosted content is never purged, and bad references are refused.
func TestProxy_Purge_Refused(t *testing.T) {
	e, reg := start(t, withHosted("ci/"))
	img := e.pushImage("ci/app", "v1")
	ctx := context.Background()
	for _, ref := range []string{"ci/app", "ci/app:v1", "ci/app/sub"} {
		if _, err := e.srv.Purge(ctx, ref); !errors.Is(err, proxy.ErrPurgeHosted) {
			t.Errorf("purge %s: %v", ref, err)
		}
	}
	for _, ref := range []string{"nowhere.example/app:v1", "app@" + img.digest.String(), "App:v1", "app:-bad", "", reg.Host + "/"} {
		if _, err := e.srv.Purge(ctx, ref); !errors.Is(err, proxy.ErrPurgeInvalid) {
			t.Errorf("purge %q: %v", ref, err)
		}
	}
	expect(t, "hosted tag", e.get("/v2/ci/app/manifests/v1"), 200, img.manifest)
	expect(t, "hosted blob", e.get("/v2/ci/app/blobs/"+img.layerD.String()), 200, img.layer)
}

// With the upstream down, a warm tag past its TTL is served stale; once
// purged, it is a miss, and fails as a miss does (502).
func TestProxy_Purge_UpstreamDown(t *testing.T) {
	e, reg := start(t)
	img := reg.PushImage(t, "app", "v1", 100)
	accept := "Accept: " + v1.MediaTypeImageManifest
	expect(t, "warm", e.get("/v2/app/manifests/v1", accept), 200, img.Manifest)
	reg.Close()
	e.clock.Advance(time.Hour)
	expect(t, "stale", e.get("/v2/app/manifests/v1", accept), 200, img.Manifest)
	if _, err := e.srv.Purge(context.Background(), "app"); err != nil {
		t.Fatal(err)
	}
	r := e.get("/v2/app/manifests/v1", accept)
	if r.status != http.StatusBadGateway || errorCode(t, r.body) != "UNAVAILABLE" {
		t.Fatalf("after the purge: %d %s", r.status, r.body)
	}
	r = e.get("/v2/app/blobs/" + img.LayerDigests[0].String())
	if r.status != http.StatusBadGateway {
		t.Fatalf("blob after the purge: %d %s", r.status, r.body)
	}
}

// Pins lists the configuration's pins with what they resolve to, and the
// store's; PinnedBytes sums the sizes of what they keep, once each.
func TestProxy_PinsAndPinnedBytes(t *testing.T) {
	e, reg := start(t, withPins("app:v1", "app:never"))
	img := reg.PushImage(t, "app", "v1", 1000, 2000)
	reg.PushImage(t, "app", "v2", 500)
	expect(t, "warm", e.get("/v2/app/manifests/v1"), 200, img.Manifest)
	for _, d := range img.LayerDigests {
		expect(t, "warm layer", e.get("/v2/app/blobs/"+d.String()), 200, nil)
	}
	// A client has its last byte once the blob is checked; the store has
	// it once the fill has committed.
	waitFor(t, "the fills to commit", func() bool { return e.srv.FillsRunning() == 0 })
	ctx := context.Background()
	k := cache.RepoKey{Upstream: reg.Host, Repo: "app"}
	if err := e.store.PutPin(ctx, cache.Pin{Repo: k, Name: "v1", Digest: img.Digest, At: time.Unix(1000, 0)}); err != nil {
		t.Fatal(err)
	}
	pins, err := e.srv.Pins(ctx)
	if err != nil || len(pins) != 3 {
		t.Fatalf("pins: %+v %v", pins, err)
	}
	if p := pins[0]; p.Ref != "app:v1" || p.Source != "config" || p.Digest != img.Digest || p.Repository != "app" || p.Tag != "v1" {
		t.Errorf("config pin: %+v", p)
	}
	if p := pins[1]; p.Ref != "app:never" || p.Digest != "" {
		t.Errorf("pin of a tag never pulled: %+v", p)
	}
	if p := pins[2]; p.Ref != reg.Host+"/app:v1" || p.Source != "import" || p.Digest != img.Digest || !p.At.Equal(time.Unix(1000, 0)) {
		t.Errorf("store pin: %+v", p)
	}
	// The config is not fetched by a pull of the layers: only what is stored counts.
	n, err := e.srv.PinnedBytes(ctx)
	if want := int64(len(img.Manifest) + 1000 + 2000); err != nil || n != want {
		t.Fatalf("pinned bytes %d %v, want %d", n, err, want)
	}
}
