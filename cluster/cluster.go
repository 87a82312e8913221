// Package cluster is what ocimirror replicas know of one another: who the
// members are, which of them owns a blob digest, and the authenticated
// calls between them.
//
// Each digest has one owner by rendezvous (highest random weight)
// hashing: every member scores hash(member, digest) and the highest wins.
// Every replica with the same member list agrees on the owner without
// talking, and a member joining or leaving moves only the digests it
// wins or won, about 1/N of them (zot hashes modulo N instead, which
// moves most of them).
package cluster

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
)

// Header names of the calls between replicas.
const (
	// HeaderSecret carries the cluster's shared secret.
	HeaderSecret = "Ocimirror-Cluster-Secret"
	// HeaderPeer names the calling replica (its URL).
	HeaderPeer = "Ocimirror-Cluster-Peer"
	// HeaderInstance is the calling process's random ID: a replica that
	// reaches itself under another name (its pod IP in DNS, say) knows.
	HeaderInstance = "Ocimirror-Cluster-Instance"
)

// DNSScheme prefixes a peer entry that is a DNS name to re-resolve:
// dns+http://ocimirror-peers.ns.svc:5000 is every address the name has,
// each a member at http://address:5000.
const DNSScheme = "dns+"

// DefaultRefresh is how often DNS peers are resolved again.
const DefaultRefresh = 10 * time.Second

// Options configures a Cluster.
type Options struct {
	// Self is this replica's URL as the others reach it.
	Self string
	// Peers are the members' URLs, or dns+ names to resolve.
	Peers []string
	// Secret authenticates the calls between members.
	Secret string
	// Refresh is how often DNS peers are resolved (DefaultRefresh if 0).
	Refresh time.Duration
	// Resolver resolves DNS peers (net.DefaultResolver if nil).
	Resolver *net.Resolver
	// Transport carries the calls to peers (a fresh one if nil).
	Transport http.RoundTripper
	Logger    *slog.Logger
}

// Cluster is this replica's view of the members.
type Cluster struct {
	self     string
	static   []string
	dns      []*url.URL
	secret   []byte
	resolver *net.Resolver
	client   *http.Client
	log      *slog.Logger
	members  atomic.Pointer[[]string]
	instance string
	stop     context.CancelFunc
	done     sync.WaitGroup
}

