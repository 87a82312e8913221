package tiered

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/cache/s3"
	"github.com/ocimirror/ocimirror/internal/lru"
)

// The shared tier's cached content (cache/: what upstreams delivered) is
// bounded by Options.MaxSize, least recently accessed first. Hosted
// content is never evicted: it is what clients pushed.
//
// Access: every replica records the blobs and manifests it serves (from
// its local tier or not) and, every accessFlush, writes for each one it
// has not marked within markEvery an empty object access/<digest>, whose
// time is the access. A digest hot on every replica costs each about one
// PUT an hour.
//
// Eviction: one replica at a time, the holder of a lease kept in the
// bucket (gc/lease, taken and renewed with conditional writes), lists
// blobs, manifests and access marks every GCInterval, and when the
// content is over MaxSize deletes the least recently accessed (the later
// of its own time and its mark's) down to gcLow of it. Content younger
// than minAge is kept: a replica may be reading what it just put.
//
// Deleting content another replica reads, or a replica's local tier still
// holds, is safe: a shared tier miss is a refetch, never a wrong byte.
const (
	accessFlush = time.Minute
	markEvery   = time.Hour
	// maxTouched bounds the digests recorded between flushes; markedBytes,
	// the memory of when each was last marked.
	maxTouched  = 100_000
	markedBytes = 8 << 20
	// gcLow is the share of MaxSize an eviction frees down to.
	gcLow = 0.9
	// maxListed bounds the objects of each kind one GC run lists.
	maxListed = 1_000_000
	// leaseFor is how long a lease holds without renewal, in GC intervals.
	leaseFor = 3
	// maxForgotten bounds the marks of gone content one run deletes.
	maxForgotten = 10_000
	// markWrites bounds the access marks written at once.
	markWrites = 8
)

// minAge: content written this recently is never evicted (a variable
// for tests).
var minAge = 10 * time.Minute

// gcState is the access recording and the eviction loop.
type gcState struct {
	mu      sync.Mutex
	touched map[digest.Digest]struct{}
	marked  *lru.Sized[digest.Digest, time.Time]

	stop context.CancelFunc
	done sync.WaitGroup

	// figures of the last run, for metrics
	bytes, evicted, evictedBytes, runs int64
}

// Touch records that d was served: for the local tier's eviction, and as
// an access of the shared tier's copy.
func (s *Store) Touch(d digest.Digest) {
	s.LRU.Touch(d)
	s.gc.mu.Lock()
	if len(s.gc.touched) < maxTouched {
		s.gc.touched[d] = struct{}{}
	}
	s.gc.mu.Unlock()
}

func (s *Store) startGC() {
	s.gc.touched = map[digest.Digest]struct{}{}
	s.gc.marked = lru.New(markedBytes, 0, func(d digest.Digest, _ time.Time) int64 { return int64(len(d)) + 64 })
	ctx, cancel := context.WithCancel(context.Background())
	s.gc.stop = cancel
	s.gc.done.Add(1)
	go func() {
		defer s.gc.done.Done()
		flush := time.NewTicker(accessFlush)
		defer flush.Stop()
		var gcTick <-chan time.Time
		if s.opts.MaxSize > 0 {
			t := time.NewTicker(s.opts.GCInterval)
			defer t.Stop()
			gcTick = t.C
		}
		for {
			select {
			case <-ctx.Done():
				// The last marks, within a bound: shutdown does not
				// wait on a slow bucket.
				fctx, cancel := context.WithTimeout(context.Background(), opTimeout)
				s.flushAccess(fctx)
				cancel()
				return
			case <-flush.C:
				s.flushAccess(ctx)
			case <-gcTick:
				if _, err := s.Collect(ctx); err != nil {
					s.log.Warn("shared tier: eviction", "err", err)
				}
			}
		}
	}()
}

// Stop ends the shared tier's background work, writing its last access
// marks; the local store stays open.
func (s *Store) Stop() {
	if s.gc.stop != nil {
		s.gc.stop()
		s.gc.done.Wait()
		s.gc.stop = nil
	}
}

// Close stops the background work, then closes the local store.
func (s *Store) Close() error {
	s.Stop()
	return s.LRU.Close()
}

// flushAccess writes the access marks of what was served since the last
// flush and not marked within markEvery.
func (s *Store) flushAccess(ctx context.Context) {
	s.gc.mu.Lock()
	touched := s.gc.touched
	s.gc.touched = make(map[digest.Digest]struct{}, len(touched))
	s.gc.mu.Unlock()
	if len(touched) == 0 || !s.up() {
		return
	}
	now := time.Now()
	sem := make(chan struct{}, markWrites)
	var wg sync.WaitGroup
	for d := range touched {
		if at, ok := s.gc.marked.Get(d); ok && now.Sub(at) < markEvery {
			continue
		}
		if !s.up() || ctx.Err() != nil {
			break
		}
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			octx, cancel := opCtx(ctx)
			defer cancel()
			if _, err := s.cached.PutKey(octx, "access/"+d.String(), nil); err != nil {
				s.failed(err)
				return
			}
			s.gc.marked.Add(d, now)
		})
	}
	wg.Wait()
}

// lease is the GC lease's object.
type lease struct {
	Holder string    `json:"holder"`
	Until  time.Time `json:"until"`
}

