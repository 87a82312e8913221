package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/upstream"
)

// clientWriteTimeout drops a client that accepts nothing for this long.
const clientWriteTimeout = 2 * time.Minute

// blob serves GET and HEAD /v2/<name>/blobs/<digest>.
func (s *Server) blob(w http.ResponseWriter, r *http.Request, q *request) error {
	if err := q.parseDigestVar(r); err != nil {
		return err
	}
	return q.src.blob(w, r, q)
}

// blob implements source. A blob the repository links is served from the
// store. One whose bytes this upstream delivered for another repository
// is served after one upstream HEAD confirms this repository holds it.
// Anything else is fetched: one upstream GET shared by every client of
// the upstream that wants the blob, each confirmed for its own repository.
func (u *upstreamState) blob(w http.ResponseWriter, r *http.Request, q *request) error {
	s := u.s
	ctx := r.Context()
	_, linked, err := s.store.Linked(ctx, q.key(), cache.LinkBlob, q.dgst)
	if err != nil {
		return err
	}
	if linked {
		if served, err := s.serveHeld(w, r, q); served {
			return err
		}
	} else if info, ok, err := u.confirmStoredBlob(ctx, q); err != nil {
		return err
	} else if ok {
		q.setCache("revalidated")
		return s.serveStored(w, r, q, info.Size)
	}
	if r.Method == http.MethodHead {
		return u.headBlob(w, r, q)
	}
	var f *blobFill
	var rd *reader
	var started bool
	for attempt := 0; f == nil; attempt++ {
		if f, rd, started, err = s.joinFill(ctx, q); err != nil {
			return err
		}
		if f != nil {
			break
		}
		// Held after all; unless it is evicted as we go to read it, when
		// a fill it is.
		if served, err := s.serveHeld(w, r, q); served {
			return err
		}
		if attempt == 2 {
			return cache.ErrNotFound
		}
	}
	q.setCache(missOrCoalesced(!started))
	if f.repo != q.repo && !linked {
		// The fill is another repository's: this one must hold the blob too.
		if err := u.confirm(ctx, q.repo, cache.LinkBlob, q.dgst, -1); err != nil {
			f.release(rd)
			return err
		}
	}
	err = s.serveFill(w, r, q, f, rd)
	f.release(rd)
	if f.unstored() {
		q.cache = cachePassthrough
	}
	if errors.Is(err, errLeftBehind) {
		// The fill streams past a full store and has sent the bytes
		// this client wants already: it follows the next fill, shared
		// with the clients that come after it.
		old := f
		f, rd = s.rejoinFill(ctx, q, old)
		err = s.serveFill(w, r, q, f, rd)
		f.release(rd)
	}
	if errors.Is(err, errLeftBehind) {
		// Late again: a stream of its own.
		f, rd = s.privateFill(ctx, q)
		err = s.serveFill(w, r, q, f, rd)
		f.release(rd)
	}
	return err
}

// serveHeld serves the blob from the store when the request's repository
// holds it. served is false when it does not, or when the blob went (was
// evicted) between its stat and its open: nothing was written then.
func (s *Server) serveHeld(w http.ResponseWriter, r *http.Request, q *request) (served bool, err error) {
	info, err := s.heldBlob(r.Context(), q)
	if err == nil {
		err = s.serveStored(w, r, q, info.Size)
	}
	if errors.Is(err, cache.ErrNotFound) {
		return false, nil
	}
	if err == nil {
		q.setCache("hit")
	}
	return true, err
}

// confirmStoredBlob is confirmStored for blobs.
func (u *upstreamState) confirmStoredBlob(ctx context.Context, q *request) (cache.BlobInfo, bool, error) {
	s := u.s
	held, err := s.store.UpstreamHolds(ctx, u.name, cache.LinkBlob, q.dgst)
	if err != nil || !held {
		return cache.BlobInfo{}, false, err
	}
	info, err := s.store.StatBlob(ctx, q.dgst)
	if errors.Is(err, cache.ErrNotFound) {
		return cache.BlobInfo{}, false, nil
	} else if err != nil {
		return cache.BlobInfo{}, false, err
	}
	if err := u.confirm(ctx, q.repo, cache.LinkBlob, q.dgst, info.Size); err != nil {
		return cache.BlobInfo{}, false, err
	}
	return info, true, nil
}