// New checks the options and resolves DNS peers once; then, until Close,
// again every Refresh. A name that does not resolve at first leaves the
// members it has (self at least): replicas start before their DNS does.
func New(ctx context.Context, o Options) (*Cluster, error) {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Refresh <= 0 {
		o.Refresh = DefaultRefresh
	}
	if o.Resolver == nil {
		o.Resolver = net.DefaultResolver
	}
	if o.Secret == "" {
		return nil, errors.New("cluster: no secret")
	}
	self, err := NormalizeURL(o.Self)
	if err != nil {
		return nil, fmt.Errorf("cluster: self: %w", err)
	}
	c := &Cluster{self: self, secret: []byte(o.Secret), resolver: o.Resolver, log: o.Logger, instance: rand.Text()}
	for _, p := range o.Peers {
		if rest, ok := strings.CutPrefix(p, DNSScheme); ok {
			u, err := url.Parse(rest)
			if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Hostname() == "" || u.Port() == "" {
				return nil, fmt.Errorf("cluster: peer %q: want dns+http(s)://name:port", p)
			}
			c.dns = append(c.dns, u)
			continue
		}
		n, err := NormalizeURL(p)
		if err != nil {
			return nil, fmt.Errorf("cluster: peer %q: %w", p, err)
		}
		c.static = append(c.static, n)
	}
	tr := o.Transport
	if tr == nil {
		tr = &http.Transport{
			Proxy:                 nil, // replicas talk directly
			DialContext:           (&net.Dialer{Timeout: 2 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
			MaxIdleConnsPerHost:   64,
			IdleConnTimeout:       90 * time.Second,
			ResponseHeaderTimeout: 2 * time.Minute, // the owner answers once its upstream has
		}
	}
	c.client = &http.Client{Transport: tr, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	c.resolve(ctx)
	if len(c.dns) > 0 {
		rctx, cancel := context.WithCancel(context.Background())
		c.stop = cancel
		c.done.Add(1)
		go func() {
			defer c.done.Done()
			t := time.NewTicker(o.Refresh)
			defer t.Stop()
			for {
				select {
				case <-rctx.Done():
					return
				case <-t.C:
					c.resolve(rctx)
				}
			}
		}()
	}
	return c, nil
}

// Close stops resolving.
func (c *Cluster) Close() {
	if c.stop != nil {
		c.stop()
		c.done.Wait()
	}
}

// NormalizeURL checks a member URL (http(s)://host:port, nothing else)
// and writes it one way, so that members compare and hash alike.
func NormalizeURL(s string) (string, error) {
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || strings.Trim(u.Path, "/") != "" || u.RawQuery != "" || u.User != nil {
		return "", fmt.Errorf("%q: want http(s)://host:port", s)
	}
	host, port := u.Hostname(), u.Port()
	if port == "" {
		port = "80"
		if u.Scheme == "https" {
			port = "443"
		}
	}
	return u.Scheme + "://" + net.JoinHostPort(strings.ToLower(host), port), nil
}

// resolve sets the members: the static ones, every address of the DNS
// names, and self. A name that fails keeps its last addresses.
func (c *Cluster) resolve(ctx context.Context) {
	set := map[string]bool{c.self: true}
	for _, p := range c.static {
		set[p] = true
	}
	if len(c.dns) > 0 {
		old := map[string]bool{}
		if m := c.members.Load(); m != nil {
			for _, p := range *m {
				old[p] = true
			}
		}
		for _, u := range c.dns {
			rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			addrs, err := c.resolver.LookupHost(rctx, u.Hostname())
			cancel()
			if err != nil {
				c.log.Warn("cluster: resolving peers", "name", u.Hostname(), "err", err)
				for p := range old { // keep what we had
					set[p] = true
				}
				continue
			}
			for _, a := range addrs {
				set[u.Scheme+"://"+net.JoinHostPort(a, u.Port())] = true
			}
		}
	}
	members := make([]string, 0, len(set))
	for p := range set {
		members = append(members, p)
	}
	slices.Sort(members)
	if old := c.members.Load(); old == nil || !slices.Equal(*old, members) {
		c.log.Info("cluster members", "members", strings.Join(members, " "), "self", c.self)
	}
	c.members.Store(&members)
}

// Self is this replica's URL.
func (c *Cluster) Self() string { return c.self }

// Members are the replicas, self included, sorted.
func (c *Cluster) Members() []string { return *c.members.Load() }

// score is member m's rendezvous weight for d.
func score(m string, d digest.Digest) uint64 {
	h := fnv.New64a()
	h.Write([]byte(m))
	h.Write([]byte{0})
	h.Write([]byte(d))
	// FNV's low bits mix poorly: finish with splitmix64's.
	x := h.Sum64()
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// Rank returns the members in the order they own d: the owner first,
// then who takes over if it is gone.
func (c *Cluster) Rank(d digest.Digest) []string {
	return Rank(c.Members(), d)
}

// Rank orders members by their rendezvous weight for d, highest first.
func Rank(members []string, d digest.Digest) []string {
	type scored struct {
		m string
		w uint64
	}
	s := make([]scored, len(members))
	for i, m := range members {
		s[i] = scored{m, score(m, d)}
	}
	slices.SortFunc(s, func(a, b scored) int {
		switch {
		case a.w > b.w:
			return -1
		case a.w < b.w:
			return 1
		}
		return strings.Compare(a.m, b.m)
	})
	out := make([]string, len(s))
	for i, x := range s {
		out[i] = x.m
	}
	return out
}

// Before returns the members that rank before self for d: the ones to
// ask before filling from the upstream.
func (c *Cluster) Before(d digest.Digest) []string {
	r := c.Rank(d)
	i := slices.Index(r, c.self)
	if i < 0 {
		return r
	}
	return r[:i]
}

// ErrSecret is a call with a wrong cluster secret; ErrSelf, a call from
// this very process.
var (
	ErrSecret = errors.New("cluster: wrong secret")
	ErrSelf   = errors.New("cluster: a call from this replica to itself")
)

// Peer reports whether r is a call from another replica: ok with the
// caller's URL when it carries the secret, ErrSecret when it carries a
// wrong one, ErrSelf (ok) when this process called itself, and neither
// for a client's request.
func (c *Cluster) Peer(r *http.Request) (from string, ok bool, err error) {
	v := r.Header.Get(HeaderSecret)
	if v == "" {
		return "", false, nil
	}
	if subtle.ConstantTimeCompare([]byte(v), c.secret) != 1 {
		return "", false, ErrSecret
	}
	if r.Header.Get(HeaderInstance) == c.instance {
		return "", true, ErrSelf
	}
	return r.Header.Get(HeaderPeer), true, nil
}

// Get asks peer for path (a /v2/ path with its query) from offset on.
// The answer is the peer's; the caller checks its status.
func (c *Cluster) Get(ctx context.Context, peer, path string, offset int64) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, peer+path, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set(HeaderSecret, string(c.secret))
	req.Header.Set(HeaderPeer, c.self)
	req.Header.Set(HeaderInstance, c.instance)
	req.Header.Set("User-Agent", "ocimirror-peer")
	if offset > 0 {
		req.Header.Set("Range", "bytes="+strconv.FormatInt(offset, 10)+"-")
	}
	return c.client.Do(req)
}

// Drain reads a little of a body that is not wanted, so its connection
// can be reused, and closes it.
func Drain(body io.ReadCloser) {
	_, _ = io.Copy(io.Discard, io.LimitReader(body, 4<<10))
	body.Close()
}
