package proxy

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/gorilla/mux"
	"github.com/opencontainers/go-digest"

	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/manifest"
	"github.com/ocimirror/ocimirror/referrers"
	"github.com/ocimirror/ocimirror/upstream"
)

// manifest serves GET and HEAD /v2/<name>/manifests/<reference>.
func (s *Server) manifest(w http.ResponseWriter, r *http.Request, q *request) error {
	if err := q.parseReference(mux.Vars(r)["reference"]); err != nil {
		return err
	}
	ctx := r.Context()
	head := r.Method == http.MethodHead
	var info manifestInfo
	if q.dgst == "" {
		e, held, err := q.src.tag(ctx, q, head)
		if err != nil {
			return err
		}
		hosted, _ := q.src.(*hostedSource)
		switch {
		case head && !held:
			info = manifestInfo{Manifest: cache.Manifest{Digest: e.Digest, MediaType: e.MediaType}, headSize: e.Size}
		case hosted != nil && s.shared != nil:
			// A hosted tag read from the bucket vouches for its link.
			if info, err = hosted.tagged(ctx, q, e.Digest); err != nil {
				return err
			}
		default:
			if info, err = q.src.manifest(ctx, q, e.Digest, head); err != nil {
				return err
			}
		}
	} else {
		var err error
		if info, err = q.src.manifest(ctx, q, q.dgst, head); err != nil {
			return err
		}
	}
	d, mt := info.Digest, info.MediaType
	if !accepts(r.Header.Values("Accept"), mt) {
		return &Error{Code: CodeManifestUnknown, Message: "manifest is not of a media type the client accepts",
			Detail: map[string]string{"mediaType": mt, "digest": d.String()}}
	}
	if t, ok := s.store.(cache.Toucher); ok && info.Data != nil {
		t.Touch(d) // eviction goes by last access
	}
	h := w.Header()
	h.Set("Content-Type", mt)
	h.Set("Content-Length", strconv.FormatInt(info.size(), 10))
	h.Set(HeaderContentDigest, d.String())
	h.Set("Etag", `"`+d.String()+`"`)
	w.WriteHeader(http.StatusOK)
	if !head {
		_, _ = w.Write(info.Data)
	}
	return nil
}

// manifestInfo is a manifest as the handler needs it; Data is nil when only
// an upstream HEAD was made.
type manifestInfo struct {
	cache.Manifest
	headSize int64
}

func (m manifestInfo) size() int64 {
	if m.Data == nil {
		return m.headSize
	}
	return int64(len(m.Data))
}

// manifest implements source: a manifest the repository holds, confirmed
// or fetched from the upstream when needed.
func (u *upstreamState) manifest(ctx context.Context, q *request, d digest.Digest, head bool) (manifestInfo, error) {
	m, how, err := u.getManifest(ctx, q.repo, d, getOptions{head: head})
	if err != nil {
		return manifestInfo{}, err
	}
	q.setCache(how)
	return m, nil
}

// getOptions say how a manifest is wanted.
type getOptions struct {
	// head: a manifest not stored is only HEADed upstream, not fetched.
	head bool
	// confirmed: the upstream has just said the repository holds it (a
	// HEAD by tag named it), so stored bytes from this upstream need no
	// second HEAD.
	confirmed bool
	// abandonable: stop fetching when no client waits any more (referrer
	// candidates), instead of finishing the fill for later requests.
	abandonable bool
	// noFetch: answer errNotHeld rather than call the upstream.
	noFetch bool
}

// errNotHeld: the repository does not hold the manifest without asking
// the upstream.
var errNotHeld = errors.New("not held without asking the upstream")

