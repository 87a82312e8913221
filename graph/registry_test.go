package graph_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/graph"
	"github.com/ocimirror/ocimirror/internal/registrytest"
	"github.com/ocimirror/ocimirror/upstream"
)

// multiPlatform pushes two images and an index of them (linux/amd64,
// linux/arm64/v8) tagged v1 to repo; an SBOM of the index, a signature of
// the SBOM, and an attestation of each platform.
type multiPlatform struct {
	index                     v1.Descriptor
	amd, arm                  registrytest.Image
	sbom, sig, amdAtt, armAtt v1.Descriptor
	// blobs are every blob pushed, by digest.
	blobs map[digest.Digest][]byte
}

func pushMultiPlatform(t *testing.T, reg *registrytest.Registry, repo string) multiPlatform {
	t.Helper()
	var m multiPlatform
	m.amd = reg.PushImage(t, repo, "amd64", 3000, 2000)
	m.arm = reg.PushImage(t, repo, "arm64", 1000)
	amd, arm := m.amd.Descriptor(), m.arm.Descriptor()
	amd.Platform = &v1.Platform{OS: "linux", Architecture: "amd64"}
	arm.Platform = &v1.Platform{OS: "linux", Architecture: "arm64", Variant: "v8"}
	data, _ := json.Marshal(v1.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageIndex,
		Manifests: []v1.Descriptor{amd, arm}})
	m.index = v1.Descriptor{MediaType: v1.MediaTypeImageIndex, Digest: reg.PushManifest(t, repo, "v1", v1.MediaTypeImageIndex, data), Size: int64(len(data))}
	m.blobs = map[digest.Digest][]byte{}
	for _, img := range []registrytest.Image{m.amd, m.arm} {
		m.blobs[digest.FromBytes(img.Config)] = img.Config
		for i, l := range img.Layers {
			m.blobs[img.LayerDigests[i]] = l
		}
	}
	artifact := func(subject v1.Descriptor, artifactType string) v1.Descriptor {
		data, blobs := registrytest.Artifact(subject, artifactType, nil)
		for _, b := range blobs {
			m.blobs[reg.PushBlob(t, repo, b)] = b
		}
		d := reg.PushManifest(t, repo, digest.FromBytes(data).String(), v1.MediaTypeImageManifest, data)
		return v1.Descriptor{MediaType: v1.MediaTypeImageManifest, Digest: d, Size: int64(len(data))}
	}
	m.sbom = artifact(m.index, "application/vnd.test.sbom")
	m.sig = artifact(m.sbom, "application/vnd.test.signature")
	m.amdAtt = artifact(m.amd.Descriptor(), "application/vnd.test.attestation")
	m.armAtt = artifact(m.arm.Descriptor(), "application/vnd.test.attestation")
	return m
}

