//! What each verb prints as its result: one serde struct per verb (its `--json` document) with
//! its text rendering, printed through `crate::output`. It decides only wording and field
//! names; the verbs fill the values. Nothing here holds key material: a key appears only as the
//! paths it was written to, or as a public key's fingerprint.

use std::fmt::Write as _;

use serde::Serialize;

use crate::output::Report;

/// A path as the user gave it.
pub(crate) fn path(p: &std::path::Path) -> String {
    p.display().to_string()
}

/// `keygen`: the key pair written (the private key only as its path).
#[derive(Serialize)]
pub(crate) struct Keygen {
    pub(crate) private_key: String,
    pub(crate) public_key: String,
    pub(crate) fingerprint: String,
}

impl Report for Keygen {
    fn text(&self) -> String {
        format!(
            "private key {} (0600), public key {}, fingerprint {}\n",
            self.private_key, self.public_key, self.fingerprint
        )
    }
}

/// `policy init`: the genesis bundle written.
#[derive(Serialize)]
pub(crate) struct PolicyInit {
    pub(crate) bundle: String,
    pub(crate) version: u64,
    pub(crate) threshold: u32,
    pub(crate) approvers: usize,
    pub(crate) digest: String,
}

impl Report for PolicyInit {
    fn text(&self) -> String {
        format!(
            "genesis bundle {} (version {}, {} of {} approvers, digest {})\n",
            self.bundle, self.version, self.threshold, self.approvers, self.digest
        )
    }
}

/// The changes from one bundle to the next, as `policy propose` and `policy sign` list them:
/// each line `+ …`, `- …` or `~ …` (indented by two spaces as text).
fn changes(lines: &[String]) -> Vec<String> {
    lines.iter().map(|l| l.strip_prefix("  ").unwrap_or(l).to_owned()).collect()
}

/// `policy propose`: the proposal written and what it changes.
#[derive(Serialize)]
pub(crate) struct PolicyProposal {
    pub(crate) proposal: String,
    pub(crate) version: u64,
    pub(crate) digest: String,
    pub(crate) changes: Vec<String>,
}

impl PolicyProposal {
    /// From the diff lines as `policy::diff` words them.
    pub(crate) fn new(proposal: String, version: u64, digest: String, diff: &[String]) -> Self {
        Self { proposal, version, digest, changes: changes(diff) }
    }
}

impl Report for PolicyProposal {
    fn text(&self) -> String {
        let mut s = format!("proposal {} (version {}, digest {}):\n", self.proposal, self.version, self.digest);
        for l in &self.changes {
            let _ = writeln!(s, "  {l}");
        }
        s
    }
}

/// `policy sign`: the signature written (what was signed was shown before the confirmation).
#[derive(Serialize)]
pub(crate) struct PolicySigned {
    pub(crate) signature: String,
    pub(crate) approver: String,
    pub(crate) version: u64,
    pub(crate) digest: String,
    /// The changes from `--current`, when given.
    pub(crate) changes: Option<Vec<String>>,
}

impl PolicySigned {
    /// `diff` as `policy::diff` words it, when `--current` was given.
    pub(crate) fn new(
        signature: String,
        approver: String,
        version: u64,
        digest: String,
        diff: Option<&[String]>,
    ) -> Self {
        Self { signature, approver, version, digest, changes: diff.map(changes) }
    }
}

impl Report for PolicySigned {
    fn text(&self) -> String {
        format!("signature {} by approver {}\n", self.signature, self.approver)
    }
}

/// `policy assemble`: the bundle written.
#[derive(Serialize)]
pub(crate) struct PolicyAssembled {
    pub(crate) bundle: String,
    pub(crate) signatures: usize,
    /// Of them, valid from the bundle's own approver set.
    pub(crate) valid: usize,
}

impl Report for PolicyAssembled {
    fn text(&self) -> String {
        format!(
            "bundle {} with {} signature(s) ({} valid from its own approver set)\n",
            self.bundle, self.signatures, self.valid
        )
    }
}

/// `policy verify`: a bundle checked alone (`current` absent) or as the KRE will.
#[derive(Serialize)]
pub(crate) struct PolicyVerified {
    pub(crate) version: u64,
    /// Whether it was checked against `--current` (as the KRE will) or alone.
    pub(crate) checked_against_current: bool,
    pub(crate) valid_signatures: usize,
    /// Alone: the bundle's own threshold.
    pub(crate) threshold: Option<u32>,
    /// Against `--current`: signatures by keys outside the current set, ignored.
    pub(crate) unknown_signatures: Option<usize>,
    pub(crate) duplicate_signatures: Option<usize>,
    pub(crate) invalid_signatures: Option<usize>,
    /// Against `--current`: whether it loosens (takes effect after the activation delay).
    pub(crate) loosens: Option<bool>,
}

