package proxy_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/internal/registrytest"
)

// holdBlob makes the upstream answer GETs of blob d with its first `first`
// bytes, then wait for release before sending the rest. It returns release.
func holdBlob(reg *registrytest.Registry, d digest.Digest, data []byte, first int) (release func()) {
	ch := make(chan struct{})
	var once sync.Once
	reg.Intercept(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method != http.MethodGet || r.URL.Path[len(r.URL.Path)-len(d.String()):] != d.String() {
			return false
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(data)))
		w.Header().Set("Docker-Content-Digest", d.String())
		w.WriteHeader(200)
		_, _ = w.Write(data[:first])
		w.(http.Flusher).Flush()
		select {
		case <-ch:
		case <-r.Context().Done():
			return true
		}
		_, _ = w.Write(data[first:])
		return true
	})
	return func() { once.Do(func() { close(ch) }) }
}

func TestProxy_Fill_CoalescesConcurrentClients(t *testing.T) {
	e, reg := start(t)
	img := reg.PushImage(t, "app", "v1", 3<<20)
	d, layer := img.LayerDigests[0], img.Layers[0]
	release := holdBlob(reg, d, layer, 0)
	defer release()

	const clients = 16
	before := e.requests.Load()
	results := make(chan response, clients)
	for i := 0; i < clients; i++ {
		go func() {
			resp, err := http.Get(e.ts.URL + "/v2/app/blobs/" + d.String())
			if err != nil {
				results <- response{err: err}
				return
			}
			defer resp.Body.Close()
			b, err := io.ReadAll(resp.Body)
			results <- response{status: resp.StatusCode, body: b, err: err}
		}()
	}
	waitFor(t, "all clients to reach ocimirror", func() bool { return e.requests.Load()-before == clients })
	waitFor(t, "the upstream GET", func() bool { return reg.Count("GET", "blobs") == 1 })
	release()
	for i := 0; i < clients; i++ {
		r := <-results
		if r.err != nil || r.status != 200 || !bytes.Equal(r.body, layer) {
			t.Fatalf("client: status %d, %d bytes, err %v", r.status, len(r.body), r.err)
		}
	}
	if n := reg.Count("GET", "blobs"); n != 1 {
		t.Errorf("upstream blob GETs: %d, want 1", n)
	}
}

func TestProxy_Fill_CoalescesManifests(t *testing.T) {
	e, reg := start(t)
	img := reg.PushImage(t, "app", "v1", 10)
	gate := make(chan struct{})
	reg.Intercept(func(w http.ResponseWriter, r *http.Request) bool {
		if registrytest.Kind(r.URL.Path) == "manifests" {
			<-gate
		}
		return false
	})
	const clients = 16
	before := e.requests.Load()
	var wg sync.WaitGroup
	bodies := make([][]byte, clients)
	for i := range bodies {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := http.Get(e.ts.URL + "/v2/app/manifests/v1")
			if err == nil {
				bodies[i], _ = io.ReadAll(resp.Body)
				resp.Body.Close()
			}
		}()
	}
	waitFor(t, "all clients to reach ocimirror", func() bool { return e.requests.Load()-before == clients })
	waitFor(t, "the upstream request", func() bool { return reg.Count("GET", "manifests") == 1 })
	close(gate)
	wg.Wait()
	for _, b := range bodies {
		if !bytes.Equal(b, img.Manifest) {
			t.Fatalf("client got %q", b)
		}
	}
	if n := reg.Count("GET", "manifests") + reg.Count("HEAD", "manifests"); n != 1 {
		t.Errorf("upstream manifest requests: %d, want 1", n)
	}
}

