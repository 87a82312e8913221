package proxy_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/internal/metrictest"
	"github.com/ocimirror/ocimirror/internal/registrytest"
	"github.com/ocimirror/ocimirror/proxy"
	"github.com/ocimirror/ocimirror/upstream"
)

// pinnedIndex pushes app:v1 upstream, an index of two platforms, and a
// signature of the index. It returns every digest of it and its bytes.
func pinnedIndex(t *testing.T, reg *registrytest.Registry, layer int) (index digest.Digest, all map[digest.Digest][]byte) {
	t.Helper()
	all = map[digest.Digest][]byte{}
	idx := v1.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageIndex}
	for _, arch := range []string{"amd64", "arm64"} {
		img := reg.PushImage(t, "app", "v1-"+arch, layer)
		all[img.Digest] = img.Manifest
		all[digest.FromBytes(img.Config)] = img.Config
		for i, l := range img.Layers {
			all[img.LayerDigests[i]] = l
		}
		d := img.Descriptor()
		d.Platform = &v1.Platform{OS: "linux", Architecture: arch}
		idx.Manifests = append(idx.Manifests, d)
	}
	data, err := json.Marshal(idx)
	if err != nil {
		t.Fatal(err)
	}
	index = reg.PushManifest(t, "app", "v1", v1.MediaTypeImageIndex, data)
	all[index] = data
	sig := reg.PushArtifact(t, "app", v1.Descriptor{MediaType: v1.MediaTypeImageIndex, Digest: index, Size: int64(len(data))}, "application/vnd.test.signature", nil)
	reg.PushFallbackIndex(t, "app", index, sig)
	r := reg.Get("/v2/app/manifests/"+sig.Digest.String(), v1.MediaTypeImageManifest)
	sigData, _ := io.ReadAll(r.Body)
	r.Body.Close()
	all[sig.Digest] = sigData
	var m v1.Manifest
	if err := json.Unmarshal(sigData, &m); err != nil {
		t.Fatal(err)
	}
	for _, b := range append([]v1.Descriptor{m.Config}, m.Layers...) {
		r := reg.Get("/v2/app/blobs/" + b.Digest.String())
		body, _ := io.ReadAll(r.Body)
		r.Body.Close()
		all[b.Digest] = body
	}
	return index, all
}

// pullAll pulls everything of pinnedIndex through ocimirror as a client
// would: the tag, the platforms, their blobs, the referrers and theirs.
func pullAll(t *testing.T, e *env, index digest.Digest, all map[digest.Digest][]byte) {
	t.Helper()
	accept := "Accept: " + v1.MediaTypeImageIndex + ", " + v1.MediaTypeImageManifest
	expect(t, "the pinned tag", e.get("/v2/app/manifests/v1", accept), 200, all[index])
	if r, refs := e.referrersOf("/v2/app/referrers/" + index.String()); r.status != 200 || len(refs) != 1 {
		t.Fatalf("referrers of the pinned index: %d, %d", r.status, len(refs))
	}
	for d, want := range all {
		kind := "blobs"
		if isManifest(want) {
			kind = "manifests"
		}
		expect(t, kind+" "+d.String(), e.get("/v2/app/"+kind+"/"+d.String(), accept), 200, want)
	}
}

func isManifest(b []byte) bool {
	var m struct {
		SchemaVersion int `json:"schemaVersion"`
	}
	return json.Unmarshal(b, &m) == nil && m.SchemaVersion == 2
}

// A pinned image (an index, both platforms, their blobs and the index's
// signature) survives eviction under a budget that everything else
// overflows many times; and is served with the upstream down.
func TestProxy_Pin_SurvivesEviction(t *testing.T) {
	const budget = 4 << 20
	e, reg := start(t, withPins("app:v1"), withBudget(cache.Budget{MaxSize: budget, Interval: 20 * time.Millisecond}))
	index, all := pinnedIndex(t, reg, 512<<10)
	pullAll(t, e, index, all)
	var others []digest.Digest
	for i := range 30 {
		d := reg.PushBlob(t, "app", registrytest.RandomBytes(256<<10+i))
		others = append(others, d)
		expect(t, "another blob", e.get("/v2/app/blobs/"+d.String()), 200, nil)
	}
	waitFor(t, "the budget", func() bool { return float64(e.badger.Usage()) <= 0.95*budget })
	evicted := 0
	for _, d := range others {
		if _, err := e.badger.StatBlob(context.Background(), d); errors.Is(err, cache.ErrNotFound) {
			evicted++
		}
	}
	if evicted < len(others)/2 {
		t.Fatalf("%d of %d unpinned blobs were evicted", evicted, len(others))
	}
	for d := range all {
		if _, err := e.badger.StatBlob(context.Background(), d); err == nil {
			continue
		}
		if _, err := e.badger.GetManifest(context.Background(), d); err != nil {
			t.Fatalf("pinned %s was evicted: %v", d, err)
		}
	}
	// With the upstream down, the whole pinned image is still served.
	reg.Intercept(func(w http.ResponseWriter, r *http.Request) bool {
		w.WriteHeader(http.StatusServiceUnavailable)
		return true
	})
	reg.ResetCounts()
	for d, want := range all {
		kind := "blobs"
		if isManifest(want) {
			kind = "manifests"
		}
		expect(t, "pinned "+kind, e.get("/v2/app/"+kind+"/"+d.String(), "Accept: "+v1.MediaTypeImageIndex+", "+v1.MediaTypeImageManifest), 200, want)
	}
	if n := reg.Count(http.MethodGet, "blobs"); n != 0 {
		t.Fatalf("pinned blobs cost %d upstream GETs", n)
	}
}

