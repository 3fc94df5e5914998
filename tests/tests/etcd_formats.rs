//! No lock-in: keel's backups are etcd's bbolt databases and keel reads
//! etcd's. Round trips against real etcd 3.4 (Debian's), 3.6 and 3.7
//! (built by `make etcd-releases`; etcdutl restores from 3.5 on) with a
//! few thousand
//! revisions of history, a lease with keys, users and roles:
//! keel -> `etcdctl snapshot save` -> `etcdctl snapshot restore` -> etcd;
//! etcd -> `etcdctl snapshot restore` -> keel (converting etcd's data dir
//! in place); etcd -> `keel snapshot restore` -> keel. Every key,
//! revision, version, lease and auth record must be the same on the
//! other side, history included.

use std::path::{Path, PathBuf};

use etcd_client::{Client, ConnectOptions, GetOptions, LeaseGrantOptions, Permission, PutOptions};
use keel_tests::{etcd_bin, etcd_release, etcdctl_bin, Cluster, ClusterOptions};

const LEASE_ID: i64 = 0x1234;

/// The same writes on any etcd-compatible member.
async fn write_history(url: &str) -> anyhow::Result<()> {
    let mut c = Client::connect([url], None).await?;
    c.lease_grant(3600, Some(LeaseGrantOptions::new().with_id(LEASE_ID))).await?;
    for i in 0..3000u32 {
        let key = format!("key/{:04}", i % 2500);
        let opts = (i % 97 == 0).then(|| PutOptions::new().with_lease(LEASE_ID));
        c.put(key, format!("value-{i}"), opts).await?;
        if i % 50 == 49 {
            c.delete(format!("key/{:04}", (i * 7) % 2500), None).await?;
        }
    }
    c.user_add("alice", "alicepw", None).await?;
    c.role_add("reader").await?;
    c.role_grant_permission("reader", Permission::read("key/").with_prefix()).await?;
    c.user_grant_role("alice", "reader").await?;
    c.user_add("root", "rootpw", None).await?;
    c.user_grant_role("root", "root").await?;
    c.auth_enable().await?;
    Ok(())
}

async fn as_root(url: &str) -> anyhow::Result<Client> {
    Ok(Client::connect([url], Some(ConnectOptions::new().with_user("root", "rootpw"))).await?)
}

/// Everything a client can observe of the data: the latest keys with
/// their revisions, the keys as of an older revision, the lease and its
/// keys, users and roles.
async fn observe(url: &str) -> anyhow::Result<Vec<String>> {
    let mut c = as_root(url).await?;
    let mut seen = Vec::new();
    // Anonymous clients are refused: the auth state came along.
    let anonymous = Client::connect([url], None).await?.get("key/0001", None).await;
    seen.push(format!("anonymous read refused {}", anonymous.is_err()));
    for rev in [0, 1800] {
        let resp = c.get("", Some(GetOptions::new().with_all_keys().with_revision(rev))).await?;
        if rev == 0 {
            seen.push(format!("revision {}", resp.header().map(|h| h.revision()).unwrap_or_default()));
        }
        for kv in resp.kvs() {
            seen.push(format!(
                "@{rev} {} = {} (create {}, mod {}, version {}, lease {})",
                kv.key_str()?,
                kv.value_str()?,
                kv.create_revision(),
                kv.mod_revision(),
                kv.version(),
                kv.lease()
            ));
        }
    }
    let ttl = c.lease_time_to_live(LEASE_ID, Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys())).await?;
    let mut keys: Vec<String> = ttl.keys().iter().map(|k| String::from_utf8_lossy(k).into_owned()).collect();
    keys.sort();
    seen.push(format!("lease {LEASE_ID:x} granted {} keys {keys:?}", ttl.granted_ttl()));
    seen.push(format!("users {:?}", c.user_list().await?.users()));
    seen.push(format!("alice {:?}", c.user_get("alice").await?.roles()));
    let perms: Vec<String> = c
        .role_get("reader")
        .await?
        .permissions()
        .iter()
        .map(|p| format!("{:?} {:?} {:?}", p.get_type(), p.key(), p.range_end()))
        .collect();
    seen.push(format!("reader {perms:?}"));
    Ok(seen)
}

