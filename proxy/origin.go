package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/cluster"
	"github.com/ocimirror/ocimirror/internal/idle"
	"github.com/ocimirror/ocimirror/upstream"
)

// peerIdle cuts a peer's body that sends nothing for this long: the fill
// goes on from the next source.
const peerIdle = 30 * time.Second

// errPeerCycle answers a replica asking for a blob whose fill here reads
// from that very replica (their member lists disagree for a moment): it
// goes on to its next source instead of waiting on itself.
var errPeerCycle = &Error{Code: CodeUnavailable, Status: http.StatusServiceUnavailable,
	Message: "this replica's fill of the blob reads from the asking replica"}

// fillPlan is where one fill reads its blob from, in order: the shared
// tier, the replicas that rank before this one for the digest (the owner
// first), then the upstream. A source that fails or breaks mid-body hands
// over to the next at the offset reached; the upstream resumes itself with
// Range up to maxResumes times. Whatever the sources, the bytes are
// verified as a whole against the digest before anything commits.
type fillPlan struct {
	s  *Server
	f  *blobFill
	up *upstreamState
	// stage is the next source to try: 0 the shared tier, 1..len(peers)
	// the peers, then the upstream.
	stage   int
	peers   []string
	resumes int
	// fromUpstream: some of the bytes came from the upstream, so this
	// replica puts the blob in the shared tier once committed.
	fromUpstream bool
	freeSlot     func()
	// cancel ends the current peer request.
	cancel context.CancelFunc
}

func (s *Server) newFillPlan(f *blobFill, up *upstreamState) *fillPlan {
	p := &fillPlan{s: s, f: f, up: up, freeSlot: func() {}, cancel: func() {}}
	if s.shared == nil {
		p.stage = 1
	}
	if s.cluster != nil && !f.fromPeer {
		p.peers = s.cluster.Before(f.key.digest)
	}
	return p
}

func (p *fillPlan) close() {
	p.cancel()
	p.freeSlot()
}

// open returns the blob's body from offset on, and its whole size (-1 if
// unknown), from the next source that has it. size is what the first
// source said (-1 at first): a later one must agree.
func (p *fillPlan) open(ctx context.Context, offset, size int64) (io.ReadCloser, int64, error) {
	s, d := p.s, p.f.key.digest
	log := s.log.With("upstream", p.up.name, "repo", p.f.repo, "digest", d)
	p.cancel()
	for ; p.stage <= len(p.peers); p.stage++ {
		if p.stage == 0 {
			n, err := s.shared.StatShared(ctx, d)
			if err != nil || (size >= 0 && n != size) {
				continue
			}
			body, err := s.shared.OpenShared(ctx, d, offset)
			if err != nil {
				log.Debug("shared tier: blob not read", "err", err)
				continue
			}
			p.stage++
			p.f.setFrom("")
			s.metrics.fillSources.shared.Add(1)
			return body, n, nil
		}
		peer := p.peers[p.stage-1]
		body, n, err := p.openPeer(ctx, peer, offset, size)
		if err != nil {
			log.Info("cluster: peer did not give the blob; next source", "peer", peer, "offset", offset, "err", err)
			continue
		}
		p.stage++
		p.f.setFrom(peer)
		s.metrics.fillSources.peer.Add(1)
		return body, n, nil
	}
	p.f.setFrom("")
	if offset > 0 {
		if p.fromUpstream {
			if p.resumes >= maxResumes {
				return nil, 0, fmt.Errorf("%w: blob body broke %d times", upstream.ErrUnavailable, p.resumes)
			}
			p.resumes++
		}
		log.Debug("blob body broke; resuming from the upstream", "offset", offset)
	}
	if err := p.takeSlot(ctx); err != nil {
		return nil, 0, err
	}
	p.fromUpstream = true
	s.metrics.fillSources.upstream.Add(1)
	resp, err := p.up.client.Blob(ctx, http.MethodGet, p.f.repo, d, offset, size)
	if err != nil {
		return nil, 0, err
	}
	if offset == 0 {
		if resp.StatusCode != http.StatusOK {
			resp.Body.Close()
			return nil, 0, fmt.Errorf("%w: blob GET answered %d", upstream.ErrInvalidResponse, resp.StatusCode)
		}
		if size >= 0 && resp.ContentLength >= 0 && resp.ContentLength != size {
			resp.Body.Close()
			return nil, 0, fmt.Errorf("%w: upstream has %d bytes, a replica had %d", errSizeMismatch, resp.ContentLength, size)
		}
		return resp.Body, resp.ContentLength, nil
	}
	if resp.StatusCode != http.StatusPartialContent || !strings.HasPrefix(resp.Header.Get("Content-Range"), "bytes "+strconv.FormatInt(offset, 10)+"-") {
		resp.Body.Close()
		return nil, 0, fmt.Errorf("%w: resume at %d answered %d %q", upstream.ErrUnavailable, offset, resp.StatusCode, resp.Header.Get("Content-Range"))
	}
	return resp.Body, size, nil
}

