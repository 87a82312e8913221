package main

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ocimirror/ocimirror/internal/registrytest"
)

// basicAuth refuses every request without user me and password s3cret.
func basicAuth(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if u, p, ok := r.BasicAuth(); !ok || u != "me" || p != "s3cret" {
			w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// An upstream password from a file or from the environment reaches the
// upstream, and is never logged; an unset variable stops start-up naming it.
func TestServe_UpstreamPasswordFromFileOrEnv(t *testing.T) {
	reg := registrytest.New(t, registrytest.WithMiddleware(basicAuth))
	reg.PushImage(t, "team/app", "v1", 1000)
	dir := t.TempDir()
	pwFile := filepath.Join(dir, "pw")
	os.WriteFile(pwFile, []byte("s3cret\n"), 0o600)
	t.Setenv("OCIMIRROR_TEST_UPSTREAM_PW", "s3cret")
	config := func(source string) string {
		p := filepath.Join(t.TempDir(), "c.yaml")
		os.WriteFile(p, []byte("defaultUpstream: "+reg.Host+"\nupstreams:\n  - name: "+reg.Host+"\n    url: "+reg.URL+"\n    username: me\n    "+source+"\n"), 0o600)
		return p
	}
	for _, source := range []string{"passwordFile: " + pwFile, "passwordEnv: OCIMIRROR_TEST_UPSTREAM_PW"} {
		t.Run(strings.TrimSuffix(strings.Fields(source)[0], ":"), func(t *testing.T) {
			addr, log, stop := serveLogged(t, "--config", config(source), "--data", t.TempDir())
			resp, err := http.Get("http://" + addr + "/v2/team/app/manifests/v1")
			if err != nil {
				t.Fatal(err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 {
				t.Fatalf("pull: %d\n%s", resp.StatusCode, log.String())
			}
			if _, out := stop(); strings.Contains(out, "s3cret") {
				t.Errorf("the log shows the password:\n%s", out)
			}
		})
	}

	var stdout, stderr bytes.Buffer
	code := run(context.Background(), []string{"serve", "--config", config("passwordEnv: OCIMIRROR_TEST_UNSET_PW"), "--data", t.TempDir(), "--listen", "127.0.0.1:0", "--admin-listen", "off"}, &stdout, &stderr)
	if code != 1 || !strings.Contains(stderr.String(), `passwordEnv: environment variable \"OCIMIRROR_TEST_UNSET_PW\" is not set`) {
		t.Fatalf("exit %d, stderr %q", code, stderr.String())
	}
}
