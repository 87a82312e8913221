// Package cache keeps what ocimirror has fetched: manifests and blobs by
// digest, tags per upstream and repository. Badger holds it on disk; an LRU
// in memory holds hot manifests and metadata.
//
// Only verified content is ever visible: a blob is written under a private
// fill ID and appears under its digest only when the writer commits, after
// the caller has checked size and digest.
package cache

import (
	"context"
	"io"
	"os"
	"time"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
)

// Store is everything the proxy keeps.
type Store interface {
	BlobStore
	ManifestStore
	TagStore
	TagLister
	ReferrerIndex
	RepoLinks
	PinStore
	Close() error
}

// BlobInfo describes a committed blob.
type BlobInfo struct {
	Digest digest.Digest
	Size   int64
}

// BlobStore holds blobs by digest.
type BlobStore interface {
	// StatBlob returns ErrNotFound for a blob that is not committed.
	StatBlob(ctx context.Context, d digest.Digest) (BlobInfo, error)
	// OpenBlob opens a committed blob for reading.
	OpenBlob(ctx context.Context, d digest.Digest) (BlobReader, error)
	// CreateBlob starts a new blob; nothing is visible until Commit.
	CreateBlob(ctx context.Context) (BlobWriter, error)
	// DeleteBlob removes a blob; readers still streaming it fail.
	DeleteBlob(ctx context.Context, d digest.Digest) error
	// Reserve makes room for size more bytes of cached content (-1:
	// unknown), evicting if it must, and holds it until release. It
	// returns ErrFull when the budget has no room even after eviction.
	Reserve(ctx context.Context, size int64) (release func(), err error)
}

// BlobReader reads a committed blob. Reads may run concurrently. A reader
// is closed when done; the blob's removal meanwhile does not cut it.
type BlobReader interface {
	io.ReaderAt
	io.Closer
	// Size is the blob's length.
	Size() int64
}

// FileBlob is a BlobReader backed by a file, which a server can send with
// zero copy. Its offset is the reader's own to move.
type FileBlob interface {
	OSFile() *os.File
}

// BlobWriter writes one blob. Write is called by one goroutine at a time;
// ReadAt may be called by any goroutine concurrently, for everything
// written so far (Size bytes), also after Commit (followers of a fill read
// on) and until Close.
type BlobWriter interface {
	io.Writer
	io.ReaderAt
	io.Closer
	// Size is how many bytes were written.
	Size() int64
	// Commit makes the blob visible under d. The caller has verified that
	// the bytes written have digest d and length size.
	Commit(ctx context.Context, d digest.Digest, size int64) error
	// Cancel discards everything written and releases the writer. It is a
	// no-op after Commit.
	Cancel(ctx context.Context) error
}

// FileOpener is a BlobWriter whose bytes written so far can be read from
// an *os.File of the caller's own (for sendfile): the caller closes it,
// and reads no further than what was written.
type FileOpener interface {
	OpenFile() (*os.File, error)
}

// Toucher records that a blob was served; stores that keep last access
// times implement it.
type Toucher interface {
	Touch(d digest.Digest)
}

// Manifest is a manifest's exact bytes with its media type.
type Manifest struct {
	Digest    digest.Digest
	MediaType string
	Data      []byte
}

// ManifestStore holds manifests by digest.
type ManifestStore interface {
	// GetManifest returns ErrNotFound for an unknown digest. The returned
	// Data is shared and must not be modified.
	GetManifest(ctx context.Context, d digest.Digest) (Manifest, error)
	PutManifest(ctx context.Context, m Manifest) error
	DeleteManifest(ctx context.Context, d digest.Digest) error
}

// TagKey names a tag of a repository of an upstream.
type TagKey struct {
	Upstream string
	Repo     string
	Tag      string
}

// TagEntry is what a tag pointed at when it was last checked upstream.
type TagEntry struct {
	// Digest is the manifest the tag points at, held by the repository
	// ("" when only a pending digest is known).
	Digest    digest.Digest
	MediaType string
	Size      int64
	// CheckedAt is when the upstream last said what the tag points at.
	CheckedAt time.Time
	// Pending is what an upstream HEAD said the tag points at when that
	// manifest was not held yet: the tag moves to it once it is. Digest
	// stays the last good answer meanwhile.
	Pending     digest.Digest
	PendingType string
	PendingSize int64
}

// Tag is a tag with its entry.
type Tag struct {
	Name string
	TagEntry
}

// TagStore holds tag -> digest per upstream and repository.
type TagStore interface {
	// GetTag returns ErrNotFound for an unknown tag.
	GetTag(ctx context.Context, k TagKey) (TagEntry, error)
	PutTag(ctx context.Context, k TagKey, e TagEntry) error
	DeleteTag(ctx context.Context, k TagKey) error
}

