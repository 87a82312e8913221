package proxy_test

import (
	"bytes"
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/internal/registrytest"
)

// location returns a response's Location as a path on ocimirror.
func location(t *testing.T, e *env, r response) string {
	t.Helper()
	loc := r.header.Get("Location")
	if loc == "" {
		t.Fatalf("no Location (status %d, %s)", r.status, r.body)
	}
	return strings.TrimPrefix(loc, e.ts.URL)
}

func TestProxy_Hosted_PushPullDelete(t *testing.T) {
	e, reg := start(t, withHosted("ci/"))
	layer := registrytest.RandomBytes(3000)
	config := []byte(`{"architecture":"amd64","os":"linux"}`)

	// Chunked upload: POST, two PATCHes with Content-Range, PUT ?digest=.
	r := e.send("POST", "/v2/ci/app/blobs/uploads/", nil)
	if r.status != 202 || r.header.Get("Docker-Upload-UUID") == "" {
		t.Fatalf("start: %d %s", r.status, r.body)
	}
	loc := location(t, e, r)
	r = e.send("PATCH", loc, layer[:1000], "Content-Range: 0-999", "Content-Type: application/octet-stream")
	if r.status != 202 || r.header.Get("Range") != "0-999" {
		t.Fatalf("chunk 1: %d %v", r.status, r.header)
	}
	// A chunk that does not continue the upload: 416, and the state to resume from.
	bad := e.send("PATCH", location(t, e, r), layer[2000:], "Content-Range: 2000-2999")
	if bad.status != 416 || bad.header.Get("Range") != "0-999" {
		t.Fatalf("out-of-order chunk: %d %v", bad.status, bad.header)
	}
	st := e.get(location(t, e, r))
	if st.status != 204 || st.header.Get("Range") != "0-999" {
		t.Fatalf("status: %d %v", st.status, st.header)
	}
	r = e.send("PATCH", location(t, e, st), layer[1000:2000], "Content-Range: 1000-1999")
	if r.status != 202 {
		t.Fatalf("chunk 2: %d", r.status)
	}
	ld := digest.FromBytes(layer)
	r = e.send("PUT", location(t, e, r)+"?digest="+ld.String(), layer[2000:], "Content-Range: 2000-2999")
	if r.status != 201 || r.header.Get("Docker-Content-Digest") != ld.String() {
		t.Fatalf("finish: %d %s", r.status, r.body)
	}
	if g := e.get(location(t, e, r)); !bytes.Equal(g.body, layer) {
		t.Fatal("blob at Location differs")
	}
	// Streamed upload of the config: PATCH without Content-Range.
	r = e.send("POST", "/v2/ci/app/blobs/uploads/", nil)
	r = e.send("PATCH", location(t, e, r), config)
	cd := digest.FromBytes(config)
	if r = e.send("PUT", location(t, e, r)+"?digest="+cd.String(), nil); r.status != 201 {
		t.Fatalf("streamed: %d %s", r.status, r.body)
	}
	// A bad digest is refused and leaves nothing.
	r = e.send("POST", "/v2/ci/app/blobs/uploads/?digest="+digest.FromString("other").String(), []byte("bytes"))
	if r.status != 400 || errorCode(t, r.body) != "DIGEST_INVALID" {
		t.Fatalf("bad digest: %d %s", r.status, r.body)
	}

	// A manifest that references a blob the repository lacks is refused.
	missing := digest.FromString("missing layer")
	m := v1.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageManifest,
		Config: v1.Descriptor{MediaType: v1.MediaTypeImageConfig, Digest: cd, Size: int64(len(config))},
		Layers: []v1.Descriptor{{MediaType: v1.MediaTypeImageLayerGzip, Digest: missing, Size: 10}}}
	data, _ := json.Marshal(m)
	r = e.send("PUT", "/v2/ci/app/manifests/v1", data, "Content-Type: "+v1.MediaTypeImageManifest)
	if r.status != 400 || errorCode(t, r.body) != "MANIFEST_BLOB_UNKNOWN" {
		t.Fatalf("manifest with a missing blob: %d %s", r.status, r.body)
	}
	m.Layers[0] = v1.Descriptor{MediaType: v1.MediaTypeImageLayerGzip, Digest: ld, Size: int64(len(layer))}
	data, _ = json.Marshal(m)
	md := digest.FromBytes(data)
	// Content-Type and mediaType must agree.
	if r = e.send("PUT", "/v2/ci/app/manifests/v1", data, "Content-Type: "+v1.MediaTypeImageIndex); r.status != 400 {
		t.Fatalf("media type mismatch: %d", r.status)
	}
	r = e.send("PUT", "/v2/ci/app/manifests/v1", data, "Content-Type: "+v1.MediaTypeImageManifest)
	if r.status != 201 || r.header.Get("Docker-Content-Digest") != md.String() || r.header.Get("OCI-Subject") != "" {
		t.Fatalf("manifest: %d %s %v", r.status, r.body, r.header)
	}
	for _, ref := range []string{"v1", md.String()} {
		g := e.get("/v2/ci/app/manifests/" + ref)
		if g.status != 200 || !bytes.Equal(g.body, data) || g.header.Get("Content-Type") != v1.MediaTypeImageManifest {
			t.Fatalf("pull %s: %d", ref, g.status)
		}
	}
	// Tags, with a second tag pushed by digest with ?tag=.
	r = e.send("PUT", "/v2/ci/app/manifests/"+md.String()+"?tag=v2&tag=latest", data, "Content-Type: "+v1.MediaTypeImageManifest)
	if r.status != 201 || r.header.Get("OCI-Tag") != "v2, latest" {
		t.Fatalf("tag params: %d %v", r.status, r.header)
	}
	var tl struct{ Tags []string }
	_ = json.Unmarshal(e.get("/v2/ci/app/tags/list").body, &tl)
	if strings.Join(tl.Tags, ",") != "latest,v1,v2" {
		t.Fatalf("tags %v", tl.Tags)
	}

	// Another hosted repository sees nothing until it mounts the blob.
	if g := e.get("/v2/ci/other/blobs/" + ld.String()); g.status != 404 {
		t.Fatalf("blob leaked to another repository: %d", g.status)
	}
	if r = e.send("POST", "/v2/ci/other/blobs/uploads/?mount="+ld.String()+"&from=ci/nothing", nil); r.status != 202 {
		t.Fatalf("mount from a repository without the blob: %d", r.status)
	}
	if r = e.send("POST", "/v2/ci/other/blobs/uploads/?mount="+ld.String()+"&from=ci/app", nil); r.status != 201 {
		t.Fatalf("mount: %d %s", r.status, r.body)
	}
	if g := e.get("/v2/ci/other/blobs/" + ld.String()); !bytes.Equal(g.body, layer) {
		t.Fatal("mounted blob")
	}

	// Deletes: a tag, then the manifest (and its other tags), then a blob.
	if d := e.do("DELETE", "/v2/ci/app/manifests/v2"); d.status != 202 {
		t.Fatalf("tag delete: %d", d.status)
	}
	if h := e.do("HEAD", "/v2/ci/app/manifests/v2"); h.status != 404 {
		t.Fatalf("deleted tag: %d", h.status)
	}
	if d := e.do("DELETE", "/v2/ci/app/manifests/"+md.String()); d.status != 202 {
		t.Fatalf("manifest delete: %d", d.status)
	}
	for _, ref := range []string{md.String(), "v1", "latest"} {
		if h := e.do("HEAD", "/v2/ci/app/manifests/"+ref); h.status != 404 {
			t.Errorf("after manifest delete, %s: %d", ref, h.status)
		}
	}
	if d := e.do("DELETE", "/v2/ci/app/blobs/"+ld.String()); d.status != 202 {
		t.Fatalf("blob delete: %d", d.status)
	}
	if h := e.do("HEAD", "/v2/ci/app/blobs/"+ld.String()); h.status != 404 {
		t.Fatalf("deleted blob: %d", h.status)
	}
	if h := e.do("HEAD", "/v2/ci/other/blobs/"+ld.String()); h.status != 200 {
		t.Fatalf("the other repository lost its mount: %d", h.status)
	}
	if d := e.do("DELETE", "/v2/ci/app/blobs/"+ld.String()); d.status != 404 {
		t.Fatalf("second blob delete: %d", d.status)
	}
	if n := reg.Total(); n != 0 {
		t.Errorf("hosted repositories made %d upstream requests", n)
	}
}

