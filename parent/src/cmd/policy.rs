//! `keygate keygen` and `keygate policy init | propose | sign | assemble | verify | show | push |
//! durable | restore`: the pipeline's and the approvers' side of signed policy bundles
//! (docs/policy.md), one function per sub-verb.
//!
//! Whether a bundle is valid is decided by `keygate_attestation::bundle` (here for `verify`,
//! in the KRE for `push`); this module builds proposals, signs offline, and pushes. It trusts the
//! KRE's answer only through its typed deny code and, for durability, through the receipt it
//! verifies against the attestation root.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keygate_attestation::bundle::{self, ApproverKey, Bundle, PolicyBody, PolicyState};
use keygate_attestation::crypto::{self, Crypto};
use keygate_attestation::members::{self, Member};
use keygate_attestation::policy::{ClusterRule, ImageRule, ReleasePolicy};
use keygate_attestation::DocumentKind;
use keygate_enclave::net::transport::Addr;
use keygate_enclave::wire::{DenyCode, Message};
use p384::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding};

use crate::cmd::args::parse_duration;
use crate::cmd::attestation::{now_ms, pcrs_from_eif, write_file};
use crate::cmd::reports;
use crate::error::CliError;
use crate::kre_client::{self, KreError};
use crate::storage::bundles::{BundleStore, BundleStoreError};

pub(crate) mod timestamp;

/// Largest key or bundle file read.
const MAX_FILE: u64 = 128 * 1024;

#[derive(Debug, clap::Args)]
pub(crate) struct KeygenArgs {
    /// Private key output (PKCS#8 PEM, mode 0600); the public key goes to `<stem>.pub.pem`.
    #[arg(short = 'o', long)]
    out: PathBuf,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum PolicyCommand {
    /// Create the genesis bundle (built into the enclave image).
    Init(InitArgs),
    /// Propose the next bundle from the current one.
    Propose(ProposeArgs),
    /// Sign a proposal as one approver (offline).
    Sign(SignArgs),
    /// Combine a proposal and approvers' signatures into a bundle.
    Assemble(AssembleArgs),
    /// Check a bundle (against the current one: every rule the KRE applies).
    Verify(VerifyArgs),
    /// Print a bundle.
    Show(ShowArgs),
    /// Push a bundle to the KRE; on acceptance store it for restarts.
    Push(PushArgs),
    /// Wait until a pushed bundle is durable and check the KRE's receipt (as `push` does):
    /// for a pipeline that asks again later.
    Durable(DurableCheckArgs),
    /// Push every stored bundle to a restarted KRE, oldest first.
    Restore(RestoreArgs),
    /// Sign a timestamp for the newest bundle with the pipeline's timestamp key (push it with
    /// `policy push`).
    Timestamp(timestamp::TimestampArgs),
}

/// The arguments of `policy init`.
#[derive(Debug, clap::Args)]
pub(crate) struct InitArgs {
    /// Approver public keys (PEM), repeatable.
    #[arg(long = "approver", required = true)]
    approvers: Vec<PathBuf>,
    /// Signatures required for every later bundle.
    #[arg(long)]
    threshold: u32,
    /// Minimum activation delay for loosening changes (e.g. 1h, 30m, 86400).
    #[arg(long, default_value = "1h", value_parser = parse_duration, value_name = "DURATION")]
    activation_delay: Duration,
    /// Issue time: Unix seconds or RFC 3339 in UTC (default: now).
    #[arg(long, value_name = "TIME", value_parser = super::args::parse_time)]
    issued_at: Option<u64>,
    #[command(flatten)]
    freshness: timestamp::FreshnessArgs,
    /// Where the genesis bundle is written.
    #[arg(short = 'o', long)]
    out: PathBuf,
}

/// The arguments of `policy propose`.
#[derive(Debug, clap::Args)]
pub(crate) struct ProposeArgs {
    /// The current bundle.
    #[arg(long)]
    from: PathBuf,
    /// Allow an image: CLUSTER=[NAME@]IMAGE.eif or CLUSTER=[NAME@]0=HEX,1=HEX,2=HEX (repeatable).
    #[arg(long)]
    allow: Vec<String>,
    /// The document kind the `--allow`ed images match (a nitrotpm rule must pin PCR4 and
    /// PCR12, or PCR7).
    #[arg(long, value_parser = crate::cmd::attestation::parse_kind, default_value = "enclave")]
    kind: DocumentKind,
    /// `--allow`ed images stop matching after this time (Unix seconds or RFC 3339 in UTC).
    #[arg(long, value_name = "TIME", value_parser = super::args::parse_time)]
    not_after: Option<u64>,
    /// Revoke: CLUSTER=NAME (one image) or CLUSTER (the whole cluster), repeatable.
    #[arg(long)]
    revoke: Vec<String>,
    /// Rotate CLUSTER's KEK: its KEK version + 1 (the new version wraps/derives new keys,
    /// older ones stay released until retired). Repeatable.
    #[arg(long)]
    rotate: Vec<String>,
    /// Retire KEK versions: CLUSTER=N, versions below N are never released again (at
    /// once; lowering N later waits for the activation delay). Repeatable.
    #[arg(long)]
    retire: Vec<String>,
    /// Activation delay of this bundle for loosening changes.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    activation_delay: Option<Duration>,
    /// New approver set (rotation; needs a quorum of the old and of the new set).
    #[arg(long = "approver")]
    approvers: Vec<PathBuf>,
    /// New threshold.
    #[arg(long)]
    threshold: Option<u32>,
    /// Add (or replace) a cluster member KRE, by its parent instance: NAME=INSTANCE_ID
    /// (PCR4 from the instance id) or NAME=INSTANCE_ID,ROLE_ARN (also PCR3 from the IAM
    /// role), or by measured values NAME=4:HEX[,3:HEX] (docs/cluster.md). Repeatable.
    #[arg(long = "member", value_name = "NAME=INSTANCE[,ROLE]")]
    members: Vec<String>,
    /// Remove a cluster member by name (at once: a removal tightens). Repeatable.
    #[arg(long = "remove-member", value_name = "NAME")]
    remove_members: Vec<String>,
    #[command(flatten)]
    freshness: timestamp::FreshnessArgs,
    /// Issue time: Unix seconds or RFC 3339 in UTC (default: now).
    #[arg(long, value_name = "TIME", value_parser = super::args::parse_time)]
    issued_at: Option<u64>,
    /// Where the proposal (the next bundle, not yet signed) is written.
    #[arg(short = 'o', long)]
    out: PathBuf,
}

/// The arguments of `policy sign`.
#[derive(Debug, clap::Args)]
pub(crate) struct SignArgs {
    /// The proposal to sign (from `policy propose`).
    proposal: PathBuf,
    /// The approver's private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// The bundle now in force, to show what changes.
    #[arg(long)]
    current: Option<PathBuf>,
    /// Do not ask for confirmation.
    #[arg(long)]
    yes: bool,
    /// Where this approver's signature is written.
    #[arg(short = 'o', long)]
    out: PathBuf,
}

/// The arguments of `policy assemble`.
#[derive(Debug, clap::Args)]
pub(crate) struct AssembleArgs {
    /// The proposal the signatures are over.
    proposal: PathBuf,
    /// Approvers' signature files (from `policy sign`).
    signatures: Vec<PathBuf>,
    /// Where the signed bundle is written.
    #[arg(short = 'o', long)]
    out: PathBuf,
}

/// The arguments of `policy verify`.
#[derive(Debug, clap::Args)]
pub(crate) struct VerifyArgs {
    /// The bundle to check.
    bundle: PathBuf,
    /// The bundle now in force: check the new one as the KRE will (version, chain,
    /// signatures of the current approver set). Without it: well-formedness only.
    #[arg(long)]
    current: Option<PathBuf>,
}

/// The arguments of `policy show`.
#[derive(Debug, clap::Args)]
pub(crate) struct ShowArgs {
    /// The bundle to print.
    bundle: PathBuf,
    /// Print it as JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// The arguments of `policy push`.
#[derive(Debug, clap::Args)]
pub(crate) struct PushArgs {
    /// The signed bundle to push (from `policy assemble`).
    bundle: PathBuf,
    /// The KRE's parent channel (`--parent-listen`; never proxied).
    #[arg(long)]
    kre: Addr,
    /// Where accepted bundles are kept: a directory (`policy-v<N>.bundle`) or
    /// etcd://HOST:PORT[,HOST:PORT...][/PREFIX] (shared by a cluster's parents; a bundle
    /// forking the stored chain is refused before the push).
    #[arg(long, value_name = "DIR|etcd://…")]
    store: Option<BundleStore>,
    /// With custodians: the parent's state directory; the new policy head (and KEKs for
    /// new clusters) are stored and committed right after the push (`keygate state sync`).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    #[command(flatten)]
    durable: DurableArgs,
}

/// The arguments of `policy durable`.
#[derive(Debug, clap::Args)]
pub(crate) struct DurableCheckArgs {
    /// The bundle that was pushed.
    bundle: PathBuf,
    /// The KRE's parent channel. Repeat it for every member of a KRE cluster: the bundle is
    /// then durable only when every member the bundle names has given its own verified
    /// receipt (each member commits or adopts the generation that carries it).
    #[arg(long, required = true)]
    kre: Vec<Addr>,
    #[command(flatten)]
    durable: DurableArgs,
}

/// The arguments of `policy restore`.
#[derive(Debug, clap::Args)]
pub(crate) struct RestoreArgs {
    /// The restarted KRE's parent channel (`--parent-listen`; never proxied).
    #[arg(long)]
    kre: Addr,
    /// Where `policy push --store` kept the accepted bundles: a directory or etcd://….
    #[arg(long, value_name = "DIR|etcd://…")]
    store: BundleStore,
}

/// How `policy push` learns that a change is durable: the KRE's receipt, checked here.
#[derive(Debug, clap::Args)]
pub(crate) struct DurableArgs {
    /// Wait at most this long for the change to become durable — the parent's state store
    /// committing the sealed state that carries it (`--state-dir` here, or the parent's `state
    /// sync --follow`) — and exit non-zero if it is not (the KRE then keeps applying the
    /// stricter of the old and new policies). `0`: do not wait.
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    durable_within: Duration,
    /// Keep the KRE's durability receipt here (default: `policy-v<N>.durable` in `--store`).
    #[arg(long, value_name = "FILE")]
    receipt_out: Option<PathBuf>,
    /// Trust this root (PEM) for the receipt's attestation instead of the AWS Nitro root.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Require the KRE's PCR N to equal HEX in the receipt's attestation (repeatable).
    #[arg(long = "expect-kre-pcr", value_name = "N=HEX")]
    expect_kre_pcr: Vec<keygate_attestation::PcrExpectation>,
    /// Accept a debug-mode KRE's receipt (PCR0-2 zero). For demos only.
    #[arg(long)]
    allow_debug_kre: bool,
}

fn read(path: &Path) -> Result<Vec<u8>, CliError> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| CliError::io(format!("reading {}", path.display()), e))?;
    let mut v = Vec::new();
    f.take(MAX_FILE + 1).read_to_end(&mut v).map_err(|e| CliError::io(format!("reading {}", path.display()), e))?;
    if u64::try_from(v.len()).unwrap_or(u64::MAX) > MAX_FILE {
        return Err(CliError::input(format!("{}: too large", path.display())));
    }
    Ok(v)
}

