// Package manifest decides whether bytes are a manifest of the media type
// they claim: the check every manifest passes before ocimirror stores it,
// whether an upstream sent it or a client pushed it. It reads manifests and
// never re-encodes them: the digest is the hash of the exact bytes.
package manifest

import (
	"bytes"
	_ "crypto/sha256" // digest.Validate needs the algorithms linked in
	_ "crypto/sha512"
	"encoding/json"
	"errors"
	"fmt"
	"mime"
	"strings"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
)

// Docker's media types, which image-spec does not define.
const (
	MediaTypeDockerManifest     = "application/vnd.docker.distribution.manifest.v2+json"
	MediaTypeDockerManifestList = "application/vnd.docker.distribution.manifest.list.v2+json"
)

// MaxSize is the largest manifest ocimirror accepts, from an upstream or a
// client (oras and regclient use the same limit).
const MaxSize = 4 << 20

// ErrInvalid is returned for bytes that are not a manifest of the claimed
// media type.
var ErrInvalid = errors.New("manifest invalid")

// IsMediaType reports whether mt is one of the manifest media types
// ocimirror stores: OCI image manifest and index, Docker manifest v2 and
// manifest list. (Docker schema 1 is not: its signed form cannot be
// verified by digest.)
func IsMediaType(mt string) bool {
	switch mt {
	case v1.MediaTypeImageManifest, v1.MediaTypeImageIndex, MediaTypeDockerManifest, MediaTypeDockerManifestList:
		return true
	}
	return false
}

// IsIndex reports whether mt is an index media type.
func IsIndex(mt string) bool {
	return mt == v1.MediaTypeImageIndex || mt == MediaTypeDockerManifestList
}

// MediaType returns the media type of a Content-Type header value, without
// parameters; "" when it is not a manifest media type.
func MediaType(contentType string) string {
	mt, _, err := mime.ParseMediaType(contentType)
	if err != nil || !IsMediaType(mt) {
		return ""
	}
	return mt
}

// Infer returns the media type a manifest without a Content-Type declares:
// its mediaType field when that is a manifest media type, else an OCI index
// when it lists manifests, an OCI image manifest when it has a config; ""
// when none of these.
func Infer(data []byte) string {
	var probe struct {
		MediaType string          `json:"mediaType"`
		Manifests json.RawMessage `json:"manifests"`
		Config    json.RawMessage `json:"config"`
	}
	if json.Unmarshal(data, &probe) != nil {
		return ""
	}
	switch {
	case probe.MediaType != "":
		if IsMediaType(probe.MediaType) {
			return probe.MediaType
		}
		return ""
	case probe.Manifests != nil:
		return v1.MediaTypeImageIndex
	case probe.Config != nil:
		return v1.MediaTypeImageManifest
	}
	return ""
}

// Manifest is what ocimirror reads from a checked manifest.
type Manifest struct {
	// MediaType is the media type it was checked as.
	MediaType    string
	ArtifactType string
	Config       *v1.Descriptor
	Layers       []v1.Descriptor
	Manifests    []v1.Descriptor
	// Subject is the manifest's subject when it is well formed (see Strict).
	Subject     *v1.Descriptor
	Annotations map[string]string

	rawSubject *v1.Descriptor
}

// raw are the fields read. Pointers and RawMessage tell absent from empty.
type raw struct {
	SchemaVersion *int              `json:"schemaVersion"`
	MediaType     *string           `json:"mediaType"`
	ArtifactType  string            `json:"artifactType"`
	Config        *v1.Descriptor    `json:"config"`
	Layers        json.RawMessage   `json:"layers"`
	Manifests     json.RawMessage   `json:"manifests"`
	Subject       *v1.Descriptor    `json:"subject"`
	Annotations   map[string]string `json:"annotations"`
}

// fields are the names of raw's fields.
var fields = []string{"schemaVersion", "mediaType", "artifactType", "config", "layers", "manifests", "subject", "annotations"}

// duplicateField returns a field of raw that the JSON object data (valid
// JSON) names more than once, "" when none is. encoding/json matches names
// case-insensitively and keeps the last value (merging objects, and
// leaving a string as it was for null), other readers keep the first or
// compare names exactly: with a name given twice, readers disagree on what
// the manifest is, even on whether it is an index.
func duplicateField(data []byte) string {
	dec := json.NewDecoder(bytes.NewReader(data))
	if _, err := dec.Token(); err != nil {
		return ""
	}
	seen := make([]bool, len(fields))
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return ""
		}
		name, _ := tok.(string)
		for i, f := range fields {
			if strings.EqualFold(name, f) {
				if seen[i] {
					return f
				}
				seen[i] = true
			}
		}
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			return ""
		}
	}
	return ""
}

