//! `keygate audit verify | show` end to end: a trail built by the KRE's audit library (mock
//! NSM binding), stored with the parent's storage function, checked by the real binary —
//! intact, and tampered in each way the parent could tamper with it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use keygate_attestation::crypto::default_backend;
use keygate_attestation::mock::MockNsm;
use keygate_attestation::DocumentKind;
use keygate_enclave::audit::files::{frame_record, CHECKPOINTS_MAGIC, ENTRIES_MAGIC};
use keygate_enclave::audit::store::{self, CHECKPOINTS_FILE, ENTRIES_FILE};
use keygate_enclave::audit::{AuditConfig, AuditEntry, AuditEvent, AuditLog, AuditSigner, Checkpoint, Requester};
use keygate_enclave::wire::Id;
use keygate_tests::e2e::{dev_kre, prod_policy_for, unix, START_LIMIT};
use keygate_tests::{keygate, wait_for_socket, KillOnDrop, TempDir};

const T: u64 = 1_795_478_400_000 + 5 * 3_600_000;

fn pcrs(b: u8) -> BTreeMap<u8, Vec<u8>> {
    (0u8..3).map(|i| (i, vec![b + i; 48])).collect()
}

fn id(s: &str) -> Id {
    Id::new(s).expect("id")
}

struct Trail {
    entries: Vec<AuditEntry>,
    checkpoints: Vec<Checkpoint>,
    root_pem: String,
}

fn trail(instance: &str) -> Trail {
    let nsm = MockNsm::new(b"cli-audit", pcrs(0x70), Arc::new(|| T)).with_instance(instance);
    let signer = AuditSigner::start(&nsm, default_backend()).expect("signer");
    let mut log = AuditLog::new(AuditConfig::default(), signer);
    let requester = Requester {
        module_id: "i-cpi".into(),
        kind: DocumentKind::Enclave,
        pcrs: pcrs(0x10),
        document_sha384: [5; 48],
    };
    let events = vec![
        AuditEvent::KreStarted { nsm_kind: "mock".into(), pcrs: pcrs(0x70), software: "0.1.0".into() },
        AuditEvent::ConfigChanged { setting: "challenge_ttl".into(), value: "30s".into() },
        AuditEvent::ReleaseAllowed {
            requester: requester.clone(),
            cluster: id("prod"),
            keys: vec![(id("etcd-kek"), 1)],
            image: "cp-good".into(),
        },
        AuditEvent::ReleaseDenied {
            code: "image_not_allowed".into(),
            reason: "no image rule of cluster prod matches".into(),
            requester: Some(requester.clone()),
            cluster: Some(id("prod")),
            key_ids: vec![id("etcd-kek")],
        },
        AuditEvent::PolicyAccepted { version: 2, digest: [7; 48], activates_at_ms: T + 3_600_000 },
        AuditEvent::PolicyRefused { version: Some(1), digest: None, code: "rollback".into(), reason: "v1 < v2".into() },
        AuditEvent::ChallengeRefused { code: "busy".into(), reason: "challenge table full".into() },
        AuditEvent::KekRotated { cluster: id("prod"), new_version: 2 },
        AuditEvent::UnsealStep { step: "sealed-state-loaded".into(), ok: true, detail: "1 cluster".into() },
        AuditEvent::ReleaseAllowed {
            requester,
            cluster: id("prod"),
            keys: vec![(id("etcd-kek"), 2)],
            image: "cp-good".into(),
        },
    ];
    let mut checkpoints = Vec::new();
    for (i, ev) in events.into_iter().enumerate() {
        let t = T + u64::try_from(i).expect("small") * 1000;
        if i == 4 {
            log.set_policy_version(2);
        }
        log.append(ev, t).expect("append");
        if i % 4 == 3 {
            checkpoints.push(log.checkpoint(t).expect("checkpoint"));
        }
    }
    checkpoints.push(log.checkpoint(T + 20_000).expect("checkpoint"));
    Trail { entries: log.entries_after(0, 100), checkpoints, root_pem: nsm.root_anchor().to_pem() }
}

