package bundle

import (
	"archive/tar"
	"bufio"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"path"
	"strings"

	"github.com/opencontainers/go-digest"
)

// ErrDamaged is an archive that cannot be read to its end: cut short, or
// not a tar archive at all.
var ErrDamaged = errors.New("bundle: the archive is damaged or cut short")

// entry is a file of an archive. A link (symbolic or hard) has a target,
// as a path in the archive, and no bytes.
type entry struct {
	name string
	size int64
	link string
	r    io.Reader
}

// readArchive calls f with each file of a tar archive (gzip-compressed or
// not), in order; directories and special files are skipped. What f does
// not read of a file is skipped. Entry names lose a leading ./ or /.
func readArchive(r io.Reader, f func(e entry) error) error {
	var src io.Reader
	gzipped := false
	if rs, ok := r.(io.ReadSeeker); ok {
		// A file: tar skips what is not read by seeking. (A pipe is an
		// *os.File too, and cannot seek.)
		if start, err := rs.Seek(0, io.SeekCurrent); err == nil {
			magic := make([]byte, 2)
			n, _ := io.ReadFull(rs, magic)
			if _, err := rs.Seek(start, io.SeekStart); err != nil {
				return err
			}
			gzipped = n == 2 && magic[0] == 0x1f && magic[1] == 0x8b
			src = rs
		}
	}
	if src == nil || gzipped {
		br := bufio.NewReaderSize(r, 64<<10)
		magic, _ := br.Peek(2)
		gzipped = len(magic) == 2 && magic[0] == 0x1f && magic[1] == 0x8b
		src = br
	}
	if gzipped {
		br := src.(*bufio.Reader)
		gz, err := gzip.NewReader(br)
		if err != nil {
			return fmt.Errorf("%w: %v", ErrDamaged, err)
		}
		defer gz.Close()
		src = gz
	}
	tr := tar.NewReader(src)
	last, files := "", 0
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			if last == "" {
				return fmt.Errorf("%w: no tar header at the start: %v", ErrDamaged, err)
			}
			return fmt.Errorf("%w: after entry %q: %v", ErrDamaged, last, err)
		}
		last = hdr.Name
		name := cleanName(hdr.Name)
		if name == "" || name == "." || hdr.Typeflag == tar.TypeDir {
			continue
		}
		var e entry
		switch hdr.Typeflag {
		case tar.TypeReg, '\x00':
			e = entry{name: name, size: hdr.Size, r: tr}
		case tar.TypeSymlink:
			target := hdr.Linkname
			if !path.IsAbs(target) {
				target = path.Join(path.Dir(name), target)
			}
			e = entry{name: name, link: cleanName(target)}
		case tar.TypeLink:
			e = entry{name: name, link: cleanName(hdr.Linkname)}
		default:
			continue
		}
		files++
		if err := f(e); err != nil {
			return err
		}
	}
	if files == 0 {
		return fmt.Errorf("%w: no files in it", ErrDamaged)
	}
	// Read what follows the end of the archive: a gzip stream checks its
	// checksum at its end.
	if _, err := io.Copy(io.Discard, src); err != nil {
		return fmt.Errorf("%w: after the last entry: %v", ErrDamaged, err)
	}
	return nil
}

// readEntry reads a file's bytes whole, when it has at most max.
func readEntry(e entry, max int64) ([]byte, error) {
	if e.size > max {
		return nil, fmt.Errorf("entry %q: %d bytes, more than the %d a layout file may have", e.name, e.size, max)
	}
	b, err := io.ReadAll(e.r)
	if err != nil {
		return nil, fmt.Errorf("%w: entry %q: %v", ErrDamaged, e.name, err)
	}
	return b, nil
}

// cleanName is an archive entry's name as a layout path: ./ and a
// leading / taken off, and cleaned.
func cleanName(n string) string {
	n = path.Clean("/" + n)
	return strings.TrimPrefix(n, "/")
}

// ExcludeFrom reads which blobs an earlier bundle holds (their names).
func ExcludeFrom(r io.Reader) (map[digest.Digest]bool, error) {
	out := map[digest.Digest]bool{}
	err := readArchive(r, func(e entry) error {
		d, err := blobDigest(e.name)
		if err != nil {
			return err
		}
		if d != "" && e.link == "" {
			out[d] = true
		}
		return nil
	})
	return out, err
}
