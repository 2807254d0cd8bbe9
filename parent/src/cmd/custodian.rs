//! `keygate state sync` (the parent's side of the two-phase commit) and `keygate custodian
//! init | unseal` (the ceremony), docs/durability.md.
//!
//! The parent stores, in its state directory: `state.current` / `state.previous` (the sealed
//! blob, [`crate::storage::state`]) and `custody.bin` (the shares file and the genesis
//! attestation, written once at genesis, atomically). None of it is useful without M
//! custodians and a genuine KRE. Every decision about the KRE's state is made in the KRE
//! ([`keygate_enclave::state::vault`]) and by the custodians ([`keygate_enclave::peer::custodian`]); this
//! module moves bytes and makes them durable.

use std::path::{Path, PathBuf};
use std::time::Duration;

use keygate_attestation::crypto::{self, Crypto};
use keygate_attestation::secret::Secret;
use keygate_attestation::{PcrExpectation, TrustAnchor, Verifier};
use keygate_enclave::net::transport::Addr;
use keygate_enclave::peer::custodian::{self, CustodianRecord, Expectations};
use keygate_enclave::wire::{Message, StateReport};
use sha2::{Digest, Sha384};

use crate::error::CliError;
use crate::kre_client::{self, Connection};
use crate::storage::etcd::{EtcdStore, EtcdUrl};
use crate::storage::state::{DirFs, StateFs, StateStore};
use crate::storage::store::{SealedStore, StoreError};

mod record;

/// The custody file of one custodian set, `custody-<hex set digest>.bin`:
/// `"KGCUSTDY" ‖ u32be n ‖ shares file ‖ u32be m ‖ genesis attestation`. A sealed blob's header
/// names its set, so after a reshare the parent hands each stored generation the custody
/// data of its own set.
fn custody_file(set_digest: &[u8; 48]) -> String {
    format!("custody-{}.bin", hex::encode(set_digest))
}
const CUSTODY_TMP: &str = "custody.tmp";
const CUSTODY_MAGIC: &[u8; 8] = b"KGCUSTDY";
const MAX_CUSTODY: usize = 64 * 1024;

/// The shares file and the genesis attestation.
type Custody = (Vec<u8>, Vec<u8>);

/// `keygate state ...`
#[derive(Debug, clap::Subcommand)]
pub(crate) enum StateCommand {
    /// Store what the KRE exports and commit it; hand a restarted KRE its stored state.
    Sync(SyncArgs),
}

/// `keygate state sync`.
#[derive(Debug, clap::Args)]
pub(crate) struct SyncArgs {
    /// The KRE's parent channel (`--parent-listen`; never proxied).
    #[arg(long)]
    kre: Addr,
    #[command(flatten)]
    at: StoreArgs,
    /// Keep syncing, pausing this long between rounds (a duration, e.g. 5 or 5s; at least 1s).
    #[arg(long, value_name = "DURATION", value_parser = super::args::parse_duration)]
    follow: Option<Duration>,
    /// When handing the stored state to a member KRE, ask its custodians for a cold start: it
    /// serves without a serving member's confirmation. Only when no member of the cluster
    /// serves; every custodian must agree (`keygate custodian unseal --cold-start`).
    #[arg(long)]
    cold_start: bool,
}

/// `keygate custodian ...`
#[derive(Debug, clap::Subcommand)]
pub(crate) enum CustodianCommand {
    /// Genesis: a fresh KRE with no stored state creates its state key, splits it among its
    /// custodians and makes the first KEKs; the parent stores it all before the KRE serves.
    Init(InitArgs),
    /// Give this custodian's share to a restarted KRE, after checking its attestation (or
    /// approve a reshare with `--approve-reshare`).
    Unseal(UnsealArgs),
    /// Ask a serving KRE to reshare its state key to a new custodian set; a quorum of the
    /// current custodians approves with `keygate custodian unseal --approve-reshare DIGEST`.
    Reshare(ReshareArgs),
}

/// `keygate custodian reshare`.
#[derive(Debug, clap::Args)]
pub(crate) struct ReshareArgs {
    /// The KRE's custodian channel (`--custodian-listen`; proxied only where the operator opts in).
    #[arg(long)]
    kre: Addr,
    /// A custodian of the new set: P-384 public key (PEM), repeatable, in share order.
    #[arg(long = "new-custodian", value_name = "PEM", required = true)]
    new_custodians: Vec<PathBuf>,
    /// M of the new set.
    #[arg(long)]
    new_threshold: u8,
}

