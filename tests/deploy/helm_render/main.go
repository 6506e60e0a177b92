// helm_render renders a Helm 3 chart the way `helm template` does, for tests on machines without
// Helm. It implements only what Cohort's chart uses: Go text/template with sprig's functions, Helm's
// include, tpl, required, toYaml, fromYaml, toJson, fromJson, lookup (always empty), .Values (the
// chart's values.yaml deep-merged with -f files and --set-string pairs), .Files.Get, .Release,
// .Chart, .Capabilities and .Template.
//
// Values are decoded as Helm decodes them (YAML -> JSON -> Go), so every number is a float64 here as
// it is in Helm; a template that prints a large integer without `int64` shows the same 6.4e+10 that
// Helm would.
//
// Build offline with Debian's Go packages:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o helm_render ./tests/deploy/helm_render
//
// Usage:
//
//	helm_render --chart deploy/helm/cohort [-f values.yaml]... [--set-string a.b=c]... \
//	  [--release-name cohort] [--namespace default] [--strict] [--notes-out NOTES]
//
// Prints every rendered template except partials (_*) and NOTES.txt as `---\n# Source: ...`
// documents, like `helm template`; NOTES.txt goes to --notes-out when given. Exits 1 with the
// template error on failure.
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig"
	yaml "gopkg.in/yaml.v2"
)

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

// Chart mirrors the Chart.yaml fields Helm exposes as .Chart (capitalised as Helm does).
type Chart struct {
	APIVersion  string `yaml:"apiVersion"`
	Name        string `yaml:"name"`
	Version     string `yaml:"version"`
	AppVersion  string `yaml:"appVersion"`
	Description string `yaml:"description"`
	Type        string `yaml:"type"`
	KubeVersion string `yaml:"kubeVersion"`
	Home        string `yaml:"home"`
	Keywords    []string
}

// Files is .Files: every chart file outside templates/, by path relative to the chart root.
type Files map[string][]byte

func (f Files) Get(name string) string { return string(f[name]) }

// GetBytes mirrors Helm's .Files.GetBytes.
func (f Files) GetBytes(name string) []byte { return f[name] }

// APIVersions is .Capabilities.APIVersions.
type APIVersions []string

func (a APIVersions) Has(v string) bool {
	for _, x := range a {
		if x == v {
			return true
		}
	}
	return false
}

type KubeVersion struct{ Version, Major, Minor, GitVersion string }

type Capabilities struct {
	KubeVersion KubeVersion
	APIVersions APIVersions
	HelmVersion map[string]string
}

// fromYAMLHelmStyle decodes YAML the way sigs.k8s.io/yaml (and so Helm) does: through JSON, so maps
// have string keys and numbers are float64.
func fromYAMLHelmStyle(data []byte) (map[string]interface{}, error) {
	var raw interface{}
	if err := yaml.Unmarshal(data, &raw); err != nil {
		return nil, err
	}
	js, err := json.Marshal(jsonable(raw))
	if err != nil {
		return nil, err
	}
	out := map[string]interface{}{}
	if string(js) == "null" {
		return out, nil
	}
	if err := json.Unmarshal(js, &out); err != nil {
		return nil, fmt.Errorf("values must be a mapping: %v", err)
	}
	return out, nil
}

// jsonable turns yaml.v2's map[interface{}]interface{} into map[string]interface{}.
func jsonable(v interface{}) interface{} {
	switch t := v.(type) {
	case map[interface{}]interface{}:
		m := map[string]interface{}{}
		for k, val := range t {
			m[fmt.Sprint(k)] = jsonable(val)
		}
		return m
	case []interface{}:
		for i := range t {
			t[i] = jsonable(t[i])
		}
		return t
	}
	return v
}

// toYAML is Helm's toYaml: JSON first (sigs.k8s.io/yaml), then YAML with sorted keys, no trailing newline.
func toYAML(v interface{}) string {
	js, err := json.Marshal(v)
	if err != nil {
		return ""
	}
	var slice yaml.MapSlice
	var out []byte
	if err := yaml.Unmarshal(js, &slice); err == nil && len(js) > 0 && js[0] == '{' {
		out, err = yaml.Marshal(slice)
		if err != nil {
			return ""
		}
	} else {
		var any interface{}
		if err := yaml.Unmarshal(js, &any); err != nil {
			return ""
		}
		out, _ = yaml.Marshal(any)
	}
	return strings.TrimSuffix(string(out), "\n")
}

