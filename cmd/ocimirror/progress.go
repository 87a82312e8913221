package main

import (
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
	"golang.org/x/term"

	"github.com/ocimirror/ocimirror/graph"
)

// progress is what prefetch tells the user as it goes. Items are
// manifests and blobs; bytes are theirs. Its methods are safe for
// concurrent use (blobs arrive on several goroutines).
type progress interface {
	// begin starts an image.
	begin(ref string)
	// found adds an item of size bytes to the totals.
	found(size int64)
	// Write counts bytes of an item as they arrive.
	io.Writer
	// done finishes an item; rest is what of its size Write did not count.
	done(rest int64)
	// failure reports one failure of ref, when it happens.
	failure(ref string, err error)
	// end reports an image: one line.
	end(ref string, res graph.Result)
	// close ends the display, before the summary is printed.
	close()
}

// imageProgress is the progress of one image, as the prefetcher reports it.
type imageProgress struct {
	p   progress
	ref string
}

func (i imageProgress) Found(size int64)            { i.p.found(size) }
func (i imageProgress) Write(b []byte) (int, error) { return i.p.Write(b) }
func (i imageProgress) Done(rest int64)             { i.p.done(rest) }
func (i imageProgress) Failure(err error)           { i.p.failure(i.ref, err) }

// newProgress shows a progress bar when stderr is a terminal, and plain
// lines otherwise.
func newProgress(stdout, stderr io.Writer) progress {
	if f, ok := stderr.(*os.File); ok && term.IsTerminal(int(f.Fd())) && os.Getenv("TERM") != "dumb" {
		return newBarProgress(f)
	}
	return &lineProgress{stdout: stdout, stderr: stderr}
}

// imageLine is the line that reports an image.
func imageLine(ref string, res graph.Result) string {
	stats := fmt.Sprintf("%d manifests, %d referrers, %d blobs, %s in %s", res.Manifests, res.Referrers, res.Blobs,
		humanize.IBytes(uint64(res.Bytes)), res.Took.Round(time.Millisecond))
	if len(res.Errs) > 0 {
		errs := "1 error"
		if len(res.Errs) > 1 {
			errs = fmt.Sprintf("%d errors", len(res.Errs))
		}
		return fmt.Sprintf("FAIL %s (%s; %s)", ref, errs, stats)
	}
	return fmt.Sprintf("ok   %s %s (%s)", ref, res.Digest, stats)
}

func failureLine(ref string, err error) string {
	return fmt.Sprintf("ocimirror prefetch: %s: %v", ref, err)
}

// lineProgress prints a line per image on stdout and a line per failure
// on stderr: what a log or a CI job keeps.
type lineProgress struct {
	mu             sync.Mutex
	stdout, stderr io.Writer
}

func (l *lineProgress) begin(string)                {}
func (l *lineProgress) found(int64)                 {}
func (l *lineProgress) Write(p []byte) (int, error) { return len(p), nil }
func (l *lineProgress) done(int64)                  {}
func (l *lineProgress) close()                      {}

func (l *lineProgress) failure(ref string, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	fmt.Fprintln(l.stderr, failureLine(ref, err))
}

func (l *lineProgress) end(ref string, res graph.Result) {
	l.mu.Lock()
	defer l.mu.Unlock()
	fmt.Fprintln(l.stdout, imageLine(ref, res))
}

// barProgress draws two bars on a terminal, items and bytes, with the
// image being fetched; lines for images and failures scroll above them.
// Totals grow as the walk finds manifests and blobs. (mpb: it redraws
// several bars from any goroutine, takes totals that grow, and prints
// lines above its bars.)
type barProgress struct {
	out          io.Writer
	p            *mpb.Progress
	items, bytes *mpb.Bar
	itemsTotal   atomic.Int64
	bytesTotal   atomic.Int64
	current      atomic.Pointer[string]
}

func newBarProgress(out io.Writer) *barProgress {
	b := &barProgress{out: out}
	empty := ""
	b.current.Store(&empty)
	b.p = mpb.New(mpb.WithOutput(out), mpb.WithWidth(40), mpb.WithRefreshRate(150*time.Millisecond))
	b.items = b.p.AddBar(0,
		mpb.PrependDecorators(decor.Name("items ", decor.WC{W: 6}), decor.CountersNoUnit("%d / %d", decor.WCSyncWidth)),
		mpb.AppendDecorators(decor.Any(func(decor.Statistics) string { return shorten(*b.current.Load(), 48) })))
	b.bytes = b.p.AddBar(0,
		mpb.PrependDecorators(decor.Name("bytes ", decor.WC{W: 6}), decor.CountersKibiByte("% .1f / % .1f", decor.WCSyncWidth)),
		mpb.AppendDecorators(decor.AverageSpeed(decor.SizeB1024(0), "% .1f"), decor.Name(" "), decor.Elapsed(decor.ET_STYLE_GO)))
	return b
}

func shorten(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "..." + s[len(s)-n+3:]
}

func (b *barProgress) begin(ref string) { b.current.Store(&ref) }

func (b *barProgress) found(size int64) {
	b.items.SetTotal(b.itemsTotal.Add(1), false)
	b.bytes.SetTotal(b.bytesTotal.Add(size), false)
}

func (b *barProgress) Write(p []byte) (int, error) {
	b.bytes.IncrBy(len(p))
	return len(p), nil
}

func (b *barProgress) done(rest int64) {
	b.items.Increment()
	if rest > 0 {
		b.bytes.IncrInt64(rest)
	}
}

// println prints a line above the bars.
func (b *barProgress) println(s string) {
	if _, err := fmt.Fprintln(b.p, s); err != nil {
		fmt.Fprintln(b.out, s)
	}
}

func (b *barProgress) failure(ref string, err error) { b.println(failureLine(ref, err)) }

func (b *barProgress) end(ref string, res graph.Result) { b.println(imageLine(ref, res)) }

func (b *barProgress) close() {
	done := "done"
	b.current.Store(&done)
	b.items.SetTotal(-1, true)
	b.bytes.SetTotal(-1, true)
	b.p.Wait()
}
