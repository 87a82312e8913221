package e2e

// Scale-out (issue 12): three ocimirror replicas on 127.0.0.1 share one
// SeaweedFS bucket (storage.s3) and know each other (cluster), with a
// distribution v3 upstream. Clients talk to the replicas directly.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ocimirror/ocimirror/internal/weedtest"
)

// clusterUpstream is the upstream's name in the replicas' configuration;
// clients reach it with this name as a host prefix (/v2/upstream/REPO/...).
const clusterUpstream = "upstream"

// cluster is a SeaweedFS bucket, a distribution v3 upstream and three
// replicas sharing that bucket.
type cluster struct {
	up       *registryServer
	weed     *weedtest.Weed
	secret   string    // the shared secret's file
	addrs    []string  // the replicas' listen addresses, fixed up front
	replicas []*mirror // replicas[i] listens on addrs[i]
	// upstreamHosts[i] is where replica i reaches the upstream: up.host, or
	// a forwarder of the test's in front of it.
	upstreamHosts []string
}

// startCluster starts SeaweedFS and three replicas of ocimirror in front
// of up. upstreamHosts, when given, says where each replica reaches the
// upstream (all of them reach up.host otherwise).
func startCluster(t *testing.T, up *registryServer, upstreamHosts ...string) *cluster {
	t.Helper()
	c := &cluster{up: up, weed: weedtest.Start(t)}
	if upstreamHosts == nil {
		upstreamHosts = []string{up.host, up.host, up.host}
	}
	c.upstreamHosts = upstreamHosts
	c.secret = filepath.Join(t.TempDir(), "cluster-secret")
	if err := os.WriteFile(c.secret, []byte(randomHex(32)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		c.addrs = append(c.addrs, freeAddr(t))
	}
	c.replicas = make([]*mirror, 3)
	for i := range c.replicas {
		c.startReplica(t, i)
	}
	for i := range c.replicas {
		c.waitReady(t, i)
	}
	return c
}

// config is replica i's configuration, on the data directory data.
func (c *cluster) config(i int, data string) string {
	var peers []string
	for _, a := range c.addrs {
		peers = append(peers, "http://"+a)
	}
	// Replica 3 takes its URL from --cluster-self, as a Kubernetes pod
	// does (startReplica); the others from the file.
	self := "\n  self: http://" + c.addrs[i]
	if i == 2 {
		self = ""
	}
	return `listen: ` + c.addrs[i] + `
log:
  level: debug
storage:
  path: ` + data + `
  s3:
    endpoint: http://` + c.weed.S3 + `
    bucket: ` + c.weed.Bucket + `
    pathStyle: true
    tls: false
cluster:` + self + `
  peers: [` + strings.Join(peers, ", ") + `]
  secretFile: ` + c.secret + `
upstreams:
  - name: ` + clusterUpstream + `
    url: http://` + c.upstreamHosts[i] + `
hosted: ["ci/"]
admin:
  listen: 127.0.0.1:0
`
}

// startReplica starts replica i on its address with a new, empty data
// directory (the first start, or a restart that lost its local disk).
func (c *cluster) startReplica(t *testing.T, i int) {
	t.Helper()
	dir := t.TempDir()
	m := &mirror{config: filepath.Join(dir, "ocimirror.yaml")}
	if i == 2 {
		m.flags = []string{"--cluster-self", "http://" + c.addrs[i]}
	}
	if err := os.WriteFile(m.config, []byte(c.config(i, filepath.Join(dir, "data"))), 0o644); err != nil {
		t.Fatal(err)
	}
	m.start(t)
	m.name = fmt.Sprintf("ocimirror replica %d", i+1)
	if m.host != c.addrs[i] {
		t.Fatalf("replica %d listens on %s, configured %s", i+1, m.host, c.addrs[i])
	}
	c.replicas[i] = m
}

// readyz is GET /readyz on replica i's admin listener: status and body
// (status 0 and the error as the body when it does not answer in 20 s).
func (c *cluster) readyz(t *testing.T, i int) (int, map[string]any, string) {
	t.Helper()
	client := &http.Client{Timeout: 20 * time.Second}
	resp, err := client.Get(c.replicas[i].adminURL(t) + "/readyz")
	if err != nil {
		return 0, nil, err.Error()
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var v map[string]any
	_ = json.Unmarshal(body, &v)
	return resp.StatusCode, v, string(body)
}

// waitReady waits (30 s at most) for replica i's /readyz to answer 200.
func (c *cluster) waitReady(t *testing.T, i int) {
	t.Helper()
	var body string
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		var st int
		if st, _, body = c.readyz(t, i); st == http.StatusOK {
			return
		}
	}
	t.Fatalf("replica %d is not ready after 30 s: %s", i+1, body)
}

// upstreamGETs returns the GETs the upstream served (since it started)
// whose path starts with one of prefixes.
func (c *cluster) upstreamGETs(prefixes ...string) []string {
	var out []string
	for _, l := range c.up.requests() {
		for _, p := range prefixes {
			if strings.HasPrefix(l, "GET "+p) {
				out = append(out, l)
				break
			}
		}
	}
	return out
}

// logLines returns the lines of replica i's log that contain every one of
// words, for failure messages.
func (c *cluster) logLines(i int, words ...string) string {
	var out []string
	for _, l := range strings.Split(c.replicas[i].log.String(), "\n") {
		all := true
		for _, w := range words {
			all = all && strings.Contains(l, w)
		}
		if all {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// blobPull is what one client got for a blob.
type blobPull struct {
	replica int
	status  int
	bytes   int64
	digest  string
	err     error
}

func (p blobPull) String() string {
	return fmt.Sprintf("replica %d: status %d, %d bytes, %s, err %v", p.replica+1, p.status, p.bytes, p.digest, p.err)
}

// getBlob GETs a blob and hashes the body as it arrives (nothing is kept
// in memory); progress counts the bytes received so far.
func getBlob(ctx context.Context, replica int, u string, progress *atomic.Int64) blobPull {
	p := blobPull{replica: replica}
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		p.err = err
		return p
	}
	defer resp.Body.Close()
	p.status = resp.StatusCode
	h := sha256.New()
	var w io.Writer = h
	if progress != nil {
		w = io.MultiWriter(h, counter{progress})
	}
	p.bytes, p.err = io.Copy(w, resp.Body)
	p.digest = "sha256:" + hex.EncodeToString(h.Sum(nil))
	return p
}

// counter is an io.Writer that counts what is written to it.
type counter struct{ n *atomic.Int64 }

func (c counter) Write(p []byte) (int, error) { c.n.Add(int64(len(p))); return len(p), nil }

// settle waits until the upstream's access log stops growing (its lines
// are written when a request ends): 1 s without a new line, 10 s at most.
func (c *cluster) settle() {
	n, quiet := len(c.up.requests()), 0
	for i := 0; i < 100 && quiet < 10; i++ {
		time.Sleep(100 * time.Millisecond)
		if m := len(c.up.requests()); m != n {
			n, quiet = m, 0
		} else {
			quiet++
		}
	}
}

// TestE2E_Cluster_Stampede: 16 clients spread over the three replicas
// pull the same uncached 256 MiB blob at once. Every client gets the
// whole blob, every byte right, and the upstream serves it once: the
// replicas that do not own the digest stream it from the one that does.
func TestE2E_Cluster_Stampede(t *testing.T) {
	up := startDistribution(t, "registry")
	c := startCluster(t, up)
	blob := randomBlob(256 << 20)
	d := pushBlob(t, up.host, "stampede/blob", blob)
	size := int64(len(blob))
	blob = nil

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	results := make([]blobPull, 16)
	var wg sync.WaitGroup
	for k := range results {
		i := k % 3
		u := "http://" + c.addrs[i] + "/v2/" + clusterUpstream + "/stampede/blob/blobs/" + d
		wg.Add(1)
		go func() { defer wg.Done(); results[k] = getBlob(ctx, i, u, nil) }()
	}
	wg.Wait()
	for k, r := range results {
		if r.err != nil || r.status != 200 || r.bytes != size || r.digest != d {
			t.Errorf("client %d (%s): want the whole blob %s (%d bytes)", k, r, d, size)
		}
	}
	c.settle()
	if gets := c.upstreamGETs("/v2/stampede/blob/blobs/" + d); len(gets) != 1 {
		t.Errorf("the upstream served %d GETs of the blob, want 1:\n%s", len(gets), strings.Join(gets, "\n"))
		for i := range c.replicas {
			t.Logf("replica %d's log lines for the blob:\n%s", i+1, c.logLines(i, strings.TrimPrefix(d, "sha256:")[:16]))
		}
	}
}

// meter is a TCP forwarder to the upstream, for one replica: it counts the
// bytes the upstream sends through it and sends at most rate bytes a
// second. The meter that carries a blob tells which replica fetched it.
type meter struct {
	ln   net.Listener
	host string
	rate int
	down atomic.Int64
	mu   sync.Mutex
	cs   []net.Conn
}

func startMeter(t *testing.T, target string, rate int) *meter {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := &meter{ln: ln, host: ln.Addr().String(), rate: rate}
	t.Cleanup(m.close)
	go func() {
		for {
			cn, err := ln.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", target)
			if err != nil {
				cn.Close()
				continue
			}
			m.mu.Lock()
			m.cs = append(m.cs, cn, u)
			m.mu.Unlock()
			go func() { _, _ = io.Copy(u, cn); u.Close() }()
			go func() {
				defer cn.Close()
				buf := make([]byte, 16<<10)
				for {
					n, err := u.Read(buf)
					if n > 0 {
						if _, werr := cn.Write(buf[:n]); werr != nil {
							return
						}
						m.down.Add(int64(n))
						time.Sleep(time.Duration(n) * time.Second / time.Duration(m.rate))
					}
					if err != nil {
						return
					}
				}
			}()
		}
	}()
	return m
}

func (m *meter) close() {
	m.ln.Close()
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, c := range m.cs {
		c.Close()
	}
}

// TestE2E_Cluster_OwnerKilled: the replica that fetches a 256 MiB blob
// from a slow upstream for everyone is killed with SIGKILL while clients
// of all three replicas are pulling it (each of them has received some of
// it by then, streamed as the one fill runs). The clients of the two others
// still get the whole blob, every byte right, from a single request each,
// and the upstream serves the blob at most twice.
//
// Each replica reaches the upstream through a forwarder of its own (32
// MiB/s), so the owner is the replica whose forwarder carries the blob.
func TestE2E_Cluster_OwnerKilled(t *testing.T) {
	up := startDistribution(t, "registry")
	blob := randomBlob(256 << 20)
	d := pushBlob(t, up.host, "killed/blob", blob)
	size := int64(len(blob))
	blob = nil
	var meters []*meter
	var hosts []string
	for range 3 {
		m := startMeter(t, up.host, 32<<20)
		meters = append(meters, m)
		hosts = append(hosts, m.host)
	}
	c := startCluster(t, up, hosts...)

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	results := make([]blobPull, 6)
	progress := make([]atomic.Int64, len(results))
	var wg sync.WaitGroup
	for k := range results {
		i := k % 3
		u := "http://" + c.addrs[i] + "/v2/" + clusterUpstream + "/killed/blob/blobs/" + d
		wg.Add(1)
		go func() { defer wg.Done(); results[k] = getBlob(ctx, i, u, &progress[k]) }()
	}

	// The owner is the replica whose forwarder has carried 32 MiB (about
	// a second of the fill).
	owner := -1
	for range 1200 {
		for i, m := range meters {
			if m.down.Load() >= 32<<20 {
				owner = i
			}
		}
		if owner >= 0 {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	fetched := func() string {
		var s []string
		for i, m := range meters {
			s = append(s, fmt.Sprintf("replica %d: %d MiB", i+1, m.down.Load()>>20))
		}
		return strings.Join(s, ", ")
	}
	if owner < 0 {
		cancel()
		wg.Wait()
		t.Fatalf("no replica fetched 32 MiB of the blob within 60 s (%s); clients: %v", fetched(), results)
	}
	for i, m := range meters {
		if i != owner && m.down.Load() >= 1<<20 {
			t.Errorf("replica %d fetches the blob from the upstream too, beside replica %d (%s)", i+1, owner+1, fetched())
		}
	}
	// Every client streams while the one fill runs.
	var got []string
	for k := range progress {
		n := progress[k].Load()
		got = append(got, fmt.Sprintf("client %d on replica %d: %d MiB", k, k%3+1, n>>20))
		if n == 0 {
			t.Errorf("client %d on replica %d has received nothing while the owner (replica %d) has fetched %s", k, k%3+1, owner+1, fetched())
		}
	}
	t.Logf("replica %d owns %s; killing it (fetched from the upstream: %s; received: %s)", owner+1, d, fetched(), strings.Join(got, ", "))
	c.replicas[owner].kill()

	wg.Wait()
	for k, r := range results {
		switch {
		case r.replica == owner:
			// Its clients are cut off; none may see a body end cleanly with wrong bytes.
			if r.err == nil && r.status == 200 && r.digest != d {
				t.Errorf("client %d of the killed replica got %d bytes with digest %s, want %s", k, r.bytes, r.digest, d)
			}
		case r.err != nil || r.status != 200 || r.bytes != size || r.digest != d:
			t.Errorf("client %d (%s): want the whole blob %s (%d bytes)", k, r, d, size)
		}
	}
	t.Logf("after the kill: %s", fetched())
	c.settle()
	if gets := c.upstreamGETs("/v2/killed/blob/blobs/" + d); len(gets) > 2 {
		t.Errorf("the upstream served %d GETs of the blob, want at most 2:\n%s", len(gets), strings.Join(gets, "\n"))
	} else {
		t.Logf("the upstream served %d GETs of the blob", len(gets))
	}
	if t.Failed() {
		for i := range c.replicas {
			t.Logf("replica %d's log lines for the blob:\n%s", i+1, c.logLines(i, strings.TrimPrefix(d, "sha256:")[:16]))
		}
	}
}

// manifestOf is the part of a manifest or index the tests walk.
type manifestOf struct {
	MediaType string `json:"mediaType"`
	Manifests []struct {
		Digest string `json:"digest"`
	} `json:"manifests"`
	Config struct {
		Digest string `json:"digest"`
	} `json:"config"`
	Layers []struct {
		Digest string `json:"digest"`
	} `json:"layers"`
}

// imageContent returns the digests of the manifests (an index and its
// children) and the blobs (configs and layers) of the image ref, as
// `crane manifest` reads them from the registry at host.
func imageContent(t *testing.T, crane, host, repo, ref string) (manifests, blobs []string) {
	t.Helper()
	sep := ":"
	if strings.HasPrefix(ref, "sha256:") {
		sep = "@"
	}
	var m manifestOf
	raw := run(t, nil, crane, "--insecure", "manifest", host+"/"+repo+sep+ref)
	if err := json.Unmarshal([]byte(raw), &m); err != nil {
		t.Fatalf("manifest of %s: %v\n%s", ref, err, raw)
	}
	manifests = append(manifests, digestOf([]byte(raw)))
	for _, child := range m.Manifests {
		cm, cb := imageContent(t, crane, host, repo, child.Digest)
		manifests, blobs = append(manifests, cm...), append(blobs, cb...)
	}
	if m.Config.Digest != "" {
		blobs = append(blobs, m.Config.Digest)
	}
	for _, l := range m.Layers {
		blobs = append(blobs, l.Digest)
	}
	return manifests, blobs
}

// craneRun runs crane --insecure and returns its output, trimmed.
func craneRun(t *testing.T, crane string, args ...string) string {
	t.Helper()
	return strings.TrimSpace(run(t, nil, crane, append([]string{"--insecure"}, args...)...))
}

// craneTry runs crane --insecure and returns its output, trimmed, and
// its error, for checks that should not end the test.
func craneTry(crane string, args ...string) (string, error) {
	out, err := runErr("", nil, crane, append([]string{"--insecure"}, args...)...)
	return strings.TrimSpace(out), err
}

// craneTry1 is craneTry with the error in the output.
func craneTry1(crane string, args ...string) string {
	out, err := craneTry(crane, args...)
	if err != nil {
		return fmt.Sprintf("(%v: %s)", err, out)
	}
	return out
}

// putManifest PUTs a manifest and returns the status (0 and the error
// when the request failed).
func putManifest(u, mediaType string, body []byte) (int, string) {
	req, _ := http.NewRequest(http.MethodPut, u, strings.NewReader(string(body)))
	req.Header.Set("Content-Type", mediaType)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestE2E_Cluster_PushOnOnePullOnAnother: an image crane pushes through
// replica 1 pulls whole through replica 3 at once; an artifact oras
// attaches through replica 2 is listed by oras discover through replicas
// 1 and 3. Two images pushed to the same tag through replicas 1 and 2 at
// the same moment (five times) leave one winner: every replica answers the
// same digest for the tag, one of the two, and the image pulls whole
// through every replica; every replica lists the same tags.
func TestE2E_Cluster_PushOnOnePullOnAnother(t *testing.T) {
	crane, oras := tool(t, "crane"), tool(t, "oras")
	up := startDistribution(t, "registry")
	c := startCluster(t, up)
	r1, r2, r3 := c.addrs[0], c.addrs[1], c.addrs[2]
	dir := t.TempDir()

	// Push through 1, pull through 3.
	layer := layerFile(t, dir, "app", 300_000)
	craneRun(t, crane, "append", "--oci-empty-base", "-f", layer, "-t", r1+"/ci/app:v1")
	want := craneRun(t, crane, "digest", r1+"/ci/app:v1")
	if got, err := craneTry(crane, "digest", r3+"/ci/app:v1"); err != nil || got != want {
		t.Errorf("ci/app:v1 through replica 3 is %q (%v), pushed %s through replica 1", got, err, want)
	}
	if a, b := craneRun(t, crane, "manifest", r1+"/ci/app:v1"), craneTry1(crane, "manifest", r3+"/ci/app:v1"); a != b {
		t.Errorf("the manifest differs between replicas 1 and 3:\n%s\n%s", a, b)
	}
	layout := filepath.Join(dir, "pulled")
	if out, err := craneTry(crane, "pull", "--format", "oci", r3+"/ci/app:v1", layout); err != nil {
		t.Errorf("crane pull through replica 3: %v\n%s", err, out)
	} else if idx, err := os.ReadFile(filepath.Join(layout, "index.json")); err != nil || !strings.Contains(string(idx), want) {
		t.Errorf("crane pull through replica 3: %v %s", err, idx)
	}

	// Attach through 2, discover through 1 (and 3).
	if err := os.WriteFile(filepath.Join(dir, "note.txt"), []byte("attached through replica 2\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := runErr(dir, nil, oras, "attach", "--plain-http", "--artifact-type", "application/vnd.test", r2+"/ci/app:v1", "note.txt"); err != nil {
		t.Errorf("oras attach through replica 2: %v\n%s", err, out)
	} else {
		att := orasDigest(t, out)
		for _, r := range []string{r1, r3} {
			if out, err := runErr("", nil, oras, "discover", "--plain-http", "--format", "json", r+"/ci/app:v1"); err != nil {
				t.Errorf("oras discover through %s: %v\n%s", r, err, out)
				continue
			}
			same(t, "oras discover through "+r, orasDiscover(t, oras, r+"/ci/app:v1"), referrer{att, "application/vnd.test"})
		}
	}

	// The same tag pushed through 1 and 2 at once.
	for round := range 5 {
		type image struct{ digest, mediaType, manifest string }
		push := func(via, name string) image {
			l := layerFile(t, dir, fmt.Sprintf("%s-%d", name, round), 50_000)
			ref := fmt.Sprintf("%s/ci/race:%s-%d", via, name, round)
			craneRun(t, crane, "append", "--oci-empty-base", "-f", l, "-t", ref)
			raw := run(t, nil, crane, "--insecure", "manifest", ref)
			var m manifestOf
			if err := json.Unmarshal([]byte(raw), &m); err != nil {
				t.Fatal(err)
			}
			return image{digestOf([]byte(raw)), m.MediaType, raw}
		}
		a, b := push(r1, "a"), push(r2, "b")
		start := make(chan struct{})
		var wg sync.WaitGroup
		for _, p := range []struct {
			via string
			img image
		}{{r1, a}, {r2, b}} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				if st, body := putManifest("http://"+p.via+"/v2/ci/race/manifests/latest", p.img.mediaType, []byte(p.img.manifest)); st != http.StatusCreated {
					t.Errorf("round %d: PUT ci/race:latest through %s: %d %s", round, p.via, st, body)
				}
			}()
		}
		close(start)
		wg.Wait()
		var got []string
		for _, r := range c.addrs {
			got = append(got, craneTry1(crane, "digest", r+"/ci/race:latest"))
		}
		if got[0] != got[1] || got[1] != got[2] || (got[0] != a.digest && got[0] != b.digest) {
			t.Errorf("round %d: ci/race:latest through replicas 1, 2, 3 is %v; pushed %s through 1 and %s through 2", round, got, a.digest, b.digest)
			continue
		}
		for i, r := range c.addrs {
			layout := filepath.Join(dir, fmt.Sprintf("race-%d-%d", round, i))
			if out, err := craneTry(crane, "pull", "--format", "oci", r+"/ci/race:latest", layout); err != nil {
				t.Errorf("round %d: crane pull through replica %d: %v\n%s", round, i+1, err, out)
			} else if idx, err := os.ReadFile(filepath.Join(layout, "index.json")); err != nil || !strings.Contains(string(idx), got[0]) {
				t.Errorf("round %d: crane pull through replica %d: %v %s", round, i+1, err, idx)
			}
		}
	}

	// Every replica lists the same tags, all of them.
	wantTags := []string{"latest"}
	for round := range 5 {
		wantTags = append(wantTags, fmt.Sprintf("a-%d", round), fmt.Sprintf("b-%d", round))
	}
	slices.Sort(wantTags)
	for i, r := range c.addrs {
		st, body, _ := httpGet(t, "http://"+r+"/v2/ci/race/tags/list")
		var list struct {
			Tags []string `json:"tags"`
		}
		_ = json.Unmarshal(body, &list)
		slices.Sort(list.Tags)
		if st != 200 || !slices.Equal(list.Tags, wantTags) {
			t.Errorf("ci/race's tags through replica %d: %d %s; want %v", i+1, st, body, wantTags)
		}
	}
}

// waitShared waits (10 s at most) until the bucket holds an object for
// every digest, and returns those it does not.
func (c *cluster) waitShared(t *testing.T, digests []string) []string {
	t.Helper()
	var missing []string
	for range 50 {
		keys := strings.Join(bucketKeys(t, c.weed), "\n")
		missing = missing[:0]
		for _, d := range digests {
			if !strings.Contains(keys, strings.TrimPrefix(d, "sha256:")) {
				missing = append(missing, d)
			}
		}
		if len(missing) == 0 {
			return nil
		}
		time.Sleep(200 * time.Millisecond)
	}
	return missing
}

// TestE2E_Cluster_EmptyLocalDisks: images pulled through the replicas and
// one pushed to a hosted repository, then every replica restarted on an
// empty data directory: each of them serves every image, by tag and by
// digest, from the shared bucket; the upstream is asked for no manifest or
// blob by digest again.
func TestE2E_Cluster_EmptyLocalDisks(t *testing.T) {
	crane := tool(t, "crane")
	up := startDistribution(t, "registry")
	s := seedImages(t, up.host)
	c := startCluster(t, up)
	dir := t.TempDir()
	pull := func(round string, i int, ref string) {
		t.Helper()
		layout := filepath.Join(dir, fmt.Sprintf("%s-%d-%x", round, i, sha256.Sum256([]byte(ref))))
		run(t, nil, crane, "--insecure", "pull", "--format", "oci", c.addrs[i]+"/"+clusterUpstream+"/"+ref, layout)
	}
	var all []string
	for k, tag := range seedTags {
		repo, ref, _ := strings.Cut(tag, ":")
		m, b := imageContent(t, crane, up.host, repo, ref)
		all = append(all, m...)
		all = append(all, b...)
		pull("warm", k%3, tag)
	}
	// A hosted image, pushed through replica 1.
	layer := layerFile(t, dir, "hosted", 100_000)
	craneRun(t, crane, "append", "--oci-empty-base", "-f", layer, "-t", c.addrs[0]+"/ci/app:v1")
	hosted := craneRun(t, crane, "digest", c.addrs[0]+"/ci/app:v1")
	hm, hb := imageContent(t, crane, c.addrs[0], "ci/app", "v1")
	all = append(append(all, hm...), hb...)
	slices.Sort(all)
	all = slices.Compact(all)
	if missing := c.waitShared(t, all); missing != nil {
		t.Logf("after 10 s the bucket holds no object for %d of %d digests: %v", len(missing), len(all), missing)
	}

	for i := range c.replicas {
		c.replicas[i].stop()
	}
	before := len(up.requests())
	for i := range c.replicas {
		c.startReplica(t, i)
	}
	for i := range c.replicas {
		c.waitReady(t, i)
	}
	for i := range c.replicas {
		for _, tag := range seedTags {
			repo, _, _ := strings.Cut(tag, ":")
			want := s.digests[tag]
			if got := craneRun(t, crane, "digest", c.addrs[i]+"/"+clusterUpstream+"/"+tag); got != want {
				t.Errorf("replica %d after the restart: %s is %s, want %s", i+1, tag, got, want)
			}
			pull("tag", i, tag)
			pull("digest", i, repo+"@"+want)
		}
		if got, err := craneTry(crane, "digest", c.addrs[i]+"/ci/app:v1"); err != nil || got != hosted {
			t.Errorf("replica %d after the restart: the hosted ci/app:v1 is %q (%v), want %s", i+1, got, err, hosted)
		} else if out, err := craneTry(crane, "pull", "--format", "oci", c.addrs[i]+"/ci/app:v1", filepath.Join(dir, fmt.Sprintf("hosted-%d", i))); err != nil {
			t.Errorf("replica %d after the restart: crane pull ci/app:v1: %v\n%s", i+1, err, out)
		}
	}
	var gets []string
	for _, l := range up.requests()[before:] {
		if strings.HasPrefix(l, "GET ") && (strings.Contains(l, "/blobs/sha256:") || strings.Contains(l, "/manifests/sha256:")) {
			gets = append(gets, l)
		}
	}
	if len(gets) != 0 {
		t.Errorf("after the restart on empty disks the upstream served %d GETs by digest, want 0:\n%s", len(gets), strings.Join(gets, "\n"))
	}
}

// TestE2E_Cluster_SeaweedFSStopped: SeaweedFS stops after an image was
// pulled through replica 1. Replica 1 still serves that image whole from
// its local tier, by digest and by tag, and its /readyz says the shared
// tier is down.
func TestE2E_Cluster_SeaweedFSStopped(t *testing.T) {
	crane := tool(t, "crane")
	up := startDistribution(t, "registry")
	s := seedImages(t, up.host)
	c := startCluster(t, up)
	r1 := c.addrs[0]
	const tag = "e2e/app:multi-oci"
	repo, ref, _ := strings.Cut(tag, ":")
	dir := t.TempDir()
	run(t, nil, crane, "--insecure", "pull", "--format", "oci", r1+"/"+clusterUpstream+"/"+tag, filepath.Join(dir, "warm"))
	manifests, blobs := imageContent(t, crane, up.host, repo, ref)

	c.weed.Stop()

	for _, d := range manifests {
		st, body, _ := httpGet(t, "http://"+r1+"/v2/"+clusterUpstream+"/"+repo+"/manifests/"+d,
			"Accept: application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json")
		if st != 200 || digestOf(body) != d {
			t.Errorf("manifest %s with SeaweedFS stopped: %d, digest %s", d, st, digestOf(body))
		}
	}
	for _, d := range blobs {
		st, body, _ := httpGet(t, "http://"+r1+"/v2/"+clusterUpstream+"/"+repo+"/blobs/"+d)
		if st != 200 || digestOf(body) != d {
			t.Errorf("blob %s with SeaweedFS stopped: %d, digest %s", d, st, digestOf(body))
		}
	}
	if got := craneRun(t, crane, "digest", r1+"/"+clusterUpstream+"/"+tag); got != s.digests[tag] {
		t.Errorf("%s with SeaweedFS stopped is %s, want %s", tag, got, s.digests[tag])
	}
	run(t, nil, crane, "--insecure", "pull", "--format", "oci", r1+"/"+clusterUpstream+"/"+tag, filepath.Join(dir, "stopped"))

	// /readyz says the shared tier is down (within 30 s), and the replica
	// stays ready (200, "degraded"): it serves what its local tier holds,
	// and a balancer that took every replica out would serve nothing.
	var st int
	var v map[string]any
	var body string
	var took time.Duration
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		start := time.Now()
		st, v, body = c.readyz(t, 0)
		if took = time.Since(start); st != 0 && v["shared"] != nil && v["shared"] != "ok" {
			break
		}
	}
	if shared, _ := v["shared"].(string); st != 200 || !strings.HasPrefix(shared, "down: ") || v["status"] != "degraded" {
		t.Errorf(`/readyz with SeaweedFS stopped: %d %s; want 200, "status": "degraded", "shared": "down: ..."`, st, body)
	} else {
		t.Logf("/readyz with SeaweedFS stopped (answered in %v): %d %s", took.Round(time.Millisecond), st, strings.TrimSpace(body))
	}
}
