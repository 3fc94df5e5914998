//! Auth and TLS, black-box: a read-only user is confined to its prefix
//! on every path (writes, watches, txn compares), credentials are checked
//! on every member, peer links refuse certificates from a foreign CA,
//! revocation lists are read for each client, and auto TLS keeps to the
//! configured cipher suites.

use std::process::Command;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Permission, Txn, TxnOp, WatchOptions};
use keel_tests::{etcd_bin, Cluster, ClusterOptions};

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

    // A simple token naming a log index the cluster has not reached is
    // refused at once, not held until the member gives up waiting for it
    // (5 s): a request allowed 2 s gets etcd's error, not a deadline.
    let forged = "abcdefghijklmnop.999999999";
    for url in &urls {
        assert_eq!(
            put_with_token_within(url, forged, std::time::Duration::from_secs(2)).await?,
            Err("etcdserver: invalid auth token".to_string())
        );
    }
    Ok(())
}

struct Pki {
    dir: tempfile::TempDir,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    /// A CA and a certificate it signed for `cn` (serial 1), valid for
    /// 127.0.0.1.
    fn new(cn: &str) -> anyhow::Result<Pki> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir()?;
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, format!("{cn} CA"));
        std::fs::write(dir.path().join("ca.pem"), ca.self_signed(&ca_key)?.pem())?;
        let pki = Pki { dir, issuer: Issuer::new(ca, ca_key) };
        pki.issue("", cn, 1)?;
        Ok(pki)
    }

    /// Writes `<name>cert.pem` and `<name>key.pem`: a certificate for `cn`
    /// with serial number `serial`.
    fn issue(&self, name: &str, cn: &str, serial: u64) -> anyhow::Result<()> {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
        let key = KeyPair::generate()?;
        let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
        leaf.distinguished_name.push(DnType::CommonName, cn);
        leaf.serial_number = Some(serial.into());
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        std::fs::write(self.dir.path().join(format!("{name}cert.pem")), leaf.signed_by(&key, &self.issuer)?.pem())?;
        std::fs::write(self.dir.path().join(format!("{name}key.pem")), key.serialize_pem())?;
        Ok(())
    }

    /// Writes `crl.pem`: the CA's revocation list naming `serials`.
    fn revoke(&self, serials: &[u64], crl_number: u64) -> anyhow::Result<()> {
        use rcgen::{date_time_ymd, CertificateRevocationListParams, KeyIdMethod, RevokedCertParams};
        let params = CertificateRevocationListParams {
            this_update: date_time_ymd(2020, 1, 1),
            next_update: date_time_ymd(2090, 1, 1),
            crl_number: crl_number.into(),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|&s| RevokedCertParams {
                    serial_number: s.into(),
                    revocation_time: date_time_ymd(2021, 1, 1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        std::fs::write(self.dir.path().join("crl.pem"), params.signed_by(&self.issuer)?.pem()?)?;
        Ok(())
    }

    fn file(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// One member whose peer port serves this PKI's certificate and
    /// requires client certificates signed by its CA, plus `extra` flags.
    fn peer_tls_member(&self, extra: &[&str]) -> anyhow::Result<Cluster> {
        let (cert, key, ca) = (self.file("cert.pem"), self.file("key.pem"), self.file("ca.pem"));
        let opts = ClusterOptions::keel(1)
            .args(&["--peer-cert-file", &cert, "--peer-key-file", &key, "--peer-trusted-ca-file", &ca])
            .args(&["--peer-client-cert-auth"])
            .args(extra);
        Cluster::start_with(ClusterOptions { peer_tls: true, ..opts })
    }
}

/// Whether a TLS client presenting `client`'s `<name>cert.pem` completes
/// a request to `url` (curl exits 0 on any HTTP answer, non-zero when the
/// handshake fails).
fn handshake_accepted(url: &str, server_ca: &Pki, client: &Pki, name: &str) -> anyhow::Result<bool> {
    let status = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "--max-time", "10", "--cacert", &server_ca.file("ca.pem")])
        .args(["--cert", &client.file(&format!("{name}cert.pem")), "--key", &client.file(&format!("{name}key.pem"))])
        .arg(url)
        .status()?;
    Ok(status.success())
}

#[tokio::test(flavor = "multi_thread")]
async fn peer_links_refuse_certificates_from_a_foreign_ca() -> anyhow::Result<()> {
    let cluster_pki = Pki::new("m0")?;
    let foreign = Pki::new("intruder")?;
    let mut c = cluster_pki.peer_tls_member(&[])?;
    let peer_url = c.members[0].peer_url.clone();
    assert!(
        handshake_accepted(&peer_url, &cluster_pki, &cluster_pki, "")?,
        "the cluster's own certificate must be accepted"
    );
    assert!(
        !handshake_accepted(&peer_url, &cluster_pki, &foreign, "")?,
        "a certificate from another CA must be refused"
    );
    // The member keeps serving.
    c.etcdctl(&["put", "k", "v"])?;
    c.stop(0)?;
    Ok(())
}

/// etcd reads the revocation list again for every client: revoking a
/// certificate takes effect for the next connection, without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn revoking_a_certificate_takes_effect_without_a_restart() -> anyhow::Result<()> {
    let pki = Pki::new("m0")?;
    pki.issue("other-", "other", 2)?;
    pki.revoke(&[], 1)?;
    let mut c = pki.peer_tls_member(&["--peer-crl-file", &pki.file("crl.pem")])?;
    let peer_url = c.members[0].peer_url.clone();
    assert!(handshake_accepted(&peer_url, &pki, &pki, "other-")?, "nothing is revoked yet");

    pki.revoke(&[2], 2)?;
    assert!(!handshake_accepted(&peer_url, &pki, &pki, "other-")?, "serial 2 is revoked now");
    assert!(handshake_accepted(&peer_url, &pki, &pki, "")?, "serial 1 is not revoked");

    std::fs::write(pki.file("crl.pem"), "not a revocation list")?;
    assert!(!handshake_accepted(&peer_url, &pki, &pki, "")?, "an unreadable list refuses clients, as in etcd");
    pki.revoke(&[], 3)?;
    assert!(handshake_accepted(&peer_url, &pki, &pki, "other-")?, "serial 2 is no longer revoked");
    c.etcdctl(&["put", "k", "v"])?;
    c.stop(0)?;
    Ok(())
}