/// `keygate custodian init`.
#[derive(Debug, clap::Args)]
pub(crate) struct InitArgs {
    /// The KRE's parent channel (`--parent-listen`; never proxied).
    #[arg(long)]
    kre: Addr,
    /// Where the genesis is stored (which must hold no state yet).
    #[command(flatten)]
    at: StoreArgs,
}

/// Where the parent keeps the sealed state: a local directory, or an etcd store shared with
/// other parents (exactly one).
#[derive(Debug, clap::Args)]
pub(crate) struct StoreArgs {
    /// The parent's state directory (created 0700 if missing).
    #[arg(long, required_unless_present = "store", conflicts_with = "store")]
    pub(crate) state_dir: Option<PathBuf>,
    /// The sealed state in etcd instead, shared with other parents:
    /// etcd://HOST:PORT[,HOST:PORT...][/PREFIX] (docs/durability.md, "The etcd backend").
    #[arg(long, value_name = "URL")]
    pub(crate) store: Option<EtcdUrl>,
}

/// `keygate custodian unseal`.
#[derive(Debug, clap::Args)]
pub(crate) struct UnsealArgs {
    /// The KRE's custodian channel (`--custodian-listen`; proxied only where the operator opts in).
    #[arg(long)]
    kre: Addr,
    /// This custodian's private key (PEM, from `keygate keygen`).
    #[arg(long)]
    key: PathBuf,
    /// Trust this root (PEM) for the KRE's attestation. Default: the AWS Nitro root.
    #[arg(long)]
    root: Option<PathBuf>,
    /// A PCR the KRE must have (repeatable, at least one; PCR0-2 recommended).
    #[arg(long = "expect-kre-pcr", value_name = "N=HEX", required = true)]
    expect_kre_pcr: Vec<PcrExpectation>,
    /// A PCR the genesis KRE must have had (default: the same as --expect-kre-pcr).
    #[arg(long = "expect-genesis-pcr", value_name = "N=HEX")]
    expect_genesis_pcr: Vec<PcrExpectation>,
    /// This custodian's record of what it unsealed (default: KEY with `.record.json`).
    #[arg(long)]
    record: Option<PathBuf>,
    /// Accept a shares file other than the recorded one (only after an intended new genesis).
    #[arg(long)]
    accept_new_genesis: bool,
    /// Approve a reshare to the custodian set with this digest (hex, as `keygate custodian
    /// reshare` printed it). Without it a reshare request is refused.
    #[arg(long, value_name = "HEX")]
    approve_reshare: Option<String>,
    /// Consent to a cold start: state that no member of the KRE's cluster serves, so the KRE
    /// may serve the state without a member's confirmation. Without it a cold start is refused.
    #[arg(long)]
    cold_start: bool,
}

pub(crate) fn run_state(cmd: StateCommand) -> Result<(), CliError> {
    match cmd {
        StateCommand::Sync(a) if a.at.store.is_some() => sync_etcd(&a),
        StateCommand::Sync(a) => loop {
            let dir =
                a.at.state_dir.as_deref().ok_or_else(|| CliError::input("give --state-dir DIR or --store URL"))?;
            match (sync_once_as(&a.kre, dir, a.cold_start), a.follow) {
                (Ok(line), _) => crate::output::print(&super::reports::StateSynced {
                    state_dir: dir.display().to_string(),
                    result: line,
                })?,
                (Err(e), None) => return Err(e),
                // Following: a failed round (KRE restarting, disk full) is reported and retried;
                // nothing is committed that was not stored.
                (Err(e), Some(_)) => crate::output::warn(
                    &format!("keygate: state sync: {}", e.message),
                    &format!("state sync: {}", e.message),
                ),
            }
            match a.follow {
                Some(s) => std::thread::sleep(s.max(Duration::from_secs(1))),
                None => return Ok(()),
            }
        },
    }
}

pub(crate) fn run_custodian(cmd: CustodianCommand) -> Result<(), CliError> {
    match cmd {
        CustodianCommand::Init(a) if a.at.store.is_some() => init_etcd(&a),
        CustodianCommand::Init(a) => init(&a),
        CustodianCommand::Unseal(a) => unseal(&a),
        CustodianCommand::Reshare(a) => reshare(&a),
    }
}

fn unexpected(m: &Message) -> CliError {
    CliError::refused(format!("unexpected answer {} from the KRE", m.name()))
}

pub(crate) fn state_report(kre: &Addr, msg: &Message) -> Result<StateReport, CliError> {
    match kre_client::ask(kre, msg, kre_client::DEFAULT_TIMEOUT)? {
        Message::StateReport(r) => Ok(*r),
        m => Err(unexpected(&m)),
    }
}

