package main

import (
	"bytes"
	"context"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/ocimirror/ocimirror/internal/registrytest"
)

var adminRE = regexp.MustCompile(`admin listening"?,? ?"?addr"?[=:]"?([^"\s,]+)`)

// served checks that a mirror serves an upstream image byte for byte, by
// tag and by digest, with every blob and the referrers of the index, the
// SBOM and amd64.
func served(t *testing.T, what, addr, repo string, u upstreamImage) {
	t.Helper()
	prefix := "/v2/" + repo + "/"
	if code, body := mirrorGet(t, addr, prefix+"manifests/v1"); code != 200 || !bytes.Equal(body, u.content[u.index]) {
		t.Errorf("%s: the tag: %d", what, code)
	}
	for d, b := range u.content {
		kind := "blobs/"
		if bytes.Contains(b, []byte(`"schemaVersion"`)) {
			kind = "manifests/"
		}
		if code, body := mirrorGet(t, addr, prefix+kind+d.String()); code != 200 || !bytes.Equal(body, b) {
			t.Errorf("%s: %s%s: %d", what, kind, d, code)
		}
	}
	for subject, want := range map[digest.Digest]digest.Digest{u.index: u.sbom, u.sbom: u.sig, u.amd.Digest: u.amdAtt, u.arm.Digest: u.armAtt} {
		if code, body := mirrorGet(t, addr, prefix+"referrers/"+subject.String()); code != 200 || !strings.Contains(string(body), want.String()) {
			t.Errorf("%s: referrers of %s: %d %s", what, subject, code, body)
		}
		// The fallback tag, for clients that read it instead.
		if code, body := mirrorGet(t, addr, prefix+"manifests/sha256-"+subject.Encoded()); code != 200 || !strings.Contains(string(body), want.String()) {
			t.Errorf("%s: fallback tag of %s: %d %s", what, subject, code, body)
		}
	}
}

