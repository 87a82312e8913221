package e2e

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// authUsers are the users of the auth tests; carol is in group team-a.
var authUsers = []string{"alice", "bob", "carol"}

// authRules are the rules, plus: bob pulls ci/team-a/** (and may
// not push there), alice does everything on conf/** (the conformance
// suite's repositories) and alone pulls from the upstream named
// private.example.test.
const authRules = `access:
  - repositories: ["ci/team-a/**"]
    users: [alice, "group:team-a"]
    actions: [pull, push, delete]
  - repositories: ["ci/team-a/**"]
    users: [bob]
    actions: [pull]
  - repositories: ["docker.io/**", "ghcr.io/**"]
    users: ["*"]
    actions: [pull]
  - repositories: ["docker.io/library/**"]
    anonymous: true
    actions: [pull]
  - repositories: ["conf/**"]
    users: [alice]
    actions: [pull, push, delete]
  - repositories: ["private.example.test/**"]
    users: [alice]
    actions: [pull]
`

// authMirror is an ocimirror with client authentication on: the users of
// authUsers in an htpasswd file, and authRules.
type authMirror struct {
	*mirror
	pw map[string]string // user -> password

	mu      sync.Mutex
	secrets []string // every password and token the test sent or was given
}

// startAuthMirror runs ocimirror with auth on. upstreams is the YAML of
// the upstreams section's entries (and defaultUpstream), "" for none.
func startAuthMirror(t *testing.T, upstreams string) *authMirror {
	t.Helper()
	a := &authMirror{pw: map[string]string{}}
	var htpasswd strings.Builder
	for _, u := range authUsers {
		// A random password: a match in the log can only be a leak.
		a.pw[u] = u + "-" + randomHex(12)
		h, err := bcrypt.GenerateFromPassword([]byte(a.pw[u]), bcrypt.DefaultCost)
		if err != nil {
			t.Fatal(err)
		}
		htpasswd.WriteString(u + ":" + string(h) + "\n")
		a.secret(a.pw[u], base64.StdEncoding.EncodeToString([]byte(u+":"+a.pw[u])))
	}
	file := filepath.Join(t.TempDir(), "htpasswd")
	if err := os.WriteFile(file, []byte(htpasswd.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	// Debug level: the log check below covers everything ocimirror can log.
	a.mirror = startMirror(t, `listen: "{{LISTEN}}"
storage:
  path: {{DATA}}
log:
  level: debug
hosted: ["ci/", "conf/"]
`+upstreams+`auth:
  htpasswd: `+file+`
  groups: {team-a: [carol]}
`+authRules)
	return a
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// secret records values that must never appear in ocimirror's log.
func (a *authMirror) secret(s ...string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.secrets = append(a.secrets, s...)
}

// basic is the Authorization header of user's credentials.
func (a *authMirror) basic(user, password string) string {
	v := "Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"+password))
	a.secret(password, v)
	return "Authorization: " + v
}

// tokenFor asks the token endpoint (GET, Basic credentials) for scope and
// returns the token; the status is checked by the caller.
func (a *authMirror) tokenFor(t *testing.T, user, password, scope string) (int, string) {
	t.Helper()
	q := url.Values{"service": {"ocimirror"}, "scope": {scope}}
	st, body, _ := httpGet(t, "http://"+a.host+"/auth/token?"+q.Encode(), a.basic(user, password))
	var ans struct {
		Token       string `json:"token"`
		AccessToken string `json:"access_token"`
	}
	_ = json.Unmarshal(body, &ans)
	a.secret(ans.Token, ans.AccessToken)
	if ans.Token != "" && jwtRE.FindString(ans.Token) != ans.Token {
		t.Errorf("the token %.16s... is not shaped as jwtRE expects: the log check would miss tokens", ans.Token)
	}
	return st, ans.Token
}

// unauthorized reports whether a client's error output says 401 (crane
// UNAUTHORIZED, oras unauthorized, containerd 401 Unauthorized; a bare
// "401" could be part of a port).
func unauthorized(out string) bool {
	return strings.Contains(strings.ToLower(out), "unauthorized")
}

// stdoutOf runs a client and returns its standard output alone (blobs).
func stdoutOf(t *testing.T, env []string, name string, args ...string) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), env...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", filepath.Base(name), strings.Join(args, " "), err, stderr.String())
	}
	return out
}

