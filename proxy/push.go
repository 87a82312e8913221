package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"mime"
	"net/http"
	"strings"

	"github.com/gorilla/mux"
	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/referrers"
	"github.com/ocimirror/ocimirror/upstream"
)

// Header names of pushes.
const (
	HeaderTag = "OCI-Tag"
)

// maxManifest is the largest manifest accepted, as the spec allows
// registries to require.
const maxManifest = 4 << 20

// pushedManifest is what a manifest PUT needs to know of the body.
type pushedManifest struct {
	MediaType string          `json:"mediaType"`
	Config    *v1.Descriptor  `json:"config"`
	Layers    []v1.Descriptor `json:"layers"`
	Manifests []v1.Descriptor `json:"manifests"`
	Subject   *v1.Descriptor  `json:"subject"`
}

// putManifest serves PUT /v2/<name>/manifests/<reference>. The bytes are
// stored exactly as sent. In a hosted repository every referenced blob and
// manifest must be there; with push: forward the upstream takes the
// manifest first, and when it has no referrers API ocimirror updates its
// fallback tag index as a client would.
func (s *Server) putManifest(w http.ResponseWriter, r *http.Request, q *request) error {
	if err := q.parseReference(mux.Vars(r)["reference"]); err != nil {
		return err
	}
	ctx := r.Context()
	tags, err := tagParams(r, q)
	if err != nil {
		return err
	}
	if len(tags) > 0 && !q.up.hosted && !q.up.forward {
		return errProxiedTag
	}
	data, err := io.ReadAll(io.LimitReader(r.Body, maxManifest+1))
	if err != nil {
		return err
	}
	if len(data) > maxManifest {
		return &Error{Code: CodeManifestInvalid, Status: http.StatusRequestEntityTooLarge, Message: "manifest larger than 4 MiB"}
	}
	var m pushedManifest
	if err := json.Unmarshal(data, &m); err != nil {
		return &Error{Code: CodeManifestInvalid, Message: "manifest is not JSON", Detail: map[string]string{"error": err.Error()}}
	}
	mt := ""
	if ct := r.Header.Get("Content-Type"); ct != "" {
		if mt, _, err = mime.ParseMediaType(ct); err != nil {
			return &Error{Code: CodeManifestInvalid, Message: "bad Content-Type", Detail: map[string]string{"contentType": ct}}
		}
	}
	switch {
	case mt == "":
		if mt = contentType("", data); mt == "" {
			return &Error{Code: CodeManifestInvalid, Message: "manifest has no media type"}
		}
	case m.MediaType != "" && m.MediaType != mt:
		return &Error{Code: CodeManifestInvalid, Message: "Content-Type differs from the manifest's mediaType",
			Detail: map[string]string{"contentType": mt, "mediaType": m.MediaType}}
	}
	d := q.dgst
	if d == "" {
		d = digest.SHA256.FromBytes(data)
	} else if got := d.Algorithm().FromBytes(data); got != d {
		return &Error{Code: CodeDigestInvalid, Detail: map[string]string{"digest": d.String(), "received": got.String()}}
	}
	if q.up.hosted {
		if err := s.checkReferences(ctx, q.repo, m); err != nil {
			return err
		}
	}
	if q.up.forward {
		if err := s.forwardManifest(ctx, q, d, mt, data, m.Subject, tags); err != nil {
			return err
		}
	}
	man := cache.Manifest{Digest: d, MediaType: mt, Data: data}
	if err := s.store.PutManifest(ctx, man); err != nil {
		return err
	}
	if q.up.hosted {
		if err := s.store.Link(ctx, q.repo, cache.LinkManifest, d); err != nil {
			return err
		}
	}
	s.observe(ctx, q.up.name, q.repo, man)
	for _, tag := range tags {
		e := cache.TagEntry{Digest: d, MediaType: mt, Size: int64(len(data)), CheckedAt: s.now()}
		if err := s.store.PutTag(ctx, cache.TagKey{Upstream: q.up.name, Repo: q.repo, Tag: tag}, e); err != nil {
			return err
		}
	}
	if len(tags) > 0 {
		s.tagLists.Remove(q.up.name + "\x00" + q.repo)
	}
	h := w.Header()
	loc := q.clientPath() + "/manifests/" + d.String()
	if q.ns != "" {
		loc += "?ns=" + q.ns
	}
	h.Set("Location", loc)
	h.Set(HeaderContentDigest, d.String())
	if m.Subject != nil {
		h.Set(HeaderSubject, m.Subject.Digest.String())
	}
	if q.dgst != "" && len(tags) > 0 {
		h.Set(HeaderTag, strings.Join(tags, ", "))
	}
	h.Set("Content-Length", "0")
	w.WriteHeader(http.StatusCreated)
	return nil
}

