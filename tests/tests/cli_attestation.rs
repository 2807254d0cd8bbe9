//! `keygate attestation ...` as a user runs it, on the shared real vectors.

use keygate_tests::e2e::stderr;
use keygate_tests::{keygate, shared_vectors, TempDir};

fn path(name: &str) -> String {
    shared_vectors().join(name).to_string_lossy().into_owned()
}

#[test]
fn real_document_verifies_at_its_time_with_json_summary() {
    let o = keygate(&["attestation", "verify", &path("doc-1.cbor"), "--at", "1732983769", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(j["kind"], "enclave");
    assert_eq!(j["digest"], "SHA384");
    assert_eq!(j["timestamp"], 1_732_983_768_387u64);
    assert_eq!(
        j["pcrs"]["0"],
        "ec74bfbe7f7445a6c7610e152935e028276f638042b74797b119648e13f7a3675796b721034c320f140ea001b41aeae2"
    );
    assert_eq!(j["user_data"], serde_json::Value::Null);
    assert_eq!(j["certificate"]["not_after"], 1_732_994_568);
}

#[test]
fn real_documents_at_document_time() {
    for doc in ["doc-1.cbor", "doc-3.cbor"] {
        let o = keygate(&["attestation", "verify", &path(doc), "--at-document-time"]);
        assert!(o.status.success(), "{doc}: {}", stderr(&o));
    }
}

#[test]
fn real_document_today_fails_with_one_precise_line() {
    let o = keygate(&["attestation", "verify", &path("doc-1.cbor")]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("expired") && e.contains("cabundle["), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
}

#[test]
fn wrong_root_is_refused() {
    let dir = TempDir::new("keygate-cli-attestation").expect("tmp");
    let root = dir.path().join("mock-root.pem");
    let o = keygate(&["attestation", "mock-root", "--seed", "x", "-o", root.to_str().expect("utf8")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = keygate(&[
        "attestation",
        "verify",
        &path("doc-1.cbor"),
        "--at",
        "1732983769",
        "--root",
        root.to_str().expect("utf8"),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not the pinned root"), "{}", stderr(&o));
}

#[test]
fn debug_document_needs_allow_debug() {
    let o = keygate(&["attestation", "verify", &path("doc-4.cbor"), "--at-document-time"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("debug-mode"), "{}", stderr(&o));
    let o = keygate(&["attestation", "verify", &path("doc-4.cbor"), "--at-document-time", "--allow-debug"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn expect_pcr_mismatch_names_the_pcr() {
    let wrong = format!("2={}", "00".repeat(48));
    let o = keygate(&["attestation", "verify", &path("doc-3.cbor"), "--at-document-time", "--expect-pcr", &wrong]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("PCR2 mismatch"), "{}", stderr(&o));
}

#[test]
fn hex_and_base64_encodings_are_detected() {
    use base64::Engine as _;
    let raw = std::fs::read(path("doc-3.cbor")).expect("read");
    let dir = TempDir::new("keygate-cli-attestation").expect("tmp");
    let h = dir.path().join("doc.hex");
    let b = dir.path().join("doc.b64");
    std::fs::write(&h, hex::encode(&raw) + "\n").expect("write");
    std::fs::write(&b, base64::engine::general_purpose::STANDARD.encode(&raw)).expect("write");
    for f in [&h, &b] {
        let o = keygate(&["attestation", "verify", f.to_str().expect("utf8"), "--at-document-time"]);
        assert!(o.status.success(), "{}: {}", f.display(), stderr(&o));
    }
    let g = dir.path().join("garbage");
    std::fs::write(&g, "not a document at all!").expect("write");
    let o = keygate(&["attestation", "verify", g.to_str().expect("utf8")]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn mock_document_round_trip_through_the_cli() {
    let dir = TempDir::new("keygate-cli-attestation").expect("tmp");
    let root = dir.path().join("root.pem");
    let doc = dir.path().join("doc.cbor");
    let pcr0 = format!("0={}", "ab".repeat(48));
    let (root_s, doc_s) = (root.to_str().expect("utf8"), doc.to_str().expect("utf8"));
    let o = keygate(&["attestation", "mock-root", "--seed", "s1", "-o", root_s]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = keygate(&[
        "attestation",
        "mock",
        "--seed",
        "s1",
        "--pcr",
        &pcr0,
        "--nonce",
        "0102",
        "--kind",
        "nitrotpm",
        "-o",
        doc_s,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = keygate(&["attestation", "verify", doc_s, "--root", root_s, "--json", "--expect-pcr", &pcr0]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(j["kind"], "nitrotpm");
    assert_eq!(j["nonce"], "0102");
    // Never against the AWS root, and an enclave requirement refuses a NitroTPM document.
    let o = keygate(&["attestation", "verify", doc_s]);
    assert!(stderr(&o).contains("not the pinned root"), "{}", stderr(&o));
    let o = keygate(&["attestation", "verify", doc_s, "--root", root_s, "--require-kind", "enclave"]);
    assert!(stderr(&o).contains("document kind is nitrotpm, required enclave"), "{}", stderr(&o));
}

#[test]
fn demo_runs_and_exits_zero() {
    let o = keygate(&["demo"]);
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("steps behaved as they should"));
}
