package bundle_test

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/bundle"
	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/internal/registrytest"
	"github.com/ocimirror/ocimirror/referrers"
)

func fallback(d digest.Digest) string { return referrers.FallbackTag(d) }

// The bundle of an image: oci-layout first and index.json last; every
// manifest and blob once, byte for byte; the image named by its full name
// in both annotations; each referrer listed untagged, and in the fallback
// tag index of its subject.
func TestExport_Layout(t *testing.T) {
	reg := registrytest.New(t, registrytest.WithReferrersAPI())
	m := pushImage(t, reg, "team/app", "v1")
	data, res := exportTar(t, reg, nil, reg.Host+"/team/app:v1")
	if r := res[0]; r.Digest != m.index.Digest || r.Manifests != 6+3 || r.Referrers != 3 || r.Blobs != len(m.blobs) || r.Excluded != 0 {
		t.Errorf("result %+v", r)
	}

	var names []string
	tr := tar.NewReader(bytes.NewReader(data))
	for {
		h, err := tr.Next()
		if err != nil {
			break
		}
		if h.Typeflag == tar.TypeReg {
			names = append(names, h.Name)
		}
	}
	if names[0] != "oci-layout" || names[len(names)-1] != "index.json" {
		t.Errorf("entries: %v (want oci-layout first, index.json last)", names)
	}
	fs := files(t, data)
	for d, b := range m.content {
		if got := fs["blobs/sha256/"+d.Encoded()]; !bytes.Equal(got, b) {
			t.Errorf("blob %s: %d bytes in the bundle", d, len(got))
		}
	}
	// 6 manifests, the blobs, 3 fallback indexes, oci-layout, index.json.
	if want := len(m.content) + 3 + 2; len(fs) != want {
		t.Errorf("%d files, want %d: %v", len(fs), want, names)
	}

	var idx v1.Index
	if err := json.Unmarshal(fs["index.json"], &idx); err != nil {
		t.Fatal(err)
	}
	full := reg.Host + "/team/app:v1"
	var untagged []digest.Digest
	fallbacks := map[string][]digest.Digest{}
	for _, d := range idx.Manifests {
		switch name := d.Annotations[v1.AnnotationRefName]; {
		case d.Digest == m.index.Digest:
			if name != full || d.Annotations[bundle.AnnotationImageName] != full || d.MediaType != v1.MediaTypeImageIndex || d.Size != m.index.Size {
				t.Errorf("image entry %+v", d)
			}
		case name == "":
			untagged = append(untagged, d.Digest)
			if d.ArtifactType == "" {
				t.Errorf("untagged referrer %s has no artifact type", d.Digest)
			}
		default:
			var fi v1.Index
			json.Unmarshal(fs["blobs/sha256/"+d.Digest.Encoded()], &fi)
			for _, r := range fi.Manifests {
				fallbacks[name] = append(fallbacks[name], r.Digest)
			}
		}
	}
	slices.Sort(untagged)
	want := []digest.Digest{m.sbom.Digest, m.sig.Digest, m.att.Digest}
	slices.Sort(want)
	if !slices.Equal(untagged, want) {
		t.Errorf("untagged entries %v, want the referrers %v", untagged, want)
	}
	repo := reg.Host + "/team/app:"
	for subject, r := range map[digest.Digest]digest.Digest{m.index.Digest: m.sbom.Digest, m.sbom.Digest: m.sig.Digest, m.amd.Digest: m.att.Digest} {
		if got := fallbacks[repo+fallback(subject)]; !slices.Equal(got, []digest.Digest{r}) {
			t.Errorf("fallback tag of %s lists %v, want %s (all: %v)", subject, got, r, fallbacks)
		}
	}
}

