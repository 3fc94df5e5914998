//! Strict serializability of list-append transactions, after Elle
//! (Kingsbury & Alvaro): every append writes a value unique to its key, so
//! the longest read of a key reveals the order of that key's versions, and
//! from it the dependencies between transactions: write-write (ww: T1's
//! append precedes T2's), write-read (wr: T2 read T1's append as the last
//! element), read-write (rw: T1 read a version that T2's append followed),
//! plus real-time (rt: T1 completed before T2 was invoked). A serializable
//! history has no cycle without rt edges; a strictly serializable one has
//! none at all. Cycles are named by the edges they need:
//!
//! - G0: ww only (dirty write);
//! - G1c: ww and wr (circular information flow);
//! - G-single: exactly one rw (read skew; with rt, typically a stale read);
//! - G2-item: two or more rw (write skew);
//! - a `-realtime` suffix: the cycle needs a real-time edge, i.e. the
//!   history is serializable but not strictly (stale reads, lost
//!   real-time order).
//!
//! Non-cyclic anomalies: G1a (read of an aborted append), G1b (read of an
//! intermediate state of another txn), lost-update (two committed txns read
//! the same version of a key and both appended to it), incompatible-order
//! (two reads that are not prefixes of one another), duplicate-elements,
//! garbage (a read of a value nobody appended), internal (a txn misread its
//! own writes).
//!
//! History format: `f` = "txn"; `value` (and `result` when ok) is a list of
//! micro-ops `["r", key, null | [ints]]` and `["append", key, int]`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Instant;

use serde_json::{json, Value};

use super::Verdict;
use crate::history::{Op, Outcome};

#[derive(Debug, Clone, PartialEq)]
enum Mop {
    Read(String, Option<Vec<i64>>),
    Append(String, i64),
}

struct Txn {
    /// Index in the op list.
    op: usize,
    outcome: Outcome,
    mops: Vec<Mop>,
    invoke: u64,
    complete: u64,
}

const WW: u8 = 1;
const WR: u8 = 2;
const RW: u8 = 4;
const RT: u8 = 8;

fn edge_name(bit: u8) -> &'static str {
    match bit {
        WW => "ww",
        WR => "wr",
        RW => "rw",
        _ => "rt",
    }
}

fn parse_mops(v: &Value) -> Option<Vec<Mop>> {
    v.as_array()?
        .iter()
        .map(|m| {
            let m = m.as_array()?;
            let key = m.get(1)?.as_str()?.to_string();
            match m.first()?.as_str()? {
                "r" => {
                    let list = match m.get(2) {
                        None | Some(Value::Null) => None,
                        Some(l) => Some(l.as_array()?.iter().map(Value::as_i64).collect::<Option<Vec<i64>>>()?),
                    };
                    Some(Mop::Read(key, list))
                }
                "append" => Some(Mop::Append(key, m.get(2)?.as_i64()?)),
                _ => None,
            }
        })
        .collect()
}

struct Graph {
    /// Edge (from, to) -> kinds, and the key that justified the first of
    /// each kind.
    edges: HashMap<(usize, usize), (u8, Option<String>)>,
    out: Vec<Vec<usize>>,
}

impl Graph {
    fn new(n: usize) -> Self {
        Graph { edges: HashMap::new(), out: vec![Vec::new(); n] }
    }

    fn add(&mut self, a: usize, b: usize, kind: u8, key: Option<&str>) {
        if a == b {
            return;
        }
        let e = self.edges.entry((a, b)).or_insert_with(|| (0, None));
        if e.0 == 0 {
            self.out[a].push(b);
        }
        e.0 |= kind;
        if e.1.is_none() {
            e.1 = key.map(str::to_string);
        }
    }

    fn kinds(&self, a: usize, b: usize) -> u8 {
        self.edges.get(&(a, b)).map_or(0, |e| e.0)
    }
}

