//! `keygate member join`: the parent of a member KRE awaiting its state (or unsealed and
//! waiting for a confirmation) carries a join
//! (`docs/cluster.md`). It asks its KRE for a JoinRequest (JoinStart on the parent channel),
//! carries it to every listed serving member's member channel at once, and hands its KRE the
//! newest answer with the stored blob and custody of the generation that member vouched for
//! (JoinFinish, on the same parent-channel connection). Asking several members is for an
//! honest parent catching up (a member whose own parent lags offers an older generation);
//! against a parent that hides members the bound is the pipeline's timestamps
//! (docs/policy.md "Freshness"). Decides only which offer to hand over ([`choose`]); both
//! KREs check everything, and the parent checks, for a clear message, that the store holds the
//! vouched blob before it hands it over.

use std::path::PathBuf;
use std::time::{Duration, Instant};

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
    /// A serving member's member channel (`--member-listen`, or its parent's `keygate proxy
    /// --channel member`). Repeat it for several members: all are asked at once and the
    /// newest offer is taken.
    #[arg(long, value_name = "ADDR", required = true)]
    pub(crate) from: Vec<Addr>,
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
            let j = join(&a.kre, &a.from, &at)?;
            for why in &j.skipped {
                crate::output::warn(&format!("warning: no offer from {why}"), why);
            }
            crate::output::print(&Joined {
                generation: j.report.committed_generation,
                phase: j.report.phase,
                from: j.from.to_string(),
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

/// A join that succeeded: the joining KRE's report, the member whose offer it took, and why
/// each member that offered nothing did not (its address first).
#[derive(Debug)]
pub(crate) struct JoinedFrom {
    pub(crate) report: StateReport,
    pub(crate) from: Addr,
    pub(crate) skipped: Vec<String>,
}

/// How long the other members are waited for once one member has offered.
pub(crate) const LATE_OFFERS: Duration = Duration::from_millis(250);

/// What one member answered a JoinRequest: its offer's (generation, policy version), or why
/// there is none.
pub(crate) type Answer = Result<(u64, u64), String>;

/// The offer to hand over: the newest (generation, then policy version); among equals the
/// first in the order the members were listed (the caller shuffles them to spread joins).
/// `None` when no member offered.
pub(crate) fn choose(answers: &[Answer]) -> Option<usize> {
    let mut best: Option<(usize, (u64, u64))> = None;
    for (i, a) in answers.iter().enumerate() {
        if let Ok(v) = a {
            if best.is_none_or(|(_, b)| *v > b) {
                best = Some((i, *v));
            }
        }
    }
    best.map(|(i, _)| i)
}

/// One member's answer to `request`: the frame and what it offers.
async fn ask_member(from: &Addr, request: &[u8], timeout: Duration) -> (Vec<u8>, Answer) {
    let answer = async {
        let mut member = Connection::open(from, timeout).await?;
        member.send(request).await?;
        member.receive().await
    };
    match tokio::time::timeout(timeout, answer).await {
        Err(_) => (Vec::new(), Err(format!("{from}: no answer within {} ms", timeout.as_millis()))),
        Ok(Err(e)) => (Vec::new(), Err(format!("{from}: {}", CliError::from(e).message))),
        Ok(Ok(frame)) => {
            let a = match MemberMessage::decode(&frame) {
                Ok(MemberMessage::JoinOffer(o)) => Ok((o.generation, o.policy_version)),
                Ok(MemberMessage::Denied(Message::Denied { code, reason })) => {
                    Err(format!("{from} refused: {code}: {reason}"))
                }
                Ok(_) => Err(format!("{from}: expected a JoinOffer")),
                Err(e) => Err(format!("{from}: {e}")),
            };
            (frame, a)
        }
    }
}

/// Carries one join of the KRE whose parent channel is `kre` from the serving members whose
/// member channels are `from` (all asked at once, the newest offer taken), the stored state at
/// `at`; returns the joining KRE's state report and the member whose offer it took.
/// `keygate member join` and the daemon's member join task (`join_from`) both run it.
pub(crate) fn join(kre: &Addr, from: &[Addr], at: &StateAt) -> Result<JoinedFrom, CliError> {
    join_handing(kre, from, at, |stored| stored)
}

/// [`join`], handing the joining KRE what `hand` makes of the stored state (the demo plays a
/// parent that hands an older blob than the one the serving member vouched for).
pub(crate) fn join_handing(
    kre: &Addr,
    from: &[Addr],
    at: &StateAt,
    hand: impl FnOnce(Stored) -> Stored,
) -> Result<JoinedFrom, CliError> {
    let timeout = kre_client::DEFAULT_TIMEOUT;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::from(KreError::Runtime(e)))?;
    // The store is read between the two steps, outside the runtime (its etcd client has one
    // of its own); the joining KRE's connection, with its session, stays open meanwhile.
    let (mut kre, offers) = rt.block_on(async {
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
        let request = request.encode().map_err(KreError::Encode)?;
        let mut asks = tokio::task::JoinSet::new();
        for (i, f) in from.iter().enumerate() {
            let (f, request) = (f.clone(), request.clone());
            asks.spawn(async move { (i, ask_member(&f, &request, timeout).await) });
        }
        // Every member's answer, or until the late-offer window after the first offer closes.
        let mut offers: Vec<(Vec<u8>, Answer)> =
            from.iter().map(|f| (Vec::new(), Err(format!("{f}: no answer in time")))).collect();
        let mut deadline = tokio::time::Instant::now() + timeout;
        while let Ok(Some(done)) = tokio::time::timeout_at(deadline, asks.join_next()).await {
            let Ok((i, answer)) = done else { continue };
            if answer.1.is_ok() {
                deadline = deadline.min(tokio::time::Instant::now() + LATE_OFFERS);
            }
            if let Some(slot) = offers.get_mut(i) {
                *slot = answer;
            }
        }
        asks.abort_all();
        Ok((kre, offers))
    })?;
    let (mut frames, answers): (Vec<Vec<u8>>, Vec<Answer>) = offers.into_iter().unzip();
    let skipped: Vec<String> = answers.iter().filter_map(|a| a.as_ref().err().cloned()).collect();
    let Some(best) = choose(&answers) else {
        return Err(CliError::refused(format!("no serving member offered its state: {}", skipped.join("; "))));
    };
    let offer = frames.swap_remove(best);
    let (generation, sha) = match MemberMessage::decode(&offer).map_err(KreError::Decode)? {
        MemberMessage::JoinOffer(o) => (o.generation, o.blob_sha384),
        _ => return Err(KreError::Unexpected("JoinRequest").into()),
    };
    let s = hand(stored(at, generation, &sha)?);
    let finish =
        Message::JoinFinish { offer, blob: s.blob, shares: s.shares, genesis_attestation: s.genesis_attestation };
    match rt.block_on(kre.ask(&finish))? {
        Message::StateReport(r) => Ok(JoinedFrom { report: *r, from: from[best].clone(), skipped }),
        m => Err(kre_client::unexpected(&m)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_offer_is_taken_and_the_first_listed_among_equals() {
        let no = || Err("refused".to_owned());
        assert_eq!(choose(&[]), None);
        assert_eq!(choose(&[no(), no()]), None);
        assert_eq!(choose(&[Ok((3, 2)), Ok((5, 1)), no()]), Some(1), "a newer generation");
        assert_eq!(choose(&[Ok((5, 1)), Ok((5, 2))]), Some(1), "the same generation, a newer policy");
        assert_eq!(choose(&[no(), Ok((5, 2)), Ok((5, 2))]), Some(1), "the first of equals");
        assert_eq!(choose(&[Ok((9, 0)), Ok((2, 9))]), Some(0), "the generation first");
    }
}