// --platform keeps one platform of the index (and its referrers); an
// image that names no such platform fails.
func TestExport_Platform(t *testing.T) {
	reg := registrytest.New(t, registrytest.WithReferrersAPI())
	m := pushImage(t, reg, "team/app", "v1")
	var buf bytes.Buffer
	w, _ := bundle.NewWriter(&buf)
	e := &bundle.Exporter{W: w, Platforms: []v1.Platform{{OS: "linux", Architecture: "arm64"}}}
	n, _ := bundle.ParseName(reg.Host + "/team/app:v1")
	res, err := e.Image(context.Background(), registryRepo(t, reg, "team/app"), n)
	if err != nil {
		t.Fatal(err)
	}
	w.Close()
	fs := files(t, buf.Bytes())
	for _, d := range []digest.Digest{m.amd.Digest, m.att.Digest} {
		if _, ok := fs["blobs/sha256/"+d.Encoded()]; ok {
			t.Errorf("%s of amd64 is in an arm64 bundle", d)
		}
	}
	for _, d := range []digest.Digest{m.arm.Digest, m.sbom.Digest, m.sig.Digest} {
		if _, ok := fs["blobs/sha256/"+d.Encoded()]; !ok {
			t.Errorf("%s is not in the arm64 bundle", d)
		}
	}
	if res.Referrers != 2 {
		t.Errorf("%d referrers, want the SBOM and its signature", res.Referrers)
	}
	w, _ = bundle.NewWriter(io.Discard)
	e = &bundle.Exporter{W: w, Platforms: []v1.Platform{{OS: "linux", Architecture: "s390x"}}}
	if _, err := e.Image(context.Background(), registryRepo(t, reg, "team/app"), n); err == nil || !strings.Contains(err.Error(), "linux/s390x") {
		t.Errorf("no such platform: %v", err)
	}
}

// A blob the registry sends with other bytes fails the export, naming it.
func TestExport_BlobMismatch(t *testing.T) {
	reg := registrytest.New(t)
	img := reg.PushImage(t, "team/app", "v1", 5000)
	reg.Intercept(func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path != "/v2/team/app/blobs/"+img.LayerDigests[0].String() {
			return false
		}
		w.Write(bytes.Repeat([]byte{'x'}, 5000))
		return true
	})
	w, _ := bundle.NewWriter(io.Discard)
	n, _ := bundle.ParseName(reg.Host + "/team/app:v1")
	_, err := (&bundle.Exporter{W: w}).Image(context.Background(), registryRepo(t, reg, "team/app"), n)
	if err == nil || !strings.Contains(err.Error(), img.LayerDigests[0].String()) || !strings.Contains(err.Error(), "do not hash") {
		t.Fatalf("export of a blob with other bytes: %v", err)
	}
	if err := w.Close(); err == nil {
		t.Error("the archive of a failed export could still be closed as complete")
	}
}

func importBytes(t *testing.T, s *cache.Badger, data []byte, o bundle.ImportOptions) (*bundle.ImportResult, error) {
	t.Helper()
	return bundle.Import(context.Background(), bytes.NewReader(data), s, o)
}

// An exported bundle imported into an empty store: the image is served
// under the repository it was exported from, with its tag, every platform
// and blob, its referrers (the index), its fallback tags, and a pin.
func TestImport_RoundTrip(t *testing.T) {
	reg := registrytest.New(t, registrytest.WithReferrersAPI())
	m := pushImage(t, reg, "team/app", "v1")
	data, _ := exportTar(t, reg, nil, reg.Host+"/team/app:v1")
	s := openStore(t)
	res, err := importBytes(t, s, data, bundle.ImportOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Images) != 1 || res.Images[0].Name != reg.Host+"/team/app:v1" || res.Images[0].Digest != m.index.Digest ||
		res.Manifests != 6 || res.Blobs != len(m.blobs) || res.Referrers != 3 || res.Tags != 4 {
		t.Errorf("result %+v", res)
	}
	checkImported(t, s, cache.RepoKey{Upstream: reg.Host, Repo: "team/app"}, m, true)
	// The referrers answers are kept too, as long stale: an offline mirror
	// answers from them, an online one asks again.
	for subject, want := range map[digest.Digest][]digest.Digest{m.index.Digest: {m.sbom.Digest}, m.sig.Digest: {}} {
		a, err := s.GetUpstreamReferrers(context.Background(), cache.ReferrerKey{Upstream: reg.Host, Repo: "team/app", Subject: subject})
		var got []digest.Digest
		for _, d := range a.Descriptors {
			got = append(got, d.Digest)
		}
		if err != nil || len(got) != len(want) || len(want) > 0 && got[0] != want[0] || a.CheckedAt.After(time.Unix(0, 0)) {
			t.Errorf("referrers answer of %s: %+v %v", subject, a, err)
		}
	}

	// Imported again: the same state.
	k := cache.RepoKey{Upstream: reg.Host, Repo: "team/app"}
	before := visible(t, s, k, append(m.manifests(), m.blobs...))
	if _, err := importBytes(t, s, data, bundle.ImportOptions{}); err != nil {
		t.Fatal(err)
	}
	if after := visible(t, s, k, append(m.manifests(), m.blobs...)); after != before {
		t.Errorf("a second import changed the store:\n%s\n---\n%s", before, after)
	}
}

