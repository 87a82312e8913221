package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

var orasDigestRE = regexp.MustCompile(`Digest: (sha256:[0-9a-f]{64})`)

// orasDigest returns the digest oras push or attach printed.
func orasDigest(t *testing.T, out string) string {
	t.Helper()
	m := orasDigestRE.FindAllStringSubmatch(out, -1)
	if m == nil {
		t.Fatalf("no digest in oras output:\n%s", out)
	}
	return m[len(m)-1][1]
}

// referrer is what a client lists: digest and artifact type.
type referrer struct{ Digest, ArtifactType string }

func sorted(rs []referrer) []referrer {
	slices.SortFunc(rs, func(a, b referrer) int { return strings.Compare(a.Digest, b.Digest) })
	return rs
}

// orasDiscover lists the referrers of ref as oras discover sees them.
func orasDiscover(t *testing.T, oras, ref string, extra ...string) []referrer {
	t.Helper()
	out := run(t, nil, oras, append([]string{"discover", "--plain-http", "--format", "json", ref}, extra...)...)
	var tree struct {
		Referrers []struct {
			Digest       string `json:"digest"`
			ArtifactType string `json:"artifactType"`
		} `json:"referrers"`
	}
	if err := json.Unmarshal([]byte(out), &tree); err != nil {
		t.Fatalf("oras discover output: %v\n%s", err, out)
	}
	rs := []referrer{}
	for _, r := range tree.Referrers {
		rs = append(rs, referrer{r.Digest, r.ArtifactType})
	}
	return sorted(rs)
}

// regctlList lists the referrers of ref as regctl artifact list sees them.
func regctlList(t *testing.T, regctl string, env []string, ref string, extra ...string) []referrer {
	t.Helper()
	out := run(t, env, regctl, append([]string{"artifact", "list", ref, "--format", "{{json .}}"}, extra...)...)
	var list struct {
		Descriptors []struct {
			Digest       string `json:"digest"`
			ArtifactType string `json:"artifactType"`
		} `json:"descriptors"`
	}
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		t.Fatalf("regctl artifact list output: %v\n%s", err, out)
	}
	rs := []referrer{}
	for _, d := range list.Descriptors {
		rs = append(rs, referrer{d.Digest, d.ArtifactType})
	}
	return sorted(rs)
}

func same(t *testing.T, what string, got []referrer, want ...referrer) {
	t.Helper()
	want = sorted(slices.Clone(want))
	if !slices.Equal(got, want) {
		t.Errorf("%s:\n got  %v\n want %v", what, got, want)
	}
}

// TestE2E_Referrers_ORASAndRegctl attaches artifacts to an image on a
// distribution v3 upstream (which has no referrers API: oras and regctl
// keep the fallback tag), and lists them through ocimirror's referrers API
// with oras and regctl; then pushes artifacts to ocimirror, without and
// with push: forward.
func TestE2E_Referrers_ORASAndRegctl(t *testing.T) {
	oras, regctl := tool(t, "oras"), tool(t, "regctl")
	up := startDistribution(t, "registry")
	cfg := `listen: "{{LISTEN}}"
storage:
  path: {{DATA}}
defaultUpstream: up.test
upstreams:
  - name: up.test
    url: http://` + up.host + `
    tagTTL: 1s
`
	om := startMirror(t, cfg)
	fwd := startMirror(t, strings.Replace(cfg, "tagTTL: 1s", "tagTTL: 1s\n    push: forward", 1))

	home := t.TempDir()
	env := []string{"HOME=" + home}
	for _, h := range []string{up.host, om.host, fwd.host} {
		run(t, env, regctl, "registry", "set", h, "--tls", "disabled")
	}
	dir := t.TempDir()
	file := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return name
	}
	orasIn := func(args ...string) string {
		t.Helper()
		return runIn(t, dir, env, oras, args...)
	}

	// On the upstream: an image, an SBOM attached with oras, a signature
	// attached with regctl. Both clients fall back to the tag schema.
	subject := orasDigest(t, orasIn("push", "--plain-http", up.host+"/app:v1", file("app.txt", "the app")))
	sbom := orasDigest(t, orasIn("attach", "--plain-http", "--artifact-type", "application/vnd.e2e.sbom",
		"--annotation", "org.example=sbom", up.host+"/app:v1", file("sbom.json", `{"sbom":true}`)))
	run(t, env, "sh", "-c", "echo signature | "+regctl+" artifact put --subject "+up.host+"/app:v1 --artifact-type application/vnd.e2e.sig")
	upList := regctlList(t, regctl, env, up.host+"/app:v1")
	var sig string
	for _, r := range upList {
		if r.ArtifactType == "application/vnd.e2e.sig" {
			sig = r.Digest
		}
	}
	if sig == "" {
		t.Fatalf("regctl's artifact is not on the upstream: %v", upList)
	}
	tags := run(t, env, regctl, "tag", "ls", up.host+"/app")
	if !strings.Contains(tags, "sha256-"+strings.TrimPrefix(subject, "sha256:")) {
		t.Fatalf("no fallback tag on the upstream:\n%s", tags)
	}
	want := []referrer{{sbom, "application/vnd.e2e.sbom"}, {sig, "application/vnd.e2e.sig"}}

	// Through ocimirror's referrers API, with both clients.
	same(t, "oras discover through ocimirror", orasDiscover(t, oras, om.host+"/app:v1"), want...)
	same(t, "regctl artifact list through ocimirror", regctlList(t, regctl, env, om.host+"/app:v1"), want...)
	same(t, "oras discover --artifact-type through ocimirror",
		orasDiscover(t, oras, om.host+"/app:v1", "--artifact-type", "application/vnd.e2e.sig"), want[1])
	same(t, "regctl artifact list --filter-artifact-type through ocimirror",
		regctlList(t, regctl, env, om.host+"/app:v1", "--filter-artifact-type", "application/vnd.e2e.sbom"), want[0])
	if !slices.ContainsFunc(om.requestLines(), func(l string) bool {
		return strings.Contains(l, "/referrers/"+subject) && strings.Contains(l, "status=200")
	}) {
		t.Error("the clients did not use ocimirror's referrers API")
	}

	// Attached to ocimirror itself: listed there at once, absent upstream.
	local := orasDigest(t, orasIn("attach", "--plain-http", "--artifact-type", "application/vnd.e2e.local",
		om.host+"/app:v1", file("local.txt", "local only")))
	same(t, "oras discover after a local attach", orasDiscover(t, oras, om.host+"/app:v1"),
		append(slices.Clone(want), referrer{local, "application/vnd.e2e.local"})...)
	same(t, "the upstream after a local attach", orasDiscover(t, oras, up.host+"/app:v1"), want...)

	// With push: forward, the upstream gets it too (ocimirror updates the
	// fallback index for the upstream, which has no referrers API).
	forwarded := orasDigest(t, orasIn("attach", "--plain-http", "--artifact-type", "application/vnd.e2e.forwarded",
		fwd.host+"/app:v1", file("fwd.txt", "forwarded")))
	withFwd := append(slices.Clone(want), referrer{forwarded, "application/vnd.e2e.forwarded"})
	same(t, "the upstream after a forwarded attach", orasDiscover(t, oras, up.host+"/app:v1"), withFwd...)
	same(t, "regctl on the upstream after a forwarded attach", regctlList(t, regctl, env, up.host+"/app:v1"), withFwd...)
	same(t, "oras discover through the forwarding ocimirror", orasDiscover(t, oras, fwd.host+"/app:v1"), withFwd...)
}
