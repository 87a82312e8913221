package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/internal/registrytest"
)

// upstreamImage is a multi-platform image on an upstream: an index tagged
// v1 of linux/amd64 and linux/arm64, an SBOM of the index, a signature of
// the SBOM, and an attestation of each platform.
type upstreamImage struct {
	index                     digest.Digest
	amd, arm                  registrytest.Image
	sbom, sig, amdAtt, armAtt digest.Digest
	// content is every manifest and blob of it, by digest.
	content map[digest.Digest][]byte
}

func pushUpstreamImage(t *testing.T, reg *registrytest.Registry, repo string) upstreamImage {
	t.Helper()
	u := upstreamImage{content: map[digest.Digest][]byte{}}
	u.amd = reg.PushImage(t, repo, "amd64", 300_000, 2000)
	u.arm = reg.PushImage(t, repo, "arm64", 100_000)
	for _, img := range []registrytest.Image{u.amd, u.arm} {
		u.content[img.Digest] = img.Manifest
		u.content[digest.FromBytes(img.Config)] = img.Config
		for i, l := range img.Layers {
			u.content[img.LayerDigests[i]] = l
		}
	}
	amd, arm := u.amd.Descriptor(), u.arm.Descriptor()
	amd.Platform = &v1.Platform{OS: "linux", Architecture: "amd64"}
	arm.Platform = &v1.Platform{OS: "linux", Architecture: "arm64", Variant: "v8"}
	data, _ := json.Marshal(v1.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageIndex, Manifests: []v1.Descriptor{amd, arm}})
	u.index = reg.PushManifest(t, repo, "v1", v1.MediaTypeImageIndex, data)
	u.content[u.index] = data
	attach := func(subject v1.Descriptor, artifactType string) digest.Digest {
		m, blobs := registrytest.Artifact(subject, artifactType, nil)
		for _, b := range blobs {
			u.content[reg.PushBlob(t, repo, b)] = b
		}
		d := reg.PushManifest(t, repo, digest.FromBytes(m).String(), v1.MediaTypeImageManifest, m)
		u.content[d] = m
		return d
	}
	u.sbom = attach(v1.Descriptor{MediaType: v1.MediaTypeImageIndex, Digest: u.index, Size: int64(len(data))}, "application/vnd.test.sbom")
	u.sig = attach(v1.Descriptor{MediaType: v1.MediaTypeImageManifest, Digest: u.sbom, Size: int64(len(u.content[u.sbom]))}, "application/vnd.test.signature")
	u.amdAtt = attach(u.amd.Descriptor(), "application/vnd.test.attestation")
	u.armAtt = attach(u.arm.Descriptor(), "application/vnd.test.attestation")
	return u
}

// mirrorGet fetches a path from the mirror: status and body.
func mirrorGet(t *testing.T, addr, path string) (int, []byte) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, "http://"+addr+path, nil)
	req.Header.Set("Accept", strings.Join([]string{v1.MediaTypeImageIndex, v1.MediaTypeImageManifest}, ", "))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

