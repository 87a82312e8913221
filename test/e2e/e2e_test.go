// Package e2e runs ocimirror as a process between real registries and real
// clients, all on 127.0.0.1: distribution v3 and Debian's docker-registry
// as upstreams; oras, regctl, crane, skopeo, containerd and the OCI
// conformance suite as clients.
//
// Tools come from .tools/bin (test/tools/install.sh) or PATH. A missing
// tool skips its test with the command that installs it, except when
// OCIMIRROR_E2E_REQUIRE is set (CI), where it fails.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// ocimirrorBin is built once by TestMain.
var ocimirrorBin string

// repoRoot is the repository's top directory.
var repoRoot string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "ocimirror-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	wd, _ := os.Getwd()
	repoRoot = filepath.Clean(filepath.Join(wd, "..", ".."))
	ocimirrorBin = filepath.Join(dir, "ocimirror")
	build := exec.Command("go", "build", "-o", ocimirrorBin, "./cmd/ocimirror")
	build.Dir = repoRoot
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building ocimirror: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// install says how to get each tool.
var install = map[string]string{
	"registry":        "test/tools/install.sh registry",
	"oras":            "test/tools/install.sh oras",
	"regctl":          "test/tools/install.sh regctl",
	"crane":           "test/tools/install.sh crane",
	"oci-conformance": "test/tools/install.sh oci-conformance",
	"weed":            "test/tools/install.sh weed",
	"docker-registry": "apt-get install -y docker-registry",
	"containerd":      "apt-get install -y containerd",
	"ctr":             "apt-get install -y containerd",
	"skopeo":          "apt-get install -y skopeo",
	"prometheus":      "apt-get install -y prometheus",
	"promtool":        "apt-get install -y prometheus",
}

// tool returns the path of a tool, or skips (fails in CI) when it is missing.
func tool(t *testing.T, name string) string {
	t.Helper()
	if p := filepath.Join(repoRoot, ".tools", "bin", name); isExecutable(p) {
		return p
	}
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	missing(t, name+" is not installed; install it with: "+install[name])
	return ""
}

func isExecutable(p string) bool {
	st, err := os.Stat(p)
	return err == nil && !st.IsDir() && st.Mode()&0o111 != 0
}

// missing skips a test for a missing prerequisite, or fails it in CI.
func missing(t *testing.T, msg string) {
	t.Helper()
	if os.Getenv("OCIMIRROR_E2E_REQUIRE") != "" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// logBuffer collects a process's output, safe for concurrent use.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// proc is a server process a test started; the test's cleanup stops it.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  *logBuffer
	done chan struct{}
}

func startProc(t *testing.T, name string, env []string, args ...string) *proc {
	t.Helper()
	p := &proc{name: filepath.Base(name), cmd: exec.Command(name, args...), log: &logBuffer{}, done: make(chan struct{})}
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			t.Logf("--- %s output (last 4 KiB):\n%s", p.name, tail(p.log.String(), 4096))
		}
	})
	return p
}