fn open_dir(dir: &Path) -> Result<(), CliError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| CliError::io(format!("creating {}", dir.display()), e))
}

fn encode_custody(shares: &[u8], genesis: &[u8]) -> Result<Vec<u8>, CliError> {
    let len = |b: &[u8]| u32::try_from(b.len()).map_err(|_| CliError::refused("custody data too large"));
    let mut out = CUSTODY_MAGIC.to_vec();
    out.extend_from_slice(&len(shares)?.to_be_bytes());
    out.extend_from_slice(shares);
    out.extend_from_slice(&len(genesis)?.to_be_bytes());
    out.extend_from_slice(genesis);
    Ok(out)
}

/// Why a custody file does not decode.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CustodyFileError {
    #[error("not a keygate custody file (bad magic)")]
    BadMagic,
    #[error("truncated")]
    Truncated,
    #[error("too large")]
    TooLarge,
    #[error("trailing bytes")]
    TrailingBytes,
}

pub(crate) fn decode_custody(b: &[u8]) -> Result<Custody, CustodyFileError> {
    let rest = b.strip_prefix(CUSTODY_MAGIC.as_slice()).ok_or(CustodyFileError::BadMagic)?;
    let take = |r: &[u8]| -> Result<(Vec<u8>, usize), CustodyFileError> {
        let n = r.get(..4).ok_or(CustodyFileError::Truncated)?;
        let n =
            usize::try_from(u32::from_be_bytes([n[0], n[1], n[2], n[3]])).map_err(|_| CustodyFileError::TooLarge)?;
        let v = r.get(4..4 + n).ok_or(CustodyFileError::Truncated)?;
        Ok((v.to_vec(), 4 + n))
    };
    let (shares, used) = take(rest)?;
    let (genesis, used2) = take(&rest[used..])?;
    if used + used2 != rest.len() {
        return Err(CustodyFileError::TrailingBytes);
    }
    Ok((shares, genesis))
}

/// The stored custody data of the set with `set_digest`, if any.
pub(crate) fn read_custody(dir: &Path, set_digest: &[u8; 48]) -> Result<Option<Custody>, CliError> {
    let name = custody_file(set_digest);
    let mut fs = DirFs::new(dir);
    match fs.read_file(&name, MAX_CUSTODY) {
        Ok(None) => Ok(None),
        Ok(Some(b)) if b.len() > MAX_CUSTODY => Err(CliError::refused(format!("{name}: too large"))),
        Ok(Some(b)) => {
            decode_custody(&b).map(Some).map_err(|e| CliError::refused(format!("{}: {e}", dir.join(&name).display())))
        }
        Err(e) => Err(CliError::io(format!("reading {}", dir.join(&name).display()), e)),
    }
}

/// Whether any custody file exists in `dir`.
fn any_custody(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|rd| rd.flatten().any(|e| e.file_name().to_string_lossy().starts_with("custody-")))
}

/// The custodian set digest a shares file is for.
fn shares_set_digest(shares: &[u8]) -> Result<[u8; 48], CliError> {
    keygate_enclave::state::custody::SharesFile::decode(crypto::default_backend(), shares)
        .map(|f| f.set().digest())
        .map_err(|e| CliError::refused(format!("the KRE exported an unreadable shares file: {e}")))
}

/// Writes the custody data atomically (temp, fsync, rename, directory fsync, read back); an
/// existing, different custody file is never replaced.
fn store_custody(dir: &Path, shares: &[u8], genesis: &[u8]) -> Result<(), CliError> {
    let bytes = encode_custody(shares, genesis)?;
    let digest = shares_set_digest(shares)?;
    let name = custody_file(&digest);
    let mut fs = DirFs::new(dir);
    // The state store's lock: another process's write of the same temp file waits its turn.
    let _held = fs
        .lock(crate::storage::state::LOCK_WAIT)
        .map_err(|e| CliError::io(format!("locking {}", dir.join(crate::storage::state::LOCK).display()), e))?;
    if let Some((s, g)) = read_custody(dir, &digest)? {
        if s == shares && g == genesis {
            return Ok(());
        }
        return Err(CliError::refused(format!(
            "{} holds other custody data for the same custodian set (another genesis); refusing to replace it",
            dir.join(&name).display()
        )));
    }
    let io = |what: &str, e: std::io::Error| CliError::io(format!("{what} {}", dir.join(&name).display()), e);
    fs.write_file(CUSTODY_TMP, &bytes).map_err(|e| io("writing", e))?;
    fs.sync_file(CUSTODY_TMP).map_err(|e| io("syncing", e))?;
    fs.rename(CUSTODY_TMP, &name).map_err(|e| io("renaming", e))?;
    fs.sync_dir().map_err(|e| io("syncing the directory of", e))?;
    match fs.read_file(&name, MAX_CUSTODY) {
        Ok(Some(b)) if b == bytes => Ok(()),
        Ok(_) => Err(CliError::refused("custody file read back differs from what was written")),
        Err(e) => Err(io("reading back", e)),
    }
}

