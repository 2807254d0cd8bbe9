//! `keygate demo --cluster`: the KRE cluster of docs/cluster.md, end to end, on the mock NSM
//! and a real etcd. Three member KREs a, b and c of one image, each on its own mock parent
//! instance, share one sealed state in etcd: genesis with custodians on a, b and c join from a
//! without them. Clients fetch keys continuously with failover over the three while b is killed
//! with SIGKILL, restarted and joined again from a serving member; every fetch must succeed. A
//! rotation committed by a is adopted by b and c. A KRE of the same image on a parent instance
//! that is no member is refused, and so is an older generation handed to a copy of member c;
//! `keygate status` shows each member.
//!
//! It decides only the order of the steps and what each must show; it trusts nothing the
//! processes say beyond each step's check (exit codes, the released key compared in memory,
//! the reports' fields). Every wait is bounded: each fetch by its budget, each phase by a
//! constant, each process start by the kit's socket wait.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use keygate_tests::cluster::{custodial_kre_args, fetch_args, genesis_bundle_with_members, member_args};
use keygate_tests::e2e::{prod_policy_for, unix};
use keygate_tests::etcd::{EtcdCluster, EtcdClusterError, ETCD_BIN};
use keygate_tests::TempDir;
use zeroize::Zeroizing;

use super::release::{keygate_cli, path, sibling_binary, spawn, Daemon};
use super::tour::{Misbehaved, Outcome, Tour};
use crate::cmd::member::StateAt;
use crate::error::CliError;
use crate::storage::etcd::EtcdUrl;

const SEED: &str = "keygate-demo-cluster";
/// PCR0 of the KRE image (every member runs it, and so does the forked copy).
const KRE_PCR: u8 = 0x4b;
/// PCR0-2 of the control-plane image the policy allows.
const CP_PCR: u8 = 0x1c;
const KEY_ID: &str = "etcd";
/// The members the genesis bundle names: (name, parent instance id).
const MEMBERS: [(&str, &str); 3] = [("a", "i-a"), ("b", "i-b"), ("c", "i-c")];
/// The parent instance of the forked KRE: no member.
const FORK_INSTANCE: &str = "i-d";
/// Members of the etcd cluster holding the sealed state.
const ETCD_MEMBERS: usize = 3;
/// How long the fetches run with b down and after b joined again (and at most with every
/// member up, before b is killed, until [`MIN_PER_PHASE`] succeeded).
const PHASE: Duration = Duration::from_millis(1500);
/// The fewest fetches each of those phases must see (else it showed nothing).
const MIN_PER_PHASE: usize = 2;
/// One fetch attempt's time limit, and one fetch's whole budget (every member, every round).
const FETCH_TIMEOUT: &str = "2s";
const FETCH_BUDGET: &str = "10s";
/// The most background fetches the tour runs (a bound beside the phases' durations).
const MAX_FETCHES: usize = 2_000;
/// What `keygate fetch` logs when it passes over a member (`crate::failover`).
const PASSED_OVER: &str = "KRE attempt failed; asking the other KREs";

/// Fails at once, naming the set-up script, when the etcd server `bin` is missing.
fn need_etcd(bin: &Path) -> Result<(), CliError> {
    if bin.exists() {
        Ok(())
    } else {
        Err(CliError::input(format!("keygate demo --cluster needs a real etcd: {}", EtcdClusterError::Missing)))
    }
}

/// What every step of the tour shares.
struct Ctx {
    exe: PathBuf,
    kre_bin: PathBuf,
    dir: PathBuf,
    genesis: PathBuf,
    /// `etcd://…/keygate`: the store every member's parent uses.
    store: String,
}

/// A member KRE (or the forked copy) and its parent's audit follower (the KRE answers no
/// release before the parent has stored its audit entry).
struct Kre {
    name: &'static str,
    instance: &'static str,
    sock: PathBuf,
    runs: u32,
    process: Option<Daemon>,
    follower: Option<Daemon>,
}

impl Kre {
    fn new(ctx: &Ctx, name: &'static str, instance: &'static str) -> Self {
        Self { name, instance, sock: ctx.dir.join(format!("{name}.sock")), runs: 0, process: None, follower: None }
    }

    /// The release channel (what control planes ask, through the parent's proxy in production).
    fn release(&self) -> String {
        unix(&self.sock)
    }

    /// The parent channel (state, join, status, audit).
    fn parent(&self) -> String {
        format!("unix:{}.parent", self.sock.display())
    }

    /// The member channel (`--member-listen`): where another member's parent asks for a join.
    fn member_sock(&self) -> PathBuf {
        PathBuf::from(format!("{}.member", self.sock.display()))
    }

