package proxy_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/internal/registrytest"
)

const (
	sbomType = "application/vnd.example.sbom.v1+json"
	sigType  = "application/vnd.example.signature.v1+json"
)

// sameDescriptors compares a referrers answer with what is expected:
// digests, media types, sizes, artifact types and annotations, in digest
// order.
func sameDescriptors(t *testing.T, got []v1.Descriptor, want ...v1.Descriptor) {
	t.Helper()
	sortByDigest(want)
	if len(got) != len(want) {
		t.Fatalf("%d referrers, want %d: %+v", len(got), len(want), got)
	}
	for i := range want {
		g, w := got[i], want[i]
		if g.Digest != w.Digest || g.MediaType != w.MediaType || g.Size != w.Size || g.ArtifactType != w.ArtifactType ||
			fmt.Sprint(g.Annotations) != fmt.Sprint(w.Annotations) {
			t.Errorf("referrer %d: got %+v, want %+v", i, g, w)
		}
	}
}

func sortByDigest(ds []v1.Descriptor) {
	slices.SortFunc(ds, func(a, b v1.Descriptor) int { return strings.Compare(string(a.Digest), string(b.Digest)) })
}

func TestProxy_Referrers_FallbackTag(t *testing.T) {
	reg := registrytest.New(t) // no referrers API, like Docker Hub and distribution
	e, _ := start(t, withUpstream(upstreamDef{name: "up.test", reg: reg, ttl: time.Minute}), withDefault("up.test"))
	img := reg.PushImage(t, "app", "v1", 10)
	sbom := reg.PushArtifact(t, "app", img.Descriptor(), sbomType, map[string]string{"org.example.kind": "sbom"})
	sig := reg.PushArtifact(t, "app", img.Descriptor(), sigType, nil)
	// A third entry claims the subject but its manifest names another one.
	other := reg.PushImage(t, "app", "other", 10)
	liar := reg.PushArtifact(t, "app", other.Descriptor(), sigType, nil)
	fallback := reg.PushFallbackIndex(t, "app", img.Digest, sbom, sig, liar)
	reg.ResetCounts()

	path := "/v2/app/referrers/" + img.Digest.String()
	r, got := e.referrersOf(path)
	sameDescriptors(t, got, sbom, sig)
	if r.header.Get("OCI-Filters-Applied") != "" {
		t.Error("OCI-Filters-Applied without a filter")
	}
	first := reg.Total()

	// Filtered: only signatures, and the header says so.
	r, got = e.referrersOf(path + "?artifactType=" + url.QueryEscape(sigType))
	sameDescriptors(t, got, sig)
	if r.header.Get("OCI-Filters-Applied") != "artifactType" {
		t.Errorf("OCI-Filters-Applied %q", r.header.Get("OCI-Filters-Applied"))
	}
	_, got = e.referrersOf(path + "?artifactType=application/none")
	sameDescriptors(t, got)

	// Within the TTL the answer costs the upstream nothing.
	if n := reg.Total(); n != first {
		t.Errorf("cached answers made %d upstream requests", n-first)
	}
	// After the TTL: one HEAD of the fallback tag; the missing referrers
	// API is remembered, not asked again.
	reg.ResetCounts()
	e.clock.Advance(2 * time.Minute)
	_, got = e.referrersOf(path)
	sameDescriptors(t, got, sbom, sig)
	if reg.Count("HEAD", "manifests") != 1 || reg.Count("GET", "manifests") != 0 || reg.Count("GET", "referrers") != 0 {
		t.Errorf("revalidation: HEAD %d GET %d referrers %d", reg.Count("HEAD", "manifests"), reg.Count("GET", "manifests"), reg.Count("GET", "referrers"))
	}

	// The fallback tag itself is still a tag, byte for byte.
	want := reg.Get("/v2/app/manifests/"+fallback.String(), v1.MediaTypeImageIndex)
	wantBody, _ := io.ReadAll(want.Body)
	tr := e.get("/v2/app/manifests/sha256-" + img.Digest.Encoded())
	if tr.status != 200 || !bytes.Equal(tr.body, wantBody) || tr.header.Get("Docker-Content-Digest") != fallback.String() {
		t.Errorf("fallback tag as a tag: %d", tr.status)
	}

	// A new entry in the fallback index shows once the TTL has passed.
	att := reg.PushArtifact(t, "app", img.Descriptor(), "application/vnd.example.attestation", nil)
	reg.PushFallbackIndex(t, "app", img.Digest, sbom, sig, liar, att)
	e.clock.Advance(2 * time.Minute)
	_, got = e.referrersOf(path)
	sameDescriptors(t, got, sbom, sig, att)
}

