//! Real compose files and Kubernetes manifests, as published (`corpus/SOURCES.tsv` names
//! each one's repository, commit and path), each with the outcome skiff gives it in
//! `corpus/EXPECTED.tsv`: `accepted` (no warning), `warned` (accepted, with warnings) or
//! `refused` with the start of the error. A change of outcome fails the test, so a file
//! newly refused is seen; `SKIFF_CORPUS_WRITE=1` writes the table afresh (review its diff).

#![allow(clippy::unwrap_used)] // tests may panic on setup failures

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

/// (sample, "KIND OUTCOME", detail) of every sample, in the order of SOURCES.tsv.
fn outcomes() -> Vec<(String, String, String)> {
    let sources = std::fs::read_to_string(corpus().join("SOURCES.tsv")).unwrap();
    let mut out = vec![];
    for line in sources.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let cols: Vec<&str> = line.split('\t').collect();
        let (sample, path) = (cols[0], cols[3]);
        let k8s = corpus().join("k8s").join(format!("{sample}.yaml"));
        let result = if k8s.exists() {
            let text = std::fs::read_to_string(&k8s).unwrap();
            skiff_manifest::import_k8s(&text, "default").map(|i| i.warnings)
        } else {
            let dir = corpus().join("compose").join(sample);
            let file = Path::new(path).file_name().unwrap();
            let text = std::fs::read_to_string(dir.join(file)).unwrap();
            let env = |k: &str| (k == "HOME").then(|| "/home/user".to_string());
            let read = |p: &Path| std::fs::read_to_string(p);
            skiff_manifest::import_compose(&text, &dir, sample, &env, &read).map(|i| i.warnings)
        };
        let (outcome, detail) = match result {
            Ok(w) if w.is_empty() => ("accepted", String::new()),
            Ok(w) => ("warned", format!("{} warnings", w.len())),
            // Paths as the corpus names them, wherever the checkout is.
            Err(e) => (
                "refused",
                e.to_string().replace(['\t', '\n'], " ").replace(&corpus().display().to_string(), "<corpus>"),
            ),
        };
        let kind = if k8s.exists() { "k8s" } else { "compose" };
        out.push((sample.to_string(), format!("{kind} {outcome}"), detail));
    }
    out
}

#[test]
fn real_files_get_the_outcome_on_record() {
    let got = outcomes();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (sample, outcome, detail) in &got {
        *counts.entry(outcome.as_str()).or_default() += 1;
        if outcome.ends_with("refused") {
            eprintln!("refused {sample}: {detail}");
        }
    }
    eprintln!("outcomes: {counts:?}");
    let table: String = got.iter().map(|(s, o, d)| format!("{s}\t{o}\t{d}\n")).collect();
    let path = corpus().join("EXPECTED.tsv");
    if std::env::var_os("SKIFF_CORPUS_WRITE").is_some() {
        std::fs::write(&path, format!("sample\toutcome\tdetail\n{table}")).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap();
    let want: BTreeMap<&str, (&str, &str)> = want
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut c = l.splitn(3, '\t');
            Some((c.next()?, (c.next()?, c.next().unwrap_or(""))))
        })
        .collect();
    assert_eq!(want.len(), got.len(), "every sample has an expected outcome");
    let mut changed = vec![];
    for (sample, outcome, detail) in &got {
        let (o, d) = want.get(sample.as_str()).copied().unwrap_or(("missing", ""));
        // Refusals must keep their reason; warnings their count.
        if o != outcome || d != detail {
            changed.push(format!("{sample}: expected {o} ({d}), got {outcome} ({detail})"));
        }
    }
    assert!(changed.is_empty(), "outcomes changed:\n{}", changed.join("\n"));
}
