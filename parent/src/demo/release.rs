//! The demo's key release part: a real `keygate-enclave-dev` process (the KRE with the mock
//! NSM) behind a real `keygate proxy` process, and control-plane instances fetching keys
//! through them; durability (kill -9, restart sealed, unseal by two of three custodians, policy
//! restore) and revocation. It leaves the first control plane's keys in [`KEYS_DIR`] of the
//! directory it returns, for the KMS part.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use keygate_attestation::mock::{system_clock, MockNsm};
use keygate_attestation::{Nsm, PcrExpectation, Verifier};
use keygate_enclave::net::transport::Addr;
use keygate_enclave::peer::client::{ClientError, FetchRequest, ReleasedKey};
use keygate_enclave::wire::{DenyCode, Id, Message};
use keygate_tests::relay::{Attack, Relay};
use keygate_tests::{spawn_logged, wait_for_socket, KillOnDrop, TempDir};

use super::tour::{Misbehaved, Outcome, Tour};
use crate::cmd::attestation::pcrs_from_eif;
use crate::cmd::fetch::{write_keys, write_receipt, Fetcher};
use crate::error::CliError;
use crate::kre_client::{Connection, KreError};

const SEED: &str = "keygate-demo";

fn pcr_hex(byte: u8) -> String {
    hex::encode([byte; 48])
}

/// Where the first control plane writes its keys, in the demo's directory.
pub(super) const KEYS_DIR: &str = "cpi-1-keys";

/// How long a started daemon has to listen on its socket.
const START_LIMIT: Duration = Duration::from_secs(15);

/// A daemon of the demo, killed when dropped, and its name for messages.
pub(super) struct Daemon {
    pub(super) process: KillOnDrop,
    pub(super) what: &'static str,
}

impl Daemon {
    /// Waits until it listens on `sock`.
    pub(super) fn listening(&mut self, sock: &Path) -> Result<(), CliError> {
        wait_for_socket(sock, Some(&mut self.process.0), START_LIMIT)
            .map_err(|e| CliError::refused(format!("{} {e}", self.what)))
    }
}

pub(super) fn sibling_binary(name: &str) -> Result<PathBuf, CliError> {
    let exe = std::env::current_exe().map_err(|e| CliError::io("locating keygate", e))?;
    let p = exe.with_file_name(name);
    if p.exists() {
        Ok(p)
    } else {
        Err(CliError::input(format!(
            "{} not found next to keygate: build it (cargo build --workspace --bins)",
            p.display()
        )))
    }
}

pub(super) fn spawn(bin: &Path, args: &[String], log: &Path, what: &'static str) -> Result<Daemon, CliError> {
    let child = spawn_logged(Command::new(bin).args(args), log)
        .map_err(|e| CliError::io(format!("starting {}", bin.display()), e))?;
    Ok(Daemon { process: KillOnDrop(child), what })
}

fn cpi(pcrs: &BTreeMap<u8, Vec<u8>>, instance: &str) -> Arc<dyn Nsm> {
    Arc::new(MockNsm::new(SEED.as_bytes(), pcrs.clone(), system_clock()).with_instance(instance))
}

/// Builds a small enclave image with `keygate eif build`, as the pipeline would.
fn build_image(exe: &Path, dir: &Path, name: &str, payload: &[u8]) -> Result<PathBuf, CliError> {
    let src = dir.join(format!("{name}-src"));
    let rootfs = src.join("rootfs");
    std::fs::create_dir_all(rootfs.join("usr/bin")).map_err(|e| CliError::io("creating the image sources", e))?;
    let files: [(PathBuf, &[u8]); 4] = [
        (src.join("bzImage"), b"demo kernel image"),
        (
            src.join("kernel.config"),
            b"#\n# Automatically generated file; DO NOT EDIT.\n# Linux/x86_64 6.1.0 Kernel Configuration\n",
        ),
        (rootfs.join("init"), b"#!/bin/sh\nexec /usr/bin/kube-apiserver\n"),
        (rootfs.join("usr/bin/kube-apiserver"), payload),
    ];
    for (p, b) in &files {
        std::fs::write(p, b).map_err(|e| CliError::io(format!("writing {}", p.display()), e))?;
    }
    let out = dir.join(format!("{name}.eif"));
    let built = keygate_tests::run_tracked(
        Command::new(exe)
            .args(["eif", "build", "--kernel"])
            .arg(src.join("bzImage"))
            .arg("--kernel-config")
            .arg(src.join("kernel.config"))
            .args(["--cmdline", "console=ttyS0 reboot=k", "--build-time", "2026-11-01T00:00:00Z", "--ramdisk"])
            .arg(&rootfs)
            .arg("-o")
            .arg(&out),
    )
    .map_err(|e| CliError::io("running keygate eif build", e))?;
    if !built.status.success() {
        let err = String::from_utf8_lossy(&built.stderr);
        return Err(CliError::refused(format!(
            "keygate eif build failed for {name} ({}): {}",
            built.status,
            err.trim()
        )));
    }
    Ok(out)
}

