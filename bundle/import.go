package bundle

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/ocimirror/ocimirror/cache"
	"github.com/ocimirror/ocimirror/graph"
	"github.com/ocimirror/ocimirror/manifest"
	"github.com/ocimirror/ocimirror/referrers"
)

// ErrDigest is content whose bytes do not match the digest that names it.
var ErrDigest = errors.New("bundle: content does not match its digest")

// ErrInvalid is a bundle that reads whole but does not hold together: a
// manifest that is not one, content named and absent, a size that
// differs from its descriptor, an image without a name.
var ErrInvalid = errors.New("bundle: invalid bundle")

// maxIndexBytes bounds index.json and manifest.json: they are read whole.
// 64 MiB holds some 200,000 descriptors.
const maxIndexBytes = 64 << 20

// Store is what an import writes to: a mirror's cache, which can commit
// an import in one step.
type Store interface {
	cache.BlobStore
	cache.ManifestStore
	cache.RepoLinks
	cache.Importer
}

var (
	_ Store = (*cache.Badger)(nil)
	_ Store = (*cache.LRU)(nil)
)

// ImportOptions tune Import.
type ImportOptions struct {
	// Repository names what carries no repository of its own: entries
	// named by a tag alone (as oras and regctl write them) and images
	// without a name. It is a full name without a tag:
	// registry.example/team/app.
	Repository string
	// Upstreams are the registries the mirror has; an image of another
	// is refused. Nil accepts any.
	Upstreams []string
	// Now is the time source (time.Now if nil): tags are checked at it.
	Now func() time.Time
}

// ImportedImage is an image an import made visible.
type ImportedImage struct {
	Name   string        `json:"name"`
	Digest digest.Digest `json:"digest"`
}

// ImportResult says what an import did.
type ImportResult struct {
	Images []ImportedImage `json:"images"`
	// Manifests, Blobs and Referrers count what was linked, in every
	// repository; Tags, the tags set (fallback tags included).
	Manifests int `json:"manifests"`
	Blobs     int `json:"blobs"`
	Referrers int `json:"referrers"`
	Tags      int `json:"tags"`
	// Files and Bytes count what was read of the archive.
	Files int   `json:"files"`
	Bytes int64 `json:"bytes"`
	// Warnings are what was left out, and why.
	Warnings []string `json:"warnings,omitempty"`
}

// Import reads a bundle from r into store. It writes the archive's
// files to the store as it reads them (blobs, each checked against the
// digest its name gives: content no repository holds, invisible), then
// reads index.json (or docker save's manifest.json), walks each named
// image through what it staged (manifests, platforms, blobs, referrers)
// and checks every size, and only then commits every link, referrer, tag
// and pin in one step. Any error before that commit leaves nothing
// visible; what was staged is collected as garbage. An error names the
// entry at fault.
//
// Names map to the mirror's keys as a pull routes them: the registry
// host is the upstream, the repository is the upstream's (Docker Hub's
// official images under library/). Content a bundle leaves out (an
// incremental one) may be in the store already, linked in the same
// repository or fetched from the same upstream.
func Import(ctx context.Context, r io.Reader, store Store, o ImportOptions) (*ImportResult, error) {
	if o.Now == nil {
		o.Now = time.Now
	}
	im := &importer{store: store, o: o, now: o.Now(), files: map[string]staged{}, links: map[string]string{},
		meta: map[string][]byte{}, staged: map[digest.Digest]int64{}, manifests: map[digest.Digest]manifestInfo{}}
	if o.Repository != "" {
		n, err := ParseName(o.Repository)
		last := o.Repository[strings.LastIndexByte(o.Repository, '/')+1:]
		if err != nil || n.Digest != "" || strings.Contains(last, ":") {
			return nil, fmt.Errorf("repository %q: want a repository's full name, without tag or digest (registry.example/team/app)", o.Repository)
		}
		n.Tag = ""
		im.repository = &n
	}
	if err := readArchive(r, func(e entry) error { return im.stage(ctx, e) }); err != nil {
		return nil, err
	}
	plan, err := im.plan(ctx)
	if err != nil {
		return nil, err
	}
	// The commit is one step: it does not stop half way for a client
	// that hangs up.
	if err := store.CommitImport(context.WithoutCancel(ctx), plan); err != nil {
		return nil, err
	}
	return &im.res, nil
}

