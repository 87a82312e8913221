package e2e

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// throttle is a TCP forwarder to an upstream that sends the upstream's
// answers at most `rate` bytes a second, so a test can act mid-transfer.
type throttle struct {
	ln   net.Listener
	host string
	mu   sync.Mutex
	cs   []net.Conn
}

func startThrottle(t *testing.T, target string, rate int) *throttle {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	th := &throttle{ln: ln, host: ln.Addr().String()}
	t.Cleanup(th.close)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			th.mu.Lock()
			th.cs = append(th.cs, c, u)
			th.mu.Unlock()
			go func() { _, _ = io.Copy(u, c); u.Close() }()
			go func() {
				defer c.Close()
				buf := make([]byte, 16<<10)
				for {
					n, err := u.Read(buf)
					if n > 0 {
						if _, werr := c.Write(buf[:n]); werr != nil {
							return
						}
						time.Sleep(time.Duration(n) * time.Second / time.Duration(rate))
					}
					if err != nil {
						return
					}
				}
			}()
		}
	}()
	return th
}

func (th *throttle) close() {
	th.ln.Close()
	th.mu.Lock()
	defer th.mu.Unlock()
	for _, c := range th.cs {
		c.Close()
	}
}

// pushBlob uploads a blob straight to a registry and returns its digest.
func pushBlob(t *testing.T, host, repo string, data []byte) string {
	t.Helper()
	resp, err := http.Post("http://"+host+"/v2/"+repo+"/blobs/uploads/", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	loc, err := resp.Location()
	if err != nil {
		t.Fatalf("upload start: %s", resp.Status)
	}
	d := digestOf(data)
	q := loc.Query()
	q.Set("digest", d)
	loc.RawQuery = q.Encode()
	req, _ := http.NewRequest(http.MethodPut, loc.String(), bytes.NewReader(data))
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("upload: %s", resp.Status)
	}
	return d
}

// startBlobGet starts a GET through ocimirror and returns once `first`
// bytes have arrived; the rest is read by the returned function.
func startBlobGet(t *testing.T, u string, first int) (head []byte, rest func() ([]byte, error)) {
	t.Helper()
	resp, err := http.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 200 {
		resp.Body.Close()
		t.Fatalf("GET %s: %s", u, resp.Status)
	}
	head = make([]byte, first)
	if _, err := io.ReadFull(resp.Body, head); err != nil {
		t.Fatalf("first bytes: %v", err)
	}
	return head, func() ([]byte, error) {
		defer resp.Body.Close()
		return io.ReadAll(resp.Body)
	}
}

