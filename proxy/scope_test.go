package proxy_test

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/internal/registrytest"
)

// pushedImage is an image pushed through ocimirror.
type pushedImage struct {
	manifest []byte
	digest   digest.Digest
	layer    []byte
	layerD   digest.Digest
	configD  digest.Digest
}

// pushImage pushes a one-layer image through ocimirror to repo, tagged
// when tag is set (else by digest).
func (e *env) pushImage(repo, tag string) pushedImage {
	e.t.Helper()
	img := pushedImage{layer: registrytest.RandomBytes(2000)}
	config := []byte(`{"architecture":"amd64","os":"linux","n":"` + digest.FromBytes(img.layer).Encoded()[:8] + `"}`)
	img.layerD = e.pushBlob(repo, img.layer)
	img.configD = e.pushBlob(repo, config)
	m := v1.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageManifest,
		Config: v1.Descriptor{MediaType: v1.MediaTypeImageConfig, Digest: img.configD, Size: int64(len(config))},
		Layers: []v1.Descriptor{{MediaType: v1.MediaTypeImageLayerGzip, Digest: img.layerD, Size: int64(len(img.layer))}}}
	img.manifest, _ = json.Marshal(m)
	img.digest = digest.FromBytes(img.manifest)
	ref := tag
	if ref == "" {
		ref = img.digest.String()
	}
	if r := e.send(http.MethodPut, "/v2/"+repo+"/manifests/"+ref, img.manifest, "Content-Type: "+v1.MediaTypeImageManifest); r.status != 201 {
		e.t.Fatalf("push %s:%s: %d %s", repo, ref, r.status, r.body)
	}
	return img
}

// expect checks a response's status and, when want is set, its body.
func expect(t *testing.T, what string, r response, status int, want []byte) {
	t.Helper()
	if r.status != status || want != nil && !bytes.Equal(r.body, want) {
		t.Fatalf("%s: status %d (want %d), body %.200q", what, r.status, status, r.body)
	}
}

// A DELETE in one repository removes that repository's link only: the
// same bytes in another repository stay (issue: one repository's delete
// destroyed content in every repository).
func TestProxy_Delete_ScopedToRepository(t *testing.T) {
	fwd := registrytest.New(t)
	e, _ := start(t, withHosted("ci/"), withUpstream(upstreamDef{name: "fwd.test", reg: fwd, forward: true}), withDefault("fwd.test"))
	keep := e.pushImage("ci/keep", "v1")

	t.Run("blob mounted into a forwarding repository, then deleted there", func(t *testing.T) {
		r := e.send(http.MethodPost, "/v2/fwd.test/other/x/blobs/uploads/?mount="+keep.layerD.String()+"&from=ci/keep", nil)
		expect(t, "mount", r, 201, nil)
		expect(t, "blob in the forwarding repository", e.get("/v2/fwd.test/other/x/blobs/"+keep.layerD.String()), 200, keep.layer)
		expect(t, "delete there", e.do(http.MethodDelete, "/v2/fwd.test/other/x/blobs/"+keep.layerD.String()), 202, nil)
		expect(t, "hosted blob after the delete", e.get("/v2/ci/keep/blobs/"+keep.layerD.String()), 200, keep.layer)
		expect(t, "hosted image after the delete", e.get("/v2/ci/keep/manifests/v1"), 200, keep.manifest)
	})

	t.Run("same manifest put into another repository, then deleted there", func(t *testing.T) {
		// The forwarding upstream needs the blobs first.
		for _, b := range []digest.Digest{keep.layerD, keep.configD} {
			expect(t, "mount", e.send(http.MethodPost, "/v2/fwd.test/other/x/blobs/uploads/?mount="+b.String()+"&from=ci/keep", nil), 201, nil)
		}
		r := e.send(http.MethodPut, "/v2/fwd.test/other/x/manifests/"+keep.digest.String(), keep.manifest, "Content-Type: "+v1.MediaTypeImageManifest)
		expect(t, "put", r, 201, nil)
		expect(t, "delete there", e.do(http.MethodDelete, "/v2/fwd.test/other/x/manifests/"+keep.digest.String()), 202, nil)
		expect(t, "hosted tag", e.get("/v2/ci/keep/manifests/v1"), 200, keep.manifest)
		expect(t, "hosted digest", e.get("/v2/ci/keep/manifests/"+keep.digest.String()), 200, keep.manifest)
		var tl struct{ Tags []string }
		_ = json.Unmarshal(e.get("/v2/ci/keep/tags/list").body, &tl)
		if strings.Join(tl.Tags, ",") != "v1" {
			t.Fatalf("tags %v", tl.Tags)
		}
	})

	t.Run("hosted to hosted", func(t *testing.T) {
		other := e.pushImage("ci/other", "")
		// The same layer bytes pushed to a second repository, deleted in the first.
		expect(t, "same layer", e.send(http.MethodPost, "/v2/ci/b/blobs/uploads/?digest="+other.layerD.String(), other.layer), 201, nil)
		expect(t, "delete in ci/other", e.do(http.MethodDelete, "/v2/ci/other/blobs/"+other.layerD.String()), 202, nil)
		expect(t, "ci/b keeps it", e.get("/v2/ci/b/blobs/"+other.layerD.String()), 200, other.layer)
		expect(t, "ci/other lost it", e.get("/v2/ci/other/blobs/"+other.layerD.String()), 404, nil)
		e.restart()
		expect(t, "ci/b after restart", e.get("/v2/ci/b/blobs/"+other.layerD.String()), 200, other.layer)
		expect(t, "ci/other after restart", e.get("/v2/ci/other/blobs/"+other.layerD.String()), 404, nil)
	})
}