/// Stores an export durably (custody first, then the blob) and commits it.
fn store_and_commit(kre: &Addr, dir: &Path, r: &StateReport) -> Result<u64, CliError> {
    if r.shares.is_empty() || r.blob.is_empty() {
        return Err(CliError::refused("the KRE exported a state without its custody data"));
    }
    store_custody(dir, &r.shares, &r.genesis_attestation)?;
    let mut store = StateStore::new(DirFs::new(dir));
    let g = store.store(&r.blob).map_err(|e| CliError::refused(format!("not committed: {e}")))?;
    if g != r.export_generation {
        return Err(CliError::refused(format!(
            "the blob's header says generation {g}, the KRE said {}",
            r.export_generation
        )));
    }
    // Commit what is on disk, as read back.
    let loaded = store.load(g).map_err(|e| CliError::refused(format!("not committed: {e}")))?;
    let Some(loaded) = loaded else { return Err(CliError::refused("stored state vanished before the commit")) };
    let sha: [u8; 48] = Sha384::digest(&loaded.blob).into();
    match kre_client::ask(kre, &Message::StateCommit { generation: g, blob_sha384: sha }, kre_client::DEFAULT_TIMEOUT)?
    {
        Message::StateCommitted { generation } => Ok(generation),
        m => Err(unexpected(&m)),
    }
}

/// One sync round; returns a line describing what happened.
pub(crate) fn sync_once(kre: &Addr, dir: &Path) -> Result<String, CliError> {
    sync_once_as(kre, dir, false)
}

/// What a round says of a member KRE that waits for a serving member's confirmation.
fn confirming(r: &StateReport) -> String {
    format!(
        "the KRE unsealed generation {} and waits for a serving member to confirm it is the newest \
         (`keygate member join --kre KRE --from MEMBER`; when no member serves, a cold start)",
        r.committed_generation
    )
}

/// Hands the stored state `loaded` and its custody (shares file, genesis attestation) to the
/// KRE awaiting it (StateLoad), after warning of the stored states skipped on the way; returns
/// its generation and the KRE's report.
fn hand_over(
    kre: &Addr,
    loaded: crate::storage::state::Loaded,
    (shares, genesis_attestation): (Vec<u8>, Vec<u8>),
    cold_start: bool,
) -> Result<(u64, StateReport), CliError> {
    for (slot, why) in &loaded.skipped {
        let m = format!("state {slot:?} not used: {why}");
        crate::output::warn(&format!("keygate: warning: {m}"), &m);
    }
    let g = loaded.header.generation;
    let load = Message::StateLoad { blob: loaded.blob, shares, genesis_attestation, cold_start };
    Ok((g, state_report(kre, &load)?))
}

/// One sync round, asking for a cold start (`--cold-start`) when handing over the state.
fn sync_once_as(kre: &Addr, dir: &Path, cold_start: bool) -> Result<String, CliError> {
    open_dir(dir)?;
    let r = state_report(kre, &Message::StatePoll)?;
    match r.phase {
        0 => Ok("the KRE runs without custodians (ephemeral KEKs): nothing to store".into()),
        1 => {
            let mut store = StateStore::new(DirFs::new(dir));
            let loaded = store.load(0).map_err(|e| CliError::refused(e.to_string()))?;
            let Some(loaded) = loaded else {
                return Err(CliError::refused(format!(
                    "the KRE awaits its state but {} holds none; for a first start run `keygate custodian init`",
                    dir.display()
                )));
            };
            let (shares, genesis) = read_custody(dir, &loaded.header.custodian_set_digest)?.ok_or_else(|| {
                CliError::refused(format!(
                    "{} has a sealed state but no {}",
                    dir.display(),
                    custody_file(&loaded.header.custodian_set_digest)
                ))
            })?;
            let (g, r) = hand_over(kre, loaded, (shares, genesis), cold_start)?;
            Ok(format!(
                "handed stored generation {g} to the KRE; it waits for {} custodian share(s) (`keygate custodian unseal`)",
                r.threshold
            ))
        }
        2 => Ok(format!(
            "the KRE is unsealing generation {}: {} of {} custodian shares",
            r.unsealing_generation, r.shares_accepted, r.threshold
        )),
        3 if r.export_generation > 0 => {
            let g = store_and_commit(kre, dir, &r)?;
            Ok(format!("stored and committed generation {g} in {}", dir.display()))
        }
        3 => Ok(format!("the KRE serves generation {}; nothing new to store", r.committed_generation)),
        4 => Ok(confirming(&r)),
        p => Err(CliError::refused(format!("the KRE reports an unknown phase {p}"))),
    }
}

