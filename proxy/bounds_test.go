package proxy_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"runtime/metrics"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
)

// liveHeap is the heap in use after a full collection.
func liveHeap() int64 {
	runtime.GC()
	runtime.GC()
	s := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
	metrics.Read(s)
	return int64(s[0].Value.Uint64())
}

// Manifests in memory are bounded in bytes: pushing and reading 300
// distinct 250 KiB manifests (75 MiB) keeps the heap within the budget.
func TestProxy_Bounds_ManifestMemory(t *testing.T) {
	const budget = 8 << 20
	e, _ := start(t, withHosted("ci/"), withLRUBytes(budget))
	cfg := e.pushBlob("ci/big", []byte("{}"))
	pad := strings.Repeat("x", 250<<10)
	push := func(i int) (digest.Digest, []byte) {
		m := v1.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageManifest,
			Config:      v1.Descriptor{MediaType: v1.MediaTypeEmptyJSON, Digest: cfg, Size: 2},
			Layers:      []v1.Descriptor{},
			Annotations: map[string]string{"n": strconv.Itoa(i), "pad": pad}}
		data, _ := json.Marshal(m)
		d := digest.FromBytes(data)
		expect(t, "push", e.send(http.MethodPut, "/v2/ci/big/manifests/"+d.String(), data, "Content-Type: "+v1.MediaTypeImageManifest), 201, nil)
		return d, data
	}
	push(-1) // warm what a first push allocates
	before := liveHeap()
	for i := range 300 {
		d, data := push(i)
		expect(t, "read", e.get("/v2/ci/big/manifests/"+d.String()), 200, data)
	}
	grown := liveHeap() - before
	t.Logf("heap grew %d KiB for 75 MiB of manifests (budget %d KiB)", grown>>10, budget>>10)
	if grown > 3*budget {
		t.Fatalf("heap grew %d MiB with a manifest budget of %d MiB", grown>>20, budget>>20)
	}
}

// An upstream tag list that never ends is an upstream error after
// maxTagListBytes, not a memory sink.
func TestProxy_Bounds_EndlessTagList(t *testing.T) {
	e, reg := start(t)
	page := 0
	var pages atomic.Int32
	tags := make([]string, 0, 40000)
	for i := range cap(tags) {
		tags = append(tags, fmt.Sprintf("t%021d", i))
	}
	body, _ := json.Marshal(map[string]any{"name": "app", "tags": tags})
	reg.Intercept(func(w http.ResponseWriter, r *http.Request) bool {
		if !strings.HasSuffix(r.URL.Path, "/tags/list") {
			return false
		}
		pages.Add(1)
		page++
		w.Header().Set("Link", fmt.Sprintf(`</v2/app/tags/list?last=p%d>; rel="next"`, page))
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(body)
		return true
	})
	r := e.get("/v2/app/tags/list")
	if r.status != 502 {
		t.Fatalf("endless tag list: %d", r.status)
	}
	if n := pages.Load(); int(n)*len(body) > 16<<20+len(body) {
		t.Fatalf("%d pages of %d bytes were read", n, len(body))
	}
}

// clientFrom is an HTTP client whose connections come from a local address.
func clientFrom(ip string) *http.Client {
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}}
	return &http.Client{Transport: &http.Transport{DialContext: d.DialContext}}
}

func post(t *testing.T, c *http.Client, url string) int {
	t.Helper()
	resp, err := c.Post(url, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// One client cannot take every upload session: sessions are bounded per
// client address, and idle ones are discarded in seconds here (minutes by
// default), freeing the client's share.
func TestProxy_Uploads_PerClientAndIdle(t *testing.T) {
	e, _ := start(t, withHosted("ci/"), withUploadLimits(100, 3, 2*time.Second, 0))
	url := e.ts.URL + "/v2/ci/app/blobs/uploads/"
	a, b := clientFrom("127.0.0.1"), clientFrom("127.0.0.2")
	for i := range 3 {
		if s := post(t, a, url); s != 202 {
			t.Fatalf("session %d: %d", i, s)
		}
	}
	resp, err := a.Post(url, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 429 || resp.Header.Get("Retry-After") == "" || !strings.Contains(string(body), "TOOMANYREQUESTS") {
		t.Fatalf("a fourth session from one client: %d %v %s", resp.StatusCode, resp.Header, body)
	}
	if s := post(t, b, url); s != 202 {
		t.Fatalf("another client: %d", s)
	}
	// Idle sessions expire: the first client may upload again.
	waitFor(t, "idle sessions to expire", func() bool {
		time.Sleep(100 * time.Millisecond)
		return post(t, a, url) == 202
	})
}

// A PATCH body that stops sending is cut after the idle bound, and its
// session is gone.
func TestProxy_Uploads_TricklingBodyIsCut(t *testing.T) {
	e, _ := start(t, withHosted("ci/"), withUploadLimits(0, 0, 0, 300*time.Millisecond))
	r := e.send(http.MethodPost, "/v2/ci/app/blobs/uploads/", nil)
	loc := location(t, e, r)
	pr, pw := io.Pipe()
	defer pw.Close()
	go func() { _, _ = pw.Write([]byte("ten bytes!")) }() // then nothing more
	req, _ := http.NewRequest(http.MethodPatch, e.ts.URL+loc, pr)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	done := make(chan int, 1)
	go func() {
		resp, err := e.ts.Client().Do(req.WithContext(ctx))
		if err != nil {
			done <- -1
			return
		}
		resp.Body.Close()
		done <- resp.StatusCode
	}()
	select {
	case s := <-done:
		if s != http.StatusRequestTimeout && s != -1 {
			t.Fatalf("a stalled body: %d, want 408 (or a cut connection)", s)
		}
	case <-ctx.Done():
		t.Fatal("a stalled body held its request for 10 s")
	}
	if st := e.get(loc); st.status != 404 {
		t.Fatalf("the session survived its stalled body: %d", st.status)
	}
}

// Between requests an upload session holds no buffer: 50 sessions with a
// partial chunk each cost next to no heap.
func TestProxy_Uploads_IdleSessionsHoldNoBuffer(t *testing.T) {
	e, _ := start(t, withHosted("ci/"))
	chunk := make([]byte, 200<<10)
	var locs []string
	before := liveHeap()
	for range 50 {
		r := e.send(http.MethodPost, "/v2/ci/app/blobs/uploads/", nil)
		r = e.send(http.MethodPatch, location(t, e, r), chunk, "Content-Range: 0-"+strconv.Itoa(len(chunk)-1))
		if r.status != 202 {
			t.Fatalf("patch: %d %s", r.status, r.body)
		}
		locs = append(locs, location(t, e, r))
	}
	grown := liveHeap() - before
	t.Logf("50 sessions of 200 KiB: heap grew %d KiB", grown>>10)
	if grown > 4<<20 {
		t.Fatalf("50 idle sessions hold %d KiB of heap", grown>>10)
	}
	// And they still finish whole.
	d := digest.FromBytes(append(append([]byte{}, chunk...), 'x'))
	r := e.send(http.MethodPut, locs[0]+"?digest="+d.String(), []byte("x"), "Content-Range: "+strconv.Itoa(len(chunk))+"-"+strconv.Itoa(len(chunk)))
	expect(t, "finish a parked session", r, 201, nil)
}
