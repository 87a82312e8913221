package referrers

import (
	"sync"
	"time"
)

// Support is what ocimirror knows of an upstream repository's referrers API.
type Support int

// The three states, as oras and regclient keep them.
const (
	Unknown Support = iota
	Supported
	Unsupported
)

func (s Support) String() string {
	switch s {
	case Supported:
		return "supported"
	case Unsupported:
		return "unsupported"
	}
	return "unknown"
}

// maxCapabilities bounds the remembered states; beyond it, expired ones
// are dropped, then arbitrary ones (they are only a cache of what the
// upstream answers).
const maxCapabilities = 10000

// Capabilities remembers, per key (upstream and repository), whether the
// referrers API exists. A state expires back to Unknown after its TTL, so a
// registry that gains (or loses) the API is noticed.
type Capabilities struct {
	ttl time.Duration
	mu  sync.Mutex
	m   map[string]capability
}

type capability struct {
	state Support
	until time.Time
}

// NewCapabilities returns an empty set whose states last ttl.
func NewCapabilities(ttl time.Duration) *Capabilities {
	return &Capabilities{ttl: ttl, m: map[string]capability{}}
}

// Get returns the state for key at time now.
func (c *Capabilities) Get(key string, now time.Time) Support {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[key]
	if !ok || !now.Before(e.until) {
		delete(c.m, key)
		return Unknown
	}
	return e.state
}

// Set records the state for key, valid for the TTL from now.
func (c *Capabilities) Set(key string, s Support, now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if s == Unknown {
		delete(c.m, key)
		return
	}
	if len(c.m) >= maxCapabilities {
		for k, e := range c.m {
			if !now.Before(e.until) || len(c.m) >= maxCapabilities {
				delete(c.m, k)
			}
		}
	}
	c.m[key] = capability{state: s, until: now.Add(c.ttl)}
}
