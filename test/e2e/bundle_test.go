package e2e

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

var adminRE = regexp.MustCompile(`admin listening.* addr=(\S+)`)

// adminURL is the admin listener of a running mirror.
func (m *mirror) adminURL(t *testing.T) string {
	t.Helper()
	g := adminRE.FindStringSubmatch(m.log.String())
	if g == nil {
		t.Fatalf("no admin listener in the log:\n%s", m.log.String())
	}
	return "http://" + g[1]
}

// TestE2E_Bundles carries images across an air gap. Online: distribution
// v3 holds a multi-platform image with an SBOM attached by oras and a
// signature attached to the SBOM; mirror A prefetches it and exports a
// bundle, then an incremental one with two more images (the layers they
// share with the first are left out). The upstream stops (its port
// refuses connections). Offline: mirror B (offline: true, data of its
// own) imports the bundle while stopped (--data), mirror C while running
// (--admin); through each, crane pulls the image whole, oras discover
// shows the referrers tree A showed, regctl artifact list agrees, and
// containerd pulls with hosts.toml (ns=). The bundle reads with oras cp
// --from-oci-layout, regctl image import and skopeo copy oci-archive:.
// Faults: the incremental bundle with one byte flipped, and cut short, is
// refused and C serves what it did; an import killed with SIGKILL, half
// way and at the end, leaves no tag without its content after a restart.
func TestE2E_Bundles(t *testing.T) {
	oras, regctl, crane := tool(t, "oras"), tool(t, "regctl"), tool(t, "crane")
	skopeo := tool(t, "skopeo")
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
		return orasDigest(t, runIn(t, dir, nil, oras, "attach", "--plain-http", "--artifact-type", artifactType, subject, file(name, content)))
	}
	sbom := attach(up.host+"/e2e/app:multi-oci", "application/vnd.e2e.sbom", "sbom.json", `{"sbom":"of the index"}`)
	sig := attach(up.host+"/e2e/app@"+sbom, "application/vnd.e2e.sig", "sig.txt", "signature of the SBOM")
	// A cosign signature (a Sigstore bundle referrer) of the amd64 image.
	cdir := t.TempDir()
	key, pub, sc := cosignKeys(t, cdir)
	amd := s.digests["e2e/app:amd64-oci"]
	cosignSign(t, cdir, key, sc, up.host+"/e2e/app@"+amd)

	// An image with a layer of its own, for the incremental bundle.
	extra := layerFile(t, dir, "extra", 300_000)
	run(t, nil, crane, "--insecure", "append", "--oci-empty-base", "-f", extra, "-t", up.host+"/e2e/extra:v1")
	extraDigest := strings.TrimSpace(run(t, nil, crane, "--insecure", "digest", up.host+"/e2e/extra:v1"))

	const ref = "up.test/e2e/app:multi-oci"
	digest := s.digests["e2e/app:multi-oci"]
	a := startMirror(t, mirrorConfig("up.test", up.host, ""))
	run(t, nil, ocimirrorBin, "prefetch", "--mirror", a.host, ref)
	online := map[string][]referrer{
		"index": orasDiscover(t, oras, a.host+"/"+ref),
		"sbom":  orasDiscover(t, oras, a.host+"/up.test/e2e/app@"+sbom),
	}
	same(t, "oras discover through A", online["index"], referrer{sbom, "application/vnd.e2e.sbom"})
	same(t, "oras discover of the SBOM through A", online["sbom"], referrer{sig, "application/vnd.e2e.sig"})
	if out, err := cosignVerify(t, cdir, pub, a.host+"/up.test/e2e/app@"+amd); err != nil {
		t.Fatalf("cosign verify through A: %v\n%s", err, out)
	}

	bundle := filepath.Join(dir, "app.tar")
	out := run(t, nil, ocimirrorBin, "export", "--mirror", a.host, "--output", bundle, ref)
	if !strings.Contains(out, "ok   "+ref+" "+digest+" (") {
		t.Errorf("export output:\n%s", out)
	}
	more := filepath.Join(dir, "more.tar")
	out = run(t, nil, ocimirrorBin, "export", "--mirror", a.host, "--exclude-from", bundle, "--output", more,
		"up.test/e2e/app:multi-docker", "up.test/library/alpine:3", "up.test/e2e/extra:v1")
	if !strings.Contains(out, "(incremental)") {
		t.Errorf("incremental export output:\n%s", out)
	}
	first, incremental := tarFiles(t, bundle), tarFiles(t, more)
	for name := range first {
		if strings.HasPrefix(name, "blobs/") && incremental[name] {
			t.Errorf("%s, in the first bundle, is in the incremental one too", name)
		}
	}
	if len(incremental) < 4 {
		t.Errorf("the incremental bundle holds %d files", len(incremental))
	}
	// Foreign layouts made online: regctl image export through A (it names
	// the image A's host/up.test/...), an oras layout tagged arm.
	home := t.TempDir()
	env := []string{"HOME=" + home}
	run(t, env, regctl, "registry", "set", a.host, "--tls", "disabled")
	regctlTar := filepath.Join(dir, "regctl.tar")
	run(t, env, regctl, "image", "export", a.host+"/up.test/e2e/app:amd64-oci", regctlTar)
	orasDir := filepath.Join(dir, "oras-layout")
	run(t, nil, oras, "cp", "--from-plain-http", "--to-oci-layout", a.host+"/up.test/e2e/app:arm64-oci", orasDir+":arm")

	// The upstream is gone.
	up.stop()
	offline := mirrorConfig("up.test", up.host, "offline: true\n")

	// B imports while stopped.
	b := startMirror(t, offline)
	b.stop()
	out = run(t, nil, ocimirrorBin, "import", "--data", filepath.Join(filepath.Dir(b.config), "data"), bundle)
	if !strings.Contains(out, "ok   "+ref+" "+digest) {
		t.Errorf("import --config output:\n%s", out)
	}
	b.start(t)
	// C imports while running.
	c := startMirror(t, offline)
	if code, _, _ := httpGet(t, "http://"+c.host+"/v2/up.test/e2e/app/manifests/multi-oci"); code != http.StatusNotFound {
		t.Fatalf("C serves the image before the import: %d", code)
	}
	run(t, nil, ocimirrorBin, "import", "--admin", c.adminURL(t), bundle)

	for _, m := range []*mirror{b, c} {
		pullWhole(t, crane, m.host+"/"+ref, digest)
		if out, err := cosignVerify(t, cdir, pub, m.host+"/up.test/e2e/app@"+amd); err != nil {
			t.Errorf("cosign verify through offline %s: %v\n%s", m.host, err, out)
		}
		same(t, "oras discover through "+m.host, orasDiscover(t, oras, m.host+"/"+ref), online["index"]...)
		same(t, "oras discover of the SBOM through "+m.host, orasDiscover(t, oras, m.host+"/up.test/e2e/app@"+sbom), online["sbom"]...)
		run(t, env, regctl, "registry", "set", m.host, "--tls", "disabled")
		same(t, "regctl artifact list through "+m.host, regctlList(t, regctl, env, m.host+"/"+ref), online["index"]...)
		pulled := t.TempDir()
		runIn(t, pulled, nil, oras, "pull", "--plain-http", m.host+"/up.test/e2e/app@"+sig)
		if got, err := os.ReadFile(filepath.Join(pulled, "sig.txt")); err != nil || string(got) != "signature of the SBOM" {
			t.Errorf("oras pull of the signature through %s: %q %v", m.host, got, err)
		}
	}
	t.Run("containerd", func(t *testing.T) {
		ctd := startContainerd(t)
		ctd.mirrorFor(t, "up.test", b.host)
		ctd.ctr(t, "images", "pull", "--hosts-dir", ctd.hostsDir, ref)
		if images := ctd.ctr(t, "images", "ls"); !strings.Contains(images, digest) {
			t.Errorf("containerd does not list %s with digest %s:\n%s", ref, digest, images)
		}
		if snaps := ctd.ctr(t, "snapshots", "ls"); !strings.Contains(snaps, "Committed") {
			t.Errorf("layers were not unpacked:\n%s", snaps)
		}
	})

	t.Run("real tools read the bundle", func(t *testing.T) {
		sink := startDistribution(t, "registry")
		run(t, nil, oras, "cp", "-r", "--from-oci-layout", bundle+"@"+digest, "--to-plain-http", sink.host+"/oras/app:v1")
		same(t, "oras discover after oras cp --from-oci-layout", orasDiscover(t, oras, sink.host+"/oras/app:v1"), online["index"]...)
		run(t, env, regctl, "registry", "set", sink.host, "--tls", "disabled")
		run(t, env, regctl, "image", "import", sink.host+"/regctl/app:v1", bundle, "--name", ref)
		run(t, nil, skopeo, "copy", "--all", "--dest-tls-verify=false", "oci-archive:"+bundle+":"+ref, "docker://"+sink.host+"/skopeo/app:v1")
		// skopeo (1.9) writes the index again without the fields it does
		// not know (artifactType): the platforms are the same manifests.
		index := run(t, nil, crane, "--insecure", "manifest", sink.host+"/skopeo/app:v1")
		for _, child := range []string{"e2e/app:amd64-oci", "e2e/app:arm64-oci"} {
			if !strings.Contains(index, s.digests[child]) {
				t.Errorf("skopeo's index lacks %s (%s):\n%s", child, s.digests[child], index)
			}
		}
		for _, platform := range []string{"linux/amd64", "linux/arm64"} {
			run(t, nil, crane, "--insecure", "pull", "--platform", platform, "--format", "oci", sink.host+"/skopeo/app:v1", filepath.Join(t.TempDir(), "p"))
		}
		for _, repo := range []string{"oras", "regctl"} {
			if got := strings.TrimSpace(run(t, nil, crane, "--insecure", "digest", sink.host+"/"+repo+"/app:v1")); got != digest {
				t.Errorf("%s copied %s, want %s", repo, got, digest)
			}
			pullWhole(t, crane, sink.host+"/"+repo+"/app:v1", digest)
		}
	})

	t.Run("foreign layouts", func(t *testing.T) {
		run(t, nil, ocimirrorBin, "import", "--admin", c.adminURL(t), regctlTar)
		pullWhole(t, crane, c.host+"/up.test/e2e/app:amd64-oci", s.digests["e2e/app:amd64-oci"])
		out, err := runErr("", nil, ocimirrorBin, "import", "--admin", c.adminURL(t), orasDir)
		if err == nil || !strings.Contains(out, "--repository") {
			t.Errorf("an oras layout (a bare tag) without --repository: %v\n%s", err, out)
		}
		run(t, nil, ocimirrorBin, "import", "--admin", c.adminURL(t), "--repository", "up.test/e2e/app", orasDir)
		pullWhole(t, crane, c.host+"/up.test/e2e/app:arm", s.digests["e2e/app:arm64-oci"])
	})

	t.Run("damaged bundles are refused", func(t *testing.T) {
		data, err := os.ReadFile(more)
		if err != nil {
			t.Fatal(err)
		}
		// Flip a byte in the middle of the largest blob (the extra layer).
		flipped := bytes.Clone(data)
		flipped[largestEntryMiddle(t, data)] ^= 0x01
		cut := data[:len(data)/2]
		for name, bad := range map[string][]byte{"flipped.tar": flipped, "cut.tar": cut} {
			p := filepath.Join(dir, name)
			if err := os.WriteFile(p, bad, 0o644); err != nil {
				t.Fatal(err)
			}
			out, err := runErr("", nil, ocimirrorBin, "import", "--admin", c.adminURL(t), p)
			if err == nil || !strings.Contains(out, "nothing was imported") {
				t.Errorf("import of %s: %v\n%s", name, err, out)
			}
			if name == "flipped.tar" && !strings.Contains(out, "its bytes hash to") {
				t.Errorf("the refusal of %s does not say which entry:\n%s", name, out)
			}
			for _, tag := range []string{"e2e/app/manifests/multi-docker", "library/alpine/manifests/3", "e2e/extra/manifests/v1"} {
				if code, _, _ := httpGet(t, "http://"+c.host+"/v2/up.test/"+tag); code != http.StatusNotFound {
					t.Errorf("after refusing %s, C serves %s: %d", name, tag, code)
				}
			}
			pullWhole(t, crane, c.host+"/"+ref, digest)
		}
		// The whole incremental bundle then imports, onto what C has.
		run(t, nil, ocimirrorBin, "import", "--admin", c.adminURL(t), more)
		pullWhole(t, crane, c.host+"/up.test/e2e/app:multi-docker", s.digests["e2e/app:multi-docker"])
		pullWhole(t, crane, c.host+"/up.test/library/alpine:3", s.digests["library/alpine:3"])
		pullWhole(t, crane, c.host+"/up.test/e2e/extra:v1", extraDigest)
	})

	t.Run("killed mid-import", func(t *testing.T) {
		data, err := os.ReadFile(more)
		if err != nil {
			t.Fatal(err)
		}
		for _, part := range []int{len(data) / 2, len(data)} {
			b.stop()
			cmd := exec.Command(ocimirrorBin, "import", "--config", b.config, "-")
			stdin, err := cmd.StdinPipe()
			if err != nil {
				t.Fatal(err)
			}
			var log logBuffer
			cmd.Stdout, cmd.Stderr = &log, &log
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			// The pipe takes the bytes only as the import reads them.
			if _, err := stdin.Write(data[:part]); err != nil {
				t.Fatalf("writing the bundle: %v\n%s", err, log.String())
			}
			if part == len(data) {
				stdin.Close()
			}
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			stdin.Close()
			b.start(t)
			// Nothing partial: each image is whole, or not there at all.
			for name, d := range map[string]string{"up.test/e2e/app:multi-docker": s.digests["e2e/app:multi-docker"],
				"up.test/library/alpine:3": s.digests["library/alpine:3"], "up.test/e2e/extra:v1": extraDigest} {
				tag := strings.Replace(strings.TrimPrefix(name, "up.test/"), ":", "/manifests/", 1)
				code, _, _ := httpGet(t, "http://"+b.host+"/v2/up.test/"+tag)
				switch {
				case code == http.StatusNotFound && part < len(data):
				case code == http.StatusNotFound:
					t.Logf("killed after %d of %d bytes: %s not imported", part, len(data), name)
				case code == http.StatusOK:
					t.Logf("killed after %d of %d bytes: %s imported whole", part, len(data), name)
					pullWhole(t, crane, b.host+"/"+name, d)
					if part < len(data) {
						t.Errorf("an import killed half way made %s visible", name)
					}
				default:
					t.Errorf("%s after a killed import: %d", name, code)
				}
			}
			pullWhole(t, crane, b.host+"/"+ref, digest)
		}
		// What the killed imports left (staged, unlinked) is no obstacle.
		b.stop()
		run(t, nil, ocimirrorBin, "import", "--config", b.config, more)
		b.start(t)
		pullWhole(t, crane, b.host+"/up.test/e2e/extra:v1", extraDigest)
		pullWhole(t, crane, b.host+"/up.test/e2e/app:multi-docker", s.digests["e2e/app:multi-docker"])
	})
}

