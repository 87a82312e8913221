package main

import (
	"archive/tar"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"

	"github.com/dustin/go-humanize"

	"github.com/ocimirror/ocimirror/bundle"
	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/config"
)

const importUsage = `Usage: ocimirror import (--data DIR | --config FILE | --admin URL) [--repository NAME] BUNDLE

Loads a bundle into a mirror's cache, under the names it was exported
with: an image named docker.io/library/alpine:3 is served as the mirror's
docker.io upstream serves it (to containerd with ?ns=docker.io, to others
as docker.io/library/alpine:3 or, with docker.io the default upstream,
alpine:3), exactly as if it had been pulled, with its platforms, blobs,
referrers and the fallback tags of its referrers. Imported images are
pinned: eviction keeps them.

BUNDLE is what ocimirror export writes, or an OCI layout that oras,
regctl or crane (--format=oci --annotate-ref) wrote, or what docker save
wrote: a tar archive (gzip-compressed or not), a directory, or - for
standard input. Names that carry no repository (oras and regctl write a
tag alone) take --repository's.

Every digest is checked, and every size, before anything becomes
visible; then the whole bundle becomes visible in one step. A damaged or
incomplete bundle is refused, naming the entry at fault, and loads
nothing; so does a process killed half way.

Into a stopped mirror: --data names its data directory (or --config its
configuration, whose upstreams the names must then be). Into a running
one: --admin names its admin listener (admin.listen, 127.0.0.1:5001 by
default), which receives the bundle as it is read.

Flags:
`

func runImport(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("import", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		data       = fs.String("data", "", "data `directory` of a stopped mirror")
		configFile = fs.String("config", "", "configuration `file` of a stopped mirror (its storage.path and upstreams)")
		adminURL   = fs.String("admin", "", "`URL` of a running mirror's admin listener, such as http://127.0.0.1:5001")
		repository = fs.String("repository", "", "full `name` of the repository of images named by a tag alone (registry.example/team/app)")
	)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), importUsage)
		fs.PrintDefaults()
	}
	args, code, done := parseFlagsArgs(fs, args, stdout)
	if done {
		return code
	}
	usageErr := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "ocimirror import: "+format+"\n", a...)
		return 2
	}
	fail := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "ocimirror import: "+format+"\n", a...)
		return 1
	}
	if len(args) != 1 {
		return usageErr("name one bundle (a file, a directory, or -)")
	}
	if (*data != "" || *configFile != "") == (*adminURL != "") {
		return usageErr("name a stopped mirror (--data or --config) or a running one (--admin), one of them")
	}
	in, closeIn, err := openBundle(args[0])
	if err != nil {
		return fail("%v", err)
	}
	defer closeIn()

	var res *bundle.ImportResult
	if *adminURL != "" {
		res, err = importAdmin(ctx, *adminURL, *repository, in)
	} else {
		res, err = importData(ctx, *data, *configFile, *repository, in)
	}
	if err != nil {
		return fail("%s: %v\nnothing was imported", args[0], err)
	}
	for _, i := range res.Images {
		fmt.Fprintf(stdout, "ok   %s %s\n", i.Name, i.Digest)
	}
	for _, w := range res.Warnings {
		fmt.Fprintf(stderr, "ocimirror import: warning: %s\n", w)
	}
	fmt.Fprintf(stdout, "imported %d images: %d manifests, %d referrers, %d blobs, %d tags (%d files, %s read)\n",
		len(res.Images), res.Manifests, res.Referrers, res.Blobs, res.Tags, res.Files, humanize.IBytes(uint64(res.Bytes)))
	return 0
}

// openBundle opens a bundle: a file, standard input (-), or a directory,
// read as a tar archive of it.
func openBundle(path string) (io.Reader, func(), error) {
	if path == "-" {
		return os.Stdin, func() {}, nil
	}
	st, err := os.Stat(path)
	if err != nil {
		return nil, nil, err
	}
	if !st.IsDir() {
		f, err := os.Open(path)
		if err != nil {
			return nil, nil, err
		}
		return f, func() { f.Close() }, nil
	}
	pr, pw := io.Pipe()
	go func() {
		tw := tar.NewWriter(pw)
		err := tw.AddFS(os.DirFS(path))
		if err == nil {
			err = tw.Close()
		}
		pw.CloseWithError(err)
	}()
	return pr, func() { pr.Close() }, nil
}

// importData imports into a stopped mirror's store.
func importData(ctx context.Context, dir, configFile, repository string, in io.Reader) (*bundle.ImportResult, error) {
	o := bundle.ImportOptions{Repository: repository}
	if configFile != "" {
		cfg, err := config.Load(configFile)
		if err != nil {
			return nil, err
		}
		if dir == "" {
			dir = cfg.Storage.Path
		}
		for _, u := range cfg.Upstreams {
			o.Upstreams = append(o.Upstreams, strings.ToLower(u.Name))
		}
	}
	store, err := cache.OpenBadger(cache.BadgerOptions{Path: dir, CollectInterval: -1})
	if err != nil {
		if strings.Contains(err.Error(), "lock") {
			return nil, fmt.Errorf("%w (is the mirror running? import into it with --admin)", err)
		}
		return nil, err
	}
	res, err := bundle.Import(ctx, in, store, o)
	if cerr := store.Close(); err == nil && cerr != nil {
		return nil, cerr
	}
	return res, err
}

// importAdmin streams the bundle to a running mirror's admin listener.
func importAdmin(ctx context.Context, base, repository string, in io.Reader) (*bundle.ImportResult, error) {
	base, err := mirrorURL(base)
	if err != nil {
		return nil, fmt.Errorf("--admin: %w", err)
	}
	u := base + "/import"
	if repository != "" {
		u += "?" + url.Values{"repository": {repository}}.Encode()
	}
	body, err := adminCall(ctx, http.MethodPost, u, in, "application/x-tar")
	if err != nil {
		return nil, err
	}
	var res bundle.ImportResult
	if err := json.Unmarshal(body, &res); err != nil {
		return nil, fmt.Errorf("POST %s: %v", u, err)
	}
	return &res, nil
}
