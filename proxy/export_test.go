package proxy

import (
	"time"

	"github.com/opencontainers/go-digest"
)

// SetSpillStall sets how long an unstored fill waits for its slowest
// follower; it returns the restore.
func SetSpillStall(d time.Duration) (restore func()) {
	old := spillStall
	spillStall = d
	return func() { spillStall = old }
}

// Followers is how many clients follow the fill of a blob from an
// upstream (0 when none runs).
func (s *Server) Followers(upstream string, d digest.Digest) int {
	s.fills.mu.Lock()
	defer s.fills.mu.Unlock()
	f := s.fills.m[fillKey{upstream: upstream, digest: d}]
	if f == nil {
		return 0
	}
	return int(f.users.Load()) - 1
}

// SetRevalidateWait sets how long a client waits for a tag's
// revalidation when a last good answer exists; it returns the restore.
func SetRevalidateWait(d time.Duration) (restore func()) {
	old := revalidateWait
	revalidateWait = d
	return func() { revalidateWait = old }
}

// FillsRunning is how many blob fills are running (committing included).
func (s *Server) FillsRunning() int64 { return s.metrics.fillsRunning.Load() }
