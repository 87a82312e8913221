package graph_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"testing"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/graph"
)

// store is a Source over maps.
type store struct {
	manifests map[digest.Digest][2]string // media type, bytes
	referrers map[digest.Digest][]v1.Descriptor
	reads     int
}

func newStore() *store {
	return &store{manifests: map[digest.Digest][2]string{}, referrers: map[digest.Digest][]v1.Descriptor{}}
}

func (s *store) Manifest(_ context.Context, d digest.Digest) (string, []byte, error) {
	s.reads++
	m, ok := s.manifests[d]
	if !ok {
		return "", nil, graph.ErrNotFound
	}
	return m[0], []byte(m[1]), nil
}

func (s *store) Referrers(_ context.Context, d digest.Digest) ([]v1.Descriptor, error) {
	return s.referrers[d], nil
}

func (s *store) put(t *testing.T, mt string, v any) v1.Descriptor {
	t.Helper()
	data, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	d := digest.FromBytes(data)
	s.manifests[d] = [2]string{mt, string(data)}
	return v1.Descriptor{MediaType: mt, Digest: d, Size: int64(len(data))}
}

func blob(name string) v1.Descriptor {
	return v1.Descriptor{MediaType: "application/octet-stream", Digest: digest.FromString(name), Size: int64(len(name))}
}

func (s *store) image(t *testing.T, name string, subject *v1.Descriptor, layers ...string) v1.Descriptor {
	m := v1.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageManifest,
		Config: blob(name + "-config"), Subject: subject}
	for _, l := range layers {
		m.Layers = append(m.Layers, blob(l))
	}
	return s.put(t, v1.MediaTypeImageManifest, m)
}

func walk(t *testing.T, s graph.Source, root v1.Descriptor, opts graph.Options) (map[digest.Digest]graph.Node, error) {
	t.Helper()
	got := map[digest.Digest]graph.Node{}
	err := graph.Walk(context.Background(), s, root, opts, func(n graph.Node) error {
		if _, dup := got[n.Descriptor.Digest]; dup {
			t.Errorf("%s visited twice", n.Descriptor.Digest)
		}
		got[n.Descriptor.Digest] = n
		return nil
	})
	return got, err
}

// An index: both platforms, their configs and layers (a layer shared by
// both visited once), the referrers of the index and of a platform, and a
// referrer's referrer; a platform not stored is visited as missing.
func TestWalk_IndexPlatformsReferrers(t *testing.T) {
	s := newStore()
	amd := s.image(t, "amd", nil, "base", "amd-app")
	arm := s.image(t, "arm", nil, "base", "arm-app")
	absent := v1.Descriptor{MediaType: v1.MediaTypeImageManifest, Digest: digest.FromString("not stored"), Size: 10}
	bad := v1.Descriptor{MediaType: v1.MediaTypeImageManifest, Digest: "sha256:zz", Size: 10}
	idx := s.put(t, v1.MediaTypeImageIndex, v1.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageIndex,
		Manifests: []v1.Descriptor{amd, arm, absent, bad}})
	sig := s.image(t, "sig", &idx, "sig-layer")
	sbom := s.image(t, "sbom", &amd, "sbom-layer")
	sigOfSig := s.image(t, "sigsig", &sig, "sigsig-layer")
	s.referrers[idx.Digest] = []v1.Descriptor{sig}
	s.referrers[amd.Digest] = []v1.Descriptor{sbom}
	s.referrers[sig.Digest] = []v1.Descriptor{sigOfSig}

	got, err := walk(t, s, v1.Descriptor{Digest: idx.Digest}, graph.Options{Referrers: true})
	if err != nil {
		t.Fatal(err)
	}
	want := map[digest.Digest]graph.Kind{
		idx.Digest: graph.Root, amd.Digest: graph.Child, arm.Digest: graph.Child, absent.Digest: graph.Child,
		blob("amd-config").Digest: graph.Config, blob("arm-config").Digest: graph.Config,
		blob("base").Digest: graph.Layer, blob("amd-app").Digest: graph.Layer, blob("arm-app").Digest: graph.Layer,
		sig.Digest: graph.Referrer, blob("sig-config").Digest: graph.Config, blob("sig-layer").Digest: graph.Layer,
		sbom.Digest: graph.Referrer, blob("sbom-config").Digest: graph.Config, blob("sbom-layer").Digest: graph.Layer,
		sigOfSig.Digest: graph.Referrer, blob("sigsig-config").Digest: graph.Config, blob("sigsig-layer").Digest: graph.Layer,
	}
	for d, k := range want {
		n, ok := got[d]
		if !ok {
			t.Errorf("%s (%s) not visited", d, k)
			continue
		}
		if n.Kind != k {
			t.Errorf("%s visited as %s, want %s", d, n.Kind, k)
		}
	}
	if len(got) != len(want) {
		t.Errorf("visited %d nodes, want %d", len(got), len(want))
	}
	if !got[absent.Digest].Missing || got[amd.Digest].Missing {
		t.Errorf("missing flags: absent %v, amd %v", got[absent.Digest].Missing, got[amd.Digest].Missing)
	}

	// Without referrers, the image alone.
	got, err = walk(t, s, v1.Descriptor{Digest: idx.Digest}, graph.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := got[sig.Digest]; ok || len(got) != 9 {
		t.Errorf("without referrers: %d nodes (want 9), signature visited %v", len(got), ok)
	}
}

