// Package lru is a least-recently-used cache bounded in bytes: entries vary
// in size (a manifest, a tag list), so a count alone bounds nothing.
package lru

import (
	"sync"

	"github.com/hashicorp/golang-lru/v2/simplelru"
)

// Sized is an LRU whose entries' costs add up to at most a budget. It is
// safe for concurrent use.
type Sized[K comparable, V any] struct {
	mu    sync.Mutex
	l     *simplelru.LRU[K, V]
	cost  func(K, V) int64
	max   int64
	total int64
}

// New returns an LRU of at most maxBytes, by cost; maxEntries also bounds
// the count when above zero.
func New[K comparable, V any](maxBytes int64, maxEntries int, cost func(K, V) int64) *Sized[K, V] {
	c := &Sized[K, V]{cost: cost, max: maxBytes}
	if maxEntries <= 0 {
		maxEntries = int(^uint(0) >> 1)
	}
	// The callback runs under c.mu: every call into l is made holding it.
	c.l, _ = simplelru.NewLRU(maxEntries, func(k K, v V) { c.total -= c.cost(k, v) })
	return c
}

// Get returns the value of k and marks it used.
func (c *Sized[K, V]) Get(k K) (V, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.l.Get(k)
}

// Add stores v under k, evicting the least recently used entries until the
// budget holds. A value costing more than the whole budget is not kept
// (and an older value of k is dropped).
func (c *Sized[K, V]) Add(k K, v V) {
	cost := c.cost(k, v)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.l.Remove(k)
	if cost > c.max {
		return
	}
	c.l.Add(k, v)
	c.total += cost
	for c.total > c.max {
		if _, _, ok := c.l.RemoveOldest(); !ok {
			break
		}
	}
}

// Remove drops k.
func (c *Sized[K, V]) Remove(k K) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.l.Remove(k)
}

// Bytes is the cost of what is held.
func (c *Sized[K, V]) Bytes() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.total
}

// Len is how many entries are held.
func (c *Sized[K, V]) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.l.Len()
}

// RemoveFunc drops every entry whose key f picks, and returns how many
// went. It walks what is held (bounded by the budget), under the lock.
func (c *Sized[K, V]) RemoveFunc(f func(K) bool) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, k := range c.l.Keys() {
		if f(k) {
			c.l.Remove(k)
			n++
		}
	}
	return n
}
