package upstream

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"

	"github.com/ocimirror/ocimirror/internal/flight"
)

// maxMetadata caps every metadata body read from an upstream: manifests,
// tokens, error bodies, tag lists (as oras and regclient do).
const maxMetadata = 4 << 20

// defaultTokenLifetime is a token's life when the token server gives none
// (the distribution token spec's default).
const defaultTokenLifetime = 60 * time.Second

// defaultMaxTokens bounds the token cache (Options.MaxTokens): how many
// scopes, one per repository and access, keep their token; the least
// recently used goes first. A client naming a new repository on every
// request would otherwise grow the cache without end. Tokens are small
// (JWTs of 1-3 KiB; an entry over maxCachedToken is never kept), so this
// count bounds the bytes too: about 12 MiB with 3 KiB tokens, 64 MiB at
// the very worst.
const defaultMaxTokens = 4096

// maxCachedToken is the largest entry, scope and token together, that the
// cache keeps. A larger token (beyond what many servers accept in a header)
// still serves the callers that waited for it, but is not kept: each
// request needing it fetches it again.
const maxCachedToken = 16 << 10

// tokenFetchTimeout bounds one token fetch. The fetch is shared by every
// caller needing the scope, so it runs under a context of its own rather
// than the first caller's: the trace values of the caller that started it,
// none of its cancellation, and this deadline.
const tokenFetchTimeout = 30 * time.Second

// Credentials are what ocimirror presents to one upstream.
type Credentials struct {
	Username string
	Password string
	// Token is a static bearer token sent as is.
	Token string
}

// authenticator answers an upstream's challenges. Tokens are cached per
// scope, in an LRU of bounded size, until they expire; once the upstream's
// Bearer realm is known, tokens for new scopes are fetched before the first
// request, saving a 401.
type authenticator struct {
	upstreamHost string
	creds        Credentials
	hc           *http.Client
	userAgent    string
	now          func() time.Time // the clock: time.Now, or a test's

	// mu guards bearer, basic and tokens. The LRU is the unsynchronised
	// one: looking a token up, finding it expired and dropping it is one
	// step under mu, so a fresh token stored meanwhile is never dropped.
	mu     sync.Mutex
	bearer *challenge // the upstream's Bearer challenge, once seen
	basic  bool       // the upstream asked for Basic
	tokens *simplelru.LRU[string, token]

	fetches flight.Group[string, token]
}

func newAuthenticator(upstreamHost string, creds Credentials, hc *http.Client, userAgent string, maxTokens int) (*authenticator, error) {
	if maxTokens <= 0 {
		maxTokens = defaultMaxTokens
	}
	tokens, err := simplelru.NewLRU[string, token](maxTokens, nil)
	if err != nil {
		return nil, err
	}
	return &authenticator{upstreamHost: upstreamHost, creds: creds, hc: hc, userAgent: userAgent, now: time.Now, tokens: tokens}, nil
}

type token struct {
	value   string
	expires time.Time
}

type challenge struct {
	scheme string
	params map[string]string
}

// authorize sets the Authorization header for a request needing scope.
// With a known Bearer realm and no cached token it fetches one.
func (a *authenticator) authorize(ctx context.Context, req *http.Request, scope string) error {
	if a.creds.Token != "" {
		req.Header.Set("Authorization", "Bearer "+a.creds.Token)
		return nil
	}
	a.mu.Lock()
	basic, bearer := a.basic, a.bearer
	a.mu.Unlock()
	switch {
	case basic:
		if a.creds.Username != "" {
			req.SetBasicAuth(a.creds.Username, a.creds.Password)
		}
	case bearer != nil:
		// Tokens are only ever fetched from a Bearer realm: a cached one
		// implies a known realm, and token looks in the cache first.
		v, err := a.token(ctx, bearer, scope)
		if err != nil {
			return err
		}
		req.Header.Set("Authorization", "Bearer "+v)
	}
	return nil
}

