//! The whole-system crash sweep: a real KRE core, its custodians and the parent's store on the
//! simulated disk of [`super::crash`], killed (KRE, parent, disk) at every step of genesis,
//! commits and the unseal; checks that no KEK version is lost, nothing rolls back and no release
//! is made under an unstored version (docs/durability.md).

use std::sync::Arc;

use keygate_attestation::bundle::{self, PolicyBody};
use keygate_attestation::crypto::{default_backend, p384_scalar_from, P384Scalar};
use keygate_attestation::mock::{derive_key, public_point, MockNsm};
use keygate_attestation::{PcrExpectation, Verifier};
use keygate_enclave::kre::{Connection, Env, Kre, KreConfig};
use keygate_enclave::peer::client::{self, ClientError, FetchRequest};
use keygate_enclave::peer::custodian::{self, Expectations};
use keygate_enclave::state::custody::CustodianSet;
use keygate_enclave::wire::{Channel, DenyCode, Id, Message, StateReport};
use p384::ecdsa::signature::Signer;
use sha2::{Digest, Sha384};

use std::collections::BTreeMap;

use super::crash::*;
use super::state::*;

const T: u64 = 1_795_478_400_000;
const SEED: &[u8] = b"state-sweep";
const KRE_PCR: u8 = 0x4b;
const CP_PCR: u8 = 0x1c;

fn rng_from(seed: u64) -> impl FnMut(&mut [u8]) {
    let mut n = seed;
    move |b: &mut [u8]| {
        for x in b.iter_mut() {
            n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            *x = n.to_be_bytes()[0];
        }
    }
}

fn pcrs(b: u8) -> BTreeMap<u8, Vec<u8>> {
    (0u8..3).map(|i| (i, vec![b; 48])).collect()
}