type importer struct {
	store      Store
	o          ImportOptions
	repository *Name
	now        time.Time

	// files are the archive's regular files, by path; links, its links
	// (path to target); meta, its layout files read whole.
	files map[string]staged
	links map[string]string
	meta  map[string][]byte
	// staged are the digests of the files written (or found) in the store.
	staged map[digest.Digest]int64
	// manifests are those read, put in the store.
	manifests map[digest.Digest]manifestInfo

	res ImportResult
}

type staged struct {
	d    digest.Digest
	size int64
}

type manifestInfo struct {
	mediaType string
	size      int64
	// subject is the subject of a manifest that can be a referrer; desc,
	// its descriptor in a referrers answer.
	subject digest.Digest
	desc    v1.Descriptor
	// children are an index's manifests.
	children []v1.Descriptor
	// stored: read from the store (an earlier bundle's), not the archive.
	stored bool
}

// stage writes one file of the archive to the store, or reads a layout
// file whole.
func (im *importer) stage(ctx context.Context, e entry) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if e.link != "" {
		im.links[e.name] = e.link
		return nil
	}
	im.res.Files++
	switch e.name {
	case indexFile, layoutFile, manifestFile, "repositories":
		data, err := readEntry(e, maxIndexBytes)
		if err != nil {
			return err
		}
		im.meta[e.name] = data
		im.res.Bytes += int64(len(data))
		return nil
	}
	want, err := blobDigest(e.name)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	st, err := im.stageBlob(ctx, e, want)
	if err != nil {
		return err
	}
	im.res.Bytes += st.size
	im.files[e.name] = st
	im.staged[st.d] = st.size
	return nil
}

// stageBlob copies a file into the store, checking it against want (the
// digest its path gives; its sha256 is computed for other files). A blob
// the store holds is read and checked, not written again.
func (im *importer) stageBlob(ctx context.Context, e entry, want digest.Digest) (staged, error) {
	alg := digest.SHA256
	if want != "" {
		alg = want.Algorithm()
	}
	dg := alg.Digester()
	check := func(n int64, err error) (staged, error) {
		if err != nil {
			return staged{}, fmt.Errorf("%w: entry %q: %v", ErrDamaged, e.name, err)
		}
		if n != e.size {
			return staged{}, fmt.Errorf("%w: entry %q: %d of %d bytes", ErrDamaged, e.name, n, e.size)
		}
		if got := dg.Digest(); want != "" && got != want {
			return staged{}, fmt.Errorf("%w: entry %q: its bytes hash to %s", ErrDigest, e.name, got)
		}
		return staged{d: dg.Digest(), size: n}, nil
	}
	if want != "" {
		if info, err := im.store.StatBlob(ctx, want); err == nil && info.Size == e.size {
			return check(io.Copy(dg.Hash(), e.r))
		}
	}
	release, err := im.store.Reserve(ctx, e.size)
	if err != nil {
		return staged{}, fmt.Errorf("entry %q (%d bytes): %w", e.name, e.size, err)
	}
	defer release()
	w, err := im.store.CreateBlob(ctx)
	if err != nil {
		return staged{}, err
	}
	defer w.Close() // after Commit, it keeps the blob; before, it removes the file
	st, err := check(io.Copy(io.MultiWriter(w, dg.Hash()), e.r))
	if err != nil {
		return st, err
	}
	if err := w.Commit(ctx, st.d, st.size); err != nil {
		return st, fmt.Errorf("entry %q: %w", e.name, err)
	}
	return st, nil
}

