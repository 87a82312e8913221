package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"mime"
	"net/http"
	"strconv"
	"strings"

	"github.com/gorilla/mux"
	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/upstream"
)

// manifest serves GET and HEAD /v2/<name>/manifests/<reference>.
func (s *Server) manifest(w http.ResponseWriter, r *http.Request, q *request) error {
	if err := q.parseReference(mux.Vars(r)["reference"]); err != nil {
		return err
	}
	ctx := r.Context()
	head := r.Method == http.MethodHead
	var (
		d    = q.dgst
		mt   string
		size int64
		data []byte
	)
	if d == "" {
		e, err := s.resolveTag(ctx, q, head)
		if err != nil {
			return err
		}
		d, mt, size = e.Digest, e.MediaType, e.Size
	}
	if !head || q.dgst != "" {
		m, err := s.manifestByDigest(ctx, q, d, head)
		if err != nil {
			return err
		}
		d, mt, size, data = m.Digest, m.MediaType, m.size(), m.Data
	}
	if !accepts(r.Header.Values("Accept"), mt) {
		return &Error{Code: CodeManifestUnknown, Message: "manifest is not of a media type the client accepts",
			Detail: map[string]string{"mediaType": mt, "digest": d.String()}}
	}
	h := w.Header()
	h.Set("Content-Type", mt)
	h.Set("Content-Length", strconv.FormatInt(size, 10))
	h.Set(HeaderContentDigest, d.String())
	h.Set("Etag", `"`+d.String()+`"`)
	w.WriteHeader(http.StatusOK)
	if !head {
		_, _ = w.Write(data)
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

// manifestByDigest returns a manifest from cache, or fetches, verifies and
// caches it. Concurrent misses share one upstream GET. A HEAD miss is a HEAD
// upstream and caches nothing. A hosted repository answers only for the
// manifests linked to it.
func (s *Server) manifestByDigest(ctx context.Context, q *request, d digest.Digest, head bool) (manifestInfo, error) {
	if q.up.hosted {
		ok, err := s.store.Linked(ctx, q.repo, cache.LinkManifest, d)
		if err != nil {
			return manifestInfo{}, err
		}
		if !ok {
			return manifestInfo{}, ErrManifestUnknown(map[string]string{"name": q.name, "reference": d.String()})
		}
		m, err := s.store.GetManifest(ctx, d)
		if errors.Is(err, cache.ErrNotFound) {
			return manifestInfo{}, ErrManifestUnknown(map[string]string{"name": q.name, "reference": d.String()})
		}
		return manifestInfo{Manifest: m}, err
	}
	if head {
		m, err := s.store.GetManifest(ctx, d)
		if err == nil {
			q.setCache("hit")
			return manifestInfo{Manifest: m}, nil
		}
		if !errors.Is(err, cache.ErrNotFound) {
			return manifestInfo{}, err
		}
		q.setCache("miss")
		return s.headManifest(ctx, q, d)
	}
	m, how, err := s.manifestFor(ctx, q.up, q.repo, d)
	if err != nil {
		return manifestInfo{}, err
	}
	q.setCache(how)
	return manifestInfo{Manifest: m}, nil
}

// manifestFor returns a manifest of an upstream repository by digest: from
// cache ("hit"), or fetched once for all concurrent callers ("miss",
// "coalesced").
func (s *Server) manifestFor(ctx context.Context, up *upstreamState, repo string, d digest.Digest) (cache.Manifest, string, error) {
	m, err := s.store.GetManifest(ctx, d)
	if err == nil {
		return m, "hit", nil
	}
	if !errors.Is(err, cache.ErrNotFound) {
		return cache.Manifest{}, "", err
	}
	v, err, shared := s.flightDo(ctx, "m\x00"+d.String(), func(ctx context.Context) (any, error) {
		return s.fetchManifest(ctx, up, repo, d.String(), d)
	})
	if err != nil {
		return cache.Manifest{}, "", err
	}
	return v.(cache.Manifest), missOrCoalesced(shared), nil
}

// headManifest checks a manifest digest upstream without fetching it.
func (s *Server) headManifest(ctx context.Context, q *request, d digest.Digest) (manifestInfo, error) {
	ctx, cancel := context.WithTimeout(ctx, upstreamFetchTimeout)
	defer cancel()
	resp, err := q.up.client.Manifest(ctx, http.MethodHead, q.repo, d.String())
	if err != nil {
		return manifestInfo{}, err
	}
	resp.Body.Close()
	if got := resp.Header.Get(HeaderContentDigest); got != "" && got != d.String() {
		return manifestInfo{}, fmt.Errorf("%w: HEAD %s answered digest %s", upstream.ErrInvalidResponse, d, got)
	}
	mt := contentType(resp.Header.Get("Content-Type"), nil)
	if mt == "" || resp.ContentLength < 0 {
		// Without type and length the answer cannot be given; fetch it.
		return s.manifestByDigest(ctx, q, d, false)
	}
	return manifestInfo{Manifest: cache.Manifest{Digest: d, MediaType: mt}, headSize: resp.ContentLength}, nil
}

// fetchManifest GETs a manifest by tag or digest, verifies it against want
// (when a digest) or the upstream's digest header, and stores it.
func (s *Server) fetchManifest(ctx context.Context, up *upstreamState, repo, ref string, want digest.Digest) (cache.Manifest, error) {
	resp, err := up.client.Manifest(ctx, http.MethodGet, repo, ref)
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
		return cache.Manifest{}, fmt.Errorf("%w: manifest %s of %s/%s hashes to %s", errDigestMismatch, ref, up.name, repo, got)
	}
	mt := contentType(resp.Header.Get("Content-Type"), data)
	if mt == "" {
		return cache.Manifest{}, fmt.Errorf("%w: manifest %s of %s/%s has no media type", upstream.ErrInvalidResponse, ref, up.name, repo)
	}
	m := cache.Manifest{Digest: want, MediaType: mt, Data: data}
	if err := s.store.PutManifest(ctx, m); err != nil {
		return cache.Manifest{}, err
	}
	s.observe(ctx, up.name, repo, m)
	return m, nil
}

// resolveTag returns what the request's tag points at and records how it
// was answered.
func (s *Server) resolveTag(ctx context.Context, q *request, head bool) (cache.TagEntry, error) {
	key := cache.TagKey{Upstream: q.up.name, Repo: q.repo, Tag: q.ref}
	if q.up.hosted {
		e, err := s.store.GetTag(ctx, key)
		if errors.Is(err, cache.ErrNotFound) {
			return e, ErrManifestUnknown(map[string]string{"name": q.name, "reference": q.ref})
		}
		return e, err
	}
	e, how, err := s.resolveTagEntry(ctx, q.up, key, head)
	q.setCache(how)
	return e, err
}

// resolveTagEntry returns what an upstream tag points at: from cache within
// its TTL, else revalidated upstream
// with HEAD (GET for a tag never seen by a GET), else, when the upstream
// fails transiently, the last known answer.
func (s *Server) resolveTagEntry(ctx context.Context, up *upstreamState, key cache.TagKey, head bool) (cache.TagEntry, string, error) {
	old, err := s.store.GetTag(ctx, key)
	known := err == nil
	if err != nil && !errors.Is(err, cache.ErrNotFound) {
		return cache.TagEntry{}, "", err
	}
	if known && s.now().Sub(old.CheckedAt) < up.tagTTL {
		return old, "hit", nil
	}
	v, err, shared := s.flightDo(ctx, "t\x00"+key.Upstream+"\x00"+key.Repo+"\x00"+key.Tag, func(ctx context.Context) (any, error) {
		return s.revalidateTag(ctx, up, key, old, known, head)
	})
	if err != nil {
		if known && upstream.Transient(err) {
			s.log.Warn("upstream failed; serving last known tag", "upstream", up.name, "repo", key.Repo, "tag", key.Tag,
				"digest", old.Digest, "err", err)
			return old, "stale", nil
		}
		if errors.Is(err, upstream.ErrNotFound) && known {
			_ = s.store.DeleteTag(ctx, key)
		}
		return cache.TagEntry{}, "", err
	}
	r := v.(tagResult)
	switch {
	case shared:
		return r.entry, "coalesced", nil
	case r.revalidated:
		return r.entry, "revalidated", nil
	}
	return r.entry, "miss", nil
}

type tagResult struct {
	entry       cache.TagEntry
	revalidated bool // the upstream confirmed the cached digest
}

func (s *Server) revalidateTag(ctx context.Context, up *upstreamState, key cache.TagKey, old cache.TagEntry, known, head bool) (tagResult, error) {
	if known || head {
		resp, err := up.client.Manifest(ctx, http.MethodHead, key.Repo, key.Tag)
		if err != nil {
			return tagResult{}, err
		}
		resp.Body.Close()
		d, derr := parseDigest(resp.Header.Get(HeaderContentDigest))
		mt := contentType(resp.Header.Get("Content-Type"), nil)
		switch {
		case derr == nil && known && d == old.Digest:
			old.CheckedAt = s.now()
			return tagResult{entry: old, revalidated: true}, s.store.PutTag(ctx, key, old)
		case derr == nil && mt != "" && resp.ContentLength >= 0:
			e := cache.TagEntry{Digest: d, MediaType: mt, Size: resp.ContentLength, CheckedAt: s.now()}
			return tagResult{entry: e}, s.store.PutTag(ctx, key, e)
		}
		// No usable digest header: fall through to a GET.
	}
	m, err := s.fetchManifest(ctx, up, key.Repo, key.Tag, "")
	if err != nil {
		return tagResult{}, err
	}
	e := cache.TagEntry{Digest: m.Digest, MediaType: m.MediaType, Size: int64(len(m.Data)), CheckedAt: s.now()}
	return tagResult{entry: e}, s.store.PutTag(ctx, key, e)
}

// flightDo runs fn once for concurrent callers of key, detached from the
// caller: a client that hangs up neither cancels the fetch nor loses it for
// the others. The caller stops waiting when its own context ends.
func (s *Server) flightDo(ctx context.Context, key string, fn func(context.Context) (any, error)) (any, error, bool) {
	ran := false // written by the flight before its result is sent
	ch := s.flight.DoChan(key, func() (any, error) {
		ran = true
		s.work.Add(1)
		defer s.work.Done()
		fctx, cancel := s.detached(ctx, upstreamFetchTimeout)
		defer cancel()
		return fn(fctx)
	})
	select {
	case r := <-ch:
		return r.Val, r.Err, !ran
	case <-ctx.Done():
		return nil, ctx.Err(), false
	}
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

// contentType is a manifest's media type: the upstream's Content-Type
// without parameters, or, when that is missing or generic, the body's
// mediaType field, or its shape.
func contentType(header string, body []byte) string {
	if header != "" {
		if mt, _, err := mime.ParseMediaType(header); err == nil {
			switch mt {
			case "application/octet-stream", "text/plain", "application/json", "binary/octet-stream":
			default:
				return mt
			}
		}
	}
	if body == nil {
		return ""
	}
	var probe struct {
		MediaType string          `json:"mediaType"`
		Manifests json.RawMessage `json:"manifests"`
		Config    json.RawMessage `json:"config"`
	}
	if json.Unmarshal(body, &probe) != nil {
		return ""
	}
	switch {
	case probe.MediaType != "":
		// It becomes a Content-Type header: it must be a media type.
		if mt, _, err := mime.ParseMediaType(probe.MediaType); err == nil && mt == probe.MediaType {
			return mt
		}
		return ""
	case probe.Manifests != nil:
		return v1.MediaTypeImageIndex
	case probe.Config != nil:
		return v1.MediaTypeImageManifest
	}
	return ""
}

// accepts reports whether a client's Accept headers admit media type mt.
// No Accept header admits anything.
func accepts(values []string, mt string) bool {
	if len(values) == 0 {
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