// takeLease takes or renews the GC lease; false when another replica
// holds it.
func (s *Store) takeLease(ctx context.Context) (bool, error) {
	const key = "gc/lease"
	now := time.Now()
	mine, err := json.Marshal(lease{Holder: s.opts.Self, Until: now.Add(leaseFor * s.opts.GCInterval)})
	if err != nil {
		return false, err
	}
	data, etag, err := s.cached.Get(ctx, key)
	if errors.Is(err, cache.ErrNotFound) {
		_, err = s.cached.PutIfAbsent(ctx, key, mine)
	} else if err == nil {
		var l lease
		if json.Unmarshal(data, &l) == nil && l.Holder != s.opts.Self && now.Before(l.Until) {
			return false, nil
		}
		_, err = s.cached.CompareAndSwap(ctx, key, etag, mine)
	}
	if errors.Is(err, s3.ErrPrecondition) {
		return false, nil // another replica took it first
	}
	return err == nil, err
}

// Collected is what one eviction run did.
type Collected struct {
	// Ran is false when another replica holds the lease.
	Ran bool
	// Bytes is the cached content's size before eviction.
	Bytes          int64
	Evicted        int
	EvictedBytes   int64
	MarksForgotten int
}

// Collect runs one eviction of the shared tier's cached content, if this
// replica holds (or takes) the lease and MaxSize is set.
func (s *Store) Collect(ctx context.Context) (Collected, error) {
	var c Collected
	if s.opts.MaxSize <= 0 {
		return c, nil
	}
	if !s.up() {
		return c, s.down(nil)
	}
	ok, err := s.takeLease(ctx)
	if err != nil || !ok {
		s.failed(err)
		return c, err
	}
	c.Ran = true
	// Past maxListed of a kind, a run evicts among the first listed.
	blobs, more, err := s.cached.ListContent(ctx, "blobs", maxListed)
	if err != nil {
		return c, err
	}
	manifests, moreManifests, err := s.cached.ListContent(ctx, "manifests", maxListed)
	if err != nil {
		return c, err
	}
	if more || moreManifests {
		s.log.Warn("shared tier: more objects than one eviction run lists; it evicts among the first", "max", maxListed)
	}
	marks, err := s.cached.List(ctx, "access/", maxListed)
	if err != nil && !errors.Is(err, s3.ErrTooMany) {
		return c, err
	}
	access := make(map[digest.Digest]time.Time, len(marks))
	for _, m := range marks {
		access[digest.Digest(m.Key)] = m.Modified
	}
	type item struct {
		s3.Content
		manifest bool
		at       time.Time
	}
	items := make([]item, 0, len(blobs)+len(manifests))
	for i, list := range [][]s3.Content{blobs, manifests} {
		for _, o := range list {
			at := o.Modified
			if m, ok := access[o.Digest]; ok && m.After(at) {
				at = m
			}
			delete(access, o.Digest)
			items = append(items, item{Content: o, manifest: i == 1, at: at})
			c.Bytes += o.Size
		}
	}
	defer func() {
		s.gc.mu.Lock()
		s.gc.bytes = c.Bytes - c.EvictedBytes
		s.gc.evicted += int64(c.Evicted)
		s.gc.evictedBytes += c.EvictedBytes
		s.gc.runs++
		s.gc.mu.Unlock()
	}()
	// Marks of content that is gone (hosted content is marked too, and
	// never listed here: its marks go once its clients have stopped).
	stale := time.Now().Add(-2 * markEvery)
	for d, at := range access {
		if at.After(stale) {
			continue
		}
		if c.MarksForgotten == maxForgotten {
			break // the next run goes on
		}
		if err := s.cached.DeleteKey(ctx, "access/"+d.String()); err != nil {
			return c, err
		}
		c.MarksForgotten++
	}
	if c.Bytes <= s.opts.MaxSize {
		return c, nil
	}
	slices.SortFunc(items, func(a, b item) int { return a.at.Compare(b.at) })
	low := int64(float64(s.opts.MaxSize) * gcLow)
	left := c.Bytes
	young := time.Now().Add(-minAge)
	for _, it := range items {
		if left <= low {
			break
		}
		if it.Modified.After(young) {
			continue
		}
		var err error
		if it.manifest {
			err = s.cached.DeleteManifest(ctx, it.Digest)
		} else {
			err = s.cached.Delete(ctx, it.Digest)
		}
		if err == nil {
			err = s.cached.DeleteKey(ctx, "access/"+it.Digest.String())
		}
		if err != nil {
			return c, fmt.Errorf("evicting %s: %w", it.Digest, err)
		}
		left -= it.Size
		c.Evicted++
		c.EvictedBytes += it.Size
	}
	s.log.Info("shared tier: evicted the least recently accessed", "bytes", c.Bytes, "max_size", s.opts.MaxSize,
		"evicted", c.Evicted, "evicted_bytes", c.EvictedBytes)
	return c, nil
}

// GCStats are the shared tier's eviction figures: the cached content's
// size at the last run, and what all runs evicted.
type GCStats struct {
	Bytes, Evicted, EvictedBytes, Runs int64
}

// GCStats returns the eviction figures so far.
func (s *Store) GCStats() GCStats {
	s.gc.mu.Lock()
	defer s.gc.mu.Unlock()
	return GCStats{Bytes: s.gc.bytes, Evicted: s.gc.evicted, EvictedBytes: s.gc.evictedBytes, Runs: s.gc.runs}
}
