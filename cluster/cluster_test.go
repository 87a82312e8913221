package cluster

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"testing"

	"github.com/opencontainers/go-digest"
)

func digests(n int) []digest.Digest {
	out := make([]digest.Digest, n)
	for i := range out {
		out[i] = digest.FromString(fmt.Sprint(i))
	}
	return out
}

func members(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("http://10.0.0.%d:5000", i+1)
	}
	return out
}

// Every member owns about 1/N of the digests, and a member leaving or
// joining moves only the digests it owned or comes to own.
func TestRank_SpreadAndMovement(t *testing.T) {
	ds := digests(30000)
	for _, n := range []int{2, 3, 5, 8} {
		ms := members(n)
		owned := map[string]int{}
		for _, d := range ds {
			owned[Rank(ms, d)[0]]++
		}
		for _, m := range ms {
			share := float64(owned[m]) / float64(len(ds))
			if want := 1 / float64(n); share < want*0.9 || share > want*1.1 {
				t.Errorf("%d members: %s owns %.3f of the digests, want about %.3f", n, m, share, want)
			}
		}
		// One more member: only digests it now owns move, about 1/(n+1).
		grown := append(slices.Clone(ms), fmt.Sprintf("http://10.0.1.1:5000"))
		moved := 0
		for _, d := range ds {
			before, after := Rank(ms, d)[0], Rank(grown, d)[0]
			if before != after {
				moved++
				if after != grown[n] {
					t.Fatalf("%d -> %d members: %s moved from %s to %s, not to the new member", n, n+1, d, before, after)
				}
			}
		}
		if share, want := float64(moved)/float64(len(ds)), 1/float64(n+1); share < want*0.9 || share > want*1.1 {
			t.Errorf("%d -> %d members: %.3f of the digests moved, want about %.3f", n, n+1, share, want)
		}
		// One member gone: only its digests move, each to the member that
		// ranked second for it.
		gone := ms[0]
		for _, d := range ds {
			r := Rank(ms, d)
			after := Rank(ms[1:], d)[0]
			if r[0] != gone && after != r[0] {
				t.Fatalf("%d members, %s gone: %s moved from %s to %s", n, gone, d, r[0], after)
			}
			if r[0] == gone && after != r[1] {
				t.Fatalf("%d members, %s gone: %s went to %s, not to the second ranked %s", n, gone, d, after, r[1])
			}
		}
	}
}

// The order of the member list does not change the owner.
func TestRank_OrderIndependent(t *testing.T) {
	ms := members(5)
	rev := slices.Clone(ms)
	slices.Reverse(rev)
	for _, d := range digests(1000) {
		if a, b := Rank(ms, d), Rank(rev, d); !slices.Equal(a, b) {
			t.Fatalf("%s: %v vs %v", d, a, b)
		}
	}
}

func TestNew_Validation(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name string
		o    Options
		ok   bool
	}{
		{"static", Options{Self: "http://127.0.0.1:5000", Peers: []string{"http://127.0.0.1:5000", "http://127.0.0.1:5001/"}, Secret: "s"}, true},
		{"no secret", Options{Self: "http://127.0.0.1:5000"}, false},
		{"self with a path", Options{Self: "http://127.0.0.1:5000/v2", Secret: "s"}, false},
		{"peer with user", Options{Self: "http://a:1", Peers: []string{"http://u:p@b:1"}, Secret: "s"}, false},
		{"dns without port", Options{Self: "http://a:1", Peers: []string{"dns+http://peers"}, Secret: "s"}, false},
		{"ftp", Options{Self: "ftp://a:1", Secret: "s"}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := New(ctx, tt.o)
			if (err == nil) != tt.ok {
				t.Fatalf("New: %v, want ok=%v", err, tt.ok)
			}
			if c != nil {
				c.Close()
			}
		})
	}
}

// Members are self and the peers, written one way; DNS peers are every
// address of the name.
func TestMembers(t *testing.T) {
	c, err := New(context.Background(), Options{Self: "http://127.0.0.1:5002", Secret: "s",
		Peers: []string{"http://127.0.0.1:5000", "HTTP://127.0.0.1:5001/", "dns+http://localhost:5003"}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got := c.Members()
	for _, want := range []string{"http://127.0.0.1:5000", "http://127.0.0.1:5001", "http://127.0.0.1:5002", "http://127.0.0.1:5003"} {
		if !slices.Contains(got, want) {
			t.Errorf("members %v lack %s", got, want)
		}
	}
	for _, d := range digests(50) {
		before := c.Before(d)
		if slices.Contains(before, c.Self()) {
			t.Fatalf("Before(%s) = %v holds self", d, before)
		}
		if r := c.Rank(d); !slices.Equal(before, r[:len(before)]) || r[len(before)] != c.Self() {
			t.Fatalf("Before(%s) = %v is not the rank %v up to self", d, before, r)
		}
	}
}

// A call carries the secret and the caller; the secret is checked.
func TestPeer_Secret(t *testing.T) {
	c, err := New(context.Background(), Options{Self: "http://127.0.0.1:5002", Secret: "right-secret"})
	if err != nil {
		t.Fatal(err)
	}
	var seen *http.Request
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { seen = r }))
	defer srv.Close()
	resp, err := c.Get(context.Background(), srv.URL, "/v2/x/blobs/sha256:00", 10)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	owner, err := New(context.Background(), Options{Self: "http://127.0.0.1:5003", Secret: "right-secret"})
	if err != nil {
		t.Fatal(err)
	}
	if from, ok, err := owner.Peer(seen); !ok || err != nil || from != "http://127.0.0.1:5002" {
		t.Errorf("Peer = %q, %v, %v", from, ok, err)
	}
	if seen.Header.Get("Range") != "bytes=10-" {
		t.Errorf("Range = %q", seen.Header.Get("Range"))
	}
	r := httptest.NewRequest(http.MethodGet, "/", nil)
	if _, ok, err := c.Peer(r); ok || err != nil {
		t.Errorf("a client's request: %v, %v", ok, err)
	}
	r.Header.Set(HeaderSecret, "wrong")
	if _, ok, err := c.Peer(r); ok || err != ErrSecret {
		t.Errorf("a wrong secret: %v, %v", ok, err)
	}
}

// A replica that reaches itself under another name is told so.
func TestPeer_Self(t *testing.T) {
	c, err := New(context.Background(), Options{Self: "http://127.0.0.1:5002", Secret: "s"})
	if err != nil {
		t.Fatal(err)
	}
	var seen *http.Request
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { seen = r }))
	defer srv.Close()
	resp, err := c.Get(context.Background(), srv.URL, "/", 0)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if _, _, err := c.Peer(seen); err != ErrSelf {
		t.Errorf("own call: %v, want ErrSelf", err)
	}
	other, err := New(context.Background(), Options{Self: "http://127.0.0.1:5002", Secret: "s"})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok, err := other.Peer(seen); !ok || err != nil {
		t.Errorf("another process with the same URL: %v, %v", ok, err)
	}
}
