package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/dustin/go-humanize"

	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/config"
)

const gcUsage = `Usage: ocimirror gc --data DIR [--dry-run] [--grace DURATION]

Collects the data of a stopped mirror that nothing references any more,
once it has been so for the grace period: blobs pushed to a repository
that no manifest of it names (their link), and blobs and manifests that
no repository holds (their bytes). Prints what it deletes, or with
--dry-run what it would, and the bytes. A running mirror does the same
every hour. Cached content is eviction's business, not this command's.

Flags:
`

func runGC(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("gc", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		data  = fs.String("data", config.Default().Storage.Path, "data `directory` of the mirror")
		dry   = fs.Bool("dry-run", false, "print what would be deleted, delete nothing")
		grace = fs.Duration("grace", cache.DefaultGCGrace, "delete only what has been unreferenced this `long`")
	)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), gcUsage)
		fs.PrintDefaults()
	}
	if code, done := parseFlags(fs, args, stdout); done {
		return code
	}
	if *grace < 0 {
		fmt.Fprintf(stderr, "ocimirror gc: --grace %s is negative\n", *grace)
		return 2
	}
	store, err := cache.OpenBadger(cache.BadgerOptions{Path: *data, CollectInterval: -1,
		Logger: slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))})
	if err != nil {
		fmt.Fprintf(stderr, "ocimirror gc: %v\n", err)
		return 1
	}
	defer store.Close()
	c, err := store.CollectGarbage(ctx, *grace, *dry)
	verb := "deleted"
	if *dry {
		verb = "would delete"
	}
	for _, g := range c.Items {
		what := "blob"
		if g.Kind == cache.LinkManifest {
			what = "manifest"
		}
		if g.Repo.Repo != "" {
			fmt.Fprintf(stdout, "%s link of %s %s in %s (no manifest names it since %s)\n", verb, what, g.Digest, repoName(g.Repo), g.Since.UTC().Format(time.RFC3339))
			continue
		}
		fmt.Fprintf(stdout, "%s %s %s, %s (unreferenced since %s)\n", verb, what, g.Digest, humanize.IBytes(uint64(g.Size)), g.Since.UTC().Format(time.RFC3339))
	}
	fmt.Fprintf(stdout, "%s %d items, %s\n", verb, len(c.Items), humanize.IBytes(uint64(c.Bytes)))
	if err != nil {
		fmt.Fprintf(stderr, "ocimirror gc: %v\n", err)
		return 1
	}
	return 0
}

func repoName(k cache.RepoKey) string {
	if k.Upstream == "" {
		return k.Repo
	}
	return k.Upstream + "/" + k.Repo
}
