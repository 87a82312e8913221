package auth

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// usersLog is a log sink safe for the watcher and the test.
type usersLog struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *usersLog) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *usersLog) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func bcryptOf(t *testing.T, password string) string {
	t.Helper()
	h, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	return string(h)
}

// replaceUsersFile replaces the file as an editor or a secret mount does: a new
// file renamed over the old one.
func replaceUsersFile(t *testing.T, path, content string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// loadTestUsers loads content with a fast poll and a log the test can read.
func loadTestUsers(t *testing.T, content string) (*Users, string, *usersLog) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "htpasswd")
	replaceUsersFile(t, path, content)
	var log usersLog
	u, err := loadUsers(path, slog.New(slog.NewTextHandler(&log, nil)), 20*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(u.Close)
	return u, path, &log
}

// waitUsers polls cond for at most 10 s.
func waitUsers(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("after 10s: %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestUsers_Verify(t *testing.T) {
	alice := bcryptOf(t, "alice-pw")
	// htpasswd -B writes $2y$; Go writes $2a$. Both are the same hash.
	bob := "$2y$" + strings.TrimPrefix(bcryptOf(t, "bob-pw"), "$2a$")
	u, _, log := loadTestUsers(t, "# robots and people\nalice:"+alice+"\r\n\nbob:"+bob+"\n")
	tests := []struct {
		name, user, password string
		want                 bool
	}{
		{"right password", "alice", "alice-pw", true},
		{"$2y$ hash", "bob", "bob-pw", true},
		{"wrong password", "alice", "bob-pw", false},
		{"empty password", "alice", "", false},
		{"unknown user", "carol", "alice-pw", false},
		{"user name is case-sensitive", "Alice", "alice-pw", false},
		{"prefix of a password", "alice", "alice", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := u.Verify(tc.user, tc.password); got != tc.want {
				t.Errorf("Verify(%q, %q) = %v", tc.user, tc.password, got)
			}
		})
	}
	if !u.Has("alice") || !u.Has("bob") || u.Has("carol") || u.Has("") {
		t.Errorf("Has: alice %v bob %v carol %v", u.Has("alice"), u.Has("bob"), u.Has("carol"))
	}
	if !strings.Contains(log.String(), "users=2") {
		t.Errorf("log: %s", log)
	}
}

func TestUsers_UnknownUserComparesDummy(t *testing.T) {
	u, _, _ := loadTestUsers(t, "alice:"+bcryptOf(t, "pw")+"\n")
	before := u.compares.Load()
	if u.Verify("mallory", "pw") {
		t.Fatal("an unknown user was verified")
	}
	if got := u.compares.Load() - before; got != 1 {
		t.Fatalf("an unknown user cost %d bcrypt comparisons, want 1 (as a wrong password does)", got)
	}
	// The dummy is at the users' cost, so it takes as long as theirs.
	if c, _ := bcrypt.Cost(u.state.Load().dummy); c != bcrypt.MinCost {
		t.Errorf("dummy cost %d, want %d", c, bcrypt.MinCost)
	}
}

func TestLoadUsers_Refused(t *testing.T) {
	good := bcryptOf(t, "pw")
	tests := []struct {
		name, content, want string
	}{
		{"apr1", "alice:" + good + "\nbob:$apr1$abcdefgh$0123456789abcdefghijkl\n", `line 2: user "bob" has an MD5 (apr1) hash; only bcrypt`},
		{"sha1", "bob:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n", `line 1: user "bob" has a SHA-1 hash`},
		{"crypt", "bob:abJnggxhB/yWI\n", `line 1: user "bob" has a crypt (DES) hash`},
		{"sha-crypt", "bob:$6$salt$abcdef\n", `line 1: user "bob" has a SHA-crypt hash`},
		{"plain", "bob:hunter2-plain-text\n", `line 1: user "bob" has a plain-text password`},
		{"no colon", "\n\nbob\n", "line 3: not user:hash"},
		{"no hash", "bob:\n", "line 1: not user:hash"},
		{"no user", ":" + good + "\n", "line 1: not user:hash"},
		{"truncated bcrypt", "bob:" + good[:40] + "\n", `line 1: user "bob" has a malformed bcrypt hash`},
		{"duplicate", "bob:" + good + "\nbob:" + good + "\n", `line 2: user "bob" is already on line 1`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "htpasswd")
			replaceUsersFile(t, path, tc.content)
			u, err := LoadUsers(path, nil)
			if err == nil {
				u.Close()
				t.Fatal("loaded")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q, want %q", err, tc.want)
			}
			// Never the hash: no part of a refused line after the colon.
			for _, line := range strings.Split(tc.content, "\n") {
				if _, hash, ok := strings.Cut(line, ":"); ok && len(hash) > 3 && strings.Contains(err.Error(), hash[3:]) {
					t.Errorf("error %q shows the hash", err)
				}
			}
		})
	}
	if _, err := LoadUsers(filepath.Join(t.TempDir(), "missing"), nil); err == nil {
		t.Error("a missing file loaded")
	}
}

