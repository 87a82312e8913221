package proxy_test

import (
	"fmt"
	"io"
	"net/http"
	"sync"
	"testing"

	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/internal/registrytest"
	"github.com/ocimirror/ocimirror/internal/weedtest"
)

// The cluster benchmarks run replicas in this process on a real
// SeaweedFS (README "Scale out"): go test ./proxy -run '^$' -bench Cluster
// -benchtime 5x. Replicas, SeaweedFS and the clients share the machine's
// cores, as they would not in production.

// BenchmarkCluster_WarmShared pulls a 64 MiB blob through a replica whose
// local tier is empty while the shared tier holds it (shared): MB/s from
// the bucket through the replica to a client, verified; and, for the
// ratio, from the replica's local tier (local).
func BenchmarkCluster_WarmShared(b *testing.B) {
	rs := startReplicas(b, weedtest.Start(b), 1)
	const size = 64 << 20
	d := rs.reg.PushBlob(b, "team/app", registrytest.RandomBytes(size))
	e := rs.envs[0]
	client := &http.Client{Transport: &http.Transport{DisableCompression: true}}
	pullVerified(b, client, e.ts.URL+"/v2/team/app/blobs/"+d.String(), d)
	rs.waitShared(d)
	b.Run("local", func(b *testing.B) {
		b.SetBytes(size)
		for b.Loop() {
			pullVerified(b, client, e.ts.URL+"/v2/team/app/blobs/"+d.String(), d)
		}
	})
	b.Run("shared", func(b *testing.B) {
		b.SetBytes(size)
		for b.Loop() {
			b.StopTimer()
			e.restartEmpty(b)
			b.StartTimer()
			pullVerified(b, client, e.ts.URL+"/v2/team/app/blobs/"+d.String(), d)
		}
	})
	if n := rs.reg.Count(http.MethodGet, "blobs"); n != 1 {
		b.Errorf("upstream blob GETs = %d, want 1 (the first pull)", n)
	}
}

// BenchmarkCluster_ManifestHit is manifest requests by tag answered by
// one replica of three: a proxied tag (the local tier) and a hosted one
// (read from the bucket on every request).
func BenchmarkCluster_ManifestHit(b *testing.B) {
	rs := startReplicas(b, weedtest.Start(b), 3)
	img := rs.reg.PushImage(b, "team/app", "v1", 1000)
	hosted := rs.envs[0].pushImage("ci/app", "v1")
	// The same requests to one ocimirror without a cluster, for the ratio.
	single, _ := start(b, withUpstream(upstreamDef{name: rs.reg.Host, reg: rs.reg}), withDefault(rs.reg.Host), withHosted("ci/"))
	singleHosted := single.pushImage("ci/app", "v1")
	for _, c := range []struct {
		name, path string
		e          *env
		want       []byte
	}{
		{"proxied/single", "/v2/team/app/manifests/v1", single, img.Manifest},
		{"proxied/replica", "/v2/team/app/manifests/v1", rs.envs[0], img.Manifest},
		{"hosted/single", "/v2/ci/app/manifests/v1", single, singleHosted.manifest},
		{"hosted/replica", "/v2/ci/app/manifests/v1", rs.envs[0], hosted.manifest},
	} {
		b.Run(c.name, func(b *testing.B) {
			e, want := c.e, c.want
			client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
			get := func() error {
				req, _ := http.NewRequest(http.MethodGet, e.ts.URL+c.path, nil)
				req.Header.Set("Accept", v1.MediaTypeImageManifest)
				resp, err := client.Do(req)
				if err != nil {
					return err
				}
				defer resp.Body.Close()
				got, err := io.ReadAll(io.LimitReader(resp.Body, int64(len(want))+1))
				if err != nil {
					return err
				}
				if resp.StatusCode != 200 || string(got) != string(want) {
					return fmt.Errorf("%d, %d bytes", resp.StatusCode, len(got))
				}
				return nil
			}
			if err := get(); err != nil {
				b.Fatal(err)
			}
			b.SetParallelism(8)
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if err := get(); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}

// BenchmarkCluster_Stampede is 16 clients pulling one uncached 256 MiB
// blob: spread over 3 replicas, against all on one ocimirror without a
// cluster. Each op is a new blob; every client verifies its digest.
func BenchmarkCluster_Stampede(b *testing.B) {
	const size, clients = 256 << 20, 16
	for _, replicas := range []int{1, 3} {
		b.Run(fmt.Sprintf("replicas=%d", replicas), func(b *testing.B) {
			var urls []string
			var reg *registrytest.Registry
			if replicas == 1 {
				var e *env
				e, reg = start(b)
				urls = []string{e.ts.URL}
			} else {
				rs := startReplicas(b, weedtest.Start(b), replicas)
				reg = rs.reg
				for _, e := range rs.envs {
					urls = append(urls, e.ts.URL)
				}
			}
			client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64, DisableCompression: true}}
			b.SetBytes(size)
			for b.Loop() {
				b.StopTimer()
				d := reg.PushBlob(b, "team/app", registrytest.RandomBytes(size))
				reg.ResetCounts()
				b.StartTimer()
				var wg sync.WaitGroup
				for i := range clients {
					wg.Go(func() { pullVerified(b, client, urls[i%len(urls)]+"/v2/team/app/blobs/"+d.String(), d) })
				}
				wg.Wait()
				b.StopTimer()
				if n := reg.Count(http.MethodGet, "blobs"); n != 1 {
					b.Errorf("upstream blob GETs = %d, want 1", n)
				}
				b.StartTimer()
			}
		})
	}
}