// root is an image (or a fallback tag index) index.json names.
type root struct {
	desc v1.Descriptor
	// where says which entry of index.json it is, for errors.
	where string
	name  Name
	key   cache.RepoKey
	// named: name is set; fallback: the entry is a referrers fallback
	// tag index (of the subject its tag encodes).
	named, fallback bool
	tag             string
}

// plan checks the bundle and returns what to commit.
func (im *importer) plan(ctx context.Context) (*cache.Import, error) {
	if data, ok := im.meta[layoutFile]; ok {
		var l v1.ImageLayout
		if err := json.Unmarshal(data, &l); err != nil {
			return nil, fmt.Errorf("%w: %s: %v", ErrInvalid, layoutFile, err)
		}
		if l.Version != layoutVersion {
			im.warn(fmt.Sprintf("%s says version %q; read as %s", layoutFile, l.Version, layoutVersion))
		}
	}
	var entries []v1.Descriptor
	if data, ok := im.meta[indexFile]; ok {
		var idx v1.Index
		if err := json.Unmarshal(data, &idx); err != nil {
			return nil, fmt.Errorf("%w: %s: %v", ErrInvalid, indexFile, err)
		}
		entries = idx.Manifests
	}
	if len(entries) == 0 {
		if _, ok := im.meta[manifestFile]; ok {
			var err error
			if entries, err = im.dockerSave(ctx); err != nil {
				return nil, err
			}
		} else if _, ok := im.meta[indexFile]; ok {
			return nil, fmt.Errorf("%w: %s names no image", ErrInvalid, indexFile)
		} else {
			return nil, fmt.Errorf("%w: no %s (nor docker save's %s): not an OCI image layout", ErrInvalid, indexFile, manifestFile)
		}
	}

	// Name the entries.
	var roots, unnamed []root
	for i, desc := range entries {
		r, err := im.classify(i, desc)
		if err != nil {
			return nil, err
		}
		if r.named || r.fallback {
			roots = append(roots, r)
		} else {
			unnamed = append(unnamed, r)
		}
	}

	// The referrers the bundle lists: manifests in index.json with a
	// subject (oras), and the entries of fallback tag indexes (regctl).
	refs := map[digest.Digest][]v1.Descriptor{}
	addRef := func(subject digest.Digest, desc v1.Descriptor) {
		if !slices.ContainsFunc(refs[subject], func(d v1.Descriptor) bool { return d.Digest == desc.Digest }) {
			refs[subject] = append(refs[subject], desc)
		}
	}
	for _, r := range append(slices.Clone(roots), unnamed...) {
		if r.fallback {
			continue
		}
		var key *cache.RepoKey
		if r.named {
			key = &r.key
		}
		info, err := im.manifest(ctx, r.desc.Digest, key)
		if errors.Is(err, graph.ErrNotFound) && !r.named {
			continue // in an earlier bundle, perhaps: named by what refers to it
		}
		if errors.Is(err, graph.ErrNotFound) {
			return nil, fmt.Errorf("%w: %s: manifest %s is in neither the bundle nor the store", ErrInvalid, r.where, r.desc.Digest)
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", r.where, err)
		}
		if info.size != r.desc.Size {
			return nil, fmt.Errorf("%w: %s: manifest %s has %d bytes, the entry says %d", ErrInvalid, r.where, r.desc.Digest, info.size, r.desc.Size)
		}
		if r.desc.MediaType != "" && r.desc.MediaType != info.mediaType {
			return nil, fmt.Errorf("%w: %s: manifest %s is a %s, the entry says %q", ErrInvalid, r.where, r.desc.Digest, info.mediaType, r.desc.MediaType)
		}
		if info.subject != "" {
			addRef(info.subject, info.desc)
		}
	}
	fallbackOK := map[int]bool{}
	for i, r := range roots {
		if !r.fallback {
			continue
		}
		var key *cache.RepoKey
		if r.named {
			key = &r.key
		}
		info, err := im.manifest(ctx, r.desc.Digest, key)
		if errors.Is(err, graph.ErrNotFound) {
			im.warn(fmt.Sprintf("%s: the fallback tag's index is in neither the bundle nor the store; left out", r.where))
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", r.where, err)
		}
		if !manifest.IsIndex(info.mediaType) {
			im.warn(fmt.Sprintf("%s: tag %s is not a referrers index; left out", r.where, r.tag))
			continue
		}
		ok := true
		for _, c := range info.children {
			ci, err := im.manifest(ctx, c.Digest, key)
			switch {
			case errors.Is(err, graph.ErrNotFound):
				im.warn(fmt.Sprintf("%s: referrer %s is not in the bundle; the fallback tag %s is left out", r.where, c.Digest, r.tag))
				ok = false
			case err != nil:
				return nil, fmt.Errorf("%s: referrer %s: %w", r.where, c.Digest, err)
			case ci.subject == "" || referrers.FallbackTag(ci.subject) != r.tag:
				im.warn(fmt.Sprintf("%s: %s is not a referrer of the subject of %s; the fallback tag is left out", r.where, c.Digest, r.tag))
				ok = false
			default:
				addRef(ci.subject, ci.desc)
			}
		}
		fallbackOK[i] = ok
	}

	// Walk every named image in its repository.
	p := &planner{im: im, refs: refs, repos: map[cache.RepoKey]*repoPlan{}, reached: map[digest.Digest]bool{}}
	for _, r := range roots {
		if r.fallback {
			continue
		}
		if err := p.image(ctx, r); err != nil {
			return nil, err
		}
	}
	for _, r := range unnamed {
		if p.reached[r.desc.Digest] {
			continue
		}
		info, err := im.manifest(ctx, r.desc.Digest, nil)
		if errors.Is(err, graph.ErrNotFound) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", r.where, err)
		}
		if info.subject != "" {
			im.warn(fmt.Sprintf("%s: referrer %s of %s, which the bundle does not hold, is left out", r.where, r.desc.Digest, info.subject))
			continue
		}
		if im.repository == nil {
			return nil, fmt.Errorf("%w: %s: manifest %s has no name, and no named image holds it (name its repository with --repository)", ErrInvalid, r.where, r.desc.Digest)
		}
		r.named, r.name = true, *im.repository
		r.name.Tag, r.name.Digest = "", r.desc.Digest
		if r.key, err = im.repoKey(r.where, r.name); err != nil {
			return nil, err
		}
		if err := p.image(ctx, r); err != nil {
			return nil, err
		}
	}
	// Fallback tags, in the repositories that hold their subject.
	for i, r := range roots {
		if !r.fallback || !fallbackOK[i] {
			continue
		}
		var keys []cache.RepoKey
		for _, rp := range p.order {
			if rp.has[p.subjectOf(r.tag, rp)] && (!r.named || rp.key == r.key) {
				keys = append(keys, rp.key)
			}
		}
		if len(keys) == 0 {
			im.warn(fmt.Sprintf("%s: the subject of fallback tag %s is not in the bundle; left out", r.where, r.tag))
			continue
		}
		for _, k := range keys {
			rp := p.repo(k)
			rp.link(cache.LinkManifest, r.desc.Digest)
			p.tag(rp, r.tag, r.desc.Digest)
		}
	}
	return p.commit(), nil
}

