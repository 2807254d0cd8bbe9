//! `keygate policy timestamp` and the timestamp side of `policy init | propose | push |
//! restore`: the pipeline's online timestamp key and the short-lived statements it signs
//! (`keygate_attestation::freshness`, docs/policy.md "Freshness"). The pipeline signs a
//! timestamp for its newest bundle every fraction of the maximum age and pushes it like a
//! bundle; the parent keeps the newest beside the bundles so a restarted KRE gets it back.
//!
//! Decides nothing the KRE relies on: the KRE checks the key, the signature and the time. This
//! module signs, pushes, keeps and prints.

use std::path::PathBuf;
use std::time::Duration;

use keygate_attestation::bundle;
use keygate_attestation::freshness::{self, Freshness, Timestamp};
use keygate_enclave::net::transport::Addr;
use serde::Serialize;

use super::{load_bundle, load_private, load_public, push as push_kre, push_refused, read, stored_error};
use crate::cmd::args::{format_time_ms, parse_duration};
use crate::cmd::attestation::{now_ms, write_file};
use crate::error::CliError;
use crate::output::Report;
use crate::storage::bundles::{BundleStore, Bundles};

/// `--timestamp-key` and `--timestamp-max-age` of `policy init` and `policy propose`.
#[derive(Debug, clap::Args)]
pub(crate) struct FreshnessArgs {
    /// The pipeline's timestamp public key (PEM): the KRE then releases only while it holds a
    /// timestamp signed by it for its newest policy, younger than `--timestamp-max-age`.
    #[arg(long, value_name = "PUB.pem", requires = "timestamp_max_age")]
    timestamp_key: Option<PathBuf>,
    /// How long one timestamp lets releases go on (1s to 7d).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    timestamp_max_age: Option<Duration>,
    /// Stop requiring timestamps (a loosening; `policy propose` only).
    #[arg(long, conflicts_with_all = ["timestamp_key", "timestamp_max_age"], hide = true)]
    no_timestamp: bool,
}

impl FreshnessArgs {
    /// The freshness of the new body, from the current one's (`None` for a genesis).
    pub(crate) fn apply(&self, current: Option<Freshness>) -> Result<Option<Freshness>, CliError> {
        if self.no_timestamp {
            return Ok(None);
        }
        let key = match &self.timestamp_key {
            Some(p) => Some(load_public(p)?),
            None => None,
        };
        let max_age_s = match self.timestamp_max_age {
            Some(d) => {
                let s = d.as_secs();
                if !(freshness::MIN_MAX_AGE_S..=freshness::MAX_MAX_AGE_S).contains(&s) || d.subsec_nanos() != 0 {
                    return Err(CliError::input(format!("--timestamp-max-age {d:?}: whole seconds from 1s to 7d")));
                }
                Some(s)
            }
            None => None,
        };
        Ok(match (key, max_age_s, current) {
            (None, None, current) => current,
            (Some(key), Some(max_age_s), _) => Some(Freshness { key, max_age_s }),
            (None, Some(max_age_s), Some(c)) => Some(Freshness { max_age_s, ..c }),
            (None, Some(_), None) => {
                return Err(CliError::input("--timestamp-max-age needs --timestamp-key (the policy names none yet)"))
            }
            (Some(_), None, _) => return Err(CliError::input("--timestamp-key needs --timestamp-max-age")),
        })
    }

    /// Whether `--no-timestamp` was given.
    pub(crate) fn removes(&self) -> bool {
        self.no_timestamp
    }
}

/// The arguments of `policy timestamp`.
#[derive(Debug, clap::Args)]
pub(crate) struct TimestampArgs {
    /// The newest signed bundle (the one the timestamp vouches for).
    bundle: PathBuf,
    /// The pipeline's timestamp private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// Issue time: Unix seconds or RFC 3339 in UTC (default: now).
    #[arg(long, value_name = "TIME", value_parser = crate::cmd::args::parse_time)]
    issued_at: Option<u64>,
    /// Where the timestamp is written.
    #[arg(short = 'o', long)]
    out: PathBuf,
}

/// What `policy timestamp` prints.
#[derive(Serialize)]
pub(crate) struct TimestampSigned {
    out: String,
    version: u64,
    digest: String,
    issued_ms: u64,
    /// When the KRE stops counting it (when the bundle names the key).
    fresh_until_ms: Option<u64>,
}

