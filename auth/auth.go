package auth

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/metric"
	metricnoop "go.opentelemetry.io/otel/metric/noop"

	"github.com/ocimirror/ocimirror/internal/lru"
)

// Verifier checks a user's password (Users, from an htpasswd file), and
// says whether a user still exists: a token of a user removed from the
// file stops working at once, not when it expires.
type Verifier interface {
	Verify(user, password string) bool
	Has(user string) bool
}

// Options configure an Authenticator.
type Options struct {
	Users  Verifier
	Rules  *Rules
	Tokens *Tokens
	// Realm is the token endpoint sent in challenges; "" derives it from
	// each request: <scheme>://<Host>/auth/token.
	Realm string
	// Canonical returns the names a repository name written in a token
	// request may stand for (the routes a later request may take); the
	// token holds an action when the rules grant it on one of them. The
	// registry API sets it (SetCanonical) when it is not given.
	Canonical     func(name string) []string
	Logger        *slog.Logger
	MeterProvider metric.MeterProvider
}

// Authenticator authenticates requests (Basic credentials, ocimirror's
// bearer tokens, or none) and authorizes their actions on repositories.
type Authenticator struct {
	o        Options
	log      *slog.Logger
	failures *lru.Sized[string, failure]
	failed   atomic.Int64
	reg      metric.Registration
}

// failure is a client address's recent failed logins.
type failure struct {
	count int
	last  time.Time
}

// Failed logins: each answer to a failure from the same address waits
// longer, doubling from failDelay up to maxFailDelay; the count is
// forgotten failReset after the last failure. failureBytes bounds the
// addresses remembered.
const (
	failDelay    = 200 * time.Millisecond
	maxFailDelay = 5 * time.Second
	failReset    = 15 * time.Minute
	failureBytes = 1 << 20
)

// New returns an Authenticator.
func New(o Options) (*Authenticator, error) {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.MeterProvider == nil {
		o.MeterProvider = metricnoop.NewMeterProvider()
	}
	if o.Canonical == nil {
		o.Canonical = func(name string) []string { return []string{name} }
	}
	a := &Authenticator{o: o, log: o.Logger,
		failures: lru.New(failureBytes, 0, func(k string, _ failure) int64 { return int64(len(k)) + 64 })}
	m := o.MeterProvider.Meter("github.com/ocimirror/ocimirror/auth")
	c, err := m.Int64ObservableCounter("ocimirror_auth_failures_total",
		metric.WithDescription("Failed logins: wrong or unknown credentials, sent to the token endpoint or straight to the API."))
	if err != nil {
		return nil, err
	}
	a.reg, err = m.RegisterCallback(func(_ context.Context, ob metric.Observer) error {
		ob.ObserveInt64(c, a.failed.Load())
		return nil
	}, c)
	return a, err
}

// SetCanonical sets Options.Canonical; call it before serving.
func (a *Authenticator) SetCanonical(f func(name string) []string) { a.o.Canonical = f }

// Identity is who made a request.
type Identity struct {
	// User is the authenticated user; "" for an anonymous client.
	User string
	// token is set when the request carried a bearer token: its grants
	// bound what the request may do.
	token *grants
}

// Error is an authentication or authorization failure: 401 with a
// challenge (no or bad credentials, or a token without the scope), or 403
// (the user is not allowed).
type Error struct {
	Status    int
	Challenge string
	Message   string
}

func (e *Error) Error() string { return e.Message }