fn crypto() -> &'static dyn Crypto {
    crypto::default_backend()
}

fn load_bundle(path: &Path) -> Result<Bundle, CliError> {
    bundle::decode_bundle(&read(path)?, crypto()).map_err(|e| CliError::input(format!("{}: {e}", path.display())))
}

fn load_public(path: &Path) -> Result<ApproverKey, CliError> {
    let pem = String::from_utf8(read(path)?).map_err(|_| CliError::input(format!("{}: not PEM", path.display())))?;
    let key = p384::PublicKey::from_public_key_pem(&pem)
        .map_err(|e| CliError::input(format!("{}: not a P-384 public key: {e}", path.display())))?;
    use p384::elliptic_curve::sec1::ToEncodedPoint;
    ApproverKey::try_from(key.to_encoded_point(false).as_bytes()).map_err(|_| CliError::input("bad point"))
}

fn load_private(path: &Path) -> Result<p384::ecdsa::SigningKey, CliError> {
    let pem = zeroize::Zeroizing::new(
        String::from_utf8(read(path)?).map_err(|_| CliError::input(format!("{}: not PEM", path.display())))?,
    );
    let sk = p384::SecretKey::from_pkcs8_pem(&pem)
        .or_else(|_| p384::SecretKey::from_sec1_pem(&pem))
        .map_err(|_| CliError::input(format!("{}: not a P-384 private key (PKCS#8 or SEC1 PEM)", path.display())))?;
    Ok(p384::ecdsa::SigningKey::from(sk))
}

pub(crate) fn keygen(a: KeygenArgs) -> Result<(), CliError> {
    let sk = p384::SecretKey::random(&mut rand_core::OsRng);
    let pem = sk.to_pkcs8_pem(LineEnding::LF).map_err(|e| CliError::input(e.to_string()))?;
    let public = sk.public_key().to_public_key_pem(LineEnding::LF).map_err(|e| CliError::input(e.to_string()))?;
    // Mode 0600, never over an existing key; whole or not at all.
    let private = keygate_enclave::atomic::WriteOptions { mode: 0o600, replace: false };
    keygate_enclave::atomic::write_file_with(&a.out, pem.as_bytes(), private)?;
    let pub_path = public_path(&a.out);
    write_file(&pub_path, public.as_bytes())?;
    let point = p384::ecdsa::SigningKey::from(&sk).verifying_key().to_encoded_point(false);
    crate::output::print(&reports::Keygen {
        private_key: reports::path(&a.out),
        public_key: reports::path(&pub_path),
        fingerprint: fingerprint(point.as_bytes()),
    })
}

