package proxy_test

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/cache/s3"
	"github.com/ocimirror/ocimirror/cluster"
	"github.com/ocimirror/ocimirror/internal/registrytest"
	"github.com/ocimirror/ocimirror/internal/weedtest"
)

// replicaSet is n ocimirror replicas sharing a bucket of a real
// SeaweedFS, in front of one upstream, with hosted ci/.
type replicaSet struct {
	t      testing.TB
	reg    *registrytest.Registry
	bucket *s3.Store
	addrs  []string
	envs   []*env
}

func freeAddrs(t testing.TB, n int) []string {
	t.Helper()
	var out []string
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, ln.Addr().String())
		ln.Close()
	}
	return out
}

func startReplicas(t testing.TB, w *weedtest.Weed, n int, opts ...registrytest.Option) *replicaSet {
	t.Helper()
	// One bucket, a prefix per test: weed's first write to a new bucket
	// waits seconds for its volumes to grow.
	b, err := s3.New(s3.Config{Endpoint: w.S3, Bucket: w.Bucket, Region: "us-east-1", PathStyle: true})
	if err != nil {
		t.Fatal(err)
	}
	bucket := b.Sub(strings.NewReplacer("/", "-").Replace(t.Name()) + "/")
	rs := &replicaSet{t: t, reg: registrytest.New(t, opts...), bucket: bucket, addrs: freeAddrs(t, n)}
	for _, addr := range rs.addrs {
		e, _ := start(t, withUpstream(upstreamDef{name: rs.reg.Host, reg: rs.reg}), withDefault(rs.reg.Host), withHosted("ci/"),
			withShared(bucket), withCluster(addr, rs.addrs, "cluster-secret-for-tests"))
		rs.envs = append(rs.envs, e)
	}
	return rs
}

// owner returns the index of the replica that owns d, and the others in
// the order they take over.
func (rs *replicaSet) rank(d digest.Digest) []int {
	members := make([]string, len(rs.addrs))
	for i, a := range rs.addrs {
		members[i] = "http://" + a
	}
	var out []int
	for _, m := range cluster.Rank(members, d) {
		out = append(out, slices.Index(members, m))
	}
	return out
}

