package upstream

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"
)

var (
	// ErrNotFound: the upstream answered 404.
	ErrNotFound = errors.New("upstream: not found")
	// ErrDenied: the upstream answered 401 or 403 after ocimirror's own
	// authentication.
	ErrDenied = errors.New("upstream: access denied")
	// ErrTooManyRequests: the upstream answered 429, or did recently and its
	// Retry-After has not passed.
	ErrTooManyRequests = errors.New("upstream: too many requests")
	// ErrUnavailable: the upstream could not be reached, timed out, or
	// answered 5xx.
	ErrUnavailable = errors.New("upstream: unavailable")
	// ErrInvalidResponse: the upstream answered something a registry must
	// not (wrong digest, oversized manifest, unparseable token).
	ErrInvalidResponse = errors.New("upstream: invalid response")
)

// StatusError is a non-2xx answer from the upstream.
type StatusError struct {
	Method string
	URL    string
	Status int
	// Header is the upstream's response header.
	Header http.Header
	// Body is the start of the upstream's response body (at most 4 KiB).
	Body []byte
	// RetryAfter is how long a 429 asked the client to wait.
	RetryAfter time.Duration
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("upstream %s %s: %d %s", e.Method, e.URL, e.Status, http.StatusText(e.Status))
}

// Is maps a status onto the package's sentinel errors.
func (e *StatusError) Is(target error) bool {
	switch target {
	case ErrNotFound:
		return e.Status == http.StatusNotFound
	case ErrDenied:
		return e.Status == http.StatusUnauthorized || e.Status == http.StatusForbidden
	case ErrTooManyRequests:
		return e.Status == http.StatusTooManyRequests
	case ErrUnavailable:
		return e.Status >= 500
	}
	return false
}

// Transient reports whether err is a failure that may pass: the upstream is
// down, slow, overloaded or rate limiting. A cache serves stale content for
// these, and only these.
func Transient(err error) bool {
	return errors.Is(err, ErrUnavailable) || errors.Is(err, ErrTooManyRequests) ||
		errors.Is(err, context.DeadlineExceeded) || errors.Is(err, ErrInvalidResponse)
}
