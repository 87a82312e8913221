package config

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/bmatcuk/doublestar/v4"
)

// Auth turns on client authentication: users from an htpasswd file, the
// Docker token flow, and the access rules. Without it every client may
// pull and push as before.
type Auth struct {
	// Htpasswd is the file of users (bcrypt hashes, as htpasswd -B writes them); it is reloaded when it changes.
	Htpasswd string `yaml:"htpasswd"`
	// Groups name sets of users, for rules: {team-a: [alice, bob]}.
	Groups map[string][]string `yaml:"groups"`
	// Realm is the token endpoint clients are sent to; by default <scheme>://<host>/auth/token of the request.
	Realm string `yaml:"realm"`
	// TokenTTL is how long a token ocimirror issues is valid (5m).
	TokenTTL Duration `yaml:"tokenTTL"`
	// SigningKey is a PEM Ed25519 private key file that signs tokens; by default one is generated in the data directory (auth/signing-key.pem, mode 0600).
	SigningKey string `yaml:"signingKey"`
}

// AccessRule grants actions on repositories to users.
type AccessRule struct {
	// Repositories are globs of names as users write them: docker.io/library/** (** any path, * one component), ci/team-a/*.
	Repositories []string `yaml:"repositories"`
	// Users are user names, group:NAME, or "*" for any authenticated user.
	Users []string `yaml:"users"`
	// Anonymous grants the actions to clients without credentials too.
	Anonymous bool `yaml:"anonymous"`
	// Actions are pull, push and delete.
	Actions []string `yaml:"actions"`
}

// The actions a rule can grant.
const (
	ActionPull   = "pull"
	ActionPush   = "push"
	ActionDelete = "delete"
)

// DefaultTokenTTL is how long an issued token is valid unless configured.
const DefaultTokenTTL = 5 * time.Minute

// maxAccessRules bounds the rules: each request is checked against them.
const maxAccessRules = 1000

func (c *Config) validateAuth() error {
	if c.Auth == nil {
		if len(c.Access) > 0 {
			return errors.New("access: rules without an auth section would not be enforced; add auth (with htpasswd)")
		}
		return nil
	}
	a := c.Auth
	if a.Htpasswd == "" {
		return errors.New("auth.htpasswd: must name the file of users (htpasswd -B)")
	}
	if err := a.TokenTTL.parse("auth.tokenTTL"); err != nil {
		return err
	}
	if a.TokenTTL.Duration == 0 {
		a.TokenTTL = Dur(DefaultTokenTTL)
	}
	if d := a.TokenTTL.Duration; d < 10*time.Second || d > 24*time.Hour {
		return fmt.Errorf("auth.tokenTTL: %s, want 10s to 24h", d)
	}
	if a.Realm != "" && !strings.HasPrefix(a.Realm, "http://") && !strings.HasPrefix(a.Realm, "https://") {
		return fmt.Errorf("auth.realm: %q is not an http:// or https:// URL", a.Realm)
	}
	for g, members := range a.Groups {
		if g == "" || strings.ContainsAny(g, ": ") {
			return fmt.Errorf("auth.groups: %q is not a group name", g)
		}
		for _, m := range members {
			if m == "" || strings.ContainsAny(m, ": ") || m == "*" {
				return fmt.Errorf("auth.groups: group %q: %q is not a user name", g, m)
			}
		}
	}
	if len(c.Access) > maxAccessRules {
		return fmt.Errorf("access: %d rules, at most %d", len(c.Access), maxAccessRules)
	}
	for i := range c.Access {
		r := &c.Access[i]
		field := fmt.Sprintf("access[%d]", i)
		if len(r.Repositories) == 0 {
			return fmt.Errorf("%s.repositories: must list at least one glob, such as ci/team-a/**", field)
		}
		for j, p := range r.Repositories {
			p = strings.ToLower(strings.Trim(p, "/"))
			if p == "" || !doublestar.ValidatePattern(p) {
				return fmt.Errorf("%s.repositories[%d]: %q is not a glob of repository names", field, j, r.Repositories[j])
			}
			r.Repositories[j] = p
		}
		if len(r.Users) == 0 && !r.Anonymous {
			return fmt.Errorf("%s: grants nobody: list users (names, group:NAME, \"*\") or set anonymous: true", field)
		}
		for j, u := range r.Users {
			switch {
			case u == "*":
			case strings.HasPrefix(u, "group:"):
				if _, ok := a.Groups[strings.TrimPrefix(u, "group:")]; !ok {
					return fmt.Errorf("%s.users[%d]: %q names no group of auth.groups", field, j, u)
				}
			case u == "" || strings.ContainsAny(u, ": "):
				return fmt.Errorf("%s.users[%d]: %q is not a user name, group:NAME or \"*\"", field, j, u)
			}
		}
		if len(r.Actions) == 0 {
			return fmt.Errorf("%s.actions: must list pull, push or delete", field)
		}
		for j, act := range r.Actions {
			switch act = strings.ToLower(act); act {
			case ActionPull, ActionPush, ActionDelete:
				r.Actions[j] = act
			default:
				return fmt.Errorf("%s.actions[%d]: %q, want pull, push or delete", field, j, r.Actions[j])
			}
		}
	}
	return nil
}
