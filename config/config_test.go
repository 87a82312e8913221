package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestDefault(t *testing.T) {
	c := Default()
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if c.Listen != ":5000" || c.Storage.Path != "./ocimirror-data" || c.DefaultUpstream != "docker.io" {
		t.Errorf("defaults: %+v", c)
	}
	var names []string
	for _, u := range c.Upstreams {
		names = append(names, u.Name+"="+u.URL)
		if u.TagTTL.Duration != 5*time.Minute {
			t.Errorf("%s tagTTL %v", u.Name, u.TagTTL)
		}
	}
	want := "docker.io=https://registry-1.docker.io,ghcr.io=https://ghcr.io,quay.io=https://quay.io,registry.k8s.io=https://registry.k8s.io"
	if strings.Join(names, ",") != want {
		t.Errorf("upstreams %s", strings.Join(names, ","))
	}
}

func TestParse(t *testing.T) {
	dir := t.TempDir()
	dockerCfg := filepath.Join(dir, "config.json")
	os.WriteFile(dockerCfg, []byte(`{"auths":{}}`), 0o600)
	c, err := Parse([]byte(`
listen: "127.0.0.1:6000"
storage:
  path: /var/lib/ocimirror
  pin: ["docker.io/library/alpine:3.20", "ghcr.io/org/app@sha256:0000000000000000000000000000000000000000000000000000000000000000"]
defaultUpstream: docker.io
log:
  format: json
  level: debug
upstreams:
  - name: docker.io
    url: https://registry-1.docker.io
    tagTTL: 10m
    username: me
    password: secret
  - name: registry.internal:5000
    url: http://registry.internal:5000/
    tagTTL: 30s
  - name: ghcr.io
    token: abc
  - name: quay.io
    dockerConfig: ` + dockerCfg + `
    push: forward
    tls:
      insecureSkipVerify: true
hosted: ["ci/", "local"]
readOnly: true
offline: true
admin:
  listen: 127.0.0.1:7001
sync:
  - repository: docker.io/library/alpine
    semver: ">=3.19"
    platforms: [linux/amd64]
`))
	if err != nil {
		t.Fatal(err)
	}
	if c.Listen != "127.0.0.1:6000" || c.Storage.Path != "/var/lib/ocimirror" || c.Log.Format != LogJSON || c.Log.Level != "debug" {
		t.Errorf("top level: %+v", c)
	}
	if !c.Offline || c.Admin.Listen != "127.0.0.1:7001" || len(c.Sync) != 1 || c.Sync[0].Interval.Duration != time.Hour || c.Sync[0].Platforms[0] != "linux/amd64" {
		t.Errorf("offline, admin, sync: %v %+v %+v", c.Offline, c.Admin, c.Sync)
	}
	if len(c.Storage.Pin) != 2 || c.Storage.Pin[0] != "docker.io/library/alpine:3.20" {
		t.Errorf("storage.pin: %q", c.Storage.Pin)
	}
	if len(c.Upstreams) != 4 {
		t.Fatalf("upstreams: %+v", c.Upstreams)
	}
	hub, internal, gh, quay := c.Upstreams[0], c.Upstreams[1], c.Upstreams[2], c.Upstreams[3]
	if hub.TagTTL.Duration != 10*time.Minute || hub.Username != "me" || hub.Password != "secret" {
		t.Errorf("docker.io: %+v", hub)
	}
	if internal.URL != "http://registry.internal:5000" || internal.TagTTL.Duration != 30*time.Second {
		t.Errorf("internal: %+v", internal)
	}
	if gh.URL != "https://ghcr.io" || gh.Token != "abc" || gh.TagTTL.Duration != DefaultTagTTL {
		t.Errorf("ghcr.io: %+v", gh)
	}
	if !quay.TLS.InsecureSkipVerify || quay.DockerConfig != dockerCfg || quay.Push != PushForward || gh.Push != PushLocal {
		t.Errorf("quay.io: %+v", quay)
	}
	if strings.Join(c.Hosted, ",") != "ci/,local/" || !c.ReadOnly {
		t.Errorf("hosted %v readOnly %v", c.Hosted, c.ReadOnly)
	}
	// Fields the file leaves out keep their defaults.
	if c.Cache.ManifestBytes != Default().Cache.ManifestBytes || c.ShutdownTimeout.Duration != 30*time.Second {
		t.Errorf("defaults lost: %+v", c)
	}
}

func TestParse_UpstreamListReplacesDefaults(t *testing.T) {
	c, err := Parse([]byte("upstreams:\n  - name: 127.0.0.1:5002\n    url: http://127.0.0.1:5002\n"))
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Upstreams) != 1 || c.DefaultUpstream != "" {
		t.Errorf("upstreams %+v, default %q", c.Upstreams, c.DefaultUpstream)
	}
}

