//! Docker- and Kubernetes-style quantities: `--cpus 0.5`, `500m`, `512m`, `1G`, `512Mi`.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum QuantityError {
    #[error("{0:?} is not a size (examples: 512m, 1g, 512Mi, 1048576)")]
    NotASize(String),
    #[error("{0:?} is not a cpu amount (examples: 0.5, 2, 500m)")]
    NotCpus(String),
}

/// Parses a CPU amount into millicores. Accepts decimal cores (`0.5`, `2`) and Kubernetes
/// millicores (`500m`). Zero and negative amounts are rejected.
pub fn parse_cpus(s: &str) -> Result<u64, QuantityError> {
    let err = || QuantityError::NotCpus(s.to_string());
    let t = s.trim();
    if let Some(m) = t.strip_suffix('m') {
        let v: u64 = m.parse().map_err(|_| err())?;
        return if v == 0 { Err(err()) } else { Ok(v) };
    }
    // Decimal cores, at most three fractional digits are meaningful.
    let (int, frac) = match t.split_once('.') {
        Some((i, f)) => (i, f),
        None => (t, ""),
    };
    if (int.is_empty() && frac.is_empty())
        || !int.chars().all(|c| c.is_ascii_digit())
        || !frac.chars().all(|c| c.is_ascii_digit())
    {
        return Err(err());
    }
    let int: u64 = if int.is_empty() { 0 } else { int.parse().map_err(|_| err())? };
    let mut frac_m = 0u64;
    for (i, c) in frac.chars().take(3).enumerate() {
        frac_m += u64::from(c.to_digit(10).unwrap_or(0)) * 10u64.pow(2 - i as u32);
    }
    let v = int.checked_mul(1000).and_then(|v| v.checked_add(frac_m)).ok_or_else(err)?;
    if v == 0 {
        return Err(err());
    }
    Ok(v)
}

/// Parses a byte size. Docker units (`b`, `k`, `m`, `g`, `t`, case-insensitive, optional
/// trailing `b`) are powers of 1024; Kubernetes binary units (`Ki`, `Mi`, `Gi`, `Ti`) too;
/// Kubernetes decimal units (`K`, `M`, `G`, `T` are treated as Docker's when written alone, as
/// Docker does; `k8s` decimal forms like `1e3` are not accepted).
pub fn parse_bytes(s: &str) -> Result<u64, QuantityError> {
    let err = || QuantityError::NotASize(s.to_string());
    let t = s.trim();
    let digits_end = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    if num.is_empty() || num.chars().filter(|c| *c == '.').count() > 1 {
        return Err(err());
    }
    let mult: u64 = match unit {
        "" | "b" | "B" => 1,
        "k" | "K" | "kb" | "KB" | "Kb" | "kB" | "Ki" => 1 << 10,
        "m" | "M" | "mb" | "MB" | "Mb" | "mB" | "Mi" => 1 << 20,
        "g" | "G" | "gb" | "GB" | "Gb" | "gB" | "Gi" => 1 << 30,
        "t" | "T" | "tb" | "TB" | "Tb" | "tB" | "Ti" => 1 << 40,
        _ => return Err(err()),
    };
    let value: f64 = num.parse().map_err(|_| err())?;
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(err());
    }
    Ok(bytes as u64)
}

/// Formats millicores the way `--cpus` is written (`0.5`, `2`, `0.125`).
pub fn format_cpus(millis: u64) -> String {
    if millis.is_multiple_of(1000) {
        format!("{}", millis / 1000)
    } else {
        let s = format!("{}.{:03}", millis / 1000, millis % 1000);
        s.trim_end_matches('0').to_string()
    }
}

/// Formats a byte count with binary units (`512Mi`, `1.5Gi`).
pub fn format_bytes(b: u64) -> String {
    const UNITS: [(&str, u64); 4] = [("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)];
    for (u, m) in UNITS {
        if b >= m {
            let v = b as f64 / m as f64;
            return if b.is_multiple_of(m) { format!("{}{u}", b / m) } else { format!("{v:.1}{u}") };
        }
    }
    format!("{b}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpus() {
        for (i, want) in [("0.5", 500), ("2", 2000), ("500m", 500), (".25", 250), ("1.0005", 1000), ("0.001", 1)] {
            assert_eq!(parse_cpus(i), Ok(want), "{i}");
        }
        for bad in ["", "0", "0m", "-1", "abc", "1.2.3", "m", "1e3", "0.0001"] {
            assert!(parse_cpus(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bytes() {
        for (i, want) in [
            ("512m", 512 << 20),
            ("1G", 1 << 30),
            ("512Mi", 512 << 20),
            ("1024", 1024),
            ("1.5g", 3 << 29),
            ("64kb", 64 << 10),
        ] {
            assert_eq!(parse_bytes(i), Ok(want), "{i}");
        }
        for bad in ["", "12XB", "m", "1..2m", "-5m", "1e9"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_bytes("12XB").unwrap_err().to_string(),
            "\"12XB\" is not a size (examples: 512m, 1g, 512Mi, 1048576)"
        );
    }

    #[test]
    fn formatting_round_trips() {
        for m in [1, 250, 500, 1000, 1500, 2000, 125] {
            assert_eq!(parse_cpus(&format_cpus(m)), Ok(m));
        }
        assert_eq!(format_bytes(512 << 20), "512Mi");
        assert_eq!(format_bytes(100), "100B");
    }
}
