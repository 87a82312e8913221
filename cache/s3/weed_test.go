package s3

import (
	"bytes"
	"context"
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

// weed is a SeaweedFS server (master, volume, filer and S3 gateway in one
// process) on 127.0.0.1, for the tests.
type weed struct {
	// S3 is the S3 gateway's host:port.
	S3     string
	Bucket string
}

// weedBin finds .tools/bin/weed (test/tools/install.sh weed), or skips;
// with OCIMIRROR_E2E_REQUIRE=1 (CI) it fails instead.
func weedBin(t *testing.T) string {
	t.Helper()
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(wd, "..", "..", ".tools", "bin", "weed")
	if st, err := os.Stat(bin); err == nil && st.Mode()&0o111 != 0 {
		return bin
	}
	msg := "weed (SeaweedFS) is not installed; install it with: test/tools/install.sh weed"
	if os.Getenv("OCIMIRROR_E2E_REQUIRE") == "1" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

// weedPorts returns n distinct free ports below 55000 whose port+10000
// is free too: weed binds each port + 10000 for gRPC.
func weedPorts(t *testing.T, n int) []int {
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
	var ports []int
	for range 1000 {
		p := 20000 + rand.IntN(25000)
		if seen[p] || seen[p+10000] || seen[p-10000] {
			continue
		}
		if free(p) && free(p+10000) {
			seen[p] = true
			ports = append(ports, p)
			if len(ports) == n {
				return ports
			}
		}
	}
	t.Fatalf("no %d free port pairs below 55000", n)
	return nil
}

// syncBuffer collects a process's output, safe for concurrent use.
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

// startWeed starts weed server in a temporary directory, creates a bucket
// and returns when the bucket exists. t.Cleanup stops it: SIGTERM, then
// SIGKILL after 5 s (weed shuts down slowly).
func startWeed(t *testing.T) weed {
	t.Helper()
	bin := weedBin(t)
	ports := weedPorts(t, 4)
	master, volume, filer, s3port := ports[0], ports[1], ports[2], ports[3]
	dir := t.TempDir()
	cmd := exec.Command(bin, "server",
		"-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-dir="+dir,
		fmt.Sprintf("-master.port=%d", master),
		fmt.Sprintf("-volume.port=%d", volume),
		fmt.Sprintf("-filer.port=%d", filer),
		"-s3", fmt.Sprintf("-s3.port=%d", s3port),
	)
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	started := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		stopping := time.Now()
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
			t.Logf("weed stopped on SIGTERM in %v", time.Since(stopping).Round(10*time.Millisecond))
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-exited
			t.Logf("weed killed: still running 5 s after SIGTERM")
		}
		if t.Failed() {
			t.Logf("weed output (tail):\n%s", tail(out.String(), 4000))
		}
	})

	w := weed{S3: fmt.Sprintf("127.0.0.1:%d", s3port), Bucket: "ocimirror-test"}
	bucket := "http://" + w.S3 + "/" + w.Bucket
	deadline := started.Add(60 * time.Second)
	// weed answers / before it can create buckets: retry the bucket PUT.
	until := func(what, method, url string) {
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
			case err := <-exited:
				t.Fatalf("weed exited before %s: %v\n%s", what, err, tail(out.String(), 4000))
			default:
			}
			if time.Now().After(deadline) {
				t.Fatalf("weed: no %s within 60 s (last: %v)", what, statusOrErr(resp, err))
			}
			time.Sleep(250 * time.Millisecond)
		}
	}
	until("bucket", http.MethodPut, bucket)
	t.Logf("weed: bucket created %v after start", time.Since(started).Round(10*time.Millisecond))
	// The first object write waits for weed to grow its volumes (about
	// 9 s here): do it now, so that it does not count against a test.
	until("first object", http.MethodPut, bucket+"/warm-up")
	req, _ := http.NewRequest(http.MethodDelete, bucket+"/warm-up", nil)
	if resp, err := http.DefaultClient.Do(req); err == nil {
		resp.Body.Close()
	}
	t.Logf("weed: first object written %v after start", time.Since(started).Round(10*time.Millisecond))
	return w
}

func statusOrErr(resp *http.Response, err error) string {
	if err != nil {
		return err.Error()
	}
	return resp.Status
}

func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "..." + s[len(s)-n:]
}

// newWeedStore returns a Store on w's bucket, anonymous and path-style
// over plain HTTP, as weed serves it by default.
func newWeedStore(t *testing.T, w weed) *Store {
	t.Helper()
	s, err := New(Config{Endpoint: w.S3, Bucket: w.Bucket, Region: "us-east-1", PathStyle: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	return s
}
