// Command compare measures ocimirror side by side with distribution v3 in
// proxy mode, both in front of the same distribution v3 upstream, in one
// run on one machine, and prints a Markdown table with ratios.
//
// It fails (exit 1) only when a pull returns wrong bytes or an error; the
// figures themselves are reported, never asserted.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/crypto/bcrypt"
)

func main() {
	var o options
	flag.StringVar(&o.registry, "registry", ".tools/bin/registry", "distribution v3 `binary`")
	flag.StringVar(&o.ocimirror, "ocimirror", "", "ocimirror `binary` (built from ./cmd/ocimirror if empty)")
	flag.StringVar(&o.wrk, "wrk", "wrk", "wrk `binary`")
	flag.StringVar(&o.layers, "layers", "256M,32M,4M,1M", "image layer `sizes`")
	flag.IntVar(&o.stampede, "clients", 16, "clients pulling the uncached blob at once")
	flag.IntVar(&o.runs, "runs", 3, "repetitions of each measure (medians are reported)")
	flag.DurationVar(&o.wrkDuration, "duration", 10*time.Second, "wrk duration per manifest measure")
	flag.StringVar(&o.workdir, "workdir", "", "`directory` for data and logs (a temporary one if empty)")
	flag.StringVar(&o.baseline, "baseline", "", "also measure manifest req/s of ocimirror built at this git `ref` (an earlier release), in the same run")
	flag.StringVar(&o.distinct, "distinct", "32x16M", "cold start: `N`xSIZE distinct uncached blobs pulled at once, by 1 and by 2 clients each (\"0\" to skip)")
	flag.BoolVar(&o.auth, "auth", false, "also measure manifest hits of an ocimirror with access control: anonymous, and with a bearer token")
	flag.Parse()
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "compare:", err)
		os.Exit(1)
	}
}

type options struct {
	registry, ocimirror, wrk, layers, workdir, baseline, distinct string
	stampede, runs                                                int
	wrkDuration                                                   time.Duration
	auth                                                          bool
}

const repo = "bench/app"

// target is one proxy under test.
type target struct {
	name    string
	url     string
	cmd     *exec.Cmd
	counter *counter
	mem     *memSampler
	results map[string][]float64
}

