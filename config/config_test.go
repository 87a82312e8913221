package config

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
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

const s3yaml = "storage:\n  s3:\n    endpoint: http://127.0.0.1:8333\n    bucket: b\n"

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
		{"password and passwordFile", "upstreams:\n  - name: a.io\n    username: u\n    password: p\n    passwordFile: /run/pw\n", []string{"upstreams[0].passwordFile", "password and passwordFile"}},
		{"passwordFile and passwordEnv", "upstreams:\n  - name: a.io\n    username: u\n    passwordFile: /run/pw\n    passwordEnv: PW\n", []string{"upstreams[0].passwordEnv", "passwordFile and passwordEnv"}},
		{"passwordEnv without user", "upstreams:\n  - name: a.io\n    passwordEnv: PW\n", []string{"upstreams[0].username", "passwordEnv"}},
		{"passwordFile without user", "upstreams:\n  - name: a.io\n    passwordFile: /run/pw\n", []string{"upstreams[0].username", "passwordFile"}},
		{"token and tokenEnv", "upstreams:\n  - name: a.io\n    token: t\n    tokenEnv: T\n", []string{"upstreams[0].tokenEnv", "token and tokenEnv"}},
		{"tokenFile and passwordEnv", "upstreams:\n  - name: a.io\n    username: u\n    passwordEnv: PW\n    tokenFile: /run/t\n", []string{"upstreams[0].tokenFile", "not both"}},
		{"tokenEnv and username", "upstreams:\n  - name: a.io\n    username: u\n    tokenEnv: T\n", []string{"upstreams[0].tokenEnv", "not both"}},
		{"bad env name", "upstreams:\n  - name: a.io\n    username: u\n    passwordEnv: PW=x\n", []string{"upstreams[0].passwordEnv", `"PW=x"`}},
		{"password never shown", "upstreams:\n  - name: a.io\n    password: hunter2\n    passwordEnv: PW\n", []string{"upstreams[0].passwordEnv"}},
		{"access without auth", "access:\n  - repositories: [\"a/**\"]\n    users: [\"*\"]\n    actions: [pull]\n", []string{"access", "auth"}},
		{"auth without htpasswd", "auth:\n  tokenTTL: 5m\n", []string{"auth.htpasswd"}},
		{"bad token ttl", "auth:\n  htpasswd: /h\n  tokenTTL: 1s\n", []string{"auth.tokenTTL", "1s"}},
		{"bad realm", "auth:\n  htpasswd: /h\n  realm: ftp://x\n", []string{"auth.realm", `"ftp://x"`}},
		{"bad action", "auth:\n  htpasswd: /h\naccess:\n  - repositories: [\"a/**\"]\n    users: [\"*\"]\n    actions: [read]\n", []string{"access[0].actions[0]", `"read"`}},
		{"unknown group", "auth:\n  htpasswd: /h\naccess:\n  - repositories: [\"a/**\"]\n    users: [\"group:x\"]\n    actions: [pull]\n", []string{"access[0].users[0]", `"group:x"`}},
		{"bad glob", "auth:\n  htpasswd: /h\naccess:\n  - repositories: [\"a/[\"]\n    users: [\"*\"]\n    actions: [pull]\n", []string{"access[0].repositories[0]", `"a/["`}},
		{"rule for nobody", "auth:\n  htpasswd: /h\naccess:\n  - repositories: [\"a/**\"]\n    actions: [pull]\n", []string{"access[0]", "nobody"}},
		{"rule without repositories", "auth:\n  htpasswd: /h\naccess:\n  - users: [\"*\"]\n    actions: [pull]\n", []string{"access[0].repositories"}},
		{"s3 without bucket", "storage:\n  s3:\n    endpoint: 127.0.0.1:8333\n", []string{"storage.s3.bucket"}},
		{"s3 bad endpoint", "storage:\n  s3:\n    endpoint: ftp://x:1\n    bucket: b\n", []string{"storage.s3.endpoint", `"ftp://x:1"`}},
		{"s3 half credentials", "storage:\n  s3:\n    endpoint: x:1\n    bucket: b\n    accessKeyFile: /a\n", []string{"storage.s3.accessKeyFile", `"/a"`}},
		{"cluster without s3", "cluster:\n  self: http://a:1\n  peers: [http://a:1]\n  secretFile: /s\n", []string{"cluster", "storage.s3"}},
		{"cluster bad self", s3yaml + "cluster:\n  self: a:1\n  peers: [http://a:1]\n  secretFile: /s\n", []string{"cluster.self", `"a:1"`}},
		{"cluster bad peer", s3yaml + "cluster:\n  self: http://a:1\n  peers: [http://a:1, \"http://b:1/v2\"]\n  secretFile: /s\n", []string{"cluster.peers[1]", `"http://b:1/v2"`}},
		{"cluster dns peer without port", s3yaml + "cluster:\n  self: http://a:1\n  peers: [\"dns+http://peers\"]\n  secretFile: /s\n", []string{"cluster.peers[0]", `"dns+http://peers"`}},
		{"cluster without secret", s3yaml + "cluster:\n  self: http://a:1\n  peers: [http://a:1]\n", []string{"cluster.secretFile"}},
		{"cluster with auth, no signing key", s3yaml + "auth:\n  htpasswd: /h\ncluster:\n  self: http://a:1\n  peers: [http://a:1]\n  secretFile: /s\n", []string{"auth.signingKey"}},
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
			if strings.Contains(err.Error(), "hunter2") {
				t.Errorf("error %q shows a password", err)
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

func TestUpstream_Secrets(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil { // whatever the umask
			t.Fatal(err)
		}
		return p
	}
	pwFile := write("pw", "s3cret\n\n", 0o600)
	crlfFile := write("crlf", "s3cret\r\n", 0o600)
	inner := write("inner", "  spaced pw \n", 0o600)
	openFile := write("open", "s3cret\n", 0o644)
	emptyFile := write("empty", "\n", 0o600)
	bigFile := write("big", strings.Repeat("x", maxSecretFile+1), 0o600)
	tokFile := write("tok", "ghp_abc\n", 0o400)
	t.Setenv("OCIMIRROR_TEST_PW", "env-s3cret")
	t.Setenv("OCIMIRROR_TEST_EMPTY", "")

	tests := []struct {
		name              string
		up                Upstream
		password, token   string
		wantErr, wantWarn string
	}{
		{name: "inline", up: Upstream{Password: "p", Token: ""}, password: "p"},
		{name: "inline token", up: Upstream{Token: "t"}, token: "t"},
		{name: "none", up: Upstream{}},
		{name: "file, newlines trimmed", up: Upstream{PasswordFile: pwFile}, password: "s3cret"},
		{name: "file with CRLF", up: Upstream{PasswordFile: crlfFile}, password: "s3cret"},
		{name: "file, inner spaces kept", up: Upstream{PasswordFile: inner}, password: "  spaced pw "},
		{name: "file readable by others warns", up: Upstream{PasswordFile: openFile}, password: "s3cret", wantWarn: "readable by users other than its owner"},
		{name: "missing file", up: Upstream{PasswordFile: filepath.Join(dir, "nope")}, wantErr: "passwordFile: open " + filepath.Join(dir, "nope")},
		{name: "empty file", up: Upstream{PasswordFile: emptyFile}, wantErr: "passwordFile: " + `"` + emptyFile + `" is empty`},
		{name: "oversized file", up: Upstream{PasswordFile: bigFile}, wantErr: "is over 65536 bytes"},
		{name: "env", up: Upstream{PasswordEnv: "OCIMIRROR_TEST_PW"}, password: "env-s3cret"},
		{name: "unset env", up: Upstream{PasswordEnv: "OCIMIRROR_TEST_UNSET"}, wantErr: `passwordEnv: environment variable "OCIMIRROR_TEST_UNSET" is not set`},
		{name: "empty env", up: Upstream{PasswordEnv: "OCIMIRROR_TEST_EMPTY"}, wantErr: `passwordEnv: environment variable "OCIMIRROR_TEST_EMPTY" is empty`},
		{name: "token file", up: Upstream{TokenFile: tokFile}, token: "ghp_abc"},
		{name: "token env", up: Upstream{TokenEnv: "OCIMIRROR_TEST_PW"}, token: "env-s3cret"},
		{name: "unset token env", up: Upstream{TokenEnv: "OCIMIRROR_TEST_UNSET"}, wantErr: `tokenEnv: environment variable "OCIMIRROR_TEST_UNSET"`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var log bytes.Buffer
			pw, tok, err := tc.up.Secrets(slog.New(slog.NewTextHandler(&log, nil)))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if pw != tc.password || tok != tc.token {
				t.Errorf("password %q token %q, want %q %q", pw, tok, tc.password, tc.token)
			}
			if tc.wantWarn == "" && log.Len() > 0 || !strings.Contains(log.String(), tc.wantWarn) {
				t.Errorf("log %q, want %q", log.String(), tc.wantWarn)
			}
			if strings.Contains(log.String(), "s3cret") {
				t.Errorf("the log shows the secret: %s", log.String())
			}
		})
	}
}

