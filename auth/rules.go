// Package auth authenticates clients and authorizes what they do: users
// from an htpasswd file, the Docker token flow (ocimirror is its own token
// issuer), and access rules on repository names as users write them
// (docker.io/library/alpine, ci/team-a/app), however a request was routed.
package auth

import (
	"strings"

	"github.com/bmatcuk/doublestar/v4"

	"github.com/ocimirror/ocimirror/config"
)

// Actions is a set of actions on a repository.
type Actions uint8

// The actions.
const (
	Pull Actions = 1 << iota
	Push
	Delete
)

// ParseActions reads a comma-separated list (pull,push); unknown actions
// and "*" grant nothing.
func ParseActions(s string) Actions {
	var a Actions
	for _, p := range strings.Split(s, ",") {
		switch strings.TrimSpace(p) {
		case config.ActionPull:
			a |= Pull
		case config.ActionPush:
			a |= Push
		case config.ActionDelete:
			a |= Delete
		}
	}
	return a
}

// List is the actions as a token and a challenge write them.
func (a Actions) List() []string {
	var l []string
	for _, x := range []struct {
		bit  Actions
		name string
	}{{Pull, config.ActionPull}, {Push, config.ActionPush}, {Delete, config.ActionDelete}} {
		if a&x.bit != 0 {
			l = append(l, x.name)
		}
	}
	return l
}

func (a Actions) String() string { return strings.Join(a.List(), ",") }

// Rules are the access rules: a request is allowed what some rule grants
// the user on the repository's name; nothing else.
type Rules struct {
	rules  []rule
	groups map[string]map[string]bool // group -> members
}

type rule struct {
	patterns  []string
	users     map[string]bool
	groups    []string
	anyUser   bool
	anonymous bool
	actions   Actions
}

// NewRules compiles validated rules (config.Validate has checked them).
func NewRules(access []config.AccessRule, groups map[string][]string) *Rules {
	r := &Rules{groups: map[string]map[string]bool{}}
	for g, members := range groups {
		r.groups[g] = map[string]bool{}
		for _, m := range members {
			r.groups[g][m] = true
		}
	}
	for _, a := range access {
		x := rule{patterns: a.Repositories, users: map[string]bool{}, anonymous: a.Anonymous}
		for _, u := range a.Users {
			switch {
			case u == "*":
				x.anyUser = true
			case strings.HasPrefix(u, "group:"):
				x.groups = append(x.groups, strings.TrimPrefix(u, "group:"))
			default:
				x.users[u] = true
			}
		}
		for _, act := range a.Actions {
			x.actions |= ParseActions(act)
		}
		r.rules = append(r.rules, x)
	}
	return r
}

// Allowed is what the rules grant user ("" for an anonymous client) on a
// repository name. Rules that grant anonymous clients grant everyone.
func (r *Rules) Allowed(user, name string) Actions {
	var a Actions
	for i := range r.rules {
		x := &r.rules[i]
		if x.actions&^a == 0 || !x.grants(r, user) {
			continue
		}
		for _, p := range x.patterns {
			if ok, _ := doublestar.Match(p, name); ok {
				a |= x.actions
				break
			}
		}
	}
	return a
}

func (x *rule) grants(r *Rules, user string) bool {
	if x.anonymous {
		return true
	}
	if user == "" {
		return false
	}
	if x.anyUser || x.users[user] {
		return true
	}
	for _, g := range x.groups {
		if r.groups[g][user] {
			return true
		}
	}
	return false
}
