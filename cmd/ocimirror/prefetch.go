package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/dustin/go-humanize"

	"github.com/ocimirror/ocimirror/graph"
	"github.com/ocimirror/ocimirror/upstream"
)

const prefetchUsage = `Usage: ocimirror prefetch [--mirror URL] [--platform os/arch[/variant]]... REF... | --from-file FILE

Warms a running mirror through its own registry API, so that what it
fetches is served later without the upstream. For each reference it
fetches the manifest; for a multi-platform image, every platform or only
those given with --platform (matched as containerd matches them); every
blob (config and layers), read to the end and checked against its
digest; and every referrer (signatures, SBOMs, attestations), with the
referrers of referrers, and their blobs.

A reference is written as a client pulls it through the mirror:
docker.io/library/alpine:3.20, ghcr.io/org/app@sha256:..., or
registry.internal:5000/team/app:v1 for a configured upstream, or a name
without a registry host (alpine:3.20, team/app) for the mirror's default
upstream.

On a terminal it shows a progress bar (items and bytes); otherwise it
prints a line per image, and one per failure. It ends with a summary. It
goes on past a failing reference, and exits 1 naming every reference
that failed.

Flags:
`

// defaultMirror is where prefetch finds the mirror: serve's default listen
// address.
const defaultMirror = "http://127.0.0.1:5000"

func runPrefetch(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("prefetch", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var platforms listFlag
	var (
		mirror   = fs.String("mirror", defaultMirror, "base `URL` of the running mirror's registry API")
		user     = fs.String("user", "", "log in to a mirror with access control as `NAME`; the password is read from $OCIMIRROR_PASSWORD")
		fromFile = fs.String("from-file", "", "read references from `FILE`, one a line; # starts a comment")
		jobs     = fs.Int("concurrency", 4, "how many blobs to fetch at `once`")
	)
	fs.Var(&platforms, "platform", "fetch only this `os/arch[/variant]` of multi-platform images (repeatable; default: all)")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), prefetchUsage)
		fs.PrintDefaults()
	}
	args, code, done := parseFlagsArgs(fs, args, stdout)
	if done {
		return code
	}
	usageErr := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "ocimirror prefetch: "+format+"\n", a...)
		return 2
	}
	if *jobs < 1 || *jobs > 64 {
		return usageErr("--concurrency %d: want 1 to 64", *jobs)
	}
	base, err := mirrorURL(*mirror)
	if err != nil {
		return usageErr("--mirror: %v", err)
	}
	opts := graph.Options{Referrers: true}
	for _, p := range platforms {
		pp, err := graph.ParsePlatform(p)
		if err != nil {
			return usageErr("--platform: %v", err)
		}
		opts.Platforms = append(opts.Platforms, pp)
	}
	targets := make([]target, 0, len(args))
	for _, a := range args {
		targets = append(targets, newTarget(a, a))
	}
	if *fromFile != "" {
		more, err := readRefFile(*fromFile)
		if err != nil {
			fmt.Fprintf(stderr, "ocimirror prefetch: %v\n", err)
			return 1
		}
		targets = append(targets, more...)
	}
	if len(targets) == 0 {
		return usageErr("no reference given (name one or more, or use --from-file)")
	}
	creds, err := mirrorCredentials(*user)
	if err != nil {
		return usageErr("--user: %v", err)
	}
	client, err := upstream.New(upstream.Options{Name: "mirror", URL: base, Credentials: creds, UserAgent: "ocimirror-prefetch/" + version})
	if err != nil {
		return usageErr("--mirror: %v", err)
	}

	prog := newProgress(stdout, stderr)
	p := &graph.Prefetcher{Client: client, Options: opts, Jobs: *jobs}
	start := time.Now()
	var (
		total  graph.Result
		images int
		failed []target
	)
	left := 0
	for i, t := range targets {
		if ctx.Err() != nil {
			left = len(targets) - i
			break
		}
		var res graph.Result
		if t.err != nil {
			res.Errs = []error{t.err}
			prog.failure(t.text, t.err)
		} else {
			prog.begin(t.text)
			res = p.Image(ctx, t.ref, imageProgress{prog, t.text})
		}
		prog.end(t.text, res)
		total.Add(res)
		if len(res.Errs) > 0 {
			failed = append(failed, t)
		} else {
			images++
		}
	}
	prog.close()

	fmt.Fprintf(stdout, "prefetched %d of %d images: %d manifests, %d referrers, %d blobs, %s in %s\n",
		images, len(targets), total.Manifests, total.Referrers, total.Blobs, humanize.IBytes(uint64(total.Bytes)),
		time.Since(start).Round(time.Millisecond))
	if len(failed) > 0 {
		fmt.Fprintf(stderr, "ocimirror prefetch: %d of %d references failed:\n", len(failed), len(targets))
		for _, t := range failed {
			fmt.Fprintf(stderr, "  %s\n", t.text)
		}
	}
	if left > 0 {
		fmt.Fprintf(stderr, "ocimirror prefetch: interrupted; %d references not tried:\n", left)
		for _, t := range targets[len(targets)-left:] {
			fmt.Fprintf(stderr, "  %s\n", t.text)
		}
	}
	if len(failed) > 0 || left > 0 {
		return 1
	}
	return 0
}