// getManifest returns manifest d of an upstream repository. From the store
// when the repository holds it ("hit"); when the bytes came from this
// upstream for another repository, after one upstream HEAD confirms that
// this one holds it too ("revalidated"); else fetched once for all
// concurrent callers, checked, stored and linked ("miss", "coalesced").
// Bytes stored from another upstream or pushed to a hosted repository are
// never served on the strength of a HEAD: the upstream must deliver them.
func (u *upstreamState) getManifest(ctx context.Context, repo string, d digest.Digest, o getOptions) (manifestInfo, string, error) {
	s := u.s
	k := cache.RepoKey{Upstream: u.name, Repo: repo}
	_, linked, err := s.store.Linked(ctx, k, cache.LinkManifest, d)
	if err != nil {
		return manifestInfo{}, "", err
	}
	if linked || o.confirmed {
		m, err := s.store.GetManifest(ctx, d)
		switch {
		case err == nil && linked:
			return manifestInfo{Manifest: m}, "hit", nil
		case err == nil:
			if held, err := s.store.UpstreamHolds(ctx, u.name, cache.LinkManifest, d); err != nil {
				return manifestInfo{}, "", err
			} else if held {
				return manifestInfo{Manifest: m}, "revalidated", s.linkManifest(ctx, k, m, cache.OriginUpstream)
			}
		case !errors.Is(err, cache.ErrNotFound):
			return manifestInfo{}, "", err
		}
	} else if !o.noFetch {
		if m, ok, err := u.confirmStored(ctx, repo, d); err != nil {
			return manifestInfo{}, "", err
		} else if ok {
			return manifestInfo{Manifest: m}, "revalidated", nil
		}
	}
	switch {
	case o.noFetch:
		return manifestInfo{}, "", errNotHeld
	case o.head:
		m, err := u.headManifest(ctx, repo, d)
		return m, "miss", err
	}
	fetch := s.flightDo
	if o.abandonable {
		fetch = s.flightAbandonable
	}
	v, err, shared := fetch(ctx, "m\x00"+u.name+"\x00"+repo+"\x00"+d.String(), func(ctx context.Context) (any, error) {
		// A flight that ended just before this one began may have stored it.
		if _, ok, _ := s.store.Linked(ctx, k, cache.LinkManifest, d); ok {
			if m, err := s.store.GetManifest(ctx, d); err == nil {
				return m, nil
			}
		}
		return u.fetchManifest(ctx, repo, d.String(), d)
	})
	if err != nil {
		return manifestInfo{}, "", err
	}
	return manifestInfo{Manifest: v.(cache.Manifest)}, missOrCoalesced(shared), nil
}

// confirmStored asks the upstream, with one HEAD, whether repo holds a
// manifest whose bytes this upstream delivered for another repository;
// then it is linked and served from the store. ok is false when the bytes
// are not stored from this upstream (they must be fetched).
func (u *upstreamState) confirmStored(ctx context.Context, repo string, d digest.Digest) (cache.Manifest, bool, error) {
	s := u.s
	held, err := s.store.UpstreamHolds(ctx, u.name, cache.LinkManifest, d)
	if err != nil || !held {
		return cache.Manifest{}, false, err
	}
	m, err := s.store.GetManifest(ctx, d)
	if errors.Is(err, cache.ErrNotFound) {
		return cache.Manifest{}, false, nil
	} else if err != nil {
		return cache.Manifest{}, false, err
	}
	if err := u.confirm(ctx, repo, cache.LinkManifest, d, int64(len(m.Data))); err != nil {
		return cache.Manifest{}, false, err
	}
	return m, true, nil
}

