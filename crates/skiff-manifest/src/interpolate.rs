//! Compose variable interpolation: `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`,
//! `${VAR:?error}`, `${VAR?error}`, `${VAR:+alt}`, `${VAR+alt}`, and `$$` for a literal `$`.

/// Interpolates one string. `lookup` returns a variable's value if it is set.
pub fn interpolate(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'$' {
            let ch = s[i..].chars().next().unwrap_or_default();
            out.push(ch);
            i += ch.len_utf8();
            continue;
        }
        match b.get(i + 1) {
            Some(b'$') => {
                out.push('$');
                i += 2;
            }
            Some(b'{') => {
                let close = s[i + 2..].find('}').ok_or_else(|| format!("unclosed ${{ in {s:?}"))?;
                let inner = &s[i + 2..i + 2 + close];
                out.push_str(&expand(inner, lookup)?);
                i += close + 3;
            }
            Some(c) if c.is_ascii_alphabetic() || *c == b'_' => {
                let end = s[i + 1..]
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .map(|e| i + 1 + e)
                    .unwrap_or(s.len());
                out.push_str(&lookup(&s[i + 1..end]).unwrap_or_default());
                i = end;
            }
            _ => {
                out.push('$');
                i += 1;
            }
        }
    }
    Ok(out)
}

fn expand(inner: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let name_end = inner.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(inner.len());
    let (name, op) = inner.split_at(name_end);
    if name.is_empty() {
        return Err(format!("invalid variable reference ${{{inner}}}"));
    }
    let val = lookup(name);
    let set_nonempty = val.as_deref().is_some_and(|v| !v.is_empty());
    let sub = |rest: &str| interpolate(rest, lookup);
    Ok(match op {
        "" => val.unwrap_or_default(),
        _ if op.starts_with(":-") => {
            if set_nonempty {
                val.unwrap_or_default()
            } else {
                sub(&op[2..])?
            }
        }
        _ if op.starts_with('-') => val.map(Ok).unwrap_or_else(|| sub(&op[1..]))?,
        _ if op.starts_with(":?") => {
            if set_nonempty {
                val.unwrap_or_default()
            } else {
                return Err(format!("required variable {name} is missing a value: {}", &op[2..]));
            }
        }
        _ if op.starts_with('?') => {
            val.ok_or_else(|| format!("required variable {name} is missing a value: {}", &op[1..]))?
        }
        _ if op.starts_with(":+") => {
            if set_nonempty {
                sub(&op[2..])?
            } else {
                String::new()
            }
        }
        _ if op.starts_with('+') => {
            if val.is_some() {
                sub(&op[1..])?
            } else {
                String::new()
            }
        }
        _ => return Err(format!("invalid variable reference ${{{inner}}}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> Option<String> {
        match k {
            "SET" => Some("v".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn forms() {
        let f = |s: &str| interpolate(s, &env);
        assert_eq!(f("a $SET b ${SET}").unwrap(), "a v b v");
        assert_eq!(f("${UNSET:-def} ${EMPTY:-def} ${EMPTY-def} ${UNSET-d2}").unwrap(), "def def  d2");
        assert_eq!(f("$$HOME ${SET:+alt} ${UNSET:+alt}.").unwrap(), "$HOME alt .");
        assert!(f("${UNSET:?need it}").unwrap_err().contains("need it"));
        assert!(f("${oops").is_err());
        assert_eq!(f("cost: 5$").unwrap(), "cost: 5$");
    }
}