/// Strongly connected components (iterative Tarjan) of the subgraph of
/// `nodes` using edges whose kinds intersect `allowed`.
fn sccs(g: &Graph, nodes: &[usize], allowed: u8) -> Vec<Vec<usize>> {
    let inside: HashSet<usize> = nodes.iter().copied().collect();
    let mut index: HashMap<usize, usize> = HashMap::new();
    let mut low: HashMap<usize, usize> = HashMap::new();
    let mut on_stack: HashSet<usize> = HashSet::new();
    let mut stack: Vec<usize> = Vec::new();
    let mut out = Vec::new();
    let mut counter = 0;
    for &root in nodes {
        if index.contains_key(&root) {
            continue;
        }
        // (node, next child position)
        let mut work: Vec<(usize, usize)> = vec![(root, 0)];
        while let Some(&(v, start)) = work.last() {
            if start == 0 && !index.contains_key(&v) {
                index.insert(v, counter);
                low.insert(v, counter);
                counter += 1;
                stack.push(v);
                on_stack.insert(v);
            }
            let children = &g.out[v];
            let mut pos = start;
            let mut descend = None;
            while pos < children.len() {
                let w = children[pos];
                pos += 1;
                if !inside.contains(&w) || g.kinds(v, w) & allowed == 0 {
                    continue;
                }
                if !index.contains_key(&w) {
                    descend = Some(w);
                    break;
                } else if on_stack.contains(&w) {
                    let lw = index[&w].min(low[&v]);
                    low.insert(v, lw);
                }
            }
            if let Some(top) = work.last_mut() {
                top.1 = pos;
            }
            if let Some(w) = descend {
                work.push((w, 0));
                continue;
            }
            work.pop();
            if let Some(&(parent, _)) = work.last() {
                let lp = low[&parent].min(low[&v]);
                low.insert(parent, lp);
            }
            if low[&v] == index[&v] {
                let mut comp = Vec::new();
                while let Some(w) = stack.pop() {
                    on_stack.remove(&w);
                    comp.push(w);
                    if w == v {
                        break;
                    }
                }
                if comp.len() > 1 {
                    out.push(comp);
                }
            }
        }
    }
    out
}

/// Shortest path from `from` to `to` within `nodes` over `allowed` edges.
fn path(g: &Graph, nodes: &HashSet<usize>, from: usize, to: usize, allowed: u8) -> Option<Vec<usize>> {
    let mut parent: HashMap<usize, usize> = HashMap::new();
    let mut queue = VecDeque::from([from]);
    let mut seen = HashSet::from([from]);
    while let Some(v) = queue.pop_front() {
        if v == to {
            let mut p = vec![to];
            let mut cur = to;
            while cur != from {
                cur = parent[&cur];
                p.push(cur);
            }
            p.reverse();
            return Some(p);
        }
        for &w in &g.out[v] {
            if nodes.contains(&w) && g.kinds(v, w) & allowed != 0 && seen.insert(w) {
                parent.insert(w, v);
                queue.push_back(w);
            }
        }
    }
    None
}

/// A cycle in `comp` over `allowed` edges, if any.
fn any_cycle(g: &Graph, comp: &[usize], allowed: u8) -> Option<Vec<usize>> {
    for sub in sccs(g, comp, allowed) {
        let set: HashSet<usize> = sub.iter().copied().collect();
        let a = sub[0];
        for &b in &g.out[a] {
            if set.contains(&b) && g.kinds(a, b) & allowed != 0 {
                if let Some(mut p) = path(g, &set, b, a, allowed) {
                    p.insert(0, a);
                    return Some(p);
                }
            }
        }
    }
    None
}

/// A cycle with exactly one rw edge (the rest from `rest`).
fn single_rw_cycle(g: &Graph, comp: &[usize], rest: u8) -> Option<Vec<usize>> {
    let set: HashSet<usize> = comp.iter().copied().collect();
    for &a in comp {
        for &b in &g.out[a] {
            if set.contains(&b) && g.kinds(a, b) & RW != 0 {
                if let Some(mut p) = path(g, &set, b, a, rest) {
                    p.insert(0, a);
                    return Some(p);
                }
            }
        }
    }
    None
}

