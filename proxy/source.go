package proxy

import (
	"context"
	"errors"
	"net/http"

	"github.com/opencontainers/go-digest"

	"github.com/ocimirror/ocimirror/cache"
)

// source is where a repository's content comes from: ocimirror itself (a
// hosted repository) or an upstream registry (a proxied one). Handlers
// parse, validate, store and answer; a source decides what its repository
// holds and what a write must do first. Both follow one rule: a repository
// serves only content it holds, never content stored for another name on
// the strength of its digest.
type source interface {
	// storeName is the upstream part of the repository's keys in the
	// store ("" for hosted repositories); logName names it in logs.
	storeName() string
	logName() string

	// manifest returns manifest d if the repository holds it. With head,
	// Data may be nil when only an upstream HEAD was made.
	manifest(ctx context.Context, q *request, d digest.Digest, head bool) (manifestInfo, error)
	// tag resolves the request's tag. held is false when the answer came
	// from an upstream HEAD alone and the manifest is not stored.
	tag(ctx context.Context, q *request, head bool) (e cache.TagEntry, held bool, err error)
	// blob answers GET or HEAD of the request's blob.
	blob(w http.ResponseWriter, r *http.Request, q *request) error
	// tagList returns the repository's tags, sorted.
	tagList(ctx context.Context, q *request) (tagList, error)
	// referrers returns the subject's referrers, every one verified.
	referrers(ctx context.Context, q *request, subject digest.Digest) (referrersAnswer, error)

	// acceptsTags says whether pushes may set the repository's tags.
	acceptsTags() error
	// pushManifest runs before a pushed manifest is stored and linked:
	// checks, and the upstream's copy when pushes are forwarded.
	pushManifest(ctx context.Context, q *request, p *pushed) error
	// pushBlob runs after a pushed blob is stored, before it is linked.
	pushBlob(ctx context.Context, q *request, d digest.Digest, size int64) error
	// deleteTag runs before the request's tag is deleted here.
	deleteTag(ctx context.Context, q *request) error
	// deleteContent runs before the repository's link to d is removed;
	// linked and origin describe that link.
	deleteContent(ctx context.Context, q *request, kind cache.LinkKind, d digest.Digest, linked bool, origin cache.LinkOrigin) error
}

var (
	_ source = (*hostedSource)(nil)
	_ source = (*upstreamState)(nil)
)

// hostedSource serves the repositories ocimirror is the registry for:
// content is what was pushed and linked there, nothing else.
type hostedSource struct{ s *Server }

func (h *hostedSource) storeName() string { return "" }
func (h *hostedSource) logName() string   { return "hosted" }

func (h *hostedSource) manifest(ctx context.Context, q *request, d digest.Digest, _ bool) (manifestInfo, error) {
	if _, ok, err := h.s.store.Linked(ctx, q.key(), cache.LinkManifest, d); err != nil {
		return manifestInfo{}, err
	} else if !ok {
		return manifestInfo{}, ErrManifestUnknown(map[string]string{"name": q.name, "reference": d.String()})
	}
	return h.tagged(ctx, q, d)
}

// tagged returns manifest d, which the repository's tag was just read to
// point at. A tag is written only once its manifest is linked in its
// repository, and a delete unlinks before it untags: the tag vouches for
// the link, which a shared tier would otherwise read from its bucket a
// second time.
func (h *hostedSource) tagged(ctx context.Context, q *request, d digest.Digest) (manifestInfo, error) {
	unknown := ErrManifestUnknown(map[string]string{"name": q.name, "reference": d.String()})
	m, err := h.s.store.GetManifest(ctx, d)
	if errors.Is(err, cache.ErrNotFound) {
		return manifestInfo{}, unknown
	}
	return manifestInfo{Manifest: m}, err
}

func (h *hostedSource) tag(ctx context.Context, q *request, _ bool) (cache.TagEntry, bool, error) {
	e, err := h.s.store.GetTag(ctx, q.tagKey())
	if errors.Is(err, cache.ErrNotFound) {
		return e, false, ErrManifestUnknown(map[string]string{"name": q.name, "reference": q.ref})
	}
	return e, true, err
}

func (h *hostedSource) blob(w http.ResponseWriter, r *http.Request, q *request) error {
	info, err := h.s.heldBlob(r.Context(), q)
	if errors.Is(err, cache.ErrNotFound) && h.s.shared != nil {
		info, err = h.s.hydrate(r.Context(), q)
	}
	if errors.Is(err, cache.ErrNotFound) {
		return ErrBlobUnknown(map[string]string{"digest": q.dgst.String()})
	}
	if err != nil {
		return err
	}
	return h.s.serveStored(w, r, q, info.Size)
}

func (h *hostedSource) tagList(ctx context.Context, q *request) (tagList, error) {
	stored, err := h.s.store.ListTags(ctx, "", q.repo)
	if err != nil {
		return tagList{}, err
	}
	l := tagList{tags: make([]string, 0, len(stored))}
	for _, t := range stored {
		l.tags = append(l.tags, t.Name)
	}
	return l, nil
}

func (h *hostedSource) referrers(ctx context.Context, q *request, subject digest.Digest) (referrersAnswer, error) {
	local, err := h.s.store.ListReferrers(ctx, q.referrerKey(subject))
	return referrersAnswer{descriptors: local}, err
}

// pushManifest refuses a manifest that names a blob or manifest the
// repository lacks.
func (h *hostedSource) pushManifest(ctx context.Context, q *request, p *pushed) error {
	return h.s.checkReferences(ctx, q.key(), p.manifest)
}

func (h *hostedSource) acceptsTags() error { return nil }

func (h *hostedSource) pushBlob(context.Context, *request, digest.Digest, int64) error { return nil }

func (h *hostedSource) deleteTag(ctx context.Context, q *request) error {
	if _, err := h.s.store.GetTag(ctx, q.tagKey()); errors.Is(err, cache.ErrNotFound) {
		return ErrManifestUnknown(map[string]string{"name": q.name, "reference": q.ref})
	} else if err != nil {
		return err
	}
	return nil
}

func (h *hostedSource) deleteContent(_ context.Context, q *request, kind cache.LinkKind, d digest.Digest, linked bool, _ cache.LinkOrigin) error {
	if !linked {
		return unknownContent(q, kind, d)
	}
	return nil
}

// unknownContent is the not-found answer for a manifest or blob.
func unknownContent(q *request, kind cache.LinkKind, d digest.Digest) error {
	if kind == cache.LinkBlob {
		return ErrBlobUnknown(map[string]string{"digest": d.String()})
	}
	return ErrManifestUnknown(map[string]string{"name": q.name, "reference": d.String()})
}

// heldBlob returns the stored blob the request names when its repository
// links it; cache.ErrNotFound otherwise.
func (s *Server) heldBlob(ctx context.Context, q *request) (cache.BlobInfo, error) {
	if _, ok, err := s.store.Linked(ctx, q.key(), cache.LinkBlob, q.dgst); err != nil {
		return cache.BlobInfo{}, err
	} else if !ok {
		return cache.BlobInfo{}, cache.ErrNotFound
	}
	return s.store.StatBlob(ctx, q.dgst)
}