/// A key's fingerprint for people to compare: `sha256:` and the first 128 bits of the SHA-256
/// of its uncompressed SEC1 point, as `keygen`, `policy show` and `policy sign` print it.
pub(crate) fn fingerprint(point: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("sha256:{}", hex::encode(&Sha256::digest(point)[..16]))
}

fn public_path(private: &Path) -> PathBuf {
    let stem = private.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "key".into());
    private.with_file_name(format!("{stem}.pub.pem"))
}

/// Parses `[NAME@]IMAGE.eif` or `[NAME@]0=HEX,1=HEX,...` into an image rule.
fn parse_image(spec: &str, kind: DocumentKind, not_after: Option<u64>) -> Result<ImageRule, CliError> {
    let (name, rest) = match spec.split_once('@') {
        Some((n, r)) => (Some(n.to_owned()), r),
        None => (None, spec),
    };
    let pcrs: BTreeMap<u8, Vec<u8>> = if rest.contains('=') {
        rest.split(',')
            .map(|p| {
                let e: keygate_attestation::PcrExpectation =
                    p.parse().map_err(|e| CliError::input(format!("`{p}`: {e}")))?;
                Ok((e.index, e.value))
            })
            .collect::<Result<_, CliError>>()?
    } else {
        pcrs_from_eif(Path::new(rest))?
    };
    let name = match name {
        Some(n) => n,
        None if !rest.contains('=') => {
            Path::new(rest).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into())
        }
        None => {
            format!(
                "pcrs-{}",
                hex::encode(
                    pcrs.get(&0).or_else(|| pcrs.get(&8)).or_else(|| pcrs.get(&4)).map(|v| &v[..4]).unwrap_or_default()
                )
            )
        }
    };
    Ok(ImageRule { name, pcrs, kind, not_after_ms: not_after.map(|s| s.saturating_mul(1000)), not_before_ms: None })
}

fn describe(policy: &ReleasePolicy) -> Vec<String> {
    let mut out = Vec::new();
    for (c, rule) in &policy.clusters {
        for i in &rule.images {
            out.push(image_line(c, i));
        }
    }
    out
}

fn image_line(cluster: &str, i: &ImageRule) -> String {
    let pcrs: Vec<String> = i.pcrs.iter().map(|(n, v)| format!("PCR{n}={}…", &hex::encode(v)[..12])).collect();
    let kind = i.kind;
    let until = i.not_after_ms.map_or(String::new(), |t| format!(", until {}", super::args::format_time_ms(t)));
    format!("{cluster}: image `{}` [{}] ({kind}{until})", i.name, pcrs.join(" "))
}

/// Applies `--rotate CLUSTER` (KEK version + 1) and `--retire CLUSTER=N` (versions below N
/// retired) to a proposal.
fn apply_kek_changes(policy: &mut ReleasePolicy, rotate: &[String], retire: &[String]) -> Result<(), CliError> {
    for c in rotate {
        let rule =
            policy.clusters.get_mut(c).ok_or_else(|| CliError::input(format!("--rotate {c}: no cluster `{c}`")))?;
        rule.kek_version = rule.kek_version.saturating_add(1);
    }
    for r in retire {
        let (c, n) =
            r.split_once('=').ok_or_else(|| CliError::input(format!("--retire {r}: expected CLUSTER=VERSION")))?;
        let n: u32 = n.parse().map_err(|_| CliError::input(format!("--retire {r}: `{n}` is not a version number")))?;
        let rule =
            policy.clusters.get_mut(c).ok_or_else(|| CliError::input(format!("--retire {r}: no cluster `{c}`")))?;
        if n > rule.kek_version {
            return Err(CliError::input(format!(
                "--retire {r}: the current KEK version of `{c}` is {}; versions up to it can be retired",
                rule.kek_version
            )));
        }
        rule.kek_retire_below = n;
    }
    Ok(())
}

/// The KEK schedule changes between two policies, as diff lines.
fn kek_diff(old: &ReleasePolicy, new: &ReleasePolicy) -> Vec<String> {
    let mut out = Vec::new();
    let default = ClusterRule::default();
    for (c, n) in &new.clusters {
        let o = old.clusters.get(c).unwrap_or(&default);
        if n.kek_version != o.kek_version {
            out.push(format!("  ~ {c}: KEK version {} -> {}", o.kek_version, n.kek_version));
        }
        if n.kek_retire_below > o.kek_retire_below {
            out.push(format!("  ~ {c}: versions below {} retired", n.kek_retire_below));
        } else if n.kek_retire_below < o.kek_retire_below {
            let now = if n.kek_retire_below > 1 {
                format!("only versions below {} retired", n.kek_retire_below)
            } else {
                "no version retired".to_owned()
            };
            out.push(format!(
                "  ~ {c}: versions below {} no longer retired, {now} (un-retires: waits for the activation delay)",
                o.kek_retire_below
            ));
        }
    }
    out
}

/// The KEK schedule of a cluster, for display (`None` for the default schedule).
fn kek_line(cluster: &str, r: &ClusterRule) -> Option<String> {
    if r.has_default_schedule() {
        return None;
    }
    let retired =
        if r.kek_retire_below > 1 { format!(", versions below {} retired", r.kek_retire_below) } else { String::new() };
    Some(format!("{cluster}: KEK version {}{retired}", r.kek_version))
}

/// A member from `--member NAME=INSTANCE[,ROLE]` or `NAME=4:HEX[,3:HEX]`.
fn parse_member(spec: &str) -> Result<Member, CliError> {
    let bad = |why: &str| CliError::input(format!("--member {spec}: {why}"));
    let (name, rest) =
        spec.split_once('=').ok_or_else(|| bad("expected NAME=INSTANCE[,ROLE] or NAME=4:HEX[,3:HEX]"))?;
    let (first, second) = match rest.split_once(',') {
        Some((a, b)) => (a, Some(b)),
        None => (rest, None),
    };
    let measured = |text: &str, index: u8| -> Result<[u8; 48], CliError> {
        let hex_text = text.strip_prefix(&format!("{index}:")).ok_or_else(|| bad(&format!("expected {index}:HEX")))?;
        let bytes = hex::decode(hex_text).map_err(|e| bad(&format!("PCR{index}: {e}")))?;
        members::pcr_value(name, index, &bytes).map_err(|e| bad(&e.to_string()))
    };
    let (pcr4, pcr3) = if first.starts_with("4:") {
        (measured(first, 4)?, second.map(|t| measured(t, 3)).transpose()?)
    } else {
        if first.is_empty() {
            return Err(bad("the parent instance id is empty"));
        }
        (members::parent_instance_pcr4(first), second.map(members::parent_role_pcr3))
    };
    Ok(Member { name: name.to_owned(), pcr4, pcr3 })
}

