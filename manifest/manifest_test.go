package manifest

import (
	"errors"
	"strings"
	"testing"

	v1 "github.com/opencontainers/image-spec/specs-go/v1"
)

const dg = "sha256:" + "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

func desc(mt string) string { return `{"mediaType":"` + mt + `","digest":"` + dg + `","size":2}` }

func TestParse(t *testing.T) {
	img := `{"schemaVersion":2,"mediaType":"` + v1.MediaTypeImageManifest + `","config":` + desc(v1.MediaTypeImageConfig) + `,"layers":[` + desc(v1.MediaTypeImageLayerGzip) + `]}`
	idx := `{"schemaVersion":2,"mediaType":"` + v1.MediaTypeImageIndex + `","manifests":[` + desc(v1.MediaTypeImageManifest) + `]}`
	tests := []struct {
		name, mt, body string
		ok             bool
	}{
		{"OCI image", v1.MediaTypeImageManifest, img, true},
		{"OCI image without mediaType", v1.MediaTypeImageManifest, strings.Replace(img, `"mediaType":"`+v1.MediaTypeImageManifest+`",`, "", 1), true},
		{"OCI image without layers (an artifact)", v1.MediaTypeImageManifest, `{"schemaVersion":2,"config":` + desc(v1.MediaTypeEmptyJSON) + `}`, true},
		{"OCI index", v1.MediaTypeImageIndex, idx, true},
		{"empty index", v1.MediaTypeImageIndex, `{"schemaVersion":2,"manifests":[]}`, true},
		{"Docker manifest", MediaTypeDockerManifest, `{"schemaVersion":2,"mediaType":"` + MediaTypeDockerManifest + `","config":` + desc("application/vnd.docker.container.image.v1+json") + `,"layers":[]}`, true},
		{"Docker list", MediaTypeDockerManifestList, `{"schemaVersion":2,"mediaType":"` + MediaTypeDockerManifestList + `","manifests":[]}`, true},
		{"odd layer kept (an upstream's image)", v1.MediaTypeImageManifest, strings.Replace(img, dg+`","size":2}]`, `md5:00","size":-1}]`, 1), true},

		{"not a manifest type", "text/html", img, false},
		{"HTML", v1.MediaTypeImageManifest, "<html></html>", false},
		{"JSON array", v1.MediaTypeImageManifest, `[]`, false},
		{"schemaVersion 1", v1.MediaTypeImageManifest, strings.Replace(img, `"schemaVersion":2`, `"schemaVersion":1`, 1), false},
		{"no schemaVersion", v1.MediaTypeImageIndex, `{"manifests":[]}`, false},
		{"mediaType differs", v1.MediaTypeImageIndex, img, false},
		{"index without manifests", v1.MediaTypeImageIndex, `{"schemaVersion":2}`, false},
		{"null manifests", v1.MediaTypeImageIndex, `{"schemaVersion":2,"manifests":null}`, false},
		{"image without config", v1.MediaTypeImageManifest, `{"schemaVersion":2,"layers":[]}`, false},
		{"config with a bad digest", v1.MediaTypeImageManifest, `{"schemaVersion":2,"config":{"mediaType":"a/b","digest":"sha256:zz","size":2}}`, false},
		{"ambiguous image", v1.MediaTypeImageManifest, strings.Replace(img, `"layers"`, `"manifests":[],"layers"`, 1), false},
		{"ambiguous index", v1.MediaTypeImageIndex, strings.Replace(idx, `"manifests"`, `"layers":[],"manifests"`, 1), false},
		{"Docker without mediaType", MediaTypeDockerManifestList, `{"schemaVersion":2,"manifests":[]}`, false},
		{"too big", v1.MediaTypeImageIndex, `{"schemaVersion":2,"manifests":[],"x":"` + strings.Repeat("x", MaxSize) + `"}`, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m, err := Parse(tc.mt, []byte(tc.body))
			if (err == nil) != tc.ok {
				t.Fatalf("err %v, want ok=%v", err, tc.ok)
			}
			if err != nil && !errors.Is(err, ErrInvalid) {
				t.Fatalf("error %v is not ErrInvalid", err)
			}
			if err == nil && m.MediaType != tc.mt {
				t.Fatalf("media type %q", m.MediaType)
			}
		})
	}
}

func TestStrictAndSubject(t *testing.T) {
	base := `{"schemaVersion":2,"config":` + desc(v1.MediaTypeEmptyJSON)
	good, err := Parse(v1.MediaTypeImageManifest, []byte(base+`,"subject":`+desc(v1.MediaTypeImageManifest)+`}`))
	if err != nil || good.Strict() != nil || good.Subject == nil || string(good.Subject.Digest) != dg {
		t.Fatalf("good subject: %v %+v", err, good)
	}
	for _, body := range []string{
		base + `,"subject":{"mediaType":"a/b","digest":"sha256:zz","size":2}}`,
		base + `,"layers":[{"mediaType":"a/b","digest":"md5:00","size":1}]}`,
		base + `,"layers":[{"mediaType":"a/b","digest":"` + dg + `","size":-1}]}`,
	} {
		m, err := Parse(v1.MediaTypeImageManifest, []byte(body))
		if err != nil {
			t.Fatalf("%s: %v", body, err)
		}
		if m.Strict() == nil {
			t.Errorf("Strict accepts %s", body)
		}
		if m.Subject != nil && m.Subject.Digest.Validate() != nil {
			t.Errorf("a malformed subject is kept: %s", body)
		}
	}
}

func TestInferAndDescriptor(t *testing.T) {
	for body, want := range map[string]string{
		`{"mediaType":"` + MediaTypeDockerManifest + `"}`: MediaTypeDockerManifest,
		`{"manifests":[]}`:          v1.MediaTypeImageIndex,
		`{"config":{}}`:             v1.MediaTypeImageManifest,
		`{"mediaType":"text/html"}`: "",
		`{}`:                        "",
		`nope`:                      "",
	} {
		if got := Infer([]byte(body)); got != want {
			t.Errorf("Infer(%s) = %q, want %q", body, got, want)
		}
	}
	m, _ := Parse(v1.MediaTypeImageManifest, []byte(`{"schemaVersion":2,"config":`+desc("application/x.sig")+`,"annotations":{"a":"b"}}`))
	d := m.Descriptor(dg, 42)
	if d.ArtifactType != "application/x.sig" || d.Size != 42 || d.Annotations["a"] != "b" || d.MediaType != v1.MediaTypeImageManifest {
		t.Fatalf("descriptor %+v", d)
	}
}
