package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/upstream"
)

// maxTagPages bounds how many pages of an upstream's tag list are followed.
const maxTagPages = 1000

// tagList is an upstream repository's whole tag list, sorted.
type tagList struct {
	tags    []string
	checked time.Time
}

// tags serves GET /v2/<name>/tags/list with n and last. The upstream's
// whole list is fetched (following its pages), cached for the tag TTL, and
// paged here, so paging works the same whatever the upstream supports.
func (s *Server) tags(w http.ResponseWriter, r *http.Request, q *request) error {
	query := r.URL.Query()
	n := -1
	if v := query.Get("n"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 0 {
			return &Error{Code: CodePaginationInvalid, Detail: map[string]string{"n": v}}
		}
	}
	last := query.Get("last")
	list, err := q.src.tagList(r.Context(), q)
	if err != nil {
		return err
	}
	tags := list.tags
	if last != "" {
		i, found := slices.BinarySearch(tags, last)
		if found {
			i++
		}
		tags = tags[i:]
	}
	if n >= 0 && len(tags) > n {
		tags = tags[:n]
		if n > 0 {
			next := url.Values{"n": {strconv.Itoa(n)}, "last": {tags[n-1]}}
			if q.ns != "" {
				next.Set("ns", q.ns)
			}
			w.Header().Set("Link", "<"+q.clientPath()+"/tags/list?"+next.Encode()+`>; rel="next"`)
		}
	}
	if tags == nil {
		tags = []string{}
	}
	name := q.name
	if q.prefix != "" {
		name = q.prefix + "/" + q.name
	}
	body, err := json.Marshal(struct {
		Name string   `json:"name"`
		Tags []string `json:"tags"`
	}{name, tags})
	if err != nil {
		return err
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(http.StatusOK)
	if r.Method != http.MethodHead {
		_, _ = w.Write(body)
	}
	return nil
}

// tagList implements source: the upstream's list cached within the TTL,
// else fetched once for concurrent callers, else stale on a transient
// failure.
func (u *upstreamState) tagList(ctx context.Context, q *request) (tagList, error) {
	s := u.s
	key := u.name + "\x00" + q.repo
	old, known := s.tagLists.Get(key)
	if !known {
		// The last list the upstream answered, kept in the store: what an
		// offline or down upstream's repository lists. It is asked for
		// anew first (a push may have dropped the list from memory): held
		// in memory as never checked, so that a down upstream's list is
		// not read from the store again on every request.
		if st, err := s.store.GetUpstreamTags(ctx, u.name, q.repo); err == nil {
			old, known = tagList{tags: st.Tags}, true
			s.tagLists.Add(key, old)
		} else if !errors.Is(err, cache.ErrNotFound) {
			return tagList{}, err
		}
	}
	if known && s.now().Sub(old.checked) < u.tagTTL {
		q.setCache("hit")
		return old, nil
	}
	v, err, shared := s.flightDo(ctx, "l\x00"+key, func(ctx context.Context) (any, error) {
		tags, err := u.refreshTags(ctx, q.repo)
		return tagList{tags: tags, checked: s.now()}, err
	})
	if err != nil {
		if known && upstream.Transient(err) {
			if !errors.Is(err, upstream.ErrOffline) {
				s.log.Warn("upstream failed; serving last known tag list", "upstream", u.name, "repo", q.repo, "err", err)
			}
			q.setCache("stale")
			return old, nil
		}
		return tagList{}, err
	}
	q.setCache(missOrCoalesced(shared))
	return v.(tagList), nil
}

// refreshTags fetches a repository's tag list from the upstream, and keeps
// it in memory and in the store.
func (u *upstreamState) refreshTags(ctx context.Context, repo string) ([]string, error) {
	s := u.s
	tags, err := fetchTags(ctx, u.client, repo)
	if err != nil {
		return nil, err
	}
	now := s.now()
	s.tagLists.Add(u.name+"\x00"+repo, tagList{tags: tags, checked: now})
	if err := s.store.PutUpstreamTags(ctx, u.name, repo, cache.UpstreamTags{Tags: tags, CheckedAt: now}); err != nil {
		s.log.Warn("storing an upstream tag list", "upstream", u.name, "repo", repo, "err", err)
	}
	return tags, nil
}

// fetchTags reads every page of an upstream's tag list, at most
// maxTagPages pages and maxTagListBytes of bodies: a longer list is an
// upstream error rather than a truncated answer.
func fetchTags(ctx context.Context, c *upstream.Client, repo string) ([]string, error) {
	var all []string
	var query url.Values
	total := 0
	for page := 0; ; page++ {
		if page == maxTagPages {
			return nil, fmt.Errorf("%w: tag list of more than %d pages", upstream.ErrInvalidResponse, maxTagPages)
		}
		resp, err := c.Do(ctx, upstream.Request{Method: http.MethodGet, Repo: repo, Path: "tags/list", Query: query})
		if err != nil {
			return nil, err
		}
		body, err := upstream.ReadLimited(resp)
		if err != nil {
			return nil, err
		}
		if total += len(body); total > maxTagListBytes {
			return nil, fmt.Errorf("%w: tag list larger than %d bytes", upstream.ErrInvalidResponse, maxTagListBytes)
		}
		var tl struct {
			Tags []string `json:"tags"`
		}
		if err := json.Unmarshal(body, &tl); err != nil {
			return nil, fmt.Errorf("%w: tag list: %v", upstream.ErrInvalidResponse, err)
		}
		for _, t := range tl.Tags {
			if validTag(t) { // a tag no client could ask for is not listed
				all = append(all, t)
			}
		}
		if query = nextPage(resp.Header.Get("Link")); query == nil {
			break
		}
	}
	slices.Sort(all)
	return slices.Compact(all), nil
}

// nextPage returns the query of a Link: <...>; rel="next" header, or nil.
func nextPage(link string) url.Values {
	for l := range strings.SplitSeq(link, ",") {
		target, params, ok := strings.Cut(l, ";")
		if !ok || !strings.Contains(params, `rel="next"`) {
			continue
		}
		target = strings.Trim(strings.TrimSpace(target), "<>")
		u, err := url.Parse(target)
		if err != nil || u.RawQuery == "" {
			return nil
		}
		return u.Query()
	}
	return nil
}
