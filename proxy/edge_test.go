package proxy_test

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ocimirror/ocimirror/proxy"
)

// goBadRequest is, byte for byte, what net/http writes itself for a
// malformed request: a response body may carry exactly these bytes and must
// pass untouched.
const goBadRequest = "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n400 Bad Request"

// edgeHandler answers like a registry handler: /small a short body, /flushed
// net/http's own rejection as a body after a flush, /large several MiB in
// many writes whose last write is that rejection again.
func edgeHandler(t *testing.T) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set(proxy.HeaderAPIVersion, "registry/2.0")
		switch r.URL.Path {
		case "/small":
			w.Header().Set("Content-Type", "application/json")
			_, _ = io.WriteString(w, `{"ok":true}`)
		case "/flushed":
			w.Header().Set("Content-Length", strconv.Itoa(len(goBadRequest)))
			w.WriteHeader(http.StatusOK)
			w.(http.Flusher).Flush()
			_, _ = io.WriteString(w, goBadRequest)
		case "/large":
			body := largeBody()
			w.Header().Set("Content-Length", strconv.Itoa(len(body)))
			for len(body) > len(goBadRequest) {
				n := min(len(body)-len(goBadRequest), 32<<10)
				if _, err := w.Write(body[:n]); err != nil {
					t.Errorf("write: %v", err)
					return
				}
				body = body[n:]
			}
			_, _ = w.Write(body)
		default:
			http.NotFound(w, r)
		}
	})
}

// largeBody is 6 MiB of varied bytes ending with net/http's rejection.
func largeBody() []byte {
	b := make([]byte, 6<<20)
	for i := range b {
		b[i] = byte(i*7 + i>>9)
	}
	return append(b, goBadRequest...)
}

// edgeServers starts the handler twice on 127.0.0.1: behind OCIErrorListener
// and as net/http alone.
func edgeServers(t *testing.T) (wrapped, plain *httptest.Server) {
	t.Helper()
	wrapped = httptest.NewUnstartedServer(edgeHandler(t))
	wrapped.Listener = proxy.OCIErrorListener(wrapped.Listener)
	wrapped.Start()
	t.Cleanup(wrapped.Close)
	plain = httptest.NewServer(edgeHandler(t))
	t.Cleanup(plain.Close)
	return wrapped, plain
}

// dial opens a connection to ts that the test closes.
func dial(t *testing.T, ts *httptest.Server) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", ts.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.SetDeadline(time.Now().Add(30 * time.Second)); err != nil {
		t.Fatal(err)
	}
	return c
}

// send writes req in the background: a server that rejects a request may
// answer before it has read all of it.
func send(t *testing.T, c net.Conn, req string) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _ = io.WriteString(c, req)
	}()
	t.Cleanup(func() {
		c.Close()
		<-done
	})
}

// readAnswer reads one response from c with its whole body.
func readAnswer(t *testing.T, br *bufio.Reader) (*http.Response, []byte) {
	t.Helper()
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("reading the answer: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading the body: %v", err)
	}
	return resp, body
}

// checkOCIAnswer asserts an OCI error answer: status, headers, the length
// announced and the JSON body's code and message.
func checkOCIAnswer(t *testing.T, resp *http.Response, body []byte, status int, message string) {
	t.Helper()
	if resp.StatusCode != status {
		t.Errorf("status %d, want %d; body %q", resp.StatusCode, status, body)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type %q, want application/json", ct)
	}
	if cl := resp.Header.Get("Content-Length"); cl != strconv.Itoa(len(body)) {
		t.Errorf("Content-Length %q for a body of %d bytes", cl, len(body))
	}
	if v := resp.Header.Get(proxy.HeaderAPIVersion); v != "registry/2.0" {
		t.Errorf("%s %q", proxy.HeaderAPIVersion, v)
	}
	if !resp.Close {
		t.Error("answer does not close the connection")
	}
	var b struct {
		Errors []struct {
			Code    proxy.Code `json:"code"`
			Message string     `json:"message"`
		} `json:"errors"`
	}
	if err := json.Unmarshal(body, &b); err != nil || len(b.Errors) != 1 {
		t.Fatalf("not an OCI error body: %q", body)
	}
	if b.Errors[0].Code != proxy.CodeUnsupported || b.Errors[0].Message != message {
		t.Errorf("error %s %q, want %s %q", b.Errors[0].Code, b.Errors[0].Message, proxy.CodeUnsupported, message)
	}
}

