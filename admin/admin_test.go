package admin_test

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/ocimirror/ocimirror/admin"
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
