//! The `keel` binary: parse etcd's flags, set up logging, run a member
//! until SIGINT/SIGTERM.

use keel_server::config::Flags;
use keel_server::version::KEEL_VERSION;

/// jemalloc rather than glibc's malloc: watch fan-out and request handling
/// allocate on many threads at once, and glibc's arena locks showed up as
/// the largest cost in profiles of 100,000-watcher fan-out.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("snapshot") {
        return keel_server::cli::snapshot_main(args[2..].to_vec());
    }
    if args.get(1).map(String::as_str) == Some("convert-to-etcd") {
        return keel_server::cli::convert_to_etcd_main(args[2..].to_vec());
    }
    let flags = match Flags::from_command_line(std::env::args(), |name| std::env::var(name).ok()) {
        Ok(f) => f,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { std::process::ExitCode::from(2) } else { std::process::ExitCode::SUCCESS };
        }
    };
    if flags.version {
        print!("{}", version_text(&flags.advertise_etcd_version));
        return std::process::ExitCode::SUCCESS;
    }
    let config = match flags.validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keel: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Err(e) = keel_server::logging::init(&config) {
        eprintln!("keel: cannot set up logging: {e}");
        return std::process::ExitCode::from(2);
    }
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let (workers, poll_window) = match runtime_settings() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("keel: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.worker_threads(workers);
    let busy_poll = poll_window.map(|w| keel_server::busy_poll::BusyPoll::install(&mut runtime, w));
    let runtime = match runtime.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keel: cannot start runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Some(poll) = busy_poll {
        runtime.spawn(poll.run());
    }
    match runtime.block_on(keel_server::run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "keel stopped with an error");
            eprintln!("keel: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The runtime's worker threads and busy-polling window, from the
/// environment.
fn runtime_settings() -> Result<(usize, Option<std::time::Duration>), String> {
    let workers = worker_threads()?;
    Ok((workers, keel_server::busy_poll::window_from_env(workers)?))
}

/// The runtime's worker threads: one fewer than the cores, at least one
/// (`TOKIO_WORKER_THREADS` overrides). A member's hot paths are chains of
/// short tasks handing work to each other (gRPC handler, batcher, Raft
/// core, replication, apply); on a worker of their own they run back to
/// back, where spread over every core each hand-off can wake a parked
/// thread, which costs tens of microseconds on a virtual machine. The
/// core left over runs what does not belong on the runtime: RocksDB's
/// flushes and compactions, the leader's journal syncer, blocking reads
/// and the kernel's network work. (A follower flushes its journal on the
/// runtime: with one worker that holds the member for the flush.)
fn worker_threads() -> Result<usize, String> {
    if let Some(v) = std::env::var_os("TOKIO_WORKER_THREADS") {
        let v = v.to_string_lossy();
        return match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("invalid TOKIO_WORKER_THREADS {v:?}: want a number of threads above 0")),
        };
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    Ok(cores.saturating_sub(1).max(1))
}

/// `--version` in etcd's shape (its test framework reads the first line
/// starting `etcd Version:` as the server's release), with the version
/// keel reports (`--advertise-etcd-version`), then keel's own.
fn version_text(etcd_version: &str) -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    format!(
        "etcd Version: {etcd_version}\nGit SHA: Not provided\nGo Version: not Go (keel is written in Rust)\nGo OS/Arch: {}/{arch}\nkeel Version: {KEEL_VERSION}\n",
        std::env::consts::OS
    )
}
