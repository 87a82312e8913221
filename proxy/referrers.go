package proxy

import (
	"bytes"
	"context"
	"errors"
	"mime"
	"net/http"
	"net/url"
	"strconv"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/referrers"
	"github.com/ocimirror/ocimirror/upstream"
)

// maxCandidates bounds how many referrers named by an upstream are fetched
// and checked for one answer.
const maxCandidates = 1000

// maxReferrerPages bounds the pages of an upstream referrers answer followed.
const maxReferrerPages = 100

// referrers serves GET /v2/<name>/referrers/<digest> for every repository:
// 200 with an OCI index for any valid digest, filtered by artifactType
// when asked (and said so in OCI-Filters-Applied), all in one response up
// to 4 MiB and paged with Link beyond.
func (s *Server) referrers(w http.ResponseWriter, r *http.Request, q *request) error {
	if err := q.parseDigestVar(r); err != nil {
		return err
	}
	d := q.dgst
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

// referrersOf is the union of what is known of a subject's referrers. The
// upstream's referrers API and its fallback tag index name candidates;
// each candidate's manifest is fetched once (then cached) and joins the
// answer only if it carries the subject, described from its own bytes.
// With every manifest with that subject ocimirror has cached or been
// pushed, indexed as it was stored, that is the answer. Upstream failures
// never fail it: the last known upstream part is used, or none, and
// candidates that cannot be fetched now are listed as the upstream
// describes them.
func (s *Server) referrersOf(ctx context.Context, q *request, subject digest.Digest) ([]v1.Descriptor, error) {
	key := cache.ReferrerKey{Upstream: q.up.name, Repo: q.repo, Subject: subject}
	if q.up.hosted {
		local, err := s.store.ListReferrers(ctx, key)
		return referrers.Merge(local), err
	}
	candidates := append(s.upstreamReferrers(ctx, q, key), s.fallbackEntries(ctx, q, key)...)
	local, err := s.store.ListReferrers(ctx, key)
	if err != nil {
		return nil, err
	}
	indexed := make(map[digest.Digest]bool, len(local))
	for _, d := range local {
		indexed[d.Digest] = true
	}
	var unverified []v1.Descriptor
	added := false
	for _, c := range candidates[:min(len(candidates), maxCandidates)] {
		if indexed[c.Digest] {
			continue
		}
		indexed[c.Digest] = true
		m, how, err := s.manifestFor(ctx, q.up, q.repo, c.Digest)
		if err != nil {
			s.log.Warn("fetching a listed referrer", "upstream", q.up.name, "repo", q.repo, "digest", c.Digest, "err", err)
			unverified = append(unverified, c)
			continue
		}
		if referrers.Subject(m.Data) != subject {
			continue // it does not refer to this subject: dropped
		}
		if how == "hit" {
			s.observe(ctx, q.up.name, q.repo, m) // cached before it was indexed
		}
		added = true
	}
	if added {
		if local, err = s.store.ListReferrers(ctx, key); err != nil {
			return nil, err
		}
	}
	return referrers.Merge(local, unverified), nil
}

// fallbackEntries returns the entries of the upstream's fallback tag index
// of a subject: a tag like any other (TTL, HEAD revalidation, stale on
// failure); its absence is remembered for the TTL too.
func (s *Server) fallbackEntries(ctx context.Context, q *request, key cache.ReferrerKey) []v1.Descriptor {
	tk := cache.TagKey{Upstream: q.up.name, Repo: q.repo, Tag: referrers.FallbackTag(key.Subject)}
	if at, ok := s.fallbackAbsent.Get(tk); ok && s.now().Sub(at) < q.up.tagTTL {
		return nil
	}
	e, _, err := s.resolveTagEntry(ctx, q.up, tk, false)
	if err != nil {
		if errors.Is(err, upstream.ErrNotFound) || errors.Is(err, upstream.ErrDenied) {
			s.fallbackAbsent.Add(tk, s.now())
		} else {
			s.log.Warn("reading the upstream's referrers fallback tag", "upstream", q.up.name, "repo", q.repo, "tag", tk.Tag, "err", err)
		}
		return nil
	}
	s.fallbackAbsent.Remove(tk)
	idx, _, err := s.manifestFor(ctx, q.up, q.repo, e.Digest)
	if err != nil {
		s.log.Warn("reading the upstream's referrers fallback index", "upstream", q.up.name, "repo", q.repo, "tag", tk.Tag, "err", err)
		return nil
	}
	ds, err := referrers.ParseIndex(idx.Data)
	if err != nil {
		s.log.Warn("the upstream's referrers fallback tag is not an index", "upstream", q.up.name, "repo", q.repo, "tag", tk.Tag, "err", err)
		return nil
	}
	return ds
}

// upstreamReferrers returns the upstream referrers API's answer: cached
// for the tag TTL, nothing when the repository has no such API (a state
// remembered for an hour), the last known answer when the upstream fails.
func (s *Server) upstreamReferrers(ctx context.Context, q *request, key cache.ReferrerKey) []v1.Descriptor {
	ck := capKey(q.up, q.repo)
	if s.refCaps.Get(ck, s.now()) == referrers.Unsupported {
		return nil
	}
	old, err := s.store.GetUpstreamReferrers(ctx, key)
	known := err == nil
	if known && s.now().Sub(old.CheckedAt) < q.up.tagTTL {
		q.setCache("hit")
		return old.Descriptors
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
			return old.Descriptors
		}
		return nil
	}
	q.setCache("miss")
	return v.([]v1.Descriptor)
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