    /// Starts the KRE (awaiting its state) and waits until it listens; then its follower.
    fn start(&mut self, ctx: &Ctx) -> Result<(), CliError> {
        for suffix in ["", ".parent", ".custodian", ".member"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.sock.display()));
        }
        self.runs += 1;
        let mut args = vec!["--nsm".to_owned(), "mock".into(), "--mock-seed".into(), SEED.into()];
        args.extend(custodial_kre_args(&ctx.dir, KRE_PCR, &self.sock));
        args.extend(member_args(&ctx.genesis, &self.member_sock(), self.instance));
        let log = ctx.dir.join(format!("{}-{}.log", self.name, self.runs));
        let mut process = spawn(&ctx.kre_bin, &args, &log, "keygate-enclave-dev")?;
        process.listening(&self.sock)?;
        self.process = Some(process);
        let follow = [
            "audit".to_owned(),
            "pull".into(),
            "--kre".into(),
            self.parent(),
            "--dir".into(),
            path(&ctx.dir.join(format!("{}-audit", self.name))),
            "--follow".into(),
            "1".into(),
        ];
        let log = ctx.dir.join(format!("{}-follow-{}.log", self.name, self.runs));
        self.follower = Some(spawn(&ctx.exe, &follow, &log, "keygate audit pull --follow")?);
        Ok(())
    }

    /// kill -9, and its follower with it.
    fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.process.kill();
        }
        self.follower = None;
    }
}

/// Runs `keygate ARGS` to completion, recorded for the signal clean-up.
fn run(exe: &Path, args: &[String]) -> Result<Output, CliError> {
    keygate_tests::run_tracked(Command::new(exe).args(args)).map_err(|e| CliError::io("running keygate", e))
}

/// The error lines of a failed command (the message alone of a `--json` error object).
fn why(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    err.lines()
        .filter(|l| l.contains("error"))
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.pointer("/error/message").and_then(|m| m.as_str()).map(str::to_owned))
                .unwrap_or_else(|| l.trim().to_owned())
        })
        .collect::<Vec<_>>()
        .join(" / ")
}

/// Succeeded with `needle` on stdout: its stdout, trimmed.
fn expect_ok(o: &Output, needle: &str) -> Outcome {
    let out = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    if !o.status.success() {
        Err(format!("failed ({}): {}", o.status, why(o)).into())
    } else if !out.contains(needle) {
        Err(format!("succeeded without saying `{needle}`: {out}").into())
    } else {
        Ok(out)
    }
}

/// Refused (exit `code`) with `needle` on stderr: the error lines.
fn expect_refused(o: &Output, code: i32, needle: &str) -> Outcome {
    let err = String::from_utf8_lossy(&o.stderr);
    match o.status.code() {
        Some(0) => Err("it succeeded, but must be refused".into()),
        Some(c) if c == code && err.contains(needle) => Ok(format!("refused: {}", why(o))),
        _ => Err(format!("refused, but not with `{needle}` (exit {}): {}", o.status, err.trim()).into()),
    }
}

/// `keygate fetch` of the control plane's key over `kres` (failover, random order), writing
/// into `out`; bounded by [`FETCH_BUDGET`].
fn fetch_cmd(kres: &[String], out: &Path, retries: u32) -> Vec<String> {
    let first = kres.first().map_or("", String::as_str);
    let mut a = vec!["--json".to_owned()];
    a.extend(fetch_args(SEED, (KRE_PCR, CP_PCR), first, out, &[KEY_ID], retries));
    for k in kres.iter().skip(1) {
        a.extend(["--kre".to_owned(), k.clone()]);
    }
    a.extend(["--timeout".to_owned(), FETCH_TIMEOUT.into(), "--budget".into(), FETCH_BUDGET.into()]);
    a
}

/// One fetch's outcome.
#[derive(Debug, Default)]
struct Fetched {
    /// It exited 0 and wrote the key.
    ok: bool,
    /// The audit chain of the member that served it (each member's trail is its own chain).
    chain: String,
    /// It passed over a member (and which, by its release address).
    passed_over: Vec<String>,
    /// The error lines, when it failed.
    error: String,
}

/// Runs one fetch; the key it wrote is returned for comparison in memory.
fn fetch(exe: &Path, kres: &[String], out: &Path) -> (Fetched, Option<Zeroizing<Vec<u8>>>) {
    let o = match run(exe, &fetch_cmd(kres, out, 2)) {
        Ok(o) => o,
        Err(e) => return (Fetched { error: e.message, ..Fetched::default() }, None),
    };
    let err = String::from_utf8_lossy(&o.stderr);
    let passed_over = err
        .lines()
        .filter(|l| l.contains(PASSED_OVER))
        .filter_map(|l| kres.iter().find(|k| l.contains(k.as_str())).cloned())
        .collect();
    if !o.status.success() {
        return (Fetched { passed_over, error: why(&o), ..Fetched::default() }, None);
    }
    let chain = serde_json::from_slice::<serde_json::Value>(&o.stdout)
        .ok()
        .and_then(|v| v.pointer("/receipt/chain_id").and_then(|c| c.as_str()).map(str::to_owned))
        .unwrap_or_default();
    let key = std::fs::read(out.join(format!("{KEY_ID}.key"))).ok().map(Zeroizing::new);
    (Fetched { ok: key.is_some(), chain, passed_over, error: String::new() }, key)
}