// ocimirror prefetch against a running mirror, with --platform linux/amd64
// and two references that fail (an unknown tag, a malformed name): it goes
// on past them, names both and exits 1. With the upstream then refusing
// everything, the mirror serves what was prefetched (the index, amd64
// with its blobs and attestation, the SBOM and its signature, and their
// referrers answers), and not arm64.
func TestRun_Prefetch(t *testing.T) {
	reg := registrytest.New(t, registrytest.WithReferrersAPI())
	u := pushUpstreamImage(t, reg, "team/app")
	addr, _ := serveProcess(t, "--data", t.TempDir(), "--upstream", reg.Host+"="+reg.URL, "--default-upstream", reg.Host)

	refFile := filepath.Join(t.TempDir(), "refs.txt")
	os.WriteFile(refFile, []byte("# the app\n\n"+reg.Host+"/team/app:v1   # by tag\nteam/app:missing\n"), 0o644)
	var stdout, stderr bytes.Buffer
	code := run(context.Background(), []string{"prefetch", "--mirror", "http://" + addr, "--from-file", refFile,
		"Bad//Name", "--platform", "linux/amd64"}, &stdout, &stderr)
	if code != 1 {
		t.Fatalf("exit %d, want 1\nstdout:\n%s\nstderr:\n%s", code, stdout.String(), stderr.String())
	}
	ok := regexp.MustCompile(`(?m)^ok   ` + regexp.QuoteMeta(reg.Host+"/team/app:v1 "+u.index.String()) +
		` \(5 manifests, 3 referrers, 7 blobs, ([0-9.]+ KiB) in `)
	if !ok.MatchString(stdout.String()) {
		t.Errorf("no ok line for the image (index, amd64, SBOM, signature, attestation; 3+4 blobs) in:\n%s", stdout.String())
	}
	for _, want := range []string{"FAIL team/app:missing (1 error;", "FAIL Bad//Name (1 error;", "prefetched 1 of 3 images: 5 manifests, 3 referrers, 7 blobs"} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("stdout lacks %q:\n%s", want, stdout.String())
		}
	}
	for _, want := range []string{
		"ocimirror prefetch: team/app:missing: manifest missing: GET http://" + addr + "/v2/team/app/manifests/missing: 404 MANIFEST_UNKNOWN",
		"ocimirror prefetch: Bad//Name: reference \"Bad//Name\"",
		"2 of 3 references failed:\n  Bad//Name\n  team/app:missing\n",
	} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("stderr lacks %q:\n%s", want, stderr.String())
		}
	}

	// The upstream is gone: what was prefetched is served, byte for byte.
	reg.Intercept(func(w http.ResponseWriter, r *http.Request) bool {
		w.WriteHeader(http.StatusServiceUnavailable)
		return true
	})
	repo := "/v2/" + reg.Host + "/team/app/"
	served := []digest.Digest{u.index, u.amd.Digest, u.sbom, u.sig, u.amdAtt}
	for _, d := range served {
		if code, body := mirrorGet(t, addr, repo+"manifests/"+d.String()); code != 200 || !bytes.Equal(body, u.content[d]) {
			t.Errorf("manifest %s with the upstream down: %d", d, code)
		}
	}
	if code, body := mirrorGet(t, addr, repo+"manifests/v1"); code != 200 || !bytes.Equal(body, u.content[u.index]) {
		t.Errorf("the tag with the upstream down: %d", code)
	}
	blobs := []digest.Digest{digest.FromBytes(u.amd.Config), u.amd.LayerDigests[0], u.amd.LayerDigests[1]}
	for _, d := range []digest.Digest{u.sbom, u.sig, u.amdAtt} {
		var m v1.Manifest
		json.Unmarshal(u.content[d], &m)
		blobs = append(blobs, m.Config.Digest, m.Layers[0].Digest)
	}
	for _, d := range blobs {
		if code, body := mirrorGet(t, addr, repo+"blobs/"+d.String()); code != 200 || !bytes.Equal(body, u.content[d]) {
			t.Errorf("blob %s with the upstream down: %d", d, code)
		}
	}
	for subject, want := range map[digest.Digest]digest.Digest{u.index: u.sbom, u.sbom: u.sig, u.amd.Digest: u.amdAtt} {
		code, body := mirrorGet(t, addr, repo+"referrers/"+subject.String())
		if code != 200 || !strings.Contains(string(body), want.String()) {
			t.Errorf("referrers of %s with the upstream down: %d %s", subject, code, body)
		}
	}
	// arm64 was not asked for: not stored.
	for _, path := range []string{"manifests/" + u.arm.Digest.String(), "blobs/" + u.arm.LayerDigests[0].String(), "manifests/" + u.armAtt.String()} {
		if code, _ := mirrorGet(t, addr, repo+path); code == 200 {
			t.Errorf("%s (arm64, not asked for) is served with the upstream down", path)
		}
	}
}