func run(o options) error {
	dir := o.workdir
	if dir == "" {
		var err error
		if dir, err = os.MkdirTemp("", "ocimirror-compare-"); err != nil {
			return err
		}
		defer os.RemoveAll(dir)
	}
	var procs []*exec.Cmd
	defer func() {
		for _, p := range procs {
			stop(p)
		}
	}()
	if o.ocimirror == "" {
		o.ocimirror = filepath.Join(dir, "ocimirror")
		build := exec.Command("go", "build", "-o", o.ocimirror, "./cmd/ocimirror")
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			return fmt.Errorf("building ocimirror: %w", err)
		}
	}

	baseBin := ""
	if o.baseline != "" {
		var err error
		if baseBin, err = buildAt(o.baseline, dir); err != nil {
			return fmt.Errorf("building ocimirror at %s: %w", o.baseline, err)
		}
	}

	// The upstream: distribution v3 with the image and one extra 256 MiB
	// blob per run for the stampede.
	upAddr := freeAddr()
	up, err := startRegistry(o.registry, filepath.Join(dir, "upstream"), upAddr, "", "error")
	if err != nil {
		return err
	}
	procs = append(procs, up)
	upURL := "http://" + upAddr
	if err := waitHTTP(upURL + "/v2/"); err != nil {
		return fmt.Errorf("upstream: %w", err)
	}
	sizes, err := parseSizes(o.layers)
	if err != nil {
		return err
	}
	logf("seeding the upstream: layers %s and %d stampede blobs of %d MiB", o.layers, o.runs, sizes[0]>>20)
	img, err := seedImage(upURL, sizes)
	if err != nil {
		return err
	}
	var stampedeBlobs []string
	for i := 0; i < o.runs; i++ {
		d, err := pushBlob(upURL, randomBytes(sizes[0]))
		if err != nil {
			return err
		}
		stampedeBlobs = append(stampedeBlobs, d)
	}

	// The two proxies, each behind its own request counter.
	distCounter, err := startCounter(upURL)
	if err != nil {
		return err
	}
	omCounter, err := startCounter(upURL)
	if err != nil {
		return err
	}
	distAddr, omAddr := freeAddr(), freeAddr()
	dist, err := startRegistry(o.registry, filepath.Join(dir, "dist-proxy"), distAddr, distCounter.url, "info")
	if err != nil {
		return err
	}
	procs = append(procs, dist)
	om := exec.Command(o.ocimirror, "serve", "--listen", omAddr, "--admin-listen", "127.0.0.1:0", "--data", filepath.Join(dir, "ocimirror-data"),
		"--upstream", "upstream.bench="+omCounter.url, "--default-upstream", "upstream.bench")
	if om.Stderr, err = os.Create(filepath.Join(dir, "ocimirror.log")); err != nil {
		return err
	}
	if err := om.Start(); err != nil {
		return err
	}
	procs = append(procs, om)
	targets := []*target{
		{name: "distribution v3 proxy", url: "http://" + distAddr, cmd: dist, counter: distCounter},
		{name: "ocimirror", url: "http://" + omAddr, cmd: om, counter: omCounter},
	}
	for _, t := range targets {
		if err := waitHTTP(t.url + "/v2/"); err != nil {
			return fmt.Errorf("%s: %w", t.name, err)
		}
		t.mem = sampleMemory(t.cmd.Process.Pid)
		t.results = map[string][]float64{}
	}

	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64, DisableCompression: true}}
	// Cold start first, on fresh processes: many distinct blobs at once.
	if o.distinct != "0" {
		n, size, err := parseDistinct(o.distinct)
		if err != nil {
			return fmt.Errorf("--distinct: %w", err)
		}
		for r := 0; r < o.runs; r++ {
			for _, per := range []int{1, 2} {
				blobs := make([]string, n)
				for i := range blobs {
					if blobs[i], err = pushBlob(upURL, randomBytes(size)); err != nil {
						return err
					}
				}
				order := targets
				if r%2 == 1 {
					order = []*target{targets[1], targets[0]}
				}
				for _, t := range order {
					secs, gets, err := coldStart(client, t, blobs, size, per)
					if err != nil {
						return fmt.Errorf("%s cold start: %w", t.name, err)
					}
					key := fmt.Sprintf("cold%d", per)
					t.results[key+"_secs"] = append(t.results[key+"_secs"], secs)
					t.results[key+"_gets"] = append(t.results[key+"_gets"], float64(gets))
					t.results[key+"_anon"] = append(t.results[key+"_anon"], float64(t.mem.phaseAnon.Load()))
					logf("run %d %s: %d distinct blobs x %d clients: %.2fs, %d upstream GETs, peak RssAnon %.1f MiB",
						r+1, t.name, n, per, secs, gets, float64(t.mem.phaseAnon.Load())/1024)
				}
			}
		}
	}
	for r := 0; r < o.runs; r++ {
		blob := stampedeBlobs[r]
		for _, t := range targets {
			gets, secs, err := stampede(client, t, blob, sizes[0], o.stampede)
			if err != nil {
				return fmt.Errorf("%s stampede: %w", t.name, err)
			}
			t.results["stampede_gets"] = append(t.results["stampede_gets"], float64(gets))
			t.results["stampede_secs"] = append(t.results["stampede_secs"], secs)
			logf("run %d %s: stampede %d upstream GETs, %.2fs", r+1, t.name, gets, secs)
		}
	}
	var base *target
	if baseBin != "" {
		baseCounter, err := startCounter(upURL)
		if err != nil {
			return err
		}
		addr := freeAddr()
		cmd := exec.Command(baseBin, "serve", "--listen", addr, "--admin-listen", "127.0.0.1:0", "--data", filepath.Join(dir, "baseline-data"),
			"--upstream", "upstream.bench="+baseCounter.url, "--default-upstream", "upstream.bench")
		if cmd.Stderr, err = os.Create(filepath.Join(dir, "baseline.log")); err != nil {
			return err
		}
		if err := cmd.Start(); err != nil {
			return err
		}
		procs = append(procs, cmd)
		base = &target{name: "ocimirror " + o.baseline, url: "http://" + addr, cmd: cmd, counter: baseCounter, results: map[string][]float64{}}
		if err := waitHTTP(base.url + "/v2/"); err != nil {
			return fmt.Errorf("%s: %w", base.name, err)
		}
		// Warm it as the others are: the image pulled once.
		if _, err := warmPull(client, base.url, img, 1, 1); err != nil {
			return fmt.Errorf("%s warm-up: %w", base.name, err)
		}
	}
	direct := &target{name: "upstream direct", url: upURL, results: map[string][]float64{}}
	for r := 0; r < o.runs; r++ {
		for _, t := range append([]*target{direct}, targets...) {
			mbs, err := warmPull(client, t.url, img, 4, 3)
			if err != nil {
				return fmt.Errorf("%s warm pull: %w", t.name, err)
			}
			t.results["warm_mbs"] = append(t.results["warm_mbs"], mbs)
			logf("run %d %s: warm pull %.0f MB/s", r+1, t.name, mbs)
		}
	}
	accept := "Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"
	rpsTargets := targets
	if base != nil {
		rpsTargets = append([]*target{base}, targets...)
	}
	for r := 0; r < o.runs; r++ {
		for _, t := range rpsTargets {
			for _, m := range []struct{ key, ref string }{{"tag_rps", "v1"}, {"digest_rps", img.digest}} {
				rps, err := runWrk(o.wrk, o.wrkDuration, accept, t.url+"/v2/"+repo+"/manifests/"+m.ref)
				if err != nil {
					return fmt.Errorf("%s wrk: %w", t.name, err)
				}
				t.results[m.key] = append(t.results[m.key], rps)
				logf("run %d %s: %s %.0f req/s", r+1, t.name, m.key, rps)
			}
		}
	}
	for _, t := range targets {
		t.mem.stop()
	}
	printTable(os.Stdout, o, targets, direct)
	if base != nil {
		printBaseline(os.Stdout, o, base, targets[1])
	}
	if o.auth {
		return measureAuth(o, dir, upURL, img, client, &procs)
	}
	return nil
}

