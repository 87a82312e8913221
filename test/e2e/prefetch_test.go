package e2e

import (
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestE2E_Prefetch: distribution v3 holds a multi-platform image with an
// SBOM attached to the index (oras attach; distribution has no referrers
// API, so oras keeps the fallback tag), a signature attached to the SBOM,
// and an attestation attached to each platform. Two mirrors in front of
// it: ocimirror prefetch warms one with --platform linux/amd64 and the
// other with every platform; a reference that does not exist makes it
// exit 1 and is named, and the others are still fetched. Then the
// upstream is stopped: crane pulls and oras discover through each mirror
// get everything prefetched, and the platform not asked for is not there.
func TestE2E_Prefetch(t *testing.T) {
	oras, crane := tool(t, "oras"), tool(t, "crane")
	up := startDistribution(t, "registry")
	s := seedImages(t, up.host)
	dir := t.TempDir()
	file := func(name, content string) string {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return name
	}
	attach := func(subject, artifactType, name, content string) string {
		t.Helper()
		return orasDigest(t, runIn(t, dir, nil, oras, "attach", "--plain-http", "--artifact-type", artifactType,
			subject, file(name, content)))
	}
	var index struct {
		Manifests []struct {
			Digest   string `json:"digest"`
			Platform struct {
				Architecture string `json:"architecture"`
			} `json:"platform"`
		} `json:"manifests"`
	}
	if err := json.Unmarshal([]byte(run(t, nil, crane, "--insecure", "manifest", up.host+"/e2e/app:multi-oci")), &index); err != nil {
		t.Fatal(err)
	}
	child := map[string]string{}
	for _, m := range index.Manifests {
		child[m.Platform.Architecture] = m.Digest
	}
	if child["amd64"] == "" || child["arm64"] == "" {
		t.Fatalf("the seeded index: %+v", index)
	}
	var armImage struct {
		Layers []struct{ Digest string } `json:"layers"`
	}
	if err := json.Unmarshal([]byte(run(t, nil, crane, "--insecure", "manifest", up.host+"/e2e/app@"+child["arm64"])), &armImage); err != nil || len(armImage.Layers) != 1 {
		t.Fatalf("the arm64 image: %v %+v", err, armImage)
	}
	armLayer := armImage.Layers[0].Digest

	upRepo := up.host + "/e2e/app"
	sbom := attach(up.host+"/e2e/app:multi-oci", "application/vnd.e2e.sbom", "sbom.json", `{"sbom":"of the index"}`)
	sig := attach(upRepo+"@"+sbom, "application/vnd.e2e.sig", "sig.txt", "signature of the SBOM")
	amdAtt := attach(upRepo+"@"+child["amd64"], "application/vnd.e2e.attestation", "amd.json", `{"attests":"amd64"}`)
	armAtt := attach(upRepo+"@"+child["arm64"], "application/vnd.e2e.attestation", "arm.json", `{"attests":"arm64"}`)

	cfg := mirrorConfig("up.test", up.host, "")
	amdOnly := startMirror(t, cfg)
	all := startMirror(t, cfg)
	ref := "up.test/e2e/app:multi-oci"
	digest := s.digests["e2e/app:multi-oci"]

	// --platform linux/amd64: the index, amd64 (config, 2 layers), the
	// SBOM, its signature and amd64's attestation (with one empty config
	// shared by the three artifacts, and a file each).
	out := run(t, nil, ocimirrorBin, "prefetch", "--mirror", "http://"+amdOnly.host, "--platform", "linux/amd64", ref)
	for _, want := range []string{
		"ok   " + ref + " " + digest + " (5 manifests, 3 referrers, 7 blobs, ",
		"prefetched 1 of 1 images: 5 manifests, 3 referrers, 7 blobs, ",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("prefetch --platform linux/amd64 output lacks %q:\n%s", want, out)
		}
	}

	// Every platform, a Docker manifest list named without a host (the
	// default upstream) too, and a tag that does not exist.
	out, err := runErr("", nil, ocimirrorBin, "prefetch", "--mirror", all.host, ref, "up.test/e2e/app:no-such-tag", "e2e/app:multi-docker")
	if exit, ok := errors.AsType[*exec.ExitError](err); !ok || exit.ExitCode() != 1 {
		t.Fatalf("prefetch with a missing tag: %v, want exit 1\n%s", err, out)
	}
	for _, want := range []string{
		"ok   " + ref + " " + digest + " (7 manifests, 4 referrers, 10 blobs, ",
		"ok   e2e/app:multi-docker " + s.digests["e2e/app:multi-docker"] + " (3 manifests, 0 referrers, ",
		"FAIL up.test/e2e/app:no-such-tag (1 error;",
		"ocimirror prefetch: up.test/e2e/app:no-such-tag: manifest no-such-tag: GET http://" + all.host + "/v2/up.test/e2e/app/manifests/no-such-tag: 404 MANIFEST_UNKNOWN",
		"prefetched 2 of 3 images: 10 manifests, 4 referrers, ",
		"ocimirror prefetch: 1 of 3 references failed:\n  up.test/e2e/app:no-such-tag\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("prefetch of every platform: output lacks %q:\n%s", want, out)
		}
	}

	// The upstream is gone (its port refuses connections).
	up.stop()
	if code, _, _ := httpGet(t, "http://"+all.host+"/v2/up.test/e2e/app/manifests/amd64-oci"); code == http.StatusOK {
		t.Fatal("a tag never fetched is served with the upstream stopped: the test proves nothing")
	}

	// Every platform: crane pulls the whole index (checking every digest),
	// by the host-prefixed name and by the default upstream's name alike,
	// and the Docker list; oras discover shows the referrers tree.
	for _, name := range []string{all.host + "/" + ref, all.host + "/e2e/app:multi-oci", all.host + "/e2e/app:multi-docker"} {
		layout := filepath.Join(t.TempDir(), "layout")
		run(t, nil, crane, "--insecure", "pull", "--format", "oci", name, layout)
		if idx, err := os.ReadFile(filepath.Join(layout, "index.json")); err != nil || !strings.Contains(string(idx), "sha256:") {
			t.Errorf("crane pull %s with the upstream stopped: %s %v", name, idx, err)
		}
	}
	allRepo := all.host + "/up.test/e2e/app"
	same(t, "oras discover of the index", orasDiscover(t, oras, all.host+"/"+ref), referrer{sbom, "application/vnd.e2e.sbom"})
	same(t, "oras discover of the SBOM", orasDiscover(t, oras, allRepo+"@"+sbom), referrer{sig, "application/vnd.e2e.sig"})
	same(t, "oras discover of amd64", orasDiscover(t, oras, allRepo+"@"+child["amd64"]), referrer{amdAtt, "application/vnd.e2e.attestation"})
	same(t, "oras discover of arm64", orasDiscover(t, oras, allRepo+"@"+child["arm64"]), referrer{armAtt, "application/vnd.e2e.attestation"})
	pulled := t.TempDir()
	runIn(t, pulled, nil, oras, "pull", "--plain-http", allRepo+"@"+sig)
	if b, err := os.ReadFile(filepath.Join(pulled, "sig.txt")); err != nil || string(b) != "signature of the SBOM" {
		t.Errorf("oras pull of the signature with the upstream stopped: %q %v", b, err)
	}

	// linux/amd64 only: that platform pulls, with its referrers; arm64
	// and its layer were never fetched, so they cannot be served now.
	amdRepo := amdOnly.host + "/up.test/e2e/app"
	run(t, nil, crane, "--insecure", "pull", "--platform", "linux/amd64", amdOnly.host+"/"+ref, filepath.Join(t.TempDir(), "amd64.tar"))
	same(t, "oras discover of the index (amd64 only)", orasDiscover(t, oras, amdOnly.host+"/"+ref), referrer{sbom, "application/vnd.e2e.sbom"})
	same(t, "oras discover of the SBOM (amd64 only)", orasDiscover(t, oras, amdRepo+"@"+sbom), referrer{sig, "application/vnd.e2e.sig"})
	same(t, "oras discover of amd64 (amd64 only)", orasDiscover(t, oras, amdRepo+"@"+child["amd64"]), referrer{amdAtt, "application/vnd.e2e.attestation"})
	if out, err := runErr("", nil, crane, "--insecure", "pull", "--platform", "linux/arm64", amdOnly.host+"/"+ref, filepath.Join(t.TempDir(), "arm64.tar")); err == nil {
		t.Errorf("crane pull --platform linux/arm64 through the amd64-only mirror succeeded with the upstream stopped:\n%s", out)
	}
	for _, path := range []string{"blobs/" + armLayer, "manifests/" + child["arm64"], "manifests/" + armAtt} {
		if code, _, _ := httpGet(t, "http://"+amdOnly.host+"/v2/up.test/e2e/app/"+path); code == http.StatusOK {
			t.Errorf("%s of arm64, not asked for, is served by the amd64-only mirror with the upstream stopped", path)
		}
	}
}
