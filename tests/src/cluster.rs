//! What the end-to-end tests of sealed state and of KRE clusters share: the custodians' and
//! the mock root's keys, a development KRE with custodians (and, for a member, its member
//! listener and mock parent instance), `keygate fetch` arguments for the mock control plane,
//! and a genesis bundle naming member KREs (`keygate policy` cannot write member lists yet).
//! Decides nothing for the product; the test helpers panic with the output when a step fails,
//! the argument builders and [`genesis_bundle_with_members`] (shared with `keygate demo
//! --cluster`) never panic.

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
    cmd.args(custodial_kre_args(d, kre_pcr, sock)).args(extra);
    let followed: PathBuf = PathBuf::from(format!("{}.followed", sock.display()));
    DevKre::start(cmd.env("KEYGATE_LOG", "trace").stderr(log), sock, &followed)
}

/// The arguments of a development KRE (after `--nsm mock --mock-seed SEED`) with custodians
/// `d/cN.pub.pem` (threshold 2 of `c1`..`c3`), PCR0 = `kre_pcr`, on the release socket `sock`.
pub fn custodial_kre_args(d: &Path, kre_pcr: u8, sock: &Path) -> Vec<String> {
    let mut a = vec!["--listen".to_owned(), unix(sock)];
    a.extend(pcr_args("--mock-pcr", kre_pcr, 1));
    a.extend(["--custodian-threshold".to_owned(), "2".to_owned()]);
    for c in ["c1", "c2", "c3"] {
        a.extend(["--custodian".to_owned(), s(&d.join(format!("{c}.pub.pem")))]);
    }
    a
}

/// The arguments that make a KRE a cluster member: its genesis bundle (naming the members),
/// its member listener on `member_sock` and the mock parent instance it runs on (its PCR4).
pub fn member_args(genesis: &Path, member_sock: &Path, instance: &str) -> Vec<String> {
    vec![
        "--genesis".to_owned(),
        s(genesis),
        "--member-listen".into(),
        unix(member_sock),
        "--mock-parent-instance".into(),
        instance.into(),
    ]
}

/// Why [`genesis_bundle_with_members`] made no bundle.
#[derive(Debug)]
pub enum GenesisError {
    /// The input is not a genesis bundle.
    Bundle(String),
    /// The release policy does not parse.
    Policy(String),
}

impl std::fmt::Display for GenesisError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bundle(e) => write!(f, "not a genesis bundle: {e}"),
            Self::Policy(e) => write!(f, "not a release policy: {e}"),
        }
    }
}

impl std::error::Error for GenesisError {}

/// The genesis bundle `genesis` (the bytes `keygate policy init` wrote) with the release
/// policy `policy` and the members `(name, parent instance id)` (PCR4 of that instance, no
/// PCR3), unsigned: a genesis bundle is trusted as built into the image.
pub fn genesis_bundle_with_members(
    genesis: &[u8],
    policy: &serde_json::Value,
    members: &[(&str, &str)],
) -> Result<Vec<u8>, GenesisError> {
    let mut body =
        bundle::decode_bundle(genesis, default_backend()).map_err(|e| GenesisError::Bundle(e.to_string()))?.body;
    body.policy = keygate_enclave::policy_file::parse(policy.to_string().as_bytes())
        .map_err(|e| GenesisError::Policy(e.to_string()))?;
    let mut list: Vec<Member> = members
        .iter()
        .map(|(name, instance)| Member { name: (*name).into(), pcr4: parent_instance_pcr4(instance), pcr3: None })
        .collect();
    list.sort_by(|a, b| a.name.cmp(&b.name));
    body.members = list;
    Ok(bundle::encode_bundle(&bundle::encode_body(&body), &[]))
}

/// Writes to `out` the genesis bundle `genesis` (from `keygate policy init`) with the release
/// policy `policy` (a static policy file's JSON) and the members `(name, parent instance id)`
/// (PCR4 of that instance, no PCR3). A genesis bundle is trusted as built into the image: it
/// carries no signature.
pub fn genesis_with_members(genesis: &Path, policy: &serde_json::Value, members: &[(&str, &str)], out: &Path) {
    let bytes = std::fs::read(genesis).expect("genesis bundle");
    let bundle = genesis_bundle_with_members(&bytes, policy, members).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(out, bundle).expect("write the bundle");
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
