package proxy

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/gorilla/mux"
	"github.com/opencontainers/go-digest"

	"github.com/ocimirror/ocimirror/cache"
)

// uploadIdle is how long an upload session may sit unused before it is
// cancelled and its bytes discarded.
const uploadIdle = time.Hour

// defaultMaxUploads bounds the sessions open at once; beyond it a new
// upload is answered 429 until some finish or expire.
const defaultMaxUploads = 4096

// uploads are the blob upload sessions in progress. They live in memory: a
// restart cancels them (clients start the upload again).
type uploads struct {
	mu  sync.Mutex
	m   map[string]*upload
	max int
}

// upload is one session. Its bytes go straight to a cache writer, hashed
// as they arrive; nothing is visible until the final PUT's digest matches.
type upload struct {
	id   string
	up   *upstreamState
	repo string

	mu   sync.Mutex // one request at a time per session
	w    cache.BlobWriter
	h    hash.Hash // sha256 of everything written
	used time.Time
	done bool
}

func (u *uploads) add(x *upload) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	if len(u.m) >= u.max {
		return false
	}
	u.m[x.id] = x
	return true
}

func (u *uploads) remove(id string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	delete(u.m, id)
}

// cancelAll discards every session (shutdown).
func (u *uploads) cancelAll(log *slog.Logger) {
	u.mu.Lock()
	all := u.m
	u.m = map[string]*upload{}
	u.mu.Unlock()
	for _, x := range all {
		x.cancel(log)
	}
}

func (x *upload) cancel(log *slog.Logger) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.done {
		return
	}
	x.done = true
	if err := x.w.Cancel(context.Background()); err != nil {
		log.Warn("discarding an upload", "err", err)
	}
}

// expireUploads cancels sessions idle longer than uploadIdle, until the
// server stops.
func (s *Server) expireUploads() {
	t := time.NewTicker(time.Minute)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		}
		var stale []*upload
		s.uploads.mu.Lock()
		for id, x := range s.uploads.m {
			if x.mu.TryLock() {
				if time.Since(x.used) > uploadIdle {
					stale = append(stale, x)
					delete(s.uploads.m, id)
				}
				x.mu.Unlock()
			}
		}
		s.uploads.mu.Unlock()
		for _, x := range stale {
			x.cancel(s.log)
		}
	}
}

func (s *Server) newUpload(ctx context.Context, q *request) (*upload, error) {
	w, err := s.store.CreateBlob(ctx)
	if err != nil {
		return nil, err
	}
	id := make([]byte, 16)
	_, _ = rand.Read(id)
	x := &upload{id: hex.EncodeToString(id), up: q.up, repo: q.repo, w: w, h: sha256.New(), used: time.Now()}
	if !s.uploads.add(x) {
		_ = w.Cancel(ctx)
		return nil, &Error{Code: CodeTooManyRequests, Message: "too many uploads in progress",
			Header: http.Header{"Retry-After": {"60"}}}
	}
	return x, nil
}

// session finds the upload a request names, locked; the caller unlocks.
func (s *Server) session(r *http.Request, q *request) (*upload, error) {
	id := mux.Vars(r)["id"]
	q.ref = id
	s.uploads.mu.Lock()
	x := s.uploads.m[id]
	s.uploads.mu.Unlock()
	if x == nil || x.up != q.up || x.repo != q.repo {
		return nil, &Error{Code: CodeUploadUnknown, Detail: map[string]string{"uuid": id}}
	}
	x.mu.Lock()
	if x.done {
		x.mu.Unlock()
		return nil, &Error{Code: CodeUploadUnknown, Detail: map[string]string{"uuid": id}}
	}
	x.used = time.Now()
	return x, nil
}

// uploadLocation is the URL of a session, as the client addresses it.
func uploadLocation(q *request, id string) string {
	loc := q.clientPath() + "/blobs/uploads/" + id
	if q.ns != "" {
		loc += "?ns=" + url.QueryEscape(q.ns)
	}
	return loc
}

func blobLocation(q *request, d digest.Digest) string {
	loc := q.clientPath() + "/blobs/" + d.String()
	if q.ns != "" {
		loc += "?ns=" + url.QueryEscape(q.ns)
	}
	return loc
}

// writeUploadState answers with where a session stands: its location and
// the range received so far.
func writeUploadState(w http.ResponseWriter, q *request, x *upload, status int) {
	h := w.Header()
	h.Set("Location", uploadLocation(q, x.id))
	h.Set("Docker-Upload-UUID", x.id)
	end := x.w.Size() - 1
	h.Set("Range", "0-"+strconv.FormatInt(max(end, 0), 10))
	h.Set("Content-Length", "0")
	w.WriteHeader(status)
}

