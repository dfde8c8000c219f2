//! The PromQL the shipped dashboard and rules contain, made executable.
//!
//! [`dashboard_exprs`] and [`parse_rules`] pull every expression out of the
//! Grafana dashboard and the rules file; [`selectors`] finds the metric names
//! and label matchers an expression uses, so a typo in a metric name can be
//! caught without running anything. PromQL is read here and nowhere else.
use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde_json::Value;

/// Where an expression comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A panel target's `expr`.
    Panel,
    /// A template variable's query (`label_values(...)` turned into PromQL).
    Variable,
    /// A recording rule's `expr`.
    Record,
    /// An alerting rule's `expr`.
    Alert,
}

/// One expression, ready to run.
#[derive(Debug, Clone)]
pub struct PromExpr {
    pub source: Source,
    /// Human-readable origin for messages, e.g. `panel 8 "Intruder time" target B`.
    pub origin: String,
    /// As written, dashboard variables not expanded.
    pub raw: String,
    /// Executable PromQL: variables expanded to match-everything values.
    pub expr: String,
    /// Labels each result series must carry: those the legend or table shows,
    /// or the label a `label_values` variable lists. Empty for rules.
    pub labels: Vec<String>,
}

/// Grafana's built-in interval variables, expanded to a range every test
/// scrape history covers once two samples exist.
pub const GRAFANA_BUILTINS: &[(&str, &str)] = &[
    ("__rate_interval", "5m"),
    ("__interval", "5m"),
    ("__range", "5m"),
    ("__interval_ms", "300000"),
    ("__range_ms", "300000"),
    ("__range_s", "300"),
];

/// Names of the dashboard's template variables.
pub fn dashboard_variables(dashboard: &Value) -> Vec<String> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str().map(String::from))
        .collect()
}

/// Every panel, rows' nested panels included, in document order.
pub fn all_panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(panels: &'a Value, out: &mut Vec<&'a Value>) {
        for p in panels.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// Where the variable name starting at `b[i]` ends (letters, digits, `_`).
fn ident_end(b: &[u8], i: usize) -> usize {
    i + b[i.min(b.len())..]
        .iter()
        .take_while(|c| c.is_ascii_alphanumeric() || **c == b'_')
        .count()
}

/// Variable references in `s`: `$name`, `${name}`, `${name:format}`, `[[name]]`.
pub fn variable_refs(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let ident = |i: usize| ident_end(b, i);
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' && i + 1 < b.len() && b[i + 1] == b'{' {
            let end = ident(i + 2);
            if end > i + 2 {
                out.push(s[i + 2..end].to_string());
            }
            i = end;
        } else if b[i] == b'$' {
            let end = ident(i + 1);
            if end > i + 1 {
                out.push(s[i + 1..end].to_string());
            }
            i = end.max(i + 1);
        } else if b[i] == b'[' && i + 1 < b.len() && b[i + 1] == b'[' {
            let end = ident(i + 2);
            if end > i + 2 && s[end..].starts_with("]]") {
                out.push(s[i + 2..end].to_string());
            }
            i = end.max(i + 2);
        } else {
            i += 1;
        }
    }
    out
}