impl Report for PolicyVerified {
    fn text(&self) -> String {
        if self.checked_against_current {
            format!(
                "valid: version {} follows the current bundle; {} approver signature(s) valid ({} unknown ignored, {} duplicate, {} invalid); {}\n",
                self.version,
                self.valid_signatures,
                self.unknown_signatures.unwrap_or(0),
                self.duplicate_signatures.unwrap_or(0),
                self.invalid_signatures.unwrap_or(0),
                if self.loosens == Some(true) {
                    "loosens: takes effect after the activation delay"
                } else {
                    "takes effect at once"
                }
            )
        } else {
            format!(
                "well-formed version {} bundle; {} valid signature(s) from its own approver set (threshold {}); pass --current to check it as the KRE will\n",
                self.version,
                self.valid_signatures,
                self.threshold.unwrap_or(0)
            )
        }
    }
}

/// Whether a pushed policy is durable (`policy push`, `policy durable`).
#[derive(Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub(crate) enum Durability {
    /// `--durable-within 0`.
    NotWaited,
    /// A verified receipt: the committed sealed state carries the policy.
    Durable { version: u64, generation: u64, receipt: Option<String>, kre_module: String },
    /// The KRE will not make it durable (it said why; a warning says so too).
    NotDurable { version: u64, reason: String },
}

impl Report for Durability {
    fn text(&self) -> String {
        match self {
            Durability::NotWaited => "not waiting for durability (--durable-within 0): the KRE applies the stricter of the old and new policies until the parent commits the sealed state that carries it\n".to_owned(),
            Durability::Durable { version, generation, receipt, kre_module } => format!(
                "durable: the sealed state committed as generation {generation} carries policy v{version} (receipt {}verified: KRE module {kre_module})\n",
                receipt.as_ref().map_or(String::new(), |p| format!("{p}, "))
            ),
            // Said on stderr as a warning.
            Durability::NotDurable { .. } => String::new(),
        }
    }
}

/// One member's verified durability receipt (`policy durable` with a `--kre` per member).
#[derive(Serialize)]
pub(crate) struct MemberDurable {
    /// The member the receipt's attestation shows.
    pub(crate) member: String,
    /// The address it was asked at.
    pub(crate) kre: String,
    /// The generation its committed state carries the policy in.
    pub(crate) generation: u64,
}

/// `policy durable` at every member of a cluster.
#[derive(Serialize)]
pub(crate) struct ClusterDurability {
    pub(crate) version: u64,
    pub(crate) members: Vec<MemberDurable>,
}

impl Report for ClusterDurability {
    fn text(&self) -> String {
        let each: Vec<String> =
            self.members.iter().map(|m| format!("{} (generation {}, at {})", m.member, m.generation, m.kre)).collect();
        format!("durable at every member: policy v{} at {}\n", self.version, each.join(", "))
    }
}

/// `policy push`: accepted, stored, synced, durable.
#[derive(Serialize)]
pub(crate) struct PolicyPushed {
    pub(crate) version: u64,
    /// Seconds until loosening changes take effect (0: in force now).
    pub(crate) activates_in_s: u64,
    /// Where the accepted bundle was kept (`--store`).
    pub(crate) stored: Option<String>,
    /// `--state-dir`: what the state sync stored.
    pub(crate) state_sync: Option<String>,
    pub(crate) durability: Durability,
}

impl PolicyPushed {
    /// The line printed as soon as the KRE accepts (text only; the JSON waits for the rest).
    pub(crate) fn accepted_text(version: u64, wait: u64) -> String {
        if wait > 0 {
            format!("accepted: version {version}; loosening changes take effect in {wait} s\n")
        } else {
            format!("accepted: version {version}; in force now\n")
        }
    }
}

impl Report for PolicyPushed {
    fn text(&self) -> String {
        // The earlier lines were printed as they happened (`output::step`).
        self.durability.text()
    }
}

/// `policy restore`: how many stored bundles the KRE took.
#[derive(Serialize)]
pub(crate) struct PolicyRestored {
    pub(crate) restored: usize,
    pub(crate) store: String,
}

impl Report for PolicyRestored {
    fn text(&self) -> String {
        format!("restored {} bundle(s) from {}\n", self.restored, self.store)
    }
}

