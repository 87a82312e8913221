package auth

import (
	"bufio"
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/ocimirror/ocimirror/internal/lru"
)

const (
	// usersPoll is how often the htpasswd file is checked for a change.
	usersPoll = 2 * time.Second
	// verifiedTTL is how long a successful verification is remembered.
	verifiedTTL = time.Minute
	// verifiedEntries bounds the remembered verifications; each costs
	// verifiedCost bytes (a key, a 60-byte hash, an expiry).
	verifiedEntries = 4096
	verifiedCost    = 32 + 60 + 24
)

// Users are the accounts of an htpasswd file (bcrypt only), reloaded when
// the file changes. It is safe for concurrent use.
type Users struct {
	path string
	log  *slog.Logger
	// cacheKey keys the HMAC of user and password that names a remembered
	// verification: random per process, so that what is held in memory is
	// no offline oracle for the passwords.
	cacheKey [32]byte

	state atomic.Pointer[userState]
	// compares counts bcrypt comparisons made: tests read it to tell a
	// remembered verification from a computed one.
	compares atomic.Int64

	stop      chan struct{}
	done      chan struct{}
	closeOnce sync.Once
}

// userState is one load of the file. A reload replaces it whole, so the
// verifications remembered for the old users go with them.
type userState struct {
	stamp  fileStamp
	hashes map[string][]byte
	// dummy is compared against for an unknown user, at the cost most of
	// the file's hashes have, so that an unknown user takes as long as a
	// wrong password.
	dummy    []byte
	verified *lru.Sized[[32]byte, verification]
}

// verification is a remembered successful Verify.
type verification struct {
	expires time.Time
	hash    []byte // the hash the password was checked against
}

// fileStamp tells a changed file: a rename over it (a Kubernetes secret, an
// editor's save) changes the inode, an edit in place the time or the size.
type fileStamp struct {
	mtime time.Time
	size  int64
	ino   uint64
}

func stampOf(path string) (fileStamp, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return fileStamp{}, err
	}
	s := fileStamp{mtime: fi.ModTime(), size: fi.Size()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		s.ino = uint64(st.Ino)
	}
	return s, nil
}

// LoadUsers reads and parses the htpasswd file at path now, and watches it
// until Close: a change is loaded within two seconds. An unreadable file,
// or a line that is not user:bcrypt-hash, fails with the line's number
// (never the hash).
func LoadUsers(path string, log *slog.Logger) (*Users, error) {
	return loadUsers(path, log, usersPoll)
}

func loadUsers(path string, log *slog.Logger, poll time.Duration) (*Users, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	u := &Users{path: path, log: log, stop: make(chan struct{}), done: make(chan struct{})}
	if _, err := rand.Read(u.cacheKey[:]); err != nil {
		return nil, err
	}
	s, err := readUsers(path)
	if err != nil {
		return nil, err
	}
	u.state.Store(s)
	log.Info("htpasswd loaded", "path", path, "users", len(s.hashes))
	go u.watch(poll)
	return u, nil
}

// Close stops the reload watcher. The users stay usable as last loaded.
func (u *Users) Close() {
	u.closeOnce.Do(func() {
		close(u.stop)
		<-u.done
	})
}

// Has says whether user is an account of the file.
func (u *Users) Has(user string) bool {
	_, ok := u.state.Load().hashes[user]
	return ok
}

// Verify says whether password is user's. A success is remembered for a
// minute (until the file changes); a failure is not, so that a caller
// delaying failures sees every one.
func (u *Users) Verify(user, password string) bool {
	s := u.state.Load()
	hash, ok := s.hashes[user]
	if !ok {
		u.compares.Add(1)
		bcrypt.CompareHashAndPassword(s.dummy, []byte(password))
		return false
	}
	key := u.key(user, password)
	if v, hit := s.verified.Get(key); hit && time.Now().Before(v.expires) && subtle.ConstantTimeCompare(v.hash, hash) == 1 {
		return true
	}
	u.compares.Add(1)
	if bcrypt.CompareHashAndPassword(hash, []byte(password)) != nil {
		return false
	}
	s.verified.Add(key, verification{expires: time.Now().Add(verifiedTTL), hash: hash})
	return true
}

// key names a verification by an HMAC of user and password, never the
// password itself. User names hold no NUL (parse refuses it), so the
// separator is unambiguous.
func (u *Users) key(user, password string) [32]byte {
	m := hmac.New(sha256.New, u.cacheKey[:])
	m.Write([]byte(user))
	m.Write([]byte{0})
	m.Write([]byte(password))
	var k [32]byte
	m.Sum(k[:0])
	return k
}

