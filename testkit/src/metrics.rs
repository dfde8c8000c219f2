//! The Prometheus text exposition format, as pinguard serves it on /metrics.
//!
//! One small parser rather than a crate: prometheus-parse splits label sets
//! on every `,` and `=` (a quoted value holding either is mangled) and folds
//! a histogram's `_bucket` lines into one value, while these checks need each
//! series exactly as it is exposed (`_bucket`, `_sum`, `_count`).
use std::collections::BTreeMap;

/// One sample line: `name{label="value",...} value [timestamp]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// Whether the sample carries every `(label, value)` of `labels`.
    pub fn has(&self, labels: &[(&str, &str)]) -> bool {
        labels
            .iter()
            .all(|(k, v)| self.labels.get(*k).is_some_and(|have| have == v))
    }
}

/// Every sample of an exposition; `Err` names the first line it cannot read.
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|(i, l)| parse_line(l).ok_or_else(|| format!("line {}: cannot read {l:?}", i + 1)))
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(mut inner) = rest.strip_prefix('{') {
        loop {
            inner = inner.trim_start_matches([',', ' ']);
            if let Some(after) = inner.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after_key) = inner.split_once('=')?;
            let (value, after_value) = quoted(after_key.trim_start())?;
            labels.insert(key.trim().to_string(), value);
            inner = after_value;
        }
    }
    // The value, then an optional timestamp.
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// A double-quoted label value with its escapes (`\\`, `\"`, `\n`) undone,
/// and the text after the closing quote.
fn quoted(s: &str) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.strip_prefix('"')?.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &s[i + 2..])),
            '\\' => match chars.next()?.1 {
                'n' => out.push('\n'),
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

/// Sum of the samples of `name` whose labels include all of `labels`
/// (`None` if no such series is exposed).
pub fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .filter(|s| s.name == name && s.has(labels))
        .map(|s| s.value)
        .reduce(|a, b| a + b)
}

/// [`sum`] over an exposition's text; panics if the text is not one.
pub fn sum_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let samples =
        parse(text).unwrap_or_else(|e| panic!("not a Prometheus exposition ({e}):\n{text}"));
    sum(&samples, name, labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP pinguard_repins_total Re-pins.
# TYPE pinguard_repins_total counter
pinguard_repins_total{vm="a"} 3
pinguard_repins_total{vm="b, c=d",cpu="1"} 2

pinguard_repins_totalx 9
pinguard_vcpu_wait_seconds_bucket{vm="a",le="+Inf"} 7 1700000000000
pinguard_vms 1e0
odd{v="q\"uote\\d\n",} -Inf
"#;

    #[test]
    fn parses_names_labels_values_and_escapes() {
        let s = parse(TEXT).unwrap();
        assert_eq!(s.len(), 6);
        assert_eq!(s[1].labels["vm"], "b, c=d");
        assert_eq!(s[1].labels["cpu"], "1");
        assert_eq!(s[3].name, "pinguard_vcpu_wait_seconds_bucket");
        assert_eq!(s[3].labels["le"], "+Inf");
        assert_eq!(s[3].value, 7.0);
        assert_eq!(s[4].value, 1.0);
        assert_eq!(s[5].labels["v"], "q\"uote\\d\n");
        assert_eq!(s[5].value, f64::NEG_INFINITY);
        assert!(parse("x{a=\"b} 1").is_err());
        assert!(parse("x{a=b} 1").is_err());
        assert!(parse("x").is_err());
    }

    #[test]
    fn sums_matching_series() {
        let s = parse(TEXT).unwrap();
        assert_eq!(sum(&s, "pinguard_repins_total", &[]), Some(5.0));
        assert_eq!(sum(&s, "pinguard_repins_total", &[("cpu", "1")]), Some(2.0));
        assert_eq!(sum(&s, "pinguard_repins_total", &[("vm", "b")]), None);
        assert_eq!(sum(&s, "nope", &[]), None);
        assert_eq!(sum_metric(TEXT, "pinguard_vms", &[]), Some(1.0));
    }
}
