package graph

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/manifest"
	"github.com/ocimirror/ocimirror/referrers"
	"github.com/ocimirror/ocimirror/upstream"
)

// Bounds of what one registry answer may make the walk read.
const (
	// maxReferrerPages bounds the pages of one referrers answer followed.
	maxReferrerPages = 100
	// maxReferrerTries bounds how often a referrers answer that says it
	// may be incomplete (a Warning) is asked again while it grows.
	maxReferrerTries = 5
	// maxWarnings bounds the warnings a Registry keeps.
	maxWarnings = 32
)

// Registry is a Source over one repository of a registry's API, read
// through an upstream.Client: prefetch reads a mirror with it. Nothing it
// reads is taken on trust: a manifest's bytes must hash to the digest it
// was asked by (and to Docker-Content-Digest when one is sent), its media
// type is the response's Content-Type, and Blob checks a blob's size and
// digest as it streams. It is safe for concurrent use.
type Registry struct {
	c    *upstream.Client
	repo string

	mu sync.Mutex
	// resolved is the manifest Resolve read last, handed to the walk's
	// first Manifest call for it instead of a second request.
	resolved *fetched
	warnings []string
	dropped  int
}

var _ Source = (*Registry)(nil)

type fetched struct {
	d         digest.Digest
	mediaType string
	data      []byte
}

// NewRegistry reads repository repo (the name under /v2/) through c.
func NewRegistry(c *upstream.Client, repo string) *Registry {
	return &Registry{c: c, repo: repo}
}

// Resolve fetches the manifest ref names (a tag or a digest) and returns
// its descriptor: digest, media type and size. A tag's digest is the
// Docker-Content-Digest the registry sent, checked against the bytes (or
// their sha256 when it sent none).
func (r *Registry) Resolve(ctx context.Context, ref string) (v1.Descriptor, error) {
	var want digest.Digest
	if strings.Contains(ref, ":") {
		want = digest.Digest(ref)
		if err := want.Validate(); err != nil {
			return v1.Descriptor{}, fmt.Errorf("reference %q: %w", ref, err)
		}
	}
	f, err := r.fetchManifest(ctx, ref, want)
	if err != nil {
		return v1.Descriptor{}, err
	}
	r.mu.Lock()
	r.resolved = f
	r.mu.Unlock()
	return v1.Descriptor{MediaType: f.mediaType, Digest: f.d, Size: int64(len(f.data))}, nil
}

// Manifest implements Source: GET the manifest by digest and check it.
func (r *Registry) Manifest(ctx context.Context, d digest.Digest) (string, []byte, error) {
	r.mu.Lock()
	f := r.resolved
	if f != nil && f.d == d {
		r.resolved = nil
	} else {
		f = nil
	}
	r.mu.Unlock()
	if f == nil {
		var err error
		if f, err = r.fetchManifest(ctx, d.String(), d); err != nil {
			return "", nil, err
		}
	}
	return f.mediaType, f.data, nil
}

// fetchManifest GETs manifests/<ref> and checks the bytes against want
// (when ref is a digest) and the Docker-Content-Digest header (when sent).
func (r *Registry) fetchManifest(ctx context.Context, ref string, want digest.Digest) (*fetched, error) {
	resp, err := r.c.Manifest(ctx, http.MethodGet, r.repo, ref)
	if err != nil {
		err = describe(err)
		if errors.Is(err, upstream.ErrNotFound) {
			return nil, mark(ErrNotFound, fmt.Errorf("manifest %s: %w", ref, err))
		}
		return nil, fmt.Errorf("manifest %s: %w", ref, err)
	}
	data, err := upstream.ReadLimited(resp)
	if err != nil {
		return nil, fmt.Errorf("manifest %s: %w", ref, err)
	}
	var header digest.Digest
	if h := resp.Header.Get("Docker-Content-Digest"); h != "" {
		header = digest.Digest(h)
		if header.Validate() != nil {
			return nil, mark(ErrDigestMismatch, fmt.Errorf("manifest %s: Docker-Content-Digest %q is not a digest", ref, h))
		}
		if want != "" && header != want {
			return nil, mark(ErrDigestMismatch, fmt.Errorf("manifest %s: the registry says it is %s", ref, header))
		}
	}
	d := want
	if d == "" {
		d = header
	}
	if d == "" {
		d = digest.FromBytes(data)
	}
	if got := d.Algorithm().FromBytes(data); got != d {
		return nil, mark(ErrDigestMismatch, fmt.Errorf("manifest %s: the bytes received hash to %s, not %s", ref, got, d))
	}
	mt := manifest.MediaType(resp.Header.Get("Content-Type"))
	if mt == "" {
		mt = manifest.Infer(data)
	}
	return &fetched{d: d, mediaType: mt, data: data}, nil
}