fn init(a: &InitArgs) -> Result<(), CliError> {
    let state_dir = a.at.state_dir.as_deref().ok_or_else(|| CliError::input("give --state-dir DIR or --store URL"))?;
    open_dir(state_dir)?;
    let mut store = StateStore::new(DirFs::new(state_dir));
    if let Ok(Some(l)) = store.load(0) {
        return Err(CliError::refused(format!(
            "{} already holds sealed state generation {}: genesis refused (restart the KRE and unseal instead)",
            state_dir.display(),
            l.header.generation
        )));
    }
    if any_custody(state_dir) {
        return Err(CliError::refused(format!("{} already holds custody data: genesis refused", state_dir.display())));
    }
    let r = state_report(&a.kre, &Message::StateGenesis)?;
    let g = store_and_commit(&a.kre, state_dir, &r)?;
    crate::output::print(&super::reports::CustodianGenesis {
        generation: g,
        state_dir: state_dir.display().to_string(),
        threshold: r.threshold,
    })
}

fn load_scalar(path: &Path) -> Result<Secret<48>, CliError> {
    use p384::pkcs8::DecodePrivateKey;
    let pem = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| CliError::io(format!("reading {}", path.display()), e))?,
    );
    let sk = p384::SecretKey::from_pkcs8_pem(&pem)
        .or_else(|_| p384::SecretKey::from_sec1_pem(&pem))
        .map_err(|_| CliError::input(format!("{}: not a P-384 private key (PKCS#8 or SEC1 PEM)", path.display())))?;
    let bytes = zeroize::Zeroizing::new(sk.to_bytes());
    Secret::from_slice(&bytes).ok_or_else(|| CliError::input("bad key length"))
}

fn record_path(a: &UnsealArgs) -> PathBuf {
    a.record.clone().unwrap_or_else(|| {
        let mut p = a.key.clone().into_os_string();
        p.push(".record.json");
        PathBuf::from(p)
    })
}

/// The CLI's exit code for a record that cannot be used: 2 for a corrupt one, 3 for I/O.
fn record_error(e: record::RecordError) -> CliError {
    match e {
        record::RecordError::Corrupt { .. } | record::RecordError::TooLarge { .. } => CliError::input(e),
        record::RecordError::Read { .. } | record::RecordError::Write(_) | record::RecordError::Encode(_) => {
            CliError { code: 3, message: e.to_string() }
        }
    }
}

