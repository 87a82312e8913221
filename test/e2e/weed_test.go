package e2e

import (
	"encoding/xml"
	"net/http"
	"net/url"
	"testing"

	"github.com/ocimirror/ocimirror/internal/weedtest"
)

// SeaweedFS runs from internal/weedtest (.tools/bin/weed, built by
// test/tools/install.sh weed).

// keys lists every object key in the bucket (ListObjectsV2, anonymous).
func bucketKeys(t *testing.T, w *weedtest.Weed) []string {
	t.Helper()
	var out []string
	token := ""
	for range 100 {
		q := url.Values{"list-type": {"2"}, "max-keys": {"1000"}}
		if token != "" {
			q.Set("continuation-token", token)
		}
		st, body, _ := httpGet(t, "http://"+w.S3+"/"+w.Bucket+"?"+q.Encode())
		if st != http.StatusOK {
			t.Fatalf("listing bucket %s: %d %s", w.Bucket, st, body)
		}
		var page struct {
			Contents []struct {
				Key string `xml:"Key"`
			} `xml:"Contents"`
			IsTruncated           bool   `xml:"IsTruncated"`
			NextContinuationToken string `xml:"NextContinuationToken"`
		}
		if err := xml.Unmarshal(body, &page); err != nil {
			t.Fatalf("listing bucket %s: %v\n%s", w.Bucket, err, body)
		}
		for _, c := range page.Contents {
			out = append(out, c.Key)
		}
		if !page.IsTruncated || page.NextContinuationToken == "" {
			return out
		}
		token = page.NextContinuationToken
	}
	t.Fatalf("listing bucket %s: more than 100 pages", w.Bucket)
	return nil
}
