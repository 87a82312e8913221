// Package admin is the admin listener: health, readiness, bundle imports,
// store statistics, purges, pins and the Prometheus metrics. It is served on
// its own address, never with the registry API: whoever reaches it can
// change what the mirror holds.
package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/ocimirror/ocimirror/bundle"
	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/upstream"
)

// Options are what the admin handler reports on.
type Options struct {
	// Ping checks that the store is open and writable.
	Ping func(ctx context.Context) error
	// Shared, when set, asks the shared tier (storage.s3) whether it
	// answers.
	Shared func(ctx context.Context) error
	// Members, when set, lists the cluster's replicas as this one sees them.
	Members func() []string
	// Upstreams are the mirrored registries, by name.
	Upstreams map[string]*upstream.Client
	// Offline says the whole mirror is offline.
	Offline bool
	// Import loads a bundle read from r into the mirror (bundle.Import
	// with its store and upstreams); repository is ImportOptions'. Nil:
	// no import endpoint.
	Import func(ctx context.Context, r io.Reader, repository string) (*bundle.ImportResult, error)
	// Metrics serves GET /metrics (the Prometheus text format); nil: none.
	Metrics http.Handler
	// Stats returns the store's figures for GET /stats (the upstreams'
	// states are added here). Nil: no stats endpoint.
	Stats func(ctx context.Context) (StoreStats, error)
	// Purge drops a cached tag or repository for POST /purge. Errors
	// wrapping ErrInvalid answer 400, ErrRefused 409. Nil: no purge
	// endpoint.
	Purge func(ctx context.Context, ref string) (PurgeResult, error)
	// Pins lists the pins for GET /pins. Nil: no pins endpoint.
	Pins func(ctx context.Context) ([]Pin, error)
}

var (
	// ErrInvalid marks a request the admin handler answers 400: a
	// malformed reference, an unknown upstream.
	ErrInvalid = errors.New("admin: invalid request")
	// ErrRefused marks a request refused for what it names (409): hosted
	// content, which is never purged.
	ErrRefused = errors.New("admin: refused")
)

// StoreStats are the store's figures.
type StoreStats struct {
	// Bytes is the store's disk use (blob files and database, as du
	// counts them).
	Bytes int64 `json:"bytes"`
	// BudgetBytes is storage.maxSize (0: no budget).
	BudgetBytes int64 `json:"budgetBytes"`
	// PinnedBytes is the size of what the pins keep.
	PinnedBytes int64        `json:"pinnedBytes"`
	Counts      cache.Counts `json:"counts"`
}

// Stats is the answer of GET /stats.
type Stats struct {
	Store     StoreStats               `json:"store"`
	Offline   bool                     `json:"offline,omitempty"`
	Upstreams map[string]UpstreamState `json:"upstreams"`
}

// UpstreamState is an upstream's circuit breaker as /readyz and /stats
// report it.
type UpstreamState struct {
	State     string    `json:"state"` // up, down or offline
	Since     time.Time `json:"since,omitzero"`
	Failures  int       `json:"failures"`
	NextProbe time.Time `json:"nextProbe,omitzero"`
}

// PurgeResult is the answer of POST /purge: what was dropped, of which
// repository (as the upstream names it).
type PurgeResult struct {
	Ref        string       `json:"ref"`
	Upstream   string       `json:"upstream"`
	Repository string       `json:"repository"`
	Tag        string       `json:"tag,omitempty"` // "" for a whole repository
	Dropped    cache.Purged `json:"dropped"`
}

// Pin is one entry of GET /pins.
type Pin struct {
	Ref        string `json:"ref"`
	Source     string `json:"source"` // config, sync or import
	Upstream   string `json:"upstream,omitempty"`
	Repository string `json:"repository"`
	Tag        string `json:"tag,omitempty"`
	// Digest is what the pin resolves to, "" when not known.
	Digest string    `json:"digest,omitempty"`
	At     time.Time `json:"at,omitzero"`
}

// maxPurgeBody bounds a purge request's JSON body.
const maxPurgeBody = 64 << 10

// pingTimeout bounds a readiness check of the store.
const pingTimeout = 5 * time.Second

