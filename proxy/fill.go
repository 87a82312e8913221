package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
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

// serialCommitBytes is the size from which fills commit one at a time.
const serialCommitBytes = 1 << 20

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

	// private fills are not in the set: they serve one client that came
	// too late to follow an unstored fill.
	private bool
	// fromPeer: another replica asked for the blob, as its owner: the
	// fill asks no peer in turn.
	fromPeer bool

	// ready is closed once the upstream has answered; size, w and startErr
	// are set before and never change after. w is nil when the fill does
	// not store (the store was full).
	ready    chan struct{}
	startErr error
	size     int64 // -1 when the upstream sent no length
	w        cache.BlobWriter

	// users are the fill itself and the clients following it; the last
	// to go closes w.
	users atomic.Int32
	// ended is closed when the fill is over: committed and out of the
	// set, or failed.
	ended chan struct{}

	mu    sync.Mutex
	from  string // the peer the fill reads from now ("" for none)
	avail int64  // bytes readable, through w or the spill
	done  bool
	err   error         // why the fill failed; set with done
	wake  chan struct{} // closed and replaced whenever the above change

	// slot says the fill holds one of the maxSpills slots (set by the
	// fill's goroutine only).
	slot bool

	// spill is set once the fill streams without storing: the store had
	// no room, or the disk filled up as it wrote. Bytes before
	// spill.start are in w's file, the rest pass through spill's window.
	spill *spill
	// readers are the followers' positions; the spill's window keeps
	// what the slowest of them has not read yet.
	readers map[*reader]int64
	moved   chan struct{} // closed and replaced when a reader moves or leaves
}

// reader is one follower of a fill.
type reader struct {
	dropped bool // fell behind an unstored fill for too long; guarded by the fill's mu
}

// spill is the window of an unstored fill: the last spillWindow bytes the
// upstream sent, which the fill overwrites only once every follower has
// read them. The fill runs at the pace of its slowest follower.
type spill struct {
	start int64
	buf   []byte
	// head is how far the fill has claimed the window (guarded by the
	// fill's mu): the bytes before head-spillWindow may be overwritten
	// at any moment, so no follower may start before that.
	head int64
}

// spillWindow is the memory an unstored fill holds for its followers;
// maxSpills bounds how many run at once (the rest wait for a slot), so
// that streaming past a full store costs at most 64 MiB.
const (
	spillWindow = 2 << 20
	maxSpills   = 32
)

// spillStall is how long an unstored fill waits for its slowest follower
// before it cuts that one off and goes on with the others.
var spillStall = 30 * time.Second

// errLeftBehind: the bytes a follower wants have already passed through
// an unstored fill's window (nothing was sent to the client yet).
var errLeftBehind = errors.New("blob fill: the bytes wanted have passed through its window (not stored)")

// errCutOff: a follower that fell behind an unstored fill for too long
// was cut off, part way through its response.
var errCutOff = errors.New("blob fill: cut off, having read nothing for too long from a fill that does not store")

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
func (s *Server) joinFill(ctx context.Context, q *request) (f *blobFill, rd *reader, started bool, err error) {
	key := fillKey{upstream: q.up.name, digest: q.dgst}
	s.fills.mu.Lock()
	defer s.fills.mu.Unlock()
	if f := s.fills.m[key]; f != nil {
		if f.readsFrom(q.peer) {
			return nil, nil, false, errPeerCycle
		}
		f.users.Add(1)
		return f, f.addReader(), false, nil
	}
	// A fill may have committed between the caller's miss and this lock.
	if _, err := s.heldBlob(ctx, q); err == nil {
		return nil, nil, false, nil
	} else if !errors.Is(err, cache.ErrNotFound) {
		return nil, nil, false, err
	}
	f, rd = newFill(key, q.repo)
	f.fromPeer = q.fromPeer
	s.fills.m[key] = f
	s.work.Add(1)
	fctx := trace.ContextWithSpanContext(s.ctx, trace.SpanContextFromContext(ctx))
	go s.runFill(fctx, f, q.up)
	return f, rd, true, nil
}

// newFill returns a fill and the reader of its first client.
func newFill(key fillKey, repo string) (*blobFill, *reader) {
	f := &blobFill{key: key, repo: repo, ready: make(chan struct{}), ended: make(chan struct{}), size: -1, wake: make(chan struct{}),
		readers: map[*reader]int64{}, moved: make(chan struct{})}
	f.users.Store(2) // the fill and its first client
	return f, f.addReader()
}