func TestProxy_Referrers_UpstreamAPI(t *testing.T) {
	reg := registrytest.New(t, registrytest.WithReferrersAPI())
	e, _ := start(t, withUpstream(upstreamDef{name: "up.test", reg: reg, ttl: time.Minute}), withDefault("up.test"))
	img := reg.PushImage(t, "app", "v1", 10)
	sbom := reg.PushArtifact(t, "app", img.Descriptor(), sbomType, map[string]string{"a": "b"})
	reg.ResetCounts()

	path := "/v2/app/referrers/" + img.Digest.String()
	_, got := e.referrersOf(path)
	sameDescriptors(t, got, sbom)
	if reg.Count("GET", "referrers") != 1 {
		t.Errorf("upstream referrers calls: %d", reg.Count("GET", "referrers"))
	}
	// Cached: no upstream call.
	before := reg.Total()
	e.referrersOf(path)
	if reg.Total() != before {
		t.Errorf("cached answer made %d upstream requests", reg.Total()-before)
	}
	// Upstream down after the TTL: the last answer is served.
	reg.Intercept(func(w http.ResponseWriter, r *http.Request) bool { w.WriteHeader(503); return true })
	e.clock.Advance(2 * time.Minute)
	_, got = e.referrersOf(path)
	sameDescriptors(t, got, sbom)
	reg.Intercept(nil)

	// Merged with what ocimirror is pushed: both sources, one answer.
	r, pushed := e.pushArtifact("app", img.Descriptor(), sigType, nil)
	if r.status != 201 || r.header.Get("OCI-Subject") != img.Digest.String() {
		t.Fatalf("push: %d %s %v", r.status, r.body, r.header)
	}
	_, got = e.referrersOf(path)
	sameDescriptors(t, got, sbom, pushed)
}

func TestProxy_Referrers_ObservedWhenPulled(t *testing.T) {
	reg := registrytest.New(t)
	e, _ := start(t, withUpstream(upstreamDef{name: "up.test", reg: reg}), withDefault("up.test"))
	img := reg.PushImage(t, "app", "v1", 10)
	// Upstream has the artifact but neither a referrers API nor a fallback tag.
	sig := reg.PushArtifact(t, "app", img.Descriptor(), sigType, map[string]string{"k": "v"})
	_, got := e.referrersOf("/v2/app/referrers/" + img.Digest.String())
	sameDescriptors(t, got)
	// A client pulls it through ocimirror: from then on it is a referrer.
	if r := e.get("/v2/app/manifests/" + sig.Digest.String()); r.status != 200 {
		t.Fatal(r.status)
	}
	_, got = e.referrersOf("/v2/app/referrers/" + img.Digest.String())
	sameDescriptors(t, got, sig)
	// Only in that repository.
	_, got = e.referrersOf("/v2/other/referrers/" + img.Digest.String())
	sameDescriptors(t, got)
}