/// `--cipher-suites` and `--tls-max-version` hold for auto TLS too: a
/// client offering only a suite outside the list gets no handshake.
#[tokio::test(flavor = "multi_thread")]
async fn auto_tls_honours_the_cipher_suite_list() -> anyhow::Result<()> {
    let opts = ClusterOptions::keel(1).args(&[
        "--peer-auto-tls",
        "--cipher-suites",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        "--tls-max-version",
        "TLS1.2",
    ]);
    let mut c = Cluster::start_with(ClusterOptions { peer_tls: true, ..opts })?;
    let peer_url = c.members[0].peer_url.clone();
    let handshake = |cipher: &str| -> anyhow::Result<bool> {
        let status = Command::new("curl")
            .args(["-sSk", "-o", "/dev/null", "--max-time", "10", "--tls-max", "1.2", "--ciphers", cipher])
            .arg(&peer_url)
            .status()?;
        Ok(status.success())
    };
    assert!(handshake("ECDHE-ECDSA-AES128-GCM-SHA256")?, "the listed suite is served");
    assert!(!handshake("ECDHE-ECDSA-AES256-GCM-SHA384")?, "a suite outside the list is refused");
    c.etcdctl(&["put", "k", "v"])?;
    c.stop(0)?;
    Ok(())
}

/// A put carrying `token`, answered with the status message on refusal.
async fn put_with_token(url: &str, token: &str) -> anyhow::Result<Result<(), String>> {
    put_with_token_within(url, token, std::time::Duration::from_secs(30)).await
}

/// [`put_with_token`] with a gRPC deadline.
async fn put_with_token_within(
    url: &str,
    token: &str,
    deadline: std::time::Duration,
) -> anyhow::Result<Result<(), String>> {
    use keel_proto::etcdserverpb::{kv_client::KvClient, PutRequest};
    let mut kv = KvClient::connect(url.to_string()).await?;
    let mut req = tonic::Request::new(PutRequest { key: "k".into(), value: "v".into(), ..Default::default() });
    req.metadata_mut().insert("token", token.parse()?);
    match tokio::time::timeout(deadline, kv.put(req)).await {
        Ok(answer) => Ok(answer.map(|_| ()).map_err(|s| s.message().to_string())),
        Err(_) => Ok(Err(format!("no answer within {deadline:?}"))),
    }
}