/// Applies `--member` and `--remove-member` to `list`, kept sorted by name and valid.
fn apply_member_changes(list: &mut Vec<Member>, add: &[String], remove: &[String]) -> Result<(), CliError> {
    for name in remove {
        let before = list.len();
        list.retain(|m| &m.name != name);
        if list.len() == before {
            return Err(CliError::input(format!("--remove-member {name}: no such member")));
        }
    }
    for spec in add {
        let m = parse_member(spec)?;
        list.retain(|o| o.name != m.name);
        list.push(m);
    }
    list.sort_by(|a, b| a.name.cmp(&b.name));
    members::validate(list).map_err(|e| CliError::input(format!("members: {e}")))
}

/// A member as one line: its name and the start of its PCR4 (and PCR3).
fn member_line(m: &Member) -> String {
    let pcr3 = m.pcr3.map_or(String::new(), |p| format!(" PCR3 {}…", hex::encode(&p[..8])));
    format!("member {} PCR4 {}…{pcr3}", m.name, hex::encode(&m.pcr4[..8]))
}

fn diff(old: &PolicyBody, new: &PolicyBody) -> Vec<String> {
    let mut out = Vec::new();
    let old_lines: Vec<String> = describe(&old.policy);
    let new_lines: Vec<String> = describe(&new.policy);
    for l in &old_lines {
        if !new_lines.contains(l) {
            out.push(format!("  - {l}"));
        }
    }
    for l in &new_lines {
        if !old_lines.contains(l) {
            out.push(format!("  + {l}"));
        }
    }
    if old.approvers != new.approvers || old.threshold != new.threshold {
        out.push(format!(
            "  ~ approvers: {} of {} -> {} of {}",
            old.threshold,
            old.approvers.len(),
            new.threshold,
            new.approvers.len()
        ));
    }
    out.extend(kek_diff(&old.policy, &new.policy));
    let (old_members, new_members): (Vec<String>, Vec<String>) =
        (old.members.iter().map(member_line).collect(), new.members.iter().map(member_line).collect());
    out.extend(old_members.iter().filter(|l| !new_members.contains(l)).map(|l| format!("  - {l}")));
    out.extend(new_members.iter().filter(|l| !old_members.contains(l)).map(|l| format!("  + {l}")));
    if old.policy.allow_debug != new.policy.allow_debug {
        out.push(format!("  ~ allow_debug: {} -> {}", old.policy.allow_debug, new.policy.allow_debug));
    }
    if old.activation_delay != new.activation_delay {
        out.push(format!("  ~ activation delay: {} s -> {} s", old.activation_delay, new.activation_delay));
    }
    if old.freshness != new.freshness {
        out.push(format!(
            "  ~ {} -> {}",
            freshness_line(old.freshness.as_ref()),
            freshness_line(new.freshness.as_ref())
        ));
    }
    if out.is_empty() {
        out.push("  (no change to the allowed images or approvers)".into());
    }
    out
}

fn body_text(b: &PolicyBody, digest: &[u8; 48]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "policy bundle version {} (digest {})", b.version, hex::encode(digest));
    let issued = super::args::format_time_s(i64::try_from(b.issued_at).unwrap_or(i64::MAX));
    let _ = writeln!(s, "  issued at {issued}, activation delay {} s", b.activation_delay);
    let _ = writeln!(s, "  previous  {}", hex::encode(b.previous));
    let _ = writeln!(s, "  approvers {} of {}:", b.threshold, b.approvers.len());
    for a in &b.approvers {
        let _ = writeln!(s, "    {}  (point {}…)", fingerprint(a), hex::encode(&a[..16]));
    }
    let _ = writeln!(s, "  allow_debug {}", b.policy.allow_debug);
    for l in describe(&b.policy) {
        let _ = writeln!(s, "  {l}");
    }
    for (c, r) in &b.policy.clusters {
        if let Some(l) = kek_line(c, r) {
            let _ = writeln!(s, "  {l}");
        }
    }
    for m in &b.members {
        let _ = writeln!(s, "  {}", member_line(m));
    }
    let _ = writeln!(s, "  {}", freshness_line(b.freshness.as_ref()));
    s
}

/// The policy's freshness in one line.
fn freshness_line(f: Option<&keygate_attestation::freshness::Freshness>) -> String {
    match f {
        Some(f) => format!("timestamps: key {}, max age {} s", fingerprint(&f.key), f.max_age_s),
        None => "timestamps: not required".to_owned(),
    }
}

fn body_json(b: &PolicyBody, digest: &[u8; 48], signatures: usize) -> serde_json::Value {
    let clusters: BTreeMap<&String, Vec<serde_json::Value>> = b
        .policy
        .clusters
        .iter()
        .map(|(c, r)| {
            let images = r
                .images
                .iter()
                .map(|i| {
                    serde_json::json!({
                        "name": i.name,
                        "kind": i.kind.as_str(),
                        "not_after": i.not_after_ms.map(|t| t / 1000),
                        "pcrs": i.pcrs.iter().map(|(n, v)| (n.to_string(), hex::encode(v))).collect::<BTreeMap<_, _>>(),
                    })
                })
                .collect();
            (c, images)
        })
        .collect();
    serde_json::json!({
        "version": b.version,
        "digest": hex::encode(digest),
        "previous": hex::encode(b.previous),
        "issued_at": b.issued_at,
        "activation_delay": b.activation_delay,
        "threshold": b.threshold,
        "approvers": b.approvers.iter().map(hex::encode).collect::<Vec<_>>(),
        "approver_fingerprints": b.approvers.iter().map(|a| fingerprint(a)).collect::<Vec<_>>(),
        "allow_debug": b.policy.allow_debug,
        "clusters": clusters,
        "kek": b.policy.clusters.iter().map(|(c, r)| {
            (c, serde_json::json!({ "version": r.kek_version, "retire_below": r.kek_retire_below }))
        }).collect::<BTreeMap<_, _>>(),
        "members": b.members.iter().map(|m| serde_json::json!({
            "name": m.name,
            "pcr4": hex::encode(m.pcr4),
            "pcr3": m.pcr3.map(hex::encode),
        })).collect::<Vec<_>>(),
        "timestamps": b.freshness.as_ref().map(|f| serde_json::json!({
            "key": hex::encode(f.key),
            "key_fingerprint": fingerprint(&f.key),
            "max_age_s": f.max_age_s,
        })),
        "signatures": signatures,
    })
}

fn write_bundle(path: &Path, body: &PolicyBody, sigs: &[(Vec<u8>, Vec<u8>)]) -> Result<[u8; 48], CliError> {
    let body_bytes = bundle::encode_body(body);
    // Re-check what we are about to write with the same rules the KRE applies.
    bundle::decode_body(&body_bytes, crypto())
        .map_err(|e| CliError::input(format!("the resulting bundle is invalid: {e}")))?;
    write_file(path, &bundle::encode_bundle(&body_bytes, sigs))?;
    Ok(bundle::digest(&body_bytes))
}

pub(crate) fn run(cmd: PolicyCommand) -> Result<(), CliError> {
    match cmd {
        PolicyCommand::Init(a) => init(a),
        PolicyCommand::Propose(a) => propose(a),
        PolicyCommand::Sign(a) => sign(a),
        PolicyCommand::Assemble(a) => assemble(a),
        PolicyCommand::Verify(a) => verify(a),
        PolicyCommand::Show(a) => show(a),
        PolicyCommand::Push(a) => push_bundle(a),
        PolicyCommand::Durable(a) => durable(a),
        PolicyCommand::Restore(a) => restore(a),
        PolicyCommand::Timestamp(a) => timestamp::sign(a),
    }
}

