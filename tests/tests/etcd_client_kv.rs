//! The independent `etcd-client` Rust crate against keel: KV calls, txns,
//! compaction and the error messages clients match on.

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
};
use keel_tests::Cluster;

#[tokio::test(flavor = "multi_thread")]
async fn kv_txn_compaction_and_errors() -> anyhow::Result<()> {
    let c = Cluster::start(1)?;
    let mut client = Client::connect([c.members[0].client_url.as_str()], None).await?;

    let put = client.put("k1", "v1", Some(PutOptions::new().with_prev_key())).await?;
    assert!(put.prev_key().is_none());
    let put = client.put("k1", "v2", Some(PutOptions::new().with_prev_key())).await?;
    assert_eq!(put.prev_key().map(|kv| kv.value()), Some(b"v1".as_slice()));
    client.put("k2", "a", None).await?;
    client.put("k3", "b", None).await?;

    let desc = client
        .get("k", Some(GetOptions::new().with_prefix().with_sort(SortTarget::Key, SortOrder::Descend).with_limit(2)))
        .await?;
    let keys: Vec<&str> = desc.kvs().iter().map(|kv| kv.key_str().unwrap_or("")).collect();
    assert_eq!(keys, vec!["k3", "k2"]);
    assert!(desc.more());
    assert_eq!(desc.count(), 3);

    // A txn is one revision whatever it does.
    let before = client.get("k1", None).await?.header().map(|h| h.revision()).unwrap_or(0);
    let txn = Txn::new()
        .when([Compare::version("k1", CompareOp::Equal, 2)])
        .and_then([TxnOp::put("k4", "x", None), TxnOp::delete("k2", None), TxnOp::get("k1", None)])
        .or_else([TxnOp::put("never", "x", None)]);
    let resp = client.txn(txn).await?;
    assert!(resp.succeeded());
    assert_eq!(resp.header().map(|h| h.revision()), Some(before + 1));
    assert!(client.get("never", None).await?.kvs().is_empty());

    // A read-only txn does not bump the revision.
    let ro = client.txn(Txn::new().and_then([TxnOp::get("k1", None)])).await?;
    assert_eq!(ro.header().map(|h| h.revision()), Some(before + 1));

    let deleted = client.delete("k", Some(DeleteOptions::new().with_prefix().with_prev_key())).await?;
    assert_eq!(deleted.deleted(), 3);
    assert_eq!(deleted.prev_kvs().len(), 3);

    client.compact(before + 1, None).await?;
    let err = client.get("k1", Some(GetOptions::new().with_revision(before))).await.err().map(|e| e.to_string());
    assert!(err.as_deref().unwrap_or("").contains("etcdserver: mvcc: required revision has been compacted"), "{err:?}");

    let dup = client.txn(Txn::new().and_then([TxnOp::put("d", "1", None), TxnOp::put("d", "2", None)])).await;
    assert!(dup.err().map(|e| e.to_string()).unwrap_or_default().contains("duplicate key given in txn request"));

    let many: Vec<TxnOp> = (0..129).map(|i| TxnOp::put(format!("m{i}"), "x", None)).collect();
    let too_many = client.txn(Txn::new().and_then(many)).await;
    assert!(too_many.err().map(|e| e.to_string()).unwrap_or_default().contains("too many operations in txn request"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_request_gets_etcds_error() -> anyhow::Result<()> {
    let c = Cluster::start(1)?;
    let mut client = Client::connect([c.members[0].client_url.as_str()], None).await?;
    // Above --max-request-bytes (1.5 MiB) but within the gRPC limit.
    let big = vec![b'x'; 1_700_000];
    let err = client.put("big", big, None).await.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("etcdserver: request is too large"), "{err}");
    client.put("small", "ok", None).await?;
    Ok(())
}
