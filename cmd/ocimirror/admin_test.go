package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/ocimirror/ocimirror/admin"
	"github.com/ocimirror/ocimirror/internal/registrytest"
)

// ocimirror admin stats, pins and purge against a running mirror: the
// table and the JSON say what the store holds, the configured pin and
// what it resolves to; a purged tag is fetched again from the upstream;
// a hosted repository's purge fails with the server's error; bad usage
// exits 2.
func TestRun_Admin(t *testing.T) {
	reg := registrytest.New(t)
	img := reg.PushImage(t, "team/app", "v1", 5000)
	cfg := filepath.Join(t.TempDir(), "c.yaml")
	if err := os.WriteFile(cfg, []byte("storage:\n  pin: [\""+reg.Host+"/team/app:v1\"]\nhosted: [\"ci/\"]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	defer func(d time.Duration) { pinnedRefresh = d }(pinnedRefresh) // after the server stops
	pinnedRefresh = 0                                                // every scrape asks for a new figure
	addr, log, _ := serveLogged(t, "--config", cfg, "--data", t.TempDir(), "--upstream", reg.Host+"="+reg.URL, "--default-upstream", reg.Host)
	m := adminRE.FindStringSubmatch(log.String())
	if m == nil {
		t.Fatalf("no admin address in the log:\n%s", log.String())
	}
	url := "http://" + m[1]
	for _, p := range []string{"/v2/team/app/manifests/v1", "/v2/team/app/blobs/" + img.LayerDigests[0].String()} {
		if code, _ := mirrorGet(t, addr, p); code != 200 {
			t.Fatalf("%s: %d", p, code)
		}
	}
	// A client has its last byte once the blob is checked; the store
	// counts it once the fill has committed.
	for i := 0; i < 500; i++ {
		if _, b := mirrorGet(t, m[1], "/metrics"); strings.Contains(string(b), "\nocimirror_fills_in_flight 0\n") {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	adminRun := func(args ...string) (int, string, string) {
		t.Helper()
		var stdout, stderr bytes.Buffer
		code := run(context.Background(), append([]string{"admin"}, args...), &stdout, &stderr)
		return code, stdout.String(), stderr.String()
	}

	code, out, errOut := adminRun("stats", "--admin", url)
	for _, re := range []string{`(?m)^store\s+\S+ \S+ \(no budget\)$`, `(?m)^blobs\s+1$`, `(?m)^manifests\s+1$`, `(?m)^tags\s+1$`,
		`(?m)^repositories\s+1$`, `(?m)^` + regexp.QuoteMeta(reg.Host) + `\s+up\s+-\s+0$`} {
		if code != 0 || !regexp.MustCompile(re).MatchString(out) {
			t.Fatalf("admin stats: exit %d, want %s in\n%s%s", code, re, out, errOut)
		}
	}
	code, out, _ = adminRun("stats", "--json", "--admin", url)
	var st admin.Stats
	if err := json.Unmarshal([]byte(out), &st); code != 0 || err != nil {
		t.Fatalf("admin stats --json: exit %d, %v\n%s", code, err, out)
	}
	if c := st.Store.Counts; c.Blobs != 1 || c.Manifests != 1 || c.Tags != 1 || c.Repositories != 1 ||
		st.Store.PinnedBytes != int64(len(img.Manifest)+5000) || st.Store.Bytes <= 5000 || st.Upstreams[reg.Host].State != "up" {
		t.Fatalf("admin stats --json: %+v", st)
	}

	// The same figures in the metrics (the pinned bytes are measured in
	// the background: a scrape gives the last figure).
	pinnedLine := fmt.Sprintf("\nocimirror_store_pinned_bytes %d\n", len(img.Manifest)+5000)
	var metrics string
	for i := 0; i < 200 && !strings.Contains(metrics, pinnedLine); i++ {
		time.Sleep(10 * time.Millisecond)
		_, b := mirrorGet(t, m[1], "/metrics")
		metrics = string(b)
	}
	if !strings.Contains(metrics, pinnedLine) || !strings.Contains(metrics, "\nocimirror_store_budget_bytes 0\n") {
		t.Fatalf("/metrics: no %q in\n%s\n%s", pinnedLine, metrics, log.String())
	}

	code, out, _ = adminRun("pins", "--admin", url)
	if code != 0 || !regexp.MustCompile(`(?m)^config\s+`+regexp.QuoteMeta(reg.Host+"/team/app:v1")+`\s+`+img.Digest.String()+`$`).MatchString(out) {
		t.Fatalf("admin pins: exit %d\n%s", code, out)
	}

	reg.ResetCounts()
	code, out, errOut = adminRun("purge", reg.Host+"/team/app:v1", "--admin", url)
	if code != 0 || !strings.Contains(out, "purged tag "+reg.Host+"/team/app:v1") || !regexp.MustCompile(`(?m)^\s+tags\s+1$`).MatchString(out) {
		t.Fatalf("admin purge: exit %d\n%s%s", code, out, errOut)
	}
	if code, body := mirrorGet(t, addr, "/v2/team/app/manifests/v1"); code != 200 || !bytes.Equal(body, img.Manifest) {
		t.Fatalf("after the purge: %d", code)
	}
	if n := reg.Count(http.MethodGet, "manifests"); n != 1 {
		t.Fatalf("%d manifest GETs upstream after the purge, want 1", n)
	}
	code, out, _ = adminRun("purge", "--json", "--admin", url, "team/app")
	var pr admin.PurgeResult
	if err := json.Unmarshal([]byte(out), &pr); code != 0 || err != nil || pr.Repository != "team/app" || pr.Dropped.Blobs != 1 || pr.Dropped.Manifests != 1 {
		t.Fatalf("admin purge --json: exit %d %v\n%s", code, err, out)
	}

	for _, tc := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"hosted", []string{"purge", "ci/app", "--admin", url}, 1, "ocimirror admin purge: proxy: purge: a hosted repository"},
		{"digest", []string{"purge", "team/app@" + img.Digest.String(), "--admin", url}, 1, "a digest names content"},
		{"no listener", []string{"stats", "--admin", "http://127.0.0.1:1"}, 1, "connection refused"},
		{"no verb", nil, 2, "name a verb"},
		{"unknown verb", []string{"bogus"}, 2, `unknown verb "bogus"`},
		{"purge without ref", []string{"purge"}, 2, "name one tag or repository"},
		{"extra argument", []string{"stats", "x"}, 2, `unexpected argument "x"`},
		{"bad flag", []string{"stats", "--bogus"}, 2, "Usage: ocimirror admin"},
	} {
		code, _, errOut := adminRun(tc.args...)
		if code != tc.code || !strings.Contains(errOut, tc.want) {
			t.Errorf("%s: exit %d, stderr %q", tc.name, code, errOut)
		}
	}
	if code, out, _ := adminRun("--help"); code != 0 || !strings.Contains(out, "purge REF") {
		t.Errorf("admin --help: exit %d\n%s", code, out)
	}
}
