package proxy

import (
	"strings"
	"testing"
)

func TestValidName(t *testing.T) {
	tests := []struct {
		name string
		ok   bool
	}{
		{"a", true},
		{"library/alpine", true},
		{"a/b/c/d", true},
		{"my-app", true},
		{"my--app", true},
		{"my_app", true},
		{"my__app", true},
		{"my.app", true},
		{"a0.b1-c2_d3", true},
		{strings.Repeat("a", 255), true},
		{"", false},
		{strings.Repeat("a", 256), false},
		{"A", false},
		{"my___app", false},
		{"my..app", false},
		{"my.-app", false},
		{"-app", false},
		{"app-", false},
		{"app/", false},
		{"/app", false},
		{"a//b", false},
		{"a/../b", false},
		{"ghcr.io:443/app", false},
		{"a b", false},
	}
	for _, tc := range tests {
		if got := validName(tc.name); got != tc.ok {
			t.Errorf("validName(%q) = %v, want %v", tc.name, got, tc.ok)
		}
	}
}

func TestValidTag(t *testing.T) {
	tests := []struct {
		tag string
		ok  bool
	}{
		{"latest", true},
		{"v1.2.3-rc.1_b", true},
		{"_x", true},
		{"sha256-" + strings.Repeat("a", 64), true},
		{strings.Repeat("a", 128), true},
		{strings.Repeat("a", 129), false},
		{"", false},
		{".x", false},
		{"-x", false},
		{"a:b", false},
		{"a/b", false},
		{"a+b", false},
	}
	for _, tc := range tests {
		if got := validTag(tc.tag); got != tc.ok {
			t.Errorf("validTag(%q) = %v, want %v", tc.tag, got, tc.ok)
		}
	}
}

func TestParseDigest(t *testing.T) {
	tests := []struct {
		in string
		ok bool
	}{
		{"sha256:" + strings.Repeat("a", 64), true},
		{"sha512:" + strings.Repeat("0", 128), true},
		{"sha384:" + strings.Repeat("a", 96), false},
		{"sha256:" + strings.Repeat("A", 64), false},
		{"sha256:" + strings.Repeat("a", 63), false},
		{"sha256:", false},
		{":" + strings.Repeat("a", 64), false},
		{strings.Repeat("a", 64), false},
		{"md5:d41d8cd98f00b204e9800998ecf8427e", false},
	}
	for _, tc := range tests {
		_, err := parseDigest(tc.in)
		if (err == nil) != tc.ok {
			t.Errorf("parseDigest(%q) error %v, want ok=%v", tc.in, err, tc.ok)
		}
	}
}

func TestBlobRange(t *testing.T) {
	tests := []struct {
		header        string
		size          int64
		start, end    int64
		status        int
		unsatisfiable bool
	}{
		{"", 100, 0, 100, 200, false},
		{"bytes=0-0", 100, 0, 1, 206, false},
		{"bytes=0-99", 100, 0, 100, 206, false},
		{"bytes=10-", 100, 10, 100, 206, false},
		{"bytes=99-", 100, 99, 100, 206, false},
		{"bytes=50-1000", 100, 50, 100, 206, false},
		{"bytes=-10", 100, 90, 100, 206, false},
		{"bytes=-1000", 100, 0, 100, 206, false},
		{"bytes=100-", 100, 0, 0, 0, true},
		{"bytes=100-200", 100, 0, 0, 0, true},
		{"bytes=-0", 100, 0, 0, 0, true},
		{"bytes=0-", 0, 0, 0, 0, true},
		{"bytes=5-2", 100, 0, 100, 200, false},
		{"bytes=0-1,4-5", 100, 0, 100, 200, false},
		{"bytes=x-", 100, 0, 100, 200, false},
		{"lines=1-2", 100, 0, 100, 200, false},
	}
	for _, tc := range tests {
		start, end, status, err := blobRange(tc.header, tc.size)
		if tc.unsatisfiable {
			if err == nil {
				t.Errorf("%q of %d: want 416, got %d-%d %d", tc.header, tc.size, start, end, status)
			}
			continue
		}
		if err != nil || start != tc.start || end != tc.end || status != tc.status {
			t.Errorf("%q of %d: got %d-%d %d %v, want %d-%d %d", tc.header, tc.size, start, end, status, err, tc.start, tc.end, tc.status)
		}
	}
}

func TestAccepts(t *testing.T) {
	const oci = "application/vnd.oci.image.manifest.v1+json"
	tests := []struct {
		accept []string
		ok     bool
	}{
		{nil, true},
		{[]string{oci}, true},
		{[]string{"application/vnd.docker.distribution.manifest.v2+json, " + oci + "; q=0.9"}, true},
		{[]string{"application/vnd.docker.distribution.manifest.v2+json", oci}, true},
		{[]string{"*/*"}, true},
		{[]string{"application/*"}, true},
		{[]string{"application/vnd.docker.distribution.manifest.v2+json"}, false},
		{[]string{"text/*"}, false},
	}
	for _, tc := range tests {
		if got := accepts(tc.accept, oci); got != tc.ok {
			t.Errorf("accepts(%q) = %v, want %v", tc.accept, got, tc.ok)
		}
	}
}

func TestPushedMediaType(t *testing.T) {
	tests := []struct {
		header, body, want string
	}{
		{"application/vnd.oci.image.index.v1+json", "", "application/vnd.oci.image.index.v1+json"},
		{"application/vnd.oci.image.manifest.v1+json; charset=utf-8", "", "application/vnd.oci.image.manifest.v1+json"},
		{"", `{"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}`, "application/vnd.docker.distribution.manifest.v2+json"},
		{"", `{"schemaVersion":2,"manifests":[]}`, "application/vnd.oci.image.index.v1+json"},
		{"", `{"schemaVersion":2,"config":{}}`, "application/vnd.oci.image.manifest.v1+json"},
		// Not a manifest media type: refused, whatever the body says.
		{"application/octet-stream", `{"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}`, ""},
		{"text/html", `{"schemaVersion":2,"config":{}}`, ""},
		{"", `not json`, ""},
		{"", `{}`, ""},
		{"", `{"mediaType":"a/b\r\nX-Evil: 1"}`, ""},
	}
	for _, tc := range tests {
		got, err := pushedMediaType(tc.header, []byte(tc.body))
		if got != tc.want || (err == nil) != (tc.want != "") {
			t.Errorf("pushedMediaType(%q, %q) = %q, %v; want %q", tc.header, tc.body, got, err, tc.want)
		}
	}
}

func TestNextPage(t *testing.T) {
	tests := []struct {
		link, want string
	}{
		{`</v2/a/tags/list?last=x&n=50>; rel="next"`, "last=x&n=50"},
		{`<https://reg.example/v2/a/tags/list?n=2&last=b>; rel="next"`, "last=b&n=2"},
		{`</v2/a/tags/list?last=x>; rel="prev", </v2/a/tags/list?last=y>; rel="next"`, "last=y"},
		{``, ""},
		{`</v2/a/tags/list>; rel="next"`, ""},
	}
	for _, tc := range tests {
		got := nextPage(tc.link)
		if got.Encode() != tc.want {
			t.Errorf("nextPage(%q) = %q, want %q", tc.link, got.Encode(), tc.want)
		}
	}
}
