//! `-o jsonpath=TEMPLATE`, as kubectl's: text with `{EXPR}` parts, where EXPR is a path
//! into the list (`.items[*].spec.name`, `.items[0].name`, `..name`), a quoted string
//! (`{"\n"}`), or `{range EXPR}...{end}` repeating what is between for each value. The
//! list is `{"kind": "List", "items": [...]}`, as kubectl's. Several values of one
//! expression are joined by spaces; strings are printed as they are, others as JSON.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Path(Vec<Step>),
    Range(Vec<Step>, Vec<Part>),
}

#[derive(Debug, Clone, PartialEq)]
enum Step {
    Field(String),
    Index(usize),
    All,
    /// `..name`: every value named so, at any depth.
    Deep(String),
}

/// A template, checked before anything is asked of the hub.
#[derive(Debug, Clone, PartialEq)]
pub struct Template(Vec<Part>);

impl Template {
    pub fn parse(t: &str) -> Result<Template, String> {
        let mut stack: Vec<(Vec<Step>, Vec<Part>)> = vec![];
        let mut parts: Vec<Part> = vec![];
        let mut rest = t;
        while !rest.is_empty() {
            let Some(open) = rest.find('{') else {
                parts.push(Part::Text(rest.to_string()));
                break;
            };
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let close =
                rest[open..].find('}').ok_or_else(|| format!("jsonpath {t:?}: a '{{' without its '}}'"))? + open;
            let expr = rest[open + 1..close].trim();
            rest = &rest[close + 1..];
            if let Some(q) = expr.strip_prefix('"').and_then(|e| e.strip_suffix('"')) {
                parts.push(Part::Text(q.replace("\\n", "\n").replace("\\t", "\t")));
            } else if let Some(r) = expr.strip_prefix("range ") {
                stack.push((steps(r.trim(), t)?, std::mem::take(&mut parts)));
            } else if expr == "end" {
                let (path, outer) =
                    stack.pop().ok_or_else(|| format!("jsonpath {t:?}: an {{end}} without its {{range}}"))?;
                let body = std::mem::replace(&mut parts, outer);
                parts.push(Part::Range(path, body));
            } else {
                parts.push(Part::Path(steps(expr, t)?));
            }
        }
        if !stack.is_empty() {
            return Err(format!("jsonpath {t:?}: a {{range}} without its {{end}}"));
        }
        Ok(Template(parts))
    }

    /// The template applied to a list.
    pub fn render(&self, items: &[Value]) -> String {
        self.render_at(&serde_json::json!({"kind": "List", "items": items}))
    }

    /// The template applied to one object (`skiff get KIND NAME`, as kubectl's).
    pub fn render_at(&self, root: &Value) -> String {
        let mut out = String::new();
        render(&self.0, root, &mut out);
        out
    }
}

fn steps(expr: &str, t: &str) -> Result<Vec<Step>, String> {
    let bad = |why: &str| format!("jsonpath {t:?}: {expr:?}: {why}");
    let mut s = expr.strip_prefix('$').unwrap_or(expr);
    if !s.is_empty() && !s.starts_with(['.', '[']) {
        return Err(bad("a path starts with '.' (.items[*].spec.name)"));
    }
    let mut out = vec![];
    while !s.is_empty() {
        if let Some(r) = s.strip_prefix("..") {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            if end == 0 {
                return Err(bad("'..' needs a name after it"));
            }
            out.push(Step::Deep(r[..end].to_string()));
            s = &r[end..];
        } else if let Some(r) = s.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            if end > 0 {
                out.push(Step::Field(r[..end].to_string()));
            }
            s = &r[end..];
        } else if let Some(r) = s.strip_prefix('[') {
            let end = r.find(']').ok_or_else(|| bad("a '[' without its ']'"))?;
            let inner = r[..end].trim();
            out.push(match inner {
                "*" => Step::All,
                i if i.starts_with(['\'', '"']) => Step::Field(i.trim_matches(['\'', '"']).to_string()),
                i => match i.parse::<usize>() {
                    Ok(n) => Step::Index(n),
                    // Filters, slices and negative indexes are not read here: an error,
                    // not an empty answer.
                    Err(_) => return Err(bad(&format!("[{i}]: only [*], [N] and ['name'] are supported"))),
                },
            });
            s = &r[end + 1..];
        } else {
            return Err(bad("expected '.' or '['"));
        }
    }
    Ok(out)
}

fn select<'v>(root: &'v Value, path: &[Step]) -> Vec<&'v Value> {
    let mut cur = vec![root];
    for step in path {
        let mut next = vec![];
        for v in cur {
            match step {
                Step::Field(f) => next.extend(v.get(f.as_str())),
                Step::Index(i) => next.extend(v.get(*i)),
                Step::All => match v {
                    Value::Array(a) => next.extend(a.iter()),
                    Value::Object(m) => next.extend(m.values()),
                    _ => {}
                },
                Step::Deep(f) => deep(v, f, &mut next),
            }
        }
        cur = next;
    }
    cur
}

fn deep<'v>(v: &'v Value, name: &str, out: &mut Vec<&'v Value>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == name {
                    out.push(x);
                }
                deep(x, name, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| deep(x, name, out)),
        _ => {}
    }
}

fn render(parts: &[Part], at: &Value, out: &mut String) {
    for p in parts {
        match p {
            Part::Text(t) => out.push_str(t),
            Part::Path(path) => {
                let shown: Vec<String> = select(at, path)
                    .into_iter()
                    .map(|v| match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect();
                out.push_str(&shown.join(" "));
            }
            Part::Range(path, body) => {
                for v in select(at, path) {
                    render(body, v, out);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_select_as_kubectls_jsonpath() {
        let items = vec![
            serde_json::json!({"spec": {"name": "web", "replicas": 2}, "labels": {"tier": "front"}}),
            serde_json::json!({"spec": {"name": "db", "replicas": 1}}),
        ];
        let r = |t: &str| Template::parse(t).unwrap().render(&items);
        assert_eq!(r("{.items[*].spec.name}"), "web db");
        assert_eq!(r("{.items[0].spec.replicas}"), "2");
        assert_eq!(r("{range .items[*]}{.spec.name}={.spec.replicas}{\"\\n\"}{end}"), "web=2\ndb=1\n");
        assert_eq!(r("{..name}"), "web db");
        assert_eq!(r("{.items[1]['spec'].name}"), "db");
        assert_eq!(r("names: {.items[*].spec.name}!"), "names: web db!");
        assert_eq!(r("{.items[5].spec.name}"), "", "nothing there: nothing printed");
        assert_eq!(r("{.items[0].labels}"), "{\"tier\":\"front\"}");
        let one = Template::parse("{.spec.name}").unwrap().render_at(&items[1]);
        assert_eq!(one, "db", "one object named: it is the root");
        for (bad, says) in [
            ("{.items[*}", "without its ']'"),
            ("{range .items[*]}x", "without its {end}"),
            ("{end}", "without its {range}"),
            ("{items}", "starts with '.'"),
            ("{.items", "without its '}'"),
            ("{.items[?(@.x==\"y\")]}", "only [*], [N] and ['name']"),
            ("{.items[-1]}", "only [*], [N] and ['name']"),
            ("{.items[0:2]}", "only [*], [N] and ['name']"),
        ] {
            let e = Template::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