// buildAt builds ocimirror as it was at a git ref, from an archive of
// that tree (the working tree is not touched).
func buildAt(ref, dir string) (string, error) {
	src := filepath.Join(dir, "baseline-src")
	if err := os.MkdirAll(src, 0o755); err != nil {
		return "", err
	}
	archive := exec.Command("sh", "-c", `git archive "$1" | tar -x -C "$2"`, "sh", ref, src)
	archive.Stderr = os.Stderr
	if err := archive.Run(); err != nil {
		return "", fmt.Errorf("git archive: %w", err)
	}
	bin := filepath.Join(dir, "ocimirror-baseline")
	build := exec.Command("go", "build", "-o", bin, "./cmd/ocimirror")
	build.Dir, build.Stdout, build.Stderr = src, os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		return "", err
	}
	logf("built ocimirror at %s", ref)
	return bin, nil
}

// printBaseline compares manifest hits with an earlier build measured in
// the same run, interleaved with this one.
func printBaseline(w io.Writer, o options, base, om *target) {
	fmt.Fprintf(w, "\nManifest hits against ocimirror at %s, same run, medians of %d:\n\n", o.baseline, o.runs)
	fmt.Fprintf(w, "| measure | ocimirror %s | ocimirror (this tree) | ratio |\n|---|---|---|---|\n", o.baseline)
	for _, m := range []struct{ name, key string }{{"manifest GET by tag", "tag_rps"}, {"manifest GET by digest", "digest_rps"}} {
		a, b := median(base.results[m.key]), median(om.results[m.key])
		fmt.Fprintf(w, "| %s | %.0f req/s | %.0f req/s | %.3fx |\n", m.name, a, b, b/a)
	}
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "# "+format+"\n", args...)
}

// --- processes ---

func freeAddr() string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func startRegistry(bin, dir, addr, remote, level string) (*exec.Cmd, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	cfg := fmt.Sprintf(`version: 0.1
log:
  level: %s
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
`, level, filepath.Join(dir, "data"), addr)
	if remote != "" {
		cfg += "proxy:\n  remoteurl: " + remote + "\n"
	} else {
		cfg += "  # the upstream is not measured\n"
		cfg = strings.Replace(cfg, "log:\n", "log:\n  accesslog:\n    disabled: true\n", 1)
	}
	path := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, "serve", path)
	logFile, err := os.Create(filepath.Join(dir, "registry.log"))
	if err != nil {
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", bin, err)
	}
	return cmd, nil
}

func stop(c *exec.Cmd) {
	if c.Process == nil {
		return
	}
	_ = c.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = c.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = c.Process.Kill()
		<-done
	}
}