func TestParse_PasswordSources(t *testing.T) {
	c, err := Parse([]byte(`
upstreams:
  - name: docker.io
    username: me
    passwordFile: /run/secrets/hub
  - name: ghcr.io
    tokenEnv: GHCR_TOKEN
  - name: quay.io
    username: robot
    passwordEnv: QUAY_PASSWORD
`))
	if err != nil {
		t.Fatal(err)
	}
	if u := c.Upstream("docker.io"); u.PasswordFile != "/run/secrets/hub" || u.Password != "" {
		t.Errorf("docker.io: %+v", u)
	}
	if u := c.Upstream("ghcr.io"); u.TokenEnv != "GHCR_TOKEN" {
		t.Errorf("ghcr.io: %+v", u)
	}
	if u := c.Upstream("quay.io"); u.PasswordEnv != "QUAY_PASSWORD" || u.Username != "robot" {
		t.Errorf("quay.io: %+v", u)
	}
}

// The README's access control example parses as written.
func TestParse_Auth(t *testing.T) {
	c, err := Parse([]byte(`auth:
  htpasswd: /etc/ocimirror/htpasswd
  groups: {team-a: [alice, bob]}
access:
  - repositories: ["ci/team-a/**"]
    users: [alice, "group:team-a"]
    actions: [pull, push, delete]
  - repositories: ["docker.io/**", "ghcr.io/**"]
    users: ["*"]                  # any authenticated user
    actions: [pull]
  - repositories: ["docker.io/library/**"]
    anonymous: true
    actions: [pull]
`))
	if err != nil {
		t.Fatal(err)
	}
	if c.Auth == nil || c.Auth.Htpasswd != "/etc/ocimirror/htpasswd" || c.Auth.TokenTTL.Duration != DefaultTokenTTL ||
		len(c.Auth.Groups["team-a"]) != 2 || len(c.Access) != 3 || !c.Access[2].Anonymous || c.Access[1].Users[0] != "*" {
		t.Fatalf("%+v %+v", c.Auth, c.Access)
	}
	if c, err := Parse(nil); err != nil || c.Auth != nil {
		t.Fatalf("no auth section: %+v %v", c.Auth, err)
	}
}

