package proxy

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"regexp"
	"slices"
	"time"

	"github.com/Masterminds/semver/v3"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/graph"
	"github.com/ocimirror/ocimirror/upstream"
)

// SyncRule is a repository the mirror keeps warm by itself.
type SyncRule struct {
	// Repository is written as a client pulls it: docker.io/library/alpine.
	Repository string
	// Tags is a regular expression a tag must match whole ("": any).
	Tags string
	// Semver keeps only tags that are versions in this range ("": any).
	Semver string
	// Interval is how often the upstream's tags are checked (1h if 0).
	Interval time.Duration
	// Platforms are os/arch[/variant] to fetch of an index (none: all).
	Platforms []string
	// MaxTags bounds the tags synced: highest versions, or names, first
	// (DefaultSyncTags if 0).
	MaxTags int
}

// DefaultSyncTags bounds the tags of a sync rule unless it says.
const DefaultSyncTags = 20

// syncRule is a SyncRule ready to run.
type syncRule struct {
	SyncRule
	ref       graph.Reference // the repository, as the mirror's API names it
	key       cache.RepoKey
	tags      *regexp.Regexp
	semver    *semver.Constraints
	platforms []v1.Platform
}

func (s *Server) parseSync(r SyncRule) (syncRule, error) {
	bad := func(f string, a ...any) error {
		return fmt.Errorf("proxy: sync %q: %s", r.Repository, fmt.Sprintf(f, a...))
	}
	y := syncRule{SyncRule: r}
	if y.Interval <= 0 {
		y.Interval = time.Hour
	}
	if y.MaxTags <= 0 {
		y.MaxTags = DefaultSyncTags
	}
	ref, err := graph.ParseReference(r.Repository)
	if err != nil || ref.Digest != "" || ref.Tag != "latest" {
		return y, bad("not a repository name (no tag or digest)")
	}
	src, name, _, err := s.route(r.Repository, nil)
	if err != nil {
		return y, bad("%v", err)
	}
	up, ok := src.(*upstreamState)
	if !ok {
		return y, bad("a hosted repository has nothing to sync")
	}
	y.ref, y.key = ref, cache.RepoKey{Upstream: up.name, Repo: s.upstreamRepo(up, name)}
	expr := r.Tags
	if expr == "" {
		expr = ".*"
	}
	if y.tags, err = regexp.Compile("^(?:" + expr + ")$"); err != nil {
		return y, bad("tags: %v", err)
	}
	if r.Semver != "" {
		if y.semver, err = semver.NewConstraint(r.Semver); err != nil {
			return y, bad("semver: %v", err)
		}
	}
	for _, p := range r.Platforms {
		pl, err := graph.ParsePlatform(p)
		if err != nil {
			return y, bad("%v", err)
		}
		y.platforms = append(y.platforms, pl)
	}
	return y, nil
}

// pick returns the tags the rule keeps, best first: matching the
// expression and in the version range, highest versions first (or, with
// no range, names in reverse order), at most MaxTags.
func (y *syncRule) pick(tags []string) []string {
	type cand struct {
		tag string
		v   *semver.Version
	}
	var cs []cand
	for _, t := range tags {
		if !y.tags.MatchString(t) {
			continue
		}
		var v *semver.Version
		if y.semver != nil {
			var err error
			if v, err = semver.NewVersion(t); err != nil || !y.semver.Check(v) {
				continue
			}
		}
		cs = append(cs, cand{t, v})
	}
	slices.SortFunc(cs, func(a, b cand) int {
		if a.v != nil && b.v != nil {
			if c := b.v.Compare(a.v); c != 0 {
				return c
			}
		}
		switch {
		case a.tag > b.tag:
			return -1
		case a.tag < b.tag:
			return 1
		}
		return 0
	})
	out := make([]string, 0, min(len(cs), y.MaxTags))
	for _, c := range cs[:min(len(cs), y.MaxTags)] {
		out = append(out, c.tag)
	}
	return out
}