// A blob whose bytes do not match its digest fails the reference, and
// prefetch says which blob; the other references are still fetched.
func TestRun_PrefetchBlobMismatch(t *testing.T) {
	// A registry stands in for the mirror here: prefetch checks whatever
	// answers, and a mirror never serves such a blob.
	reg := registrytest.New(t)
	bad := reg.PushImage(t, "team/bad", "v1", 5000)
	good := reg.PushImage(t, "team/good", "v1", 5000)
	reg.Intercept(func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path != "/v2/team/bad/blobs/"+bad.LayerDigests[0].String() {
			return false
		}
		w.Write(bytes.Repeat([]byte{'x'}, 5000))
		return true
	})
	var stdout, stderr bytes.Buffer
	code := run(context.Background(), []string{"prefetch", "--mirror", reg.URL, "team/bad:v1", "team/good:v1"}, &stdout, &stderr)
	if code != 1 {
		t.Fatalf("exit %d\n%s\n%s", code, stdout.String(), stderr.String())
	}
	if want := "ocimirror prefetch: team/bad:v1: layer blob " + bad.LayerDigests[0].String() + ": the bytes received do not hash to it"; !strings.Contains(stderr.String(), want) {
		t.Errorf("stderr lacks %q:\n%s", want, stderr.String())
	}
	if !strings.Contains(stderr.String(), "1 of 2 references failed:\n  team/bad:v1\n") ||
		!strings.Contains(stdout.String(), "ok   team/good:v1 "+good.Digest.String()) ||
		!strings.Contains(stdout.String(), "prefetched 1 of 2 images") {
		t.Errorf("stdout:\n%s\nstderr:\n%s", stdout.String(), stderr.String())
	}
}

func TestRun_PrefetchUsage(t *testing.T) {
	tests := []struct {
		name string
		args []string
		code int
		out  string // in stdout for 0, stderr otherwise
	}{
		{"help", []string{"prefetch", "--help"}, 0, "Usage: ocimirror prefetch"},
		{"help command", []string{"help", "prefetch"}, 0, "-platform os/arch[/variant]"},
		{"no reference", []string{"prefetch"}, 2, "no reference given"},
		{"platform without arch", []string{"prefetch", "--platform", "linux", "alpine"}, 2, `--platform: platform "linux": want os/arch`},
		{"bad mirror", []string{"prefetch", "--mirror", "ftp://x", "alpine"}, 2, "--mirror"},
		{"bad concurrency", []string{"prefetch", "--concurrency", "0", "alpine"}, 2, "--concurrency 0"},
		{"unknown flag", []string{"prefetch", "--bogus", "alpine"}, 2, "Usage: ocimirror prefetch"},
		{"missing file", []string{"prefetch", "--from-file", "/nonexistent/refs"}, 1, "/nonexistent/refs"},
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

func TestReadRefFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "refs")
	os.WriteFile(p, []byte("# comment\n\nalpine:3  # trailing\n  ghcr.io/org/app@sha256:"+strings.Repeat("a", 64)+"\nBAD REF\n"), 0o644)
	ts, err := readRefFile(p)
	if err != nil || len(ts) != 3 {
		t.Fatalf("%v %v", ts, err)
	}
	if ts[0].text != "alpine:3" || ts[0].err != nil || ts[1].ref.Name() != "ghcr.io/org/app" || ts[1].err != nil {
		t.Errorf("read %+v", ts[:2])
	}
	if ts[2].err == nil || !strings.HasPrefix(ts[2].err.Error(), p+":5: ") {
		t.Errorf("bad line: %v", ts[2].err)
	}
}

// Interrupted (SIGINT, SIGTERM), prefetch stops, exits 1 and names the
// references it did not try.
func TestRun_PrefetchInterrupted(t *testing.T) {
	reg := registrytest.New(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var stdout, stderr bytes.Buffer
	code := run(ctx, []string{"prefetch", "--mirror", reg.URL, "team/a:v1", "team/b:v1"}, &stdout, &stderr)
	if code != 1 || !strings.Contains(stderr.String(), "interrupted; 2 references not tried:\n  team/a:v1\n  team/b:v1\n") {
		t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout.String(), stderr.String())
	}
	if reg.Total() != 0 {
		t.Errorf("%d requests after the interruption", reg.Total())
	}
}
