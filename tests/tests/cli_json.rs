//! `keygate --json` as a script runs it: every verb that needs no KRE, in one table, prints
//! exactly one JSON document on stdout (checked field by field) or, failing, one
//! `{"error":{"code","kind","message"}}` object on stderr with the exit code of its class; and
//! `status` against a running development KRE, with the flag before or after the verb.

use std::path::Path;
use std::process::Output;

use keygate_tests::e2e::{
    dev_kre, hex48, json_error, json_stdout, keygate_args, path_arg, pcr_args, pcr_list, prod_policy_for, stderr, unix,
    DevKre,
};
use keygate_tests::{keygate, TempDir};
use serde_json::Value;

const SEED: &str = "cli-json";

/// One row: the arguments (`--json` is added after them), and what must hold.
struct Case {
    name: &'static str,
    args: Vec<String>,
    expect: Expect,
}

enum Expect {
    /// Exit 0; the document on stdout passes the check.
    Doc(fn(&Value, &Path)),
    /// Exit `code` with the error object of `kind`; its message contains the needle.
    Error { code: i32, kind: &'static str, needle: &'static str },
}

fn case(name: &'static str, args: &[&str], expect: Expect) -> Case {
    Case { name, args: args.iter().map(|s| (*s).to_owned()).collect(), expect }
}

fn run(c: &Case, dir: &Path) -> Output {
    let mut args = c.args.clone();
    args.push("--json".into());
    keygate_tests::run_with_limit(
        std::process::Command::new(keygate_tests::bin("keygate")).args(&args).current_dir(dir),
        std::time::Duration::from_secs(30),
    )
}

fn s(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_else(|| panic!("no string {key} in {v}")).to_owned()
}

