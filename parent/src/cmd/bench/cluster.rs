//! `keygate bench cluster`: releases per second and per KRE CPU-second with 1, 2 and 3 member
//! KREs serving the same keys, against the one-member figure measured in the same run.
//!
//! Each row starts its own cluster: member KREs (`keygate-enclave-dev` with custodians, a
//! genesis bundle naming members a, b and c, a member listener and a mock parent instance),
//! each with its parent's audit follower; genesis with the custodians on a (`keygate custodian
//! init`), the others joined from a (`keygate member join`), the sealed state in a directory.
//! The load generator of `bench release` (`keygate bench load-run`, a separate process) then
//! runs a closed loop with each client connection on one member, round-robin
//! ([`super::release::kre_for`]). The KREs' CPU is read from `/proc` and summed over the
//! members. It decides nothing for the product and trusts the processes it starts only for the
//! figures they report; every command it runs is bounded in time.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keygate_tests::cluster::{custodial_kre_args, genesis_bundle_with_members, member_args};
use keygate_tests::e2e::prod_policy_for;
use keygate_tests::{wait_for_socket, TempDir};

use super::release::{measure, Load};
use super::{cores, spawn_kre, KreProc, CLIENT_PCR, KRE_PCR};
use crate::error::CliError;

/// The members the genesis bundle names: (name, mock parent instance). A row with N members
/// runs the first N.
const MEMBERS: [(&str, &str); 3] = [("a", "i-a"), ("b", "i-b"), ("c", "i-c")];

/// How long one set-up command (`keygen`, `policy init`, `custodian init`, `member join`) may
/// take.
const STEP_LIMIT: Duration = Duration::from_secs(60);

/// The most client connections of one row.
const MAX_CONNECTIONS: usize = 4096;

/// One row: what N members released in one closed-loop run.
#[derive(Debug, Clone, PartialEq)]
struct ClusterRow {
    members: usize,
    connections: usize,
    /// Releases by each member, in order.
    per_member: Vec<u64>,
    releases: u64,
    wall_s: f64,
    /// The members' CPU seconds, summed.
    kre_cpu_s: f64,
    client_cpu_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    wrong_keys: u64,
}

impl ClusterRow {
    fn per_s(&self) -> f64 {
        self.releases as f64 / self.wall_s.max(1e-9)
    }

    fn per_kre_cpu_s(&self) -> f64 {
        self.releases as f64 / self.kre_cpu_s.max(1e-9)
    }
}

/// The table's header and separator lines.
const HEADER: [&str; 2] = [
    "| members | connections | releases by member | releases | releases/s | / 1 member | KRE CPU s (all members) | client CPU s | releases per KRE CPU-s | / 1 member | p50 ms | p99 ms | errors | wrong keys |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
];

/// `value / base`, two decimals, or `–` without a base.
fn ratio(value: f64, base: Option<f64>) -> String {
    match base {
        Some(b) if b > 0.0 => format!("{:.2}", value / b),
        _ => "–".to_owned(),
    }
}

/// The table line of `row`, its ratios against `base` (the one-member row, when measured).
fn line(row: &ClusterRow, base: Option<&ClusterRow>) -> String {
    let by_member: Vec<String> = row.per_member.iter().map(u64::to_string).collect();
    format!(
        "| {} | {} | {} | {} | {:.0} | {} | {:.2} | {:.2} | {:.0} | {} | {:.2} | {:.2} | {} | {} |",
        row.members,
        row.connections,
        by_member.join(" / "),
        row.releases,
        row.per_s(),
        ratio(row.per_s(), base.map(ClusterRow::per_s)),
        row.kre_cpu_s,
        row.client_cpu_s,
        row.per_kre_cpu_s(),
        ratio(row.per_kre_cpu_s(), base.map(ClusterRow::per_kre_cpu_s)),
        row.p50_ms,
        row.p99_ms,
        row.errors,
        row.wrong_keys
    )
}

