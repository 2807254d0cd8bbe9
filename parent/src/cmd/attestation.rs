//! `keygate attestation verify | mock | mock-root`, and the small shared readers the other verbs
//! use (`load_anchor`, `pcrs_from_eif`, `now_ms`, `write_file`).
//!
//! Every verdict on a document is `keygate_attestation::Verifier`'s (against the pinned AWS
//! Nitro root, or a root the user names); this module reads files and prints the result.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
#[cfg(feature = "mock")]
use std::sync::Arc;
use std::time::Duration;

use keygate_attestation::crypto::{self, Crypto};
#[cfg(feature = "mock")]
use keygate_attestation::mock::{MockNsm, MockPki};
use keygate_attestation::{
    pcr, DocumentKind, PcrExpectation, TrustAnchor, UnknownFields, VerifiedAttestation, Verifier, VerifyOptions,
    VerifyTime,
};
#[cfg(feature = "mock")]
use keygate_attestation::{AttestRequest, Nsm};

use crate::error::CliError;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum AttestationCommand {
    /// Verify an attestation document (raw CBOR, base64 or hex; detected).
    Verify(VerifyArgs),
    /// Produce a mock attestation document signed by the mock PKI.
    #[cfg(feature = "mock")]
    Mock(MockArgs),
    /// Write the mock PKI's root certificate (PEM) for a seed.
    #[cfg(feature = "mock")]
    MockRoot(MockRootArgs),
}

#[derive(Debug, clap::Args)]
pub(crate) struct VerifyArgs {
    /// The document file.
    doc: PathBuf,
    /// Trust this root (PEM) instead of the built-in AWS Nitro Enclaves root.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Verify as of this time (Unix seconds or RFC 3339 in UTC) instead of now.
    #[arg(long, conflicts_with = "at_document_time", value_name = "TIME", value_parser = super::args::parse_time)]
    at: Option<u64>,
    /// Verify as of the document's own timestamp (archived documents).
    #[arg(long)]
    at_document_time: bool,
    /// Accept debug-mode documents (PCR0, PCR1, PCR2 all zero).
    #[arg(long)]
    allow_debug: bool,
    /// Require PCR N to equal HEX (repeatable).
    #[arg(long = "expect-pcr", value_name = "N=HEX")]
    expect_pcr: Vec<PcrExpectation>,
    /// Require this document kind.
    #[arg(long, value_parser = parse_kind)]
    require_kind: Option<DocumentKind>,
    /// Maximum document age (a duration, e.g. 300, 5m or 90s).
    #[arg(long, default_value = "5m", value_parser = super::args::parse_duration, value_name = "DURATION")]
    max_age: Duration,
    /// Allowed clock skew (a duration, e.g. 30s or 500ms).
    #[arg(long, default_value = "30s", value_parser = super::args::parse_duration, value_name = "DURATION")]
    clock_skew: Duration,
    /// Accept payload fields the AWS spec does not define, and report them.
    #[arg(long)]
    tolerate_unknown_fields: bool,
    /// Crypto backend: aws-lc-rs or rustcrypto.
    #[arg(long, default_value = "default")]
    backend: String,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[cfg(feature = "mock")]
#[derive(Debug, clap::Args)]
pub(crate) struct MockArgs {
    /// Seed of the mock PKI (any string).
    #[arg(long)]
    seed: String,
    /// PCR values (repeatable); unset PCRs are zero.
    #[arg(long = "pcr", value_name = "N=HEX")]
    pcr: Vec<PcrExpectation>,
    /// Take PCR0/1/2 (and PCR8 if signed) from this enclave image, as an enclave booted from
    /// it would report them. `--pcr` values override.
    #[arg(long, value_name = "FILE.eif")]
    pcrs_from: Option<PathBuf>,
    /// `nonce`, hex.
    #[arg(long, value_parser = parse_hex)]
    nonce: Option<Bytes>,
    /// `user_data`, hex.
    #[arg(long, value_parser = parse_hex)]
    user_data: Option<Bytes>,
    /// `public_key`, hex.
    #[arg(long, value_parser = parse_hex)]
    public_key: Option<Bytes>,
    /// Document time, Unix seconds or RFC 3339 in UTC (default: now).
    #[arg(long, value_name = "TIME", value_parser = super::args::parse_time)]
    at: Option<u64>,
    /// Document kind.
    #[arg(long, value_parser = parse_kind, default_value = "enclave")]
    kind: DocumentKind,
    /// Output file.
    #[arg(short = 'o', long)]
    out: PathBuf,
}

#[cfg(feature = "mock")]
#[derive(Debug, clap::Args)]
pub(crate) struct MockRootArgs {
    /// Seed of the mock PKI.
    #[arg(long)]
    seed: String,
    /// Output file (PEM).
    #[arg(short = 'o', long)]
    out: PathBuf,
}

/// Bytes parsed from hex on the command line.
#[cfg(feature = "mock")]
#[derive(Debug, Clone)]
pub(crate) struct Bytes(pub(crate) Vec<u8>);

/// A command-line value that is not hex.
#[cfg(feature = "mock")]
#[derive(Debug, thiserror::Error)]
#[error("not hex: {0}")]
pub(crate) struct NotHex(#[from] hex::FromHexError);

#[cfg(feature = "mock")]
pub(crate) fn parse_hex(s: &str) -> Result<Bytes, NotHex> {
    Ok(Bytes(hex::decode(s.trim())?))
}

/// A `--kind` that names no document kind.
#[derive(Debug, thiserror::Error)]
#[error("expected `enclave` or `nitrotpm`")]
pub(crate) struct UnknownKind;

pub(crate) fn parse_kind(s: &str) -> Result<DocumentKind, UnknownKind> {
    match s {
        "enclave" => Ok(DocumentKind::Enclave),
        "nitrotpm" => Ok(DocumentKind::NitroTpm),
        _ => Err(UnknownKind),
    }
}

pub(crate) fn run(cmd: AttestationCommand) -> Result<(), CliError> {
    match cmd {
        AttestationCommand::Verify(a) => verify(a),
        #[cfg(feature = "mock")]
        AttestationCommand::Mock(a) => mock(a),
        #[cfg(feature = "mock")]
        AttestationCommand::MockRoot(a) => {
            let pem = MockPki::from_seed(a.seed.as_bytes(), now_ms()).root_pem();
            write_file(&a.out, pem.as_bytes())?;
            crate::output::print(&super::reports::Wrote::one(&a.out, pem.len()))
        }
    }
}

pub(crate) use keygate_enclave::net::server::now_ms;

/// Reads a trust anchor: the given PEM file, or the built-in AWS root.
pub(crate) fn load_anchor(root: Option<&Path>) -> Result<TrustAnchor, CliError> {
    match root {
        Some(p) => {
            let pem = std::fs::read(p).map_err(|e| CliError::io(format!("reading root {}", p.display()), e))?;
            TrustAnchor::from_pem(&pem).map_err(|e| CliError::input(format!("root {}: {e}", p.display())))
        }
        None => TrustAnchor::aws_nitro().map_err(|e| CliError::input(e.to_string())),
    }
}

/// Largest document file read (the verifier refuses anything over 20 KiB anyway; text
/// encodings are up to twice as long).
const MAX_DOC_FILE: u64 = 64 * 1024;

/// Reads a document given as raw CBOR, base64 or hex.
pub(crate) fn read_document(path: &Path) -> Result<Vec<u8>, CliError> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| CliError::io(format!("reading {}", path.display()), e))?;
    let mut raw = Vec::new();
    f.take(MAX_DOC_FILE + 1)
        .read_to_end(&mut raw)
        .map_err(|e| CliError::io(format!("reading {}", path.display()), e))?;
    if u64::try_from(raw.len()).unwrap_or(u64::MAX) > MAX_DOC_FILE {
        return Err(CliError::input(format!("{}: larger than {MAX_DOC_FILE} bytes", path.display())));
    }
    decode_document(&raw).ok_or_else(|| CliError::input(format!("{}: neither CBOR, hex nor base64", path.display())))
}