// confirm asks the upstream with a HEAD whether repo holds d, and links it
// when it does; size, when known (not -1), must match the upstream's.
// Concurrent confirmations share the HEAD.
func (u *upstreamState) confirm(ctx context.Context, repo string, kind cache.LinkKind, d digest.Digest, size int64) error {
	key := "c\x00" + string(kind) + "\x00" + u.name + "\x00" + repo + "\x00" + d.String()
	_, err, _ := u.s.flightDo(ctx, key, func(ctx context.Context) (any, error) {
		var resp *http.Response
		var err error
		if kind == cache.LinkBlob {
			resp, err = u.client.Blob(ctx, http.MethodHead, repo, d, 0, 0)
		} else {
			resp, err = u.client.Manifest(ctx, http.MethodHead, repo, d.String())
		}
		if err != nil {
			return nil, err
		}
		resp.Body.Close()
		if got := resp.Header.Get(HeaderContentDigest); got != "" && got != d.String() {
			return nil, fmt.Errorf("%w: HEAD %s answered digest %s", upstream.ErrInvalidResponse, d, got)
		}
		if resp.StatusCode != http.StatusOK || size >= 0 && resp.ContentLength >= 0 && resp.ContentLength != size {
			return nil, fmt.Errorf("%w: HEAD %s answered %d with length %d, stored %d", upstream.ErrInvalidResponse, d, resp.StatusCode, resp.ContentLength, size)
		}
		k := cache.RepoKey{Upstream: u.name, Repo: repo}
		if kind == cache.LinkManifest {
			m, err := u.s.store.GetManifest(ctx, d)
			if err != nil {
				return nil, err
			}
			return nil, u.s.linkManifest(ctx, k, m, cache.OriginUpstream)
		}
		return nil, u.s.store.Link(ctx, k, kind, d, cache.OriginUpstream)
	})
	return err
}

// headManifest checks a manifest digest upstream without fetching it.
func (u *upstreamState) headManifest(ctx context.Context, repo string, d digest.Digest) (manifestInfo, error) {
	hctx, cancel := context.WithTimeout(ctx, upstreamFetchTimeout)
	defer cancel()
	resp, err := u.client.Manifest(hctx, http.MethodHead, repo, d.String())
	if err != nil {
		return manifestInfo{}, err
	}
	resp.Body.Close()
	if got := resp.Header.Get(HeaderContentDigest); got != "" && got != d.String() {
		return manifestInfo{}, fmt.Errorf("%w: HEAD %s answered digest %s", upstream.ErrInvalidResponse, d, got)
	}
	mt := manifest.MediaType(resp.Header.Get("Content-Type"))
	if mt == "" || resp.ContentLength < 0 {
		// Without a manifest type and a length the answer cannot be given; fetch it.
		m, _, err := u.getManifest(ctx, repo, d, getOptions{})
		return m, err
	}
	return manifestInfo{Manifest: cache.Manifest{Digest: d, MediaType: mt}, headSize: resp.ContentLength}, nil
}

// fetchManifest GETs a manifest by tag or digest and stores it only when
// it is what a registry must send: bytes that hash to want (when a
// digest) or to the upstream's digest header, a Content-Type that is a
// manifest media type, and a body that parses as that kind of manifest.
// Anything else (a captive portal's page, a proxy's error) is an upstream
// failure, answered as a 5xx would be. The manifest is linked to the
// repository and indexed under its subject.
func (u *upstreamState) fetchManifest(ctx context.Context, repo, ref string, want digest.Digest) (cache.Manifest, error) {
	resp, err := u.client.Manifest(ctx, http.MethodGet, repo, ref)
	if err != nil {
		return cache.Manifest{}, err
	}
	data, err := upstream.ReadLimited(resp)
	if err != nil {
		return cache.Manifest{}, err
	}
	if want == "" {
		// By tag: trust the upstream's digest header only after checking it.
		if h := resp.Header.Get(HeaderContentDigest); h != "" {
			if want, err = parseDigest(h); err != nil {
				return cache.Manifest{}, fmt.Errorf("%w: digest header %q", upstream.ErrInvalidResponse, h)
			}
		} else {
			want = digest.SHA256.FromBytes(data)
		}
	}
	if got := want.Algorithm().FromBytes(data); got != want {
		return cache.Manifest{}, fmt.Errorf("%w: manifest %s of %s/%s hashes to %s", errDigestMismatch, ref, u.name, repo, got)
	}
	ct := resp.Header.Get("Content-Type")
	mt := manifest.MediaType(ct)
	if mt == "" {
		return cache.Manifest{}, fmt.Errorf("%w: %w: manifest %s of %s/%s came as %q, not a manifest media type", upstream.ErrInvalidResponse, errNotManifest, ref, u.name, repo, ct)
	}
	if _, err := manifest.Parse(mt, data); err != nil {
		return cache.Manifest{}, fmt.Errorf("%w: %w: manifest %s of %s/%s: %v", upstream.ErrInvalidResponse, errNotManifest, ref, u.name, repo, err)
	}
	m := cache.Manifest{Digest: want, MediaType: mt, Data: data}
	if err := u.s.storeManifest(ctx, cache.RepoKey{Upstream: u.name, Repo: repo}, m, cache.OriginUpstream); err != nil {
		return cache.Manifest{}, err
	}
	return m, nil
}

