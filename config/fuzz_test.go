package config

// FuzzParse checks Parse on arbitrary YAML. It never panics, is
// deterministic, and:
//   - On failure nothing is returned, and the error names the field
//     ("upstreams[1].url: ...") or is YAML's own ("yaml: line 3: ...").
//   - On success the result holds what Validate promises: a host:port to
//     listen on, a storage path, sizes between 1KiB and 1TiB, upload bounds
//     of at least 1 and an idle time of at least 1s, hosted prefixes ending
//     in '/', a default upstream that is configured, and upstreams with a
//     lower-case host name, a base URL (http:// or https://, a host, no
//     trailing '/', query or fragment), a positive tag TTL and a push mode.
//   - Validate on the result succeeds again and changes nothing.
//
// Seeds: the README's example configuration (read from README.md, as is
// and without its file references), an empty file, unknown fields, bad
// durations, sizes, URLs and names.
//
// Run with: go test -run '^$' -fuzz '^FuzzParse$' -fuzztime 45s ./config/

import (
	"bytes"
	"net"
	"net/url"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

// readmeConfig is the YAML block of README.md's "Configure it" section.
func readmeConfig(f *testing.F) []byte {
	f.Helper()
	b, err := os.ReadFile("../README.md")
	if err != nil {
		f.Fatal(err)
	}
	_, section, ok := bytes.Cut(b, []byte("\n## Configure it\n"))
	_, block, ok2 := bytes.Cut(section, []byte("\n```yaml\n"))
	block, _, ok3 := bytes.Cut(block, []byte("\n```\n"))
	if !ok || !ok2 || !ok3 {
		f.Fatal("README.md: no yaml block under \"## Configure it\"")
	}
	return append(block, '\n')
}

// fieldError is how Validate's messages start: the field, then ": ".
var fieldError = regexp.MustCompile(`^[a-zA-Z][a-zA-Z0-9]*(\[\d+\])?(\.[a-zA-Z][a-zA-Z0-9]*(\[\d+\])?)*: `)

func FuzzParse(f *testing.F) {
	readme := readmeConfig(f)
	f.Add(readme)
	// Without the files it names, which do not exist here.
	var noFiles []byte
	for _, line := range bytes.SplitAfter(readme, []byte("\n")) {
		if !bytes.Contains(line, []byte("dockerConfig:")) && !bytes.Contains(line, []byte("caFile:")) {
			noFiles = append(noFiles, line...)
		}
	}
	f.Add(noFiles)
	for _, s := range []string{
		"", "\n", "---\n", "# only a comment\n", "{}", "[]", "null", "~", "listen: \":5000\"\n...\n--- \nlisten: x\n",
		"listen: 127.0.0.1:6000\n", "listen: 5000\n", "listen: \"[::1]:5000\"\n", "listen: \":http\"\n",
		"storage:\n  path: \"\"\n", "storage: /data\n",
		"unknownField: 1\n", "upstreams:\n  - name: a.io\n    tagTtl: 5m\n", "log:\n  colour: true\n",
		"log:\n  format: JSON\n  level: WARN\n", "log:\n  format: xml\n",
		"shutdownTimeout: 0s\n", "shutdownTimeout: -1s\n", "shutdownTimeout: 5x\n", "shutdownTimeout: 1h1m1s1ms1us1ns\n",
		"shutdownTimeout: 9999999999h\n", "uploads:\n  idle: 999ms\n", "uploads:\n  idle: 1s\n  max: 1\n  perClient: 1\n",
		"uploads:\n  max: 0\n", "uploads:\n  perClient: -3\n", "uploads:\n  max: 99999999999999999999\n",
		"cache:\n  manifestBytes: 64MiB\n  metadataBytes: 1KiB\n  tagListBytes: 1TiB\n",
		"cache:\n  manifestBytes: 1023\n", "cache:\n  manifestBytes: 1.5 TiB\n", "cache:\n  manifestBytes: -5KiB\n",
		"cache:\n  manifestBytes: 64 parsecs\n", "cache:\n  metadataBytes: NaN\n", "cache:\n  tagListBytes: 1e400\n",
		"cache:\n  manifestBytes: 0\n", "cache:\n  manifestEntries: -1\n  metadataEntries: 10\n",
		"upstreams: []\n", "upstreams:\n", "upstreams:\n  - name: 127.0.0.1:5002\n    url: http://127.0.0.1:5002\n",
		"upstreams:\n  - name: A.IO\n    url: HTTPS://A.IO/\n", "upstreams:\n  - name: a.io\n    url: https://a.io//\n",
		"upstreams:\n  - name: a.io\n    url: ftp://a.io\n", "upstreams:\n  - name: a.io\n    url: https://a.io/?x=1\n",
		"upstreams:\n  - name: a.io\n    url: https:///path\n", "upstreams:\n  - name: a.io\n    url: https://a.io#x\n",
		"upstreams:\n  - name: a.io\n    url: https://a.io?\n", "upstreams:\n  - name: a.io\n    url: https://:443/\n",
		"upstreams:\n  - name: a.io\n    url: https://a.io/mirror/\n", "upstreams:\n  - name: a.io\n    url: \"https://a.io/\\x00\"\n",
		"upstreams:\n  - name: https://a.io\n", "upstreams:\n  - name: a.io:\n", "upstreams:\n  - name: \"[::1]:5000\"\n",
		"upstreams:\n  - name: a.io\n  - name: A.io\n", "upstreams:\n  - name: a.io\n    tagTTL: 0s\n",
		"upstreams:\n  - name: a.io\n    push: FORWARD\n", "upstreams:\n  - name: a.io\n    push: always\n",
		"upstreams:\n  - name: a.io\n    token: t\n    username: u\n", "upstreams:\n  - name: a.io\n    password: p\n",
		"defaultUpstream: Docker.IO\n", "defaultUpstream: nope.io\n",
		"upstreams:\n  - name: ghcr.io\n", "upstreams:\n  - name: ghcr.io\ndefaultUpstream: GHCR.io\n",
		"hosted: [\"ci/\", \"local\", \"a/b/\"]\n", "hosted: [\"CI/\"]\n", "hosted: [\"/\"]\n", "hosted: [\"//ci//\"]\n", "hosted: []\n",
		"tls:\n  certFile: a.pem\n", "tls:\n  certFile: a.pem\n  keyFile: a.key\n", "readOnly: yes\n", "readOnly: true\n",
		"listen: &a \":5000\"\nstorage:\n  path: *a\n", "a: &a [*a, *a]\n", "listen: !!binary Ojo=\n", "listen: [\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := Parse(b)
		c2, err2 := Parse(b)
		if (err == nil) != (err2 == nil) || !reflect.DeepEqual(c, c2) {
			t.Fatalf("Parse is not deterministic: %v, then %v", err, err2)
		}
		if err != nil {
			msg := err.Error()
			if !reflect.DeepEqual(c, Config{}) || !strings.HasPrefix(msg, "yaml: ") && !fieldError.MatchString(msg) {
				t.Fatalf("Parse failed with %+v and an error that names no field: %q", c, msg)
			}
			return
		}
		checkValid(t, c)
		again := c
		again.Upstreams = slices.Clone(c.Upstreams)
		again.Hosted = slices.Clone(c.Hosted)
		if err := again.Validate(); err != nil {
			t.Fatalf("Validate refuses what Parse returned: %v", err)
		}
		if !reflect.DeepEqual(again, c) {
			t.Fatalf("Validate changed what Parse returned:\n%+v\n%+v", c, again)
		}
	})
}