// classify reads an index.json entry's name.
func (im *importer) classify(i int, desc v1.Descriptor) (root, error) {
	r := root{desc: desc, where: fmt.Sprintf("%s entry %d (%s)", indexFile, i, desc.Digest)}
	if err := desc.Digest.Validate(); err != nil {
		return r, fmt.Errorf("%w: %s entry %d: digest %q: %v", ErrInvalid, indexFile, i, desc.Digest, err)
	}
	if desc.Size < 0 || desc.Size > manifest.MaxSize {
		return r, fmt.Errorf("%w: %s: size %d", ErrInvalid, r.where, desc.Size)
	}
	full, bare := entryName(desc.Annotations)
	switch {
	case full != "":
		r.where = fmt.Sprintf("%s entry %d (%s)", indexFile, i, full)
		n, err := ParseName(full)
		if err != nil {
			return r, fmt.Errorf("%w: %s: %v", ErrInvalid, r.where, err)
		}
		r.named, r.name = true, n
	case bare != "":
		r.where = fmt.Sprintf("%s entry %d (%s)", indexFile, i, bare)
		if fallbackTagRE.MatchString(bare) {
			r.fallback, r.tag = true, bare
			if im.repository == nil {
				return r, nil // in the repositories of its subject
			}
		} else if im.repository == nil {
			return r, fmt.Errorf("%w: %s is named by a tag alone; name its repository with --repository", ErrInvalid, r.where)
		}
		n, err := ParseName(im.repository.Repo() + ":" + bare)
		if err != nil {
			return r, fmt.Errorf("%w: %s: %v", ErrInvalid, r.where, err)
		}
		r.named, r.name = true, n
	default:
		return r, nil
	}
	if r.name.Digest != "" && r.name.Digest != desc.Digest {
		return r, fmt.Errorf("%w: %s names %s, the entry is %s", ErrInvalid, r.where, r.name.Digest, desc.Digest)
	}
	if fallbackTagRE.MatchString(r.name.Tag) {
		r.fallback, r.tag = true, r.name.Tag
	}
	r.name = im.throughMirror(r.name)
	var err error
	r.key, err = im.repoKey(r.where, r.name)
	return r, err
}