// rejoinFill is for a client that came too late to follow old, a fill
// that does not store: it joins the fill that replaced old in the set, or
// starts that replacement, which later clients join in turn (old goes on
// for its own followers). Its second miss, it gets a fill of its own.
func (s *Server) rejoinFill(ctx context.Context, q *request, old *blobFill) (*blobFill, *reader) {
	key := fillKey{upstream: q.up.name, digest: q.dgst}
	s.fills.mu.Lock()
	defer s.fills.mu.Unlock()
	if f := s.fills.m[key]; f != nil && f != old {
		f.users.Add(1)
		return f, f.addReader()
	}
	f, rd := newFill(key, q.repo)
	f.fromPeer = q.fromPeer
	s.fills.m[key] = f
	s.work.Add(1)
	go s.runFill(trace.ContextWithSpanContext(s.ctx, trace.SpanContextFromContext(ctx)), f, q.up)
	return f, rd
}

// privateFill starts a fill for one client only, outside the set, that
// streams without storing: for a client that came too late to follow an
// unstored fill of the same blob.
func (s *Server) privateFill(ctx context.Context, q *request) (*blobFill, *reader) {
	f, rd := newFill(fillKey{upstream: q.up.name, digest: q.dgst}, q.repo)
	f.private = true
	f.fromPeer = q.fromPeer
	s.work.Add(1)
	go s.runFill(trace.ContextWithSpanContext(s.ctx, trace.SpanContextFromContext(ctx)), f, q.up)
	return f, rd
}

// inFile is where the bytes from off on that the fill's file holds end,
// up to limit: all of them, or those before a spill's start.
func (f *blobFill) inFile(off, limit int64) int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.spill == nil {
		return limit
	}
	return min(limit, f.spill.start)
}

// unstored reports whether the fill streams past the store (it was full).
func (f *blobFill) unstored() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.spill != nil
}

// addReader registers a client joining the fill. Until it says where it
// starts (seek), it holds the window where it stands now.
func (f *blobFill) addReader() *reader {
	f.mu.Lock()
	defer f.mu.Unlock()
	r := &reader{}
	var pos int64
	if sp := f.spill; sp != nil {
		pos = max(sp.start, sp.head-spillWindow)
	}
	f.readers[r] = pos
	return r
}

// release is called once by the fill (rd nil) and by each client that
// joined it, with its reader: the last one closes the writer, whose file
// its followers were reading.
func (f *blobFill) release(rd *reader) {
	if rd != nil {
		f.mu.Lock()
		delete(f.readers, rd)
		close(f.moved)
		f.moved = make(chan struct{})
		f.mu.Unlock()
	}
	if f.users.Add(-1) == 0 && f.w != nil {
		_ = f.w.Close()
	}
}

// endFill removes a fill from the set. It runs before the fill's end is
// published: a client arriving after a failure starts afresh instead of
// joining a fill that is about to fail it.
func (s *Server) endFill(f *blobFill) {
	if f.private {
		return
	}
	s.fills.mu.Lock()
	if s.fills.m[f.key] == f {
		delete(s.fills.m, f.key)
	}
	s.fills.mu.Unlock()
}

// abandonUnfollowed takes an unstored fill out of the set when no client
// follows it any more (nothing would come of its bytes), and reports
// whether it did. No client can join it after.
func (s *Server) abandonUnfollowed(f *blobFill) bool {
	if f.private {
		return f.users.Load() == 1
	}
	s.fills.mu.Lock()
	defer s.fills.mu.Unlock()
	if f.users.Load() != 1 {
		return false
	}
	if s.fills.m[f.key] == f {
		delete(s.fills.m, f.key)
	}
	return true
}

