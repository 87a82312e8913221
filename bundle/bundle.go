// Package bundle reads and writes bundles: OCI image layouts in a tar
// archive, for carrying images across an air gap.
//
// A bundle ocimirror writes (Writer, Exporter) holds, for each image, the
// manifest, the platforms of an index (all, or some), every blob, and the
// referrers (signatures, SBOMs, attestations), recursively. index.json
// names each image with its full name (docker.io/library/alpine:3) in both
// org.opencontainers.image.ref.name and io.containerd.image.name, and
// lists its referrers twice: as untagged descriptors (as oras keeps them)
// and as a fallback tag index, <name>:sha256-<hex> (as regctl does), so
// that every client finds them. The archive streams: each blob is written
// as it is read, its size known from its descriptor, and index.json comes
// last, so that an archive cut short has none.
//
// Import reads a bundle (ocimirror's, or an OCI layout that oras, regctl,
// crane or docker save wrote) into a mirror's store, checking every digest
// first and committing it in one step.
package bundle

import (
	"fmt"
	"regexp"
	"strings"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/graph"
)

// AnnotationImageName is containerd's name of an image in an OCI layout's
// index.json (ctr import reads it first).
const AnnotationImageName = "io.containerd.image.name"

// The files of an OCI image layout, and docker save's.
const (
	layoutFile   = "oci-layout"
	indexFile    = "index.json"
	manifestFile = "manifest.json" // docker save
	blobsDir     = "blobs"
	// layoutVersion is what oci-layout says.
	layoutVersion = "1.0.0"
)

// DockerHub is the name Docker Hub's images carry in a bundle, and the
// upstream that holds them: its official images are under library/.
const DockerHub = "docker.io"

// Name is an image's full name in a bundle: a registry host (the upstream
// it is mirrored from) and a repository there, with a tag or a digest.
type Name struct {
	Host, Repository string
	Tag              string
	Digest           digest.Digest
}

// ParseName reads a full image name as docker, containerd and crane write
// it: a name without a registry host is Docker Hub's; Docker Hub's other
// host names are docker.io; an official image is under library/.
func ParseName(s string) (Name, error) {
	r, err := graph.ParseReference(s)
	if err != nil {
		return Name{}, err
	}
	n := Name{Host: r.Host, Repository: r.Repository, Tag: r.Tag, Digest: r.Digest}
	if n.Host == "" {
		n.Host = DockerHub
	}
	if n.Host == DockerHub && !strings.Contains(n.Repository, "/") {
		n.Repository = "library/" + n.Repository
	}
	if n.Digest != "" {
		n.Tag = ""
	}
	return n, nil
}

// Repo is host/repository.
func (n Name) Repo() string { return n.Host + "/" + n.Repository }

// String is host/repository:tag, or host/repository@digest.
func (n Name) String() string {
	if n.Tag != "" {
		return n.Repo() + ":" + n.Tag
	}
	return n.Repo() + "@" + n.Digest.String()
}

// fallbackTagRE matches a referrers fallback tag (the referrers tag schema
// for sha256 and sha512 subjects).
var fallbackTagRE = regexp.MustCompile(`^(sha256-[0-9a-f]{64}|sha512-[0-9a-f]{64})$`)

// blobPath is where a layout keeps a blob.
func blobPath(d digest.Digest) string {
	return blobsDir + "/" + d.Algorithm().String() + "/" + d.Encoded()
}

// blobDigest returns the digest a layout path names, "" when it names none.
func blobDigest(p string) (digest.Digest, error) {
	rest, ok := strings.CutPrefix(p, blobsDir+"/")
	if !ok {
		return "", nil
	}
	alg, enc, ok := strings.Cut(rest, "/")
	if !ok || strings.Contains(enc, "/") {
		return "", nil
	}
	d := digest.NewDigestFromEncoded(digest.Algorithm(alg), enc)
	if alg != string(digest.SHA256) && alg != string(digest.SHA512) {
		return "", fmt.Errorf("entry %q: digest algorithm %q (want sha256 or sha512)", p, alg)
	}
	if err := d.Validate(); err != nil {
		return "", fmt.Errorf("entry %q: %w", p, err)
	}
	return d, nil
}

// named returns a descriptor for index.json with annotations set.
func named(d v1.Descriptor, annotations map[string]string) v1.Descriptor {
	out := v1.Descriptor{MediaType: d.MediaType, Digest: d.Digest, Size: d.Size, ArtifactType: d.ArtifactType, Annotations: annotations}
	return out
}