fn unseal(a: &UnsealArgs) -> Result<(), CliError> {
    let c: &'static dyn Crypto = crypto::default_backend();
    let scalar = load_scalar(&a.key)?;
    let anchor = match &a.root {
        Some(p) => {
            let pem = std::fs::read(p).map_err(|e| CliError::io(format!("reading {}", p.display()), e))?;
            TrustAnchor::from_pem(&pem).map_err(|e| CliError::input(format!("--root {}: {e}", p.display())))?
        }
        None => TrustAnchor::aws_nitro().map_err(|e| CliError::input(e.to_string()))?,
    };
    let verifier = Verifier::new(anchor);
    let rec_path = record_path(a);
    let records: Vec<CustodianRecord> = record::load(&rec_path).map_err(record_error)?;
    let genesis_pcrs = if a.expect_genesis_pcr.is_empty() { &a.expect_kre_pcr } else { &a.expect_genesis_pcr };
    let approve_reshare = match &a.approve_reshare {
        None => None,
        Some(h) => Some(
            hex::decode(h.trim())
                .ok()
                .and_then(|b| <[u8; 48]>::try_from(b).ok())
                .ok_or_else(|| CliError::input("--approve-reshare: expected 96 hex digits (a custodian set digest)"))?,
        ),
    };
    let mut nonce = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
    let now_ms = keygate_enclave::net::server::now_ms();

    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| CliError::io("runtime", e))?;
    let (resp, progress) = rt.block_on(async {
        let mut s = Connection::open(&a.kre, kre_client::DEFAULT_TIMEOUT).await?;
        let hello =
            Message::UnsealHello { client_nonce: nonce }.encode().map_err(|e| CliError::input(e.to_string()))?;
        s.send(&hello).await?;
        let body = s.receive().await?;
        // The record for this set, if any (the set digest is only known from the offer, so
        // every record is tried by on_offer's filter through the matching digest).
        let set_digest = match Message::decode(&body) {
            Ok(Message::UnsealOffer { shares, .. }) => keygate_enclave::state::custody::SharesFile::decode(c, &shares)
                .map(|f| hex::encode(f.set().digest()))
                .ok(),
            _ => None,
        };
        let record = set_digest.and_then(|d| records.iter().find(|r| r.set_digest == d));
        let expect = Expectations {
            verifier: &verifier,
            now_ms,
            kre_pcrs: &a.expect_kre_pcr,
            genesis_pcrs,
            record,
            accept_new_genesis: a.accept_new_genesis,
            approve_reshare,
            cold_start: a.cold_start,
        };
        let mut rng = |b: &mut [u8]| rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, b);
        let resp = custodian::on_offer(&body, &nonce, &expect, &scalar, c, &mut rng)
            .map_err(|e| CliError::refused(format!("unseal refused: {e}")))?;
        // Remember (generation, blob) for this set before the share leaves: a parent that
        // drops the connection after taking the share cannot make this custodian forget it.
        record::store(&rec_path, &record::updated(&records, &resp.record)).map_err(record_error)?;
        s.send(&resp.frame).await?;
        let body = s.receive().await?;
        let progress =
            custodian::on_progress(&body).map_err(|e| CliError::refused(format!("share not accepted: {e}")))?;
        Ok::<_, CliError>((resp, progress))
    })?;
    let (have, need, serving, generation) = progress;
    crate::output::print(&super::reports::CustodianUnsealed {
        share: resp.x,
        accepted: have,
        needed: need,
        serving,
        generation,
        reshared_to: resp.reshared_to.map(hex::encode),
    })
}

fn reshare(a: &ReshareArgs) -> Result<(), CliError> {
    use p384::elliptic_curve::sec1::ToEncodedPoint;
    use p384::pkcs8::DecodePublicKey;
    let c = crypto::default_backend();
    let mut keys = Vec::new();
    for p in &a.new_custodians {
        let pem = std::fs::read_to_string(p).map_err(|e| CliError::io(format!("reading {}", p.display()), e))?;
        let k = p384::PublicKey::from_public_key_pem(&pem)
            .map_err(|e| CliError::input(format!("{}: not a P-384 public key: {e}", p.display())))?;
        let point: [u8; 97] = k
            .to_encoded_point(false)
            .as_bytes()
            .try_into()
            .map_err(|_| CliError::input(format!("{}: not an uncompressed point", p.display())))?;
        keys.push(point);
    }
    let set = keygate_enclave::state::custody::CustodianSet::new(c, a.new_threshold, keys)
        .map_err(|e| CliError::input(format!("new custodian set: {e}")))?;
    let digest = hex::encode(set.digest());
    let r = state_report(&a.kre, &Message::ReshareStart { set: keygate_enclave::state::vault::encode_set(&set) })?;
    crate::output::print(&super::reports::CustodianReshare {
        threshold: set.threshold(),
        custodians: set.count(),
        set_digest: digest,
        approvals_needed: r.threshold,
        kre: a.kre.to_string(),
    })
}

// ---------- the etcd backend (`--store etcd://…`) ----------

/// What one sync round against etcd did.
#[derive(Debug)]
pub(crate) enum EtcdRound {
    /// A line describing it, and the newest generation the store is known to hold.
    Done(String, u64),
    /// Another parent stored this or a newer generation first: nothing was committed. A sync
    /// round then hands the newer generation to the KRE to adopt ([`adopt_etcd`]); a genesis
    /// stops.
    Lost(String),
}

pub(crate) fn etcd_store(url: &EtcdUrl) -> Result<EtcdStore, CliError> {
    EtcdStore::connect(url).map_err(|e| CliError::io(format!("etcd {url}"), e))
}

/// Commits generation `g` to the KRE, naming the blob as read back from the store.
fn commit(kre: &Addr, g: u64, blob: &[u8]) -> Result<u64, CliError> {
    let sha: [u8; 48] = Sha384::digest(blob).into();
    match kre_client::ask(kre, &Message::StateCommit { generation: g, blob_sha384: sha }, kre_client::DEFAULT_TIMEOUT)?
    {
        Message::StateCommitted { generation } => Ok(generation),
        m => Err(unexpected(&m)),
    }
}