/// The phases of the outage, as the background fetches see them when they start.
const ALL_UP: u8 = 0;
const B_DOWN: u8 = 1;
const B_JOINING: u8 = 2;
const B_BACK: u8 = 3;
const PHASES: [&str; 4] = ["every member up", "b killed", "b restarting and joining", "b joined again"];

/// One background fetch: the phases it started and ended in, what happened, and whether the
/// key it got was the cluster's data key.
#[derive(Debug)]
struct Record {
    phase: u8,
    end_phase: u8,
    fetched: Fetched,
    same_key: bool,
}

/// Fetches run one after another on a thread until stopped (or [`MAX_FETCHES`]); stopped
/// and joined when dropped, whatever step the tour is in.
struct Background {
    stop: Arc<AtomicBool>,
    phase: Arc<AtomicU8>,
    records: Arc<Mutex<Vec<Record>>>,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    fn start(exe: &Path, kres: Vec<String>, out: PathBuf, key: Zeroizing<Vec<u8>>) -> Result<Self, CliError> {
        let stop = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(AtomicU8::new(ALL_UP));
        let records = Arc::new(Mutex::new(Vec::new()));
        let (s, p, r, exe) = (stop.clone(), phase.clone(), records.clone(), exe.to_path_buf());
        let thread = std::thread::Builder::new()
            .name("demo-fetches".into())
            .spawn(move || {
                for _ in 0..MAX_FETCHES {
                    if s.load(Ordering::SeqCst) {
                        break;
                    }
                    let at = p.load(Ordering::SeqCst);
                    let (fetched, got) = fetch(&exe, &kres, &out);
                    let same_key = got.is_some_and(|k| *k == *key);
                    let end_phase = p.load(Ordering::SeqCst);
                    let record = Record { phase: at, end_phase, fetched, same_key };
                    r.lock().unwrap_or_else(PoisonError::into_inner).push(record);
                }
            })
            .map_err(|e| CliError::io("starting the demo's fetch thread", e))?;
        Ok(Self { stop, phase, records, thread: Some(thread) })
    }

    fn set_phase(&self, phase: u8) {
        self.phase.store(phase, Ordering::SeqCst);
    }