// stop sends SIGTERM and waits, then SIGKILL after 15 s.
func (p *proc) stop() {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// kill sends SIGKILL and waits.
func (p *proc) kill() {
	_ = p.cmd.Process.Kill()
	<-p.done
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// waitHTTP waits for a URL to answer (any status), at most 30 s.
func waitHTTP(t *testing.T, p *proc, u string) {
	t.Helper()
	for i := 0; i < 300; i++ {
		select {
		case <-p.done:
			t.Fatalf("%s exited:\n%s", p.name, tail(p.log.String(), 4096))
		default:
		}
		resp, err := http.Get(u)
		if err == nil {
			resp.Body.Close()
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("%s did not answer at %s", p.name, u)
}

// registryServer is a running upstream registry.
type registryServer struct {
	*proc
	host string // 127.0.0.1:port
	dir  string
	conf string
	bin  string
}

// startDistribution runs distribution v3 (or, with bin "docker-registry",
// Debian's distribution 2.8) with filesystem storage and deletes enabled.
func startDistribution(t *testing.T, bin string) *registryServer {
	t.Helper()
	r := &registryServer{host: freeAddr(t), dir: t.TempDir(), bin: tool(t, bin)}
	r.conf = filepath.Join(r.dir, "config.yml")
	// The access log (one line a request) counts what reaches the upstream.
	cfg := fmt.Sprintf(`version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
`, filepath.Join(r.dir, "data"), r.host)
	if err := os.WriteFile(r.conf, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	r.restart(t)
	return r
}

// restart starts the registry (again) on the same data and address.
func (r *registryServer) restart(t *testing.T) {
	t.Helper()
	// distribution v3 exports traces to localhost:4318 unless told not to.
	r.proc = startProc(t, r.bin, []string{"OTEL_TRACES_EXPORTER=none"}, "serve", r.conf)
	waitHTTP(t, r.proc, "http://"+r.host+"/v2/")
}

var accessRE = regexp.MustCompile(`"(GET|HEAD|PUT|POST|PATCH|DELETE) (/v2/\S*) HTTP/`)

// accessLines returns the requests in this process's access log.
func (p *proc) accessLines() []string {
	var out []string
	for _, m := range accessRE.FindAllStringSubmatch(p.log.String(), -1) {
		out = append(out, m[1]+" "+m[2])
	}
	return out
}

// requests returns the API requests the registry has served since it was
// (re)started last, /v2/ pings left out.
func (r *registryServer) requests() []string {
	var out []string
	for _, l := range r.proc.accessLines() {
		if !strings.HasSuffix(l, " /v2/") {
			out = append(out, l)
		}
	}
	return out
}

// mirror is a running ocimirror.
type mirror struct {
	*proc
	host   string
	config string
	// flags follow serve --config FILE.
	flags []string
}

var listenRE = regexp.MustCompile(`ocimirror listening.* addr=(\S+)`)

// startMirror runs ocimirror with a YAML configuration; {{LISTEN}} and
// {{DATA}} in it are filled in.
func startMirror(t *testing.T, yaml string) *mirror {
	t.Helper()
	dir := t.TempDir()
	m := &mirror{config: filepath.Join(dir, "ocimirror.yaml")}
	yaml = strings.NewReplacer("{{LISTEN}}", "127.0.0.1:0", "{{DATA}}", filepath.Join(dir, "data")).Replace(yaml)
	if !strings.Contains(yaml, "\nadmin:") {
		yaml += "admin:\n  listen: 127.0.0.1:0\n" // mirrors run side by side
	}
	if err := os.WriteFile(m.config, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	m.start(t)
	return m
}

func (m *mirror) start(t *testing.T) {
	t.Helper()
	m.proc = startProc(t, ocimirrorBin, nil, append([]string{"serve", "--config", m.config}, m.flags...)...)
	for i := 0; i < 300; i++ {
		if g := listenRE.FindStringSubmatch(m.log.String()); g != nil {
			m.host = g[1]
			return
		}
		select {
		case <-m.done:
			t.Fatalf("ocimirror exited:\n%s", m.log.String())
		case <-time.After(50 * time.Millisecond):
		}
	}
	t.Fatalf("ocimirror did not start:\n%s", m.log.String())
}

// requestLines returns ocimirror's request log lines.
func (m *mirror) requestLines() []string {
	var out []string
	sc := bufio.NewScanner(strings.NewReader(m.log.String()))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if strings.Contains(sc.Text(), "msg=request ") {
			out = append(out, sc.Text())
		}
	}
	return out
}

// run runs a client command (2 minutes at most) and returns its output;
// the test fails on a non-zero exit.
func run(t *testing.T, env []string, name string, args ...string) string {
	t.Helper()
	return runIn(t, "", env, name, args...)
}

// runIn is run in a working directory.
func runIn(t *testing.T, dir string, env []string, name string, args ...string) string {
	t.Helper()
	out, err := runErr(dir, env, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", filepath.Base(name), strings.Join(args, " "), err, out)
	}
	return out
}

func runErr(dir string, env []string, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

// httpGet fetches a URL and returns status and body.
func httpGet(t *testing.T, u string, headers ...string) (int, []byte, http.Header) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, u, nil)
	for _, h := range headers {
		k, v, _ := strings.Cut(h, ":")
		req.Header.Add(k, strings.TrimSpace(v))
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b, resp.Header
}
