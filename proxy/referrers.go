package proxy

import (
	"bytes"
	"context"
	"errors"
	"mime"
	"net/http"
	"net/url"
	"strconv"

	"github.com/gorilla/mux"
	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/referrers"
	"github.com/ocimirror/ocimirror/upstream"
)

// maxFallbackEntries bounds how many entries of an upstream fallback index
// are checked.
const maxFallbackEntries = 1000

// maxReferrerPages bounds the pages of an upstream referrers answer followed.
const maxReferrerPages = 100

// referrers serves GET /v2/<name>/referrers/<digest> for every repository:
// 200 with an OCI index for any valid digest, filtered by artifactType
// when asked (and said so in OCI-Filters-Applied), all in one response up
// to 4 MiB and paged with Link beyond.
func (s *Server) referrers(w http.ResponseWriter, r *http.Request, q *request) error {
	q.ref = mux.Vars(r)["digest"]
	d, err := parseDigest(q.ref)
	if err != nil {
		return err
	}
	q.dgst = d
	ds, err := s.referrersOf(r.Context(), q, d)
	if err != nil {
		return err
	}
	query := r.URL.Query()
	h := w.Header()
	at := query.Get("artifactType")
	if at != "" {
		ds = referrers.Filter(ds, at)
		h.Set(HeaderFiltersApplied, "artifactType")
	}
	body, next, err := referrers.Page(ds, query.Get("last"), 0)
	if err != nil {
		return err
	}
	if next != "" {
		nq := url.Values{"last": {next}}
		if at != "" {
			nq.Set("artifactType", at)
		}
		if q.ns != "" {
			nq.Set("ns", q.ns)
		}
		h.Set("Link", "<"+q.clientPath()+"/referrers/"+d.String()+"?"+nq.Encode()+`>; rel="next"`)
	}
	h.Set("Content-Type", v1.MediaTypeImageIndex)
	h.Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(http.StatusOK)
	if r.Method != http.MethodHead {
		_, _ = w.Write(body)
	}
	return nil
}

// referrersOf is the union of what is known of a subject's referrers: the
// manifests with that subject ocimirror has cached or been pushed (which
// include the checked entries of the upstream's fallback tag index) and
// the upstream's referrers API answer. Upstream failures never fail the
// answer: the last known upstream part, or none, is used and logged.
func (s *Server) referrersOf(ctx context.Context, q *request, subject digest.Digest) ([]v1.Descriptor, error) {
	key := cache.ReferrerKey{Upstream: q.up.name, Repo: q.repo, Subject: subject}
	if q.up.hosted {
		local, err := s.store.ListReferrers(ctx, key)
		return referrers.Merge(local), err
	}
	s.checkFallbackIndex(ctx, q, key)
	remote := s.upstreamReferrers(ctx, q, key)
	local, err := s.store.ListReferrers(ctx, key)
	if err != nil {
		return nil, err
	}
	return referrers.Merge(local, remote), nil
}

// checkFallbackIndex reads the upstream's fallback tag index of a subject
// (a tag like any other: TTL, HEAD revalidation, stale on failure) and
// fetches each manifest it lists. Fetched manifests are indexed under
// their own subject as they are cached, so an entry whose manifest does
// not carry this subject never joins the answer. An index is checked once
// per digest.
func (s *Server) checkFallbackIndex(ctx context.Context, q *request, key cache.ReferrerKey) {
	tag := referrers.FallbackTag(key.Subject)
	e, _, err := s.resolveTagEntry(ctx, q.up, cache.TagKey{Upstream: q.up.name, Repo: q.repo, Tag: tag}, false)
	if err != nil {
		if !errors.Is(err, upstream.ErrNotFound) && !errors.Is(err, upstream.ErrDenied) {
			s.log.Warn("reading the upstream's referrers fallback tag", "upstream", q.up.name, "repo", q.repo, "tag", tag, "err", err)
		}
		return
	}
	if seen, ok := s.fallbackSeen.Get(key); ok && seen == e.Digest {
		return
	}
	idx, _, err := s.manifestFor(ctx, q.up, q.repo, e.Digest)
	if err != nil {
		s.log.Warn("reading the upstream's referrers fallback index", "upstream", q.up.name, "repo", q.repo, "tag", tag, "err", err)
		return
	}
	ds, err := referrers.ParseIndex(idx.Data)
	if err != nil {
		s.log.Warn("the upstream's referrers fallback tag is not an index", "upstream", q.up.name, "repo", q.repo, "tag", tag, "err", err)
		s.fallbackSeen.Add(key, e.Digest)
		return
	}
	complete := true
	for _, d := range ds[:min(len(ds), maxFallbackEntries)] {
		m, how, err := s.manifestFor(ctx, q.up, q.repo, d.Digest)
		if err != nil {
			complete = false
			s.log.Warn("fetching a referrer listed in the fallback index", "upstream", q.up.name, "repo", q.repo, "digest", d.Digest, "err", err)
			continue
		}
		if how == "hit" && referrers.Subject(m.Data) == key.Subject {
			s.observe(ctx, q.up.name, q.repo, m) // cached before it was listed
		}
	}
	if complete {
		s.fallbackSeen.Add(key, e.Digest)
	}
}

