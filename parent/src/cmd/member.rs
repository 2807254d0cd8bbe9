//! `keygate member join`: the parent of a member KRE awaiting its state (or unsealed and
//! waiting for a confirmation) carries a join
//! (`docs/cluster.md`). It asks its KRE for a JoinRequest (JoinStart on the parent channel),
//! carries it to a serving member's member channel, and hands its KRE the answer with the
//! stored blob and custody of the generation that member vouched for (JoinFinish, on the same
//! parent-channel connection). Decides nothing: both KREs check everything; the parent only
//! checks, for a clear message, that the store holds the vouched blob before it hands it over.

use std::path::PathBuf;
use std::time::Instant;

use keygate_enclave::net::transport::Addr;
use keygate_enclave::wire::{MemberMessage, Message, StateReport};
use serde::Serialize;
use sha2::{Digest, Sha384};

use crate::error::CliError;
use crate::kre_client::{self, Connection, KreError};
use crate::output::Report;
use crate::storage::etcd::EtcdUrl;
use crate::storage::state::{DirFs, StateStore};
use crate::storage::store::SealedStore;

/// `keygate member ...`
#[derive(Debug, clap::Subcommand)]
pub(crate) enum MemberCommand {
    /// Join: get the state key from a serving member and serve the generation it vouches for,
    /// without custodians.
    Join(JoinArgs),
}

/// `keygate member join`.
#[derive(Debug, clap::Args)]
pub(crate) struct JoinArgs {
    /// The joining KRE's parent channel (`--parent-listen`; never proxied).
    #[arg(long)]
    pub(crate) kre: Addr,
    /// The serving member's member channel (`--member-listen`, or its parent's `keygate proxy
    /// --channel member`).
    #[arg(long, value_name = "ADDR")]
    pub(crate) from: Addr,
    /// The state directory holding the serving member's stored state.
    #[arg(long, required_unless_present = "store", conflicts_with = "store")]
    pub(crate) state_dir: Option<PathBuf>,
    /// The shared etcd store instead: etcd://HOST:PORT[,HOST:PORT...][/PREFIX].
    #[arg(long, value_name = "URL")]
    pub(crate) store: Option<EtcdUrl>,
}

/// What `member join` prints.
#[derive(Serialize)]
pub(crate) struct Joined {
    pub(crate) generation: u64,
    pub(crate) phase: u8,
    pub(crate) from: String,
    pub(crate) elapsed_ms: u64,
}

impl Report for Joined {
    fn text(&self) -> String {
        format!("joined from {}: the KRE serves generation {} ({} ms)\n", self.from, self.generation, self.elapsed_ms)
    }
}

pub(crate) fn run(cmd: MemberCommand) -> Result<(), CliError> {
    match cmd {
        MemberCommand::Join(a) => {
            let started = Instant::now();
            let at = match (a.store, a.state_dir) {
                (Some(url), _) => StateAt::Etcd(url),
                (None, Some(dir)) => StateAt::Dir(dir),
                (None, None) => return Err(CliError::input("give --state-dir DIR or --store URL")),
            };
            let r = join(&a.kre, &a.from, &at)?;
            crate::output::print(&Joined {
                generation: r.committed_generation,
                phase: r.phase,
                from: a.from.to_string(),
                elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            })
        }
    }
}

/// Where the parent keeps the sealed state a join hands over.
#[derive(Debug, Clone)]
pub(crate) enum StateAt {
    /// A state directory (`--state-dir`).
    Dir(PathBuf),
    /// The shared etcd store (`--store`).
    Etcd(EtcdUrl),
}

/// The stored blob and custody (shares file, genesis attestation) of `generation`.
pub(crate) struct Stored {
    pub(crate) blob: Vec<u8>,
    shares: Vec<u8>,
    genesis_attestation: Vec<u8>,
}