/// `audit pull`: entries stored (one round of `--follow`, or the only one).
#[derive(Serialize)]
pub(crate) struct AuditStored {
    pub(crate) stored: usize,
    pub(crate) dir: String,
    pub(crate) last_seq: u64,
}

impl std::fmt::Display for AuditStored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.stored;
        write!(
            f,
            "stored {s} new audit entr{} in {} (last seq {})",
            if s == 1 { "y" } else { "ies" },
            self.dir,
            self.last_seq
        )
    }
}

impl Report for AuditStored {
    fn text(&self) -> String {
        format!("{self}\n")
    }
}

/// `state sync`: one round, as `custodian::sync_once` words it.
#[derive(Serialize)]
pub(crate) struct StateSynced {
    pub(crate) state_dir: String,
    pub(crate) result: String,
}

impl Report for StateSynced {
    fn text(&self) -> String {
        format!("{}\n", self.result)
    }
}

/// `custodian init`: the genesis sealed state stored and committed.
#[derive(Serialize)]
pub(crate) struct CustodianGenesis {
    pub(crate) generation: u64,
    pub(crate) state_dir: String,
    pub(crate) threshold: u8,
}

impl Report for CustodianGenesis {
    fn text(&self) -> String {
        format!(
            "genesis: generation {} stored in {} and committed; {}-of-N custodians hold the state key\n",
            self.generation, self.state_dir, self.threshold
        )
    }
}

/// `custodian unseal`: this custodian's share accepted (or a reshare approved).
#[derive(Serialize)]
pub(crate) struct CustodianUnsealed {
    pub(crate) share: u8,
    pub(crate) accepted: u8,
    pub(crate) needed: u8,
    /// Whether the KRE serves now (unsealed, or split the reshared key).
    pub(crate) serving: bool,
    pub(crate) generation: u64,
    /// The new custodian set's digest when this approved a reshare.
    pub(crate) reshared_to: Option<String>,
}

impl Report for CustodianUnsealed {
    fn text(&self) -> String {
        let (x, have, need, generation) = (self.share, self.accepted, self.needed, self.generation);
        match (&self.reshared_to, self.serving) {
            (Some(d), true) => format!("reshare approved (share {x}): {have} of {need}; the KRE split a new state key for set {d} (store it with `keygate state sync`)\n"),
            (Some(_), false) => format!("reshare approved (share {x}): {have} of {need}; waiting for more current custodians\n"),
            (None, true) => format!("share {x} accepted: {have} of {need}; the KRE has unsealed generation {generation} and serves\n"),
            (None, false) => format!("share {x} accepted: {have} of {need} for generation {generation}; waiting for more custodians\n"),
        }
    }
}

/// `custodian reshare`: the reshare requested, and what the current custodians run next.
#[derive(Serialize)]
pub(crate) struct CustodianReshare {
    pub(crate) threshold: u8,
    pub(crate) custodians: u8,
    pub(crate) set_digest: String,
    /// How many current custodians must approve.
    pub(crate) approvals_needed: u8,
    pub(crate) kre: String,
}

impl Report for CustodianReshare {
    fn text(&self) -> String {
        format!(
            "reshare to {} of {} custodians requested (set {}); {} current custodians must approve:\n  keygate custodian unseal --kre {} --key CUSTODIAN.pem --expect-kre-pcr ... --approve-reshare {}\nthen store it: keygate state sync --kre PARENT-CHANNEL --state-dir DIR; the KRE image for the new set is configured with --custodian for each new key\n",
            self.threshold, self.custodians, self.set_digest, self.approvals_needed, self.kre, self.set_digest
        )
    }
}

/// `fetch`: the keys written (as paths: the key bytes are only in the files) and the receipt.
#[derive(Serialize)]
pub(crate) struct Fetched {
    pub(crate) cluster: String,
    pub(crate) keys: Vec<FetchedKey>,
    pub(crate) receipt: FetchedReceipt,
}

/// One released key, by the file it was written to.
#[derive(Serialize)]
pub(crate) struct FetchedKey {
    pub(crate) key_id: String,
    pub(crate) version: u32,
    pub(crate) path: String,
}

/// The release's audit receipt, and where it was kept.
#[derive(Serialize)]
pub(crate) struct FetchedReceipt {
    pub(crate) chain_id: String,
    pub(crate) seq: u64,
    pub(crate) entry_digest: String,
    pub(crate) path: String,
}