// Authenticate reads a request's credentials: none (anonymous), Basic
// (checked against the users), or a bearer token ocimirror issued. Wrong
// credentials are a 401, after the delay of failed logins.
func (a *Authenticator) Authenticate(r *http.Request) (Identity, error) {
	h := r.Header.Get("Authorization")
	if h == "" {
		return Identity{}, nil
	}
	scheme, cred, _ := strings.Cut(h, " ")
	switch {
	case strings.EqualFold(scheme, "Bearer"):
		g, err := a.o.Tokens.verify(strings.TrimSpace(cred))
		if err == nil && g.user != "" && !a.o.Users.Has(g.user) {
			err = errBadToken
		}
		if err != nil {
			return Identity{}, &Error{Status: http.StatusUnauthorized, Challenge: a.challenge(r, "", 0, "invalid_token"),
				Message: "the bearer token is invalid or expired"}
		}
		return Identity{User: g.user, token: &g}, nil
	case strings.EqualFold(scheme, "Basic"):
		user, pass, ok := r.BasicAuth()
		if ok && user != "" && a.o.Users.Verify(user, pass) {
			return Identity{User: user}, nil
		}
		a.fail(r, user)
		return Identity{}, &Error{Status: http.StatusUnauthorized, Challenge: a.challenge(r, "", 0, ""),
			Message: "wrong user name or password"}
	}
	return Identity{}, &Error{Status: http.StatusUnauthorized, Challenge: a.challenge(r, "", 0, ""),
		Message: "unsupported authorization scheme " + strconv.Quote(scheme)}
}

// Authorize decides whether id may do need on a repository. canonical is
// the name the rules see (docker.io/library/alpine, ci/team-a/app); asked
// is the name as the request wrote it, which a token's scope names. A
// bearer token allows only what it holds. Refused: 401 with a challenge
// for the scope when credentials (or a token holding it) could get it,
// 403 when the user may not.
func (a *Authenticator) Authorize(r *http.Request, id Identity, asked, canonical string, need Actions) error {
	allowed := a.o.Rules.Allowed(id.User, canonical)
	if allowed&need == need {
		if id.token == nil || id.token.access[asked]&need == need {
			return nil
		}
		// The rules allow it, the token does not hold it: the client asks
		// for one that does (the token flow, scope by scope).
		return &Error{Status: http.StatusUnauthorized, Challenge: a.challenge(r, asked, need, "insufficient_scope"),
			Message: "the token does not grant " + need.String() + " on " + asked}
	}
	if id.User == "" {
		return &Error{Status: http.StatusUnauthorized, Challenge: a.challenge(r, asked, need, ""),
			Message: "authentication required"}
	}
	return &Error{Status: http.StatusForbidden, Message: fmt.Sprintf("%s may not %s %s", id.User, need, canonical)}
}

// Base answers GET /v2/: any valid credentials may; an anonymous client
// is challenged, which starts the token flow.
func (a *Authenticator) Base(r *http.Request, id Identity) error {
	if id.User != "" || id.token != nil {
		return nil
	}
	return &Error{Status: http.StatusUnauthorized, Challenge: a.challenge(r, "", 0, ""), Message: "authentication required"}
}

// challenge is the WWW-Authenticate value sending a client to the token
// endpoint, for a scope when need is not 0.
func (a *Authenticator) challenge(r *http.Request, name string, need Actions, errCode string) string {
	realm := a.o.Realm
	if realm == "" {
		scheme := "http"
		if r.TLS != nil {
			scheme = "https"
		}
		realm = scheme + "://" + r.Host + "/auth/token"
	}
	c := `Bearer realm=` + strconv.Quote(realm) + `,service=` + strconv.Quote(Issuer)
	if need != 0 {
		c += `,scope=` + strconv.Quote("repository:"+name+":"+need.String())
	}
	if errCode != "" {
		c += `,error=` + strconv.Quote(errCode)
	}
	return c
}

// fail counts a failed login of the request's address and waits the
// longer the more there were lately.
func (a *Authenticator) fail(r *http.Request, user string) {
	a.failed.Add(1)
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		host = r.RemoteAddr
	}
	now := time.Now()
	f, _ := a.failures.Get(host)
	if now.Sub(f.last) > failReset {
		f.count = 0
	}
	f.count++
	f.last = now
	a.failures.Add(host, f)
	delay := maxFailDelay
	if f.count <= 6 {
		delay = min(failDelay<<(f.count-1), maxFailDelay)
	}
	a.log.Warn("failed login", "client", host, "user", user, "failures", f.count, "delay", delay)
	t := time.NewTimer(delay)
	defer t.Stop()
	select {
	case <-t.C:
	case <-r.Context().Done():
	}
}

// maxTokenRequestBytes bounds a token request's form.
const maxTokenRequestBytes = 64 << 10

