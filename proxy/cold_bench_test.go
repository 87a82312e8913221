package proxy_test

import (
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/ocimirror/ocimirror/internal/registrytest"
)

// BenchmarkColdDistinct is a node's cold start: 32 distinct uncached
// 16 MiB blobs pulled at once, by 1 and by 2 clients each, every digest
// verified (test/bench/compare.sh measures the same against distribution).
// Each iteration pulls fresh blobs.
func BenchmarkColdDistinct(b *testing.B) {
	const n, size = 32, 16 << 20
	for _, c := range []struct{ per, maxFills int }{{1, 0}, {2, 0}, {1, 8}, {2, 8}} {
		per := c.per
		name := fmt.Sprintf("clients=%d", per)
		if c.maxFills > 0 {
			name += fmt.Sprintf("/maxFills=%d", c.maxFills)
		}
		b.Run(name, func(b *testing.B) {
			reg := registrytest.New(b)
			e, _ := start(b, withUpstream(upstreamDef{name: reg.Host, reg: reg, maxFills: c.maxFills}), withDefault(reg.Host))
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
						wg.Go(func() { pullVerified(b, client, e.ts.URL+"/v2/app/blobs/"+d.String(), d) })
					}
				}
				wg.Wait()
			}
		})
	}
}

// throttle is an upstream link of a fixed bandwidth, shared by every
// response: a slow upstream (a distant registry, a thin pipe).
type throttle struct {
	mu   sync.Mutex
	next time.Time
	rate float64 // bytes per second
}

func (l *throttle) wait(n int) {
	l.mu.Lock()
	now := time.Now()
	if l.next.Before(now) {
		l.next = now
	}
	l.next = l.next.Add(time.Duration(float64(n) / l.rate * float64(time.Second)))
	until := l.next
	l.mu.Unlock()
	time.Sleep(time.Until(until))
}

type throttledWriter struct {
	http.ResponseWriter
	l *throttle
}

func (w throttledWriter) Write(p []byte) (int, error) {
	var n int
	for len(p) > 0 {
		c := min(len(p), 32<<10)
		w.l.wait(c)
		m, err := w.ResponseWriter.Write(p[:c])
		n += m
		if err != nil {
			return n, err
		}
		p = p[c:]
	}
	return n, nil
}

// BenchmarkColdSlowUpstream: 32 distinct 4 MiB blobs at once from an
// upstream with 64 MB/s in all, under several bounds on the fills at once.
// It reports the wall time and when the median and the first client had
// their whole blob: with a bound, early requests finish early instead of
// every one finishing at the end.
func BenchmarkColdSlowUpstream(b *testing.B) {
	const n, size = 32, 4 << 20
	for _, maxFills := range []int{4, 8, 32} {
		b.Run(fmt.Sprintf("maxFills=%d", maxFills), func(b *testing.B) {
			link := &throttle{rate: 64e6}
			reg := registrytest.New(b, registrytest.WithMiddleware(func(h http.Handler) http.Handler {
				return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/") {
						w = throttledWriter{w, link}
					}
					h.ServeHTTP(w, r)
				})
			}))
			e, _ := start(b, withUpstream(upstreamDef{name: reg.Host, reg: reg, maxFills: maxFills}), withDefault(reg.Host))
			client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 128, DisableCompression: true}}
			var walls, medians, firsts []float64
			for b.Loop() {
				b.StopTimer()
				blobs := make([]digest.Digest, n)
				for i := range blobs {
					blobs[i] = reg.PushBlob(b, "app", registrytest.RandomBytes(size))
				}
				b.StartTimer()
				t0 := time.Now()
				done := make([]float64, n)
				var wg sync.WaitGroup
				for i, d := range blobs {
					wg.Go(func() {
						pullVerified(b, client, e.ts.URL+"/v2/app/blobs/"+d.String(), d)
						done[i] = time.Since(t0).Seconds()
					})
					time.Sleep(time.Millisecond) // in order
				}
				wg.Wait()
				walls = append(walls, time.Since(t0).Seconds())
				slices.Sort(done)
				medians, firsts = append(medians, done[n/2]), append(firsts, done[0])
			}
			b.ReportMetric(slices.Max(walls), "wall-s")
			b.ReportMetric(slices.Max(medians), "p50-s")
			b.ReportMetric(slices.Max(firsts), "first-s")
		})
	}
}

// pullVerified GETs a blob and checks its digest.
func pullVerified(b *testing.B, client *http.Client, u string, d digest.Digest) {
	resp, err := client.Get(u)
	if err != nil {
		b.Error(err)
		return
	}
	defer resp.Body.Close()
	h := d.Algorithm().Digester()
	if _, err := io.Copy(h.Hash(), resp.Body); err != nil || h.Digest() != d {
		b.Errorf("%s: %v %s", d, err, h.Digest())
	}
}
