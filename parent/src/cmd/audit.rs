//! `keygate audit pull | verify | show | export` and `keygate status`: the parent's collection of the
//! KRE's audit trail (`pull`, stored and acknowledged through [`append_to_dir`] or, with
//! `--store etcd://…`, `storage::audit`; `export` writes the trails in etcd into a directory), the customer's
//! offline check of a stored trail and its human-readable / JSON Lines rendering. The format and the checks are specified in docs/audit.md; every
//! decision is made by `keygate_enclave::audit`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use keygate_attestation::{PcrExpectation, Verifier};
use keygate_enclave::audit::store::{self, AppendReport, StoreError, StoredTrail};
use keygate_enclave::audit::{
    check_receipt, verify_history, verify_trail_with, AuditEntry, AuditEvent, Checkpoint, HistoryGap, HistoryReport,
    Receipt, Requester, TrailOptions, TrailSummary, RECEIPT_LEN,
};
use serde_json::{json, Value};

use crate::backoff::Backoff;
use crate::cmd::args::format_time_ms;
use crate::cmd::attestation::load_anchor;
use crate::error::CliError;
use crate::kre_client::{self, KreError};
use crate::storage::audit::{AuditStore, AuditStoreError, EtcdAudit};
use crate::storage::etcd::{EtcdClient, EtcdUrl};

#[derive(Debug, clap::Subcommand)]
pub(crate) enum AuditCommand {
    /// Verify a stored trail offline: the hash chain, every checkpoint signature, and the
    /// attestation that binds the checkpoint key to a KRE image (at the document's own time).
    Verify(VerifyArgs),
    /// Print a stored trail as a table, or as JSON Lines for a SIEM (does not verify).
    Show(ShowArgs),
    /// Collect the KRE's audit entries into DIR (append-only) or etcd and acknowledge them, so
    /// the KRE can free its buffer. `--follow` keeps collecting.
    Pull(PullArgs),
    /// Write every KRE run stored in etcd into a directory, as `audit pull --dir` lays it out
    /// (the first run in DIR, each later one in `DIR/chain-<chain id prefix>`), for `audit
    /// verify DIR` and for archiving. Nothing is checked: verify the result.
    Export(ExportArgs),
}

#[derive(Debug, clap::Args)]
pub(crate) struct ExportArgs {
    /// The trails in etcd: etcd://HOST:PORT[,HOST:PORT...][/PREFIX] (as `audit pull --store`).
    #[arg(long, value_name = "URL")]
    store: EtcdUrl,
    /// A new directory (or one without an audit trail): existing files are never replaced.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
}

#[derive(Debug, clap::Args)]
pub(crate) struct PullArgs {
    /// The KRE's parent channel (`--parent-listen`; never proxied).
    #[arg(long)]
    kre: keygate_enclave::net::transport::Addr,
    /// The audit directory: the first KRE run's chain, and each later run's in
    /// `DIR/chain-<chain id prefix>` (`audit verify DIR` checks them all and their links).
    #[arg(long, required_unless_present = "store", conflicts_with = "store")]
    dir: Option<PathBuf>,
    /// Instead of --dir: DIR, or etcd://HOST:PORT[,HOST:PORT...][/PREFIX] to keep each run's
    /// chain in etcd, shared by the parents of a cluster (`PREFIX/audit/<chain id>/…`;
    /// `audit export` writes it into a directory).
    #[arg(long, value_name = "DIR|URL")]
    store: Option<AuditStore>,
    /// Keep collecting until interrupted: each round waits in the KRE up to this long (a
    /// duration, e.g. 1s or 500ms; at most 5s) for new entries, stores them (fsynced, many per fsync) and acknowledges
    /// them at once; the KRE withholds each release's answer until then. A failed round is
    /// reported and retried (backoff 1 s doubling to 30 s); after a KRE restart its new chain
    /// goes to `DIR/chain-<chain id prefix>`.
    #[arg(long, value_parser = super::args::parse_duration, value_name = "DURATION")]
    follow: Option<std::time::Duration>,
}