// errProxiedTag refuses a tag pushed to a proxied repository that does not
// forward: the tag would shadow the upstream's for every client.
var errProxiedTag = &Error{Code: CodeUnsupported, Message: "tags of a proxied repository come from its upstream; " +
	"push by digest (referrers join at once), push to a hosted repository, or set push: forward on the upstream"}

// tagParams returns the tags a PUT sets: the reference when it is a tag,
// and the ?tag= parameters of a PUT by digest.
func tagParams(r *http.Request, q *request) ([]string, error) {
	if q.dgst == "" {
		return []string{q.ref}, nil
	}
	tags := r.URL.Query()["tag"]
	for _, t := range tags {
		if !validTag(t) {
			return nil, ErrTagInvalid(t)
		}
	}
	return tags, nil
}

// checkReferences answers MANIFEST_BLOB_UNKNOWN when a hosted manifest
// names a blob or manifest its repository lacks. Non-distributable layers
// (and descriptors with urls) live elsewhere and are not checked; nor is
// the subject, which may come later.
func (s *Server) checkReferences(ctx context.Context, repo string, m pushedManifest) error {
	check := func(kind cache.LinkKind, d v1.Descriptor) error {
		if strings.Contains(d.MediaType, ".nondistributable.") || len(d.URLs) > 0 {
			return nil
		}
		ok, err := s.store.Linked(ctx, repo, kind, d.Digest)
		if err != nil {
			return err
		}
		if !ok {
			return &Error{Code: CodeManifestBlob, Detail: map[string]string{"digest": d.Digest.String()}}
		}
		return nil
	}
	if m.Config != nil {
		if err := check(cache.LinkBlob, *m.Config); err != nil {
			return err
		}
	}
	for _, l := range m.Layers {
		if err := check(cache.LinkBlob, l); err != nil {
			return err
		}
	}
	for _, c := range m.Manifests {
		if err := check(cache.LinkManifest, c); err != nil {
			return err
		}
	}
	return nil
}

// forwardManifest writes a pushed manifest to the upstream (and each tag
// parameter as a PUT by tag). An upstream without the referrers API does
// not answer OCI-Subject; then the subject's fallback tag index there gets
// the new manifest, as the spec asks of a client.
func (s *Server) forwardManifest(ctx context.Context, q *request, d digest.Digest, mt string, data []byte, subject *v1.Descriptor, tags []string) error {
	refs := []string{q.ref}
	if q.dgst != "" {
		refs = append(refs, tags...)
	}
	var hdr http.Header
	for _, ref := range refs {
		h, err := q.up.client.PutManifest(ctx, q.repo, ref, mt, data)
		if err != nil {
			return err
		}
		if hdr == nil {
			hdr = h
		}
	}
	if subject == nil || hdr.Get(HeaderSubject) != "" {
		return nil
	}
	desc, _, err := referrers.Describe(d, mt, data)
	if err != nil {
		return err
	}
	return s.updateFallbackIndex(ctx, q, subject.Digest, &desc, "")
}

// updateFallbackIndex adds a descriptor to (or removes a digest from) the
// upstream's fallback tag index of subject, and caches the new index as the
// tag's current answer.
func (s *Server) updateFallbackIndex(ctx context.Context, q *request, subject digest.Digest, add *v1.Descriptor, remove digest.Digest) error {
	s.fallbackMu.Lock()
	defer s.fallbackMu.Unlock()
	tag := referrers.FallbackTag(subject)
	var idx v1.Index
	resp, err := q.up.client.Manifest(ctx, http.MethodGet, q.repo, tag)
	switch {
	case errors.Is(err, upstream.ErrNotFound):
		idx.SchemaVersion, idx.MediaType = 2, v1.MediaTypeImageIndex
	case err != nil:
		return err
	default:
		data, err := upstream.ReadLimited(resp)
		if err != nil {
			return err
		}
		if err := json.Unmarshal(data, &idx); err != nil || (idx.MediaType != "" && idx.MediaType != v1.MediaTypeImageIndex) {
			return &Error{Code: CodeUnavailable, Status: http.StatusConflict,
				Message: "the upstream's referrers fallback tag holds something other than an image index", Detail: map[string]string{"tag": tag}}
		}
	}
	listed := false
	kept := idx.Manifests[:0]
	for _, m := range idx.Manifests {
		if m.Digest == remove {
			continue
		}
		listed = listed || (add != nil && m.Digest == add.Digest)
		kept = append(kept, m)
	}
	changed := len(kept) != len(idx.Manifests)
	idx.Manifests = kept
	if add != nil && !listed {
		idx.Manifests = append(idx.Manifests, *add)
		changed = true
	}
	if !changed {
		return nil
	}
	if idx.Manifests == nil {
		idx.Manifests = []v1.Descriptor{}
	}
	data, err := json.Marshal(idx)
	if err != nil {
		return err
	}
	if _, err := q.up.client.PutManifest(ctx, q.repo, tag, v1.MediaTypeImageIndex, data); err != nil {
		return err
	}
	s.fallbackAbsent.Remove(cache.TagKey{Upstream: q.up.name, Repo: q.repo, Tag: tag})
	nd := digest.SHA256.FromBytes(data)
	if err := s.store.PutManifest(ctx, cache.Manifest{Digest: nd, MediaType: v1.MediaTypeImageIndex, Data: data}); err != nil {
		return err
	}
	return s.store.PutTag(ctx, cache.TagKey{Upstream: q.up.name, Repo: q.repo, Tag: tag},
		cache.TagEntry{Digest: nd, MediaType: v1.MediaTypeImageIndex, Size: int64(len(data)), CheckedAt: s.now()})
}