func waitHTTP(u string) error {
	for i := 0; i < 300; i++ {
		resp, err := http.Get(u)
		if err == nil {
			resp.Body.Close()
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("%s did not answer", u)
}

// --- upstream request counter ---

type counter struct {
	url  string
	mu   sync.Mutex
	seen map[string]int // "GET /v2/.../blobs/sha256:..." -> count
}

func startCounter(upstream string) (*counter, error) {
	target, _ := url.Parse(upstream)
	rp := httputil.NewSingleHostReverseProxy(target)
	rp.FlushInterval = -1
	rp.ErrorLog = log.New(io.Discard, "", 0) // clients that hang up at the end of wrk
	rp.Transport = &http.Transport{DisableCompression: true, MaxIdleConnsPerHost: 64}
	c := &counter{seen: map[string]int{}}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	c.url = "http://" + ln.Addr().String()
	go http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c.mu.Lock()
		c.seen[r.Method+" "+r.URL.Path]++
		c.mu.Unlock()
		rp.ServeHTTP(w, r)
	}))
	return c, nil
}

func (c *counter) count(method, path string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.seen[method+" "+path]
}

// --- memory ---

type memSampler struct {
	done          chan struct{}
	wg            sync.WaitGroup
	peakRSS, anon atomic.Int64 // kB
	// phaseAnon is the peak RssAnon since resetPhase.
	phaseAnon atomic.Int64
}

// resetPhase starts a new phase's peak from the current RssAnon.
func (m *memSampler) resetPhase(pid int) {
	_, anon := readStatus(pid)
	m.phaseAnon.Store(anon)
}

func sampleMemory(pid int) *memSampler {
	m := &memSampler{done: make(chan struct{})}
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		for {
			rss, anon := readStatus(pid)
			if rss > m.peakRSS.Load() {
				m.peakRSS.Store(rss)
			}
			if anon > m.anon.Load() {
				m.anon.Store(anon)
			}
			if anon > m.phaseAnon.Load() {
				m.phaseAnon.Store(anon)
			}
			select {
			case <-m.done:
				return
			case <-t.C:
			}
		}
	}()
	return m
}

func (m *memSampler) stop() { close(m.done); m.wg.Wait() }

func readStatus(pid int) (rss, anon int64) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		v, _ := strconv.ParseInt(f[1], 10, 64)
		switch f[0] {
		case "VmRSS:":
			rss = v
		case "RssAnon:":
			anon = v
		}
	}
	return rss, anon
}

// --- content ---

type image struct {
	digest   string
	manifest []byte
	blobs    []blobRef
}

type blobRef struct {
	digest string
	size   int64
}

func parseSizes(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		mult := 1
		switch {
		case strings.HasSuffix(f, "M"):
			mult, f = 1<<20, strings.TrimSuffix(f, "M")
		case strings.HasSuffix(f, "K"):
			mult, f = 1<<10, strings.TrimSuffix(f, "K")
		}
		n, err := strconv.Atoi(f)
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("bad layer size %q", f)
		}
		out = append(out, n*mult)
	}
	return out, nil
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	r := rand.NewChaCha8([32]byte{byte(n), byte(time.Now().UnixNano())})
	_, _ = r.Read(b)
	return b
}

func sha(b []byte) string {
	h := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(h[:])
}

func pushBlob(base string, data []byte) (string, error) {
	d := sha(data)
	resp, err := http.Post(base+"/v2/"+repo+"/blobs/uploads/", "", nil)
	if err != nil {
		return "", err
	}
	resp.Body.Close()
	loc, err := resp.Location()
	if err != nil {
		return "", fmt.Errorf("upload start: %s", resp.Status)
	}
	q := loc.Query()
	q.Set("digest", d)
	loc.RawQuery = q.Encode()
	req, _ := http.NewRequest(http.MethodPut, loc.String(), bytes.NewReader(data))
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		return "", err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		return "", fmt.Errorf("upload: %s", resp.Status)
	}
	return d, nil
}

