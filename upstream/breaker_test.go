package upstream

import (
	"context"
	"errors"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ocimirror/ocimirror/internal/metrictest"
)

// flaky is a TCP listener on 127.0.0.1 that, while down, accepts and
// drops connections at once (a connection failure for the client), and
// otherwise answers every request 404; it counts the connections.
type flaky struct {
	ln    net.Listener
	down  atomic.Bool
	conns atomic.Int32
	srv   *http.Server
	wg    sync.WaitGroup
}

func newFlaky(t *testing.T) *flaky {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &flaky{ln: ln}
	f.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusNotFound)
	})}
	inner := make(chan net.Conn)
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		defer close(inner)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			f.conns.Add(1)
			if f.down.Load() {
				c.Close()
				continue
			}
			inner <- c
		}
	}()
	go func() { _ = f.srv.Serve(&chanListener{c: inner, addr: ln.Addr()}) }()
	t.Cleanup(func() {
		ln.Close()
		f.wg.Wait()
		f.srv.Close()
	})
	return f
}

type chanListener struct {
	c    chan net.Conn
	addr net.Addr
}

func (l *chanListener) Accept() (net.Conn, error) {
	c, ok := <-l.c
	if !ok {
		return nil, net.ErrClosed
	}
	return c, nil
}
func (l *chanListener) Close() error   { return nil }
func (l *chanListener) Addr() net.Addr { return l.addr }

// Three connection failures in a row mark the upstream down: calls then
// fail at once with ErrDown and open no connection, but for one probe
// after the back-off; a probe that gets an answer (a 404 is an answer)
// brings it back up.
func TestClient_Breaker(t *testing.T) {
	f := newFlaky(t)
	m := metrictest.New(t)
	c, err := New(Options{Name: "flaky.test", URL: "http://" + f.ln.Addr().String(), MaxAttempts: 1, Transport: &http.Transport{DisableKeepAlives: true},
		BreakerFailures: 3, BreakerMinBackoff: 200 * time.Millisecond, BreakerMaxBackoff: time.Second, MeterProvider: m.Provider})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	get := func() error {
		resp, err := c.Manifest(ctx, http.MethodHead, "app", "v1")
		if err == nil {
			resp.Body.Close()
		}
		return err
	}
	if err := get(); !errors.Is(err, ErrNotFound) {
		t.Fatalf("up: %v", err)
	}
	f.down.Store(true)
	for i := range 3 {
		if err := get(); !errors.Is(err, ErrUnavailable) || errors.Is(err, ErrDown) {
			t.Fatalf("failure %d: %v", i, err)
		}
	}
	if st := c.State(); !st.Down || st.Failures != 3 || st.NextProbe.IsZero() {
		t.Fatalf("after 3 failures: %+v", st)
	}
	// The operator's view: down, 3 requests without an answer, 1 answered.
	m.Want("ocimirror_upstream_up", 0, "upstream=flaky.test")
	m.Want("ocimirror_upstream_requests_total", 3, "upstream=flaky.test", "method=HEAD", "code=error")
	m.Want("ocimirror_upstream_requests_total", 1, "upstream=flaky.test", "method=HEAD", "code=404")
	before := f.conns.Load()
	for range 50 {
		if err := get(); !errors.Is(err, ErrDown) || !errors.Is(err, ErrUnavailable) {
			t.Fatalf("down: %v", err)
		}
	}
	if n := f.conns.Load() - before; n != 0 {
		t.Fatalf("50 calls to a down upstream opened %d connections", n)
	}
	// The probe fails: down again, with a longer back-off.
	time.Sleep(250 * time.Millisecond)
	if err := get(); errors.Is(err, ErrDown) || !errors.Is(err, ErrUnavailable) {
		t.Fatalf("the probe: %v", err)
	}
	if n := f.conns.Load() - before; n != 1 {
		t.Fatalf("one probe opened %d connections", n)
	}
	if err := get(); !errors.Is(err, ErrDown) {
		t.Fatalf("after a failed probe: %v", err)
	}
	// Back: the next probe brings it up.
	f.down.Store(false)
	deadline := time.Now().Add(5 * time.Second)
	for c.State().Down && time.Now().Before(deadline) {
		_ = get()
		time.Sleep(20 * time.Millisecond)
	}
	if st := c.State(); st.Down || st.Failures != 0 {
		t.Fatalf("after the upstream came back: %+v", st)
	}
	if err := get(); !errors.Is(err, ErrNotFound) {
		t.Fatalf("up again: %v", err)
	}
	m.Want("ocimirror_upstream_up", 1, "upstream=flaky.test")
}

// Offline: nothing is sent, every call is ErrOffline (an ErrUnavailable).
func TestClient_Offline(t *testing.T) {
	f := newFlaky(t)
	c, err := New(Options{Name: "off.test", URL: "http://" + f.ln.Addr().String(), Offline: true})
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.Manifest(context.Background(), http.MethodGet, "app", "v1")
	if !errors.Is(err, ErrOffline) || !errors.Is(err, ErrUnavailable) {
		t.Fatalf("offline: %v", err)
	}
	if n := f.conns.Load(); n != 0 {
		t.Fatalf("an offline client opened %d connections", n)
	}
	if st := c.State(); !st.Offline {
		t.Fatalf("state: %+v", st)
	}
}

// A caller that gives up is no failure of the upstream.
func TestClient_Breaker_CancelledIsNoFailure(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0") // accepts, never answers
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := New(Options{Name: "hole.test", URL: "http://" + ln.Addr().String(), MaxAttempts: 1, BreakerFailures: 1})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	go func() { time.Sleep(50 * time.Millisecond); cancel() }()
	if _, err := c.Manifest(ctx, http.MethodGet, "app", "v1"); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled: %v", err)
	}
	if st := c.State(); st.Down || st.Failures != 0 {
		t.Fatalf("a cancelled call counted: %+v", st)
	}
	tctx, tcancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer tcancel()
	if _, err := c.Manifest(tctx, http.MethodGet, "app", "v1"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("timed out: %v", err)
	}
	if st := c.State(); !st.Down {
		t.Fatalf("a timeout did not count: %+v", st)
	}
}