func TestProxy_Fill_FollowersStreamBeforeTheEnd(t *testing.T) {
	e, reg := start(t)
	img := reg.PushImage(t, "app", "v1", 4<<20)
	d, layer := img.LayerDigests[0], img.Layers[0]
	release := holdBlob(reg, d, layer, 2<<20)
	defer release()

	// Two clients, the second joining the running fill: both get the first
	// mebibyte while the upstream still holds back the second half.
	var bodies []io.ReadCloser
	for i := 0; i < 2; i++ {
		resp, err := http.Get(e.ts.URL + "/v2/app/blobs/" + d.String())
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != 200 || resp.Header.Get("Content-Length") != strconv.Itoa(len(layer)) {
			t.Fatalf("client %d: %d, length %s", i, resp.StatusCode, resp.Header.Get("Content-Length"))
		}
		got := make([]byte, 1<<20)
		done := make(chan error, 1)
		go func() { _, err := io.ReadFull(resp.Body, got); done <- err }()
		select {
		case err := <-done:
			if err != nil || !bytes.Equal(got, layer[:1<<20]) {
				t.Fatalf("client %d: first MiB: %v", i, err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("client %d received nothing while the fill ran", i)
		}
		bodies = append(bodies, resp.Body)
	}
	release()
	for i, b := range bodies {
		rest, err := io.ReadAll(b)
		if err != nil || !bytes.Equal(rest, layer[1<<20:]) {
			t.Fatalf("client %d: rest: %v", i, err)
		}
	}
	if n := reg.Count("GET", "blobs"); n != 1 {
		t.Errorf("upstream blob GETs: %d, want 1", n)
	}
}

func TestProxy_Fill_CorruptUpstreamCachesNothing(t *testing.T) {
	e, reg := start(t)
	img := reg.PushImage(t, "app", "v1", 1<<20)
	d, layer := img.LayerDigests[0], img.Layers[0]
	wrong := append([]byte(nil), layer...)
	wrong[len(wrong)/2] ^= 0xff
	reg.Intercept(func(w http.ResponseWriter, r *http.Request) bool {
		if registrytest.Kind(r.URL.Path) != "blobs" {
			return false
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(wrong)))
		w.WriteHeader(200)
		_, _ = w.Write(wrong)
		return true
	})
	r := e.get("/v2/app/blobs/" + d.String())
	if r.err == nil {
		t.Fatalf("client got a clean body of %d bytes from a corrupt upstream (status %d)", len(r.body), r.status)
	}
	if len(r.body) >= len(layer) {
		t.Errorf("client got all %d bytes", len(r.body))
	}
	if _, err := e.badger.StatBlob(context.Background(), d); !errors.Is(err, cache.ErrNotFound) {
		t.Fatalf("corrupt blob is in the store: %v", err)
	}
	// The next request refetches, and gets the right bytes.
	reg.Intercept(nil)
	r = e.get("/v2/app/blobs/" + d.String())
	if r.err != nil || !bytes.Equal(r.body, layer) {
		t.Fatalf("refetch: %v", r.err)
	}
	if n := reg.Count("GET", "blobs"); n != 2 {
		t.Errorf("upstream blob GETs: %d, want 2", n)
	}
}

func TestProxy_Fill_CorruptManifestCachesNothing(t *testing.T) {
	e, reg := start(t)
	img := reg.PushImage(t, "app", "v1", 10)
	reg.Intercept(func(w http.ResponseWriter, r *http.Request) bool {
		if registrytest.Kind(r.URL.Path) != "manifests" {
			return false
		}
		w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
		w.Header().Set("Docker-Content-Digest", img.Digest.String())
		_, _ = w.Write(append(bytes.Clone(img.Manifest), ' '))
		return true
	})
	for _, ref := range []string{img.Digest.String(), "v1"} {
		if r := e.get("/v2/app/manifests/" + ref); r.status != 502 {
			t.Errorf("%s from a corrupt upstream: %d %s", ref, r.status, r.body)
		}
	}
	if _, err := e.badger.GetManifest(context.Background(), img.Digest); !errors.Is(err, cache.ErrNotFound) {
		t.Fatalf("corrupt manifest is in the store: %v", err)
	}
	reg.Intercept(nil)
	if r := e.get("/v2/app/manifests/v1"); !bytes.Equal(r.body, img.Manifest) {
		t.Fatalf("refetch: %d", r.status)
	}
}

func TestProxy_Fill_ClientDisconnectDoesNotAbort(t *testing.T) {
	e, reg := start(t)
	img := reg.PushImage(t, "app", "v1", 2<<20)
	d, layer := img.LayerDigests[0], img.Layers[0]
	release := holdBlob(reg, d, layer, 1<<20)
	defer release()

	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, e.ts.URL+"/v2/app/blobs/"+d.String(), nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(resp.Body, make([]byte, 100<<10)); err != nil {
		t.Fatal(err)
	}
	cancel() // the client hangs up mid-fill
	resp.Body.Close()
	release()
	waitFor(t, "the fill to commit", func() bool {
		_, err := e.badger.StatBlob(context.Background(), d)
		return err == nil
	})
	r := e.get("/v2/app/blobs/" + d.String())
	if !bytes.Equal(r.body, layer) {
		t.Fatal("blob after the disconnected fill differs")
	}
	if n := reg.Count("GET", "blobs"); n != 1 {
		t.Errorf("upstream blob GETs: %d, want 1", n)
	}
}

func TestProxy_Fill_ResumesBrokenUpstreamBody(t *testing.T) {
	e, reg := start(t)
	img := reg.PushImage(t, "app", "v1", 1<<20)
	d, layer := img.LayerDigests[0], img.Layers[0]
	var cut sync.Once
	reg.Intercept(func(w http.ResponseWriter, r *http.Request) bool {
		if registrytest.Kind(r.URL.Path) != "blobs" || r.Header.Get("Range") != "" {
			return false // resumed requests reach the real registry
		}
		first := false
		cut.Do(func() { first = true })
		if !first {
			return false
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(layer)))
		w.WriteHeader(200)
		_, _ = w.Write(layer[:300<<10])
		w.(http.Flusher).Flush()
		panic(http.ErrAbortHandler) // the connection breaks mid-body
	})
	r := e.get("/v2/app/blobs/" + d.String())
	if r.err != nil || !bytes.Equal(r.body, layer) {
		t.Fatalf("resumed fill: status %d, err %v", r.status, r.err)
	}
	if n := reg.Count("GET", "blobs"); n != 2 {
		t.Errorf("upstream blob GETs: %d, want 2 (one resumed with Range)", n)
	}
	waitFor(t, "the fill to commit", func() bool {
		_, err := e.badger.StatBlob(context.Background(), d)
		return err == nil
	})
}

