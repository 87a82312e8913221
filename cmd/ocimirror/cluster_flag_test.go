package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// --cluster-self completes a configuration whose cluster section has no
// self (the Kubernetes example: each pod's IP comes from the flag).
func TestLoadConfig_ClusterSelf(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "c.yaml")
	yaml := "storage:\n  s3:\n    endpoint: http://127.0.0.1:8333\n    bucket: b\ncluster:\n  peers: [\"dns+http://peers:5000\"]\n  secretFile: /run/secret\n"
	if err := os.WriteFile(file, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := loadConfig(file, "", "", "", "", "", "http://10.0.0.7:5000", nil)
	if err != nil || cfg.Cluster.Self != "http://10.0.0.7:5000" {
		t.Fatalf("with --cluster-self: %v, self %q", err, cfg.Cluster.Self)
	}
	if _, err := loadConfig(file, "", "", "", "", "", "", nil); err == nil || !strings.Contains(err.Error(), "cluster.self") {
		t.Errorf("without --cluster-self: %v, want an error naming cluster.self", err)
	}
	if _, err := loadConfig(file, "", "", "", "", "", "10.0.0.7:5000", nil); err == nil || !strings.Contains(err.Error(), "cluster.self") {
		t.Errorf("--cluster-self without a scheme: %v, want an error naming cluster.self", err)
	}
	if _, err := loadConfig("", "", "", "", "", "", "http://10.0.0.7:5000", nil); err == nil || !strings.Contains(err.Error(), "--cluster-self") {
		t.Errorf("--cluster-self without a cluster section: %v", err)
	}
}
