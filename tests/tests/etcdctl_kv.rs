//! The real etcdctl (Debian etcd-client 3.4) against a single keel member:
//! the commands a new user types, with etcd's output formats and errors.

use keel_tests::Cluster;

#[test]
fn put_get_delete_with_revisions() -> anyhow::Result<()> {
    let c = Cluster::start(1)?;
    assert_eq!(c.etcdctl(&["put", "foo", "bar"])?, "OK\n");
    assert_eq!(c.etcdctl(&["get", "foo"])?, "foo\nbar\n");
    let json = c.etcdctl(&["get", "foo", "-w", "json"])?;
    // A new store is at revision 1; the first write makes it 2.
    assert!(json.contains(r#""revision":2"#), "{json}");
    assert!(json.contains(r#""create_revision":2,"mod_revision":2,"version":1"#), "{json}");
    c.etcdctl(&["put", "foo", "baz"])?;
    let json = c.etcdctl(&["get", "foo", "-w", "json"])?;
    assert!(json.contains(r#""create_revision":2,"mod_revision":3,"version":2"#), "{json}");
    assert_eq!(c.etcdctl(&["get", "foo", "--rev", "2"])?, "foo\nbar\n");
    assert_eq!(c.etcdctl(&["del", "foo"])?, "1\n");
    assert_eq!(c.etcdctl(&["get", "foo"])?, "");
    assert_eq!(c.etcdctl(&["del", "foo"])?, "0\n");
    // Re-creating a deleted key starts a new generation at version 1.
    c.etcdctl(&["put", "foo", "again"])?;
    let json = c.etcdctl(&["get", "foo", "-w", "json"])?;
    assert!(json.contains(r#""create_revision":5,"mod_revision":5,"version":1"#), "{json}");
    Ok(())
}

#[test]
fn prefix_limit_sort_and_count() -> anyhow::Result<()> {
    let c = Cluster::start(1)?;
    for (k, v) in [("a/1", "z"), ("a/2", "y"), ("a/3", "x"), ("b", "w")] {
        c.etcdctl(&["put", k, v])?;
    }
    assert_eq!(c.etcdctl(&["get", "a/", "--prefix", "--keys-only"])?, "a/1\n\na/2\n\na/3\n\n");
    let limited = c.etcdctl(&["get", "a/", "--prefix", "--limit", "2", "-w", "json"])?;
    assert!(limited.contains(r#""more":true,"count":3"#), "count ignores limit: {limited}");
    assert_eq!(
        c.etcdctl(&["get", "a/", "--prefix", "--sort-by", "VALUE", "--order", "ASCEND"])?,
        "a/3\nx\na/2\ny\na/1\nz\n"
    );
    let count = c.etcdctl(&["get", "a", "--from-key", "--limit", "1", "-w", "json"])?;
    assert!(count.contains(r#""more":true,"count":4"#), "{count}");
    Ok(())
}

#[test]
fn txn_and_compaction() -> anyhow::Result<()> {
    let c = Cluster::start(1)?;
    c.etcdctl(&["put", "k", "v1"])?;
    let out =
        c.etcdctl_at(&[0], &["txn"], Some("value(\"k\") = \"v1\"\n\nput k v2\nput other x\n\nput k failed\n\n"))?;
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "SUCCESS\n\nOK\n\nOK\n");
    // Both puts of the txn share one revision.
    let json = c.etcdctl(&["get", "other", "-w", "json"])?;
    assert!(json.contains(r#""mod_revision":3"#), "{json}");
    assert!(c.etcdctl(&["get", "k", "-w", "json"])?.contains(r#""mod_revision":3"#));

    assert_eq!(c.etcdctl(&["compaction", "3"])?, "compacted revision 3\n");
    let old = c.etcdctl_at(&[0], &["get", "k", "--rev", "2"], None)?;
    assert!(!old.status.success());
    assert!(String::from_utf8_lossy(&old.stderr).contains("etcdserver: mvcc: required revision has been compacted"));
    let again = c.etcdctl_at(&[0], &["compaction", "3"], None)?;
    assert!(String::from_utf8_lossy(&again.stderr).contains("required revision has been compacted"));
    let future = c.etcdctl_at(&[0], &["get", "k", "--rev", "99"], None)?;
    assert!(
        String::from_utf8_lossy(&future.stderr).contains("etcdserver: mvcc: required revision is a future revision")
    );
    Ok(())
}

#[test]
fn ignore_value_and_status() -> anyhow::Result<()> {
    let c = Cluster::start(1)?;
    let missing = c.etcdctl_at(&[0], &["put", "nokey", "--ignore-value"], None)?;
    assert!(String::from_utf8_lossy(&missing.stderr).contains("etcdserver: key not found"));
    c.etcdctl(&["put", "k", "v"])?;
    c.etcdctl(&["put", "k", "--ignore-value"])?;
    assert_eq!(c.etcdctl(&["get", "k", "--print-value-only"])?, "v\n");
    let lease = c.etcdctl_at(&[0], &["put", "k", "v", "--lease", "1234"], None)?;
    assert!(String::from_utf8_lossy(&lease.stderr).contains("etcdserver: requested lease not found"));

    // etcdctl dials each endpoint with its full URL as the HTTP/2 authority.
    let status = c.etcdctl(&["endpoint", "status", "-w", "json"])?;
    assert!(status.contains(r#""version":"3.4.23""#), "{status}");
    let members = c.etcdctl(&["member", "list"])?;
    assert!(members.contains(", started, m0, "), "{members}");
    Ok(())
}
