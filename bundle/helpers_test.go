package bundle_test

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/bundle"
	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/graph"
	"github.com/ocimirror/ocimirror/internal/registrytest"
	"github.com/ocimirror/ocimirror/upstream"
)

// image is a multi-platform image on a registry: an index of linux/amd64
// and linux/arm64, an SBOM of the index, a signature of the SBOM, an
// attestation of amd64.
type image struct {
	index, amd, arm, sbom, sig, att v1.Descriptor
	// content is every manifest and blob, by digest; blobs, the blobs.
	content map[digest.Digest][]byte
	blobs   []digest.Digest
}

func (m image) manifests() []digest.Digest {
	return []digest.Digest{m.index.Digest, m.amd.Digest, m.arm.Digest, m.sbom.Digest, m.sig.Digest, m.att.Digest}
}

func pushImage(t *testing.T, reg *registrytest.Registry, repo, tag string) image {
	t.Helper()
	m := image{content: map[digest.Digest][]byte{}}
	addBlob := func(d digest.Digest, b []byte) {
		if _, ok := m.content[d]; !ok {
			m.content[d] = b
			m.blobs = append(m.blobs, d)
		}
	}
	amd := reg.PushImage(t, repo, tag+"-amd64", 3000, 2000)
	arm := reg.PushImage(t, repo, tag+"-arm64", 1000)
	for _, img := range []registrytest.Image{amd, arm} {
		m.content[img.Digest] = img.Manifest
		addBlob(digest.FromBytes(img.Config), img.Config)
		for i, l := range img.Layers {
			addBlob(img.LayerDigests[i], l)
		}
	}
	m.amd, m.arm = amd.Descriptor(), arm.Descriptor()
	m.amd.Platform = &v1.Platform{OS: "linux", Architecture: "amd64"}
	m.arm.Platform = &v1.Platform{OS: "linux", Architecture: "arm64"}
	data, _ := json.Marshal(v1.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageIndex,
		Manifests: []v1.Descriptor{m.amd, m.arm}})
	m.index = v1.Descriptor{MediaType: v1.MediaTypeImageIndex, Digest: reg.PushManifest(t, repo, tag, v1.MediaTypeImageIndex, data), Size: int64(len(data))}
	m.content[m.index.Digest] = data
	attach := func(subject v1.Descriptor, artifactType string) v1.Descriptor {
		data, blobs := registrytest.Artifact(subject, artifactType, map[string]string{"org.example.kind": artifactType})
		for _, b := range blobs {
			addBlob(reg.PushBlob(t, repo, b), b)
		}
		d := reg.PushManifest(t, repo, digest.FromBytes(data).String(), v1.MediaTypeImageManifest, data)
		m.content[d] = data
		return v1.Descriptor{MediaType: v1.MediaTypeImageManifest, Digest: d, Size: int64(len(data)), ArtifactType: artifactType,
			Annotations: map[string]string{"org.example.kind": artifactType}}
	}
	m.sbom = attach(m.index, "application/vnd.test.sbom")
	m.sig = attach(m.sbom, "application/vnd.test.signature")
	m.att = attach(m.amd, "application/vnd.test.attestation")
	return m
}