// A full cache never fails a pull: with every stored byte pinned, a new
// blob is streamed to all its clients from one upstream GET, and stored
// nowhere.
func TestProxy_Full_StreamsWithoutStoring(t *testing.T) {
	m := metrictest.New(t)
	e, reg := start(t, withPins("app:v1"), withMeter(m.Provider))
	index, all := pinnedIndex(t, reg, 256<<10)
	pullAll(t, e, index, all)
	// The budget is what the pinned image uses: nothing can be evicted.
	e.budget = cache.Budget{MaxSize: e.badger.Usage() + 16<<10, Interval: 20 * time.Millisecond}
	e.restart()
	blobsBefore := countFiles(t, filepath.Join(e.dir, "blobs"))
	big := registrytest.RandomBytes(6 << 20)
	d := reg.PushBlob(t, "app", big)
	reg.ResetCounts()
	gate := gateBlob(t, e, reg, d, 6)
	var wg sync.WaitGroup
	for range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := e.get("/v2/app/blobs/" + d.String())
			if r.status != 200 || digest.FromBytes(r.body) != d {
				t.Errorf("a pull with the store full: status %d, %d bytes", r.status, len(r.body))
			}
		}()
	}
	gate()
	wg.Wait()
	if n := reg.Count(http.MethodGet, "blobs"); n != 1 {
		t.Fatalf("6 concurrent pulls of a blob the store has no room for cost %d upstream GETs, want 1", n)
	}
	// An operator sees them as pass-through, bytes and all.
	m.Want("ocimirror_cache_requests_total", 6, "kind=blob", "result=passthrough")
	m.Want("ocimirror_served_bytes_total", 6*float64(len(big)), "source=passthrough")
	if _, err := e.badger.StatBlob(context.Background(), d); !errors.Is(err, cache.ErrNotFound) {
		t.Fatalf("the blob was stored with the store full: %v", err)
	}
	if n := countFiles(t, filepath.Join(e.dir, "blobs")); n != blobsBefore {
		t.Fatalf("%d blob files, %d before: a full store stored something", n, blobsBefore)
	}
	if n := countFiles(t, filepath.Join(e.dir, "tmp")); n != 0 {
		t.Fatalf("%d temporary files left", n)
	}
	// A Range request is served too.
	r := e.get("/v2/app/blobs/"+d.String(), "Range: bytes=1000-1999")
	if r.status != http.StatusPartialContent || string(r.body) != string(big[1000:2000]) {
		t.Fatalf("a range with the store full: %d, %d bytes", r.status, len(r.body))
	}
	m.Want("ocimirror_cache_requests_total", 7, "kind=blob", "result=passthrough")
	m.Want("ocimirror_served_bytes_total", 6*float64(len(big))+1000, "source=passthrough")
	m.Want("ocimirror_store_budget_bytes", float64(e.budget.MaxSize))
	for dd := range all {
		if _, err := e.badger.StatBlob(context.Background(), dd); err == nil {
			continue
		}
		if _, err := e.badger.GetManifest(context.Background(), dd); err != nil {
			t.Fatalf("pinned %s went: %v", dd, err)
		}
	}
}