// pullWhole pulls an image with crane, which checks every digest, and
// checks its digest.
func pullWhole(t *testing.T, crane, ref, digest string) {
	t.Helper()
	layout := filepath.Join(t.TempDir(), "layout")
	run(t, nil, crane, "--insecure", "pull", "--format", "oci", ref, layout)
	idx, err := os.ReadFile(filepath.Join(layout, "index.json"))
	if err != nil {
		t.Fatal(err)
	}
	var index struct {
		Manifests []struct{ Digest string } `json:"manifests"`
	}
	if err := json.Unmarshal(idx, &index); err != nil || len(index.Manifests) != 1 || index.Manifests[0].Digest != digest {
		t.Errorf("crane pull %s: %s, want %s", ref, idx, digest)
	}
}

// tarFiles lists the files of a tar archive.
func tarFiles(t *testing.T, p string) map[string]bool {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string]bool{}
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			out[h.Name] = true
		}
	}
}

// largestEntryMiddle returns the offset of the middle byte of a tar's
// largest blob.
func largestEntryMiddle(t *testing.T, data []byte) int {
	t.Helper()
	best, at := int64(0), 0
	for off := 0; off+512 <= len(data); {
		h := data[off : off+512]
		if h[0] == 0 {
			break
		}
		size := parseOctal(h[124:136])
		if (h[156] == '0' || h[156] == 0) && bytes.HasPrefix(h, []byte("blobs/")) {
			if size > best {
				best, at = size, off+512+int(size/2)
			}
		}
		off += 512 + int((size+511)/512*512)
	}
	if best == 0 {
		t.Fatal("no file in the archive")
	}
	return at
}

func parseOctal(b []byte) int64 {
	var n int64
	for _, c := range b {
		if c >= '0' && c <= '7' {
			n = n*8 + int64(c-'0')
		}
	}
	return n
}
