package flight

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func background() (context.Context, context.CancelFunc) {
	return context.WithCancel(context.Background())
}

func TestDo_OneRunForConcurrentCallers(t *testing.T) {
	var g Group[string, int]
	var runs atomic.Int32
	release := make(chan struct{})
	var wg sync.WaitGroup
	results := make([]int, 8)
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			v, err, _ := g.Do(context.Background(), "k", background, func(context.Context) (int, error) {
				runs.Add(1)
				<-release
				return 42, nil
			})
			if err != nil {
				t.Error(err)
			}
			results[i] = v
		}()
	}
	for g.Len() == 0 {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(20 * time.Millisecond)
	close(release)
	wg.Wait()
	if runs.Load() != 1 {
		t.Fatalf("fn ran %d times", runs.Load())
	}
	for _, v := range results {
		if v != 42 {
			t.Fatalf("results %v", results)
		}
	}
}

// The first caller hanging up neither cancels the work nor fails the
// callers that joined it.
func TestDo_FirstCallerLeaves(t *testing.T) {
	var g Group[string, string]
	first, cancelFirst := context.WithCancel(context.Background())
	started := make(chan struct{})
	release := make(chan struct{})
	var workErr atomic.Value
	go func() {
		_, err, _ := g.Do(first, "k", background, func(ctx context.Context) (string, error) {
			close(started)
			<-release
			if ctx.Err() != nil {
				workErr.Store(ctx.Err())
			}
			return "done", ctx.Err()
		})
		if !errors.Is(err, context.Canceled) {
			t.Errorf("first caller: %v", err)
		}
	}()
	<-started
	res := make(chan string)
	go func() {
		v, err, shared := g.Do(context.Background(), "k", background, func(context.Context) (string, error) { return "second run", nil })
		if err != nil || !shared {
			t.Errorf("second caller: %v shared=%v", err, shared)
		}
		res <- v
	}()
	time.Sleep(20 * time.Millisecond)
	cancelFirst()
	time.Sleep(20 * time.Millisecond)
	close(release)
	if v := <-res; v != "done" {
		t.Fatalf("second caller got %q", v)
	}
	if workErr.Load() != nil {
		t.Fatalf("the work's context ended: %v", workErr.Load())
	}
}

func TestAbandonable_CancelledWhenNobodyWaits(t *testing.T) {
	var g Group[string, int]
	ctx, cancel := context.WithCancel(context.Background())
	ended := make(chan error, 1)
	go func() {
		_, _, _ = g.Abandonable(ctx, "k", background, func(wctx context.Context) (int, error) {
			<-wctx.Done()
			ended <- wctx.Err()
			return 0, wctx.Err()
		})
	}()
	for g.Len() == 0 {
		time.Sleep(time.Millisecond)
	}
	cancel()
	select {
	case err := <-ended:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("work ended with %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("abandoned work was not cancelled")
	}
	// A later caller starts afresh.
	v, err, shared := g.Abandonable(context.Background(), "k", background, func(context.Context) (int, error) { return 7, nil })
	if v != 7 || err != nil || shared {
		t.Fatalf("later caller: %d %v %v", v, err, shared)
	}
}

// A caller that does not abandon keeps the work alive when the others go.
func TestAbandonable_KeptByPatientCaller(t *testing.T) {
	var g Group[string, int]
	ctx, cancel := context.WithCancel(context.Background())
	release := make(chan struct{})
	go func() {
		_, _, _ = g.Abandonable(ctx, "k", background, func(wctx context.Context) (int, error) {
			select {
			case <-release:
				return 1, nil
			case <-wctx.Done():
				return 0, wctx.Err()
			}
		})
	}()
	for g.Len() == 0 {
		time.Sleep(time.Millisecond)
	}
	res := make(chan int)
	go func() {
		v, _, _ := g.Do(context.Background(), "k", background, nil)
		res <- v
	}()
	time.Sleep(20 * time.Millisecond)
	cancel()
	time.Sleep(20 * time.Millisecond)
	close(release)
	if v := <-res; v != 1 {
		t.Fatalf("patient caller got %d", v)
	}
}

func TestDo_PanicIsAnError(t *testing.T) {
	var g Group[string, int]
	_, err, _ := g.Do(context.Background(), "k", background, func(context.Context) (int, error) { panic("boom") })
	if err == nil {
		t.Fatal("no error from a panicking call")
	}
	if g.Len() != 0 {
		t.Fatal("a panicked call stayed in flight")
	}
}