/// `policy init`: the genesis bundle.
fn init(a: InitArgs) -> Result<(), CliError> {
    let InitArgs { approvers, threshold, activation_delay, issued_at, freshness, out } = a;
    if freshness.removes() {
        return Err(CliError::input("--no-timestamp: a genesis bundle has no timestamp key to remove"));
    }
    let mut keys = approvers.iter().map(|p| load_public(p)).collect::<Result<Vec<_>, _>>()?;
    keys.sort();
    keys.dedup();
    let body = PolicyBody {
        version: 1,
        previous: [0; 48],
        issued_at: issued_at.unwrap_or(now_ms() / 1000),
        activation_delay: activation_delay.as_secs(),
        approvers: keys,
        threshold,
        policy: ReleasePolicy::default(),
        members: Vec::new(),
        freshness: freshness.apply(None)?,
    };
    let d = write_bundle(&out, &body, &[])?;
    crate::output::print(&reports::PolicyInit {
        bundle: reports::path(&out),
        version: 1,
        threshold,
        approvers: body.approvers.len(),
        digest: hex::encode(d),
    })
}

/// `policy propose`: the next bundle from the current one, and what changes.
fn propose(a: ProposeArgs) -> Result<(), CliError> {
    let ProposeArgs {
        from,
        allow,
        kind,
        not_after,
        revoke,
        rotate,
        retire,
        activation_delay,
        approvers,
        threshold,
        members,
        remove_members,
        freshness,
        issued_at,
        out,
    } = a;
    let current = load_bundle(&from)?;
    let mut body = current.body.clone();
    body.version += 1;
    body.previous = bundle::digest(&current.body_bytes);
    body.issued_at = issued_at.unwrap_or(now_ms() / 1000).max(current.body.issued_at);
    if let Some(d) = activation_delay {
        body.activation_delay = d.as_secs();
    }
    if !approvers.is_empty() {
        let mut keys = approvers.iter().map(|p| load_public(p)).collect::<Result<Vec<_>, _>>()?;
        keys.sort();
        keys.dedup();
        body.approvers = keys;
    }
    if let Some(t) = threshold {
        body.threshold = t;
    }
    for r in &revoke {
        match r.split_once('=') {
            Some((cluster, name)) => {
                let rule = body
                    .policy
                    .clusters
                    .get_mut(cluster)
                    .ok_or_else(|| CliError::input(format!("--revoke {r}: no cluster `{cluster}`")))?;
                let before = rule.images.len();
                rule.images.retain(|i| i.name != name);
                if rule.images.len() == before {
                    return Err(CliError::input(format!("--revoke {r}: no image `{name}` in `{cluster}`")));
                }
                if rule.images.is_empty() {
                    body.policy.clusters.remove(cluster);
                }
            }
            None => {
                body.policy
                    .clusters
                    .remove(r.as_str())
                    .ok_or_else(|| CliError::input(format!("--revoke {r}: no such cluster")))?;
            }
        }
    }
    for a in &allow {
        let (cluster, spec) = a
            .split_once('=')
            .ok_or_else(|| CliError::input(format!("--allow {a}: expected CLUSTER=IMAGE.eif|PCRS")))?;
        let image = parse_image(spec, kind, not_after)?;
        // A cluster revoked and allowed again keeps its KEK schedule (versions never
        // restart lower).
        let schedule = current.body.policy.clusters.get(cluster).map(|r| (r.kek_version, r.kek_retire_below));
        let rule = body.policy.clusters.entry(cluster.to_owned()).or_insert_with(|| {
            let (kek_version, kek_retire_below) = schedule.unwrap_or((1, 0));
            ClusterRule { images: Vec::new(), kek_version, kek_retire_below }
        });
        rule.images.retain(|i| i.name != image.name);
        rule.images.push(image);
    }
    apply_kek_changes(&mut body.policy, &rotate, &retire)?;
    apply_member_changes(&mut body.members, &members, &remove_members)?;
    body.freshness = freshness.apply(body.freshness.take())?;
    let d = write_bundle(&out, &body, &[])?;
    let changes = diff(&current.body, &body);
    crate::output::print(&reports::PolicyProposal::new(reports::path(&out), body.version, hex::encode(d), &changes))
}

/// `policy sign`: one approver's signature over a proposal, after showing it (and confirming).
fn sign(a: SignArgs) -> Result<(), CliError> {
    let SignArgs { proposal, key, current, yes, out } = a;
    let p = load_bundle(&proposal)?;
    let sk = load_private(&key)?;
    let d = bundle::digest(&p.body_bytes);
    let point = sk.verifying_key().to_encoded_point(false).as_bytes().to_vec();
    // What is about to be signed, shown first: on stdout as text; under `--json` on stderr, and
    // only when a person is asked to confirm (the JSON document at the end carries the changes).
    let show_first = |text: &str| match crate::output::format() {
        crate::output::Format::Text => crate::output::step(text),
        crate::output::Format::Json => {
            if !yes {
                eprint!("{text}");
            }
            Ok(())
        }
    };
    let mut changes = None;
    match &current {
        Some(c) => {
            let c = load_bundle(c)?;
            if !c.body.approvers.iter().any(|a| a[..] == point[..]) {
                let m = format!(
                    "key {} is not an approver of the current bundle (version {}): the KRE will not count its signature",
                    fingerprint(&point),
                    c.body.version
                );
                crate::output::warn(&format!("warning: {m}"), &m);
            }
            if p.body.previous != bundle::digest(&c.body_bytes) {
                return Err(CliError::refused("the proposal does not follow the given current bundle"));
            }
            let lines = diff(&c.body, &p.body);
            let mut text = format!("version {} -> {} (digest {}):\n", c.body.version, p.body.version, hex::encode(d));
            lines.iter().for_each(|l| text.extend([l.as_str(), "\n"]));
            show_first(&text)?;
            changes = Some(lines);
        }
        None => {
            if !p.body.approvers.iter().any(|a| a[..] == point[..]) {
                let m = format!(
                    "key {} is not among the proposal's approvers (pass --current to check it against the set that must approve)",
                    fingerprint(&point)
                );
                crate::output::warn(&format!("warning: {m}"), &m);
            }
            show_first(&body_text(&p.body, &d))?;
        }
    }
    if !yes {
        if !std::io::stdin().is_terminal() {
            return Err(CliError::input("refusing to sign without confirmation: run in a terminal or pass --yes"));
        }
        eprint!("sign this proposal? [y/N] ");
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer).map_err(|e| CliError::io("reading the answer", e))?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            return Err(CliError::refused("not signed"));
        }
    }
    use p384::ecdsa::signature::Signer;
    let sig: p384::ecdsa::Signature = sk.sign(&bundle::signing_message(&p.body_bytes));
    write_file(&out, &bundle::encode_signature(&p.body_bytes, &point, &sig.to_bytes()))?;
    crate::output::print(&reports::PolicySigned::new(
        reports::path(&out),
        fingerprint(&point),
        p.body.version,
        hex::encode(d),
        changes.as_deref(),
    ))
}