// Handler serves
//   - GET /healthz: 200 while the process runs;
//   - GET /readyz: 200 when the store is open and writable, else 503. The
//     body gives each upstream's state; an upstream that is down or
//     offline does not make ocimirror unready (it serves from its cache);
//     nor does a shared tier that does not answer: "shared" says "down:
//     ..." and "status" "degraded";
//   - GET /metrics: the Prometheus exposition of every metric;
//   - POST /import[?repository=NAME]: the body is a bundle, imported as it
//     arrives (see bundle.Import). 200 with what was imported (JSON), or
//     400 for a bundle refused, 507 when the store is full, 500 otherwise,
//     with {"error": "..."}; a refused bundle loads nothing;
//   - GET /stats: the store's size, budget, pinned bytes and entry counts,
//     and the upstreams' states (Stats);
//   - POST /purge?ref=REF, or a JSON body {"ref": REF}: drops a cached
//     tag or repository (PurgeResult); 400 for a bad reference, 409 for
//     hosted content;
//   - GET /pins: {"pins": [...]} (Pin).
//
// Errors are {"error": "..."}.
func Handler(o Options) http.Handler {
	mux := http.NewServeMux()
	if o.Stats != nil {
		mux.HandleFunc("GET /stats", func(w http.ResponseWriter, r *http.Request) {
			st, err := o.Stats(r.Context())
			if err != nil {
				writeError(w, err)
				return
			}
			writeJSON(w, http.StatusOK, Stats{Store: st, Offline: o.Offline, Upstreams: upstreamStates(o.Upstreams)})
		})
	}
	if o.Purge != nil {
		mux.HandleFunc("POST /purge", func(w http.ResponseWriter, r *http.Request) {
			ref := r.URL.Query().Get("ref")
			if ref == "" {
				var body struct {
					Ref string `json:"ref"`
				}
				if err := json.NewDecoder(io.LimitReader(r.Body, maxPurgeBody)).Decode(&body); err != nil && !errors.Is(err, io.EOF) {
					writeError(w, fmt.Errorf("%w: body: %v", ErrInvalid, err))
					return
				}
				ref = body.Ref
			}
			if ref == "" {
				writeError(w, fmt.Errorf("%w: name a tag or a repository: ?ref=docker.io/library/alpine:3.20 or {\"ref\": ...}", ErrInvalid))
				return
			}
			res, err := o.Purge(r.Context(), ref)
			if err != nil {
				writeError(w, err)
				return
			}
			res.Ref = ref
			writeJSON(w, http.StatusOK, res)
		})
	}
	if o.Pins != nil {
		mux.HandleFunc("GET /pins", func(w http.ResponseWriter, r *http.Request) {
			pins, err := o.Pins(r.Context())
			if err != nil {
				writeError(w, err)
				return
			}
			if pins == nil {
				pins = []Pin{}
			}
			writeJSON(w, http.StatusOK, struct {
				Pins []Pin `json:"pins"`
			}{pins})
		})
	}
	if o.Import != nil {
		mux.HandleFunc("POST /import", func(w http.ResponseWriter, r *http.Request) {
			res, err := o.Import(r.Context(), r.Body, r.URL.Query().Get("repository"))
			if err != nil {
				// Read the rest, so that the client, still sending, sees
				// the answer rather than a closed connection.
				_, _ = io.Copy(io.Discard, r.Body)
				status := http.StatusInternalServerError
				switch {
				case errors.Is(err, bundle.ErrInvalid), errors.Is(err, bundle.ErrDigest), errors.Is(err, bundle.ErrDamaged):
					status = http.StatusBadRequest
				case errors.Is(err, cache.ErrFull):
					status = http.StatusInsufficientStorage
				}
				writeJSON(w, status, map[string]string{"error": err.Error()})
				return
			}
			writeJSON(w, http.StatusOK, res)
		})
	}
	if o.Metrics != nil {
		mux.Handle("GET /metrics", o.Metrics)
	}
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "alive"})
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), pingTimeout)
		defer cancel()
		body := struct {
			Status    string                   `json:"status"`
			Store     string                   `json:"store"`
			Shared    string                   `json:"shared,omitempty"`
			Members   []string                 `json:"members,omitempty"`
			Offline   bool                     `json:"offline,omitempty"`
			Upstreams map[string]UpstreamState `json:"upstreams"`
		}{Status: "ready", Store: "ok", Offline: o.Offline, Upstreams: upstreamStates(o.Upstreams)}
		status := http.StatusOK
		if o.Shared != nil {
			// A shared tier that does not answer leaves the replica
			// serving what its local tier holds: degraded, still
			// ready, like an upstream that is down (a balancer that
			// took every replica out would serve nothing at all).
			body.Shared = "ok"
			sctx, cancel := context.WithTimeout(r.Context(), pingTimeout)
			err := o.Shared(sctx)
			cancel()
			if err != nil {
				body.Status, body.Shared = "degraded", "down: "+err.Error()
			}
		}
		if o.Members != nil {
			body.Members = o.Members()
		}
		if err := o.Ping(ctx); err != nil {
			body.Status, body.Store, status = "not ready", err.Error(), http.StatusServiceUnavailable
		}
		writeJSON(w, status, body)
	})
	return mux
}

// upstreamStates are the upstreams' breaker states.
func upstreamStates(ups map[string]*upstream.Client) map[string]UpstreamState {
	out := make(map[string]UpstreamState, len(ups))
	for n, c := range ups {
		st := c.State()
		state := "up"
		switch {
		case st.Offline:
			state = "offline"
		case st.Down:
			state = "down"
		}
		out[n] = UpstreamState{State: state, Since: st.Since, Failures: st.Failures, NextProbe: st.NextProbe}
	}
	return out
}

// writeError answers err: 400 for ErrInvalid, 409 for ErrRefused, 500
// otherwise.
func writeError(w http.ResponseWriter, err error) {
	status := http.StatusInternalServerError
	switch {
	case errors.Is(err, ErrInvalid):
		status = http.StatusBadRequest
	case errors.Is(err, ErrRefused):
		status = http.StatusConflict
	}
	writeJSON(w, status, map[string]string{"error": err.Error()})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, _ := json.MarshalIndent(v, "", "  ")
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
}
