package admin_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/ocimirror/ocimirror/admin"
	"github.com/ocimirror/ocimirror/bundle"
	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/upstream"
)

func TestHealthAndReadiness(t *testing.T) {
	up, _ := upstream.New(upstream.Options{Name: "up.test", URL: "http://127.0.0.1:1"})
	off, _ := upstream.New(upstream.Options{Name: "off.test", URL: "http://127.0.0.1:1", Offline: true})
	var pingErr error
	h := admin.Handler(admin.Options{Ping: func(context.Context) error { return pingErr },
		Upstreams: map[string]*upstream.Client{"up.test": up, "off.test": off}})
	srv := httptest.NewServer(h)
	defer srv.Close()
	get := func(path string) (int, map[string]any) {
		t.Helper()
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var body map[string]any
		if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		return resp.StatusCode, body
	}
	if st, _ := get("/healthz"); st != 200 {
		t.Fatalf("healthz: %d", st)
	}
	st, body := get("/readyz")
	ups, _ := body["upstreams"].(map[string]any)
	state := func(n string) any { m, _ := ups[n].(map[string]any); return m["state"] }
	if st != 200 || body["status"] != "ready" || state("up.test") != "up" || state("off.test") != "offline" {
		t.Fatalf("readyz: %d %v", st, body)
	}
	pingErr = errors.New("cache: store not writable: disk full")
	if st, body := get("/readyz"); st != 503 || body["status"] != "not ready" || body["store"] != pingErr.Error() {
		t.Fatalf("readyz with the store failing: %d %v", st, body)
	}
	if resp, err := http.Get(srv.URL + "/v2/"); err != nil || resp.StatusCode != 404 {
		t.Fatalf("the registry API is not on the admin listener: %v %v", resp, err)
	}
}

// POST /import hands the body to Import and answers what it says: 200
// with the result, 400 for a refused bundle, 507 for a full store, 500
// otherwise, with the error in the body; without Import, no endpoint.
func TestImport(t *testing.T) {
	var got struct{ body, repository string }
	var result error
	h := admin.Handler(admin.Options{Ping: func(context.Context) error { return nil },
		Import: func(_ context.Context, r io.Reader, repository string) (*bundle.ImportResult, error) {
			b, _ := io.ReadAll(io.LimitReader(r, 4))
			got.body, got.repository = string(b), repository
			if result != nil {
				return nil, result
			}
			return &bundle.ImportResult{Images: []bundle.ImportedImage{{Name: "docker.io/library/alpine:3"}}}, nil
		}})
	srv := httptest.NewServer(h)
	defer srv.Close()
	tests := []struct {
		name   string
		err    error
		status int
		says   string
	}{
		{"imported", nil, 200, `"name": "docker.io/library/alpine:3"`},
		{"refused", fmt.Errorf("%w: entry %q: its bytes hash to x", bundle.ErrDigest, "blobs/sha256/a"), 400, `its bytes hash to x`},
		{"damaged", bundle.ErrDamaged, 400, "cut short"},
		{"invalid", bundle.ErrInvalid, 400, "invalid bundle"},
		{"full", cache.ErrFull, 507, "store full"},
		{"other", errors.New("disk on fire"), 500, "disk on fire"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			result = tc.err
			resp, err := http.Post(srv.URL+"/import?repository=registry.example/app", "application/x-tar", strings.NewReader(strings.Repeat("tar!", 100000)))
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.status || !strings.Contains(string(body), tc.says) || resp.Header.Get("Content-Type") != "application/json" {
				t.Errorf("status %d, body %s", resp.StatusCode, body)
			}
			if got.body != "tar!" || got.repository != "registry.example/app" {
				t.Errorf("Import got %+v", got)
			}
		})
	}
	none := httptest.NewServer(admin.Handler(admin.Options{Ping: func(context.Context) error { return nil }}))
	defer none.Close()
	if resp, err := http.Post(none.URL+"/import", "application/x-tar", strings.NewReader("x")); err != nil || resp.StatusCode != 404 {
		t.Errorf("without Import: %v %v", resp.StatusCode, err)
	}
}

