package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// duDir is what du counts for a directory: the blocks its files use.
func duDir(t *testing.T, dir string) int64 {
	t.Helper()
	var n int64
	_ = filepath.Walk(dir, func(_ string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() {
			if st, ok := info.Sys().(*syscall.Stat_t); ok {
				n += st.Blocks * 512
			}
		}
		return nil
	})
	return n
}

// TestE2E_Storage_PinnedAndFull: with crane against distribution. A pinned
// multi-platform image is pulled; the mirror restarts with a budget its
// pinned bytes fill, so nothing can be evicted. A pull of a new image
// still succeeds (crane checks every digest), its layer is stored nowhere,
// and the store logs that it is full. With the upstream stopped, the
// pinned image is still pulled whole.
func TestE2E_Storage_PinnedAndFull(t *testing.T) {
	crane := tool(t, "crane")
	up := startDistribution(t, "registry")
	s := seedImages(t, up.host)
	pinned := "up.test/e2e/app:multi-oci"
	config := func(extra string) string {
		return strings.Replace(mirrorConfig("up.test", up.host, ""), "  path: {{DATA}}\n", "  path: {{DATA}}\n  pin: ["+pinned+"]\n"+extra, 1)
	}
	om := startMirror(t, config(""))
	run(t, nil, crane, "--insecure", "pull", "--format", "oci", om.host+"/e2e/app:multi-oci", filepath.Join(t.TempDir(), "warm"))

	// Restarted with a budget that the pinned image fills.
	data := filepath.Join(filepath.Dir(om.config), "data")
	om.stop()
	maxSize := duDir(t, data) + 256<<10
	yaml := strings.NewReplacer("{{LISTEN}}", "127.0.0.1:0", "{{DATA}}", data).Replace(config(fmt.Sprintf("  maxSize: %d\n", maxSize)))
	yaml += "admin:\n  listen: 127.0.0.1:0\n"
	if err := os.WriteFile(om.config, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	om.start(t)

	// A new image upstream, with a layer bigger than the room left.
	dir := t.TempDir()
	big := layerFile(t, dir, "big", 3<<20)
	run(t, nil, crane, "--insecure", "append", "--oci-empty-base", "-f", big, "-t", up.host+"/e2e/other:v1")
	layer := strings.TrimSpace(run(t, nil, crane, "--insecure", "manifest", up.host+"/e2e/other:v1"))
	run(t, nil, crane, "--insecure", "pull", "--format", "oci", om.host+"/e2e/other:v1", filepath.Join(dir, "full"))
	var m struct {
		Layers []struct{ Digest string } `json:"layers"`
	}
	if err := json.Unmarshal([]byte(layer), &m); err != nil || len(m.Layers) != 1 {
		t.Fatalf("the new image's manifest: %v %s", err, layer)
	}
	hex := strings.TrimPrefix(m.Layers[0].Digest, "sha256:")
	if _, err := os.Stat(filepath.Join(data, "blobs", "sha256", hex[:2], hex)); err == nil {
		t.Fatal("the new layer was stored, over the budget")
	}
	if !strings.Contains(om.log.String(), "store full") {
		t.Error("ocimirror did not log that the store is full")
	}
	if du := duDir(t, data); du > maxSize+1<<20 {
		t.Errorf("the data directory holds %d bytes, over the budget of %d", du, maxSize)
	}

	// The pinned image, whole, with the upstream gone.
	up.stop()
	layout := filepath.Join(t.TempDir(), "pinned")
	run(t, nil, crane, "--insecure", "pull", "--format", "oci", om.host+"/e2e/app:multi-oci", layout)
	idx, err := os.ReadFile(filepath.Join(layout, "index.json"))
	if err != nil || !strings.Contains(string(idx), s.digests["e2e/app:multi-oci"]) {
		t.Fatalf("pinned image pulled with the upstream stopped: %s %v", idx, err)
	}
}