/// Detects the encoding: CBOR starts with an array (0x84) or tag 18 (0xd2); text is hex if
/// every character is a hex digit, base64 otherwise.
pub(crate) fn decode_document(raw: &[u8]) -> Option<Vec<u8>> {
    use base64::Engine as _;
    if matches!(raw.first(), Some(0x84 | 0xd2)) {
        return Some(raw.to_vec());
    }
    let text: String = std::str::from_utf8(raw).ok()?.chars().filter(|c| !c.is_whitespace()).collect();
    if text.is_empty() {
        return None;
    }
    if text.chars().all(|c| c.is_ascii_hexdigit()) {
        if let Ok(b) = hex::decode(&text) {
            return Some(b);
        }
    }
    let engines = [
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::STANDARD_NO_PAD,
        base64::engine::general_purpose::URL_SAFE,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    engines.iter().find_map(|e| e.decode(&text).ok())
}

fn backend(name: &str) -> Result<&'static dyn Crypto, CliError> {
    if name == "default" {
        return Ok(crypto::default_backend());
    }
    crypto::all_backends()
        .into_iter()
        .find(|b| b.name() == name)
        .ok_or_else(|| CliError::input(format!("unknown backend `{name}` (aws-lc-rs, rustcrypto)")))
}

fn verify(a: VerifyArgs) -> Result<(), CliError> {
    let doc = read_document(&a.doc)?;
    let verifier = Verifier::with_crypto(load_anchor(a.root.as_deref())?, backend(&a.backend)?);
    let time = if a.at_document_time {
        VerifyTime::DocumentTime
    } else {
        VerifyTime::Now(a.at.map_or_else(now_ms, |s| s.saturating_mul(1000)))
    };
    let opts = VerifyOptions {
        time,
        max_age: a.max_age,
        clock_skew: a.clock_skew,
        allow_debug: a.allow_debug,
        unknown_fields: if a.tolerate_unknown_fields {
            UnknownFields::TolerateAndReport
        } else {
            UnknownFields::Refuse
        },
        require_kind: a.require_kind,
        use_cache: false,
    };
    let att = verifier.verify(&doc, &opts).map_err(|e| CliError::refused(format!("attestation refused: {e}")))?;
    pcr::check(&att, &a.expect_pcr).map_err(|e| CliError::refused(format!("attestation refused: {e}")))?;
    for f in att.unknown_fields() {
        tracing::warn!(field = %f, "document carries a field the AWS specification does not define (tolerated)");
    }
    // `--json` here and the global `--json` are one flag (clap hands it to both).
    let text = if a.json { format!("{}\n", summary_json(&att)) } else { summary_text(&att) };
    crate::output::print(&crate::output::Shown { json: summary_json(&att), text })
}

