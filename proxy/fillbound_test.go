package proxy_test

import (
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/ocimirror/ocimirror/internal/metrictest"
	"github.com/ocimirror/ocimirror/internal/registrytest"
)

// At most maxFills blob fills of an upstream run at once; the requests
// beyond wait their turn, in the order they came, and none is refused.
func TestProxy_Fill_BoundedPerUpstream(t *testing.T) {
	m := metrictest.New(t)
	reg := registrytest.New(t)
	e, _ := start(t, withUpstream(upstreamDef{name: reg.Host, reg: reg, maxFills: 2}), withDefault(reg.Host), withMeter(m.Provider))
	blobs := make([]digest.Digest, 5)
	data := map[digest.Digest][]byte{}
	for i := range blobs {
		b := registrytest.RandomBytes(100<<10 + i)
		blobs[i] = reg.PushBlob(t, "app", b)
		data[blobs[i]] = b
	}
	var mu sync.Mutex
	var order []digest.Digest
	release := map[digest.Digest]chan struct{}{}
	for _, d := range blobs {
		release[d] = make(chan struct{})
	}
	reg.Intercept(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/") {
			d := digest.Digest(r.URL.Path[strings.LastIndex(r.URL.Path, "/")+1:])
			mu.Lock()
			order = append(order, d)
			mu.Unlock()
			<-release[d]
		}
		return false
	})
	arrived := func() int { mu.Lock(); defer mu.Unlock(); return len(order) }
	var wg sync.WaitGroup
	for i, d := range blobs {
		wg.Go(func() {
			if r := e.get("/v2/app/blobs/" + d.String()); r.status != 200 || string(r.body) != string(data[d]) {
				t.Errorf("blob %s: %d, %d bytes", d, r.status, len(r.body))
			}
		})
		// One at a time, so that the order they came in is known.
		waitFor(t, "the client to wait", func() bool {
			return m.Value("ocimirror_fill_waiters") == float64(i+1) && m.Value("ocimirror_fills_queued") == float64(max(i-1, 0))
		})
	}
	if n := arrived(); n != 2 {
		t.Fatalf("%d upstream GETs running with maxFills 2", n)
	}
	m.Want("ocimirror_fills_in_flight", 5) // started, three of them waiting their turn
	m.Want("ocimirror_fills_queued", 3)
	for i, d := range blobs {
		close(release[d])
		if i+3 <= len(blobs) {
			waitFor(t, "the next fill in order", func() bool { return arrived() == i+3 })
		}
	}
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	for i, d := range order {
		if d != blobs[i] {
			t.Fatalf("upstream GETs in the order %v, requests came as %v", order, blobs)
		}
	}
}
