package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"mime"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/referrers"
	"github.com/ocimirror/ocimirror/upstream"
)

// Bounds of what one referrers answer may cost: candidates are the
// referrers an upstream names (its referrers API, its fallback tag index).
const (
	// maxCandidates bounds the candidates considered for one answer.
	maxCandidates = 1000
	// maxCandidateFetches bounds the candidates fetched from the upstream
	// for one answer; the rest wait for a later request.
	maxCandidateFetches = 128
	// candidateWorkers is how many candidates are fetched at once.
	candidateWorkers = 4
	// maxReferrerPages bounds the pages of an upstream referrers answer followed.
	maxReferrerPages = 100
	// candidateRetry is how long a candidate that failed transiently (a
	// timeout, a 5xx, a 429) is left out before it is tried again; one
	// that is definitely not a referrer (a 404, another subject, not an
	// image manifest or index) is left out for the tag TTL.
	candidateRetry = 5 * time.Second
)

// HeaderWarning carries what a client should know of an answer that may
// be incomplete (the distribution spec's Warning: 299 - "...").
const HeaderWarning = "Warning"

// referrersAnswer is a subject's verified referrers, and why the list may
// be incomplete.
type referrersAnswer struct {
	descriptors []v1.Descriptor
	warnings    []string
	// sources are those that named at least one referrer (refSource*).
	sources uint8
}

// refMissKey names a candidate that failed its check for a subject.
type refMissKey struct {
	repo    cache.RepoKey
	subject digest.Digest
	digest  digest.Digest
}

// refMiss is a remembered failure: until when, and whether it may pass.
type refMiss struct {
	until     time.Time
	transient bool
}

// referrers serves GET /v2/<name>/referrers/<digest> for every repository:
// 200 with an OCI index for any valid digest, filtered by artifactType
// when asked (and said so in OCI-Filters-Applied), all in one response up
// to 4 MiB and paged with Link beyond. Every descriptor listed is of a
// manifest ocimirror holds for the repository and has checked to carry
// the subject, described from its own bytes.
func (s *Server) referrers(w http.ResponseWriter, r *http.Request, q *request) error {
	if err := q.parseDigestVar(r); err != nil {
		return err
	}
	d := q.dgst
	ans, err := q.src.referrers(r.Context(), q, d)
	if err != nil {
		return err
	}
	if q.up != nil {
		s.metrics.referrerSources(ans.sources)
	}
	ds := referrers.Merge(ans.descriptors)
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
	for _, warn := range ans.warnings {
		h.Add(HeaderWarning, `299 - `+strconv.Quote(warn))
	}
	h.Set("Content-Type", v1.MediaTypeImageIndex)
	h.Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(http.StatusOK)
	if r.Method != http.MethodHead {
		_, _ = w.Write(body)
	}
	return nil
}

// referrers implements source. The upstream's referrers API and its
// fallback tag index name candidates. A candidate joins the answer only
// once its manifest has been fetched (or found held) and checked to be an
// OCI image manifest or index with that subject; it is then indexed, and
// listed from the index, described from its own bytes. Malformed entries
// are dropped without a request; a definite failure is remembered for the
// tag TTL, a transient one for candidateRetry, and either way the
// candidate is left out (a Warning says the list may be incomplete when
// it might yet be a referrer). The upstream work of one answer is bounded,
// and stops when the client goes.
func (u *upstreamState) referrers(ctx context.Context, q *request, subject digest.Digest) (referrersAnswer, error) {
	s := u.s
	key := q.referrerKey(subject)
	var ans referrersAnswer
	fromAPI, warn := u.upstreamReferrers(ctx, q, key)
	ans.warn(warn)
	fromTag, warn := u.fallbackEntries(ctx, q, key)
	ans.warn(warn)
	local, err := s.store.ListReferrers(ctx, key)
	if err != nil {
		return ans, err
	}
	for _, src := range []struct {
		ds  []v1.Descriptor
		bit uint8
	}{{fromAPI, refSourceAPI}, {fromTag, refSourceFallbackTag}, {local, refSourceLocal}} {
		if len(src.ds) > 0 {
			ans.sources |= src.bit
		}
	}
	seen := make(map[digest.Digest]bool, len(local))
	for _, d := range local {
		seen[d.Digest] = true
	}
	var (
		fetch     []v1.Descriptor
		malformed []string
		waiting   int // transient failures remembered: may yet be referrers
		cut       int // over maxCandidates or maxCandidateFetches
		now       = s.now()
	)
	for _, set := range [][]v1.Descriptor{fromAPI, fromTag} {
		for _, c := range set {
			if seen[c.Digest] {
				continue
			}
			seen[c.Digest] = true
			if why := referrers.Malformed(c); why != "" {
				malformed = append(malformed, fmt.Sprintf("%.80q (%s)", c.Digest, why))
				continue
			}
			if miss, ok := s.refMisses.Get(refMissKey{q.key(), subject, c.Digest}); ok && now.Before(miss.until) {
				if miss.transient {
					waiting++
				}
				continue
			}
			if len(fetch) == maxCandidateFetches {
				cut++
				continue
			}
			fetch = append(fetch, c)
		}
	}
	if len(malformed) > 0 {
		s.log.Warn("the upstream names malformed referrers; dropped", "upstream", u.name, "repo", q.repo, "subject", subject,
			"count", len(malformed), "first", malformed[:min(len(malformed), 5)])
	}
	added, failed := u.verifyCandidates(ctx, q, subject, fetch)
	if waiting += failed; waiting > 0 {
		ans.warn(fmt.Sprintf("%d referrers named by the upstream could not be checked now; the list may be incomplete", waiting))
	}
	if cut > 0 {
		s.log.Warn("referrers answer cut: too many unchecked candidates", "upstream", u.name, "repo", q.repo, "subject", subject,
			"checked", len(fetch), "left", cut)
		ans.warn(fmt.Sprintf("%d referrers named by the upstream are not checked yet; the list is incomplete (ask again)", cut))
	}
	if added {
		if local, err = s.store.ListReferrers(ctx, key); err != nil {
			return ans, err
		}
	}
	ans.descriptors = local
	return ans, nil
}

