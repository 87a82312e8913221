package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
	"go.opentelemetry.io/otel/trace"

	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/upstream"
)

// maxResumes bounds how often a fill resumes a broken upstream body with a
// Range request.
const maxResumes = 3

// fillBufSize is the read size from upstream and to clients.
const fillBufSize = 256 << 10

var bufPool = sync.Pool{New: func() any { b := make([]byte, fillBufSize); return &b }}

// fills is the set of blob fills in progress, one per upstream and digest.
type fills struct {
	mu sync.Mutex
	m  map[fillKey]*blobFill
}

type fillKey struct {
	upstream string
	digest   digest.Digest
}

// blobFill copies one blob from upstream into the cache. It belongs to the
// server, not to the client that started it: clients follow it, reading
// what has been written so far, and none of them can slow or stop it.
type blobFill struct {
	key fillKey
	// repo is the repository the blob is fetched for; it is linked there
	// once committed.
	repo string

	// ready is closed once the upstream has answered; size, w and startErr
	// are set before and never change after.
	ready    chan struct{}
	startErr error
	size     int64 // -1 when the upstream sent no length
	w        cache.BlobWriter

	// users are the fill itself and the clients following it; the last
	// to go closes w.
	users atomic.Int32

	mu    sync.Mutex
	avail int64 // bytes readable through w
	done  bool
	err   error         // why the fill failed; set with done
	wake  chan struct{} // closed and replaced whenever the above change
}

func (f *blobFill) state() (avail int64, done bool, err error, wake <-chan struct{}) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.avail, f.done, f.err, f.wake
}

func (f *blobFill) update(avail int64, done bool, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if avail == f.avail && done == f.done {
		return
	}
	f.avail, f.done, f.err = avail, done, err
	close(f.wake)
	f.wake = make(chan struct{})
}

// joinFill returns the running fill of the request's upstream for its
// digest, starting one for the request's repository when none runs. It
// returns nil when the repository turned out to hold the blob already.
func (s *Server) joinFill(ctx context.Context, q *request) (f *blobFill, started bool, err error) {
	key := fillKey{upstream: q.up.name, digest: q.dgst}
	s.fills.mu.Lock()
	defer s.fills.mu.Unlock()
	if f := s.fills.m[key]; f != nil {
		f.users.Add(1)
		return f, false, nil
	}
	// A fill may have committed between the caller's miss and this lock.
	if _, err := s.heldBlob(ctx, q); err == nil {
		return nil, false, nil
	} else if !errors.Is(err, cache.ErrNotFound) {
		return nil, false, err
	}
	f = &blobFill{key: key, repo: q.repo, ready: make(chan struct{}), size: -1, wake: make(chan struct{})}
	f.users.Store(2) // the fill and its first client
	s.fills.m[key] = f
	s.work.Add(1)
	fctx := trace.ContextWithSpanContext(s.ctx, trace.SpanContextFromContext(ctx))
	go s.runFill(fctx, f, q.up)
	return f, true, nil
}

// release is called once by the fill and by each client that joined it:
// the last one closes the writer, whose file its followers were reading.
func (f *blobFill) release() {
	if f.users.Add(-1) == 0 && f.w != nil {
		_ = f.w.Close()
	}
}

// endFill removes a fill from the set. It runs before the fill's end is
// published: a client arriving after a failure starts afresh instead of
// joining a fill that is about to fail it.
func (s *Server) endFill(f *blobFill) {
	s.fills.mu.Lock()
	delete(s.fills.m, f.key)
	s.fills.mu.Unlock()
}

