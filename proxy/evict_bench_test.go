package proxy_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"runtime/trace"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/cache"
)

// Eviction must not stall serving (issue 8): the latency of warm manifest
// GETs by digest, over loopback HTTP, with no eviction running and while a
// pass removes evictStallEntries cached entries.
const (
	evictStallEntries   = 10000
	evictStallBlobShare = 4 // one entry in 4 is a blob, the rest manifests
	evictStallHot       = 64
	evictStallClients   = 4
	// evictStallInterval paces each client: 4 clients at 1 ms make 4,000
	// requests a second, well below what 2 cores serve, so that latency
	// shows stalls rather than a saturated machine.
	evictStallInterval = time.Millisecond
	evictStallIdle     = time.Second
	evictStallSettle   = 2 * time.Second
)

// BenchmarkEvictStall runs one round per iteration: old cached content is
// written, then the hot manifests are requested for evictStallIdle with no
// eviction, then while Evict removes the old content. Run it with
// -benchtime=Nx for N rounds; the "idle" and "evict" trace regions mark
// the two windows in an execution trace (-trace).
//
// Two latencies are kept for each request. The service time runs from
// when the request was sent. The latency from due also counts, for a
// client behind schedule, the time since the request was due: a stall
// then delays every request due during it (no coordinated omission), but
// so does any delay of the clients themselves, which share the process
// and its two cores with the server.
//
// In "lru" the hot manifests are in the memory LRU above the store, as in
// a deployment; in "store" the LRU holds nothing, so every GET reads the
// database (two reads: the repository link and the manifest).
func BenchmarkEvictStall(b *testing.B) {
	for _, c := range []struct {
		name string
		lru  int64
	}{{"lru", 0}, {"store", 1}} {
		b.Run(c.name, func(b *testing.B) {
			var opts []option
			if c.lru > 0 {
				opts = append(opts, withLRUBytes(c.lru))
			}
			benchEvictStall(b, opts...)
		})
	}
}

func benchEvictStall(b *testing.B, opts ...option) {
	e, reg := start(b, opts...)
	ctx := context.Background()
	var paths []string
	for i := range evictStallHot {
		img := reg.PushImage(b, "hot", fmt.Sprintf("v%d", i), 100)
		p := "/v2/hot/manifests/" + img.Digest.String()
		if r := e.get(p, "Accept: "+v1.MediaTypeImageManifest); r.status != 200 {
			b.Fatalf("warm-up %s: %d %s", p, r.status, r.body)
		}
		paths = append(paths, p)
	}
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: evictStallClients}}
	defer client.CloseIdleConnections()
	upstreamGETs := func() int { return reg.Count("GET", "manifests") + reg.Count("GET", "blobs") }
	fetched := upstreamGETs()

	var idle, evicting latencies
	var evictTime time.Duration
	b.ResetTimer()
	for round := range b.N {
		b.StopTimer()
		fillCached(b, e, round)
		b.StartTimer()

		idle.add(measureGETs(b, client, e.ts.URL, paths, func() {
			defer trace.StartRegion(ctx, "idle").End()
			time.Sleep(evictStallIdle)
		}))
		var ev cache.Evicted
		var err error
		evicting.add(measureGETs(b, client, e.ts.URL, paths, func() {
			defer trace.StartRegion(ctx, "evict").End()
			start := time.Now()
			// Each entry is small: one block of disk.
			ev, err = e.badger.Evict(ctx, evictStallEntries*4096, nil)
			evictTime += time.Since(start)
		}))
		if err != nil {
			b.Fatal(err)
		}
		if n := ev.Blobs + ev.Manifests; n != evictStallEntries {
			b.Fatalf("the pass evicted %d entries (%+v), want %d", n, ev, evictStallEntries)
		}
	}
	b.StopTimer()
	if n := upstreamGETs(); n != fetched {
		b.Fatalf("%d upstream GETs while serving warm manifests: the hot set was evicted", n-fetched)
	}
	b.ReportMetric(0, "ns/op")
	for _, m := range []struct {
		name string
		l    *latencies
	}{{"idle", &idle}, {"evict", &evicting}} {
		b.ReportMetric(us(percentile(m.l.service, 50)), m.name+"-p50-µs")
		b.ReportMetric(us(percentile(m.l.service, 99)), m.name+"-p99-µs")
		b.ReportMetric(us(percentile(m.l.fromDue, 99)), m.name+"-p99due-µs")
	}
	b.ReportMetric(us(slices.Max(evicting.fromDue)), "evict-maxdue-µs")
	b.ReportMetric(float64(percentile(evicting.service, 99))/float64(percentile(idle.service, 99)), "p99-ratio")
	b.ReportMetric(float64(percentile(evicting.fromDue, 99))/float64(percentile(idle.fromDue, 99)), "p99due-ratio")
	b.ReportMetric(float64(evictTime.Milliseconds())/float64(b.N), "pass-ms")
}