// jwtRE matches a JWT: ocimirror's tokens are JWTs, so this finds any
// token in the log, including those issued to the clients.
var jwtRE = regexp.MustCompile(`eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*`)

// checkNoSecretsLogged greps every line of ocimirror's log for every
// password and token of the test, and for anything shaped like a token.
func (a *authMirror) checkNoSecretsLogged(t *testing.T) {
	t.Helper()
	a.mu.Lock()
	defer a.mu.Unlock()
	log := a.log.String()
	lines := strings.Split(log, "\n")
	if len(lines) < 10 {
		t.Fatalf("ocimirror logged %d lines: the check below would prove nothing", len(lines))
	}
	checked, seen := 0, map[string]bool{}
	for _, s := range a.secrets {
		if len(s) < 8 || seen[s] {
			continue
		}
		seen[s] = true
		checked++
		for i, l := range lines {
			if strings.Contains(l, s) {
				t.Errorf("log line %d holds a secret (%.12s...): %s", i+1, s, l)
			}
		}
	}
	if checked < 2*len(authUsers) {
		t.Errorf("only %d secrets to look for", checked)
	}
	for i, l := range lines {
		if m := jwtRE.FindString(l); m != "" {
			t.Errorf("log line %d holds a token: %s", i+1, l)
		}
		if strings.Contains(strings.ToLower(l), "authorization: basic") || strings.Contains(strings.ToLower(l), "bearer ey") {
			t.Errorf("log line %d holds an Authorization header: %s", i+1, l)
		}
	}
	t.Logf("%d log lines checked for %d secrets and for tokens", len(lines), checked)
}