// runFill streams the blob from upstream into a cache writer, hashing as it
// goes, and commits only if size and digest match; then the blob is linked
// to the fill's repository. A broken upstream body is resumed with Range
// up to maxResumes times.
func (s *Server) runFill(ctx context.Context, f *blobFill, up *upstreamState) {
	defer s.work.Done()
	defer close(f.ended)
	s.metrics.fillsRunning.Add(1)
	defer s.metrics.fillsRunning.Add(-1)
	defer f.release(nil)
	defer func() {
		if f.slot {
			s.releaseSpillSlot()
		}
	}()
	d := f.key.digest
	log := s.log.With("upstream", up.name, "repo", f.repo, "digest", d)
	start := time.Now()

	// The sources in order (fillPlan); at most MaxFills fills of an
	// upstream read from it at once, the others wait their turn.
	plan := s.newFillPlan(f, up)
	defer plan.close()
	body, size, err := plan.open(ctx, 0, -1)
	var w cache.BlobWriter
	unreserve := func() {}
	if err == nil && !f.private {
		unreserve, err = s.store.Reserve(ctx, size)
		if errors.Is(err, cache.ErrFull) {
			s.warnFull(log, err)
			unreserve, err = func() {}, nil
		} else if err == nil {
			if w, err = s.store.CreateBlob(ctx); err != nil {
				unreserve()
			}
		}
		if err != nil {
			body.Close()
		}
	}
	if err == nil && w == nil {
		if err = s.takeSpillSlot(ctx); err != nil {
			body.Close()
		}
		f.slot = err == nil
	}
	if err != nil {
		s.endFill(f)
		f.startErr = err
		close(f.ready)
		return
	}
	defer unreserve()
	f.size, f.w = size, w
	if w == nil {
		f.mu.Lock()
		f.spill = &spill{buf: make([]byte, spillWindow)}
		f.mu.Unlock()
	}
	close(f.ready)

	written, err := s.copyBlob(ctx, f, plan, body)
	plan.close() // the upstream is done with; the commit's fsyncs are not its
	if err == nil && f.size >= 0 && written != f.size {
		err = fmt.Errorf("%w: got %d bytes, upstream announced %d", errSizeMismatch, written, f.size)
	}
	f.mu.Lock()
	spilled := f.spill != nil
	f.mu.Unlock()
	if err == nil && !spilled {
		// Every byte is written and checked (size and digest): the
		// followers have their last byte now, not after the commit's
		// fsyncs, which only make the cache's copy durable. They read
		// the file (open until the last of them goes) whatever the
		// commit does.
		f.update(written, true, nil)
		// Large blobs commit one at a time: their fsyncs one after the
		// other write back faster than all at once (a node's cold start,
		// 32 of 16 MiB: 12% less wall time), and no client waits for
		// them. Small ones, whose fsyncs cost little, go as they come.
		if written >= serialCommitBytes {
			s.commits <- struct{}{}
		}
		err = w.Commit(ctx, d, written)
		if written >= serialCommitBytes {
			<-s.commits
		}
		if errors.Is(err, cache.ErrFull) {
			s.warnFull(log, err)
		}
	}
	if err != nil {
		// Out of the set, then the failure published, then the bytes
		// discarded: a follower that sees its read fail must find no
		// failing fill to join when it comes back.
		if errors.Is(err, errUnfollowed) {
			log.Debug("unstored blob fill abandoned: no client follows it", "bytes", written)
		} else {
			log.Warn("blob fill failed; nothing cached", "err", err, "bytes", written)
		}
		s.endFill(f)
		f.update(written, true, err)
		if w != nil {
			if cerr := w.Cancel(context.WithoutCancel(ctx)); cerr != nil {
				log.Error("discarding failed fill", "err", cerr)
			}
		}
		return
	}
	if spilled {
		log.Debug("blob streamed without storing", "bytes", written, "duration", time.Since(start))
		s.endFill(f)
		f.update(written, true, nil)
		return
	}
	if err := s.store.Link(context.WithoutCancel(ctx), cache.RepoKey{Upstream: up.name, Repo: f.repo}, cache.LinkBlob, d, cache.OriginUpstream); err != nil {
		log.Error("linking a filled blob to its repository", "err", err)
	}
	log.Debug("blob fill committed", "bytes", written, "duration", time.Since(start))
	s.endFill(f)
	f.update(written, true, nil)
	if plan.fromUpstream {
		s.shareFilled(context.WithoutCancel(ctx), f)
	}
}

// copyBlob copies the body into f.w and hashes it; a body that breaks is
// taken up by the plan's next source at the offset reached. It returns the
// byte count, or an error when the bytes are not the digest's.
func (s *Server) copyBlob(ctx context.Context, f *blobFill, plan *fillPlan, body io.ReadCloser) (int64, error) {
	d := f.key.digest
	h := d.Algorithm().Hash()
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	var written int64
	defer func() {
		if body != nil {
			body.Close()
		}
	}()
	for {
		n, err := body.Read(buf)
		if n > 0 {
			if f.size >= 0 && written+int64(n) > f.size {
				return written, fmt.Errorf("%w: more than the %d bytes announced", errSizeMismatch, f.size)
			}
			h.Write(buf[:n])
			if err := s.put(ctx, f, buf[:n], written); err != nil {
				return written, err
			}
			written += int64(n)
			f.update(written, false, nil)
		}
		if err == nil {
			continue
		}
		if errors.Is(err, io.EOF) {
			if f.size < 0 || written == f.size {
				break
			}
			err = io.ErrUnexpectedEOF
		}
		if ctx.Err() != nil {
			return written, fmt.Errorf("%w: reading blob: %v", upstream.ErrUnavailable, err)
		}
		body.Close()
		body = nil
		s.log.Debug("blob body broke", "upstream", f.key.upstream, "digest", d, "offset", written, "err", err)
		next, _, rerr := plan.open(ctx, written, f.size)
		if rerr != nil {
			return written, fmt.Errorf("%w (the body broke at %d: %v)", rerr, written, err)
		}
		body = next
	}
	if got := digest.NewDigest(d.Algorithm(), h); got != d {
		return written, fmt.Errorf("%w: blob hashes to %s", errDigestMismatch, got)
	}
	return written, nil
}