/// `policy assemble`: a proposal and signatures into a bundle.
fn assemble(a: AssembleArgs) -> Result<(), CliError> {
    let AssembleArgs { proposal, signatures, out } = a;
    let p = load_bundle(&proposal)?;
    let mut sigs = p.signatures.clone();
    for s in &signatures {
        sigs.push(
            bundle::decode_signature(&read(s)?, &p.body_bytes)
                .map_err(|e| CliError::input(format!("{}: {e}", s.display())))?,
        );
    }
    write_bundle(&out, &p.body, &sigs)?;
    let r = bundle::tally(crypto(), &p.body.approvers, &p.body_bytes, &sigs);
    crate::output::print(&reports::PolicyAssembled {
        bundle: reports::path(&out),
        signatures: sigs.len(),
        valid: r.valid.len(),
    })
}

/// `policy verify`: a bundle checked alone, or as the KRE will against the current one.
fn verify(a: VerifyArgs) -> Result<(), CliError> {
    let VerifyArgs { bundle: path, current } = a;
    let b = load_bundle(&path)?;
    match current {
        Some(c) => {
            let c = read(&c)?;
            let mut state =
                PolicyState::trusting(&c, crypto()).map_err(|e| CliError::input(format!("current: {e}")))?;
            let r = state
                .apply(&read(&path)?, now_ms(), crypto())
                .map_err(|e| CliError::refused(format!("bundle refused: {e}")))?;
            crate::output::print(&reports::PolicyVerified {
                version: r.version,
                checked_against_current: true,
                valid_signatures: r.signatures.valid.len(),
                threshold: None,
                unknown_signatures: Some(r.signatures.unknown),
                duplicate_signatures: Some(r.signatures.duplicates),
                invalid_signatures: Some(r.signatures.invalid),
                loosens: Some(r.loosens),
            })
        }
        None => {
            let r = bundle::tally(crypto(), &b.body.approvers, &b.body_bytes, &b.signatures);
            crate::output::print(&reports::PolicyVerified {
                version: b.body.version,
                checked_against_current: false,
                valid_signatures: r.valid.len(),
                threshold: Some(b.body.threshold),
                unknown_signatures: None,
                duplicate_signatures: None,
                invalid_signatures: None,
                loosens: None,
            })
        }
    }
}

/// `policy show`: a bundle as text or JSON.
fn show(a: ShowArgs) -> Result<(), CliError> {
    let ShowArgs { bundle: path, json } = a;
    let b = load_bundle(&path)?;
    let d = bundle::digest(&b.body_bytes);
    // `--json` here and the global `--json` are one flag (clap hands it to both).
    let j = body_json(&b.body, &d, b.signatures.len());
    let text = if json {
        format!("{j}\n")
    } else {
        format!("{}  signatures {}\n", body_text(&b.body, &d), b.signatures.len())
    };
    crate::output::print(&crate::output::Shown { json: j, text })
}

/// `policy push`: push to the KRE, keep the accepted bundle, sync the state, wait until durable.
fn push_bundle(a: PushArgs) -> Result<(), CliError> {
    let PushArgs { bundle: path, kre, store, state_dir, durable } = a;
    let bytes = read(&path)?;
    if keygate_attestation::freshness::is_timestamp(&bytes) {
        return timestamp::push(&path, &kre, store.as_ref());
    }
    let b = bundle::decode_bundle(&bytes, crypto()).map_err(|e| CliError::input(format!("{}: {e}", path.display())))?;
    let digest = bundle::digest(&b.body_bytes);
    let mut kept = store.as_ref().map(BundleStore::open).transpose().map_err(stored_error)?;
    if let Some(k) = &mut kept {
        // A bundle forking the chain the shared store holds never reaches the KRE.
        k.check(b.body.version, &digest).map_err(stored_error)?;
    }
    let (version, activates) = push(&kre, &bytes).map_err(push_refused)?;
    if store.is_none() {
        let m = "no --store: the accepted bundle is not kept on the parent, so `policy restore` cannot replay it after a KRE restart";
        crate::output::warn(&format!("warning: {m}"), m);
    }
    let stored = kept.map(|mut k| k.keep(b.body.version, &digest, &bytes)).transpose().map_err(stored_error)?;
    let wait = activates.saturating_sub(now_ms()).div_ceil(1000);
    crate::output::step(&reports::PolicyPushed::accepted_text(version, wait))?;
    let mut state_sync = None;
    if let Some(dir) = state_dir {
        let line = super::custodian::sync_once(&kre, &dir)?;
        crate::output::step(&format!("{line}\n"))?;
        state_sync = Some(line);
    }
    let receipt_out = durable
        .receipt_out
        .clone()
        .or_else(|| store.as_ref().and_then(BundleStore::dir).map(|d| d.join(format!("policy-v{version:08}.durable"))));
    let (durability, _) = wait_durable(&kre, version, &digest, &durable, receipt_out.as_deref())?;
    crate::output::print(&reports::PolicyPushed { version, activates_in_s: wait, stored, state_sync, durability })
}

/// `policy durable`: wait for a pushed bundle's durability receipt and check it.
fn durable(a: DurableCheckArgs) -> Result<(), CliError> {
    let DurableCheckArgs { bundle: path, kre, durable } = a;
    let bytes = read(&path)?;
    let b = bundle::decode_bundle(&bytes, crypto()).map_err(|e| CliError::input(format!("{}: {e}", path.display())))?;
    let digest = bundle::digest(&b.body_bytes);
    match kre.as_slice() {
        [one] => {
            let (durability, _) = wait_durable(one, b.body.version, &digest, &durable, durable.receipt_out.as_deref())?;
            crate::output::print(&durability)
        }
        many => crate::output::print(&durable_at_members(many, &b.body, &digest, &durable)?),
    }
}

/// The most `--kre` of `policy durable` (as for `fetch`).
const MAX_DURABLE_KRES: usize = 16;

