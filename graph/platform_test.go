package graph_test

import (
	"slices"
	"testing"

	specs "github.com/opencontainers/image-spec/specs-go"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/graph"
)

// An index with the platforms images carry, and a child naming none:
// --platform keeps what containerd would pull for it (variants
// normalized: arm64 is arm64/v8, arm is arm/v7), the child without a
// platform, and nothing a left-out child names (its layers, its
// referrers).
func TestWalk_Platforms(t *testing.T) {
	s := newStore()
	plat := func(os, arch, variant string) *v1.Platform {
		return &v1.Platform{OS: os, Architecture: arch, Variant: variant}
	}
	children := map[string]v1.Descriptor{}
	var list []v1.Descriptor
	for _, c := range []struct {
		name string
		p    *v1.Platform
	}{
		{"amd64", plat("linux", "amd64", "")},
		{"arm64", plat("linux", "arm64", "v8")},
		{"armv7", plat("linux", "arm", "v7")},
		{"armv6", plat("linux", "arm", "v6")},
		{"windows", plat("windows", "amd64", "")},
		{"attestation", plat("unknown", "unknown", "")},
		{"noplatform", nil},
	} {
		d := s.image(t, c.name, nil, c.name+"-layer")
		d.Platform = c.p
		children[c.name] = d
		list = append(list, d)
	}
	sbom := s.image(t, "sbom-of-arm64", &list[1], "sbom-layer")
	s.referrers[children["arm64"].Digest] = []v1.Descriptor{sbom}
	idx := s.put(t, v1.MediaTypeImageIndex, v1.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageIndex, Manifests: list})

	tests := []struct {
		name      string
		platforms []string
		want      []string
	}{
		{"none asked: all", nil, []string{"amd64", "arm64", "armv7", "armv6", "windows", "attestation", "noplatform"}},
		{"linux/amd64", []string{"linux/amd64"}, []string{"amd64", "noplatform"}},
		{"x86_64 is amd64", []string{"linux/x86_64"}, []string{"amd64", "noplatform"}},
		{"arm64 matches arm64/v8", []string{"linux/arm64"}, []string{"arm64", "noplatform"}},
		{"aarch64/v8", []string{"linux/aarch64/v8"}, []string{"arm64", "noplatform"}},
		{"arm is arm/v7, not v6", []string{"linux/arm"}, []string{"armv7", "noplatform"}},
		{"arm/v6", []string{"linux/arm/v6"}, []string{"armv6", "noplatform"}},
		{"two asked", []string{"linux/amd64", "windows/amd64"}, []string{"amd64", "windows", "noplatform"}},
		{"none present", []string{"linux/s390x"}, []string{"noplatform"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var ps []v1.Platform
			for _, p := range tc.platforms {
				pp, err := graph.ParsePlatform(p)
				if err != nil {
					t.Fatal(err)
				}
				ps = append(ps, pp)
			}
			got, err := walk(t, s, idx, graph.Options{Referrers: true, Platforms: ps})
			if err != nil {
				t.Fatal(err)
			}
			var visited []string
			for name, d := range children {
				if _, ok := got[d.Digest]; ok {
					visited = append(visited, name)
					if _, ok := got[blob(name+"-layer").Digest]; !ok {
						t.Errorf("%s visited without its layer", name)
					}
				} else if _, ok := got[blob(name+"-layer").Digest]; ok {
					t.Errorf("the layer of %s, left out, was visited", name)
				}
			}
			slices.Sort(visited)
			want := slices.Sorted(slices.Values(tc.want))
			if !slices.Equal(visited, want) {
				t.Errorf("children visited %v, want %v", visited, want)
			}
			_, sbomSeen := got[sbom.Digest]
			if want := slices.Contains(tc.want, "arm64"); sbomSeen != want {
				t.Errorf("the arm64 SBOM visited: %v, want %v", sbomSeen, want)
			}
			if _, ok := got[idx.Digest]; !ok {
				t.Error("the index itself was not visited")
			}
		})
	}
}

func TestParsePlatform(t *testing.T) {
	tests := []struct {
		in, want string
		bad      bool
	}{
		{in: "linux/amd64", want: "linux/amd64"},
		{in: "linux/arm64/v8", want: "linux/arm64/v8"},
		{in: "linux/arm", want: "linux/arm"},
		{in: "linux/arm/v6", want: "linux/arm/v6"},
		{in: "Linux/X86_64", want: "linux/amd64"},
		{in: "linux", bad: true},
		{in: "", bad: true},
		{in: "linux/*", bad: true},
		{in: "linux/amd64/v2/extra", bad: true},
	}
	for _, tc := range tests {
		p, err := graph.ParsePlatform(tc.in)
		if tc.bad {
			if err == nil {
				t.Errorf("%q: parsed as %v, want an error", tc.in, p)
			}
			continue
		}
		if err != nil || graph.FormatPlatform(p) != tc.want {
			t.Errorf("%q: %q, %v; want %q", tc.in, graph.FormatPlatform(p), err, tc.want)
		}
	}
}
