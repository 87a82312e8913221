package upstream

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"
)

var (
	// ErrOffline: the upstream is configured offline, and no request is
	// sent to it. It is an ErrUnavailable: what serves stale content for
	// a down upstream serves it for an offline one.
	ErrOffline = fmt.Errorf("%w: offline", ErrUnavailable)
	// ErrDown: the upstream failed to connect or answer repeatedly, and
	// is not asked again until its next probe.
	ErrDown = fmt.Errorf("%w: marked down after repeated connection failures or timeouts", ErrUnavailable)
)

// Breaker defaults: three failures in a row open the circuit; probes
// follow after 30 s, doubling up to 5 minutes.
const (
	DefaultBreakerFailures   = 3
	DefaultBreakerMinBackoff = 30 * time.Second
	DefaultBreakerMaxBackoff = 5 * time.Minute
)

// State is what a Client knows of its upstream's reachability.
type State struct {
	// Offline: configured so; nothing is ever sent.
	Offline bool `json:"offline,omitempty"`
	// Down: the circuit is open. Requests fail at once until a probe
	// (one at a time, at NextProbe) gets an answer.
	Down bool `json:"down"`
	// Since is when the state last changed (zero: never).
	Since time.Time `json:"since,omitzero"`
	// Failures are the connection failures or timeouts in a row.
	Failures  int       `json:"failures"`
	NextProbe time.Time `json:"nextProbe,omitzero"`
}

// breaker is a circuit breaker over connection failures and timeouts: any
// answer from the upstream, whatever its status, shows it is reachable.
type breaker struct {
	name      string
	log       *slog.Logger
	threshold int // 0: never opens
	min, max  time.Duration

	mu       sync.Mutex
	failures int
	open     bool
	probing  bool
	since    time.Time
	backoff  time.Duration
	retryAt  time.Time
}

// allow says whether a request may go: always with the circuit closed;
// with it open, only one probe at a time once its back-off has passed.
func (b *breaker) allow() (probe bool, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.open {
		return false, nil
	}
	if b.probing || time.Now().Before(b.retryAt) {
		return false, ErrDown
	}
	b.probing = true
	return true, nil
}

// failed reports whether err shows the upstream unreachable: a transport
// failure (no answer at all) or a timeout. Answers (StatusError), the
// caller's own cancellation and local errors do not count.
func failed(err error) bool {
	if err == nil || errors.Is(err, context.Canceled) {
		return false
	}
	if _, ok := errors.AsType[*StatusError](err); ok {
		return false
	}
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, ErrUnavailable)
}

// done records the outcome of a request that allow let through.
func (b *breaker) done(probe bool, err error) {
	if b.threshold <= 0 {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if probe {
		b.probing = false
	}
	now := time.Now()
	switch {
	case failed(err):
		if b.open {
			if probe {
				b.backoff = min(2*b.backoff, b.max)
				b.retryAt = now.Add(b.backoff)
				b.log.Info("upstream still down", "upstream", b.name, "next_probe_in", b.backoff, "err", err)
			}
			return
		}
		if b.failures++; b.failures >= b.threshold {
			b.open, b.since, b.backoff = true, now, b.min
			b.retryAt = now.Add(b.backoff)
			b.log.Warn("upstream marked down: answering from cache at once", "upstream", b.name,
				"failures", b.failures, "next_probe_in", b.backoff, "err", err)
		}
	case err != nil && errors.Is(err, context.Canceled):
		// The caller left: nothing learnt. A probe cut short lets the
		// next request probe at once.
	default:
		if b.open {
			b.log.Info("upstream back up", "upstream", b.name, "down_for", now.Sub(b.since).Round(time.Second))
			b.open, b.since = false, now
		}
		b.failures = 0
	}
}

func (b *breaker) state() State {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := State{Down: b.open, Since: b.since, Failures: b.failures}
	if b.open {
		s.NextProbe = b.retryAt
	}
	return s
}