/// Stores an export in etcd (custody first, then the blob by compare-and-swap) and commits it;
/// a lost compare-and-swap commits nothing.
fn store_and_commit_etcd(
    kre: &Addr,
    store: &mut EtcdStore,
    url: &EtcdUrl,
    r: &StateReport,
) -> Result<EtcdRound, CliError> {
    if r.shares.is_empty() || r.blob.is_empty() {
        return Err(CliError::refused("the KRE exported a state without its custody data"));
    }
    let not_committed = |e: StoreError| CliError::refused(format!("not committed: {e}"));
    let digest = shares_set_digest(&r.shares)?;
    store.store_custody(&digest, &encode_custody(&r.shares, &r.genesis_attestation)?).map_err(not_committed)?;
    let g = match store.store(&r.blob) {
        Ok(g) => g,
        Err(StoreError::Conflict { generation, stored }) => {
            return Ok(EtcdRound::Lost(format!(
            "generation {generation} not committed: {url} holds generation {stored}, stored by another parent first; \
                 this parent stops committing (the KRE keeps serving its committed generation {})",
            r.committed_generation
        )))
        }
        Err(e) => return Err(not_committed(e)),
    };
    if g != r.export_generation {
        return Err(CliError::refused(format!(
            "the blob's header says generation {g}, the KRE said {}",
            r.export_generation
        )));
    }
    // Commit what the store holds, as read back.
    let loaded = store.load(g).map_err(not_committed)?;
    let Some(loaded) = loaded.filter(|l| l.header.generation == g) else {
        return Err(CliError::refused("the stored generation vanished before the commit"));
    };
    let committed = commit(kre, g, &loaded.blob)?;
    Ok(EtcdRound::Done(format!("stored and committed generation {committed} in {url}"), committed))
}

/// One sync round against etcd.
pub(crate) fn sync_once_etcd(
    kre: &Addr,
    store: &mut EtcdStore,
    url: &EtcdUrl,
    cold_start: bool,
) -> Result<EtcdRound, CliError> {
    let etcd = |e: StoreError| CliError::refused(format!("{url}: {e}"));
    let r = state_report(kre, &Message::StatePoll)?;
    let held = store.current().map_err(etcd)?.unwrap_or(0);
    match r.phase {
        0 => Ok(EtcdRound::Done("the KRE runs without custodians (ephemeral KEKs): nothing to store".into(), held)),
        1 => {
            let Some(loaded) = store.load(0).map_err(etcd)? else {
                return Err(CliError::refused(format!(
                    "the KRE awaits its state but {url} holds none; for a first start run `keygate custodian init --store {url}`"
                )));
            };
            let custody = store.load_custody(&loaded.header.custodian_set_digest).map_err(etcd)?.ok_or_else(|| {
                CliError::refused(format!(
                    "{url} has a sealed state but no custody data for its custodian set {}",
                    hex::encode(loaded.header.custodian_set_digest)
                ))
            })?;
            let (shares, genesis) =
                decode_custody(&custody).map_err(|e| CliError::refused(format!("{url}: custody: {e}")))?;
            let (g, r) = hand_over(kre, loaded, (shares, genesis), cold_start)?;
            Ok(EtcdRound::Done(
                format!(
                    "handed stored generation {g} to the KRE; it waits for {} custodian share(s) (`keygate custodian unseal`)",
                    r.threshold
                ),
                held,
            ))
        }
        2 => Ok(EtcdRound::Done(
            format!(
                "the KRE is unsealing generation {}: {} of {} custodian shares",
                r.unsealing_generation, r.shares_accepted, r.threshold
            ),
            held,
        )),
        3 if r.export_generation > 0 => match store_and_commit_etcd(kre, store, url, &r)? {
            EtcdRound::Lost(why) => adopt_etcd(kre, store, url, &r, why),
            done => Ok(done),
        },
        3 if held > r.committed_generation => {
            let why = format!(
                "{url} holds generation {held}, newer than the KRE's committed {}: another parent commits; \
                 this parent stops committing",
                r.committed_generation
            );
            adopt_etcd(kre, store, url, &r, why)
        }
        3 => Ok(EtcdRound::Done(
            format!("the KRE serves generation {}; nothing new to store", r.committed_generation),
            held,
        )),
        4 => Ok(EtcdRound::Done(confirming(&r), held)),
        p => Err(CliError::refused(format!("the KRE reports an unknown phase {p}"))),
    }
}