// storeManifest stores a checked manifest and links it to its repository.
func (s *Server) storeManifest(ctx context.Context, k cache.RepoKey, m cache.Manifest, origin cache.LinkOrigin) error {
	if err := s.store.PutManifest(ctx, m); err != nil {
		return err
	}
	return s.linkManifest(ctx, k, m, origin)
}

// linkManifest links a stored manifest to a repository and indexes it
// under its subject there: every manifest a repository comes to hold, by
// a fetch, a push or a confirmation, passes here.
func (s *Server) linkManifest(ctx context.Context, k cache.RepoKey, m cache.Manifest, origin cache.LinkOrigin) error {
	if err := s.store.Link(ctx, k, cache.LinkManifest, m.Digest, origin); err != nil {
		return err
	}
	desc, subject, err := referrers.Describe(m.Digest, m.MediaType, m.Data)
	if err != nil || subject == nil {
		return nil
	}
	return s.store.PutReferrer(ctx, cache.ReferrerKey{Upstream: k.Upstream, Repo: k.Repo, Subject: subject.Digest}, desc)
}

// tag implements source: the tag from cache within its TTL, else
// revalidated upstream, else, when the upstream fails, the last known
// answer.
func (u *upstreamState) tag(ctx context.Context, q *request, head bool) (cache.TagEntry, bool, error) {
	r, how, err := u.resolveTag(ctx, q.tagKey(), head)
	q.setCache(how)
	return r.entry, r.held, err
}

type tagResult struct {
	entry cache.TagEntry
	// held: the tag's manifest is stored and linked (else the entry comes
	// from an upstream HEAD alone).
	held bool
	// revalidated: the upstream confirmed the cached digest.
	revalidated bool
	// hit: the store had the answer after all (a flight that just ended).
	hit bool
}

