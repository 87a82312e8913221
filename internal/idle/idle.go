// Package idle cuts a response body that stalls.
package idle

import (
	"context"
	"io"
	"time"
)

// body cancels its request when no byte arrives for the idle timeout, so
// a peer or upstream that stalls without closing cannot hold a fill
// forever.
type body struct {
	io.ReadCloser
	timer  *time.Timer
	idle   time.Duration
	cancel context.CancelFunc
}

// Body wraps rc, the body of a request that cancel ends: cancel runs when
// no byte arrives for idle, and on Close.
func Body(rc io.ReadCloser, idle time.Duration, cancel context.CancelFunc) io.ReadCloser {
	return &body{ReadCloser: rc, timer: time.AfterFunc(idle, cancel), idle: idle, cancel: cancel}
}

func (b *body) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if n > 0 {
		b.timer.Reset(b.idle)
	}
	return n, err
}

func (b *body) Close() error {
	b.timer.Stop()
	err := b.ReadCloser.Close()
	b.cancel()
	return err
}
