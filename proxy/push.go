package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"

	"github.com/gorilla/mux"
	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sync/errgroup"

	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/manifest"
	"github.com/ocimirror/ocimirror/referrers"
	"github.com/ocimirror/ocimirror/upstream"
)

// Header names of pushes.
const (
	HeaderTag = "OCI-Tag"
)

// pushed is a manifest PUT, checked and about to be stored.
type pushed struct {
	cache.Manifest
	manifest *manifest.Manifest
	// tags are the tags the PUT sets: its reference when a tag, its ?tag=
	// parameters when a digest.
	tags []string
}

// putManifest serves PUT /v2/<name>/manifests/<reference>. The bytes are
// checked as any manifest from an upstream is, and stored exactly as sent;
// the source decides what else must hold (a hosted repository has every
// blob it names; a proxied one forwards or refuses tags).
func (s *Server) putManifest(w http.ResponseWriter, r *http.Request, q *request) error {
	if err := q.parseReference(mux.Vars(r)["reference"]); err != nil {
		return err
	}
	ctx := r.Context()
	tags, err := tagParams(r, q)
	if err != nil {
		return err
	}
	if len(tags) > 0 {
		if err := q.src.acceptsTags(); err != nil {
			return err
		}
	}
	data, err := io.ReadAll(io.LimitReader(s.newIdleReader(w, r.Body), manifest.MaxSize+1))
	if err != nil {
		return bodyError(err)
	}
	if len(data) > manifest.MaxSize {
		return &Error{Code: CodeManifestInvalid, Status: http.StatusRequestEntityTooLarge, Message: "manifest larger than 4 MiB"}
	}
	mt, err := pushedMediaType(r.Header.Get("Content-Type"), data)
	if err != nil {
		return err
	}
	m, err := manifest.Parse(mt, data)
	if err == nil {
		err = m.Strict()
	}
	if err != nil {
		return &Error{Code: CodeManifestInvalid, Message: "not a manifest of its media type", Detail: map[string]string{"mediaType": mt, "error": err.Error()}}
	}
	d := q.dgst
	if d == "" {
		d = digest.SHA256.FromBytes(data)
	} else if got := d.Algorithm().FromBytes(data); got != d {
		return &Error{Code: CodeDigestInvalid, Detail: map[string]string{"digest": d.String(), "received": got.String()}}
	}
	p := &pushed{Manifest: cache.Manifest{Digest: d, MediaType: mt, Data: data}, manifest: m, tags: tags}
	if err := q.src.pushManifest(ctx, q, p); err != nil {
		return err
	}
	if err := s.storeManifest(ctx, q.key(), p.Manifest, cache.OriginPushed); err != nil {
		return err
	}
	for _, tag := range tags {
		e := cache.TagEntry{Digest: d, MediaType: mt, Size: int64(len(data)), CheckedAt: s.now()}
		if err := s.store.PutTag(ctx, cache.TagKey{Upstream: q.src.storeName(), Repo: q.repo, Tag: tag}, e); err != nil {
			return err
		}
	}
	if len(tags) > 0 {
		s.tagLists.Remove(q.src.storeName() + "\x00" + q.repo)
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
func (s *Server) checkReferences(ctx context.Context, k cache.RepoKey, m *manifest.Manifest) error {
	check := func(kind cache.LinkKind, d v1.Descriptor) error {
		if strings.Contains(d.MediaType, ".nondistributable.") || len(d.URLs) > 0 {
			return nil
		}
		_, ok, err := s.store.Linked(ctx, k, kind, d.Digest)
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

// pushManifest implements source. Without push: forward a proxied
// repository keeps pushes by digest locally and refuses tags; with it, the
// upstream takes the manifest (and each tag) first, and when it has no
// referrers API (no OCI-Subject in its answer) ocimirror updates its
// fallback tag index, as the spec asks of a client.
func (u *upstreamState) pushManifest(ctx context.Context, q *request, p *pushed) error {
	if !u.forward {
		return nil
	}
	refs := []string{q.ref}
	if q.dgst != "" {
		refs = append(refs, p.tags...)
	}
	var hdr http.Header
	for _, ref := range refs {
		h, err := u.client.PutManifest(ctx, q.repo, ref, p.MediaType, p.Data)
		if err != nil {
			return err
		}
		if hdr == nil {
			hdr = h
		}
	}
	subject := p.manifest.Subject
	if subject == nil || !manifest.Referrer(p.MediaType) || hdr.Get(HeaderSubject) != "" {
		return nil
	}
	desc := p.manifest.Descriptor(p.Digest, int64(len(p.Data)))
	return u.updateFallbackIndex(ctx, q.repo, subject.Digest, &desc, "")
}

// acceptsTags implements source: without push: forward, the tags of a
// proxied repository are the upstream's alone.
func (u *upstreamState) acceptsTags() error {
	if !u.forward {
		return errProxiedTag
	}
	return nil
}

// pushBlob implements source: a forwarding upstream gets the blob first.
func (u *upstreamState) pushBlob(ctx context.Context, q *request, d digest.Digest, size int64) error {
	if !u.forward {
		return nil
	}
	rd, err := u.s.store.OpenBlob(ctx, d)
	if err != nil {
		return err
	}
	defer rd.Close()
	return u.client.PushBlob(ctx, q.repo, d, size, func() io.Reader { return io.NewSectionReader(rd, 0, size) })
}

// deleteTag implements source: tags of a proxied repository are the
// upstream's, deleted there when pushes are forwarded.
func (u *upstreamState) deleteTag(ctx context.Context, q *request) error {
	if !u.forward {
		return errProxiedDelete
	}
	return u.client.Delete(ctx, q.repo, "manifests/"+q.ref)
}

// deleteContent implements source. With push: forward the upstream
// deletes first (and a referrer leaves its fallback index there).
// Otherwise only what was pushed to ocimirror, and exists nowhere else,
// can be deleted: a mistaken attachment can be taken back, the upstream's
// content (or what ocimirror does not hold) cannot.
func (u *upstreamState) deleteContent(ctx context.Context, q *request, kind cache.LinkKind, d digest.Digest, linked bool, origin cache.LinkOrigin) error {
	if !u.forward {
		if !linked || origin != cache.OriginPushed {
			return errProxiedDelete
		}
		return nil
	}
	path := "blobs/" + d.String()
	if kind == cache.LinkManifest {
		path = "manifests/" + d.String()
	}
	subject := u.s.subjectOf(ctx, kind, d)
	if err := u.client.Delete(ctx, q.repo, path); err != nil {
		return err
	}
	if subject != "" && u.s.refCaps.Get(capKey(u, q.repo), u.s.now()) != referrers.Supported {
		if err := u.updateFallbackIndex(ctx, q.repo, subject, nil, d); err != nil {
			u.s.log.Warn("removing a deleted referrer from the upstream fallback index", "err", err, "digest", d)
		}
	}
	return nil
}

// updateFallbackIndex adds a descriptor to (or removes a digest from) the
// upstream's fallback tag index of subject, and caches the new index as the
// tag's current answer. Updates of one index are serialized; other
// subjects' go on meanwhile.
func (u *upstreamState) updateFallbackIndex(ctx context.Context, repo string, subject digest.Digest, add *v1.Descriptor, remove digest.Digest) error {
	s := u.s
	tag := referrers.FallbackTag(subject)
	unlock := s.fallbackLocks.lock(u.name + "\x00" + repo + "\x00" + tag)
	defer unlock()
	var idx v1.Index
	resp, err := u.client.Manifest(ctx, http.MethodGet, repo, tag)
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
	if _, err := u.client.PutManifest(ctx, repo, tag, v1.MediaTypeImageIndex, data); err != nil {
		return err
	}
	k := cache.RepoKey{Upstream: u.name, Repo: repo}
	tk := cache.TagKey{Upstream: u.name, Repo: repo, Tag: tag}
	s.fallbackAbsent.Remove(tk)
	m := cache.Manifest{Digest: digest.SHA256.FromBytes(data), MediaType: v1.MediaTypeImageIndex, Data: data}
	if err := s.storeManifest(ctx, k, m, cache.OriginUpstream); err != nil {
		return err
	}
	_, err = u.moveTag(ctx, tk, m)
	return err
}

// deleteManifest serves DELETE /v2/<name>/manifests/<reference>: a tag, or
// a manifest with every tag of the repository that points at it. Only the
// repository's own link goes: other repositories holding the same bytes
// keep them.
func (s *Server) deleteManifest(w http.ResponseWriter, r *http.Request, q *request) error {
	if err := q.parseReference(mux.Vars(r)["reference"]); err != nil {
		return err
	}
	ctx := r.Context()
	if q.dgst == "" {
		if err := q.src.deleteTag(ctx, q); err != nil {
			return err
		}
		if err := s.store.DeleteTag(ctx, q.tagKey()); err != nil {
			return err
		}
	} else if err := s.deleteContent(ctx, q, cache.LinkManifest); err != nil {
		return err
	}
	s.tagLists.Remove(q.src.storeName() + "\x00" + q.repo)
	w.Header().Set("Content-Length", "0")
	w.WriteHeader(http.StatusAccepted)
	return nil
}

// deleteBlob serves DELETE /v2/<name>/blobs/<digest>: the repository's
// link goes; the bytes stay for whoever else links them.
func (s *Server) deleteBlob(w http.ResponseWriter, r *http.Request, q *request) error {
	if err := q.parseDigestVar(r); err != nil {
		return err
	}
	if err := s.deleteContent(r.Context(), q, cache.LinkBlob); err != nil {
		return err
	}
	w.Header().Set("Content-Length", "0")
	w.WriteHeader(http.StatusAccepted)
	return nil
}

// deleteContent unlinks the request's digest from its repository, once
// the source agrees, and forgets what pointed at a manifest there.
func (s *Server) deleteContent(ctx context.Context, q *request, kind cache.LinkKind) error {
	d := q.dgst
	origin, linked, err := s.store.Linked(ctx, q.key(), kind, d)
	if err != nil {
		return err
	}
	if err := q.src.deleteContent(ctx, q, kind, d, linked, origin); err != nil {
		return err
	}
	subject := s.subjectOf(ctx, kind, d)
	if _, err := s.store.Unlink(ctx, q.key(), kind, d); err != nil {
		return err
	}
	if kind == cache.LinkManifest {
		return s.forgetManifest(ctx, q, d, subject)
	}
	return nil
}

// tagDeletes bounds the tags a manifest delete checks at once in a shared
// tier.
const tagDeletes = 8

// forgetManifest drops what points at a deleted manifest in a repository:
// its tags and its entry in its subject's referrers.
func (s *Server) forgetManifest(ctx context.Context, q *request, d, subject digest.Digest) error {
	tags, err := s.store.ListTags(ctx, q.src.storeName(), q.repo)
	if err != nil {
		return err
	}
	if cd, ok := s.store.(cache.ConditionalTagDeleter); ok {
		// A shared tier lists tags by name: each is read, and deleted
		// only while it still points at d; a few at a time.
		g, gctx := errgroup.WithContext(ctx)
		g.SetLimit(tagDeletes)
		for _, t := range tags {
			g.Go(func() error {
				return cd.DeleteTagIf(gctx, cache.TagKey{Upstream: q.src.storeName(), Repo: q.repo, Tag: t.Name}, d)
			})
		}
		if err := g.Wait(); err != nil {
			return err
		}
		tags = nil
	}
	for _, t := range tags {
		if t.Digest == d {
			if err := s.store.DeleteTag(ctx, cache.TagKey{Upstream: q.src.storeName(), Repo: q.repo, Tag: t.Name}); err != nil {
				return err
			}
		}
	}
	if subject != "" {
		return s.store.DeleteReferrer(ctx, q.referrerKey(subject), d)
	}
	return nil
}

// subjectOf returns the subject of a stored manifest ("" when it has none,
// is not stored, or d is a blob).
func (s *Server) subjectOf(ctx context.Context, kind cache.LinkKind, d digest.Digest) digest.Digest {
	if kind != cache.LinkManifest {
		return ""
	}
	m, err := s.store.GetManifest(ctx, d)
	if err != nil {
		return ""
	}
	return referrers.Subject(m.MediaType, m.Data)
}

var errProxiedDelete = &Error{Code: CodeUnsupported,
	Message: "content of a proxied repository is deleted upstream; set push: forward on the upstream to delete through ocimirror"}

func capKey(up *upstreamState, repo string) string { return up.name + "\x00" + repo }
