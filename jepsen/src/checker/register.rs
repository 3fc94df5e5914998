//! Linearizability of per-key registers (read, write, compare-and-set).
//!
//! History format: `f` is "read" (`value.key`; ok `result.value`, null for
//! an absent key), "write" (`value.key`, `value.value`) or "cas"
//! (`value.key`, `value.from`, `value.to`; ok `result.succeeded`). A cas
//! whose compare failed is an ok operation that observed the register not
//! holding `from`. Keys are independent registers, checked separately.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::linearizable::{check, Call, Model, Outcome};
use super::Verdict;
use crate::history::{Op, Outcome as OpOutcome};

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Register(pub Option<i64>);

#[derive(Debug, Clone)]
pub enum RegisterOp {
    Read(Option<i64>),
    Write(i64),
    Cas {
        from: i64,
        to: i64,
    },
    /// A cas that observed a value other than `from`.
    CasFailed {
        from: i64,
    },
}

impl Model for Register {
    type Op = RegisterOp;
    fn step(&self, op: &RegisterOp) -> Option<Register> {
        match op {
            RegisterOp::Read(v) => (*v == self.0).then(|| self.clone()),
            RegisterOp::Write(v) => Some(Register(Some(*v))),
            RegisterOp::Cas { from, to } => (self.0 == Some(*from)).then_some(Register(Some(*to))),
            RegisterOp::CasFailed { from } => (self.0 != Some(*from)).then(|| self.clone()),
        }
    }
}

fn int(v: &Value, field: &str) -> Option<i64> {
    v.get(field).and_then(Value::as_i64)
}

/// Turns one history op into a checker call; None when it cannot matter
/// (failed ops, reads of unknown outcome).
fn to_call(op: &Op, id: usize) -> Option<(String, Call<RegisterOp>)> {
    let key = op.value.get("key")?.as_str()?.to_string();
    let complete = match op.outcome {
        OpOutcome::Ok => Some(op.complete),
        OpOutcome::Info => None,
        OpOutcome::Fail => return None,
    };
    let rop = match (op.f.as_str(), op.outcome) {
        ("read", OpOutcome::Ok) => RegisterOp::Read(int(&op.result, "value")),
        ("read", _) => return None,
        ("write", _) => RegisterOp::Write(int(&op.value, "value")?),
        ("cas", OpOutcome::Ok) if op.result.get("succeeded") == Some(&Value::Bool(false)) => {
            RegisterOp::CasFailed { from: int(&op.value, "from")? }
        }
        ("cas", _) => RegisterOp::Cas { from: int(&op.value, "from")?, to: int(&op.value, "to")? },
        _ => return None,
    };
    Some((key, Call { op: rop, invoke: op.invoke, complete, id }))
}

/// Checks every key; `budget` bounds the search per key.
pub fn check_registers(ops: &[Op], budget: Duration) -> Verdict {
    let started = Instant::now();
    let mut by_key: BTreeMap<String, Vec<Call<RegisterOp>>> = BTreeMap::new();
    let mut checked = 0;
    for (i, op) in ops.iter().enumerate() {
        if let Some((key, call)) = to_call(op, i) {
            checked += 1;
            by_key.entry(key).or_default().push(call);
        }
    }
    let mut anomalies = Vec::new();
    let mut unknown = Vec::new();
    for (key, calls) in &by_key {
        match check(Register(None), calls, budget) {
            Outcome::Linearizable => {}
            Outcome::Unknown { explored } => unknown.push(json!({"key": key, "explored": explored})),
            Outcome::NotLinearizable { longest_prefix, prefix, stuck, state } => {
                let stuck_op = &ops[stuck];
                let concurrent: Vec<&Op> = calls
                    .iter()
                    .map(|c| &ops[c.id])
                    .filter(|o| {
                        o.invoke <= stuck_op.complete && o.complete >= stuck_op.invoke && !std::ptr::eq(*o, stuck_op)
                    })
                    .take(12)
                    .collect();
                let tail: Vec<&Op> = prefix.iter().rev().take(8).rev().map(|&i| &ops[i]).collect();
                anomalies.push(json!({
                    "type": "nonlinearizable",
                    "key": key,
                    "longest_linearizable_prefix": longest_prefix,
                    "state_after_prefix": state.0,
                    "cannot_linearize": stuck_op,
                    "last_linearized": tail,
                    "concurrent": concurrent,
                }));
            }
        }
    }
    let mut v = Verdict::new("linearizable-register", checked, anomalies, started);
    if !unknown.is_empty() && v.anomalies.is_empty() {
        v.valid = super::Validity::Unknown;
        v.anomalies = unknown.into_iter().map(|u| json!({"type": "timeout", "detail": u})).collect();
    }
    v
}
