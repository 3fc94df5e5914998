//! Flag names that changed between etcd releases. etcd 3.6 renamed most
//! `--experimental-*` flags to plain names (taking both spellings, with a
//! deprecation warning) and turned the boolean ones into feature gates;
//! 3.7 removed the old spellings and v2 discovery. One keel binary serves
//! as any of those releases (`--advertise-etcd-version`), so it takes every
//! spelling, and refuses the removed ones only when it reports 3.7 or
//! later, with the message Go's flag package gives there.

/// `--experimental-<name>` flags that etcd 3.6 calls `--<name>`.
const RENAMED: &[&str] = &[
    "compact-hash-check-time",
    "corrupt-check-time",
    "compaction-batch-limit",
    "watch-progress-notify-interval",
    "warning-apply-duration",
    "bootstrap-defrag-threshold-megabytes",
    "memory-mlock",
    "snapshot-catchup-entries",
    "compaction-sleep-interval",
    "downgrade-check-time",
    "peer-skip-client-san-verification",
    "enable-distributed-tracing",
    "distributed-tracing-address",
    "distributed-tracing-service-name",
    "distributed-tracing-instance-id",
    "distributed-tracing-sampling-rate",
    "warning-unary-request-duration",
];

/// `--experimental-<flag>` booleans that etcd 3.6 replaced with
/// `--feature-gates=<Gate>=true`.
pub const GATED: &[(&str, &str)] = &[
    ("compact-hash-check-enabled", "CompactHashCheck"),
    ("initial-corrupt-check", "InitialCorruptCheck"),
    ("stop-grpc-service-on-defrag", "StopGRPCServiceOnDefrag"),
    ("txn-mode-write-with-shared-buffer", "TxnModeWriteWithSharedBuffer"),
    ("enable-lease-checkpoint", "LeaseCheckpoint"),
    ("enable-lease-checkpoint-persist", "LeaseCheckpointPersist"),
];

/// Flags etcd 3.7 removed outright (v2 discovery).
const REMOVED_IN_3_7: &[&str] = &["discovery", "discovery-proxy"];

/// The command line after renaming, and the old spellings it used.
#[derive(Debug, Default)]
pub struct Normalized {
    pub args: Vec<String>,
    /// Old flag names used on the command line or in `ETCD_*` variables
    /// (without dashes), in the order met.
    pub old_names: Vec<String>,
    /// Old names whose new spelling is on the command line too (etcd 3.6
    /// refuses both).
    pub given_twice: Vec<String>,
}

/// Rewrites a command line for clap: Go-style single-dash long flags
/// (`-name x`) become `--name x`, and 3.6's renamed experimental flags
/// take their plain names. A renamed flag's old `ETCD_EXPERIMENTAL_*`
/// variable is passed as a flag right after the program name when the new
/// variable is unset, so anything on the command line still wins.
pub fn normalize_args(args: impl IntoIterator<Item = String>, env: impl Fn(&str) -> Option<String>) -> Normalized {
    let mut out = Normalized::default();
    // Renamed flags given under their new name on the command line.
    let mut plain_names: Vec<&str> = Vec::new();
    for (i, arg) in args.into_iter().enumerate() {
        let arg = if i > 0 && is_single_dash_long(&arg) { format!("-{arg}") } else { arg };
        let renamed = (i > 0).then(|| rename(&arg)).flatten();
        match renamed {
            Some((old, new)) => {
                out.old_names.push(old);
                out.args.push(new);
            }
            None => {
                let name = arg.trim_start_matches('-').split('=').next().unwrap_or("");
                plain_names.extend(RENAMED.iter().copied().filter(|r| *r == name));
                out.args.push(arg);
            }
        }
        if i == 0 {
            for name in RENAMED {
                let (old_var, new_var) = (env_var(&format!("experimental-{name}")), env_var(name));
                if let (Some(v), None) = (env(&old_var), env(&new_var)) {
                    out.old_names.push(format!("experimental-{name}"));
                    out.args.push(format!("--{name}={v}"));
                }
            }
        }
    }
    for old in &out.old_names {
        let Some(plain) = old.strip_prefix("experimental-").filter(|p| RENAMED.contains(p)) else { continue };
        if plain_names.contains(&plain) {
            out.given_twice.push(old.clone());
        }
    }
    for (flag, _) in GATED {
        if env(&env_var(&format!("experimental-{flag}"))).is_some() {
            out.old_names.push(format!("experimental-{flag}"));
        }
    }
    for flag in REMOVED_IN_3_7 {
        if env(&env_var(flag)).is_some() {
            out.old_names.push(flag.to_string());
        }
    }
    out
}

