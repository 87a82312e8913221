package auth

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ocimirror/ocimirror/config"
	"github.com/ocimirror/ocimirror/internal/metrictest"
)

func TestRules_Allowed(t *testing.T) {
	r := NewRules([]config.AccessRule{
		{Repositories: []string{"ci/team-a/**"}, Users: []string{"alice", "group:team-a"}, Actions: []string{"pull", "push", "delete"}},
		{Repositories: []string{"docker.io/**", "ghcr.io/**"}, Users: []string{"*"}, Actions: []string{"pull"}},
		{Repositories: []string{"docker.io/library/**"}, Anonymous: true, Actions: []string{"pull"}},
		{Repositories: []string{"ci/*/cache"}, Users: []string{"bob"}, Actions: []string{"push"}},
	}, map[string][]string{"team-a": {"carol"}})
	for _, c := range []struct {
		user, name string
		want       Actions
	}{
		{"alice", "ci/team-a/app", Pull | Push | Delete},
		{"alice", "ci/team-a/deep/er/app", Pull | Push | Delete},
		{"carol", "ci/team-a/app", Pull | Push | Delete},
		{"bob", "ci/team-a/app", 0},
		{"bob", "ci/team-b/cache", Push},
		{"bob", "ci/team-b/x/cache", 0}, // * is one component
		{"alice", "ci/team-ab/app", 0},
		{"", "ci/team-a/app", 0},
		{"", "docker.io/library/alpine", Pull},
		{"", "docker.io/private/app", 0},
		{"bob", "docker.io/private/app", Pull},
		{"bob", "ghcr.io/org/app", Pull},
		{"bob", "quay.io/org/app", 0},
		{"", "library/alpine", 0}, // not a canonical name of docker.io
	} {
		if got := r.Allowed(c.user, c.name); got != c.want {
			t.Errorf("Allowed(%q, %q) = %s, want %s", c.user, c.name, got, c.want)
		}
	}
}

func TestParseScope(t *testing.T) {
	for _, c := range []struct {
		in   string
		name string
		want Actions
		ok   bool
	}{
		{"repository:ci/app:pull", "ci/app", Pull, true},
		{"repository:ci/app:pull,push", "ci/app", Pull | Push, true},
		{"repository:127.0.0.1:5000/ci/app:push", "127.0.0.1:5000/ci/app", Push, true},
		{"repository(plugin):ci/app:pull", "ci/app", Pull, true},
		{"repository:ci/app:*", "ci/app", Pull | Push | Delete, true},
		{"registry:catalog:*", "", 0, false},
		{"repository:ci/app:", "", 0, false},
		{"repository:ci/app:read", "", 0, false},
		{"repository::pull", "", 0, false},
		{"nonsense", "", 0, false},
	} {
		name, want, ok := parseScope(c.in)
		if ok != c.ok || ok && (name != c.name || want != c.want) {
			t.Errorf("parseScope(%q) = %q %s %v", c.in, name, want, ok)
		}
	}
}

// A token verifies until it expires, not after; one signed by another
// key, or altered, never.
func TestTokens(t *testing.T) {
	var mu sync.Mutex
	now := time.Unix(2_000_000_000, 0)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	tk := NewTokens(key, 5*time.Minute, clock)
	tok, exp, err := tk.Issue("alice", []ResourceActions{{Type: "repository", Name: "ci/app", Actions: []string{"pull", "push"}}})
	if err != nil || !exp.Equal(now.Add(5*time.Minute)) {
		t.Fatal(exp, err)
	}
	g, err := tk.verify(tok)
	if err != nil || g.user != "alice" || g.access["ci/app"] != Pull|Push || g.access["ci/other"] != 0 {
		t.Fatalf("%+v %v", g, err)
	}
	if _, err := tk.verify(tok); err != nil { // remembered
		t.Fatal(err)
	}
	_, other, _ := ed25519.GenerateKey(rand.Reader)
	forged, _, _ := NewTokens(other, 5*time.Minute, clock).Issue("alice", nil)
	parts := strings.Split(tok, ".")
	for _, bad := range []string{forged, parts[0] + "." + parts[1] + "x." + parts[2], "", "a.b.c", strings.Repeat("a", maxTokenBytes+1)} {
		if _, err := tk.verify(bad); err == nil {
			t.Errorf("verified %.40q", bad)
		}
	}
	mu.Lock()
	now = now.Add(5*time.Minute + 10*time.Second) // past the 5 s leeway
	mu.Unlock()
	if _, err := tk.verify(tok); err == nil {
		t.Fatal("an expired token verified (from the memory of verified tokens)")
	}
	fresh := NewTokens(key, 5*time.Minute, clock)
	if _, err := fresh.verify(tok); err == nil {
		t.Fatal("an expired token verified")
	}
}