func seedImage(base string, sizes []int) (image, error) {
	var img image
	config := []byte(fmt.Sprintf(`{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"seed":%d}`, time.Now().UnixNano()))
	cd, err := pushBlob(base, config)
	if err != nil {
		return img, err
	}
	img.blobs = append(img.blobs, blobRef{cd, int64(len(config))})
	type desc struct {
		MediaType string `json:"mediaType"`
		Digest    string `json:"digest"`
		Size      int64  `json:"size"`
	}
	m := struct {
		SchemaVersion int    `json:"schemaVersion"`
		MediaType     string `json:"mediaType"`
		Config        desc   `json:"config"`
		Layers        []desc `json:"layers"`
	}{2, "application/vnd.oci.image.manifest.v1+json", desc{"application/vnd.oci.image.config.v1+json", cd, int64(len(config))}, nil}
	for _, n := range sizes {
		d, err := pushBlob(base, randomBytes(n))
		if err != nil {
			return img, err
		}
		img.blobs = append(img.blobs, blobRef{d, int64(n)})
		m.Layers = append(m.Layers, desc{"application/vnd.oci.image.layer.v1.tar+gzip", d, int64(n)})
	}
	img.manifest, _ = json.Marshal(m)
	img.digest = sha(img.manifest)
	req, _ := http.NewRequest(http.MethodPut, base+"/v2/"+repo+"/manifests/v1", bytes.NewReader(img.manifest))
	req.Header.Set("Content-Type", m.MediaType)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return img, err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		return img, fmt.Errorf("manifest put: %s", resp.Status)
	}
	return img, nil
}

// fetch GETs a URL and checks the body's digest and length.
func fetch(c *http.Client, u, want string, size int64, accept string) (int64, error) {
	req, _ := http.NewRequest(http.MethodGet, u, nil)
	if accept != "" {
		req.Header.Set("Accept", accept)
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return 0, fmt.Errorf("GET %s: %s", u, resp.Status)
	}
	h := sha256.New()
	n, err := io.Copy(h, resp.Body)
	if err != nil {
		return n, fmt.Errorf("GET %s: %w", u, err)
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != want || (size >= 0 && n != size) {
		return n, fmt.Errorf("GET %s: wrong bytes: %s, %d bytes", u, got, n)
	}
	return n, nil
}

// stampede has n clients GET one uncached blob at the same moment.
func stampede(c *http.Client, t *target, blob string, size, n int) (gets int, secs float64, err error) {
	secs, gets, err = pullAtOnce(c, t, []string{blob}, size, n)
	return gets, secs, err
}

// coldStart has per clients pull each of the distinct uncached blobs, all
// at once, every digest verified; it returns the wall time and the
// upstream GETs of those blobs, and the phase's peak RssAnon is t.mem's.
func coldStart(c *http.Client, t *target, blobs []string, size, per int) (secs float64, gets int, err error) {
	t.mem.resetPhase(t.cmd.Process.Pid)
	return pullAtOnce(c, t, blobs, size, per)
}

// pullAtOnce has per clients GET each blob, all released at the same
// moment, every digest verified; it returns the wall time and the
// upstream GETs of those blobs.
func pullAtOnce(c *http.Client, t *target, blobs []string, size, per int) (secs float64, gets int, err error) {
	start := make(chan struct{})
	errs := make(chan error, len(blobs)*per)
	var wg sync.WaitGroup
	for _, b := range blobs {
		for range per {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				_, err := fetch(c, t.url+"/v2/"+repo+"/blobs/"+b, b, int64(size), "")
				errs <- err
			}()
		}
	}
	time.Sleep(100 * time.Millisecond)
	t0 := time.Now()
	close(start)
	wg.Wait()
	secs = time.Since(t0).Seconds()
	close(errs)
	for e := range errs {
		if e != nil {
			return 0, 0, e
		}
	}
	for _, b := range blobs {
		gets += t.counter.count(http.MethodGet, "/v2/"+repo+"/blobs/"+b)
	}
	return secs, gets, nil
}

// parseDistinct reads NxSIZE (32x16M).
func parseDistinct(s string) (n, size int, err error) {
	a, b, ok := strings.Cut(s, "x")
	if !ok {
		return 0, 0, fmt.Errorf("%q is not NxSIZE", s)
	}
	if n, err = strconv.Atoi(a); err != nil || n < 1 || n > 1024 {
		return 0, 0, fmt.Errorf("%q: bad count", s)
	}
	sizes, err := parseSizes(b)
	if err != nil || len(sizes) != 1 {
		return 0, 0, fmt.Errorf("%q: bad size", s)
	}
	return n, sizes[0], nil
}

