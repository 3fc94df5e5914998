//! The history of a run: every client operation (invocation and outcome)
//! and every fault, with monotonic timestamps, written as JSON lines.

use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How an operation ended. `Info` means unknown: it may or may not have
/// taken effect (timeouts, lost connections), as in Jepsen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Fail,
    Info,
}

/// One completed client operation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Op {
    pub process: usize,
    /// Operation name, e.g. "read", "write", "cas", "txn".
    pub f: String,
    /// What was asked.
    pub value: Value,
    /// What came back (for reads), or null.
    #[serde(default)]
    pub result: Value,
    pub outcome: Outcome,
    /// Nanoseconds since the start of the run.
    pub invoke: u64,
    pub complete: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A fault or its healing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NemesisEvent {
    pub time: u64,
    /// e.g. "kill", "restart", "partition", "heal".
    pub f: String,
    pub value: Value,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Entry {
    Op(Op),
    Nemesis(NemesisEvent),
}

/// Collects entries from concurrent workers.
#[derive(Clone)]
pub struct Recorder {
    start: Instant,
    entries: Arc<Mutex<Vec<Entry>>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    pub fn new() -> Self {
        Self { start: Instant::now(), entries: Arc::new(Mutex::new(Vec::new())) }
    }

    pub fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    pub fn op(&self, op: Op) {
        if let Ok(mut e) = self.entries.lock() {
            e.push(Entry::Op(op));
        }
    }

    pub fn nemesis(&self, f: &str, value: Value) {
        let ev = NemesisEvent { time: self.now(), f: f.to_string(), value };
        tracing::info!(fault = %ev.f, value = %ev.value, "nemesis");
        if let Ok(mut e) = self.entries.lock() {
            e.push(Entry::Nemesis(ev));
        }
    }

    /// Starts timing an operation; finish it with [`Pending::ok`],
    /// [`Pending::fail`] or [`Pending::info`].
    pub fn invoke(&self, process: usize, f: &str, value: Value) -> Pending {
        Pending { rec: self.clone(), process, f: f.to_string(), value, invoke: self.now() }
    }

    pub fn entries(&self) -> Vec<Entry> {
        let mut e = self.entries.lock().map(|e| e.clone()).unwrap_or_default();
        e.sort_by_key(|e| match e {
            Entry::Op(o) => o.invoke,
            Entry::Nemesis(n) => n.time,
        });
        e
    }
}

pub fn ops(entries: &[Entry]) -> Vec<Op> {
    entries.iter().filter_map(|e| if let Entry::Op(o) = e { Some(o.clone()) } else { None }).collect()
}

pub fn write_jsonl(path: &Path, entries: &[Entry]) -> std::io::Result<()> {
    let mut out = BufWriter::new(std::fs::File::create(path)?);
    for e in entries {
        serde_json::to_writer(&mut out, e)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

pub fn read_jsonl(path: &Path) -> anyhow::Result<Vec<Entry>> {
    let text = std::fs::read_to_string(path)?;
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| Ok(serde_json::from_str(l)?)).collect()
}

/// An operation in flight.
pub struct Pending {
    rec: Recorder,
    process: usize,
    f: String,
    value: Value,
    invoke: u64,
}

impl Pending {
    fn finish(self, outcome: Outcome, result: Value, error: Option<String>) -> Op {
        let op = Op {
            process: self.process,
            f: self.f,
            value: self.value,
            result,
            outcome,
            invoke: self.invoke,
            complete: self.rec.now(),
            error,
        };
        self.rec.op(op.clone());
        op
    }

    pub fn ok(self, result: Value) -> Op {
        self.finish(Outcome::Ok, result, None)
    }

    /// The operation certainly did not take effect.
    pub fn fail(self, error: impl ToString) -> Op {
        self.finish(Outcome::Fail, Value::Null, Some(error.to_string()))
    }

    /// The outcome is unknown.
    pub fn info(self, error: impl ToString) -> Op {
        self.finish(Outcome::Info, Value::Null, Some(error.to_string()))
    }

    /// Records a client error as `fail` when it is definite, else `info`.
    pub fn error(self, e: &keel_client::Error) -> Op {
        if e.is_definite() {
            self.fail(e)
        } else {
            self.info(e)
        }
    }
}
