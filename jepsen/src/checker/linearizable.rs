//! A linearizability checker in the style of Wing & Gong as improved by
//! Lowe (and used by Porcupine and Knossos): search for an order of the
//! operations that respects real time and the model, backtracking when an
//! operation's completion is reached before it could be placed, and
//! memoising (set of placed operations, model state) so no configuration is
//! explored twice.
//!
//! Operations with an unknown outcome (`complete: None`) may take effect at
//! any point after their invocation, or never: they have no completion
//! event, so the search never has to place them.

use std::collections::HashSet;
use std::fmt::Debug;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// A sequential specification: `step` returns the state after `op`, or
/// None if `op` cannot happen in this state.
pub trait Model: Clone + Eq + Hash + Debug {
    type Op: Debug;
    fn step(&self, op: &Self::Op) -> Option<Self>;
}

/// One operation as the checker sees it.
#[derive(Debug, Clone)]
pub struct Call<O> {
    pub op: O,
    pub invoke: u64,
    /// None: unknown outcome.
    pub complete: Option<u64>,
    /// Caller's handle for reports (e.g. index in the history).
    pub id: usize,
}

#[derive(Debug)]
pub enum Outcome<M> {
    Linearizable,
    NotLinearizable {
        /// Most operations placed in any attempted order.
        longest_prefix: usize,
        /// The placed order at that point (caller ids).
        prefix: Vec<usize>,
        /// The operation that had to be placed next but could not be.
        stuck: usize,
        /// Model state after the longest prefix.
        state: M,
    },
    /// The search exceeded its budget: neither a proof nor a refutation.
    Unknown {
        explored: u64,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Call,
    Return,
}

struct Event {
    kind: Kind,
    op: usize,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct BitSet(Vec<u64>);

impl BitSet {
    fn new(n: usize) -> Self {
        BitSet(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
}

/// Checks `calls` against `init`, giving up after `budget`.
pub fn check<M: Model>(init: M, calls: &[Call<M::Op>], budget: Duration) -> Outcome<M> {
    let started = Instant::now();
    // Events in time order; at equal times calls come first, which makes
    // the operations concurrent (the lenient reading).
    let mut order: Vec<(u64, u8, usize)> = Vec::with_capacity(calls.len() * 2);
    for (i, c) in calls.iter().enumerate() {
        order.push((c.invoke, 0, i));
        if let Some(t) = c.complete {
            order.push((t, 1, i));
        }
    }
    order.sort_unstable();
    // A doubly linked list over positions 1..=len; 0 is the head sentinel
    // and NIL the end.
    const NIL: usize = usize::MAX;
    let len = order.len();
    let events: Vec<Event> = std::iter::once(Event { kind: Kind::Call, op: usize::MAX })
        .chain(order.iter().map(|&(_, k, op)| Event { kind: if k == 0 { Kind::Call } else { Kind::Return }, op }))
        .collect();
    let mut next: Vec<usize> = (0..=len).map(|p| if p == len { NIL } else { p + 1 }).collect();
    let mut prev: Vec<usize> = (0..=len).map(|p| p.wrapping_sub(1)).collect();
    let mut return_pos = vec![NIL; calls.len()];
    for (p, e) in events.iter().enumerate().skip(1) {
        if e.kind == Kind::Return {
            return_pos[e.op] = p;
        }
    }

    fn unlink(p: usize, next: &mut [usize], prev: &mut [usize]) {
        let (a, b) = (prev[p], next[p]);
        next[a] = b;
        if b != usize::MAX {
            prev[b] = a;
        }
    }
    fn relink(p: usize, next: &mut [usize], prev: &mut [usize]) {
        let (a, b) = (prev[p], next[p]);
        next[a] = p;
        if b != usize::MAX {
            prev[b] = p;
        }
    }

    let mut state = init;
    let mut placed = BitSet::new(calls.len());
    let mut cache: HashSet<(BitSet, M)> = HashSet::new();
    let mut stack: Vec<(usize, M)> = Vec::new();
    let mut best: Option<(usize, Vec<usize>, usize, M)> = None;
    let mut explored: u64 = 0;
    let mut entry = next[0];
    loop {
        explored += 1;
        if explored.is_multiple_of(4096) && started.elapsed() > budget {
            return Outcome::Unknown { explored };
        }
        if entry == NIL {
            return Outcome::Linearizable;
        }
        let e = &events[entry];
        match e.kind {
            Kind::Call => {
                let op = e.op;
                if let Some(after) = state.step(&calls[op].op) {
                    placed.set(op);
                    if cache.insert((placed.clone(), after.clone())) {
                        stack.push((entry, std::mem::replace(&mut state, after)));
                        unlink(entry, &mut next, &mut prev);
                        if return_pos[op] != NIL {
                            unlink(return_pos[op], &mut next, &mut prev);
                        }
                        entry = next[0];
                        continue;
                    }
                    placed.clear(op);
                }
                entry = next[entry];
            }
            Kind::Return => {
                if best.as_ref().is_none_or(|b| stack.len() > b.0) {
                    let prefix = stack.iter().map(|(p, _)| calls[events[*p].op].id).collect();
                    best = Some((stack.len(), prefix, calls[e.op].id, state.clone()));
                }
                let Some((p, before)) = stack.pop() else {
                    let (longest_prefix, prefix, stuck, state) =
                        best.unwrap_or((0, Vec::new(), calls[e.op].id, state.clone()));
                    return Outcome::NotLinearizable { longest_prefix, prefix, stuck, state };
                };
                let op = events[p].op;
                state = before;
                placed.clear(op);
                if return_pos[op] != NIL {
                    relink(return_pos[op], &mut next, &mut prev);
                }
                relink(p, &mut next, &mut prev);
                entry = next[p];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A register holding an integer (None: absent).
    #[derive(Clone, PartialEq, Eq, Hash, Debug)]
    struct Reg(Option<i64>);

    #[derive(Debug)]
    enum RegOp {
        Read(Option<i64>),
        Write(i64),
    }

    impl Model for Reg {
        type Op = RegOp;
        fn step(&self, op: &RegOp) -> Option<Reg> {
            match op {
                RegOp::Read(v) => (*v == self.0).then(|| self.clone()),
                RegOp::Write(v) => Some(Reg(Some(*v))),
            }
        }
    }

    fn call(op: RegOp, invoke: u64, complete: Option<u64>, id: usize) -> Call<RegOp> {
        Call { op, invoke, complete, id }
    }

    #[test]
    fn concurrent_write_may_be_seen_or_not() {
        let h = vec![
            call(RegOp::Write(1), 0, Some(10), 0),
            call(RegOp::Read(Some(1)), 2, Some(3), 1),
            call(RegOp::Read(None), 4, Some(5), 2),
        ];
        // Read 1 then absent: impossible, the write cannot be undone.
        assert!(matches!(check(Reg(None), &h, Duration::from_secs(5)), Outcome::NotLinearizable { .. }));
        let h = vec![
            call(RegOp::Write(1), 0, Some(10), 0),
            call(RegOp::Read(None), 2, Some(3), 1),
            call(RegOp::Read(Some(1)), 4, Some(5), 2),
        ];
        assert!(matches!(check(Reg(None), &h, Duration::from_secs(5)), Outcome::Linearizable));
    }

    #[test]
    fn stale_read_after_completed_write_is_caught_and_explained() {
        let h = vec![
            call(RegOp::Write(1), 0, Some(1), 0),
            call(RegOp::Write(2), 2, Some(3), 1),
            call(RegOp::Read(Some(1)), 4, Some(5), 2),
        ];
        match check(Reg(None), &h, Duration::from_secs(5)) {
            Outcome::NotLinearizable { longest_prefix, stuck, state, .. } => {
                assert_eq!(longest_prefix, 2);
                assert_eq!(stuck, 2);
                assert_eq!(state, Reg(Some(2)));
            }
            o => panic!("expected a refutation, got {o:?}"),
        }
    }

    #[test]
    fn unknown_writes_may_apply_late_or_never() {
        let h = vec![
            call(RegOp::Write(1), 0, None, 0),
            call(RegOp::Read(None), 5, Some(6), 1),
            call(RegOp::Read(Some(1)), 7, Some(8), 2),
        ];
        assert!(matches!(check(Reg(None), &h, Duration::from_secs(5)), Outcome::Linearizable));
        let h = vec![call(RegOp::Write(1), 0, None, 0), call(RegOp::Read(None), 5, Some(6), 1)];
        assert!(matches!(check(Reg(None), &h, Duration::from_secs(5)), Outcome::Linearizable));
    }
}
