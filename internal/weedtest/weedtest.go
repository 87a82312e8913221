// Package weedtest runs a real SeaweedFS server (weed: master, volume,
// filer and S3 gateway in one process) on 127.0.0.1 for tests, from
// .tools/bin/weed (test/tools/install.sh weed).
package weedtest

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Weed is a running weed server.
type Weed struct {
	// S3 is the S3 gateway's host:port.
	S3 string
	// Bucket is a bucket Start created.
	Bucket string

	cmd      *exec.Cmd
	exited   chan error
	out      *syncBuffer
	stopOnce sync.Once
	t        testing.TB
}

// Bin finds .tools/bin/weed above the working directory, or skips; with
// OCIMIRROR_E2E_REQUIRE=1 (CI) it fails instead.
func Bin(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		bin := filepath.Join(dir, ".tools", "bin", "weed")
		if st, err := os.Stat(bin); err == nil && st.Mode()&0o111 != 0 {
			return bin
		}
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			break
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			break
		}
		dir = parent
	}
	msg := "weed (SeaweedFS) is not installed; install it with: test/tools/install.sh weed"
	if os.Getenv("OCIMIRROR_E2E_REQUIRE") == "1" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

// ports returns n distinct free ports below 55000 whose port+10000 is
// free too: weed binds each port + 10000 for gRPC.
func ports(t testing.TB, n int) []int {
	t.Helper()
	free := func(p int) bool {
		ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			return false
		}
		ln.Close()
		return true
	}
	seen := map[int]bool{}
	var out []int
	for range 1000 {
		p := 20000 + rand.IntN(25000)
		if seen[p] || seen[p+10000] || seen[p-10000] {
			continue
		}
		if free(p) && free(p+10000) {
			seen[p] = true
			out = append(out, p)
			if len(out) == n {
				return out
			}
		}
	}
	t.Fatalf("no %d free port pairs below 55000", n)
	return nil
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// Start starts weed server in a temporary directory, creates a bucket and
// returns once an object can be written (the first write waits for weed
// to grow its volumes, about 10 s). t.Cleanup stops it.
func Start(t testing.TB) *Weed {
	t.Helper()
	bin := Bin(t)
	p := ports(t, 4)
	dir := t.TempDir()
	w := &Weed{S3: fmt.Sprintf("127.0.0.1:%d", p[3]), Bucket: "ocimirror-test", exited: make(chan error, 1), out: &syncBuffer{}, t: t}
	w.cmd = exec.Command(bin, "server",
		"-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-dir="+dir,
		fmt.Sprintf("-master.port=%d", p[0]),
		fmt.Sprintf("-volume.port=%d", p[1]),
		fmt.Sprintf("-filer.port=%d", p[2]),
		"-s3", fmt.Sprintf("-s3.port=%d", p[3]),
	)
	w.cmd.Stdout, w.cmd.Stderr = w.out, w.out
	started := time.Now()
	if err := w.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { w.exited <- w.cmd.Wait() }()
	t.Cleanup(func() {
		w.Stop()
		if t.Failed() {
			t.Logf("weed output (tail):\n%s", tail(w.out.String(), 4000))
		}
	})
	w.CreateBucket(t, w.Bucket)
	bucket := "http://" + w.S3 + "/" + w.Bucket
	w.until(t, "first object", http.MethodPut, bucket+"/warm-up", started.Add(60*time.Second))
	req, _ := http.NewRequest(http.MethodDelete, bucket+"/warm-up", nil)
	if resp, err := http.DefaultClient.Do(req); err == nil {
		resp.Body.Close()
	}
	t.Logf("weed: first object written %v after start", time.Since(started).Round(10*time.Millisecond))
	return w
}

// CreateBucket creates a bucket (weed answers / before it can create
// buckets: the PUT is retried for up to a minute).
func (w *Weed) CreateBucket(t testing.TB, name string) {
	t.Helper()
	w.until(t, "bucket "+name, http.MethodPut, "http://"+w.S3+"/"+name, time.Now().Add(60*time.Second))
}

func (w *Weed) until(t testing.TB, what, method, url string, deadline time.Time) {
	t.Helper()
	client := &http.Client{Timeout: 30 * time.Second}
	for {
		req, _ := http.NewRequest(method, url, strings.NewReader("warm"))
		resp, err := client.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		select {
		case err := <-w.exited:
			t.Fatalf("weed exited before %s: %v\n%s", what, err, tail(w.out.String(), 4000))
		default:
		}
		if time.Now().After(deadline) {
			last := "no answer"
			if err != nil {
				last = err.Error()
			} else {
				last = resp.Status
			}
			t.Fatalf("weed: no %s in time (last: %s)", what, last)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// Stop stops weed: SIGTERM, then SIGKILL after 5 s (weed shuts down
// slowly). Later calls do nothing.
func (w *Weed) Stop() {
	w.stopOnce.Do(func() {
		stopping := time.Now()
		w.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-w.exited:
			w.t.Logf("weed stopped on SIGTERM in %v", time.Since(stopping).Round(10*time.Millisecond))
		case <-time.After(5 * time.Second):
			w.cmd.Process.Kill()
			<-w.exited
			w.t.Logf("weed killed: still running 5 s after SIGTERM")
		}
	})
}

func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "..." + s[len(s)-n:]
}