// handleChallenge reacts to a 401. It returns true when a retry may succeed.
func (a *authenticator) handleChallenge(ctx context.Context, resp *http.Response, scope string) (bool, error) {
	if a.creds.Token != "" {
		return false, nil
	}
	for _, c := range parseChallenges(resp.Header.Values("WWW-Authenticate")) {
		switch c.scheme {
		case "bearer":
			if c.params["realm"] == "" {
				continue
			}
			a.mu.Lock()
			a.bearer = &c
			a.tokens.Remove(scope)
			a.mu.Unlock()
			if _, err := a.token(ctx, &c, scope); err != nil {
				return false, err
			}
			return true, nil
		case "basic":
			if a.creds.Username == "" {
				return false, nil
			}
			a.mu.Lock()
			already := a.basic
			a.basic = true
			a.mu.Unlock()
			return !already, nil
		}
	}
	return false, nil
}

// token returns a cached token for scope or fetches one. Concurrent callers
// for one scope share the fetch, which runs under a context of its own:
// a caller that goes away stops waiting, and the others still get the token.
func (a *authenticator) token(ctx context.Context, c *challenge, scope string) (string, error) {
	if v, ok := a.cached(scope); ok {
		return v, nil
	}
	work := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(context.WithoutCancel(ctx), tokenFetchTimeout)
	}
	t, err, _ := a.fetches.Do(ctx, scope, work, func(ctx context.Context) (token, error) {
		t, err := a.fetchToken(ctx, c, scope)
		if err != nil {
			return token{}, err
		}
		a.keep(scope, t)
		return t, nil
	})
	if err != nil {
		return "", err
	}
	return t.value, nil
}

// cached returns the token kept for scope while it is good. An expired
// token is never returned, and is dropped when seen.
func (a *authenticator) cached(scope string) (string, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	t, ok := a.tokens.Get(scope)
	if !ok {
		return "", false
	}
	if !a.now().Before(t.expires) {
		a.tokens.Remove(scope)
		return "", false
	}
	return t.value, true
}

// keep caches t for scope unless the entry is too large to keep.
func (a *authenticator) keep(scope string, t token) {
	if len(scope)+len(t.value) > maxCachedToken {
		return
	}
	a.mu.Lock()
	a.tokens.Add(scope, t)
	a.mu.Unlock()
}

func (a *authenticator) fetchToken(ctx context.Context, c *challenge, scope string) (token, error) {
	realm, err := url.Parse(c.params["realm"])
	if err != nil || (realm.Scheme != "http" && realm.Scheme != "https") {
		return token{}, fmt.Errorf("%w: bad token realm %q", ErrInvalidResponse, c.params["realm"])
	}
	q := realm.Query()
	if s := c.params["service"]; s != "" {
		q.Set("service", s)
	}
	q.Set("scope", scope)
	realm.RawQuery = q.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, realm.String(), nil)
	if err != nil {
		return token{}, err
	}
	req.Header.Set("User-Agent", a.userAgent)
	// Credentials go to the realm the upstream names (Docker Hub's is
	// auth.docker.io), but never in clear text to another host.
	if a.creds.Username != "" && (realm.Scheme == "https" || realm.Host == a.upstreamHost) {
		req.SetBasicAuth(a.creds.Username, a.creds.Password)
	}
	resp, err := a.hc.Do(req)
	if err != nil {
		return token{}, fmt.Errorf("%w: token: %v", ErrUnavailable, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxMetadata))
	if err != nil {
		return token{}, fmt.Errorf("%w: token: %v", ErrUnavailable, err)
	}
	if resp.StatusCode != http.StatusOK {
		return token{}, &StatusError{Method: http.MethodGet, URL: realm.Redacted(), Status: resp.StatusCode, Header: resp.Header, Body: capBody(body)}
	}
	var tr struct {
		Token       string `json:"token"`
		AccessToken string `json:"access_token"`
		ExpiresIn   int    `json:"expires_in"`
		IssuedAt    string `json:"issued_at"`
	}
	if err := json.Unmarshal(body, &tr); err != nil {
		return token{}, fmt.Errorf("%w: token response: %v", ErrInvalidResponse, err)
	}
	v := tr.Token
	if v == "" {
		v = tr.AccessToken
	}
	if v == "" {
		return token{}, fmt.Errorf("%w: token response has no token", ErrInvalidResponse)
	}
	life := defaultTokenLifetime
	if tr.ExpiresIn > 0 {
		life = time.Duration(tr.ExpiresIn) * time.Second
	}
	// Renew a little early so a token does not expire in flight.
	margin := min(life/10, 10*time.Second)
	return token{value: v, expires: a.now().Add(life - margin)}, nil
}