func TestParse_ScaleOut(t *testing.T) {
	c, err := Parse([]byte(s3yaml + "    pathStyle: true\n    tls: false\ncluster:\n  self: http://10.0.0.1:5000\n  peers: [\"dns+http://peers.ns.svc:5000\", http://10.0.0.2:5000]\n  secretFile: /run/secret\n  refresh: 30s\n"))
	if err != nil {
		t.Fatal(err)
	}
	s := c.Storage.S3
	if s == nil || s.Endpoint != "http://127.0.0.1:8333" || s.Bucket != "b" || s.Region != "us-east-1" || !s.PathStyle || s.TLS == nil || *s.TLS {
		t.Errorf("storage.s3 = %+v", s)
	}
	cl := c.Cluster
	if cl == nil || cl.Self != "http://10.0.0.1:5000" || len(cl.Peers) != 2 || cl.SecretFile != "/run/secret" || cl.Refresh.Duration != 30*time.Second {
		t.Errorf("cluster = %+v", cl)
	}
}

// The Kubernetes example's configuration is one ocimirror accepts (with
// the self that --cluster-self gives it).
func TestParse_KubernetesExample(t *testing.T) {
	raw, err := os.ReadFile("../deploy/kubernetes/configmap.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var cm struct {
		Data map[string]string `yaml:"data"`
	}
	if err := yaml.Unmarshal(raw, &cm); err != nil {
		t.Fatal(err)
	}
	text := cm.Data["config.yaml"]
	text = strings.Replace(text, "cluster:\n", "cluster:\n  self: http://10.0.0.7:5000\n", 1)
	c, err := Parse([]byte(text))
	if err != nil {
		t.Fatalf("deploy/kubernetes/configmap.yaml: %v", err)
	}
	if c.Storage.S3 == nil || c.Cluster == nil || c.Storage.S3.MaxSize.Bytes != 2<<40 {
		t.Errorf("storage.s3 %+v, cluster %+v", c.Storage.S3, c.Cluster)
	}
}
