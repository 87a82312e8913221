package manifest_test

// FuzzParse checks manifest.Parse, (*Manifest).Strict, Infer and
// Descriptor on arbitrary bytes and media types. It never panics, and:
//   - Parse refuses a media type that is not one of the four, more than
//     MaxSize bytes, and anything that is not one JSON object; it is
//     deterministic, and its errors wrap ErrInvalid.
//   - Bytes pass as at most one of the four media types, and Infer names
//     the one they pass as.
//   - On success, read as encoding/json reads them (the last of duplicate
//     names wins, names match case-insensitively): schemaVersion is 2; a
//     mediaType is mt (present for Docker's types); an index has a
//     manifests array and neither config nor layers; an image manifest has
//     a config object with a valid digest and size, layers only as an array
//     or null, and no manifests; Subject is set exactly when the subject is
//     well formed.
//   - Read as any other JSON reader may read them (the first of duplicate
//     names, or names compared exactly), the kind is the same: every
//     schemaVersion is 2, every mediaType is mt or null, an index has no
//     config or layers however written, an image manifest no manifests and
//     a config object under every name for it.
//   - MediaType of mt (as a Content-Type) is "" or a manifest media type
//     that mt spells, whatever its case and parameters.
//   - Strict accepts exactly when every listed descriptor and the subject
//     have a valid digest and a size of at least zero.
//
// Seeds: real manifests in testdata/manifests (from the image-spec, Docker
// Hub, cosign), each tried as every media type, and byte-level oddities in
// testdata/fuzz/FuzzParse.
//
// Run with: go test -run '^$' -fuzz '^FuzzParse$' -fuzztime 45s ./manifest/

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/manifest"
)

var mediaTypes = []string{v1.MediaTypeImageManifest, v1.MediaTypeImageIndex, manifest.MediaTypeDockerManifest, manifest.MediaTypeDockerManifestList}

// validDigest is what go-digest accepts with sha256 and sha512 linked in.
var validDigest = regexp.MustCompile(`^(sha256:[a-f0-9]{64}|sha384:[a-f0-9]{96}|sha512:[a-f0-9]{128})$`)

func wellFormed(d v1.Descriptor) bool {
	return validDigest.MatchString(string(d.Digest)) && d.Size >= 0
}

// member is one name and value of the top-level object, in order.
type member struct {
	name  string
	value json.RawMessage
}

// members reads the top-level object of valid JSON.
func members(t *testing.T, data []byte) []member {
	dec := json.NewDecoder(bytes.NewReader(data))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		t.Fatalf("accepted bytes that do not start an object: %v %v", tok, err)
	}
	var ms []member
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			t.Fatal(err)
		}
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			t.Fatal(err)
		}
		ms = append(ms, member{tok.(string), bytes.TrimSpace(v)})
	}
	return ms
}

// values are the values encoding/json assigns to the field of that name,
// in order: the last one is the one it keeps.
func values(ms []member, field string) []json.RawMessage {
	var vs []json.RawMessage
	for _, m := range ms {
		if strings.EqualFold(m.name, field) {
			vs = append(vs, m.value)
		}
	}
	return vs
}

func last(vs []json.RawMessage) json.RawMessage {
	if len(vs) == 0 {
		return nil
	}
	return vs[len(vs)-1]
}

func isNull(v json.RawMessage) bool { return string(v) == "null" }

// kind is the first byte of a JSON value: '{', '[', '"', 'n', 't', 'f' or
// a number's first character.
func kind(v json.RawMessage) byte {
	if len(v) == 0 {
		return 0
	}
	return v[0]
}