#[derive(Debug, clap::Args)]
pub(crate) struct VerifyArgs {
    /// The audit directory (entries.log, checkpoints.log), with every later run's chain in
    /// `chain-*` subdirectories: each run is verified, and each run's link to the one before
    /// it must name an entry (seq and digest) that run's stored trail holds; every gap is named.
    /// Or etcd://HOST:PORT[,…][/PREFIX]: every run stored there, checked the same way.
    dir: PathBuf,
    /// Trust this root (PEM) instead of the built-in AWS Nitro Enclaves root.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Require the KRE's PCR N to equal HEX (repeatable; pin at least PCR0-2).
    #[arg(long = "expect-kre-pcr", value_name = "N=HEX")]
    expect_kre_pcr: Vec<PcrExpectation>,
    /// Accept a debug-mode KRE (PCR0-2 zero). For demos only.
    #[arg(long)]
    allow_debug: bool,
    /// Also prove that the trail holds the entry of every audit receipt in PATH: a receipt
    /// file, or a directory of `*.receipt` files as `keygate fetch` (`<out>/receipts`) and the
    /// KMS plugin (`--receipts`) keep them. Each receipt must be signed by the trail's attested
    /// audit key, and its entry stored with the digest it names; every one that is not is named.
    #[arg(long, value_name = "PATH")]
    receipts: Option<PathBuf>,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

/// Most receipt files read from one directory.
const MAX_RECEIPT_FILES: usize = 1_000_000;

/// A receipt file and its decoding (or why it holds no receipt).
type LoadedReceipt = (PathBuf, Result<Receipt, UnreadableReceipt>);

/// Why a receipt file holds no receipt.
#[derive(Debug, thiserror::Error)]
enum UnreadableReceipt {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not a regular file")]
    NotAFile,
    #[error("malformed receipt: {0}")]
    Malformed(#[from] keygate_enclave::audit::DecodeError),
}

/// The receipts at `path` (a file, or the `*.receipt` files of a directory, by name), each
/// with its decoding: a malformed one is a receipt that proves nothing, named like a missing one.
fn load_receipts(path: &Path) -> Result<Vec<LoadedReceipt>, CliError> {
    let meta = std::fs::metadata(path).map_err(|e| CliError::io(format!("receipts {}", path.display()), e))?;
    let files = if meta.is_dir() {
        let mut files = Vec::new();
        let list = std::fs::read_dir(path).map_err(|e| CliError::io(format!("receipts {}", path.display()), e))?;
        for entry in list {
            let entry = entry.map_err(|e| CliError::io(format!("receipts {}", path.display()), e))?;
            if entry.file_name().to_str().is_some_and(|n| n.ends_with(".receipt") && !n.starts_with('.')) {
                if files.len() == MAX_RECEIPT_FILES {
                    return Err(CliError::input(format!(
                        "more than {MAX_RECEIPT_FILES} receipts in {}: verify them in parts",
                        path.display()
                    )));
                }
                files.push(entry.path());
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(CliError::input(format!("no *.receipt files in {}", path.display())));
        }
        files
    } else {
        vec![path.to_path_buf()]
    };
    Ok(files
        .into_iter()
        .map(|f| {
            let decoded = read_receipt(&f);
            (f, decoded)
        })
        .collect())
}

/// One receipt file: a regular file of exactly [`RECEIPT_LEN`] bytes (read no further).
fn read_receipt(path: &Path) -> Result<Receipt, UnreadableReceipt> {
    use std::io::Read as _;
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.file_type().is_file() {
        return Err(UnreadableReceipt::NotAFile);
    }
    let mut bytes = Vec::with_capacity(RECEIPT_LEN + 1);
    let limit = u64::try_from(RECEIPT_LEN + 1).unwrap_or(u64::MAX);
    std::fs::File::open(path).and_then(|f| f.take(limit).read_to_end(&mut bytes))?;
    Ok(Receipt::decode(&bytes)?)
}

/// A receipt that does not prove its entry is in the trail.
struct ReceiptFailure {
    path: PathBuf,
    seq: Option<u64>,
    kind: &'static str,
    message: String,
}

impl ReceiptFailure {
    fn line(&self) -> String {
        match self.seq {
            Some(seq) => format!("receipt {} (seq {seq}): {}", self.path.display(), self.message),
            None => format!("receipt {}: {}", self.path.display(), self.message),
        }
    }
}

/// Checks each receipt against the verified run of its chain (the first run when none has
/// it, which names it as foreign); returns how many were checked and the failures.
fn check_receipts(
    path: &Path,
    verified: &[(&TrailSummary, &StoredTrail)],
    verifier: &Verifier,
) -> Result<(usize, Vec<ReceiptFailure>), CliError> {
    let receipts = load_receipts(path)?;
    let mut failures = Vec::new();
    for (path, receipt) in &receipts {
        let failure = match receipt {
            Err(e) => Some(ReceiptFailure { path: path.clone(), seq: None, kind: "malformed", message: e.to_string() }),
            Ok(r) => {
                let run = verified.iter().find(|(s, _)| s.chain_id == *r.chain_id()).or(verified.first());
                run.and_then(|(summary, trail)| {
                    check_receipt(r, summary, &trail.entries, verifier.crypto()).err().map(|e| ReceiptFailure {
                        path: path.clone(),
                        seq: Some(r.seq()),
                        kind: e.kind(),
                        message: e.to_string(),
                    })
                })
            }
        };
        failures.extend(failure);
    }
    Ok((receipts.len(), failures))
}

#[derive(Debug, clap::Args)]
pub(crate) struct ShowArgs {
    /// The audit directory, or etcd://HOST:PORT[,…][/PREFIX] (every run stored there, one
    /// after the other).
    dir: PathBuf,
    /// One JSON object per line (entries, then checkpoints).
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(cmd: AuditCommand) -> Result<(), CliError> {
    match cmd {
        AuditCommand::Verify(a) => verify(a),
        AuditCommand::Show(a) => show(a),
        AuditCommand::Pull(a) => pull(a),
        AuditCommand::Export(a) => export(a),
    }
}

/// The last sequence number stored in `dir` (0 for none).
fn stored_last(dir: &Path) -> Result<u64, CliError> {
    match store::read_dir(dir) {
        Ok(t) => Ok(t.entries.last().map_or(0, AuditEntry::seq)),
        Err(_) if !dir.join(store::ENTRIES_FILE).exists() => Ok(0),
        Err(e) => Err(store_error(dir, e)),
    }
}

/// Pulls until the stored trail reaches the KRE's head, storing (fsynced) and acknowledging
/// each batch; returns (entries stored, last seq). `after` is the last stored sequence number
/// when the caller knows it (read from `dir` otherwise). The first request waits up to
/// `wait_ms` for an entry after it (0: answer at once), so a follower stores each entry as
/// soon as it is written: the KRE withholds a release's answer until then.
pub(crate) fn pull_once(
    kre: &keygate_enclave::net::transport::Addr,
    run: &mut Run<'_>,
    after: Option<u64>,
    wait_ms: u16,
) -> Result<(usize, u64), CliError> {
    use keygate_enclave::wire::Message;
    let mut last = match after {
        Some(a) => a,
        None => run.stored_last()?,
    };
    let mut stored = 0;
    let mut wait = wait_ms;
    // Bounded: the KRE's buffer holds at most 65,536 entries, ≥ 1 per batch.
    for _ in 0..100_000 {
        let ask = Message::AuditWait { after_seq: last, max: 1024, wait_ms: wait };
        wait = 0;
        let (entries, checkpoint) = match kre_client::ask(kre, &ask, kre_client::DEFAULT_TIMEOUT)? {
            Message::AuditBatch { entries, checkpoint } => (entries, checkpoint),
            m => return Err(kre_client::unexpected(&m)),
        };
        let entries = entries
            .iter()
            .map(|b| AuditEntry::decode(b).map_err(|e| CliError::refused(format!("malformed entry from the KRE: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let checkpoints = if checkpoint.is_empty() {
            Vec::new()
        } else {
            vec![Checkpoint::decode(&checkpoint).map_err(|e| CliError::refused(format!("malformed checkpoint: {e}")))?]
        };
        let at_head = !checkpoints.is_empty();
        let n = entries.len();
        let report = run.append(&entries, &checkpoints)?;
        stored += report.entries_written;
        if n > 0 {
            last = report.last_seq;
            match kre_client::ask(kre, &Message::AuditAck { up_to_seq: last }, kre_client::DEFAULT_TIMEOUT) {
                Ok(Message::AuditAcked { .. }) => {}
                Err(KreError::Denied { code, reason }) => {
                    return Err(CliError::refused(format!("ack refused: {code}: {reason}")))
                }
                Ok(m) => return Err(kre_client::unexpected(&m)),
                Err(e) => return Err(e.into()),
            }
        }
        if at_head || n == 0 {
            return Ok((stored, last));
        }
    }
    Err(CliError::refused("the KRE kept sending entries beyond any plausible buffer size"))
}

/// Where one KRE run's chain is kept: its directory, or its keys in etcd.
pub(crate) enum Run<'a> {
    /// A directory of the history.
    Dir(PathBuf),
    /// The chain's keys in etcd.
    Etcd(&'a mut EtcdAudit<EtcdClient>, [u8; 48]),
}

impl Run<'_> {
    /// The last stored seq (0 for none).
    fn stored_last(&mut self) -> Result<u64, CliError> {
        match self {
            Run::Dir(dir) => stored_last(dir),
            Run::Etcd(e, chain) => {
                let chain = *chain;
                e.head(&chain).map(|(_, h)| h.seq).map_err(|err| etcd_error(e.keys(&chain).base(), err))
            }
        }
    }

    /// Stores pulled records: fsynced in the directory, or in applied etcd transactions.
    fn append(&mut self, entries: &[AuditEntry], checkpoints: &[Checkpoint]) -> Result<AppendReport, CliError> {
        match self {
            Run::Dir(dir) => append_to_dir(dir, entries, checkpoints),
            Run::Etcd(e, chain) => {
                let chain = *chain;
                e.append(&chain, entries, checkpoints)
                    .map(|r| r.report)
                    .map_err(|err| etcd_error(e.keys(&chain).base(), err))
            }
        }
    }

    /// The run's name in messages.
    fn name(&self) -> String {
        match self {
            Run::Dir(dir) => dir.display().to_string(),
            Run::Etcd(e, chain) => e.keys(chain).base().to_owned(),
        }
    }
}

/// An etcd failure as the CLI reports it: etcd unreachable or failing is an I/O error; a
/// refusal of what it holds or what was pulled is a refusal.
fn etcd_error(name: &str, err: AuditStoreError) -> CliError {
    match err {
        AuditStoreError::Etcd(_) => CliError::io(format!("audit store {name}"), err),
        other => CliError::refused(format!("audit store {name}: {other}")),
    }
}

/// Every run stored in etcd under `url`'s prefix (at most [`store::MAX_RUNS`]): its chain, its
/// name (the chain's key prefix) and its trail, read whole and strictly decoded, not verified.
fn etcd_runs(url: &EtcdUrl) -> Result<Vec<([u8; 48], PathBuf, StoredTrail)>, CliError> {
    let name = url.to_string();
    let mut e = EtcdAudit::connect(url).map_err(|err| etcd_error(&name, err))?;
    let chains = e.chains(store::MAX_RUNS).map_err(|err| etcd_error(&name, err))?;
    chains
        .into_iter()
        .map(|c| {
            let base = format!("etcd://{}{}", url.endpoints.join(","), e.keys(&c).base());
            let t = e.read(&c).map_err(|err| etcd_error(&base, err))?;
            Ok((c, PathBuf::from(base), t))
        })
        .collect()
}

/// `audit export`: every run in etcd into a directory, laid out as `audit pull --dir` lays a
/// history out (the first run by the links in DIR, each later one in `DIR/chain-…`), the
/// records byte for byte as stored. Existing files are never replaced.
fn export(a: ExportArgs) -> Result<(), CliError> {
    let runs = etcd_runs(&a.store)?;
    if runs.is_empty() {
        return Err(CliError::refused(format!("no audit trail is stored under {}", a.store)));
    }
    let history = verify_history(&runs.iter().map(|(_, _, t)| t.entries.as_slice()).collect::<Vec<_>>());
    // Placed runs in history order, then any without entries (verify names what is wrong).
    let mut order: Vec<usize> = history.runs.iter().map(|r| r.index).collect();
    order.extend((0..runs.len()).filter(|i| !history.runs.iter().any(|r| r.index == *i)));
    let (mut entries, mut checkpoints) = (0, 0);
    let mut text = String::new();
    let mut dirs = Vec::new();
    for (k, &i) in order.iter().enumerate() {
        let (chain, name, t) = &runs[i];
        let dir = if k == 0 { a.dir.clone() } else { a.dir.join(store::run_dir_name(chain)) };
        write_run(&dir, t)?;
        entries += t.entries.len();
        checkpoints += t.checkpoints.len();
        let _ = writeln!(
            text,
            "exported {} ({} entries, {} checkpoints) into {}",
            name.display(),
            t.entries.len(),
            t.checkpoints.len(),
            dir.display()
        );
        dirs.push(json!({ "chain_id": hex::encode(chain), "dir": dir.display().to_string(),
            "entries": t.entries.len(), "checkpoints": t.checkpoints.len() }));
    }
    let _ = writeln!(
        text,
        "{} run(s), {entries} entries, {checkpoints} checkpoints: run `keygate audit verify {}`",
        order.len(),
        a.dir.display()
    );
    crate::output::print(&crate::output::Shown { json: json!({ "runs": dirs }), text })
}

/// Writes one run's files into `dir` (created if needed), each whole and atomically, never
/// over an existing file.
fn write_run(dir: &Path, t: &StoredTrail) -> Result<(), CliError> {
    use keygate_enclave::atomic::{write_file_with, AtomicWriteError, WriteOptions};
    use keygate_enclave::audit::files::{frame_record, CHECKPOINTS_MAGIC, ENTRIES_MAGIC};
    std::fs::create_dir_all(dir).map_err(|e| CliError::io(format!("creating {}", dir.display()), e))?;
    let mut es = ENTRIES_MAGIC.to_vec();
    for e in &t.entries {
        es.extend_from_slice(&frame_record(e.bytes()));
    }
    let mut cs = CHECKPOINTS_MAGIC.to_vec();
    for c in &t.checkpoints {
        cs.extend_from_slice(&frame_record(c.bytes()));
    }
    let once = WriteOptions { mode: 0o666, replace: false };
    for (name, bytes) in [(store::ENTRIES_FILE, es), (store::CHECKPOINTS_FILE, cs)] {
        let path = dir.join(name);
        match write_file_with(&path, &bytes, once) {
            Ok(()) => {}
            Err(AtomicWriteError::Exists(_)) => {
                return Err(CliError::refused(format!("{} exists: export into a new directory", path.display())))
            }
            Err(e) => return Err(CliError::io(format!("writing {}", path.display()), e)),
        }
    }
    Ok(())
}

fn pull(a: PullArgs) -> Result<(), CliError> {
    let store = match (a.store, a.dir) {
        (Some(s), _) => s,
        (None, Some(d)) => AuditStore::Dir(d),
        (None, None) => return Err(CliError::input("give --dir DIR or --store DIR|etcd://…")),
    };
    let Some(every) = a.follow else {
        let mut follower = Follower::new(a.kre.clone(), store, std::time::Duration::from_millis(1));
        let (stored, last, name) = follower.once()?;
        return crate::output::print(&stored_line(stored, &name, last));
    };
    // Following: a failed round (KRE restarting, a refused pull, disk full) is reported on one
    // line and retried after a bounded backoff, reset by the next successful round; nothing is
    // acknowledged that was not stored.
    let mut follower = Follower::new(a.kre, store, every);
    let mut backoff = pull_backoff();
    loop {
        match follower.round() {
            Ok(line) => {
                if let Some(line) = line {
                    crate::output::print(&line)?;
                }
                backoff.reset();
            }
            Err(e) => {
                let wait = backoff.next_wait();
                let m = format!("audit pull: {}; retrying in {} s", e.message, wait.as_secs());
                crate::output::warn(
                    &format!("keygate: {} {m}", format_time_ms(keygate_enclave::net::server::now_ms())),
                    &m,
                );
                std::thread::sleep(wait);
            }
        }
    }
}

/// `audit pull --follow`'s wait after failed rounds: 1 s, doubled after each failure up to 30 s.
fn pull_backoff() -> Backoff {
    Backoff::new(std::time::Duration::from_secs(1), std::time::Duration::from_secs(30), 0)
}

/// A follower of the KRE's audit trail between its rounds (`audit pull --follow` and the
/// audit task of `keygate parent`). Each round waits in the KRE for new entries (so releases
/// wait only for one store and fsync, not for a polling period); the run's directory and its
/// last stored sequence number are kept between rounds, and read again (the KRE's status,
/// the disk) on the first round, after an error and every 64 rounds.
pub(crate) struct Follower {
    kre: keygate_enclave::net::transport::Addr,
    store: AuditStore,
    /// The etcd store, opened on the first round (its connection kept between rounds).
    etcd: Option<EtcdAudit<EtcdClient>>,
    wait_ms: u16,
    known: Option<(Known, u64)>,
    rounds: u64,
}

/// The current run, as a round found it: its directory, or its chain id (in etcd).
#[derive(Debug, Clone)]
enum Known {
    Dir(PathBuf),
    Chain([u8; 48]),
}

impl Follower {
    /// Follows `kre` into `store`, each round waiting in the KRE up to `wait` (1 ms to 5 s).
    pub(crate) fn new(
        kre: keygate_enclave::net::transport::Addr,
        store: AuditStore,
        wait: std::time::Duration,
    ) -> Self {
        let wait_ms =
            u16::try_from(wait.as_millis()).unwrap_or(u16::MAX).clamp(1, keygate_enclave::wire::MAX_AUDIT_WAIT_MS);
        Self { kre, store, etcd: None, wait_ms, known: None, rounds: 0 }
    }

    /// The current run: its directory (a history of runs: see [`run_dir`]) or its chain.
    fn locate(&mut self) -> Result<Known, CliError> {
        match &self.store {
            AuditStore::Dir(dir) => run_dir(&self.kre, dir).map(Known::Dir),
            AuditStore::Etcd(_) => kre_chain(&self.kre).map(Known::Chain),
        }
    }

    /// Pulls into `known` (after `after`, waiting `wait_ms`): (stored, last seq, run name).
    fn pull(&mut self, known: &Known, after: Option<u64>, wait_ms: u16) -> Result<(usize, u64, String), CliError> {
        let mut run = match (known, &self.store) {
            (Known::Dir(d), _) => Run::Dir(d.clone()),
            (Known::Chain(c), AuditStore::Etcd(url)) => {
                if self.etcd.is_none() {
                    let e = EtcdAudit::connect(url).map_err(|e| CliError::io(format!("audit store {url}"), e))?;
                    self.etcd = Some(e);
                }
                let Some(e) = self.etcd.as_mut() else { return Err(CliError::refused("the etcd store is not open")) };
                Run::Etcd(e, *c)
            }
            (Known::Chain(_), AuditStore::Dir(_)) => return Err(CliError::refused("a chain without an etcd store")),
        };
        let (stored, last) = pull_once(&self.kre, &mut run, after, wait_ms)?;
        Ok((stored, last, run.name()))
    }

    /// One pull up to the KRE's head, at once (`audit pull` without `--follow`).
    fn once(&mut self) -> Result<(usize, u64, String), CliError> {
        let known = self.locate()?;
        self.pull(&known, None, 0)
    }

    /// One round: stores and acknowledges what the KRE has (or writes within the wait);
    /// the line to print when it stored any.
    pub(crate) fn round(&mut self) -> Result<Option<super::reports::AuditStored>, CliError> {
        let recheck = self.rounds % 64 == 0;
        self.rounds += 1;
        let (known, after) = match self.known.take() {
            Some((k, last)) if !recheck => (k, Some(last)),
            _ => (self.locate()?, None),
        };
        let (stored, last, name) = self.pull(&known, after, self.wait_ms)?;
        let line = (stored > 0).then(|| stored_line(stored, &name, last));
        self.known = Some((known, last));
        Ok(line)
    }
}

fn stored_line(stored: usize, name: &str, last: u64) -> super::reports::AuditStored {
    super::reports::AuditStored { stored, dir: name.to_owned(), last_seq: last }
}

/// The directory for the KRE's current chain. `dir` is a history of runs: it holds the first
/// chain collected into it; after a KRE restart (a new chain id in its status) the new run is
/// collected from its first entry into `dir/chain-<first 8 bytes of the chain id, hex>`,
/// beside the runs before it (`audit verify dir` checks every run and the links between
/// them). Asking the status first matters: the new chain's sequence numbers restart at
/// 1, so pulling after the old chain's last entry would silently return nothing.
fn run_dir(kre: &keygate_enclave::net::transport::Addr, dir: &Path) -> Result<PathBuf, CliError> {
    let kre_chain = kre_chain(kre)?;
    let stored_chain = match store::read_dir(dir) {
        Ok(t) => t.entries.first().map(|e| *e.chain_id()),
        Err(_) if !dir.join(store::ENTRIES_FILE).exists() => None,
        Err(e) => return Err(store_error(dir, e)),
    };
    match stored_chain {
        None => Ok(dir.to_path_buf()),
        Some(c) if c == kre_chain => Ok(dir.to_path_buf()),
        Some(_) => Ok(dir.join(store::run_dir_name(&kre_chain))),
    }
}

/// The KRE's current audit chain id, from its status.
fn kre_chain(kre: &keygate_enclave::net::transport::Addr) -> Result<[u8; 48], CliError> {
    let json = match kre_client::ask(kre, &keygate_enclave::wire::Message::Status, kre_client::DEFAULT_TIMEOUT) {
        Ok(keygate_enclave::wire::Message::StatusReport { json }) => json,
        Err(KreError::Denied { code, reason }) => {
            return Err(CliError::refused(format!("the KRE refused its status: {code}: {reason}")))
        }
        Ok(m) => return Err(kre_client::unexpected(&m)),
        Err(e) => return Err(e.into()),
    };
    let status: Value =
        serde_json::from_str(&json).map_err(|e| CliError::refused(format!("malformed status from the KRE: {e}")))?;
    status["audit"]["chain_id"]
        .as_str()
        .and_then(|h| hex::decode(h).ok())
        .and_then(|c| <[u8; 48]>::try_from(c).ok())
        .ok_or_else(|| CliError::refused("the KRE's status names no audit chain id"))
}

/// Stores pulled entries and checkpoints in `dir` (append-only, fsynced; refuses anything
/// that does not continue the stored chain). Returns what to acknowledge to the KRE
/// (`report.last_seq`). Called by `keygate audit pull` and the proxy.
pub(crate) fn append_to_dir(
    dir: &Path,
    entries: &[AuditEntry],
    checkpoints: &[Checkpoint],
) -> Result<AppendReport, CliError> {
    store::append_to_dir(dir, entries, checkpoints).map_err(|e| store_error(dir, e))
}

fn store_error(dir: &Path, e: StoreError) -> CliError {
    match e {
        StoreError::Io { .. } => CliError::io(format!("audit directory {}", dir.display()), e),
        other => CliError::refused(format!("audit directory {}: {other}", dir.display())),
    }
}

fn read(dir: &Path) -> Result<StoredTrail, CliError> {
    store::read_dir(dir).map_err(|e| store_error(dir, e))
}

fn verify(a: VerifyArgs) -> Result<(), CliError> {
    let verifier = Verifier::new(load_anchor(a.root.as_deref())?);
    let read = match a.dir.to_str().filter(|d| d.trim().starts_with("etcd://")) {
        Some(url) => {
            let url: EtcdUrl = url.parse().map_err(|e| CliError::input(format!("{url}: {e}")))?;
            match etcd_runs(&url) {
                Ok(runs) if runs.is_empty() => Err(CliError::refused(format!("no audit trail is stored under {url}"))),
                r => r.map(|runs| runs.into_iter().map(|(_, name, t)| (name, t)).collect()),
            }
        }
        None => store::read_runs(&a.dir).map_err(|e| store_error(&a.dir, e)),
    };
    let runs = match read {
        Ok(r) => r,
        Err(e) if a.json && e.code == 1 => {
            crate::output::print_json(&json!({ "ok": false, "error": "malformed", "message": e.message }))?;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let options = TrailOptions { allow_debug: a.allow_debug };
    let history = verify_history(&runs.iter().map(|(_, t)| t.entries.as_slice()).collect::<Vec<_>>());
    match runs.as_slice() {
        [(_, trail)] => verify_single(&a, &verifier, trail, &history, options),
        _ => verify_runs(&a, &verifier, &runs, &history, options),
    }
}

fn gaps_json(history: &HistoryReport) -> Value {
    Value::Array(history.gaps.iter().map(|g| json!({ "error": g.kind(), "message": g.to_string() })).collect())
}

fn receipts_json(checked: usize, failures: &[ReceiptFailure]) -> Value {
    json!({
        "checked": checked,
        "failed": failures.iter().map(|f| json!({
            "path": f.path.display().to_string(),
            "seq": f.seq,
            "error": f.kind,
            "message": f.message,
        })).collect::<Vec<_>>(),
    })
}

/// The receipt failures as one refusal (each named on stderr).
fn receipts_refusal(dir: &Path, checked: usize, failures: &[ReceiptFailure]) -> CliError {
    for f in failures {
        crate::output::detail(&format!("keygate: {}", f.line()));
    }
    let seqs: Vec<String> = failures.iter().map(|f| f.seq.map_or_else(|| "?".to_owned(), |s| s.to_string())).collect();
    CliError::refused(format!(
        "audit trail {}: {} of {checked} receipts NOT proven by the stored trail (seq {})",
        dir.display(),
        failures.len(),
        seqs.join(", ")
    ))
}

/// The gaps in a history as one refusal (each named on stderr).
fn gaps_refusal(dir: &Path, gaps: &[HistoryGap]) -> CliError {
    for g in gaps {
        crate::output::detail(&format!("keygate: {g}"));
    }
    let first = gaps.first().map(ToString::to_string).unwrap_or_default();
    CliError::refused(format!(
        "audit history {} FAILED: {} gap{} in the runs' linked trails (first: {first})",
        dir.display(),
        gaps.len(),
        if gaps.len() == 1 { "" } else { "s" }
    ))
}

/// DIR holds one run: its trail, and its link (a predecessor it names must be in DIR).
fn verify_single(
    a: &VerifyArgs,
    verifier: &Verifier,
    trail: &StoredTrail,
    history: &HistoryReport,
    options: TrailOptions,
) -> Result<(), CliError> {
    match verify_trail_with(&trail.entries, &trail.checkpoints, verifier, &a.expect_kre_pcr, options) {
        Ok(s) => {
            let receipts = match &a.receipts {
                Some(p) => Some(check_receipts(p, &[(&s, trail)], verifier)?),
                None => None,
            };
            let json = {
                let mut v = summary_json(&s);
                if let Some((checked, failures)) = &receipts {
                    v["ok"] = json!(failures.is_empty());
                    v["receipts"] = receipts_json(*checked, failures);
                }
                if !history.gaps.is_empty() {
                    v["ok"] = json!(false);
                    v["gaps"] = gaps_json(history);
                }
                v
            };
            let mut text = summary_text(&a.dir, &s);
            if let Some((checked, failures)) = &receipts {
                let _ = writeln!(
                    text,
                    "  receipts     {checked} checked, {} with their entry stored",
                    checked - failures.len()
                );
            }
            if let Some(l) = history.runs.first().and_then(|r| r.link) {
                let _ = writeln!(text, "  continues    chain {} at seq {}", hex::encode(l.chain_id), l.seq);
            }
            crate::output::print(&crate::output::Shown { json, text })?;
            if let Some((checked, failures)) = receipts.filter(|(_, f)| !f.is_empty()) {
                return Err(receipts_refusal(&a.dir, checked, &failures));
            }
            if !history.gaps.is_empty() {
                return Err(gaps_refusal(&a.dir, &history.gaps));
            }
            warn_unpinned_and_unsigned(&s);
            Ok(())
        }
        Err(e) => {
            if a.json {
                crate::output::print_json(&json!({ "ok": false, "error": e.kind(), "message": e.to_string() }))?;
            }
            Err(CliError::refused(format!("audit trail {} FAILED verification: {e}", a.dir.display())))
        }
    }
}

fn warn_unpinned_and_unsigned(s: &TrailSummary) {
    if !s.pcrs_pinned {
        let m = "KRE PCRs not pinned (--expect-kre-pcr): the trail of any genuine Nitro enclave would verify";
        crate::output::warn(&format!("keygate: warning: {m}"), m);
    }
    if s.unsigned_tail > 0 {
        let m = format!(
            "the last {} entries are not covered by a checkpoint yet: their deletion would not be detected",
            s.unsigned_tail
        );
        crate::output::warn(&format!("keygate: warning: {m}"), &m);
    }
}

/// DIR holds several runs: each run's trail on its own, then the links between them, in
/// history order. Every failed run and every gap is named.
fn verify_runs(
    a: &VerifyArgs,
    verifier: &Verifier,
    runs: &[(PathBuf, StoredTrail)],
    history: &HistoryReport,
    options: TrailOptions,
) -> Result<(), CliError> {
    let mut problems: Vec<String> = Vec::new();
    let mut verified: Vec<(TrailSummary, &StoredTrail)> = Vec::new();
    let mut runs_json = Vec::new();
    let mut text = format!("audit history {}: {} runs\n", a.dir.display(), history.runs.len());
    for (k, run) in history.runs.iter().enumerate() {
        let Some((path, trail)) = runs.get(run.index) else { continue };
        let link = match run.link {
            Some(l) => format!("continues chain {}… at seq {}", short(&l.chain_id), l.seq),
            None => "no predecessor".to_owned(),
        };
        let link_json = run
            .link
            .map(|l| json!({ "chain_id": hex::encode(l.chain_id), "seq": l.seq, "digest": hex::encode(l.digest) }));
        let result = verify_trail_with(&trail.entries, &trail.checkpoints, verifier, &a.expect_kre_pcr, options);
        let _ = write!(
            text,
            "  run {}  chain {}…  seq 1..={}  from {}  {link}  {}: ",
            k + 1,
            short(&run.chain_id),
            run.last_seq,
            format_time_ms(run.first_time_ms),
            path.display()
        );
        match result {
            Ok(s) => {
                let _ = writeln!(text, "OK (signed up to seq {})", s.signed_up_to);
                let mut v = summary_json(&s);
                v["dir"] = json!(path.display().to_string());
                v["link"] = json!(link_json);
                runs_json.push(v);
                verified.push((s, trail));
            }
            Err(e) => {
                let _ = writeln!(text, "FAILED");
                problems.push(format!("run {} ({}): FAILED verification: {e}", k + 1, path.display()));
                runs_json.push(json!({
                    "ok": false,
                    "dir": path.display().to_string(),
                    "chain_id": hex::encode(run.chain_id),
                    "link": link_json,
                    "error": e.kind(),
                    "message": e.to_string(),
                }));
            }
        }
    }
    let receipts = match &a.receipts {
        Some(p) if !verified.is_empty() => {
            let pairs: Vec<(&TrailSummary, &StoredTrail)> = verified.iter().map(|(s, t)| (s, *t)).collect();
            Some(check_receipts(p, &pairs, verifier)?)
        }
        _ => None,
    };
    let ok = problems.is_empty() && history.gaps.is_empty() && receipts.as_ref().is_none_or(|(_, f)| f.is_empty());
    let json = {
        let mut v = json!({ "ok": ok, "runs": runs_json, "gaps": gaps_json(history) });
        if let Some((checked, failures)) = &receipts {
            v["receipts"] = receipts_json(*checked, failures);
        }
        v
    };
    if history.gaps.is_empty() {
        let _ = writeln!(text, "  links        every run after the first continues the one before it; no gap");
    }
    if let Some((checked, failures)) = &receipts {
        let _ =
            writeln!(text, "  receipts     {checked} checked, {} with their entry stored", checked - failures.len());
    }
    crate::output::print(&crate::output::Shown { json, text })?;
    if let Some((checked, failures)) = receipts.filter(|(_, f)| !f.is_empty()) {
        return Err(receipts_refusal(&a.dir, checked, &failures));
    }
    if !problems.is_empty() {
        for p in &problems {
            crate::output::detail(&format!("keygate: {p}"));
        }
        if !history.gaps.is_empty() {
            return Err(gaps_refusal(&a.dir, &history.gaps));
        }
        return Err(CliError::refused(format!(
            "audit history {} FAILED: {} run{} failed verification (first: {})",
            a.dir.display(),
            problems.len(),
            if problems.len() == 1 { "" } else { "s" },
            problems[0]
        )));
    }
    if !history.gaps.is_empty() {
        return Err(gaps_refusal(&a.dir, &history.gaps));
    }
    if let Some((s, _)) = verified.last() {
        warn_unpinned_and_unsigned(s);
    }
    Ok(())
}

fn pcrs_json(pcrs: &BTreeMap<u8, Vec<u8>>) -> Value {
    Value::Object(pcrs.iter().map(|(i, v)| (i.to_string(), Value::String(hex::encode(v)))).collect())
}

fn summary_json(s: &TrailSummary) -> Value {
    json!({
        "ok": true,
        "chain_id": hex::encode(s.chain_id),
        "checkpoint_key": hex::encode(&s.checkpoint_key),
        "entries": s.last_seq,
        "last_seq": s.last_seq,
        "signed_up_to": s.signed_up_to,
        "unsigned_tail": s.unsigned_tail,
        "checkpoints": s.checkpoints,
        "last_checkpoint_ms": s.last_checkpoint_ms,
        "first_time_ms": s.time_range_ms.0,
        "last_time_ms": s.time_range_ms.1,
        "kre_module_id": s.kre_module_id,
        "kre_pcrs": pcrs_json(&s.kre_pcrs),
        "pcrs_pinned": s.pcrs_pinned,
        "binding_time_ms": s.binding_time_ms,
        "root_sha256": hex::encode(s.root_sha256),
    })
}

fn summary_text(dir: &Path, s: &TrailSummary) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "audit trail {}: OK", dir.display());
    let _ = writeln!(out, "  chain        {}", hex::encode(s.chain_id));
    let _ = writeln!(
        out,
        "  entries      seq 1..={} ({} → {})",
        s.last_seq,
        format_time_ms(s.time_range_ms.0),
        format_time_ms(s.time_range_ms.1)
    );
    let _ = writeln!(
        out,
        "  signed       up to seq {} ({} checkpoints, last at {})",
        s.signed_up_to,
        s.checkpoints,
        format_time_ms(s.last_checkpoint_ms)
    );
    let _ = writeln!(out, "  unsigned     {} entries after the last checkpoint", s.unsigned_tail);
    let _ = writeln!(
        out,
        "  KRE          module {} (key attested at {})",
        s.kre_module_id,
        format_time_ms(s.binding_time_ms)
    );
    for (i, v) in &s.kre_pcrs {
        if v.iter().any(|&b| b != 0) {
            let _ = writeln!(out, "  KRE PCR{i:<2}    {}", hex::encode(v));
        }
    }
    let _ = writeln!(out, "  PCRs pinned  {}", if s.pcrs_pinned { "yes" } else { "NO" });
    let _ = writeln!(out, "  root         sha256 {}", hex::encode(s.root_sha256));
    out
}

fn show(a: ShowArgs) -> Result<(), CliError> {
    let Some(url) = a.dir.to_str().filter(|d| d.trim().starts_with("etcd://")) else {
        let trail = read(&a.dir)?;
        print!("{}", render(&trail, a.json));
        return Ok(());
    };
    let url: EtcdUrl = url.parse().map_err(|e| CliError::input(format!("{url}: {e}")))?;
    let runs = etcd_runs(&url)?;
    if runs.is_empty() {
        return Err(CliError::refused(format!("no audit trail is stored under {url}")));
    }
    for (_, name, trail) in &runs {
        if !a.json {
            println!("run {}", name.display());
        }
        print!("{}", render(trail, a.json));
    }
    Ok(())
}

/// A stored trail as `audit show` prints it: a table, or JSON Lines.
fn render(trail: &StoredTrail, json: bool) -> String {
    let mut out = String::new();
    if json {
        for e in &trail.entries {
            let _ = writeln!(out, "{}", entry_json(e));
        }
        for c in &trail.checkpoints {
            let _ = writeln!(out, "{}", checkpoint_json(c));
        }
    } else {
        let _ = writeln!(
            out,
            "{:>6}  {:<24}  {:<17}  {:<6}  {:>6}  DETAIL",
            "SEQ", "TIME (UTC)", "EVENT", "DECIDE", "POLICY"
        );
        for e in &trail.entries {
            let ev = e.event();
            let _ = writeln!(
                out,
                "{:>6}  {:<24}  {:<17}  {:<6}  {:>6}  {}",
                e.seq(),
                format_time_ms(e.time_ms()),
                ev.name(),
                ev.decision(),
                e.policy_version(),
                detail_text(ev)
            );
        }
        for c in &trail.checkpoints {
            let _ = writeln!(
                out,
                "checkpoint  seq {:<6} at {}  head {}…",
                c.seq(),
                format_time_ms(c.time_ms()),
                &hex::encode(c.head())[..16]
            );
        }
        let _ = writeln!(
            out,
            "({} entries, {} checkpoints; not verified: run `keygate audit verify`)",
            trail.entries.len(),
            trail.checkpoints.len()
        );
    }
    out
}

fn short(d: &[u8]) -> String {
    hex::encode(&d[..d.len().min(8)])
}

fn requester_text(r: &Requester) -> String {
    format!("requester={} ({}) doc=sha384:{}…", r.module_id, r.kind, short(&r.document_sha384))
}

/// Refusals in an `anonymous_refusals` entry (saturating: each count is a u64).
fn anonymous_total(counts: &[(String, u64)]) -> u64 {
    counts.iter().fold(0u64, |a, (_, n)| a.saturating_add(*n))
}

fn detail_text(ev: &AuditEvent) -> String {
    match ev {
        AuditEvent::KreStarted { nsm_kind, pcrs, software } => format!(
            "nsm={nsm_kind} software={software} pcr0={}…",
            pcrs.get(&0).map(|v| short(v)).unwrap_or_else(|| "-".into())
        ),
        AuditEvent::ReleaseAllowed { requester, cluster, keys, image } => {
            let keys: Vec<String> = keys.iter().map(|(k, v)| format!("{k}@{v}")).collect();
            format!("cluster={cluster} keys={} image={image} {}", keys.join(","), requester_text(requester))
        }
        AuditEvent::ReleaseDenied { code, reason, requester, cluster, key_ids } => {
            let mut s = format!("code={code}");
            if let Some(c) = cluster {
                let _ = write!(s, " cluster={c}");
            }
            if !key_ids.is_empty() {
                let ids: Vec<&str> = key_ids.iter().map(|k| k.as_str()).collect();
                let _ = write!(s, " keys={}", ids.join(","));
            }
            if let Some(r) = requester {
                let _ = write!(s, " {}", requester_text(r));
            }
            let _ = write!(s, " reason={reason:?}");
            s
        }
        AuditEvent::ChallengeRefused { code, reason } => format!("code={code} reason={reason:?}"),
        AuditEvent::PolicyAccepted { version, digest, activates_at_ms } => {
            format!("version={version} digest={}… activates={}", short(digest), format_time_ms(*activates_at_ms))
        }
        AuditEvent::PolicyRefused { version, digest, code, reason } => format!(
            "version={} digest={} code={code} reason={reason:?}",
            version.map_or_else(|| "-".into(), |v| v.to_string()),
            digest.map_or_else(|| "-".into(), |d| format!("{}…", short(&d)))
        ),
        AuditEvent::UnsealStep { step, ok, detail } => format!("step={step} ok={ok} detail={detail:?}"),
        AuditEvent::KekRotated { cluster, new_version } => format!("cluster={cluster} new_version={new_version}"),
        AuditEvent::ConfigChanged { setting, value } => format!("{setting}={value:?}"),
        AuditEvent::Unrecorded { count, first_ms, last_ms } => format!(
            "{count} events NOT RECORDED (buffer full) between {} and {}",
            format_time_ms(*first_ms),
            format_time_ms(*last_ms)
        ),
        AuditEvent::AnonymousRefusals { first_ms, last_ms, counts } => {
            let list: Vec<String> = counts.iter().map(|(code, n)| format!("{code}:{n}")).collect();
            format!(
                "from={} to={} total={} counts={}",
                format_time_ms(*first_ms),
                format_time_ms(*last_ms),
                anonymous_total(counts),
                list.join(",")
            )
        }
        AuditEvent::ChainLinked { generation, previous } => match previous {
            Some(h) => format!(
                "generation={generation} previous_chain={}… previous_seq={} previous_head={}…",
                short(&h.chain_id),
                h.seq,
                short(&h.digest)
            ),
            None => format!("generation={generation} previous=none (state sealed without an audit head)"),
        },
        _ => String::new(),
    }
}

fn requester_json(r: &Requester) -> Value {
    json!({
        "module_id": r.module_id,
        "kind": r.kind.as_str(),
        "pcrs": pcrs_json(&r.pcrs),
        "document_sha384": hex::encode(r.document_sha384),
    })
}

fn entry_json(e: &AuditEntry) -> Value {
    let ev = e.event();
    let mut v = json!({
        "type": "entry",
        "seq": e.seq(),
        "time_ms": e.time_ms(),
        "time": format_time_ms(e.time_ms()),
        "event": ev.name(),
        "decision": ev.decision(),
        "policy_version": e.policy_version(),
        "chain_id": hex::encode(e.chain_id()),
        "prev": hex::encode(e.prev()),
        "digest": hex::encode(e.digest()),
    });
    let fields = match ev {
        AuditEvent::KreStarted { nsm_kind, pcrs, software } => {
            json!({ "nsm_kind": nsm_kind, "pcrs": pcrs_json(pcrs), "software": software })
        }
        AuditEvent::ReleaseAllowed { requester, cluster, keys, image } => json!({
            "requester": requester_json(requester),
            "cluster": cluster.as_str(),
            "keys": keys.iter().map(|(k, ver)| json!({ "id": k.as_str(), "version": ver })).collect::<Vec<_>>(),
            "image": image,
        }),
        AuditEvent::ReleaseDenied { code, reason, requester, cluster, key_ids } => json!({
            "code": code,
            "reason": reason,
            "requester": requester.as_ref().map(requester_json),
            "cluster": cluster.as_ref().map(|c| c.as_str()),
            "key_ids": key_ids.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
        }),
        AuditEvent::ChallengeRefused { code, reason } => json!({ "code": code, "reason": reason }),
        AuditEvent::PolicyAccepted { version, digest, activates_at_ms } => json!({
            "version": version, "digest": hex::encode(digest), "activates_at_ms": activates_at_ms,
        }),
        AuditEvent::PolicyRefused { version, digest, code, reason } => json!({
            "version": version, "digest": digest.map(hex::encode), "code": code, "reason": reason,
        }),
        AuditEvent::UnsealStep { step, ok, detail } => json!({ "step": step, "ok": ok, "detail": detail }),
        AuditEvent::KekRotated { cluster, new_version } => {
            json!({ "cluster": cluster.as_str(), "new_version": new_version })
        }
        AuditEvent::ConfigChanged { setting, value } => json!({ "setting": setting, "value": value }),
        AuditEvent::Unrecorded { count, first_ms, last_ms } => {
            json!({ "count": count, "first_ms": first_ms, "last_ms": last_ms })
        }
        AuditEvent::AnonymousRefusals { first_ms, last_ms, counts } => json!({
            "first_ms": first_ms,
            "last_ms": last_ms,
            "total": anonymous_total(counts),
            "counts": counts.iter().map(|(code, n)| json!({ "code": code, "count": n })).collect::<Vec<_>>(),
        }),
        AuditEvent::ChainLinked { generation, previous } => json!({
            "generation": generation,
            "previous_chain": previous.map(|h| hex::encode(h.chain_id)),
            "previous_seq": previous.map(|h| h.seq),
            "previous_head": previous.map(|h| hex::encode(h.digest)),
        }),
        _ => json!({}),
    };
    if let (Value::Object(m), Value::Object(f)) = (&mut v, fields) {
        m.extend(f);
    }
    v
}

fn checkpoint_json(c: &Checkpoint) -> Value {
    use sha2::Digest as _;
    json!({
        "type": "checkpoint",
        "seq": c.seq(),
        "time_ms": c.time_ms(),
        "time": format_time_ms(c.time_ms()),
        "chain_id": hex::encode(c.chain_id()),
        "head": hex::encode(c.head()),
        "public_key": hex::encode(c.public_key()),
        "binding_document_sha384": hex::encode(sha2::Sha384::digest(c.binding_document())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_30_s_and_resets() {
        let mut b = pull_backoff();
        let secs: Vec<u64> = (0..8).map(|_| b.next_wait().as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
        b.reset();
        assert_eq!(b.next_wait().as_secs(), 1);
    }

    #[test]
    fn anonymous_refusals_render() {
        let ev = AuditEvent::AnonymousRefusals {
            first_ms: 1_795_478_400_000,
            last_ms: 1_795_478_460_000,
            counts: vec![("busy".into(), 12), ("wrong_channel".into(), 3)],
        };
        assert_eq!(
            detail_text(&ev),
            "from=2026-11-24T00:00:00.000Z to=2026-11-24T00:01:00.000Z total=15 counts=busy:12,wrong_channel:3"
        );
        let e = AuditEntry::new([0; 48], 1, [0; 48], 5, 0, ev).expect("entry");
        let v = entry_json(&e);
        assert_eq!(v["event"], "anonymous_refusals");
        assert_eq!(v["decision"], "deny");
        assert_eq!(v["first_ms"], 1_795_478_400_000u64);
        assert_eq!(v["last_ms"], 1_795_478_460_000u64);
        assert_eq!(v["total"], 15);
        assert_eq!(v["counts"], json!([{ "code": "busy", "count": 12 }, { "code": "wrong_channel", "count": 3 }]));
    }

    #[test]
    fn append_to_dir_maps_errors() {
        let dir = keygate_tests::TempDir::new("keygate-audit-unit").expect("dir");
        std::fs::write(dir.path().join("f"), b"x").expect("file");
        let e = append_to_dir(&dir.path().join("f").join("x"), &[], &[]).map(|_| ());
        // A directory under a regular file cannot be created: an I/O error (exit 3).
        assert_eq!(e.map_err(|e| e.code), Err(3));
    }
}