func TestProxy_Hosted_Referrers(t *testing.T) {
	e, _ := start(t, withHosted("ci"))
	subject := v1.Descriptor{MediaType: v1.MediaTypeImageManifest, Digest: digest.FromString("image"), Size: 100}
	_, sbom := e.pushArtifact("ci/app", subject, sbomType, map[string]string{"n": "1"})
	r, sig := e.pushArtifact("ci/app", subject, sigType, nil)
	if r.header.Get("OCI-Subject") != subject.Digest.String() {
		t.Fatalf("OCI-Subject %q", r.header.Get("OCI-Subject"))
	}
	path := "/v2/ci/app/referrers/" + subject.Digest.String()
	_, got := e.referrersOf(path)
	sameDescriptors(t, got, sbom, sig)
	rr, got := e.referrersOf(path + "?artifactType=" + strings.ReplaceAll(sbomType, "+", "%2B"))
	sameDescriptors(t, got, sbom)
	if rr.header.Get("OCI-Filters-Applied") != "artifactType" {
		t.Error("filter header missing")
	}
	if d := e.do("DELETE", "/v2/ci/app/manifests/"+sbom.Digest.String()); d.status != 202 {
		t.Fatalf("delete: %d", d.status)
	}
	_, got = e.referrersOf(path)
	sameDescriptors(t, got, sig)
	e.restart()
	_, got = e.referrersOf(path)
	sameDescriptors(t, got, sig)
}