fn is_single_dash_long(a: &str) -> bool {
    a.starts_with('-')
        && !a.starts_with("--")
        && a.chars().nth(1).is_some_and(|c| c.is_ascii_alphabetic())
        && a.len() > 2
}

/// `--experimental-x[=v]` for a renamed x: the old name and the new
/// argument. Old gated and removed names keep their spelling (keel still
/// has those flags) but are recorded.
fn rename(arg: &str) -> Option<(String, String)> {
    let flag = arg.strip_prefix("--")?;
    let (name, value) = match flag.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (flag, None),
    };
    let plain = name.strip_prefix("experimental-");
    if let Some(plain) = plain.filter(|p| RENAMED.contains(p)) {
        let new = match value {
            Some(v) => format!("--{plain}={v}"),
            None => format!("--{plain}"),
        };
        return Some((name.to_string(), new));
    }
    let gated = plain.is_some_and(|p| GATED.iter().any(|(f, _)| *f == p));
    (gated || REMOVED_IN_3_7.contains(&name)).then(|| (name.to_string(), arg.to_string()))
}

fn env_var(flag: &str) -> String {
    format!("ETCD_{}", flag.to_ascii_uppercase().replace('-', "_"))
}

/// What etcd says about an old spelling: 3.6 warns, 3.7 no longer knows
/// the flag. `--max-snapshots` and `--v2-deprecation` are only warned
/// about (until 3.8), and only from 3.6 (None before).
pub fn old_name_notice(name: &str, reported_minor: u32) -> Result<Option<String>, String> {
    let deprecated_in_3_6 = match name {
        "max-snapshots" => Some("--max-snapshots is deprecated in 3.6 and will be decommissioned in 3.8."),
        "v2-deprecation" => Some(
            "--v2-deprecation is deprecated and scheduled for removal in v3.8. The default value is enforced, ignoring user input.",
        ),
        _ => None,
    };
    if let Some(notice) = deprecated_in_3_6 {
        return Ok((reported_minor >= 6).then(|| notice.to_string()));
    }
    if reported_minor >= 7 {
        return Err(format!("flag provided but not defined: -{name}"));
    }
    let Some(plain) = name.strip_prefix("experimental-") else {
        return Ok(Some(format!("--{name} is deprecated and removed in v3.7")));
    };
    Ok(Some(match GATED.iter().find(|(f, _)| *f == plain) {
        Some((_, gate)) => format!(
            "--{name} is deprecated in v3.6 and will be decommissioned in v3.7. Use '--feature-gates={gate}=true' instead."
        ),
        None => format!("--{name} is deprecated in v3.6 and will be decommissioned in v3.7. Use '--{plain}' instead."),
    }))
}

/// etcd's server feature gates with their defaults (3.6, plus 3.7's two).
const FEATURE_GATES: &[(&str, bool)] = &[
    ("StopGRPCServiceOnDefrag", false),
    ("InitialCorruptCheck", false),
    ("CompactHashCheck", false),
    ("TxnModeWriteWithSharedBuffer", true),
    ("LeaseCheckpoint", false),
    ("LeaseCheckpointPersist", false),
    ("SetMemberLocalAddr", false),
    ("FastLeaseKeepAlive", false),
    ("PriorityRequest", false),
];

/// `--feature-gates=Name=bool,...` in etcd's syntax, as each known gate's
/// value (defaults for the ones not named).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureGates(Vec<(&'static str, bool)>);

impl FeatureGates {
    pub fn parse(value: &str) -> Result<Self, String> {
        let mut gates: Vec<(&'static str, bool)> = FEATURE_GATES.to_vec();
        for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((name, v)) = part.split_once('=') else {
                return Err(format!("missing bool value for {part}"));
            };
            let (name, v) = (name.trim(), v.trim());
            let on = super::parse_bool(v).map_err(|_| {
                format!("invalid value of {name}={v}, err: strconv.ParseBool: parsing {v:?}: invalid syntax")
            })?;
            if name == "AllAlpha" || name == "AllBeta" {
                continue;
            }
            match gates.iter_mut().find(|(n, _)| *n == name) {
                Some(gate) => gate.1 = on,
                None => return Err(format!("unrecognized feature gate: {name}")),
            }
        }
        Ok(Self(gates))
    }

