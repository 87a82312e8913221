package e2e

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// upstreams are the real registries every pull test runs against.
var upstreams = []string{"registry", "docker-registry"}

func mirrorConfig(upstreamName, upstreamHost, extra string) string {
	return `listen: "{{LISTEN}}"
storage:
  path: {{DATA}}
defaultUpstream: ` + upstreamName + `
upstreams:
  - name: ` + upstreamName + `
    url: http://` + upstreamHost + `
` + extra
}

// containerd is a containerd daemon of the test's own: root, state and
// socket in a temporary directory.
type containerd struct {
	*proc
	sock     string
	hostsDir string
}

func startContainerd(t *testing.T) *containerd {
	t.Helper()
	bin := tool(t, "containerd")
	tool(t, "ctr")
	if os.Geteuid() != 0 {
		missing(t, "containerd needs root to unpack images (run the end-to-end tests as root, as CI does)")
	}
	dir := t.TempDir()
	c := &containerd{sock: filepath.Join(dir, "containerd.sock"), hostsDir: filepath.Join(dir, "certs.d")}
	conf := filepath.Join(dir, "config.toml")
	cfg := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = %q
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), c.sock)
	if err := os.WriteFile(conf, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	c.proc = startProc(t, bin, nil, "--config", conf)
	for i := 0; i < 100; i++ {
		if _, err := runErr("", nil, "ctr", "--address", c.sock, "version"); err == nil {
			return c
		}
		select {
		case <-c.done:
			t.Fatalf("containerd exited:\n%s", c.log.String())
		default:
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("containerd did not start:\n%s", tail(c.log.String(), 4096))
	return nil
}

func (c *containerd) ctr(t *testing.T, args ...string) string {
	t.Helper()
	return run(t, nil, "ctr", append([]string{"--address", c.sock}, args...)...)
}

// mirrorFor writes the hosts.toml that sends registry host to the mirror.
func (c *containerd) mirrorFor(t *testing.T, host, mirrorHost string) {
	t.Helper()
	dir := filepath.Join(c.hostsDir, host)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	toml := fmt.Sprintf("server = \"https://%s\"\n\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n", host, mirrorHost)
	if err := os.WriteFile(filepath.Join(dir, "hosts.toml"), []byte(toml), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestE2E_Containerd pulls and unpacks images with containerd configured,
// by hosts.toml, to use ocimirror as the mirror of a made-up registry host:
// every request carries ns=<host>, and a second pull after the images and
// their content are removed never reaches the upstream.
func TestE2E_Containerd(t *testing.T) {
	for _, bin := range upstreams {
		t.Run(bin, func(t *testing.T) {
			const host = "upstream.example.test"
			up := startDistribution(t, bin)
			s := seedImages(t, up.host)
			om := startMirror(t, mirrorConfig(host, up.host, ""))
			ctd := startContainerd(t)
			ctd.mirrorFor(t, host, om.host)

			refs := []string{host + "/e2e/app:multi-oci", host + "/e2e/app:multi-docker", host + "/e2e/app:amd64-oci"}
			for _, ref := range refs {
				ctd.ctr(t, "images", "pull", "--hosts-dir", ctd.hostsDir, ref)
			}
			images := ctd.ctr(t, "images", "ls")
			for _, ref := range refs {
				tag := strings.TrimPrefix(ref, host+"/")
				if !strings.Contains(images, ref) || !strings.Contains(images, s.digests[tag]) {
					t.Errorf("containerd does not list %s with the upstream's digest %s:\n%s", ref, s.digests[tag], images)
				}
			}
			if snaps := ctd.ctr(t, "snapshots", "ls"); strings.Count(snaps, "Committed") < 2 {
				t.Errorf("layers were not unpacked:\n%s", snaps)
			}
			lines := om.requestLines()
			if len(lines) == 0 {
				t.Fatal("no request reached ocimirror")
			}
			for _, l := range lines {
				if !strings.Contains(l, "ns="+host) {
					t.Errorf("request without ns=%s: %s", host, l)
				}
			}

			// Remove the images and all their content, pull again: nothing
			// reaches the upstream.
			before := len(up.requests())
			if before == 0 {
				t.Fatal("the upstream's access log shows no request: the count below would prove nothing")
			}
			for _, ref := range refs {
				ctd.ctr(t, "images", "rm", ref)
			}
			for _, d := range strings.Fields(ctd.ctr(t, "content", "ls", "-q")) {
				ctd.ctr(t, "content", "rm", d)
			}
			if left := strings.TrimSpace(ctd.ctr(t, "content", "ls", "-q")); left != "" {
				t.Fatalf("content left: %s", left)
			}
			for _, ref := range refs {
				ctd.ctr(t, "images", "pull", "--hosts-dir", ctd.hostsDir, ref)
			}
			if after := up.requests(); len(after) != before {
				t.Errorf("the second pull reached the upstream %d times: %v", len(after)-before, after[before:])
			}
		})
	}
}

// dockerAccept is the Accept list the Docker daemon sends for manifests.
var dockerAccept = []string{
	"Accept: application/vnd.docker.distribution.manifest.v2+json",
	"Accept: application/vnd.docker.distribution.manifest.list.v2+json",
	"Accept: application/vnd.oci.image.index.v1+json",
	"Accept: application/vnd.oci.image.manifest.v1+json",
	"Accept: application/vnd.docker.distribution.manifest.v1+prettyjws",
	"Accept: application/json",
}

// TestE2E_DockerMirrorProtocol sends the requests the Docker daemon sends
// to a registry-mirrors entry (no ns, library/ for official images) and
// checks every byte against the upstream's digests.
func TestE2E_DockerMirrorProtocol(t *testing.T) {
	for _, bin := range upstreams {
		t.Run(bin, func(t *testing.T) {
			up := startDistribution(t, bin)
			s := seedImages(t, up.host)
			om := startMirror(t, mirrorConfig("docker.io", up.host, ""))
			base := "http://" + om.host
			if st, _, h := httpGet(t, base+"/v2/"); st != 200 || h.Get("Docker-Distribution-API-Version") != "registry/2.0" {
				t.Fatalf("ping: %d %v", st, h)
			}
			for _, name := range []string{"library/alpine", "alpine"} {
				st, body, h := httpGet(t, base+"/v2/"+name+"/manifests/3", append(dockerAccept, "User-Agent: docker/27.0 go/go1.22 os/linux arch/amd64")...)
				if st != 200 || h.Get("Docker-Content-Digest") != s.digests["library/alpine:3"] || digestOf(body) != s.digests["library/alpine:3"] {
					t.Fatalf("%s:3: %d %s", name, st, h.Get("Docker-Content-Digest"))
				}
				if h.Get("Content-Type") != "application/vnd.docker.distribution.manifest.list.v2+json" || h.Get("OCI-Namespace") != "" {
					t.Errorf("%s:3 headers: %v", name, h)
				}
				var list struct {
					Manifests []struct {
						Digest   string                        `json:"digest"`
						Platform struct{ Architecture string } `json:"platform"`
					} `json:"manifests"`
				}
				_ = json.Unmarshal(body, &list)
				var amd64 string
				for _, m := range list.Manifests {
					if m.Platform.Architecture == "amd64" {
						amd64 = m.Digest
					}
				}
				st, mbody, _ := httpGet(t, base+"/v2/"+name+"/manifests/"+amd64, dockerAccept...)
				if st != 200 || digestOf(mbody) != amd64 {
					t.Fatalf("%s@%s: %d", name, amd64, st)
				}
				var m struct {
					Config struct{ Digest string }   `json:"config"`
					Layers []struct{ Digest string } `json:"layers"`
				}
				_ = json.Unmarshal(mbody, &m)
				for _, d := range append([]string{m.Config.Digest}, layerDigests(m.Layers)...) {
					st, blob, _ := httpGet(t, base+"/v2/"+name+"/blobs/"+d)
					if st != 200 || digestOf(blob) != d {
						t.Fatalf("blob %s: %d, %s", d, st, digestOf(blob))
					}
				}
			}
			for _, l := range om.requestLines() {
				if strings.Contains(l, " ns=") {
					t.Errorf("a Docker request was logged with ns: %s", l)
				}
			}
		})
	}
}

func layerDigests(ls []struct{ Digest string }) []string {
	var out []string
	for _, l := range ls {
		out = append(out, l.Digest)
	}
	return out
}

func digestOf(b []byte) string {
	h := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(h[:])
}

// TestE2E_CraneAndSkopeo pulls by host prefix with crane and skopeo and
// compares every digest with the upstream's.
func TestE2E_CraneAndSkopeo(t *testing.T) {
	for _, bin := range upstreams {
		t.Run(bin, func(t *testing.T) {
			crane, skopeo := tool(t, "crane"), tool(t, "skopeo")
			const prefix = "reg.example.test"
			up := startDistribution(t, bin)
			s := seedImages(t, up.host)
			om := startMirror(t, `listen: "{{LISTEN}}"
storage:
  path: {{DATA}}
upstreams:
  - name: `+prefix+`
    url: http://`+up.host+`
`)
			for _, tag := range seedTags {
				via := om.host + "/" + prefix + "/" + tag
				if got := strings.TrimSpace(run(t, nil, crane, "--insecure", "digest", via)); got != s.digests[tag] {
					t.Errorf("crane digest %s = %s, upstream %s", tag, got, s.digests[tag])
				}
				mirrored := run(t, nil, crane, "--insecure", "manifest", via)
				direct := run(t, nil, crane, "--insecure", "manifest", up.host+"/"+tag)
				if mirrored != direct {
					t.Errorf("crane manifest %s differs from the upstream's", tag)
				}
			}
			// crane pull of a multi-platform image into an OCI layout: every
			// blob is verified by crane, and the index digest is the upstream's.
			layout := filepath.Join(t.TempDir(), "layout")
			run(t, nil, crane, "--insecure", "pull", "--format", "oci", om.host+"/"+prefix+"/e2e/app:multi-oci", layout)
			idx, err := os.ReadFile(filepath.Join(layout, "index.json"))
			if err != nil || !strings.Contains(string(idx), s.digests["e2e/app:multi-oci"]) {
				t.Errorf("crane pull layout index: %s %v", idx, err)
			}
			// skopeo copy to an OCI layout (OCI image) and to a directory
			// (Docker image, manifest kept as is).
			ociDir := filepath.Join(t.TempDir(), "oci")
			run(t, nil, skopeo, "copy", "--src-tls-verify=false", "--preserve-digests",
				"docker://"+om.host+"/"+prefix+"/e2e/app:amd64-oci", "oci:"+ociDir+":copied")
			idx, _ = os.ReadFile(filepath.Join(ociDir, "index.json"))
			if !strings.Contains(string(idx), s.digests["e2e/app:amd64-oci"]) {
				t.Errorf("skopeo oci copy index: %s, want %s", idx, s.digests["e2e/app:amd64-oci"])
			}
			dirDest := filepath.Join(t.TempDir(), "dir")
			run(t, nil, skopeo, "copy", "--src-tls-verify=false", "--override-arch", "amd64", "--override-os", "linux",
				"docker://"+om.host+"/"+prefix+"/e2e/app:amd64-docker", "dir:"+dirDest)
			m, _ := os.ReadFile(filepath.Join(dirDest, "manifest.json"))
			if digestOf(m) != s.digests["e2e/app:amd64-docker"] {
				t.Errorf("skopeo dir copy manifest digest %s, want %s", digestOf(m), s.digests["e2e/app:amd64-docker"])
			}
			entries, _ := os.ReadDir(dirDest)
			for _, e := range entries {
				if e.Name() == "manifest.json" || e.Name() == "version" {
					continue
				}
				b, _ := os.ReadFile(filepath.Join(dirDest, e.Name()))
				if digestOf(b) != "sha256:"+e.Name() {
					t.Errorf("skopeo blob %s has digest %s", e.Name(), digestOf(b))
				}
			}
			if bytes.Contains([]byte(strings.Join(om.requestLines(), "\n")), []byte("status=5")) {
				t.Errorf("ocimirror answered 5xx during the pulls")
			}
		})
	}
}