// waitShared waits until the bucket holds blob d (a replica uploads it
// after its fill commits).
func (rs *replicaSet) waitShared(d digest.Digest) {
	rs.t.Helper()
	for range 200 {
		if _, err := rs.bucket.Sub("cache/").Stat(context.Background(), d); err == nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	rs.t.Fatalf("blob %s never reached the shared tier", d)
}

// TestCluster runs replicas of ocimirror over one real SeaweedFS (it
// takes about 10 s to start): each subtest has a bucket of its own.
func TestCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("starts SeaweedFS")
	}
	w := weedtest.Start(t)

	// Clients of every replica pulling one uncached blob at once: one
	// upstream GET for the whole cluster, every byte right; then the
	// blob is in the shared tier.
	t.Run("Stampede", func(t *testing.T) {
		rs := startReplicas(t, w, 3)
		data := registrytest.RandomBytes(8 << 20)
		d := rs.reg.PushBlob(t, "team/app", data)
		rs.reg.ResetCounts()
		var wg sync.WaitGroup
		res := make([]response, 12)
		for i := range res {
			wg.Go(func() { res[i] = rs.envs[i%3].get("/v2/team/app/blobs/" + d.String()) })
		}
		wg.Wait()
		for i, r := range res {
			if r.status != 200 || r.err != nil || digest.FromBytes(r.body) != d {
				t.Fatalf("client %d (replica %d): %d, %d bytes of %s, %v", i, i%3, r.status, len(r.body), digest.FromBytes(r.body), r.err)
			}
		}
		if n := rs.reg.Count(http.MethodGet, "blobs"); n != 1 {
			t.Errorf("upstream blob GETs = %d, want 1 for 12 clients over 3 replicas", n)
		}
		rs.waitShared(d)
	})

	// A call between replicas with a wrong secret is refused, before any
	// upstream request.
	t.Run("WrongSecret", func(t *testing.T) {
		rs := startReplicas(t, w, 2)
		d := rs.reg.PushBlob(t, "team/app", registrytest.RandomBytes(1000))
		rs.reg.ResetCounts()
		r := rs.envs[0].get("/v2/team/app/blobs/"+d.String(), cluster.HeaderSecret+": not-the-secret", cluster.HeaderPeer+": http://"+rs.addrs[1])
		if r.status != 401 || !strings.Contains(string(r.body), `"code":"UNAUTHORIZED"`) {
			t.Errorf("wrong secret: %d %s", r.status, r.body)
		}
		if n := rs.reg.Total(); n != 0 {
			t.Errorf("upstream requests = %d, want 0", n)
		}
	})

	// With the owner gone, the replica ranked next fills from the
	// upstream, and the third streams from it: still one upstream GET.
	t.Run("OwnerDown", func(t *testing.T) {
		rs := startReplicas(t, w, 3)
		data := registrytest.RandomBytes(4 << 20)
		d := rs.reg.PushBlob(t, "team/app", data)
		rank := rs.rank(d)
		rs.envs[rank[0]].close()
		rs.reg.ResetCounts()
		var wg sync.WaitGroup
		res := make([]response, 6)
		for i := range res {
			wg.Go(func() { res[i] = rs.envs[rank[1+i%2]].get("/v2/team/app/blobs/" + d.String()) })
		}
		wg.Wait()
		for i, r := range res {
			if r.status != 200 || digest.FromBytes(r.body) != d {
				t.Fatalf("client %d: %d, %d bytes", i, r.status, len(r.body))
			}
		}
		if n := rs.reg.Count(http.MethodGet, "blobs"); n != 1 {
			t.Errorf("upstream blob GETs = %d, want 1", n)
		}
	})

	// The owner dies mid-fill (its connections cut, as kill -9 does):
	// the other replicas' clients complete with the right bytes, the
	// replica ranked next resuming from the upstream where the owner
	// left off. At most one upstream GET more.
	t.Run("OwnerKilledMidFill", func(t *testing.T) {
		rs := startReplicas(t, w, 3, registrytest.WithMiddleware(slowBlobs))
		data := registrytest.RandomBytes(16 << 20)
		d := rs.reg.PushBlob(t, "team/app", data)
		rank := rs.rank(d)
		rs.reg.ResetCounts()
		var wg sync.WaitGroup
		res := make([]response, 6)
		for i := range res {
			wg.Go(func() { res[i] = rs.envs[rank[1+i%2]].get("/v2/team/app/blobs/" + d.String()) })
		}
		owner := rs.envs[rank[0]]
		waitFor(t, "the owner's fill", func() bool { return rs.reg.Count(http.MethodGet, "blobs") > 0 })
		time.Sleep(300 * time.Millisecond)
		owner.ts.Listener.Close()
		owner.ts.CloseClientConnections()
		wg.Wait()
		for i, r := range res {
			if r.status != 200 || r.err != nil || digest.FromBytes(r.body) != d {
				t.Fatalf("client %d (replica %d): %d, %d bytes of %s, %v", i, rank[1+i%2], r.status, len(r.body), digest.FromBytes(r.body), r.err)
			}
		}
		if n := rs.reg.Count(http.MethodGet, "blobs"); n < 1 || n > 2 {
			t.Errorf("upstream blob GETs = %d, want 1 or 2", n)
		}
	})

	// A replica whose local tier is empty serves from the shared tier:
	// no upstream GET of a manifest or blob by digest.
	t.Run("EmptyLocalDisks", func(t *testing.T) {
		rs := startReplicas(t, w, 3)
		img := rs.reg.PushImage(t, "team/app", "v1", 3<<20, 1000)
		for i, e := range rs.envs {
			expect(t, fmt.Sprint("manifest via ", i), e.get("/v2/team/app/manifests/v1", "Accept: "+v1.MediaTypeImageManifest), 200, img.Manifest)
		}
		for j, l := range img.Layers {
			expect(t, "layer", rs.envs[j%3].get("/v2/team/app/blobs/"+img.LayerDigests[j].String()), 200, l)
			rs.waitShared(img.LayerDigests[j])
		}
		for _, e := range rs.envs {
			e.restartEmpty(t)
		}
		rs.reg.ResetCounts()
		for i, e := range rs.envs {
			expect(t, "manifest by digest", e.get("/v2/team/app/manifests/"+img.Digest.String(), "Accept: "+v1.MediaTypeImageManifest), 200, img.Manifest)
			for j, l := range img.Layers {
				expect(t, fmt.Sprintf("layer %d via replica %d", j, i), e.get("/v2/team/app/blobs/"+img.LayerDigests[j].String()), 200, l)
			}
			expect(t, "manifest by tag", e.get("/v2/team/app/manifests/v1", "Accept: "+v1.MediaTypeImageManifest), 200, img.Manifest)
		}
		for _, kind := range []string{"blobs", "manifests"} {
			if n := rs.reg.Count(http.MethodGet, kind); n != 0 {
				t.Errorf("upstream %s GETs after the restart on empty disks = %d, want 0", kind, n)
			}
		}
	})

	// Hosted repositories: what is pushed through one replica is pulled
	// through any other at once; tags, referrers and deletes too.
	t.Run("Hosted", func(t *testing.T) {
		rs := startReplicas(t, w, 3)
		a, b, c := rs.envs[0], rs.envs[1], rs.envs[2]
		img := a.pushImage("ci/app", "v1")
		expect(t, "manifest by tag via another replica", c.get("/v2/ci/app/manifests/v1", "Accept: "+v1.MediaTypeImageManifest), 200, img.manifest)
		expect(t, "layer via another replica", c.get("/v2/ci/app/blobs/"+img.layerD.String()), 200, img.layer)
		expect(t, "tag list", b.get("/v2/ci/app/tags/list"), 200, []byte(`{"name":"ci/app","tags":["v1"]}`))

		subject := v1.Descriptor{MediaType: v1.MediaTypeImageManifest, Digest: img.digest, Size: int64(len(img.manifest))}
		r, art := b.pushArtifact("ci/app", subject, "application/vnd.test.sbom", nil)
		expect(t, "attach via replica 2", r, 201, nil)
		_, got := a.referrersOf("/v2/ci/app/referrers/" + img.digest.String())
		if len(got) != 1 || got[0].Digest != art.Digest || got[0].ArtifactType != "application/vnd.test.sbom" {
			t.Fatalf("referrers via replica 1 = %+v, want the artifact %s", got, art.Digest)
		}

		// Concurrent pushes of one tag through two replicas: one wins,
		// and every replica says the same.
		for round := range 5 {
			var wg sync.WaitGroup
			imgs := make([]pushedImage, 2)
			for i := range 2 {
				wg.Go(func() { imgs[i] = rs.envs[i].pushImage("ci/race", "latest") })
			}
			wg.Wait()
			var first []byte
			for i, e := range rs.envs {
				r := e.get("/v2/ci/race/manifests/latest", "Accept: "+v1.MediaTypeImageManifest)
				if r.status != 200 {
					t.Fatalf("round %d, replica %d: %d %s", round, i, r.status, r.body)
				}
				if first == nil {
					first = r.body
				} else if string(first) != string(r.body) {
					t.Fatalf("round %d: replicas disagree on ci/race:latest", round)
				}
			}
			if string(first) != string(imgs[0].manifest) && string(first) != string(imgs[1].manifest) {
				t.Fatalf("round %d: ci/race:latest is neither pushed manifest", round)
			}
		}

		// An upload session opened on one replica, continued and closed
		// through the others (a balancer without affinity).
		data := registrytest.RandomBytes(100 << 10)
		d := digest.FromBytes(data)
		r = a.send(http.MethodPost, "/v2/ci/app/blobs/uploads/", nil)
		expect(t, "POST upload via replica 1", r, 202, nil)
		loc := r.header.Get("Location")
		r = b.send(http.MethodPatch, loc, data[:50<<10], "Content-Type: application/octet-stream")
		expect(t, "PATCH via replica 2", r, 202, nil)
		if got := r.header.Get("Range"); got != "0-51199" {
			t.Errorf("PATCH via replica 2: Range %q", got)
		}
		put := r.header.Get("Location")
		if strings.Contains(put, "?") {
			put += "&digest=" + d.String()
		} else {
			put += "?digest=" + d.String()
		}
		r = c.send(http.MethodPut, put, data[50<<10:], "Content-Type: application/octet-stream")
		expect(t, "PUT via replica 3", r, 201, nil)
		for i, e := range rs.envs {
			expect(t, fmt.Sprint("chunked blob via replica ", i), e.get("/v2/ci/app/blobs/"+d.String()), 200, data)
		}

		// A manifest deleted through one replica is gone through all,
		// with its tag.
		expect(t, "delete via replica 3", c.do(http.MethodDelete, "/v2/ci/app/manifests/"+img.digest.String()), 202, nil)
		for i, e := range rs.envs {
			if r := e.get("/v2/ci/app/manifests/v1"); r.status != 404 {
				t.Errorf("replica %d: deleted tag answers %d", i, r.status)
			}
			if r := e.get("/v2/ci/app/manifests/" + img.digest.String()); r.status != 404 {
				t.Errorf("replica %d: deleted manifest answers %d", i, r.status)
			}
		}
	})

	// The bucket stopped: replicas serve what their local tiers hold;
	// a push, which the bucket must take, fails with a clear error. Last:
	// it stops the server the other subtests share.
	t.Run("SharedTierDown", func(t *testing.T) {
		rs := startReplicas(t, w, 2)
		img := rs.reg.PushImage(t, "team/app", "v1", 1000)
		a := rs.envs[0]
		expect(t, "warm manifest", a.get("/v2/team/app/manifests/v1", "Accept: "+v1.MediaTypeImageManifest), 200, img.Manifest)
		expect(t, "warm layer", a.get("/v2/team/app/blobs/"+img.LayerDigests[0].String()), 200, img.Layers[0])
		hosted := a.pushImage("ci/app", "v1")
		w.Stop()
		if err := a.tiered.Ping(context.Background()); err == nil {
			t.Fatal("Ping with the bucket stopped: no error")
		}
		expect(t, "manifest from the local tier", a.get("/v2/team/app/manifests/v1", "Accept: "+v1.MediaTypeImageManifest), 200, img.Manifest)
		expect(t, "layer from the local tier", a.get("/v2/team/app/blobs/"+img.LayerDigests[0].String()), 200, img.Layers[0])
		expect(t, "hosted manifest from the local tier", a.get("/v2/ci/app/manifests/v1", "Accept: "+v1.MediaTypeImageManifest), 200, hosted.manifest)
		expect(t, "hosted layer from the local tier", a.get("/v2/ci/app/blobs/"+hosted.layerD.String()), 200, hosted.layer)
		r := a.send(http.MethodPut, "/v2/ci/app/manifests/v2", hosted.manifest, "Content-Type: "+v1.MediaTypeImageManifest)
		if r.status != 503 || !strings.Contains(string(r.body), `"code":"UNAVAILABLE"`) || r.header.Get("Retry-After") == "" {
			t.Errorf("push with the bucket down: %d %q %s, want 503 UNAVAILABLE with Retry-After", r.status, r.header.Get("Retry-After"), r.body)
		}
		if _, err := a.store.GetTag(context.Background(), cache.TagKey{Repo: "ci/app", Tag: "v2"}); err == nil {
			t.Error("a push the bucket did not take is tagged locally")
		}
	})
}

// slowBlobs sends blob bodies at about 16 MiB/s, so that a fill of a few
// MiB is still running when a test acts on it.
func slowBlobs(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/sha256:") {
			w = &slowWriter{ResponseWriter: w}
		}
		h.ServeHTTP(w, r)
	})
}

type slowWriter struct{ http.ResponseWriter }

func (s *slowWriter) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		k := min(len(p), 256<<10)
		m, err := s.ResponseWriter.Write(p[:k])
		n += m
		if err != nil {
			return n, err
		}
		p = p[k:]
		time.Sleep(16 * time.Millisecond)
	}
	return n, nil
}
