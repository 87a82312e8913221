package proxy_test

import (
	"fmt"
	"io"
	"net/http"
	"sync"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/ocimirror/ocimirror/internal/registrytest"
)

// BenchmarkColdDistinct is a node's cold start: 32 distinct uncached
// 16 MiB blobs pulled at once, by 1 and by 2 clients each, every digest
// verified (test/bench/compare.sh measures the same against distribution).
// Each iteration pulls fresh blobs.
func BenchmarkColdDistinct(b *testing.B) {
	const n, size = 32, 16 << 20
	for _, per := range []int{1, 2} {
		b.Run(fmt.Sprintf("clients=%d", per), func(b *testing.B) {
			reg := registrytest.New(b)
			e, _ := start(b, withUpstream(upstreamDef{name: reg.Host, reg: reg}), withDefault(reg.Host))
			client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 128, DisableCompression: true}}
			b.SetBytes(n * size * int64(per))
			for b.Loop() {
				b.StopTimer()
				blobs := make([]digest.Digest, n)
				for i := range blobs {
					blobs[i] = reg.PushBlob(b, "app", registrytest.RandomBytes(size))
				}
				b.StartTimer()
				var wg sync.WaitGroup
				for _, d := range blobs {
					for range per {
						wg.Go(func() {
							resp, err := client.Get(e.ts.URL + "/v2/app/blobs/" + d.String())
							if err != nil {
								b.Error(err)
								return
							}
							defer resp.Body.Close()
							h := digest.SHA256.Digester()
							if _, err := io.Copy(h.Hash(), resp.Body); err != nil || h.Digest() != d {
								b.Errorf("%s: %v %s", d, err, h.Digest())
							}
						})
					}
				}
				wg.Wait()
			}
		})
	}
}