// checkImported checks that repository k holds m: content byte for byte,
// linked with the upstream origin; the tag; the referrers index; the pin;
// the fallback tags when withFallback.
func checkImported(t *testing.T, s *cache.Badger, k cache.RepoKey, m image, withFallback bool) {
	t.Helper()
	ctx := context.Background()
	for _, d := range m.manifests() {
		got, err := s.GetManifest(ctx, d)
		if err != nil || !bytes.Equal(got.Data, m.content[d]) {
			t.Errorf("manifest %s: %v", d, err)
		}
		if o, ok, _ := s.Linked(ctx, k, cache.LinkManifest, d); !ok || o != cache.OriginUpstream {
			t.Errorf("manifest %s is not linked in %v (%v %q)", d, k, ok, o)
		}
	}
	for _, d := range m.blobs {
		r, err := s.OpenBlob(ctx, d)
		if err != nil {
			t.Errorf("blob %s: %v", d, err)
			continue
		}
		got, _ := io.ReadAll(io.NewSectionReader(r, 0, r.Size()))
		r.Close()
		if !bytes.Equal(got, m.content[d]) {
			t.Errorf("blob %s differs", d)
		}
		if _, ok, _ := s.Linked(ctx, k, cache.LinkBlob, d); !ok {
			t.Errorf("blob %s is not linked in %v", d, k)
		}
	}
	if e, err := s.GetTag(ctx, cache.TagKey{Upstream: k.Upstream, Repo: k.Repo, Tag: "v1"}); err != nil || e.Digest != m.index.Digest || e.MediaType != v1.MediaTypeImageIndex || e.Size != m.index.Size {
		t.Errorf("tag v1: %+v %v", e, err)
	}
	for subject, want := range map[digest.Digest]v1.Descriptor{m.index.Digest: m.sbom, m.sbom.Digest: m.sig, m.amd.Digest: m.att} {
		rs, _ := s.ListReferrers(ctx, cache.ReferrerKey{Upstream: k.Upstream, Repo: k.Repo, Subject: subject})
		if len(rs) != 1 || rs[0].Digest != want.Digest || rs[0].ArtifactType != want.ArtifactType || rs[0].Annotations["org.example.kind"] != want.ArtifactType {
			t.Errorf("referrers of %s: %+v, want %s", subject, rs, want.Digest)
		}
		_, err := s.GetTag(ctx, cache.TagKey{Upstream: k.Upstream, Repo: k.Repo, Tag: fallback(subject)})
		if withFallback != (err == nil) {
			t.Errorf("fallback tag of %s: %v", subject, err)
		}
	}
	pins, _ := s.ListPins(ctx)
	if !slices.ContainsFunc(pins, func(p cache.Pin) bool { return p.Repo == k && p.Name == "v1" && p.Digest == m.index.Digest }) {
		t.Errorf("pins %+v", pins)
	}
}

