//! Offline subcommands: `keel snapshot status|restore`, etcdctl's snapshot
//! subcommands for keel's backups (what `etcdctl snapshot save` wrote from
//! a keel member), and `keel convert-to-etcd`, which turns a stopped keel
//! member's data dir into an etcd member's.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::cluster::{cluster_id, member_id, parse_urls};
use crate::config::parse_initial_cluster;
use crate::raft::codec;
use crate::storage::{Table, WriteBatch};

#[derive(Parser, Debug)]
#[command(name = "keel snapshot", about = "Inspect and restore keel backups")]
struct SnapshotCli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Prints hash, revision, total keys and size of a backup.
    Status {
        file: PathBuf,
        /// Output format: simple, table or json.
        #[arg(short = 'w', long = "write-out", default_value = "simple")]
        write_out: String,
    },
    /// Builds a new member's data dir from a backup.
    Restore {
        file: PathBuf,
        #[arg(long, default_value = "default")]
        name: String,
        /// Path to the data directory (default: ${name}.etcd).
        #[arg(long, default_value = "")]
        data_dir: String,
        #[arg(long, default_value = "default=http://localhost:2380")]
        initial_cluster: String,
        #[arg(long, default_value = "etcd-cluster")]
        initial_cluster_token: String,
        #[arg(long, default_value = "http://localhost:2380")]
        initial_advertise_peer_urls: String,
        /// Accepted for etcdctl compatibility; keel always verifies.
        #[arg(long)]
        skip_hash_check: bool,
    },
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.0} {}", UNITS[u])
    }
}

fn run(cli: SnapshotCli) -> anyhow::Result<()> {
    match cli.command {
        Command::Status { file, write_out } => {
            let st = crate::backup::status(&file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            match write_out.as_str() {
                "json" => println!(
                    r#"{{"hash":{},"revision":{},"totalKey":{},"totalSize":{}}}"#,
                    st.hash, st.revision, st.total_keys, st.total_size
                ),
                "table" => {
                    println!("+----------+----------+------------+------------+");
                    println!("|   HASH   | REVISION | TOTAL KEYS | TOTAL SIZE |");
                    println!("+----------+----------+------------+------------+");
                    println!(
                        "| {:>8x} | {:>8} | {:>10} | {:>10} |",
                        st.hash,
                        st.revision,
                        st.total_keys,
                        human(st.total_size)
                    );
                    println!("+----------+----------+------------+------------+");
                }
                _ => println!("{:x}, {}, {}, {}", st.hash, st.revision, st.total_keys, human(st.total_size)),
            }
            Ok(())
        }
        Command::Restore {
            file,
            name,
            data_dir,
            initial_cluster,
            initial_cluster_token,
            initial_advertise_peer_urls,
            ..
        } => {
            let members =
                parse_initial_cluster(&initial_cluster).map_err(|e| anyhow::anyhow!("--initial-cluster: {e}"))?;
            let own = parse_urls(&initial_advertise_peer_urls)
                .map_err(|e| anyhow::anyhow!("--initial-advertise-peer-urls: {e}"))?;
            if !members.iter().any(|(n, _)| *n == name) {
                anyhow::bail!("couldn't find local name {name:?} in the initial cluster configuration");
            }
            let ids: Vec<(u64, Vec<String>)> =
                members.iter().map(|(_, urls)| (member_id(urls, &initial_cluster_token, None), urls.clone())).collect();
            let id = member_id(&own, &initial_cluster_token, None);
            let cid = cluster_id(&ids.iter().map(|(i, _)| *i).collect::<Vec<_>>());
            let data_dir = if data_dir.is_empty() { format!("{name}.etcd") } else { data_dir };
            let mut local = WriteBatch::new();
            local.put(Table::RaftState, crate::storage::keys::LOCAL_IDENTITY, codec::encode(&(id, cid))?);
            local.put(Table::RaftState, crate::storage::keys::BOOTSTRAP_MEMBERS, codec::encode(&ids)?);
            crate::backup::restore(&file, std::path::Path::new(&data_dir), local)?;
            println!("restored snapshot {} into {data_dir} as member {id:x} of cluster {cid:x}", file.display());
            Ok(())
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "keel convert-to-etcd",
    about = "Converts a stopped keel member's data dir in place into an etcd member's (3.4 to 3.7), with the same member id, cluster id, membership and data; keel's files are kept as member.keel-original"
)]
struct ConvertCli {
    /// The member's data directory.
    #[arg(long, env = "ETCD_DATA_DIR", default_value = "default.etcd")]
    data_dir: PathBuf,
    /// The etcd release that will run the member: 3.4, 3.5, 3.6 or 3.7.
    #[arg(long, default_value = "3.7", value_parser = crate::etcd_data_dir::EtcdTarget::parse)]
    target: crate::etcd_data_dir::EtcdTarget,
}

/// Parses an offline subcommand's flags (`args` without the program
/// name) and runs it: clap's exit code for bad flags or `--help`, 1 with
/// the error for a failure.
fn subcommand_main<C: Parser>(name: &str, args: Vec<String>, run: impl FnOnce(C) -> anyhow::Result<()>) -> ExitCode {
    let cli = match C::try_parse_from(std::iter::once(name.to_string()).chain(args)) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Entry point for `keel convert-to-etcd ...` (`args` without the
/// program name).
pub fn convert_to_etcd_main(args: Vec<String>) -> ExitCode {
    subcommand_main("keel convert-to-etcd", args, |cli: ConvertCli| {
        let done = crate::etcd_data_dir::convert_to_etcd(&cli.data_dir, cli.target)?;
        println!(
            "converted {} to an etcd data dir: member {:x} of cluster {:x} ({} members), starting from index {} term {}; keel's files are in {}",
            cli.data_dir.display(),
            done.member_id,
            done.cluster_id,
            done.members,
            done.index,
            done.term,
            cli.data_dir.join("member.keel-original").display()
        );
        Ok(())
    })
}

/// Entry point for `keel snapshot ...` (`args` without the program name).
pub fn snapshot_main(args: Vec<String>) -> ExitCode {
    subcommand_main("keel snapshot", args, run)
}
