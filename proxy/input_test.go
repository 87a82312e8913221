package proxy_test

import (
	"encoding/json"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/ocimirror/ocimirror/internal/registrytest"
	"github.com/ocimirror/ocimirror/upstream"
)

func TestProxy_BadInputNeverReachesUpstream(t *testing.T) {
	e, reg := start(t)
	sha := "sha256:" + strings.Repeat("a", 64)
	tests := []struct {
		name, method, path string
		status             int
		code               string
	}{
		{"upper-case name", "GET", "/v2/App/manifests/v1", 400, "NAME_INVALID"},
		{"name with double dot", "GET", "/v2/a..b/manifests/v1", 400, "NAME_INVALID"},
		{"name ending in separator", "GET", "/v2/a-/manifests/v1", 400, "NAME_INVALID"},
		{"empty component", "GET", "/v2/a//b/manifests/v1", 400, "NAME_INVALID"},
		{"encoded slash", "GET", "/v2/a%2Fb/manifests/v1", 400, "NAME_INVALID"},
		{"dot-dot component", "GET", "/v2/a/../b/manifests/v1", 400, "NAME_INVALID"},
		{"name too long", "GET", "/v2/" + strings.Repeat("a", 256) + "/manifests/v1", 400, "NAME_INVALID"},
		{"prefix only", "GET", "/v2/" + reg.Host + "/manifests/v1", 400, "NAME_INVALID"},
		{"tag too long", "GET", "/v2/app/manifests/" + strings.Repeat("t", 129), 400, "MANIFEST_INVALID"},
		{"tag starting with dot", "GET", "/v2/app/manifests/.v1", 400, "MANIFEST_INVALID"},
		{"tag with bad char", "GET", "/v2/app/manifests/v1%21", 400, "MANIFEST_INVALID"},
		{"manifest digest bad hex", "GET", "/v2/app/manifests/sha256:" + strings.Repeat("g", 64), 400, "DIGEST_INVALID"},
		{"manifest digest short", "GET", "/v2/app/manifests/sha256:abc", 400, "DIGEST_INVALID"},
		{"manifest digest upper hex", "HEAD", "/v2/app/manifests/sha256:" + strings.Repeat("A", 64), 400, ""},
		{"blob digest md5", "GET", "/v2/app/blobs/md5:" + strings.Repeat("a", 32), 400, "DIGEST_INVALID"},
		{"blob digest sha384", "GET", "/v2/app/blobs/sha384:" + strings.Repeat("a", 96), 400, "DIGEST_INVALID"},
		{"blob digest no algorithm", "GET", "/v2/app/blobs/" + strings.Repeat("a", 64), 400, "DIGEST_INVALID"},
		{"blob digest sha512 short", "GET", "/v2/app/blobs/sha512:" + strings.Repeat("a", 64), 400, "DIGEST_INVALID"},
		{"referrers bad digest", "GET", "/v2/app/referrers/sha256:xyz", 400, "DIGEST_INVALID"},
		{"tags list bad n", "GET", "/v2/app/tags/list?n=-1", 400, "PAGINATION_NUMBER_INVALID"},
		{"tags list n not a number", "GET", "/v2/app/tags/list?n=ten", 400, "PAGINATION_NUMBER_INVALID"},
		{"tags list bad name", "GET", "/v2/-app/tags/list", 400, "NAME_INVALID"},
		{"manifest that is not JSON", "PUT", "/v2/app/manifests/" + sha, 400, "MANIFEST_INVALID"},
		{"tag pushed to a proxied repository", "PUT", "/v2/app/manifests/v1", 405, "UNSUPPORTED"},
		{"manifest put with bad tag", "PUT", "/v2/app/manifests/-v1", 400, "MANIFEST_INVALID"},
		{"delete of proxied blob", "DELETE", "/v2/app/blobs/" + sha, 405, "UNSUPPORTED"},
		{"delete of proxied manifest", "DELETE", "/v2/app/manifests/" + sha, 405, "UNSUPPORTED"},
		{"unknown upload", "PATCH", "/v2/app/blobs/uploads/nope", 404, "BLOB_UPLOAD_UNKNOWN"},
		{"upload status unknown", "GET", "/v2/app/blobs/uploads/nope", 404, "BLOB_UPLOAD_UNKNOWN"},
		{"bad mount digest", "POST", "/v2/app/blobs/uploads/?mount=sha256:xyz", 400, "DIGEST_INVALID"},
		{"monolithic upload with bad digest", "POST", "/v2/app/blobs/uploads/?digest=sha1:abc", 400, "DIGEST_INVALID"},
		{"upload to bad name", "POST", "/v2/App/blobs/uploads/", 400, "NAME_INVALID"},
		{"unknown endpoint", "GET", "/v2/app/whatever", 404, "UNSUPPORTED"},
		{"catalog", "GET", "/v2/_catalog", 404, "UNSUPPORTED"},
		{"outside the API", "GET", "/metrics-or-anything", 404, "UNSUPPORTED"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := e.do(tc.method, tc.path)
			if r.status != tc.status {
				t.Fatalf("status %d, want %d (%s)", r.status, tc.status, r.body)
			}
			if ct := r.header.Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type %q", ct)
			}
			if tc.method != "HEAD" && tc.code != "" {
				if got := errorCode(t, r.body); got != tc.code {
					t.Errorf("code %s, want %s", got, tc.code)
				}
			}
		})
	}
	if n := reg.Total(); n != 0 {
		t.Errorf("bad input made %d upstream requests", n)
	}
}