// throughMirror reads a name a client wrote through a mirror with a host
// prefix (mirror.internal:5000/docker.io/library/alpine:3, as regctl
// image export names what it pulled so) as the upstream's own, when the
// host is not one of the upstreams and the prefix is.
func (im *importer) throughMirror(n Name) Name {
	if im.o.Upstreams == nil || slices.Contains(im.o.Upstreams, strings.ToLower(n.Host)) {
		return n
	}
	if !strings.Contains(n.Repository, "/") {
		return n
	}
	ref := n.Repository
	if n.Digest != "" {
		ref += "@" + n.Digest.String()
	} else {
		ref += ":" + n.Tag
	}
	if r, err := graph.ParseReference(ref); err != nil || r.Host == "" {
		return n // first is not a registry host
	}
	inner, err := ParseName(ref)
	if err != nil || !slices.Contains(im.o.Upstreams, strings.ToLower(inner.Host)) {
		return n
	}
	return inner
}

// entryName is an entry's full name (containerd's annotation, or a
// ref.name with a repository in it) or, failing that, its bare ref.name
// (a tag, as oras and regctl write it).
func entryName(a map[string]string) (full, bare string) {
	if n := a[AnnotationImageName]; n != "" {
		return n, ""
	}
	n := a[v1.AnnotationRefName]
	if strings.ContainsAny(n, "/:@") {
		return n, ""
	}
	return "", n
}

// repoKey is the store's key of a name's repository, once its registry is
// checked to be one of the mirror's upstreams.
func (im *importer) repoKey(where string, n Name) (cache.RepoKey, error) {
	host := strings.ToLower(n.Host)
	if im.o.Upstreams != nil && !slices.Contains(im.o.Upstreams, host) {
		return cache.RepoKey{}, fmt.Errorf("%w: %s: registry %s is not an upstream of this mirror (it has %s)",
			ErrInvalid, where, n.Host, strings.Join(im.o.Upstreams, ", "))
	}
	return cache.RepoKey{Upstream: host, Repo: n.Repository}, nil
}