func TestOCIErrorListener_Rejections(t *testing.T) {
	bigHeaders := "GET /small HTTP/1.1\r\nHost: a\r\n" +
		strings.Repeat("X-Filler: "+strings.Repeat("a", 1014)+"\r\n", 1100) + "\r\n"
	tests := []struct {
		name    string
		req     string
		status  int
		message string
	}{
		{"NULInRequestLine", "GET /sm\x00all HTTP/1.1\r\nHost: a\r\n\r\n", 400, "malformed HTTP request"},
		{"HeaderLineWithoutColon", "GET /small HTTP/1.1\r\nHost: a\r\nNoColonHere\r\n\r\n", 400, "malformed HTTP request"},
		{"BadContentLength", "POST /small HTTP/1.1\r\nHost: a\r\nContent-Length: 12x\r\n\r\n", 400, "malformed HTTP request"},
		{"MissingHost", "GET /small HTTP/1.1\r\n\r\n", 400, "malformed HTTP request: missing required Host header"},
		{"MalformedHost", "GET /small HTTP/1.1\r\nHost: a<b\r\n\r\n", 400, "malformed HTTP request: malformed Host header"},
		{"HeadersOverMaxHeaderBytes", bigHeaders, 431, "request header fields too large"},
		{"GzipChunked", "POST /small HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501, "unsupported transfer encoding"},
		{"UnknownTransferEncoding", "POST /small HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: foo\r\n\r\n", 501, "unsupported transfer encoding"},
		{"HTTPVersion3", "GET /small HTTP/3.0\r\nHost: a\r\n\r\n", 505, "http version not supported: unsupported protocol version"},
	}
	wrapped, plain := edgeServers(t)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// net/http alone rejects it in plain text: the case is one of its own.
			c := dial(t, plain)
			send(t, c, tt.req)
			resp, body := readAnswer(t, bufio.NewReader(c))
			if resp.StatusCode != tt.status || resp.Header.Get("Content-Type") != "text/plain; charset=utf-8" {
				t.Fatalf("net/http alone answered %d %q %q, want %d in plain text", resp.StatusCode, resp.Header.Get("Content-Type"), body, tt.status)
			}

			c = dial(t, wrapped)
			send(t, c, tt.req)
			resp, body = readAnswer(t, bufio.NewReader(c))
			checkOCIAnswer(t, resp, body, tt.status, tt.message)
		})
	}
}

