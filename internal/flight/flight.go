// Package flight coalesces concurrent calls for one key into one run of
// the work, under a context of its own: the first caller's context never
// becomes the work's, so one client hanging up cannot fail the others.
//
// It is golang.org/x/sync/singleflight with two differences that a proxy
// needs: the work's context is built by the caller from something other
// than any one request (the server's lifetime, with a deadline), and work
// that is only worth doing while somebody waits for it (Abandonable) is
// cancelled when the last waiter leaves.
package flight

import (
	"context"
	"fmt"
	"runtime/debug"
	"sync"
)

// Group is a set of calls in flight, keyed by K. The zero value is ready.
type Group[K comparable, V any] struct {
	mu sync.Mutex
	m  map[K]*call[V]
}

type call[V any] struct {
	done chan struct{}
	val  V
	err  error

	// waiters and abandonable are guarded by the group's mutex.
	waiters     int
	abandonable bool
	cancel      context.CancelFunc
}

// Work makes the context a call runs under, and its cancel function.
type Work func() (context.Context, context.CancelFunc)

// Do calls fn once for all concurrent callers of key, under the context
// that work returns; the work runs to its end even when every caller has
// gone (a cache fill that a later request will want). Each caller waits
// until fn returns or its own ctx ends. shared is true for the callers
// that joined a call another caller started.
func (g *Group[K, V]) Do(ctx context.Context, key K, work Work, fn func(context.Context) (V, error)) (v V, err error, shared bool) {
	return g.do(ctx, key, work, fn, false)
}

// Abandonable is Do for work that is worth doing only while somebody waits
// for its answer: when the last caller's ctx ends, the work's context is
// cancelled, and a later caller starts afresh.
func (g *Group[K, V]) Abandonable(ctx context.Context, key K, work Work, fn func(context.Context) (V, error)) (v V, err error, shared bool) {
	return g.do(ctx, key, work, fn, true)
}

func (g *Group[K, V]) do(ctx context.Context, key K, work Work, fn func(context.Context) (V, error), abandonable bool) (V, error, bool) {
	g.mu.Lock()
	if g.m == nil {
		g.m = map[K]*call[V]{}
	}
	c, shared := g.m[key]
	if shared {
		c.waiters++
		// Somebody who will not abandon it keeps it alive.
		c.abandonable = c.abandonable && abandonable
	} else {
		c = &call[V]{done: make(chan struct{}), waiters: 1, abandonable: abandonable}
		g.m[key] = c
		wctx, cancel := work()
		c.cancel = cancel
		go g.run(wctx, key, c, fn)
	}
	g.mu.Unlock()

	select {
	case <-c.done:
		return c.val, c.err, shared
	case <-ctx.Done():
	}
	g.mu.Lock()
	c.waiters--
	if c.waiters == 0 && c.abandonable {
		if g.m[key] == c {
			delete(g.m, key)
		}
		c.cancel()
	}
	g.mu.Unlock()
	var zero V
	return zero, ctx.Err(), shared
}

func (g *Group[K, V]) run(ctx context.Context, key K, c *call[V], fn func(context.Context) (V, error)) {
	defer func() {
		if p := recover(); p != nil {
			c.err = fmt.Errorf("flight: panic: %v\n%s", p, debug.Stack())
		}
		c.cancel()
		g.mu.Lock()
		if g.m[key] == c {
			delete(g.m, key)
		}
		g.mu.Unlock()
		close(c.done)
	}()
	c.val, c.err = fn(ctx)
}

// Len is how many calls are in flight (tests).
func (g *Group[K, V]) Len() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.m)
}
