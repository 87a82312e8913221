package referrers

// Fuzz targets for what an upstream's referrers answers and fallback tag
// indexes can make of a referrers response.
//
//   - FuzzParseIndex: ParseIndex accepts only a JSON object whose mediaType
//     is absent or the OCI index type, and returns its manifests; errors
//     wrap ErrNotIndex.
//   - FuzzReferrers: descriptor sets (an index, or lines of the input) go
//     through Merge, Filter and Page as the referrers handler uses them.
//     Merge is sorted by digest without duplicates, holds every non-empty
//     input digest, and keeps the first set's descriptor; Filter keeps
//     exactly the descriptors of its artifact type, in order; Page, chained
//     through next, covers the list once in order, each page a valid OCI
//     index of at most the limit holding as many descriptors as fit, and
//     fails only when not even one fits.
//   - FuzzMalformed: Malformed is "" exactly when the digest is sha256 or
//     sha512 in lower-case hex of its length, the media type an OCI image
//     manifest's or index's, and the size within 0 and manifest.MaxSize.
//   - FuzzFallbackTag: the tag is <alg>-<encoded> with the algorithm cut to
//     32 bytes, the encoded part to 64, other characters replaced by '-';
//     for a sha256 or sha512 digest it is a valid tag.
//
// Run one with: go test -run '^$' -fuzz '^FuzzReferrers$' -fuzztime 45s ./referrers/

import (
	"bytes"
	"encoding/json"
	"errors"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/manifest"
)

const (
	hex64  = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	hex128 = hex64 + hex64
)

var (
	referrerDigest = regexp.MustCompile(`^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$`)
	tagRE          = regexp.MustCompile(`^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$`)
)

// realIndex is a referrers answer as registries send them.
const realIndex = `{
  "schemaVersion": 2,
  "mediaType": "application/vnd.oci.image.index.v1+json",
  "manifests": [
    {
      "mediaType": "application/vnd.oci.image.manifest.v1+json",
      "digest": "sha256:a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1",
      "size": 1234,
      "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json",
      "annotations": {"dev.cosignproject.cosign/signature": "MEUCIQ..."}
    },
    {
      "mediaType": "application/vnd.oci.image.manifest.v1+json",
      "digest": "sha256:b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2",
      "size": 1024,
      "artifactType": "application/spdx+json",
      "annotations": {"org.opencontainers.image.created": "2025-01-01T00:00:00Z"}
    },
    {
      "mediaType": "application/vnd.oci.image.index.v1+json",
      "digest": "sha512:` + hex128 + `",
      "size": 99,
      "artifactType": "application/vnd.in-toto+json"
    }
  ]
}`