// runFill streams the blob from upstream into a cache writer, hashing as it
// goes, and commits only if size and digest match; then the blob is linked
// to the fill's repository. A broken upstream body is resumed with Range
// up to maxResumes times.
func (s *Server) runFill(ctx context.Context, f *blobFill, up *upstreamState) {
	defer s.work.Done()
	defer f.release()
	d := f.key.digest
	log := s.log.With("upstream", up.name, "repo", f.repo, "digest", d)
	start := time.Now()

	resp, err := up.client.Blob(ctx, http.MethodGet, f.repo, d, 0, 0)
	if err == nil && resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		err = fmt.Errorf("%w: blob GET answered %d", upstream.ErrInvalidResponse, resp.StatusCode)
	}
	var w cache.BlobWriter
	if err == nil {
		if w, err = s.store.CreateBlob(ctx); err != nil {
			resp.Body.Close()
		}
	}
	if err != nil {
		s.endFill(f)
		f.startErr = err
		close(f.ready)
		return
	}
	f.size, f.w = resp.ContentLength, w
	close(f.ready)

	written, err := s.copyBlob(ctx, f, up, resp)
	if err == nil && f.size >= 0 && written != f.size {
		err = fmt.Errorf("%w: got %d bytes, upstream announced %d", errSizeMismatch, written, f.size)
	}
	if err == nil {
		err = w.Commit(ctx, d, written)
	}
	if err != nil {
		// Out of the set, then the failure published, then the bytes
		// discarded: a follower that sees its read fail must find no
		// failing fill to join when it comes back.
		log.Warn("blob fill failed; nothing cached", "err", err, "bytes", written)
		s.endFill(f)
		f.update(w.Size(), true, err)
		if cerr := w.Cancel(context.WithoutCancel(ctx)); cerr != nil {
			log.Error("discarding failed fill", "err", cerr)
		}
		return
	}
	if err := s.store.Link(context.WithoutCancel(ctx), cache.RepoKey{Upstream: up.name, Repo: f.repo}, cache.LinkBlob, d, cache.OriginUpstream); err != nil {
		log.Error("linking a filled blob to its repository", "err", err)
	}
	log.Debug("blob fill committed", "bytes", written, "duration", time.Since(start))
	s.endFill(f)
	f.update(written, true, nil)
}

// copyBlob copies the body into f.w and hashes it, resuming a broken body.
// It returns the byte count, or an error when the bytes are not the digest's.
func (s *Server) copyBlob(ctx context.Context, f *blobFill, up *upstreamState, resp *http.Response) (int64, error) {
	d := f.key.digest
	h := d.Algorithm().Hash()
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	var written int64
	body := resp.Body
	defer func() {
		if body != nil {
			body.Close()
		}
	}()
	for resumes := 0; ; {
		n, err := body.Read(buf)
		if n > 0 {
			h.Write(buf[:n])
			if _, werr := f.w.Write(buf[:n]); werr != nil {
				return written, werr
			}
			written += int64(n)
			if f.size >= 0 && written > f.size {
				return written, fmt.Errorf("%w: more than the %d bytes announced", errSizeMismatch, f.size)
			}
			f.update(written, false, nil)
		}
		if err == nil {
			continue
		}
		if errors.Is(err, io.EOF) {
			break
		}
		if ctx.Err() != nil || resumes >= maxResumes {
			return written, fmt.Errorf("%w: reading blob: %v", upstream.ErrUnavailable, err)
		}
		resumes++
		body.Close()
		body = nil
		s.log.Debug("blob body broke; resuming", "upstream", up.name, "digest", d, "offset", written, "err", err)
		next, rerr := up.client.Blob(ctx, http.MethodGet, f.repo, d, written, f.size)
		if rerr != nil {
			return written, rerr
		}
		body = next.Body
		if next.StatusCode != http.StatusPartialContent || !strings.HasPrefix(next.Header.Get("Content-Range"), "bytes "+strconv.FormatInt(written, 10)+"-") {
			return written, fmt.Errorf("%w: resume at %d answered %d %q", upstream.ErrUnavailable, written, next.StatusCode, next.Header.Get("Content-Range"))
		}
	}
	if got := digest.NewDigest(d.Algorithm(), h); got != d {
		return written, fmt.Errorf("%w: blob hashes to %s", errDigestMismatch, got)
	}
	return written, nil
}

// follow writes bytes [start, end) of the blob to w as the fill delivers
// them; end < 0 means to the end of the blob. The response's last byte is
// held back until the fill is verified and committed, so a client never
// sees a clean end of a body that turns out wrong: it sees a cut connection.
func (s *Server) follow(ctx context.Context, w deadlineWriter, f *blobFill, start, end int64) error {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	off := start
	for {
		avail, done, ferr, wake := f.state()
		if ferr != nil {
			return errAbort{ferr}
		}
		total := end
		if total < 0 && done {
			total = avail
		}
		limit := avail
		if total >= 0 {
			limit = min(limit, total)
			if !done {
				limit = min(limit, total-1)
			}
		}
		if off < limit {
			n := int(min(int64(len(buf)), limit-off))
			if _, err := f.w.ReadAt(buf[:n], off); err != nil {
				return errAbort{err}
			}
			if _, err := w.Write(buf[:n]); err != nil {
				return err
			}
			off += int64(n)
			continue
		}
		if done {
			return nil
		}
		// Caught up with the upstream: what was written goes out now, not
		// when a buffer fills (a slow upstream's bytes arrive as they come).
		w.flush()
		select {
		case <-wake:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}
