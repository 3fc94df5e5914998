//! Checkers: each reads a history and returns verdicts with
//! counterexamples. None of them looks at the system under test; they can be
//! re-run on a saved `history.jsonl`.

pub mod elle;
pub mod kube;
pub mod lease;
pub mod linearizable;
pub mod lock;
pub mod register;
pub mod watch;

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Validity {
    Valid,
    Invalid,
    /// The checker ran out of time or data; never counted as a pass.
    Unknown,
}

/// One checker's judgement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verdict {
    pub checker: String,
    pub valid: Validity,
    /// Operations (or events) examined.
    pub checked: usize,
    /// Named anomalies, each an object with at least `type`.
    pub anomalies: Vec<Value>,
    /// Measurements that are reported, not judged (e.g. lock overlaps).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub measured: Value,
    pub millis: u128,
}

impl Verdict {
    pub fn new(checker: &str, checked: usize, anomalies: Vec<Value>, started: std::time::Instant) -> Verdict {
        Verdict {
            checker: checker.to_string(),
            valid: if anomalies.is_empty() { Validity::Valid } else { Validity::Invalid },
            checked,
            anomalies,
            measured: Value::Null,
            millis: started.elapsed().as_millis(),
        }
    }

    pub fn unknown(checker: &str, why: &str, started: std::time::Instant) -> Verdict {
        Verdict {
            checker: checker.to_string(),
            valid: Validity::Unknown,
            checked: 0,
            anomalies: vec![serde_json::json!({"type": "unknown", "reason": why})],
            measured: Value::Null,
            millis: started.elapsed().as_millis(),
        }
    }

    /// Anomaly type names, for summaries and tests.
    pub fn anomaly_types(&self) -> Vec<String> {
        self.anomalies.iter().filter_map(|a| a.get("type").and_then(Value::as_str).map(str::to_string)).collect()
    }
}

/// Convergence: after the run every member hashes its key-value state at
/// one revision (`hashkv` ops: `value.member`, `value.rev`; ok
/// `result.hash`); the hashes must be equal.
pub fn convergence(ops: &[crate::history::Op]) -> Verdict {
    let started = std::time::Instant::now();
    let hashes: Vec<&crate::history::Op> =
        ops.iter().filter(|o| o.f == "hashkv" && o.outcome == crate::history::Outcome::Ok).collect();
    if hashes.len() < 2 {
        return Verdict::unknown("convergence", "fewer than two members answered HashKV", started);
    }
    let mut anomalies = Vec::new();
    let first = &hashes[0];
    for h in &hashes[1..] {
        if h.value.get("rev") == first.value.get("rev") && h.result.get("hash") != first.result.get("hash") {
            anomalies.push(serde_json::json!({"type": "divergent-hash", "members": [first, h]}));
        }
    }
    let mut v = Verdict::new("convergence", hashes.len(), anomalies, started);
    v.measured = serde_json::json!({"members": hashes.len(), "rev": first.value.get("rev")});
    v
}