/// Replaces variable references with `values[name]`; unknown ones stay.
pub fn expand_variables(s: &str, values: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let ident = |i: usize| ident_end(b, i);
    let mut i = 0;
    while i < b.len() {
        if s[i..].starts_with("${") {
            let end = ident(i + 2);
            let close = s[end..].find('}').map(|c| end + c);
            if let (Some(v), Some(close)) = (values.get(&s[i + 2..end]), close) {
                out.push_str(v);
                i = close + 1;
                continue;
            }
        } else if b[i] == b'$' {
            let end = ident(i + 1);
            if let Some(v) = values.get(&s[i + 1..end]) {
                out.push_str(v);
                i = end;
                continue;
            }
        } else if s[i..].starts_with("[[") {
            let end = ident(i + 2);
            if let (Some(v), true) = (values.get(&s[i + 2..end]), s[end..].starts_with("]]")) {
                out.push_str(v);
                i = end + 2;
                continue;
            }
        }
        let ch = s[i..].chars().next().expect("index is on a char boundary");
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// Values that make every dashboard expression runnable: each template
/// variable matches everything (`.*`, they are all used with `=~`), the
/// datasource is `prometheus`, intervals are 5 minutes.
pub fn test_variable_values(dashboard: &Value) -> BTreeMap<String, String> {
    let mut m: BTreeMap<String, String> = GRAFANA_BUILTINS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = v["name"].as_str().unwrap_or_default().to_string();
        let value = if v["type"] == "datasource" {
            "prometheus"
        } else {
            ".*"
        };
        m.insert(name, value.to_string());
    }
    m
}

/// Labels a legend format (`{{cpu}} {{ class }}`) shows.
pub fn legend_labels(legend: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = legend;
    while let Some(start) = rest.find("{{") {
        let Some(len) = rest[start + 2..].find("}}") else {
            break;
        };
        let name = rest[start + 2..start + 2 + len].trim();
        if !name.is_empty() && !out.iter().any(|n| n == name) {
            out.push(name.to_string());
        }
        rest = &rest[start + 2 + len + 2..];
    }
    out
}

/// Turns a Grafana Prometheus variable query into PromQL and the label it
/// lists: `label_values(m{..}, l)` runs `m{..}`; `label_values(l)` runs a
/// selector of every series with `l`; `query_result(e)` runs `e`.
pub fn variable_query_to_promql(q: &str) -> Result<(String, Option<String>), String> {
    let q = q.trim();
    if let Some(inner) = q
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'))
    {
        return Ok(match inner.rfind(',') {
            Some(comma) => (
                inner[..comma].trim().to_string(),
                Some(inner[comma + 1..].trim().to_string()),
            ),
            None => {
                let label = inner.trim();
                (
                    format!("group by ({label}) ({{{label}!=\"\"}})"),
                    Some(label.to_string()),
                )
            }
        });
    }
    if let Some(inner) = q
        .strip_prefix("query_result(")
        .and_then(|r| r.strip_suffix(')'))
    {
        return Ok((inner.trim().to_string(), None));
    }
    if q.starts_with("label_names(") || q.starts_with("metrics(") {
        return Err(format!(
            "variable query {q:?} is not PromQL and cannot be checked"
        ));
    }
    Ok((q.to_string(), None))
}

/// Every expression of a Grafana dashboard: each panel target's `expr` and
/// each query variable, with variables expanded by [`test_variable_values`].
pub fn dashboard_exprs(dashboard: &Value) -> Result<Vec<PromExpr>, String> {
    let values = test_variable_values(dashboard);
    let mut out = Vec::new();
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if v["type"] != "query" {
            continue;
        }
        let name = v["name"].as_str().unwrap_or("?");
        let q = match &v["query"] {
            Value::String(s) => s.clone(),
            obj => obj["query"].as_str().unwrap_or_default().to_string(),
        };
        let (expr, label) =
            variable_query_to_promql(&q).map_err(|e| format!("variable {name}: {e}"))?;
        out.push(PromExpr {
            source: Source::Variable,
            origin: format!("variable ${name}"),
            raw: q.clone(),
            expr: expand_variables(&expr, &values),
            labels: label.into_iter().collect(),
        });
    }
    for p in all_panels(dashboard) {
        let id = &p["id"];
        let title = p["title"].as_str().unwrap_or_default();
        let table_columns = table_label_columns(p);
        for t in p["targets"].as_array().into_iter().flatten() {
            let raw = t["expr"].as_str().unwrap_or_default().to_string();
            let mut labels = legend_labels(t["legendFormat"].as_str().unwrap_or_default());
            if t["format"] == "table" {
                labels.extend(table_columns.iter().cloned());
            }
            out.push(PromExpr {
                source: Source::Panel,
                origin: format!(
                    "panel {id} {title:?} target {}",
                    t["refId"].as_str().unwrap_or("?")
                ),
                expr: expand_variables(&raw, &values),
                raw,
                labels,
            });
        }
    }
    Ok(out)
}