// latencies are requests' service times and latencies from due.
type latencies struct{ service, fromDue []time.Duration }

func (l *latencies) add(m latencies) {
	l.service = append(l.service, m.service...)
	l.fromDue = append(l.fromDue, m.fromDue...)
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// percentile is the p-th percentile of ds (nearest rank).
func percentile(ds []time.Duration, p int) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := (len(s)*p + 99) / 100
	return s[max(0, i-1)]
}

// fillCached writes evictStallEntries entries of cached content, linked
// from an upstream repository only, all last used a day before the hot
// manifests: the pass removes exactly these.
func fillCached(b *testing.B, e *env, round int) {
	ctx := context.Background()
	e.clock.Advance(-24 * time.Hour)
	defer e.clock.Advance(24 * time.Hour)
	k := cache.RepoKey{Upstream: e.defaultName, Repo: "cold"}
	pad := strings.Repeat("x", 300) // about the size of a small image manifest
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < evictStallEntries; i += 8 {
				body := fmt.Appendf(nil, `{"schemaVersion":2,"mediaType":%q,"round":%d,"entry":%d,"pad":%q}`,
					v1.MediaTypeImageManifest, round, i, pad)
				d := digest.FromBytes(body)
				kind := cache.LinkManifest
				var err error
				if i%evictStallBlobShare == 0 {
					kind = cache.LinkBlob
					err = commitBlob(ctx, e.badger, body)
				} else {
					err = e.badger.PutManifest(ctx, cache.Manifest{Digest: d, MediaType: v1.MediaTypeImageManifest, Data: body})
				}
				if err == nil {
					err = e.badger.Link(ctx, k, kind, d, cache.OriginUpstream)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		b.Fatal(err)
	}
	// Let the store settle, as it has between two passes in service: the
	// access times of what was written are flushed (a pass of nothing
	// does that), and the database's background flushes run.
	if _, err := e.badger.Evict(ctx, 0, nil); err != nil {
		b.Fatal(err)
	}
	time.Sleep(evictStallSettle)
}

func commitBlob(ctx context.Context, s *cache.Badger, data []byte) error {
	w, err := s.CreateBlob(ctx)
	if err != nil {
		return err
	}
	defer w.Close()
	if _, err := w.Write(data); err != nil {
		return err
	}
	return w.Commit(ctx, digest.FromBytes(data), int64(len(data)))
}

// measureGETs runs paced clients GETting paths round-robin until during
// returns, and returns the requests' latencies.
func measureGETs(b *testing.B, client *http.Client, base string, paths []string, during func()) latencies {
	done := make(chan struct{})
	results := make([]latencies, evictStallClients)
	var wg sync.WaitGroup
	for c := range evictStallClients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := &results[c]
			due := time.Now().Add(time.Duration(c) * evictStallInterval / evictStallClients)
			for i := c; ; i++ {
				select {
				case <-done:
					return
				default:
				}
				// A client on schedule sleeps until the request is due and
				// counts from when it wakes (the timer's lateness is not
				// the server's); one behind counts from when it was due.
				from := due
				if wait := time.Until(due); wait > 0 {
					time.Sleep(wait)
					from = time.Now()
				}
				sent := time.Now()
				req, _ := http.NewRequest(http.MethodGet, base+paths[i%len(paths)], nil)
				req.Header.Set("Accept", v1.MediaTypeImageManifest)
				resp, err := client.Do(req)
				if err != nil {
					b.Error(err)
					return
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					b.Errorf("GET %s: %d", paths[i%len(paths)], resp.StatusCode)
					return
				}
				r.service = append(r.service, time.Since(sent))
				r.fromDue = append(r.fromDue, time.Since(from))
				due = due.Add(evictStallInterval)
			}
		}()
	}
	during()
	close(done)
	wg.Wait()
	var all latencies
	for _, r := range results {
		all.add(r)
	}
	return all
}
