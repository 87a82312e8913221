package proxy

import (
	"context"
	"errors"
	"net/http"
	"net/url"
	"strconv"

	"github.com/gorilla/mux"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/upstream"
)

// referrers serves GET /v2/<name>/referrers/<digest> by passing the request
// through to the upstream, its answer (404 included) unchanged.
func (s *Server) referrers(w http.ResponseWriter, r *http.Request, q *request) error {
	q.ref = mux.Vars(r)["digest"]
	d, err := parseDigest(q.ref)
	if err != nil {
		return err
	}
	q.dgst = d
	query := url.Values{}
	if at := r.URL.Query().Get("artifactType"); at != "" {
		query.Set("artifactType", at)
	}
	ctx, cancel := context.WithTimeout(r.Context(), upstreamFetchTimeout)
	defer cancel()
	resp, err := q.up.client.Do(ctx, upstream.Request{Method: http.MethodGet, Repo: q.repo, Path: "referrers/" + d.String(),
		Query: query, Header: http.Header{"Accept": {v1.MediaTypeImageIndex}}})
	if se, ok := errors.AsType[*upstream.StatusError](err); ok && se.Status == http.StatusNotFound {
		// A bare 404 tells oras and crane the API is missing here.
		if ct := se.Header.Get("Content-Type"); ct != "" {
			w.Header().Set("Content-Type", ct)
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(se.Body)))
		w.WriteHeader(http.StatusNotFound)
		_, _ = w.Write(se.Body)
		return nil
	}
	if err != nil {
		return err
	}
	body, err := upstream.ReadLimited(resp)
	if err != nil {
		return err
	}
	h := w.Header()
	for _, k := range []string{"Content-Type", HeaderFiltersApplied} {
		if v := resp.Header.Get(k); v != "" {
			h.Set(k, v)
		}
	}
	h.Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(resp.StatusCode)
	if r.Method != http.MethodHead {
		_, _ = w.Write(body)
	}
	return nil
}