func openStore(t *testing.T) *cache.Badger {
	t.Helper()
	b, err := cache.OpenBadger(cache.BadgerOptions{Path: t.TempDir(), CollectInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

func registryRepo(t *testing.T, reg *registrytest.Registry, repo string) *graph.Registry {
	t.Helper()
	c, err := upstream.New(upstream.Options{Name: "test", URL: reg.URL, MaxAttempts: 1})
	if err != nil {
		t.Fatal(err)
	}
	return graph.NewRegistry(c, repo)
}

// exportTar exports names (host/repository:tag, read from reg) into a
// bundle.
func exportTar(t *testing.T, reg *registrytest.Registry, exclude map[digest.Digest]bool, names ...string) ([]byte, []bundle.Exported) {
	t.Helper()
	var buf bytes.Buffer
	w, err := bundle.NewWriter(&buf)
	if err != nil {
		t.Fatal(err)
	}
	e := &bundle.Exporter{W: w, Exclude: exclude}
	var out []bundle.Exported
	for _, s := range names {
		n, err := bundle.ParseName(s)
		if err != nil {
			t.Fatal(err)
		}
		res, err := e.Image(context.Background(), registryRepo(t, reg, n.Repository), n)
		if err != nil {
			t.Fatalf("export %s: %v", s, err)
		}
		out = append(out, res)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes(), out
}

// files lists a tar's files and their bytes.
func files(t *testing.T, data []byte) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	tr := tar.NewReader(bytes.NewReader(data))
	for {
		h, err := tr.Next()
		if err != nil {
			break
		}
		if h.Typeflag == tar.TypeReg {
			b := make([]byte, h.Size)
			if _, err := io.ReadFull(tr, b); err != nil {
				t.Fatal(err)
			}
			out[h.Name] = b
		}
	}
	return out
}

// layout writes a tar of the given files, in name order, index.json last
// when given: an OCI layout as another tool would write it.
func layout(t *testing.T, content map[string][]byte, links map[string]string) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	names := make([]string, 0, len(content))
	for n := range content {
		names = append(names, n)
	}
	sort.Slice(names, func(i, j int) bool {
		if (names[i] == "index.json") != (names[j] == "index.json") {
			return names[j] == "index.json"
		}
		return names[i] < names[j]
	})
	for _, n := range names {
		if err := tw.WriteHeader(&tar.Header{Name: n, Mode: 0o644, Size: int64(len(content[n])), Typeflag: tar.TypeReg}); err != nil {
			t.Fatal(err)
		}
		tw.Write(content[n])
	}
	for n, target := range links {
		tw.WriteHeader(&tar.Header{Name: n, Linkname: target, Typeflag: tar.TypeSymlink, Mode: 0o777})
	}
	tw.Close()
	return buf.Bytes()
}

// blobFiles is content as layout files.
func blobFiles(content map[digest.Digest][]byte) map[string][]byte {
	out := map[string][]byte{"oci-layout": []byte(`{"imageLayoutVersion":"1.0.0"}`)}
	for d, b := range content {
		out["blobs/"+d.Algorithm().String()+"/"+d.Encoded()] = b
	}
	return out
}

func indexJSON(ds ...v1.Descriptor) []byte {
	data, _ := json.Marshal(v1.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageIndex, Manifests: ds})
	return data
}

func withName(d v1.Descriptor, annotations ...string) v1.Descriptor {
	d.Annotations = map[string]string{}
	for i := 0; i+1 < len(annotations); i += 2 {
		d.Annotations[annotations[i]] = annotations[i+1]
	}
	d.ArtifactType = ""
	return d
}

// visible describes what a mirror serves of repository k from store s, of
// the given content: links, tags, referrers, pins. Two equal descriptions
// are the same state for clients.
func visible(t *testing.T, s *cache.Badger, k cache.RepoKey, content []digest.Digest) string {
	t.Helper()
	ctx := context.Background()
	var lines []string
	for _, d := range content {
		for _, kind := range []cache.LinkKind{cache.LinkBlob, cache.LinkManifest} {
			if o, ok, _ := s.Linked(ctx, k, kind, d); ok {
				lines = append(lines, fmt.Sprintf("link %c %s %c", kind, d, o))
			}
		}
		rs, _ := s.ListReferrers(ctx, cache.ReferrerKey{Upstream: k.Upstream, Repo: k.Repo, Subject: d})
		for _, r := range rs {
			lines = append(lines, fmt.Sprintf("referrer of %s: %s %s", d, r.Digest, r.ArtifactType))
		}
	}
	tags, _ := s.ListTags(ctx, k.Upstream, k.Repo)
	for _, tg := range tags {
		lines = append(lines, "tag "+tg.Name+" "+tg.Digest.String())
	}
	pins, _ := s.ListPins(ctx)
	for _, p := range pins {
		lines = append(lines, "pin "+p.Repo.Upstream+"/"+p.Repo.Repo+" "+p.Name+" "+p.Digest.String())
	}
	slices.Sort(lines)
	return strings.Join(lines, "\n")
}