// manifest reads a manifest: from the files staged (checked, and put in
// the store, where nothing holds it yet), or, when key is set, from the
// store if the repository holds it or its upstream delivered it
// (content an earlier bundle brought). graph.ErrNotFound when neither.
func (im *importer) manifest(ctx context.Context, d digest.Digest, key *cache.RepoKey) (manifestInfo, error) {
	if info, ok := im.manifests[d]; ok {
		if info.stored && (key == nil || !im.holds(ctx, *key, cache.LinkManifest, d)) {
			return manifestInfo{}, fmt.Errorf("manifest %s: %w", d, graph.ErrNotFound)
		}
		return info, nil
	}
	var m cache.Manifest
	if size, ok := im.staged[d]; ok {
		if size > manifest.MaxSize {
			return manifestInfo{}, fmt.Errorf("%w: blob %s (%d bytes) is named as a manifest, and is larger than one may be", ErrInvalid, d, size)
		}
		r, err := im.store.OpenBlob(ctx, d)
		if err != nil {
			return manifestInfo{}, err
		}
		data := make([]byte, r.Size())
		_, err = r.ReadAt(data, 0)
		r.Close()
		if err != nil && !errors.Is(err, io.EOF) {
			return manifestInfo{}, err
		}
		mt := manifest.Infer(data)
		if mt == "" {
			return manifestInfo{}, fmt.Errorf("%w: blob %s is named as a manifest, and is none", ErrInvalid, d)
		}
		m = cache.Manifest{Digest: d, MediaType: mt, Data: data}
	} else if key != nil && im.holds(ctx, *key, cache.LinkManifest, d) {
		var err error
		if m, err = im.store.GetManifest(ctx, d); err != nil {
			return manifestInfo{}, err
		}
	} else {
		return manifestInfo{}, fmt.Errorf("manifest %s: %w", d, graph.ErrNotFound)
	}
	p, err := manifest.Parse(m.MediaType, m.Data)
	if err != nil {
		return manifestInfo{}, fmt.Errorf("%w: manifest %s: %v", ErrInvalid, d, err)
	}
	if _, ok := im.staged[d]; ok {
		if err := im.store.PutManifest(ctx, m); err != nil {
			return manifestInfo{}, err
		}
	}
	_, fromArchive := im.staged[d]
	info := manifestInfo{mediaType: m.MediaType, size: int64(len(m.Data)), children: p.Manifests, stored: !fromArchive}
	if desc, subject, err := referrers.Describe(d, m.MediaType, m.Data); err == nil && subject != nil {
		info.subject, info.desc = subject.Digest, desc
	}
	im.manifests[d] = info
	return info, nil
}

// holds reports whether the store has content for a repository: linked
// there, or delivered by its upstream. Content of other repositories is
// never taken on the strength of its digest.
func (im *importer) holds(ctx context.Context, k cache.RepoKey, kind cache.LinkKind, d digest.Digest) bool {
	if _, ok, err := im.store.Linked(ctx, k, kind, d); err == nil && ok {
		return true
	}
	ok, err := im.store.UpstreamHolds(ctx, k.Upstream, kind, d)
	return err == nil && ok
}

func (im *importer) warn(w string) {
	if len(im.res.Warnings) < 100 {
		im.res.Warnings = append(im.res.Warnings, w)
	}
}

// planner collects what each repository links.
type planner struct {
	im      *importer
	refs    map[digest.Digest][]v1.Descriptor
	repos   map[cache.RepoKey]*repoPlan
	order   []*repoPlan
	reached map[digest.Digest]bool
	// answered are the referrers answers planned; indexed, the entries
	// of the referrers index.
	answered map[cache.ReferrerKey]bool
	indexed  map[referrerEntry]bool
	out      cache.Import
}

type referrerEntry struct {
	key      cache.ReferrerKey
	referrer digest.Digest
}

type repoPlan struct {
	key   cache.RepoKey
	links []cache.ImportLink
	has   map[digest.Digest]bool
	tags  map[string]bool
}