/// Genesis allows `prod`; v2 adds `stage` (a new cluster: a new KEK to store).
fn bundles() -> (Vec<u8>, Vec<u8>) {
    let k = derive_key(b"sweep", "approver");
    let point: bundle::ApproverKey = public_point(&k).try_into().expect("point");
    let cp = hex::encode([CP_PCR; 48]);
    let policy = |clusters: &[(&str, u32)]| {
        let c: Vec<String> = clusters
            .iter()
            .map(|(c, v)| format!(r#""{c}": {{"images": [{{"name": "cp", "pcrs": {{"0": "{cp}", "1": "{cp}", "2": "{cp}"}}}}], "kek_version": {v}}}"#))
            .collect();
        keygate_enclave::policy_file::parse(format!(r#"{{"clusters": {{{}}}}}"#, c.join(",")).as_bytes())
            .expect("policy")
    };
    let g = PolicyBody {
        version: 1,
        previous: [0; 48],
        issued_at: T / 1000,
        activation_delay: 0,
        approvers: vec![point],
        threshold: 1,
        policy: policy(&[("prod", 1)]),
        members: Vec::new(),
        freshness: None,
    };
    let gb = bundle::encode_body(&g);
    // v2 adds a cluster (a new KEK) and rotates prod's KEK to version 2.
    let v2 =
        PolicyBody { version: 2, previous: bundle::digest(&gb), policy: policy(&[("prod", 2), ("stage", 1)]), ..g };
    let vb = bundle::encode_body(&v2);
    let sig: p384::ecdsa::Signature = k.sign(&bundle::signing_message(&vb));
    (bundle::encode_bundle(&gb, &[]), bundle::encode_bundle(&vb, &[(public_point(&k), sig.to_bytes().to_vec())]))
}

struct World {
    custodians: Vec<P384Scalar>,
    set: CustodianSet,
    genesis: Vec<u8>,
    v2: Vec<u8>,
    boots: u64,
    kill_during_unseal: bool,
    #[allow(clippy::type_complexity)]
    seen: std::collections::HashSet<(Option<Vec<u8>>, Option<Vec<u8>>, u64, Vec<(String, u32, [u8; 32])>)>,
}

impl World {
    fn new() -> Self {
        let c = default_backend();
        let mut custodians = Vec::new();
        let mut keys = Vec::new();
        for i in 0..3 {
            let (s, p) = p384_scalar_from(c, rng_from(900 + i)).expect("key");
            keys.push(p.try_into().expect("point"));
            custodians.push(s);
        }
        let set = CustodianSet::new(c, 2, keys).expect("set");
        let (genesis, v2) = bundles();
        Self { custodians, set, genesis, v2, boots: 0, kill_during_unseal: false, seen: Default::default() }
    }

    fn boot(&mut self) -> Kre {
        self.boots += 1;
        let nsm = MockNsm::new(SEED, pcrs(KRE_PCR), Arc::new(|| T)).with_instance("kre");
        let verifier = Verifier::new(nsm.root_anchor());
        let config = KreConfig { custodians: Some(self.set.clone()), ..KreConfig::default() };
        Kre::with_genesis(config, verifier, &self.genesis, Arc::new(nsm)).expect("kre")
    }
}

fn one(kre: &Kre, m: Message, seed: u64) -> Message {
    let mut r = rng_from(seed);
    let s = Connection::new(m.channel().expect("a request")).on_frame(
        kre,
        &m.encode().expect("encode")[4..],
        &mut Env { now_ms: T, rng: &mut r },
    );
    Message::decode(&s.reply[4..]).expect("reply")
}

fn report(kre: &Kre, m: Message) -> StateReport {
    match one(kre, m, 3) {
        Message::StateReport(r) => *r,
        other => panic!("expected a state report, got {other:?}"),
    }
}

/// A release of `cluster`'s `etcd` key: Ok((version, key bytes)) or the denial code.
fn fetch(kre: &Kre, cluster: &str) -> Result<Vec<(u32, [u8; 32])>, DenyCode> {
    let cpi = MockNsm::new(SEED, pcrs(CP_PCR), Arc::new(|| T)).with_instance("cpi");
    let req = FetchRequest {
        cluster: Id::new(cluster).expect("id"),
        key_ids: vec![Id::new("etcd").expect("id")],
        expect_kre_pcrs: vec![],
        also_accept_kre: vec![],
    };
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(1);
    let n = CALLS.fetch_add(1, Ordering::Relaxed);
    let mut r = rng_from(n * 7919);
    let (ac, hello) = client::start(req, &mut r).expect("hello");
    let mut conn = Connection::new(Channel::Release);
    let mut kr = rng_from(n * 104_729 + 1);
    let s = conn.on_frame(kre, &hello[4..], &mut Env { now_ms: T, rng: &mut kr });
    let ar = ac
        .on_challenge(&s.reply[4..], &Verifier::new(cpi.root_anchor()), T, &cpi, default_backend(), &mut r)
        .expect("challenge");
    let s = conn.on_frame(kre, &ar.release_frame.clone()[4..], &mut Env { now_ms: T, rng: &mut kr });
    match ar.on_released(&s.reply[4..], default_backend()) {
        Ok(r) => Ok(r.keys.iter().map(|k| (k.version, *k.key.expose())).collect()),
        Err(ClientError::Denied { code, .. }) => Err(code),
        Err(e) => panic!("fetch failed: {e}"),
    }
}

/// The parent's side of a sync: store what is exported and commit what was read back.
/// Ok(generation committed) or Err(the store failed: nothing committed).
fn sync(kre: &Kre, store: &mut StateStore<SimFs>) -> Result<Option<u64>, ()> {
    let r = report(kre, Message::StatePoll);
    if r.export_generation == 0 {
        return Ok(None);
    }
    let g = store.store(&r.blob).map_err(|_| ())?;
    let back = store.load(g).map_err(|_| ())?.ok_or(())?;
    let sha: [u8; 48] = Sha384::digest(&back.blob).into();
    match one(kre, Message::StateCommit { generation: g, blob_sha384: sha }, 4) {
        Message::StateCommitted { generation } => Ok(Some(generation)),
        other => panic!("commit refused: {other:?}"),
    }
}

fn unseal(world: &World, kre: &Kre, blob: Vec<u8>, custody: &(Vec<u8>, Vec<u8>)) -> u64 {
    let r = report(
        kre,
        Message::StateLoad {
            blob,
            shares: custody.0.clone(),
            genesis_attestation: custody.1.clone(),
            cold_start: false,
        },
    );
    assert_eq!(r.phase, 2);
    let verifier = Verifier::new(MockNsm::new(SEED, pcrs(KRE_PCR), Arc::new(|| T)).root_anchor());
    let expect: Vec<PcrExpectation> =
        pcrs(KRE_PCR).into_iter().map(|(index, value)| PcrExpectation { index, value }).collect();
    let mut generation = 0;
    for i in [0usize, 2] {
        let nonce = [u8::try_from(i).expect("small") + 1; 32];
        let mut conn = Connection::new(Channel::Custodian);
        let mut kr = rng_from(40 + u64::try_from(i).expect("small"));
        let s = conn.on_frame(
            kre,
            &Message::UnsealHello { client_nonce: nonce }.encode().expect("hello")[4..],
            &mut Env { now_ms: T, rng: &mut kr },
        );
        let e = Expectations {
            verifier: &verifier,
            now_ms: T,
            kre_pcrs: &expect,
            genesis_pcrs: &expect,
            record: None,
            accept_new_genesis: false,
            approve_reshare: None,
            cold_start: false,
        };
        let resp =
            custodian::on_offer(&s.reply[4..], &nonce, &e, &world.custodians[i], default_backend(), &mut rng_from(7))
                .expect("custodian accepts");
        let s = conn.on_frame(kre, &resp.frame[4..], &mut Env { now_ms: T, rng: &mut kr });
        generation = custodian::on_progress(&s.reply[4..]).expect("share accepted").3;
    }
    generation
}

/// What one run did before it was cut short.
#[derive(Default)]
struct Run {
    /// (cluster, version, key) of every release.
    released: Vec<(String, u32, [u8; 32])>,
    /// The highest generation the KRE committed.
    committed: u64,
    /// Custody data as the parent would hold it (written before the first blob).
    custody: Option<(Vec<u8>, Vec<u8>)>,
    /// Releases refused because their KEK was not yet stored.
    pending_refusals: usize,
    /// The policy version the KRE reported durable (with a durability receipt).
    durable_policy: Option<u64>,
    /// (chain, seq, digest) of every audit entry the parent stored and acknowledged
    /// (its audit directory is fsynced before the acknowledgement: never lost here).
    stored: Vec<([u8; 48], u64, [u8; 48])>,
    /// The newest seq acknowledged when the committed generation was exported.
    acked_at_commit: u64,
}

/// The parent's audit follower: stores every new entry, then acknowledges it (what
/// `audit pull --follow` does between the KRE's steps).
fn collect(kre: &Kre, run: &mut Run) {
    let after = run.stored.last().map_or(0, |e| e.1);
    let entries = kre.audit().entries_after(after, 4096);
    let Some(last) = entries.last().map(|e| e.seq()) else { return };
    run.stored.extend(entries.iter().map(|e| (*e.chain_id(), e.seq(), e.digest())));
    assert!(matches!(one(kre, Message::AuditAck { up_to_seq: last }, 8), Message::AuditAcked { .. }));
}

/// The script: genesis, release prod, push v2 (new cluster), sync, release stage. The
/// KRE is killed after protocol step `kill_after` (if any); file faults come from the
/// store's plan. Returns the run and the disk as the process left it.
fn script(world: &mut World, fs: SimFs, kill_after: Option<usize>) -> (Run, SimFs) {
    let kre = world.boot();
    let mut store = StateStore::new(fs);
    let mut run = Run::default();
    let mut step = 0usize;
    let alive = |step: &mut usize| {
        *step += 1;
        kill_after.is_none_or(|k| *step <= k)
    };
    // 1. Genesis (custody is stored atomically before the blob; modelled as durable).
    let r = report(&kre, Message::StateGenesis);
    run.custody = Some((r.shares.clone(), r.genesis_attestation.clone()));
    if !alive(&mut step) {
        return (run, store.fs);
    }
    // 2. Store and commit generation 1 (exported at genesis, before anything was
    // acknowledged: its audit head is the empty chain).
    collect(&kre, &mut run);
    match sync(&kre, &mut store) {
        Ok(Some(g)) => (run.committed, run.acked_at_commit) = (g, 0),
        Ok(None) => panic!("nothing exported at genesis"),
        Err(()) => {
            // Not stored: nothing may be released.
            assert_eq!(fetch(&kre, "prod"), Err(DenyCode::StatePending));
            run.pending_refusals += 1;
            return (run, store.fs);
        }
    }
    if !alive(&mut step) || store.fs.crashed {
        return (run, store.fs);
    }
    // 3. Release prod.
    for (v, k) in fetch(&kre, "prod").expect("prod released") {
        run.released.push(("prod".into(), v, k));
    }
    if !alive(&mut step) {
        return (run, store.fs);
    }
    // 4. Push v2: a new cluster whose KEK is not stored yet.
    assert!(matches!(one(&kre, Message::PolicyPush { bundle: world.v2.clone() }, 5), Message::PolicyAccepted { .. }));
    // The cluster only the not yet durable v2 has waits for the commit (as its KEK does).
    assert_eq!(fetch(&kre, "stage"), Err(DenyCode::PolicyNotDurable), "released under an unstored KEK");
    let prod = fetch(&kre, "prod").expect("prod still released");
    assert!(
        prod.iter().all(|(v, _)| *v == 1),
        "released under the unstored rotated version: {:?}",
        prod.iter().map(|x| x.0).collect::<Vec<_>>()
    );
    run.pending_refusals += 2;
    if !alive(&mut step) {
        return (run, store.fs);
    }
    // 5. Store and commit generation 2.
    collect(&kre, &mut run);
    let acked = run.stored.last().map_or(0, |e| e.1);
    // A refusal is recorded without waiting for the parent (only answers that hand out
    // keys or change the KRE wait): its entry is not yet stored when the state is
    // exported, and a crash may lose it.
    assert_eq!(fetch(&kre, "unknown"), Err(DenyCode::UnknownCluster));
    match sync(&kre, &mut store) {
        Ok(Some(g)) => {
            (run.committed, run.acked_at_commit) = (g, acked);
            // The pipeline asks whether v2 is durable: a receipt is a promise that a
            // restart, whatever happens to the parent's disk, comes back with v2.
            let b = bundle::decode_bundle(&world.v2, default_backend()).expect("v2");
            let ask = Message::PolicyDurableWait { version: 2, digest: bundle::digest(&b.body_bytes), wait_ms: 0 };
            if let Message::PolicyDurable { .. } = one(&kre, ask, 7) {
                run.durable_policy = Some(2);
            }
        }
        Ok(None) => panic!("nothing exported after the push"),
        Err(()) => {
            assert_eq!(fetch(&kre, "stage"), Err(DenyCode::PolicyNotDurable), "released under an unstored KEK");
            let prod = fetch(&kre, "prod").expect("prod still released");
            assert!(prod.iter().all(|(v, _)| *v == 1), "released under the unstored rotated version");
            run.pending_refusals += 2;
            return (run, store.fs);
        }
    }
    if !alive(&mut step) || store.fs.crashed {
        return (run, store.fs);
    }
    collect(&kre, &mut run);
    // 6. Release stage, and prod under both versions (the rotation is stored).
    for (v, k) in fetch(&kre, "stage").expect("stage released") {
        run.released.push(("stage".into(), v, k));
    }
    let prod = fetch(&kre, "prod").expect("prod released");
    assert_eq!(prod.iter().map(|(v, _)| *v).collect::<Vec<_>>(), [2, 1], "current first, then the older one");
    for (v, k) in prod {
        run.released.push(("prod".into(), v, k));
    }
    collect(&kre, &mut run);
    (run, store.fs)
}

/// Restart everything on `disk`, unseal, restore the policy, and check the invariants.
fn recover_and_check(world: &mut World, run: &Run, disk: Disk, what: &str) -> (usize, usize) {
    // Outcomes that leave the same files after the same run are recovered once.
    let key = (disk.slot(CURRENT).cloned(), disk.slot(PREVIOUS).cloned(), run.committed, run.released.clone());
    if !world.seen.insert(key) {
        return (0, 0);
    }
    let kre = world.boot();
    let mut store = StateStore::new(SimFs::new(disk));
    let loaded = store.load(0).unwrap_or_else(|e| panic!("{what}: load failed: {e}"));
    let Some(loaded) = loaded else {
        assert_eq!(run.committed, 0, "{what}: a committed generation was lost");
        assert!(run.released.is_empty(), "{what}: keys were released but no state survives");
        return (0, 0);
    };
    let g = loaded.header.generation;
    assert!(g >= run.committed, "{what}: rollback: loaded {g}, committed {}", run.committed);
    let custody = run.custody.clone().expect("custody stored before any blob");
    if world.kill_during_unseal {
        // The KRE dies after the load and one custodian's share: a new boot starts over.
        let doomed = world.boot();
        let _ = report(
            &doomed,
            Message::StateLoad {
                blob: loaded.blob.clone(),
                shares: custody.0.clone(),
                genesis_attestation: custody.1.clone(),
                cold_start: false,
            },
        );
        drop(doomed);
    }
    assert_eq!(unseal(world, &kre, loaded.blob, &custody), g, "{what}");
    // The restarted KRE's trail names the run before it at the head the unsealed state
    // recorded: an entry the parent stored (so an honest crash never shows as a gap),
    // and, for the committed generation, no older than what was acknowledged before it
    // was exported.
    let linked = kre
        .audit()
        .entries_after(0, 64)
        .into_iter()
        .find_map(|e| match e.event() {
            keygate_enclave::audit::AuditEvent::ChainLinked { previous, .. } => Some(*previous),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{what}: no chain_linked entry after the unseal"));
    let head = linked.unwrap_or_else(|| panic!("{what}: the unsealed state records no audit head"));
    if head.seq > 0 {
        assert!(
            run.stored.contains(&(head.chain_id, head.seq, head.digest)),
            "{what}: the link names seq {} of the previous run, which the parent never stored",
            head.seq
        );
    }
    if g == run.committed {
        assert!(
            head.seq >= run.acked_at_commit,
            "{what}: the link names seq {}, older than the {} acknowledged before the commit",
            head.seq,
            run.acked_at_commit
        );
    }
    // A policy change reported durable is in the state the KRE came back with.
    if let Some(v) = run.durable_policy {
        let status: serde_json::Value = serde_json::from_str(&kre.status_json()).expect("status");
        assert!(
            status["policy_durable_version"].as_u64().is_some_and(|d| d >= v),
            "{what}: policy v{v} was reported durable, the recovered state carries {}",
            status["policy_durable_version"]
        );
    }
    // The parent replays the stored policy chain (v2 if it was pushed).
    let _ = one(&kre, Message::PolicyPush { bundle: world.v2.clone() }, 6);
    // Bring any uncommitted change (a cluster without a stored KEK) to the store.
    let _ = sync(&kre, &mut store);
    let mut checked = 0;
    for (cluster, version, key) in &run.released {
        let again = fetch(&kre, cluster).unwrap_or_else(|c| panic!("{what}: {cluster} refused after recovery: {c}"));
        assert!(
            again.iter().any(|(v, k)| v == version && k == key),
            "{what}: {cluster} v{version} lost (a KEK version or a release under an unstored version)"
        );
        checked += 1;
    }
    (checked, 1)
}

/// Every fault at every file operation of the whole flow (genesis, a change, the loads of
/// the unseal), the KRE killed after every protocol step, the parent killed at every
/// step; then restart, unseal and check: zero KEK versions lost, zero rollbacks, zero
/// keys released under an unstored version, a policy reported durable always back, and
/// the restarted run linked to an audit entry the parent stored, no older than what was
/// acknowledged before the committed generation was exported.
#[test]
fn crash_anywhere_in_genesis_change_and_unseal_loses_nothing() {
    let mut world = World::new();
    // A clean run: how many file operations and protocol steps it takes.
    let (clean, fs) = script(&mut world, SimFs::new(Disk::default()), None);
    assert_eq!(clean.released.len(), 4);
    let n_ops = fs.ops;
    let faults = [Fault::DiskFull, Fault::IoError, Fault::Crash, Fault::TornWriteCrash, Fault::CorruptRead];
    let (mut points, mut outcomes, mut releases_checked, mut cases) = (0usize, 0usize, 0usize, 0usize);
    for at in 0..=n_ops {
        for fault in faults {
            let mut fs = SimFs::new(Disk::default());
            fs.plan = Some((at, fault));
            let (run, fs) = script(&mut world, fs, None);
            points += 1;
            let mut modes: Vec<(Disk, String)> =
                ALL_SURVIVES.iter().map(|m| (fs.disk.after_crash(*m), format!("op {at} {fault:?} {m:?}"))).collect();
            if !fs.crashed {
                modes.push((fs.disk.clone(), format!("op {at} {fault:?} running")));
            }
            for (disk, what) in modes {
                cases += 1;
                let (c, o) = recover_and_check(&mut world, &run, disk, &what);
                releases_checked += c;
                outcomes += o;
            }
        }
    }
    // kill -9 of the KRE after each protocol step (the parent's disk intact), and of
    // the parent (its unsynced writes lost in every way a crash allows).
    for kill in 0..=6 {
        let (run, fs) = script(&mut world, SimFs::new(Disk::default()), Some(kill));
        points += 2;
        let (c, o) = recover_and_check(&mut world, &run, fs.disk.clone(), &format!("KRE killed after step {kill}"));
        releases_checked += c;
        outcomes += o;
        for m in ALL_SURVIVES {
            let (c, o) = recover_and_check(
                &mut world,
                &run,
                fs.disk.after_crash(m),
                &format!("parent killed after step {kill} {m:?}"),
            );
            releases_checked += c;
            outcomes += o;
        }
    }
    // The KRE killed during the unseal of a recovery (after the load), for each kill point.
    world.kill_during_unseal = true;
    world.seen.clear();
    for kill in 0..=6 {
        let (run, fs) = script(&mut world, SimFs::new(Disk::default()), Some(kill));
        points += 1;
        cases += 1;
        let (c, o) =
            recover_and_check(&mut world, &run, fs.disk.clone(), &format!("unseal killed, run cut after {kill}"));
        releases_checked += c;
        outcomes += o;
    }
    eprintln!(
        "system sweep: {points} injection points ({} file operations x 5 faults, 7 KRE kills, 7 parent kills, 7 KRE kills during the unseal), {cases} crash outcomes, {outcomes} distinct recoveries unsealed, {releases_checked} earlier releases reproduced; 0 KEK versions lost, 0 rollbacks, 0 releases under an unstored version",
        n_ops + 1
    );
    assert!(points > 50, "{points}");
    assert!(outcomes > 5 && releases_checked > 5, "{outcomes} {releases_checked}");
}
