package proxy

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/graph"
)

// pin is an image that eviction keeps: a repository and a tag or digest.
type pin struct {
	ref  string // as configured
	key  cache.RepoKey
	tag  string
	dgst digest.Digest
}

// parsePin reads a pinned reference as a client pulling through ocimirror
// writes it: a name routed like a request's (host prefix, hosted prefix or
// the default upstream), then :tag or @digest (latest when neither).
func (s *Server) parsePin(ref string) (pin, error) {
	bad := func(why string) error { return fmt.Errorf("proxy: pin %q: %s", ref, why) }
	name, rest, byDigest := strings.Cut(ref, "@")
	p := pin{ref: ref, tag: "latest"}
	if byDigest {
		d, err := parseDigest(rest)
		if err != nil {
			return pin{}, bad("not a sha256 or sha512 digest after @")
		}
		p.dgst, p.tag = d, ""
		if i := strings.LastIndexByte(name, ':'); i > strings.LastIndexByte(name, '/') {
			name = name[:i] // name:tag@digest: the digest decides
		}
	} else if i := strings.LastIndexByte(name, ':'); i > strings.LastIndexByte(name, '/') {
		name, p.tag = name[:i], name[i+1:]
		if !validTag(p.tag) {
			return pin{}, bad("not a valid tag")
		}
	}
	src, repo, _, err := s.route(name, nil)
	if err != nil {
		return pin{}, bad(err.Error())
	}
	up, _ := src.(*upstreamState)
	p.key = cache.RepoKey{Upstream: src.storeName(), Repo: s.upstreamRepo(up, repo)}
	return p, nil
}

// Pinned returns every digest the pins hold in the store: each pinned
// image (configured, synced, or imported from a bundle: the store's own
// pins), the platforms of an index, their config and layers, and all
// their referrers, recursively. What is not stored yet (never pulled) is
// followed no further. A pin's walk that grows past its bound keeps what
// it found and is logged. The store calls it at the start of each
// eviction pass.
func (s *Server) Pinned(ctx context.Context) (map[digest.Digest]struct{}, error) {
	keep := map[digest.Digest]struct{}{}
	for _, p := range s.pins {
		roots := []digest.Digest{p.dgst}
		if p.tag != "" {
			e, err := s.store.GetTag(ctx, cache.TagKey{Upstream: p.key.Upstream, Repo: p.key.Repo, Tag: p.tag})
			if errors.Is(err, cache.ErrNotFound) {
				continue
			}
			if err != nil {
				return nil, err
			}
			// A pending digest is kept too: once fetched it is the tag's.
			roots = []digest.Digest{e.Digest, e.Pending}
		}
		for _, root := range roots {
			if err := s.keepImage(ctx, keep, p.key, root, p.ref); err != nil {
				return nil, err
			}
		}
	}
	stored, err := s.store.ListPins(ctx)
	if err != nil {
		return nil, err
	}
	for _, p := range stored {
		if err := s.keepImage(ctx, keep, p.Repo, p.Digest, "imported "+p.Repo.Upstream+"/"+p.Repo.Repo+":"+p.Name); err != nil {
			return nil, err
		}
	}
	synced, err := s.syncedRoots(ctx)
	if err != nil {
		return nil, err
	}
	for key, roots := range synced {
		for _, root := range roots {
			if err := s.keepImage(ctx, keep, key, digest.Digest(root), "sync "+key.Upstream+"/"+key.Repo); err != nil {
				return nil, err
			}
		}
	}
	return keep, nil
}

// keepImage adds to keep every digest of the image at root that the
// store holds in the repository: its platforms, blobs and referrers.
func (s *Server) keepImage(ctx context.Context, keep map[digest.Digest]struct{}, key cache.RepoKey, root digest.Digest, what string) error {
	if root == "" {
		return nil
	}
	err := graph.Walk(ctx, pinSource{s: s, key: key}, v1.Descriptor{Digest: root}, graph.Options{Referrers: true},
		func(n graph.Node) error {
			keep[n.Descriptor.Digest] = struct{}{}
			return nil
		})
	if errors.Is(err, graph.ErrTooLarge) {
		s.log.Warn("pinned image larger than a walk's bound: only part of it is kept", "pin", what, "err", err)
	} else if err != nil {
		return fmt.Errorf("pin %s: %w", what, err)
	}
	return nil
}

// pinSource reads a pinned image from the store.
type pinSource struct {
	s   *Server
	key cache.RepoKey
}

func (p pinSource) Manifest(ctx context.Context, d digest.Digest) (string, []byte, error) {
	m, err := p.s.store.GetManifest(ctx, d)
	if errors.Is(err, cache.ErrNotFound) {
		return "", nil, graph.ErrNotFound
	}
	return m.MediaType, m.Data, err
}

func (p pinSource) Referrers(ctx context.Context, d digest.Digest) ([]v1.Descriptor, error) {
	return p.s.store.ListReferrers(ctx, cache.ReferrerKey{Upstream: p.key.Upstream, Repo: p.key.Repo, Subject: d})
}