// mergeValues deep-merges src over dst as Helm does for -f files: maps merge, anything else replaces,
// and a null deletes the key.
func mergeValues(dst, src map[string]interface{}) map[string]interface{} {
	for k, v := range src {
		if v == nil {
			delete(dst, k)
			continue
		}
		if sm, ok := v.(map[string]interface{}); ok {
			if dm, ok := dst[k].(map[string]interface{}); ok {
				dst[k] = mergeValues(dm, sm)
				continue
			}
		}
		dst[k] = v
	}
	return dst
}

func setString(values map[string]interface{}, assignment string) error {
	eq := strings.Index(assignment, "=")
	if eq <= 0 {
		return fmt.Errorf("--set-string %q is not key=value", assignment)
	}
	keys := strings.Split(assignment[:eq], ".")
	m := values
	for _, k := range keys[:len(keys)-1] {
		next, ok := m[k].(map[string]interface{})
		if !ok {
			next = map[string]interface{}{}
			m[k] = next
		}
		m = next
	}
	m[keys[len(keys)-1]] = assignment[eq+1:]
	return nil
}

type renderer struct {
	root *template.Template
}

func (r *renderer) funcs() template.FuncMap {
	f := sprig.TxtFuncMap()
	delete(f, "env") // Helm removes these: a chart must not read the machine it is rendered on.
	delete(f, "expandenv")
	f["toYaml"] = toYAML
	f["fromYaml"] = func(s string) map[string]interface{} {
		m, err := fromYAMLHelmStyle([]byte(s))
		if err != nil {
			return map[string]interface{}{"Error": err.Error()}
		}
		return m
	}
	f["toJson"] = func(v interface{}) string {
		b, err := json.Marshal(v)
		if err != nil {
			return ""
		}
		return string(b)
	}
	f["fromJson"] = func(s string) map[string]interface{} {
		m := map[string]interface{}{}
		if err := json.Unmarshal([]byte(s), &m); err != nil {
			m["Error"] = err.Error()
		}
		return m
	}
	f["required"] = func(msg string, v interface{}) (interface{}, error) {
		if v == nil {
			return v, fmt.Errorf("%s", msg)
		}
		if s, ok := v.(string); ok && s == "" {
			return v, fmt.Errorf("%s", msg)
		}
		return v, nil
	}
	f["lookup"] = func(string, string, string, string) (map[string]interface{}, error) {
		return map[string]interface{}{}, nil
	}
	// Placeholders so templates parse; replaced below once the root template exists.
	f["include"] = func(string, interface{}) (string, error) { return "", nil }
	f["tpl"] = func(string, interface{}) (string, error) { return "", nil }
	return f
}

func (r *renderer) bind() {
	r.root.Funcs(template.FuncMap{
		"include": func(name string, data interface{}) (string, error) {
			var buf bytes.Buffer
			if err := r.root.ExecuteTemplate(&buf, name, data); err != nil {
				return "", err
			}
			return buf.String(), nil
		},
		"tpl": func(text string, data interface{}) (string, error) {
			t, err := r.root.Clone()
			if err != nil {
				return "", err
			}
			t, err = t.New("tpl").Parse(text)
			if err != nil {
				return "", err
			}
			var buf bytes.Buffer
			if err := t.Execute(&buf, data); err != nil {
				return "", err
			}
			return strings.ReplaceAll(buf.String(), "<no value>", ""), nil
		},
	})
}