func TestProxy_Sha512Upload(t *testing.T) {
	e, _ := start(t, withHosted("ci/"))
	data := registrytest.RandomBytes(5000)
	d := digest.SHA512.FromBytes(data)
	r := e.send("POST", "/v2/ci/app/blobs/uploads/", nil)
	r = e.send("PATCH", location(t, e, r), data[:3000], "Content-Range: 0-2999")
	r = e.send("PUT", location(t, e, r)+"?digest="+d.String(), data[3000:])
	if r.status != 201 {
		t.Fatalf("sha512 upload: %d %s", r.status, r.body)
	}
	if g := e.get("/v2/ci/app/blobs/" + d.String()); !bytes.Equal(g.body, data) || g.header.Get("Docker-Content-Digest") != d.String() {
		t.Fatalf("sha512 blob: %d", g.status)
	}
}

func TestProxy_ReadOnly(t *testing.T) {
	e, reg := start(t, withReadOnly(), withHosted("ci/"))
	for _, tc := range []struct{ method, path string }{
		{"POST", "/v2/ci/app/blobs/uploads/"},
		{"PUT", "/v2/ci/app/manifests/v1"},
		{"DELETE", "/v2/ci/app/manifests/v1"},
		{"DELETE", "/v2/app/blobs/" + digest.FromString("x").String()},
		{"PATCH", "/v2/app/blobs/uploads/x"},
	} {
		r := e.send(tc.method, tc.path, []byte("{}"))
		if r.status != http.StatusMethodNotAllowed || errorCode(t, r.body) != "UNSUPPORTED" {
			t.Errorf("%s %s: %d %s", tc.method, tc.path, r.status, r.body)
		}
	}
	if reg.Total() != 0 {
		t.Error("a refused push reached the upstream")
	}
}

func TestProxy_ProxiedRepositoryRefusesTags(t *testing.T) {
	// A tag pushed to a proxied repository would shadow the upstream's for
	// every client: refused. A push by digest is self-verifying: kept.
	e, reg := start(t)
	img := reg.PushImage(t, "app", "v1", 10)
	data, blobs := registrytest.Artifact(img.Descriptor(), sigType, nil)
	for _, b := range blobs {
		e.pushBlob("app", b)
	}
	d := digest.FromBytes(data)
	for _, ref := range []string{"v1", "new-tag", d.String() + "?tag=v1"} {
		r := e.send("PUT", "/v2/app/manifests/"+ref, data, "Content-Type: "+v1.MediaTypeImageManifest)
		if r.status != 405 || errorCode(t, r.body) != "UNSUPPORTED" {
			t.Errorf("PUT %s: %d %s", ref, r.status, r.body)
		}
	}
	if r := e.send("PUT", "/v2/app/manifests/"+d.String(), data, "Content-Type: "+v1.MediaTypeImageManifest); r.status != 201 {
		t.Fatalf("push by digest: %d %s", r.status, r.body)
	}
	if g := e.get("/v2/app/manifests/v1"); !bytes.Equal(g.body, img.Manifest) {
		t.Error("the upstream's tag is not what v1 serves")
	}
	if d := e.do("DELETE", "/v2/app/manifests/v1"); d.status != 405 {
		t.Errorf("delete of an upstream tag without forward: %d", d.status)
	}
}

func TestProxy_UploadSessionsAreBounded(t *testing.T) {
	e, _ := start(t, withHosted("ci/"), withMaxUploads(2))
	var locs []string
	for i := 0; i < 2; i++ {
		r := e.send("POST", "/v2/ci/app/blobs/uploads/", nil)
		if r.status != 202 {
			t.Fatalf("session %d: %d", i, r.status)
		}
		locs = append(locs, location(t, e, r))
	}
	r := e.send("POST", "/v2/ci/app/blobs/uploads/", nil)
	if r.status != 429 || errorCode(t, r.body) != "TOOMANYREQUESTS" || r.header.Get("Retry-After") == "" {
		t.Fatalf("third session: %d %s", r.status, r.body)
	}
	if d := e.do("DELETE", locs[0]); d.status != 204 {
		t.Fatalf("cancel: %d", d.status)
	}
	if r := e.send("POST", "/v2/ci/app/blobs/uploads/", nil); r.status != 202 {
		t.Fatalf("after a cancel: %d", r.status)
	}
}