// checkValid asserts what a validated Config holds.
func checkValid(t *testing.T, c Config) {
	t.Helper()
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		t.Fatalf("listen %q: %v", c.Listen, err)
	}
	if (c.TLS.CertFile == "") != (c.TLS.KeyFile == "") || c.Storage.Path == "" {
		t.Fatalf("tls %+v storage %+v", c.TLS, c.Storage)
	}
	for _, s := range []Size{c.Cache.ManifestBytes, c.Cache.MetadataBytes, c.Cache.TagListBytes} {
		if s.Bytes < 1<<10 || s.Bytes > 1<<40 || s.raw != "" {
			t.Fatalf("cache size %+v", s)
		}
	}
	st := c.Storage
	for _, s := range []Size{st.MaxSize, st.MinFree} {
		if s.Bytes != 0 && (s.Bytes < 1<<10 || s.Bytes > 1<<60) || s.raw != "" {
			t.Fatalf("storage size %+v", s)
		}
	}
	if st.LowWatermark < 1 || st.LowWatermark >= st.HighWatermark || st.HighWatermark > 100 {
		t.Fatalf("watermarks %d %d", st.LowWatermark, st.HighWatermark)
	}
	if c.Cache.ManifestEntries < 0 || c.Cache.MetadataEntries < 0 || c.Uploads.Max < 1 || c.Uploads.PerClient < 1 {
		t.Fatalf("cache %+v uploads %+v", c.Cache, c.Uploads)
	}
	if c.Uploads.Idle.Duration < time.Second || c.Uploads.Idle.raw != "" || c.ShutdownTimeout.Duration < 0 || c.ShutdownTimeout.raw != "" {
		t.Fatalf("uploads.idle %+v shutdownTimeout %+v", c.Uploads.Idle, c.ShutdownTimeout)
	}
	switch c.Log.Format {
	case LogText, LogJSON:
	default:
		t.Fatalf("log.format %q", c.Log.Format)
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		t.Fatalf("log.level %q", c.Log.Level)
	}
	for _, h := range c.Hosted {
		p := strings.TrimSuffix(h, "/")
		if !strings.HasSuffix(h, "/") || p == "" || strings.Contains(p, "//") || strings.HasPrefix(p, "/") || !validRepoPrefix(p) {
			t.Fatalf("hosted %q", h)
		}
	}
	names := map[string]bool{}
	for _, u := range c.Upstreams {
		if u.Name == "" || u.Name != strings.ToLower(u.Name) || !validHost(u.Name) || names[u.Name] {
			t.Fatalf("upstream name %q (names so far %v)", u.Name, names)
		}
		names[u.Name] = true
		// A base URL the client appends /v2/... to.
		p, err := url.Parse(u.URL)
		if err != nil || !strings.HasPrefix(u.URL, "http://") && !strings.HasPrefix(u.URL, "https://") ||
			strings.HasSuffix(u.URL, "/") || strings.ContainsAny(u.URL, "?#") || p.Hostname() == "" {
			t.Fatalf("upstream %s: URL %q", u.Name, u.URL)
		}
		if u.TagTTL.Duration <= 0 || u.TagTTL.raw != "" || (u.Push != PushLocal && u.Push != PushForward) {
			t.Fatalf("upstream %s: tagTTL %+v push %q", u.Name, u.TagTTL, u.Push)
		}
		if u.Token != "" && (u.Username != "" || u.Password != "") || u.Password != "" && u.Username == "" {
			t.Fatalf("upstream %s: credentials %q/%q token %q", u.Name, u.Username, u.Password, u.Token)
		}
	}
	if c.DefaultUpstream != "" && !names[c.DefaultUpstream] {
		t.Fatalf("defaultUpstream %q is not among %v", c.DefaultUpstream, names)
	}
}
