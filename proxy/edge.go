package proxy

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"strconv"
	"strings"
)

// OCIErrorListener returns ln with connections that answer in the OCI error
// format the requests net/http rejects before any handler runs: a NUL or
// other invalid byte in the request line, a malformed header line, a bad
// Content-Length, a missing Host on HTTP/1.1 (400), request headers over
// MaxHeaderBytes (431), an unsupported Transfer-Encoding (501), an
// unsupported HTTP version (505). net/http writes those answers itself, as
// text/plain, straight to the connection; the connection recognises such a
// write and sends the same status with a JSON body instead, with
// Content-Type, Content-Length, Connection: close and
// Docker-Distribution-API-Version. The server's limits and its parsing stay
// as they are. Every other byte passes through untouched.
//
// Under TLS the listener goes below tls.NewListener (http.Server.ServeTLS
// wraps it), so that net/http still serves a *tls.Conn (HTTP/2, r.TLS). It
// then sees only ciphertext, and the rejections written inside TLS stay
// Go's plain text. It does see the one answer net/http writes before TLS,
// to a client that speaks plain HTTP to the TLS port, and rewrites that
// one.
func OCIErrorListener(ln net.Listener) net.Listener { return ociErrorListener{ln} }

type ociErrorListener struct{ net.Listener }

func (l ociErrorListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &ociErrorConn{Conn: c}, nil
}

// ociErrorConn rewrites net/http's own rejections. Two things must hold for
// a Write to be rewritten:
//
//   - its bytes are, whole, one of the answers net/http's (*conn).serve
//     writes when reading a request fails, parsed strictly: "HTTP/1.1 ",
//     the status, exactly its two headers, then exactly its body; or
//     exactly its answer to plain HTTP on a TLS port;
//   - the Write comes from (*conn).serve itself, through fmt or io. The
//     shape alone would not do: a response body (a blob, whose bytes anyone
//     who can push one chooses) can end with those very bytes, and
//     net/http's buffering then hands them to the connection as one Write.
//     Responses reach the connection through net/http's buffered writer,
//     never straight from (*conn).serve.
//
// The call stack is read only for a Write that already has that shape, so
// normal traffic pays for a prefix comparison and nothing more. Should a Go
// release write these answers some other way, nothing is rewritten (Go's
// plain text goes out, never a damaged response) and this package's tests
// fail.
type ociErrorConn struct{ net.Conn }

func (c *ociErrorConn) Write(p []byte) (int, error) {
	if resp := rejectionAnswer(p); resp != nil && writtenByServe() {
		if _, err := c.Conn.Write(resp); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	return c.Conn.Write(p)
}

// ReadFrom keeps the underlying connection's sendfile and splice for the
// response bodies net/http copies with it; those are never rejections.
func (c *ociErrorConn) ReadFrom(r io.Reader) (int64, error) {
	if rf, ok := c.Conn.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(struct{ io.Writer }{c.Conn}, r)
}

// CloseWrite keeps net/http's graceful close (FIN, then a pause before the
// full close), which lets a client that is still sending read its 431.
func (c *ociErrorConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// The answers net/http's (*conn).serve writes itself (Go 1.26,
// net/http/server.go):
//
//	"HTTP/1.1 431 Request Header Fields Too Large" + goRejectHeaders + "431 Request Header Fields Too Large"
//	"HTTP/1.1 501 Not Implemented" + goRejectHeaders + "Unsupported transfer encoding"
//	"HTTP/1.1 400 Bad Request: missing required Host header" + goRejectHeaders + "400 Bad Request: missing required Host header"
//	"HTTP/1.1 400 Bad Request" + goRejectHeaders + "400 Bad Request"
//
// and, on the raw connection of a TLS port, goPlainToTLS.
const (
	goRejectHeaders = "\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n"
	goPlainToTLS    = "HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"
	// maxGoReject bounds the writes examined: net/http's reasons are short
	// constants of its own.
	maxGoReject = 512
)

// rejectionAnswer returns the OCI answer that replaces p when p is, whole,
// one of net/http's own rejections, and nil otherwise.
//
// The distribution spec has no code for a malformed request, so every one
// is UNSUPPORTED ("the operation was unsupported due to a missing
// implementation or invalid set of parameters"), which ocimirror already
// answers for requests it cannot serve; the message says what was wrong
// and the status stays net/http's.
func rejectionAnswer(p []byte) []byte {
	if len(p) > maxGoReject || !bytes.HasPrefix(p, []byte("HTTP/1.")) {
		return nil
	}
	if string(p) == goPlainToTLS {
		return ociAnswer("HTTP/1.0", http.StatusBadRequest, "client sent an HTTP request to an HTTPS server")
	}
	rest, ok := bytes.CutPrefix(p, []byte("HTTP/1.1 "))
	if !ok {
		return nil
	}
	line, body, ok := strings.Cut(string(rest), goRejectHeaders)
	if !ok || strings.ContainsAny(line, "\r\n") || len(line) < 5 || line[3] != ' ' {
		return nil
	}
	status, err := strconv.Atoi(line[:3])
	if err != nil || line[0] < '4' || line[0] > '5' || http.StatusText(status) == "" {
		return nil
	}
	// The reason is the status text, or for net/http's statusError the
	// status text, ": " and why.
	text := http.StatusText(status)
	var why string
	if line[4:] != text {
		var ok bool
		if why, ok = strings.CutPrefix(line[4:], text+": "); !ok || why == "" {
			return nil
		}
	}
	var msg string
	switch {
	case status == http.StatusNotImplemented && why == "" && body == "Unsupported transfer encoding":
		msg = "unsupported transfer encoding"
	case body != line:
		return nil
	case status == http.StatusRequestHeaderFieldsTooLarge:
		msg = "request header fields too large"
	case status == http.StatusBadRequest:
		msg = "malformed HTTP request"
	default:
		msg = strings.ToLower(text)
	}
	if why != "" {
		msg += ": " + why
	}
	return ociAnswer("HTTP/1.1", status, msg)
}

// ociAnswer is a whole response, closing the connection as net/http does.
func ociAnswer(proto string, status int, msg string) []byte {
	body := errorBody(&Error{Code: CodeUnsupported, Message: msg})
	return fmt.Appendf(nil, "%s %d %s\r\nConnection: close\r\nContent-Length: %d\r\nContent-Type: application/json\r\n%s: registry/2.0\r\n\r\n%s",
		proto, status, http.StatusText(status), len(body), HeaderAPIVersion, body)
}

// writtenByServe reports whether the Write under way was called by
// net/http's (*conn).serve, directly or through fmt or io, and not by the
// buffered writer every response goes through.
func writtenByServe() bool {
	var pcs [8]uintptr
	// Skip runtime.Callers, writtenByServe and (*ociErrorConn).Write.
	frames := runtime.CallersFrames(pcs[:runtime.Callers(3, pcs[:])])
	for {
		f, more := frames.Next()
		if !strings.HasPrefix(f.Function, "fmt.") && !strings.HasPrefix(f.Function, "io.") {
			return f.Function == "net/http.(*conn).serve"
		}
		if !more {
			return false
		}
	}
}