// parseChallenges parses WWW-Authenticate values such as
// `Bearer realm="https://auth.example/token",service="reg",scope="repository:a:pull"`.
func parseChallenges(values []string) []challenge {
	var out []challenge
	for _, v := range values {
		v = strings.TrimSpace(v)
		scheme, rest, _ := strings.Cut(v, " ")
		if scheme == "" {
			continue
		}
		c := challenge{scheme: strings.ToLower(scheme), params: map[string]string{}}
		for rest = strings.TrimSpace(rest); rest != ""; {
			var key string
			key, rest, _ = strings.Cut(rest, "=")
			key = strings.ToLower(strings.TrimSpace(key))
			var val string
			if strings.HasPrefix(rest, `"`) {
				val, rest = readQuoted(rest[1:])
			} else {
				val, rest, _ = strings.Cut(rest, ",")
				val = strings.TrimSpace(val)
			}
			if key != "" {
				c.params[key] = val
			}
			rest = strings.TrimLeft(rest, " ,")
		}
		out = append(out, c)
	}
	return out
}

// readQuoted reads a quoted-string body (after the opening quote) and
// returns it unescaped with what follows the closing quote.
func readQuoted(s string) (string, string) {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case '\\':
			if i+1 < len(s) {
				i++
				b.WriteByte(s[i])
			}
		case '"':
			return b.String(), s[i+1:]
		default:
			b.WriteByte(s[i])
		}
	}
	return b.String(), ""
}

// DockerConfigCredentials reads the credentials for registry host from a
// Docker config.json (the "auths" section; credential helpers are not run).
func DockerConfigCredentials(path, host string) (Credentials, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Credentials{}, err
	}
	var cfg struct {
		Auths map[string]struct {
			Auth          string `json:"auth"`
			Username      string `json:"username"`
			Password      string `json:"password"`
			RegistryToken string `json:"registrytoken"`
		} `json:"auths"`
	}
	if err := json.Unmarshal(b, &cfg); err != nil {
		return Credentials{}, fmt.Errorf("%s: %w", path, err)
	}
	keys := []string{host, "https://" + host, "http://" + host, "https://" + host + "/v1/", "https://" + host + "/v2/"}
	if host == "docker.io" {
		keys = append(keys, "https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io")
	}
	for _, k := range keys {
		e, ok := cfg.Auths[k]
		if !ok {
			continue
		}
		if e.RegistryToken != "" {
			return Credentials{Token: e.RegistryToken}, nil
		}
		c := Credentials{Username: e.Username, Password: e.Password}
		if e.Auth != "" {
			raw, err := base64.StdEncoding.DecodeString(e.Auth)
			if err != nil {
				return Credentials{}, fmt.Errorf("%s: auths[%q].auth is not base64", path, k)
			}
			c.Username, c.Password, _ = strings.Cut(string(raw), ":")
		}
		if c.Username == "" {
			return Credentials{}, fmt.Errorf("%s: auths[%q] has no username and password (identity tokens and credential helpers are not supported)", path, k)
		}
		return c, nil
	}
	return Credentials{}, fmt.Errorf("%s: no credentials for %s", path, host)
}

func capBody(b []byte) []byte {
	if len(b) > 4096 {
		return b[:4096]
	}
	return b
}