// A repository serves only content it holds: what was pushed to a hosted
// repository is not served under any other name, also after its delete
// and a restart; mounts need a from= that holds the blob.
func TestProxy_Scope_HostedContentStaysHome(t *testing.T) {
	e, reg := start(t, withHosted("ci/"))
	secret := e.pushImage("ci/secret", "v1")
	names := []string{"library/x", "other", "ci/other", reg.Host + "/anything"}
	check := func(t *testing.T, when string) {
		t.Helper()
		for _, name := range names {
			for _, p := range []string{"/blobs/" + secret.layerD.String(), "/manifests/" + secret.digest.String()} {
				for _, m := range []string{http.MethodGet, http.MethodHead} {
					if r := e.do(m, "/v2/"+name+p); r.status != 404 || bytes.Contains(r.body, secret.layer) {
						t.Errorf("%s: %s %s%s: %d", when, m, name, p, r.status)
					}
				}
			}
		}
	}
	check(t, "pushed")
	if n := reg.Count(http.MethodGet, "blobs") + reg.Count(http.MethodHead, "blobs"); n == 0 {
		t.Error("a proxied name answered without asking its upstream")
	}
	expect(t, "delete", e.do(http.MethodDelete, "/v2/ci/secret/manifests/"+secret.digest.String()), 202, nil)
	expect(t, "delete", e.do(http.MethodDelete, "/v2/ci/secret/blobs/"+secret.layerD.String()), 202, nil)
	check(t, "deleted")
	expect(t, "deleted at home", e.get("/v2/ci/secret/blobs/"+secret.layerD.String()), 404, nil)
	e.restart()
	check(t, "restarted")

	t.Run("mounts", func(t *testing.T) {
		held := e.pushImage("ci/held", "")
		for _, q := range []string{
			"mount=" + held.layerD.String() + "&from=library/never",
			"mount=" + held.layerD.String(),
			"mount=" + held.layerD.String() + "&from=Not..A..Name",
			"mount=" + held.layerD.String() + "&from=ci/secret",
		} {
			r := e.send(http.MethodPost, "/v2/ci/target/blobs/uploads/?"+q, nil)
			if r.status != 202 {
				t.Errorf("%s: %d, want 202 (upload instead)", q, r.status)
			}
		}
		expect(t, "not mounted", e.get("/v2/ci/target/blobs/"+held.layerD.String()), 404, nil)
		expect(t, "mount from the holder", e.send(http.MethodPost, "/v2/ci/target/blobs/uploads/?mount="+held.layerD.String()+"&from=ci/held", nil), 201, nil)
		expect(t, "mounted", e.get("/v2/ci/target/blobs/"+held.layerD.String()), 200, held.layer)
	})
}

