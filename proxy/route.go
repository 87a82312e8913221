package proxy

import (
	"net/http"
	"strings"
	"unicode/utf8"

	"github.com/gorilla/mux"
	"github.com/opencontainers/go-digest"

	"github.com/ocimirror/ocimirror/auth"
	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/config"
)

// maxNameLength bounds a repository name, as distribution does.
const maxNameLength = 255

// request is one parsed API request: which upstream, which repository, and
// what the log line and the error mapping need to know.
type request struct {
	op string
	// src is where the repository's content comes from; up is the same
	// upstream, nil for a hosted repository.
	src source
	up  *upstreamState
	// name is the repository as the client wrote it (after ?ns or a host
	// prefix is taken off, before library/ is added); repo is the upstream's.
	name string
	repo string
	// prefix is the host prefix the client used ("" without one).
	prefix string
	// ns is the ?ns= value the request was routed by.
	ns string
	// ref is the tag or digest of the request; dgst is set when it is a digest.
	ref  string
	dgst digest.Digest
	// cache is how the request was served: hit, miss, coalesced, stale,
	// revalidated; empty when the cache took no part.
	cache string
	// id is who made the request (with auth).
	id auth.Identity
	// fromPeer: another replica of the cluster made the request, for the
	// blob it wants from this one as the digest's owner; peer is its URL.
	fromPeer bool
	peer     string
}

// canonicalName is the repository's name as access rules see it, however
// the request was routed: upstream/repository for a proxied one
// (docker.io/library/alpine), the name for a hosted one (ci/team-a/app).
func canonicalName(up *upstreamState, name, repo string) string {
	if up != nil {
		return up.name + "/" + repo
	}
	return name
}

// key names the request's repository in the store.
func (q *request) key() cache.RepoKey {
	return cache.RepoKey{Upstream: q.src.storeName(), Repo: q.repo}
}

// tagKey names the request's tag in the store.
func (q *request) tagKey() cache.TagKey {
	return cache.TagKey{Upstream: q.src.storeName(), Repo: q.repo, Tag: q.ref}
}

// referrerKey names a subject's referrers in the request's repository.
func (q *request) referrerKey(subject digest.Digest) cache.ReferrerKey {
	return cache.ReferrerKey{Upstream: q.src.storeName(), Repo: q.repo, Subject: subject}
}

// clientPath is the /v2/ path a client would use for this repository, for
// Link headers.
func (q *request) clientPath() string {
	if q.prefix != "" {
		return "/v2/" + q.prefix + "/" + q.name
	}
	return "/v2/" + q.name
}

// resolve fills q from the path's name and the ?ns parameter, validating
// everything before any storage access or upstream call.
func (s *Server) resolve(r *http.Request, q *request, rawName string) error {
	q.ns = r.URL.Query().Get("ns")
	var up *upstreamState
	if q.ns != "" {
		if up = s.upstreamByHost(q.ns); up == nil {
			return &Error{Code: CodeNameUnknown, Message: "registry not mirrored here", Detail: map[string]string{"ns": q.ns}}
		}
	}
	src, name, prefix, err := s.route(rawName, up)
	if err != nil {
		return err
	}
	q.src, q.prefix, q.name = src, prefix, name
	q.up, _ = src.(*upstreamState)
	q.repo = s.upstreamRepo(q.up, name)
	return nil
}

// route finds the source of a repository name as a client writes it:
// ns's upstream when given (up), a hosted prefix, a configured host
// prefix, else the default upstream. It returns the name without the host
// prefix, and the prefix.
func (s *Server) route(rawName string, up *upstreamState) (src source, name, prefix string, err error) {
	name = rawName
	switch {
	case up != nil:
		src = up
	case s.isHosted(name):
		src = s.hosted
	default:
		if host, rest, ok := strings.Cut(name, "/"); ok {
			if u := s.upstreamByHost(host); u != nil && strings.ToLower(host) == u.name {
				up, prefix, name = u, host, rest
			}
		}
		if up == nil {
			up = s.defaultUpstream
		}
		if up == nil {
			return nil, "", "", &Error{Code: CodeNameUnknown, Message: "no upstream for this name and no default upstream", Detail: map[string]string{"name": rawName}}
		}
		src = up
	}
	if !validName(name) {
		return nil, "", "", ErrNameInvalid(map[string]string{"name": rawName})
	}
	return src, name, prefix, nil
}

