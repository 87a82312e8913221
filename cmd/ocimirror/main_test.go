package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ocimirror/ocimirror/internal/registrytest"
)

// syncBuffer is a bytes.Buffer safe for the server's log and the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestRun_Help(t *testing.T) {
	tests := []struct {
		args []string
		code int
		want string
	}{
		{[]string{"--help"}, 0, "ocimirror serve"},
		{[]string{"help"}, 0, "ocimirror serve"},
		{[]string{"help", "serve"}, 0, "-upstream NAME=URL"},
		{[]string{"serve", "--help"}, 0, "-default-upstream"},
		{[]string{"serve", "-h"}, 0, "-config file"},
		{[]string{"version", "--help"}, 0, "Usage: ocimirror version"},
		{[]string{"version"}, 0, "ocimirror dev"},
		{[]string{}, 2, ""},
		{[]string{"bogus"}, 2, ""},
		{[]string{"serve", "--bogus"}, 2, ""},
		{[]string{"serve", "extra"}, 2, ""},
		{[]string{"serve", "--upstream", "noequals"}, 2, ""},
	}
	for _, tc := range tests {
		var stdout, stderr bytes.Buffer
		code := run(context.Background(), tc.args, &stdout, &stderr)
		if code != tc.code || !strings.Contains(stdout.String(), tc.want) {
			t.Errorf("%v: exit %d, stdout %q, stderr %q", tc.args, code, stdout.String(), stderr.String())
		}
		if code == 0 && (stderr.Len() > 0 || strings.Count(stdout.String(), "Usage") > 1) {
			t.Errorf("%v: usage printed more than once or to stderr: stdout %q, stderr %q", tc.args, stdout.String(), stderr.String())
		}
	}
}

func TestRun_BadConfigNamesFieldAndValue(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.yaml")
	os.WriteFile(path, []byte("upstreams:\n  - name: a.io\n    tagTTL: soon\n"), 0o600)
	var stdout, stderr bytes.Buffer
	code := run(context.Background(), []string{"serve", "--config", path}, &stdout, &stderr)
	if code != 1 || !strings.Contains(stderr.String(), `upstreams[0].tagTTL: invalid duration "soon"`) {
		t.Fatalf("exit %d, stderr %q", code, stderr.String())
	}
	code = run(context.Background(), []string{"serve", "--default-upstream", "nowhere.io"}, &stdout, &stderr)
	if code != 1 || !strings.Contains(stderr.String(), `defaultUpstream: "nowhere.io"`) {
		t.Fatalf("exit %d, stderr %q", code, stderr.String())
	}
}

var listenRE = regexp.MustCompile(`ocimirror listening"?,? ?"?addr"?[=:]"?([^"\s,]+)`)

// serveProcess runs "ocimirror serve" in-process until the test stops it.
func serveProcess(t *testing.T, args ...string) (addr string, stop func() (int, string)) {
	t.Helper()
	addr, _, stop = serveLogged(t, args...)
	return addr, stop
}

// serveLogged is serveProcess, with the server's log.
func serveLogged(t *testing.T, args ...string) (addr string, log *syncBuffer, stop func() (int, string)) {
	t.Helper()
	log = &syncBuffer{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, append([]string{"serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"}, args...), io.Discard, log)
	}()
	for i := 0; i < 500 && addr == ""; i++ {
		if m := listenRE.FindStringSubmatch(log.String()); m != nil {
			addr = m[1]
		}
		select {
		case code := <-done:
			t.Fatalf("serve exited with %d: %s", code, log.String())
		case <-time.After(10 * time.Millisecond):
		}
	}
	if addr == "" {
		cancel()
		t.Fatalf("serve did not start: %s", log.String())
	}
	stopped := false
	stop = func() (int, string) {
		if stopped {
			return 0, log.String()
		}
		stopped = true
		cancel()
		select {
		case code := <-done:
			return code, log.String()
		case <-time.After(30 * time.Second):
			t.Fatal("serve did not stop")
		}
		return -1, ""
	}
	t.Cleanup(func() { stop() })
	return addr, log, stop
}

