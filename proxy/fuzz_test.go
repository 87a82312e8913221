package proxy

// Fuzz targets for what a client controls before anything is stored or
// fetched: repository names, tags, digests, references, Range headers and
// the routing of a name (and ?ns=) to a source.
//
//   - FuzzValidName: validName agrees with the distribution spec's name
//     regular expression and its 255-byte bound.
//   - FuzzValidTag: validTag agrees with the spec's tag regular expression.
//   - FuzzParseDigest: parseDigest accepts exactly sha256 with 64 and sha512
//     with 128 lower-case hex digits, returns the input unchanged, and
//     otherwise answers DIGEST_INVALID.
//   - FuzzParseReference: a reference with ':' is a digest, any other a tag,
//     with the outcome and error code of parseDigest or validTag.
//   - FuzzBlobRange: spans stay inside the blob, 200 means the whole blob,
//     an unsatisfiable range is RANGE_INVALID with "bytes */<size>", and
//     well-formed single ranges get RFC 9110's answer.
//   - FuzzResolve: routing answers NAME_INVALID or NAME_UNKNOWN, or a source
//     and a valid name consistent with ?ns=, the host prefix and the hosted
//     prefixes; for ASCII input, exactly what the routing rules written out
//     in the test say (host names compared case-insensitively); it never
//     calls an upstream.
//
// Run one with: go test -run '^$' -fuzz '^FuzzResolve$' -fuzztime 45s ./proxy/

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/upstream"
)

// The distribution spec's grammar, as oracles.
var (
	nameRE   = regexp.MustCompile(`^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*$`)
	tagRE    = regexp.MustCompile(`^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$`)
	digestRE = regexp.MustCompile(`^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$`)
)

const (
	hex64  = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	hex128 = hex64 + hex64
)

// wantCode fails unless err is an *Error with one of the codes.
func wantCode(t *testing.T, what string, err error, codes ...Code) *Error {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("%s: error %T %v is not an *Error", what, err, err)
	}
	for _, c := range codes {
		if e.Code == c {
			return e
		}
	}
	t.Fatalf("%s: code %s, want one of %v", what, e.Code, codes)
	return nil
}

func FuzzValidName(f *testing.F) {
	for _, s := range []string{
		"a", "library/alpine", "a/b/c/d", "my-app", "my--app", "my_app", "my__app",
		"my.app", "a0.b1-c2_d3", strings.Repeat("a", 255), strings.Repeat("a", 256),
		strings.Repeat("a/", 127) + "a", strings.Repeat("a/", 128),
		"", "A", "my___app", "my..app", "my.-app", "-app", "app-", "app/", "/app",
		"a//b", "a/../b", "ghcr.io:443/app", "a b", "a_-b", "a-_b", "a.b.c", "a\x00b", "ａ",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		got := validName(name)
		want := len(name) <= maxNameLength && nameRE.MatchString(name)
		if got != want {
			t.Fatalf("validName(%q) = %v, the spec's expression says %v", name, got, want)
		}
	})
}

func FuzzValidTag(f *testing.F) {
	for _, s := range []string{
		"latest", "v1.2.3-rc.1_b", "_x", "sha256-" + hex64, strings.Repeat("a", 128),
		strings.Repeat("a", 129), "", ".x", "-x", "a:b", "a/b", "a+b", "é", "a\n",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, tag string) {
		if got, want := validTag(tag), tagRE.MatchString(tag); got != want {
			t.Fatalf("validTag(%q) = %v, the spec's expression says %v", tag, got, want)
		}
	})
}