func FuzzParseIndex(f *testing.F) {
	for _, s := range []string{
		realIndex, `{}`, `{"manifests":[]}`, `{"manifests":null}`, `{"mediaType":"application/vnd.oci.image.manifest.v1+json","manifests":[]}`,
		`{"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[]}`,
		`{"MediaType":"application/vnd.oci.image.index.v1+json","Manifests":[{"digest":"sha256:x"}]}`,
		`null`, ` null `, `[]`, `""`, `0`, ``, `{"manifests":{}}`, `{"manifests":[1]}`, `<html></html>`,
		`{"manifests":[{"size":1.5}]}`, `{"manifests":[{"digest":"a"}],"manifests":[]}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		ds, err := ParseIndex(data)
		ds2, err2 := ParseIndex(data)
		if !reflect.DeepEqual(ds, ds2) || (err == nil) != (err2 == nil) {
			t.Fatal("ParseIndex is not deterministic")
		}
		if err != nil {
			if ds != nil || !errors.Is(err, ErrNotIndex) {
				t.Fatalf("ParseIndex failed with %v, %v", ds, err)
			}
			return
		}
		if b := bytes.TrimLeft(data, " \t\r\n"); len(b) == 0 || b[0] != '{' {
			t.Fatalf("ParseIndex accepted %q, which is not a JSON object", data)
		}
		var idx struct {
			MediaType *string           `json:"mediaType"`
			Manifests []json.RawMessage `json:"manifests"`
		}
		if err := json.Unmarshal(data, &idx); err != nil {
			t.Fatalf("accepted %q: %v", data, err)
		}
		if idx.MediaType != nil && *idx.MediaType != "" && *idx.MediaType != v1.MediaTypeImageIndex {
			t.Fatalf("accepted media type %q", *idx.MediaType)
		}
		if len(ds) != len(idx.Manifests) {
			t.Fatalf("%d descriptors from %d manifests", len(ds), len(idx.Manifests))
		}
	})
}

var artifactTypes = []string{"", "application/vnd.dev.cosign.artifact.sig.v1+json", "application/spdx+json", "application/vnd.in-toto+json"}

// descriptorsOf reads data as an index, or else makes a descriptor of each
// line: its first byte picks the digest's form (written as is, or one of
// few, so that sets share digests) and the artifact type; the line is kept
// as an annotation, so that two descriptors of one digest differ.
func descriptorsOf(data []byte) []v1.Descriptor {
	if ds, err := ParseIndex(data); err == nil {
		return ds
	}
	var ds []v1.Descriptor
	for _, line := range bytes.Split(data, []byte("\n")) {
		d := v1.Descriptor{MediaType: v1.MediaTypeImageManifest, Size: int64(len(line))}
		if len(line) > 0 {
			switch c := line[0]; {
			case c%4 == 0:
				d.Digest = digest.Digest(line[1:])
			default:
				d.Digest = digest.FromBytes(line[1:min(len(line), 2)])
			}
			d.ArtifactType = artifactTypes[line[0]/4%4]
			d.Annotations = map[string]string{"line": string(line)}
		}
		ds = append(ds, d)
	}
	return ds
}

// emptyIndex is the length of a page without descriptors.
var emptyIndex = len(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}`)

func FuzzReferrers(f *testing.F) {
	f.Add([]byte(realIndex), uint8(0), "", "", uint16(0))
	f.Add([]byte(realIndex), uint8(0), "application/spdx+json", "", uint16(0))
	f.Add([]byte(realIndex), uint8(0), "", "", uint16(400))
	f.Add([]byte(realIndex), uint8(0), "", "sha256:b", uint16(100))
	f.Add([]byte(realIndex), uint8(0), "", "", uint16(50))
	f.Add([]byte("a\nb\nc\nd\ne\nf\ng\nh\n"), uint8(2), "", "", uint16(300))
	f.Add([]byte("\x00x\n\x01x\n\x02x\n\x04y\n\x05y\n\x00\n\n"), uint8(3), artifactTypes[1], "", uint16(250))
	f.Add([]byte("\x00sha256:"+hex64+"\n\x00sha256:"+hex64+"\n\x04sha512:"+hex128), uint8(1), "", "sha256:", uint16(200))
	f.Add([]byte{}, uint8(0), "", "", uint16(0))
	f.Add([]byte{}, uint8(0), "", "", uint16(10))
	f.Add([]byte(`{"manifests":[{"digest":"b"},{"digest":"a"},{"digest":"b"},{"digest":""}]}`), uint8(1), "", "a", uint16(0))
	f.Fuzz(func(t *testing.T, data []byte, nsets uint8, artifactType, after string, limit uint16) {
		all := descriptorsOf(data)
		sets := make([][]v1.Descriptor, int(nsets%4)+1)
		for i, d := range all {
			sets[i%len(sets)] = append(sets[i%len(sets)], d)
		}

		// Merge.
		merged := Merge(sets...)
		if merged == nil {
			t.Fatal("Merge returned nil")
		}
		first := map[digest.Digest]v1.Descriptor{}
		for _, set := range sets {
			for _, d := range set {
				if _, ok := first[d.Digest]; !ok && d.Digest != "" {
					first[d.Digest] = d
				}
			}
		}
		if len(merged) != len(first) {
			t.Fatalf("Merge kept %d of %d digests", len(merged), len(first))
		}
		for i, d := range merged {
			if i > 0 && merged[i-1].Digest >= d.Digest {
				t.Fatalf("Merge out of order or duplicated at %d: %q, %q", i, merged[i-1].Digest, d.Digest)
			}
			if want, ok := first[d.Digest]; !ok || !reflect.DeepEqual(d, want) {
				t.Fatalf("Merge kept %+v for %q, the first set names %+v", d, d.Digest, want)
			}
		}

		// Filter.
		ds := merged
		if artifactType != "" {
			ds = Filter(merged, artifactType)
			if ds == nil {
				t.Fatal("Filter returned nil")
			}
			j := 0
			for _, d := range merged {
				if d.ArtifactType == artifactType {
					if j >= len(ds) || !reflect.DeepEqual(ds[j], d) {
						t.Fatalf("Filter lost or reordered %q", d.Digest)
					}
					j++
				}
			}
			if j != len(ds) {
				t.Fatalf("Filter kept %d of %d", len(ds), j)
			}
		}

		// Page, chained from the start and from a fuzzed cursor.
		max := int(limit)
		if max == 0 {
			max = MaxResponse
		}
		lens := make([]int, len(ds))
		for i, d := range ds {
			b, err := json.Marshal(d)
			if err != nil {
				t.Fatal(err)
			}
			lens[i] = len(b)
		}
		// page checks one page of ds[from:] and returns how many it held.
		page := func(cursor string, from int) (int, string) {
			body, next, err := Page(ds, cursor, int(limit))
			// fit is how many of the remaining descriptors fit in a page.
			fit, size := 0, emptyIndex
			for ; from+fit < len(ds); fit++ {
				add := lens[from+fit]
				if fit > 0 {
					add++ // comma
				}
				if size+add > max {
					break
				}
				size += add
			}
			if wantErr := size > max || (fit == 0 && from < len(ds)); (err != nil) != wantErr {
				t.Fatalf("Page(after %q, limit %d) with %d of %d descriptors fitting: error %v, want error %v", cursor, limit, fit, len(ds)-from, err, wantErr)
			}
			if err != nil {
				return -1, ""
			}
			if len(body) > max {
				t.Fatalf("Page(after %q, limit %d): %d bytes", cursor, limit, len(body))
			}
			want, err := json.Marshal(v1.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageIndex, Manifests: append([]v1.Descriptor{}, ds[from:from+fit]...)})
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(body, want) {
				t.Fatalf("Page(after %q, limit %d) = %s, want %d descriptors: %s", cursor, limit, body, fit, want)
			}
			var idx v1.Index
			if err := json.Unmarshal(body, &idx); err != nil || idx.SchemaVersion != 2 || idx.MediaType != v1.MediaTypeImageIndex || idx.Manifests == nil {
				t.Fatalf("page is not an OCI index: %s (%v)", body, err)
			}
			wantNext := ""
			if from+fit < len(ds) {
				wantNext = string(ds[from+fit-1].Digest)
			}
			if next != wantNext {
				t.Fatalf("Page(after %q, limit %d): next %q, want %q", cursor, limit, next, wantNext)
			}
			return fit, next
		}
		cursor, from := "", 0
		for pages := 0; ; pages++ {
			if pages > len(ds)+1 {
				t.Fatal("pages never end")
			}
			n, next := page(cursor, from)
			if n < 0 {
				break
			}
			from += n
			if next == "" {
				if from != len(ds) {
					t.Fatalf("pages ended after %d of %d", from, len(ds))
				}
				break
			}
			cursor = next
		}
		start := 0
		if after != "" {
			for start < len(ds) && string(ds[start].Digest) <= after {
				start++
			}
		}
		page(after, start)
	})
}