// An incremental bundle holds only what an earlier one lacks. It imports
// onto a store that has the earlier one, and is refused by one that has
// not, naming what is missing.
func TestImport_Incremental(t *testing.T) {
	reg := registrytest.New(t, registrytest.WithReferrersAPI())
	m1 := pushImage(t, reg, "team/app", "v1")
	old, _ := exportTar(t, reg, nil, reg.Host+"/team/app:v1")
	// v2: the same amd64 image, a new arm64 one.
	arm2 := reg.PushImage(t, "team/app", "arm2", 777)
	arm2d := arm2.Descriptor()
	arm2d.Platform = &v1.Platform{OS: "linux", Architecture: "arm64"}
	idx := indexJSON(m1.amd, arm2d)
	v2 := reg.PushManifest(t, "team/app", "v2", v1.MediaTypeImageIndex, idx)

	exclude, err := bundle.ExcludeFrom(bytes.NewReader(old))
	if err != nil {
		t.Fatal(err)
	}
	inc, res := exportTar(t, reg, exclude, reg.Host+"/team/app:v1", reg.Host+"/team/app:v2")
	fs := files(t, inc)
	for d := range m1.content {
		if _, ok := fs["blobs/sha256/"+d.Encoded()]; ok {
			t.Errorf("%s, in the earlier bundle, is in the incremental one", d)
		}
	}
	for _, d := range []digest.Digest{v2, arm2.Digest, arm2.LayerDigests[0], digest.FromBytes(arm2.Config)} {
		if _, ok := fs["blobs/sha256/"+d.Encoded()]; !ok {
			t.Errorf("new %s is not in the incremental bundle", d)
		}
	}
	if res[0].Written != 0 || res[0].Excluded == 0 {
		t.Errorf("v1 again: %+v", res[0])
	}

	fresh := openStore(t)
	_, err = importBytes(t, fresh, inc, bundle.ImportOptions{})
	if !errors.Is(err, bundle.ErrInvalid) || !strings.Contains(err.Error(), "in neither the bundle nor the store") {
		t.Errorf("incremental bundle alone: %v", err)
	}
	k := cache.RepoKey{Upstream: reg.Host, Repo: "team/app"}
	if v := visible(t, fresh, k, append(m1.manifests(), m1.blobs...)); v != "" {
		t.Errorf("a refused import left:\n%s", v)
	}

	s := openStore(t)
	if _, err := importBytes(t, s, old, bundle.ImportOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := importBytes(t, s, inc, bundle.ImportOptions{}); err != nil {
		t.Fatal(err)
	}
	checkImported(t, s, k, m1, true)
	ctx := context.Background()
	if e, err := s.GetTag(ctx, cache.TagKey{Upstream: k.Upstream, Repo: k.Repo, Tag: "v2"}); err != nil || e.Digest != v2 {
		t.Errorf("tag v2: %+v %v", e, err)
	}
	for _, d := range []digest.Digest{arm2.LayerDigests[0], m1.blobs[0]} {
		if _, ok, _ := s.Linked(ctx, k, cache.LinkBlob, d); !ok {
			t.Errorf("blob %s of v2 is not linked", d)
		}
	}
	// The same content held for another upstream only (an earlier bundle
	// of another registry) is not taken for this one on the strength of
	// its digests.
	reg2 := registrytest.New(t, registrytest.WithReferrersAPI())
	for _, d := range m1.blobs {
		reg2.PushBlob(t, "team/app", m1.content[d])
	}
	for _, d := range []digest.Digest{m1.amd.Digest, m1.arm.Digest, m1.index.Digest, m1.sbom.Digest, m1.sig.Digest, m1.att.Digest} {
		mt := v1.MediaTypeImageManifest
		if d == m1.index.Digest {
			mt = v1.MediaTypeImageIndex
		}
		reg2.PushManifest(t, "team/app", d.String(), mt, m1.content[d])
	}
	reg2.PushManifest(t, "team/app", "v1", v1.MediaTypeImageIndex, m1.content[m1.index.Digest])
	elsewhere, _ := exportTar(t, reg2, nil, reg2.Host+"/team/app:v1")
	other := openStore(t)
	if _, err := importBytes(t, other, elsewhere, bundle.ImportOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := importBytes(t, other, inc, bundle.ImportOptions{}); !errors.Is(err, bundle.ErrInvalid) {
		t.Errorf("an incremental bundle took content another upstream's repository holds: %v", err)
	}
}

// One flipped byte anywhere in a blob: the import is refused, naming the
// entry, and the store serves exactly what it did before.
func TestImport_CorruptByte(t *testing.T) {
	reg := registrytest.New(t, registrytest.WithReferrersAPI())
	m := pushImage(t, reg, "team/app", "v1")
	other := reg.PushImage(t, "team/other", "v1", 100)
	data, _ := exportTar(t, reg, nil, reg.Host+"/team/app:v1")
	s := openStore(t)
	prior, _ := exportTar(t, reg, nil, reg.Host+"/team/other:v1")
	if _, err := importBytes(t, s, prior, bundle.ImportOptions{}); err != nil {
		t.Fatal(err)
	}
	k := cache.RepoKey{Upstream: reg.Host, Repo: "team/app"}
	all := append(append(m.manifests(), m.blobs...), other.Digest)
	before := visible(t, s, k, all) + visible(t, s, cache.RepoKey{Upstream: reg.Host, Repo: "team/other"}, all)

	for _, d := range []digest.Digest{m.blobs[1], m.sig.Digest, m.index.Digest} {
		t.Run(d.String(), func(t *testing.T) {
			at := bytes.Index(data, m.content[d])
			if at < 0 {
				t.Fatal("content not found in the archive")
			}
			bad := bytes.Clone(data)
			bad[at+len(m.content[d])/2] ^= 0x20
			_, err := importBytes(t, s, bad, bundle.ImportOptions{})
			if !errors.Is(err, bundle.ErrDigest) || !strings.Contains(err.Error(), `"blobs/sha256/`+d.Encoded()+`"`) {
				t.Fatalf("import of a bundle with a flipped byte in %s: %v", d, err)
			}
			after := visible(t, s, k, all) + visible(t, s, cache.RepoKey{Upstream: reg.Host, Repo: "team/other"}, all)
			if after != before {
				t.Errorf("the refused import changed the store:\n%s\n--- was\n%s", after, before)
			}
		})
	}
}

// A bundle cut short, anywhere: refused, naming where, and nothing of it
// is visible.
func TestImport_Truncated(t *testing.T) {
	reg := registrytest.New(t, registrytest.WithReferrersAPI())
	m := pushImage(t, reg, "team/app", "v1")
	data, _ := exportTar(t, reg, nil, reg.Host+"/team/app:v1")
	k := cache.RepoKey{Upstream: reg.Host, Repo: "team/app"}
	all := append(m.manifests(), m.blobs...)
	// Where index.json's header starts: a cut there ends on an entry's
	// boundary, which tar cannot tell from the end.
	boundary := bytes.Index(data, []byte("index.json\x00"))
	for _, cut := range []int{100, len(data) / 3, 2 * len(data) / 3, boundary} {
		s := openStore(t)
		_, err := importBytes(t, s, data[:cut], bundle.ImportOptions{})
		switch {
		case err == nil:
			t.Errorf("cut at %d of %d: imported", cut, len(data))
		case cut == boundary && !strings.Contains(err.Error(), "no index.json"):
			t.Errorf("cut before index.json: %v", err)
		case cut != boundary && !errors.Is(err, bundle.ErrDamaged):
			t.Errorf("cut at %d of %d: %v", cut, len(data), err)
		}
		if v := visible(t, s, k, all); v != "" {
			t.Errorf("cut at %d: visible after the refusal:\n%s", cut, v)
		}
	}
}

// Layouts other tools write, as they name things: oras (a bare tag, the
// rest untagged), regctl (a bare tag and bare fallback tags), crane
// --annotate-ref (a full name, index.docker.io's), docker save (before
// Docker 25: manifest.json only, a config file and layer.tar files, one a
// symbolic link; since: index.json with containerd's name).
func TestImport_ForeignLayouts(t *testing.T) {
	reg := registrytest.New(t, registrytest.WithReferrersAPI())
	m := pushImage(t, reg, "team/app", "v1")
	ctx := context.Background()
	k := cache.RepoKey{Upstream: "registry.example", Repo: "team/app"}
	plain := func(d v1.Descriptor) v1.Descriptor {
		return v1.Descriptor{MediaType: d.MediaType, Digest: d.Digest, Size: d.Size}
	}

	t.Run("oras", func(t *testing.T) {
		fs := blobFiles(m.content)
		fs["index.json"] = indexJSON(withName(m.index, v1.AnnotationRefName, "v1"), plain(m.amd), plain(m.arm), plain(m.sbom), plain(m.sig), plain(m.att))
		data := layout(t, fs, nil)
		s := openStore(t)
		if _, err := importBytes(t, s, data, bundle.ImportOptions{}); !errors.Is(err, bundle.ErrInvalid) || !strings.Contains(err.Error(), "--repository") {
			t.Fatalf("a bare tag without --repository: %v", err)
		}
		res, err := importBytes(t, s, data, bundle.ImportOptions{Repository: "registry.example/team/app"})
		if err != nil {
			t.Fatal(err)
		}
		if len(res.Images) != 1 || res.Images[0].Name != "registry.example/team/app:v1" {
			t.Errorf("images %+v", res.Images)
		}
		checkImported(t, s, k, m, false)
	})

	t.Run("regctl", func(t *testing.T) {
		fs := blobFiles(m.content)
		entries := []v1.Descriptor{withName(m.index, v1.AnnotationRefName, "v1")}
		for subject, r := range map[digest.Digest]v1.Descriptor{m.index.Digest: m.sbom, m.sbom.Digest: m.sig, m.amd.Digest: m.att} {
			idx := indexJSON(r)
			d := digest.FromBytes(idx)
			fs["blobs/sha256/"+d.Encoded()] = idx
			entries = append(entries, v1.Descriptor{MediaType: v1.MediaTypeImageIndex, Digest: d, Size: int64(len(idx)),
				Annotations: map[string]string{v1.AnnotationRefName: fallback(subject)}})
		}
		fs["index.json"] = indexJSON(entries...)
		s := openStore(t)
		if _, err := importBytes(t, s, layout(t, fs, nil), bundle.ImportOptions{Repository: "registry.example/team/app"}); err != nil {
			t.Fatal(err)
		}
		checkImported(t, s, k, m, true)
	})

	t.Run("crane annotate-ref", func(t *testing.T) {
		fs := blobFiles(m.content)
		fs["index.json"] = indexJSON(withName(m.index, v1.AnnotationRefName, "index.docker.io/library/alpine:3"))
		s := openStore(t)
		res, err := importBytes(t, s, layout(t, fs, nil), bundle.ImportOptions{Upstreams: []string{"docker.io", "ghcr.io"}})
		if err != nil {
			t.Fatal(err)
		}
		if len(res.Images) != 1 || res.Images[0].Name != "docker.io/library/alpine:3" {
			t.Errorf("images %+v", res.Images)
		}
		if e, err := s.GetTag(ctx, cache.TagKey{Upstream: "docker.io", Repo: "library/alpine", Tag: "3"}); err != nil || e.Digest != m.index.Digest {
			t.Errorf("tag: %+v %v", e, err)
		}
		// A registry the mirror does not have is refused, by name.
		_, err = importBytes(t, openStore(t), layout(t, fs, nil), bundle.ImportOptions{Upstreams: []string{"ghcr.io"}})
		if !errors.Is(err, bundle.ErrInvalid) || !strings.Contains(err.Error(), "registry docker.io is not an upstream of this mirror") {
			t.Errorf("a registry not mirrored: %v", err)
		}
	})

	config := []byte(`{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}`)
	configD := digest.FromBytes(config)
	layerTar := layout(t, map[string][]byte{"etc/motd": []byte("hello")}, nil)
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(layout(t, map[string][]byte{"etc/issue": []byte("second")}, nil))
	zw.Close()

	t.Run("docker save", func(t *testing.T) {
		fs := map[string][]byte{
			configD.Encoded() + ".json": config,
			"aaa/layer.tar":             layerTar,
			"bbb/layer.tar":             gz.Bytes(),
			"aaa/VERSION":               []byte("1.0"),
			"manifest.json": []byte(`[{"Config":"` + configD.Encoded() + `.json","RepoTags":["alpine:3.20","team/app:v1"],"Layers":["aaa/layer.tar","bbb/layer.tar"]},` +
				`{"Config":"` + configD.Encoded() + `.json","RepoTags":["registry.example/team/app:v2"],"Layers":["ccc/layer.tar"]}]`),
		}
		s := openStore(t)
		res, err := importBytes(t, s, layout(t, fs, map[string]string{"ccc/layer.tar": "../aaa/layer.tar"}), bundle.ImportOptions{})
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, i := range res.Images {
			names = append(names, i.Name)
		}
		if want := []string{"docker.io/library/alpine:3.20", "docker.io/team/app:v1", "registry.example/team/app:v2"}; !slices.Equal(names, want) {
			t.Errorf("images %v, want %v", names, want)
		}
		e, err := s.GetTag(ctx, cache.TagKey{Upstream: "docker.io", Repo: "library/alpine", Tag: "3.20"})
		if err != nil {
			t.Fatal(err)
		}
		got, _ := s.GetManifest(ctx, e.Digest)
		var man v1.Manifest
		json.Unmarshal(got.Data, &man)
		if man.Config.Digest != configD || len(man.Layers) != 2 ||
			man.Layers[0].Digest != digest.FromBytes(layerTar) || man.Layers[0].MediaType != v1.MediaTypeImageLayer ||
			man.Layers[1].Digest != digest.FromBytes(gz.Bytes()) || man.Layers[1].MediaType != v1.MediaTypeImageLayerGzip {
			t.Errorf("the manifest made of docker save's: %s", got.Data)
		}
		for _, d := range []digest.Digest{configD, man.Layers[0].Digest, man.Layers[1].Digest} {
			if _, ok, _ := s.Linked(ctx, cache.RepoKey{Upstream: "docker.io", Repo: "library/alpine"}, cache.LinkBlob, d); !ok {
				t.Errorf("blob %s is not linked", d)
			}
		}
		e2, err := s.GetTag(ctx, cache.TagKey{Upstream: "registry.example", Repo: "team/app", Tag: "v2"})
		if err != nil {
			t.Fatal(err)
		}
		got, _ = s.GetManifest(ctx, e2.Digest)
		if !strings.Contains(string(got.Data), digest.FromBytes(layerTar).String()) {
			t.Errorf("the layer reached through a link: %s", got.Data)
		}
	})

	t.Run("docker save 25", func(t *testing.T) {
		fs := blobFiles(m.content)
		fs["index.json"] = indexJSON(withName(m.amd, bundle.AnnotationImageName, "docker.io/library/alpine:3.20", v1.AnnotationRefName, "3.20"))
		fs["manifest.json"] = []byte(`[{"Config":"blobs/sha256/x","RepoTags":["alpine:3.20"],"Layers":[]}]`)
		s := openStore(t)
		if _, err := importBytes(t, s, layout(t, fs, nil), bundle.ImportOptions{}); err != nil {
			t.Fatal(err)
		}
		if e, err := s.GetTag(ctx, cache.TagKey{Upstream: "docker.io", Repo: "library/alpine", Tag: "3.20"}); err != nil || e.Digest != m.amd.Digest {
			t.Errorf("tag: %+v %v", e, err)
		}
	})

	t.Run("not a layout", func(t *testing.T) {
		_, err := importBytes(t, openStore(t), layout(t, map[string][]byte{"README": []byte("hi")}, nil), bundle.ImportOptions{})
		if !errors.Is(err, bundle.ErrInvalid) || !strings.Contains(err.Error(), "no index.json") {
			t.Errorf("%v", err)
		}
		_, err = importBytes(t, openStore(t), []byte("not a tar archive at all, just some text of some length.........................."), bundle.ImportOptions{})
		if !errors.Is(err, bundle.ErrDamaged) {
			t.Errorf("%v", err)
		}
	})

	t.Run("blob named under another digest", func(t *testing.T) {
		fs := blobFiles(m.content)
		fs["index.json"] = indexJSON(withName(m.index, v1.AnnotationRefName, "registry.example/team/app:v1"))
		fs["blobs/sha256/"+m.blobs[0].Encoded()] = m.content[m.blobs[1]]
		_, err := importBytes(t, openStore(t), layout(t, fs, nil), bundle.ImportOptions{})
		if !errors.Is(err, bundle.ErrDigest) || !strings.Contains(err.Error(), m.blobs[0].Encoded()) {
			t.Errorf("%v", err)
		}
	})
}

// A gzip-compressed bundle reads as the tar it holds.
func TestImport_Gzip(t *testing.T) {
	reg := registrytest.New(t, registrytest.WithReferrersAPI())
	m := pushImage(t, reg, "team/app", "v1")
	data, _ := exportTar(t, reg, nil, reg.Host+"/team/app:v1")
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(data)
	zw.Close()
	s := openStore(t)
	if _, err := importBytes(t, s, gz.Bytes(), bundle.ImportOptions{}); err != nil {
		t.Fatal(err)
	}
	checkImported(t, s, cache.RepoKey{Upstream: reg.Host, Repo: "team/app"}, m, true)
}

// A name written through a mirror's host prefix (as regctl image export
// names what it pulled through one) is the upstream's, when the host is
// not an upstream and the prefix is.
func TestImport_NameThroughMirror(t *testing.T) {
	reg := registrytest.New(t, registrytest.WithReferrersAPI())
	m := pushImage(t, reg, "team/app", "v1")
	ctx := context.Background()
	for _, tc := range []struct {
		name, upstream, repo string
	}{
		{"mirror.internal:5000/up.test/team/app:v1", "up.test", "team/app"},
		{"mirror.internal:5000/index.docker.io/alpine:v1", "docker.io", "library/alpine"},
		{"up.test/team/app:v1", "up.test", "team/app"},
	} {
		fs := blobFiles(m.content)
		fs["index.json"] = indexJSON(withName(m.index, bundle.AnnotationImageName, tc.name, v1.AnnotationRefName, "v1"))
		s := openStore(t)
		if _, err := importBytes(t, s, layout(t, fs, nil), bundle.ImportOptions{Upstreams: []string{"docker.io", "up.test"}}); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if e, err := s.GetTag(ctx, cache.TagKey{Upstream: tc.upstream, Repo: tc.repo, Tag: "v1"}); err != nil || e.Digest != m.index.Digest {
			t.Errorf("%s: tag of %s/%s: %+v %v", tc.name, tc.upstream, tc.repo, e, err)
		}
	}
	// A host prefix that is no upstream either: refused, by name.
	fs := blobFiles(m.content)
	fs["index.json"] = indexJSON(withName(m.index, bundle.AnnotationImageName, "mirror.internal:5000/team/app:v1"))
	_, err := importBytes(t, openStore(t), layout(t, fs, nil), bundle.ImportOptions{Upstreams: []string{"docker.io", "up.test"}})
	if !errors.Is(err, bundle.ErrInvalid) || !strings.Contains(err.Error(), "registry mirror.internal:5000 is not an upstream") {
		t.Errorf("%v", err)
	}
}
