// Package admin is the admin listener: health, readiness, bundle imports
// and (later) metrics. It is served on its own address, never with the
// registry API.
package admin

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"sort"
	"time"

	"github.com/ocimirror/ocimirror/bundle"
	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/upstream"
)

// Options are what the admin handler reports on.
type Options struct {
	// Ping checks that the store is open and writable.
	Ping func(ctx context.Context) error
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
}

// pingTimeout bounds a readiness check of the store.
const pingTimeout = 5 * time.Second

// Handler serves
//   - GET /healthz: 200 while the process runs;
//   - GET /readyz: 200 when the store is open and writable, else 503. The
//     body gives each upstream's state; an upstream that is down or
//     offline does not make ocimirror unready (it serves from its cache);
//   - GET /metrics: the Prometheus exposition of every metric;
//   - POST /import[?repository=NAME]: the body is a bundle, imported as it
//     arrives (see bundle.Import). 200 with what was imported (JSON), or
//     400 for a bundle refused, 507 when the store is full, 500 otherwise,
//     with {"error": "..."}; a refused bundle loads nothing.
func Handler(o Options) http.Handler {
	mux := http.NewServeMux()
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
		type up struct {
			State     string    `json:"state"` // up, down or offline
			Since     time.Time `json:"since,omitzero"`
			Failures  int       `json:"failures"`
			NextProbe time.Time `json:"nextProbe,omitzero"`
		}
		body := struct {
			Status    string        `json:"status"`
			Store     string        `json:"store"`
			Offline   bool          `json:"offline,omitempty"`
			Upstreams map[string]up `json:"upstreams"`
		}{Status: "ready", Store: "ok", Offline: o.Offline, Upstreams: map[string]up{}}
		names := make([]string, 0, len(o.Upstreams))
		for n := range o.Upstreams {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, n := range names {
			st := o.Upstreams[n].State()
			state := "up"
			switch {
			case st.Offline:
				state = "offline"
			case st.Down:
				state = "down"
			}
			body.Upstreams[n] = up{State: state, Since: st.Since, Failures: st.Failures, NextProbe: st.NextProbe}
		}
		status := http.StatusOK
		if err := o.Ping(ctx); err != nil {
			body.Status, body.Store, status = "not ready", err.Error(), http.StatusServiceUnavailable
		}
		writeJSON(w, status, body)
	})
	return mux
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, _ := json.MarshalIndent(v, "", "  ")
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
}