// An unstored fill runs at its slowest follower's pace, within a bounded
// window; a follower that reads nothing for the stall time is cut off and
// the others finish. One that comes after the window has passed its start
// gets a stream of its own.
func TestProxy_Full_SlowAndLateFollowers(t *testing.T) {
	// Long enough that a busy machine (-race, CI) never stalls a client
	// that does read.
	defer proxy.SetSpillStall(3 * time.Second)()
	e, reg := start(t, withBudget(cache.Budget{MaxSize: 1})) // never room
	big := registrytest.RandomBytes(48 << 20)
	d := reg.PushBlob(t, "app", big)
	reg.ResetCounts()

	// The stalled client reads nothing; the other reads it all.
	gate := gateBlob(t, e, reg, d, 2)
	stalledC := make(chan *http.Response, 1)
	go func() {
		resp, err := http.Get(e.ts.URL + "/v2/app/blobs/" + d.String())
		if err != nil {
			t.Error(err)
		}
		stalledC <- resp
	}()
	readC := make(chan response, 1)
	go func() { readC <- e.get("/v2/app/blobs/" + d.String()) }()
	gate()
	r := <-readC
	if r.status != 200 || digest.FromBytes(r.body) != d {
		t.Fatalf("the reading client: status %d, %d bytes", r.status, len(r.body))
	}
	stalled := <-stalledC
	if stalled == nil {
		t.FailNow()
	}
	defer stalled.Body.Close()
	if n, err := io.Copy(io.Discard, stalled.Body); err == nil && n == int64(len(big)) {
		t.Fatalf("the stalled client got the whole blob (%d bytes), which the window cannot hold", n)
	}
	if n := reg.Count(http.MethodGet, "blobs"); n != 1 {
		t.Fatalf("%d upstream GETs, want 1", n)
	}

	// A late client: the first has read well past the window.
	reg.ResetCounts()
	first, err := http.Get(e.ts.URL + "/v2/app/blobs/" + d.String())
	if err != nil {
		t.Fatal(err)
	}
	defer first.Body.Close()
	head := make([]byte, 8<<20)
	if _, err := io.ReadFull(first.Body, head); err != nil {
		t.Fatal(err)
	}
	type result struct {
		rest []byte
		err  error
	}
	firstC := make(chan result, 1)
	go func() {
		rest, err := io.ReadAll(first.Body)
		firstC <- result{rest, err}
	}()
	late := e.get("/v2/app/blobs/" + d.String())
	if late.status != 200 || digest.FromBytes(late.body) != d {
		t.Fatalf("the late client: status %d, %d bytes, %v", late.status, len(late.body), late.err)
	}
	res := <-firstC
	if res.err != nil || digest.FromBytes(append(head, res.rest...)) != d {
		t.Fatalf("the first client: %v, %d bytes", res.err, len(head)+len(res.rest))
	}
	if n := reg.Count(http.MethodGet, "blobs"); n != 2 {
		t.Fatalf("%d upstream GETs for a late client, want 2 (its own stream)", n)
	}
}

// The disk filling up (ENOSPC) during a fill: the clients still get the
// whole blob, and nothing is left on disk. Needs root for a small tmpfs.
func TestProxy_Full_DiskFull(t *testing.T) {
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", dir).CombinedOutput(); err != nil {
		if os.Getenv("OCIMIRROR_E2E_REQUIRE") != "" && os.Geteuid() == 0 {
			t.Fatalf("mounting a tmpfs: %v %s", err, out)
		}
		t.Skipf("no tmpfs to fill (needs root): %v %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", "-l", dir).Run() })
	e, reg := start(t, withDir(filepath.Join(dir, "data")), withHosted("ci/"))
	free := func() int64 {
		var st syscall.Statfs_t
		if err := syscall.Statfs(dir, &st); err != nil {
			t.Fatal(err)
		}
		return int64(st.Bavail) * st.Bsize
	}
	// Bigger than what is free: the file fills the disk part way.
	big := registrytest.RandomBytes(int(free()) + 4<<20)
	d := reg.PushBlob(t, "app", big)
	reg.ResetCounts()
	var wg sync.WaitGroup
	for range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := e.get("/v2/app/blobs/" + d.String())
			if r.status != 200 || digest.FromBytes(r.body) != d {
				t.Errorf("a pull as the disk fills: status %d, %d bytes (want %d)", r.status, len(r.body), len(big))
			}
		}()
	}
	wg.Wait()
	if n := reg.Count(http.MethodGet, "blobs"); n != 1 {
		t.Fatalf("%d upstream GETs, want 1", n)
	}
	if _, err := e.badger.StatBlob(context.Background(), d); !errors.Is(err, cache.ErrNotFound) {
		t.Fatalf("a blob that did not fit is indexed: %v", err)
	}
	waitFor(t, "the temporary file to go", func() bool { return countFiles(t, filepath.Join(e.dir, "tmp")) == 0 })
	// A push the disk has no room for is refused with 507 and an OCI
	// error, and leaves nothing behind.
	huge := registrytest.RandomBytes(int(free()) + 1<<20)
	r := e.send(http.MethodPost, "/v2/ci/app/blobs/uploads/?digest="+digest.FromBytes(huge).String(), huge)
	if r.status != http.StatusInsufficientStorage || errorCode(t, r.body) != "UNAVAILABLE" {
		t.Fatalf("a push bigger than the free space: %d %s", r.status, r.body)
	}
	waitFor(t, "the upload's file to go", func() bool { return countFiles(t, filepath.Join(e.dir, "tmp")) == 0 })
	// The disk has room again: a small blob is stored as usual.
	small := reg.PushBlob(t, "app", registrytest.RandomBytes(64<<10))
	expect(t, "a small blob after", e.get("/v2/app/blobs/"+small.String()), 200, nil)
	waitFor(t, "the small blob stored", func() bool {
		_, err := e.badger.StatBlob(context.Background(), small)
		return err == nil
	})
}