func TestProxy_Fill_UpstreamStopsMidBlob(t *testing.T) {
	e, reg := start(t)
	img := reg.PushImage(t, "app", "v1", 1<<20)
	d, layer := img.LayerDigests[0], img.Layers[0]
	reg.Intercept(func(w http.ResponseWriter, r *http.Request) bool {
		if registrytest.Kind(r.URL.Path) != "blobs" {
			return false
		}
		if r.Header.Get("Range") != "" {
			w.WriteHeader(503) // and it does not come back in time
			return true
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(layer)))
		w.WriteHeader(200)
		_, _ = w.Write(layer[:300<<10])
		w.(http.Flusher).Flush()
		panic(http.ErrAbortHandler)
	})
	r := e.get("/v2/app/blobs/" + d.String())
	if r.err == nil && bytes.Equal(r.body, layer) {
		t.Fatal("client got a complete blob from an upstream that stopped")
	}
	if _, err := e.badger.StatBlob(context.Background(), d); !errors.Is(err, cache.ErrNotFound) {
		t.Fatalf("partial blob is in the store: %v", err)
	}
	reg.Intercept(nil)
	if r := e.get("/v2/app/blobs/" + d.String()); r.err != nil || !bytes.Equal(r.body, layer) {
		t.Fatalf("pull after the upstream returned: %v", r.err)
	}
}
