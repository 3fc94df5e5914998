//! The checkers' own test: a corpus of histories whose file names say
//! what the checkers must conclude, `<workload>--valid--<what>.jsonl` or
//! `<workload>--anomaly-<type>--<what>.jsonl`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::checker::Validity;
use crate::history::read_jsonl;
use crate::run::overall;
use crate::workload::Workload;

/// One history's verdict against its name.
pub struct CorpusResult {
    pub name: String,
    pub expected: String,
    pub got: Validity,
    pub anomalies: Vec<String>,
    pub ok: bool,
}

/// Checks every history in `dir`.
pub fn check_corpus(dir: &Path) -> Result<Vec<CorpusResult>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    paths.sort();
    let mut results = Vec::new();
    for path in paths {
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("").to_string();
        let mut parts = name.split("--");
        let (Some(w), Some(expected)) = (parts.next(), parts.next()) else {
            bail!("{}: name is not <workload>--<expectation>--<what>", path.display());
        };
        let workload = Workload::parse(w).with_context(|| format!("{}: unknown workload {w:?}", path.display()))?;
        let verdicts = workload.check(&read_jsonl(&path)?);
        let got = overall(&verdicts);
        let anomalies: Vec<String> = verdicts.iter().flat_map(|v| v.anomaly_types()).collect();
        let ok = match expected.strip_prefix("anomaly-") {
            Some(kind) => got == Validity::Invalid && anomalies.iter().any(|t| t == kind),
            None => expected == "valid" && got == Validity::Valid,
        };
        results.push(CorpusResult { name: name.clone(), expected: expected.to_string(), got, anomalies, ok });
    }
    Ok(results)
}