// A walk is bounded: a hostile graph (an index naming thousands of
// manifests, each with referrers) stops at MaxNodes with ErrTooLarge; a
// referrers cycle ends.
func TestWalk_Bounded(t *testing.T) {
	s := newStore()
	var children []v1.Descriptor
	for i := range 3000 {
		children = append(children, s.image(t, fmt.Sprint("c", i), nil, fmt.Sprint("l", i)))
	}
	idx := s.put(t, v1.MediaTypeImageIndex, v1.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageIndex, Manifests: children})
	_, err := walk(t, s, idx, graph.Options{MaxNodes: 1000})
	if !errors.Is(err, graph.ErrTooLarge) {
		t.Fatalf("walk of 9001 nodes with a bound of 1000: %v", err)
	}
	if s.reads > 1000 {
		t.Fatalf("%d manifest reads past a bound of 1000", s.reads)
	}

	a := s.image(t, "a", nil)
	b := s.image(t, "b", &a)
	s.referrers[a.Digest] = []v1.Descriptor{b}
	s.referrers[b.Digest] = []v1.Descriptor{a} // a lie: a cycle
	got, err := walk(t, s, a, graph.Options{Referrers: true})
	if err != nil || len(got) != 4 {
		t.Fatalf("a referrers cycle: %d nodes, %v", len(got), err)
	}
}

// Bytes that are not a manifest are visited and not followed; a Source
// error ends the walk; a cancelled context ends it.
func TestWalk_Errors(t *testing.T) {
	s := newStore()
	junk := digest.FromString("<html>")
	s.manifests[junk] = [2]string{v1.MediaTypeImageManifest, "<html>"}
	got, err := walk(t, s, v1.Descriptor{Digest: junk}, graph.Options{Referrers: true})
	if err != nil || len(got) != 1 {
		t.Fatalf("junk root: %d nodes, %v", len(got), err)
	}
	boom := errors.New("boom")
	err = graph.Walk(context.Background(), failing{boom}, v1.Descriptor{Digest: junk}, graph.Options{}, func(graph.Node) error { return nil })
	if !errors.Is(err, boom) {
		t.Fatalf("source error: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := graph.Walk(ctx, s, v1.Descriptor{Digest: junk}, graph.Options{}, func(graph.Node) error { return nil }); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled: %v", err)
	}
}

type failing struct{ err error }

func (f failing) Manifest(context.Context, digest.Digest) (string, []byte, error) {
	return "", nil, f.err
}
func (f failing) Referrers(context.Context, digest.Digest) ([]v1.Descriptor, error) {
	return nil, f.err
}