// warmPull has `clients` clients each pull the whole image `pulls` times
// (manifest by tag, then every blob), and returns MB/s over all bytes.
func warmPull(c *http.Client, base string, img image, clients, pulls int) (float64, error) {
	accept := "application/vnd.oci.image.manifest.v1+json"
	// Make sure everything is cached before timing.
	if err := pullOnce(c, base, img, accept, nil); err != nil {
		return 0, err
	}
	var total atomic.Int64
	errs := make(chan error, clients)
	t0 := time.Now()
	var wg sync.WaitGroup
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for p := 0; p < pulls; p++ {
				if err := pullOnce(c, base, img, accept, &total); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	secs := time.Since(t0).Seconds()
	close(errs)
	for e := range errs {
		return 0, e
	}
	return float64(total.Load()) / 1e6 / secs, nil
}

func pullOnce(c *http.Client, base string, img image, accept string, total *atomic.Int64) error {
	n, err := fetch(c, base+"/v2/"+repo+"/manifests/v1", img.digest, int64(len(img.manifest)), accept)
	if err != nil {
		return err
	}
	for _, b := range img.blobs {
		m, err := fetch(c, base+"/v2/"+repo+"/blobs/"+b.digest, b.digest, b.size, "")
		if err != nil {
			return err
		}
		n += m
	}
	if total != nil {
		total.Add(n)
	}
	return nil
}

var rpsRE = regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)
var non2xxRE = regexp.MustCompile(`Non-2xx or 3xx responses:\s+(\d+)`)

func runWrk(bin string, d time.Duration, header, u string, more ...string) (float64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), d+time.Minute)
	defer cancel()
	args := []string{"-t2", "-c32", "-d" + strconv.Itoa(int(d.Seconds())) + "s", "-H", header}
	for _, h := range more {
		args = append(args, "-H", h)
	}
	out, err := exec.CommandContext(ctx, bin, append(args, u)...).CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("%v: %s", err, out)
	}
	if m := non2xxRE.FindSubmatch(out); m != nil {
		return 0, fmt.Errorf("wrk saw %s error responses:\n%s", m[1], out)
	}
	m := rpsRE.FindSubmatch(out)
	if m == nil {
		return 0, errors.New("no Requests/sec in wrk output:\n" + string(out))
	}
	return strconv.ParseFloat(string(m[1]), 64)
}

// --- report ---

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func printTable(w io.Writer, o options, targets []*target, direct *target) {
	dist, om := targets[0], targets[1]
	bw := bufio.NewWriter(w)
	defer bw.Flush()
	fmt.Fprintf(bw, "\nSide by side, one run, medians of %d (layers %s, wrk %s x 32 connections):\n\n", o.runs, o.layers, o.wrkDuration)
	fmt.Fprintln(bw, "| measure | distribution v3 proxy | ocimirror | ocimirror vs distribution |")
	fmt.Fprintln(bw, "|---|---|---|---|")
	row := func(name, unit string, key string, higherBetter bool, format string) {
		a, b := median(dist.results[key]), median(om.results[key])
		ratio := "-"
		switch {
		case a <= 0 || b <= 0:
		case higherBetter:
			ratio = fmt.Sprintf("%.2fx", b/a)
		case unit == "":
			ratio = fmt.Sprintf("%.0fx fewer", a/b)
		default:
			ratio = fmt.Sprintf("%.2fx less", a/b)
		}
		fmt.Fprintf(bw, "| %s | %s | %s | %s |\n", name, strings.TrimSpace(fmt.Sprintf(format+" %s", a, unit)), strings.TrimSpace(fmt.Sprintf(format+" %s", b, unit)), ratio)
	}
	row(fmt.Sprintf("%d clients, one uncached %d MiB blob: upstream GETs", o.stampede, mustSizes(o.layers)[0]>>20), "", "stampede_gets", false, "%.0f")
	row("same: wall time", "s", "stampede_secs", false, "%.2f")
	row("warm pull, 4 clients x 3 pulls, digests verified", "MB/s", "warm_mbs", true, "%.0f")
	if len(dist.results["cold1_secs"]) > 0 {
		n, size, _ := parseDistinct(o.distinct)
		for _, per := range []int{1, 2} {
			k := fmt.Sprintf("cold%d", per)
			row(fmt.Sprintf("cold start, %d distinct %d MiB blobs, %d client(s) each: wall time", n, size>>20, per), "s", k+"_secs", false, "%.2f")
			row("same: upstream GETs", "", k+"_gets", false, "%.0f")
			a, b := median(dist.results[k+"_anon"])/1024, median(om.results[k+"_anon"])/1024
			fmt.Fprintf(bw, "| same: peak RssAnon | %.1f MiB | %.1f MiB | %.2fx |\n", a, b, b/a)
		}
	}
	row("manifest GET by tag", "req/s", "tag_rps", true, "%.0f")
	row("manifest GET by digest", "req/s", "digest_rps", true, "%.0f")
	mem := func(name string, get func(*memSampler) int64) {
		a, b := float64(get(dist.mem))/1024, float64(get(om.mem))/1024
		fmt.Fprintf(bw, "| %s | %.1f MiB | %.1f MiB | %.2fx |\n", name, a, b, b/a)
	}
	mem("peak anonymous memory (RssAnon)", func(m *memSampler) int64 { return m.anon.Load() })
	mem("peak RSS", func(m *memSampler) int64 { return m.peakRSS.Load() })
	fmt.Fprintf(bw, "\nWarm pull straight from the upstream, for reference: %.0f MB/s.\n", median(direct.results["warm_mbs"]))
}