func setBlobHeaders(h http.Header, q *request, status int, start, end, size int64) {
	h.Set("Content-Type", "application/octet-stream")
	h.Set(HeaderContentDigest, q.dgst.String())
	h.Set("Etag", `"`+q.dgst.String()+`"`)
	h.Set("Cache-Control", "max-age=31536000")
	if size < 0 {
		return // length unknown until the fill ends: chunked, no ranges
	}
	h.Set("Accept-Ranges", "bytes")
	h.Set("Content-Length", strconv.FormatInt(end-start, 10))
	if status == http.StatusPartialContent {
		h.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", start, end-1, size))
	}
}

// serveStored answers from a committed blob, with Range.
func (s *Server) serveStored(w http.ResponseWriter, r *http.Request, q *request, size int64) error {
	start, end, status, err := blobRange(r.Header.Get("Range"), size)
	if err != nil {
		return err
	}
	if t, ok := s.store.(cache.Toucher); ok {
		t.Touch(q.dgst)
	}
	if r.Method == http.MethodHead {
		setBlobHeaders(w.Header(), q, status, start, end, size)
		w.WriteHeader(status)
		return nil
	}
	rd, err := s.store.OpenBlob(r.Context(), q.dgst)
	if err != nil {
		return err
	}
	defer rd.Close()
	setBlobHeaders(w.Header(), q, status, start, end, size)
	w.WriteHeader(status)
	dw := newDeadlineWriter(w)
	if fb, ok := rd.(cache.FileBlob); ok {
		return sendFile(dw, fb.OSFile(), start, end)
	}
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	for off := start; off < end; {
		n := int(min(int64(len(buf)), end-off))
		if _, err := rd.ReadAt(buf[:n], off); err != nil {
			return errAbort{fmt.Errorf("reading cached blob: %w", err)}
		}
		if _, err := dw.Write(buf[:n]); err != nil {
			return err
		}
		off += int64(n)
	}
	return nil
}

// sendFileStep is how much of a file goes per write deadline.
const sendFileStep = 4 << 20

// sendFile copies bytes [start, end) of a blob's file to the client with
// zero copy (net/http uses sendfile for an *os.File), a fresh write
// deadline for every step.
func sendFile(dw deadlineWriter, f *os.File, start, end int64) error {
	if _, err := f.Seek(start, io.SeekStart); err != nil {
		return errAbort{fmt.Errorf("reading cached blob: %w", err)}
	}
	for off := start; off < end; {
		n, err := dw.copyFrom(f, min(sendFileStep, end-off))
		off += n
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF // the file is shorter than its index says
			}
			return errAbort{fmt.Errorf("sending cached blob: %w", err)}
		}
	}
	return nil
}