// resolveTag returns what an upstream tag points at and how it was
// answered: from cache within its TTL ("hit"); else revalidated upstream
// with HEAD, or a GET for a tag never seen ("revalidated", "miss",
// "coalesced"); else, when the upstream fails transiently, the last known
// answer ("stale").
//
// The stored tag moves only to a manifest that is checked, stored and
// linked: a failure half way leaves the last good answer in place. A HEAD
// does not fetch: when it names a manifest not held, that digest is kept
// as the tag's pending answer, and the tag moves to it once the manifest
// is held (containerd HEADs the tag, then GETs the manifest by digest: its
// second pull costs the upstream nothing).
func (u *upstreamState) resolveTag(ctx context.Context, key cache.TagKey, head bool) (tagResult, string, error) {
	s := u.s
	old, err := s.store.GetTag(ctx, key)
	found := err == nil
	if err != nil && !errors.Is(err, cache.ErrNotFound) {
		return tagResult{}, "", err
	}
	good := found && old.Digest != "" // a last good answer to fall back on
	fresh := found && s.now().Sub(old.CheckedAt) < u.tagTTL
	if fresh && old.Pending == "" {
		return tagResult{entry: old, held: true}, "hit", nil
	}
	if fresh {
		// The upstream named a digest not held then; perhaps it is now.
		if m, _, err := u.getManifest(ctx, key.Repo, old.Pending, getOptions{confirmed: true, noFetch: true}); err == nil {
			r, err := u.moveTag(ctx, key, m.Manifest)
			return r, "hit", err
		}
		if head {
			return tagResult{entry: pendingEntry(old)}, "hit", nil
		}
	}
	mode := "g"
	if head {
		mode = "h"
	}
	wait := ctx
	if good {
		// With a last good answer, a client waits a bounded time for the
		// revalidation; a slow upstream's goes on in the background.
		var cancel context.CancelFunc
		wait, cancel = context.WithTimeout(ctx, revalidateWait)
		defer cancel()
	}
	v, err, shared := s.flightDo(wait, "t\x00"+mode+"\x00"+key.Upstream+"\x00"+key.Repo+"\x00"+key.Tag, func(ctx context.Context) (any, error) {
		// A flight that ended just before this one began may have answered.
		if cur, err := s.store.GetTag(ctx, key); err == nil && cur.Pending == "" && cur.Digest != "" && s.now().Sub(cur.CheckedAt) < u.tagTTL {
			return tagResult{entry: cur, held: true, hit: true}, nil
		}
		return u.revalidateTag(ctx, key, old, found, fresh, head)
	})
	if err != nil && good && ctx.Err() == nil && wait.Err() != nil {
		s.log.Debug("tag revalidation slow; serving the last known answer meanwhile", "upstream", u.name, "repo", key.Repo,
			"tag", key.Tag, "waited", revalidateWait)
		return tagResult{entry: goodEntry(old), held: true}, "stale", nil
	}
	if err != nil {
		if good && upstream.Transient(err) {
			if !errors.Is(err, upstream.ErrOffline) {
				s.log.Warn("upstream failed; serving last known tag", "upstream", u.name, "repo", key.Repo, "tag", key.Tag,
					"digest", old.Digest, "err", err)
			}
			return tagResult{entry: goodEntry(old), held: true}, "stale", nil
		}
		if found && errors.Is(err, errTagGone) {
			_ = s.store.DeleteTag(ctx, key)
		}
		return tagResult{}, "", err
	}
	r := v.(tagResult)
	switch {
	case r.hit:
		return r, "hit", nil
	case shared:
		return r, "coalesced", nil
	case r.revalidated:
		return r, "revalidated", nil
	}
	return r, "miss", nil
}

// goodEntry is the held part of a tag entry; pendingEntry, the pending one.
func goodEntry(e cache.TagEntry) cache.TagEntry {
	return cache.TagEntry{Digest: e.Digest, MediaType: e.MediaType, Size: e.Size, CheckedAt: e.CheckedAt}
}

func pendingEntry(e cache.TagEntry) cache.TagEntry {
	return cache.TagEntry{Digest: e.Pending, MediaType: e.PendingType, Size: e.PendingSize, CheckedAt: e.CheckedAt}
}

// revalidateWait is how long a client waits for a tag's revalidation when
// a last good answer exists; past it, it gets that answer (stale) and the
// revalidation goes on for the next client.
var revalidateWait = 5 * time.Second

// errTagGone marks the upstream's 404 for a tag itself (not for the
// manifest it names): only then is the cached tag forgotten.
var errTagGone = errors.New("tag not found upstream")