// upstreamReferrers returns the upstream referrers API's answer: cached
// for the tag TTL, nothing when the repository has no such API (a state
// remembered for an hour), the last known answer when the upstream fails.
// Entries whose cached manifest has another subject are dropped.
func (s *Server) upstreamReferrers(ctx context.Context, q *request, key cache.ReferrerKey) []v1.Descriptor {
	ck := capKey(q.up, q.repo)
	if s.refCaps.Get(ck, s.now()) == referrers.Unsupported {
		return nil
	}
	old, err := s.store.GetUpstreamReferrers(ctx, key)
	known := err == nil
	if known && s.now().Sub(old.CheckedAt) < q.up.tagTTL {
		q.setCache("hit")
		return s.withSubject(ctx, old.Descriptors, key.Subject)
	}
	v, err, _ := s.flightDo(ctx, "R\x00"+key.Upstream+"\x00"+key.Repo+"\x00"+key.Subject.String(), func(ctx context.Context) (any, error) {
		ds, support, err := fetchReferrers(ctx, q.up.client, q.repo, key.Subject)
		if err != nil {
			return nil, err
		}
		s.refCaps.Set(ck, support, s.now())
		if support != referrers.Supported {
			return []v1.Descriptor(nil), nil
		}
		return ds, s.store.PutUpstreamReferrers(ctx, key, cache.UpstreamReferrers{Descriptors: ds, CheckedAt: s.now()})
	})
	if err != nil {
		s.log.Warn("upstream referrers API failed; using the last known answer", "upstream", q.up.name, "repo", q.repo,
			"subject", key.Subject, "known", known, "err", err)
		if known {
			q.setCache("stale")
			return s.withSubject(ctx, old.Descriptors, key.Subject)
		}
		return nil
	}
	q.setCache("miss")
	return s.withSubject(ctx, v.([]v1.Descriptor), key.Subject)
}

// withSubject drops descriptors whose manifest ocimirror holds and finds
// to carry another subject.
func (s *Server) withSubject(ctx context.Context, ds []v1.Descriptor, subject digest.Digest) []v1.Descriptor {
	out := make([]v1.Descriptor, 0, len(ds))
	for _, d := range ds {
		if m, err := s.store.GetManifest(ctx, d.Digest); err == nil && referrers.Subject(m.Data) != subject {
			continue
		}
		out = append(out, d)
	}
	return out
}

// fetchReferrers calls an upstream's referrers API and classifies the
// answer as oras and regclient do: 200 with the OCI index type is the API;
// a bare 404, 400, 405, 406 or 501, or another type, is its absence. A 404
// for an unknown repository, or a denial, says nothing either way.
func fetchReferrers(ctx context.Context, c *upstream.Client, repo string, subject digest.Digest) ([]v1.Descriptor, referrers.Support, error) {
	var all []v1.Descriptor
	var query url.Values
	for page := 0; page < maxReferrerPages; page++ {
		resp, err := c.Do(ctx, upstream.Request{Method: http.MethodGet, Repo: repo, Path: "referrers/" + subject.String(),
			Query: query, Header: http.Header{"Accept": {v1.MediaTypeImageIndex}}})
		if se, ok := errors.AsType[*upstream.StatusError](err); ok {
			switch se.Status {
			case http.StatusNotFound:
				if bytes.Contains(se.Body, []byte(CodeNameUnknown)) {
					return nil, referrers.Unknown, nil
				}
				return nil, referrers.Unsupported, nil
			case http.StatusBadRequest, http.StatusMethodNotAllowed, http.StatusNotAcceptable, http.StatusNotImplemented:
				return nil, referrers.Unsupported, nil
			case http.StatusUnauthorized, http.StatusForbidden:
				return nil, referrers.Unknown, nil
			}
		}
		if err != nil {
			return nil, referrers.Unknown, err
		}
		mt, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type"))
		if resp.StatusCode != http.StatusOK || mt != v1.MediaTypeImageIndex {
			resp.Body.Close()
			return nil, referrers.Unsupported, nil
		}
		body, err := upstream.ReadLimited(resp)
		if err != nil {
			return nil, referrers.Unknown, err
		}
		ds, err := referrers.ParseIndex(body)
		if err != nil {
			return nil, referrers.Unknown, errors.Join(upstream.ErrInvalidResponse, err)
		}
		all = append(all, ds...)
		if query = nextPage(resp.Header.Get("Link")); query == nil {
			break
		}
	}
	return all, referrers.Supported, nil
}
