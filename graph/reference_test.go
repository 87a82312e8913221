package graph_test

import (
	"strings"
	"testing"

	"github.com/ocimirror/ocimirror/graph"
)

func TestParseReference(t *testing.T) {
	const d = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	tests := []struct {
		name, in string
		// name and ref as the mirror is asked: GET /v2/<name>/manifests/<ref>
		wantName, wantRef string
		bad               string // part of the error, when it fails
	}{
		{name: "docker hub official", in: "docker.io/library/alpine:3.20", wantName: "docker.io/library/alpine", wantRef: "3.20"},
		{name: "docker hub short", in: "docker.io/alpine", wantName: "docker.io/alpine", wantRef: "latest"},
		{name: "docker hub alias", in: "index.docker.io/library/alpine:3", wantName: "docker.io/library/alpine", wantRef: "3"},
		{name: "by digest", in: "ghcr.io/org/app@" + d, wantName: "ghcr.io/org/app", wantRef: d},
		{name: "tag and digest: the digest", in: "ghcr.io/org/app:v1@" + d, wantName: "ghcr.io/org/app", wantRef: d},
		{name: "host with port", in: "registry.internal:5000/team/app:v1", wantName: "registry.internal:5000/team/app", wantRef: "v1"},
		{name: "ip and port", in: "127.0.0.1:5001/app", wantName: "127.0.0.1:5001/app", wantRef: "latest"},
		{name: "localhost", in: "localhost/app:v2", wantName: "localhost/app", wantRef: "v2"},
		{name: "no host: default upstream", in: "alpine:3.20", wantName: "alpine", wantRef: "3.20"},
		{name: "no host, two components", in: "team/app", wantName: "team/app", wantRef: "latest"},
		{name: "upper-case first component is a host", in: "Registry/app:v1", wantName: "Registry/app", wantRef: "v1"},
		{name: "spaces around", in: "  alpine  ", wantName: "alpine", wantRef: "latest"},
		{name: "empty", in: "", bad: "empty reference"},
		{name: "upper-case repository", in: "ghcr.io/Org/app", bad: "invalid repository name"},
		{name: "bad tag", in: "alpine:-x", bad: "invalid tag"},
		{name: "bad digest", in: "alpine@sha256:abc", bad: "digest"},
		{name: "bad host", in: "bad_host.io/app", bad: "invalid registry host"},
		{name: "host only", in: "ghcr.io/", bad: "invalid repository name"},
		{name: "too long", in: "a.io/" + strings.Repeat("a", 300), bad: "longer than"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r, err := graph.ParseReference(tc.in)
			if tc.bad != "" {
				if err == nil || !strings.Contains(err.Error(), tc.bad) {
					t.Fatalf("%q: %+v, %v; want an error saying %q", tc.in, r, err, tc.bad)
				}
				return
			}
			if err != nil || r.Name() != tc.wantName || r.Ref() != tc.wantRef {
				t.Fatalf("%q: name %q ref %q, %v; want %q %q", tc.in, r.Name(), r.Ref(), err, tc.wantName, tc.wantRef)
			}
			if again, err := graph.ParseReference(r.String()); err != nil || again != r {
				t.Fatalf("%q written back as %q reads as %+v, %v", tc.in, r.String(), again, err)
			}
		})
	}
}