/// The base64 body of a PEM file, line by line (to check that none of it is ever printed).
fn pem_body_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("pem")
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 16)
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_offline_verb_prints_one_json_document_or_one_error_object() {
    let tmp = TempDir::new("keygate-cli-json").expect("tmp");
    let d = tmp.path();
    std::fs::create_dir_all(d.join("rootfs")).expect("dir");
    std::fs::write(d.join("bzImage"), b"kernel").expect("w");
    std::fs::write(d.join("k.config"), b"#\n#\n# Linux/x86_64 6.1.0 Kernel Configuration\n").expect("w");
    std::fs::write(d.join("rootfs/init"), b"#!/bin/sh\n").expect("w");
    std::fs::write(d.join("junk.bundle"), b"not a bundle").expect("w");
    let allow = format!("prod={}", pcr_list(0x5a));
    let pcr0 = format!("0={}", hex48(0x5a));
    let wrong_pcr0 = format!("0={}", hex48(0x11));

    let cases = vec![
        case(
            "keygen",
            &["keygen", "--out", "a.pem"],
            Expect::Doc(|v, d| {
                assert_eq!((s(v, "private_key"), s(v, "public_key")), ("a.pem".into(), "a.pub.pem".into()));
                assert!(s(v, "fingerprint").starts_with("sha256:") && s(v, "fingerprint").len() == 39, "{v}");
                assert!(d.join("a.pem").exists() && d.join("a.pub.pem").exists());
            }),
        ),
        case("keygen b", &["keygen", "--out", "b.pem"], Expect::Doc(|_, _| {})),
        case(
            "keygen over an existing key: I/O",
            &["keygen", "--out", "a.pem"],
            Expect::Error { code: 3, kind: "io", needle: "exists: it is not replaced" },
        ),
        case(
            "policy init",
            &[
                "policy",
                "init",
                "--approver",
                "a.pub.pem",
                "--approver",
                "b.pub.pem",
                "--threshold",
                "2",
                "-o",
                "g.bundle",
            ],
            Expect::Doc(|v, _| {
                assert_eq!(
                    (v["version"].as_u64(), v["threshold"].as_u64(), v["approvers"].as_u64()),
                    (Some(1), Some(2), Some(2))
                );
                assert_eq!((s(v, "bundle"), s(v, "digest").len()), ("g.bundle".into(), 96));
            }),
        ),
        case(
            "policy propose",
            &["policy", "propose", "--from", "g.bundle", "--allow", &allow, "-o", "p.bundle"],
            Expect::Doc(|v, _| {
                assert_eq!((s(v, "proposal"), v["version"].as_u64()), ("p.bundle".into(), Some(2)));
                let changes = v["changes"].as_array().expect("changes");
                assert!(changes.iter().any(|c| c.as_str().is_some_and(|c| c.starts_with("+ prod"))), "{v}");
            }),
        ),
        case(
            "policy sign a",
            &["policy", "sign", "p.bundle", "--key", "a.pem", "--current", "g.bundle", "--yes", "-o", "a.sig"],
            Expect::Doc(|v, _| {
                assert_eq!((s(v, "signature"), v["version"].as_u64()), ("a.sig".into(), Some(2)));
                assert!(s(v, "approver").starts_with("sha256:"), "{v}");
                assert!(v["changes"].as_array().is_some_and(|c| !c.is_empty()), "{v}");
            }),
        ),
        case(
            "policy sign b",
            &["policy", "sign", "p.bundle", "--key", "b.pem", "--current", "g.bundle", "--yes", "-o", "b.sig"],
            Expect::Doc(|_, _| {}),
        ),
        case(
            "policy assemble",
            &["policy", "assemble", "p.bundle", "a.sig", "b.sig", "-o", "v2.bundle"],
            Expect::Doc(|v, _| {
                assert_eq!((v["signatures"].as_u64(), v["valid"].as_u64()), (Some(2), Some(2)), "{v}");
            }),
        ),
        case(
            "policy verify against the current bundle",
            &["policy", "verify", "v2.bundle", "--current", "g.bundle"],
            Expect::Doc(|v, _| {
                assert_eq!(v["checked_against_current"], true);
                assert_eq!((v["version"].as_u64(), v["valid_signatures"].as_u64()), (Some(2), Some(2)));
                assert_eq!((v["invalid_signatures"].as_u64(), v["loosens"].as_bool()), (Some(0), Some(true)), "{v}");
            }),
        ),
        case(
            "policy verify alone",
            &["policy", "verify", "v2.bundle"],
            Expect::Doc(|v, _| {
                assert_eq!((v["checked_against_current"].as_bool(), v["threshold"].as_u64()), (Some(false), Some(2)));
            }),
        ),
        case(
            "policy show",
            &["policy", "show", "v2.bundle"],
            Expect::Doc(|v, _| {
                assert_eq!((v["version"].as_u64(), v["signatures"].as_u64()), (Some(2), Some(2)));
                assert_eq!(v["clusters"]["prod"][0]["pcrs"]["0"], hex48(0x5a));
            }),
        ),
        case(
            "policy verify of a bundle that does not follow: refused",
            &["policy", "verify", "v2.bundle", "--current", "v2.bundle"],
            Expect::Error { code: 1, kind: "refused", needle: "bundle refused" },
        ),
        case(
            "policy verify of junk: bad input",
            &["policy", "verify", "junk.bundle"],
            Expect::Error { code: 2, kind: "input", needle: "junk.bundle" },
        ),
        case(
            "attestation mock-root",
            &["attestation", "mock-root", "--seed", SEED, "-o", "root.pem"],
            Expect::Doc(|v, d| {
                assert_eq!(v["wrote"][0]["path"], "root.pem");
                assert_eq!(
                    v["wrote"][0]["bytes"].as_u64(),
                    std::fs::metadata(d.join("root.pem")).ok().map(|m| m.len())
                );
            }),
        ),
        case(
            "attestation mock",
            &["attestation", "mock", "--seed", SEED, "--pcr", &pcr0, "-o", "doc.cbor"],
            Expect::Doc(|v, d| {
                assert_eq!(v["wrote"][0]["path"], "doc.cbor");
                assert_eq!(
                    v["wrote"][0]["bytes"].as_u64(),
                    std::fs::metadata(d.join("doc.cbor")).ok().map(|m| m.len())
                );
            }),
        ),
        case(
            "attestation verify",
            &["attestation", "verify", "doc.cbor", "--root", "root.pem", "--expect-pcr", &pcr0],
            Expect::Doc(|v, _| {
                assert_eq!((s(v, "kind"), s(v, "digest")), ("enclave".into(), "SHA384".into()));
                assert_eq!(v["pcrs"]["0"], hex48(0x5a));
            }),
        ),
        case(
            "attestation verify, the wrong PCR: refused",
            &["attestation", "verify", "doc.cbor", "--root", "root.pem", "--expect-pcr", &wrong_pcr0],
            Expect::Error { code: 1, kind: "refused", needle: "attestation refused" },
        ),
        case(
            "eif build",
            &[
                "eif",
                "build",
                "--kernel",
                "bzImage",
                "--kernel-config",
                "k.config",
                "--cmdline",
                "console=ttyS0",
                "--ramdisk",
                "rootfs",
                "-o",
                "cp.eif",
            ],
            Expect::Doc(|v, _| {
                assert_eq!(v["Measurements"]["HashAlgorithm"], "Sha384 { ... }");
                assert_eq!(v["Measurements"]["PCR0"].as_str().map(str::len), Some(96), "{v}");
                assert_eq!(v["Keygate"]["Output"], "cp.eif");
            }),
        ),
        case(
            "eif describe",
            &["eif", "describe", "cp.eif"],
            Expect::Doc(|v, _| {
                assert_eq!(
                    (v["IsSigned"].as_bool(), v["Measurements"]["PCR0"].as_str().map(str::len)),
                    (Some(false), Some(96))
                );
            }),
        ),
        case(
            "eif verify of an unsigned image: refused",
            &["eif", "verify", "cp.eif"],
            Expect::Error { code: 1, kind: "refused", needle: "cp.eif" },
        ),
        case(
            "eif describe of junk: bad input",
            &["eif", "describe", "junk.bundle"],
            Expect::Error { code: 2, kind: "input", needle: "junk.bundle" },
        ),
        case(
            "audit verify of a missing directory: I/O",
            &["audit", "verify", "no-such-dir", "--root", "root.pem"],
            Expect::Error { code: 3, kind: "io", needle: "no-such-dir" },
        ),
        case(
            "a usage error clap refuses: bad input",
            &["keygen"],
            Expect::Error { code: 2, kind: "input", needle: "--out" },
        ),
        case(
            "status of a KRE that is not there: I/O",
            &["status", "--kre", "unix:no-such.sock"],
            Expect::Error { code: 3, kind: "io", needle: "no-such.sock" },
        ),
    ];

    for c in &cases {
        let o = run(c, d);
        match c.expect {
            Expect::Doc(check) => {
                let v = json_stdout(&o, 0);
                for l in stderr(&o).lines() {
                    let w: Value =
                        serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: stderr not JSON ({e}): {l}", c.name));
                    assert!(w["warning"]["message"].is_string(), "{}: {w}", c.name);
                }
                check(&v, d);
            }
            Expect::Error { code, kind, needle } => {
                assert!(o.stdout.is_empty(), "{}: stdout {}", c.name, String::from_utf8_lossy(&o.stdout));
                let e = json_error(&o, code, kind);
                let m = e["error"]["message"].as_str().unwrap_or_default();
                assert!(m.contains(needle), "{}: `{needle}` not in {e}", c.name);
            }
        }
    }

    // No output of any verb carries a private key's material.
    let secret: Vec<String> = ["a.pem", "b.pem"].iter().flat_map(|k| pem_body_lines(&d.join(k))).collect();
    assert!(!secret.is_empty());
    // The verbs that hold a private key: a fresh key pair, and a signature.
    for args in [
        vec!["keygen", "--out", "c.pem"],
        vec!["policy", "sign", "p.bundle", "--key", "a.pem", "--current", "g.bundle", "--yes", "-o", "a2.sig"],
    ] {
        let o = run(
            &Case {
                name: "secret scan",
                args: args.iter().map(|s| (*s).to_owned()).collect(),
                expect: Expect::Doc(|_, _| {}),
            },
            d,
        );
        let all = format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
        assert!(!all.contains("PRIVATE KEY"), "{all}");
        for l in secret.iter().chain(pem_body_lines(&d.join("c.pem")).iter()) {
            assert!(!all.contains(l.as_str()), "key material printed: {all}");
        }
    }

    // Without `--json` the same verbs print text and the one-line text error, as before.
    let o = keygate_args(&["policy".into(), "verify".into(), path_arg(&d.join("junk.bundle"))]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).starts_with("keygate: error: "), "{}", stderr(&o));
    assert!(o.stdout.is_empty());
    let o = keygate(&["policy", "verify", &path_arg(&d.join("v2.bundle"))]);
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("well-formed version 2 bundle"), "{}", stderr(&o));
}