/// Runs `exe ARGS` with a time limit: Ok(stdout), or the failure with its standard error.
fn run_cli(exe: &Path, args: &[String]) -> Result<String, CliError> {
    let what = args.iter().take(2).cloned().collect::<Vec<_>>().join(" ");
    let mut child = keygate_tests::KillOnDrop(
        Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| CliError::io(format!("starting keygate {what}"), e))?,
    );
    let started = Instant::now();
    while child.0.try_wait().map_err(|e| CliError::io(format!("keygate {what}"), e))?.is_none() {
        if started.elapsed() > STEP_LIMIT {
            return Err(CliError::refused(format!("keygate {what} did not finish within {STEP_LIMIT:?}")));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let read = |r: Option<&mut dyn std::io::Read>| {
        let mut s = String::new();
        if let Some(r) = r {
            let _ = r.read_to_string(&mut s);
        }
        s
    };
    let out = read(child.0.stdout.as_mut().map(|r| r as &mut dyn std::io::Read));
    let err = read(child.0.stderr.as_mut().map(|r| r as &mut dyn std::io::Read));
    match child.0.try_wait() {
        Ok(Some(status)) if status.success() => Ok(out),
        _ => Err(CliError::refused(format!("keygate {what} failed: {}", err.trim()))),
    }
}

fn arg(p: &Path) -> String {
    p.display().to_string()
}

/// The custodians' and the approver's keys and the genesis bundle naming [`MEMBERS`], in one
/// directory every row's members share.
struct Shared {
    dir: TempDir,
    genesis: PathBuf,
}

impl Shared {
    fn prepare(exe: &Path) -> Result<Self, CliError> {
        let dir = TempDir::new("keygate-bench-cluster").map_err(|e| CliError::io("bench dir", e))?;
        let d = dir.path();
        for k in ["c1", "c2", "c3", "approver"] {
            run_cli(exe, &["keygen".into(), "-o".into(), arg(&d.join(format!("{k}.pem")))])?;
        }
        let init = d.join("init.bundle");
        let approver = arg(&d.join("approver.pub.pem"));
        run_cli(
            exe,
            &["policy", "init", "--approver", &approver, "--threshold", "1", "-o", &arg(&init)].map(str::to_owned),
        )?;
        let bytes = std::fs::read(&init).map_err(|e| CliError::io("reading the genesis bundle", e))?;
        let genesis = genesis_bundle_with_members(&bytes, &prod_policy_for("cp", CLIENT_PCR), &MEMBERS)
            .map_err(|e| CliError::refused(format!("the genesis bundle: {e}")))?;
        let path = d.join("genesis.bundle");
        std::fs::write(&path, genesis).map_err(|e| CliError::io("writing the genesis bundle", e))?;
        Ok(Self { dir, genesis: path })
    }

    /// Starts `n` members, each with its audit follower: genesis on the first into a fresh
    /// state directory, the others joined from it. Returns them serving.
    fn start_cluster(&self, exe: &Path, n: usize, threads: usize) -> Result<Vec<KreProc>, CliError> {
        let state = self.dir.path().join(format!("state-{n}"));
        let mut kres: Vec<KreProc> = Vec::with_capacity(n);
        for &(name, instance) in MEMBERS.iter().take(n) {
            let dir =
                TempDir::new(&format!("keygate-bench-member-{name}")).map_err(|e| CliError::io("bench dir", e))?;
            let sock = dir.path().join("kre.sock");
            let member_sock = dir.path().join("kre.sock.member");
            let mut args = custodial_kre_args(self.dir.path(), KRE_PCR, &sock);
            args.extend(member_args(&self.genesis, &member_sock, instance));
            args.push("--mock-fast-signing".into());
            let kre = spawn_kre(dir, sock, threads, &args)?;
            wait_for_socket(&member_sock, None, Duration::from_secs(15))
                .map_err(|e| CliError::refused(format!("member {name} has no member listener: {e}")))?;
            let parent = format!("unix:{}.parent", kre.sock.display());
            let step = match kres.first() {
                None => {
                    ["custodian", "init", "--kre", &parent, "--state-dir", &arg(&state)].map(str::to_owned).to_vec()
                }
                Some(first) => {
                    let from = format!("unix:{}.member", first.sock.display());
                    ["member", "join", "--kre", &parent, "--from", &from, "--state-dir", &arg(&state)]
                        .map(str::to_owned)
                        .to_vec()
                }
            };
            run_cli(exe, &step).map_err(|e| CliError::refused(format!("member {name}: {}", e.message)))?;
            kres.push(kre);
        }
        Ok(kres)
    }
}

/// `keygate bench cluster`.
pub(super) fn bench_cluster(
    members: &[usize],
    connections: usize,
    threads: usize,
    seconds: f64,
) -> Result<(), CliError> {
    if let Some(&bad) = members.iter().find(|&&n| n == 0 || n > MEMBERS.len()) {
        return Err(CliError::input(format!("--members: 1 to {} members, not {bad}", MEMBERS.len())));
    }
    if connections == 0 || connections > MAX_CONNECTIONS {
        return Err(CliError::input(format!("--connections: 1 to {MAX_CONNECTIONS}, not {connections}")));
    }
    let exe = std::env::current_exe().map_err(|e| CliError::io("exe", e))?;
    println!(
        "# keygate bench cluster ({seconds} s per row, closed loop, {connections} connections round-robin over the members; KRE worker threads: {threads}; {} cores shared by every KRE, its audit follower and the load generator)",
        cores()
    );
    let shared = Shared::prepare(&exe)?;
    println!();
    for h in HEADER {
        println!("{h}");
    }
    let mut rows: Vec<ClusterRow> = Vec::with_capacity(members.len());
    for &n in members {
        let kres = shared.start_cluster(&exe, n, threads)?;
        let to: Vec<String> = kres.iter().map(|k| format!("unix:{}", k.sock.display())).collect();
        let pids: Vec<u32> = kres.iter().map(KreProc::pid).collect();
        let m = measure(&exe, &to, &pids, connections, seconds, Load::Closed)?;
        drop(kres);
        let row = ClusterRow {
            members: n,
            connections,
            per_member: m.report.per_kre.clone(),
            releases: m.report.releases,
            wall_s: m.report.wall_s,
            kre_cpu_s: m.kre_cpu_s,
            client_cpu_s: m.report.client_cpu_s,
            p50_ms: m.hist.value_at_quantile(0.5) as f64 / 1000.0,
            p99_ms: m.hist.value_at_quantile(0.99) as f64 / 1000.0,
            errors: m.report.errors,
            wrong_keys: m.report.wrong_keys,
        };
        let base = rows.iter().chain(std::iter::once(&row)).find(|r| r.members == 1).cloned();
        println!("{}", line(&row, base.as_ref()));
        rows.push(row);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::release::kre_for;
    use super::*;

    fn row(members: usize, releases: u64, kre_cpu_s: f64) -> ClusterRow {
        ClusterRow {
            members,
            connections: 64,
            per_member: vec![releases / members as u64; members],
            releases,
            wall_s: 5.0,
            kre_cpu_s,
            client_cpu_s: 4.0,
            p50_ms: 150.0,
            p99_ms: 300.5,
            errors: 0,
            wrong_keys: 0,
        }
    }

    #[test]
    fn connections_are_spread_round_robin_as_evenly_as_their_count_allows() {
        for kres in 1..=3 {
            for connections in [1, 2, 3, 16, 64, 256] {
                let mut per = vec![0usize; kres];
                for i in 0..connections {
                    let k = kre_for(i, kres);
                    assert!(k < kres);
                    per[k] += 1;
                }
                let (min, max) = (per.iter().min().copied(), per.iter().max().copied());
                assert!(max.unwrap_or(0) - min.unwrap_or(0) <= 1, "{kres} KREs, {connections}: {per:?}");
                assert_eq!(per.iter().sum::<usize>(), connections);
            }
        }
        // Neighbouring connections go to different members; no count divides by zero.
        assert_eq!((0..4).map(|i| kre_for(i, 3)).collect::<Vec<_>>(), [0, 1, 2, 0]);
        assert_eq!(kre_for(5, 0), 0);
    }

    #[test]
    fn each_line_gives_its_ratios_to_the_one_member_row() {
        let one = row(1, 2000, 4.0);
        let two = row(2, 2200, 5.0);
        assert_eq!(
            line(&two, Some(&one)),
            "| 2 | 64 | 1100 / 1100 | 2200 | 440 | 1.10 | 5.00 | 4.00 | 440 | 0.88 | 150.00 | 300.50 | 0 | 0 |"
        );
        assert!(line(&one, Some(&one)).contains("| 400 | 1.00 |") && line(&one, Some(&one)).contains("| 500 | 1.00 |"));
        // Without a one-member row (or an empty one) there is no ratio, never a division by zero.
        assert!(line(&two, None).contains("| 440 | – |"));
        assert!(line(&two, Some(&row(1, 0, 0.0))).contains("| 440 | – |"));
        // Every line has the header's columns.
        let cols = |s: &str| s.matches('|').count();
        assert_eq!(cols(&line(&two, None)), cols(HEADER[0]));
        assert_eq!(cols(HEADER[1]), cols(HEADER[0]));
    }

    #[test]
    fn arguments_are_quoted_for_the_shell() {
        assert_eq!(super::super::sh_quote("/tmp/a b"), "'/tmp/a b'");
        assert_eq!(super::super::sh_quote("it's"), r"'it'\''s'");
    }
}