impl Report for TimestampSigned {
    fn text(&self) -> String {
        let until = match self.fresh_until_ms {
            Some(t) => format!("; releases may go on until {}", format_time_ms(t)),
            None => "; warning: the bundle names no timestamp key, a KRE will refuse it".to_owned(),
        };
        format!(
            "wrote {}: timestamp for policy version {} issued {}{until}\n",
            self.out,
            self.version,
            format_time_ms(self.issued_ms)
        )
    }
}

/// `policy timestamp`: signs a timestamp for a bundle with the pipeline's timestamp key.
pub(crate) fn sign(a: TimestampArgs) -> Result<(), CliError> {
    use p384::ecdsa::signature::Signer;
    let b = load_bundle(&a.bundle)?;
    let sk = load_private(&a.key)?;
    let key: bundle::ApproverKey = sk
        .verifying_key()
        .to_encoded_point(false)
        .as_bytes()
        .try_into()
        .map_err(|_| CliError::input(format!("{}: not a P-384 key", a.key.display())))?;
    if let Some(f) = &b.body.freshness {
        if f.key != key {
            return Err(CliError::input(format!(
                "{} is not the timestamp key bundle version {} names",
                a.key.display(),
                b.body.version
            )));
        }
    }
    let issued_ms = a.issued_at.map_or_else(now_ms, |s| s.saturating_mul(1000));
    let digest = bundle::digest(&b.body_bytes);
    let sig: p384::ecdsa::Signature = sk.sign(&freshness::signing_message(b.body.version, &digest, issued_ms));
    let signature = sig.to_bytes()[..].try_into().map_err(|_| CliError::input("signature length"))?;
    let t = Timestamp { version: b.body.version, digest, issued_ms, key, signature };
    write_file(&a.out, &freshness::encode(&t))?;
    crate::output::print(&TimestampSigned {
        out: crate::cmd::reports::path(&a.out),
        version: t.version,
        digest: hex::encode(digest),
        issued_ms,
        fresh_until_ms: b.body.freshness.map(|f| issued_ms.saturating_add(f.max_age_s.saturating_mul(1000))),
    })
}

/// What `policy push` prints for a timestamp.
#[derive(Serialize)]
pub(crate) struct TimestampPushed {
    /// The version the KRE's held timestamp names after the push.
    version: u64,
    /// When that timestamp stops counting.
    fresh_until_ms: u64,
    /// Where it was kept (`--store`), when it was newer than the kept one.
    stored: Option<String>,
}

impl Report for TimestampPushed {
    fn text(&self) -> String {
        let kept = self.stored.as_ref().map(|s| format!("; kept in {s}")).unwrap_or_default();
        format!(
            "timestamp accepted: the KRE holds one for policy version {}, releases may go on until {}{kept}\n",
            self.version,
            format_time_ms(self.fresh_until_ms)
        )
    }
}

/// `policy push` of a timestamp file: push it, then keep it in `store` if it is newer than
/// the kept one.
pub(crate) fn push(path: &std::path::Path, kre: &Addr, store: Option<&BundleStore>) -> Result<(), CliError> {
    let bytes = read(path)?;
    freshness::decode(&bytes).map_err(|e| CliError::input(format!("{}: {e}", path.display())))?;
    // The KRE's answer names the version of the timestamp it holds afterwards and, as its
    // activation time, when that one stops counting.
    let (version, fresh_until_ms) = push_kre(kre, &bytes).map_err(push_refused)?;
    let mut stored = None;
    if let Some(s) = store {
        let mut kept = s.open().map_err(stored_error)?;
        if kept.keep_timestamp(&bytes).map_err(stored_error)? {
            stored = Some(kept.timestamp_name());
        }
    }
    crate::output::print(&TimestampPushed { version, fresh_until_ms, stored })
}

/// Pushes the kept timestamp to the KRE, if there is one; whether the KRE took it. A refusal
/// is the caller's error (a KRE whose policy names no timestamp key refuses every timestamp,
/// so the daemon calls this only for one whose status says it needs them).
pub(crate) fn replay(kre: &Addr, kept: &mut Bundles) -> Result<bool, CliError> {
    let Some(bytes) = kept.timestamp().map_err(stored_error)? else { return Ok(false) };
    push_kre(kre, &bytes)
        .map(|_| true)
        .map_err(|e| CliError::refused(format!("{}: {}", kept.timestamp_name(), push_refused(e).message)))
}
