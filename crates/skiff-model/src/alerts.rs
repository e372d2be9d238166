//! Threshold alert rules in Prometheus' rule-file shape, over the hub's own metrics:
//! `expr` is a subset of PromQL — one series selector compared with a number
//! (`skiff_node_cpu_utilization > 0.8`, `skiff_deployment_cpu_usage_cores{deployment="web"} >= 1.5`).
//! A rule may scale a deployment out while it fires (`x-skiff-scale-out`). Also the
//! parser of the text exposition the rules are evaluated against.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A rule file: `groups: [{name, rules: [...]}]`, as Prometheus' `rule_files`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    pub groups: Vec<RuleGroup>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleGroup {
    pub name: String,
    #[serde(default)]
    pub rules: Vec<RawRule>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub alert: String,
    pub expr: String,
    #[serde(default, rename = "for")]
    pub for_: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, rename = "x-skiff-scale-out")]
    pub scale_out: Option<ScaleOut>,
}

/// While the alert fires: `step` more replicas of `deployment` when it starts firing and
/// again every `for` while it keeps firing, never above `max`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleOut {
    pub deployment: String,
    #[serde(default = "one")]
    pub step: u32,
    pub max: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "<=")]
    Le,
    #[serde(rename = "==")]
    Eq,
    #[serde(rename = "!=")]
    Ne,
}

impl Op {
    pub fn holds(self, a: f64, b: f64) -> bool {
        match self {
            Op::Gt => a > b,
            Op::Ge => a >= b,
            Op::Lt => a < b,
            Op::Le => a <= b,
            Op::Eq => a == b,
            Op::Ne => a != b,
        }
    }
}

/// `metric{label="value",...} OP number`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Expr {
    pub metric: String,
    pub matchers: BTreeMap<String, String>,
    pub op: Op,
    pub threshold: f64,
}

impl Expr {
    pub fn parse(s: &str) -> Result<Expr, String> {
        let t = s.trim();
        let ops = [(">=", Op::Ge), ("<=", Op::Le), ("==", Op::Eq), ("!=", Op::Ne), (">", Op::Gt), ("<", Op::Lt)];
        // The comparison is after the selector (label values may hold anything but '"').
        let sel_end = t.find('}').map(|i| i + 1).unwrap_or(0);
        let (at, op, len) = ops
            .iter()
            .filter_map(|(tok, op)| t[sel_end..].find(tok).map(|i| (sel_end + i, *op, tok.len())))
            .min_by_key(|(i, _, _)| *i)
            .ok_or_else(|| format!("{s:?}: want METRIC{{LABEL=\"VALUE\",...}} OP NUMBER (OP: > >= < <= == !=)"))?;
        let (selector, number) = (t[..at].trim(), t[at + len..].trim());
        let threshold: f64 =
            number.parse().ok().filter(|v: &f64| v.is_finite()).ok_or_else(|| format!("{number:?} is not a number"))?;
        let (metric, matchers) = match selector.split_once('{') {
            None => (selector, BTreeMap::new()),
            Some((m, rest)) => {
                let body = rest.strip_suffix('}').ok_or_else(|| format!("{selector:?}: missing '}}'"))?;
                let mut out = BTreeMap::new();
                for part in body.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    let (k, v) = part.split_once('=').ok_or_else(|| format!("{part:?}: want LABEL=\"VALUE\""))?;
                    let v = v.trim().strip_prefix('"').and_then(|v| v.strip_suffix('"'));
                    let v = v.ok_or_else(|| format!("{part:?}: the value must be in double quotes"))?;
                    out.insert(k.trim().to_string(), v.to_string());
                }
                (m.trim(), out)
            }
        };
        let name_ok = crate::autoscale::is_metric_name;
        if !name_ok(metric) {
            return Err(format!("{metric:?} is not a metric name"));
        }
        if let Some(k) = matchers.keys().find(|k| !name_ok(k)) {
            return Err(format!("{k:?} is not a label name"));
        }
        Ok(Expr { metric: metric.to_string(), matchers, op, threshold })
    }

    /// Whether a series is selected (same name, every matcher's label equal).
    pub fn selects(&self, s: &Series) -> bool {
        s.matches(&self.metric, &self.matchers)
    }
}

/// A checked rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    pub group: String,
    pub alert: String,
    pub expr: Expr,
    pub for_ms: u64,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub scale_out: Option<ScaleOut>,
}

/// `30s`, `1m`, `1h30m`, `500ms` (Prometheus' durations, without days and years).
pub fn parse_duration_ms(s: &str) -> Option<u64> {
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = [("ms", 2, 1), ("s", 1, 1_000), ("m", 1, 60_000), ("h", 1, 3_600_000)]
            .iter()
            .find(|(u, _, _)| rest.starts_with(u))
            .map(|(_, len, mul)| (*mul, *len))?;
        total = total.checked_add(n.checked_mul(unit)?)?;
        rest = &rest[len..];
    }
    Some(total)
}