// Proxied repositories: bytes fetched for one repository of an upstream
// are served to another of its repositories after one HEAD confirms that
// it holds them (no second download); a repository the upstream says
// lacks them gets 404; another upstream must deliver the bytes itself;
// with the upstream down, content never confirmed for the repository is
// not served.
func TestProxy_Scope_ProxiedRepositories(t *testing.T) {
	up := registrytest.New(t)
	other := registrytest.New(t)
	e, _ := start(t, withUpstream(upstreamDef{name: "up.test", reg: up}), withUpstream(upstreamDef{name: "other.test", reg: other}), withDefault("up.test"))
	a := up.PushImage(t, "team/a", "v1", 5000)
	d, layer := a.LayerDigests[0], a.Layers[0]
	up.PushBlob(t, "team/b", layer) // b holds the same layer upstream; c does not
	other.PushBlob(t, "team/a", layer)
	// go-containerregistry's registry keeps blobs across repositories: make c lack them.
	up.Intercept(func(w http.ResponseWriter, r *http.Request) bool {
		if strings.HasPrefix(r.URL.Path, "/v2/team/c/") {
			w.WriteHeader(http.StatusNotFound)
			return true
		}
		return false
	})

	expect(t, "a", e.get("/v2/team/a/blobs/"+d.String()), 200, layer)
	up.ResetCounts()
	expect(t, "b", e.get("/v2/team/b/blobs/"+d.String()), 200, layer)
	if g, h := up.Count(http.MethodGet, "blobs"), up.Count(http.MethodHead, "blobs"); g != 0 || h != 1 {
		t.Fatalf("b: %d GETs and %d HEADs upstream, want 0 and 1", g, h)
	}
	up.ResetCounts()
	expect(t, "b again", e.get("/v2/team/b/blobs/"+d.String()), 200, layer)
	if n := up.Total(); n != 0 {
		t.Fatalf("b again: %d upstream requests", n)
	}
	expect(t, "c", e.get("/v2/team/c/blobs/"+d.String()), 404, nil)
	other.ResetCounts()
	expect(t, "other upstream", e.get("/v2/other.test/team/a/blobs/"+d.String()), 200, layer)
	if g := other.Count(http.MethodGet, "blobs"); g != 1 {
		t.Fatalf("other upstream: %d GETs, want 1 (its own bytes, not a HEAD)", g)
	}
	// Manifests follow the same rule.
	up.PushManifest(t, "team/b", a.Digest.String(), v1.MediaTypeImageManifest, a.Manifest)
	expect(t, "manifest a", e.get("/v2/team/a/manifests/v1"), 200, a.Manifest)
	up.ResetCounts()
	expect(t, "manifest b", e.get("/v2/team/b/manifests/"+a.Digest.String()), 200, a.Manifest)
	if g, h := up.Count(http.MethodGet, "manifests"), up.Count(http.MethodHead, "manifests"); g != 0 || h != 1 {
		t.Fatalf("manifest b: %d GETs and %d HEADs, want 0 and 1", g, h)
	}
	expect(t, "manifest c", e.get("/v2/team/c/manifests/"+a.Digest.String()), 404, nil)

	// The upstream down: what b holds is served, d has never been confirmed for it.
	up.Intercept(func(w http.ResponseWriter, r *http.Request) bool {
		w.WriteHeader(http.StatusServiceUnavailable)
		return true
	})
	expect(t, "b, upstream down", e.get("/v2/team/b/blobs/"+d.String()), 200, layer)
	r := e.get("/v2/team/d/blobs/" + d.String())
	if r.status < 500 || bytes.Contains(r.body, layer) {
		t.Fatalf("d, upstream down: %d", r.status)
	}
}

