package upstream

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// recorder is an upstream that records what it was sent.
type recorder struct {
	mu   sync.Mutex
	reqs []*http.Request
}

func (r *recorder) add(req *http.Request) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.reqs = append(r.reqs, req.Clone(context.Background()))
}

func (r *recorder) all() []*http.Request {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]*http.Request(nil), r.reqs...)
}

func newClient(t *testing.T, url string, creds Credentials) *Client {
	t.Helper()
	c, err := New(Options{Name: "test", URL: url, Credentials: creds, RetryBackoff: time.Millisecond, IdleTimeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func get(t *testing.T, c *Client, repo, path string) (*http.Response, error) {
	t.Helper()
	resp, err := c.Do(context.Background(), Request{Method: http.MethodGet, Repo: repo, Path: path})
	if err == nil {
		t.Cleanup(func() { resp.Body.Close() })
	}
	return resp, err
}

func TestClient_BearerTokenFlow(t *testing.T) {
	var rec recorder
	var tokenReqs []string
	var mu sync.Mutex
	var srv *httptest.Server
	srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/token" {
			mu.Lock()
			tokenReqs = append(tokenReqs, r.URL.RawQuery)
			mu.Unlock()
			user, pass, _ := r.BasicAuth()
			json.NewEncoder(w).Encode(map[string]any{"access_token": "T|" + user + "|" + pass + "|" + r.URL.Query().Get("scope"), "expires_in": 300})
			return
		}
		rec.add(r)
		if !strings.HasPrefix(r.Header.Get("Authorization"), "Bearer T|") {
			w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm="%s/token",service="reg.test"`, srv.URL))
			w.WriteHeader(401)
			return
		}
		fmt.Fprint(w, r.Header.Get("Authorization"))
	}))
	defer srv.Close()

	t.Run("anonymous", func(t *testing.T) {
		c := newClient(t, srv.URL, Credentials{})
		resp, err := get(t, c, "library/alpine", "tags/list")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		if string(b) != "Bearer T|||repository:library/alpine:pull" {
			t.Fatalf("authorization %q", b)
		}
		// The token is cached for the scope; a new scope is fetched before
		// its first request, without another 401.
		rec.reqs, tokenReqs = nil, nil
		get(t, c, "library/alpine", "manifests/3")
		get(t, c, "library/busybox", "manifests/1")
		if n := len(rec.all()); n != 2 {
			t.Errorf("upstream requests: %d, want 2 (no 401 once the realm is known)", n)
		}
		if len(tokenReqs) != 1 || !strings.Contains(tokenReqs[0], "scope=repository%3Alibrary%2Fbusybox%3Apull") || !strings.Contains(tokenReqs[0], "service=reg.test") {
			t.Errorf("token requests %q", tokenReqs)
		}
	})
	t.Run("credentials", func(t *testing.T) {
		c := newClient(t, srv.URL, Credentials{Username: "u", Password: "p"})
		resp, err := get(t, c, "org/app", "tags/list")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		if string(b) != "Bearer T|u|p|repository:org/app:pull" {
			t.Fatalf("authorization %q", b)
		}
	})
}

func TestClient_TokenCredentialsNotSentInClearToAnotherHost(t *testing.T) {
	var got string
	tokens := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got = r.Header.Get("Authorization")
		json.NewEncoder(w).Encode(map[string]any{"token": "x"})
	}))
	defer tokens.Close()
	// Same IP, different port: another host for credentials.
	reg := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") == "" {
			w.Header().Set("WWW-Authenticate", `Bearer realm="`+tokens.URL+`/token"`)
			w.WriteHeader(401)
		}
	}))
	defer reg.Close()
	c := newClient(t, reg.URL, Credentials{Username: "u", Password: "secret"})
	if _, err := get(t, c, "a", "tags/list"); err != nil {
		t.Fatal(err)
	}
	if got != "" {
		t.Errorf("credentials sent over plain HTTP to another host: %q", got)
	}
}

func TestClient_BasicAuth(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if u, p, ok := r.BasicAuth(); !ok || u != "u" || p != "p" {
			w.Header().Set("WWW-Authenticate", `Basic realm="reg"`)
			w.WriteHeader(401)
			return
		}
		fmt.Fprint(w, "ok")
	}))
	defer srv.Close()
	if _, err := get(t, newClient(t, srv.URL, Credentials{Username: "u", Password: "p"}), "a", "tags/list"); err != nil {
		t.Fatalf("with credentials: %v", err)
	}
	_, err := get(t, newClient(t, srv.URL, Credentials{}), "a", "tags/list")
	if !errors.Is(err, ErrDenied) {
		t.Fatalf("without credentials: %v, want ErrDenied", err)
	}
}

func TestClient_StaticToken(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, r.Header.Get("Authorization"))
	}))
	defer srv.Close()
	resp, err := get(t, newClient(t, srv.URL, Credentials{Token: "abc"}), "a", "tags/list")
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := io.ReadAll(resp.Body); string(b) != "Bearer abc" {
		t.Fatalf("authorization %q", b)
	}
}

func TestClient_RedirectDropsCredentials(t *testing.T) {
	var cdnAuth, cdnCookie string
	cdn := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cdnAuth, cdnCookie = r.Header.Get("Authorization"), r.Header.Get("Cookie")
		fmt.Fprint(w, "blob bytes")
	}))
	defer cdn.Close()
	reg := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, cdn.URL+"/signed?sig=1", http.StatusTemporaryRedirect)
	}))
	defer reg.Close()
	c := newClient(t, reg.URL, Credentials{Token: "secret"})
	resp, err := c.Do(context.Background(), Request{Method: http.MethodGet, Repo: "a", Path: "blobs/x", Header: http.Header{"Cookie": {"c=1"}}})
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if b, _ := io.ReadAll(resp.Body); string(b) != "blob bytes" {
		t.Fatalf("body %q", b)
	}
	if cdnAuth != "" || cdnCookie != "" {
		t.Errorf("credentials followed the redirect: %q %q", cdnAuth, cdnCookie)
	}
}

func TestClient_Retries(t *testing.T) {
	calls := 0
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls++
		if calls < 3 {
			w.WriteHeader(503)
			return
		}
		fmt.Fprint(w, "ok")
	}))
	defer srv.Close()
	c := newClient(t, srv.URL, Credentials{})
	if _, err := get(t, c, "a", "tags/list"); err != nil || calls != 3 {
		t.Fatalf("after two 503s: %v, %d calls", err, calls)
	}
	calls = -10
	_, err := get(t, c, "a", "tags/list")
	var se *StatusError
	if !errors.As(err, &se) || se.Status != 503 || !errors.Is(err, ErrUnavailable) || calls != -7 {
		t.Fatalf("persistent 503: %v after %d calls", err, calls+10)
	}

	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close() // nothing listens here now
	_, err = get(t, newClient(t, "http://"+addr, Credentials{}), "a", "tags/list")
	if !errors.Is(err, ErrUnavailable) || !Transient(err) {
		t.Fatalf("connection refused: %v", err)
	}
}

func TestClient_NotFoundAndDenied(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/v2/missing/tags/list":
			w.WriteHeader(404)
			fmt.Fprint(w, `{"errors":[{"code":"NAME_UNKNOWN"}]}`)
		default:
			w.WriteHeader(403)
		}
	}))
	defer srv.Close()
	c := newClient(t, srv.URL, Credentials{})
	_, err := get(t, c, "missing", "tags/list")
	var se *StatusError
	if !errors.Is(err, ErrNotFound) || !errors.As(err, &se) || !strings.Contains(string(se.Body), "NAME_UNKNOWN") || Transient(err) {
		t.Fatalf("404: %v", err)
	}
	if _, err := get(t, c, "forbidden", "tags/list"); !errors.Is(err, ErrDenied) || Transient(err) {
		t.Fatalf("403: %v", err)
	}
}

func TestClient_RateLimit(t *testing.T) {
	calls := 0
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls++
		w.Header().Set("Retry-After", "60")
		w.WriteHeader(429)
	}))
	defer srv.Close()
	c := newClient(t, srv.URL, Credentials{})
	_, err := get(t, c, "a", "manifests/v1")
	var se *StatusError
	if !errors.As(err, &se) || se.Status != 429 || se.RetryAfter != time.Minute || !Transient(err) {
		t.Fatalf("429: %v", err)
	}
	_, err = get(t, c, "a", "manifests/v1")
	if !errors.Is(err, ErrTooManyRequests) || calls != 1 {
		t.Fatalf("within Retry-After: %v, %d upstream calls", err, calls)
	}
}

func TestClient_NoCompression(t *testing.T) {
	var acceptEncoding string
	raw := "\x1f\x8b not really gzip, but a layer's bytes"
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		acceptEncoding = r.Header.Get("Accept-Encoding")
		w.Header().Set("Content-Encoding", "gzip")
		fmt.Fprint(w, raw)
	}))
	defer srv.Close()
	resp, err := newClient(t, srv.URL, Credentials{}).Blob(context.Background(), http.MethodGet, "a", digest.FromString(raw), 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if string(b) != raw || acceptEncoding != "" {
		t.Fatalf("body %q, Accept-Encoding %q", b, acceptEncoding)
	}
}

func TestClient_IdleBodyIsCut(t *testing.T) {
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "100")
		w.WriteHeader(200)
		w.Write([]byte("first"))
		w.(http.Flusher).Flush()
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	defer srv.Close()
	defer close(release)
	resp, err := get(t, newClient(t, srv.URL, Credentials{}), "a", "blobs/x")
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err = io.ReadAll(resp.Body)
	if err == nil || time.Since(start) > 10*time.Second {
		t.Fatalf("stalled body: err %v after %v", err, time.Since(start))
	}
}

func TestClient_RangeRequest(t *testing.T) {
	var got []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got = append(got, r.Header.Get("Range"))
	}))
	defer srv.Close()
	c := newClient(t, srv.URL, Credentials{})
	d := digest.FromString("x")
	for _, off := range [][2]int64{{0, 0}, {10, 0}, {10, 100}} {
		resp, err := c.Blob(context.Background(), http.MethodGet, "a", d, off[0], off[1])
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
	}
	if strings.Join(got, "|") != "|bytes=10-|bytes=10-99" {
		t.Fatalf("ranges %q", got)
	}
}

func TestParseChallenges(t *testing.T) {
	cs := parseChallenges([]string{
		`Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push"`,
		`Basic realm="a \"quoted\" realm"`,
		`bearer realm=https://x/token, service=svc`,
	})
	if len(cs) != 3 {
		t.Fatalf("%d challenges", len(cs))
	}
	if cs[0].scheme != "bearer" || cs[0].params["realm"] != "https://auth.docker.io/token" ||
		cs[0].params["service"] != "registry.docker.io" || cs[0].params["scope"] != "repository:library/alpine:pull,push" {
		t.Errorf("bearer: %+v", cs[0])
	}
	if cs[1].scheme != "basic" || cs[1].params["realm"] != `a "quoted" realm` {
		t.Errorf("basic: %+v", cs[1])
	}
	if cs[2].params["realm"] != "https://x/token" || cs[2].params["service"] != "svc" {
		t.Errorf("unquoted: %+v", cs[2])
	}
}

func TestDockerConfigCredentials(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config.json")
	cfg := `{"auths":{
		"https://index.docker.io/v1/":{"auth":"` + base64.StdEncoding.EncodeToString([]byte("hub:pw:with:colons")) + `"},
		"ghcr.io":{"username":"gh","password":"tok"},
		"reg.example":{"registrytoken":"rt"},
		"helper.example":{"identitytoken":"it"}}}`
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		host string
		want Credentials
		err  bool
	}{
		{"docker.io", Credentials{Username: "hub", Password: "pw:with:colons"}, false},
		{"ghcr.io", Credentials{Username: "gh", Password: "tok"}, false},
		{"reg.example", Credentials{Token: "rt"}, false},
		{"helper.example", Credentials{}, true},
		{"quay.io", Credentials{}, true},
	}
	for _, tc := range tests {
		got, err := DockerConfigCredentials(path, tc.host)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("%s: %+v %v", tc.host, got, err)
		}
	}
}