// put writes the bytes at off: to the file while the fill stores, else
// (the store had no room, or the disk filled up now) through the window.
func (s *Server) put(ctx context.Context, f *blobFill, p []byte, off int64) error {
	f.mu.Lock()
	sp := f.spill
	f.mu.Unlock()
	if sp == nil {
		_, err := f.w.Write(p)
		if !errors.Is(err, cache.ErrFull) {
			return err
		}
		// The disk is full: the file keeps what it has for the
		// followers, and the rest streams without being stored.
		s.warnFull(s.log.With("upstream", f.key.upstream, "repo", f.repo, "digest", f.key.digest), err)
		if err := s.takeSpillSlot(ctx); err != nil {
			return err
		}
		f.slot = true
		sp = &spill{start: off, head: off, buf: make([]byte, spillWindow)}
		f.mu.Lock()
		f.spill = sp
		f.mu.Unlock()
	}
	if err := s.spillRoom(ctx, f, off+int64(len(p))); err != nil {
		return err
	}
	for i := 0; i < len(p); {
		at := int((off + int64(i)) % spillWindow)
		i += copy(sp.buf[at:], p[i:])
	}
	return nil
}

// errUnfollowed ends an unstored fill that no client follows any more.
var errUnfollowed = errors.New("blob fill: streaming without storing, and no client follows it")

// spillRoom waits until the window can take bytes up to upto: until every
// follower has read what they would overwrite. A follower that holds the
// fill up for spillStall is cut off. With no follower left at all, the
// fill ends.
func (s *Server) spillRoom(ctx context.Context, f *blobFill, upto int64) error {
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		f.mu.Lock()
		low, moved, followed := upto, f.moved, len(f.readers) > 0
		for _, pos := range f.readers {
			low = min(low, max(pos, f.spill.start))
		}
		room := upto-low <= spillWindow
		if room {
			// Claimed under the lock: a follower joining from now on
			// starts at or after upto-spillWindow, past what is
			// overwritten.
			f.spill.head = upto
		}
		f.mu.Unlock()
		if room {
			if !followed && s.abandonUnfollowed(f) {
				return errUnfollowed
			}
			return nil
		}
		if timer == nil {
			timer = time.NewTimer(spillStall)
		} else {
			timer.Reset(spillStall)
		}
		select {
		case <-moved:
		case <-timer.C:
			f.mu.Lock()
			for r, pos := range f.readers {
				if upto-max(pos, f.spill.start) > spillWindow {
					r.dropped = true
					delete(f.readers, r)
				}
			}
			close(f.wake) // dropped followers waiting for bytes notice
			f.wake = make(chan struct{})
			f.mu.Unlock()
			s.log.Warn("unstored blob fill cut off a client that read nothing for a while",
				"upstream", f.key.upstream, "digest", f.key.digest, "stall", spillStall)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// seek sets where a follower starts reading. It fails with errLeftBehind
// when an unstored fill's window has passed that already.
func (f *blobFill) seek(r *reader, off int64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r.dropped {
		return errLeftBehind
	}
	if sp := f.spill; sp != nil && off >= sp.start && off < sp.head-spillWindow {
		return errLeftBehind
	}
	f.readers[r] = off
	close(f.moved)
	f.moved = make(chan struct{})
	return nil
}

// unseek says a follower reads nothing from the fill (it waits for the
// stored blob instead): it no longer holds the window.
func (f *blobFill) unseek(r *reader) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.readers, r)
	close(f.moved)
	f.moved = make(chan struct{})
}

// advance records that a follower has read up to off.
func (f *blobFill) advance(r *reader, off int64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r.dropped {
		return
	}
	f.readers[r] = off
	if f.spill != nil {
		close(f.moved)
		f.moved = make(chan struct{})
	}
}