// ServeToken is the token endpoint (GET or POST /auth/token): Basic
// credentials (or, POSTed as an OAuth2 password grant, a form) are checked,
// or none for an anonymous client, and the token returned holds, of the
// scopes asked (repository:NAME:ACTIONS), the actions the rules grant.
func (a *Authenticator) ServeToken(w http.ResponseWriter, r *http.Request) {
	var user, pass string
	var scopes []string
	basic := false
	switch r.Method {
	case http.MethodGet:
		user, pass, basic = r.BasicAuth()
		scopes = r.URL.Query()["scope"]
	case http.MethodPost:
		r.Body = http.MaxBytesReader(w, r.Body, maxTokenRequestBytes)
		if err := r.ParseForm(); err != nil {
			tokenError(w, http.StatusBadRequest, "invalid_request", "the form could not be read")
			return
		}
		switch r.PostForm.Get("grant_type") {
		case "password":
			user, pass, basic = r.PostForm.Get("username"), r.PostForm.Get("password"), true
		default:
			tokenError(w, http.StatusBadRequest, "unsupported_grant_type", "only the password grant is supported")
			return
		}
		scopes = strings.Fields(r.PostForm.Get("scope"))
	default:
		w.Header().Set("Allow", "GET, POST")
		tokenError(w, http.StatusMethodNotAllowed, "invalid_request", "GET or POST")
		return
	}
	if basic && (user == "" || !a.o.Users.Verify(user, pass)) {
		a.fail(r, user)
		w.Header().Set("WWW-Authenticate", `Basic realm="ocimirror"`)
		tokenError(w, http.StatusUnauthorized, "UNAUTHORIZED", "wrong user name or password")
		return
	}
	if !basic {
		user = ""
	}
	var access []ResourceActions
	seen := map[string]int{}
	for _, sc := range scopes {
		for _, s := range strings.Fields(sc) {
			name, want, ok := parseScope(s)
			if !ok || len(access) >= maxScopes {
				continue
			}
			var granted Actions
			for _, c := range a.o.Canonical(name) {
				granted |= a.o.Rules.Allowed(user, c)
			}
			granted &= want
			if granted == 0 {
				continue
			}
			if i, dup := seen[name]; dup {
				access[i].Actions = (ParseActions(strings.Join(access[i].Actions, ",")) | granted).List()
				continue
			}
			seen[name] = len(access)
			access = append(access, ResourceActions{Type: "repository", Name: name, Actions: granted.List()})
		}
	}
	token, expires, err := a.o.Tokens.Issue(user, access)
	if err != nil {
		a.log.Error("signing a token", "err", err)
		tokenError(w, http.StatusInternalServerError, "server_error", "the token could not be signed")
		return
	}
	ttl := a.o.Tokens.ttl
	body, _ := json.Marshal(map[string]any{
		"token": token, "access_token": token,
		"expires_in": int(ttl.Seconds()), "issued_at": expires.Add(-ttl).UTC().Format(time.RFC3339),
	})
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_, _ = w.Write(body)
}

// maxScopes bounds the grants of one token.
const maxScopes = 64

// parseScope reads repository:NAME:ACTIONS (a name may hold a colon: a
// registry host with a port); other resource types grant nothing.
func parseScope(s string) (name string, want Actions, ok bool) {
	typ, rest, found := strings.Cut(s, ":")
	i := strings.LastIndexByte(rest, ':')
	if !found || i <= 0 || (typ != "repository" && !strings.HasPrefix(typ, "repository(")) {
		return "", 0, false
	}
	name, want = rest[:i], ParseActions(rest[i+1:])
	if strings.Contains(rest[i+1:], "*") {
		want = Pull | Push | Delete
	}
	return name, want, name != "" && want != 0 && len(name) <= 512
}

func tokenError(w http.ResponseWriter, status int, code, msg string) {
	body, _ := json.Marshal(map[string]any{"errors": []map[string]string{{"code": code, "message": msg}}})
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

// Close stops the metrics callback.
func (a *Authenticator) Close() {
	if a.reg != nil {
		_ = a.reg.Unregister()
	}
}