// Referrers implements Source: GET referrers/<d>, following Link pages.
// An answer that says it may be incomplete (a Warning header, as
// ocimirror sends when it could not check every candidate yet) is asked
// again while it grows, a few times; what it still says is kept for
// Warnings. A registry without the referrers API (404) has none to give.
func (r *Registry) Referrers(ctx context.Context, d digest.Digest) ([]v1.Descriptor, error) {
	var (
		ds    []v1.Descriptor
		warns []string
	)
	for try := 0; try < maxReferrerTries; try++ {
		more, w, err := r.referrersOnce(ctx, d)
		if err != nil {
			return nil, err
		}
		grew := len(more) > len(ds)
		ds, warns = more, w
		if len(warns) == 0 || !grew {
			break
		}
	}
	for _, w := range warns {
		r.warn(fmt.Sprintf("referrers of %s may be incomplete: %s", d, w))
	}
	return ds, nil
}

func (r *Registry) referrersOnce(ctx context.Context, d digest.Digest) ([]v1.Descriptor, []string, error) {
	var (
		all   []v1.Descriptor
		warns []string
	)
	req := upstream.Request{Method: http.MethodGet, Repo: r.repo, Path: "referrers/" + d.String(),
		Header: http.Header{"Accept": {v1.MediaTypeImageIndex}}}
	for page := 0; ; page++ {
		if page == maxReferrerPages {
			warns = append(warns, fmt.Sprintf("more than %d pages; the rest are left out", maxReferrerPages))
			break
		}
		resp, err := r.c.Do(ctx, req)
		if err != nil {
			err = describe(err)
			if errors.Is(err, upstream.ErrNotFound) {
				return nil, nil, mark(ErrNotFound, fmt.Errorf("referrers of %s: %w", d, err))
			}
			return nil, nil, fmt.Errorf("referrers of %s: %w", d, err)
		}
		for _, w := range resp.Header.Values("Warning") {
			warns = append(warns, warningText(w))
		}
		link := resp.Header.Get("Link")
		body, err := upstream.ReadLimited(resp)
		if err != nil {
			return nil, nil, fmt.Errorf("referrers of %s: %w", d, err)
		}
		ds, err := referrers.ParseIndex(body)
		if err != nil {
			return nil, nil, fmt.Errorf("referrers of %s: %w", d, err)
		}
		all = append(all, ds...)
		next := nextLink(link)
		if next == "" {
			break
		}
		req = upstream.Request{Method: http.MethodGet, Repo: r.repo, URL: next, Header: req.Header}
	}
	return all, warns, nil
}

// Warnings returns what the registry said may be missing from the walk
// (referrers it could not list yet).
func (r *Registry) Warnings() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := append([]string(nil), r.warnings...)
	if r.dropped > 0 {
		out = append(out, fmt.Sprintf("and %d more warnings", r.dropped))
	}
	return out
}

func (r *Registry) warn(w string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.warnings) < maxWarnings {
		r.warnings = append(r.warnings, w)
	} else {
		r.dropped++
	}
}

