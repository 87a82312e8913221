package graph

import (
	"fmt"
	"strings"

	"github.com/containerd/platforms"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
)

// ParsePlatform reads a platform as os/arch[/variant] (linux/amd64,
// linux/arm64/v8, linux/arm/v7), normalized as containerd normalizes it
// (x86_64 is amd64, aarch64 is arm64). Unlike containerd it wants the
// architecture written: "linux" alone would mean the machine's own.
func ParsePlatform(s string) (v1.Platform, error) {
	if !strings.Contains(s, "/") {
		return v1.Platform{}, fmt.Errorf("platform %q: want os/arch[/variant], for example linux/amd64", s)
	}
	p, err := platforms.Parse(s)
	if err != nil {
		return v1.Platform{}, fmt.Errorf("platform %q: want os/arch[/variant]: %w", s, err)
	}
	return p, nil
}

// FormatPlatform writes a platform as os/arch[/variant].
func FormatPlatform(p v1.Platform) string { return platforms.Format(p) }

// platformFilter reports whether an index's child is kept: when no
// platforms are asked for, every child is; otherwise a child whose
// platform matches one of them, as containerd matches (os, architecture
// and variant after normalization: arm64 is arm64/v8, arm is arm/v7), and
// a child that names no platform, which containerd keeps too.
func platformFilter(want []v1.Platform) func(v1.Descriptor) bool {
	if len(want) == 0 {
		return func(v1.Descriptor) bool { return true }
	}
	m := platforms.Any(want...)
	return func(d v1.Descriptor) bool { return d.Platform == nil || m.Match(*d.Platform) }
}
