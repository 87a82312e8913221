package graph

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/manifest"
	"github.com/ocimirror/ocimirror/upstream"
)

// Result is what prefetching one image fetched, and what failed.
type Result struct {
	Digest    digest.Digest
	Manifests int
	Referrers int
	Blobs     int
	Bytes     int64
	Errs      []error
	Took      time.Duration
}

// Add adds o's counts to r's.
func (r *Result) Add(o Result) {
	r.Manifests += o.Manifests
	r.Referrers += o.Referrers
	r.Blobs += o.Blobs
	r.Bytes += o.Bytes
}

// Progress hears of a prefetch as it goes. Items are manifests and blobs;
// bytes are theirs. Its methods are called concurrently (blobs arrive on
// several goroutines).
type Progress interface {
	// Found adds an item of size bytes to the totals.
	Found(size int64)
	// Write counts bytes of an item as they arrive.
	io.Writer
	// Done finishes an item; rest is what of its size Write did not count.
	Done(rest int64)
	// Failure reports one failure, when it happens.
	Failure(err error)
}

// NoProgress hears nothing.
type NoProgress struct{}

func (NoProgress) Found(int64)                 {}
func (NoProgress) Write(p []byte) (int, error) { return len(p), nil }
func (NoProgress) Done(int64)                  {}
func (NoProgress) Failure(error)               {}

// Prefetcher warms a mirror through its registry API (Client), one image
// at a time, each image's blobs Jobs at once (4 if 0).
type Prefetcher struct {
	Client  *upstream.Client
	Options Options
	Jobs    int
}

// Image walks one reference through the mirror: manifests as the walk
// reads them, blobs on up to Jobs goroutines while the walk goes on.
// Every failure is reported and kept; the walk goes on past a blob or a
// missing manifest, and stops at an error of the walk itself.
func (p *Prefetcher) Image(ctx context.Context, ref Reference, prog Progress) Result {
	start := time.Now()
	if prog == nil {
		prog = NoProgress{}
	}
	jobs := p.Jobs
	if jobs <= 0 {
		jobs = 4
	}
	var (
		res  Result
		mu   sync.Mutex
		wg   sync.WaitGroup
		sem  = make(chan struct{}, jobs)
		kept int // children of the root index walked
	)
	fail := func(err error) {
		mu.Lock()
		res.Errs = append(res.Errs, err)
		mu.Unlock()
		prog.Failure(err)
	}
	src := NewRegistry(p.Client, ref.Name())
	root, err := src.Resolve(ctx, ref.Ref())
	if err != nil {
		fail(err)
		res.Took = time.Since(start)
		return res
	}
	res.Digest = root.Digest
	walkErr := Walk(ctx, src, root, p.Options, func(n Node) error {
		d := n.Descriptor
		prog.Found(d.Size)
		if !n.Kind.Blob() {
			defer prog.Done(d.Size)
			if n.Missing {
				fail(fmt.Errorf("%s manifest %s (named by %s): not found", n.Kind, d.Digest, n.Parent))
				return nil
			}
			mu.Lock()
			res.Manifests++
			res.Bytes += d.Size
			if n.Kind == Referrer {
				res.Referrers++
			}
			if n.Kind == Child && n.Parent == root.Digest {
				kept++
			}
			mu.Unlock()
			return nil
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			return ctx.Err()
		}
		wg.Go(func() {
			defer func() { <-sem }()
			got, err := src.Blob(ctx, d, prog)
			// Whatever arrived counts toward the bar; the rest is skipped.
			prog.Done(d.Size - got)
			if err != nil {
				fail(fmt.Errorf("%s %w", n.Kind, err))
				return
			}
			mu.Lock()
			res.Blobs++
			res.Bytes += got
			mu.Unlock()
		})
		return nil
	})
	wg.Wait()
	if walkErr != nil {
		fail(walkErr)
	}
	if walkErr == nil && len(p.Options.Platforms) > 0 && manifest.IsIndex(root.MediaType) && kept == 0 {
		fail(fmt.Errorf("no manifest of index %s is for %s", root.Digest, PlatformList(p.Options.Platforms)))
	}
	for _, w := range src.Warnings() {
		fail(errors.New(w))
	}
	res.Took = time.Since(start)
	return res
}

// PlatformList writes platforms as os/arch[/variant], comma separated.
func PlatformList(ps []v1.Platform) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = FormatPlatform(p)
	}
	return strings.Join(s, ", ")
}