fn pcr_args() -> Vec<String> {
    pcrs(0x70).iter().flat_map(|(i, v)| ["--expect-kre-pcr".to_owned(), format!("{i}={}", hex::encode(v))]).collect()
}

/// What an attacker with write access writes: raw files in the storage format.
fn write_raw(dir: &Path, entries: &[AuditEntry], checkpoints: &[Checkpoint]) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let mut e = ENTRIES_MAGIC.to_vec();
    for x in entries {
        e.extend_from_slice(&frame_record(x.bytes()));
    }
    let mut c = CHECKPOINTS_MAGIC.to_vec();
    for x in checkpoints {
        c.extend_from_slice(&frame_record(x.bytes()));
    }
    std::fs::write(dir.join(ENTRIES_FILE), e).expect("write");
    std::fs::write(dir.join(CHECKPOINTS_FILE), c).expect("write");
}

fn verify(dir: &Path, root: &Path, json: bool) -> std::process::Output {
    let mut args = vec!["audit".to_owned(), "verify".to_owned(), dir.display().to_string()];
    args.extend(["--root".to_owned(), root.display().to_string()]);
    args.extend(pcr_args());
    if json {
        args.push("--json".into());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    keygate(&refs)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts that verification fails with exit 1, the JSON error `kind` and `needle` on stderr.
fn assert_refused(dir: &Path, root: &Path, kind: &str, needle: &str) {
    let out = verify(dir, root, false);
    assert_eq!(out.status.code(), Some(1), "{kind}: stdout {} stderr {}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stderr).contains(needle), "{kind}: stderr lacks {needle:?}: {}", text(&out.stderr));
    let out = verify(dir, root, true);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["ok"], false);
    assert_eq!(v["error"], kind, "{v}");
}

#[test]
fn verify_and_show_an_intact_trail() {
    let tmp = TempDir::new("keygate-cli-audit").expect("tmp");
    let t = trail("kre");
    let root = tmp.path().join("root.pem");
    std::fs::write(&root, &t.root_pem).expect("root");
    let dir = tmp.path().join("audit");
    // Two pulls, as the parent would store them.
    store::append_to_dir(&dir, &t.entries[..4], &t.checkpoints[..1]).expect("store");
    store::append_to_dir(&dir, &t.entries[2..], &t.checkpoints[1..]).expect("store");

    let out = verify(&dir, &root, false);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout} {}", text(&out.stderr));
    assert!(stdout.contains(": OK"), "{stdout}");
    assert!(stdout.contains("seq 1..=10"), "{stdout}");
    assert!(stdout.contains("PCRs pinned  yes"), "{stdout}");
    assert!(text(&out.stderr).is_empty(), "{}", text(&out.stderr));

    let out = verify(&dir, &root, true);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        (v["ok"].as_bool(), v["last_seq"].as_u64(), v["unsigned_tail"].as_u64()),
        (Some(true), Some(10), Some(0))
    );
    assert_eq!(v["kre_pcrs"]["0"], hex::encode([0x70; 48]));

    // Without pinned PCRs it still verifies, with a warning.
    let d = dir.display().to_string();
    let r = root.display().to_string();
    let out = keygate(&["audit", "verify", &d, "--root", &r]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stderr).contains("not pinned"), "{}", text(&out.stderr));

    let out = keygate(&["audit", "show", &d]);
    assert_eq!(out.status.code(), Some(0));
    let table = text(&out.stdout);
    for needle in
        ["kre_started", "release_allowed", "release_denied", "etcd-kek@2", "image_not_allowed", "checkpoint  seq 10"]
    {
        assert!(table.contains(needle), "show lacks {needle}: {table}");
    }

    let out = keygate(&["audit", "show", &d, "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let lines: Vec<serde_json::Value> =
        text(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(lines.len(), 10 + 3);
    assert_eq!(lines[0]["event"], "kre_started");
    assert_eq!(lines[2]["event"], "release_allowed");
    assert_eq!(lines[2]["decision"], "allow");
    assert_eq!(lines[2]["keys"][0]["version"], 1);
    assert_eq!(lines[2]["requester"]["module_id"], "i-cpi");
    assert_eq!(lines[3]["code"], "image_not_allowed");
    assert_eq!(lines[5]["policy_version"], 2);
    assert_eq!(lines[12]["type"], "checkpoint");
    assert_eq!(lines[12]["seq"], 10);
}

#[test]
fn verify_reports_each_kind_of_tampering() {
    let tmp = TempDir::new("keygate-cli-audit").expect("tmp");
    let t = trail("kre");
    let other = trail("kre-b");
    let root = tmp.path().join("root.pem");
    std::fs::write(&root, &t.root_pem).expect("root");
    let case = |name: &str, entries: &[AuditEntry], cps: &[Checkpoint]| {
        let d = tmp.path().join(name);
        write_raw(&d, entries, cps);
        d
    };

    let mut e = t.entries.clone();
    e.remove(5);
    assert_refused(&case("deleted", &e, &t.checkpoints), &root, "entry_deleted", "entries 6..=6 deleted");

    let mut e = t.entries.clone();
    e.swap(2, 3);
    assert_refused(&case("reordered", &e, &t.checkpoints), &root, "entry_reordered", "entries reordered");

    let mut e = t.entries.clone();
    let x = &e[2];
    let edited = AuditEvent::ConfigChanged { setting: "nothing".into(), value: "happened".into() };
    e[2] = AuditEntry::new(*x.chain_id(), x.seq(), *x.prev(), x.time_ms(), x.policy_version(), edited).expect("entry");
    assert_refused(&case("modified", &e, &t.checkpoints), &root, "entry_modified", "entry 3 modified");

    assert_refused(
        &case("truncated", &t.entries[..8], &t.checkpoints),
        &root,
        "truncated_after_checkpoint",
        "truncated after the checkpoint",
    );

    let mut e = t.entries.clone();
    e[6] = other.entries[6].clone();
    assert_refused(&case("spliced", &e, &t.checkpoints), &root, "foreign_entry", "from another KRE");

    let mut c = t.checkpoints.clone();
    c[2] = other.checkpoints[2].clone();
    assert_refused(&case("spliced-cp", &t.entries, &c), &root, "foreign_checkpoint", "from another KRE");

    // A checkpoint signed by the parent's own key, carrying the genuine binding document.
    let mut forger = AuditSigner::generate(default_backend(), |b| b.fill(0x66)).expect("key");
    forger.bind(t.checkpoints[0].binding_document().to_vec()).expect("bind");
    let mut c = t.checkpoints.clone();
    c[2] = forger.sign(10, *t.checkpoints[2].head(), T).expect("sign");
    assert_refused(&case("forged", &t.entries, &c), &root, "checkpoint_key_not_attested", "not attested to a KRE");

    let mut b = t.checkpoints[1].bytes().to_vec();
    b[150] ^= 1; // inside the public key or signature
    let mut c = t.checkpoints.clone();
    c[1] = Checkpoint::decode(&b).expect("decode");
    let d = case("bad-sig", &t.entries, &c);
    let out = verify(&d, &root, true);
    assert_eq!(out.status.code(), Some(1));

    // A torn record: reported with its file and offset, never skipped.
    let d = case("torn", &t.entries, &t.checkpoints);
    let ep = d.join(ENTRIES_FILE);
    let bytes = std::fs::read(&ep).expect("read");
    std::fs::write(&ep, &bytes[..bytes.len() - 5]).expect("write");
    assert_refused(&d, &root, "malformed", "entries.log");

    // The wrong KRE image.
    let dir = case("intact", &t.entries, &t.checkpoints);
    let (d, r) = (dir.display().to_string(), root.display().to_string());
    let bad_pcr = format!("0={}", hex::encode([0x71; 48]));
    let out = keygate(&["audit", "verify", &d, "--root", &r, "--expect-kre-pcr", &bad_pcr]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("not the expected one"), "{}", text(&out.stderr));

    // The real AWS root (the default) does not accept the mock PKI's binding.
    let out = keygate(&["audit", "verify", &d]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("not attested"), "{}", text(&out.stderr));

    // Bad input and a missing directory.
    let out = keygate(&["audit", "verify", &d, "--expect-kre-pcr", "0=zz"]);
    assert_eq!(out.status.code(), Some(2));
    let missing = tmp.path().join("missing").display().to_string();
    assert_eq!(keygate(&["audit", "verify", &missing, "--root", &r]).status.code(), Some(3));
    assert_eq!(keygate(&["audit", "show", &missing]).status.code(), Some(3));
}

/// Starts the KRE binary (mock NSM, static policy) on `sock`; returns once its release
/// socket and its parent channel (`<sock>.parent`) accept connections.
fn start_kre(d: &Path, sock: &Path, n: usize) -> KillOnDrop {
    std::fs::write(d.join("policy.json"), prod_policy_for("cp", 0x5a).to_string()).expect("policy");
    let log = std::fs::File::create(d.join(format!("kre-{n}.log"))).expect("log");
    let child = dev_kre("cli-audit-follow")
        .args(["--listen", &unix(sock), "--policy"])
        .arg(d.join("policy.json"))
        .stderr(log)
        .spawn()
        .expect("kre");
    let mut kre = KillOnDrop(child);
    let parent = PathBuf::from(format!("{}.parent", sock.display()));
    for (listening, what) in [(sock, "KRE"), (parent.as_path(), "KRE's parent channel")] {
        wait_for_socket(listening, Some(&mut kre.0), START_LIMIT).unwrap_or_else(|e| panic!("{what} {e}"));
    }
    kre
}

/// The runs stored in the history directory `dir` (`dir` itself and its `chain-*`
/// subdirectories): each directory, chain id and entry count.
fn stored_runs(dir: &Path) -> Vec<(std::path::PathBuf, [u8; 48], usize)> {
    let mut runs = Vec::new();
    for (path, t) in store::read_runs(dir).unwrap_or_default() {
        if let Some(first) = t.entries.first() {
            runs.push((path, *first.chain_id(), t.entries.len()));
        }
    }
    runs
}

/// `keygate audit pull --follow` survives the KRE being killed (its rounds fail meanwhile)
/// and collects the restarted KRE's new chain into the same directory, in the subdirectory
/// named after it (beside the first run).
#[test]
fn audit_pull_follow_survives_a_kre_restart() {
    use std::time::{Duration, Instant};
    let tmp = TempDir::new("keygate-cli-audit").expect("tmp");
    let sock = tmp.path().join("kre.sock");
    let mut kre = start_kre(tmp.path(), &sock, 1);
    let dir = tmp.path().join("audit");
    let pull_log = tmp.path().join("pull.log");
    let mut pull = KillOnDrop(
        std::process::Command::new(keygate_tests::bin("keygate"))
            .args(["audit", "pull", "--follow", "1", "--dir"])
            .arg(&dir)
            .args(["--kre", &format!("unix:{}.parent", sock.display())])
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(tmp.path().join("pull.out")).expect("out"))
            .stderr(std::fs::File::create(&pull_log).expect("log"))
            .spawn()
            .expect("audit pull"),
    );
    let log = || std::fs::read_to_string(&pull_log).unwrap_or_default();
    let start = Instant::now();
    let wait_until = |what: &str, limit: Duration, done: &dyn Fn() -> bool| {
        while !done() {
            assert!(start.elapsed() < limit, "{what} within {limit:?}; pull log: {}", log());
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    wait_until("the first run collected", Duration::from_secs(6), &|| !stored_runs(&dir).is_empty());
    let first = stored_runs(&dir);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].0, dir);

    // kill -9, and a failed round or more while the KRE is down.
    kre.0.kill().expect("kill the KRE");
    kre.0.wait().expect("reap the KRE");
    wait_until("a failed round reported", Duration::from_secs(10), &|| log().contains("audit pull:"));
    let mut kre = start_kre(tmp.path(), &sock, 2);
    let status = keygate(&["status", "--json", "--kre", &format!("unix:{}.parent", sock.display())]);
    assert!(status.status.success(), "{}", text(&status.stderr));

    wait_until("the new run collected", Duration::from_secs(19), &|| stored_runs(&dir).len() == 2);
    assert!(pull.0.try_wait().expect("try_wait").is_none(), "the pull is still running; log: {}", log());
    let runs = stored_runs(&dir);
    let new = runs.iter().find(|r| r.0 != dir).expect("the new run's directory");
    assert_ne!(new.1, first[0].1, "a new chain");
    assert_eq!(new.0, dir.join(format!("chain-{}", hex::encode(&new.1[..8]))), "beside the first run, in DIR");
    assert!(new.2 >= 1, "the new run's entries are stored");
    assert_eq!(stored_runs(&dir)[0].2, first[0].2, "the first run's directory is unchanged");
    let l = log();
    let line = l.lines().find(|l| l.contains("audit pull:")).expect("an error line");
    assert!(line.starts_with("keygate: 20"), "the line names the time: {line}");

    kre.0.kill().expect("kill the KRE");
    pull.0.kill().expect("kill the pull");
}

/// Two runs in one history directory, the second linked to the first: `audit verify DIR`
/// checks both and the link (JSON: `runs`, `gaps`); with the first run cut back before the
/// linked head (checkpoints included, so it verifies alone) the gap is named with its range;
/// the second run alone names its predecessor as missing.
#[test]
fn audit_verify_checks_linked_runs_and_names_each_gap() {
    use keygate_enclave::audit::AuditHead;
    let tmp = TempDir::new("keygate-cli-audit").expect("tmp");
    let d = tmp.path().join("history");
    let root = tmp.path().join("root.pem");
    let first = trail("run-1");
    std::fs::write(&root, &first.root_pem).expect("root");
    let linked = &first.entries[9];
    let head = AuditHead { chain_id: *linked.chain_id(), seq: linked.seq(), digest: linked.digest() };

    let nsm = MockNsm::new(b"cli-audit", pcrs(0x70), Arc::new(|| T)).with_instance("run-2");
    let mut log = AuditLog::new(AuditConfig::default(), AuditSigner::start(&nsm, default_backend()).expect("signer"));
    log.append(
        AuditEvent::KreStarted { nsm_kind: "mock".into(), pcrs: pcrs(0x70), software: "0.1.0".into() },
        T + 30_000,
    )
    .expect("append");
    log.append(AuditEvent::ChainLinked { generation: 3, previous: Some(head) }, T + 31_000).expect("append");
    let cp = log.checkpoint(T + 32_000).expect("checkpoint");
    let second: Vec<AuditEntry> = log.entries_after(0, 10);
    let second_dir = d.join(store::run_dir_name(log.signer().chain_id()));
    store::append_to_dir(&d, &first.entries, &first.checkpoints).expect("store run 1");
    store::append_to_dir(&second_dir, &second, std::slice::from_ref(&cp)).expect("store run 2");

    let out = verify(&d, &root, true);
    assert!(out.status.success(), "{} {}", text(&out.stdout), text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!((v["ok"].clone(), v["runs"].as_array().map(Vec::len)), (serde_json::json!(true), Some(2)), "{v}");
    assert_eq!(v["gaps"], serde_json::json!([]));
    assert_eq!(v["runs"][1]["link"]["seq"], 10);

    // The parent cuts the first run back to seq 8 (its checkpoint there kept): it verifies alone.
    let kept: Vec<Checkpoint> = first.checkpoints.iter().filter(|c| c.seq() <= 8).cloned().collect();
    write_raw(&d, &first.entries[..8], &kept);
    let alone = tmp.path().join("alone");
    write_raw(&alone, &first.entries[..8], &kept);
    assert!(verify(&alone, &root, false).status.success());
    let chain = hex::encode(&first.entries[0].chain_id()[..8]);
    let out = verify(&d, &root, false);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(text(&out.stderr).contains(&format!("chain {chain}…: entries 9–10 missing")), "{}", text(&out.stderr));
    let out = verify(&d, &root, true);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        (v["ok"].clone(), v["gaps"][0]["error"].clone()),
        (serde_json::json!(false), "tail_missing".into()),
        "{v}"
    );

    // The second run alone: its predecessor is not there.
    let out = verify(&second_dir, &root, true);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        (v["ok"].clone(), v["gaps"][0]["error"].clone()),
        (serde_json::json!(false), "chain_missing".into()),
        "{v}"
    );
}