// Blob GETs a blob and copies it to w, checking its size and digest
// against desc as it streams; it returns the bytes copied. A blob whose
// bytes do not match fails with ErrDigestMismatch, after w has seen
// them: whoever keeps what w received must wait for a nil error.
func (r *Registry) Blob(ctx context.Context, desc v1.Descriptor, w io.Writer) (int64, error) {
	if err := desc.Digest.Validate(); err != nil {
		return 0, fmt.Errorf("blob %q: %w", desc.Digest, err)
	}
	if desc.Size < 0 {
		return 0, fmt.Errorf("blob %s: negative size %d", desc.Digest, desc.Size)
	}
	resp, err := r.c.Blob(ctx, http.MethodGet, r.repo, desc.Digest, 0, 0)
	if err != nil {
		err = describe(err)
		if errors.Is(err, upstream.ErrNotFound) {
			return 0, mark(ErrNotFound, fmt.Errorf("blob %s: %w", desc.Digest, err))
		}
		return 0, fmt.Errorf("blob %s: %w", desc.Digest, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("blob %s: %w: status %d", desc.Digest, upstream.ErrInvalidResponse, resp.StatusCode)
	}
	v := desc.Digest.Verifier()
	n, err := io.Copy(io.MultiWriter(w, v), io.LimitReader(resp.Body, desc.Size+1))
	if err != nil {
		return n, fmt.Errorf("blob %s: reading after %d bytes: %w", desc.Digest, n, err)
	}
	if n != desc.Size {
		return n, mark(ErrDigestMismatch, fmt.Errorf("blob %s: %d bytes received, the descriptor says %d", desc.Digest, n, desc.Size))
	}
	if !v.Verified() {
		return n, mark(ErrDigestMismatch, fmt.Errorf("blob %s: the bytes received do not hash to it", desc.Digest))
	}
	return n, nil
}

// marked is an error that matches a sentinel (errors.Is) without
// saying its words: the message tells the user what happened already.
type marked struct {
	sentinel, err error
}

func mark(sentinel, err error) error { return &marked{sentinel, err} }

func (m *marked) Error() string   { return m.err.Error() }
func (m *marked) Unwrap() []error { return []error{m.sentinel, m.err} }

// statusError is an upstream.StatusError told with the registry's own
// words: the OCI error code and message of its body.
type statusError struct {
	*upstream.StatusError
	what string
}

func (e *statusError) Error() string {
	return fmt.Sprintf("%s %s: %d %s", e.Method, e.URL, e.Status, e.what)
}

func (e *statusError) Unwrap() error { return e.StatusError }

// describe adds the OCI error code and message to a status error.
func describe(err error) error {
	se, ok := errors.AsType[*upstream.StatusError](err)
	if !ok {
		return err
	}
	what := http.StatusText(se.Status)
	var body struct {
		Errors []struct{ Code, Message string } `json:"errors"`
	}
	if json.Unmarshal(se.Body, &body) == nil && len(body.Errors) > 0 {
		what = body.Errors[0].Code
		if m := body.Errors[0].Message; m != "" {
			what += ": " + m
		}
	}
	return &statusError{StatusError: se, what: what}
}

// warningText is the text of a Warning header (299 - "text"), or the
// header as it is when it has another form.
func warningText(h string) string {
	_, rest, ok := strings.Cut(h, " - ")
	if !ok {
		return h
	}
	if s, err := strconv.Unquote(strings.TrimSpace(rest)); err == nil {
		return s
	}
	return h
}

// nextLink returns the target of a Link: <...>; rel="next" header, "".
func nextLink(link string) string {
	for l := range strings.SplitSeq(link, ",") {
		target, params, ok := strings.Cut(l, ";")
		if ok && strings.Contains(params, `rel="next"`) {
			return strings.Trim(strings.TrimSpace(target), "<>")
		}
	}
	return ""
}