fn ids(v: &[&str]) -> Vec<Id> {
    v.iter().filter_map(|s| Id::new(s).ok()).collect()
}

/// The key release part; returns the demo's directory (removed when dropped).
pub(super) fn key_release_tour(tour: &mut Tour) -> Result<TempDir, CliError> {
    let dir = TempDir::new("keygate-demo").map_err(|e| CliError::io("creating the demo directory", e))?;
    let d = dir.path();
    let kre_sock = d.join("kre.sock");
    let parent_sock = d.join("parent.sock");

    tour.section("The pipeline builds the control-plane image and measures it");
    let exe = std::env::current_exe().map_err(|e| CliError::io("locating keygate", e))?;
    let good_eif = build_image(&exe, d, "control-plane", b"kube-apiserver v1.31 (pipeline build)")?;
    let rogue_eif = build_image(&exe, d, "rogue", b"kube-apiserver v1.31 (patched by someone)")?;
    let rebuilt = build_image(&exe, d, "control-plane-rebuild", b"kube-apiserver v1.31 (pipeline build)")?;
    let good_pcrs = pcrs_from_eif(&good_eif)?;
    let same = std::fs::read(&good_eif).ok() == std::fs::read(&rebuilt).ok();
    tour.step(
        "`keygate eif build` makes the image reproducibly and gives its PCRs",
        if same {
            Ok(format!(
                "PCR0 {}… (a second build from the same inputs is byte-identical)",
                &hex::encode(&good_pcrs[&0])[..16]
            ))
        } else {
            Err("two builds from the same inputs differ".into())
        },
    );

    tour.section("Approvers: a 2-of-3 quorum governs the policy");
    let ap = d.join("approvers");
    std::fs::create_dir_all(&ap).map_err(|e| CliError::io("creating the approvers' directory", e))?;
    let key = |i: u32| ap.join(format!("approver-{i}.pem"));
    let public = |i: u32| ap.join(format!("approver-{i}.pub.pem"));
    for i in 1..=3 {
        keygate_cli(&exe, &["keygen".into(), "-o".into(), path(&key(i))]).map_err(CliError::refused)?;
    }
    let genesis = d.join("genesis.bundle");
    let mut init = vec!["policy".to_owned(), "init".into()];
    for i in 1..=3 {
        init.extend(["--approver".to_owned(), path(&public(i))]);
    }
    init.extend(["--threshold", "2", "--activation-delay", "3s", "-o"].map(str::to_owned));
    init.push(path(&genesis));
    tour.step(
        "three approvers make keys; the genesis bundle (2 of 3, 3 s activation delay) is built into the KRE image",
        keygate_cli(&exe, &init).map(|_| format!("{} (no clusters allowed yet)", genesis.display())),
    );

    // The custodians of the KRE's sealed state: any two of three unseal a restarted KRE.
    let cu = d.join("custodians");
    std::fs::create_dir_all(&cu).map_err(|e| CliError::io("creating the custodians' directory", e))?;
    let custodian = |i: u32| cu.join(format!("custodian-{i}.pem"));
    for i in 1..=3 {
        keygate_cli(&exe, &["keygen".into(), "-o".into(), path(&custodian(i))]).map_err(CliError::refused)?;
    }
    let state_dir = d.join("parent-state");

    tour.section("Key release: a KRE (mock NSM) behind the parent proxy");
    let kre_pcr = 0x4b;
    let kre_pcr_args: Vec<String> =
        (0..3).flat_map(|i| ["--mock-pcr".to_owned(), format!("{i}={}", pcr_hex(kre_pcr))]).collect();
    let mut kre_args = vec![
        "--listen".to_owned(),
        format!("unix:{}", kre_sock.display()),
        "--genesis".to_owned(),
        path(&genesis),
        "--nsm".to_owned(),
        "mock".to_owned(),
        "--mock-seed".to_owned(),
        SEED.to_owned(),
    ];
    kre_args.extend(kre_pcr_args);
    for i in 1..=3 {
        kre_args.extend(["--custodian".to_owned(), path(&cu.join(format!("custodian-{i}.pub.pem")))]);
    }
    kre_args.extend(["--custodian-threshold".to_owned(), "2".to_owned()]);
    let mut kre = spawn(&sibling_binary("keygate-enclave-dev")?, &kre_args, &d.join("kre.log"), "keygate-enclave-dev")?;
    let proxy_args = vec![
        "proxy".to_owned(),
        "--listen".to_owned(),
        format!("unix:{}", parent_sock.display()),
        "--to".to_owned(),
        format!("unix:{}", kre_sock.display()),
    ];
    let mut proxy = spawn(&exe, &proxy_args, &d.join("proxy.log"), "keygate proxy")?;
    // The parent's audit follower: it stores (fsynced) and acknowledges each entry as the KRE
    // writes it; the KRE sends no release, policy or state answer before that.
    let follow = |dir: &Path, log: &str| {
        let args: Vec<String> = [
            "audit",
            "pull",
            "--kre",
            &format!("unix:{}.parent", kre_sock.display()),
            "--dir",
            &path(dir),
            "--follow",
            "1",
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
        spawn(&exe, &args, &d.join(log), "keygate audit pull --follow")
    };

    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| CliError::io("runtime", e))?;
    rt.block_on(async {
        kre.listening(&kre_sock)?;
        proxy.listening(&parent_sock)?;
        let mut follower = follow(&d.join("audit"), "audit-follow-1.log")?;
        tour.step(
            "the KRE and the proxy are up",
            Ok(format!(
                "KRE on {} (mock NSM, PCR0-2 = {kre_pcr:02x}…), proxy on {}",
                kre_sock.display(),
                parent_sock.display()
            )),
        );

        // Genesis of the sealed state: the KRE draws its state key, splits it 2-of-3 among the
        // custodians, and serves only once the parent has stored it.
        // The parent's own channel (state, audit, policy delivery) and the custodians' channel:
        // the KRE's own sockets, never proxied; control planes reach it only through the proxy.
        let kre_addr = format!("unix:{}.parent", kre_sock.display());
        let custodian_addr = format!("unix:{}.custodian", kre_sock.display());
        // `keygate VERB SUB --kre <parent channel> --state-dir <the parent's state directory>`.
        let on_state = |verb: &str, sub: &str| {
            let args = [verb, sub, "--kre", &kre_addr, "--state-dir", &path(&state_dir)].map(str::to_owned);
            keygate_cli(&exe, &args).map(|o| o.trim().to_owned())
        };
        tour.step(
            "genesis: the KRE seals its state for 2 of 3 custodians; the parent stores it durably before the KRE serves",
            on_state("custodian", "init"),
        );

        // The pipeline proposes allowing the image it built; one signature is not enough.
        let proposal = d.join("v2.proposal");
        let allow = format!("prod-eu1=control-plane-2026.11@{}", path(&good_eif));
        let proposed = keygate_cli(
            &exe,
            &[
                "policy".into(),
                "propose".into(),
                "--from".into(),
                path(&genesis),
                "--allow".into(),
                allow,
                "--kind".into(),
                "enclave".into(),
                "-o".into(),
                path(&proposal),
            ],
        );
        let sign = |i: u32, prop: &Path, out: &Path| {
            keygate_cli(
                &exe,
                &[
                    "policy".into(),
                    "sign".into(),
                    path(prop),
                    "--key".into(),
                    path(&key(i)),
                    "--yes".into(),
                    "-o".into(),
                    path(out),
                ],
            )
        };
        // A proposal and its signatures into a bundle.
        let assemble = |prop: &Path, sigs: &[&str], out: &Path| {
            let mut args = vec!["policy".to_owned(), "assemble".into(), path(prop)];
            args.extend(sigs.iter().map(|s| path(&d.join(s))));
            args.extend(["-o".to_owned(), path(out)]);
            keygate_cli(&exe, &args)
        };
        let one = d.join("v2-one-signature.bundle");
        let pushed_one = proposed
            .and_then(|_| sign(1, &proposal, &d.join("v2.sig1")))
            .and_then(|_| assemble(&proposal, &["v2.sig1"], &one))
            .and_then(|_| {
                match keygate_cli(&exe, &["policy".into(), "push".into(), path(&one), "--kre".into(), kre_addr.clone()])
                {
                    Err(e) if e.says("2 required") => Ok(e.to_string()),
                    Err(e) => Err(format!("refused for the wrong reason: {e}").into()),
                    Ok(_) => Err("a 1-of-3 bundle was accepted".into()),
                }
            });
        tour.step("a bundle with one approver's signature is refused by the KRE", pushed_one);
        let v2 = d.join("v2.bundle");
        let store = d.join("parent-store");
        // The pipeline checks each push's durability receipt against the (mock) Nitro root and
        // the KRE's image.
        let root = MockNsm::new(SEED.as_bytes(), Default::default(), system_clock()).root_anchor();
        let root_pem = d.join("mock-root.pem");
        std::fs::write(&root_pem, root.to_pem()).map_err(|e| CliError::io("writing the mock root", e))?;
        // Push a bundle, store and commit the state it changes, check and keep the KRE's
        // durability receipt.
        let push_durably = |bundle: &Path| {
            let mut args = vec!["policy".to_owned(), "push".into(), path(bundle), "--kre".into(), kre_addr.clone()];
            args.extend(["--store".into(), path(&store), "--state-dir".into(), path(&state_dir)]);
            args.extend(["--root".into(), path(&root_pem)]);
            for i in 0..3 {
                args.extend(["--expect-kre-pcr".to_owned(), format!("{i}={}", pcr_hex(kre_pcr))]);
            }
            keygate_cli(&exe, &args)
        };
        let pushed = sign(2, &proposal, &d.join("v2.sig2"))
            .and_then(|_| assemble(&proposal, &["v2.sig1", "v2.sig2"], &v2))
            .and_then(|_| push_durably(&v2));
        tour.step(
            "with a second approver's signature it is accepted (an addition: it waits for the activation delay); the new cluster's KEK is stored and committed, and the KRE's durability receipt is checked and kept",
            pushed.map(|o| o.lines().map(str::trim).collect::<Vec<_>>().join("; ")),
        );

        let expect_kre: Vec<PcrExpectation> =
            (0..3).map(|i| PcrExpectation { index: i, value: vec![kre_pcr; 48] }).collect();
        let fetcher = |nsm: Arc<dyn Nsm>, expect: Vec<PcrExpectation>| Fetcher {
            kre: Addr::Unix(parent_sock.clone()),
            request: FetchRequest {
                cluster: Id::new("prod-eu1").unwrap_or_else(|_| unreachable!("valid id")),
                key_ids: ids(&["etcd-kek", "secrets-kek"]),
                expect_kre_pcrs: expect,
                also_accept_kre: vec![],
            },
            nsm,
            kre_verifier: Verifier::new(root.clone()),
            timeout: Duration::from_secs(10),
        };

        // 0. Before the delay has passed, the new image is not yet allowed.
        let early = fetcher(cpi(&good_pcrs, "cpi-1"), expect_kre.clone()).once().await;
        tour.step(
            "a control plane asking before the activation delay has passed is told to wait (activation_pending: retryable, never read as a revocation)",
            match early {
                Err(ClientError::Denied { code: DenyCode::ActivationPending, reason })
                    if reason.contains("activation delay") =>
                {
                    Ok(format!("denied: {reason}"))
                }
                Err(e) => Err(format!("failed for another reason: {e}").into()),
                Ok(_) => Err("released before activation".into()),
            },
        );
        tokio::time::sleep(Duration::from_millis(3100)).await;

        // 1. The allowed image.
        let keys_dir = d.join(KEYS_DIR);
        let first = fetcher(cpi(&good_pcrs, "cpi-1"), expect_kre.clone()).once().await;
        let captured = match &first {
            Ok(f) => Some(f.release_frame.clone()),
            Err(_) => None,
        };
        tour.step(
            "a control plane running the allowed image gets its keys",
            match first {
                Ok(f) => write_keys(&keys_dir, &f.keys, &f.receipt).map_err(Misbehaved::from).and_then(|(paths, receipt)| {
                    use std::os::unix::fs::PermissionsExt;
                    let modes: Vec<u32> = paths
                        .iter()
                        .filter_map(|p| std::fs::metadata(p).ok())
                        .map(|m| m.permissions().mode() & 0o777)
                        .collect();
                    if modes.iter().all(|m| *m == 0o600) && modes.len() == f.keys.len() {
                        Ok(f.keys
                            .iter()
                            .zip(&paths)
                            .map(|(k, p)| format!("{} v{} -> {} (0600)", k.key_id, k.version, p.display()))
                            .chain([format!("audit receipt -> {}", receipt.display())])
                            .collect::<Vec<_>>()
                            .join("; "))
                    } else {
                        Err(format!("key files have modes {modes:?}").into())
                    }
                }),
                Err(e) => Err(Misbehaved::because(e)),
            },
        );

        // 2. A second boot gets the same keys.
        let second = fetcher(cpi(&good_pcrs, "cpi-1"), expect_kre.clone()).once().await;
        tour.step(
            "after a reboot it gets the same keys (data encrypted before stays readable)",
            match second {
                Ok(f) => {
                    if same_keys(&keys_dir, &f.keys) {
                        Ok("identical keys, compared in memory (never printed)".to_owned())
                    } else {
                        Err("keys differ".into())
                    }
                }
                Err(e) => Err(Misbehaved::because(e)),
            },
        );

        // 2b. A relay on the path answers in the KRE's place with keys the operator chose.
        let relay_sock = d.join("relay.sock");
        let relay = Relay::start(&relay_sock, &parent_sock, root.clone(), Attack::SubstituteReleased);
        let mut through_relay = fetcher(cpi(&good_pcrs, "cpi-1"), expect_kre.clone());
        through_relay.kre = Addr::Unix(relay_sock.clone());
        let relayed = through_relay.once().await;
        drop(relay);
        tour.step(
            "a relay on the path (the parent, or anyone before the proxy) forwards the genuine Challenge, then answers the Release with keys of its own choice: the control plane refuses them",
            match relayed {
                Err(e @ ClientError::UnattestedWrap) => Ok(format!("refused, no key written: {e}")),
                Err(e) => Err(format!("refused for another reason: {e}").into()),
                Ok(_) => Err("the relay's keys were accepted".into()),
            },
        );

        // 3. An image the policy does not allow.
        let rogue = pcrs_from_eif(&rogue_eif)?;
        let bad = fetcher(cpi(&rogue, "rogue"), expect_kre.clone()).once().await;
        tour.step(
            "an image the pipeline did not build (one file changed) is denied, with the reason",
            expect_denial(bad.map(|_| ()), DenyCode::ImageNotAllowed),
        );

        // 4. A debug-mode enclave.
        let debug: Arc<dyn Nsm> =
            Arc::new(MockNsm::new(SEED.as_bytes(), Default::default(), system_clock()).with_instance("debug"));
        let dbg = fetcher(debug, expect_kre.clone()).once().await;
        tour.step("a debug-mode enclave (PCRs zero) is denied", expect_denial(dbg.map(|_| ()), DenyCode::DebugMode));

        // 5. A replayed Release.
        tour.step(
            "a captured Release replayed on a new connection is denied",
            match captured {
                Some(frame) => replay(&Addr::Unix(parent_sock.clone()), &frame).await,
                None => Err("nothing captured (step 1 failed)".into()),
            },
        );

        // 6. Mutual attestation: a control plane that expects another KRE image refuses this one.
        let wrong_kre: Vec<PcrExpectation> =
            (0..3).map(|i| PcrExpectation { index: i, value: vec![0x11; 48] }).collect();
        let refused = fetcher(cpi(&good_pcrs, "cpi-2"), wrong_kre).once().await;
        tour.step(
            "a control plane refuses a KRE whose PCRs are not the expected ones",
            match refused {
                Err(e @ ClientError::KrePcr(_)) => Ok(format!("refused: {e}")),
                Err(e) => Err(format!("failed for another reason: {e}").into()),
                Ok(_) => Err("accepted a KRE with unexpected PCRs".into()),
            },
        );

        // 7. Durability: kill -9, restart sealed, the parent's stored state, 2-of-3 unseal.
        tour.section("Durability: the KRE is killed and restarted; two of three custodians unseal it");
        // A release, and the KRE is killed the moment the keys arrive: its audit entry was
        // stored by the parent before the keys left.
        let last = fetcher(cpi(&good_pcrs, "cpi-1"), expect_kre.clone()).once().await;
        kre.process.kill(); // SIGKILL
        drop(follower);
        // The follower keeps every run in one directory: this run's chain is `audit/` itself.
        let run1 = d.join("audit");
        let mut verify1 = vec!["audit".to_owned(), "verify".into(), path(&run1), "--root".into(), path(&root_pem)];
        for i in 0..3 {
            verify1.extend(["--expect-kre-pcr".to_owned(), format!("{i}={}", pcr_hex(kre_pcr))]);
        }
        // The control plane keeps the release's audit receipt; checked against the stored trail,
        // it proves that the parent stored the entry it acknowledged.
        let client_receipts = d.join("client-receipts");
        tour.step(
            "a release, then kill -9 the moment the keys arrive: the release is already in the parent's stored trail (write-ahead audit), which verifies, and the client's receipt for it is checked against that trail",
            match last {
                Err(e) => Err(format!("the release failed: {e}").into()),
                Ok(f) => write_receipt(&client_receipts, &f.receipt)
                    .map_err(Misbehaved::from)
                    .and_then(|_| keygate_cli(&exe, &["audit".into(), "show".into(), path(&run1), "--json".into()]))
                    .and_then(|shown| {
                        let released = shown.lines().filter(|l| l.contains("\"release_allowed\"")).count();
                        verify1.extend(["--receipts".to_owned(), path(&client_receipts)]);
                        keygate_cli(&exe, &verify1).map(|v| {
                            format!(
                                "{released} releases in the first run's trail; {}",
                                v.lines()
                                    .filter(|l| l.contains(": OK") || l.trim_start().starts_with("receipts"))
                                    .map(str::trim)
                                    .collect::<Vec<_>>()
                                    .join("; ")
                            )
                        })
                    }),
            },
        );
        let _ = std::fs::remove_file(&kre_sock);
        kre = spawn(&sibling_binary("keygate-enclave-dev")?, &kre_args, &d.join("kre-2.log"), "keygate-enclave-dev")?;
        kre.listening(&kre_sock)?;
        follower = follow(&d.join("audit"), "audit-follow-2.log")?;
        let sealed = fetcher(cpi(&good_pcrs, "cpi-1"), expect_kre.clone()).once().await;
        tour.step(
            "the restarted KRE (kill -9, then started again) is sealed: it holds no KEK and refuses releases",
            expect_denial(sealed.map(|_| ()), DenyCode::Sealed),
        );
        tour.step(
            "the parent hands it the stored sealed state (`keygate state sync`): useless without the custodians",
            on_state("state", "sync"),
        );
        let unseal = |i: u32, pcr: u8| {
            let mut a = vec![
                "custodian".to_owned(),
                "unseal".into(),
                "--kre".into(),
                custodian_addr.clone(),
                "--key".into(),
                path(&custodian(i)),
                "--root".into(),
                path(&root_pem),
            ];
            for n in 0..3 {
                a.extend(["--expect-kre-pcr".to_owned(), format!("{n}={}", pcr_hex(pcr))]);
            }
            keygate_cli(&exe, &a)
        };
        tour.step(
            "a custodian that expects another KRE image refuses to hand over its share",
            match unseal(3, 0x11) {
                Err(e) if e.says("PCR") => Ok(e.to_string()),
                Err(e) => Err(format!("refused for the wrong reason: {e}").into()),
                Ok(_) => Err("a share went to an unexpected KRE".into()),
            },
        );
        tour.step(
            "custodian 1 verifies the KRE's attestation and re-encrypts its share to the KRE's attested key",
            unseal(1, kre_pcr).map(|o| o.trim().to_owned()),
        );
        tour.step("custodian 2 does the same: two of three, the KRE unseals", unseal(2, kre_pcr).map(|o| o.trim().to_owned()));
        let stale = fetcher(cpi(&good_pcrs, "cpi-1"), expect_kre.clone()).once().await;
        tour.step(
            "releases wait until the parent replays the policy the sealed state says was accepted (no rollback by withholding)",
            expect_denial(stale.map(|_| ()), DenyCode::PolicyStale),
        );
        let restored = keygate_cli(
            &exe,
            &["policy".into(), "restore".into(), "--kre".into(), kre_addr.clone(), "--store".into(), path(&store)],
        );
        // A restored chain re-imposes the activation delay on additions (fail-safe).
        tokio::time::sleep(Duration::from_millis(3100)).await;
        let after_restart = fetcher(cpi(&good_pcrs, "cpi-1"), expect_kre.clone()).once().await;
        tour.step(
            "after `keygate policy restore` the control plane gets the same keys as before the restart",
            match (restored, after_restart) {
                (Err(e), _) => Err(format!("restore failed: {e}").into()),
                (_, Err(e)) => Err(Misbehaved::because(e)),
                (Ok(_), Ok(f)) => {
                    if same_keys(&keys_dir, &f.keys) {
                        Ok("identical keys: no KEK was lost (compared in memory, never printed)".to_owned())
                    } else {
                        Err("keys differ after the restart".into())
                    }
                }
            },
        );
        // Nothing the parent stored or logged, and nothing the custodians keep, holds a key.
        let held: Vec<Vec<u8>> = std::fs::read_dir(&keys_dir)
            .map(|rd| rd.flatten().filter_map(|e| std::fs::read(e.path()).ok()).collect())
            .unwrap_or_default();
        tour.step(
            "no released key appears in the parent's state directory, the logs, the audit trail or the custodians' records",
            scan_for_keys(d, &keys_dir, &held),
        );

        // 8. Revocation: the image loses access immediately.
        let v3p = d.join("v3.proposal");
        let v3 = d.join("v3.bundle");
        let revoked = keygate_cli(
            &exe,
            &[
                "policy".into(),
                "propose".into(),
                "--from".into(),
                path(&v2),
                "--revoke".into(),
                "prod-eu1=control-plane-2026.11".into(),
                "-o".into(),
                path(&v3p),
            ],
        )
        .and_then(|_| sign(2, &v3p, &d.join("v3.sig2")))
        .and_then(|_| sign(3, &v3p, &d.join("v3.sig3")))
        .and_then(|_| assemble(&v3p, &["v3.sig2", "v3.sig3"], &v3))
        .and_then(|_| push_durably(&v3));
        tour.step(
            "approvers 2 and 3 revoke the image (a removal: in force at once)",
            revoked.map(|o| o.lines().map(str::trim).collect::<Vec<_>>().join("; ")),
        );
        let after = fetcher(cpi(&good_pcrs, "cpi-1"), expect_kre.clone()).once().await;
        tour.step(
            "the revoked image is denied on its very next fetch",
            match after {
                Err(ClientError::Denied { code, reason })
                    if matches!(code, DenyCode::UnknownCluster | DenyCode::ImageNotAllowed) =>
                {
                    Ok(format!("denied: {code}: {reason}"))
                }
                Err(e) => Err(format!("failed for another reason: {e}").into()),
                Ok(_) => Err("still released after revocation".into()),
            },
        );

        // 9. The audit trail of the restarted KRE: collected by the parent, verified offline.
        let trail = d.join("audit");
        let mut verify = vec!["audit".to_owned(), "verify".into(), path(&trail), "--root".into(), path(&root_pem)];
        for i in 0..3 {
            verify.extend(["--expect-kre-pcr".to_owned(), format!("{i}={}", pcr_hex(kre_pcr))]);
        }
        drop(follower);
        let audited = keygate_cli(&exe, &["audit".into(), "pull".into(), "--kre".into(), kre_addr.clone(), "--dir".into(), path(&trail)])
            .and_then(|_| keygate_cli(&exe, &verify));
        tour.step(
            "the parent's follower stored the restarted KRE's audit trail beside the first run's as it was written (unseal ceremony included); both verify offline (hash chain, checkpoint signed by a key bound to the KRE's attestation), and the restarted run's chain_linked entry names the first run's sealed head, which the stored first run holds",
            audited.map(|o| o.lines().take(4).map(str::trim).collect::<Vec<_>>().join("; ")),
        );
        let run2 = keygate_enclave::audit::store::read_runs(&trail)
            .ok()
            .and_then(|runs| runs.into_iter().last().map(|(dir, _)| dir))
            .unwrap_or_else(|| trail.clone());
        if let Ok(table) = keygate_cli(&exe, &["audit".into(), "show".into(), path(&run2)]) {
            println!("\n       the audit trail of this run:");
            for line in table.lines() {
                println!("       {line}");
            }
        }
        Ok::<(), CliError>(())
    })?;
    drop(proxy);
    drop(kre);
    Ok(dir)
}