// TagLister lists the tags the store holds for a repository, and keeps
// the last tag list an upstream answered for one.
type TagLister interface {
	// ListTags returns the tags of upstream/repo, ordered by name.
	ListTags(ctx context.Context, upstream, repo string) ([]Tag, error)
	// GetUpstreamTags returns the last tag list the upstream answered
	// (ErrNotFound if none); PutUpstreamTags records one.
	GetUpstreamTags(ctx context.Context, upstream, repo string) (UpstreamTags, error)
	PutUpstreamTags(ctx context.Context, upstream, repo string, l UpstreamTags) error
}

// UpstreamTags is an upstream's tag list for a repository, and when it was
// fetched.
type UpstreamTags struct {
	Tags      []string
	CheckedAt time.Time
}

// ReferrerKey names the referrers of one subject in one repository.
type ReferrerKey struct {
	Upstream string
	Repo     string
	Subject  digest.Digest
}

// ReferrerIndex keeps, per subject, the manifests with that subject that
// ocimirror has cached or been pushed. It is written when such a manifest
// is stored, never built by scanning at read time.
type ReferrerIndex interface {
	PutReferrer(ctx context.Context, k ReferrerKey, d v1.Descriptor) error
	DeleteReferrer(ctx context.Context, k ReferrerKey, referrer digest.Digest) error
	// ListReferrers returns the subject's referrers ordered by digest.
	ListReferrers(ctx context.Context, k ReferrerKey) ([]v1.Descriptor, error)
	// GetUpstreamReferrers returns the upstream referrers API's last
	// answer for a subject, ErrNotFound when there is none.
	GetUpstreamReferrers(ctx context.Context, k ReferrerKey) (UpstreamReferrers, error)
	PutUpstreamReferrers(ctx context.Context, k ReferrerKey, a UpstreamReferrers) error
}

// UpstreamReferrers is an upstream referrers API's answer for a subject.
type UpstreamReferrers struct {
	Descriptors []v1.Descriptor
	CheckedAt   time.Time
}

// LinkKind says what a repository link points at.
type LinkKind byte

// The kinds of link.
const (
	LinkBlob     LinkKind = 'b'
	LinkManifest LinkKind = 'm'
)

// RepoKey names a repository: one of an upstream, or a hosted one
// (Upstream "").
type RepoKey struct {
	Upstream string
	Repo     string
}

// LinkOrigin says how a repository came to hold content.
type LinkOrigin byte

// The origins of a link.
const (
	// OriginPushed: a client pushed or mounted it into the repository.
	OriginPushed LinkOrigin = 'p'
	// OriginUpstream: the upstream delivered it for the repository, or
	// confirmed that the repository holds it.
	OriginUpstream LinkOrigin = 'u'
)

// RepoLinks records which blobs and manifests each repository holds;
// content itself is stored once, by digest. A repository serves only what
// it links: content stored for one repository is never served under
// another name on the strength of its digest alone.
type RepoLinks interface {
	// Link records that repository k holds d. A link the upstream
	// confirmed keeps OriginUpstream when the same content is pushed.
	Link(ctx context.Context, k RepoKey, kind LinkKind, d digest.Digest, origin LinkOrigin) error
	// Unlink returns false when there was no such link.
	Unlink(ctx context.Context, k RepoKey, kind LinkKind, d digest.Digest) (bool, error)
	// Linked returns the link's origin; ok is false when k does not hold d.
	Linked(ctx context.Context, k RepoKey, kind LinkKind, d digest.Digest) (origin LinkOrigin, ok bool, err error)
	// UpstreamHolds reports whether any repository of the upstream holds d
	// with OriginUpstream: the bytes came from that upstream.
	UpstreamHolds(ctx context.Context, upstream string, kind LinkKind, d digest.Digest) (bool, error)
}

// SharedBlobs is a tier of blobs that several replicas share (a bucket):
// a replica that misses locally reads it before asking an upstream, and
// puts there what it fetched from one (tiered.Store).
type SharedBlobs interface {
	// StatShared returns the size of blob d in the shared tier, or
	// ErrNotFound (also when the tier does not answer).
	StatShared(ctx context.Context, d digest.Digest) (int64, error)
	// OpenShared reads blob d from the shared tier from offset on.
	OpenShared(ctx context.Context, d digest.Digest, offset int64) (io.ReadCloser, error)
	// ShareBlob puts the committed local blob d in the shared tier,
	// unless it is there.
	ShareBlob(ctx context.Context, d digest.Digest) error
}

// ConditionalTagDeleter deletes a tag only while it points at a digest,
// against writers the store does not serialize (another replica).
type ConditionalTagDeleter interface {
	DeleteTagIf(ctx context.Context, k TagKey, d digest.Digest) error
}