func TestServe_PullRestartAndShutdown(t *testing.T) {
	reg := registrytest.New(t)
	img := reg.PushImage(t, "team/app", "v1", 100_000)
	data := t.TempDir()
	args := []string{"--data", data, "--upstream", reg.Host + "=" + reg.URL, "--default-upstream", reg.Host, "--log-format", "json"}

	addr, stop := serveProcess(t, args...)
	for _, path := range []string{"/v2/team/app/manifests/v1", "/v2/team/app/blobs/" + img.LayerDigests[0].String()} {
		resp, err := http.Get("http://" + addr + path)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("%s: %d", path, resp.StatusCode)
		}
	}
	code, log := stop()
	if code != 0 || !strings.Contains(log, `"msg":"shutting down"`) || !strings.Contains(log, `"cache":"miss"`) {
		t.Fatalf("exit %d, log:\n%s", code, log)
	}

	// Restarted on the same data with the upstream gone, it serves the image.
	reg.Close()
	addr, _ = serveProcess(t, args...)
	resp, err := http.Get("http://" + addr + "/v2/team/app/blobs/" + img.LayerDigests[0].String())
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || !bytes.Equal(b, img.Layers[0]) {
		t.Fatalf("after restart: %d", resp.StatusCode)
	}
}

// --offline and the admin listener: readiness reports the store and the
// upstream as offline, health answers, the registry API is not there, and
// an offline mirror's miss is a 404 that says so, sent nowhere.
func TestServe_OfflineAndAdmin(t *testing.T) {
	reg := registrytest.New(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	adminAddr := ln.Addr().String()
	ln.Close()
	addr, _ := serveProcess(t, "--data", t.TempDir(), "--upstream", reg.Host+"="+reg.URL, "--default-upstream", reg.Host,
		"--offline", "--admin-listen", adminAddr)
	get := func(u string) (int, string) {
		t.Helper()
		resp, err := http.Get(u)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if st, body := get("http://" + addr + "/v2/team/app/manifests/v1"); st != 404 || !strings.Contains(body, "MANIFEST_UNKNOWN") || !strings.Contains(body, "offline") {
		t.Fatalf("offline miss: %d %s", st, body)
	}
	if n := reg.Total(); n != 0 {
		t.Fatalf("%d requests upstream", n)
	}
	if st, _ := get("http://" + adminAddr + "/healthz"); st != 200 {
		t.Fatalf("healthz: %d", st)
	}
	st, body := get("http://" + adminAddr + "/readyz")
	var r struct {
		Status    string
		Store     string
		Offline   bool
		Upstreams map[string]struct{ State string }
	}
	if err := json.Unmarshal([]byte(body), &r); err != nil || st != 200 || r.Status != "ready" || r.Store != "ok" || !r.Offline ||
		r.Upstreams[reg.Host].State != "offline" {
		t.Fatalf("readyz: %d %s", st, body)
	}
	if st, _ := get("http://" + adminAddr + "/v2/"); st != 404 {
		t.Fatalf("the registry API on the admin listener: %d", st)
	}
	// The metrics, in the Prometheus text format: the offline miss, the
	// upstream marked not up, the Go runtime's and the process's series.
	st, body = get("http://" + adminAddr + "/metrics")
	for _, want := range []string{
		`ocimirror_cache_requests_total{kind="tag",result="offline_miss"} 1`,
		`ocimirror_http_requests_total{code="404",method="GET",route="manifest"} 1`,
		`ocimirror_upstream_up{upstream="` + reg.Host + `"} 0`,
		`ocimirror_store_budget_bytes 0`,
		`ocimirror_build_info{version=`,
		"# TYPE ocimirror_http_request_duration_seconds histogram",
		"go_goroutines ",
		"process_resident_memory_bytes ",
	} {
		if st != 200 || !strings.Contains(body, "\n"+want) {
			t.Errorf("/metrics: %d, no %q in\n%s", st, want, body)
		}
	}
	if strings.Contains(body, "otel_scope") || strings.Contains(body, "target_info") {
		t.Errorf("/metrics carries OpenTelemetry scope labels or target_info")
	}
}