// readAt reads the fill's bytes at off (fewer than len(p) at the end of
// the file's part): from the file, or from the window.
func (f *blobFill) readAt(r *reader, p []byte, off int64) (int, error) {
	f.mu.Lock()
	sp, dropped := f.spill, r.dropped
	f.mu.Unlock()
	if dropped {
		return 0, errCutOff
	}
	if sp == nil || off < sp.start {
		if sp != nil {
			p = p[:min(int64(len(p)), sp.start-off)]
		}
		return f.w.ReadAt(p, off)
	}
	// The fill overwrites nothing this follower has not read: what lies
	// between its position and avail (read under mu before) stays put.
	for i := 0; i < len(p); {
		at := int((off + int64(i)) % spillWindow)
		i += copy(p[i:], sp.buf[at:])
	}
	// Cut off meanwhile, the follower no longer held these bytes: the
	// fill may have overwritten them as they were copied.
	f.mu.Lock()
	dropped = r.dropped
	f.mu.Unlock()
	if dropped {
		return 0, errCutOff
	}
	return len(p), nil
}

// follow writes bytes [start, end) of the blob to w as the fill delivers
// them; end < 0 means to the end of the blob. The response's last byte is
// held back until the fill is verified and committed, so a client never
// sees a clean end of a body that turns out wrong: it sees a cut connection.
// The follower has seeked to start.
func (s *Server) follow(ctx context.Context, w deadlineWriter, f *blobFill, rd *reader, start, end int64) error {
	// What the fill has written to its file goes out with sendfile, from
	// a file of this follower's own: no copy, no buffer. Bytes past a
	// spill (a full store) go through the buffer.
	var file *os.File
	if fo, ok := f.w.(cache.FileOpener); ok {
		if fl, err := fo.OpenFile(); err == nil {
			file = fl
			defer file.Close()
		}
	}
	var buf []byte
	off := start
	var last []byte // the held-back last byte, once read
	for {
		avail, done, ferr, wake := f.state()
		if ferr != nil {
			return errAbort{ferr}
		}
		total := end
		if total < 0 && done {
			total = avail
		}
		if last == nil && !done && total >= 0 && off == total-1 && avail >= total {
			// All but the last byte sent: it is kept here until the fill is
			// verified, so that this follower no longer holds the window of
			// a fill that does not store (a Range ending early).
			last = make([]byte, 1)
			if _, err := f.readAt(rd, last, off); err != nil {
				return errAbort{err}
			}
			f.unseek(rd)
		}
		if last != nil && done {
			if _, err := w.Write(last); err != nil {
				return err
			}
			return nil
		}
		limit := avail
		if total >= 0 {
			limit = min(limit, total)
			if !done {
				limit = min(limit, total-1)
			}
		}
		if file != nil && off < limit && last == nil {
			if upto := f.inFile(off, limit); upto > off {
				if _, err := file.Seek(off, io.SeekStart); err != nil {
					return errAbort{err}
				}
				n, err := w.copyFrom(file, min(upto-off, sendFileStep))
				off += n
				f.advance(rd, off)
				if err != nil {
					if errors.Is(err, io.EOF) {
						err = errAbort{io.ErrUnexpectedEOF}
					}
					return err
				}
				continue
			}
		}
		if off < limit && last == nil {
			if buf == nil {
				bp := bufPool.Get().(*[]byte)
				defer bufPool.Put(bp)
				buf = *bp
			}
			n := int(min(int64(len(buf)), limit-off))
			n, err := f.readAt(rd, buf[:n], off)
			if err != nil {
				return errAbort{err}
			}
			if _, err := w.Write(buf[:n]); err != nil {
				return err
			}
			off += int64(n)
			f.advance(rd, off)
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

// takeSpillSlot waits for one of the maxSpills slots of unstored fills.
func (s *Server) takeSpillSlot(ctx context.Context) error {
	select {
	case s.spills <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (s *Server) releaseSpillSlot() { <-s.spills }

// fullWarnEvery is how often at most a full store is logged.
const fullWarnEvery = time.Minute

// warnFull logs, at most once a minute, that blobs stream without being
// stored because the store is full.
func (s *Server) warnFull(log *slog.Logger, err error) {
	now := time.Now().UnixNano()
	last := s.fullWarned.Load()
	if now-last < int64(fullWarnEvery) || !s.fullWarned.CompareAndSwap(last, now) {
		return
	}
	log.Warn("store full: blobs are streamed to clients without being stored; raise storage.maxSize, free disk or unpin (logged at most once a minute)", "err", err)
}
