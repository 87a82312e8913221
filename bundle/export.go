package bundle

import (
	"context"
	"encoding/json"
	"fmt"
	"io"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/graph"
	"github.com/ocimirror/ocimirror/manifest"
	"github.com/ocimirror/ocimirror/referrers"
)

// Repository is where an export reads one repository's images:
// graph.Registry (a registry's API, ocimirror's own) is one. Manifest and
// Blob check what they read against its digest.
type Repository interface {
	graph.Source
	// Resolve returns the descriptor of the manifest a tag or digest names.
	Resolve(ctx context.Context, ref string) (v1.Descriptor, error)
	// Blob copies a blob to w, checking its size and digest as it goes;
	// it fails when they do not match.
	Blob(ctx context.Context, desc v1.Descriptor, w io.Writer) (int64, error)
}

var _ Repository = (*graph.Registry)(nil)

// Exporter writes images into a bundle, one after the other.
type Exporter struct {
	W *Writer
	// Platforms, when set, keeps of an index only these platforms (see
	// graph.Options).
	Platforms []v1.Platform
	// Exclude is content an earlier bundle holds: it is named, not written
	// again (an incremental bundle).
	Exclude map[digest.Digest]bool
	// Progress, when set, hears of each blob: its descriptor before its
	// bytes, and its bytes as they are written (see graph.Progress).
	Progress graph.Progress
}

// Exported is what exporting one image wrote.
type Exported struct {
	Name   Name
	Digest digest.Digest
	// Manifests and Blobs count the image's manifests (referrers and the
	// fallback tag indexes included) and blobs; Referrers, its referrers.
	Manifests, Referrers, Blobs int
	// Written counts the bytes written to the bundle; Excluded, the
	// manifests and blobs left out as an earlier bundle holds them.
	Written  int64
	Excluded int
}

// Image exports the image ref names (name's tag, or digest) from repo:
// the manifest, the platforms of an index (those kept by Platforms), their
// config and layers, and every referrer, recursively, with theirs. The
// image is named name in index.json; its referrers are listed untagged,
// and in a fallback tag index per subject. A manifest that cannot be read
// fails the image, and so does a blob whose bytes do not match: the
// archive is then unusable.
func (e *Exporter) Image(ctx context.Context, repo Repository, name Name) (Exported, error) {
	res := Exported{Name: name}
	ref := name.Tag
	if name.Digest != "" {
		ref = name.Digest.String()
	}
	root, err := repo.Resolve(ctx, ref)
	if err != nil {
		return res, err
	}
	res.Digest = root.Digest
	full := name.String()
	e.W.Index(named(root, map[string]string{v1.AnnotationRefName: full, AnnotationImageName: full}))
	prog := e.Progress
	if prog == nil {
		prog = graph.NoProgress{}
	}
	src := &recorder{Source: repo}
	refs := map[digest.Digest][]v1.Descriptor{}
	var order []digest.Digest // subjects, in the order found
	before := e.W.Bytes
	kept := 0 // platforms of the root index
	walk := graph.Options{Referrers: true, Platforms: e.Platforms}
	err = graph.Walk(ctx, src, root, walk, func(n graph.Node) error {
		d := n.Descriptor
		if !n.Kind.Blob() {
			if n.Missing {
				return fmt.Errorf("%s manifest %s (named by %s): not found", n.Kind, d.Digest, n.Parent)
			}
			mt, data := src.take(d.Digest)
			res.Manifests++
			if n.Kind == graph.Child && n.Parent == root.Digest {
				kept++
			}
			if n.Kind == graph.Referrer {
				res.Referrers++
				desc, _, err := referrers.Describe(d.Digest, mt, data)
				if err != nil {
					return fmt.Errorf("referrer %s of %s: %w", d.Digest, n.Parent, err)
				}
				if _, ok := refs[n.Parent]; !ok {
					order = append(order, n.Parent)
				}
				refs[n.Parent] = append(refs[n.Parent], desc)
				e.W.Index(named(desc, nil))
			}
			if e.Exclude[d.Digest] {
				res.Excluded++
				return nil
			}
			return e.W.WriteBytes(d.Digest, data)
		}
		res.Blobs++
		if e.Exclude[d.Digest] {
			res.Excluded++
			return nil
		}
		if e.W.Has(d.Digest) {
			return nil
		}
		prog.Found(d.Size)
		var got int64
		err := e.W.WriteBlob(d, func(w io.Writer) error {
			var err error
			got, err = repo.Blob(ctx, d, io.MultiWriter(w, prog))
			return err
		})
		prog.Done(d.Size - got)
		if err != nil {
			return fmt.Errorf("%s %w", n.Kind, err)
		}
		return nil
	})
	if err == nil && len(e.Platforms) > 0 && manifest.IsIndex(root.MediaType) && kept == 0 {
		err = fmt.Errorf("no manifest of index %s is for %s", root.Digest, graph.PlatformList(e.Platforms))
	}
	if err != nil {
		return res, err
	}
	for _, subject := range order {
		d, err := e.fallbackIndex(name, subject, refs[subject])
		if err != nil {
			return res, err
		}
		res.Manifests++
		if e.Exclude[d] {
			res.Excluded++
		}
	}
	res.Written = e.W.Bytes - before
	return res, nil
}

// fallbackIndex writes the referrers of subject as a fallback tag index
// (ordered by digest, as a referrers answer), named <repo>:<alg>-<hex>.
func (e *Exporter) fallbackIndex(name Name, subject digest.Digest, ds []v1.Descriptor) (digest.Digest, error) {
	ds = referrers.Merge(ds)
	data, err := json.Marshal(v1.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageIndex, Manifests: ds})
	if err != nil {
		return "", err
	}
	d := digest.FromBytes(data)
	if !e.Exclude[d] {
		if err := e.W.WriteBytes(d, data); err != nil {
			return "", err
		}
	}
	tag := name.Repo() + ":" + referrers.FallbackTag(subject)
	e.W.Index(v1.Descriptor{MediaType: v1.MediaTypeImageIndex, Digest: d, Size: int64(len(data)),
		Annotations: map[string]string{v1.AnnotationRefName: tag}})
	return d, nil
}

// recorder keeps the manifest the walk read last, for the visit that
// follows (the walk reads a manifest, then visits it).
type recorder struct {
	graph.Source
	last digest.Digest
	mt   string
	data []byte
}

func (r *recorder) Manifest(ctx context.Context, d digest.Digest) (string, []byte, error) {
	mt, data, err := r.Source.Manifest(ctx, d)
	if err == nil {
		r.last, r.mt, r.data = d, mt, data
	}
	return mt, data, err
}

func (r *recorder) take(d digest.Digest) (string, []byte) {
	if r.last != d {
		return "", nil
	}
	mt, data := r.mt, r.data
	r.last, r.mt, r.data = "", "", nil
	return mt, data
}
