// Command ocimirror is a caching pull-through proxy for OCI and Docker
// registries.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

const usage = `ocimirror: a caching pull-through proxy for OCI and Docker registries.

Usage:
  ocimirror serve [flags]    run the mirror (built-in defaults need no flags)
  ocimirror gc [flags]       collect unreferenced data of a stopped mirror
  ocimirror prefetch REF...  warm a running mirror: images, platforms, blobs, referrers
  ocimirror export REF...    write images, with their referrers, to a bundle (an OCI layout tar)
  ocimirror import BUNDLE    load a bundle into a mirror, running or stopped
  ocimirror admin VERB       ask a running mirror: stats, purge REF, pins
  ocimirror version          print the version
  ocimirror help [command]   show help

Run "ocimirror serve --help" for the serve flags.
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

// run is the whole command line; it returns the exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch cmd, rest := args[0], args[1:]; cmd {
	case "serve":
		return runServe(ctx, rest, stdout, stderr)
	case "version":
		return runVersion(rest, stdout, stderr)
	case "gc":
		return runGC(ctx, rest, stdout, stderr)
	case "prefetch":
		return runPrefetch(ctx, rest, stdout, stderr)
	case "export":
		return runExport(ctx, rest, stdout, stderr)
	case "import":
		return runImport(ctx, rest, stdout, stderr)
	case "admin":
		return runAdmin(ctx, rest, stdout, stderr)
	case "help", "-h", "-help", "--help":
		if len(rest) > 0 && rest[0] != "help" {
			return run(ctx, []string{rest[0], "--help"}, stdout, stderr)
		}
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "ocimirror: unknown command %q\n\n%s", cmd, usage)
		return 2
	}
}

func runVersion(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("version", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "Usage: ocimirror version\n\nPrints the version of ocimirror and of the Go toolchain that built it.")
	}
	if code, done := parseFlags(fs, args, stdout); done {
		return code
	}
	fmt.Fprintf(stdout, "ocimirror %s (%s, %s/%s)\n", version, runtime.Version(), runtime.GOOS, runtime.GOARCH)
	return 0
}

// parseFlags parses args; --help prints usage to stdout and exits 0, a bad
// flag exits 2.
func parseFlags(fs *flag.FlagSet, args []string, stdout io.Writer) (int, bool) {
	usage := fs.Usage
	fs.Usage = func() {} // printed below, once, to the right stream
	err := fs.Parse(args)
	if errors.Is(err, flag.ErrHelp) {
		fs.SetOutput(stdout)
		usage()
		return 0, true
	}
	if err != nil {
		usage()
		return 2, true
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(fs.Output(), "ocimirror %s: unexpected argument %q\n", fs.Name(), fs.Arg(0))
		return 2, true
	}
	return 0, false
}

// upstreamFlags collects repeated --upstream NAME=URL flags.
type upstreamFlags [][2]string

func (u *upstreamFlags) String() string { return "" }

func (u *upstreamFlags) Set(v string) error {
	name, url, ok := strings.Cut(v, "=")
	if !ok || name == "" || url == "" {
		return fmt.Errorf("want NAME=URL, for example ghcr.io=https://ghcr.io")
	}
	*u = append(*u, [2]string{name, url})
	return nil
}

// listFlag collects a repeated string flag.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }

func (l *listFlag) Set(v string) error {
	*l = append(*l, v)
	return nil
}