func FuzzParseDigest(f *testing.F) {
	for _, s := range []string{
		"sha256:" + hex64, "sha512:" + hex128, "sha384:" + hex128[:96],
		"sha256:" + strings.ToUpper(hex64), "sha256:" + hex64[:63], "sha256:" + hex64 + "0",
		"sha512:" + hex64, "sha256:", ":" + hex64, hex64, "md5:d41d8cd98f00b204e9800998ecf8427e",
		"sha256:" + hex64[:63] + "g", "SHA256:" + hex64, "sha256:" + hex64[:62] + "é",
		"sha256+b64u:LCa0a2j_xo_5m0U8HTBBNBNCLXBkg7-g-YpeiGJm564", "sha256::" + hex64[:63],
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		d, err := parseDigest(s)
		want := digestRE.MatchString(s)
		if (err == nil) != want {
			t.Fatalf("parseDigest(%q): error %v, want ok=%v", s, err, want)
		}
		if err != nil {
			if d != "" {
				t.Fatalf("parseDigest(%q) failed but returned %q", s, d)
			}
			wantCode(t, "parseDigest", err, CodeDigestInvalid)
			return
		}
		if string(d) != s {
			t.Fatalf("parseDigest(%q) = %q", s, d)
		}
		if verr := d.Validate(); verr != nil {
			t.Fatalf("parseDigest(%q) accepted what go-digest refuses: %v", s, verr)
		}
	})
}

func FuzzParseReference(f *testing.F) {
	for _, s := range []string{
		"latest", "v1.0", "_x", "sha256:" + hex64, "sha512:" + hex128, "sha256:" + hex64[:10],
		"sha256-" + hex64, "", ":", "a:b", "-x", ".x", strings.Repeat("t", 129), "lat est",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, ref string) {
		var q request
		err := q.parseReference(ref)
		if q.ref != ref {
			t.Fatalf("parseReference(%q) set ref %q", ref, q.ref)
		}
		if strings.Contains(ref, ":") {
			want, werr := parseDigest(ref)
			if (err == nil) != (werr == nil) || q.dgst != want {
				t.Fatalf("parseReference(%q) = %q, %v; parseDigest says %q, %v", ref, q.dgst, err, want, werr)
			}
			if err != nil {
				wantCode(t, "digest reference", err, CodeDigestInvalid)
			}
			return
		}
		if q.dgst != "" {
			t.Fatalf("parseReference(%q): a tag set digest %q", ref, q.dgst)
		}
		if (err == nil) != validTag(ref) {
			t.Fatalf("parseReference(%q): error %v, validTag %v", ref, err, validTag(ref))
		}
		if err != nil {
			wantCode(t, "tag reference", err, CodeManifestInvalid)
		}
	})
}

// nonNegative maps any int64 onto [0, MaxInt64], keeping small values small.
func nonNegative(v int64) int64 {
	if v < 0 {
		return -(v + 1)
	}
	return v
}

