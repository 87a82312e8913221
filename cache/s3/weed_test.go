package s3

import (
	"context"
	"testing"
	"time"

	"github.com/ocimirror/ocimirror/internal/weedtest"
)

// startWeed runs a real SeaweedFS with a bucket (internal/weedtest).
func startWeed(t *testing.T) *weedtest.Weed { return weedtest.Start(t) }

// newWeedStore returns a Store on w's bucket, anonymous and path-style
// over plain HTTP, as weed serves it by default.
func newWeedStore(t *testing.T, w *weedtest.Weed) *Store {
	t.Helper()
	s, err := New(Config{Endpoint: w.S3, Bucket: w.Bucket, Region: "us-east-1", PathStyle: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	return s
}