/// Scans every regular file under `dir` (except `skip`, where keys are meant to be) for any
/// of `keys` as raw bytes, lower/upper hex or base64.
fn scan_for_keys(dir: &Path, skip: &Path, keys: &[Vec<u8>]) -> Outcome {
    use base64::Engine;
    if keys.is_empty() {
        return Err("no keys to look for (the first fetch failed)".into());
    }
    let mut needles: Vec<Vec<u8>> = Vec::new();
    for k in keys {
        needles.push(k.clone());
        needles.push(hex::encode(k).into_bytes());
        needles.push(hex::encode_upper(k).into_bytes());
        needles.push(base64::engine::general_purpose::STANDARD.encode(k).into_bytes());
    }
    let mut stack = vec![dir.to_path_buf()];
    let (mut files, mut bytes) = (0usize, 0usize);
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() && p != skip {
                stack.push(p);
            } else if t.is_file() {
                let Ok(b) = std::fs::read(&p) else { continue };
                if needles.iter().any(|n| b.windows(n.len()).any(|w| w == n.as_slice())) {
                    return Err(format!("{} holds a released key", p.display()).into());
                }
                files += 1;
                bytes += b.len();
            }
        }
    }
    Ok(format!("{files} files, {bytes} bytes scanned (raw, hex, base64): none"))
}