// revalidateTag asks the upstream what a tag points at (a HEAD; a GET for
// a tag never seen by a GET, without a shared tier), unless a fresh pending digest says already,
// and moves the tag once that manifest is held.
func (u *upstreamState) revalidateTag(ctx context.Context, key cache.TagKey, old cache.TagEntry, found, fresh, head bool) (tagResult, error) {
	s := u.s
	good := found && old.Digest != ""
	var (
		d    digest.Digest
		mt   string
		size = int64(-1)
	)
	switch {
	case fresh:
		d, mt, size = old.Pending, old.PendingType, old.PendingSize
	case good || head || found || s.shared != nil:
		// A HEAD first; also for a tag never seen when a shared tier
		// may hold its manifest: a replica with an empty disk GETs
		// nothing the cluster has.
		resp, err := u.client.Manifest(ctx, http.MethodHead, key.Repo, key.Tag)
		if err != nil {
			return tagResult{}, tagError(err)
		}
		resp.Body.Close()
		if hd, err := parseDigest(resp.Header.Get(HeaderContentDigest)); err == nil {
			d, mt, size = hd, manifest.MediaType(resp.Header.Get("Content-Type")), resp.ContentLength
		}
		if good && d == old.Digest {
			e := goodEntry(old)
			e.CheckedAt = s.now()
			return tagResult{entry: e, held: true, revalidated: true}, s.store.PutTag(ctx, key, e)
		}
	}
	if d == "" {
		// No usable digest header: GET by tag.
		m, err := u.fetchManifest(ctx, key.Repo, key.Tag, "")
		if err != nil {
			return tagResult{}, tagError(err)
		}
		return u.moveTag(ctx, key, m)
	}
	if m, _, err := u.getManifest(ctx, key.Repo, d, getOptions{confirmed: true, noFetch: true}); err == nil {
		return u.moveTag(ctx, key, m.Manifest)
	}
	if head && mt != "" && size >= 0 {
		// Not held, and a HEAD does not fetch: the upstream's answer is
		// the answer, kept as pending beside the last good one.
		e := goodEntry(old)
		e.CheckedAt, e.Pending, e.PendingType, e.PendingSize = s.now(), d, mt, size
		if !good {
			e.Digest, e.MediaType, e.Size = "", "", 0
		}
		return tagResult{entry: pendingEntry(e)}, s.store.PutTag(ctx, key, e)
	}
	m, _, err := u.getManifest(ctx, key.Repo, d, getOptions{confirmed: true})
	if err != nil {
		if good {
			// The tag was seen to move but its manifest cannot be had:
			// the upstream is failing, and the last good answer stands.
			return tagResult{}, fmt.Errorf("%w: tag %s names %s: %w", upstream.ErrUnavailable, key.Tag, d, err)
		}
		return tagResult{}, err
	}
	return u.moveTag(ctx, key, m.Manifest)
}

// tagError marks an upstream 404 for the tag itself.
func tagError(err error) error {
	if errors.Is(err, upstream.ErrNotFound) {
		return fmt.Errorf("%w: %w", errTagGone, err)
	}
	return err
}

// moveTag points a tag at a stored, linked manifest.
func (u *upstreamState) moveTag(ctx context.Context, key cache.TagKey, m cache.Manifest) (tagResult, error) {
	e := cache.TagEntry{Digest: m.Digest, MediaType: m.MediaType, Size: int64(len(m.Data)), CheckedAt: u.s.now()}
	return tagResult{entry: e, held: true}, u.s.store.PutTag(ctx, key, e)
}

func (q *request) setCache(v string) {
	if q.cache == "" {
		q.cache = v
	}
}

func missOrCoalesced(shared bool) string {
	if shared {
		return "coalesced"
	}
	return "miss"
}

// pushedMediaType is a pushed manifest's media type: its Content-Type
// without parameters, else its mediaType field, else its shape.
func pushedMediaType(contentType string, data []byte) (string, error) {
	if contentType != "" {
		mt := manifest.MediaType(contentType)
		if mt == "" {
			return "", &Error{Code: CodeManifestInvalid, Message: "Content-Type is not a manifest media type", Detail: map[string]string{"contentType": contentType}}
		}
		return mt, nil
	}
	if mt := manifest.Infer(data); mt != "" {
		return mt, nil
	}
	return "", &Error{Code: CodeManifestInvalid, Message: "manifest has no media type"}
}

// accepts reports whether a client's Accept headers admit media type mt.
// No Accept header (or only empty ones) admits anything.
func accepts(values []string, mt string) bool {
	if strings.TrimSpace(strings.Join(values, "")) == "" {
		return true
	}
	typ, _, _ := strings.Cut(mt, "/")
	for _, v := range values {
		for part := range strings.SplitSeq(v, ",") {
			a, _, _ := strings.Cut(part, ";")
			a = strings.TrimSpace(a)
			if a == mt || a == "*/*" || a == typ+"/*" {
				return true
			}
		}
	}
	return false
}
