package e2e

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// seeded names the images seedImages pushed: repository e2e/app with tags
// amd64-oci, arm64-oci, multi-oci (an OCI index), amd64-docker,
// arm64-docker, multi-docker (a Docker schema2 manifest list), and
// library/alpine:3 (the Docker list again, as an official image).
type seeded struct {
	digests map[string]string // "e2e/app:multi-oci" -> manifest digest
}

var seedTags = []string{"e2e/app:amd64-oci", "e2e/app:arm64-oci", "e2e/app:multi-oci",
	"e2e/app:amd64-docker", "e2e/app:arm64-docker", "e2e/app:multi-docker", "library/alpine:3"}

// layerFile writes a gzip tar layer holding a few files, one of them
// random, so the layer is unique and unpacks as a real one.
func layerFile(t *testing.T, dir, name string, randomBytes int) string {
	t.Helper()
	var buf bytes.Buffer
	gz := gzip.NewWriter(&buf)
	tw := tar.NewWriter(gz)
	add := func(path string, data []byte) {
		if err := tw.WriteHeader(&tar.Header{Name: path, Mode: 0o644, Size: int64(len(data)), Typeflag: tar.TypeReg}); err != nil {
			t.Fatal(err)
		}
		_, _ = tw.Write(data)
	}
	_ = tw.WriteHeader(&tar.Header{Name: "etc/", Mode: 0o755, Typeflag: tar.TypeDir})
	add("etc/"+name, []byte("layer "+name+"\n"))
	random := make([]byte, randomBytes)
	_, _ = rand.Read(random)
	add("random-"+name, random)
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := gz.Close(); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, name+".tar.gz")
	if err := os.WriteFile(p, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// seedImages builds real images with crane (gzip tar layers, configs whose
// diff_ids match, platforms set) and pushes them to the registry at host.
func seedImages(t *testing.T, host string) seeded {
	t.Helper()
	crane := tool(t, "crane")
	dir := t.TempDir()
	l1 := layerFile(t, dir, "one", 200_000)
	l2 := layerFile(t, dir, "two", 50_000)
	l3 := layerFile(t, dir, "three", 10_000)
	c := func(args ...string) string {
		t.Helper()
		return strings.TrimSpace(run(t, nil, crane, append([]string{"--insecure"}, args...)...))
	}
	ref := func(tag string) string { return host + "/" + tag }
	image := func(tag, platform string, oci bool, layers ...string) {
		args := []string{"append", "-t", ref(tag)}
		if oci {
			args = append(args, "--oci-empty-base")
		}
		for _, l := range layers {
			args = append(args, "-f", l)
		}
		c(args...)
		c("mutate", ref(tag), "--set-platform", platform, "-t", ref(tag))
	}
	image("e2e/app:amd64-oci", "linux/amd64", true, l1, l2)
	image("e2e/app:arm64-oci", "linux/arm64", true, l3)
	c("index", "append", "-m", ref("e2e/app:amd64-oci"), "-m", ref("e2e/app:arm64-oci"), "-t", ref("e2e/app:multi-oci"))
	image("e2e/app:amd64-docker", "linux/amd64", false, l1, l3)
	image("e2e/app:arm64-docker", "linux/arm64", false, l2)
	c("index", "append", "--docker-empty-base", "-m", ref("e2e/app:amd64-docker"), "-m", ref("e2e/app:arm64-docker"), "-t", ref("e2e/app:multi-docker"))
	c("copy", ref("e2e/app:multi-docker"), ref("library/alpine:3"))
	s := seeded{digests: map[string]string{}}
	for _, tag := range seedTags {
		s.digests[tag] = c("digest", ref(tag))
	}
	if !strings.Contains(c("manifest", ref("e2e/app:multi-docker")), "manifest.list.v2+json") ||
		!strings.Contains(c("manifest", ref("e2e/app:multi-oci")), "image.index.v1+json") {
		t.Fatal("seeded images do not have the intended media types")
	}
	return s
}