func TestUsers_Reload(t *testing.T) {
	u, path, log := loadTestUsers(t, "alice:"+bcryptOf(t, "pw")+"\n")
	replaceUsersFile(t, path, "alice:"+bcryptOf(t, "pw")+"\nbob:"+bcryptOf(t, "bob-pw")+"\n")
	waitUsers(t, "bob added", func() bool { return u.Has("bob") })
	if !u.Verify("bob", "bob-pw") || !u.Verify("alice", "pw") {
		t.Error("the reloaded users do not verify")
	}
	waitUsers(t, "reload logged", func() bool { return strings.Contains(log.String(), "htpasswd reloaded") })
	if !strings.Contains(log.String(), "users=2") {
		t.Errorf("log: %s", log)
	}

	// An edit in place (same inode) is seen too.
	if err := os.WriteFile(path, []byte("carol:"+bcryptOf(t, "c")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	waitUsers(t, "carol replaces alice and bob", func() bool { return u.Has("carol") && !u.Has("alice") })
}

func TestUsers_BadReloadKeepsUsers(t *testing.T) {
	u, path, log := loadTestUsers(t, "alice:"+bcryptOf(t, "pw")+"\n")
	replaceUsersFile(t, path, "alice:"+bcryptOf(t, "pw")+"\nbob:$apr1$secret-looking$hash\n")
	waitUsers(t, "a warning", func() bool { return strings.Contains(log.String(), "htpasswd reload failed") })
	// Polls go on; the same bad file is not warned about again.
	time.Sleep(200 * time.Millisecond)
	if n := strings.Count(log.String(), "reload failed"); n != 1 {
		t.Errorf("%d warnings for one bad change:\n%s", n, log)
	}
	if !u.Verify("alice", "pw") || u.Has("bob") {
		t.Error("the previous users were not kept")
	}
	if strings.Contains(log.String(), "secret-looking") {
		t.Errorf("the log shows a hash:\n%s", log)
	}
	// A removed file keeps the users too, and its return is loaded.
	os.Remove(path)
	waitUsers(t, "a warning for the missing file", func() bool { return strings.Contains(log.String(), "htpasswd unreadable") })
	if !u.Verify("alice", "pw") {
		t.Error("a removed file dropped the users")
	}
	replaceUsersFile(t, path, "bob:"+bcryptOf(t, "bob-pw")+"\n")
	waitUsers(t, "the fixed file loaded", func() bool { return u.Has("bob") })
}

func TestUsers_VerifyCache(t *testing.T) {
	u, path, _ := loadTestUsers(t, "alice:"+bcryptOf(t, "pw")+"\n")
	if !u.Verify("alice", "pw") {
		t.Fatal("not verified")
	}
	n := u.compares.Load()
	if !u.Verify("alice", "pw") {
		t.Fatal("not verified the second time")
	}
	if got := u.compares.Load() - n; got != 0 {
		t.Errorf("a second Verify of the same credentials made %d bcrypt comparisons", got)
	}
	if u.state.Load().verified.Len() != 1 {
		t.Errorf("%d remembered verifications", u.state.Load().verified.Len())
	}
	// Failures are not remembered: each costs a comparison.
	n = u.compares.Load()
	u.Verify("alice", "wrong")
	u.Verify("alice", "wrong")
	if got := u.compares.Load() - n; got != 2 || u.state.Load().verified.Len() != 1 {
		t.Errorf("two failures: %d comparisons, %d remembered", got, u.state.Load().verified.Len())
	}
	// A changed password stops working at once, though the old one was remembered.
	replaceUsersFile(t, path, "alice:"+bcryptOf(t, "new-pw")+"\n")
	waitUsers(t, "the new password", func() bool { return u.Verify("alice", "new-pw") })
	if u.Verify("alice", "pw") {
		t.Error("the old password still works after the reload")
	}
}

func TestUsers_VerifyCacheExpires(t *testing.T) {
	u, _, _ := loadTestUsers(t, "alice:"+bcryptOf(t, "pw")+"\n")
	u.Verify("alice", "pw")
	s := u.state.Load()
	k := u.key("alice", "pw")
	v, _ := s.verified.Get(k)
	v.expires = time.Now().Add(-time.Second)
	s.verified.Add(k, v)
	n := u.compares.Load()
	if !u.Verify("alice", "pw") || u.compares.Load() != n+1 {
		t.Error("an expired verification was not computed again")
	}
}

func TestUsers_CloseStopsWatcher(t *testing.T) {
	u, path, _ := loadTestUsers(t, "alice:"+bcryptOf(t, "pw")+"\n")
	u.Close()
	u.Close() // twice is fine
	replaceUsersFile(t, path, "bob:"+bcryptOf(t, "pw")+"\n")
	time.Sleep(200 * time.Millisecond)
	if u.Has("bob") || !u.Verify("alice", "pw") {
		t.Error("reloaded after Close")
	}
}
