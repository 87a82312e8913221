package proxy

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"hash"
	"io"
	"log/slog"
	"net"
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

// Bounds of upload sessions, which any client can open.
const (
	// defaultUploadIdle is how long a session may sit unused before it is
	// cancelled and its bytes discarded.
	defaultUploadIdle = 5 * time.Minute
	// defaultMaxUploads bounds the sessions open at once, and
	// defaultMaxUploadsPerClient those of one client address; beyond them
	// a new upload is answered 429 until some finish or expire.
	defaultMaxUploads          = 4096
	defaultMaxUploadsPerClient = 64
	// defaultBodyIdle cuts a request body (a PATCH, a PUT) that sends
	// nothing for this long: a trickling client cannot hold a session forever.
	defaultBodyIdle = 30 * time.Second
)

// uploads are the blob upload sessions in progress. They live in memory: a
// restart cancels them (clients start the upload again). A session's bytes
// are in a temporary file, not in memory.
type uploads struct {
	mu        sync.Mutex
	m         map[string]*upload
	perClient map[string]int
	max       int
	maxClient int
	idle      time.Duration
}

func newUploads(max, perClient int, idle time.Duration) uploads {
	if max <= 0 {
		max = defaultMaxUploads
	}
	if perClient <= 0 {
		perClient = defaultMaxUploadsPerClient
	}
	if idle <= 0 {
		idle = defaultUploadIdle
	}
	return uploads{m: map[string]*upload{}, perClient: map[string]int{}, max: max, maxClient: perClient, idle: idle}
}

// upload is one session. Its bytes go straight to a cache writer, hashed
// as they arrive; nothing is visible until the final PUT's digest matches.
type upload struct {
	id     string
	src    source
	repo   string
	client string

	mu   sync.Mutex // one request at a time per session
	w    cache.BlobWriter
	h    hash.Hash // sha256 of everything written
	used time.Time
	done bool
}

// add registers a session unless the bounds are reached; the error says
// which.
func (u *uploads) add(x *upload) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	if len(u.m) >= u.max {
		return &Error{Code: CodeTooManyRequests, Message: "too many uploads in progress", Header: http.Header{"Retry-After": {"60"}}}
	}
	if u.perClient[x.client] >= u.maxClient {
		return &Error{Code: CodeTooManyRequests, Message: "too many uploads in progress from this client",
			Header: http.Header{"Retry-After": {"60"}}, Detail: map[string]string{"client": x.client}}
	}
	u.m[x.id] = x
	u.perClient[x.client]++
	return nil
}

// open is how many sessions are open.
func (u *uploads) open() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return len(u.m)
}

func (u *uploads) remove(id string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.removeLocked(id)
}

func (u *uploads) removeLocked(id string) {
	x := u.m[id]
	if x == nil {
		return
	}
	delete(u.m, id)
	if u.perClient[x.client]--; u.perClient[x.client] <= 0 {
		delete(u.perClient, x.client)
	}
}

