package auth

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/ocimirror/ocimirror/internal/lru"
)

// Issuer is the service name in challenges and tokens.
const Issuer = "ocimirror"

// ResourceActions is one grant of a token, as the Docker token
// specification writes it.
type ResourceActions struct {
	Type    string   `json:"type"`
	Name    string   `json:"name"`
	Actions []string `json:"actions"`
}

// Claims are a token's: who it was issued to (Subject, "" for an
// anonymous client) and what it may do.
type Claims struct {
	jwt.RegisteredClaims
	Access []ResourceActions `json:"access"`
}

// grants is a verified token as a request checks it.
type grants struct {
	user    string
	access  map[string]Actions // repository name as the client wrote it -> actions
	expires time.Time
}

// Tokens issues and verifies ocimirror's tokens: JWTs signed with an
// Ed25519 key (EdDSA). A verified token is remembered until it expires,
// so that a request pays a map lookup, not a signature check.
type Tokens struct {
	key      ed25519.PrivateKey
	pub      ed25519.PublicKey
	kid      string
	ttl      time.Duration
	now      func() time.Time
	verified *lru.Sized[string, grants]
	parser   *jwt.Parser
}

// verifiedBytes bounds the memory of verified tokens.
const verifiedBytes = 8 << 20

// NewTokens returns an issuer of tokens valid for ttl, signed with key.
func NewTokens(key ed25519.PrivateKey, ttl time.Duration, now func() time.Time) *Tokens {
	if now == nil {
		now = time.Now
	}
	pub := key.Public().(ed25519.PublicKey)
	sum := sha256.Sum256(pub)
	return &Tokens{
		key: key, pub: pub, ttl: ttl, now: now,
		kid: base64.RawURLEncoding.EncodeToString(sum[:12]),
		verified: lru.New(verifiedBytes, 0, func(k string, g grants) int64 {
			n := int64(len(k)) + 128
			for name := range g.access {
				n += int64(len(name)) + 32
			}
			return n
		}),
		parser: jwt.NewParser(jwt.WithValidMethods([]string{jwt.SigningMethodEdDSA.Alg()}), jwt.WithIssuer(Issuer),
			jwt.WithAudience(Issuer), jwt.WithExpirationRequired(), jwt.WithIssuedAt(), jwt.WithTimeFunc(now),
			jwt.WithLeeway(5*time.Second)),
	}
}

// Issue signs a token for user ("" anonymous) holding access.
func (t *Tokens) Issue(user string, access []ResourceActions) (token string, expires time.Time, err error) {
	now := t.now()
	expires = now.Add(t.ttl)
	var jti [12]byte
	_, _ = rand.Read(jti[:])
	c := Claims{
		RegisteredClaims: jwt.RegisteredClaims{
			Issuer: Issuer, Subject: user, Audience: jwt.ClaimStrings{Issuer},
			ExpiresAt: jwt.NewNumericDate(expires), NotBefore: jwt.NewNumericDate(now.Add(-5 * time.Second)),
			IssuedAt: jwt.NewNumericDate(now), ID: base64.RawURLEncoding.EncodeToString(jti[:]),
		},
		Access: access,
	}
	if c.Access == nil {
		c.Access = []ResourceActions{}
	}
	tok := jwt.NewWithClaims(jwt.SigningMethodEdDSA, c)
	tok.Header["kid"] = t.kid
	token, err = tok.SignedString(t.key)
	return token, expires, err
}

// errBadToken: a token that is malformed, not ocimirror's, or expired.
var errBadToken = errors.New("auth: invalid or expired token")

// verify checks a token's signature and times, once: the grants are
// remembered until the token expires.
func (t *Tokens) verify(token string) (grants, error) {
	if g, ok := t.verified.Get(token); ok {
		if t.now().Before(g.expires) {
			return g, nil
		}
		t.verified.Remove(token)
		return grants{}, errBadToken
	}
	if len(token) > maxTokenBytes {
		return grants{}, errBadToken
	}
	var c Claims
	if _, err := t.parser.ParseWithClaims(token, &c, func(*jwt.Token) (any, error) { return t.pub, nil }); err != nil {
		return grants{}, fmt.Errorf("%w: %v", errBadToken, err)
	}
	g := grants{user: c.Subject, access: map[string]Actions{}, expires: c.ExpiresAt.Time}
	for _, a := range c.Access {
		if a.Type != "repository" {
			continue
		}
		for _, act := range a.Actions {
			g.access[a.Name] |= ParseActions(act)
		}
	}
	t.verified.Add(token, g)
	return g, nil
}

// maxTokenBytes bounds a token a client may present.
const maxTokenBytes = 16 << 10

// LoadOrCreateKey reads a PEM (PKCS #8) Ed25519 private key; when path
// does not exist and create is set, it generates one and writes it there,
// mode 0600.
func LoadOrCreateKey(path string, create bool) (ed25519.PrivateKey, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) && create {
		_, key, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return nil, err
		}
		der, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return nil, err
		}
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			return nil, err
		}
		data := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return nil, err
		}
		if _, err := f.Write(data); err != nil {
			f.Close()
			return nil, err
		}
		if err := f.Close(); err != nil {
			return nil, err
		}
		return key, nil
	}
	if err != nil {
		return nil, fmt.Errorf("auth.signingKey: %w", err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, fmt.Errorf("auth.signingKey: %s holds no PEM block", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("auth.signingKey: %s: %v", path, err)
	}
	key, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("auth.signingKey: %s is a %T, not an Ed25519 key (openssl genpkey -algorithm ed25519)", path, k)
	}
	return key, nil
}