func FuzzParse(f *testing.F) {
	files, err := filepath.Glob("testdata/manifests/*")
	if err != nil || len(files) == 0 {
		f.Fatalf("seed manifests: %v %v", files, err)
	}
	for _, name := range files {
		data, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		for _, mt := range append([]string{"", "text/html"}, mediaTypes...) {
			f.Add(mt, data)
		}
	}
	for _, s := range []string{
		``, `{}`, `null`, `[]`, `2`, `"{}"`, ` {"schemaVersion":2,"config":{}} `,
		`{"schemaVersion":2,"manifests":[]}`, `{"schemaVersion":2,"manifests":null}`,
		`{"schemaVersion":2,"manifests":{}}`, `{"schemaVersion":"2","manifests":[]}`,
		`{"schemaVersion":2.0,"manifests":[]}`, `{"SchemaVersion":2,"Manifests":[]}`,
		`{"schemaVersion":2,"config":{"digest":"sha256:` + strings.Repeat("a", 64) + `","size":1},"layers":null}`,
		`{"schemaVersion":2,"config":{"digest":"sha256:` + strings.Repeat("a", 64) + `","size":-1}}`,
		`{"schemaVersion":2,"config":null}`,
		`{"schemaVersion":2,"manifests":[],"layers":[]}`,
		`{"schemaVersion":2,"manifests":[],"config":null}`,
		`{"schemaVersion":2,"manifests":[{"digest":"sha256:x","size":-1}]}`,
		`{"schemaVersion":2,"manifests":[]} trailing`,
		`{"schemaVersion":2,"manifests":[]}{}`,
	} {
		for _, mt := range mediaTypes {
			f.Add(mt, []byte(s))
		}
	}

	f.Fuzz(func(t *testing.T, mt string, data []byte) {
		m, err := manifest.Parse(mt, data)
		m2, err2 := manifest.Parse(mt, data)
		if !reflect.DeepEqual(m, m2) || (err == nil) != (err2 == nil) || (err != nil && err.Error() != err2.Error()) {
			t.Fatalf("Parse is not deterministic: %+v %v, then %+v %v", m, err, m2, err2)
		}

		// mt as a Content-Type: a manifest media type or "".
		if ct := manifest.MediaType(mt); ct != "" && (!manifest.IsMediaType(ct) || !strings.Contains(strings.ToLower(mt), ct)) {
			t.Fatalf("MediaType(%q) = %q", mt, ct)
		} else if manifest.IsMediaType(mt) && ct != mt {
			t.Fatalf("MediaType(%q) = %q", mt, ct)
		}

		// Exclusivity, and Infer's agreement.
		passed := ""
		for _, typ := range mediaTypes {
			if _, err := manifest.Parse(typ, data); err == nil {
				if passed != "" {
					t.Fatalf("%s passes as %s and as %s", data, passed, typ)
				}
				passed = typ
			}
		}
		inferred := manifest.Infer(data)
		if inferred != "" && !manifest.IsMediaType(inferred) {
			t.Fatalf("Infer = %q, not a manifest media type", inferred)
		}
		if inferred != manifest.Infer(data) {
			t.Fatal("Infer is not deterministic")
		}
		if passed != "" && inferred != passed {
			t.Fatalf("passes as %s, Infer says %q", passed, inferred)
		}

		if err != nil {
			if m != nil || !errors.Is(err, manifest.ErrInvalid) || err.Error() == "" {
				t.Fatalf("Parse failed with %+v, %v", m, err)
			}
			return
		}
		if passed != mt {
			t.Fatalf("passed as %s, which the loop over media types says is %q", mt, passed)
		}
		checkParsed(t, mt, data, m)
	})
}