// cancelAll discards every session (shutdown).
func (u *uploads) cancelAll(log *slog.Logger) {
	u.mu.Lock()
	all := u.m
	u.m, u.perClient = map[string]*upload{}, map[string]int{}
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

// expireUploads cancels sessions idle longer than the idle bound, until
// the server stops.
func (s *Server) expireUploads() {
	t := time.NewTicker(min(time.Minute, s.uploads.idle/2))
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
				if time.Since(x.used) > s.uploads.idle {
					stale = append(stale, x)
					s.uploads.removeLocked(id)
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

// clientAddr is the address a request came from, without its port.
func clientAddr(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

func (s *Server) newUpload(r *http.Request, q *request) (*upload, error) {
	ctx := r.Context()
	w, err := s.store.CreateBlob(ctx)
	if err != nil {
		return nil, err
	}
	id := make([]byte, 16)
	_, _ = rand.Read(id)
	x := &upload{id: s.uploadID(id), src: q.src, repo: q.repo, client: clientAddr(r), w: w, h: sha256.New(), used: time.Now()}
	if err := s.uploads.add(x); err != nil {
		_ = w.Cancel(ctx)
		return nil, err
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
	if x == nil || x.src != q.src || x.repo != q.repo {
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
	query := r.URL.Query()
	if m := query.Get("mount"); m != "" {
		d, err := parseDigest(m)
		if err != nil {
			return err
		}
		q.dgst, q.ref = d, m
		ok, err := s.mount(r, q, d, query.Get("from"))
		if err != nil {
			return err
		}
		if ok {
			return writeBlobCreated(w, q, d)
		}
		// Not mountable: the client pushes the blob in a new session.
	}
	x, err := s.newUpload(r, q)
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
	var body io.Reader = s.newIdleReader(w, r.Body)
	if want >= 0 {
		body = io.LimitReader(r.Body, want+1) // one more byte shows a chunk longer than its range
	}
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	n, err := io.CopyBuffer(io.MultiWriter(x.w, x.h), body, *bp)
	if errors.Is(err, cache.ErrFull) {
		return s.failUpload(r, x, err) // the disk, not the body
	}
	if err != nil {
		return s.failUpload(r, x, bodyError(err))
	}
	if want >= 0 && n != want {
		return s.failUpload(r, x, &Error{Code: CodeSizeInvalid, Detail: map[string]string{"expected": strconv.FormatInt(want, 10), "received": strconv.FormatInt(n, 10)}})
	}
	return nil
}

// bodyError answers a request body that could not be read: one that
// stalled past the idle bound is 408, one cut short 400.
func bodyError(err error) error {
	if ne, ok := errors.AsType[net.Error](err); ok && ne.Timeout() {
		return &Error{Code: CodeUploadInvalid, Status: http.StatusRequestTimeout, Message: "the request body stalled", Err: err}
	}
	return &Error{Code: CodeUploadInvalid, Message: "the request body could not be read", Err: err}
}

// failUpload ends a session whose bytes can no longer be trusted.
func (s *Server) failUpload(r *http.Request, x *upload, err error) error {
	s.uploads.remove(x.id)
	x.done = true
	_ = x.w.Cancel(context.WithoutCancel(r.Context()))
	return err
}

// idleReader gives every read of a request body a fresh deadline, so a
// client that stops sending is cut after the idle bound instead of holding
// its session and goroutine.
type idleReader struct {
	r    io.Reader
	rc   *http.ResponseController
	idle time.Duration
}

func (s *Server) newIdleReader(w http.ResponseWriter, r io.Reader) idleReader {
	return idleReader{r: r, rc: http.NewResponseController(w), idle: s.bodyIdle}
}

func (b idleReader) Read(p []byte) (int, error) {
	_ = b.rc.SetReadDeadline(time.Now().Add(b.idle))
	n, err := b.r.Read(p)
	if err != nil {
		_ = b.rc.SetReadDeadline(time.Time{})
	}
	return n, err
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
	} else if err := x.w.Close(); err != nil {
		s.log.Warn("closing a committed upload", "err", err)
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

// blobPushed makes a stored blob part of the request's repository: the
// source's part first (a forwarding upstream gets it), then the link.
func (s *Server) blobPushed(ctx context.Context, q *request, d digest.Digest, size int64) error {
	if err := q.src.pushBlob(ctx, q, d, size); err != nil {
		return err
	}
	return s.store.Link(ctx, q.key(), cache.LinkBlob, d, cache.OriginPushed)
}

func writeBlobCreated(w http.ResponseWriter, q *request, d digest.Digest) error {
	h := w.Header()
	h.Set("Location", blobLocation(q, d))
	h.Set(HeaderContentDigest, d.String())
	h.Set("Content-Length", "0")
	w.WriteHeader(http.StatusCreated)
	return nil
}

// mount links a blob into the request's repository from the repository
// named by from, which must hold it (a hosted repository's link, a proxied
// repository's fetched or pushed blob). from is a name as the client
// writes it, routed like the request's own (ns applies to it too). A mount
// without from, or from a repository that does not hold the blob, is not
// done: a digest alone is no proof that the client may read the bytes. It
// returns false when the client must upload instead.
func (s *Server) mount(r *http.Request, q *request, d digest.Digest, from string) (bool, error) {
	ctx := r.Context()
	if from == "" {
		return false, nil
	}
	var nsUp *upstreamState
	if q.ns != "" {
		nsUp = q.up
	}
	src, name, _, err := s.route(from, nsUp)
	if err != nil || !s.mayPull(r, q, from, src, name) {
		return false, nil // the client uploads instead
	}
	fromUp, _ := src.(*upstreamState)
	fromKey := cache.RepoKey{Upstream: src.storeName(), Repo: s.upstreamRepo(fromUp, name)}
	if _, ok, err := s.store.Linked(ctx, fromKey, cache.LinkBlob, d); err != nil || !ok {
		return false, err
	}
	info, err := s.store.StatBlob(ctx, d)
	if errors.Is(err, cache.ErrNotFound) {
		return false, nil
	} else if err != nil {
		return false, err
	}
	return true, s.blobPushed(ctx, q, d, info.Size)
}