func TestParse_Errors(t *testing.T) {
	tests := []struct {
		name, yaml string
		want       []string // substrings of the error: the field and the value
	}{
		{"bad duration", "upstreams:\n  - name: a.io\n    tagTTL: 5x\n", []string{"upstreams[0].tagTTL", `"5x"`}},
		{"negative duration", "upstreams:\n  - name: a.io\n  - name: b.io\n    tagTTL: -1s\n", []string{"upstreams[1].tagTTL", `"-1s"`}},
		{"bad url", "upstreams:\n  - name: a.io\n    url: ftp://a.io\n", []string{"upstreams[0].url", `"ftp://a.io"`}},
		{"bad name", "upstreams:\n  - name: https://a.io\n", []string{"upstreams[0].name", `"https://a.io"`}},
		{"duplicate", "upstreams:\n  - name: a.io\n  - name: a.io\n", []string{"upstreams[1].name", `"a.io"`}},
		{"unknown default", "defaultUpstream: nope.io\n", []string{"defaultUpstream", `"nope.io"`}},
		{"bad listen", "listen: 5000\n", []string{"listen", `"5000"`}},
		{"unknown field", "upstreams:\n  - name: a.io\n    tagTtl: 5m\n", []string{"tagTtl"}},
		{"bad log format", "log:\n  format: xml\n", []string{"log.format", `"xml"`}},
		{"token and password", "upstreams:\n  - name: a.io\n    token: t\n    username: u\n", []string{"upstreams[0].token"}},
		{"password without user", "upstreams:\n  - name: a.io\n    password: p\n", []string{"upstreams[0].username"}},
		{"missing ca file", "upstreams:\n  - name: a.io\n    tls:\n      caFile: /nonexistent.pem\n", []string{"upstreams[0].tls.caFile", "/nonexistent.pem"}},
		{"missing docker config", "upstreams:\n  - name: a.io\n    dockerConfig: /nonexistent.json\n", []string{"upstreams[0].dockerConfig", "/nonexistent.json"}},
		{"tls half", "tls:\n  certFile: a.pem\n", []string{"tls", "a.pem"}},
		{"bad entries", "cache:\n  manifestEntries: -1\n", []string{"cache.manifestEntries", "-1"}},
		{"bad size", "cache:\n  manifestBytes: 64 parsecs\n", []string{"cache.manifestBytes", "64 parsecs"}},
		{"tiny size", "cache:\n  metadataBytes: 10\n", []string{"cache.metadataBytes", "10"}},
		{"bad uploads", "uploads:\n  perClient: -3\n", []string{"uploads.perClient", "-3"}},
		{"bad upload idle", "uploads:\n  idle: soon\n", []string{"uploads.idle", "soon"}},
		{"not yaml", "listen: [\n", []string{"yaml"}},
		{"bad push mode", "upstreams:\n  - name: a.io\n    push: always\n", []string{"push", `"always"`}},
		{"bad hosted prefix", "hosted: [\"CI/\"]\n", []string{"hosted[0]", `"CI/"`}},
		{"bad admin listen", "admin:\n  listen: 5001\n", []string{"admin.listen", `"5001"`}},
		{"sync without repository", "sync:\n  - tags: v1\n", []string{"sync[0].repository"}},
		{"sync bad tags", "sync:\n  - repository: a/b\n    tags: \"(\"\n", []string{"sync[0].tags", `"("`}},
		{"sync bad semver", "sync:\n  - repository: a/b\n    semver: soon\n", []string{"sync[0].semver", `"soon"`}},
		{"sync short interval", "sync:\n  - repository: a/b\n    interval: 5s\n", []string{"sync[0].interval", "5s"}},
		{"empty pin", "storage:\n  pin: [\"  \"]\n", []string{"storage.pin[0]", `"  "`}},
		{"empty hosted prefix", "hosted: [\"/\"]\n", []string{"hosted[0]", `"/"`}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.yaml))
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not name %q", err, w)
				}
			}
		})
	}
}

func TestSetUpstream(t *testing.T) {
	c := Default()
	c.SetUpstream("docker.io", "http://127.0.0.1:1")
	c.SetUpstream("127.0.0.1:5002", "http://127.0.0.1:5002")
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if c.Upstream("docker.io").URL != "http://127.0.0.1:1" || c.Upstream("127.0.0.1:5002") == nil || len(c.Upstreams) != 5 {
		t.Errorf("%+v", c.Upstreams)
	}
}