/// The newest stored state, which must be exactly `generation` with SHA-384 `sha`.
fn stored(at: &StateAt, generation: u64, sha: &[u8; 48]) -> Result<Stored, CliError> {
    let (loaded, custody, place) = match at {
        StateAt::Etcd(url) => {
            let mut s = super::custodian::etcd_store(url)?;
            let etcd = |e: crate::storage::store::StoreError| CliError::refused(format!("{url}: {e}"));
            let loaded = s.load(generation).map_err(etcd)?;
            let custody = match &loaded {
                Some(l) => s
                    .load_custody(&l.header.custodian_set_digest)
                    .map_err(etcd)?
                    .map(|c| super::custodian::decode_custody(&c))
                    .transpose()
                    .map_err(|e| CliError::refused(format!("{url}: custody: {e}")))?,
                None => None,
            };
            (loaded, custody, url.to_string())
        }
        StateAt::Dir(dir) => {
            let loaded =
                StateStore::new(DirFs::new(dir)).load(generation).map_err(|e| CliError::refused(e.to_string()))?;
            let custody = match &loaded {
                Some(l) => super::custodian::read_custody(dir, &l.header.custodian_set_digest)?,
                None => None,
            };
            (loaded, custody, dir.display().to_string())
        }
    };
    let loaded = loaded.ok_or_else(|| CliError::refused(format!("{place} holds no sealed state")))?;
    let digest: [u8; 48] = Sha384::digest(&loaded.blob).into();
    if loaded.header.generation != generation || &digest != sha {
        return Err(CliError::refused(format!(
            "{place} holds generation {}, not the generation {generation} the serving member vouched for",
            loaded.header.generation
        )));
    }
    let (shares, genesis_attestation) =
        custody.ok_or_else(|| CliError::refused(format!("{place} has the sealed state but no custody data")))?;
    Ok(Stored { blob: loaded.blob, shares, genesis_attestation })
}

/// Carries one join of the KRE whose parent channel is `kre` from the serving member whose
/// member channel is `from`, the stored state at `at`; returns the joining KRE's state report.
/// `keygate member join` and the daemon's member join task (`join_from`) both run it.
pub(crate) fn join(kre: &Addr, from: &Addr, at: &StateAt) -> Result<StateReport, CliError> {
    join_handing(kre, from, at, |stored| stored)
}

/// [`join`], handing the joining KRE what `hand` makes of the stored state (the demo plays a
/// parent that hands an older blob than the one the serving member vouched for).
pub(crate) fn join_handing(
    kre: &Addr,
    from: &Addr,
    at: &StateAt,
    hand: impl FnOnce(Stored) -> Stored,
) -> Result<StateReport, CliError> {
    let timeout = kre_client::DEFAULT_TIMEOUT;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::from(KreError::Runtime(e)))?;
    // The store is read between the two steps, outside the runtime (its etcd client has one
    // of its own); the joining KRE's connection, with its session, stays open meanwhile.
    let (mut kre, offer) = rt.block_on(async {
        let mut kre = Connection::open(kre, timeout).await?;
        kre.send(&Message::JoinStart.encode().map_err(KreError::Encode)?).await?;
        let body = kre.receive().await?;
        let request = match MemberMessage::decode(&body).map_err(KreError::Decode)? {
            MemberMessage::JoinRequest { attestation } => MemberMessage::JoinRequest { attestation },
            MemberMessage::Denied(Message::Denied { code, reason }) => {
                return Err(CliError::from(KreError::Denied { code, reason }))
            }
            _ => return Err(KreError::Unexpected("JoinOffer").into()),
        };
        let mut member = Connection::open(from, timeout).await?;
        member.send(&request.encode().map_err(KreError::Encode)?).await?;
        Ok((kre, member.receive().await?))
    })?;
    let (generation, sha) = match MemberMessage::decode(&offer).map_err(KreError::Decode)? {
        MemberMessage::JoinOffer(o) => (o.generation, o.blob_sha384),
        MemberMessage::Denied(Message::Denied { code, reason }) => {
            return Err(CliError::refused(format!("the serving member refused: {code}: {reason}")))
        }
        _ => return Err(KreError::Unexpected("JoinRequest").into()),
    };
    let s = hand(stored(at, generation, &sha)?);
    let finish =
        Message::JoinFinish { offer, blob: s.blob, shares: s.shares, genesis_attestation: s.genesis_attestation };
    match rt.block_on(kre.ask(&finish))? {
        Message::StateReport(r) => Ok(*r),
        m => Err(kre_client::unexpected(&m)),
    }
}