// checkParsed asserts what a successful Parse promises.
func checkParsed(t *testing.T, mt string, data []byte, m *manifest.Manifest) {
	if !manifest.IsMediaType(mt) || m.MediaType != mt {
		t.Fatalf("accepted as %q with MediaType %q", mt, m.MediaType)
	}
	if len(data) > manifest.MaxSize {
		t.Fatalf("accepted %d bytes", len(data))
	}
	if !json.Valid(data) {
		t.Fatalf("accepted invalid JSON %q", data)
	}
	ms := members(t, data)

	// As encoding/json reads it.
	if v := last(values(ms, "schemaVersion")); string(v) != "2" {
		t.Fatalf("accepted schemaVersion %s", v)
	}
	switch v := last(values(ms, "mediaType")); {
	case v == nil || isNull(v):
		if mt == manifest.MediaTypeDockerManifest || mt == manifest.MediaTypeDockerManifestList {
			t.Fatalf("accepted %s without mediaType", mt)
		}
	default:
		var s string
		if err := json.Unmarshal(v, &s); err != nil || s != mt {
			t.Fatalf("accepted mediaType %s as %s", v, mt)
		}
	}
	if manifest.IsIndex(mt) {
		v := last(values(ms, "manifests"))
		var n []json.RawMessage
		if kind(v) != '[' || json.Unmarshal(v, &n) != nil || m.Manifests == nil || len(m.Manifests) != len(n) {
			t.Fatalf("index with manifests %s read as %d descriptors", v, len(m.Manifests))
		}
		if c := last(values(ms, "config")); (c != nil && !isNull(c)) || m.Config != nil || values(ms, "layers") != nil || m.Layers != nil {
			t.Fatalf("index with config %s layers %s", c, values(ms, "layers"))
		}
	} else {
		c := last(values(ms, "config"))
		if kind(c) != '{' || m.Config == nil || !wellFormed(*m.Config) {
			t.Fatalf("image manifest with config %s read as %+v", c, m.Config)
		}
		if values(ms, "manifests") != nil || m.Manifests != nil {
			t.Fatalf("image manifest with manifests %s", values(ms, "manifests"))
		}
		switch l := last(values(ms, "layers")); {
		case l == nil || isNull(l):
			if m.Layers != nil {
				t.Fatalf("layers %s read as %v", l, m.Layers)
			}
		default:
			var n []json.RawMessage
			if kind(l) != '[' || json.Unmarshal(l, &n) != nil || len(m.Layers) != len(n) {
				t.Fatalf("layers %s read as %d descriptors", l, len(m.Layers))
			}
		}
	}
	// Duplicate objects merge: encoding/json decodes into what the pointer
	// already holds, and null resets it.
	var subject *v1.Descriptor
	for _, s := range values(ms, "subject") {
		if err := json.Unmarshal(s, &subject); err != nil {
			t.Fatalf("accepted subject %s: %v", s, err)
		}
	}
	if wantSubject := subject != nil && wellFormed(*subject); (m.Subject != nil) != wantSubject || (m.Subject != nil && !reflect.DeepEqual(*m.Subject, *subject)) {
		t.Fatalf("subject %+v read as %+v", subject, m.Subject)
	}

	// As any JSON reader may read it.
	for _, v := range values(ms, "schemaVersion") {
		if string(v) != "2" {
			t.Fatalf("ambiguous: accepted with a schemaVersion %s", v)
		}
	}
	for _, v := range values(ms, "mediaType") {
		var s string
		if !isNull(v) && (json.Unmarshal(v, &s) != nil || s != mt) {
			t.Fatalf("ambiguous: accepted as %s with a mediaType %s", mt, v)
		}
	}
	if manifest.IsIndex(mt) {
		for _, v := range values(ms, "config") {
			if !isNull(v) {
				t.Fatalf("ambiguous: an index with a config %s", v)
			}
		}
		for _, v := range values(ms, "manifests") {
			if kind(v) != '[' {
				t.Fatalf("ambiguous: an index with manifests %s", v)
			}
		}
	} else {
		for _, v := range values(ms, "config") {
			if kind(v) != '{' {
				t.Fatalf("ambiguous: an image manifest with a config %s", v)
			}
		}
	}

	// Strict: every descriptor and the subject.
	strictOK := subject == nil || wellFormed(*subject)
	for _, d := range append(append([]v1.Descriptor{}, m.Layers...), m.Manifests...) {
		strictOK = strictOK && wellFormed(d)
	}
	if err := m.Strict(); (err == nil) != strictOK || (err != nil && !errors.Is(err, manifest.ErrInvalid)) {
		t.Fatalf("Strict() = %v, want ok=%v", err, strictOK)
	}

	// Descriptor: the manifest's own type, else a manifest's config type.
	d := digest.FromBytes(data)
	desc := m.Descriptor(d, int64(len(data)))
	wantType := m.ArtifactType
	if wantType == "" && !manifest.IsIndex(mt) {
		wantType = m.Config.MediaType
	}
	if desc.MediaType != mt || desc.Digest != d || desc.Size != int64(len(data)) || desc.ArtifactType != wantType {
		t.Fatalf("Descriptor = %+v", desc)
	}
}