// serveFill answers from a fill in progress: headers at once, bytes as they
// arrive.
// It returns errLeftBehind, having written nothing, when the fill streams
// without storing and has passed what the client wants.
func (s *Server) serveFill(w http.ResponseWriter, r *http.Request, q *request, f *blobFill, rd *reader) error {
	ctx := r.Context()
	s.metrics.fillWaiters.Add(1)
	defer s.metrics.fillWaiters.Add(-1)
	select {
	case <-f.ready:
	case <-ctx.Done():
		return ctx.Err()
	}
	if f.startErr != nil {
		return f.startErr
	}
	if f.size < 0 && r.Header.Get("Range") != "" && !f.private {
		// Ranges need the length: wait for the end and serve the stored
		// blob. One that was not stored (a full store) is sent whole,
		// from a stream of its own.
		f.unseek(rd)
		for {
			avail, done, err, wake := f.state()
			if err != nil {
				return err
			}
			if done {
				// Verified; stored once the fill has committed.
				select {
				case <-f.ended:
				case <-ctx.Done():
					return ctx.Err()
				}
				if err := s.serveStored(w, r, q, avail); !errors.Is(err, cache.ErrNotFound) {
					return err
				}
				return errLeftBehind
			}
			select {
			case <-wake:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
	start, end, status := int64(0), f.size, http.StatusOK
	if f.size >= 0 {
		var err error
		if start, end, status, err = blobRange(r.Header.Get("Range"), f.size); err != nil {
			return err
		}
	}
	if err := f.seek(rd, start); err != nil {
		return err
	}
	setBlobHeaders(w.Header(), q, status, start, end, f.size)
	w.WriteHeader(status)
	dw := newDeadlineWriter(w)
	dw.flush() // the headers go as soon as the upstream has answered
	return s.follow(ctx, dw, f, rd, start, end)
}

// headBlob answers a HEAD miss from the repository's running fill or an
// upstream HEAD; it never downloads.
func (u *upstreamState) headBlob(w http.ResponseWriter, r *http.Request, q *request) error {
	s := u.s
	q.setCache("miss")
	ctx := r.Context()
	s.fills.mu.Lock()
	f := s.fills.m[fillKey{upstream: u.name, digest: q.dgst}]
	s.fills.mu.Unlock()
	if f != nil && f.repo == q.repo {
		select {
		case <-f.ready:
			if f.startErr == nil && f.size >= 0 {
				q.cache = "coalesced"
				setBlobHeaders(w.Header(), q, http.StatusOK, 0, f.size, f.size)
				w.WriteHeader(http.StatusOK)
				return nil
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	hctx, cancel := context.WithTimeout(ctx, upstreamFetchTimeout)
	defer cancel()
	resp, err := u.client.Blob(hctx, http.MethodHead, q.repo, q.dgst, 0, 0)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.ContentLength < 0 {
		return fmt.Errorf("%w: blob HEAD answered %d with length %d", upstream.ErrInvalidResponse, resp.StatusCode, resp.ContentLength)
	}
	setBlobHeaders(w.Header(), q, http.StatusOK, 0, resp.ContentLength, resp.ContentLength)
	w.WriteHeader(http.StatusOK)
	return nil
}

// blobRange applies a Range header (RFC 9110) to a blob of size bytes and
// returns the half-open span to send and the status. A header it cannot
// parse, or one with several ranges, is ignored (the whole blob, 200).
func blobRange(header string, size int64) (start, end int64, status int, err error) {
	spec, ok := strings.CutPrefix(header, "bytes=")
	if !ok || strings.Contains(spec, ",") {
		return 0, size, http.StatusOK, nil
	}
	first, last, ok := strings.Cut(strings.TrimSpace(spec), "-")
	if !ok {
		return 0, size, http.StatusOK, nil
	}
	unsatisfiable := &Error{Code: CodeRangeInvalid, Header: http.Header{"Content-Range": {"bytes */" + strconv.FormatInt(size, 10)}},
		Detail: map[string]string{"range": header}}
	if first == "" {
		n, perr := strconv.ParseInt(last, 10, 64)
		if perr != nil || n < 0 {
			return 0, size, http.StatusOK, nil
		}
		if n == 0 || size == 0 {
			return 0, 0, 0, unsatisfiable
		}
		return max(size-n, 0), size, http.StatusPartialContent, nil
	}
	a, perr := strconv.ParseInt(first, 10, 64)
	if perr != nil || a < 0 {
		return 0, size, http.StatusOK, nil
	}
	b := size - 1
	if last != "" {
		if b, perr = strconv.ParseInt(last, 10, 64); perr != nil || b < a {
			return 0, size, http.StatusOK, nil
		}
	}
	if a >= size {
		return 0, 0, 0, unsatisfiable
	}
	return a, min(b, size-1) + 1, http.StatusPartialContent, nil
}

// deadlineWriter gives every write to a client a fresh deadline, so a
// client that stops reading is dropped instead of holding its goroutine.
type deadlineWriter struct {
	w  http.ResponseWriter
	rc *http.ResponseController
}

func newDeadlineWriter(w http.ResponseWriter) deadlineWriter {
	return deadlineWriter{w: w, rc: http.NewResponseController(w)}
}

func (d deadlineWriter) Write(p []byte) (int, error) {
	_ = d.rc.SetWriteDeadline(time.Now().Add(clientWriteTimeout))
	return d.w.Write(p)
}

// copyFrom copies n bytes of r under one write deadline; the response
// writer's ReadFrom lets net/http use sendfile.
func (d deadlineWriter) copyFrom(r io.Reader, n int64) (int64, error) {
	_ = d.rc.SetWriteDeadline(time.Now().Add(clientWriteTimeout))
	return io.CopyN(d.w, r, n)
}

// flush sends what is buffered to the client now.
func (d deadlineWriter) flush() {
	_ = d.rc.SetWriteDeadline(time.Now().Add(clientWriteTimeout))
	_ = d.rc.Flush()
}
