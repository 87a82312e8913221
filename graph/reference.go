package graph

import (
	"fmt"
	"regexp"
	"strings"

	"github.com/opencontainers/go-digest"
)

// Reference is an image as a client names it when it pulls through
// ocimirror: [host[:port]/]repository[:tag][@digest]. Without a host it
// is the mirror's default upstream's; without a tag or digest, its tag is
// latest.
type Reference struct {
	// Host is the registry's host as written ("" for none), Docker Hub's
	// other names (index.docker.io, ...) written docker.io.
	Host string
	// Repository is the repository on that registry, as written: the
	// mirror adds Docker Hub's library/ itself.
	Repository string
	// Tag is the tag; it is kept when a digest is given, but not used.
	Tag string
	// Digest, when set, is what the reference pulls.
	Digest digest.Digest
}

// The reference grammar's parts (distribution's reference package).
var (
	repositoryRE = regexp.MustCompile(`^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$`)
	tagRE        = regexp.MustCompile(`^[\w][\w.-]{0,127}$`)
	hostRE       = regexp.MustCompile(`^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?))*(?::[0-9]+)?$|^\[[a-fA-F0-9:]+\](?::[0-9]+)?$`)
)

// maxNameLength bounds host and repository together, as distribution does.
const maxNameLength = 255

// ParseReference reads a reference as docker and containerd do: the first
// path component is a registry host when it has a dot or a colon, is
// localhost, or has upper-case letters.
func ParseReference(s string) (Reference, error) {
	var r Reference
	name := strings.TrimSpace(s)
	if name == "" {
		return r, fmt.Errorf("empty reference")
	}
	if n, d, ok := strings.Cut(name, "@"); ok {
		dg, err := digest.Parse(d)
		if err != nil {
			return r, fmt.Errorf("reference %q: digest %q: %w", s, d, err)
		}
		name, r.Digest = n, dg
	}
	if i := strings.LastIndexByte(name, ':'); i > strings.LastIndexByte(name, '/') {
		name, r.Tag = name[:i], name[i+1:]
		if !tagRE.MatchString(r.Tag) {
			return r, fmt.Errorf("reference %q: invalid tag %q", s, r.Tag)
		}
	}
	if r.Tag == "" && r.Digest == "" {
		r.Tag = "latest"
	}
	r.Repository = name
	if first, rest, ok := strings.Cut(name, "/"); ok &&
		(strings.ContainsAny(first, ".:") || first == "localhost" || strings.ToLower(first) != first) {
		if !hostRE.MatchString(first) {
			return r, fmt.Errorf("reference %q: invalid registry host %q", s, first)
		}
		r.Host, r.Repository = first, rest
		switch strings.ToLower(first) {
		case "docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com":
			r.Host = "docker.io"
		}
	}
	if len(r.Name()) > maxNameLength {
		return r, fmt.Errorf("reference %q: name longer than %d characters", s, maxNameLength)
	}
	if !repositoryRE.MatchString(r.Repository) {
		return r, fmt.Errorf("reference %q: invalid repository name %q (lower-case letters, digits and separators)", s, r.Repository)
	}
	return r, nil
}

// Name is the repository as ocimirror routes it: host/repository, or the
// repository alone for the default upstream (GET /v2/<Name>/...).
func (r Reference) Name() string {
	if r.Host == "" {
		return r.Repository
	}
	return r.Host + "/" + r.Repository
}

// Ref is what its manifest is asked by: the digest when there is one,
// else the tag.
func (r Reference) Ref() string {
	if r.Digest != "" {
		return r.Digest.String()
	}
	return r.Tag
}

// String writes the reference back: Name, then :tag and @digest as set.
func (r Reference) String() string {
	s := r.Name()
	if r.Tag != "" {
		s += ":" + r.Tag
	}
	if r.Digest != "" {
		s += "@" + r.Digest.String()
	}
	return s
}
