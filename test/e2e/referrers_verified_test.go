package e2e

import (
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/internal/registrytest"
)

// TestE2E_Referrers_OnlyVerified: an upstream whose fallback index names,
// beside a real signature, a referrer that does not exist, a layer blob,
// an artifact of another subject and malformed entries (md5, bad hex, no
// media type, negative size). oras discover and regctl artifact list
// through ocimirror succeed and show the real one only. Then an artifact
// attached to ocimirror (push: local) is deleted with oras: it is gone
// from the answer, also after a restart.
func TestE2E_Referrers_OnlyVerified(t *testing.T) {
	oras, regctl := tool(t, "oras"), tool(t, "regctl")
	reg := registrytest.New(t)
	img := reg.PushImage(t, "app", "v1", 100)
	other := reg.PushImage(t, "app", "other", 100)
	sig := reg.PushArtifact(t, "app", img.Descriptor(), "application/vnd.e2e.sig", nil)
	elsewhere := reg.PushArtifact(t, "app", other.Descriptor(), "application/vnd.e2e.sig", nil)
	layer := reg.PushBlob(t, "app", []byte("a layer"))
	entries := []v1.Descriptor{
		sig,
		{MediaType: v1.MediaTypeImageManifest, Digest: digest.FromString("never pushed"), Size: 300, ArtifactType: "application/vnd.e2e.sbom"},
		{MediaType: v1.MediaTypeImageLayer, Digest: layer, Size: 7},
		elsewhere,
		{MediaType: v1.MediaTypeImageManifest, Digest: "md5:" + digest.Digest(strings.Repeat("0", 32)), Size: 10},
		{MediaType: v1.MediaTypeImageManifest, Digest: "sha256:xyz", Size: 10},
		{MediaType: "", Digest: digest.FromString("no media type"), Size: 10},
		{MediaType: v1.MediaTypeImageManifest, Digest: digest.FromString("negative"), Size: -5},
	}
	index, _ := json.Marshal(v1.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageIndex, Manifests: entries})
	indexDigest := digest.FromBytes(index)
	reg.Intercept(func(w http.ResponseWriter, r *http.Request) bool {
		switch r.URL.Path {
		case "/v2/app/manifests/sha256-" + img.Digest.Encoded(), "/v2/app/manifests/" + indexDigest.String():
		default:
			return false
		}
		w.Header().Set("Content-Type", v1.MediaTypeImageIndex)
		w.Header().Set("Docker-Content-Digest", indexDigest.String())
		w.Header().Set("Content-Length", strconv.Itoa(len(index)))
		if r.Method == http.MethodGet {
			_, _ = w.Write(index)
		}
		return true
	})
	om := startMirror(t, `listen: "{{LISTEN}}"
storage:
  path: {{DATA}}
defaultUpstream: up.test
upstreams:
  - name: up.test
    url: http://`+reg.Host+`
    tagTTL: 1m
`)
	home := t.TempDir()
	env := []string{"HOME=" + home}
	run(t, env, regctl, "registry", "set", om.host, "--tls", "disabled")
	want := referrer{sig.Digest.String(), "application/vnd.e2e.sig"}
	same(t, "oras discover", orasDiscover(t, oras, om.host+"/app:v1"), want)
	same(t, "regctl artifact list", regctlList(t, regctl, env, om.host+"/app:v1"), want)
	same(t, "oras discover --artifact-type of a claim", orasDiscover(t, oras, om.host+"/app:v1", "--artifact-type", "application/vnd.e2e.sbom"))

	// Attached to ocimirror, then deleted there.
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "note.txt"), []byte("attached by mistake"), 0o644); err != nil {
		t.Fatal(err)
	}
	local := orasDigest(t, runIn(t, dir, env, oras, "attach", "--plain-http", "--artifact-type", "application/vnd.e2e.mistake",
		om.host+"/app:v1", "note.txt"))
	same(t, "after attach", orasDiscover(t, oras, om.host+"/app:v1"), want, referrer{local, "application/vnd.e2e.mistake"})
	run(t, env, oras, "manifest", "delete", "--plain-http", "--force", om.host+"/app@"+local)
	same(t, "after delete", orasDiscover(t, oras, om.host+"/app:v1"), want)
	if status, _, _ := httpGet(t, "http://"+om.host+"/v2/app/manifests/"+local); status != 404 {
		t.Errorf("the deleted referrer is still served: %d", status)
	}
	om.stop()
	om.start(t)
	run(t, env, regctl, "registry", "set", om.host, "--tls", "disabled")
	same(t, "after a restart", orasDiscover(t, oras, om.host+"/app:v1"), want)
	same(t, "regctl after a restart", regctlList(t, regctl, env, om.host+"/app:v1"), want)
	// Upstream content refuses deletion.
	req, _ := http.NewRequest(http.MethodDelete, "http://"+om.host+"/v2/app/manifests/"+sig.Digest.String(), nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("delete of the upstream's referrer: %d, want 405", resp.StatusCode)
	}
}