func run() error {
	var valueFiles, sets multiFlag
	chartDir := flag.String("chart", "", "chart folder (holds Chart.yaml)")
	releaseName := flag.String("release-name", "cohort", ".Release.Name")
	namespace := flag.String("namespace", "default", ".Release.Namespace")
	kubeVersion := flag.String("kube-version", "1.30.0", ".Capabilities.KubeVersion")
	strict := flag.Bool("strict", false, "a missing map key is an error (helm lint --strict)")
	notesOut := flag.String("notes-out", "", "write the rendered NOTES.txt here")
	flag.Var(&valueFiles, "f", "values file (repeatable; later files win)")
	flag.Var(&sets, "set-string", "key.path=value (repeatable)")
	flag.Parse()
	if *chartDir == "" {
		return fmt.Errorf("--chart is required")
	}

	chartBytes, err := os.ReadFile(filepath.Join(*chartDir, "Chart.yaml"))
	if err != nil {
		return err
	}
	var chart Chart
	if err := yaml.Unmarshal(chartBytes, &chart); err != nil {
		return fmt.Errorf("Chart.yaml: %v", err)
	}
	if chart.APIVersion != "v2" || chart.Name == "" || chart.Version == "" {
		return fmt.Errorf("Chart.yaml: apiVersion v2, name and version are required")
	}

	if chart.KubeVersion != "" {
		// As Helm does before rendering: the chart says which Kubernetes versions it supports.
		compare := sprig.TxtFuncMap()["semverCompare"].(func(string, string) (bool, error))
		ok, err := compare(chart.KubeVersion, *kubeVersion)
		if err != nil {
			return fmt.Errorf("Chart.yaml kubeVersion: %v", err)
		}
		if !ok {
			return fmt.Errorf("chart requires kubeVersion %s, which is incompatible with Kubernetes v%s",
				chart.KubeVersion, *kubeVersion)
		}
	}

	values := map[string]interface{}{}
	for _, f := range append([]string{filepath.Join(*chartDir, "values.yaml")}, valueFiles...) {
		data, err := os.ReadFile(f)
		if err != nil {
			return err
		}
		v, err := fromYAMLHelmStyle(data)
		if err != nil {
			return fmt.Errorf("%s: %v", f, err)
		}
		values = mergeValues(values, v)
	}
	for _, s := range sets {
		if err := setString(values, s); err != nil {
			return err
		}
	}

	files := Files{}
	var templates []string
	// filepath.Walk does not follow symlinked folders; Helm does, but the chart only links files.
	err = filepath.Walk(*chartDir, func(p string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(*chartDir, p)
		rel = filepath.ToSlash(rel)
		if info.IsDir() {
			return nil
		}
		if strings.HasPrefix(rel, "templates/") {
			templates = append(templates, rel)
			return nil
		}
		data, err := os.ReadFile(p) // follows a symlinked file, as Helm's loader does
		if err != nil {
			return fmt.Errorf("%s: %v", rel, err)
		}
		files[rel] = data
		return nil
	})
	if err != nil {
		return err
	}
	sort.Strings(templates)

	r := &renderer{root: template.New("root")}
	r.root.Funcs(r.funcs())
	if *strict {
		r.root.Option("missingkey=error")
	} else {
		r.root.Option("missingkey=zero")
	}
	for _, t := range templates {
		data, err := os.ReadFile(filepath.Join(*chartDir, t))
		if err != nil {
			return err
		}
		if _, err := r.root.New(path.Join(chart.Name, t)).Parse(string(data)); err != nil {
			return err
		}
	}
	r.bind()

	major, minor := "1", "30"
	if parts := strings.SplitN(*kubeVersion, ".", 3); len(parts) >= 2 {
		major, minor = parts[0], parts[1]
	}
	top := map[string]interface{}{
		"Values": values,
		"Chart":  chart,
		"Files":  files,
		"Release": map[string]interface{}{
			"Name": *releaseName, "Namespace": *namespace, "Service": "Helm",
			"IsInstall": true, "IsUpgrade": false, "Revision": 1,
		},
		"Capabilities": Capabilities{
			KubeVersion: KubeVersion{Version: "v" + *kubeVersion, Major: major, Minor: minor, GitVersion: "v" + *kubeVersion},
			APIVersions: APIVersions{"v1", "apps/v1", "autoscaling/v2", "policy/v1"},
			HelmVersion: map[string]string{"Version": "v3.15.0"},
		},
	}

	var out bytes.Buffer
	for _, t := range templates {
		base := path.Base(t)
		if strings.HasPrefix(base, "_") {
			continue
		}
		name := path.Join(chart.Name, t)
		top["Template"] = map[string]interface{}{"Name": name, "BasePath": path.Join(chart.Name, "templates")}
		var buf bytes.Buffer
		if err := r.root.ExecuteTemplate(&buf, name, top); err != nil {
			return err
		}
		text := strings.ReplaceAll(buf.String(), "<no value>", "")
		if base == "NOTES.txt" {
			if *notesOut != "" {
				if err := os.WriteFile(*notesOut, []byte(text), 0o644); err != nil {
					return err
				}
			}
			continue
		}
		if strings.TrimSpace(text) == "" {
			continue
		}
		fmt.Fprintf(&out, "---\n# Source: %s\n%s\n", name, strings.TrimSpace(text))
	}
	_, err = os.Stdout.Write(out.Bytes())
	return err
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "helm_render: %v\n", err)
		os.Exit(1)
	}
}