func FuzzMalformed(f *testing.F) {
	for _, s := range []struct {
		digest, mediaType string
		size              int64
	}{
		{"sha256:" + hex64, v1.MediaTypeImageManifest, 10},
		{"sha512:" + hex128, v1.MediaTypeImageIndex, 0},
		{"sha256:" + hex64, v1.MediaTypeImageManifest, manifest.MaxSize},
		{"sha256:" + hex64, v1.MediaTypeImageManifest, manifest.MaxSize + 1},
		{"sha256:" + hex64, v1.MediaTypeImageManifest, -1},
		{"sha256:" + hex64, v1.MediaTypeImageLayerGzip, 10},
		{"sha256:" + hex64, manifest.MediaTypeDockerManifest, 10},
		{"sha256:" + hex64, "", 10},
		{"sha384:" + hex128[:96], v1.MediaTypeImageManifest, 10},
		{"sha256:" + strings.ToUpper(hex64), v1.MediaTypeImageManifest, 10},
		{"sha256:" + hex64[:63] + "g", v1.MediaTypeImageManifest, 10},
		{"sha256:g" + hex64[:63], v1.MediaTypeImageManifest, 10},
		{"sha256:" + hex64[:31] + "-" + hex64[:32], v1.MediaTypeImageManifest, 10},
		{"sha256:" + hex64[:62] + "é", v1.MediaTypeImageManifest, 10},
		{"sha256:" + hex128[:64], v1.MediaTypeImageManifest, 10},
		{"sha512:" + hex64, v1.MediaTypeImageManifest, 10},
		{"md5:d41d8cd98f00b204e9800998ecf8427e", v1.MediaTypeImageManifest, 10},
		{"", v1.MediaTypeImageManifest, 10},
		{":" + hex64, v1.MediaTypeImageManifest, 10},
	} {
		f.Add(s.digest, s.mediaType, s.size)
	}
	f.Fuzz(func(t *testing.T, dgst, mediaType string, size int64) {
		d := v1.Descriptor{Digest: digest.Digest(dgst), MediaType: mediaType, Size: size}
		why := Malformed(d)
		ok := referrerDigest.MatchString(dgst) &&
			(mediaType == v1.MediaTypeImageManifest || mediaType == v1.MediaTypeImageIndex) &&
			size >= 0 && size <= manifest.MaxSize
		if (why == "") != ok {
			t.Fatalf("Malformed(%q, %q, %d) = %q, want ok=%v", dgst, mediaType, size, why, ok)
		}
		if why == "" {
			if err := d.Digest.Validate(); err != nil {
				t.Fatalf("Malformed passed %q, which go-digest refuses: %v", dgst, err)
			}
		}
		switch why {
		case "", "invalid digest", "not a manifest media type", "negative size", "larger than a manifest":
		default:
			t.Fatalf("Malformed(%+v) = %q", d, why)
		}
	})
}