func TestLoadOrCreateKey(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "auth", "key.pem")
	if _, err := LoadOrCreateKey(p, false); err == nil {
		t.Fatal("a missing configured key was created")
	}
	k1, err := LoadOrCreateKey(p, true)
	if err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(p); st.Mode().Perm() != 0o600 {
		t.Fatalf("key mode %v", st.Mode())
	}
	k2, err := LoadOrCreateKey(p, true)
	if err != nil || !k1.Equal(k2) {
		t.Fatalf("the key was not kept: %v", err)
	}
	ec, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.MarshalPKCS8PrivateKey(ec)
	ecPath := filepath.Join(dir, "ec.pem")
	os.WriteFile(ecPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600)
	if _, err := LoadOrCreateKey(ecPath, false); err == nil || !strings.Contains(err.Error(), "Ed25519") {
		t.Fatalf("an ECDSA key: %v", err)
	}
}

type oneUser struct{}

func (oneUser) Verify(u, p string) bool { return u == "alice" && p == "pw" }
func (oneUser) Has(u string) bool       { return u == "alice" }

// Failed logins are counted, and each waits (a client that goes does not).
func TestAuthenticate_FailuresCounted(t *testing.T) {
	m := metrictest.New(t)
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	a, err := New(Options{Users: oneUser{}, Rules: NewRules(nil, nil), Tokens: NewTokens(key, time.Minute, nil), MeterProvider: m.Provider})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	r := httptest.NewRequest("GET", "/v2/", nil)
	r.SetBasicAuth("alice", "pw")
	if id, err := a.Authenticate(r); err != nil || id.User != "alice" {
		t.Fatalf("%+v %v", id, err)
	}
	r.SetBasicAuth("alice", "wrong")
	for range 2 {
		if _, err := a.Authenticate(r); err == nil {
			t.Fatal("a wrong password authenticated")
		}
	}
	m.Want("ocimirror_auth_failures_total", 2)
	if f, _ := a.failures.Get("192.0.2.1"); f.count != 2 {
		t.Fatalf("failures of the address: %+v", f)
	}
}

type flipUsers struct{ gone bool }

func (f *flipUsers) Verify(u, p string) bool { return !f.gone && u == "alice" && p == "pw" }
func (f *flipUsers) Has(u string) bool       { return !f.gone && u == "alice" }

// A token of a user removed from the users' file stops working at once.
func TestAuthenticate_RemovedUserToken(t *testing.T) {
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	users := &flipUsers{}
	tokens := NewTokens(key, time.Hour, nil)
	a, _ := New(Options{Users: users, Rules: NewRules(nil, nil), Tokens: tokens})
	defer a.Close()
	tok, _, _ := tokens.Issue("alice", nil)
	r := httptest.NewRequest("GET", "/v2/", nil)
	r.Header.Set("Authorization", "Bearer "+tok)
	if id, err := a.Authenticate(r); err != nil || id.User != "alice" {
		t.Fatalf("%+v %v", id, err)
	}
	users.gone = true
	if _, err := a.Authenticate(r); err == nil {
		t.Fatal("the token of a removed user still authenticates")
	}
}
