//! Auth and TLS, black-box: a read-only user is confined to its prefix
//! on every path (writes, watches, txn compares), credentials are checked
//! on every member, and peer links refuse certificates from a foreign CA.

use std::process::Command;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Permission, Txn, TxnOp, WatchOptions};
use keel_tests::{Cluster, ClusterOptions};

fn status_message(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
        other => other.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_user_stays_inside_its_prefix() -> anyhow::Result<()> {
    let c = Cluster::start(3)?;
    let urls: Vec<&str> = c.members.iter().map(|m| m.client_url.as_str()).collect();
    let mut admin = Client::connect([urls[0]], None).await?;
    admin.put("app/config", "v1", None).await?;
    admin.put("secret/token", "hunter2", None).await?;
    admin.user_add("root", "rootpw", None).await?;
    admin.user_grant_role("root", "root").await?;
    admin.role_add("app-reader").await?;
    admin.role_grant_permission("app-reader", Permission::read("app/").with_prefix()).await?;
    admin.user_add("reader", "readerpw", None).await?;
    admin.user_grant_role("reader", "app-reader").await?;
    admin.auth_enable().await?;

    // Anonymous requests and bad passwords are refused with etcd's errors.
    let anonymous = admin.get("app/config", None).await.err().map(|e| status_message(&e)).unwrap_or_default();
    assert_eq!(anonymous, "InvalidArgument: etcdserver: user name is empty");
    let compact = admin.compact(2, None).await.err().map(|e| status_message(&e)).unwrap_or_default();
    assert_eq!(compact, "InvalidArgument: etcdserver: user name is empty", "anonymous clients cannot compact");
    let bad = Client::connect([urls[1]], Some(ConnectOptions::new().with_user("reader", "wrong"))).await;
    let bad = bad.err().map(|e| status_message(&e)).unwrap_or_default();
    assert!(bad.contains("etcdserver: authentication failed, invalid user ID or password"), "{bad}");

    // The reader logs in through a follower and reads its prefix anywhere.
    let mut reader =
        Client::connect([urls[1], urls[2]], Some(ConnectOptions::new().with_user("reader", "readerpw"))).await?;
    let got = reader.get("app/config", None).await?;
    assert_eq!(got.kvs().first().map(|kv| kv.value()), Some(b"v1".as_slice()));
    let listed = reader.get("app/", Some(GetOptions::new().with_prefix())).await?;
    assert_eq!(listed.kvs().len(), 1);

    // It cannot write there, read elsewhere, or list past its prefix.
    let denied = "PermissionDenied: etcdserver: permission denied";
    let put = reader.put("app/config", "v2", None).await.err().map(|e| status_message(&e));
    assert_eq!(put.as_deref(), Some(denied));
    let get = reader.get("secret/token", None).await.err().map(|e| status_message(&e));
    assert_eq!(get.as_deref(), Some(denied));
    let all = reader.get("", Some(GetOptions::new().with_all_keys())).await.err().map(|e| status_message(&e));
    assert_eq!(all.as_deref(), Some(denied));

    // A txn cannot test another key's value, even without touching it.
    let probe = Txn::new()
        .when([Compare::value("secret/token", CompareOp::Equal, "hunter2")])
        .and_then([TxnOp::get("app/config", None)]);
    let txn = reader.txn(probe).await.err().map(|e| status_message(&e));
    assert_eq!(txn.as_deref(), Some(denied));

    // Watching outside the prefix is refused at creation; inside works.
    let mut outside = reader.watch("secret/", Some(WatchOptions::new().with_prefix())).await?;
    let refused = outside.message().await?.ok_or_else(|| anyhow::anyhow!("watch stream ended"))?;
    assert!(refused.canceled(), "a watch outside the prefix must be canceled");
    assert!(refused.cancel_reason().contains("etcdserver: permission denied"), "{}", refused.cancel_reason());
    let mut inside = reader.watch("app/", Some(WatchOptions::new().with_prefix())).await?;
    let mut root = Client::connect([urls[0]], Some(ConnectOptions::new().with_user("root", "rootpw"))).await?;
    root.put("secret/token", "rotated", None).await?;
    root.put("app/config", "v3", None).await?;
    loop {
        let resp = inside.message().await?.ok_or_else(|| anyhow::anyhow!("watch stream ended"))?;
        assert!(!resp.canceled());
        if let Some(ev) = resp.events().first() {
            assert_eq!(ev.kv().map(|kv| kv.key()), Some(b"app/config".as_slice()));
            break;
        }
    }

    // Revoking the role takes effect at once, on every member.
    root.role_revoke_permission(
        "app-reader",
        "app/",
        Some(etcd_client::RoleRevokePermissionOptions::new().with_prefix()),
    )
    .await?;
    let after = reader.get("app/config", None).await.err().map(|e| status_message(&e));
    assert_eq!(after.as_deref(), Some(denied));
    // Only root administers.
    let admin_op = reader.user_list().await.err().map(|e| status_message(&e));
    assert_eq!(admin_op.as_deref(), Some(denied));
    Ok(())
}

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// A CA and a certificate it signed for `cn`, valid for 127.0.0.1.
    fn new(cn: &str) -> anyhow::Result<Pki> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir()?;
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, format!("{cn} CA"));
        std::fs::write(dir.path().join("ca.pem"), ca.self_signed(&ca_key)?.pem())?;
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate()?;
        let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
        leaf.distinguished_name.push(DnType::CommonName, cn);
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        std::fs::write(dir.path().join("cert.pem"), leaf.signed_by(&key, &issuer)?.pem())?;
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem())?;
        Ok(Pki { dir })
    }

    fn file(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

/// Whether a TLS client presenting `client` completes a request to `url`
/// (curl exits 0 on any HTTP answer, non-zero when the handshake fails).
fn handshake_accepted(url: &str, server_ca: &Pki, client: &Pki) -> anyhow::Result<bool> {
    let status = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "--max-time", "10", "--cacert", &server_ca.file("ca.pem")])
        .args(["--cert", &client.file("cert.pem"), "--key", &client.file("key.pem"), url])
        .status()?;
    Ok(status.success())
}

#[tokio::test(flavor = "multi_thread")]
async fn peer_links_refuse_certificates_from_a_foreign_ca() -> anyhow::Result<()> {
    let cluster_pki = Pki::new("m0")?;
    let foreign = Pki::new("intruder")?;
    let opts = ClusterOptions::keel(1).args(&[
        "--peer-cert-file",
        &cluster_pki.file("cert.pem"),
        "--peer-key-file",
        &cluster_pki.file("key.pem"),
        "--peer-trusted-ca-file",
        &cluster_pki.file("ca.pem"),
        "--peer-client-cert-auth",
    ]);
    let mut c = Cluster::start_with(ClusterOptions { peer_tls: true, ..opts })?;
    let peer_url = c.members[0].peer_url.clone();
    assert!(
        handshake_accepted(&peer_url, &cluster_pki, &cluster_pki)?,
        "the cluster's own certificate must be accepted"
    );
    assert!(!handshake_accepted(&peer_url, &cluster_pki, &foreign)?, "a certificate from another CA must be refused");
    // The member keeps serving.
    c.etcdctl(&["put", "k", "v"])?;
    c.stop(0)?;
    Ok(())
}