impl RuleFile {
    /// Checks every rule against the metric names there are; errors name the rule by
    /// its path (`groups[0].rules[1].expr: ...`).
    pub fn check(&self, known_metrics: &[&str]) -> Result<Vec<Rule>, String> {
        let mut out = vec![];
        for (gi, g) in self.groups.iter().enumerate() {
            for (ri, r) in g.rules.iter().enumerate() {
                let at = |f: &str, p: String| format!("groups[{gi}].rules[{ri}].{f}: {p}");
                if r.alert.is_empty() || !r.alert.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(at("alert", format!("{:?} is not an alert name (letters, digits, _)", r.alert)));
                }
                let expr = Expr::parse(&r.expr).map_err(|e| at("expr", e))?;
                if !known_metrics.contains(&expr.metric.as_str()) {
                    return Err(at(
                        "expr",
                        format!("{} is not a metric of the hub (it has {})", expr.metric, known_metrics.join(", ")),
                    ));
                }
                let for_ms = match &r.for_ {
                    None => 0,
                    Some(f) => parse_duration_ms(f)
                        .ok_or_else(|| at("for", format!("{f:?} is not a duration (examples: 30s, 1m, 1h30m)")))?,
                };
                if let Some(s) = &r.scale_out {
                    if s.deployment.is_empty() {
                        return Err(at("x-skiff-scale-out.deployment", "must name a deployment".into()));
                    }
                    if s.step == 0 {
                        return Err(at("x-skiff-scale-out.step", "must be at least 1".into()));
                    }
                    if s.max == 0 || s.max > 1000 {
                        return Err(at("x-skiff-scale-out.max", format!("{} must be between 1 and 1000", s.max)));
                    }
                }
                out.push(Rule {
                    group: g.name.clone(),
                    alert: r.alert.clone(),
                    expr,
                    for_ms,
                    labels: r.labels.clone(),
                    annotations: r.annotations.clone(),
                    scale_out: r.scale_out.clone(),
                });
            }
        }
        Ok(out)
    }
}

pub use crate::metrics::Series;

/// The samples of a text exposition (see [`crate::metrics::parse_exposition`]).
pub fn parse_exposition(text: &str) -> Vec<Series> {
    crate::metrics::parse_exposition(text).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expressions() {
        let e = Expr::parse(r#"skiff_node_cpu_utilization{node="pi-1", site="a"} >= 0.8"#).unwrap();
        assert_eq!(e.metric, "skiff_node_cpu_utilization");
        assert_eq!(e.matchers.len(), 2);
        assert_eq!((e.op, e.threshold), (Op::Ge, 0.8));
        let e = Expr::parse("skiff_node_load<2").unwrap();
        assert_eq!((e.metric.as_str(), e.op, e.threshold), ("skiff_node_load", Op::Lt, 2.0));
        for bad in ["skiff_x", "skiff_x > lots", "1abc > 1", "x{a=b} > 1", "x{a=\"b\" > 1", "> 1"] {
            assert!(Expr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("1m"), Some(60_000));
        assert_eq!(parse_duration_ms("1h30m"), Some(5_400_000));
        assert_eq!(parse_duration_ms("500ms"), Some(500));
        for bad in ["", "1", "m", "1d", "1.5m"] {
            assert_eq!(parse_duration_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn rule_files_are_checked_with_paths() {
        let file = |rule: &str| -> RuleFile {
            serde_json::from_str(&format!(r#"{{"groups": [{{"name": "edge", "rules": [{rule}]}}]}}"#)).unwrap()
        };
        let known = ["skiff_node_cpu_utilization"];
        let ok = file(
            r#"{"alert": "Hot", "expr": "skiff_node_cpu_utilization > 0.8", "for": "1m",
                          "x-skiff-scale-out": {"deployment": "web", "max": 5}}"#,
        );
        let rules = ok.check(&known).unwrap();
        assert_eq!((rules[0].for_ms, rules[0].scale_out.as_ref().unwrap().step), (60_000, 1));
        let err = |r: &str| file(r).check(&known).unwrap_err();
        assert!(err(r#"{"alert": "Hot", "expr": "skiff_nope > 1"}"#)
            .starts_with("groups[0].rules[0].expr: skiff_nope is not a metric of the hub"));
        assert_eq!(
            err(r#"{"alert": "Hot", "expr": "skiff_node_cpu_utilization > 1", "for": "soon"}"#),
            "groups[0].rules[0].for: \"soon\" is not a duration (examples: 30s, 1m, 1h30m)"
        );
        assert_eq!(
            err(
                r#"{"alert": "Hot", "expr": "skiff_node_cpu_utilization > 1", "x-skiff-scale-out": {"deployment": "w", "max": 0}}"#
            ),
            "groups[0].rules[0].x-skiff-scale-out.max: 0 must be between 1 and 1000"
        );
        assert!(err(r#"{"alert": "no spaces", "expr": "skiff_node_cpu_utilization > 1"}"#).contains("alert"));
    }

    #[test]
    fn expositions() {
        let text = "# TYPE skiff_node_cpus gauge\nskiff_node_cpus{node=\"pi-1\"} 4.0\nskiff_x 2\nskiff_c_total{a=\"b\",c=\"d\"} 7 1700000000\n# EOF\n";
        let s = parse_exposition(text);
        assert_eq!(s.len(), 3);
        assert_eq!((s[0].name.as_str(), s[0].labels["node"].as_str(), s[0].value), ("skiff_node_cpus", "pi-1", 4.0));
        assert_eq!((s[1].name.as_str(), s[1].value), ("skiff_x", 2.0));
        assert_eq!((s[2].labels.len(), s[2].labels["c"].as_str(), s[2].value), (2, "d", 7.0));
    }
}