// startSync serves the registry API on an internal loopback listener, and
// runs each rule against it: every interval, the upstream's tags are
// listed, and those the rule keeps are prefetched through the mirror
// itself, exactly as a client's pull (the same checks, the same shared
// fills). What they fetch is pinned (Pinned).
func (s *Server) startSync() error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("proxy: sync listener: %w", err)
	}
	// With access control, sync's requests carry a secret of this
	// process, accepted on this listener only: they may pull anything.
	var secret [32]byte
	_, _ = rand.Read(secret[:])
	s.internalSecret = hex.EncodeToString(secret[:])
	hs := &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 10 * time.Second,
		BaseContext: func(net.Listener) context.Context {
			return context.WithValue(context.Background(), internalKey{}, true)
		}}
	go func() { _ = hs.Serve(ln) }()
	c, err := upstream.New(upstream.Options{Name: "sync", URL: "http://" + ln.Addr().String(), MaxAttempts: 1,
		BreakerFailures: -1, UserAgent: "ocimirror-sync", Logger: s.log, Credentials: upstream.Credentials{Token: s.internalSecret}})
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(s.ctx)
	s.stopSync = func() {
		cancel()
		s.syncWG.Wait()
		_ = hs.Close()
	}
	for i := range s.syncRules {
		y := &s.syncRules[i]
		s.syncWG.Go(func() {
			t := time.NewTimer(0)
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
				s.syncOnce(ctx, c, y)
				t.Reset(y.Interval)
			}
		})
	}
	return nil
}

// syncOnce runs one rule once.
func (s *Server) syncOnce(ctx context.Context, c *upstream.Client, y *syncRule) {
	start := time.Now()
	log := s.log.With("sync", y.Repository)
	// The upstream's list, not the mirror's cached one: a new tag is seen
	// at the next interval, whatever the tag TTL.
	tags, err := s.upstreams[y.key.Upstream].refreshTags(ctx, y.key.Repo)
	if err != nil {
		log.Warn("sync: listing tags failed; trying again at the next interval", "err", err, "next_in", y.Interval)
		return
	}
	picked := y.pick(tags)
	p := &graph.Prefetcher{Client: c, Options: graph.Options{Referrers: true, Platforms: y.platforms}}
	var total graph.Result
	failed := 0
	for _, tag := range picked {
		if ctx.Err() != nil {
			return
		}
		ref := y.ref
		ref.Tag = tag
		res := p.Image(ctx, ref, nil)
		total.Add(res)
		if len(res.Errs) > 0 {
			failed++
			log.Warn("sync: an image failed", "tag", tag, "errors", len(res.Errs), "first", res.Errs[0])
		}
	}
	log.Info("sync done", "tags_listed", len(tags), "tags_synced", len(picked)-failed, "tags_failed", failed,
		"manifests", total.Manifests, "referrers", total.Referrers, "blobs", total.Blobs, "bytes", total.Bytes,
		"duration", time.Since(start).Round(time.Millisecond), "next_in", y.Interval)
}

// syncedRoots are the manifests the sync rules keep, from the tags the
// store holds: the rules' picks among them.
func (s *Server) syncedRoots(ctx context.Context) (map[cache.RepoKey][]string, error) {
	picks, err := s.syncPicks(ctx)
	if err != nil {
		return nil, err
	}
	out := map[cache.RepoKey][]string{}
	for _, p := range picks {
		for _, d := range []string{p.tag.Digest.String(), p.tag.Pending.String()} {
			if d != "" {
				out[p.rule.key] = append(out[p.rule.key], d)
			}
		}
	}
	return out, nil
}

// syncPick is a tag a sync rule keeps.
type syncPick struct {
	rule *syncRule
	tag  cache.Tag
}

// syncPicks are the tags the sync rules keep among those the store holds.
func (s *Server) syncPicks(ctx context.Context) ([]syncPick, error) {
	var out []syncPick
	for i := range s.syncRules {
		y := &s.syncRules[i]
		stored, err := s.store.ListTags(ctx, y.key.Upstream, y.key.Repo)
		if err != nil && !errors.Is(err, cache.ErrNotFound) {
			return nil, err
		}
		names := make([]string, 0, len(stored))
		byName := map[string]cache.Tag{}
		for _, t := range stored {
			names = append(names, t.Name)
			byName[t.Name] = t
		}
		for _, n := range y.pick(names) {
			out = append(out, syncPick{rule: y, tag: byName[n]})
		}
	}
	return out, nil
}
