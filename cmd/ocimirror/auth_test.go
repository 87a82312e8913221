package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/crypto/bcrypt"

	"github.com/ocimirror/ocimirror/internal/registrytest"
)

// serve with an auth section: an anonymous /v2/ is challenged with the
// realm of the request's host, the token endpoint issues a token for a
// user's granted scope, the signing key is generated in the data
// directory (0600) and kept, so that a token outlives a restart; neither
// passwords nor tokens are logged.
func TestServe_Auth(t *testing.T) {
	reg := registrytest.New(t)
	reg.PushImage(t, "library/alpine", "3", 1000)
	reg.PushImage(t, "team/app", "v1", 1000)
	dir := t.TempDir()
	hash, _ := bcrypt.GenerateFromPassword([]byte("alice-secret-pw"), bcrypt.MinCost)
	htpasswd := filepath.Join(dir, "htpasswd")
	os.WriteFile(htpasswd, []byte("alice:"+string(hash)+"\n"), 0o600)
	cfg := filepath.Join(dir, "c.yaml")
	os.WriteFile(cfg, []byte(`hosted: [ci/]
auth:
  htpasswd: `+htpasswd+`
access:
  - repositories: ["ci/team-a/**"]
    users: [alice]
    actions: [pull, push]
  - repositories: ["`+reg.Host+`/library/**"]
    anonymous: true
    actions: [pull]
  - repositories: ["`+reg.Host+`/team/**"]
    users: [alice]
    actions: [pull]
`), 0o600)
	data := filepath.Join(dir, "data")
	args := []string{"--config", cfg, "--data", data, "--upstream", reg.Host + "=" + reg.URL, "--default-upstream", reg.Host}
	addr, log, stop := serveLogged(t, args...)
	get := func(path string, header ...string) (*http.Response, []byte) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, "http://"+addr+path, nil)
		for i := 0; i+1 < len(header); i += 2 {
			req.Header.Set(header[i], header[i+1])
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp, b
	}
	resp, _ := get("/v2/")
	if want := `Bearer realm="http://` + addr + `/auth/token",service="ocimirror"`; resp.StatusCode != 401 || resp.Header.Get("WWW-Authenticate") != want {
		t.Fatalf("GET /v2/: %d %q\n%s", resp.StatusCode, resp.Header.Get("WWW-Authenticate"), log.String())
	}
	if resp, _ := get("/v2/library/alpine/manifests/3", "Accept", "application/vnd.oci.image.manifest.v1+json"); resp.StatusCode != 200 {
		t.Fatalf("anonymous pull: %d", resp.StatusCode)
	}
	req, _ := http.NewRequest(http.MethodGet, "http://"+addr+"/auth/token?service=ocimirror&scope=repository:ci/team-a/app:pull,push", nil)
	req.SetBasicAuth("alice", "alice-secret-pw")
	tr, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var tok struct{ Token string }
	json.NewDecoder(tr.Body).Decode(&tok)
	tr.Body.Close()
	if tr.StatusCode != 200 || tok.Token == "" {
		t.Fatalf("token: %d", tr.StatusCode)
	}
	if resp, b := get("/v2/ci/team-a/app/tags/list", "Authorization", "Bearer "+tok.Token); resp.StatusCode != 200 || !strings.Contains(string(b), `"name":"ci/team-a/app"`) {
		t.Fatalf("with the token: %d %s", resp.StatusCode, b)
	}
	// prefetch logs in with --user and the password from the environment.
	prefetch := func() (int, string) {
		var out, errOut bytes.Buffer
		code := run(context.Background(), []string{"prefetch", "--mirror", "http://" + addr, "--user", "alice", reg.Host + "/team/app:v1"}, &out, &errOut)
		return code, out.String() + errOut.String()
	}
	if code, out := prefetch(); code == 0 {
		t.Fatalf("prefetch without a password: exit 0\n%s", out)
	}
	t.Setenv("OCIMIRROR_PASSWORD", "alice-secret-pw")
	if code, out := prefetch(); code != 0 {
		t.Fatalf("prefetch --user alice: exit %d\n%s", code, out)
	}
	key := filepath.Join(data, "auth", "signing-key.pem")
	if st, err := os.Stat(key); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("signing key: %v %v", st, err)
	}
	stop()
	addr, log2, _ := serveLogged(t, args...)
	if resp, _ := get("/v2/ci/team-a/app/tags/list", "Authorization", "Bearer "+tok.Token); resp.StatusCode != 200 {
		t.Fatalf("the token after a restart: %d (the key was not kept)", resp.StatusCode)
	}
	for _, l := range []string{log.String(), log2.String()} {
		if strings.Contains(l, "alice-secret-pw") || strings.Contains(l, tok.Token) || strings.Contains(l, tok.Token[len(tok.Token)-20:]) {
			t.Fatalf("a password or token was logged:\n%s", l)
		}
		if !strings.Contains(l, "auth on") {
			t.Fatalf("no auth line in the log:\n%s", l)
		}
	}
}

// auth over plain HTTP on an address other hosts reach is warned about;
// on loopback it is not.
func TestServe_AuthPlainHTTPWarning(t *testing.T) {
	dir := t.TempDir()
	hash, _ := bcrypt.GenerateFromPassword([]byte("pw"), bcrypt.MinCost)
	htpasswd := filepath.Join(dir, "htpasswd")
	os.WriteFile(htpasswd, []byte("alice:"+string(hash)+"\n"), 0o600)
	cfg := filepath.Join(dir, "c.yaml")
	os.WriteFile(cfg, []byte("auth:\n  htpasswd: "+htpasswd+"\n"), 0o600)
	for _, c := range []struct {
		listen string
		warn   bool
	}{{"0.0.0.0:0", true}, {"127.0.0.1:0", false}} {
		_, log, stop := serveLogged(t, "--config", cfg, "--data", t.TempDir(), "--listen", c.listen)
		stop()
		if got := strings.Contains(log.String(), "auth is on over plain HTTP"); got != c.warn {
			t.Errorf("listen %s: warned %v, want %v\n%s", c.listen, got, c.warn, log.String())
		}
	}
}
