package proxy

import (
	"errors"
	"fmt"
	"net/http"
)

// Code is an OCI distribution error code.
type Code string

// The error codes of the distribution spec, and the ones ocimirror adds for
// an upstream that fails.
const (
	CodeBlobUnknown       Code = "BLOB_UNKNOWN"
	CodeUploadInvalid     Code = "BLOB_UPLOAD_INVALID"
	CodeUploadUnknown     Code = "BLOB_UPLOAD_UNKNOWN"
	CodeManifestBlob      Code = "MANIFEST_BLOB_UNKNOWN"
	CodeSizeInvalid       Code = "SIZE_INVALID"
	CodeDigestInvalid     Code = "DIGEST_INVALID"
	CodeManifestUnknown   Code = "MANIFEST_UNKNOWN"
	CodeManifestInvalid   Code = "MANIFEST_INVALID"
	CodeNameInvalid       Code = "NAME_INVALID"
	CodeNameUnknown       Code = "NAME_UNKNOWN"
	CodeRangeInvalid      Code = "RANGE_INVALID"
	CodePaginationInvalid Code = "PAGINATION_NUMBER_INVALID"
	CodeUnauthorized      Code = "UNAUTHORIZED"
	CodeDenied            Code = "DENIED"
	CodeUnsupported       Code = "UNSUPPORTED"
	CodeTooManyRequests   Code = "TOOMANYREQUESTS"
	CodeUnavailable       Code = "UNAVAILABLE"
	CodeUnknown           Code = "UNKNOWN"
)

// codeInfo is the table of codes: HTTP status and the spec's message.
var codeInfo = map[Code]struct {
	status  int
	message string
}{
	CodeBlobUnknown:       {http.StatusNotFound, "blob unknown to registry"},
	CodeUploadInvalid:     {http.StatusBadRequest, "blob upload invalid"},
	CodeUploadUnknown:     {http.StatusNotFound, "blob upload unknown to registry"},
	CodeManifestBlob:      {http.StatusBadRequest, "manifest references a manifest or blob unknown to registry"},
	CodeSizeInvalid:       {http.StatusBadRequest, "provided length did not match content length"},
	CodeDigestInvalid:     {http.StatusBadRequest, "provided digest did not match uploaded content"},
	CodeManifestUnknown:   {http.StatusNotFound, "manifest unknown"},
	CodeManifestInvalid:   {http.StatusBadRequest, "manifest invalid"},
	CodeNameInvalid:       {http.StatusBadRequest, "invalid repository name"},
	CodeNameUnknown:       {http.StatusNotFound, "repository name not known to registry"},
	CodeRangeInvalid:      {http.StatusRequestedRangeNotSatisfiable, "invalid content range"},
	CodePaginationInvalid: {http.StatusBadRequest, "invalid number of results requested"},
	CodeUnauthorized:      {http.StatusUnauthorized, "authentication required"},
	CodeDenied:            {http.StatusForbidden, "requested access to the resource is denied"},
	CodeUnsupported:       {http.StatusMethodNotAllowed, "the operation is unsupported"},
	CodeTooManyRequests:   {http.StatusTooManyRequests, "too many requests"},
	CodeUnavailable:       {http.StatusBadGateway, "upstream registry unavailable"},
	CodeUnknown:           {http.StatusInternalServerError, "unknown error"},
}

// Error is an answer in the OCI error format.
type Error struct {
	Code    Code
	Message string
	Detail  any
	// Status overrides the code's usual HTTP status when non-zero.
	Status int
	// Header is added to the response (Retry-After, Content-Range).
	Header http.Header
	// Err is the internal cause, logged and never shown to the client.
	Err error
}

func (e *Error) Error() string {
	s := string(e.Code) + ": " + e.message()
	if e.Detail != nil {
		s += fmt.Sprintf(" (%v)", e.Detail)
	}
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

func (e *Error) Unwrap() error { return e.Err }

func (e *Error) status() int {
	if e.Status != 0 {
		return e.Status
	}
	if i, ok := codeInfo[e.Code]; ok {
		return i.status
	}
	return http.StatusInternalServerError
}

func (e *Error) message() string {
	if e.Message != "" {
		return e.Message
	}
	return codeInfo[e.Code].message
}

func newError(code Code, detail any) *Error { return &Error{Code: code, Detail: detail} }

// Constructors for the errors handlers return.
func ErrBlobUnknown(d any) *Error     { return newError(CodeBlobUnknown, d) }
func ErrManifestUnknown(r any) *Error { return newError(CodeManifestUnknown, r) }
func ErrNameUnknown(n any) *Error     { return newError(CodeNameUnknown, n) }
func ErrNameInvalid(n any) *Error     { return newError(CodeNameInvalid, n) }
func ErrDigestInvalid(d any) *Error   { return newError(CodeDigestInvalid, d) }
func ErrUnsupported(d any) *Error     { return newError(CodeUnsupported, d) }

// errDigestMalformed is a digest that cannot be parsed (DIGEST_INVALID
// otherwise says the content did not match it).
func errDigestMalformed(d any) *Error {
	return &Error{Code: CodeDigestInvalid, Message: "invalid digest", Detail: d}
}

// ErrTagInvalid is a reference that is neither a valid tag nor a digest.
func ErrTagInvalid(t string) *Error {
	return &Error{Code: CodeManifestInvalid, Message: "invalid tag or digest", Detail: map[string]string{"reference": t}}
}

// errAbort asks the edge to cut the client's connection: the body already
// started and cannot end cleanly (a fill failed its digest check).
type errAbort struct{ cause error }

func (e errAbort) Error() string { return "connection cut: " + e.cause.Error() }
func (e errAbort) Unwrap() error { return e.cause }

var (
	// errDigestMismatch: upstream bytes did not hash to the digest asked for.
	errDigestMismatch = errors.New("upstream content does not match its digest")
	// errSizeMismatch: upstream sent another length than it announced.
	errSizeMismatch = errors.New("upstream content length does not match")
	// errNotManifest: upstream bytes of the digest asked for are not a
	// manifest of the media type they came as.
	errNotManifest = errors.New("upstream content is not a manifest of its media type")
)
