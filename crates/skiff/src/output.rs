//! Human tables and `-o json|yaml`.

use anyhow::Result;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    /// A table with more columns (where a list has more to show).
    Wide,
    Json,
    Yaml,
    /// Compact JSON on one line (`skiff get -w -o json`: one document per change).
    #[value(skip)]
    JsonLine,
}

impl Format {
    /// A human table (plain or wide).
    pub fn is_table(self) -> bool {
        matches!(self, Format::Table | Format::Wide)
    }
}

/// Writes `text` to stdout. A reader that went away (`| head`, `| grep -q`) ends the
/// command as SIGPIPE ends other tools (exit 141), not with a panic (Rust ignores the
/// signal, so the write fails instead).
pub fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
    }
}

/// Prints `rows` as an aligned table with `headers`.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<width$}   ", width = w[i]));
            }
        }
        emit(&format!("{}\n", s.trim_end()));
    };
    line(headers.iter().map(|s| s.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

/// A list as a table (one row per item) or, with `-o json|yaml`, as data.
pub fn print<T: Serialize>(items: &[T], f: Format, headers: &[&str], row: impl Fn(&T) -> Vec<String>) -> Result<()> {
    match f {
        Format::Table | Format::Wide => {
            table(headers, &items.iter().map(row).collect::<Vec<_>>());
            Ok(())
        }
        _ => structured(&items, f),
    }
}

pub fn structured<T: Serialize + ?Sized>(v: &T, f: Format) -> Result<()> {
    match f {
        Format::Yaml => emit(&serde_norway::to_string(v)?),
        Format::Json | Format::Table | Format::Wide => emit(&format!("{}\n", serde_json::to_string_pretty(v)?)),
        Format::JsonLine => emit(&format!("{}\n", serde_json::to_string(v)?)),
    }
    Ok(())
}

pub fn age(ms: Option<u64>) -> String {
    let Some(t) = ms else { return "-".into() };
    let now = skiff_runtime::time::now_ms();
    let s = now.saturating_sub(t) / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A moment as `2026-12-04T22:11:04Z`.
pub fn time_of(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms / 1000 * 1000);
    let s = skiff_runtime::time::rfc3339_nanos(t);
    format!("{}Z", s.split('.').next().unwrap_or(&s))
}