/// Whether each released key equals the one stored in `dir` (compared in memory).
fn same_keys(dir: &Path, keys: &[ReleasedKey]) -> bool {
    keys.iter().all(|k| {
        std::fs::read(dir.join(format!("{}.key", k.key_id))).ok().as_deref() == Some(k.key.expose().as_slice())
    })
}

pub(super) fn path(p: &Path) -> String {
    p.display().to_string()
}

/// Runs `keygate ARGS` (the demo uses the CLI as the pipeline and approvers would); Ok(stdout)
/// on success, Err(the error line) otherwise.
pub(super) fn keygate_cli(exe: &Path, args: &[String]) -> Outcome {
    let out = keygate_tests::run_tracked(Command::new(exe).args(args))
        .map_err(|e| Misbehaved::from(format!("running keygate: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(err.lines().rev().find(|l| l.contains("error")).unwrap_or(&err).trim().into())
    }
}

fn expect_denial(r: Result<(), ClientError>, code: DenyCode) -> Outcome {
    match r {
        Err(ClientError::Denied { code: c, reason }) if c == code => Ok(format!("denied: {c}: {reason}")),
        Err(e) => Err(format!("failed, but not with {code}: {e}").into()),
        Ok(()) => Err("keys were released, but must not be".into()),
    }
}

async fn replay(addr: &Addr, release: &[u8]) -> Outcome {
    let mut s = Connection::open(addr, Duration::from_secs(5)).await.map_err(Misbehaved::because)?;
    s.ask(&Message::Hello { client_nonce: [7; 32] }).await.map_err(Misbehaved::because)?;
    match s.round_trip(release).await {
        Err(KreError::Denied { code: DenyCode::NonceReused, reason }) => Ok(format!("denied: nonce_reused: {reason}")),
        Ok(m) => Err(format!("unexpected answer: {m:?}").into()),
        Err(e) => Err(Misbehaved::because(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_scan_finds_raw_hex_and_base64_keys_outside_the_key_directory() {
        use base64::Engine;
        let key = vec![0xa7u8; 32];
        let dir = TempDir::new("keygate-scan-test").expect("tmp");
        let keys = dir.path().join("keys");
        std::fs::create_dir_all(keys.join("sub")).expect("dirs");
        std::fs::write(keys.join("k.key"), &key).expect("key file");
        std::fs::write(dir.path().join("log"), b"nothing here").expect("log");
        assert!(scan_for_keys(dir.path(), &keys, std::slice::from_ref(&key)).is_ok());
        for leaked in [
            key.clone(),
            hex::encode(&key).into_bytes(),
            hex::encode_upper(&key).into_bytes(),
            base64::engine::general_purpose::STANDARD.encode(&key).into_bytes(),
        ] {
            let mut log = b"line: ".to_vec();
            log.extend_from_slice(&leaked);
            std::fs::write(dir.path().join("log"), &log).expect("log");
            assert!(scan_for_keys(dir.path(), &keys, std::slice::from_ref(&key)).is_err());
        }
        assert!(scan_for_keys(dir.path(), &keys, &[]).is_err(), "nothing to look for is a failure");
    }
}
