package proxy_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/internal/registrytest"
)

// duOf is what du counts for a directory: the blocks its files use.
func duOf(t *testing.T, dir string) int64 {
	t.Helper()
	var n int64
	_ = filepath.Walk(dir, func(_ string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() {
			if st, ok := info.Sys().(*syscall.Stat_t); ok {
				n += st.Blocks * 512
			}
		}
		return nil
	})
	return n
}

// Eviction under load: readers pull far more distinct content than the
// budget holds. None gets a truncated or wrong blob; after the passes the
// data directory is under the budget; hosted content survives.
func TestProxy_Evict_UnderLoad(t *testing.T) {
	const budget = 4 << 20
	e, reg := start(t, withHosted("ci/"), withPins("pinned:v1"), withBudget(cache.Budget{MaxSize: budget, Interval: 20 * time.Millisecond}))
	keep := e.pushImage("ci/keep", "v1")
	pinned := reg.PushImage(t, "pinned", "v1", 300<<10)
	expect(t, "pinned image", e.get("/v2/pinned/manifests/v1"), 200, pinned.Manifest)
	expect(t, "pinned layer", e.get("/v2/pinned/blobs/"+pinned.LayerDigests[0].String()), 200, pinned.Layers[0])
	expect(t, "pinned config", e.get("/v2/pinned/blobs/"+digest.FromBytes(pinned.Config).String()), 200, pinned.Config)
	var blobs []digest.Digest
	for i := range 40 {
		blobs = append(blobs, reg.PushBlob(t, "app", registrytest.RandomBytes(256<<10+i)))
	}
	var wrong, ok atomic.Int32
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for round := range 3 {
				for i := range blobs {
					d := blobs[(i+w*10+round*7)%len(blobs)]
					resp, err := http.Get(e.ts.URL + "/v2/app/blobs/" + d.String())
					if err != nil {
						wrong.Add(1)
						continue
					}
					h := sha256.New()
					n, err := io.Copy(h, resp.Body)
					resp.Body.Close()
					if err != nil || resp.StatusCode != 200 || "sha256:"+hex.EncodeToString(h.Sum(nil)) != d.String() || n != resp.ContentLength {
						wrong.Add(1)
						t.Errorf("pull of %s: status %d, %d of %d bytes, err %v", d, resp.StatusCode, n, resp.ContentLength, err)
						continue
					}
					ok.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	if n := wrong.Load(); n != 0 {
		t.Fatalf("%d pulls failed or were wrong (%d right)", n, ok.Load())
	}
	waitFor(t, "the budget", func() bool { return float64(e.badger.Usage()) <= 0.95*budget })
	if du := duOf(t, e.dir); du > budget {
		t.Fatalf("the data directory holds %d bytes, over the budget of %d", du, budget)
	}
	expect(t, "hosted image", e.get("/v2/ci/keep/manifests/v1"), 200, keep.manifest)
	expect(t, "hosted layer", e.get("/v2/ci/keep/blobs/"+keep.layerD.String()), 200, keep.layer)
	for _, d := range []digest.Digest{pinned.LayerDigests[0], digest.FromBytes(pinned.Config)} {
		if _, err := e.badger.StatBlob(context.Background(), d); err != nil {
			t.Fatalf("pinned blob %s was evicted: %v", d, err)
		}
	}
	// Evicted content comes back on its next request.
	reg.ResetCounts()
	r := e.get("/v2/app/blobs/" + blobs[0].String())
	if r.status != 200 || digest.FromBytes(r.body) != blobs[0] {
		t.Fatalf("an evicted blob: %d", r.status)
	}
	t.Logf("%d verified pulls; usage %d of %d; upstream GETs for the last: %d", ok.Load(), e.badger.Usage(), budget,
		reg.Count(http.MethodGet, "blobs"))
}

// Deleting hosted content really frees disk: once the grace period has
// passed, a collection gives the deleted bytes back.
func TestProxy_GC_DeleteFreesDisk(t *testing.T) {
	e, _ := start(t, withHosted("ci/"))
	big := registrytest.RandomBytes(4 << 20)
	d := e.pushBlob("ci/app", big)
	keep := e.pushImage("ci/keep", "v1")
	expect(t, "delete", e.do(http.MethodDelete, "/v2/ci/app/blobs/"+d.String()), 202, nil)
	before := duOf(t, e.dir)
	e.clock.Advance(25 * time.Hour)
	c, err := e.badger.CollectGarbage(context.Background(), 24*time.Hour, false)
	if err != nil {
		t.Fatal(err)
	}
	if freed := before - duOf(t, e.dir); freed < 4<<20-64<<10 { // the database writes a little meanwhile
		t.Fatalf("the collection freed %d bytes of disk (%+v)", freed, c)
	}
	expect(t, "kept image", e.get("/v2/ci/keep/manifests/v1"), 200, keep.manifest)
	expect(t, "kept layer", e.get("/v2/ci/keep/blobs/"+keep.layerD.String()), 200, keep.layer)
}

// A pin kept in the store (an imported image's) keeps the image it names
// in its repository: the manifest, config, layers and referrers.
func TestProxy_Pinned_StorePins(t *testing.T) {
	e, reg := start(t)
	ctx := context.Background()
	img := reg.PushImage(t, "team/app", "v1", 1000)
	sbom := reg.PushArtifact(t, "team/app", img.Descriptor(), "application/vnd.test.sbom", nil)
	reg.PushFallbackIndex(t, "team/app", img.Digest, sbom)
	expect(t, "image", e.get("/v2/team/app/manifests/v1"), 200, img.Manifest)
	for _, d := range []digest.Digest{img.LayerDigests[0], digest.FromBytes(img.Config)} {
		expect(t, "blob", e.get("/v2/team/app/blobs/"+d.String()), 200, nil)
	}
	expect(t, "referrers", e.get("/v2/team/app/referrers/"+img.Digest.String()), 200, nil)
	expect(t, "sbom", e.get("/v2/team/app/manifests/"+sbom.Digest.String()), 200, nil)
	want := []digest.Digest{img.Digest, img.LayerDigests[0], digest.FromBytes(img.Config), sbom.Digest}

	pinned, err := e.srv.Pinned(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range want {
		if _, ok := pinned[d]; ok {
			t.Fatalf("%s is pinned before any pin names it", d)
		}
	}
	if err := e.store.PutPin(ctx, cache.Pin{Repo: cache.RepoKey{Upstream: reg.Host, Repo: "team/app"}, Name: "v1", Digest: img.Digest, At: e.clock.Now()}); err != nil {
		t.Fatal(err)
	}
	if pinned, err = e.srv.Pinned(ctx); err != nil {
		t.Fatal(err)
	}
	for _, d := range want {
		if _, ok := pinned[d]; !ok {
			t.Errorf("%s is not pinned by the store's pin", d)
		}
	}
}