/// The store holds a newer generation than the KRE's committed one (another member's parent
/// committed it first): hands it to the KRE to adopt (StateAdopt; the KRE checks that it opens
/// under its state key, is newer and does not roll its policy back). An export of this KRE
/// that lost is dropped by the KRE; its next export follows the adopted generation. A KRE that
/// refuses it (another custodian set or state key, an older policy) leaves the round lost
/// (`why`, with the KRE's reason): this parent stops committing.
fn adopt_etcd(
    kre: &Addr,
    store: &mut EtcdStore,
    url: &EtcdUrl,
    r: &StateReport,
    why: String,
) -> Result<EtcdRound, CliError> {
    let etcd = |e: StoreError| CliError::refused(format!("{url}: {e}"));
    let newer = r.committed_generation.saturating_add(1);
    let Some(loaded) = store.load(newer).map_err(etcd)? else {
        return Err(CliError::refused(format!("{url} holds no generation newer than {}", r.committed_generation)));
    };
    let g = loaded.header.generation;
    let a = match state_report(kre, &Message::StateAdopt { blob: loaded.blob }) {
        Ok(a) => a,
        Err(e) if e.code == 1 => {
            return Ok(EtcdRound::Lost(format!("{why}; the KRE refused to adopt generation {g}: {}", e.message)))
        }
        Err(e) => return Err(e),
    };
    let lost = if r.export_generation > 0 {
        format!(" (its own export of generation {} lost the compare-and-swap and was dropped)", r.export_generation)
    } else {
        String::new()
    };
    Ok(EtcdRound::Done(
        format!(
            "{url} holds generation {g}, committed by another member: the KRE adopted it and serves generation {}{lost}",
            a.committed_generation
        ),
        g,
    ))
}

/// One round against etcd for the daemon: a lost compare-and-swap is a failed step.
pub(crate) fn sync_once_store(kre: &Addr, url: &EtcdUrl) -> Result<String, CliError> {
    match sync_once_etcd(kre, &mut etcd_store(url)?, url, false)? {
        EtcdRound::Done(line, _) => Ok(line),
        EtcdRound::Lost(why) => Err(CliError::refused(why)),
    }
}

/// `keygate state sync --store etcd://…`: rounds as with a directory; following, the pause
/// between rounds ends early when the store gets a newer generation (an etcd watch), which the
/// next round hands to the KRE to adopt.
fn sync_etcd(a: &SyncArgs) -> Result<(), CliError> {
    let Some(url) = &a.at.store else { return Err(CliError::input("give --state-dir DIR or --store URL")) };
    let mut store = etcd_store(url)?;
    let mut known = 0;
    loop {
        match (sync_once_etcd(&a.kre, &mut store, url, a.cold_start), a.follow) {
            (Ok(EtcdRound::Done(line, held)), _) => {
                crate::output::print(&super::reports::StateSynced { state_dir: url.to_string(), result: line })?;
                known = held;
            }
            (Ok(EtcdRound::Lost(why)), _) => return Err(CliError::refused(why)),
            (Err(e), None) => return Err(e),
            (Err(e), Some(_)) => crate::output::warn(
                &format!("keygate: state sync: {}", e.message),
                &format!("state sync: {}", e.message),
            ),
        }
        let Some(s) = a.follow else { return Ok(()) };
        let pause = s.max(Duration::from_secs(1));
        match store.wait_newer(known, pause) {
            Ok(Some(g)) => tracing::info!(store = %url, generation = g, "the store holds a newer generation"),
            Ok(None) => {}
            Err(e) => {
                let m = format!("state sync: watching {url}: {e}");
                crate::output::warn(&format!("keygate: {m}"), &m);
                std::thread::sleep(pause);
            }
        }
    }
}

/// `keygate custodian init --store etcd://…`: genesis into an empty etcd store.
fn init_etcd(a: &InitArgs) -> Result<(), CliError> {
    let Some(url) = &a.at.store else { return Err(CliError::input("give --state-dir DIR or --store URL")) };
    let mut store = etcd_store(url)?;
    if let Some(g) = store.current().map_err(|e| CliError::refused(format!("{url}: {e}")))? {
        return Err(CliError::refused(format!(
            "{url} already holds sealed state generation {g}: genesis refused (restart the KRE and unseal instead)"
        )));
    }
    let r = state_report(&a.kre, &Message::StateGenesis)?;
    match store_and_commit_etcd(&a.kre, &mut store, url, &r)? {
        EtcdRound::Done(_, generation) => crate::output::print(&super::reports::CustodianGenesis {
            generation,
            state_dir: url.to_string(),
            threshold: r.threshold,
        }),
        EtcdRound::Lost(why) => Err(CliError::refused(format!("genesis: {why}"))),
    }
}