// takeSlot waits for one of the upstream's MaxFills slots, first come
// first served (a channel's waiting senders are woken in order).
func (p *fillPlan) takeSlot(ctx context.Context) error {
	s, up := p.s, p.up
	s.metrics.fillsQueued.Add(1)
	defer s.metrics.fillsQueued.Add(-1)
	select {
	case up.fillSlots <- struct{}{}:
		var once sync.Once
		p.freeSlot = func() { once.Do(func() { <-up.fillSlots }) }
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// openPeer asks peer for the blob from offset on, through its registry
// API as the owner it is: it fills from its upstream if it must (never
// from another peer), and every replica asking follows that one fill.
func (p *fillPlan) openPeer(ctx context.Context, peer string, offset, size int64) (io.ReadCloser, int64, error) {
	path := "/v2/" + p.f.repo + "/blobs/" + p.f.key.digest.String() + "?ns=" + url.QueryEscape(p.up.name)
	pctx, cancel := context.WithCancel(ctx)
	resp, err := p.s.cluster.Get(pctx, peer, path, offset)
	if err != nil {
		cancel()
		return nil, 0, err
	}
	fail := func(format string, a ...any) (io.ReadCloser, int64, error) {
		cluster.Drain(resp.Body)
		cancel()
		return nil, 0, fmt.Errorf(format, a...)
	}
	n := resp.ContentLength
	switch {
	case offset == 0 && resp.StatusCode == http.StatusOK:
	case offset > 0 && resp.StatusCode == http.StatusPartialContent:
		cr := resp.Header.Get("Content-Range")
		total, ok := strings.CutPrefix(cr, "bytes "+strconv.FormatInt(offset, 10)+"-")
		if !ok {
			return fail("ranged GET answered Content-Range %q", cr)
		}
		_, total, _ = strings.Cut(total, "/")
		if n, err = strconv.ParseInt(total, 10, 64); err != nil {
			return fail("ranged GET answered Content-Range %q", cr)
		}
	default:
		return fail("answered %d", resp.StatusCode)
	}
	if size >= 0 && n >= 0 && n != size {
		return fail("has %d bytes, the fill expects %d", n, size)
	}
	p.cancel = cancel
	return idle.Body(resp.Body, peerIdle, cancel), n, nil
}

// setFrom records the peer a fill reads from now ("" for none).
func (f *blobFill) setFrom(peer string) {
	f.mu.Lock()
	f.from = peer
	f.mu.Unlock()
}

// readsFrom reports whether the fill reads from peer now.
func (f *blobFill) readsFrom(peer string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return peer != "" && f.from == peer
}

// shareFilled puts a blob this replica fetched from its upstream in the
// shared tier, for the other replicas and for this one's next start.
func (s *Server) shareFilled(ctx context.Context, f *blobFill) {
	if s.shared == nil {
		return
	}
	s.work.Add(1)
	go func() {
		defer s.work.Done()
		start := time.Now()
		err := s.shared.ShareBlob(ctx, f.key.digest)
		log := s.log.With("upstream", f.key.upstream, "digest", f.key.digest)
		switch {
		case err == nil:
			log.Debug("shared tier: blob uploaded", "duration", time.Since(start))
		case errors.Is(err, cache.ErrNotFound):
			// evicted before it went up: the next fill shares it
		default:
			log.Warn("shared tier: blob not uploaded", "err", err)
		}
	}()
}

// hydrateTimeout bounds the copy of one hosted blob from the shared tier.
const hydrateTimeout = 30 * time.Minute

// hydrate copies a blob the request's hosted repository links from the
// shared tier into the local one (pushed through another replica, or
// evicted here), verified like any fill, once for all the clients that
// want it; the caller serves it from the local tier after.
func (s *Server) hydrate(ctx context.Context, q *request) (cache.BlobInfo, error) {
	if _, ok, err := s.store.Linked(ctx, q.key(), cache.LinkBlob, q.dgst); err != nil {
		return cache.BlobInfo{}, err
	} else if !ok {
		return cache.BlobInfo{}, cache.ErrNotFound
	}
	d := q.dgst
	work := func() (context.Context, context.CancelFunc) { return s.detached(ctx, hydrateTimeout) }
	v, err, _ := s.flight.Do(ctx, "shared\x00"+d.String(), work, s.tracked(func(ctx context.Context) (any, error) {
		if info, err := s.store.StatBlob(ctx, d); err == nil {
			return info, nil
		}
		size, err := s.shared.StatShared(ctx, d)
		if err != nil {
			return nil, err
		}
		body, err := s.shared.OpenShared(ctx, d, 0)
		if err != nil {
			return nil, err
		}
		defer body.Close()
		release, err := s.store.Reserve(ctx, size)
		if err != nil {
			return nil, err
		}
		defer release()
		w, err := s.store.CreateBlob(ctx)
		if err != nil {
			return nil, err
		}
		committed := false
		defer func() {
			if !committed {
				_ = w.Cancel(context.WithoutCancel(ctx))
			}
			_ = w.Close()
		}()
		h := d.Algorithm().Hash()
		n, err := io.Copy(io.MultiWriter(w, h), io.LimitReader(body, size+1))
		if err != nil {
			return nil, fmt.Errorf("shared tier: reading blob %s: %w", d, err)
		}
		if n != size {
			return nil, fmt.Errorf("%w: shared tier gave %d bytes of %d", errSizeMismatch, n, size)
		}
		if got := digest.NewDigest(d.Algorithm(), h); got != d {
			return nil, fmt.Errorf("%w: shared tier's blob hashes to %s", errDigestMismatch, got)
		}
		if err := w.Commit(ctx, d, n); err != nil {
			return nil, err
		}
		committed = true
		s.metrics.fillSources.shared.Add(1)
		return cache.BlobInfo{Digest: d, Size: n}, nil
	}))
	if err != nil {
		return cache.BlobInfo{}, err
	}
	return v.(cache.BlobInfo), nil
}