    pub fn enabled(&self, name: &str) -> bool {
        self.0.iter().any(|(n, on)| *n == name && *on)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normalize(args: &[&str], env: &[(&str, &str)]) -> Normalized {
        let lookup = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
        normalize_args(std::iter::once("keel").chain(args.iter().copied()).map(String::from), lookup)
    }

    #[test]
    fn experimental_names_become_plain_and_are_recorded() {
        let n = normalize(
            &["-experimental-corrupt-check-time=3s", "--experimental-snapshot-catchup-entries", "10", "--name=a"],
            &[],
        );
        assert_eq!(n.args, ["keel", "--corrupt-check-time=3s", "--snapshot-catchup-entries", "10", "--name=a"]);
        assert_eq!(n.old_names, ["experimental-corrupt-check-time", "experimental-snapshot-catchup-entries"]);
    }

    #[test]
    fn gated_and_removed_names_keep_their_spelling_but_are_recorded() {
        let n = normalize(&["--experimental-initial-corrupt-check=true", "--discovery-proxy=x"], &[]);
        assert_eq!(n.args, ["keel", "--experimental-initial-corrupt-check=true", "--discovery-proxy=x"]);
        assert_eq!(n.old_names, ["experimental-initial-corrupt-check", "discovery-proxy"]);
    }

    #[test]
    fn old_environment_variables_lose_to_new_ones_and_to_flags() {
        let n = normalize(&["--compaction-batch-limit=7"], &[("ETCD_EXPERIMENTAL_COMPACTION_BATCH_LIMIT", "5")]);
        assert_eq!(n.args, ["keel", "--compaction-batch-limit=5", "--compaction-batch-limit=7"]);
        let n =
            normalize(&[], &[("ETCD_EXPERIMENTAL_COMPACTION_BATCH_LIMIT", "5"), ("ETCD_COMPACTION_BATCH_LIMIT", "6")]);
        assert_eq!(n.args, ["keel"]);
        assert!(n.old_names.is_empty());
    }

    #[test]
    fn both_spellings_of_one_flag_are_noticed() {
        let n = normalize(
            &["--experimental-warning-unary-request-duration=1s", "--warning-unary-request-duration=2s"],
            &[],
        );
        assert_eq!(n.given_twice, ["experimental-warning-unary-request-duration"]);
        let n = normalize(&["--experimental-compaction-batch-limit=1", "--experimental-compaction-batch-limit=2"], &[]);
        assert!(n.given_twice.is_empty(), "the same spelling twice is Go's last-one-wins");
    }

    #[test]
    fn notices_warn_for_3_6_and_refuse_for_3_7() {
        let warn = old_name_notice("experimental-initial-corrupt-check", 6).ok().flatten().unwrap_or_default();
        assert!(warn.contains("--feature-gates=InitialCorruptCheck=true"), "{warn}");
        let warn = old_name_notice("experimental-corrupt-check-time", 6).ok().flatten().unwrap_or_default();
        assert!(warn.contains("Use '--corrupt-check-time' instead"), "{warn}");
        assert_eq!(
            old_name_notice("experimental-corrupt-check-time", 7),
            Err("flag provided but not defined: -experimental-corrupt-check-time".to_string())
        );
    }

    #[test]
    fn feature_gates_parse_as_etcd_does() {
        let gates =
            FeatureGates::parse("InitialCorruptCheck=true, CompactHashCheck=false").unwrap_or_else(|e| panic!("{e}"));
        assert!(gates.enabled("InitialCorruptCheck"));
        assert!(!gates.enabled("CompactHashCheck"));
        assert!(gates.enabled("TxnModeWriteWithSharedBuffer"));
        assert_eq!(FeatureGates::parse("Nope=true"), Err("unrecognized feature gate: Nope".to_string()));
        assert!(FeatureGates::parse("InitialCorruptCheck").is_err());
        assert!(FeatureGates::parse("InitialCorruptCheck=maybe").is_err());
    }
}