/// Label columns a table panel's `organize` transformation lays out.
fn table_label_columns(panel: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for t in panel["transformations"].as_array().into_iter().flatten() {
        if t["id"] != "organize" {
            continue;
        }
        let excluded = &t["options"]["excludeByName"];
        for k in t["options"]["indexByName"]
            .as_object()
            .into_iter()
            .flat_map(|m| m.keys())
        {
            if k != "Time" && k != "Value" && excluded[k] != true {
                out.push(k.clone());
            }
        }
    }
    out
}

/// One rule of a Prometheus rules file.
#[derive(Debug, Clone, Default)]
pub struct Rule {
    /// True for `alert:`, false for `record:`.
    pub alert: bool,
    pub name: String,
    pub expr: String,
    pub for_: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

impl Rule {
    pub fn to_expr(&self) -> PromExpr {
        PromExpr {
            source: if self.alert {
                Source::Alert
            } else {
                Source::Record
            },
            origin: format!(
                "{} {}",
                if self.alert { "alert" } else { "record" },
                self.name
            ),
            raw: self.expr.clone(),
            expr: self.expr.clone(),
            labels: Vec::new(),
        }
    }
}

/// A rules file as Prometheus reads it; unknown keys are refused, as
/// Prometheus refuses them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    groups: Vec<RuleGroup>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleGroup {
    #[allow(dead_code)]
    name: String,
    #[serde(default)]
    #[allow(dead_code)]
    interval: Option<String>,
    rules: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    record: Option<String>,
    alert: Option<String>,
    expr: String,
    #[serde(rename = "for")]
    for_: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// Reads the rules of a Prometheus rules file, in file order;
/// `promtool check rules`'s rule count cross-checks it.
pub fn parse_rules(yaml: &str) -> Result<Vec<Rule>, String> {
    let file: RulesFile = serde_norway::from_str(yaml).map_err(|e| e.to_string())?;
    let mut rules = Vec::new();
    for raw in file.groups.into_iter().flat_map(|g| g.rules) {
        let (alert, name) = match (raw.record, raw.alert) {
            (Some(name), None) => (false, name),
            (None, Some(name)) => (true, name),
            _ => {
                return Err(format!(
                    "a rule needs one of record or alert: {:?}",
                    raw.expr
                ));
            }
        };
        rules.push(Rule {
            alert,
            name,
            // A `|` block keeps its final newline; the expression is the same without.
            expr: raw.expr.trim_end().to_string(),
            for_: raw.for_,
            labels: raw.labels,
            annotations: raw.annotations,
        });
    }
    Ok(rules)
}

/// A label matcher inside `{...}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matcher {
    pub label: String,
    /// `=`, `!=`, `=~` or `!~`.
    pub op: String,
    pub value: String,
}

/// A vector selector: metric name (empty for `{__name__=...}` forms) and matchers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    pub metric: String,
    pub matchers: Vec<Matcher>,
}

/// PromQL aggregation operators, keywords and literals: never metric names.
const NOT_METRICS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "atan2",
    "inf",
    "nan",
    "start",
    "end",
];