func client(t *testing.T, reg *registrytest.Registry) *upstream.Client {
	t.Helper()
	c, err := upstream.New(upstream.Options{Name: "test", URL: reg.URL, MaxAttempts: 1})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// A walk over a registry's API: the tag resolves to the index, read once;
// --platform linux/arm64 keeps the arm64 child (arm64/v8 in the index)
// and its attestation, the index's SBOM and the SBOM's signature, and
// leaves amd64 and what it names out; every blob arrives whole.
func TestRegistry_WalkPlatformAndReferrers(t *testing.T) {
	reg := registrytest.New(t, registrytest.WithReferrersAPI())
	m := pushMultiPlatform(t, reg, "team/app")
	src := graph.NewRegistry(client(t, reg), "team/app")
	ctx := context.Background()

	root, err := src.Resolve(ctx, "v1")
	if err != nil {
		t.Fatal(err)
	}
	if root.Digest != m.index.Digest || root.MediaType != v1.MediaTypeImageIndex || root.Size != m.index.Size {
		t.Fatalf("resolved %+v, want the index %s", root, m.index.Digest)
	}
	arm64, _ := graph.ParsePlatform("linux/arm64")
	got, err := walk(t, src, root, graph.Options{Referrers: true, Platforms: []v1.Platform{arm64}})
	if err != nil {
		t.Fatal(err)
	}
	want := map[digest.Digest]graph.Kind{
		m.index.Digest: graph.Root, m.arm.Digest: graph.Child, digest.FromBytes(m.arm.Config): graph.Config,
		m.arm.LayerDigests[0]: graph.Layer, m.sbom.Digest: graph.Referrer, m.sig.Digest: graph.Referrer,
		m.armAtt.Digest: graph.Referrer,
	}
	for d, k := range want {
		if n, ok := got[d]; !ok || n.Kind != k || n.Missing {
			t.Errorf("%s: visited %v as %+v, want %s", d, ok, n, k)
		}
	}
	for _, d := range append([]digest.Digest{m.amd.Digest, m.amdAtt.Digest, digest.FromBytes(m.amd.Config)}, m.amd.LayerDigests...) {
		if _, ok := got[d]; ok {
			t.Errorf("%s of amd64 visited", d)
		}
	}
	// index, arm64 child, SBOM, signature, attestation: each GET once.
	if n := reg.Count("GET", "manifests"); n != 5 {
		t.Errorf("%d manifest GETs, want 5 (the tag's answer is not fetched again by digest)", n)
	}
	blobs := 0
	for d, n := range got {
		if !n.Kind.Blob() {
			continue
		}
		blobs++
		var buf bytes.Buffer
		size, err := src.Blob(ctx, n.Descriptor, &buf)
		if err != nil || size != n.Descriptor.Size || !bytes.Equal(buf.Bytes(), m.blobs[d]) {
			t.Errorf("blob %s: %d bytes, %v", d, size, err)
		}
	}
	// arm64 config and layer; the artifacts' empty config (shared) and
	// one layer each.
	if blobs != 2+1+3 {
		t.Errorf("%d blobs visited, want 6", blobs)
	}
	if w := src.Warnings(); len(w) != 0 {
		t.Errorf("warnings: %v", w)
	}
}

// Everything the registry sends is checked: a manifest whose bytes do not
// hash to the digest asked for, a tag answered with a Docker-Content-Digest
// its bytes do not have, a blob with other bytes, fewer or more; the media
// type is the Content-Type's, parameters aside; a 404 is ErrNotFound and
// says the registry's error code.
func TestRegistry_Verifies(t *testing.T) {
	reg := registrytest.New(t, registrytest.WithReferrersAPI())
	img := reg.PushImage(t, "team/app", "v1", 4096)
	src := graph.NewRegistry(client(t, reg), "team/app")
	ctx := context.Background()
	layer := v1.Descriptor{Digest: img.LayerDigests[0], Size: 4096}

	serve := func(kind string, f func(w http.ResponseWriter)) {
		reg.Intercept(func(w http.ResponseWriter, r *http.Request) bool {
			if registrytest.Kind(r.URL.Path) != kind {
				return false
			}
			f(w)
			return true
		})
	}
	tampered := bytes.Replace(img.Manifest, []byte(`"schemaVersion":2`), []byte(`"schemaVersion": 2`), 1)
	tests := []struct {
		name string
		kind string
		f    func(w http.ResponseWriter)
		call func() error
		want error
		says string
	}{
		{"manifest bytes differ", "manifests", func(w http.ResponseWriter) {
			w.Header().Set("Content-Type", v1.MediaTypeImageManifest)
			w.Write(tampered)
		}, func() error { _, _, err := src.Manifest(ctx, img.Digest); return err }, graph.ErrDigestMismatch, "hash to"},
		{"manifest header names another digest", "manifests", func(w http.ResponseWriter) {
			w.Header().Set("Content-Type", v1.MediaTypeImageManifest)
			w.Header().Set("Docker-Content-Digest", digest.FromBytes(tampered).String())
			w.Write(img.Manifest)
		}, func() error { _, _, err := src.Manifest(ctx, img.Digest); return err }, graph.ErrDigestMismatch, "registry says"},
		{"tag answered with a lying header", "manifests", func(w http.ResponseWriter) {
			w.Header().Set("Content-Type", v1.MediaTypeImageManifest)
			w.Header().Set("Docker-Content-Digest", img.Digest.String())
			w.Write(tampered)
		}, func() error { _, err := src.Resolve(ctx, "v1"); return err }, graph.ErrDigestMismatch, "hash to"},
		{"blob with other bytes", "blobs", func(w http.ResponseWriter) {
			w.Write(make([]byte, 4096))
		}, func() error { _, err := src.Blob(ctx, layer, io.Discard); return err }, graph.ErrDigestMismatch, "do not hash"},
		{"blob cut short", "blobs", func(w http.ResponseWriter) {
			w.Write(img.Layers[0][:4000])
		}, func() error { _, err := src.Blob(ctx, layer, io.Discard); return err }, graph.ErrDigestMismatch, "4000 bytes received"},
		{"blob too long", "blobs", func(w http.ResponseWriter) {
			w.Write(append(bytes.Clone(img.Layers[0]), 'x'))
		}, func() error { _, err := src.Blob(ctx, layer, io.Discard); return err }, graph.ErrDigestMismatch, "4097 bytes received"},
		{"unknown manifest", "manifests", func(w http.ResponseWriter) {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusNotFound)
			w.Write([]byte(`{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}`))
		}, func() error { _, err := src.Resolve(ctx, "nope"); return err }, graph.ErrNotFound, "404 MANIFEST_UNKNOWN: manifest unknown"},
		{"unknown blob", "blobs", func(w http.ResponseWriter) {
			w.WriteHeader(http.StatusNotFound)
		}, func() error { _, err := src.Blob(ctx, layer, io.Discard); return err }, graph.ErrNotFound, "404 Not Found"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			serve(tc.kind, tc.f)
			defer reg.Intercept(nil)
			err := tc.call()
			if !errors.Is(err, tc.want) || !strings.Contains(errText(err), tc.says) {
				t.Fatalf("got %v, want %v saying %q", err, tc.want, tc.says)
			}
		})
	}

	// The media type is the Content-Type's, parameters and all.
	serve("manifests", func(w http.ResponseWriter) {
		w.Header().Set("Content-Type", v1.MediaTypeImageManifest+"; charset=utf-8")
		w.Write(img.Manifest)
	})
	mt, data, err := src.Manifest(ctx, img.Digest)
	if err != nil || mt != v1.MediaTypeImageManifest || !bytes.Equal(data, img.Manifest) {
		t.Fatalf("with a parameter: %q, %v", mt, err)
	}
	reg.Intercept(nil)

	// Untouched, all of it reads.
	d, err := src.Resolve(ctx, "v1")
	if err != nil || d.Digest != img.Digest || d.MediaType != v1.MediaTypeImageManifest {
		t.Fatalf("resolve: %+v %v", d, err)
	}
	var buf bytes.Buffer
	if n, err := src.Blob(ctx, layer, &buf); err != nil || n != 4096 || !bytes.Equal(buf.Bytes(), img.Layers[0]) {
		t.Fatalf("blob: %d %v", n, err)
	}
}

