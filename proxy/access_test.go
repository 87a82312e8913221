package proxy_test

import (
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/ocimirror/ocimirror/auth"
	"github.com/ocimirror/ocimirror/config"
	"github.com/ocimirror/ocimirror/internal/registrytest"
)

// passwords are the test's users (the htpasswd file's own tests are in
// auth/).
type passwords map[string]string

func (p passwords) Verify(user, password string) bool {
	want, ok := p[user]
	return ok && want == password
}

func (p passwords) Has(user string) bool { _, ok := p[user]; return ok }

var testUsers = passwords{"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw", "dave": "dave-pw", "root": "root-pw"}

func basic(user string) string {
	return "Authorization: Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"+testUsers[user]))
}

// newAuth returns an Authenticator with the rules of the README's example,
// over an upstream named upHost:
//   - ci/team-a/**: alice and group team-a (carol) pull, push, delete; bob pull;
//   - upHost/** : any user pulls;
//   - upHost/library/**: anonymous pulls;
//   - upHost/private/**: only root;
//   - **: root does everything.
//
// A decoy grants anonymous clients everything on team/**, the name as a
// default-routed request writes it: rules see canonical names only.
func newAuth(t testing.TB, upHost string) *auth.Authenticator {
	t.Helper()
	rules := []config.AccessRule{
		{Repositories: []string{"ci/team-a/**"}, Users: []string{"alice", "group:team-a"}, Actions: []string{"pull", "push", "delete"}},
		{Repositories: []string{"ci/team-a/**"}, Users: []string{"bob"}, Actions: []string{"pull"}},
		{Repositories: []string{upHost + "/team/**", upHost + "/library/**"}, Users: []string{"*"}, Actions: []string{"pull"}},
		{Repositories: []string{upHost + "/library/**"}, Anonymous: true, Actions: []string{"pull"}},
		{Repositories: []string{"**"}, Users: []string{"root"}, Actions: []string{"pull", "push", "delete"}},
		{Repositories: []string{"team/**", "library/**"}, Anonymous: true, Actions: []string{"pull", "push", "delete"}},
	}
	_, key, _ := ed25519.GenerateKey(nil)
	a, err := auth.New(auth.Options{Users: testUsers, Rules: auth.NewRules(rules, map[string][]string{"team-a": {"carol"}}),
		Tokens: auth.NewTokens(key, 5*time.Minute, nil)})
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func startWithAuth(t *testing.T) (*env, *registrytest.Registry) {
	t.Helper()
	reg := registrytest.New(t)
	e, _ := start(t, withUpstream(upstreamDef{name: reg.Host, reg: reg}), withDefault(reg.Host), withHosted("ci/"),
		withAuth(newAuth(t, reg.Host)))
	return e, reg
}

// Every action against every route: a proxied repository reached by the
// default upstream, a host prefix and ?ns=, and a hosted one. What the
// rules grant on the canonical name is allowed, nothing else: an anonymous
// client refused gets 401 with a challenge, a user 403 DENIED, and no
// refused request reaches the upstream.
func TestProxy_Access_EveryActionEveryRoute(t *testing.T) {
	e, reg := startWithAuth(t)
	reg.PushImage(t, "team/app", "v1", 100)
	reg.PushImage(t, "library/alpine", "3", 100)
	reg.PushImage(t, "private/app", "v1", 100)
	e.headers = []string{basic("root")}
	hostedImg := e.pushImage("ci/team-a/app", "v1")
	e.headers = nil
	img := reg.PushImage(t, "team/app", "v2", 100)

	type route struct {
		name, path, query string
	}
	routes := []route{
		{"default", "team/app", ""},
		{"prefix", reg.Host + "/team/app", ""},
		{"ns", "team/app", "?ns=" + url.QueryEscape(reg.Host)},
	}
	type endpoint struct {
		name   string
		method string
		path   string // after /v2/<name>/
		need   string
	}
	endpoints := []endpoint{
		{"manifest GET", http.MethodGet, "manifests/v2", "pull"},
		{"manifest HEAD", http.MethodHead, "manifests/v2", "pull"},
		{"blob GET", http.MethodGet, "blobs/" + img.LayerDigests[0].String(), "pull"},
		{"tags", http.MethodGet, "tags/list", "pull"},
		{"referrers", http.MethodGet, "referrers/" + img.Digest.String(), "pull"},
		{"upload", http.MethodPost, "blobs/uploads/", "push"},
		{"manifest PUT", http.MethodPut, "manifests/x", "push"},
		{"manifest DELETE", http.MethodDelete, "manifests/" + img.Digest.String(), "delete"},
		{"blob DELETE", http.MethodDelete, "blobs/" + img.LayerDigests[0].String(), "delete"},
	}
	// What each client may do on each repository (the canonical names
	// reg.Host/team/app and ci/team-a/app).
	proxied := map[string]string{"": "", "bob": "pull", "alice": "pull", "carol": "pull", "root": "pull,push,delete"}
	hosted := map[string]string{"": "", "bob": "pull", "alice": "pull,push,delete", "carol": "pull,push,delete", "dave": "", "root": "pull,push,delete"}
	check := func(t *testing.T, who, grants string, path string, ep endpoint) {
		t.Helper()
		var hdr []string
		if who != "" {
			hdr = append(hdr, basic(who))
		}
		before := reg.Total()
		var body []byte
		if ep.method == http.MethodPut {
			body = hostedImg.manifest
			hdr = append(hdr, "Content-Type: application/vnd.oci.image.manifest.v1+json")
		}
		r := e.send(ep.method, path, body, hdr...)
		allowed := strings.Contains(grants, ep.need)
		switch {
		case allowed && (r.status == 401 || r.status == 403):
			t.Errorf("%s %s %s: %d, but %q may %s", who, ep.method, path, r.status, who, ep.need)
		case !allowed && who == "" && (r.status != 401 || !strings.HasPrefix(r.header.Get("WWW-Authenticate"), `Bearer realm="http://`)):
			t.Errorf("anonymous %s %s: %d %q, want 401 with a challenge", ep.method, path, r.status, r.header.Get("WWW-Authenticate"))
		case !allowed && who != "" && r.status != 403:
			t.Errorf("%s %s %s: %d, want 403", who, ep.method, path, r.status)
		case !allowed && ep.method != http.MethodHead && r.status == 403 && !strings.Contains(string(r.body), `"DENIED"`):
			t.Errorf("%s %s %s: 403 without DENIED: %s", who, ep.method, path, r.body)
		case !allowed && reg.Total() != before:
			t.Errorf("%s %s %s: refused, yet %d upstream requests", who, ep.method, path, reg.Total()-before)
		}
	}
	for _, rt := range routes {
		for _, ep := range endpoints {
			for _, who := range []string{"", "bob", "alice", "root"} {
				p := "/v2/" + rt.path + "/" + ep.path + rt.query
				t.Run(rt.name+"/"+ep.name+"/"+who, func(t *testing.T) { check(t, who, proxied[who], p, ep) })
			}
		}
	}
	hostedEndpoints := []endpoint{
		{"manifest GET", http.MethodGet, "manifests/v1", "pull"},
		{"blob GET", http.MethodGet, "blobs/" + hostedImg.layerD.String(), "pull"},
		{"tags", http.MethodGet, "tags/list", "pull"},
		{"referrers", http.MethodGet, "referrers/" + hostedImg.digest.String(), "pull"},
		{"upload", http.MethodPost, "blobs/uploads/", "push"},
		{"manifest PUT", http.MethodPut, "manifests/v9", "push"},
		{"blob DELETE", http.MethodDelete, "blobs/" + hostedImg.layerD.String() + "x", "delete"},
	}
	for _, ep := range hostedEndpoints {
		for _, who := range []string{"", "dave", "bob", "carol"} {
			p := "/v2/ci/team-a/app/" + ep.path
			t.Run("hosted/"+ep.name+"/"+who, func(t *testing.T) { check(t, who, hosted[who], p, ep) })
		}
	}
}

// Anonymous pulls of what anonymous clients are granted work by every
// route, with no credentials and no token; anything else asks for them.
func TestProxy_Access_Anonymous(t *testing.T) {
	e, reg := startWithAuth(t)
	img := reg.PushImage(t, "library/alpine", "3", 1000)
	for _, p := range []string{"/v2/library/alpine/manifests/3", "/v2/" + reg.Host + "/library/alpine/manifests/3",
		"/v2/library/alpine/manifests/3?ns=" + reg.Host} {
		if r := e.get(p); r.status != 200 || digest.FromBytes(r.body) != img.Digest {
			t.Errorf("anonymous %s: %d %s", p, r.status, r.body)
		}
	}
	// This upstream is not docker.io: alpine is not library/alpine, and
	// no rule lets anonymous clients read it.
	if r := e.get("/v2/alpine/manifests/3"); r.status != 401 {
		t.Errorf("anonymous /v2/alpine/manifests/3: %d, want 401", r.status)
	}
	if r := e.get("/v2/library/alpine/blobs/" + img.LayerDigests[0].String()); r.status != 200 {
		t.Errorf("anonymous blob: %d", r.status)
	}
	r := e.get("/v2/")
	if r.status != 401 || r.header.Get("WWW-Authenticate") != `Bearer realm="`+e.ts.URL+`/auth/token",service="ocimirror"` {
		t.Fatalf("GET /v2/ anonymous: %d %q", r.status, r.header.Get("WWW-Authenticate"))
	}
	if r := e.get("/v2/", basic("bob")); r.status != 200 {
		t.Fatalf("GET /v2/ with Basic: %d", r.status)
	}
	if r := e.get("/v2/", "Authorization: Basic "+base64.StdEncoding.EncodeToString([]byte("bob:wrong"))); r.status != 401 {
		t.Fatalf("GET /v2/ with a wrong password: %d", r.status)
	}
	r = e.get("/v2/ci/team-a/app/manifests/v1")
	if want := `Bearer realm="` + e.ts.URL + `/auth/token",service="ocimirror",scope="repository:ci/team-a/app:pull"`; r.status != 401 || r.header.Get("WWW-Authenticate") != want || errorCode(t, r.body) != "UNAUTHORIZED" {
		t.Fatalf("anonymous pull of a hosted repository: %d %q %s", r.status, r.header.Get("WWW-Authenticate"), r.body)
	}
}

type tokenAnswer struct {
	Token       string `json:"token"`
	AccessToken string `json:"access_token"`
	ExpiresIn   int    `json:"expires_in"`
}

func (e *env) token(t *testing.T, who string, scopes ...string) string {
	t.Helper()
	q := url.Values{"service": {"ocimirror"}, "scope": scopes}
	var hdr []string
	if who != "" {
		hdr = append(hdr, basic(who))
	}
	r := e.get("/auth/token?"+q.Encode(), hdr...)
	var a tokenAnswer
	if r.status != 200 || json.Unmarshal(r.body, &a) != nil || a.Token == "" || a.Token != a.AccessToken || a.ExpiresIn != 300 {
		t.Fatalf("token for %s %v: %d %s", who, scopes, r.status, r.body)
	}
	return a.Token
}

// The token flow: a token holds only what the user is granted of what it
// asked, opens no other repository, and a client that needs more is
// challenged for the scope (and gets it when the rules allow).
func TestProxy_Access_Tokens(t *testing.T) {
	e, reg := startWithAuth(t)
	reg.PushImage(t, "library/alpine", "3", 100)
	e.headers = []string{basic("alice")}
	e.pushImage("ci/team-a/app", "v1")
	e.pushImage("ci/team-a/other", "v1")
	e.headers = nil
	bearer := func(tok string) string { return "Authorization: Bearer " + tok }

	// bob asks for pull and push; he gets pull.
	tok := e.token(t, "bob", "repository:ci/team-a/app:pull,push")
	if r := e.get("/v2/ci/team-a/app/manifests/v1", bearer(tok)); r.status != 200 {
		t.Fatalf("bob pulls with his token: %d %s", r.status, r.body)
	}
	if r := e.send(http.MethodPost, "/v2/ci/team-a/app/blobs/uploads/", nil, bearer(tok)); r.status != 403 || errorCode(t, r.body) != "DENIED" {
		t.Fatalf("bob pushes with his token: %d %s", r.status, r.body)
	}
	// alice's token for one repository does not open another.
	tok = e.token(t, "alice", "repository:ci/team-a/app:pull,push")
	if r := e.send(http.MethodPost, "/v2/ci/team-a/app/blobs/uploads/", nil, bearer(tok)); r.status != 202 {
		t.Fatalf("alice pushes with her token: %d %s", r.status, r.body)
	}
	r := e.get("/v2/ci/team-a/other/manifests/v1", bearer(tok))
	if want := `scope="repository:ci/team-a/other:pull",error="insufficient_scope"`; r.status != 401 || !strings.Contains(r.header.Get("WWW-Authenticate"), want) {
		t.Fatalf("alice's token for app, on other: %d %q", r.status, r.header.Get("WWW-Authenticate"))
	}
	// Several scopes in one token; an anonymous token holds what
	// anonymous clients may do.
	tok = e.token(t, "alice", "repository:ci/team-a/app:pull", "repository:ci/team-a/other:pull")
	for _, p := range []string{"/v2/ci/team-a/app/manifests/v1", "/v2/ci/team-a/other/manifests/v1"} {
		if r := e.get(p, bearer(tok)); r.status != 200 {
			t.Fatalf("%s with a two-scope token: %d", p, r.status)
		}
	}
	tok = e.token(t, "", "repository:library/alpine:pull", "repository:ci/team-a/app:pull")
	if r := e.get("/v2/library/alpine/manifests/3", bearer(tok)); r.status != 200 {
		t.Fatalf("an anonymous token: %d", r.status)
	}
	if r := e.get("/v2/ci/team-a/app/manifests/v1", bearer(tok)); r.status != 401 {
		t.Fatalf("an anonymous token on a hosted repository: %d", r.status)
	}
	// By a host prefix (with a port), and by ?ns=: the token names the
	// repository as the request writes it.
	reg.PushImage(t, "team/app", "v1", 100)
	tok = e.token(t, "alice", "repository:"+reg.Host+"/team/app:pull", "repository:team/app:pull")
	for _, p := range []string{"/v2/" + reg.Host + "/team/app/manifests/v1", "/v2/team/app/manifests/v1?ns=" + reg.Host, "/v2/team/app/manifests/v1"} {
		if r := e.get(p, bearer(tok)); r.status != 200 {
			t.Fatalf("%s with a token: %d %s", p, r.status, r.body)
		}
	}
	// A bad token, a wrong password at the token endpoint.
	if r := e.get("/v2/library/alpine/manifests/3", bearer(tok[:len(tok)-4]+"AAAA")); r.status != 401 ||
		!strings.Contains(r.header.Get("WWW-Authenticate"), `error="invalid_token"`) {
		t.Fatalf("a forged token: %d %q", r.status, r.header.Get("WWW-Authenticate"))
	}
	r = e.get("/auth/token?service=ocimirror&scope=repository:ci/team-a/app:pull", "Authorization: Basic "+base64.StdEncoding.EncodeToString([]byte("alice:nope")))
	if r.status != 401 {
		t.Fatalf("a wrong password at the token endpoint: %d %s", r.status, r.body)
	}
	// The OAuth2 password grant (containerd POSTs it).
	form := url.Values{"grant_type": {"password"}, "username": {"alice"}, "password": {"alice-pw"}, "service": {"ocimirror"},
		"scope": {"repository:ci/team-a/app:pull repository:ci/team-a/other:pull"}, "client_id": {"containerd"}}
	r = e.send(http.MethodPost, "/auth/token", []byte(form.Encode()), "Content-Type: application/x-www-form-urlencoded")
	var a tokenAnswer
	if r.status != 200 || json.Unmarshal(r.body, &a) != nil || a.AccessToken == "" {
		t.Fatalf("password grant: %d %s", r.status, r.body)
	}
	if r := e.get("/v2/ci/team-a/other/manifests/v1", bearer(a.AccessToken)); r.status != 200 {
		t.Fatalf("the password grant's token: %d", r.status)
	}
}

// A cross-repository mount needs pull on the source: without it the
// client is asked to upload the blob instead (202), never given a link
// to bytes it may not read.
func TestProxy_Access_MountNeedsPull(t *testing.T) {
	e, reg := startWithAuth(t)
	e.headers = []string{basic("root")}
	secret := e.pushImage("ci/secret/app", "v1")
	e.headers = nil
	_ = reg
	p := "/v2/ci/team-a/app/blobs/uploads/?mount=" + secret.layerD.String() + "&from=ci/secret/app"
	if r := e.send(http.MethodPost, p, nil, basic("alice")); r.status != http.StatusAccepted {
		t.Fatalf("alice mounts from a repository she may not pull: %d %s", r.status, r.body)
	}
	if r := e.get("/v2/ci/team-a/app/blobs/"+secret.layerD.String(), basic("alice")); r.status != 404 {
		t.Fatalf("the blob was linked: %d", r.status)
	}
	if r := e.send(http.MethodPost, "/v2/ci/team-a/app/blobs/uploads/?mount="+secret.layerD.String()+"&from=ci/secret/app", nil, basic("root")); r.status != http.StatusCreated {
		t.Fatalf("root mounts: %d %s", r.status, r.body)
	}
}