func mustSizes(s string) []int {
	v, _ := parseSizes(s)
	return v
}

// measureAuth runs an ocimirror with access control (anonymous pulls
// granted, and a user) in front of the same upstream, and measures
// manifest hits by digest anonymous and with a bearer token, interleaved.
func measureAuth(o options, dir, upURL string, img image, client *http.Client, procs *[]*exec.Cmd) error {
	counter, err := startCounter(upURL)
	if err != nil {
		return err
	}
	hash, err := bcrypt.GenerateFromPassword([]byte("bench-pw"), bcrypt.DefaultCost)
	if err != nil {
		return err
	}
	htpasswd := filepath.Join(dir, "htpasswd")
	cfg := filepath.Join(dir, "auth.yaml")
	if err := os.WriteFile(htpasswd, []byte("bench:"+string(hash)+"\n"), 0o600); err != nil {
		return err
	}
	rules := "auth:\n  htpasswd: " + htpasswd + "\naccess:\n  - repositories: [\"upstream.bench/**\"]\n    anonymous: true\n    actions: [pull]\n"
	if err := os.WriteFile(cfg, []byte(rules), 0o600); err != nil {
		return err
	}
	addr := freeAddr()
	cmd := exec.Command(o.ocimirror, "serve", "--config", cfg, "--listen", addr, "--admin-listen", "127.0.0.1:0",
		"--data", filepath.Join(dir, "auth-data"), "--upstream", "upstream.bench="+counter.url, "--default-upstream", "upstream.bench")
	if cmd.Stderr, err = os.Create(filepath.Join(dir, "auth.log")); err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	*procs = append(*procs, cmd)
	base := "http://" + addr
	for i := 0; i < 100; i++ {
		if resp, err := client.Get(base + "/v2/"); err == nil {
			resp.Body.Close()
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, err := warmPull(client, base, img, 1, 1); err != nil {
		return fmt.Errorf("access control warm-up: %w", err)
	}
	req, _ := http.NewRequest(http.MethodGet, base+"/auth/token?service=ocimirror&scope=repository:"+repo+":pull", nil)
	req.SetBasicAuth("bench", "bench-pw")
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	var tok struct{ Token string }
	err = json.NewDecoder(resp.Body).Decode(&tok)
	resp.Body.Close()
	if err != nil || tok.Token == "" {
		return fmt.Errorf("token: %s %v", resp.Status, err)
	}
	accept := "Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"
	u := base + "/v2/" + repo + "/manifests/" + img.digest
	results := map[string][]float64{}
	for r := 0; r < o.runs; r++ {
		for _, m := range []struct{ key, header string }{{"anonymous", ""}, {"bearer", "Authorization: Bearer " + tok.Token}} {
			var more []string
			if m.header != "" {
				more = append(more, m.header)
			}
			rps, err := runWrk(o.wrk, o.wrkDuration, accept, u, more...)
			if err != nil {
				return fmt.Errorf("access control %s: %w", m.key, err)
			}
			results[m.key] = append(results[m.key], rps)
			logf("run %d access control: %s %.0f req/s", r+1, m.key, rps)
		}
	}
	a, b := median(results["anonymous"]), median(results["bearer"])
	fmt.Printf("\nManifest hits by digest with access control, same run, medians of %d:\n\n", o.runs)
	fmt.Printf("| anonymous | bearer token | ratio |\n|---|---|---|\n| %.0f req/s | %.0f req/s | %.3fx |\n", a, b, b/a)
	return nil
}