// TestOCIErrorListener_ResponsesUntouched compares every byte a handler's
// response puts on the wire, with and without the listener, the Date header
// aside. /flushed and /large end with a body write that is, byte for byte,
// net/http's own rejection.
func TestOCIErrorListener_ResponsesUntouched(t *testing.T) {
	wrapped, plain := edgeServers(t)
	raw := func(t *testing.T, ts *httptest.Server, path string) []byte {
		c := dial(t, ts)
		if _, err := io.WriteString(c, "GET "+path+" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(c)
		if err != nil {
			t.Fatal(err)
		}
		head, body, ok := bytes.Cut(b, []byte("\r\n\r\n"))
		if !ok {
			t.Fatalf("no header end in %q", b)
		}
		var lines [][]byte
		for l := range bytes.SplitSeq(head, []byte("\r\n")) {
			if !bytes.HasPrefix(l, []byte("Date: ")) {
				lines = append(lines, l)
			}
		}
		return append(append(bytes.Join(lines, []byte("\r\n")), "\r\n\r\n"...), body...)
	}
	for _, tt := range []struct {
		name, path string
		body       []byte
	}{
		{"Small", "/small", []byte(`{"ok":true}`)},
		{"FlushedBodyLikeARejection", "/flushed", []byte(goBadRequest)},
		{"LargeBodyEndingLikeARejection", "/large", largeBody()},
		{"NotFound", "/nothing", []byte("404 page not found\n")},
	} {
		t.Run(tt.name, func(t *testing.T) {
			want := raw(t, plain, tt.path)
			if !bytes.HasSuffix(want, tt.body) {
				t.Fatalf("net/http alone sent %d bytes not ending with the body", len(want))
			}
			got := raw(t, wrapped, tt.path)
			if !bytes.Equal(got, want) {
				i := 0
				for i < min(len(got), len(want)) && got[i] == want[i] {
					i++
				}
				t.Fatalf("%d bytes through the listener, %d without; first difference at %d: %q",
					len(got), len(want), i, got[i:min(len(got), i+200)])
			}
		})
	}
}

// A connection that served requests, then sends a malformed one, gets its
// responses untouched and then the OCI answer.
func TestOCIErrorListener_KeepAliveThenRejection(t *testing.T) {
	wrapped, _ := edgeServers(t)
	c := dial(t, wrapped)
	br := bufio.NewReader(c)
	for _, path := range []string{"/small", "/flushed"} {
		if _, err := io.WriteString(c, "GET "+path+" HTTP/1.1\r\nHost: a\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		resp, _ := readAnswer(t, br)
		if resp.StatusCode != http.StatusOK || resp.Close {
			t.Fatalf("%s: %d, close %v", path, resp.StatusCode, resp.Close)
		}
	}
	if _, err := io.WriteString(c, "GET /small HTTP/1.1\r\nHost: a\r\nNoColonHere\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	resp, body := readAnswer(t, br)
	checkOCIAnswer(t, resp, body, http.StatusBadRequest, "malformed HTTP request")
}

// Under TLS the listener sits below TLS: HTTP/2 and r.TLS still work, plain
// HTTP sent to the TLS port gets the OCI answer, and a malformed request
// inside TLS keeps net/http's plain text (the listener sees ciphertext).
func TestOCIErrorListener_TLS(t *testing.T) {
	ts := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.TLS == nil {
			t.Error("request without TLS state")
		}
		_, _ = io.WriteString(w, r.Proto)
	}))
	ts.EnableHTTP2 = true
	ts.Listener = proxy.OCIErrorListener(ts.Listener)
	ts.StartTLS()
	t.Cleanup(ts.Close)

	resp, err := ts.Client().Get(ts.URL + "/x")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || string(body) != "HTTP/2.0" {
		t.Errorf("over TLS: %d %q, want 200 HTTP/2.0", resp.StatusCode, body)
	}

	c := dial(t, ts)
	send(t, c, "GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
	resp, body = readAnswer(t, bufio.NewReader(c))
	checkOCIAnswer(t, resp, body, http.StatusBadRequest, "client sent an HTTP request to an HTTPS server")

	tc := tls.Client(dial(t, ts), &tls.Config{RootCAs: ts.Client().Transport.(*http.Transport).TLSClientConfig.RootCAs, ServerName: "example.com"})
	t.Cleanup(func() { tc.Close() })
	send(t, tc, "GET /x HTTP/1.1\r\nHost: a\r\nNoColonHere\r\n\r\n")
	resp, body = readAnswer(t, bufio.NewReader(tc))
	if resp.StatusCode != http.StatusBadRequest || resp.Header.Get("Content-Type") != "text/plain; charset=utf-8" {
		t.Errorf("malformed request inside TLS: %d %q %q, want net/http's plain 400", resp.StatusCode, resp.Header.Get("Content-Type"), body)
	}
}