// export through a running mirror, then the upstream goes away; import
// into a stopped mirror (--data) and into a running one (--admin), both
// offline: each serves the image as the first did, referrers included.
// A bundle with a flipped byte and a cut one are refused by name, and the
// mirror serves what it did before.
func TestRun_ExportImport(t *testing.T) {
	reg := registrytest.New(t, registrytest.WithReferrersAPI())
	u := pushUpstreamImage(t, reg, "team/app")
	up := "--upstream=" + reg.Host + "=" + reg.URL
	a, _ := serveProcess(t, "--data", t.TempDir(), up, "--default-upstream", reg.Host)

	dir := t.TempDir()
	out := filepath.Join(dir, "app.tar")
	var stdout, stderr bytes.Buffer
	code := run(context.Background(), []string{"export", "--mirror", "http://" + a, "--output", out, reg.Host + "/team/app:v1"}, &stdout, &stderr)
	if code != 0 {
		t.Fatalf("export: exit %d\n%s\n%s", code, stdout.String(), stderr.String())
	}
	for _, want := range []string{
		"ok   " + reg.Host + "/team/app:v1 " + u.index.String() + " (11 manifests, 4 referrers, ",
		"exported 1 images to " + out + ": 11 manifests, 4 referrers, ",
	} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("export output lacks %q:\n%s", want, stdout.String())
		}
	}
	if left, _ := filepath.Glob(filepath.Join(dir, ".*partial*")); len(left) != 0 {
		t.Errorf("temporary files left: %v", left)
	}

	// The upstream is gone.
	reg.Intercept(func(w http.ResponseWriter, r *http.Request) bool {
		w.WriteHeader(http.StatusServiceUnavailable)
		return true
	})
	repo := reg.Host + "/team/app"

	// A stopped mirror.
	data := t.TempDir()
	stdout.Reset()
	if code := run(context.Background(), []string{"import", "--data", data, out}, &stdout, &stderr); code != 0 {
		t.Fatalf("import --data: exit %d\n%s\n%s", code, stdout.String(), stderr.String())
	}
	if want := "ok   " + reg.Host + "/team/app:v1 " + u.index.String() + "\nimported 1 images: 7 manifests, 4 referrers, "; !strings.Contains(stdout.String(), want) {
		t.Errorf("import output lacks %q:\n%s", want, stdout.String())
	}
	b, _ := serveProcess(t, "--data", data, up, "--offline")
	served(t, "imported while stopped", b, repo, u)
	// Its data directory, while it runs, is not for --data.
	stderr.Reset()
	if code := run(context.Background(), []string{"import", "--data", data, out}, &stdout, &stderr); code != 1 || !strings.Contains(stderr.String(), "is the mirror running? import into it with --admin") {
		t.Errorf("import --data into a running mirror's directory: exit %d\n%s", code, stderr.String())
	}

	// A running one.
	c, log, _ := serveLogged(t, "--data", t.TempDir(), up, "--offline")
	m := adminRE.FindStringSubmatch(log.String())
	if m == nil {
		t.Fatalf("no admin address in the log:\n%s", log.String())
	}
	admin := "http://" + m[1]
	if code, _ := mirrorGet(t, c, "/v2/"+repo+"/manifests/v1"); code != 404 {
		t.Fatalf("an offline mirror serves the image before the import: %d", code)
	}
	stdout.Reset()
	if code := run(context.Background(), []string{"import", "--admin", admin, out}, &stdout, &stderr); code != 0 {
		t.Fatalf("import --admin: exit %d\n%s\n%s", code, stdout.String(), stderr.String())
	}
	served(t, "imported while running", c, repo, u)

	// Damaged bundles, into the running mirror: refused, nothing changes.
	bundleBytes, _ := os.ReadFile(out)
	layer := u.amd.LayerDigests[0]
	flipped := bytes.Clone(bundleBytes)
	at := bytes.Index(flipped, u.content[layer])
	flipped[at+100] ^= 1
	os.WriteFile(filepath.Join(dir, "flipped.tar"), flipped, 0o644)
	os.WriteFile(filepath.Join(dir, "cut.tar"), bundleBytes[:len(bundleBytes)/2], 0o644)
	for _, tc := range []struct{ file, says string }{
		{"flipped.tar", `entry "blobs/sha256/` + layer.Encoded() + `": its bytes hash to`},
		{"cut.tar", "damaged or cut short"},
	} {
		stdout.Reset()
		stderr.Reset()
		code := run(context.Background(), []string{"import", "--admin", admin, filepath.Join(dir, tc.file)}, &stdout, &stderr)
		if code != 1 || !strings.Contains(stderr.String(), tc.says) || !strings.Contains(stderr.String(), "nothing was imported") {
			t.Errorf("import of %s: exit %d\n%s\n%s", tc.file, code, stdout.String(), stderr.String())
		}
		served(t, "after refusing "+tc.file, c, repo, u)
	}
	// Into a fresh mirror, the flipped bundle leaves nothing at all.
	fresh := t.TempDir()
	if code := run(context.Background(), []string{"import", "--data", fresh, filepath.Join(dir, "flipped.tar")}, &stdout, &stderr); code != 1 {
		t.Fatalf("import --data of a flipped bundle: exit %d", code)
	}
	d, _ := serveProcess(t, "--data", fresh, up, "--offline")
	for _, path := range []string{"manifests/v1", "manifests/" + u.index.String(), "blobs/" + u.amd.LayerDigests[1].String()} {
		if code, _ := mirrorGet(t, d, "/v2/"+repo+"/"+path); code != 404 {
			t.Errorf("%s after a refused import: %d", path, code)
		}
	}
}

func TestRun_ExportImportUsage(t *testing.T) {
	tests := []struct {
		name string
		args []string
		code int
		out  string // in stdout for 0, stderr otherwise
	}{
		{"export help", []string{"export", "--help"}, 0, "Usage: ocimirror export"},
		{"import help", []string{"help", "import"}, 0, "-repository name"},
		{"export without output", []string{"export", "alpine"}, 2, "no --output given"},
		{"export without reference", []string{"export", "--output", "x.tar"}, 2, "no reference given"},
		{"export bad reference", []string{"export", "--output", filepath.Join(t.TempDir(), "x.tar"), "Bad//Name"}, 1, `Bad//Name: reference "Bad//Name"`},
		{"export bad platform", []string{"export", "--output", "x.tar", "--platform", "linux", "alpine"}, 2, "--platform"},
		{"import without target", []string{"import", "b.tar"}, 2, "name a stopped mirror (--data or --config) or a running one (--admin)"},
		{"import both targets", []string{"import", "--data", "d", "--admin", "http://x", "b.tar"}, 2, "one of them"},
		{"import no bundle", []string{"import", "--data", "d"}, 2, "name one bundle"},
		{"import missing bundle", []string{"import", "--data", t.TempDir(), "/nonexistent/b.tar"}, 1, "/nonexistent/b.tar"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := run(context.Background(), tc.args, &stdout, &stderr)
			out := stderr.String()
			if tc.code == 0 {
				out = stdout.String()
			}
			if code != tc.code || !strings.Contains(out, tc.out) {
				t.Fatalf("exit %d, want %d; stdout %q, stderr %q", code, tc.code, stdout.String(), stderr.String())
			}
		})
	}
}