func errText(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// A referrers answer in pages is read whole (Link followed); one that
// carries a Warning is asked again while it grows, and what it still
// says is kept for Warnings().
func TestRegistry_ReferrersPagesAndWarnings(t *testing.T) {
	reg := registrytest.New(t, registrytest.WithReferrersAPI())
	img := reg.PushImage(t, "team/app", "v1", 10)
	a := reg.PushArtifact(t, "team/app", img.Descriptor(), "application/vnd.test.a", nil)
	b := reg.PushArtifact(t, "team/app", img.Descriptor(), "application/vnd.test.b", nil)
	src := graph.NewRegistry(client(t, reg), "team/app")
	ctx := context.Background()
	index := func(ds ...v1.Descriptor) []byte {
		data, _ := json.Marshal(v1.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageIndex, Manifests: ds})
		return data
	}
	calls := 0
	reg.Intercept(func(w http.ResponseWriter, r *http.Request) bool {
		if registrytest.Kind(r.URL.Path) != "referrers" {
			return false
		}
		calls++
		w.Header().Set("Content-Type", v1.MediaTypeImageIndex)
		if r.URL.Query().Get("last") == "" {
			w.Header().Set("Link", "<"+r.URL.Path+"?last="+a.Digest.String()+`>; rel="next"`)
			w.Write(index(a))
			return true
		}
		w.Header().Add("Warning", `299 - "2 referrers named by the upstream could not be checked now; the list may be incomplete"`)
		w.Write(index(b))
		return true
	})
	ds, err := src.Referrers(ctx, img.Digest)
	if err != nil || len(ds) != 2 || ds[0].Digest != a.Digest || ds[1].Digest != b.Digest {
		t.Fatalf("paged referrers: %v %v", ds, err)
	}
	// Asked twice (the second answer did not grow), two pages each.
	if calls != 4 {
		t.Errorf("%d referrers requests, want 4", calls)
	}
	w := src.Warnings()
	if len(w) != 1 || !strings.Contains(w[0], "referrers of "+img.Digest.String()+" may be incomplete: 2 referrers") {
		t.Errorf("warnings: %q", w)
	}

	// A registry without the referrers API: none, and the walk goes on.
	reg.Intercept(func(w http.ResponseWriter, r *http.Request) bool {
		if registrytest.Kind(r.URL.Path) != "referrers" {
			return false
		}
		w.WriteHeader(http.StatusNotFound)
		return true
	})
	if _, err := src.Referrers(ctx, img.Digest); !errors.Is(err, graph.ErrNotFound) {
		t.Fatalf("without the API: %v", err)
	}
	got, err := walk(t, src, img.Descriptor(), graph.Options{Referrers: true})
	if err != nil || len(got) != 3 {
		t.Fatalf("walk without the referrers API: %d nodes, %v", len(got), err)
	}
}
