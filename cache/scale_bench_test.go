package cache_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/config"
	"github.com/ocimirror/ocimirror/internal/registrytest"
	"github.com/ocimirror/ocimirror/proxy"
	"github.com/ocimirror/ocimirror/upstream"
)

// The scale benchmark (issue 8): a store of 1,000,000 manifests and
// 200,000 blobs against one of 1,000 of each.
const (
	scaleEnv      = "OCIMIRROR_BENCH_SCALE"   // set to run it
	scaleDirEnv   = "OCIMIRROR_SCALE_DIR"     // keeps the generated stores between runs
	scaleChildEnv = "OCIMIRROR_SCALE_CHILD"   // the measuring process: its store's spec (JSON)
	scaleProfEnv  = "OCIMIRROR_SCALE_PROFILE" // a directory for CPU and heap profiles of the measuring processes

	scaleUpstream = "registry.test"
	scaleClients  = 4
	scaleHot      = 1000 // entries in the working set of the "hot" hits
	scaleWarmup   = time.Second
	scaleMeasure  = 5 * time.Second
)

// scaleStore is one generated store and where it lives.
type scaleStore struct {
	Dir   string
	Spec  cache.ScaleSpec
	Evict bool // run an eviction pass after the hits
}

func scaleSpec(manifests, blobs int) cache.ScaleSpec {
	return cache.ScaleSpec{Upstream: scaleUpstream, Manifests: manifests, Blobs: blobs, Repos: 1000, TagEvery: 10,
		BlobSize: 2048, Now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
}

// BenchmarkScale measures, on a store of 1,000,000 manifests and 200,000
// blobs: the start-up (OpenBadger until it is ready, its checks
// included), the process's RssAnon after start-up and after serving hits
// (default options: the memory LRU at its configured defaults), manifest
// and blob hits per second through the proxy over loopback HTTP (4
// clients, uniformly random among 1,000 entries spread over the store,
// then among all of it; against the same on a store of 1,000 manifests
// and 1,000 blobs), and one eviction pass of the size a disk budget's
// pass makes (High - Low = 10%).
//
// It runs only with OCIMIRROR_BENCH_SCALE=1. The stores are generated
// once into OCIMIRROR_SCALE_DIR when set (a temporary directory if not);
// a store the eviction pass touched has its evicted content written back
// at the next run. Each store is measured in a process of its own, so
// that start-up and memory are a fresh process's.
func BenchmarkScale(b *testing.B) {
	if os.Getenv(scaleEnv) == "" {
		b.Skip("set " + scaleEnv + "=1 to run (it generates a store of 1.2M entries)")
	}
	if spec := os.Getenv(scaleChildEnv); spec != "" {
		var st scaleStore
		if err := json.Unmarshal([]byte(spec), &st); err != nil {
			b.Fatal(err)
		}
		scaleChild(b, st)
		return
	}
	root := os.Getenv(scaleDirEnv)
	if root == "" {
		root = b.TempDir()
	}
	stores := []struct {
		name string
		st   scaleStore
	}{
		{"big", scaleStore{Dir: filepath.Join(root, "big"), Spec: scaleSpec(1_000_000, 200_000), Evict: true}},
		{"small", scaleStore{Dir: filepath.Join(root, "small"), Spec: scaleSpec(1000, 1000)}},
	}
	got := map[string]map[string]float64{}
	for _, s := range stores {
		if secs := ensureScaleStore(b, s.st); secs > 0 {
			b.Logf("%s store generated in %.1f s", s.name, secs)
		}
		got[s.name] = runScaleChild(b, s.st)
		b.Logf("%s: %v", s.name, got[s.name])
	}
	big, small := got["big"], got["small"]
	b.ReportMetric(0, "ns/op")
	for _, m := range []string{"startup-s", "rss-startup-MiB", "rss-hits-MiB", "rss-hits-freed-MiB", "lru-MiB", "manifest-hits/s", "blob-hits/s"} {
		b.ReportMetric(big[m], m)
		b.ReportMetric(small[m], "small-"+m)
	}
	// Big against small, pattern by pattern (the small store's working
	// set is all of it).
	for _, m := range []string{"manifest-hot", "blob-hot", "manifest-db", "blob-db"} {
		b.ReportMetric(big[m+"-hits/s"], m+"-hits/s")
		b.ReportMetric(small[m+"-hits/s"], "small-"+m+"-hits/s")
	}
	for _, m := range []string{"manifest", "blob", "manifest-hot", "blob-hot", "manifest-db", "blob-db"} {
		b.ReportMetric(big[m+"-hits/s"]/small[m+"-hits/s"], m+"-hits-ratio")
	}
	for _, m := range []string{"evict-s", "evicted", "evict-want-MiB"} {
		b.ReportMetric(big[m], m)
	}
}

// ensureScaleStore generates st's store unless it is there, or writes
// back what an eviction pass removed; it returns the seconds it took.
func ensureScaleStore(b *testing.B, st scaleStore) float64 {
	marker := filepath.Join(st.Dir, "scale-spec.json")
	want, _ := json.Marshal(st.Spec)
	have, err := os.ReadFile(marker)
	if err == nil && bytes.Equal(have, want) {
		return 0
	}
	start := time.Now()
	// A marker of the same spec but for "evicted" says what is there is
	// right, only incomplete.
	onlyMissing := err == nil && bytes.Equal(have, append(want, " evicted"...))
	if !onlyMissing {
		if err := os.RemoveAll(st.Dir); err != nil {
			b.Fatal(err)
		}
	}
	if err := cache.GenerateScale(st.Dir, st.Spec, onlyMissing); err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(marker, want, 0o644); err != nil {
		b.Fatal(err)
	}
	return time.Since(start).Seconds()
}

// runScaleChild measures st in a process of its own and returns what it
// printed.
func runScaleChild(b *testing.B, st scaleStore) map[string]float64 {
	spec, _ := json.Marshal(st)
	if st.Evict {
		// The pass removes content: until it is written back, the marker
		// says so.
		marker, _ := json.Marshal(st.Spec)
		if err := os.WriteFile(filepath.Join(st.Dir, "scale-spec.json"), append(marker, " evicted"...), 0o644); err != nil {
			b.Fatal(err)
		}
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$", "-test.bench=^BenchmarkScale$", "-test.benchtime=1x", "-test.count=1")
	cmd.Env = append(os.Environ(), scaleChildEnv+"="+string(spec))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		b.Fatalf("measuring %s: %v\n%s%s", st.Dir, err, out, stderr.Bytes())
	}
	got := map[string]float64{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 3 && f[0] == "SCALE" {
			got[f[1]], _ = strconv.ParseFloat(f[2], 64)
		}
	}
	if len(got) == 0 {
		b.Fatalf("measuring %s: no figures\n%s%s", st.Dir, out, stderr.Bytes())
	}
	return got
}

// scaleChild is the measuring process: it prints "SCALE <name> <value>"
// lines.
func scaleChild(b *testing.B, st scaleStore) {
	report := func(name string, v float64) { fmt.Printf("SCALE %s %g\n", name, v) }
	ctx := context.Background()
	start := time.Now()
	badger, err := cache.OpenBadger(cache.BadgerOptions{Path: st.Dir})
	if err != nil {
		b.Fatal(err)
	}
	defer badger.Close()
	report("startup-s", time.Since(start).Seconds())
	report("rss-startup-MiB", rssAnonMiB(b))

	// The proxy as deployed (the memory LRU at its default size), and one
	// whose LRU holds nothing: every hit reads the database.
	// (The deployed one is made last: the store tells the last LRU made
	// what it evicts.)
	defaults := config.Default()
	noMemoryStore := cache.NewLRU(badger, cache.LRUOptions{ManifestBytes: 1, MetadataBytes: 1})
	store := cache.NewLRU(badger, cache.LRUOptions{ManifestBytes: defaults.Cache.ManifestBytes.Bytes, MetadataBytes: defaults.Cache.MetadataBytes.Bytes})
	reg := registrytest.New(b)
	serve := func(store cache.Store) string {
		c, err := upstream.New(upstream.Options{Name: scaleUpstream, URL: reg.URL, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			b.Fatal(err)
		}
		srv, err := proxy.New(proxy.Options{Store: store, Upstreams: []proxy.Upstream{{Client: c}}, DefaultUpstream: scaleUpstream,
			TagListBytes: defaults.Cache.TagListBytes.Bytes, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			b.Fatal(err)
		}
		ts := httptest.NewServer(srv.Handler())
		b.Cleanup(ts.Close)
		return ts.URL
	}
	deployed, noMemory := serve(store), serve(noMemoryStore)

	sp := st.Spec
	manifestPath := func(i int) string {
		_, d := sp.ScaleManifest(i)
		return "/v2/" + sp.ScaleRepo(i) + "/manifests/" + d.String()
	}
	blobPath := func(i int) string {
		_, d := sp.ScaleBlob(i)
		return "/v2/" + sp.ScaleRepo(i) + "/blobs/" + d.String()
	}
	prof := os.Getenv(scaleProfEnv)
	name := filepath.Base(st.Dir)
	if prof != "" {
		f, err := os.Create(filepath.Join(prof, name+"-hits.cpu"))
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			b.Fatal(err)
		}
	}
	// A working set of scaleHot entries spread over the store (which the
	// memory LRU holds), then all of it uniformly (which it does not),
	// then all of it with no memory LRU.
	report("manifest-hot-hits/s", scaleHits(b, deployed, scaleHot, sp.Manifests/scaleHot, manifestPath))
	report("blob-hot-hits/s", scaleHits(b, deployed, scaleHot, sp.Blobs/scaleHot, blobPath))
	report("manifest-hits/s", scaleHits(b, deployed, sp.Manifests, 1, manifestPath))
	report("blob-hits/s", scaleHits(b, deployed, sp.Blobs, 1, blobPath))
	report("manifest-db-hits/s", scaleHits(b, noMemory, sp.Manifests, 1, manifestPath))
	report("blob-db-hits/s", scaleHits(b, noMemory, sp.Blobs, 1, blobPath))
	if n := reg.Total(); n != 0 {
		b.Fatalf("%d upstream requests while serving hits", n)
	}
	report("rss-hits-MiB", rssAnonMiB(b))
	debug.FreeOSMemory() // what is left once the collector has given back what it holds spare
	report("rss-hits-freed-MiB", rssAnonMiB(b))
	if prof != "" {
		pprof.StopCPUProfile()
		f, err := os.Create(filepath.Join(prof, name+"-hits.heap"))
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
			b.Fatal(err)
		}
	}
	report("lru-MiB", float64(store.MemoryBytes())/(1<<20))

	if st.Evict {
		// What a pass frees under a budget that the store is at the high
		// watermark of: usage down to the low one.
		usage := badger.Usage()
		maxSize := float64(usage) / 0.95
		want := usage - int64(0.85*maxSize)
		start := time.Now()
		ev, err := badger.Evict(ctx, want, nil)
		if err != nil {
			b.Fatal(err)
		}
		report("evict-s", time.Since(start).Seconds())
		report("evicted", float64(ev.Blobs+ev.Manifests))
		report("evict-want-MiB", float64(want)/(1<<20))
	}
}

// scaleHits GETs uniformly random content (paths of 0, step, ...,
// (n-1)*step) from scaleClients clients for scaleMeasure, after
// scaleWarmup, and returns the hits per second. Anything but a 200 fails
// the benchmark.
func scaleHits(b *testing.B, base string, n, step int, path func(int) string) float64 {
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: scaleClients}}
	defer client.CloseIdleConnections()
	var count atomic.Int64
	var counting atomic.Bool
	stop := time.Now().Add(scaleWarmup + scaleMeasure)
	var wg sync.WaitGroup
	var failed atomic.Value
	for c := range scaleClients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(c), 1))
			for time.Now().Before(stop) {
				p := path(rng.IntN(n) * step)
				req, _ := http.NewRequest(http.MethodGet, base+p, nil)
				req.Header.Set("Accept", v1.MediaTypeImageManifest)
				resp, err := client.Do(req)
				if err != nil {
					failed.Store(err.Error())
					return
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					failed.Store(fmt.Sprintf("GET %s: %d", p, resp.StatusCode))
					return
				}
				if counting.Load() {
					count.Add(1)
				}
			}
		}()
	}
	time.Sleep(scaleWarmup)
	counting.Store(true)
	begin := time.Now()
	wg.Wait()
	if f := failed.Load(); f != nil {
		b.Fatal(f)
	}
	return float64(count.Load()) / time.Since(begin).Seconds()
}

// rssAnonMiB is the process's resident anonymous memory (heap, stacks,
// anonymous maps; not the page cache of mapped files).
func rssAnonMiB(b *testing.B) float64 {
	runtime.GC()
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		b.Skip("no /proc/self/status")
	}
	for line := range strings.Lines(string(status)) {
		if v, ok := strings.CutPrefix(line, "RssAnon:"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			return kb / 1024
		}
	}
	b.Skip("no RssAnon in /proc/self/status")
	return 0
}