/// ES512 JWTs (P-521) are exchangeable with etcd's: a token real etcd
/// 3.4 signed is accepted by keel holding the same key, and the other way
/// round.
#[tokio::test(flavor = "multi_thread")]
async fn es512_tokens_are_interchangeable_with_etcds() -> anyhow::Result<()> {
    use p521::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let etcd = etcd_bin().ok_or_else(|| anyhow::anyhow!("real etcd not found at /usr/bin/etcd: run `make deps`"))?;
    let dir = tempfile::tempdir()?;
    let secret = p521::SecretKey::random(&mut p521::elliptic_curve::rand_core::OsRng);
    let private = dir.path().join("es512.key");
    std::fs::write(&private, secret.to_pkcs8_pem(LineEnding::LF)?.as_bytes())?;
    let public = dir.path().join("es512.pub");
    std::fs::write(&public, secret.public_key().to_public_key_pem(LineEnding::LF)?)?;
    let flag = format!("jwt,sign-method=ES512,priv-key={},pub-key={},ttl=10m", private.display(), public.display());
    let opts = ClusterOptions::keel(1).args(&["--auth-token", &flag]);
    let keel = Cluster::start_with(opts.clone())?;
    let reference = Cluster::start_with(ClusterOptions { binary: etcd, ..opts })?;
    let mut tokens = Vec::new();
    for c in [&keel, &reference] {
        // The same steps give both the same auth revision, which tokens carry.
        for args in [&["user", "add", "root:pw"][..], &["user", "grant-role", "root", "root"], &["auth", "enable"]] {
            c.etcdctl(args)?;
        }
        let client = Client::connect([c.members[0].client_url.as_str()], None).await?;
        tokens.push(client.auth_client().authenticate("root".into(), "pw".into()).await?.token().to_string());
    }
    let (keel_token, etcd_token) = (&tokens[0], &tokens[1]);
    assert!(keel_token.starts_with("eyJhbGciOiJFUzUxMiIs"), "an ES512 header: {keel_token}");
    assert_eq!(put_with_token(&keel.members[0].client_url, etcd_token).await?, Ok(()));
    assert_eq!(put_with_token(&reference.members[0].client_url, keel_token).await?, Ok(()));
    let mut forged = keel_token.clone();
    forged.truncate(forged.len() - 4);
    forged.push_str("AAAA");
    assert_eq!(
        put_with_token(&keel.members[0].client_url, &forged).await?,
        Err("etcdserver: invalid auth token".to_string())
    );
    Ok(())
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &std::path::Path, needle: &[u8]) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            found.extend(files_containing(&path, needle)?);
        } else if std::fs::read(&path)?.windows(needle.len()).any(|w| w == needle) {
            found.push(path);
        }
    }
    Ok(found)
}

/// Passwords are bcrypt-hashed before they are proposed: neither the Raft
/// log, the store nor the member's log ever holds one in plain text.
#[tokio::test(flavor = "multi_thread")]
async fn passwords_never_reach_the_disk_or_the_log() -> anyhow::Result<()> {
    let mut c = Cluster::start_with(ClusterOptions::keel(1).args(&["--log-level", "debug"]))?;
    let (first, second) = ("first-6f1d2c9a-pw", "second-83be07d4-pw");
    c.etcdctl(&["user", "add", &format!("root:{first}")])?;
    c.etcdctl(&["user", "grant-role", "root", "root"])?;
    c.etcdctl(&["auth", "enable"])?;
    let root = format!("root:{first}");
    let passwd = c.etcdctl_at(
        &[0],
        &["--user", &root, "user", "passwd", "root", "--interactive=false"],
        Some(&format!("{second}\n")),
    )?;
    assert!(passwd.status.success(), "{}", String::from_utf8_lossy(&passwd.stderr));
    let visible = "value-5a1c93e0-visible";
    c.etcdctl(&["--user", &format!("root:{second}"), "put", "k", visible])?;
    let data_dir = c.members[0].data_dir.clone();
    c.stop(0)?;
    // The scan finds what is stored in plain text...
    assert!(!files_containing(&data_dir, visible.as_bytes())?.is_empty());
    // ...and no password.
    for password in [first, second] {
        assert_eq!(files_containing(&data_dir, password.as_bytes())?, Vec::<std::path::PathBuf>::new());
        assert!(!c.log(0).contains(password), "the member's log holds {password}");
    }
    Ok(())
}
