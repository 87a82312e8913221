package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/opencontainers/go-digest"

	"github.com/ocimirror/ocimirror/bundle"
	"github.com/ocimirror/ocimirror/graph"
	"github.com/ocimirror/ocimirror/upstream"
)

const exportUsage = `Usage: ocimirror export [--mirror URL] [--platform os/arch[/variant]]... [--exclude-from OLD.tar]... --output FILE REF... | --from-file FILE

Writes a bundle: an OCI image layout in a tar archive, to carry images
across an air gap and load them into another mirror with ocimirror import.
It reads each image through a running mirror's registry API (fetching
what the mirror does not hold yet): the manifest; for a multi-platform
image, every platform or only those given with --platform; every blob,
checked against its digest as it is written; and every referrer
(signatures, SBOMs, attestations), with the referrers of referrers.

index.json names each image by its full name (docker.io/library/alpine:3)
in org.opencontainers.image.ref.name and io.containerd.image.name, and
lists the referrers both untagged (as oras keeps them) and in fallback
tag indexes, NAME:sha256-<hex> (as regctl does). oras cp
--from-oci-layout, regctl image import and skopeo copy oci-archive: read
it.

With --exclude-from, what an earlier bundle holds is named but not written
again: the new bundle is incremental, and imports into a mirror that has
the earlier one.

References are written as prefetch takes them; a name without a registry
host is taken to be --default-registry's, which is what the bundle calls
it. Blobs stream from the mirror into the archive: memory does not grow
with the bundle. The output is written beside FILE and renamed into place
once complete; on any failure there is none (- writes to standard output).

Flags:
`

func runExport(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("export", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var platforms, excludes listFlag
	var (
		mirror   = fs.String("mirror", defaultMirror, "base `URL` of the running mirror's registry API")
		user     = fs.String("user", "", "log in to a mirror with access control as `NAME`; the password is read from $OCIMIRROR_PASSWORD")
		fromFile = fs.String("from-file", "", "read references from `FILE`, one a line; # starts a comment")
		output   = fs.String("output", "", "write the bundle to `FILE` (- for standard output)")
		defReg   = fs.String("default-registry", bundle.DockerHub, "registry `host` of references without one (the mirror's default upstream)")
	)
	fs.Var(&platforms, "platform", "export only this `os/arch[/variant]` of multi-platform images (repeatable; default: all)")
	fs.Var(&excludes, "exclude-from", "leave out what the earlier bundle `OLD.tar` holds (repeatable)")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), exportUsage)
		fs.PrintDefaults()
	}
	args, code, done := parseFlagsArgs(fs, args, stdout)
	if done {
		return code
	}
	usageErr := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "ocimirror export: "+format+"\n", a...)
		return 2
	}
	fail := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "ocimirror export: "+format+"\n", a...)
		return 1
	}
	if *output == "" {
		return usageErr("no --output given")
	}
	base, err := mirrorURL(*mirror)
	if err != nil {
		return usageErr("--mirror: %v", err)
	}
	e := &bundle.Exporter{}
	for _, p := range platforms {
		pp, err := graph.ParsePlatform(p)
		if err != nil {
			return usageErr("--platform: %v", err)
		}
		e.Platforms = append(e.Platforms, pp)
	}
	var targets []target
	for _, a := range args {
		targets = append(targets, newTarget(a, a))
	}
	if *fromFile != "" {
		more, err := readRefFile(*fromFile)
		if err != nil {
			return fail("%v", err)
		}
		targets = append(targets, more...)
	}
	if len(targets) == 0 {
		return usageErr("no reference given (name one or more, or use --from-file)")
	}
	names := make([]bundle.Name, len(targets))
	for i, t := range targets {
		if t.err == nil {
			names[i], t.err = bundleName(t.ref, *defReg)
		}
		if t.err != nil {
			return fail("%s: %v", t.text, t.err)
		}
	}
	for _, p := range excludes {
		more, err := excludeFrom(p)
		if err != nil {
			return fail("--exclude-from %s: %v", p, err)
		}
		if e.Exclude == nil {
			e.Exclude = more
		} else {
			for d := range more {
				e.Exclude[d] = true
			}
		}
	}
	creds, err := mirrorCredentials(*user)
	if err != nil {
		return usageErr("--user: %v", err)
	}
	client, err := upstream.New(upstream.Options{Name: "mirror", URL: base, Credentials: creds, UserAgent: "ocimirror-export/" + version})
	if err != nil {
		return usageErr("--mirror: %v", err)
	}

	out, commit, abort, err := createOutput(*output, stdout)
	if err != nil {
		return fail("%v", err)
	}
	if e.W, err = bundle.NewWriter(out); err != nil {
		abort()
		return fail("%s: %v", *output, err)
	}
	prog := newProgress(stdout, stderr)
	if *output == "-" {
		prog = &lineProgress{stdout: stderr, stderr: stderr}
	}
	start := time.Now()
	var total graph.Result
	for i, t := range targets {
		if ctx.Err() != nil {
			prog.close()
			abort()
			return fail("interrupted; no bundle written")
		}
		prog.begin(t.text)
		e.Progress = imageProgress{prog, t.text}
		began := time.Now()
		res, err := e.Image(ctx, graph.NewRegistry(client, t.ref.Name()), names[i])
		if err != nil {
			prog.close()
			abort()
			return fail("%s: %v\nno bundle written", t.text, err)
		}
		r := graph.Result{Digest: res.Digest, Manifests: res.Manifests, Referrers: res.Referrers, Blobs: res.Blobs,
			Bytes: res.Written, Took: time.Since(began)}
		prog.end(names[i].String(), r)
		total.Add(r)
	}
	prog.close()
	if err := e.W.Close(); err != nil {
		abort()
		return fail("%s: %v", *output, err)
	}
	if err := commit(); err != nil {
		return fail("%v", err)
	}
	excluded := ""
	if len(e.Exclude) > 0 {
		excluded = " (incremental)"
	}
	fmt.Fprintf(stderrIf(*output == "-", stdout, stderr), "exported %d images to %s%s: %d manifests, %d referrers, %d blobs, %s in %s\n",
		len(targets), *output, excluded, total.Manifests, total.Referrers, total.Blobs, humanize.IBytes(uint64(total.Bytes)),
		time.Since(start).Round(time.Millisecond))
	return 0
}