func randomBlob(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

// TestE2E_Faults_UpstreamStoppedAfterWarmPull: with the upstream gone, a
// warm image still resolves by tag (stale) and every blob is served.
func TestE2E_Faults_UpstreamStoppedAfterWarmPull(t *testing.T) {
	crane := tool(t, "crane")
	up := startDistribution(t, "registry")
	s := seedImages(t, up.host)
	om := startMirror(t, mirrorConfig("up.test", up.host, "    tagTTL: 1s\n"))
	ref := om.host + "/e2e/app:multi-oci"
	layout := t.TempDir()
	run(t, nil, crane, "--insecure", "pull", "--format", "oci", ref, layout+"/warm")
	up.stop()
	time.Sleep(1100 * time.Millisecond) // past the tag TTL
	if got := strings.TrimSpace(run(t, nil, crane, "--insecure", "digest", ref)); got != s.digests["e2e/app:multi-oci"] {
		t.Fatalf("stale tag: %s", got)
	}
	run(t, nil, crane, "--insecure", "pull", "--format", "oci", ref, layout+"/cold")
	if !strings.Contains(om.log.String(), "serving last known tag") {
		t.Error("ocimirror did not log that it served a stale tag")
	}
}

// TestE2E_Faults_UpstreamStoppedMidBlob: the upstream process dies while a
// blob streams: the client gets an error, nothing is cached, and the pull
// succeeds once the upstream is back.
func TestE2E_Faults_UpstreamStoppedMidBlob(t *testing.T) {
	up := startDistribution(t, "registry")
	blob := randomBlob(8 << 20)
	d := pushBlob(t, up.host, "e2e/big", blob)
	th := startThrottle(t, up.host, 4<<20) // about 2 s for the blob
	om := startMirror(t, mirrorConfig("up.test", th.host, ""))
	u := "http://" + om.host + "/v2/e2e/big/blobs/" + d

	_, rest := startBlobGet(t, u, 1<<20)
	up.kill()
	if b, err := rest(); err == nil && len(b) == len(blob)-(1<<20) {
		t.Fatal("the client got a complete body from an upstream that died")
	}
	// Nothing was cached: with the upstream still down, the blob is not served.
	if st, _, _ := httpGet(t, u); st == 200 {
		t.Fatal("a partial blob was cached and served")
	}
	up.restart(t)
	st, b, _ := httpGet(t, u)
	if st != 200 || digestOf(b) != d {
		t.Fatalf("after the upstream returned: %d, digest %s", st, digestOf(b))
	}
}

// TestE2E_Faults_MirrorKilledMidFill: ocimirror is killed with SIGKILL
// while it fills a blob, then restarted on the same data: the partial blob
// is never served, and the next pull fetches it whole.
func TestE2E_Faults_MirrorKilledMidFill(t *testing.T) {
	up := startDistribution(t, "registry")
	blob := randomBlob(8 << 20)
	d := pushBlob(t, up.host, "e2e/big", blob)
	th := startThrottle(t, up.host, 4<<20)
	om := startMirror(t, mirrorConfig("up.test", th.host, ""))
	u := func() string { return "http://" + om.host + "/v2/e2e/big/blobs/" + d }

	_, rest := startBlobGet(t, u(), 1<<20)
	om.kill()
	if _, err := rest(); err == nil {
		t.Fatal("the client's body ended cleanly although ocimirror was killed")
	}
	up.stop()
	om.start(t)
	if !strings.Contains(om.log.String(), "discarded unfinished blob writes") {
		t.Error("the restarted ocimirror did not discard the unfinished fill")
	}
	if st, _, _ := httpGet(t, u()); st == 200 {
		t.Fatal("the partial blob was served after the restart")
	}
	up.restart(t)
	st, b, _ := httpGet(t, u())
	if st != 200 || digestOf(b) != d {
		t.Fatalf("pull after the restart: %d, digest %s", st, digestOf(b))
	}
}

// TestE2E_Faults_BlackholedUpstream: the upstream's port accepts and never
// answers. crane's warm pulls of a stale tag are served (the last good
// answer), the upstream is marked down after its first timeouts, and from
// then on warm pulls send it nothing at all.
func TestE2E_Faults_BlackholedUpstream(t *testing.T) {
	crane := tool(t, "crane")
	up := startDistribution(t, "registry")
	s := seedImages(t, up.host)
	om := startMirror(t, mirrorConfig("up.test", up.host, "    tagTTL: 1s\n    timeout: 1s\n"))
	ref := om.host + "/e2e/app:multi-oci"
	dir := t.TempDir()
	run(t, nil, crane, "--insecure", "pull", "--format", "oci", ref, dir+"/warm")
	up.stop()
	hole, err := net.Listen("tcp", up.host)
	if err != nil {
		t.Fatalf("taking the upstream's port: %v", err)
	}
	defer hole.Close()
	var conns atomic.Int32
	var held sync.Mutex
	var open []net.Conn
	go func() {
		for {
			c, err := hole.Accept()
			if err != nil {
				return
			}
			conns.Add(1)
			held.Lock()
			open = append(open, c) // never answered, never closed
			held.Unlock()
		}
	}()
	defer func() {
		held.Lock()
		for _, c := range open {
			c.Close()
		}
		held.Unlock()
	}()
	time.Sleep(1100 * time.Millisecond) // past the tag TTL
	pull := func(i int) {
		t.Helper()
		if got := strings.TrimSpace(run(t, nil, crane, "--insecure", "digest", ref)); got != s.digests["e2e/app:multi-oci"] {
			t.Fatalf("pull %d: digest %s", i, got)
		}
		run(t, nil, crane, "--insecure", "pull", "--format", "oci", ref, fmt.Sprintf("%s/p%d", dir, i))
	}
	for i := 0; !strings.Contains(om.log.String(), "upstream marked down"); i++ {
		if i == 20 {
			t.Fatalf("not marked down after 20 pulls; the log:\n%s", tail(om.log.String(), 30))
		}
		pull(i)
	}
	before := conns.Load()
	for i := range 5 {
		pull(100 + i)
	}
	if n := conns.Load() - before; n != 0 {
		t.Fatalf("5 warm pulls with the upstream marked down opened %d connections to it", n)
	}
}