/// The vector selectors an expression uses, in order. Function calls,
/// aggregation and matching clauses, strings, ranges and numbers are skipped.
pub fn selectors(expr: &str) -> Result<Vec<Selector>, String> {
    let c: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let skip_ws = |mut i: usize| {
        while i < c.len() && c[i].is_whitespace() {
            i += 1;
        }
        i
    };
    let is_ident_start = |ch: char| ch.is_ascii_alphabetic() || ch == '_' || ch == ':';
    let is_ident = |ch: char| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':';
    while i < c.len() {
        let ch = c[i];
        if ch.is_whitespace() {
            i += 1;
        } else if ch == '#' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '"' || ch == '\'' || ch == '`' {
            i = skip_string(&c, i)?.1;
        } else if ch == '[' {
            while i < c.len() && c[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if ch == '{' {
            let (matchers, next) = parse_matchers(&c, i)?;
            out.push(Selector {
                metric: String::new(),
                matchers,
            });
            i = next;
        } else if ch.is_ascii_digit()
            || (ch == '.' && c.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.') {
                let exp = matches!(c[i], 'e' | 'E')
                    && c.get(i + 1).is_some_and(|s| matches!(s, '+' | '-'));
                i += if exp { 2 } else { 1 };
            }
        } else if is_ident_start(ch) {
            let start = i;
            while i < c.len() && is_ident(c[i]) {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let next = skip_ws(i);
            let lower = word.to_ascii_lowercase();
            if matches!(
                lower.as_str(),
                "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
            ) {
                if c.get(next) == Some(&'(') {
                    while i < c.len() && c[i] != ')' {
                        i += 1;
                    }
                    i += 1;
                }
            } else if lower == "offset" {
                i = next;
                if c.get(i) == Some(&'-') {
                    i += 1;
                }
                while i < c.len() && c[i].is_ascii_alphanumeric() {
                    i += 1;
                }
            } else if NOT_METRICS.contains(&lower.as_str()) || c.get(next) == Some(&'(') {
                // An operator, keyword or function call: its arguments are
                // scanned as the loop goes on.
            } else if c.get(next) == Some(&'{') {
                let (matchers, after) = parse_matchers(&c, next)?;
                out.push(Selector {
                    metric: word,
                    matchers,
                });
                i = after;
            } else {
                out.push(Selector {
                    metric: word,
                    matchers: Vec::new(),
                });
            }
        } else {
            i += 1;
        }
    }
    Ok(out)
}

/// Metric names an expression selects (from names and `__name__="..."`).
pub fn metric_names(expr: &str) -> Result<BTreeSet<String>, String> {
    let mut out = BTreeSet::new();
    for s in selectors(expr)? {
        if !s.metric.is_empty() {
            out.insert(s.metric);
        }
        for m in s.matchers {
            if m.label == "__name__" && m.op == "=" {
                out.insert(m.value);
            }
        }
    }
    Ok(out)
}

/// Returns the string literal's value and the index after it.
fn skip_string(c: &[char], start: usize) -> Result<(String, usize), String> {
    let quote = c[start];
    let mut value = String::new();
    let mut i = start + 1;
    while i < c.len() {
        match c[i] {
            '\\' if quote != '`' => {
                if let Some(&n) = c.get(i + 1) {
                    value.push(n);
                }
                i += 2;
            }
            ch if ch == quote => return Ok((value, i + 1)),
            ch => {
                value.push(ch);
                i += 1;
            }
        }
    }
    Err(format!("unterminated string starting at offset {start}"))
}

fn parse_matchers(c: &[char], open: usize) -> Result<(Vec<Matcher>, usize), String> {
    let mut out = Vec::new();
    let mut i = open + 1;
    loop {
        while i < c.len() && (c[i].is_whitespace() || c[i] == ',') {
            i += 1;
        }
        match c.get(i) {
            None => return Err(format!("unterminated `{{` at offset {open}")),
            Some('}') => return Ok((out, i + 1)),
            _ => {}
        }
        let start = i;
        while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_') {
            i += 1;
        }
        let label: String = c[start..i].iter().collect();
        while i < c.len() && c[i].is_whitespace() {
            i += 1;
        }
        let op_start = i;
        while i < c.len() && matches!(c[i], '=' | '!' | '~') {
            i += 1;
        }
        let op: String = c[op_start..i].iter().collect();
        while i < c.len() && c[i].is_whitespace() {
            i += 1;
        }
        if label.is_empty() || !matches!(op.as_str(), "=" | "!=" | "=~" | "!~") {
            return Err(format!("cannot read the label matcher at offset {start}"));
        }
        if !matches!(c.get(i), Some('"' | '\'' | '`')) {
            return Err(format!("label {label} has no quoted value at offset {i}"));
        }
        let (value, next) = skip_string(c, i)?;
        out.push(Matcher { label, op, value });
        i = next;
    }
}

/// GitHub's anchor for a Markdown heading: lowercase, punctuation dropped,
/// spaces turned into hyphens.
pub fn github_anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|ch| match ch {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Anchors of all headings in a Markdown document.
pub fn markdown_anchors(md: &str) -> BTreeSet<String> {
    md.lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| github_anchor(l.trim_start_matches('#')))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_skip_functions_keywords_strings_and_ranges() {
        let e = r#"sum by (instance, cpu) (rate(pinguard_a_total{cpu=~"1|2", class="vcpu"}[5m]))
            / on (instance) group_left (cpu) (pinguard:b:rate5m offset 5m > 0)
            or label_replace(0 * group by (instance) (up{job="pinguard"}), "kind", "none", "", "")
            unless topk(3, c) # comment pinguard_not_a_metric
            and absent(d{__name__="e"}) * 1e-3"#;
        let names: Vec<_> = metric_names(e).unwrap().into_iter().collect();
        assert_eq!(
            names,
            ["c", "d", "e", "pinguard:b:rate5m", "pinguard_a_total", "up"]
        );
        let s = selectors(e).unwrap();
        assert_eq!(
            s[0].matchers,
            vec![
                Matcher {
                    label: "cpu".into(),
                    op: "=~".into(),
                    value: "1|2".into()
                },
                Matcher {
                    label: "class".into(),
                    op: "=".into(),
                    value: "vcpu".into()
                },
            ]
        );
        assert!(selectors("x{a=}").is_err());
        assert!(selectors("x{a=\"b}").is_err());
    }

    #[test]
    fn variables_are_found_and_expanded_in_every_syntax() {
        let s = "x{i=~\"$instance\", c=~\"${cpu:regex}\", v=~\"[[vm]]\"}[$__rate_interval] $undefined $";
        assert_eq!(
            variable_refs(s),
            ["instance", "cpu", "vm", "__rate_interval", "undefined"]
        );
        let values: BTreeMap<String, String> = [
            ("instance", ".*"),
            ("cpu", "1"),
            ("vm", "a"),
            ("__rate_interval", "5m"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(
            expand_variables(s, &values),
            "x{i=~\".*\", c=~\"1\", v=~\"a\"}[5m] $undefined $"
        );
        // $__rate_interval must not be taken as $__rate followed by text.
        let only_rate: BTreeMap<String, String> = [("__rate".to_string(), "X".to_string())].into();
        assert_eq!(
            expand_variables("[$__rate_interval]", &only_rate),
            "[$__rate_interval]"
        );
    }

    #[test]
    fn variable_queries_become_promql() {
        assert_eq!(
            variable_query_to_promql("label_values(m{a=~\"$x\"}, cpu)").unwrap(),
            ("m{a=~\"$x\"}".to_string(), Some("cpu".to_string()))
        );
        assert_eq!(
            variable_query_to_promql("label_values(job)").unwrap(),
            (
                "group by (job) ({job!=\"\"})".to_string(),
                Some("job".to_string())
            )
        );
        assert_eq!(
            variable_query_to_promql("query_result(up)").unwrap(),
            ("up".to_string(), None)
        );
        assert!(variable_query_to_promql("metrics(pinguard_.*)").is_err());
    }

    #[test]
    fn legends_name_their_labels_once() {
        assert_eq!(
            legend_labels("cpu {{cpu}} {{ class }} ({{cpu}})"),
            ["cpu", "class"]
        );
        assert!(legend_labels("total").is_empty());
    }

    #[test]
    fn rules_read_with_every_scalar_style_and_nothing_unknown() {
        let yaml = r#"
groups:
  - name: g
    rules:
      # a comment
      - record: a:b:rate5m
        expr: rate(x[5m])  # trailing comment
      - record: "a:c"
        expr: |
          sum without (class) (
            a:b:rate5m
          )

      - alert: Folded
        expr: >-
          up == 0
          and y
        for: 2m
        labels:
          severity: critical
        annotations:
          summary: "It's {{ $labels.instance }}"
          description: >-
            Two lines
            folded.
          runbook_url: 'docs/ALERTS.md#folded'
  - name: h
    rules:
      - alert: Plain
        expr: up
          == 1
"#;
        let r = parse_rules(yaml).unwrap();
        assert_eq!(r.len(), 4);
        assert_eq!(
            (r[0].name.as_str(), r[0].expr.as_str(), r[0].alert),
            ("a:b:rate5m", "rate(x[5m])", false)
        );
        assert_eq!(r[1].name, "a:c");
        assert_eq!(r[1].expr, "sum without (class) (\n  a:b:rate5m\n)");
        assert!(r[2].alert);
        assert_eq!(r[2].expr, "up == 0 and y");
        assert_eq!(r[2].for_.as_deref(), Some("2m"));
        assert_eq!(r[2].labels["severity"], "critical");
        assert_eq!(r[2].annotations["summary"], "It's {{ $labels.instance }}");
        assert_eq!(r[2].annotations["description"], "Two lines folded.");
        assert_eq!(r[2].annotations["runbook_url"], "docs/ALERTS.md#folded");
        assert_eq!(r[3].expr, "up == 1");
        assert!(parse_rules("      - record: x\n        labels: {}\n").is_err());
        // Prometheus refuses unknown keys and rules that are neither or both kinds.
        let rule = |body: &str| format!("groups:\n  - name: g\n    rules:\n      - {body}\n");
        assert!(parse_rules(&rule("record: x\n        expr: up\n        anotations: {}")).is_err());
        assert!(parse_rules(&rule("expr: up")).is_err());
        assert!(parse_rules(&rule("record: x\n        alert: y\n        expr: up")).is_err());
        assert!(parse_rules(&rule("record: x")).is_err(), "no expr");
    }

    #[test]
    fn anchors_follow_github() {
        assert_eq!(
            github_anchor(" PinguardVcpuUnpinned"),
            "pinguardvcpuunpinned"
        );
        assert_eq!(github_anchor("Events lost (BPF)"), "events-lost-bpf");
        let md = "# Title\ntext # not a heading\n## PinguardDown\n";
        assert_eq!(
            markdown_anchors(md),
            ["pinguarddown".to_string(), "title".to_string()].into()
        );
    }

    #[test]
    fn dashboard_expressions_carry_origin_labels_and_expansion() {
        let d: Value = serde_json::json!({
            "templating": {"list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                {"name": "cpu", "type": "query", "query": {"query": "label_values(m{i=~\"$instance\"}, cpu)"}},
                {"name": "instance", "type": "query", "query": "label_values(m, instance)"}
            ]},
            "panels": [
                {"id": 1, "type": "row", "title": "r", "panels": [
                    {"id": 2, "title": "t", "targets": [
                        {"refId": "A", "expr": "rate(m{cpu=~\"$cpu\"}[$__rate_interval])", "legendFormat": "{{cpu}}"}
                    ]}
                ]},
                {"id": 3, "title": "tab", "targets": [{"refId": "A", "expr": "m", "format": "table"}],
                 "transformations": [{"id": "organize", "options": {
                     "excludeByName": {"job": true},
                     "indexByName": {"Time": 0, "vm": 1, "job": 2, "Value": 3}}}]}
            ]
        });
        let e = dashboard_exprs(&d).unwrap();
        assert_eq!(e.len(), 4);
        assert_eq!(
            (e[0].source, e[0].expr.as_str(), e[0].labels.clone()),
            (Source::Variable, "m{i=~\".*\"}", vec!["cpu".to_string()])
        );
        assert_eq!(e[2].expr, "rate(m{cpu=~\".*\"}[5m])");
        assert_eq!(e[2].origin, "panel 2 \"t\" target A");
        assert_eq!(e[2].labels, ["cpu"]);
        assert_eq!(e[3].labels, ["vm"]);
    }
}