// upstreamRepo is the repository an upstream knows a name by: Docker
// Hub's official images live under library/.
func (s *Server) upstreamRepo(up *upstreamState, name string) string {
	if up != nil && up.dockerHub && !strings.Contains(name, "/") {
		return "library/" + name
	}
	return name
}

// isHosted reports whether a repository name falls under a hosted prefix.
func (s *Server) isHosted(name string) bool {
	for _, p := range s.hostedPrefixes {
		if strings.HasPrefix(name, p) {
			return true
		}
	}
	return false
}

// upstreamByHost finds the upstream a containerd ?ns= or a host prefix
// names. The domain part of a host compares case-insensitively (the
// reference grammar allows upper case there); Docker Hub's other host
// names count as docker.io.
func (s *Server) upstreamByHost(host string) *upstreamState {
	if up := s.upstreams[host]; up != nil {
		return up
	}
	if strings.IndexFunc(host, func(r rune) bool { return r >= utf8.RuneSelf }) >= 0 {
		return nil // only ASCII folds: no lookalike letter reaches an upstream
	}
	h := strings.ToLower(host)
	if up := s.upstreams[h]; up != nil {
		return up
	}
	switch h {
	case "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com":
		return s.upstreams[config.DockerHub]
	}
	return nil
}

// parseReference accepts a tag or a digest for a manifest request.
func (q *request) parseReference(ref string) error {
	q.ref = ref
	if strings.Contains(ref, ":") {
		d, err := parseDigest(ref)
		if err != nil {
			return err
		}
		q.dgst = d
		return nil
	}
	if !validTag(ref) {
		return ErrTagInvalid(ref)
	}
	return nil
}

// parseDigestVar takes the request's {digest} path variable as its digest.
func (q *request) parseDigestVar(r *http.Request) error {
	q.ref = mux.Vars(r)["digest"]
	d, err := parseDigest(q.ref)
	if err != nil {
		return err
	}
	q.dgst = d
	return nil
}

// parseDigest accepts sha256 and sha512 digests only, with lower-case hex
// of the algorithm's length. (go-digest's Validate does the same with a
// regular expression, which costs more than the rest of a cached manifest
// GET.)
func parseDigest(s string) (digest.Digest, error) {
	alg, hex, ok := strings.Cut(s, ":")
	var want int
	switch digest.Algorithm(alg) {
	case digest.SHA256:
		want = 64
	case digest.SHA512:
		want = 128
	default:
		if !ok {
			return "", errDigestMalformed(map[string]string{"digest": s, "reason": "want algorithm:hex"})
		}
		return "", errDigestMalformed(map[string]string{"digest": s, "reason": "algorithm must be sha256 or sha512"})
	}
	if len(hex) != want || strings.IndexFunc(hex, func(r rune) bool { return !(r >= '0' && r <= '9' || r >= 'a' && r <= 'f') }) >= 0 {
		return "", errDigestMalformed(map[string]string{"digest": s, "reason": "want lower-case hex of the algorithm's length"})
	}
	return digest.Digest(s), nil
}

// validName checks a repository name against the distribution spec:
// [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*
func validName(name string) bool {
	if name == "" || len(name) > maxNameLength {
		return false
	}
	for len(name) > 0 {
		comp := name
		if i := strings.IndexByte(name, '/'); i >= 0 {
			comp, name = name[:i], name[i+1:]
			if name == "" {
				return false // trailing slash
			}
		} else {
			name = ""
		}
		if !validComponent(comp) {
			return false
		}
	}
	return true
}

func validComponent(c string) bool {
	if c == "" || !alnum(c[0]) || !alnum(c[len(c)-1]) {
		return false
	}
	for i := 1; i < len(c); i++ {
		if alnum(c[i]) {
			continue
		}
		// A separator run: ".", "_", "__" or one or more "-".
		j := i
		for j < len(c) && !alnum(c[j]) {
			j++
		}
		switch sep := c[i:j]; {
		case sep == "." || sep == "_" || sep == "__":
		case strings.Trim(sep, "-") == "":
		default:
			return false
		}
		i = j - 1
	}
	return true
}

func alnum(b byte) bool { return b >= 'a' && b <= 'z' || b >= '0' && b <= '9' }

// validTag checks [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}.
func validTag(t string) bool {
	if t == "" || len(t) > 128 {
		return false
	}
	for i := 0; i < len(t); i++ {
		c := t[i]
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_'
		if !ok && i > 0 {
			ok = c == '.' || c == '-'
		}
		if !ok {
			return false
		}
	}
	return true
}