// stderrIf picks stderr when cond (standard output carries the bundle).
func stderrIf(cond bool, stdout, stderr io.Writer) io.Writer {
	if cond {
		return stderr
	}
	return stdout
}

// bundleName is the full name a reference gets in a bundle: its registry
// host (defaultRegistry without one) and repository, Docker Hub's
// official images under library/.
func bundleName(r graph.Reference, defaultRegistry string) (bundle.Name, error) {
	host := r.Host
	if host == "" {
		host = defaultRegistry
	}
	s := host + "/" + r.Repository
	if r.Digest != "" {
		s += "@" + r.Digest.String()
	} else {
		s += ":" + r.Tag
	}
	return bundle.ParseName(s)
}

// excludeFrom reads the blobs an earlier bundle holds.
func excludeFrom(path string) (map[digest.Digest]bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return bundle.ExcludeFrom(f)
}

// createOutput opens where the bundle goes: standard output for -, else a
// temporary file beside path, renamed to path by commit (after a sync)
// and removed by abort.
func createOutput(path string, stdout io.Writer) (w io.Writer, commit func() error, abort func(), err error) {
	if path == "-" {
		return stdout, func() error { return nil }, func() {}, nil
	}
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".partial-*")
	if err != nil {
		return nil, nil, nil, err
	}
	abort = func() {
		f.Close()
		os.Remove(f.Name())
	}
	commit = func() error {
		if err := errors.Join(f.Sync(), f.Chmod(0o644), f.Close()); err != nil {
			os.Remove(f.Name())
			return err
		}
		if err := os.Rename(f.Name(), path); err != nil {
			os.Remove(f.Name())
			return err
		}
		return nil
	}
	return f, commit, abort, nil
}