func (a *referrersAnswer) warn(w string) {
	if w != "" {
		a.warnings = append(a.warnings, w)
	}
}

// verifyCandidates fetches and checks candidates, candidateWorkers at a
// time, under the client's context: when it goes, the work stops. It
// reports whether any joined the index, and how many failed transiently.
func (u *upstreamState) verifyCandidates(ctx context.Context, q *request, subject digest.Digest, cs []v1.Descriptor) (added bool, transient int) {
	s := u.s
	var mu sync.Mutex
	next := make(chan v1.Descriptor)
	var wg sync.WaitGroup
	for range min(candidateWorkers, len(cs)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for c := range next {
				ok, err := u.verifyCandidate(ctx, q, subject, c)
				if ctx.Err() != nil {
					continue // the client went: nothing learned of the candidate
				}
				mu.Lock()
				switch {
				case ok:
					added = true
				case err != nil && candidateMayPass(err):
					transient++
					s.refMisses.Add(refMissKey{q.key(), subject, c.Digest}, refMiss{until: s.now().Add(min(candidateRetry, u.tagTTL)), transient: true})
					s.log.Warn("checking a referrer named by the upstream", "upstream", u.name, "repo", q.repo, "digest", c.Digest, "err", err)
				default:
					s.refMisses.Add(refMissKey{q.key(), subject, c.Digest}, refMiss{until: s.now().Add(u.tagTTL)})
					s.log.Debug("the upstream names a referrer that is not one", "upstream", u.name, "repo", q.repo, "digest", c.Digest, "err", err)
				}
				mu.Unlock()
			}
		}()
	}
	for _, c := range cs {
		select {
		case next <- c:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
	}
	close(next)
	wg.Wait()
	return added, transient
}

// verifyCandidate fetches one candidate for the repository (or finds it
// held) and indexes it when it is an OCI image manifest or index with the
// subject. ok false with a nil error: it is something else.
func (u *upstreamState) verifyCandidate(ctx context.Context, q *request, subject digest.Digest, c v1.Descriptor) (bool, error) {
	m, _, err := u.getManifest(ctx, q.repo, c.Digest, getOptions{abandonable: true})
	if err != nil {
		return false, err
	}
	desc, subj, err := referrers.Describe(m.Digest, m.MediaType, m.Data)
	if err != nil || subj == nil || subj.Digest != subject {
		return false, nil
	}
	return true, u.s.store.PutReferrer(ctx, q.referrerKey(subject), desc)
}

// candidateMayPass reports whether a candidate's failure may pass: the
// upstream was down, slow or limiting, or sent something other than the
// bytes of the digest. A 404, a denial, or bytes of the digest that are
// not a manifest of their type are definite.
func candidateMayPass(err error) bool {
	switch {
	case errors.Is(err, upstream.ErrNotFound), errors.Is(err, upstream.ErrDenied), errors.Is(err, errNotManifest):
		return false
	}
	return true
}

