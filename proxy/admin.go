package proxy

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/referrers"
)

// What the admin listener asks of the server: purges, pins and the bytes
// they keep. cmd wires these into admin.Options; the admin package does
// not import this one.

var (
	// ErrPurgeInvalid: the reference names no tag or repository of a
	// configured upstream (a digest, a malformed name, an unknown host).
	ErrPurgeInvalid = errors.New("proxy: purge: not a tag or repository of an upstream")
	// ErrPurgeHosted: hosted content is ocimirror's own, never purged.
	ErrPurgeHosted = errors.New("proxy: purge: a hosted repository is ocimirror's own content, never purged")
)

// PurgeResult says what a purge dropped, and of which repository (as the
// upstream names it).
type PurgeResult struct {
	Upstream   string
	Repository string
	// Tag is "" for a whole repository.
	Tag     string
	Dropped cache.Purged
}

// Purge drops a cached tag (docker.io/library/alpine:3.20) or a whole
// cached repository (docker.io/library/alpine), named as a client pulling
// through the mirror names it, so that the next request for it goes to
// the upstream: from the store (see cache.Purger) and from every memory
// above it (the store's LRU, the tag lists, the remembered missing
// fallback tags and referrer candidates, the referrers API state).
// Purging what is not cached drops nothing and is no error. A fetch
// already under way when the purge runs may link what it fetches
// afterwards: that content did come from the upstream.
func (s *Server) Purge(ctx context.Context, ref string) (PurgeResult, error) {
	bad := func(why string) error { return fmt.Errorf("%w: %q: %s", ErrPurgeInvalid, ref, why) }
	if strings.Contains(ref, "@") {
		return PurgeResult{}, bad("a digest names content, not a tag: purge a tag or a repository")
	}
	name, tag := ref, ""
	if i := strings.LastIndexByte(name, ':'); i > strings.LastIndexByte(name, '/') {
		name, tag = name[:i], name[i+1:]
		if !validTag(tag) {
			return PurgeResult{}, bad("not a valid tag")
		}
	}
	if host, _, ok := strings.Cut(name, "/"); ok && !s.isHosted(name) && looksLikeHost(host) {
		if u := s.upstreamByHost(host); u == nil || strings.ToLower(host) != u.name {
			return PurgeResult{}, bad("no upstream " + host + " is configured")
		}
	}
	src, repoName, _, err := s.route(name, nil)
	if err != nil {
		return PurgeResult{}, bad(err.Error())
	}
	up, ok := src.(*upstreamState)
	if !ok {
		return PurgeResult{}, fmt.Errorf("%w: %s", ErrPurgeHosted, name)
	}
	pg, ok := s.store.(cache.Purger)
	if !ok {
		return PurgeResult{}, errors.New("proxy: purge: the store cannot purge")
	}
	repo := s.upstreamRepo(up, repoName)
	res := PurgeResult{Upstream: up.name, Repository: repo, Tag: tag}
	key := cache.RepoKey{Upstream: up.name, Repo: repo}
	if tag != "" {
		tk := cache.TagKey{Upstream: up.name, Repo: repo, Tag: tag}
		res.Dropped, err = pg.PurgeTag(ctx, tk)
		s.fallbackAbsent.Remove(tk)
	} else {
		// Memory goes before and after the store: a request that read the
		// store before the purge cannot leave its answer behind.
		s.forgetRepo(up, key)
		res.Dropped, err = pg.PurgeRepo(ctx, key)
		s.forgetRepo(up, key)
	}
	if err != nil {
		return res, fmt.Errorf("proxy: purge %s: %w", ref, err)
	}
	s.log.Info("purged", "upstream", up.name, "repo", repo, "tag", tag, "tags", res.Dropped.Tags,
		"manifests", res.Dropped.Manifests, "blobs", res.Dropped.Blobs, "pins", res.Dropped.Pins)
	return res, nil
}