// Registry hosts compare case-insensitively, in ns and as a prefix; a
// digest that cannot be parsed says so.
func TestProxy_Route_CaseAndDigestMessages(t *testing.T) {
	up := registrytest.New(t)
	e, _ := start(t, withUpstream(upstreamDef{name: "dist.local", reg: up}), withDefault("dist.local"))
	img := up.PushImage(t, "app", "v1", 10)
	for _, p := range []string{"/v2/app/manifests/v1?ns=DIST.LOCAL", "/v2/Dist.Local/app/manifests/v1"} {
		r := e.get(p)
		expect(t, p, r, 200, img.Manifest)
	}
	r := e.get("/v2/app/blobs/sha256:zz")
	var body struct {
		Errors []struct{ Code, Message string }
	}
	_ = json.Unmarshal(r.body, &body)
	if r.status != 400 || len(body.Errors) != 1 || body.Errors[0].Code != "DIGEST_INVALID" || body.Errors[0].Message != "invalid digest" {
		t.Fatalf("malformed digest: %d %s", r.status, r.body)
	}
}

func TestProxy_Route_LookalikeHostIsNoUpstream(t *testing.T) {
	up := registrytest.New(t)
	e, _ := start(t, withUpstream(upstreamDef{name: "dock.test", reg: up}), withDefault("dock.test"))
	// U+212A KELVIN SIGN lower-cases to an ASCII k.
	if r := e.get("/v2/app/manifests/v1?ns=doc\u212A.test"); r.status != 404 || errorCode(t, r.body) != "NAME_UNKNOWN" {
		t.Fatalf("lookalike ns: %d %s", r.status, r.body)
	}
	if n := up.Total(); n != 0 {
		t.Fatalf("%d upstream requests", n)
	}
}

// A client of another repository joining a fill in progress streams it
// after one HEAD confirms its repository holds the blob: still one GET.
func TestProxy_Scope_JoinAnotherRepositorysFill(t *testing.T) {
	e, reg := start(t)
	img := reg.PushImage(t, "team/a", "v1", 1<<20)
	d, layer := img.LayerDigests[0], img.Layers[0]
	release := holdBlob(reg, d, layer, 1000)
	defer release()
	first := make(chan response, 1)
	go func() {
		resp, err := http.Get(e.ts.URL + "/v2/team/a/blobs/" + d.String())
		if err != nil {
			first <- response{err: err}
			return
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		first <- response{status: resp.StatusCode, body: b, err: err}
	}()
	waitFor(t, "the fill", func() bool { return reg.Count(http.MethodGet, "blobs") == 1 })
	second := make(chan response, 1)
	go func() { second <- e.get("/v2/team/b/blobs/" + d.String()) }()
	waitFor(t, "the second repository's HEAD", func() bool { return reg.Count(http.MethodHead, "blobs") == 1 })
	release()
	for _, ch := range []chan response{first, second} {
		r := <-ch
		if r.err != nil || r.status != 200 || !bytes.Equal(r.body, layer) {
			t.Fatalf("client: %d %v", r.status, r.err)
		}
	}
	if g := reg.Count(http.MethodGet, "blobs"); g != 1 {
		t.Fatalf("%d upstream GETs", g)
	}
	// Both repositories now hold it.
	reg.ResetCounts()
	expect(t, "b again", e.get("/v2/team/b/blobs/"+d.String()), 200, layer)
	if n := reg.Total(); n != 0 {
		t.Fatalf("%d upstream requests", n)
	}
}
