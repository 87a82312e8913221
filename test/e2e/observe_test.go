package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"
)

// slowUpstream is a reverse proxy in front of a registry that holds every
// manifest and blob GET for delay before passing it on: a distant
// upstream, so that clients who ask at about the same time find the first
// one's fetch still running. Closing it refuses connections, as a stopped
// upstream does.
func slowUpstream(t *testing.T, target string, delay time.Duration) *httptest.Server {
	t.Helper()
	u, _ := url.Parse("http://" + target)
	rp := httputil.NewSingleHostReverseProxy(u)
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet && (strings.Contains(r.URL.Path, "/manifests/") || strings.Contains(r.URL.Path, "/blobs/")) {
			time.Sleep(delay)
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(ts.Close)
	return ts
}

// imageParts are the digests and sizes of one image manifest's blobs.
type imageParts struct {
	manifestSize int64
	blobs        map[string]int64 // config and layers
}

func (p imageParts) size() int64 {
	n := p.manifestSize
	for _, s := range p.blobs {
		n += s
	}
	return n
}

func describeImage(t *testing.T, crane, ref string) imageParts {
	t.Helper()
	raw := run(t, nil, crane, "--insecure", "manifest", ref)
	var m struct {
		Config struct {
			Digest string
			Size   int64
		}
		Layers []struct {
			Digest string
			Size   int64
		}
	}
	if err := json.Unmarshal([]byte(raw), &m); err != nil || m.Config.Digest == "" {
		t.Fatalf("manifest of %s: %v\n%s", ref, err, raw)
	}
	p := imageParts{manifestSize: int64(len(strings.TrimRight(raw, "\n"))), blobs: map[string]int64{m.Config.Digest: m.Config.Size}}
	for _, l := range m.Layers {
		p.blobs[l.Digest] = l.Size
	}
	return p
}

// TestE2E_Observe_Prometheus: a real Prometheus scrapes ocimirror through
// what an operator lives through: a cold pull by four clients at once, a
// warm pull, a tag past its TTL, the upstream stopped, and misses while it
// is down. Prometheus's answers then hold exact counts: per blob one miss
// and three coalesced, then a hit; the upstream's bytes are the image's,
// once; a stale tag; the upstream marked down; the misses it was not asked
// for. Every expression of the Grafana board and the alerting rules is
// then evaluated on that data, and refers only to series ocimirror
// exports.
func TestE2E_Observe_Prometheus(t *testing.T) {
	crane := tool(t, "crane")
	tool(t, "prometheus")
	up := startDistribution(t, "registry")
	seedImages(t, up.host)
	slow := slowUpstream(t, up.host, time.Second)
	upHost := strings.TrimPrefix(slow.URL, "http://")
	const ttl = 6 * time.Second
	om := startMirror(t, mirrorConfig("up.test", upHost, "    tagTTL: 6s\n"))
	admin := om.adminHost(t)
	p := startPrometheus(t, admin)

	ref := om.host + "/e2e/app:amd64-oci"
	img := describeImage(t, crane, up.host+"/e2e/app:amd64-oci")
	n := float64(len(img.blobs))
	dir := t.TempDir()

	// Cold: four clients at once.
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if out, err := runErr("", nil, crane, "--insecure", "pull", "--format", "oci", ref, fmt.Sprintf("%s/cold%d", dir, i)); err != nil {
				t.Errorf("cold pull %d: %v\n%s", i, err, out)
			}
		}()
	}
	wg.Wait()
	// Warm: one client, within the tag's TTL.
	run(t, nil, crane, "--insecure", "pull", "--format", "oci", ref, dir+"/warm")
	// The tag past its TTL: revalidated with a HEAD.
	time.Sleep(ttl + 100*time.Millisecond)
	run(t, nil, crane, "--insecure", "digest", ref)

	// The upstream stops. Past the TTL, the tag is answered stale; three
	// tags never fetched fail to connect, and the breaker marks the
	// upstream down; one more is a miss it is not asked for.
	slow.Close()
	up.stop()
	time.Sleep(ttl + 100*time.Millisecond)
	run(t, nil, crane, "--insecure", "digest", ref)
	for _, tag := range []string{"arm64-oci", "amd64-docker", "arm64-docker", "multi-docker"} {
		if out, err := runErr("", nil, crane, "--insecure", "digest", om.host+"/e2e/app:"+tag); err == nil {
			t.Fatalf("%s resolved with the upstream stopped: %s", tag, out)
		}
	}

	p.waitScrape(t)
	value := func(expr string) float64 {
		t.Helper()
		s := p.query(t, expr)
		if len(s) != 1 {
			t.Fatalf("%s: %d samples %v, want 1", expr, len(s), s)
		}
		return s[0].value
	}
	want := func(expr string, w float64) {
		t.Helper()
		if got := value(expr); got != w {
			t.Errorf("%s = %v, want %v", expr, got, w)
		}
	}
	cache := func(kind, result string) string {
		return fmt.Sprintf(`ocimirror_cache_requests_total{kind=%q,result=%q}`, kind, result)
	}
	want(cache("blob", "miss"), n)
	want(cache("blob", "coalesced"), 3*n)
	want(cache("blob", "hit"), n) // the warm pull
	want(cache("tag", "coalesced"), 3)
	want(cache("tag", "hit"), 1) // the warm pull
	want(cache("tag", "revalidated"), 1)
	want(cache("tag", "stale"), 1)
	if v := value(cache("tag", "miss")); v < 1+3 {
		t.Errorf("%v tag misses, want the cold pull's and at least 3 with the upstream stopped", v)
	}
	if v := value(cache("tag", "offline_miss")); v < 1 {
		t.Errorf("no miss counted as not asked of the down upstream")
	}
	want(`ocimirror_upstream_bytes_total{upstream="up.test"}`, float64(img.size()))
	want(`ocimirror_upstream_up{upstream="up.test"}`, 0)
	want(`sum(ocimirror_served_bytes_total{source="upstream"})`, float64(4*img.size()))
	want(`ocimirror_fills_in_flight`, 0)
	if v := value(`sum(ocimirror_upstream_requests_total{upstream="up.test",code="error"})`); v < 3 {
		t.Errorf("%v upstream requests without an answer counted, want at least 3", v)
	}
	if v := value(`sum(ocimirror_http_requests_total{route="blob",method="GET",code="200"})`); v != 5*n {
		t.Errorf("%v blob GETs answered 200, want %v", v, 5*n)
	}

	// The board and the rules, on this data.
	checkExprsAgainstMetrics(t, p, exportedSeries(t, admin))
	for _, r := range p.waitRules(t) {
		if r.Health != "ok" {
			t.Errorf("rule %s: health %s %s", r.Name, r.Health, r.LastError)
		}
	}
	if t.Failed() {
		t.Logf("ocimirror's log:\n%s", tail(om.log.String(), 8000))
	}
}