func TestProxy_TagsList(t *testing.T) {
	e, reg := start(t)
	for _, tag := range []string{"b", "a", "c", "e", "d"} {
		reg.PushImage(t, "team/app", tag, 1)
	}
	list := func(path string) (tags []string, link string) {
		t.Helper()
		r := e.get(path)
		if r.status != 200 || r.header.Get("Content-Type") != "application/json" {
			t.Fatalf("%s: %d %s", path, r.status, r.body)
		}
		var body struct {
			Name string   `json:"name"`
			Tags []string `json:"tags"`
		}
		if err := json.Unmarshal(r.body, &body); err != nil || body.Tags == nil {
			t.Fatalf("%s: body %s", path, r.body)
		}
		return body.Tags, r.header.Get("Link")
	}
	tags, link := list("/v2/team/app/tags/list")
	if strings.Join(tags, ",") != "a,b,c,d,e" || link != "" {
		t.Errorf("all: %v %q", tags, link)
	}
	tags, link = list("/v2/team/app/tags/list?n=2")
	if strings.Join(tags, ",") != "a,b" || link != `</v2/team/app/tags/list?last=b&n=2>; rel="next"` {
		t.Errorf("n=2: %v %q", tags, link)
	}
	tags, link = list("/v2/team/app/tags/list?n=2&last=b")
	if strings.Join(tags, ",") != "c,d" || !strings.Contains(link, "last=d") {
		t.Errorf("n=2 last=b: %v %q", tags, link)
	}
	tags, link = list("/v2/team/app/tags/list?n=2&last=d")
	if strings.Join(tags, ",") != "e" || link != "" {
		t.Errorf("last page: %v %q", tags, link)
	}
	tags, link = list("/v2/team/app/tags/list?n=0")
	if len(tags) != 0 || link != "" {
		t.Errorf("n=0: %v %q", tags, link)
	}
	tags, _ = list("/v2/team/app/tags/list?last=bb")
	if strings.Join(tags, ",") != "c,d,e" {
		t.Errorf("last between tags: %v", tags)
	}
	// A prefix and ns are kept in the Link a client follows.
	_, link = list("/v2/" + reg.Host + "/team/app/tags/list?n=1")
	if link != "</v2/"+reg.Host+`/team/app/tags/list?last=a&n=1>; rel="next"` {
		t.Errorf("prefix link %q", link)
	}
	_, link = list("/v2/team/app/tags/list?n=1&ns=" + reg.Host)
	if link != `</v2/team/app/tags/list?last=a&n=1&ns=`+strings.ReplaceAll(reg.Host, ":", "%3A")+`>; rel="next"` {
		t.Errorf("ns link %q", link)
	}
	if n := reg.Count("GET", "tags"); n != 1 {
		t.Errorf("upstream tag list GETs: %d, want 1 (cached for the TTL)", n)
	}
	if r := e.get("/v2/team/missing/tags/list"); r.status != 404 || errorCode(t, r.body) != "NAME_UNKNOWN" {
		t.Errorf("unknown repository: %d %s", r.status, r.body)
	}
}

// tokenAuth wraps a registry with the distribution token flow: requests
// need a bearer token, which the token endpoint gives for basic credentials
// user:secret.
func tokenAuth(tokens *int, mu *sync.Mutex) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/token" {
				if u, p, ok := r.BasicAuth(); !ok || u != "user" || p != "secret" {
					w.WriteHeader(401)
					return
				}
				mu.Lock()
				*tokens++
				mu.Unlock()
				w.Header().Set("Content-Type", "application/json")
				_ = json.NewEncoder(w).Encode(map[string]any{"token": "tok:" + r.URL.Query().Get("scope"), "expires_in": 300})
				return
			}
			if !strings.HasPrefix(r.Header.Get("Authorization"), "Bearer tok:repository:") {
				w.Header().Set("WWW-Authenticate", `Bearer realm="http://`+r.Host+`/token",service="test",scope="repository:x:pull"`)
				w.WriteHeader(401)
				return
			}
			next.ServeHTTP(w, r)
		})
	}
}

func TestProxy_TokenAuth(t *testing.T) {
	var mu sync.Mutex
	tokens := 0
	reg := registrytest.New(t, registrytest.WithMiddleware(tokenAuth(&tokens, &mu)))
	e, _ := start(t, withUpstream(upstreamDef{name: "private.test", reg: reg,
		creds: upstream.Credentials{Username: "user", Password: "secret"}}), withDefault("private.test"))
	img := reg.PushImage(t, "team/app", "v1", 1000)

	r := e.get("/v2/team/app/manifests/v1")
	if r.status != 200 || string(r.body) != string(img.Manifest) {
		t.Fatalf("manifest through token auth: %d %s", r.status, r.body)
	}
	for i, d := range img.LayerDigests {
		if r := e.get("/v2/team/app/blobs/" + d.String()); string(r.body) != string(img.Layers[i]) {
			t.Fatalf("blob through token auth: %d", r.status)
		}
	}
	e.get("/v2/team/app/tags/list")
	mu.Lock()
	defer mu.Unlock()
	if tokens != 1 {
		t.Errorf("token requests: %d, want 1 (cached per scope)", tokens)
	}
}