func (p *planner) repo(k cache.RepoKey) *repoPlan {
	rp := p.repos[k]
	if rp == nil {
		rp = &repoPlan{key: k, has: map[digest.Digest]bool{}, tags: map[string]bool{}}
		p.repos[k] = rp
		p.order = append(p.order, rp)
	}
	return rp
}

func (rp *repoPlan) link(kind cache.LinkKind, d digest.Digest) {
	if !rp.has[d] {
		rp.has[d] = true
		rp.links = append(rp.links, cache.ImportLink{Repo: rp.key, Kind: kind, Digest: d})
	}
}

// subjectOf is the subject a fallback tag names, among what a repository
// holds.
func (p *planner) subjectOf(tag string, rp *repoPlan) digest.Digest {
	for d := range rp.has {
		if referrers.FallbackTag(d) == tag {
			return d
		}
	}
	return ""
}

func (p *planner) tag(rp *repoPlan, tag string, d digest.Digest) {
	info := p.im.manifests[d]
	if rp.tags[tag] {
		// A tag named twice: the last entry wins, as in index.json.
		p.out.Tags = slices.DeleteFunc(p.out.Tags, func(t cache.ImportTag) bool {
			return t.Key.Upstream == rp.key.Upstream && t.Key.Repo == rp.key.Repo && t.Key.Tag == tag
		})
	}
	rp.tags[tag] = true
	p.out.Tags = append(p.out.Tags, cache.ImportTag{
		Key:   cache.TagKey{Upstream: rp.key.Upstream, Repo: rp.key.Repo, Tag: tag},
		Entry: cache.TagEntry{Digest: d, MediaType: info.mediaType, Size: info.size, CheckedAt: p.im.now},
	})
}