pub(crate) fn summary_json(att: &VerifiedAttestation) -> serde_json::Value {
    let hex_opt = |v: Option<&[u8]>| v.map(hex::encode);
    let pcrs: BTreeMap<String, String> = att.pcrs().iter().map(|(i, v)| (i.to_string(), hex::encode(v))).collect();
    let (nb, na) = att.leaf_validity();
    serde_json::json!({
        "valid": true,
        "kind": att.kind().as_str(),
        "module_id": att.module_id(),
        "timestamp": att.timestamp_ms(),
        "digest": att.digest(),
        "debug": att.is_debug(),
        "pcrs": pcrs,
        "public_key": hex_opt(att.public_key()),
        "user_data": hex_opt(att.user_data()),
        "nonce": hex_opt(att.nonce()),
        "certificate": { "not_before": nb, "not_after": na, "chain_not_after": att.chain_not_after() },
        "root_sha256": hex::encode(att.root_sha256()),
        "document_sha384": hex::encode(att.document_sha384()),
        "unknown_fields": att.unknown_fields(),
    })
}

fn summary_text(att: &VerifiedAttestation) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let (nb, na) = att.leaf_validity();
    let _ =
        writeln!(s, "valid {} attestation document{}", att.kind(), if att.is_debug() { " (DEBUG MODE)" } else { "" });
    let _ = writeln!(s, "  module_id   {}", att.module_id());
    let _ = writeln!(s, "  timestamp   {}", super::args::format_time_ms(att.timestamp_ms()));
    let _ = writeln!(s, "  digest      {}", att.digest());
    let t = super::args::format_time_s;
    let _ = writeln!(s, "  leaf valid  {} .. {}; chain valid until {}", t(nb), t(na), t(att.chain_not_after()));
    let _ = writeln!(s, "  root        sha256 {}", hex::encode(att.root_sha256()));
    for (i, v) in att.pcrs() {
        if v.iter().any(|&b| b != 0) {
            let _ = writeln!(s, "  PCR{i:<2}       {}", hex::encode(v));
        }
    }
    let zero = att.pcrs().values().filter(|v| v.iter().all(|&b| b == 0)).count();
    let _ = writeln!(s, "  ({zero} other PCRs are zero)");
    for (name, v) in [("public_key", att.public_key()), ("user_data", att.user_data()), ("nonce", att.nonce())] {
        let _ = writeln!(s, "  {name:<11} {}", v.map_or_else(|| "null".to_owned(), hex::encode));
    }
    for f in att.unknown_fields() {
        let _ = writeln!(s, "  unknown field tolerated: {f}");
    }
    s
}

#[cfg(feature = "mock")]
fn mock(a: MockArgs) -> Result<(), CliError> {
    let at_ms = a.at.map_or_else(now_ms, |s| s.saturating_mul(1000));
    let mut pcrs = match &a.pcrs_from {
        Some(p) => pcrs_from_eif(p)?,
        None => BTreeMap::new(),
    };
    pcrs.extend(a.pcr.into_iter().map(|e| (e.index, e.value)));
    let nsm = MockNsm::with_kind(a.seed.as_bytes(), a.kind, pcrs, Arc::new(move || at_ms));
    let req = AttestRequest {
        user_data: a.user_data.map(|b| b.0),
        nonce: a.nonce.map(|b| b.0),
        public_key: a.public_key.map(|b| b.0),
    };
    let doc = nsm.attest(&req).map_err(|e| CliError::input(e.to_string()))?;
    write_file(&a.out, &doc)?;
    crate::output::print(&super::reports::Wrote::one(&a.out, doc.len()))
}

/// The PCRs an enclave booted from the image at `path` reports (PCR0/1/2, and PCR8 when
/// the image is signed).
pub(crate) fn pcrs_from_eif(path: &Path) -> Result<BTreeMap<u8, Vec<u8>>, CliError> {
    let m = keygate_eif::measure_file(path).map_err(|e| CliError::input(format!("{}: {e}", path.display())))?;
    let mut pcrs = BTreeMap::from([(0u8, m.pcr0.to_vec()), (1, m.pcr1.to_vec()), (2, m.pcr2.to_vec())]);
    if let Some(p8) = m.pcr8 {
        pcrs.insert(8, p8.to_vec());
    }
    Ok(pcrs)
}

/// Writes a file atomically ([`keygate_enclave::atomic`]: a temporary file beside it, fsync,
/// rename, directory fsync; on a failure the previous file is untouched and nothing is left).
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<(), CliError> {
    Ok(keygate_enclave::atomic::write_file(path, bytes)?)
}
