package proxy

import (
	"crypto/subtle"
	"net/http"
	"strings"

	"github.com/gorilla/mux"

	"github.com/ocimirror/ocimirror/auth"
)

// authorize authenticates a request and checks that its user may do what
// the request does on its repository's canonical name (see
// canonicalName): pull to read, push to write (uploads, manifests, and so
// referrers), delete to delete. It runs after the name is resolved, before
// any storage access or upstream call. Without auth configured everything
// is allowed.
func (s *Server) authorize(r *http.Request, q *request) error {
	if s.auth == nil {
		return nil
	}
	if r.Context().Value(internalKey{}) != nil {
		// The internal listener (sync): its own secret, or nothing.
		if h := r.Header.Get("Authorization"); s.internalSecret != "" &&
			subtle.ConstantTimeCompare([]byte(h), []byte("Bearer "+s.internalSecret)) == 1 {
			return nil
		}
		return &auth.Error{Status: http.StatusUnauthorized, Message: "internal listener"}
	}
	id, err := s.auth.Authenticate(r)
	if err != nil {
		return err
	}
	q.id = id
	if q.op == "base" {
		return s.auth.Base(r, id)
	}
	need := neededActions(q.op, r.Method)
	if need == 0 || q.src == nil {
		return nil
	}
	return s.auth.Authorize(r, id, mux.Vars(r)["name"], canonicalName(q.up, q.name, q.repo), need)
}

// internalKey marks the requests of the internal listener (startSync).
type internalKey struct{}

// neededActions are the actions an endpoint's method needs.
func neededActions(op, method string) auth.Actions {
	switch op {
	case "manifest", "blob":
		switch method {
		case http.MethodGet, http.MethodHead:
			return auth.Pull
		case http.MethodDelete:
			return auth.Delete
		}
		return auth.Push
	case "upload":
		return auth.Push
	case "tags", "referrers":
		return auth.Pull
	}
	return 0
}

// mayPull reports whether the request's user may pull the repository a
// cross-repository mount names (from, as the client writes it, routed
// like the request's own name).
func (s *Server) mayPull(r *http.Request, q *request, from string, src source, name string) bool {
	if s.auth == nil {
		return true
	}
	up, _ := src.(*upstreamState)
	return s.auth.Authorize(r, q.id, from, canonicalName(up, name, s.upstreamRepo(up, name)), auth.Pull) == nil
}

// CanonicalNames are the canonical names a repository name written in a
// token request may stand for: the token endpoint does not see the ns
// parameter of the requests that will carry the token, so a name outside
// any hosted or host prefix may be meant for the default upstream or,
// through ns, for any other. Each request is checked again against the
// rules on its own canonical name.
func (s *Server) CanonicalNames(name string) []string {
	name = strings.Trim(name, "/")
	var names []string
	src, rest, prefix, err := s.route(name, nil)
	up, _ := src.(*upstreamState)
	if err == nil {
		names = append(names, canonicalName(up, rest, s.upstreamRepo(up, rest)))
		if up == nil || prefix != "" {
			return names // hosted, or by a host prefix: one meaning
		}
	}
	if !validName(name) {
		return names
	}
	for _, u := range s.upstreams {
		if u != up {
			names = append(names, canonicalName(u, name, s.upstreamRepo(u, name)))
		}
	}
	return names
}