func TestProxy_Referrers_PushedLocallyStaysLocal(t *testing.T) {
	reg := registrytest.New(t)
	e, _ := start(t, withUpstream(upstreamDef{name: "up.test", reg: reg}), withDefault("up.test"))
	img := reg.PushImage(t, "app", "v1", 10)
	reg.ResetCounts()
	r, sig := e.pushArtifact("app", img.Descriptor(), sigType, map[string]string{"signed-by": "ci"})
	if r.status != 201 || r.header.Get("OCI-Subject") != img.Digest.String() || r.header.Get("Docker-Content-Digest") != sig.Digest.String() {
		t.Fatalf("push: %d %s %v", r.status, r.body, r.header)
	}
	_, got := e.referrersOf("/v2/app/referrers/" + img.Digest.String())
	sameDescriptors(t, got, sig)
	// The pushed manifest is served from ocimirror, and never reached the upstream.
	if m := e.get("/v2/app/manifests/" + sig.Digest.String()); m.status != 200 {
		t.Errorf("pushed manifest: %d", m.status)
	}
	for _, k := range []string{"PUT manifests", "POST uploads", "PUT uploads"} {
		m, kind, _ := strings.Cut(k, " ")
		if n := reg.Count(m, kind); n != 0 {
			t.Errorf("%d %s requests reached the upstream", n, k)
		}
	}
	if resp := reg.Get("/v2/app/manifests/" + sig.Digest.String()); resp.StatusCode != 404 {
		t.Errorf("the upstream has the local push: %d", resp.StatusCode)
	}
	// A subject that does not exist anywhere yet is accepted too.
	missing := v1.Descriptor{MediaType: v1.MediaTypeImageManifest, Digest: digest.FromString("not yet"), Size: 5}
	r, _ = e.pushArtifact("app", missing, sigType, nil)
	if r.status != 201 || r.header.Get("OCI-Subject") != missing.Digest.String() {
		t.Errorf("push with a missing subject: %d %v", r.status, r.header)
	}
}

func TestProxy_Referrers_PushForwardUpdatesFallbackIndex(t *testing.T) {
	reg := registrytest.New(t)
	e, _ := start(t, withUpstream(upstreamDef{name: "up.test", reg: reg, forward: true}), withDefault("up.test"))
	img := reg.PushImage(t, "app", "v1", 10)
	existing := reg.PushArtifact(t, "app", img.Descriptor(), sbomType, nil)
	reg.PushFallbackIndex(t, "app", img.Digest, existing)

	r, sig := e.pushArtifact("app", img.Descriptor(), sigType, map[string]string{"x": "y"})
	if r.status != 201 || r.header.Get("OCI-Subject") != img.Digest.String() {
		t.Fatalf("push: %d %s", r.status, r.body)
	}
	// The upstream has the manifest and a fallback index listing both.
	if resp := reg.Get("/v2/app/manifests/" + sig.Digest.String()); resp.StatusCode != 200 {
		t.Fatalf("forwarded manifest upstream: %d", resp.StatusCode)
	}
	resp := reg.Get("/v2/app/manifests/sha256-"+img.Digest.Encoded(), v1.MediaTypeImageIndex)
	var idx v1.Index
	if err := json.NewDecoder(resp.Body).Decode(&idx); err != nil {
		t.Fatal(err)
	}
	sortByDigest(idx.Manifests)
	sameDescriptors(t, idx.Manifests, existing, sig)
	_, got := e.referrersOf("/v2/app/referrers/" + img.Digest.String())
	sameDescriptors(t, got, existing, sig)

	// A forwarded delete removes it upstream, from the fallback index and here.
	if d := e.do("DELETE", "/v2/app/manifests/"+sig.Digest.String()); d.status != 202 {
		t.Fatalf("delete: %d %s", d.status, d.body)
	}
	if h := e.do("HEAD", "/v2/app/manifests/"+sig.Digest.String()); h.status != 404 {
		t.Errorf("HEAD after delete: %d", h.status)
	}
	resp = reg.Get("/v2/app/manifests/sha256-"+img.Digest.Encoded(), v1.MediaTypeImageIndex)
	idx = v1.Index{}
	_ = json.NewDecoder(resp.Body).Decode(&idx)
	sameDescriptors(t, idx.Manifests, existing)
	_, got = e.referrersOf("/v2/app/referrers/" + img.Digest.String())
	sameDescriptors(t, got, existing)
}

