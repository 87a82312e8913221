package referrers

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
)

func TestFallbackTag(t *testing.T) {
	hex256 := strings.Repeat("ab", 32)
	hex512 := strings.Repeat("cd", 64)
	tests := []struct {
		subject digest.Digest
		want    string
	}{
		{digest.Digest("sha256:" + hex256), "sha256-" + hex256},
		// sha512: the encoded part is cut to 64 characters.
		{digest.Digest("sha512:" + hex512), "sha512-" + hex512[:64]},
		// Characters outside [a-zA-Z0-9._-] become '-'; the algorithm is cut to 32.
		{digest.Digest("sha256+b64u:a/b=c"), "sha256-b64u-a-b-c"},
		{digest.Digest(strings.Repeat("x", 40) + ":abc"), strings.Repeat("x", 32) + "-abc"},
	}
	for _, tc := range tests {
		if got := FallbackTag(tc.subject); got != tc.want {
			t.Errorf("FallbackTag(%s) = %s, want %s", tc.subject, got, tc.want)
		}
	}
}

func TestDescribe(t *testing.T) {
	subj := `{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:` + strings.Repeat("a", 64) + `","size":10}`
	cfg := func(mt string) string {
		return `{"mediaType":"` + mt + `","digest":"sha256:` + strings.Repeat("b", 64) + `","size":2}`
	}
	tests := []struct {
		name, mediaType, body string
		wantType              string
		wantSubject           bool
		wantAnnotations       map[string]string
	}{
		{"artifactType wins", v1.MediaTypeImageManifest,
			`{"schemaVersion":2,"artifactType":"application/x.sbom","config":` + cfg("application/vnd.oci.empty.v1+json") + `,"subject":` + subj + `,"annotations":{"a":"b"}}`,
			"application/x.sbom", true, map[string]string{"a": "b"}},
		{"config media type", v1.MediaTypeImageManifest,
			`{"schemaVersion":2,"config":` + cfg("application/vnd.dev.cosign.artifact.sig.v1+json") + `,"subject":` + subj + `}`,
			"application/vnd.dev.cosign.artifact.sig.v1+json", true, nil},
		{"index without artifactType", v1.MediaTypeImageIndex,
			`{"schemaVersion":2,"manifests":[],"subject":` + subj + `}`, "", true, nil},
		{"index with artifactType", v1.MediaTypeImageIndex,
			`{"schemaVersion":2,"artifactType":"application/x.y","manifests":[]}`, "application/x.y", false, nil},
		{"malformed subject", v1.MediaTypeImageManifest,
			`{"schemaVersion":2,"config":` + cfg("c/d") + `,"subject":{"digest":"nope"}}`, "c/d", false, nil},
		// A Docker manifest cannot be a referrer, whatever it carries.
		{"docker manifest with a subject", "application/vnd.docker.distribution.manifest.v2+json",
			`{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":` + cfg("c/d") + `,"subject":` + subj + `}`, "c/d", false, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := digest.FromString(tc.body)
			desc, subject, err := Describe(d, tc.mediaType, []byte(tc.body))
			if err != nil {
				t.Fatal(err)
			}
			if desc.ArtifactType != tc.wantType || desc.Digest != d || desc.Size != int64(len(tc.body)) || (subject != nil) != tc.wantSubject {
				t.Errorf("got %+v subject %v", desc, subject)
			}
			if desc.MediaType != tc.mediaType || fmt.Sprint(desc.Annotations) != fmt.Sprint(tc.wantAnnotations) {
				t.Errorf("media type %q annotations %v", desc.MediaType, desc.Annotations)
			}
		})
	}
	if _, _, err := Describe("sha256:x", v1.MediaTypeImageManifest, []byte("not json")); err == nil {
		t.Error("not JSON described")
	}
}

func TestMalformed(t *testing.T) {
	good := v1.Descriptor{MediaType: v1.MediaTypeImageManifest, Digest: digest.FromString("x"), Size: 10}
	tests := []struct {
		name string
		edit func(*v1.Descriptor)
		bad  bool
	}{
		{"valid manifest", func(*v1.Descriptor) {}, false},
		{"valid index", func(d *v1.Descriptor) { d.MediaType = v1.MediaTypeImageIndex }, false},
		{"sha512", func(d *v1.Descriptor) { d.Digest = digest.SHA512.FromString("x") }, false},
		{"md5", func(d *v1.Descriptor) { d.Digest = "md5:" + digest.Digest(strings.Repeat("a", 32)) }, true},
		{"bad hex", func(d *v1.Descriptor) { d.Digest = "sha256:xyz" }, true},
		{"upper-case hex", func(d *v1.Descriptor) { d.Digest = digest.Digest(strings.ToUpper(string(d.Digest))) }, true},
		{"empty digest", func(d *v1.Descriptor) { d.Digest = "" }, true},
		{"empty media type", func(d *v1.Descriptor) { d.MediaType = "" }, true},
		{"layer", func(d *v1.Descriptor) { d.MediaType = v1.MediaTypeImageLayer }, true},
		{"docker manifest", func(d *v1.Descriptor) { d.MediaType = "application/vnd.docker.distribution.manifest.v2+json" }, true},
		{"negative size", func(d *v1.Descriptor) { d.Size = -5 }, true},
		{"huge", func(d *v1.Descriptor) { d.Size = 1 << 40 }, true},
	}
	for _, tc := range tests {
		d := good
		tc.edit(&d)
		if got := Malformed(d); (got != "") != tc.bad {
			t.Errorf("%s: Malformed = %q", tc.name, got)
		}
	}
}