/// `policy durable` with a `--kre` per member: waits for each one's receipt in turn (each for
/// up to `--durable-within`), names the member each receipt's attestation shows (its PCR4,
/// and PCR3 where pinned), and is satisfied only when the receipts come from distinct members
/// and cover every member `body` names. The addresses reach the KREs through parents, so
/// which member answered is read from the receipt, never from the address.
fn durable_at_members(
    kres: &[Addr],
    body: &PolicyBody,
    digest: &[u8; 48],
    args: &DurableArgs,
) -> Result<reports::ClusterDurability, CliError> {
    if kres.len() > MAX_DURABLE_KRES {
        return Err(CliError::input(format!("at most {MAX_DURABLE_KRES} --kre, not {}", kres.len())));
    }
    if body.members.is_empty() {
        return Err(CliError::input("the bundle names no members: give one --kre"));
    }
    let mut at: Vec<reports::MemberDurable> = Vec::with_capacity(kres.len());
    for (i, kre) in kres.iter().enumerate() {
        let out = args.receipt_out.as_ref().map(|p| PathBuf::from(format!("{}.{i}", p.display())));
        let (durability, att) = wait_durable(kre, body.version, digest, args, out.as_deref())
            .map_err(|e| CliError { message: format!("{kre}: {}", e.message), ..e })?;
        let generation = match durability {
            reports::Durability::Durable { generation, .. } => generation,
            reports::Durability::NotDurable { reason, .. } => {
                return Err(CliError::refused(format!("{kre}: policy v{} is not durable: {reason}", body.version)))
            }
            reports::Durability::NotWaited => return Err(CliError::input("--durable-within 0: nothing to wait for")),
        };
        let member = att.as_ref().and_then(|a| members::member_of(&body.members, a)).ok_or_else(|| {
            CliError::refused(format!("{kre} gave a receipt, but its KRE is no member the bundle names"))
        })?;
        if let Some(other) = at.iter().find(|m| m.member == member.name) {
            return Err(CliError::refused(format!(
                "{kre} answered as member {}, as {} did: these addresses do not reach distinct members",
                member.name, other.kre
            )));
        }
        at.push(reports::MemberDurable { member: member.name.clone(), kre: kre.to_string(), generation });
    }
    let missing: Vec<&str> =
        body.members.iter().filter(|m| !at.iter().any(|d| d.member == m.name)).map(|m| m.name.as_str()).collect();
    if !missing.is_empty() {
        return Err(CliError::refused(format!(
            "policy v{} is durable at {}, but no receipt shows it at member(s) {}: give every member's --kre",
            body.version,
            at.iter().map(|m| m.member.as_str()).collect::<Vec<_>>().join(", "),
            missing.join(", ")
        )));
    }
    Ok(reports::ClusterDurability { version: body.version, members: at })
}

/// `policy restore`: replay the stored chain to a restarted KRE.
fn restore(a: RestoreArgs) -> Result<(), CliError> {
    let RestoreArgs { kre, store } = a;
    let pushed = restore_chain(&kre, &store, 0)?;
    crate::output::print(&reports::PolicyRestored { restored: pushed, store: store.to_string() })
}

/// A bundle store's failure as the user sees it: a fork is a refusal, the rest I/O.
pub(crate) fn stored_error(e: BundleStoreError) -> CliError {
    match e {
        e @ BundleStoreError::Fork { .. } => CliError::refused(e),
        e => CliError::io("the bundle store", e),
    }
}

/// Pushes every bundle kept in `store` (a directory or etcd) to the KRE on `kre`, in version order, skipping those
/// it already holds, and without asking the KRE those of version `after` or lower (the
/// daemon passes the KRE's policy head; `policy restore` 0); returns how many it accepted.
/// `policy restore` and the parent daemon's replay (`policy_store`) both run it.
pub(crate) fn restore_chain(kre: &Addr, store: &BundleStore, after: u64) -> Result<usize, CliError> {
    let mut kept = store.open().map_err(stored_error)?;
    let entries = kept.entries(after).map_err(stored_error)?;
    let mut pushed = 0;
    for f in &entries {
        let bytes = kept.read(f).map_err(stored_error)?;
        if after > 0 && bundle::decode_bundle(&bytes, crypto()).is_ok_and(|b| b.body.version <= after) {
            continue;
        }
        match push(kre, &bytes) {
            Ok(_) => pushed += 1,
            Err(KreError::Denied { code: DenyCode::PolicyRefused, .. }) if already_applied(kre, &bytes)? => {}
            Err(e) => return Err(CliError::refused(format!("{}: {}", kept.name(f), push_refused(e).message))),
        }
    }
    // The pipeline's newest timestamp, which a KRE whose policy names a timestamp key needs
    // before it releases (held in memory only, so lost at every restart).
    if policy_needs_timestamps(kre)? {
        timestamp::replay(kre, &mut kept)?;
    }
    Ok(pushed)
}

/// Whether the KRE's newest policy names a timestamp key (its status).
fn policy_needs_timestamps(kre: &Addr) -> Result<bool, CliError> {
    let (_, status) = super::status::report(kre, kre_client::DEFAULT_TIMEOUT)?;
    Ok(status["policy_timestamp_max_age_s"].as_u64().is_some())
}

/// Asks the KRE, in rounds of at most 5 s, until the committed sealed state carries bundle
/// `(version, digest)` or `args.durable_within` has passed; checks and keeps the receipt.
/// Returns it with the verified attestation of the KRE that gave it.
fn wait_durable(
    kre: &Addr,
    version: u64,
    digest: &[u8; 48],
    args: &DurableArgs,
    receipt_out: Option<&Path>,
) -> Result<(reports::Durability, Option<keygate_attestation::VerifiedAttestation>), CliError> {
    use keygate_enclave::audit::{PolicyReceipt, TrailOptions};
    use keygate_enclave::wire::MAX_DURABLE_WAIT_MS;
    if args.durable_within.is_zero() {
        return Ok((reports::Durability::NotWaited, None));
    }
    let verifier = keygate_attestation::Verifier::new(super::attestation::load_anchor(args.root.as_deref())?);
    let deadline = std::time::Instant::now() + args.durable_within;
    let mut last = String::from("no answer yet");
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(CliError::refused(format!(
                "policy v{version} was accepted and is in force, but it is not durable after {} s: {last}",
                args.durable_within.as_secs()
            )));
        }
        let wait_ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX).min(MAX_DURABLE_WAIT_MS);
        let ask = Message::PolicyDurableWait { version, digest: *digest, wait_ms };
        let round = std::time::Instant::now();
        let pause = || std::thread::sleep(Duration::from_millis(200).saturating_sub(round.elapsed()).min(left));
        match kre_client::ask(kre, &ask, Duration::from_millis(u64::from(wait_ms)) + Duration::from_secs(10)) {
            Ok(Message::PolicyDurable { receipt }) => {
                let r = PolicyReceipt::decode(&receipt).map_err(|e| {
                    CliError::refused(format!(
                        "the KRE's durability receipt is malformed ({e}): not a genuine KRE's answer"
                    ))
                })?;
                let options = TrailOptions { allow_debug: args.allow_debug_kre };
                let proof = r.verify(&verifier, &args.expect_kre_pcr, options, version, digest).map_err(|e| {
                    CliError::refused(format!(
                        "the KRE's durability receipt does not verify: {e}; not a genuine KRE's answer"
                    ))
                })?;
                if let Some(path) = receipt_out {
                    write_file(path, &receipt)?;
                }
                if args.expect_kre_pcr.is_empty() {
                    let m = "no --expect-kre-pcr given: the receipt proves a genuine KRE, not which image";
                    crate::output::warn(&format!("warning: {m}"), m);
                }
                let durable = reports::Durability::Durable {
                    version,
                    generation: proof.generation,
                    receipt: receipt_out.map(reports::path),
                    kre_module: proof.kre.module_id().to_string(),
                };
                return Ok((durable, Some(proof.kre)));
            }
            Err(KreError::Denied { code: DenyCode::StateRefused, reason }) => {
                let m = format!("not durable: {reason}");
                crate::output::warn(&format!("warning: {m}"), &m);
                return Ok((reports::Durability::NotDurable { version, reason }, None));
            }
            Err(KreError::Denied {
                code: code @ (DenyCode::PolicyNotDurable | DenyCode::Busy | DenyCode::Timeout),
                reason,
            }) => {
                last = format!("{code}: {reason}");
                // An older KRE, or a busy one, may answer at once: never a tight loop.
                pause();
            }
            Err(KreError::Denied { code, reason }) => {
                return Err(CliError::refused(format!("the KRE refused to report durability: {code}: {reason}")))
            }
            Ok(m) => return Err(kre_client::unexpected(&m)),
            Err(e) => {
                last = e.to_string();
                pause();
            }
        }
    }
}

