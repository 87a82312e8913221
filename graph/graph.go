// Package graph walks an image: from a manifest to the manifests of its
// platforms (an index's children), the blobs they name (config and
// layers), and the manifests that refer to each (referrers: signatures,
// SBOMs, attestations), recursively. It reads through a Source, so the
// same walk serves pins (over the store), and prefetch, sync or export
// (over a registry API).
//
// The walk is bounded by construction: each digest is visited once, and
// it stops with ErrTooLarge past Options.MaxNodes.
package graph

import (
	"context"
	"errors"
	"fmt"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/manifest"
)

// ErrNotFound is what a Source answers for a manifest it does not have.
// The walk goes on without it; the node is visited with Missing set.
var ErrNotFound = errors.New("graph: not found")

// ErrTooLarge ends a walk that reached Options.MaxNodes.
var ErrTooLarge = errors.New("graph: more nodes than the walk's bound")

// ErrDigestMismatch is content whose bytes do not match the digest (or
// size) it was asked by.
var ErrDigestMismatch = errors.New("graph: content does not match its digest")

// DefaultMaxNodes bounds a walk when Options.MaxNodes is 0. An image with
// every platform and its signatures and attestations has some hundreds.
const DefaultMaxNodes = 100_000

// Source is where the walk reads manifests and referrers.
type Source interface {
	// Manifest returns a manifest's media type and bytes, or ErrNotFound.
	Manifest(ctx context.Context, d digest.Digest) (mediaType string, data []byte, err error)
	// Referrers lists the manifests whose subject is d.
	Referrers(ctx context.Context, d digest.Digest) ([]v1.Descriptor, error)
}

// Kind is what a node is to its parent.
type Kind int

// The kinds of node.
const (
	Root     Kind = iota // the walk's start
	Child                // a manifest an index lists (a platform)
	Config               // an image's config blob
	Layer                // an image's layer blob (or an artifact's blob)
	Referrer             // a manifest whose subject is the parent
)

func (k Kind) String() string {
	switch k {
	case Root:
		return "root"
	case Child:
		return "child"
	case Config:
		return "config"
	case Layer:
		return "layer"
	case Referrer:
		return "referrer"
	}
	return fmt.Sprintf("Kind(%d)", int(k))
}

// Blob reports whether nodes of this kind are blobs, not manifests.
func (k Kind) Blob() bool { return k == Config || k == Layer }

// Node is one digest of the walk.
type Node struct {
	Kind       Kind
	Descriptor v1.Descriptor
	// Parent is the manifest that named it ("" for the root).
	Parent digest.Digest
	// Missing is set for a manifest the Source does not have: its
	// children are unknown.
	Missing bool
}

// Options tune a walk.
type Options struct {
	// Referrers follows the referrers of every manifest, recursively.
	Referrers bool
	// MaxNodes bounds the walk (DefaultMaxNodes if 0).
	MaxNodes int
	// Platforms, when not empty, keeps of an index's children only those
	// whose platform matches one of these, as containerd matches them
	// (see ParsePlatform); a child that names no platform is kept. The
	// children left out are not visited, nor is anything they name.
	Platforms []v1.Platform
}

// Walk visits root and everything reachable from it, each digest once,
// manifests before what they name. A manifest that does not parse is
// visited and not followed; a descriptor whose digest is malformed is
// skipped. An error from visit or the Source (other than ErrNotFound)
// ends the walk.
func Walk(ctx context.Context, src Source, root v1.Descriptor, opts Options, visit func(Node) error) error {
	max := opts.MaxNodes
	if max <= 0 {
		max = DefaultMaxNodes
	}
	keep := platformFilter(opts.Platforms)
	seen := make(map[digest.Digest]struct{})
	queue := []Node{{Kind: Root, Descriptor: root}}
	for len(queue) > 0 {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := queue[0]
		queue = queue[1:]
		d := n.Descriptor.Digest
		if d.Validate() != nil {
			continue
		}
		if _, ok := seen[d]; ok {
			continue
		}
		if len(seen) >= max {
			return fmt.Errorf("%w (%d)", ErrTooLarge, max)
		}
		seen[d] = struct{}{}
		if n.Kind.Blob() {
			if err := visit(n); err != nil {
				return err
			}
			continue
		}
		mt, data, err := src.Manifest(ctx, d)
		if errors.Is(err, ErrNotFound) {
			n.Missing = true
			if err := visit(n); err != nil {
				return err
			}
			continue
		}
		if err != nil {
			return err
		}
		if err := visit(n); err != nil {
			return err
		}
		if m, err := manifest.Parse(mt, data); err == nil {
			if m.Config != nil {
				queue = append(queue, Node{Kind: Config, Descriptor: *m.Config, Parent: d})
			}
			for _, l := range m.Layers {
				queue = append(queue, Node{Kind: Layer, Descriptor: l, Parent: d})
			}
			for _, c := range m.Manifests {
				if !keep(c) {
					continue
				}
				queue = append(queue, Node{Kind: Child, Descriptor: c, Parent: d})
			}
		}
		if opts.Referrers {
			refs, err := src.Referrers(ctx, d)
			if err != nil && !errors.Is(err, ErrNotFound) {
				return err
			}
			for _, r := range refs {
				queue = append(queue, Node{Kind: Referrer, Descriptor: r, Parent: d})
			}
		}
		// The queue holds at most what the seen set will: bounded too.
		if len(queue) > max {
			return fmt.Errorf("%w (%d)", ErrTooLarge, max)
		}
	}
	return nil
}