// watch polls the file's stamp and loads it again when the stamp changes.
// A bad file keeps the previous users, with one warning per change.
func (u *Users) watch(poll time.Duration) {
	defer close(u.done)
	t := time.NewTicker(poll)
	defer t.Stop()
	var failed fileStamp // the stamp of the last load that failed
	var statFailed bool
	for {
		select {
		case <-u.stop:
			return
		case <-t.C:
		}
		st, err := stampOf(u.path)
		if err != nil {
			if !statFailed {
				u.log.Warn("htpasswd unreadable, keeping the previous users", "path", u.path, "err", err)
				statFailed = true
			}
			continue
		}
		statFailed = false
		if st == u.state.Load().stamp || st == failed {
			continue
		}
		s, err := readUsers(u.path)
		if err != nil {
			failed = st
			u.log.Warn("htpasswd reload failed, keeping the previous users", "path", u.path, "err", err)
			continue
		}
		failed = fileStamp{}
		u.state.Store(s)
		u.log.Info("htpasswd reloaded", "path", u.path, "users", len(s.hashes))
	}
}

// readUsers parses the file. Its stamp is taken before the read: a write
// racing the read changes the stamp again, and the next poll reads anew.
func readUsers(path string) (*userState, error) {
	st, err := stampOf(path)
	if err != nil {
		return nil, fmt.Errorf("htpasswd: %w", err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("htpasswd: %w", err)
	}
	hashes, err := parseHtpasswd(data)
	if err != nil {
		return nil, fmt.Errorf("htpasswd %s: %w", path, err)
	}
	dummy, err := dummyHash(hashes)
	if err != nil {
		return nil, err
	}
	return &userState{
		stamp: st, hashes: hashes, dummy: dummy,
		verified: lru.New(verifiedEntries*verifiedCost, verifiedEntries,
			func([32]byte, verification) int64 { return verifiedCost }),
	}, nil
}

// parseHtpasswd reads user:hash lines. Blank lines and lines starting with
// # are skipped. Only bcrypt hashes are accepted: the others htpasswd can
// write (MD5, SHA-1, crypt, plain text) are refused with their kind.
func parseHtpasswd(data []byte) (map[string][]byte, error) {
	hashes := map[string][]byte{}
	lineOf := map[string]int{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 4096), 64*1024)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimRight(sc.Text(), "\r")
		if strings.TrimSpace(line) == "" || strings.HasPrefix(line, "#") {
			continue
		}
		user, hash, ok := strings.Cut(line, ":")
		if !ok || user == "" || hash == "" {
			return nil, fmt.Errorf("line %d: not user:hash", n)
		}
		if strings.ContainsAny(user, "\x00 \t") {
			return nil, fmt.Errorf("line %d: the user name holds a space or a control character", n)
		}
		if kind := hashKind(hash); kind != "bcrypt" {
			return nil, fmt.Errorf("line %d: user %q has %s; only bcrypt is supported (htpasswd -B)", n, user, kind)
		}
		if _, err := bcrypt.Cost([]byte(hash)); err != nil || len(hash) != 60 {
			return nil, fmt.Errorf("line %d: user %q has a malformed bcrypt hash", n, user)
		}
		if first, dup := lineOf[user]; dup {
			return nil, fmt.Errorf("line %d: user %q is already on line %d", n, user, first)
		}
		lineOf[user] = n
		hashes[user] = []byte(hash)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return hashes, nil
}

// hashKind names the kind of an htpasswd hash, without showing it.
func hashKind(h string) string {
	switch {
	case strings.HasPrefix(h, "$2y$"), strings.HasPrefix(h, "$2a$"), strings.HasPrefix(h, "$2b$"):
		return "bcrypt"
	case strings.HasPrefix(h, "$apr1$"):
		return "an MD5 (apr1) hash"
	case strings.HasPrefix(h, "{SHA}"):
		return "a SHA-1 hash"
	case strings.HasPrefix(h, "$1$"):
		return "an MD5-crypt hash"
	case strings.HasPrefix(h, "$5$"), strings.HasPrefix(h, "$6$"):
		return "a SHA-crypt hash"
	case len(h) == 13 && strings.Trim(h, "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz") == "":
		return "a crypt (DES) hash or a plain-text password"
	case strings.HasPrefix(h, "$"):
		return "an unknown hash kind"
	}
	return "a plain-text password"
}

// dummyHash is a bcrypt hash of a random password at the cost most of the
// users' hashes have (the default cost for an empty file).
func dummyHash(hashes map[string][]byte) ([]byte, error) {
	count := map[int]int{}
	cost := bcrypt.DefaultCost
	for _, h := range hashes {
		c, _ := bcrypt.Cost(h)
		count[c]++
		if count[c] > count[cost] || count[c] == count[cost] && c > cost {
			cost = c
		}
	}
	var pw [16]byte
	rand.Read(pw[:])
	return bcrypt.GenerateFromPassword([]byte(hex.EncodeToString(pw[:])), cost)
}