/// Pushes a bundle; Ok((version, activates at ms)) when the KRE accepts it.
fn push(kre: &Addr, bytes: &[u8]) -> Result<(u64, u64), KreError> {
    match kre_client::ask(kre, &Message::PolicyPush { bundle: bytes.to_vec() }, kre_client::DEFAULT_TIMEOUT)? {
        Message::PolicyAccepted { version, activates_at_ms, .. } => Ok((version, activates_at_ms)),
        m => Err(KreError::Unexpected(m.name())),
    }
}

/// A failed push as the user sees it.
fn push_refused(e: KreError) -> CliError {
    match e {
        KreError::Denied { code, reason } => CliError::refused(format!("the KRE refused the bundle: {code}: {reason}")),
        e => e.into(),
    }
}

/// Whether the KRE already holds `bundle` or a later one: its policy head (from its status) is
/// this bundle, or newer. A refused push of such a bundle is a replay or a rollback, which a
/// restore skips; any other refusal is an error.
fn already_applied(kre: &Addr, bundle: &[u8]) -> Result<bool, CliError> {
    let Ok(b) = bundle::decode_bundle(bundle, crypto()) else { return Ok(false) };
    let (_, status) = super::status::report(kre, kre_client::DEFAULT_TIMEOUT)?;
    let head_version = status["policy_version"].as_u64();
    let head_digest = status["policy_digest"].as_str().and_then(|h| hex::decode(h).ok());
    Ok(match (head_version, head_digest) {
        (Some(v), Some(d)) => {
            b.body.version < v || (b.body.version == v && d.as_slice() == bundle::digest(&b.body_bytes).as_slice())
        }
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_added_by_instance_or_measurement_replaced_and_removed() {
        let mut list = Vec::new();
        let pcr4 = hex::encode(members::parent_instance_pcr4("i-b"));
        let add = ["b=i-b".to_owned(), "a=i-a,arn:aws:iam::1:role/kre".to_owned(), format!("c=4:{pcr4}")];
        // Two members with one PCR4 (the same parent instance) are refused.
        let e = apply_member_changes(&mut list.clone(), &add, &[]).expect_err("b and c share a PCR4");
        assert!(e.message.contains("members:"), "{}", e.message);
        apply_member_changes(&mut list, &add[..2], &[]).expect("add");
        assert_eq!(list.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["a", "b"], "sorted by name");
        assert_eq!(list[0].pcr3, Some(members::parent_role_pcr3("arn:aws:iam::1:role/kre")));
        assert_eq!(list[1].pcr4, members::parent_instance_pcr4("i-b"));
        // Replacing a member by name, then removing one.
        apply_member_changes(&mut list, &["b=i-b2".to_owned()], &["a".to_owned()]).expect("change");
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].pcr4, members::parent_instance_pcr4("i-b2"));
        let wrong_index = format!("x=4:{pcr4},9:00");
        for (bad, needle) in [
            ("noequals", "expected NAME="),
            ("x=", "instance id is empty"),
            ("x=4:zz", "PCR4"),
            ("x=4:00", "PCR4"),
            (wrong_index.as_str(), "expected 3:HEX"),
            ("bad name!=i-x", "members:"),
        ] {
            let e = apply_member_changes(&mut list.clone(), &[bad.to_owned()], &[]).expect_err(bad);
            assert!(e.message.contains(needle), "{bad}: {}", e.message);
        }
        let e = apply_member_changes(&mut list, &[], &["nobody".to_owned()]).expect_err("unknown");
        assert!(e.message.contains("no such member"), "{}", e.message);
    }

    fn policy(v: u32, r: u32) -> ReleasePolicy {
        let image = ImageRule {
            name: "cp".into(),
            pcrs: (0u8..3).map(|i| (i, vec![i; 48])).collect(),
            kind: DocumentKind::Enclave,
            not_after_ms: None,
            not_before_ms: None,
        };
        ReleasePolicy {
            clusters: BTreeMap::from([(
                "prod".to_owned(),
                ClusterRule { images: vec![image], kek_version: v, kek_retire_below: r },
            )]),
            allow_debug: false,
        }
    }

    #[test]
    fn rotate_and_retire_change_the_schedule_and_the_diff_shows_it() {
        let old = policy(1, 0);
        let mut new = old.clone();
        apply_kek_changes(&mut new, &["prod".into()], &[]).expect("rotate");
        assert_eq!((new.clusters["prod"].kek_version, new.clusters["prod"].kek_retire_below), (2, 0));
        assert_eq!(kek_diff(&old, &new), vec!["  ~ prod: KEK version 1 -> 2"]);
        let mut retired = new.clone();
        apply_kek_changes(&mut retired, &[], &["prod=2".into()]).expect("retire");
        assert_eq!(kek_diff(&new, &retired), vec!["  ~ prod: versions below 2 retired"]);
        assert_eq!(
            kek_line("prod", &retired.clusters["prod"]).as_deref(),
            Some("prod: KEK version 2, versions below 2 retired")
        );
        assert_eq!(kek_line("prod", &old.clusters["prod"]), None);
        let un = kek_diff(&retired, &new);
        assert_eq!(un.len(), 1);
        assert!(un[0].contains("no longer retired") && un[0].contains("activation delay"), "{un:?}");
        // Both in one proposal, and errors.
        let mut both = old.clone();
        apply_kek_changes(&mut both, &["prod".into()], &["prod=2".into()]).expect("rotate and retire");
        assert_eq!(kek_diff(&old, &both), vec!["  ~ prod: KEK version 1 -> 2", "  ~ prod: versions below 2 retired"]);
        let mut p = old.clone();
        assert!(apply_kek_changes(&mut p, &["stage".into()], &[]).is_err(), "unknown cluster");
        assert!(apply_kek_changes(&mut p, &[], &["prod=3".into()]).is_err(), "above the current version");
        assert!(apply_kek_changes(&mut p, &[], &["prod".into()]).is_err(), "no version");
        assert!(apply_kek_changes(&mut p, &[], &["prod=x".into()]).is_err(), "not a number");
        assert_eq!(p, old, "refused changes leave the policy as it was");
    }
}
