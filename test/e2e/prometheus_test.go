package e2e

// A real Prometheus (Debian's prometheus package) for the observability
// tests of issue 10: it scrapes ocimirror's admin listener, loads the
// alerting rules of deploy/prometheus, and answers PromQL through its HTTP
// API. The expressions of the Grafana board and of the rules are checked by
// evaluating them there, as no PromQL parser is vendored.

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
)

// Files under the repository's root.
const (
	dashboardFile  = "deploy/grafana/ocimirror.json"
	alertsFile     = "deploy/prometheus/alerts.yml"
	promConfigFile = "deploy/prometheus/prometheus.yml"
)

// prometheus is a running Prometheus server.
type prometheus struct {
	*proc
	url string // http://127.0.0.1:port
}

// startPrometheus runs prometheus on a free loopback port, scraping the
// targets (host:port of ocimirror admin listeners, path /metrics, job
// "ocimirror") every second and evaluating deploy/prometheus/alerts.yml
// every second. Its data lives in a temporary directory; the test's cleanup
// stops it. It returns once /-/ready answers 200.
func startPrometheus(t *testing.T, targets ...string) *prometheus {
	t.Helper()
	bin := tool(t, "prometheus")
	dir := t.TempDir()
	var cfg strings.Builder
	fmt.Fprintf(&cfg, "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n")
	fmt.Fprintf(&cfg, "rule_files:\n  - %q\n", filepath.Join(repoRoot, alertsFile))
	if len(targets) > 0 {
		quoted := make([]string, len(targets))
		for i, h := range targets {
			quoted[i] = strconv.Quote(h)
		}
		fmt.Fprintf(&cfg, "scrape_configs:\n  - job_name: ocimirror\n    metrics_path: /metrics\n    static_configs:\n      - targets: [%s]\n",
			strings.Join(quoted, ", "))
	}
	conf := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(conf, []byte(cfg.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	addr := freeAddr(t)
	p := &prometheus{url: "http://" + addr}
	p.proc = startProc(t, bin, nil,
		"--config.file="+conf,
		"--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+addr,
		"--log.level=warn",
	)
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case <-p.done:
			t.Fatalf("prometheus exited:\n%s", tail(p.log.String(), 4096))
		default:
		}
		resp, err := http.Get(p.url + "/-/ready")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return p
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("prometheus was not ready at %s within 30 s", p.url)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// sample is one element of an instant query's result.
type sample struct {
	labels map[string]string
	value  float64
}

func (s sample) String() string {
	keys := make([]string, 0, len(s.labels))
	for k := range s.labels {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = k + "=" + strconv.Quote(s.labels[k])
	}
	return "{" + strings.Join(parts, ", ") + "} " + strconv.FormatFloat(s.value, 'g', -1, 64)
}

// query evaluates an instant query now; an API error fails the test.
func (p *prometheus) query(t *testing.T, expr string) []sample {
	t.Helper()
	s, err := p.queryErr(expr)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// queryErr evaluates an instant query now. A vector is returned as is, a
// scalar as one sample without labels.
func (p *prometheus) queryErr(expr string) ([]sample, error) {
	var data struct {
		ResultType string          `json:"resultType"`
		Result     json.RawMessage `json:"result"`
	}
	if err := p.api("/api/v1/query?"+url.Values{"query": {expr}}.Encode(), &data); err != nil {
		return nil, fmt.Errorf("query %q: %w", expr, err)
	}
	switch data.ResultType {
	case "vector":
		var vec []struct {
			Metric map[string]string `json:"metric"`
			Value  [2]any            `json:"value"`
		}
		if err := json.Unmarshal(data.Result, &vec); err != nil {
			return nil, fmt.Errorf("query %q: %w", expr, err)
		}
		out := make([]sample, len(vec))
		for i, v := range vec {
			f, err := promValue(v.Value)
			if err != nil {
				return nil, fmt.Errorf("query %q: %w", expr, err)
			}
			out[i] = sample{labels: v.Metric, value: f}
		}
		return out, nil
	case "scalar":
		var v [2]any
		if err := json.Unmarshal(data.Result, &v); err != nil {
			return nil, fmt.Errorf("query %q: %w", expr, err)
		}
		f, err := promValue(v)
		if err != nil {
			return nil, fmt.Errorf("query %q: %w", expr, err)
		}
		return []sample{{labels: map[string]string{}, value: f}}, nil
	default:
		return nil, fmt.Errorf("query %q: result type %q, want an instant vector or a scalar", expr, data.ResultType)
	}
}

// promValue decodes a [time, "value"] pair; the value may be NaN or ±Inf.
func promValue(v [2]any) (float64, error) {
	s, ok := v[1].(string)
	if !ok {
		return 0, fmt.Errorf("sample value %v is not a string", v[1])
	}
	return strconv.ParseFloat(s, 64)
}

// api GETs a path of the HTTP API and decodes the data of a success
// envelope into data; an error envelope becomes the error.
func (p *prometheus) api(path string, data any) error {
	resp, err := http.Get(p.url + path)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return err
	}
	var env struct {
		Status    string          `json:"status"`
		Data      json.RawMessage `json:"data"`
		ErrorType string          `json:"errorType"`
		Error     string          `json:"error"`
	}
	if err := json.Unmarshal(b, &env); err != nil {
		return fmt.Errorf("HTTP %d, not an API answer: %s", resp.StatusCode, tail(string(b), 512))
	}
	if env.Status != "success" {
		return fmt.Errorf("%s: %s", env.ErrorType, env.Error)
	}
	return json.Unmarshal(env.Data, data)
}

// waitScrape waits, at most 30 s, until every target has been scraped
// again since the call, successfully, and the samples can be queried: the
// scrape's `up` sample is stamped after the call. A target that is down
// fails the test. The first scrape comes about 5 s after Prometheus starts
// (it throttles target discovery updates to one each 5 s).
func (p *prometheus) waitScrape(t *testing.T) {
	t.Helper()
	since := float64(time.Now().UnixMilli()) / 1000
	deadline := time.Now().Add(30 * time.Second)
	for {
		s := p.query(t, `timestamp(up{job="ocimirror"})`)
		fresh := len(s) > 0
		for _, x := range s {
			fresh = fresh && x.value > since
		}
		if fresh {
			for _, x := range p.query(t, `up{job="ocimirror"} == 0`) {
				t.Fatalf("target %s is down", x.labels["instance"])
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no fresh scrape of every target within 30 s: timestamp(up) = %v, since %.3f", s, since)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// waitRules waits, at most 30 s, until every rule group has been evaluated
// since the call, and returns the rules with their health.
func (p *prometheus) waitRules(t *testing.T) []promRule {
	t.Helper()
	since := time.Now()
	deadline := since.Add(30 * time.Second)
	for {
		var data struct {
			Groups []struct {
				Name           string     `json:"name"`
				LastEvaluation time.Time  `json:"lastEvaluation"`
				Rules          []promRule `json:"rules"`
			} `json:"groups"`
		}
		if err := p.api("/api/v1/rules", &data); err != nil {
			t.Fatal(err)
		}
		var rules []promRule
		fresh := len(data.Groups) > 0
		for _, g := range data.Groups {
			fresh = fresh && g.LastEvaluation.After(since)
			rules = append(rules, g.Rules...)
		}
		if fresh {
			return rules
		}
		if time.Now().After(deadline) {
			t.Fatalf("the rule groups were not evaluated within 30 s")
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// promRule is a rule as /api/v1/rules shows it.
type promRule struct {
	Name      string `json:"name"`
	Query     string `json:"query"`
	Health    string `json:"health"`
	LastError string `json:"lastError"`
	State     string `json:"state"` // alerting rules: inactive, pending, firing
}

// adminHost returns the address of ocimirror's admin listener, from its log.
func (m *mirror) adminHost(t *testing.T) string {
	t.Helper()
	g := adminListenRE.FindStringSubmatch(m.log.String())
	if g == nil {
		t.Fatalf("ocimirror logged no admin listener:\n%s", tail(m.log.String(), 4096))
	}
	return g[1]
}

var adminListenRE = regexp.MustCompile(`admin listening.* addr=(\S+)`)

// grafanaVars substitutes the board's variables: an interval for the
// built-in ones, and every upstream for $upstream (its "All" value).
var grafanaVars = strings.NewReplacer(
	"${__rate_interval}", "1m", "$__rate_interval", "1m",
	"${__interval}", "1m", "$__interval", "1m",
	"${__range}", "1h", "$__range", "1h",
	"${upstream:regex}", ".*", "${upstream}", ".*", "$upstream", ".*",
)

// unsubstitutedRE finds a Grafana variable left in an expression. A "$" in
// a label regexp (`=~"a$"`) is not followed by a name.
var unsubstitutedRE = regexp.MustCompile(`\$\{?[A-Za-z_]`)

// labelValuesRE matches Grafana's label_values(expr, label) query.
var labelValuesRE = regexp.MustCompile(`^\s*label_values\(\s*(.+)\s*,\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$`)

// dashboardExprs returns every PromQL expression of the Grafana board, with
// its variables substituted: the targets of all panels, those nested in
// collapsed rows included, and the queries of the template variables.
// Grafana's label_values(expr, label) is not PromQL; its expr is. Other
// Grafana variable functions (label_values(label), label_names(),
// metrics()) refer to no expression and are skipped.
func dashboardExprs(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot, dashboardFile))
	if err != nil {
		t.Fatal(err)
	}
	var board grafanaBoard
	if err := json.Unmarshal(b, &board); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	var exprs []string
	add := func(where, expr string) {
		e := grafanaVars.Replace(expr)
		if unsubstitutedRE.MatchString(e) {
			t.Errorf("%s: %s: a Grafana variable the test does not know: %s", dashboardFile, where, e)
		}
		exprs = append(exprs, e)
	}
	var walk func([]grafanaPanel)
	walk = func(panels []grafanaPanel) {
		for _, p := range panels {
			for _, tg := range p.Targets {
				if strings.TrimSpace(tg.Expr) == "" {
					t.Errorf("%s: panel %q, target %s: no expr", dashboardFile, p.Title, tg.RefID)
					continue
				}
				add(fmt.Sprintf("panel %q, target %s", p.Title, tg.RefID), tg.Expr)
			}
			walk(p.Panels)
		}
	}
	walk(board.Panels)
	for _, v := range board.Templating.List {
		if v.Type != "query" {
			continue
		}
		q := v.query()
		switch {
		case labelValuesRE.MatchString(q):
			add("variable "+v.Name, labelValuesRE.FindStringSubmatch(q)[1])
		case strings.HasPrefix(strings.TrimSpace(q), "query_result("):
			inner := strings.TrimSpace(q)
			add("variable "+v.Name, inner[len("query_result("):len(inner)-1])
		default:
			t.Logf("%s: variable %s: %q is a Grafana function without a PromQL expression; skipped", dashboardFile, v.Name, q)
		}
	}
	return exprs
}

// grafanaBoard is the part of a dashboard the tests read.
type grafanaBoard struct {
	SchemaVersion int            `json:"schemaVersion"`
	Panels        []grafanaPanel `json:"panels"`
	Templating    struct {
		List []grafanaVar `json:"list"`
	} `json:"templating"`
}

type grafanaPanel struct {
	ID         int             `json:"id"`
	Type       string          `json:"type"`
	Title      string          `json:"title"`
	Datasource json.RawMessage `json:"datasource"`
	Targets    []struct {
		RefID      string          `json:"refId"`
		Expr       string          `json:"expr"`
		Datasource json.RawMessage `json:"datasource"`
	} `json:"targets"`
	Panels []grafanaPanel `json:"panels"` // a collapsed row's
}

type grafanaVar struct {
	Name  string          `json:"name"`
	Type  string          `json:"type"`
	Query json.RawMessage `json:"query"` // a string, or {"query": "..."} since Grafana 10
}

// query returns the variable's query, in either form.
func (v grafanaVar) query() string {
	var s string
	if json.Unmarshal(v.Query, &s) == nil {
		return s
	}
	var o struct {
		Query string `json:"query"`
	}
	_ = json.Unmarshal(v.Query, &o)
	return o.Query
}

// alertRules is the shape of a Prometheus rules file.
type alertRules struct {
	Groups []struct {
		Name  string `yaml:"name"`
		Rules []struct {
			Alert       string            `yaml:"alert"`
			Record      string            `yaml:"record"`
			Expr        string            `yaml:"expr"`
			For         string            `yaml:"for"`
			Labels      map[string]string `yaml:"labels"`
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

func readAlertRules(t *testing.T) alertRules {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot, alertsFile))
	if err != nil {
		t.Fatal(err)
	}
	var r alertRules
	if err := yaml.Unmarshal(b, &r); err != nil {
		t.Fatalf("%s: %v", alertsFile, err)
	}
	return r
}

// alertExprs returns the expression of every rule in alerts.yml.
func alertExprs(t *testing.T) []string {
	t.Helper()
	var exprs []string
	for _, g := range readAlertRules(t).Groups {
		for _, r := range g.Rules {
			exprs = append(exprs, r.Expr)
		}
	}
	return exprs
}

// promSynthetic are the series Prometheus adds to every target's scrape;
// the rules may refer to them as well.
var promSynthetic = []string{"up", "scrape_duration_seconds", "scrape_samples_scraped",
	"scrape_samples_post_metric_relabeling", "scrape_series_added"}

// checkExprsAgainstMetrics fails the test for every expression of the
// board and the rules that Prometheus cannot evaluate (when p is not nil),
// or that refers to a series not in names (Prometheus's own per-target
// series aside).
//
// names is to come from ocimirror's own /metrics after the scripted
// sequence of issue 10 (cold pull, warm pull, stale tag, upstream stopped,
// offline miss) has run, so that the counters that appear on first use
// exist:
//
//	checkExprsAgainstMetrics(t, p, exportedSeries(t, m.adminHost(t)))
//
// Until the metrics are on this branch, TestE2E_Observe_DeployFilesUseSpecSeries
// runs it against the names of the specification, and
// TestE2E_Observe_StandInMetrics against a stand-in /metrics.
func checkExprsAgainstMetrics(t *testing.T, p *prometheus, names map[string]bool) {
	t.Helper()
	known := func(n string) bool {
		for _, s := range promSynthetic {
			if n == s {
				return true
			}
		}
		return names[n]
	}
	exprs := append(dashboardExprs(t), alertExprs(t)...)
	for _, e := range exprs {
		if p != nil {
			if _, err := p.queryErr(e); err != nil {
				t.Error(err)
			}
		}
		refs := metricNames(e)
		if len(refs) == 0 {
			t.Errorf("no metric name found in %q", e)
		}
		for _, n := range refs {
			if !known(n) {
				t.Errorf("%q refers to %s, which ocimirror does not export", e, n)
			}
		}
	}
}

// exportedSeries scrapes ocimirror's /metrics on the admin listener and
// returns the names of its series: every sample's name, and for each
// # TYPE line the name with the suffixes of its type (_bucket, _sum and
// _count of a histogram, _total of a counter), so that a series with no
// sample yet still counts.
func exportedSeries(t *testing.T, adminHost string) map[string]bool {
	t.Helper()
	code, body, _ := httpGet(t, "http://"+adminHost+"/metrics")
	if code != http.StatusOK {
		t.Fatalf("GET /metrics: %d\n%s", code, tail(string(body), 1024))
	}
	return parseExposition(string(body))
}

// parseExposition returns the series names of a Prometheus text exposition.
func parseExposition(text string) map[string]bool {
	names := map[string]bool{}
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if f := strings.Fields(line); len(f) == 4 && f[0] == "#" && f[1] == "TYPE" {
			for _, n := range typedNames(f[2], f[3]) {
				names[n] = true
			}
			continue
		}
		if line == "" || line[0] == '#' {
			continue
		}
		if i := strings.IndexAny(line, "{ "); i > 0 {
			names[line[:i]] = true
		}
	}
	return names
}

// typedNames returns the series names a metric family of a type exposes.
func typedNames(name, typ string) []string {
	switch typ {
	case "histogram":
		return []string{name + "_bucket", name + "_sum", name + "_count"}
	case "summary":
		return []string{name, name + "_sum", name + "_count"}
	case "counter":
		if !strings.HasSuffix(name, "_total") {
			return []string{name, name + "_total"} // OpenMetrics names the family without it
		}
	}
	return []string{name}
}

// promqlWords are PromQL keywords that stand where a series name could:
// operators, modifiers, and literals.
var promqlWords = map[string]bool{
	"and": true, "or": true, "unless": true, "atan2": true, "bool": true,
	"offset": true, "by": true, "without": true, "on": true, "ignoring": true,
	"group_left": true, "group_right": true, "inf": true, "nan": true,
}

// promqlLabelLists are the keywords followed by a list of label names.
var promqlLabelLists = map[string]bool{
	"by": true, "without": true, "on": true, "ignoring": true,
	"group_left": true, "group_right": true,
}

// metricNames returns the series names a PromQL expression refers to,
// sorted and without repeats. Without a parser it reads tokens: strings,
// comments, durations and numbers are skipped; so are label matchers in
// braces (except an exact __name__="..." matcher, whose value is a name),
// range and subquery brackets, and the label lists after by, without, on,
// ignoring, group_left and group_right. An identifier followed by "(", or
// by a by or without clause, is a function or an aggregation; a keyword is
// not a name; any other identifier is a series selector.
func metricNames(expr string) []string {
	seen := map[string]bool{}
	s := expr
	i := 0
	skipSpace := func(j int) int {
		for j < len(s) && strings.ContainsRune(" \t\r\n", rune(s[j])) {
			j++
		}
		return j
	}
	// skipString returns the index after the string literal starting at j.
	skipString := func(j int) int {
		q := s[j]
		for j++; j < len(s); j++ {
			if s[j] == '\\' && q != '`' {
				j++
				continue
			}
			if s[j] == q {
				return j + 1
			}
		}
		return j
	}
	// skipTo returns the index after the closing byte, strings skipped.
	skipTo := func(j int, open, close byte) int {
		depth := 0
		for j < len(s) {
			switch c := s[j]; {
			case c == '"' || c == '\'' || c == '`':
				j = skipString(j)
				continue
			case c == open:
				depth++
			case c == close:
				depth--
				if depth == 0 {
					return j + 1
				}
			}
			j++
		}
		return j
	}
	isIdentStart := func(c byte) bool { return c == '_' || c == ':' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' }
	isIdent := func(c byte) bool { return isIdentStart(c) || '0' <= c && c <= '9' }
	for i < len(s) {
		c := s[i]
		switch {
		case c == '"' || c == '\'' || c == '`':
			i = skipString(i)
		case c == '#':
			for i < len(s) && s[i] != '\n' {
				i++
			}
		case c == '{':
			end := skipTo(i, '{', '}')
			if m := nameMatcherRE.FindStringSubmatch(s[i:end]); m != nil {
				seen[m[1]] = true
			}
			i = end
		case c == '[':
			i = skipTo(i, '[', ']')
		case '0' <= c && c <= '9' || c == '.' && i+1 < len(s) && '0' <= s[i+1] && s[i+1] <= '9':
			for i < len(s) && (isIdent(s[i]) || s[i] == '.') {
				i++ // 0.5, 1e3, 0x1f, 1h30m
			}
		case isIdentStart(c):
			j := i
			for j < len(s) && isIdent(s[j]) {
				j++
			}
			word := s[i:j]
			next := skipSpace(j)
			switch {
			case promqlLabelLists[word] && next < len(s) && s[next] == '(':
				j = skipTo(next, '(', ')')
			case promqlWords[strings.ToLower(word)]:
			case next < len(s) && s[next] == '(':
				// a function or an aggregation
			case aggregationClauseRE.MatchString(s[next:]):
				// an aggregation with its clause first: sum by (x) (...)
			default:
				seen[word] = true
			}
			i = j
		default:
			i++
		}
	}
	out := make([]string, 0, len(seen))
	for n := range seen {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// aggregationClauseRE matches the clause after an aggregation's name.
var aggregationClauseRE = regexp.MustCompile(`^(by|without)\s*\(`)

// nameMatcherRE finds an exact __name__ matcher in a selector's braces.
var nameMatcherRE = regexp.MustCompile(`__name__\s*=\s*"([A-Za-z_:][A-Za-z0-9_:]*)"`)

// specSeries are the metric families of issue 10 as specified for the
// implementation (names, types and labels agreed in advance), with their types,
// and the Go and process series of client_golang's collectors that the
// board uses.
var specSeries = map[string]string{
	"ocimirror_http_requests_total":               "counter",
	"ocimirror_http_request_duration_seconds":     "histogram",
	"ocimirror_cache_requests_total":              "counter",
	"ocimirror_served_bytes_total":                "counter",
	"ocimirror_upstream_requests_total":           "counter",
	"ocimirror_upstream_request_duration_seconds": "histogram",
	"ocimirror_upstream_bytes_total":              "counter",
	"ocimirror_upstream_up":                       "gauge",
	"ocimirror_fills_in_flight":                   "gauge",
	"ocimirror_fill_waiters":                      "gauge",
	"ocimirror_fills_queued":                      "gauge",
	"ocimirror_fill_sources_total":                "counter",
	"ocimirror_shared_bytes":                      "gauge",
	"ocimirror_shared_evicted_bytes_total":        "counter",
	"ocimirror_store_bytes":                       "gauge",
	"ocimirror_store_budget_bytes":                "gauge",
	"ocimirror_store_pinned_bytes":                "gauge",
	"ocimirror_evictions_total":                   "counter",
	"ocimirror_evicted_bytes_total":               "counter",
	"ocimirror_gc_deleted_bytes_total":            "counter",
	"ocimirror_referrers_sources_total":           "counter",
	"ocimirror_uploads_open":                      "gauge",
	"ocimirror_build_info":                        "gauge",
	"go_goroutines":                               "gauge",
	"go_memstats_heap_inuse_bytes":                "gauge",
	"go_memstats_sys_bytes":                       "gauge",
	"process_cpu_seconds_total":                   "counter",
	"process_open_fds":                            "gauge",
	"process_resident_memory_bytes":               "gauge",
}

// TestE2E_Observe_DeployFilesUseSpecSeries checks, without any tool, that
// the board and the rules refer only to specified series, and that the
// board shows every ocimirror family.
func TestE2E_Observe_DeployFilesUseSpecSeries(t *testing.T) {
	names := map[string]bool{}
	for n, typ := range specSeries {
		for _, s := range typedNames(n, typ) {
			names[s] = true
		}
	}
	checkExprsAgainstMetrics(t, nil, names)

	used := map[string]bool{}
	for _, e := range dashboardExprs(t) {
		for _, n := range metricNames(e) {
			used[strings.TrimSuffix(n, "_bucket")] = true
		}
	}
	for n := range specSeries {
		if strings.HasPrefix(n, "ocimirror_") && !used[n] {
			t.Errorf("%s shows nothing of %s", dashboardFile, n)
		}
	}
}

func TestE2E_Observe_ExtractMetricNames(t *testing.T) {
	tests := []struct {
		name string
		expr string
		want []string
	}{
		{name: "bare selector", expr: `up`, want: []string{"up"}},
		{name: "matchers and range", expr: `rate(a_total{kind="blob", result=~"hit|miss", on!="x"}[5m])`, want: []string{"a_total"}},
		{name: "aggregation clause first", expr: `sum by (kind, result) (rate(a_total[1m]))`, want: []string{"a_total"}},
		{name: "aggregation clause last", expr: `sum(rate(a_total[1m])) without (instance, le)`, want: []string{"a_total"}},
		{name: "histogram quantile", expr: `histogram_quantile(0.99, sum by (le, route) (rate(h_seconds_bucket{route="blob"}[$__rate_interval])))`, want: []string{"h_seconds_bucket"}},
		{name: "vector matching", expr: `a / on (job, instance) group_left (version) b and ignoring (x) c`, want: []string{"a", "b", "c"}},
		{name: "group_left without labels", expr: `a * on (job) group_left b`, want: []string{"a", "b"}},
		{name: "bool, offset and @", expr: `a > bool 0 unless b offset 1d or c @ end()`, want: []string{"a", "b", "c"}},
		{name: "strings with brackets", expr: `label_replace(m, "dst", "${1}{x}(", "src", "(.*)")`, want: []string{"m"}},
		{name: "name matcher", expr: `{__name__="m1", job="x"} or {__name__=~"m2.*"}`, want: []string{"m1"}},
		{name: "literals", expr: `1e3 * x + 0x1f - .5 + NaN + Inf`, want: []string{"x"}},
		{name: "subquery", expr: `max_over_time(rate(a[5m])[1h:1m])`, want: []string{"a"}},
		{name: "comment", expr: "a # b is not here\n+ c", want: []string{"a", "c"}},
		{name: "functions and repeats", expr: `count_values("v", m) or vector(0) + topk(3, m) + absent(n)`, want: []string{"m", "n"}},
		{name: "colons in recorded names", expr: `job:a:rate5m > 0`, want: []string{"job:a:rate5m"}},
		{name: "none", expr: `vector(1) + time()`, want: []string{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := metricNames(tt.expr)
			if strings.Join(got, ",") != strings.Join(tt.want, ",") {
				t.Errorf("metricNames(%q) = %q, want %q", tt.expr, got, tt.want)
			}
		})
	}
}

func TestE2E_Observe_ExtractExportedSeries(t *testing.T) {
	text := `# HELP a_total Things.
# TYPE a_total counter
a_total{kind="blob"} 3
# TYPE h_seconds histogram
h_seconds_bucket{le="+Inf"} 1
h_seconds_sum 0.5
h_seconds_count 1
# TYPE g gauge
# TYPE om counter
om_total 1
plain 2
`
	got := parseExposition(text)
	var names []string
	for n := range got {
		names = append(names, n)
	}
	sort.Strings(names)
	want := "a_total,g,h_seconds_bucket,h_seconds_count,h_seconds_sum,om,om_total,plain"
	if strings.Join(names, ",") != want {
		t.Errorf("parseExposition = %s, want %s", strings.Join(names, ","), want)
	}
}

// promDurationRE matches a Prometheus duration such as 5m or 1h30m.
var promDurationRE = regexp.MustCompile(`^([0-9]+(ms|s|m|h|d|w|y))+$`)

// TestE2E_Observe_DeployFilesValid checks deploy/: the rules and the example
// configuration pass promtool, every rule has what an operator needs, the
// board is well formed, and every expression of both evaluates in a real
// Prometheus (one without targets: empty results, but no errors), as do
// the rules themselves.
func TestE2E_Observe_DeployFilesValid(t *testing.T) {
	promtool := tool(t, "promtool")
	run(t, nil, promtool, "check", "rules", filepath.Join(repoRoot, alertsFile))
	// rule_files in it is relative to the file: the check reads alerts.yml too.
	run(t, nil, promtool, "check", "config", filepath.Join(repoRoot, promConfigFile))

	rules := readAlertRules(t)
	alerts := map[string]bool{}
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" {
				t.Errorf("group %s: a rule that is not an alert: %q", g.Name, r.Record)
				continue
			}
			if alerts[r.Alert] {
				t.Errorf("alert %s: twice", r.Alert)
			}
			alerts[r.Alert] = true
			if !promDurationRE.MatchString(r.For) {
				t.Errorf("alert %s: for: %q, want a duration", r.Alert, r.For)
			}
			if s := r.Labels["severity"]; s != "critical" && s != "warning" && s != "info" {
				t.Errorf("alert %s: severity %q, want critical, warning or info", r.Alert, s)
			}
			for _, a := range []string{"summary", "description"} {
				if strings.TrimSpace(r.Annotations[a]) == "" {
					t.Errorf("alert %s: no %s", r.Alert, a)
				}
			}
		}
	}
	for _, a := range []string{"OCIMirrorUpstreamDown", "OCIMirrorHitRatioLow", "OCIMirrorPassThrough", "OCIMirrorHTTP5xx"} {
		if !alerts[a] {
			t.Errorf("%s has no alert %s", alertsFile, a)
		}
	}

	b, err := os.ReadFile(filepath.Join(repoRoot, dashboardFile))
	if err != nil {
		t.Fatal(err)
	}
	var board grafanaBoard
	if err := json.Unmarshal(b, &board); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	if board.SchemaVersion < 36 {
		t.Errorf("%s: schemaVersion %d, want 36 or later", dashboardFile, board.SchemaVersion)
	}
	vars := map[string]grafanaVar{}
	for _, v := range board.Templating.List {
		vars[v.Name] = v
	}
	if v := vars["datasource"]; v.Type != "datasource" || v.query() != "prometheus" {
		t.Errorf("%s: variable datasource is %+v, want a prometheus data source variable", dashboardFile, v)
	}
	if v := vars["upstream"]; v.query() != "label_values(ocimirror_upstream_up, upstream)" {
		t.Errorf("%s: variable upstream queries %q", dashboardFile, v.query())
	}
	ids := map[int]bool{}
	var walk func([]grafanaPanel)
	walk = func(panels []grafanaPanel) {
		for _, p := range panels {
			if ids[p.ID] {
				t.Errorf("%s: panel id %d twice", dashboardFile, p.ID)
			}
			ids[p.ID] = true
			walk(p.Panels)
			if p.Type == "row" {
				continue
			}
			if len(p.Targets) == 0 {
				t.Errorf("%s: panel %q has no target", dashboardFile, p.Title)
			}
			// Every query goes to the chosen data source, so that the board
			// imports anywhere.
			for _, ds := range append([]json.RawMessage{p.Datasource}, targetDatasources(p)...) {
				var d struct{ Type, UID string }
				if err := json.Unmarshal(ds, &d); err != nil || d.Type != "prometheus" || d.UID != "${datasource}" {
					t.Errorf("%s: panel %q: data source %s, want prometheus ${datasource}", dashboardFile, p.Title, ds)
				}
			}
		}
	}
	walk(board.Panels)

	dash, alertList := dashboardExprs(t), alertExprs(t)
	if len(dash) < 20 || len(alertList) < 4 {
		t.Fatalf("%d expressions in the board and %d in the rules: the files were not read as meant", len(dash), len(alertList))
	}
	p := startPrometheus(t)
	for _, e := range append(dash, alertList...) {
		if _, err := p.queryErr(e); err != nil {
			t.Error(err)
		}
	}
	loaded := p.waitRules(t)
	if len(loaded) != len(alerts) {
		t.Errorf("prometheus loaded %d rules, %s has %d", len(loaded), alertsFile, len(alerts))
	}
	for _, r := range loaded {
		if r.Health != "ok" || r.LastError != "" {
			t.Errorf("rule %s: health %s: %s", r.Name, r.Health, r.LastError)
		}
	}
}

func targetDatasources(p grafanaPanel) []json.RawMessage {
	var out []json.RawMessage
	for _, tg := range p.Targets {
		out = append(out, tg.Datasource)
	}
	return out
}

// fakeExposition is what ocimirror's /metrics would show after n seconds of
// a stand-in workload, by the specification: per second 100 registry API
// requests (10 answered 500), 100 cache requests (20 hits, 60 misses, 20
// pass-through), 1000 bytes passed through at a store 95 % full, and an
// upstream ghcr.io down. The rates are high because rate() over the rules'
// 5m divides by the whole range, here mostly without samples: 100/s makes
// about 0.7/s after 2 s, above the rules' traffic floors.
func fakeExposition(n int) string {
	var b strings.Builder
	family := func(name, typ string, lines ...string) {
		fmt.Fprintf(&b, "# HELP %s Stand-in.\n# TYPE %s %s\n", name, name, typ)
		for _, l := range lines {
			b.WriteString(l + "\n")
		}
	}
	c := func(perSecond int) int { return perSecond * n }
	histogram := func(name, label string) {
		family(name, "histogram",
			fmt.Sprintf(`%s_bucket{%s,le="0.1"} %d`, name, label, c(8)),
			fmt.Sprintf(`%s_bucket{%s,le="1"} %d`, name, label, c(10)),
			fmt.Sprintf(`%s_bucket{%s,le="+Inf"} %d`, name, label, c(10)),
			fmt.Sprintf(`%s_sum{%s} %d`, name, label, c(2)),
			fmt.Sprintf(`%s_count{%s} %d`, name, label, c(10)))
	}
	family("ocimirror_http_requests_total", "counter",
		fmt.Sprintf(`ocimirror_http_requests_total{route="blob",method="GET",code="200"} %d`, c(90)),
		fmt.Sprintf(`ocimirror_http_requests_total{route="manifest",method="GET",code="500"} %d`, c(10)))
	histogram("ocimirror_http_request_duration_seconds", `route="blob"`)
	family("ocimirror_cache_requests_total", "counter",
		fmt.Sprintf(`ocimirror_cache_requests_total{kind="blob",result="hit"} %d`, c(20)),
		fmt.Sprintf(`ocimirror_cache_requests_total{kind="blob",result="miss"} %d`, c(60)),
		fmt.Sprintf(`ocimirror_cache_requests_total{kind="manifest",result="passthrough"} %d`, c(20)))
	family("ocimirror_served_bytes_total", "counter",
		fmt.Sprintf(`ocimirror_served_bytes_total{source="cache"} %d`, c(100)),
		fmt.Sprintf(`ocimirror_served_bytes_total{source="passthrough"} %d`, c(1000)))
	family("ocimirror_upstream_requests_total", "counter",
		fmt.Sprintf(`ocimirror_upstream_requests_total{upstream="docker.io",method="GET",code="200"} %d`, c(4)),
		fmt.Sprintf(`ocimirror_upstream_requests_total{upstream="ghcr.io",method="GET",code="error"} %d`, c(1)))
	histogram("ocimirror_upstream_request_duration_seconds", `upstream="docker.io"`)
	family("ocimirror_upstream_bytes_total", "counter", fmt.Sprintf(`ocimirror_upstream_bytes_total{upstream="docker.io"} %d`, c(1000)))
	family("ocimirror_upstream_up", "gauge", `ocimirror_upstream_up{upstream="docker.io"} 1`, `ocimirror_upstream_up{upstream="ghcr.io"} 0`)
	family("ocimirror_fills_in_flight", "gauge", "ocimirror_fills_in_flight 1")
	family("ocimirror_fill_waiters", "gauge", "ocimirror_fill_waiters 3")
	family("ocimirror_fills_queued", "gauge", "ocimirror_fills_queued 0")
	family("ocimirror_fill_sources_total", "counter", fmt.Sprintf(`ocimirror_fill_sources_total{source="peer"} %d`, c(2)))
	family("ocimirror_shared_bytes", "gauge", "ocimirror_shared_bytes 0")
	family("ocimirror_shared_evicted_bytes_total", "counter", "ocimirror_shared_evicted_bytes_total 0")
	family("ocimirror_store_bytes", "gauge", "ocimirror_store_bytes 950")
	family("ocimirror_store_budget_bytes", "gauge", "ocimirror_store_budget_bytes 1000")
	family("ocimirror_store_pinned_bytes", "gauge", "ocimirror_store_pinned_bytes 900")
	family("ocimirror_evictions_total", "counter", `ocimirror_evictions_total{reason="make_room"} 2`)
	family("ocimirror_evicted_bytes_total", "counter", "ocimirror_evicted_bytes_total 200")
	family("ocimirror_gc_deleted_bytes_total", "counter", "ocimirror_gc_deleted_bytes_total 0")
	family("ocimirror_referrers_sources_total", "counter", fmt.Sprintf(`ocimirror_referrers_sources_total{source="api"} %d`, c(1)))
	family("ocimirror_uploads_open", "gauge", "ocimirror_uploads_open 0")
	family("ocimirror_build_info", "gauge", `ocimirror_build_info{version="test"} 1`)
	family("go_goroutines", "gauge", "go_goroutines 42")
	family("go_memstats_heap_inuse_bytes", "gauge", "go_memstats_heap_inuse_bytes 1e+07")
	family("go_memstats_sys_bytes", "gauge", "go_memstats_sys_bytes 3e+07")
	family("process_cpu_seconds_total", "counter", fmt.Sprintf("process_cpu_seconds_total %g", 0.1*float64(n)))
	family("process_open_fds", "gauge", "process_open_fds 12")
	family("process_resident_memory_bytes", "gauge", "process_resident_memory_bytes 4e+07")
	return b.String()
}

// TestE2E_Observe_StandInMetrics runs the helpers against a real Prometheus
// scraping a stand-in for ocimirror's /metrics (fakeExposition), until
// ocimirror exports its own: the board's and the rules' expressions
// evaluate on data (vector matching errors only show there), and the
// alerts that the stand-in calls for go pending, the others not.
func TestE2E_Observe_StandInMetrics(t *testing.T) {
	start := time.Now()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/metrics" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
		io.WriteString(w, fakeExposition(int(time.Since(start).Seconds())))
	}))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")
	p := startPrometheus(t, host)
	p.waitScrape(t)
	p.waitScrape(t) // rate() needs two samples

	if s := p.query(t, `ocimirror_upstream_up == 0`); len(s) != 1 || s[0].labels["upstream"] != "ghcr.io" || s[0].labels["instance"] != host {
		t.Errorf("ocimirror_upstream_up == 0: %v, want ghcr.io on %s", s, host)
	}
	checkExprsAgainstMetrics(t, p, exportedSeries(t, host))

	want := map[string]string{
		"OCIMirrorTargetDown":      "inactive",
		"OCIMirrorUpstreamDown":    "pending",
		"OCIMirrorHitRatioLow":     "pending",
		"OCIMirrorHitRatioDropped": "inactive", // nothing a day before
		"OCIMirrorPassThrough":     "pending",
		"OCIMirrorHTTP5xx":         "pending",
	}
	var got map[string]string
	for deadline := time.Now().Add(20 * time.Second); ; {
		got = map[string]string{}
		for _, r := range p.waitRules(t) {
			got[r.Name] = r.State
			if r.Health != "ok" {
				t.Fatalf("rule %s: health %s: %s", r.Name, r.Health, r.LastError)
			}
		}
		if fmt.Sprint(got) == fmt.Sprint(want) || time.Now().After(deadline) {
			break
		}
	}
	for name, state := range want {
		if got[name] != state {
			t.Errorf("alert %s: %q, want %q", name, got[name], state)
		}
	}
	for name := range got {
		if _, ok := want[name]; !ok {
			t.Errorf("alert %s: not covered by this test", name)
		}
	}
}