    /// Successful fetches that started in `phase` so far.
    fn succeeded_in(&self, phase: u8) -> usize {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|r| r.phase == phase && r.fetched.ok)
            .count()
    }

    /// Waits until `n` fetches started in `phase` succeeded, or `limit` passed.
    fn wait_for(&self, phase: u8, n: usize, limit: Duration) {
        let start = Instant::now();
        while self.succeeded_in(phase) < n && start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the thread after its current fetch; every record.
    fn finish(mut self) -> Vec<Record> {
        self.halt();
        std::mem::take(&mut *self.records.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The verdict on the background fetches: every one succeeded with the cluster's data key,
/// each phase saw at least [`MIN_PER_PHASE`], and none that started while b was down was served
/// by b. `chains` names the members' audit chains (for who served what).
fn judge(records: &[Record], chains: &[(String, &str)], b_release: &str) -> Outcome {
    let failed: Vec<&Record> = records.iter().filter(|r| !r.fetched.ok).collect();
    let wrong_key = records.iter().filter(|r| r.fetched.ok && !r.same_key).count();
    let mut per_phase = Vec::new();
    for (i, name) in PHASES.iter().enumerate() {
        let n = records.iter().filter(|r| usize::from(r.phase) == i).count();
        per_phase.push(format!("{name}: {n}"));
    }
    let count = |p: u8| records.iter().filter(|r| r.phase == p).count();
    let passed_b = records.iter().filter(|r| r.fetched.passed_over.iter().any(|k| k == b_release)).count();
    let served_by =
        |name: &str| records.iter().filter(|r| chains.iter().any(|(c, n)| *n == name && *c == r.fetched.chain)).count();
    let b_while_down = records
        .iter()
        .filter(|r| r.end_phase == B_DOWN && chains.iter().any(|(c, n)| *n == "b" && *c == r.fetched.chain))
        .count();
    let summary = format!(
        "{} fetches, {} failed ({}); served by a: {}, b: {}, c: {}; {passed_b} asked b first and failed over",
        records.len(),
        failed.len(),
        per_phase.join(", "),
        served_by("a"),
        served_by("b"),
        served_by("c"),
    );
    if let Some(first) = failed.first() {
        let phase = PHASES.get(usize::from(first.phase)).unwrap_or(&"?");
        Err(format!("{summary}; the first failure (started while {phase}): {}", first.fetched.error).into())
    } else if wrong_key > 0 {
        Err(format!("{summary}; {wrong_key} released another key than the cluster's").into())
    } else if b_while_down > 0 {
        Err(format!("{summary}; {b_while_down} were served by b while it was killed").into())
    } else if [ALL_UP, B_DOWN, B_BACK].iter().any(|p| count(*p) < MIN_PER_PHASE) {
        Err(format!("{summary}; too few fetches to show anything (at least {MIN_PER_PHASE} per phase)").into())
    } else {
        Ok(format!("{summary}; every one released the same data key"))
    }
}

/// The sealed blob of the newest generation in the etcd store `store`.
fn newest_blob(store: &str) -> Result<Vec<u8>, CliError> {
    use crate::storage::store::SealedStore;
    let url: EtcdUrl = store.parse().map_err(|e| CliError::input(format!("{store}: {e}")))?;
    let loaded =
        crate::cmd::custodian::etcd_store(&url)?.load(0).map_err(|e| CliError::refused(format!("{store}: {e}")))?;
    loaded.map(|l| l.blob).ok_or_else(|| CliError::refused(format!("{store} holds no sealed state")))
}

/// As a parent holding an older copy of the state would: hands `copy` the sealed generation
/// `blob` with the store's custody data (StateLoad), has custodians c1 and c2 (with no record
/// yet) unseal it, and checks that it then waits for a member (`keygate status`, exit 4) and
/// refuses a control plane (`sealed`).
fn unseal_old_copy(ctx: &Ctx, copy: &Kre, blob: &[u8]) -> Outcome {
    use keygate_enclave::wire::Message;
    let url: EtcdUrl = ctx.store.parse().map_err(|e| format!("{}: {e}", ctx.store))?;
    let header = keygate_enclave::state::sealed::peek_header(blob).map_err(|e| format!("the old blob: {e}"))?;
    let custody = crate::cmd::custodian::etcd_store(&url)?
        .load_custody(&header.custodian_set_digest)
        .map_err(|e| format!("{url}: {e}"))?
        .ok_or_else(|| format!("{url} holds no custody data"))?;
    let (shares, genesis_attestation) =
        crate::cmd::custodian::decode_custody(&custody).map_err(|e| format!("{url}: custody: {e}"))?;
    let parent = copy.parent().parse().map_err(|e| format!("{}: {e}", copy.parent()))?;
    let load = Message::StateLoad { blob: blob.to_vec(), shares, genesis_attestation, cold_start: false };
    crate::cmd::custodian::state_report(&parent, &load)?;
    let root = path(&ctx.dir.join("root.pem"));
    expect_ok(&run(&ctx.exe, &["attestation", "mock-root", "--seed", SEED, "-o", &root].map(str::to_owned))?, "")?;
    let custodian = format!("unix:{}.custodian", copy.sock.display());
    for c in ["c1", "c2"] {
        let args = keygate_tests::cluster::unseal_args(&ctx.dir, &custodian, c, KRE_PCR);
        expect_ok(&run(&ctx.exe, &args)?, "")?;
    }
    let status = run(&ctx.exe, &["status".to_owned(), "--kre".into(), copy.parent()])?;
    let shown = String::from_utf8_lossy(&status.stdout);
    let line = shown.lines().find(|l| l.contains("Phase")).unwrap_or_default().trim().to_owned();
    if status.status.code() != Some(4) || !line.contains("waiting for a serving member") {
        return Err(format!("the unsealed copy does not wait for a member: {line}").into());
    }
    let fetched = run(&ctx.exe, &fetch_cmd(&[copy.release()], &ctx.dir.join("keys-c-unsealed"), 0))?;
    let refused = expect_refused(&fetched, 1, "sealed")?;
    Ok(format!("{line}; a control plane: {refused}"))
}

/// A member's name and the key it released, or why it did not.
type MemberKey = (&'static str, Result<Zeroizing<Vec<u8>>, String>);

/// Each of `kres` alone: the key it releases, or why it does not.
fn keys_of(ctx: &Ctx, kres: &[&Kre], tag: &str) -> Vec<MemberKey> {
    kres.iter()
        .map(|k| {
            let (f, key) = fetch(&ctx.exe, &[k.release()], &ctx.dir.join(format!("keys-{}-{tag}", k.name)));
            (k.name, key.ok_or(f.error))
        })
        .collect()
}

/// The rotation: the approver signs a bundle rotating `prod`'s KEK; `a` takes it and its
/// parent commits generation 2 to etcd.
fn rotate(ctx: &Ctx, a: &Kre) -> Outcome {
    let d = &ctx.dir;
    let (proposal, sig, bundle) = (d.join("v2.proposal"), d.join("v2.sig"), d.join("v2.bundle"));
    let genesis = path(&ctx.genesis);
    let cli = |args: &[&str]| keygate_cli(&ctx.exe, &args.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>());
    cli(&["policy", "propose", "--from", &genesis, "--rotate", "prod", "-o", &path(&proposal)])?;
    let key = path(&d.join("approver.pem"));
    cli(&["policy", "sign", &path(&proposal), "--key", &key, "--current", &genesis, "--yes", "-o", &path(&sig)])?;
    cli(&["policy", "assemble", &path(&proposal), &path(&sig), "-o", &path(&bundle)])?;
    push_rotation(ctx, a)?;
    let o = run(&ctx.exe, &["state", "sync", "--kre", &a.parent(), "--store", &ctx.store].map(str::to_owned))?;
    expect_ok(&o, "committed generation 2")
}

/// `keygate policy push` of the rotation to `k` (its parent's own bundle store).
fn push_rotation(ctx: &Ctx, k: &Kre) -> Outcome {
    let bundles = path(&ctx.dir.join(format!("bundles-{}", k.name)));
    let bundle = path(&ctx.dir.join("v2.bundle"));
    let args = ["policy", "push", &bundle, "--kre", &k.parent(), "--store", &bundles, "--durable-within", "0"];
    keygate_cli(&ctx.exe, &args.map(str::to_owned))
}

/// The cluster tour.
pub(super) fn cluster_tour(tour: &mut Tour) -> Result<(), CliError> {
    need_etcd(Path::new(ETCD_BIN))?;
    let began = Instant::now();
    let exe = std::env::current_exe().map_err(|e| CliError::io("locating keygate", e))?;
    let kre_bin = sibling_binary("keygate-enclave-dev")?;
    let tmp = TempDir::new("keygate-demo-cluster").map_err(|e| CliError::io("creating the demo directory", e))?;
    let d = tmp.path();

    tour.section("A real etcd cluster holds the members' sealed state (ciphertext only)");
    let started = Instant::now();
    let etcd = EtcdCluster::start(ETCD_MEMBERS).map_err(|e| CliError::refused(format!("starting etcd: {e}")))?;
    let store = etcd.url("/keygate");
    tour.step(
        &format!("{ETCD_MEMBERS} etcd members (Debian's etcd-server) start on loopback and report healthy"),
        Ok(format!("{store}, healthy after {} ms", started.elapsed().as_millis())),
    );
    let ctx = Ctx { exe, kre_bin, dir: d.to_path_buf(), genesis: d.join("genesis.bundle"), store };

    tour.section("Genesis names the members a, b and c, one per parent instance");
    for k in ["c1", "c2", "c3", "approver"] {
        keygate_cli(&ctx.exe, &["keygen".into(), "-o".into(), path(&d.join(format!("{k}.pem")))])
            .map_err(CliError::refused)?;
    }
    let init = d.join("init.bundle");
    keygate_cli(
        &ctx.exe,
        &["policy", "init", "--approver", &path(&d.join("approver.pub.pem")), "--threshold", "1", "-o", &path(&init)]
            .map(str::to_owned),
    )
    .map_err(CliError::refused)?;
    let genesis = std::fs::read(&init).map_err(|e| CliError::io("reading the genesis bundle", e)).and_then(|g| {
        genesis_bundle_with_members(&g, &prod_policy_for("control-plane", CP_PCR), &MEMBERS)
            .map_err(|e| CliError::refused(format!("the genesis bundle: {e}")))
    })?;
    std::fs::write(&ctx.genesis, genesis).map_err(|e| CliError::io("writing the genesis bundle", e))?;
    let shown = keygate_cli(&ctx.exe, &["policy".into(), "show".into(), path(&ctx.genesis)]);
    tour.step(
        "three custodians (2 of 3 unseal) and an approver make keys; the genesis bundle, built into the KRE image, allows the control-plane image in cluster `prod` and names the members by their parent instances (PCR4)",
        shown.and_then(|s| {
            let members: Vec<&str> = s.lines().map(str::trim).filter(|l| l.contains("member ")).collect();
            if members.len() == MEMBERS.len() {
                Ok(members.join("; "))
            } else {
                Err(format!("`keygate policy show` lists {} members: {s}", members.len()).into())
            }
        }),
    );

    tour.section("Three member KREs of one image; genesis on a, b and c join from a without custodians");
    let mut kres: [Kre; 3] = MEMBERS.map(|(n, i)| Kre::new(&ctx, n, i));
    for k in &mut kres {
        k.start(&ctx)?;
    }
    tour.step(
        "a, b and c are up, each on its own mock parent instance, awaiting their state",
        Ok(kres
            .iter()
            .map(|k| format!("{} on {} ({})", k.name, k.sock.display(), k.instance))
            .collect::<Vec<_>>()
            .join("; ")),
    );
    let [a, b, c] = &mut kres;
    let on_store = |verb: &str, sub: &str, kre: &Kre| {
        let mut args = [verb, sub, "--kre"].map(str::to_owned).to_vec();
        args.extend([kre.parent(), "--store".into(), ctx.store.clone()]);
        args
    };
    tour.step(
        "genesis on a: it seals its state for 2 of 3 custodians; a's parent stores it in etcd before a serves",
        run(&ctx.exe, &on_store("custodian", "init", a))
            .map_err(Misbehaved::from)
            .and_then(|o| expect_ok(&o, "and committed")),
    );
    let join = |joiner: &Kre, from: &Kre| -> Result<(Outcome, Duration), CliError> {
        let mut args = ["member", "join", "--kre"].map(str::to_owned).to_vec();
        args.extend([joiner.parent(), "--from".into(), unix(&from.member_sock()), "--store".into(), ctx.store.clone()]);
        let started = Instant::now();
        let o = run(&ctx.exe, &args)?;
        Ok((expect_ok(&o, "the KRE serves generation"), started.elapsed()))
    };
    for joiner in [&*b, &*c] {
        let (outcome, _) = join(joiner, &*a)?;
        tour.step(
            &format!(
                "{} joins from a (`keygate member join`): a checks its attestation and membership and forwards the state key; no custodian acts",
                joiner.name
            ),
            outcome,
        );
    }
    // Each member alone: the same data key, and the audit chain that names who served.
    let mut chains: Vec<(String, &str)> = Vec::new();
    let mut reference: Option<Zeroizing<Vec<u8>>> = None;
    let mut alone = Vec::new();
    for k in [&*a, &*b, &*c] {
        let (f, key) = fetch(&ctx.exe, &[k.release()], &d.join(format!("keys-{}", k.name)));
        match (key, &reference) {
            (Some(key), None) => {
                chains.push((f.chain, k.name));
                reference = Some(key);
                alone.push(format!("{}: released", k.name));
            }
            (Some(key), Some(r)) if key == *r => {
                chains.push((f.chain, k.name));
                alone.push(format!("{}: the same key", k.name));
            }
            (Some(_), Some(_)) => alone.push(format!("{}: ANOTHER KEY", k.name)),
            (None, _) => alone.push(format!("{}: FAILED: {}", k.name, f.error)),
        }
    }
    let all_same = chains.len() == MEMBERS.len();
    tour.step(
        "a control plane asking each member alone gets the same data key from all three (compared in memory, never printed)",
        if all_same { Ok(alone.join("; ")) } else { Err(alone.join("; ").into()) },
    );
    let Some(key) = reference else {
        return Err(CliError::refused("no member released the data key: the cluster tour cannot go on"));
    };

    tour.section("Member b is killed while control planes fetch keys continuously from a, b and c");
    let all: Vec<String> = [&*a, &*b, &*c].iter().map(|k| k.release()).collect();
    let bg = Background::start(&ctx.exe, all, d.join("keys-failover"), key.clone())?;
    bg.wait_for(ALL_UP, MIN_PER_PHASE, PHASE);
    tour.step(
        "fetches run one after another in the background: `keygate fetch --kre a --kre b --kre c` (failover from a random first member)",
        Ok(format!("{} succeeded so far", bg.succeeded_in(ALL_UP))),
    );
    bg.set_phase(B_DOWN);
    b.kill();
    let refused = std::os::unix::net::UnixStream::connect(&b.sock).is_err();
    tour.step(
        "b is killed with SIGKILL (kill -9): its socket no longer answers",
        if refused { Ok("connections to b are refused".to_owned()) } else { Err("b still answers".into()) },
    );
    std::thread::sleep(PHASE);
    bg.wait_for(B_DOWN, MIN_PER_PHASE, PHASE);

    bg.set_phase(B_JOINING);
    let restarted = Instant::now();
    b.start(&ctx)?;
    let listening = restarted.elapsed();
    let (joined, join_took) = join(&*b, &*a)?;
    let serving = restarted.elapsed();
    tour.step(
        "b is restarted (sealed, no key) and joins again from a serving member, without custodians",
        joined.map(|o| {
            format!(
                "{o}; restart to serving: {} ms (process start to listening {} ms, `keygate member join` {} ms)",
                serving.as_millis(),
                listening.as_millis(),
                join_took.as_millis()
            )
        }),
    );
    bg.set_phase(B_BACK);
    let (f, again) = fetch(&ctx.exe, &[b.release()], &d.join("keys-b-again"));
    let b_again = match again {
        Some(k) if k == key => {
            chains.push((f.chain, "b"));
            Ok("the same data key".to_owned())
        }
        Some(_) => Err("another key".into()),
        None => Err(Misbehaved::from(format!("the fetch failed: {}", f.error))),
    };
    tour.step("b alone releases the cluster's data key again", b_again);
    std::thread::sleep(PHASE);
    bg.wait_for(B_BACK, MIN_PER_PHASE, PHASE);
    let records = bg.finish();
    tour.step(
        "no fetch failed while b was killed, restarted and joined again (each counted by the phase it started in)",
        judge(&records, &chains, &b.release()),
    );

    tour.section("A rotation: a commits generation 2 to etcd; b and c adopt it");
    // Generation 1 as an old copy of the store (or its `state.previous`) keeps it.
    let old_blob = Zeroizing::new(newest_blob(&ctx.store)?);
    tour.step(
        "the approver signs a rotation of `prod`'s KEK; a takes it and its parent commits generation 2 to etcd",
        rotate(&ctx, a),
    );
    for k in [&*b, &*c] {
        let args = ["state", "sync", "--kre", &k.parent(), "--store", &ctx.store].map(str::to_owned);
        let adopted = run(&ctx.exe, &args)
            .map_err(Misbehaved::from)
            .and_then(|o| expect_ok(&o, "the KRE adopted it and serves generation 2"))
            .and_then(|o| push_rotation(&ctx, k).map(|_| format!("{o}; the bundle is replayed to it")));
        tour.step(
            &format!(
                "{}'s parent finds generation 2 in etcd and hands it to {0} (StateAdopt), then replays the bundle",
                k.name
            ),
            adopted,
        );
    }
    let rotated = keys_of(&ctx, &[&*a, &*b, &*c], "v2");
    let firsts: Vec<&Zeroizing<Vec<u8>>> = rotated.iter().filter_map(|(_, k)| k.as_ref().ok()).collect();
    let failures: Vec<String> =
        rotated.iter().filter_map(|(n, k)| k.as_ref().err().map(|e| format!("{n}: {e}"))).collect();
    tour.step(
        "a, b and c release the same rotated data key, not the one before (compared in memory)",
        if !failures.is_empty() {
            Err(failures.join("; ").into())
        } else if firsts.windows(2).any(|w| w[0] != w[1]) {
            Err("the members release different keys".into())
        } else if firsts.iter().any(|k| **k == key) {
            Err("the key did not change".into())
        } else {
            Ok("the same new key from all three".to_owned())
        },
    );

    tour.section(
        "A forked KRE is refused: the same image on a parent instance that is no member, or an older generation",
    );
    let mut fork = Kre::new(&ctx, "d", FORK_INSTANCE);
    fork.start(&ctx)?;
    let (forked, _) = join(&fork, &*a)?;
    tour.step(
        "d (the same image and genesis, on instance i-d) asks a for the state key: a refuses it",
        match forked {
            Ok(o) => Err(format!("d joined: {o}").into()),
            Err(e) if e.says("image_not_allowed") => {
                Ok(e.to_string().replacen("failed (exit status: 1)", "refused", 1))
            }
            Err(e) => Err(format!("refused for another reason: {e}").into()),
        },
    );
    let fork_fetch = fetch_cmd(&[fork.release()], &d.join("keys-d"), 0);
    tour.step(
        "d keeps no key: a control plane asking it is refused (sealed)",
        run(&ctx.exe, &fork_fetch).map_err(Misbehaved::from).and_then(|o| expect_refused(&o, 1, "sealed")),
    );

    // A copy of member c on c's own instance, whose parent hands it the older generation 1
    // instead of the generation 2 that a vouches for.
    let mut copy = Kre::new(&ctx, "c-old", "i-c");
    copy.start(&ctx)?;
    let addr = |s: String| s.parse().map_err(|e| CliError::input(format!("{s}: {e}")));
    let at = StateAt::Etcd(ctx.store.parse().map_err(|e| CliError::input(format!("{}: {e}", ctx.store)))?);
    let forged =
        crate::cmd::member::join_handing(&addr(copy.parent())?, &[addr(unix(&a.member_sock()))?], &at, |mut stored| {
            stored.blob = old_blob.to_vec();
            stored
        });
    tour.step(
        "a copy of member c (its own instance i-c) joins from a, but its parent hands it the stored generation 1 instead of the generation 2 a vouched for: the copy refuses it",
        match forged {
            Ok(j) => Err(format!("the copy took it and serves generation {}", j.report.committed_generation).into()),
            Err(e) if e.message.contains("state_refused") => Ok(format!("refused: {}", e.message)),
            Err(e) => Err(format!("refused for another reason: {}", e.message).into()),
        },
    );
    let copy_fetch = fetch_cmd(&[copy.release()], &d.join("keys-c-old"), 0);
    tour.step(
        "the copy keeps no key: a control plane asking it is refused (sealed)",
        run(&ctx.exe, &copy_fetch).map_err(Misbehaved::from).and_then(|o| expect_refused(&o, 1, "sealed")),
    );
    drop(copy);

    // Another copy of c, unsealed by custodians from generation 1 (the parent's older copy of
    // the state): it waits for a serving member, whose confirmation brings generation 2.
    let mut unsealed = Kre::new(&ctx, "c-unsealed", "i-c");
    unsealed.start(&ctx)?;
    tour.step(
        "another copy of c is handed generation 1 by its parent and unsealed by two custodians whose records never saw generation 2: it waits for a serving member's confirmation and releases nothing",
        unseal_old_copy(&ctx, &unsealed, &old_blob),
    );
    let (confirmed, _) = join(&unsealed, &*a)?;
    tour.step(
        "its parent carries a join from a (`keygate member join`): a vouches for generation 2, which the copy takes instead of generation 1",
        confirmed.and_then(|out| {
            if out.contains("serves generation 2") {
                Ok(out)
            } else {
                Err(format!("the copy serves another generation: {out}").into())
            }
        }),
    );
    drop(unsealed);

    tour.section("`keygate status` of the members");
    let mut tables = Vec::new();
    let mut statuses = Vec::new();
    for k in [&*a, &*b, &*c] {
        let o = run(&ctx.exe, &["status".to_owned(), "--kre".into(), k.parent()])?;
        let this = format!("3 (a, b, c); this KRE is {}", k.name);
        statuses.push(expect_ok(&o, &this).and_then(|out| {
            if out.contains("2 committed") {
                Ok(format!("{}: serving generation 2, {this}", k.name))
            } else {
                Err(format!("{} does not serve generation 2: {out}", k.name).into())
            }
        }));
        tables.push((k.name, String::from_utf8_lossy(&o.stdout).into_owned()));
    }
    let o = run(&ctx.exe, &["status".to_owned(), "--kre".into(), fork.parent()])?;
    let not_one = String::from_utf8_lossy(&o.stdout).contains("this KRE is not one of them");
    statuses.push(match expect_refused(&o, 4, "not serving") {
        Ok(_) if not_one => Ok("d: not serving, not one of the members".to_owned()),
        Ok(_) => Err("d's status does not say it is no member".into()),
        Err(e) => Err(e),
    });
    let failed: Vec<String> = statuses.iter().filter_map(|s| s.as_ref().err().map(ToString::to_string)).collect();
    let passed: Vec<String> = statuses.iter().filter_map(|s| s.as_ref().ok().cloned()).collect();
    tour.step(
        "a, b and c serve generation 2 and name the members and themselves; d serves nothing and is no member",
        if failed.is_empty() { Ok(passed.join("; ")) } else { Err(failed.join("; ").into()) },
    );
    for (name, table) in &tables {
        println!("\n       member {name}:");
        for line in table.lines() {
            println!("       {line}");
        }
    }
    drop(fork);
    drop(kres);
    drop(etcd);
    drop(tmp);
    println!("\n  the cluster tour took {:.1} s", began.elapsed().as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_etcd_fails_at_once_naming_the_set_up_script() {
        let e = need_etcd(Path::new("/nonexistent/etcd")).expect_err("missing");
        assert_eq!(e.code, 2);
        assert!(e.message.contains("bash .ci/etcd-deps.sh"), "{}", e.message);
    }

    fn record(phase: u8, ok: bool, chain: &str) -> Record {
        let fetched = Fetched { ok, chain: chain.into(), passed_over: vec![], error: "boom".into() };
        Record { phase, end_phase: phase, fetched, same_key: ok }
    }

    #[test]
    fn the_fetches_pass_only_if_none_failed_each_phase_saw_some_and_b_served_none_while_down() {
        let chains = vec![("ca".to_owned(), "a"), ("cb".to_owned(), "b"), ("cc".to_owned(), "c")];
        let good: Vec<Record> = [ALL_UP, ALL_UP, B_DOWN, B_DOWN, B_JOINING, B_BACK, B_BACK]
            .iter()
            .map(|p| record(*p, true, if *p == B_DOWN { "ca" } else { "cb" }))
            .collect();
        assert!(judge(&good, &chains, "unix:b").is_ok());
        let mut one_failed = good;
        one_failed.push(record(B_DOWN, false, ""));
        assert!(judge(&one_failed, &chains, "unix:b").is_err_and(|e| e.says("1 failed")));
        let mut wrong = vec![record(ALL_UP, true, "ca"), record(ALL_UP, true, "ca")];
        wrong.extend([record(B_DOWN, true, "cb"), record(B_DOWN, true, "ca")]);
        wrong.extend([record(B_BACK, true, "cb"), record(B_BACK, true, "cb")]);
        assert!(judge(&wrong, &chains, "unix:b").is_err_and(|e| e.says("served by b while it was killed")));
        let few = vec![record(ALL_UP, true, "ca"), record(ALL_UP, true, "ca"), record(B_BACK, true, "cb")];
        assert!(judge(&few, &chains, "unix:b").is_err_and(|e| e.says("too few")));
        let mut other_key = vec![record(ALL_UP, true, "ca"), record(ALL_UP, true, "ca")];
        other_key.extend([record(B_DOWN, true, "ca"), record(B_DOWN, true, "ca")]);
        other_key.extend([record(B_BACK, true, "cb"), record(B_BACK, true, "cb")]);
        other_key[0].same_key = false;
        assert!(judge(&other_key, &chains, "unix:b").is_err_and(|e| e.says("another key")));
    }
}