// deleteManifest serves DELETE /v2/<name>/manifests/<reference>: a tag, or
// a manifest with every tag that points at it.
func (s *Server) deleteManifest(w http.ResponseWriter, r *http.Request, q *request) error {
	if err := q.parseReference(mux.Vars(r)["reference"]); err != nil {
		return err
	}
	ctx := r.Context()
	unknown := ErrManifestUnknown(map[string]string{"name": q.name, "reference": q.ref})
	tagKey := cache.TagKey{Upstream: q.up.name, Repo: q.repo, Tag: q.ref}
	switch {
	case q.dgst == "":
		e, err := s.store.GetTag(ctx, tagKey)
		if errors.Is(err, cache.ErrNotFound) {
			e, err = cache.TagEntry{}, nil
		}
		if err != nil {
			return err
		}
		switch {
		case q.up.forward:
			if err := q.up.client.Delete(ctx, q.repo, "manifests/"+q.ref); err != nil {
				return err
			}
		case !q.up.hosted:
			return errProxiedDelete
		case e.Digest == "":
			return unknown
		}
		if err := s.store.DeleteTag(ctx, tagKey); err != nil {
			return err
		}
	case q.up.hosted:
		existed, err := s.store.Unlink(ctx, q.repo, cache.LinkManifest, q.dgst)
		if err != nil {
			return err
		}
		if !existed {
			return unknown
		}
		if err := s.forgetManifest(ctx, q, q.dgst); err != nil {
			return err
		}
	default:
		if !q.up.forward {
			return errProxiedDelete
		}
		subject := s.subjectOf(ctx, q.dgst)
		if err := q.up.client.Delete(ctx, q.repo, "manifests/"+q.dgst.String()); err != nil {
			return err
		}
		if subject != "" && s.refCaps.Get(capKey(q.up, q.repo), s.now()) != referrers.Supported {
			if err := s.updateFallbackIndex(ctx, q, subject, nil, q.dgst); err != nil {
				s.log.Warn("removing a deleted referrer from the upstream fallback index", "err", err, "digest", q.dgst)
			}
		}
		if err := s.forgetManifest(ctx, q, q.dgst); err != nil {
			return err
		}
		if err := s.store.DeleteManifest(ctx, q.dgst); err != nil {
			return err
		}
	}
	s.tagLists.Remove(q.up.name + "\x00" + q.repo)
	w.Header().Set("Content-Length", "0")
	w.WriteHeader(http.StatusAccepted)
	return nil
}

// forgetManifest drops what points at a deleted manifest in a repository:
// its tags and its entry in its subject's referrers.
func (s *Server) forgetManifest(ctx context.Context, q *request, d digest.Digest) error {
	tags, err := s.store.ListTags(ctx, q.up.name, q.repo)
	if err != nil {
		return err
	}
	for _, t := range tags {
		if t.Digest == d {
			if err := s.store.DeleteTag(ctx, cache.TagKey{Upstream: q.up.name, Repo: q.repo, Tag: t.Name}); err != nil {
				return err
			}
		}
	}
	if subject := s.subjectOf(ctx, d); subject != "" {
		return s.store.DeleteReferrer(ctx, cache.ReferrerKey{Upstream: q.up.name, Repo: q.repo, Subject: subject}, d)
	}
	return nil
}

// subjectOf returns the subject of a stored manifest ("" when it has none
// or is not stored).
func (s *Server) subjectOf(ctx context.Context, d digest.Digest) digest.Digest {
	m, err := s.store.GetManifest(ctx, d)
	if err != nil {
		return ""
	}
	return referrers.Subject(m.Data)
}

// observe indexes a manifest under its subject, if it has one: every
// manifest ocimirror caches or is pushed passes here.
func (s *Server) observe(ctx context.Context, upstreamName, repo string, m cache.Manifest) {
	desc, subject, err := referrers.Describe(m.Digest, m.MediaType, m.Data)
	if err != nil || subject == nil {
		return
	}
	k := cache.ReferrerKey{Upstream: upstreamName, Repo: repo, Subject: subject.Digest}
	if err := s.store.PutReferrer(ctx, k, desc); err != nil {
		s.log.Warn("indexing a referrer", "err", err, "digest", m.Digest, "subject", subject.Digest)
	}
}

func capKey(up *upstreamState, repo string) string { return up.name + "\x00" + repo }
