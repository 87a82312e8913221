package upstream

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"runtime/metrics"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// tokenRegistry is an upstream that wants a bearer token for every
// repository, with its token server, on one 127.0.0.1 listener. The n-th
// token issued is "T<n>|<scope>|" padded to size bytes; the registry
// accepts a token for the request's scope and answers with its "T<n>".
type tokenRegistry struct {
	*httptest.Server
	opts   tokenRegistryOptions
	issued atomic.Int64

	mu      sync.Mutex
	byScope map[string]int // token requests per scope
}

type tokenRegistryOptions struct {
	size      int // pad tokens to this many bytes
	expiresIn int // expires_in of every token (none if 0)
	// hold, if set, is called as a token request arrives, before the
	// token is issued; it may block.
	hold func(r *http.Request, scope string)
}

func newTokenRegistry(t *testing.T, o tokenRegistryOptions) *tokenRegistry {
	t.Helper()
	reg := &tokenRegistry{opts: o, byScope: map[string]int{}}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	reg.Server = httptest.NewUnstartedServer(http.HandlerFunc(reg.serve))
	reg.Listener.Close()
	reg.Listener = ln
	reg.Start()
	t.Cleanup(reg.Close)
	return reg
}

func (reg *tokenRegistry) serve(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/token" {
		scope := r.URL.Query().Get("scope")
		reg.mu.Lock()
		reg.byScope[scope]++
		reg.mu.Unlock()
		if reg.opts.hold != nil {
			reg.opts.hold(r, scope)
		}
		tok := "T" + strconv.FormatInt(reg.issued.Add(1), 10) + "|" + scope + "|"
		if pad := reg.opts.size - len(tok); pad > 0 {
			tok += strings.Repeat("x", pad)
		}
		answer := map[string]any{"token": tok}
		if reg.opts.expiresIn > 0 {
			answer["expires_in"] = reg.opts.expiresIn
		}
		json.NewEncoder(w).Encode(answer)
		return
	}
	repo := strings.TrimSuffix(strings.TrimPrefix(r.URL.Path, "/v2/"), "/tags/list")
	n, rest, _ := strings.Cut(strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer "), "|")
	if !strings.HasPrefix(rest, "repository:"+repo+":pull|") {
		w.Header().Set("WWW-Authenticate", `Bearer realm="`+reg.URL+`/token",service="reg.test"`)
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	fmt.Fprint(w, n)
}

// tokenRequests is how many token requests named scope.
func (reg *tokenRegistry) tokenRequests(scope string) int {
	reg.mu.Lock()
	defer reg.mu.Unlock()
	return reg.byScope[scope]
}

// tagList lists repo's tags and returns the body: the "T<n>" of the token
// the client presented.
func tagList(ctx context.Context, c *Client, repo string) (string, error) {
	resp, err := c.Do(ctx, Request{Method: http.MethodGet, Repo: repo, Path: "tags/list"})
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

func liveHeap() uint64 {
	runtime.GC()
	s := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

// A client naming a new repository on every request must not grow the
// token cache, and the memory holding it, without end.
func TestClient_TokenCache_Bounded(t *testing.T) {
	// 4 KiB tokens, a large JWT, and a small bound keep the test short:
	// unbounded, 4000 scopes would hold more than 16 MiB of tokens;
	// bounded, 256 hold 1 MiB.
	const repos, workers, bound = 4000, 8, 256
	reg := newTokenRegistry(t, tokenRegistryOptions{size: 4 << 10})
	c, err := New(Options{Name: "test", URL: reg.URL, MaxTokens: bound, RetryBackoff: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tagList(context.Background(), c, "warm"); err != nil {
		t.Fatal(err)
	}
	before := liveHeap()

	var next atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for i := next.Add(1); i <= repos; i = next.Add(1) {
				if _, err := tagList(context.Background(), c, fmt.Sprintf("org/app-%05d", i)); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}

	after := liveHeap()
	if n := c.auth.tokenCount(); n != bound {
		t.Errorf("token cache holds %d scopes after %d, want the bound %d", n, repos+1, bound)
	}
	if n := reg.issued.Load(); n != repos+1 {
		t.Errorf("%d tokens issued, want %d (one per repository)", n, repos+1)
	}
	const limit = 8 << 20
	growth := int64(after) - int64(before)
	t.Logf("live heap %d -> %d bytes (%+d) over %d scopes", before, after, growth, repos)
	if growth > limit {
		t.Errorf("live heap grew by %d bytes over %d scopes, want < %d", growth, repos, limit)
	}
	runtime.KeepAlive(c)
}

func TestClient_TokenCache_MaxTokens(t *testing.T) {
	reg := newTokenRegistry(t, tokenRegistryOptions{})
	c, err := New(Options{Name: "test", URL: reg.URL, MaxTokens: 8, RetryBackoff: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for i := range 100 {
		if _, err := tagList(ctx, c, fmt.Sprintf("r%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	if n := c.auth.tokenCount(); n != 8 {
		t.Fatalf("token cache holds %d scopes, want 8", n)
	}
	// The most recent scopes keep their tokens; the oldest was dropped.
	for _, tc := range []struct {
		name     string
		repo     string
		requests int
	}{
		{name: "recent", repo: "r99", requests: 1},
		{name: "evicted", repo: "r0", requests: 2},
	} {
		if _, err := tagList(ctx, c, tc.repo); err != nil {
			t.Fatal(err)
		}
		if n := reg.tokenRequests("repository:" + tc.repo + ":pull"); n != tc.requests {
			t.Errorf("%s: %d token requests for %s, want %d", tc.name, n, tc.repo, tc.requests)
		}
	}
}

func TestClient_TokenCache_OversizedTokenNotKept(t *testing.T) {
	reg := newTokenRegistry(t, tokenRegistryOptions{size: maxCachedToken + 1})
	c := newClient(t, reg.URL, Credentials{})
	const scope = "repository:big:pull"
	if _, err := tagList(context.Background(), c, "big"); err != nil {
		t.Fatal(err)
	}
	n := reg.tokenRequests(scope)
	if _, err := tagList(context.Background(), c, "big"); err != nil {
		t.Fatal(err)
	}
	if again, m := reg.tokenRequests(scope)-n, c.auth.tokenCount(); again != 1 || m != 0 {
		t.Fatalf("second request: %d token requests, %d scopes cached; want 1 and 0", again, m)
	}
}

// fakeClock is a settable clock for the authenticator.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

func TestClient_TokenCache_ExpiredTokenNotReused(t *testing.T) {
	reg := newTokenRegistry(t, tokenRegistryOptions{expiresIn: 1})
	c := newClient(t, reg.URL, Credentials{})
	clock := &fakeClock{now: time.Now()}
	c.auth.now = clock.Now
	ctx := context.Background()
	const scope = "repository:a:pull"

	steps := []struct {
		name    string
		advance time.Duration
		token   string
	}{
		{name: "first", token: "T1"},
		{name: "within expires_in", advance: 500 * time.Millisecond, token: "T1"},
		{name: "after expires_in", advance: time.Second, token: "T2"},
	}
	for _, s := range steps {
		clock.Advance(s.advance)
		got, err := tagList(ctx, c, "a")
		if err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		if got != s.token {
			t.Fatalf("%s: request carried token %q, want %q", s.name, got, s.token)
		}
	}
	if n := reg.tokenRequests(scope); n != 2 {
		t.Errorf("%d token requests, want 2", n)
	}
	// An expired token found in the cache is dropped.
	clock.Advance(2 * time.Second)
	if _, ok := c.auth.cached(scope); ok {
		t.Error("expired token returned from the cache")
	}
	if n := c.auth.tokenCount(); n != 0 {
		t.Errorf("token cache holds %d scopes after the expired one was seen, want 0", n)
	}
}

// The token fetch two callers share must not fail when the caller that
// started it hangs up.
func TestClient_TokenFetch_FirstCallerLeaves(t *testing.T) {
	const scope = "repository:slow:pull"
	arrived := make(chan struct{}, 4)
	release := make(chan struct{})
	reg := newTokenRegistry(t, tokenRegistryOptions{hold: func(r *http.Request, s string) {
		if s != scope {
			return
		}
		arrived <- struct{}{}
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}})
	var once sync.Once
	unblock := func() { once.Do(func() { close(release) }) }
	t.Cleanup(unblock) // before the server closes
	c := newClient(t, reg.URL, Credentials{})
	// Learn the realm, so both callers go straight to the token server.
	if _, err := tagList(context.Background(), c, "warm"); err != nil {
		t.Fatal(err)
	}

	first, leave := context.WithCancel(context.Background())
	defer leave()
	firstErr := make(chan error, 1)
	go func() {
		_, err := tagList(first, c, "slow")
		firstErr <- err
	}()
	select {
	case <-arrived:
	case <-time.After(10 * time.Second):
		t.Fatal("no token request from the first caller")
	}

	type result struct {
		token string
		err   error
	}
	second := make(chan result, 1)
	go func() {
		tok, err := tagList(context.Background(), c, "slow")
		second <- result{tok, err}
	}()

	leave()
	select {
	case err := <-firstErr:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("first caller: %v, want context.Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("first caller still waiting after its context ended")
	}
	// Give the second caller time to join the fetch in flight. Had it not
	// joined yet, it finds the token in the cache: either way, one fetch.
	time.Sleep(50 * time.Millisecond)
	unblock()

	select {
	case r := <-second:
		if r.err != nil || r.token != "T2" {
			t.Fatalf("second caller: token %q, %v; want T2", r.token, r.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("second caller got no answer")
	}
	if n := reg.tokenRequests(scope); n != 1 {
		t.Errorf("%d token requests for %s, want 1", n, scope)
	}
}