/// `status` against a running KRE: its report, with `--json` after the verb (its own flag, as
/// before) or before it (the global flag); `fetch`'s document; `audit verify` and `audit show`
/// on the trail the parent followed; the error object once the KRE is gone.
#[test]
fn status_of_a_running_kre_is_its_report_with_the_flag_before_or_after_the_verb() {
    let tmp = TempDir::new("keygate-cli-json").expect("tmp");
    let d = tmp.path();
    std::fs::write(d.join("policy.json"), prod_policy_for("cp", 0x5a).to_string()).expect("policy");
    let sock = d.join("kre.sock");
    let mut cmd = dev_kre(SEED);
    cmd.args(["--listen", &unix(&sock), "--policy", &path_arg(&d.join("policy.json"))]).args(pcr_args(
        "--mock-pcr",
        0x4b,
        1,
    ));
    let kre = DevKre::start(&mut cmd, &sock, &d.join("followed"));
    let after = json_stdout(&keygate(&["status", "--kre", &kre.parent(), "--json"]), 0);
    let before = json_stdout(&keygate(&["--json", "status", "--kre", &kre.parent()]), 0);
    for v in [&after, &before] {
        assert_eq!(v["nsm"], "mock", "{v}");
        assert!(v["audit"]["chain_id"].is_string(), "{v}");
    }
    assert_eq!(after["audit"]["chain_id"], before["audit"]["chain_id"]);
    // `fetch`: the keys by path and the receipt; the key bytes only in the files.
    let out = d.join("keys");
    let mut args: Vec<String> = ["fetch", "--json", "--kre", &kre.addr(), "--cluster", "prod", "--key-id", "etcd-kek"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    args.extend(["--out".into(), path_arg(&out), "--nsm".into(), "mock".into(), "--mock-seed".into(), SEED.into()]);
    args.extend(pcr_args("--mock-pcr", 0x5a, 3));
    args.extend(["--expect-kre-pcr".into(), format!("0={}", hex48(0x4b)), "--retries".into(), "0".into()]);
    let o = keygate_args(&args);
    let v = json_stdout(&o, 0);
    assert_eq!((v["cluster"].as_str(), v["keys"][0]["key_id"].as_str()), (Some("prod"), Some("etcd-kek")), "{v}");
    let key_path = v["keys"][0]["path"].as_str().expect("path").to_owned();
    let key = std::fs::read(&key_path).expect("key file");
    assert_eq!(key.len(), 32);
    assert!(v["receipt"]["seq"].as_u64().is_some_and(|s| s > 0), "{v}");
    assert!(Path::new(v["receipt"]["path"].as_str().expect("receipt path")).exists());
    let printed = format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
    assert!(!printed.contains(&hex::encode(&key)), "key bytes printed: {printed}");
    assert!(!printed.contains(&base64::engine::Engine::encode(&base64::engine::general_purpose::STANDARD, &key)));
    // Text as before without it.
    let o = keygate(&["status", "--kre", &kre.parent()]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("Phase"), "{}", stderr(&o));
    kre.kill();
    // The trail the parent followed meanwhile: `audit verify` one document, `audit show` one
    // object per entry and checkpoint (JSON Lines, as before `--json` was global).
    let root = d.join("root.pem");
    assert!(keygate(&["attestation", "mock-root", "--seed", SEED, "-o", &path_arg(&root)]).status.success());
    let followed = path_arg(&d.join("followed"));
    let pcr = format!("0={}", hex48(0x4b));
    let verify = ["--json", "audit", "verify", &followed, "--root", &path_arg(&root), "--expect-kre-pcr", &pcr];
    let o = keygate(&verify);
    let v = json_stdout(&o, 0);
    assert_eq!((v["ok"].as_bool(), v["pcrs_pinned"].as_bool()), (Some(true), Some(true)), "{v}");
    assert!(v["last_seq"].as_u64().is_some_and(|n| n >= 1), "{v}");
    let o = keygate(&["audit", "show", &followed, "--json"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && out.lines().count() >= 1, "{out}");
    for l in out.lines() {
        serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}"));
    }
    // The KRE gone: the error object.
    let o = keygate(&["--json", "status", "--kre", &unix(&sock).replace(".sock", ".sock.parent")]);
    json_error(&o, 3, "io");
}

/// `policy push` and `policy restore` against a KRE started from a genesis bundle: one document
/// each (the steps printed as text along the way are inside it), a refused push the error
/// object, and every stderr line JSON.
#[test]
fn policy_push_prints_one_document_and_a_refused_push_the_error_object() {
    let tmp = TempDir::new("keygate-cli-json").expect("tmp");
    let d = tmp.path();
    let p = |n: &str| path_arg(&d.join(n));
    for k in ["a", "b"] {
        assert!(keygate(&["keygen", "--out", &p(&format!("{k}.pem"))]).status.success());
    }
    let init = ["policy", "init", "--approver", &p("a.pub.pem"), "--approver", &p("b.pub.pem"), "--threshold", "2"];
    assert!(keygate(&[&init[..], &["-o", &p("g.bundle")]].concat()).status.success());
    let allow = format!("prod={}", pcr_list(0x5a));
    assert!(keygate(&["policy", "propose", "--from", &p("g.bundle"), "--allow", &allow, "-o", &p("v2.proposal")])
        .status
        .success());
    for k in ["a", "b"] {
        let sign = ["policy", "sign", &p("v2.proposal"), "--key", &p(&format!("{k}.pem")), "--yes"];
        assert!(keygate(&[&sign[..], &["-o", &p(&format!("{k}.sig"))]].concat()).status.success());
    }
    assert!(keygate(&["policy", "assemble", &p("v2.proposal"), &p("a.sig"), &p("b.sig"), "-o", &p("v2.bundle")])
        .status
        .success());

    let sock = d.join("kre.sock");
    let mut cmd = dev_kre(SEED);
    cmd.args(["--listen", &unix(&sock), "--genesis", &p("g.bundle")]).args(pcr_args("--mock-pcr", 0x4b, 1));
    let kre = DevKre::start(&mut cmd, &sock, &d.join("followed"));
    let push = ["--json", "policy", "push", &p("v2.bundle"), "--kre", &kre.parent(), "--store", &p("store")];
    let o = keygate(&push);
    let v = json_stdout(&o, 0);
    assert_eq!(v["version"], 2, "{v}");
    assert!(v["activates_in_s"].as_u64().is_some_and(|s| s > 0), "a loosening waits: {v}");
    assert!(v["stored"].as_str().is_some_and(|s| Path::new(s).exists()), "{v}");
    assert!(v["durability"]["status"].is_string(), "{v}");
    for l in stderr(&o).lines() {
        let w: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("stderr not JSON ({e}): {l}"));
        assert!(w["warning"]["message"].is_string(), "{w}");
    }
    // The same bundle again: a replay, refused.
    let e = json_error(&keygate(&push), 1, "refused");
    assert!(e["error"]["message"].as_str().is_some_and(|m| m.contains("replay")), "{e}");
    // A restarted KRE, and the stored chain replayed to it.
    drop(kre);
    let _ = std::fs::remove_file(&sock);
    let mut cmd = dev_kre(SEED);
    cmd.args(["--listen", &unix(&sock), "--genesis", &p("g.bundle")]).args(pcr_args("--mock-pcr", 0x4b, 1));
    let kre = DevKre::start(&mut cmd, &sock, &d.join("followed2"));
    let v = json_stdout(&keygate(&["--json", "policy", "restore", "--kre", &kre.parent(), "--store", &p("store")]), 0);
    assert_eq!((v["restored"].as_u64(), v["store"].as_str()), (Some(1), Some(p("store").as_str())), "{v}");
}