func FuzzBlobRange(f *testing.F) {
	type seed struct {
		header string
		size   int64
		a, b   int64
	}
	for _, s := range []seed{
		{"", 100, 0, 0},
		{"bytes=0-0", 100, 0, 0},
		{"bytes=0-99", 100, 0, 99},
		{"bytes=10-", 100, 10, -1},
		{"bytes=99-", 100, 99, 200},
		{"bytes=50-1000", 100, 50, 1000},
		{"bytes=-10", 100, 10, 5},
		{"bytes=-1000", 100, 1000, 0},
		{"bytes=100-", 100, 100, 100},
		{"bytes=100-200", 100, 100, 200},
		{"bytes=-0", 100, 0, 0},
		{"bytes=0-", 0, 0, 0},
		{"bytes=-5", 0, 5, 0},
		{"bytes=5-2", 100, 5, 2},
		{"bytes=0-1,4-5", 100, 0, 1},
		{"bytes=x-", 100, 0, 0},
		{"lines=1-2", 100, 1, 2},
		{"bytes= 1-2 ", 100, 1, 2},
		{"bytes=-", 100, 0, 0},
		{"bytes=9223372036854775807-", 1 << 40, 1<<63 - 1, 1<<63 - 1},
		{"bytes=0-9223372036854775807", 1 << 40, 0, 1<<63 - 1},
		{"bytes=-9223372036854775807", 7, 1<<63 - 1, 0},
		{"bytes=99999999999999999999-", 10, 0, 0},
		{"bytes=--1", 10, 0, 0},
		{"bytes=1--1", 10, 0, 0},
		{"Bytes=0-1", 10, 0, 1},
	} {
		f.Add(s.header, s.size, s.a, s.b)
	}
	f.Fuzz(func(t *testing.T, header string, size, a, b int64) {
		size = nonNegative(size) % (1<<40 + 1)
		check := func(header string) (int64, int64, int, error) {
			start, end, status, err := blobRange(header, size)
			if err != nil {
				e := wantCode(t, fmt.Sprintf("blobRange(%q, %d)", header, size), err, CodeRangeInvalid)
				if e.status() != http.StatusRequestedRangeNotSatisfiable {
					t.Fatalf("blobRange(%q, %d): status %d", header, size, e.status())
				}
				if got, want := e.Header.Get("Content-Range"), "bytes */"+strconv.FormatInt(size, 10); got != want {
					t.Fatalf("blobRange(%q, %d): Content-Range %q, want %q", header, size, got, want)
				}
				return start, end, status, err
			}
			switch status {
			case http.StatusOK:
				if start != 0 || end != size {
					t.Fatalf("blobRange(%q, %d): 200 with %d-%d", header, size, start, end)
				}
			case http.StatusPartialContent:
				if !(0 <= start && start < end && end <= size) {
					t.Fatalf("blobRange(%q, %d): 206 with %d-%d", header, size, start, end)
				}
			default:
				t.Fatalf("blobRange(%q, %d): status %d", header, size, status)
			}
			if !strings.HasPrefix(header, "bytes=") || strings.Contains(header, ",") {
				if status != http.StatusOK {
					t.Fatalf("blobRange(%q, %d): %d for a header it should ignore", header, size, status)
				}
			}
			return start, end, status, err
		}
		check(header)

		// Well-formed single ranges built from a and b: RFC 9110 section 14.
		a, b = nonNegative(a), nonNegative(b)
		expect := func(header string, wantStart, wantEnd int64, wantStatus int, unsatisfiable bool) {
			start, end, status, err := check(header)
			if unsatisfiable {
				if err == nil {
					t.Fatalf("blobRange(%q, %d) = %d-%d %d, want 416", header, size, start, end, status)
				}
				return
			}
			if err != nil || start != wantStart || end != wantEnd || status != wantStatus {
				t.Fatalf("blobRange(%q, %d) = %d-%d %d %v, want %d-%d %d", header, size, start, end, status, err, wantStart, wantEnd, wantStatus)
			}
		}
		switch {
		case b < a: // an invalid range-spec: ignored
			expect(fmt.Sprintf("bytes=%d-%d", a, b), 0, size, http.StatusOK, false)
		case a >= size:
			expect(fmt.Sprintf("bytes=%d-%d", a, b), 0, 0, 0, true)
		default:
			expect(fmt.Sprintf("bytes=%d-%d", a, b), a, min(b, size-1)+1, http.StatusPartialContent, false)
		}
		if a >= size {
			expect(fmt.Sprintf("bytes=%d-", a), 0, 0, 0, true)
		} else {
			expect(fmt.Sprintf("bytes=%d-", a), a, size, http.StatusPartialContent, false)
		}
		if a == 0 || size == 0 {
			expect(fmt.Sprintf("bytes=-%d", a), 0, 0, 0, true)
		} else {
			expect(fmt.Sprintf("bytes=-%d", a), max(size-a, 0), size, http.StatusPartialContent, false)
		}
	})
}

// noNetwork fails every request, and counts them: routing must not call
// an upstream.
type noNetwork struct{ calls atomic.Int64 }

func (n *noNetwork) RoundTrip(r *http.Request) (*http.Response, error) {
	n.calls.Add(1)
	return nil, fmt.Errorf("fuzz: no network (%s %s)", r.Method, r.URL)
}

// fuzzServer is a Server on a Badger store in a temporary directory, with
// upstreams that cannot reach the network. Handlers are never called.
func fuzzServer(f *testing.F, rt http.RoundTripper, defaultUpstream string, hosted []string) *Server {
	f.Helper()
	b, err := cache.OpenBadger(cache.BadgerOptions{Path: f.TempDir()})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() {
		if err := b.Close(); err != nil {
			f.Errorf("close store: %v", err)
		}
	})
	var ups []Upstream
	for _, name := range []string{"docker.io", "ghcr.io", "Quay.IO", "localhost:5000", "127.0.0.1:5002", "[::1]:5003"} {
		c, err := upstream.New(upstream.Options{Name: name, URL: "http://127.0.0.1:1", Transport: rt, MaxAttempts: 1, RetryBackoff: time.Millisecond})
		if err != nil {
			f.Fatal(err)
		}
		ups = append(ups, Upstream{Client: c})
	}
	s, err := New(Options{Store: cache.NewLRU(b, cache.LRUOptions{ManifestBytes: 1 << 20, MetadataBytes: 1 << 20}),
		Upstreams: ups, DefaultUpstream: defaultUpstream, Hosted: hosted, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			f.Errorf("shutdown: %v", err)
		}
	})
	return s
}