fn snapshot_save(url: &str, file: &Path) -> anyhow::Result<()> {
    let out = std::process::Command::new(etcdctl_bin())
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", url, "--user", "root:rootpw", "snapshot", "save"])
        .arg(file)
        .output()?;
    anyhow::ensure!(out.status.success(), "snapshot save: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

fn restored(binary: &Path, file: &Path, restore_tool: Option<&Path>) -> anyhow::Result<Cluster> {
    Cluster::start_with(ClusterOptions {
        binary: binary.to_path_buf(),
        restore_from: Some(file.to_path_buf()),
        restore_tool: restore_tool.map(Path::to_path_buf),
        ..ClusterOptions::keel(1)
    })
}

/// The real etcd of a release, with the tool that restores its backups
/// (etcdctl up to 3.4, etcdutl from 3.5) and the `--target` keel converts
/// its data dirs for.
struct Release {
    etcd: PathBuf,
    restore_tool: PathBuf,
    target: &'static str,
    /// Arguments that make keel report the release.
    keel_args: Vec<String>,
}

fn debian_etcd() -> anyhow::Result<Release> {
    let etcd = etcd_bin().ok_or_else(|| anyhow::anyhow!("real etcd not found at /usr/bin/etcd: run `make deps`"))?;
    Ok(Release { etcd, restore_tool: etcdctl_bin(), target: "3.4", keel_args: Vec::new() })
}

/// The release of `line` that `make etcd-releases` built; keel reports
/// the same tag.
fn built_etcd(line: &'static str) -> anyhow::Result<Release> {
    let dir = etcd_release(line)?;
    let tag = dir.file_name().map(|n| n.to_string_lossy().trim_start_matches('v').to_string()).unwrap_or_default();
    let keel_args = vec!["--advertise-etcd-version".to_string(), tag];
    Ok(Release { etcd: dir.join("etcd"), restore_tool: dir.join("etcdutl"), target: line, keel_args })
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_round_trip_between_keel_and_etcd() -> anyhow::Result<()> {
    snapshots_round_trip(debian_etcd()?).await
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_round_trip_between_keel_and_etcd_3_6() -> anyhow::Result<()> {
    snapshots_round_trip(built_etcd("3.6")?).await
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_round_trip_between_keel_and_etcd_3_7() -> anyhow::Result<()> {
    snapshots_round_trip(built_etcd("3.7")?).await
}

async fn snapshots_round_trip(release: Release) -> anyhow::Result<()> {
    let Release { etcd, restore_tool, keel_args, .. } = release;
    let dir = tempfile::tempdir()?;

    let keel_args: Vec<&str> = keel_args.iter().map(String::as_str).collect();
    let keel = Cluster::start_with(ClusterOptions::keel(1).args(&keel_args))?;
    write_history(&keel.members[0].client_url).await?;
    let from_keel = observe(&keel.members[0].client_url).await?;
    assert!(from_keel.len() > 2000, "the workload leaves a few thousand keys");
    assert!(from_keel.contains(&"anonymous read refused true".to_string()), "auth is enabled");

    // keel's backup is an etcd backup: real etcd restores and serves it.
    let keel_backup = dir.path().join("keel.db");
    snapshot_save(&keel.members[0].client_url, &keel_backup)?;
    let etcd_from_keel = restored(&etcd, &keel_backup, Some(&restore_tool))?;
    assert_eq!(observe(&etcd_from_keel.members[0].client_url).await?, from_keel, "keel -> etcd");

    // The same history written to real etcd comes back into keel, both
    // through etcd's own restore (keel converts the data dir it leaves)
    // and through `keel snapshot restore`.
    let reference = Cluster::start_with(ClusterOptions { binary: etcd.clone(), ..ClusterOptions::keel(1) })?;
    write_history(&reference.members[0].client_url).await?;
    let from_etcd = observe(&reference.members[0].client_url).await?;
    assert_eq!(from_etcd, from_keel, "keel and etcd agree on the workload");
    let etcd_backup = dir.path().join("etcd.db");
    snapshot_save(&reference.members[0].client_url, &etcd_backup)?;
    let converted = restored(&keel_tests::keel_bin(), &etcd_backup, Some(&restore_tool))?;
    assert_eq!(observe(&converted.members[0].client_url).await?, from_etcd, "etcd data dir -> keel");
    assert!(
        converted.members[0].data_dir.join("member.etcd-original").exists(),
        "the original etcd member dir is kept"
    );
    let keel_from_etcd = restored(&keel_tests::keel_bin(), &etcd_backup, None)?;
    assert_eq!(observe(&keel_from_etcd.members[0].client_url).await?, from_etcd, "etcd backup -> keel");
    Ok(())
}

/// The cluster id and the members (id, peer URLs) as a client of `url` sees them.
async fn identity(url: &str) -> anyhow::Result<(u64, Vec<(u64, String)>)> {
    let mut c = as_root(url).await?;
    let resp = c.member_list().await?;
    let cluster = resp.header().map(|h| h.cluster_id()).unwrap_or_default();
    let mut members: Vec<(u64, String)> = resp.members().iter().map(|m| (m.id(), m.peer_urls().join(","))).collect();
    members.sort();
    Ok((cluster, members))
}

/// An operator swaps the binary under every member of a running keel
/// cluster and back: `keel convert-to-etcd` on each stopped member, real
/// etcd 3.4 started with the same flags serves the same cluster (member
/// ids, cluster id, every key with its history, the lease, auth) and takes
/// writes; stopped again, keel takes etcd's data dirs over in place (the
/// WAL etcd appended to is read back through its CRC chain) and serves
/// everything etcd had.
#[tokio::test(flavor = "multi_thread")]
async fn a_keel_cluster_moves_to_etcd_in_place_and_back() -> anyhow::Result<()> {
    move_to_etcd_in_place_and_back(debian_etcd()?).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keel_cluster_moves_to_etcd_3_6_in_place_and_back() -> anyhow::Result<()> {
    move_to_etcd_in_place_and_back(built_etcd("3.6")?).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keel_cluster_moves_to_etcd_3_7_in_place_and_back() -> anyhow::Result<()> {
    move_to_etcd_in_place_and_back(built_etcd("3.7")?).await
}

async fn move_to_etcd_in_place_and_back(release: Release) -> anyhow::Result<()> {
    // keel reports its default release here: the members' flags carry
    // over to etcd, which knows no --advertise-etcd-version.
    let Release { etcd, target, .. } = release;
    let mut cluster = Cluster::start(3)?;
    write_history(&cluster.members[0].client_url).await?;
    let url = |c: &Cluster, i: usize| c.members[i].client_url.clone();
    let on_keel = observe(&url(&cluster, 1)).await?;
    let keel_identity = identity(&url(&cluster, 2)).await?;
    assert_eq!(keel_identity.1.len(), 3);

    cluster.swap_binary(&etcd, |m| {
        let out = std::process::Command::new(keel_tests::keel_bin())
            .args(["convert-to-etcd", "--target", target, "--data-dir"])
            .arg(&m.data_dir)
            .output()?;
        anyhow::ensure!(out.status.success(), "convert-to-etcd: {}", String::from_utf8_lossy(&out.stderr));
        anyhow::ensure!(m.data_dir.join("member.keel-original").join("db").is_dir(), "keel's files are kept");
        Ok(())
    })?;
    for i in 0..3 {
        assert_eq!(observe(&url(&cluster, i)).await?, on_keel, "etcd member {i} serves keel's data");
        assert_eq!(identity(&url(&cluster, i)).await?, keel_identity, "same cluster and member ids on etcd");
    }
    let mut c = as_root(&url(&cluster, 0)).await?;
    c.put("key/written-by-etcd", "e", None).await?;
    c.delete("key/0003", None).await?;
    let on_etcd = observe(&url(&cluster, 2)).await?;
    assert_ne!(on_etcd, on_keel);

    cluster.swap_binary(&keel_tests::keel_bin(), |_| Ok(()))?;
    for i in 0..3 {
        assert!(cluster.members[i].data_dir.join("member.etcd-original").is_dir(), "etcd's files are kept");
        assert_eq!(observe(&url(&cluster, i)).await?, on_etcd, "keel member {i} serves what etcd had");
        assert_eq!(identity(&url(&cluster, i)).await?, keel_identity, "same cluster and member ids back on keel");
    }
    as_root(&url(&cluster, 1)).await?.put("key/written-by-keel", "k", None).await?;
    Ok(())
}