func TestProxy_Referrers_UnknownSubjectAndRestart(t *testing.T) {
	reg := registrytest.New(t, registrytest.WithReferrersAPI())
	e, _ := start(t, withUpstream(upstreamDef{name: "up.test", reg: reg}), withDefault("up.test"))
	r, got := e.referrersOf("/v2/app/referrers/" + digest.FromString("nothing").String())
	if len(got) != 0 || !bytes.Contains(r.body, []byte(`"manifests":[]`)) {
		t.Fatalf("unknown subject: %s", r.body)
	}
	img := reg.PushImage(t, "app", "v1", 10)
	upstreamRef := reg.PushArtifact(t, "app", img.Descriptor(), sbomType, nil)
	_, local := e.pushArtifact("app", img.Descriptor(), sigType, nil)
	_, got = e.referrersOf("/v2/app/referrers/" + img.Digest.String())
	sameDescriptors(t, got, upstreamRef, local)

	// Restarted with the upstream gone: the last upstream answer and the
	// local index survive.
	e.restart()
	reg.Close()
	e.clock.Advance(time.Hour)
	_, got = e.referrersOf("/v2/app/referrers/" + img.Digest.String())
	sameDescriptors(t, got, upstreamRef, local)
}

func TestProxy_Referrers_PagedBeyondLimit(t *testing.T) {
	e, _ := start(t, withHosted("ci/"))
	subject := v1.Descriptor{MediaType: v1.MediaTypeImageManifest, Digest: digest.FromString("s"), Size: 1}
	var want []v1.Descriptor
	big := strings.Repeat("x", 40<<10)
	for i := 0; i < 120; i++ { // 120 x 40 KiB of annotations: more than 4 MiB
		_, d := e.pushArtifact("ci/app", subject, sigType, map[string]string{"i": fmt.Sprint(i), "pad": big})
		want = append(want, d)
	}
	var got []v1.Descriptor
	path := "/v2/ci/app/referrers/" + subject.Digest.String()
	for pages := 0; path != ""; pages++ {
		r, page := e.referrersOf(path)
		if len(r.body) > 4<<20 {
			t.Fatalf("page of %d bytes", len(r.body))
		}
		got = append(got, page...)
		path = ""
		if link := r.header.Get("Link"); link != "" {
			target, _, _ := strings.Cut(strings.TrimPrefix(link, "<"), ">")
			path = target
		}
		if pages > 10 {
			t.Fatal("pages never end")
		}
	}
	sameDescriptors(t, got, want...)
}

func TestProxy_Referrers_Dedup(t *testing.T) {
	// The same referrer named by the upstream API, the fallback index and a
	// push to ocimirror is listed once.
	reg := registrytest.New(t, registrytest.WithReferrersAPI())
	e, _ := start(t, withUpstream(upstreamDef{name: "up.test", reg: reg}), withDefault("up.test"))
	img := reg.PushImage(t, "app", "v1", 10)
	data, blobs := registrytest.Artifact(img.Descriptor(), sigType, map[string]string{"once": "yes"})
	for _, b := range blobs {
		reg.PushBlob(t, "app", b)
		e.pushBlob("app", b)
	}
	d := reg.PushManifest(t, "app", digest.FromBytes(data).String(), v1.MediaTypeImageManifest, data)
	desc := v1.Descriptor{MediaType: v1.MediaTypeImageManifest, Digest: d, Size: int64(len(data)), ArtifactType: sigType, Annotations: map[string]string{"once": "yes"}}
	reg.PushFallbackIndex(t, "app", img.Digest, desc, desc)
	if r := e.send("PUT", "/v2/app/manifests/"+d.String(), data, "Content-Type: "+v1.MediaTypeImageManifest); r.status != 201 {
		t.Fatalf("push: %d %s", r.status, r.body)
	}
	_, got := e.referrersOf("/v2/app/referrers/" + img.Digest.String())
	sameDescriptors(t, got, desc)
}