func FuzzResolve(f *testing.F) {
	for _, s := range []struct {
		ns, name  string
		noDefault bool
	}{
		{"", "alpine", false},
		{"", "library/alpine", false},
		{"", "docker.io/alpine", false},
		{"", "docker.io/library/alpine", false},
		{"", "Docker.IO/alpine", false},
		{"", "ghcr.io/owner/app", false},
		{"", "quay.io/org/app", false},
		{"", "localhost:5000/app", false},
		{"", "LOCALHOST:5000/app", false},
		{"", "127.0.0.1:5002/a/b", false},
		{"", "[::1]:5003/app", false},
		{"", "index.docker.io/alpine", false},
		{"", "ci/app", false},
		{"", "ci/", false},
		{"", "cinema/app", false},
		{"", "local/team/app", false},
		{"", "ghcr.io/", false},
		{"", "ghcr.io//app", false},
		{"", "Alpine", false},
		{"", "", false},
		{"", "alpine", true},
		{"", "ghcr.io/owner/app", true},
		{"docker.io", "alpine", false},
		{"docker.io", "ci/app", false},
		{"registry-1.docker.io", "alpine", true},
		{"INDEX.docker.io", "library/alpine", false},
		{"ghcr.io", "owner/app", true},
		{"GHCR.io", "ghcr.io/owner/app", false},
		{"quay.io", "org/app", false},
		{"example.com", "app", false},
		{"ghcr.io", "Owner/App", false},
		{"ghcr.io", "", false},
		{"localhost:5000", "app", false},
	} {
		f.Add(s.ns, s.name, s.noDefault)
	}
	rt := &noNetwork{}
	withDefault := fuzzServer(f, rt, "docker.io", []string{"ci/", "local/team"})
	without := fuzzServer(f, rt, "", nil)
	f.Fuzz(func(t *testing.T, ns, rawName string, noDefault bool) {
		s := withDefault
		if noDefault {
			s = without
		}
		r := &http.Request{Method: http.MethodGet, URL: &url.URL{Path: "/v2/x/tags/list", RawQuery: url.Values{"ns": {ns}}.Encode()}}
		var q request
		err := s.resolve(r, &q, rawName)
		if n := rt.calls.Load(); n != 0 {
			t.Fatalf("routing made %d upstream calls", n)
		}
		if q.ns != ns {
			t.Fatalf("ns %q, want %q", q.ns, ns)
		}
		// Exactly as routing is written out for ASCII input.
		if isASCII(ns) && isASCII(rawName) {
			src, prefix, name, code := expectRoute(s, ns, rawName)
			var e *Error
			switch {
			case code != "" && (!errors.As(err, &e) || e.Code != code):
				t.Fatalf("resolve(ns=%q, %q) = %v, want %s", ns, rawName, err, code)
			case code == "" && (err != nil || q.src != src || q.prefix != prefix || q.name != name):
				t.Fatalf("resolve(ns=%q, %q) = %s %q %q (%v), want %s %q %q", ns, rawName, logName(q.src), q.prefix, q.name, err, logName(src), prefix, name)
			}
		}
		var nsUp *upstreamState
		if ns != "" {
			nsUp = s.upstreamByHost(ns)
			if nsUp != nil && !strings.EqualFold(ns, nsUp.name) && !(nsUp.dockerHub && isDockerHubAlias(ns)) {
				t.Fatalf("upstreamByHost(%q) = %s", ns, nsUp.name)
			}
		}
		if err != nil {
			e := wantCode(t, fmt.Sprintf("resolve(ns=%q, %q)", ns, rawName), err, CodeNameInvalid, CodeNameUnknown)
			switch e.Code {
			case CodeNameInvalid:
				if validName(rawName) {
					t.Fatalf("resolve(ns=%q, %q): NAME_INVALID for a valid name", ns, rawName)
				}
			case CodeNameUnknown:
				// Unknown ns, or no default for a name without a prefix.
				if !(ns != "" && nsUp == nil) && !(ns == "" && s.defaultUpstream == nil) {
					t.Fatalf("resolve(ns=%q, %q): NAME_UNKNOWN with a source to use", ns, rawName)
				}
			}
			return
		}
		if q.src == nil {
			t.Fatalf("resolve(ns=%q, %q): no source", ns, rawName)
		}
		if !validName(q.name) || !nameRE.MatchString(q.name) || !validName(q.repo) {
			t.Fatalf("resolve(ns=%q, %q): name %q repo %q", ns, rawName, q.name, q.repo)
		}
		if q.name != rawName && q.prefix+"/"+q.name != rawName {
			t.Fatalf("resolve(ns=%q, %q): name %q prefix %q", ns, rawName, q.name, q.prefix)
		}
		hosted := q.src == source(s.hosted)
		switch {
		case ns != "":
			if q.up != nsUp || q.prefix != "" || q.name != rawName {
				t.Fatalf("resolve(ns=%q, %q): up %v prefix %q, want %s", ns, rawName, q.up, q.prefix, nsUp.name)
			}
		case hosted:
			if !s.isHosted(rawName) || q.up != nil || q.prefix != "" || q.repo != q.name {
				t.Fatalf("resolve(%q): hosted with up %v prefix %q repo %q", rawName, q.up, q.prefix, q.repo)
			}
		case q.prefix != "":
			if q.up == nil || !strings.EqualFold(q.prefix, q.up.name) || s.isHosted(rawName) {
				t.Fatalf("resolve(%q): prefix %q for upstream %v", rawName, q.prefix, q.up)
			}
		default:
			if q.up != s.defaultUpstream || s.isHosted(rawName) {
				t.Fatalf("resolve(%q): upstream %v, want the default", rawName, q.up)
			}
			if host, _, ok := strings.Cut(rawName, "/"); ok {
				if u := s.upstreamByHost(host); u != nil && strings.EqualFold(host, u.name) {
					t.Fatalf("resolve(%q): host prefix %q not taken", rawName, host)
				}
			}
		}
		if !hosted && q.up == nil {
			t.Fatalf("resolve(ns=%q, %q): a source that is neither hosted nor an upstream", ns, rawName)
		}
		wantRepo := q.name
		if q.up != nil && q.up.dockerHub && !strings.Contains(q.name, "/") {
			wantRepo = "library/" + q.name
		}
		if q.repo != wantRepo {
			t.Fatalf("resolve(ns=%q, %q): repo %q, want %q", ns, rawName, q.repo, wantRepo)
		}
	})
}