// startUpload serves POST /v2/<name>/blobs/uploads/: a mount (?mount=), a
// whole blob in one request (?digest=), or a new session.
func (s *Server) startUpload(w http.ResponseWriter, r *http.Request, q *request) error {
	ctx := r.Context()
	query := r.URL.Query()
	if m := query.Get("mount"); m != "" {
		d, err := parseDigest(m)
		if err != nil {
			return err
		}
		q.dgst, q.ref = d, m
		ok, err := s.mount(ctx, q, d, query.Get("from"))
		if err != nil {
			return err
		}
		if ok {
			return writeBlobCreated(w, q, d)
		}
		// Not mountable: the client pushes the blob in a new session.
	}
	x, err := s.newUpload(ctx, q)
	if err != nil {
		return err
	}
	if dg := query.Get("digest"); dg != "" {
		x.mu.Lock()
		defer x.mu.Unlock()
		return s.finishUpload(w, r, q, x, dg)
	}
	writeUploadState(w, q, x, http.StatusAccepted)
	return nil
}

// patchUpload serves PATCH: a chunk (with Content-Range) or a stream.
func (s *Server) patchUpload(w http.ResponseWriter, r *http.Request, q *request) error {
	x, err := s.session(r, q)
	if err != nil {
		return err
	}
	defer x.mu.Unlock()
	if err := s.appendUpload(w, r, q, x); err != nil {
		return err
	}
	writeUploadState(w, q, x, http.StatusAccepted)
	return nil
}

// putUpload serves PUT ?digest=: the last bytes, if any, then the check.
func (s *Server) putUpload(w http.ResponseWriter, r *http.Request, q *request) error {
	x, err := s.session(r, q)
	if err != nil {
		return err
	}
	defer x.mu.Unlock()
	return s.finishUpload(w, r, q, x, r.URL.Query().Get("digest"))
}

func (s *Server) uploadStatus(w http.ResponseWriter, r *http.Request, q *request) error {
	x, err := s.session(r, q)
	if err != nil {
		return err
	}
	defer x.mu.Unlock()
	writeUploadState(w, q, x, http.StatusNoContent)
	return nil
}