impl Report for Fetched {
    fn text(&self) -> String {
        let mut s = String::new();
        for k in &self.keys {
            let _ = writeln!(s, "released {}/{} version {} -> {}", self.cluster, k.key_id, k.version, k.path);
        }
        let r = &self.receipt;
        let chain = r.chain_id.get(..16).unwrap_or(&r.chain_id);
        let _ = writeln!(s, "audit receipt: entry {} of chain {chain} -> {}", r.seq, r.path);
        s
    }
}

/// What a verb that only writes files (and prints nothing as text) prints under `--json`
/// (`attestation mock | mock-root`, which exist with the feature `mock`):
/// `{"wrote":[{"path":…,"bytes":…}]}`.
#[cfg(feature = "mock")]
#[derive(Debug, Serialize)]
pub(crate) struct Wrote {
    /// The files written, in order.
    pub(crate) wrote: Vec<WroteFile>,
}

/// One file a verb wrote.
#[cfg(feature = "mock")]
#[derive(Debug, Serialize)]
pub(crate) struct WroteFile {
    /// Its path, as given.
    pub(crate) path: String,
    /// Its length.
    pub(crate) bytes: usize,
}

#[cfg(feature = "mock")]
impl Wrote {
    /// One file of `bytes` bytes at `path`.
    pub(crate) fn one(path: &std::path::Path, bytes: usize) -> Self {
        Self { wrote: vec![WroteFile { path: path.display().to_string(), bytes }] }
    }
}

#[cfg(feature = "mock")]
impl Report for Wrote {
    fn text(&self) -> String {
        String::new()
    }
}

/// `eif verify`: a signed image whose signature checks.
#[derive(Serialize)]
pub(crate) struct EifVerified {
    pub(crate) eif: String,
    pub(crate) signature_valid: bool,
    pub(crate) pcr_signatures: usize,
}

impl Report for EifVerified {
    fn text(&self) -> String {
        let n = self.pcr_signatures;
        format!("{}: signature valid ({n} PCR signature{})\n", self.eif, if n == 1 { "" } else { "s" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::{render, Format};

    #[test]
    fn texts_keep_the_verbs_wording_and_json_names_the_same_facts() {
        let unsealed = |reshared_to: Option<&str>, serving| CustodianUnsealed {
            share: 2,
            accepted: 1,
            needed: 2,
            serving,
            generation: 7,
            reshared_to: reshared_to.map(str::to_owned),
        };
        assert_eq!(
            unsealed(None, false).text(),
            "share 2 accepted: 1 of 2 for generation 7; waiting for more custodians\n"
        );
        assert_eq!(
            unsealed(None, true).text(),
            "share 2 accepted: 1 of 2; the KRE has unsealed generation 7 and serves\n"
        );
        assert!(unsealed(Some("ab"), true).text().contains("new state key for set ab"));
        assert!(unsealed(Some("ab"), false).text().contains("waiting for more current custodians"));

        let d = Durability::Durable { version: 3, generation: 9, receipt: Some("r".into()), kre_module: "m".into() };
        assert_eq!(
            d.text(),
            "durable: the sealed state committed as generation 9 carries policy v3 (receipt r, verified: KRE module m)\n"
        );
        let j: serde_json::Value = serde_json::from_str(&render(&d, Format::Json).expect("json")).expect("one JSON");
        assert_eq!(
            j,
            serde_json::json!({"status": "durable", "version": 3, "generation": 9, "receipt": "r", "kre_module": "m"})
        );
        // Said as a warning on stderr, not as a result line.
        assert_eq!(Durability::NotDurable { version: 3, reason: "x".into() }.text(), "");

        let p = PolicyProposal::new(
            "p".into(),
            2,
            "dd".into(),
            &["  + prod: a".into(), "  ~ allow_debug: false -> true".into()],
        );
        assert_eq!(p.changes, ["+ prod: a", "~ allow_debug: false -> true"]);
        assert_eq!(p.text(), "proposal p (version 2, digest dd):\n  + prod: a\n  ~ allow_debug: false -> true\n");

        let f = Fetched {
            cluster: "prod".into(),
            keys: vec![FetchedKey { key_id: "k".into(), version: 1, path: "o/k.key".into() }],
            receipt: FetchedReceipt {
                chain_id: "ab".repeat(48),
                seq: 4,
                entry_digest: "cd".into(),
                path: "o/r".into(),
            },
        };
        assert_eq!(
            f.text(),
            format!(
                "released prod/k version 1 -> o/k.key\naudit receipt: entry 4 of chain {} -> o/r\n",
                "ab".repeat(8)
            )
        );
    }
}