// fallbackEntries returns the entries of the upstream's fallback tag index
// of a subject: a tag like any other (TTL, HEAD revalidation, stale on
// failure); its absence is remembered for the TTL too. The warning says
// when the index could not be read.
func (u *upstreamState) fallbackEntries(ctx context.Context, q *request, key cache.ReferrerKey) ([]v1.Descriptor, string) {
	s := u.s
	tk := cache.TagKey{Upstream: u.name, Repo: q.repo, Tag: referrers.FallbackTag(key.Subject)}
	if at, ok := s.fallbackAbsent.Get(tk); ok && s.now().Sub(at) < u.tagTTL {
		return nil, ""
	}
	r, _, err := u.resolveTag(ctx, tk, false)
	if err != nil {
		if errors.Is(err, upstream.ErrNotFound) || errors.Is(err, upstream.ErrDenied) {
			s.fallbackAbsent.Add(tk, s.now())
			return nil, ""
		}
		if errors.Is(err, upstream.ErrOffline) {
			// An offline upstream is what the store keeps of it: with a
			// referrers answer kept for the subject (fetched, or imported
			// from a bundle), a fallback tag never stored adds nothing.
			if _, err := s.store.GetUpstreamReferrers(ctx, key); err == nil {
				return nil, ""
			}
		}
		s.log.Warn("reading the upstream's referrers fallback tag", "upstream", u.name, "repo", q.repo, "tag", tk.Tag, "err", err)
		return nil, "the upstream's referrers fallback tag could not be read; the list may be incomplete"
	}
	s.fallbackAbsent.Remove(tk)
	idx, _, err := u.getManifest(ctx, q.repo, r.entry.Digest, getOptions{})
	if err != nil {
		s.log.Warn("reading the upstream's referrers fallback index", "upstream", u.name, "repo", q.repo, "tag", tk.Tag, "err", err)
		return nil, "the upstream's referrers fallback index could not be read; the list may be incomplete"
	}
	ds, err := referrers.ParseIndex(idx.Data)
	if err != nil {
		s.log.Warn("the upstream's referrers fallback tag is not an index", "upstream", u.name, "repo", q.repo, "tag", tk.Tag, "err", err)
		return nil, ""
	}
	return ds, ""
}

// upstreamReferrers returns the upstream referrers API's answer: cached
// for the tag TTL, nothing when the repository has no such API (a state
// remembered for an hour), the last known answer when the upstream fails.
// The warning says when the answer could not be had.
func (u *upstreamState) upstreamReferrers(ctx context.Context, q *request, key cache.ReferrerKey) ([]v1.Descriptor, string) {
	s := u.s
	ck := capKey(u, q.repo)
	if s.refCaps.Get(ck, s.now()) == referrers.Unsupported {
		return nil, ""
	}
	old, err := s.store.GetUpstreamReferrers(ctx, key)
	known := err == nil
	if known && s.now().Sub(old.CheckedAt) < u.tagTTL {
		q.setCache("hit")
		return old.Descriptors, ""
	}
	v, err, _ := s.flightDo(ctx, "R\x00"+key.Upstream+"\x00"+key.Repo+"\x00"+key.Subject.String(), func(ctx context.Context) (any, error) {
		ds, support, err := fetchReferrers(ctx, u.client, q.repo, key.Subject)
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
		s.log.Warn("upstream referrers API failed; using the last known answer", "upstream", u.name, "repo", q.repo,
			"subject", key.Subject, "known", known, "err", err)
		if known {
			q.setCache("stale")
			return old.Descriptors, ""
		}
		return nil, "the upstream's referrers API could not be read; the list may be incomplete"
	}
	q.setCache("miss")
	return v.([]v1.Descriptor), ""
}

// fetchReferrers calls an upstream's referrers API and classifies the
// answer as oras and regclient do: 200 with the OCI index type is the API;
// a bare 404, 400, 405, 406 or 501, or another type, is its absence. A 404
// for an unknown repository, or a denial, says nothing either way. Only
// what identifies a candidate is kept of each descriptor (digest, media
// type, size), at most maxCandidates of them.
func fetchReferrers(ctx context.Context, c *upstream.Client, repo string, subject digest.Digest) ([]v1.Descriptor, referrers.Support, error) {
	var all []v1.Descriptor
	var query url.Values
	for page := 0; page < maxReferrerPages && len(all) < maxCandidates; page++ {
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
		for _, d := range ds[:min(len(ds), maxCandidates-len(all))] {
			all = append(all, v1.Descriptor{MediaType: d.MediaType, Digest: d.Digest, Size: d.Size})
		}
		if query = nextPage(resp.Header.Get("Link")); query == nil {
			break
		}
	}
	return all, referrers.Supported, nil
}
