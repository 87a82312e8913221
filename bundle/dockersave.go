package bundle

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/cache"
)

// dockerSaveImage is an image of docker save's manifest.json.
type dockerSaveImage struct {
	Config   string
	RepoTags []string
	Layers   []string
}

// dockerSave reads an archive docker save wrote without an OCI index
// (before Docker 25): for each image of manifest.json, an OCI image
// manifest is made of its config and layers (uncompressed tar, or gzip
// when they are) and put in the store, named by its RepoTags
// (alpine:3.20 is docker.io/library/alpine:3.20).
func (im *importer) dockerSave(ctx context.Context) ([]v1.Descriptor, error) {
	var images []dockerSaveImage
	if err := json.Unmarshal(im.meta[manifestFile], &images); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrInvalid, manifestFile, err)
	}
	var out []v1.Descriptor
	for i, img := range images {
		where := fmt.Sprintf("%s entry %d", manifestFile, i)
		config, err := im.file(where, img.Config)
		if err != nil {
			return nil, err
		}
		m := v1.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageManifest,
			Config: v1.Descriptor{MediaType: v1.MediaTypeImageConfig, Digest: config.d, Size: config.size}, Layers: []v1.Descriptor{}}
		for _, l := range img.Layers {
			layer, err := im.file(where, l)
			if err != nil {
				return nil, err
			}
			mt := v1.MediaTypeImageLayer
			if im.gzipped(ctx, layer.d) {
				mt = v1.MediaTypeImageLayerGzip
			}
			m.Layers = append(m.Layers, v1.Descriptor{MediaType: mt, Digest: layer.d, Size: layer.size})
		}
		data, err := json.Marshal(m)
		if err != nil {
			return nil, err
		}
		d := digest.FromBytes(data)
		if err := im.store.PutManifest(ctx, cache.Manifest{Digest: d, MediaType: m.MediaType, Data: data}); err != nil {
			return nil, err
		}
		im.manifests[d] = manifestInfo{mediaType: m.MediaType, size: int64(len(data))}
		desc := v1.Descriptor{MediaType: m.MediaType, Digest: d, Size: int64(len(data))}
		if len(img.RepoTags) == 0 {
			out = append(out, desc)
		}
		for _, t := range img.RepoTags {
			n := desc
			n.Annotations = map[string]string{AnnotationImageName: t}
			out = append(out, n)
		}
	}
	return out, nil
}

// file is a file of the archive by its path, links followed.
func (im *importer) file(where, p string) (staged, error) {
	name := cleanName(p)
	for range 16 {
		target, ok := im.links[name]
		if !ok {
			break
		}
		name = target
	}
	st, ok := im.files[name]
	if !ok {
		return staged{}, fmt.Errorf("%w: %s names %q, which the archive does not hold", ErrInvalid, where, p)
	}
	return st, nil
}

// gzipped reports whether a stored blob starts as a gzip stream does.
func (im *importer) gzipped(ctx context.Context, d digest.Digest) bool {
	r, err := im.store.OpenBlob(ctx, d)
	if err != nil {
		return false
	}
	defer r.Close()
	magic := make([]byte, 2)
	n, _ := r.ReadAt(magic, 0)
	return n == 2 && magic[0] == 0x1f && magic[1] == 0x8b
}
