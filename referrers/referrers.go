// Package referrers holds what ocimirror knows about the OCI referrers API:
// the fallback tag schema, how a manifest is described in a referrers
// answer, how several sources are merged, filtered and paged, and whether
// an upstream repository has the API.
package referrers

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/manifest"
)

// MaxResponse is the largest referrers answer sent in one response; more
// is paged with Link. crane, cosign and containerd never follow Link, so
// everything that fits is sent at once.
const MaxResponse = 4 << 20

// FallbackTag is the tag under which clients keep the referrers of subject
// on a registry without the referrers API (the spec's referrers tag schema):
// <alg>-<encoded>, the algorithm cut to 32 characters and the encoded part
// to 64, characters outside [a-zA-Z0-9._-] replaced by '-'.
func FallbackTag(subject digest.Digest) string {
	alg, enc, _ := strings.Cut(string(subject), ":")
	return clean(alg, 32) + "-" + clean(enc, 64)
}

func clean(s string, limit int) string {
	if len(s) > limit {
		s = s[:limit]
	}
	return strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-' {
			return r
		}
		return '-'
	}, s)
}

// Describe returns the descriptor of manifest dgst (its exact bytes data,
// of media type mediaType) as a referrers answer lists it, and its subject:
// nil when it has none, or when it cannot be a referrer (only OCI image
// manifests and indexes can). The bytes must pass manifest.Parse.
func Describe(dgst digest.Digest, mediaType string, data []byte) (v1.Descriptor, *v1.Descriptor, error) {
	m, err := manifest.Parse(mediaType, data)
	if err != nil {
		return v1.Descriptor{}, nil, err
	}
	d := m.Descriptor(dgst, int64(len(data)))
	if !manifest.Referrer(mediaType) {
		return d, nil, nil
	}
	return d, m.Subject, nil
}

// Subject returns the subject digest of a stored manifest, or "" when it
// has none.
func Subject(mediaType string, data []byte) digest.Digest {
	_, s, err := Describe("", mediaType, data)
	if err != nil || s == nil {
		return ""
	}
	return s.Digest
}

// Merge returns the union of the sets by digest, the first set that names
// a digest winning, ordered by digest so that an answer is the same
// whichever source changed last.
func Merge(sets ...[]v1.Descriptor) []v1.Descriptor {
	seen := map[digest.Digest]bool{}
	out := []v1.Descriptor{}
	for _, set := range sets {
		for _, d := range set {
			if d.Digest == "" || seen[d.Digest] {
				continue
			}
			seen[d.Digest] = true
			out = append(out, d)
		}
	}
	slices.SortFunc(out, func(a, b v1.Descriptor) int { return strings.Compare(string(a.Digest), string(b.Digest)) })
	return out
}

// Filter keeps the descriptors of one artifact type.
func Filter(ds []v1.Descriptor, artifactType string) []v1.Descriptor {
	out := []v1.Descriptor{}
	for _, d := range ds {
		if d.ArtifactType == artifactType {
			out = append(out, d)
		}
	}
	return out
}

// Page encodes the descriptors after `after` (a digest; "" for the first
// page) as a referrers answer of at most MaxResponse bytes. next is the
// digest to continue after when more remain, "" otherwise. ds must be
// ordered by digest, as Merge returns them.
func Page(ds []v1.Descriptor, after string, limit int) (body []byte, next string, err error) {
	if limit <= 0 {
		limit = MaxResponse
	}
	if after != "" {
		i, _ := slices.BinarySearchFunc(ds, after, func(d v1.Descriptor, t string) int { return strings.Compare(string(d.Digest), t) })
		for i < len(ds) && string(ds[i].Digest) <= after {
			i++
		}
		ds = ds[i:]
	}
	body, err = encode(ds)
	if err != nil || len(body) <= limit {
		return body, "", err
	}
	// Too big: keep as many entries as fit.
	size := len(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}`)
	n := 0
	for ; n < len(ds); n++ {
		b, err := json.Marshal(ds[n])
		if err != nil {
			return nil, "", err
		}
		add := len(b)
		if n > 0 {
			add++ // the comma before it
		}
		if size+add > limit {
			break
		}
		size += add
	}
	if n == 0 {
		return nil, "", fmt.Errorf("referrers: one descriptor is larger than %d bytes", limit)
	}
	body, err = encode(ds[:n])
	return body, string(ds[n-1].Digest), err
}

func encode(ds []v1.Descriptor) ([]byte, error) {
	if ds == nil {
		ds = []v1.Descriptor{}
	}
	return json.Marshal(v1.Index{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: v1.MediaTypeImageIndex,
		Manifests: ds,
	})
}

// ParseIndex reads the descriptors of an image index (a referrers answer
// or a fallback tag index) as the upstream wrote them: each is only a
// candidate, to be checked before it is listed.
func ParseIndex(data []byte) ([]v1.Descriptor, error) {
	// JSON null decodes into a struct without error: it is no index.
	if t := bytes.TrimLeft(data, " \t\r\n"); len(t) == 0 || t[0] != '{' {
		return nil, fmt.Errorf("%w: not a JSON object", ErrNotIndex)
	}
	var idx struct {
		MediaType string          `json:"mediaType"`
		Manifests []v1.Descriptor `json:"manifests"`
	}
	if err := json.Unmarshal(data, &idx); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNotIndex, err)
	}
	if idx.MediaType != "" && idx.MediaType != v1.MediaTypeImageIndex {
		return nil, fmt.Errorf("%w: media type %s is not an index", ErrNotIndex, idx.MediaType)
	}
	return idx.Manifests, nil
}

// ErrNotIndex is returned for bytes that are not an image index.
var ErrNotIndex = errors.New("referrers: not an image index")

// Malformed says why a candidate descriptor cannot name a referrer, without
// fetching it: a digest that is not sha256 or sha512 in canonical form, a
// media type other than an OCI image manifest's or index's, a negative
// size, or one larger than any manifest. "" when it may.
func Malformed(d v1.Descriptor) string {
	alg, hex, _ := strings.Cut(string(d.Digest), ":")
	want := map[string]int{"sha256": 64, "sha512": 128}[alg]
	switch {
	case want == 0 || len(hex) != want || strings.Trim(hex, "0123456789abcdef") != "":
		return "invalid digest"
	case !manifest.Referrer(d.MediaType):
		return "not a manifest media type"
	case d.Size < 0:
		return "negative size"
	case d.Size > manifest.MaxSize:
		return "larger than a manifest"
	}
	return ""
}
