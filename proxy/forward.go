package proxy

import (
	"crypto/sha256"
	"encoding/hex"
	"net/http"
	"net/http/httputil"
	"net/url"

	"github.com/gorilla/mux"
)

// Upload sessions live in the memory of the replica that opened them.
// Behind a balancer without affinity a client's PATCH or PUT may reach
// another replica: in a cluster an upload ID starts with a tag of the
// replica that holds it (uploadTagLen hex of the hash of its URL), and a
// request for a session of another member is passed to that member as
// it came, credentials and body included; that member authorizes it.

const uploadTagLen = 8

// memberTag is a replica's upload ID prefix.
func memberTag(member string) string {
	h := sha256.Sum256([]byte(member))
	return hex.EncodeToString(h[:])[:uploadTagLen]
}

// uploadID makes a session ID: random hex, after this replica's tag in a
// cluster.
func (s *Server) uploadID(random []byte) string {
	id := hex.EncodeToString(random)
	if s.cluster != nil {
		id = memberTag(s.cluster.Self()) + id
	}
	return id
}

// forwardUploads passes a request for another member's upload session to
// that member; everything else goes to h.
func (s *Server) forwardUploads(h http.Handler) http.Handler {
	if s.cluster == nil {
		return h
	}
	self := memberTag(s.cluster.Self())
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := mux.Vars(r)["id"]
		if len(id) <= uploadTagLen || id[:uploadTagLen] == self {
			h.ServeHTTP(w, r)
			return
		}
		for _, m := range s.cluster.Members() {
			if memberTag(m) != id[:uploadTagLen] || m == s.cluster.Self() {
				continue
			}
			target, err := url.Parse(m)
			if err != nil {
				break
			}
			rp := &httputil.ReverseProxy{
				Rewrite: func(pr *httputil.ProxyRequest) {
					pr.SetURL(target)
					pr.Out.Host = r.Host // Location headers name what the client used
				},
				ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
					s.log.Warn("cluster: passing an upload request to the replica that holds the session", "peer", m, "err", err)
					q := &request{op: "upload"}
					s.writeError(w, r, q, &Error{Code: CodeUploadUnknown, Status: http.StatusBadGateway,
						Message: "the replica holding this upload session does not answer", Detail: map[string]string{"uuid": id}, Err: err})
				},
			}
			rp.ServeHTTP(w, r)
			return
		}
		h.ServeHTTP(w, r) // no such member: unknown here too
	})
}