// GET /stats adds the upstreams' states to the store's figures; POST
// /purge takes the reference from the query or a JSON body and maps
// ErrInvalid to 400, ErrRefused to 409, anything else to 500; GET /pins
// lists the pins, an empty list as [].
func TestStatsPurgePins(t *testing.T) {
	up, _ := upstream.New(upstream.Options{Name: "up.test", URL: "http://127.0.0.1:1"})
	var purged []string
	var pins []admin.Pin
	h := admin.Handler(admin.Options{Ping: func(context.Context) error { return nil },
		Upstreams: map[string]*upstream.Client{"up.test": up},
		Stats: func(context.Context) (admin.StoreStats, error) {
			return admin.StoreStats{Bytes: 4096, BudgetBytes: 1 << 30, PinnedBytes: 100, Counts: cache.Counts{Blobs: 3, Tags: 2}}, nil
		},
		Purge: func(_ context.Context, ref string) (admin.PurgeResult, error) {
			purged = append(purged, ref)
			switch ref {
			case "ci/app":
				return admin.PurgeResult{}, fmt.Errorf("%w: hosted", admin.ErrRefused)
			case "bad@":
				return admin.PurgeResult{}, fmt.Errorf("%w: digest", admin.ErrInvalid)
			case "broken":
				return admin.PurgeResult{}, errors.New("disk on fire")
			}
			return admin.PurgeResult{Upstream: "up.test", Repository: "app", Dropped: cache.Purged{Tags: 2, Blobs: 5}}, nil
		},
		Pins: func(context.Context) ([]admin.Pin, error) { return pins, nil },
	})
	srv := httptest.NewServer(h)
	defer srv.Close()
	call := func(method, path, body string) (int, string) {
		t.Helper()
		req, _ := http.NewRequest(method, srv.URL+path, strings.NewReader(body))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if ct := resp.Header.Get("Content-Type"); ct != "application/json" && resp.StatusCode != http.StatusMethodNotAllowed {
			t.Fatalf("%s %s: Content-Type %q", method, path, ct)
		}
		return resp.StatusCode, string(b)
	}

	st, body := call("GET", "/stats", "")
	var stats admin.Stats
	if err := json.Unmarshal([]byte(body), &stats); err != nil || st != 200 || stats.Store.Bytes != 4096 || stats.Store.Counts.Blobs != 3 ||
		stats.Upstreams["up.test"].State != "up" {
		t.Fatalf("stats: %d %s", st, body)
	}

	tests := []struct {
		name, path, body string
		status           int
		want             string
	}{
		{"query", "/purge?ref=up.test%2Fapp", "", 200, `"blobs": 5`},
		{"json body", "/purge", `{"ref":"up.test/app"}`, 200, `"ref": "up.test/app"`},
		{"hosted", "/purge?ref=ci/app", "", 409, `"error": "admin: refused: hosted"`},
		{"invalid", "/purge?ref=bad@", "", 400, "digest"},
		{"failure", "/purge?ref=broken", "", 500, "disk on fire"},
		{"no ref", "/purge", "", 400, "name a tag or a repository"},
		{"bad body", "/purge", "{", 400, "body"},
	}
	for _, tc := range tests {
		if st, body := call("POST", tc.path, tc.body); st != tc.status || !strings.Contains(body, tc.want) {
			t.Errorf("%s: %d %s", tc.name, st, body)
		}
	}
	if strings.Join(purged, ",") != "up.test/app,up.test/app,ci/app,bad@,broken" {
		t.Fatalf("purged %v", purged)
	}
	if st, _ := call("GET", "/purge?ref=x", ""); st != http.StatusMethodNotAllowed {
		t.Fatalf("GET /purge: %d", st)
	}

	if st, body := call("GET", "/pins", ""); st != 200 || !strings.Contains(body, `"pins": []`) {
		t.Fatalf("no pins: %d %s", st, body)
	}
	pins = []admin.Pin{{Ref: "up.test/app:v1", Source: "config", Repository: "app", Tag: "v1", Digest: "sha256:abc"}}
	if st, body := call("GET", "/pins", ""); st != 200 || !strings.Contains(body, `"source": "config"`) || strings.Contains(body, `"at"`) {
		t.Fatalf("pins: %d %s", st, body)
	}
}

// A shared tier that does not answer leaves the replica ready, degraded,
// and says so; the members it sees are listed.
func TestReadiness_SharedTier(t *testing.T) {
	var sharedErr error
	h := admin.Handler(admin.Options{Ping: func(context.Context) error { return nil },
		Shared:  func(context.Context) error { return sharedErr },
		Members: func() []string { return []string{"http://a:5000", "http://b:5000"} }})
	srv := httptest.NewServer(h)
	defer srv.Close()
	get := func() (int, map[string]any) {
		t.Helper()
		resp, err := http.Get(srv.URL + "/readyz")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var body map[string]any
		if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
			t.Fatal(err)
		}
		return resp.StatusCode, body
	}
	if st, body := get(); st != 200 || body["status"] != "ready" || body["shared"] != "ok" || len(body["members"].([]any)) != 2 {
		t.Fatalf("readyz: %d %v", st, body)
	}
	sharedErr = errors.New("s3: dial tcp 127.0.0.1:8333: connection refused")
	if st, body := get(); st != 200 || body["status"] != "degraded" || body["shared"] != "down: "+sharedErr.Error() {
		t.Fatalf("readyz with the shared tier down: %d %v", st, body)
	}
}