// image walks one named image in its repository: every manifest it
// reaches must be in the bundle or the store (an index's platforms may be
// left out), every blob too, with the size its descriptor says.
func (p *planner) image(ctx context.Context, r root) error {
	im := p.im
	rp := p.repo(r.key)
	src := &walkSource{p: p, key: r.key}
	var visited []cache.ImportLink
	var refs []cache.ImportReferrer
	err := graph.Walk(ctx, src, r.desc, graph.Options{Referrers: true}, func(n graph.Node) error {
		d := n.Descriptor
		p.reached[d.Digest] = true
		what := func() string {
			if n.Kind == graph.Root {
				return "manifest " + d.Digest.String()
			}
			return fmt.Sprintf("%s %s (of %s)", n.Kind, d.Digest, n.Parent)
		}
		if n.Kind.Blob() {
			size, ok := im.staged[d.Digest]
			if !ok {
				if info, err := im.store.StatBlob(ctx, d.Digest); err == nil && im.holds(ctx, r.key, cache.LinkBlob, d.Digest) {
					size, ok = info.Size, true
				}
			}
			switch {
			case !ok && len(d.URLs) > 0:
				im.warn(fmt.Sprintf("%s: %s is not in the bundle (it is fetched from its URLs); not linked", r.where, what()))
				return nil
			case !ok:
				return fmt.Errorf("%w: %s is in neither the bundle nor the store", ErrInvalid, what())
			case size != d.Size:
				return fmt.Errorf("%w: %s has %d bytes, its descriptor says %d", ErrInvalid, what(), size, d.Size)
			}
			visited = append(visited, cache.ImportLink{Repo: r.key, Kind: cache.LinkBlob, Digest: d.Digest})
			return nil
		}
		if n.Missing {
			if n.Kind == graph.Child {
				im.warn(fmt.Sprintf("%s: %s is not in the bundle; that platform is left out", r.where, what()))
				return nil
			}
			return fmt.Errorf("%w: %s is in neither the bundle nor the store", ErrInvalid, what())
		}
		info := im.manifests[d.Digest]
		if n.Kind != graph.Root && info.size != d.Size {
			return fmt.Errorf("%w: %s has %d bytes, its descriptor says %d", ErrInvalid, what(), info.size, d.Size)
		}
		visited = append(visited, cache.ImportLink{Repo: r.key, Kind: cache.LinkManifest, Digest: d.Digest})
		p.answer(r.key, d.Digest)
		if n.Kind == graph.Referrer {
			refs = append(refs, cache.ImportReferrer{
				Key:        cache.ReferrerKey{Upstream: r.key.Upstream, Repo: r.key.Repo, Subject: n.Parent},
				Descriptor: info.desc,
			})
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("%s: %w", r.where, err)
	}
	// What an image names becomes visible before the image: the walk
	// visits parents first, so it is linked in the reverse order.
	for i := len(visited) - 1; i >= 0; i-- {
		l := visited[i]
		if !rp.has[l.Digest] {
			if l.Kind == cache.LinkBlob {
				im.res.Blobs++
			} else {
				im.res.Manifests++
			}
		}
		rp.link(l.Kind, l.Digest)
	}
	for _, ref := range refs {
		k := referrerEntry{ref.Key, ref.Descriptor.Digest}
		if !p.indexed[k] {
			if p.indexed == nil {
				p.indexed = map[referrerEntry]bool{}
			}
			p.indexed[k] = true
			p.out.Referrers = append(p.out.Referrers, ref)
			im.res.Referrers++
		}
	}
	pinName := r.desc.Digest.String()
	if r.name.Tag != "" {
		p.tag(rp, r.name.Tag, r.desc.Digest)
		pinName = r.name.Tag
	}
	p.out.Pins = append(p.out.Pins, cache.Pin{Repo: r.key, Name: pinName, Digest: r.desc.Digest, At: im.now})
	n := r.name
	if n.Tag == "" {
		n.Digest = r.desc.Digest
	}
	im.res.Images = append(im.res.Images, ImportedImage{Name: n.String(), Digest: r.desc.Digest})
	return nil
}

// answer keeps the bundle's referrers of a manifest (none, often) as the
// upstream's last answer, checked long ago: an offline mirror answers
// from it without saying its list may be incomplete, and an online one
// asks its upstream again at once.
func (p *planner) answer(k cache.RepoKey, d digest.Digest) {
	key := cache.ReferrerKey{Upstream: k.Upstream, Repo: k.Repo, Subject: d}
	if p.answered[key] {
		return
	}
	if p.answered == nil {
		p.answered = map[cache.ReferrerKey]bool{}
	}
	p.answered[key] = true
	ds := append([]v1.Descriptor{}, p.refs[d]...)
	p.out.Answers = append(p.out.Answers, cache.ImportAnswer{Key: key, Answer: cache.UpstreamReferrers{Descriptors: ds, CheckedAt: time.Unix(0, 0)}})
}

// commit is the plan, in the order it may become visible.
func (p *planner) commit() *cache.Import {
	for _, rp := range p.order {
		p.out.Links = append(p.out.Links, rp.links...)
	}
	p.im.res.Tags = len(p.out.Tags)
	return &p.out
}

// walkSource reads a bundle's manifests for a walk in one repository.
type walkSource struct {
	p   *planner
	key cache.RepoKey
}

func (s *walkSource) Manifest(ctx context.Context, d digest.Digest) (string, []byte, error) {
	info, err := s.p.im.manifest(ctx, d, &s.key)
	if err != nil {
		return "", nil, err
	}
	// The walk reads what a manifest names from its parsed form: the
	// bytes are in the store, read again only here.
	m, err := s.p.im.store.GetManifest(ctx, d)
	if err != nil {
		return "", nil, err
	}
	return info.mediaType, m.Data, nil
}

func (s *walkSource) Referrers(_ context.Context, d digest.Digest) ([]v1.Descriptor, error) {
	return s.p.refs[d], nil
}