// parseFlagsArgs is parseFlags for a command that takes arguments too:
// flags may come before, between or after them.
func parseFlagsArgs(fs *flag.FlagSet, args []string, stdout io.Writer) (rest []string, code int, done bool) {
	usage := fs.Usage
	fs.Usage = func() {}
	for {
		err := fs.Parse(args)
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(stdout)
			usage()
			return nil, 0, true
		}
		if err != nil {
			usage()
			return nil, 2, true
		}
		if fs.NArg() == 0 {
			return rest, 0, false
		}
		rest = append(rest, fs.Arg(0))
		args = fs.Args()[1:]
	}
}

// mirrorURL checks --mirror: an http or https URL with a host (http://
// assumed when no scheme is written).
func mirrorURL(s string) (string, error) {
	if !strings.Contains(s, "://") {
		s = "http://" + s
	}
	u, err := url.Parse(s)
	if err != nil {
		return "", err
	}
	if u.Scheme != "http" && u.Scheme != "https" || u.Host == "" || u.RawQuery != "" {
		return "", fmt.Errorf("%q: want http://host:port or https://host:port", s)
	}
	return strings.TrimSuffix(u.String(), "/"), nil
}

// target is one reference to prefetch, as the user wrote it.
type target struct {
	// text is the reference as written; where it was read, for errors.
	text, where string
	ref         graph.Reference
	err         error
}

func newTarget(text, where string) target {
	t := target{text: text, where: where}
	t.ref, t.err = graph.ParseReference(text)
	if t.err != nil && where != text {
		t.err = fmt.Errorf("%s: %w", where, t.err)
	}
	return t
}

// readRefFile reads references one a line; # starts a comment, blank lines
// are skipped.
func readRefFile(path string) ([]target, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []target
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line, _, _ := strings.Cut(sc.Text(), "#")
		if line = strings.TrimSpace(line); line != "" {
			out = append(out, newTarget(line, fmt.Sprintf("%s:%d", path, n)))
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return out, nil
}

// mirrorCredentials are the credentials prefetch and export present to a
// mirror with access control: --user, with the password from the
// environment (never a flag, which other users of the machine can read).
func mirrorCredentials(user string) (upstream.Credentials, error) {
	if user == "" {
		return upstream.Credentials{}, nil
	}
	pw := os.Getenv("OCIMIRROR_PASSWORD")
	if pw == "" {
		return upstream.Credentials{}, errors.New("set the password in OCIMIRROR_PASSWORD")
	}
	return upstream.Credentials{Username: user, Password: pw}, nil
}
