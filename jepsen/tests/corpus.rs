//! Every checker must reach the verdict each corpus history's name states:
//! the valid histories pass and each anomaly is found and named.

use std::path::Path;

#[test]
fn corpus_verdicts_match_names() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let results = keel_jepsen::corpus::check_corpus(&dir).expect("corpus readable");
    assert!(results.len() >= 20, "corpus has {} histories", results.len());
    let wrong: Vec<String> = results
        .iter()
        .filter(|r| !r.ok)
        .map(|r| format!("{}: expected {}, got {:?} {:?}", r.name, r.expected, r.got, r.anomalies))
        .collect();
    assert!(wrong.is_empty(), "unexpected verdicts:\n{}", wrong.join("\n"));
    // Both kinds are present for every workload.
    for w in keel_jepsen::workload::Workload::ALL {
        let mine: Vec<_> = results.iter().filter(|r| r.name.starts_with(&format!("{}--", w.name()))).collect();
        assert!(mine.iter().any(|r| r.expected == "valid"), "{} has no valid history", w.name());
        assert!(mine.iter().any(|r| r.expected.starts_with("anomaly-")), "{} has no anomaly", w.name());
    }
}