// TestE2E_Auth_Clients drives crane, oras, regctl and skopeo against an
// ocimirror with users and access rules (upstream: distribution v3, named
// docker.io and the default upstream):
//   - alice logs in with each client, pushes to ci/team-a and pulls it back
//     (bytes and digests checked);
//   - bob, who may only pull there, pulls and is refused every push with
//     403 DENIED, by every client;
//   - an anonymous client pulls docker.io/library/alpine by the host
//     prefix and the default upstream (with and without library/), and is
//     refused ci/team-a (401 and a challenge for the scope);
//   - a token for ci/team-a/app opens it but not ci/team-a/other
//     (insufficient_scope);
//   - a wrong password is refused;
//   - no password or token ever reaches ocimirror's log.
func TestE2E_Auth_Clients(t *testing.T) {
	crane, oras, regctl, skopeo := tool(t, "crane"), tool(t, "oras"), tool(t, "regctl"), tool(t, "skopeo")
	up := startDistribution(t, "registry")
	s := seedImages(t, up.host)
	om := startAuthMirror(t, `defaultUpstream: docker.io
upstreams:
  - name: docker.io
    url: http://`+up.host+`
`)
	host := om.host
	dir := t.TempDir()
	repo := host + "/ci/team-a/app"

	// Each user has its own client configuration: crane (DOCKER_CONFIG),
	// oras (--registry-config), regctl (HOME), skopeo (REGISTRY_AUTH_FILE,
	// empty: credentials go by --creds).
	type client struct {
		docker []string // crane's environment
		oras   []string // oras's flags
		regctl []string // regctl's environment
		skopeo []string // skopeo's environment
	}
	clients := map[string]client{}
	for _, u := range append([]string{"anonymous"}, authUsers...) {
		d := filepath.Join(dir, u)
		for _, sub := range []string{"docker", "home"} {
			if err := os.MkdirAll(filepath.Join(d, sub), 0o700); err != nil {
				t.Fatal(err)
			}
		}
		clients[u] = client{
			docker: []string{"DOCKER_CONFIG=" + filepath.Join(d, "docker")},
			oras:   []string{"--registry-config", filepath.Join(d, "oras.json")},
			regctl: []string{"HOME=" + filepath.Join(d, "home"), "DOCKER_CONFIG=" + filepath.Join(d, "docker")},
			skopeo: []string{"REGISTRY_AUTH_FILE=" + filepath.Join(d, "auth.json"), "DOCKER_CONFIG=" + filepath.Join(d, "docker")},
		}
	}
	craneAs := func(u string, args ...string) (string, error) {
		return runErr("", clients[u].docker, crane, append([]string{"--insecure"}, args...)...)
	}
	orasAs := func(u string, args ...string) (string, error) {
		return runErr(dir, nil, oras, append(append(args, "--plain-http"), clients[u].oras...)...)
	}
	regctlAs := func(u string, args ...string) (string, error) {
		// -v error: regctl warns on standard error about TLS settings.
		return runErr("", clients[u].regctl, regctl, append([]string{"-v", "error"}, args...)...)
	}
	skopeoAs := func(u string, args ...string) (string, error) {
		return runErr("", clients[u].skopeo, skopeo, args...)
	}
	must := func(t *testing.T, what string) func(string, error) string {
		return func(out string, err error) string {
			t.Helper()
			if err != nil {
				t.Fatalf("%s: %v\n%s", what, err, out)
			}
			return strings.TrimSpace(out)
		}
	}
	for _, u := range []string{"alice", "bob"} {
		pw := om.pw[u]
		must(t, "crane auth login "+u)(craneAs(u, "auth", "login", host, "-u", u, "-p", pw))
		must(t, "oras login "+u)(orasAs(u, "login", host, "-u", u, "-p", pw))
		must(t, "regctl registry set "+u)(regctlAs(u, "registry", "set", "--tls", "disabled", host))
		must(t, "regctl registry login "+u)(regctlAs(u, "registry", "login", host, "-u", u, "-p", pw))
	}

	// alice pushes with every client and pulls back with another.
	layer := layerFile(t, dir, "auth", 30_000)
	layerBytes, _ := os.ReadFile(layer)
	layerDigest := digestOf(layerBytes)
	var craneDigest string
	t.Run("alice/crane", func(t *testing.T) {
		must(t, "crane append")(craneAs("alice", "append", "--oci-empty-base", "-f", layer, "-t", repo+":crane"))
		craneDigest = must(t, "crane digest")(craneAs("alice", "digest", repo+":crane"))
		if blob := stdoutOf(t, clients["alice"].docker, crane, "--insecure", "blob", repo+"@"+layerDigest); digestOf(blob) != layerDigest {
			t.Errorf("crane blob %s: %d bytes with digest %s", layerDigest, len(blob), digestOf(blob))
		}
	})
	if craneDigest == "" {
		t.Fatal("alice could not push with crane: the rest depends on it")
	}
	t.Run("alice/oras", func(t *testing.T) {
		content := "pushed by alice with oras " + randomHex(8) + "\n"
		if err := os.WriteFile(filepath.Join(dir, "note.txt"), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		must(t, "oras push")(orasAs("alice", "push", repo+":oras", "note.txt:text/plain"))
		out := filepath.Join(t.TempDir(), "pulled")
		must(t, "oras pull")(orasAs("alice", "pull", repo+":oras", "-o", out))
		if got, err := os.ReadFile(filepath.Join(out, "note.txt")); err != nil || string(got) != content {
			t.Errorf("oras pull: %q %v, want %q", got, err, content)
		}
		// oras reads what crane pushed: the same digest.
		if d := must(t, "oras resolve")(orasAs("alice", "resolve", repo+":crane")); d != craneDigest {
			t.Errorf("oras resolve :crane = %s, crane pushed %s", d, craneDigest)
		}
	})
	t.Run("alice/regctl", func(t *testing.T) {
		// A copy to another repository: regctl mounts the blobs from
		// ci/team-a/app, which alice may pull.
		must(t, "regctl image copy")(regctlAs("alice", "image", "copy", repo+":crane", host+"/ci/team-a/other:regctl"))
		if d := must(t, "regctl image digest")(regctlAs("alice", "image", "digest", host+"/ci/team-a/other:regctl")); d != craneDigest {
			t.Errorf("regctl image digest = %s, want %s", d, craneDigest)
		}
		if blob := stdoutOf(t, clients["alice"].regctl, regctl, "-v", "error", "blob", "get", host+"/ci/team-a/other", layerDigest); digestOf(blob) != layerDigest {
			t.Errorf("regctl blob get %s: %d bytes with digest %s", layerDigest, len(blob), digestOf(blob))
		}
	})
	t.Run("alice/skopeo", func(t *testing.T) {
		creds := "alice:" + om.pw["alice"]
		must(t, "skopeo copy")(skopeoAs("alice", "copy", "--preserve-digests", "--src-tls-verify=false", "--dest-tls-verify=false",
			"--src-creds", creds, "--dest-creds", creds, "docker://"+repo+":crane", "docker://"+repo+":skopeo"))
		raw := must(t, "skopeo inspect")(skopeoAs("alice", "inspect", "--raw", "--tls-verify=false", "--creds", creds, "docker://"+repo+":skopeo"))
		if digestOf([]byte(raw)) != craneDigest {
			t.Errorf("skopeo inspect --raw :skopeo has digest %s, want %s", digestOf([]byte(raw)), craneDigest)
		}
	})

	// bob may pull ci/team-a, not push: every client is refused with
	// DENIED (403), after pulling fine. crane, regctl and skopeo find the
	// blobs there and are refused the manifest PUT; oras the upload.
	t.Run("bob", func(t *testing.T) {
		if d := must(t, "crane digest as bob")(craneAs("bob", "digest", repo+":crane")); d != craneDigest {
			t.Errorf("bob pulls :crane: %s, want %s", d, craneDigest)
		}
		denied := func(client string, out string, err error) {
			t.Helper()
			if err == nil {
				t.Errorf("%s: bob pushed to ci/team-a/app:\n%s", client, out)
				return
			}
			if !strings.Contains(strings.ToLower(out), "denied") {
				t.Errorf("%s: bob's push failed without DENIED:\n%s", client, out)
			}
		}
		out, err := craneAs("bob", "append", "--oci-empty-base", "-f", layer, "-t", repo+":bob-crane")
		denied("crane append", out, err)
		out, err = craneAs("bob", "copy", repo+":crane", repo+":bob-crane")
		denied("crane copy", out, err)
		// A blob the repository does not hold: refused at the upload.
		if err := os.WriteFile(filepath.Join(dir, "bob.txt"), []byte("bob "+randomHex(8)), 0o644); err != nil {
			t.Fatal(err)
		}
		out, err = orasAs("bob", "push", repo+":bob-oras", "bob.txt:text/plain")
		denied("oras push", out, err)
		out, err = regctlAs("bob", "image", "copy", repo+":crane", repo+":bob-regctl")
		denied("regctl image copy", out, err)
		creds := "bob:" + om.pw["bob"]
		out, err = skopeoAs("bob", "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
			"--src-creds", creds, "--dest-creds", creds, "docker://"+repo+":crane", "docker://"+repo+":bob-skopeo")
		denied("skopeo copy", out, err)
		if st, body, _ := httpGet(t, "http://"+host+"/v2/ci/team-a/app/tags/list", om.basic("alice", om.pw["alice"])); st != 200 ||
			strings.Contains(string(body), "bob-") {
			t.Errorf("tags after bob's pushes: %d %s", st, body)
		}
	})

	// Anonymous: docker.io/library/** by the host prefix and the default
	// upstream; the ns route is containerd's (TestE2E_Auth_Containerd).
	t.Run("anonymous", func(t *testing.T) {
		want := s.digests["library/alpine:3"]
		for _, ref := range []string{host + "/docker.io/library/alpine:3", host + "/library/alpine:3", host + "/alpine:3"} {
			if d := must(t, "anonymous crane digest "+ref)(craneAs("anonymous", "digest", ref)); d != want {
				t.Errorf("anonymous %s: %s, want %s", ref, d, want)
			}
		}
		// Every blob, verified by crane.
		layout := filepath.Join(t.TempDir(), "layout")
		must(t, "anonymous crane pull")(craneAs("anonymous", "pull", "--format", "oci", host+"/docker.io/library/alpine:3", layout))
		if idx, _ := os.ReadFile(filepath.Join(layout, "index.json")); !strings.Contains(string(idx), want) {
			t.Errorf("anonymous crane pull: index %s, want %s", idx, want)
		}
		must(t, "anonymous skopeo inspect")(skopeoAs("anonymous", "inspect", "--raw", "--tls-verify=false", "docker://"+host+"/library/alpine:3"))
		if d := must(t, "anonymous regctl")(regctlAs("anonymous", "image", "digest", "--host", "reg="+host+",tls=disabled", host+"/docker.io/library/alpine:3")); d != want {
			t.Errorf("anonymous regctl: %s, want %s", d, want)
		}

		// Refused: ci/team-a, and docker.io outside library/ (users only).
		for _, ref := range []string{repo + ":crane", host + "/docker.io/e2e/app:multi-oci"} {
			out, err := craneAs("anonymous", "digest", ref)
			if err == nil || !unauthorized(out) {
				t.Errorf("anonymous crane digest %s: %v\n%s", ref, err, out)
			}
		}
		out, err := orasAs("anonymous", "pull", repo+":oras", "-o", t.TempDir())
		if err == nil || !unauthorized(out) {
			t.Errorf("anonymous oras pull: %v\n%s", err, out)
		}
		st, _, h := httpGet(t, "http://"+host+"/v2/ci/team-a/app/manifests/crane")
		if want := `Bearer realm="http://` + host + `/auth/token",service="ocimirror",scope="repository:ci/team-a/app:pull"`; st != 401 || h.Get("WWW-Authenticate") != want {
			t.Errorf("anonymous GET ci/team-a/app: %d %q, want 401 %q", st, h.Get("WWW-Authenticate"), want)
		}
		// bob (any user) may pull docker.io/e2e/app.
		if d := must(t, "bob crane digest docker.io/e2e/app")(craneAs("bob", "digest", host+"/docker.io/e2e/app:multi-oci")); d != s.digests["e2e/app:multi-oci"] {
			t.Errorf("bob docker.io/e2e/app: %s", d)
		}
	})

	// A token for ci/team-a/app opens it, not ci/team-a/other.
	t.Run("token-scope", func(t *testing.T) {
		st, tok := om.tokenFor(t, "alice", om.pw["alice"], "repository:ci/team-a/app:pull")
		if st != 200 || tok == "" {
			t.Fatalf("token endpoint: %d", st)
		}
		bearer := "Authorization: Bearer " + tok
		om.secret(bearer)
		st, body, h := httpGet(t, "http://"+host+"/v2/ci/team-a/app/manifests/crane", bearer)
		if st != 200 || digestOf(body) != craneDigest {
			t.Errorf("the token on ci/team-a/app: %d %s", st, digestOf(body))
		}
		st, _, h = httpGet(t, "http://"+host+"/v2/ci/team-a/other/manifests/regctl", bearer)
		if c := h.Get("WWW-Authenticate"); st != 401 || !strings.Contains(c, `error="insufficient_scope"`) ||
			!strings.Contains(c, `scope="repository:ci/team-a/other:pull"`) {
			t.Errorf("the token for ci/team-a/app on ci/team-a/other: %d %q, want 401 insufficient_scope", st, c)
		}
		// alice herself may: the refusal is the token's.
		if st, _, _ := httpGet(t, "http://"+host+"/v2/ci/team-a/other/manifests/regctl", om.basic("alice", om.pw["alice"])); st != 200 {
			t.Errorf("alice with Basic on ci/team-a/other: %d", st)
		}
	})

	// Wrong passwords: one by a client, one at the token endpoint (each
	// failure delays the next answer to this address).
	t.Run("wrong-password", func(t *testing.T) {
		wrong := "wrong-" + randomHex(12)
		om.secret(wrong)
		out, err := orasAs("carol", "login", host, "-u", "alice", "-p", wrong)
		if err == nil {
			t.Errorf("oras login with a wrong password succeeded:\n%s", out)
		}
		if st, tok := om.tokenFor(t, "alice", wrong, "repository:ci/team-a/app:pull"); st != 401 || tok != "" {
			t.Errorf("token endpoint with a wrong password: %d", st)
		}
	})

	om.checkNoSecretsLogged(t)
}

// TestE2E_Auth_Containerd pulls through ocimirror with containerd, which
// hosts.toml sends there for docker.io and private.example.test (both
// names of one distribution v3), so every request carries ns=:
//   - anonymous, it pulls and unpacks docker.io/library/alpine (the ns
//     route of the anonymous rule) and is refused docker.io/e2e/app
//     (users only);
//   - with alice's credentials (ctr --user: the OAuth2 password grant at
//     the token endpoint) it pulls private.example.test/e2e/app, which
//     only alice may pull; with bob's it is refused (403).
func TestE2E_Auth_Containerd(t *testing.T) {
	ctd := startContainerd(t)
	up := startDistribution(t, "registry")
	s := seedImages(t, up.host)
	om := startAuthMirror(t, `defaultUpstream: docker.io
upstreams:
  - name: docker.io
    url: http://`+up.host+`
  - name: private.example.test
    url: http://`+up.host+`
`)
	ctd.mirrorFor(t, "docker.io", om.host)
	ctd.mirrorFor(t, "private.example.test", om.host)
	// containerd tries the server after a mirror refuses: make that a
	// closed loopback port, so a refusal is ocimirror's even on a machine
	// that reaches Docker Hub.
	hostsToml := filepath.Join(ctd.hostsDir, "docker.io", "hosts.toml")
	b, err := os.ReadFile(hostsToml)
	if err != nil {
		t.Fatal(err)
	}
	b = []byte(strings.Replace(string(b), `server = "https://docker.io"`, `server = "http://127.0.0.1:9"`, 1))
	if err := os.WriteFile(hostsToml, b, 0o644); err != nil {
		t.Fatal(err)
	}
	pull := func(user string, ref string) (string, error) {
		args := []string{"--address", ctd.sock, "images", "pull", "--hosts-dir", ctd.hostsDir}
		if user != "" {
			args = append(args, "--user", user+":"+om.pw[user])
		}
		return runErr("", nil, "ctr", append(args, ref)...)
	}
	listed := func(ref, digest string) {
		t.Helper()
		if images := ctd.ctr(t, "images", "ls"); !strings.Contains(images, ref) || !strings.Contains(images, digest) {
			t.Errorf("containerd does not list %s with digest %s:\n%s", ref, digest, images)
		}
	}

	const alpine = "docker.io/library/alpine:3"
	if out, err := pull("", alpine); err != nil {
		t.Fatalf("anonymous pull of %s: %v\n%s", alpine, err, out)
	}
	listed(alpine, s.digests["library/alpine:3"])
	if snaps := ctd.ctr(t, "snapshots", "ls"); !strings.Contains(snaps, "Committed") {
		t.Errorf("alpine was not unpacked:\n%s", snaps)
	}
	if out, err := pull("", "docker.io/e2e/app:multi-oci"); err == nil || !unauthorized(out) {
		t.Errorf("anonymous pull of docker.io/e2e/app: %v, want 401\n%s", err, out)
	}

	const private = "private.example.test/e2e/app:multi-oci"
	if out, err := pull("alice", private); err != nil {
		t.Fatalf("alice pulls %s: %v\n%s", private, err, out)
	}
	listed(private, s.digests["e2e/app:multi-oci"])
	// containerd resolves the tag again before anything else: refused
	// there, although the content is local now.
	out, err := pull("bob", private)
	if err == nil || !strings.Contains(out, "403 Forbidden") {
		t.Errorf("bob pulls %s: %v, want 403\n%s", private, err, out)
	}

	// Every request carried ns; containerd was challenged, and sent the
	// credentials to the token endpoint as the OAuth2 password grant.
	var routed, challenged, grants int
	for _, l := range om.requestLines() {
		if strings.Contains(l, "path=/v2/") {
			if !strings.Contains(l, " ns=") {
				t.Errorf("a containerd request without ns: %s", l)
			}
			routed++
		}
		if strings.Contains(l, "method=POST path=/auth/token status=200") {
			grants++
		}
		if strings.Contains(l, "status=401") {
			challenged++
		}
	}
	if routed == 0 || grants == 0 || challenged == 0 {
		t.Errorf("requests: %d to /v2/, %d password grants, %d challenged: the token flow did not run", routed, grants, challenged)
	}
	om.checkNoSecretsLogged(t)
}

// TestE2E_Auth_Conformance: the full OCI conformance suite, push and
// deletes included, against the hosted conf/ repositories, as alice
// (OCI_USERNAME, OCI_PASSWORD), whom a rule grants pull, push and delete
// there. It passes as the unauthenticated hosted run does
// (TestE2E_Conformance_Hosted): every area but the anonymous mount, which
// ocimirror declines by design (Skip). Without credentials the same suite
// is refused.
func TestE2E_Auth_Conformance(t *testing.T) {
	tool(t, "oci-conformance")
	om := startAuthMirror(t, "")
	areas := conformance(t, "hosted-auth", om.host, "OCI_USERNAME=alice", "OCI_PASSWORD="+om.pw["alice"])
	for area, status := range areas {
		if status != "Pass" && status != "Disabled" && (area != "apis/Blob anonymous mount" || status != "Skip") {
			t.Errorf("%s: %s", area, status)
		}
	}
	if s := areas["apis/Blob anonymous mount"]; s != "Skip" {
		t.Errorf("anonymous mount: %s, want Skip (refused: 202, the client uploads)", s)
	}
	// The suite went through the token flow (or sent Basic), and no
	// request it made was refused for want of a right.
	tokens := 0
	for _, l := range om.requestLines() {
		if strings.Contains(l, "path=/auth/token status=200") {
			tokens++
		}
		if strings.Contains(l, "status=403") {
			t.Errorf("refused: %s", l)
		}
	}
	if tokens == 0 {
		t.Error("the suite never asked for a token")
	}
	t.Logf("%d areas; %d tokens issued; %d requests", len(areas), tokens, len(om.requestLines()))
	// The credentials were needed: an anonymous client may not read there.
	st, _, h := httpGet(t, "http://"+om.host+"/v2/conf/repo1/tags/list")
	if st != 401 || !strings.Contains(h.Get("WWW-Authenticate"), `scope="repository:conf/repo1:pull"`) {
		t.Errorf("anonymous tags/list of conf/repo1: %d %q, want 401 with a challenge", st, h.Get("WWW-Authenticate"))
	}
	om.checkNoSecretsLogged(t)
}

// TestE2E_Auth_SecretsNotLogged runs every way a secret reaches ocimirror,
// at debug level, and greps every log line for each password and token:
// Basic credentials straight on /v2/ (right and wrong), the token
// endpoint by GET (Basic, anonymous) and by POST (the OAuth2 password
// grant, right and wrong), bearer tokens (valid, for another scope, and
// forged). It needs no client tool, so it runs everywhere.
func TestE2E_Auth_SecretsNotLogged(t *testing.T) {
	om := startAuthMirror(t, "")
	base := "http://" + om.host
	alice, wrong := om.pw["alice"], "wrong-"+randomHex(12)
	om.secret(wrong)

	if st, _, _ := httpGet(t, base+"/v2/", om.basic("alice", alice)); st != 200 {
		t.Errorf("GET /v2/ with Basic: %d", st)
	}
	if st, _, _ := httpGet(t, base+"/v2/", om.basic("carol", wrong)); st != 401 {
		t.Errorf("GET /v2/ with a wrong password: %d", st)
	}
	st, tok := om.tokenFor(t, "alice", alice, "repository:ci/team-a/app:pull,push")
	if st != 200 || tok == "" {
		t.Fatalf("token endpoint: %d", st)
	}
	st, body, _ := httpGet(t, base+"/auth/token?service=ocimirror&scope=repository:docker.io/library/alpine:pull")
	var anon struct{ Token string }
	if st != 200 || json.Unmarshal(body, &anon) != nil || anon.Token == "" {
		t.Fatalf("anonymous token: %d %s", st, body)
	}
	om.secret(anon.Token)

	grant := func(password string) (int, string) {
		form := url.Values{"grant_type": {"password"}, "username": {"bob"}, "password": {password},
			"service": {"ocimirror"}, "scope": {"repository:ci/team-a/app:pull"}, "client_id": {"e2e"}}
		resp, err := http.PostForm(base+"/auth/token", form)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var a struct {
			AccessToken string `json:"access_token"`
		}
		_ = json.NewDecoder(resp.Body).Decode(&a)
		om.secret(a.AccessToken)
		return resp.StatusCode, a.AccessToken
	}
	st, bobTok := grant(om.pw["bob"])
	if st != 200 || bobTok == "" {
		t.Fatalf("password grant: %d", st)
	}
	if st, _ := grant(wrong); st != 401 {
		t.Errorf("password grant with a wrong password: %d", st)
	}

	// Bearer tokens: valid (a tag that does not exist: 404; the tag list,
	// empty: 200), for
	// another repository (401 insufficient_scope), forged (401).
	bearer := func(tok string) string {
		om.secret("Bearer " + tok)
		return "Authorization: Bearer " + tok
	}
	for _, c := range []struct {
		name, path, token string
		status            int
	}{
		{"alice's token", "/v2/ci/team-a/app/manifests/none", tok, 404},
		{"bob's token", "/v2/ci/team-a/app/tags/list", bobTok, 200},
		{"alice's token elsewhere", "/v2/ci/team-a/other/manifests/none", tok, 401},
		{"a forged token", "/v2/ci/team-a/app/manifests/none", tok[:len(tok)-8] + "AAAAAAAA", 401},
	} {
		if st, body, _ := httpGet(t, base+c.path, bearer(c.token)); st != c.status {
			t.Errorf("%s on %s: %d %s, want %d", c.name, c.path, st, body, c.status)
		}
	}
	om.secret(tok[:len(tok)-8] + "AAAAAAAA")

	// The log holds the failures, so the check below reads the lines a
	// leak would be in.
	if n := strings.Count(om.log.String(), "failed login"); n != 2 {
		t.Errorf("%d failed logins logged, want 2", n)
	}
	om.checkNoSecretsLogged(t)
}