// Parse checks that data is a manifest of media type mt and reads it:
// a JSON object with schemaVersion 2; a mediaType field, where present,
// equal to mt (required for Docker's types); the fields of its kind (an
// index's manifests, an image manifest's config with a valid digest), and
// not the other kind's (an ambiguous manifest is refused, as the OCI
// advisory GHSA-77vh-xpmg-72qh asks). For the same reason none of these
// fields may be given twice, whatever the case of its name: JSON readers
// differ on which one counts.
//
// The descriptors an index or manifest lists are the upstream's business
// and are not judged here: a mirror keeps an image it cannot fully read.
// Whoever uses a descriptor checks it (Strict does for pushes). A subject
// that is not well formed is no subject.
func Parse(mt string, data []byte) (*Manifest, error) {
	if !IsMediaType(mt) {
		return nil, fmt.Errorf("%w: %q is not a manifest media type", ErrInvalid, mt)
	}
	if len(data) > MaxSize {
		return nil, fmt.Errorf("%w: larger than %d bytes", ErrInvalid, MaxSize)
	}
	if t := bytes.TrimLeft(data, " \t\r\n"); len(t) == 0 || t[0] != '{' {
		return nil, fmt.Errorf("%w: not a JSON object", ErrInvalid)
	}
	var r raw
	if err := json.Unmarshal(data, &r); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if f := duplicateField(data); f != "" {
		return nil, fmt.Errorf("%w: field %s given more than once", ErrInvalid, f)
	}
	if r.SchemaVersion == nil || *r.SchemaVersion != 2 {
		return nil, fmt.Errorf("%w: schemaVersion is not 2", ErrInvalid)
	}
	switch {
	case r.MediaType != nil && *r.MediaType != mt:
		return nil, fmt.Errorf("%w: mediaType %q differs from the media type %q", ErrInvalid, *r.MediaType, mt)
	case r.MediaType == nil && (mt == MediaTypeDockerManifest || mt == MediaTypeDockerManifestList):
		return nil, fmt.Errorf("%w: a Docker manifest without mediaType", ErrInvalid)
	}
	m := &Manifest{MediaType: mt, ArtifactType: r.ArtifactType, Config: r.Config, Annotations: r.Annotations, rawSubject: r.Subject}
	if IsIndex(mt) {
		if r.Manifests == nil || isNull(r.Manifests) {
			return nil, fmt.Errorf("%w: an index without manifests", ErrInvalid)
		}
		if r.Config != nil || r.Layers != nil {
			return nil, fmt.Errorf("%w: an index with config or layers", ErrInvalid)
		}
		if err := json.Unmarshal(r.Manifests, &m.Manifests); err != nil {
			return nil, fmt.Errorf("%w: manifests: %v", ErrInvalid, err)
		}
	} else {
		if r.Config == nil {
			return nil, fmt.Errorf("%w: an image manifest without config", ErrInvalid)
		}
		if r.Manifests != nil {
			return nil, fmt.Errorf("%w: an image manifest with manifests", ErrInvalid)
		}
		if err := checkDescriptor("config", *r.Config); err != nil {
			return nil, err
		}
		if r.Layers != nil && !isNull(r.Layers) {
			if err := json.Unmarshal(r.Layers, &m.Layers); err != nil {
				return nil, fmt.Errorf("%w: layers: %v", ErrInvalid, err)
			}
		}
	}
	if r.Subject != nil && checkDescriptor("subject", *r.Subject) == nil {
		m.Subject = r.Subject
	}
	return m, nil
}

// Strict checks what a pushed manifest must get right besides Parse: every
// descriptor it lists, and its subject, has a valid digest and a size of
// at least zero.
func (m *Manifest) Strict() error {
	if m.rawSubject != nil {
		if err := checkDescriptor("subject", *m.rawSubject); err != nil {
			return err
		}
	}
	for field, ds := range map[string][]v1.Descriptor{"layers": m.Layers, "manifests": m.Manifests} {
		for i, d := range ds {
			if err := checkDescriptor(fmt.Sprintf("%s[%d]", field, i), d); err != nil {
				return err
			}
		}
	}
	return nil
}

func isNull(b json.RawMessage) bool { return string(bytes.TrimSpace(b)) == "null" }

func checkDescriptor(field string, d v1.Descriptor) error {
	if err := d.Digest.Validate(); err != nil {
		return fmt.Errorf("%w: %s: digest %q: %v", ErrInvalid, field, d.Digest, err)
	}
	if d.Size < 0 {
		return fmt.Errorf("%w: %s: negative size", ErrInvalid, field)
	}
	return nil
}

// Referrer reports whether a manifest of this media type can be a
// referrer: the spec lists only OCI image manifests and indexes.
func Referrer(mt string) bool {
	return mt == v1.MediaTypeImageManifest || mt == v1.MediaTypeImageIndex
}

// Descriptor is the manifest's descriptor as a referrers answer lists it:
// artifactType is the manifest's own, else an image manifest's config
// media type (an index without one has none); annotations are the
// manifest's.
func (m *Manifest) Descriptor(d digest.Digest, size int64) v1.Descriptor {
	desc := v1.Descriptor{MediaType: m.MediaType, Digest: d, Size: size, ArtifactType: m.ArtifactType, Annotations: m.Annotations}
	if desc.ArtifactType == "" && m.Config != nil && !IsIndex(m.MediaType) {
		desc.ArtifactType = m.Config.MediaType
	}
	return desc
}