func FuzzFallbackTag(f *testing.F) {
	for _, s := range []string{
		"sha256:" + hex64, "sha512:" + hex128, "sha256+b64u:a/b=c", strings.Repeat("x", 40) + ":abc",
		"", ":", "sha256", "sha256:", "a:b:c", "sha256:" + strings.Repeat("é", 40), strings.Repeat("é", 20) + ":x",
		"\xff\xfe:\x00", "sha256:" + hex64 + "\n",
	} {
		f.Add(s)
	}
	allowed := func(r rune) bool {
		return r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-'
	}
	f.Fuzz(func(t *testing.T, subject string) {
		tag := FallbackTag(digest.Digest(subject))
		if tag != FallbackTag(digest.Digest(subject)) {
			t.Fatal("FallbackTag is not deterministic")
		}
		if strings.IndexFunc(tag, func(r rune) bool { return !allowed(r) }) >= 0 || !utf8.ValidString(tag) {
			t.Fatalf("FallbackTag(%q) = %q: characters outside [a-zA-Z0-9._-]", subject, tag)
		}
		alg, enc, _ := strings.Cut(subject, ":")
		a, e := alg[:min(len(alg), 32)], enc[:min(len(enc), 64)]
		if len(tag) != utf8.RuneCountInString(a)+1+utf8.RuneCountInString(e) {
			t.Fatalf("FallbackTag(%q) = %q: %d bytes, want one per character of %q-%q", subject, tag, len(tag), a, e)
		}
		// Character by character: kept, or replaced by '-'.
		want := []rune(a + "-" + e)
		for i, r := range tag {
			if w := want[i]; r != w && !(r == '-' && !allowed(w)) {
				t.Fatalf("FallbackTag(%q) = %q: %q at %d, want %q", subject, tag, r, i, w)
			}
		}
		if referrerDigest.MatchString(subject) {
			if tag != alg+"-"+enc[:64] || !tagRE.MatchString(tag) {
				t.Fatalf("FallbackTag(%q) = %q, not a valid tag", subject, tag)
			}
		}
	})
}