func (s *Server) cancelUpload(w http.ResponseWriter, r *http.Request, q *request) error {
	x, err := s.session(r, q)
	if err != nil {
		return err
	}
	s.uploads.remove(x.id)
	x.mu.Unlock()
	x.cancel(s.log)
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// appendUpload adds a request body to the session. With Content-Range the
// chunk must start where the session ends (else 416 and the session's
// state, so the client can resume) and be as long as it says.
func (s *Server) appendUpload(w http.ResponseWriter, r *http.Request, q *request, x *upload) error {
	size := x.w.Size()
	want := int64(-1)
	if cr := r.Header.Get("Content-Range"); cr != "" {
		start, end, ok := parseContentRange(cr)
		if !ok || start != size || end < start {
			h := w.Header()
			h.Set("Location", uploadLocation(q, x.id))
			h.Set("Docker-Upload-UUID", x.id)
			h.Set("Range", "0-"+strconv.FormatInt(max(size-1, 0), 10))
			return &Error{Code: CodeRangeInvalid, Message: "chunk does not start where the upload ends",
				Detail: map[string]string{"contentRange": cr, "uploaded": strconv.FormatInt(size, 10)}}
		}
		want = end - start + 1
	}
	var body io.Reader = r.Body
	if want >= 0 {
		body = io.LimitReader(r.Body, want+1) // one more byte shows a chunk longer than its range
	}
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	n, err := io.CopyBuffer(io.MultiWriter(x.w, x.h), body, *bp)
	if err != nil {
		s.uploads.remove(x.id)
		x.done = true
		_ = x.w.Cancel(context.WithoutCancel(r.Context()))
		return fmt.Errorf("reading upload body: %w", err)
	}
	if want >= 0 && n != want {
		s.uploads.remove(x.id)
		x.done = true
		_ = x.w.Cancel(context.WithoutCancel(r.Context()))
		return &Error{Code: CodeSizeInvalid, Detail: map[string]string{"expected": strconv.FormatInt(want, 10), "received": strconv.FormatInt(n, 10)}}
	}
	return nil
}

// parseContentRange reads "start-end", also written "bytes start-end" or
// "bytes=start-end".
func parseContentRange(v string) (start, end int64, ok bool) {
	v = strings.TrimPrefix(strings.TrimPrefix(strings.TrimSpace(v), "bytes"), "=")
	a, b, found := strings.Cut(strings.TrimSpace(v), "-")
	if !found {
		return 0, 0, false
	}
	b, _, _ = strings.Cut(b, "/")
	start, err1 := strconv.ParseInt(a, 10, 64)
	end, err2 := strconv.ParseInt(b, 10, 64)
	return start, end, err1 == nil && err2 == nil && start >= 0
}

// finishUpload appends the request body, checks the digest, and commits
// the blob; the session ends either way.
func (s *Server) finishUpload(w http.ResponseWriter, r *http.Request, q *request, x *upload, dg string) error {
	ctx := context.WithoutCancel(r.Context())
	fail := func(err error) error {
		s.uploads.remove(x.id)
		if !x.done {
			x.done = true
			_ = x.w.Cancel(ctx)
		}
		return err
	}
	d, err := parseDigest(dg)
	if err != nil {
		return fail(err)
	}
	q.dgst, q.ref = d, dg
	if err := s.appendUpload(w, r, q, x); err != nil {
		return err
	}
	if got, err := x.digest(d.Algorithm()); err != nil {
		return fail(err)
	} else if got != d {
		return fail(&Error{Code: CodeDigestInvalid, Detail: map[string]string{"digest": d.String(), "received": got.String()}})
	}
	size := x.w.Size()
	s.uploads.remove(x.id)
	x.done = true
	if _, err := s.store.StatBlob(ctx, d); err == nil {
		_ = x.w.Cancel(ctx) // the same bytes are stored already
	} else if err := x.w.Commit(ctx, d, size); err != nil {
		_ = x.w.Cancel(ctx)
		return err
	}
	if err := s.blobPushed(ctx, q, d, size); err != nil {
		return err
	}
	return writeBlobCreated(w, q, d)
}

// digest returns the session's digest with the given algorithm: sha256 as
// hashed on the way, others by reading the bytes back.
func (x *upload) digest(alg digest.Algorithm) (digest.Digest, error) {
	if alg == digest.SHA256 {
		return digest.NewDigest(alg, x.h), nil
	}
	h := alg.Hash()
	if _, err := io.Copy(h, io.NewSectionReader(x.w, 0, x.w.Size())); err != nil {
		return "", err
	}
	return digest.NewDigest(alg, h), nil
}

// blobPushed makes a stored blob part of the request's repository: linked
// in a hosted repository, written through to a forwarding upstream.
func (s *Server) blobPushed(ctx context.Context, q *request, d digest.Digest, size int64) error {
	switch {
	case q.up.hosted:
		return s.store.Link(ctx, q.repo, cache.LinkBlob, d)
	case q.up.forward:
		return q.up.client.PushBlob(ctx, q.repo, d, size, func() io.Reader {
			rd, err := s.store.OpenBlob(ctx, d)
			if err != nil {
				return errReader{err}
			}
			return io.NewSectionReader(rd, 0, size)
		})
	}
	return nil
}

type errReader struct{ err error }

func (e errReader) Read([]byte) (int, error) { return 0, e.err }

func writeBlobCreated(w http.ResponseWriter, q *request, d digest.Digest) error {
	h := w.Header()
	h.Set("Location", blobLocation(q, d))
	h.Set(HeaderContentDigest, d.String())
	h.Set("Content-Length", "0")
	w.WriteHeader(http.StatusCreated)
	return nil
}

// mount links a blob ocimirror already stores into the request's
// repository. From a hosted repository the blob must be linked there;
// anonymous mounts and mounts from proxied repositories need only the blob
// to be stored. It returns false when the client must upload instead.
func (s *Server) mount(ctx context.Context, q *request, d digest.Digest, from string) (bool, error) {
	info, err := s.store.StatBlob(ctx, d)
	if errors.Is(err, cache.ErrNotFound) {
		return false, nil
	} else if err != nil {
		return false, err
	}
	if from != "" && s.isHosted(from) {
		if !validName(from) {
			return false, nil
		}
		if ok, err := s.store.Linked(ctx, from, cache.LinkBlob, d); err != nil || !ok {
			return false, err
		}
	}
	return true, s.blobPushed(ctx, q, d, info.Size)
}

// deleteBlob serves DELETE /v2/<name>/blobs/<digest>. In a hosted
// repository it removes the repository's link; a forwarding upstream
// deletes its copy; other proxied content cannot be deleted.
func (s *Server) deleteBlob(w http.ResponseWriter, r *http.Request, q *request) error {
	if err := q.parseDigestVar(r); err != nil {
		return err
	}
	d := q.dgst
	ctx := r.Context()
	switch {
	case q.up.hosted:
		existed, err := s.store.Unlink(ctx, q.repo, cache.LinkBlob, d)
		if err != nil {
			return err
		}
		if !existed {
			return ErrBlobUnknown(map[string]string{"digest": d.String()})
		}
	case q.up.forward:
		if err := q.up.client.Delete(ctx, q.repo, "blobs/"+d.String()); err != nil {
			return err
		}
		// The cached copy goes too, so the repository answers 404 at once;
		// other repositories that hold the blob fetch it again.
		if err := s.store.DeleteBlob(ctx, d); err != nil {
			return err
		}
	default:
		return errProxiedDelete
	}
	w.Header().Set("Content-Length", "0")
	w.WriteHeader(http.StatusAccepted)
	return nil
}

var errProxiedDelete = &Error{Code: CodeUnsupported,
	Message: "content of a proxied repository is deleted upstream; set push: forward on the upstream to delete through ocimirror"}