func desc(n int) v1.Descriptor {
	return v1.Descriptor{MediaType: v1.MediaTypeImageManifest, Digest: digest.FromString(fmt.Sprint(n)), Size: int64(n), ArtifactType: fmt.Sprintf("type/%d", n%2)}
}

func TestMergeAndFilter(t *testing.T) {
	a, b, c := desc(1), desc(2), desc(3)
	bOther := b
	bOther.Annotations = map[string]string{"from": "second"}
	got := Merge([]v1.Descriptor{b, a}, []v1.Descriptor{bOther, c}, nil)
	if len(got) != 3 || got[0].Digest > got[1].Digest || got[1].Digest > got[2].Digest {
		t.Fatalf("merge: %v", got)
	}
	for _, d := range got {
		if d.Digest == b.Digest && d.Annotations != nil {
			t.Error("the later set replaced the earlier one's descriptor")
		}
	}
	if m := Merge(); m == nil || len(m) != 0 {
		t.Errorf("empty merge: %#v", m)
	}
	f := Filter(got, "type/1")
	if len(f) != 2 || f[0].ArtifactType != "type/1" || f[1].ArtifactType != "type/1" {
		t.Errorf("filter: %v", f)
	}
	if f := Filter(got, "none"); f == nil || len(f) != 0 {
		t.Errorf("filter to nothing: %#v", f)
	}
}

func TestPage(t *testing.T) {
	body, next, err := Page(nil, "", 0)
	if err != nil || next != "" || string(body) != `{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}` {
		t.Fatalf("empty page: %s %q %v", body, next, err)
	}
	var all []v1.Descriptor
	for i := 0; i < 50; i++ {
		d := desc(i)
		d.Annotations = map[string]string{"pad": strings.Repeat("x", 100)}
		all = append(all, d)
	}
	all = Merge(all)
	// With a small limit the pages chain through every descriptor once.
	var seen []digest.Digest
	after := ""
	for pages := 0; ; pages++ {
		body, next, err := Page(all, after, 2000)
		if err != nil {
			t.Fatal(err)
		}
		if len(body) > 2000 {
			t.Fatalf("page of %d bytes", len(body))
		}
		var idx v1.Index
		if err := json.Unmarshal(body, &idx); err != nil || idx.MediaType != v1.MediaTypeImageIndex || idx.SchemaVersion != 2 {
			t.Fatalf("page: %s", body)
		}
		for _, d := range idx.Manifests {
			seen = append(seen, d.Digest)
		}
		if next == "" {
			break
		}
		after = next
		if pages > 50 {
			t.Fatal("pages never end")
		}
	}
	if len(seen) != len(all) {
		t.Fatalf("paged %d of %d", len(seen), len(all))
	}
	for i := range seen {
		if seen[i] != all[i].Digest {
			t.Fatalf("page order differs at %d", i)
		}
	}
	// Everything fits in the default limit: one page.
	if _, next, _ := Page(all, "", 0); next != "" {
		t.Error("paged below the limit")
	}
}

func TestCapabilities(t *testing.T) {
	c := NewCapabilities(time.Hour)
	now := time.Unix(1000, 0)
	if c.Get("r", now) != Unknown {
		t.Fatal("new key is not unknown")
	}
	c.Set("r", Unsupported, now)
	if got := c.Get("r", now.Add(59*time.Minute)); got != Unsupported {
		t.Fatalf("within TTL: %v", got)
	}
	if got := c.Get("r", now.Add(time.Hour)); got != Unknown {
		t.Fatalf("after TTL: %v", got)
	}
	c.Set("r", Supported, now)
	c.Set("r", Unknown, now)
	if got := c.Get("r", now); got != Unknown {
		t.Fatalf("reset: %v", got)
	}
	for i := 0; i < maxCapabilities+10; i++ {
		c.Set(fmt.Sprint(i), Supported, now)
	}
	if len(c.m) > maxCapabilities {
		t.Fatalf("%d states kept", len(c.m))
	}
}