pub fn check_append(ops: &[Op]) -> Verdict {
    let started = Instant::now();
    let mut txns: Vec<Txn> = Vec::new();
    let mut anomalies: Vec<Value> = Vec::new();
    for (i, op) in ops.iter().enumerate().filter(|(_, o)| o.f == "txn") {
        let source = if op.outcome == Outcome::Ok { &op.result } else { &op.value };
        match parse_mops(source) {
            Some(mops) => txns.push(Txn { op: i, outcome: op.outcome, mops, invoke: op.invoke, complete: op.complete }),
            None => anomalies.push(json!({"type": "malformed", "op": op})),
        }
    }
    let describe = |t: usize| -> Value { serde_json::to_value(&ops[txns[t].op]).unwrap_or(Value::Null) };

    // Who appended what.
    let mut writer: HashMap<(String, i64), usize> = HashMap::new();
    for (t, txn) in txns.iter().enumerate() {
        for m in &txn.mops {
            if let Mop::Append(k, v) = m {
                if writer.insert((k.clone(), *v), t).is_some() {
                    anomalies
                        .push(json!({"type": "malformed", "reason": "value appended twice", "key": k, "value": v}));
                }
            }
        }
    }

    // Per-key version order from the longest read; check reads against it.
    let mut longest: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for txn in txns.iter().filter(|t| t.outcome == Outcome::Ok) {
        for m in &txn.mops {
            if let Mop::Read(k, Some(list)) = m {
                let cur = longest.entry(k.clone()).or_default();
                if list.len() > cur.len() {
                    *cur = list.clone();
                }
            }
        }
    }
    let mut observed: HashSet<usize> = HashSet::new();
    for (t, txn) in txns.iter().enumerate().filter(|(_, t)| t.outcome == Outcome::Ok) {
        // Own appends since the txn started, per key, to check internal reads.
        let mut own: HashMap<&str, Vec<i64>> = HashMap::new();
        let mut seen_read: HashMap<&str, Vec<i64>> = HashMap::new();
        for m in &txn.mops {
            match m {
                Mop::Append(k, v) => {
                    own.entry(k).or_default().push(*v);
                    if let Some(r) = seen_read.get_mut(k.as_str()) {
                        r.push(*v);
                    }
                }
                Mop::Read(k, Some(list)) => {
                    if let Some(expect) = seen_read.get(k.as_str()) {
                        if expect != list {
                            anomalies.push(json!({"type": "internal", "key": k, "expected": expect, "read": list, "txn": describe(t)}));
                        }
                    } else if let Some(mine) = own.get(k.as_str()) {
                        if !list.ends_with(mine) {
                            anomalies.push(json!({"type": "internal", "key": k, "own_appends": mine, "read": list, "txn": describe(t)}));
                        }
                    }
                    seen_read.insert(k, list.clone());
                    let mut uniq = HashSet::new();
                    if let Some(d) = list.iter().find(|v| !uniq.insert(**v)) {
                        anomalies.push(json!({"type": "duplicate-elements", "key": k, "value": d, "read": list, "txn": describe(t)}));
                    }
                    let full = &longest[k];
                    if !full.starts_with(list) {
                        anomalies.push(json!({"type": "incompatible-order", "key": k, "read": list, "longest": full, "txn": describe(t)}));
                    }
                    for v in list {
                        match writer.get(&(k.clone(), *v)) {
                            None => anomalies.push(json!({"type": "garbage", "key": k, "value": v, "txn": describe(t)})),
                            Some(&w) if txns[w].outcome == Outcome::Fail => anomalies.push(
                                json!({"type": "G1a", "key": k, "value": v, "reader": describe(t), "aborted_writer": describe(w)}),
                            ),
                            Some(&w) => {
                                observed.insert(w);
                            }
                        }
                    }
                    // G1b: the last element read is not the writer's final
                    // append to this key.
                    if let Some(last) = list.last() {
                        if let Some(&w) = writer.get(&(k.clone(), *last)) {
                            if w != t {
                                let theirs: Vec<i64> = txns[w]
                                    .mops
                                    .iter()
                                    .filter_map(|m| match m {
                                        Mop::Append(wk, wv) if wk == k => Some(*wv),
                                        _ => None,
                                    })
                                    .collect();
                                if theirs.last() != Some(last) {
                                    anomalies.push(json!({"type": "G1b", "key": k, "read": list, "reader": describe(t), "writer": describe(w)}));
                                }
                            }
                        }
                    }
                }
                Mop::Read(_, None) => {}
            }
        }
    }

    // Lost update: two committed txns read the same version of a key and
    // both appended to it.
    let mut read_then_append: HashMap<(String, usize), Vec<usize>> = HashMap::new();
    for (t, txn) in txns.iter().enumerate().filter(|(_, t)| t.outcome == Outcome::Ok) {
        let mut read_len: HashMap<&str, usize> = HashMap::new();
        for m in &txn.mops {
            match m {
                Mop::Read(k, Some(l)) => {
                    read_len.entry(k).or_insert(l.len());
                }
                Mop::Append(k, _) => {
                    if let Some(&len) = read_len.get(k.as_str()) {
                        let e = read_then_append.entry((k.clone(), len)).or_default();
                        if !e.contains(&t) {
                            e.push(t);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    for ((k, len), ts) in &read_then_append {
        if ts.len() > 1 {
            anomalies.push(json!({"type": "lost-update", "key": k, "version_length": len, "txns": ts.iter().map(|&t| describe(t)).collect::<Vec<_>>()}));
        }
    }

    // The dependency graph over committed txns (ok, or unknown but seen).
    let nodes: Vec<usize> = (0..txns.len())
        .filter(|&t| txns[t].outcome == Outcome::Ok || (txns[t].outcome == Outcome::Info && observed.contains(&t)))
        .collect();
    let mut g = Graph::new(txns.len());
    for (k, order) in &longest {
        for w in order.windows(2) {
            if let (Some(&a), Some(&b)) = (writer.get(&(k.clone(), w[0])), writer.get(&(k.clone(), w[1]))) {
                g.add(a, b, WW, Some(k));
            }
        }
    }
    for (t, txn) in txns.iter().enumerate().filter(|(_, t)| t.outcome == Outcome::Ok) {
        let mut own_keys: HashSet<&str> = HashSet::new();
        for m in &txn.mops {
            match m {
                Mop::Append(k, _) => {
                    own_keys.insert(k);
                }
                Mop::Read(k, Some(list)) => {
                    // Reads after the txn's own append say nothing about
                    // other txns' order beyond what ww gives.
                    if own_keys.contains(k.as_str()) {
                        continue;
                    }
                    if let Some(&w) = list.last().and_then(|last| writer.get(&(k.clone(), *last))) {
                        g.add(w, t, WR, Some(k));
                    }
                    if let Some(next) = longest.get(k).and_then(|full| full.get(list.len())) {
                        if let Some(&w) = writer.get(&(k.clone(), *next)) {
                            g.add(t, w, RW, Some(k));
                        }
                    }
                }
                Mop::Read(_, None) => {}
            }
        }
    }
    // Real-time edges, transitively reduced with a frontier of completed
    // txns not yet known to precede another completed txn.
    let mut events: Vec<(u64, u8, usize)> = Vec::new();
    for &t in &nodes {
        events.push((txns[t].invoke, 0, t));
        if txns[t].outcome == Outcome::Ok {
            events.push((txns[t].complete, 1, t));
        }
    }
    events.sort_unstable();
    let mut frontier: Vec<usize> = Vec::new();
    let mut preds: HashMap<usize, HashSet<usize>> = HashMap::new();
    for (_, kind, t) in events {
        if kind == 0 {
            for &f in &frontier {
                g.add(f, t, RT, None);
            }
            preds.insert(t, frontier.iter().copied().collect());
        } else {
            let before = preds.remove(&t).unwrap_or_default();
            frontier.retain(|f| !before.contains(f));
            frontier.push(t);
        }
    }

    // Cycles, named by the weakest edges they need.
    let explain = |cycle: &[usize]| -> Vec<Value> {
        cycle
            .windows(2)
            .map(|w| {
                let (kinds, key) = g.edges.get(&(w[0], w[1])).cloned().unwrap_or((0, None));
                let names: Vec<&str> = [WW, WR, RW, RT].into_iter().filter(|b| kinds & b != 0).map(edge_name).collect();
                json!({"from": describe(w[0]), "edge": names, "key": key, "to": describe(w[1])})
            })
            .collect()
    };
    let mut cycles = 0;
    for comp in sccs(&g, &nodes, WW | WR | RW | RT) {
        let found = [
            ("G0", any_cycle(&g, &comp, WW)),
            ("G1c", any_cycle(&g, &comp, WW | WR)),
            ("G-single", single_rw_cycle(&g, &comp, WW | WR)),
            ("G2-item", any_cycle(&g, &comp, WW | WR | RW)),
            ("G0-realtime", any_cycle(&g, &comp, WW | RT)),
            ("G1c-realtime", any_cycle(&g, &comp, WW | WR | RT)),
            ("G-single-realtime", single_rw_cycle(&g, &comp, WW | WR | RT)),
            ("G2-item-realtime", any_cycle(&g, &comp, WW | WR | RW | RT)),
        ]
        .into_iter()
        .find_map(|(name, c)| c.map(|c| (name, c)));
        if let Some((name, cycle)) = found {
            cycles += 1;
            let mut a = json!({"type": name, "txns_in_component": comp.len(), "cycle": explain(&cycle)});
            if name.ends_with("-realtime") {
                a["note"] = json!("serializable but not strictly serializable: a stale read or a lost real-time order");
            }
            anomalies.push(a);
        }
        if cycles >= 8 {
            break;
        }
    }
    let mut v = Verdict::new("strict-serializable-append", txns.len(), anomalies, started);
    v.measured = json!({"graph_nodes": nodes.len(), "graph_edges": g.edges.len(), "keys": longest.len()});
    v
}
