//! What the end-to-end tests of sealed state and of KRE clusters share: the custodians' and
//! the mock root's keys, a development KRE with custodians (and, for a member, its member
//! listener and mock parent instance), `keygate fetch` arguments for the mock control plane,
//! and a genesis bundle naming member KREs (`keygate policy` cannot write member lists yet).
//! Decides nothing for the product; panics with the output when a step fails.

use std::path::{Path, PathBuf};

use keygate_attestation::bundle;
use keygate_attestation::crypto::default_backend;
use keygate_attestation::members::{parent_instance_pcr4, Member};

use crate::e2e::{dev_kre, ok, path_arg as s, pcr_args, unix, DevKre};
use crate::keygate;

/// `keygate keygen` for custodians `c1`..`c3` (`d/cN.pem`, `d/cN.pub.pem`) and the mock root
/// of `seed` in `d/root.pem`.
pub fn custodians_and_root(d: &Path, seed: &str) {
    for i in 1..=3 {
        ok(keygate(&["keygen", "-o", &s(&d.join(format!("c{i}.pem")))]));
    }
    ok(keygate(&["attestation", "mock-root", "--seed", seed, "-o", &s(&d.join("root.pem"))]));
}

/// `keygate fetch` arguments for the mock control plane (mock NSM `seed`, PCR0-2 = `cp_pcr`)
/// asking `addr` for `key_ids` of cluster `prod`, expecting the KRE's PCR0 = `kre_pcr`.
pub fn fetch_args(
    seed: &str,
    (kre_pcr, cp_pcr): (u8, u8),
    addr: &str,
    out: &Path,
    key_ids: &[&str],
    retries: u32,
) -> Vec<String> {
    let mut a: Vec<String> = vec!["fetch".into(), "--kre".into(), addr.into(), "--cluster".into(), "prod".into()];
    for k in key_ids {
        a.extend(["--key-id".into(), (*k).into()]);
    }
    a.extend(["--out".into(), s(out), "--nsm".into(), "mock".into(), "--mock-seed".into(), seed.into()]);
    a.extend(["--retries".into(), retries.to_string()]);
    a.extend(pcr_args("--expect-kre-pcr", kre_pcr, 1));
    a.extend(pcr_args("--mock-pcr", cp_pcr, 3));
    a
}

/// A development KRE with custodians `d/cN.pub.pem` (threshold 2 of `c1`..`c3`), PCR0 =
/// `kre_pcr`, on the release socket `sock`; `extra` adds arguments (the policy, a member
/// listener, a mock parent instance). Logs at trace level into `log`.
pub fn custodial_kre(d: &Path, seed: &str, kre_pcr: u8, sock: &Path, extra: &[String], log: &Path) -> DevKre {
    let _ = std::fs::remove_file(sock);
    let log = std::fs::File::create(log).expect("log");
    let mut cmd = dev_kre(seed);
    cmd.args(["--listen", &unix(sock)]).args(pcr_args("--mock-pcr", kre_pcr, 1)).args(["--custodian-threshold", "2"]);
    for c in ["c1", "c2", "c3"] {
        cmd.args(["--custodian", &s(&d.join(format!("{c}.pub.pem")))]);
    }
    cmd.args(extra);
    let followed: PathBuf = PathBuf::from(format!("{}.followed", sock.display()));
    DevKre::start(cmd.env("KEYGATE_LOG", "trace").stderr(log), sock, &followed)
}

/// Writes to `out` the genesis bundle `genesis` (from `keygate policy init`) with the release
/// policy `policy` (a static policy file's JSON) and the members `(name, parent instance id)`
/// (PCR4 of that instance, no PCR3). A genesis bundle is trusted as built into the image: it
/// carries no signature.
pub fn genesis_with_members(genesis: &Path, policy: &serde_json::Value, members: &[(&str, &str)], out: &Path) {
    let bytes = std::fs::read(genesis).expect("genesis bundle");
    let mut body = bundle::decode_bundle(&bytes, default_backend()).expect("a genesis bundle").body;
    body.policy = keygate_enclave::policy_file::parse(policy.to_string().as_bytes()).expect("a release policy");
    let mut list: Vec<Member> = members
        .iter()
        .map(|(name, instance)| Member { name: (*name).into(), pcr4: parent_instance_pcr4(instance), pcr3: None })
        .collect();
    list.sort_by(|a, b| a.name.cmp(&b.name));
    body.members = list;
    std::fs::write(out, bundle::encode_bundle(&bundle::encode_body(&body), &[])).expect("write the bundle");
}

/// `keygate custodian unseal` arguments for custodian `custodian` (`d/custodian.pem`, its record
/// beside it) of the KRE whose custodian channel is `kre_custodian`, trusting the mock root
/// `d/root.pem` and expecting the KRE's PCR0 = `kre_pcr`.
pub fn unseal_args(d: &Path, kre_custodian: &str, custodian: &str, kre_pcr: u8) -> Vec<String> {
    let key = s(&d.join(format!("{custodian}.pem")));
    let mut a: Vec<String> = ["custodian", "unseal", "--kre", kre_custodian, "--key", &key].map(String::from).into();
    a.extend(["--root".into(), s(&d.join("root.pem"))]);
    a.extend(pcr_args("--expect-kre-pcr", kre_pcr, 1));
    a
}
