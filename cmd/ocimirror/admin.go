package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"text/tabwriter"
	"time"

	"github.com/dustin/go-humanize"

	"github.com/ocimirror/ocimirror/admin"
)

const adminUsage = `Usage: ocimirror admin VERB [--admin URL] [--json] [ARG]

Asks a running mirror's admin listener (admin.listen, 127.0.0.1:5001 by
default) and prints a table, or with --json the listener's answer.

Verbs:
  stats       the store's disk use against its budget, the bytes the pins
              keep, how many blobs, manifests, tags, repositories,
              referrers and pins it holds, and each upstream's state
  purge REF   drop a cached tag (docker.io/library/alpine:3.20) or a whole
              cached repository (docker.io/library/alpine), named as
              clients pull it: the next request for it goes upstream.
              Hosted repositories are refused.
  pins        list the pins (storage.pin, sync rules, imported bundles)
              and the digest each resolves to

Flags:
`

// defaultAdminURL is where the admin listener is by default.
const defaultAdminURL = "http://127.0.0.1:5001"

func runAdmin(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("admin", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		base   = fs.String("admin", defaultAdminURL, "`URL` of the mirror's admin listener")
		asJSON = fs.Bool("json", false, "print the listener's JSON answer")
	)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), adminUsage)
		fs.PrintDefaults()
	}
	args, code, done := parseFlagsArgs(fs, args, stdout)
	if done {
		return code
	}
	usageErr := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "ocimirror admin: "+format+"\n", a...)
		return 2
	}
	if len(args) == 0 {
		return usageErr("name a verb: stats, purge REF or pins (ocimirror admin --help)")
	}
	verb, rest := args[0], args[1:]
	wantArgs := map[string]int{"stats": 0, "pins": 0, "purge": 1}
	n, known := wantArgs[verb]
	switch {
	case !known:
		return usageErr("unknown verb %q: stats, purge REF or pins", verb)
	case len(rest) != n && verb == "purge":
		return usageErr("purge: name one tag or repository, such as docker.io/library/alpine:3.20")
	case len(rest) != n:
		return usageErr("%s: unexpected argument %q", verb, rest[0])
	}
	u, err := mirrorURL(*base)
	if err != nil {
		return usageErr("--admin: %v", err)
	}
	fail := func(err error) int {
		fmt.Fprintf(stderr, "ocimirror admin %s: %v\n", verb, err)
		return 1
	}
	var body []byte
	switch verb {
	case "stats":
		body, err = adminCall(ctx, http.MethodGet, u+"/stats", nil, "")
	case "pins":
		body, err = adminCall(ctx, http.MethodGet, u+"/pins", nil, "")
	case "purge":
		body, err = adminCall(ctx, http.MethodPost, u+"/purge?"+url.Values{"ref": {rest[0]}}.Encode(), nil, "")
	}
	if err != nil {
		return fail(err)
	}
	if *asJSON {
		_, _ = stdout.Write(body)
		return 0
	}
	switch verb {
	case "stats":
		var s admin.Stats
		if err := json.Unmarshal(body, &s); err != nil {
			return fail(err)
		}
		printStats(stdout, s)
	case "pins":
		var p struct{ Pins []admin.Pin }
		if err := json.Unmarshal(body, &p); err != nil {
			return fail(err)
		}
		printPins(stdout, p.Pins)
	case "purge":
		var r admin.PurgeResult
		if err := json.Unmarshal(body, &r); err != nil {
			return fail(err)
		}
		printPurge(stdout, r)
	}
	return 0
}

// adminCall makes a request of the admin listener and returns its 200
// answer; another status is an error with the listener's message. body,
// when not nil, is sent as contentType.
func adminCall(ctx context.Context, method, u string, body io.Reader, contentType string) ([]byte, error) {
	if body != nil {
		body = io.NopCloser(body) // not rewound by net/http
	}
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return nil, err
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	answer, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		var e struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(answer, &e) == nil && e.Error != "" {
			return nil, errors.New(e.Error)
		}
		return nil, fmt.Errorf("%s %s: %s", method, u, resp.Status)
	}
	return answer, nil
}

func printStats(w io.Writer, s admin.Stats) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	budget := " (no budget)"
	if b := s.Store.BudgetBytes; b > 0 {
		budget = fmt.Sprintf(" of %s (%.1f %%)", humanize.IBytes(uint64(b)), 100*float64(s.Store.Bytes)/float64(b))
	}
	fmt.Fprintf(tw, "store\t%s%s\n", humanize.IBytes(uint64(s.Store.Bytes)), budget)
	fmt.Fprintf(tw, "pinned\t%s\n", humanize.IBytes(uint64(s.Store.PinnedBytes)))
	c := s.Store.Counts
	for _, r := range []struct {
		name string
		n    int64
	}{{"blobs", c.Blobs}, {"manifests", c.Manifests}, {"tags", c.Tags}, {"repositories", c.Repositories}, {"referrers", c.Referrers}, {"store pins", c.Pins}} {
		fmt.Fprintf(tw, "%s\t%d\n", r.name, r.n)
	}
	tw.Flush()
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "UPSTREAM\tSTATE\tSINCE\tFAILURES")
	for _, name := range sortedKeys(s.Upstreams) {
		u := s.Upstreams[name]
		since := "-"
		if !u.Since.IsZero() {
			since = u.Since.UTC().Format(time.RFC3339)
		}
		state := u.State
		if s.Offline {
			state += " (mirror offline)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\n", name, state, since, u.Failures)
	}
	tw.Flush()
}

func printPins(w io.Writer, pins []admin.Pin) {
	if len(pins) == 0 {
		fmt.Fprintln(w, "no pins")
		return
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SOURCE\tREF\tDIGEST")
	for _, p := range pins {
		d := p.Digest
		if d == "" {
			d = "(not pulled yet)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", p.Source, p.Ref, d)
	}
	tw.Flush()
}

func printPurge(w io.Writer, r admin.PurgeResult) {
	what := "repository " + r.Upstream + "/" + r.Repository
	if r.Tag != "" {
		what = "tag " + r.Upstream + "/" + r.Repository + ":" + r.Tag
	}
	fmt.Fprintf(w, "purged %s\n", what)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	d := r.Dropped
	for _, row := range []struct {
		name string
		n    int
	}{{"tags", d.Tags}, {"manifest links", d.Manifests}, {"blob links", d.Blobs}, {"referrers entries", d.Referrers},
		{"upstream referrers answers", d.UpstreamReferrers}, {"upstream tag lists", d.TagLists}, {"pins", d.Pins}} {
		fmt.Fprintf(tw, "  %s\t%d\n", row.name, row.n)
	}
	tw.Flush()
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