// gateBlob holds the upstream's answer to GETs of blob d until n clients
// follow ocimirror's fill of it; the returned func waits for that, then
// lets the answer go.
func gateBlob(t *testing.T, e *env, reg *registrytest.Registry, d digest.Digest, n int) func() {
	t.Helper()
	open := make(chan struct{})
	reg.Intercept(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method == http.MethodGet && r.URL.Path == "/v2/app/blobs/"+d.String() {
			<-open
		}
		return false
	})
	return func() {
		t.Helper()
		waitFor(t, strconv.Itoa(n)+" clients following the fill", func() bool { return e.srv.Followers(reg.Host, d) == n })
		close(open)
	}
}

func countFiles(t *testing.T, dir string) int {
	t.Helper()
	n := 0
	_ = filepath.Walk(dir, func(_ string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() {
			n++
		}
		return nil
	})
	return n
}

// Pins are references as clients pull them; one that names no upstream,
// or a bad tag or digest, stops start-up with its text.
func TestProxy_Pin_References(t *testing.T) {
	b, err := cache.OpenBadger(cache.BadgerOptions{Path: t.TempDir(), CollectInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	c, err := upstream.New(upstream.Options{Name: "ghcr.io", URL: "http://127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		pin string
		ok  bool
	}{
		{"ghcr.io/org/app:v1", true},
		{"GHCR.io/org/app@sha256:" + strings.Repeat("a", 64), true},
		{"ghcr.io/org/app:v1@sha256:" + strings.Repeat("a", 64), true},
		{"ghcr.io/org/app", true}, // latest
		{"ci/app:v1", true},       // hosted
		{"quay.io/org/app:v1", false},
		{"app:v1", false}, // no default upstream
		{"ghcr.io/org/app:-bad", false},
		{"ghcr.io/org/app@sha256:zz", false},
		{"ghcr.io/Org/App:v1", false},
		{"", false},
	} {
		_, err := proxy.New(proxy.Options{Store: b, Upstreams: []proxy.Upstream{{Client: c}}, Hosted: []string{"ci/"}, Pins: []string{tc.pin}})
		if (err == nil) != tc.ok {
			t.Errorf("pin %q: %v", tc.pin, err)
		} else if err != nil && !strings.Contains(err.Error(), tc.pin) {
			t.Errorf("pin %q: the error does not name it: %v", tc.pin, err)
		}
	}
}

// Many clients join an unstored fill at random moments, some with ranges:
// every one gets exactly its bytes (from the shared window, or a stream of
// its own when it came too late), never a byte of another offset.
func TestProxy_Full_ManyFollowersExactBytes(t *testing.T) {
	e, reg := start(t, withBudget(cache.Budget{MaxSize: 1})) // never room
	big := registrytest.RandomBytes(24 << 20)
	d := reg.PushBlob(t, "app", big)
	var wg sync.WaitGroup
	for i := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(time.Duration(i%5) * 15 * time.Millisecond)
			var hdr []string
			from, to := 0, len(big)
			if i%2 == 1 {
				from = (i * 1_234_567) % len(big)
				to = min(len(big), from+(i+1)*700_001)
				hdr = []string{"Range: bytes=" + strconv.Itoa(from) + "-" + strconv.Itoa(to-1)}
			}
			r := e.get("/v2/app/blobs/"+d.String(), hdr...)
			if (r.status != 200 && r.status != 206) || !bytes.Equal(r.body, big[from:to]) {
				t.Errorf("client %d, bytes %d-%d: status %d, %d bytes, equal %v", i, from, to, r.status, len(r.body), bytes.Equal(r.body, big[from:to]))
			}
		}()
	}
	wg.Wait()
	t.Logf("16 clients, %d upstream GETs", reg.Count(http.MethodGet, "blobs"))
}