// expectRoute is resolve's routing written out for ASCII input, host
// names compared after lower-casing A-Z: the source, host prefix and name
// of the request, or the error code.
func expectRoute(s *Server, ns, rawName string) (src source, prefix, name string, code Code) {
	name = rawName
	switch {
	case ns != "":
		u := s.upstreams[asciiLower(ns)]
		if u == nil && isDockerHubAlias(ns) {
			u = s.upstreams["docker.io"]
		}
		if u == nil {
			return nil, "", "", CodeNameUnknown
		}
		src = u
	case slices.ContainsFunc(s.hostedPrefixes, func(p string) bool { return strings.HasPrefix(rawName, p) }):
		src = s.hosted
	default:
		var up *upstreamState
		if host, rest, ok := strings.Cut(rawName, "/"); ok {
			if u := s.upstreams[asciiLower(host)]; u != nil {
				up, prefix, name = u, host, rest
			}
		}
		if up == nil {
			up = s.defaultUpstream
		}
		if up == nil {
			return nil, "", "", CodeNameUnknown
		}
		src = up
	}
	if len(name) > 255 || !nameRE.MatchString(name) {
		return nil, "", "", CodeNameInvalid
	}
	return src, prefix, name, ""
}

func asciiLower(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c >= 'A' && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
	return string(b)
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}

func logName(src source) string {
	if src == nil {
		return "<nil>"
	}
	return src.logName()
}

func isDockerHubAlias(h string) bool {
	switch strings.ToLower(h) {
	case "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com":
		return true
	}
	return false
}