// forgetRepo drops what the server holds in memory of a repository.
func (s *Server) forgetRepo(up *upstreamState, key cache.RepoKey) {
	s.tagLists.Remove(up.name + "\x00" + key.Repo)
	s.fallbackAbsent.RemoveFunc(func(k cache.TagKey) bool { return k.Upstream == key.Upstream && k.Repo == key.Repo })
	s.refMisses.RemoveFunc(func(k refMissKey) bool { return k.repo == key })
	s.refCaps.Set(capKey(up, key.Repo), referrers.Unknown, s.now())
}

// looksLikeHost reports whether a name's first component is a registry
// host, as the reference grammar reads it: a dot, a port, or localhost.
func looksLikeHost(s string) bool {
	return strings.ContainsAny(s, ".:") || s == "localhost"
}

// PinInfo is one pin: an image eviction keeps, and why.
type PinInfo struct {
	// Ref is the image as a client pulls it.
	Ref string
	// Source is "config" (storage.pin), "sync" (a sync rule's pick) or
	// "import" (a bundle's image, pinned in the store).
	Source     string
	Upstream   string // "" for a hosted repository
	Repository string
	// Tag is "" for an image pinned by digest.
	Tag string
	// Digest is what the pin resolves to; "" when not known (a tag never
	// pulled).
	Digest digest.Digest
	// At is when an import pinned it (zero for the others).
	At time.Time
}

// Pins lists the pins: the configuration's, the sync rules' picks among
// the tags the store holds, and the store's own, in that order.
func (s *Server) Pins(ctx context.Context) ([]PinInfo, error) {
	var out []PinInfo
	for _, p := range s.pins {
		pi := PinInfo{Ref: p.ref, Source: "config", Upstream: p.key.Upstream, Repository: p.key.Repo, Tag: p.tag, Digest: p.dgst}
		if p.tag != "" {
			e, err := s.store.GetTag(ctx, cache.TagKey{Upstream: p.key.Upstream, Repo: p.key.Repo, Tag: p.tag})
			if err != nil && !errors.Is(err, cache.ErrNotFound) {
				return nil, err
			}
			pi.Digest = e.Digest
			if pi.Digest == "" {
				pi.Digest = e.Pending
			}
		}
		out = append(out, pi)
	}
	picks, err := s.syncPicks(ctx)
	if err != nil {
		return nil, err
	}
	for _, p := range picks {
		d := p.tag.Digest
		if d == "" {
			d = p.tag.Pending
		}
		out = append(out, PinInfo{Ref: p.rule.Repository + ":" + p.tag.Name, Source: "sync", Upstream: p.rule.key.Upstream,
			Repository: p.rule.key.Repo, Tag: p.tag.Name, Digest: d})
	}
	stored, err := s.store.ListPins(ctx)
	if err != nil {
		return nil, err
	}
	for _, p := range stored {
		ref := p.Repo.Repo
		if p.Repo.Upstream != "" {
			ref = p.Repo.Upstream + "/" + ref
		}
		pi := PinInfo{Source: "import", Upstream: p.Repo.Upstream, Repository: p.Repo.Repo, Digest: p.Digest, At: p.At}
		if strings.Contains(p.Name, ":") {
			pi.Ref = ref + "@" + p.Name
		} else {
			pi.Ref, pi.Tag = ref+":"+p.Name, p.Name
		}
		out = append(out, pi)
	}
	return out, nil
}

// PinnedBytes is the size of what the pins keep: the distinct digests
// Pinned returns, each counted once, sized from the store (blob files and
// manifests; what is not stored counts nothing). It walks every pinned
// image, as an eviction pass does: call it at most every few seconds.
func (s *Server) PinnedBytes(ctx context.Context) (int64, error) {
	keep, err := s.Pinned(ctx)
	if err != nil {
		return 0, err
	}
	var n int64
	for d := range keep {
		info, err := s.store.StatBlob(ctx, d)
		if err == nil {
			n += info.Size
			continue
		} else if !errors.Is(err, cache.ErrNotFound) {
			return 0, err
		}
		m, err := s.store.GetManifest(ctx, d)
		if err == nil {
			n += int64(len(m.Data))
		} else if !errors.Is(err, cache.ErrNotFound) {
			return 0, err
		}
	}
	return n, nil
}
