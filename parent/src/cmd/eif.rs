//! `keygate eif ...`: build, describe, measure and verify Enclave Image Format files.
//!
//! A thin adapter: it reads files and the environment (`SOURCE_DATE_EPOCH`, the
//! clock for certificate validity) and prints results; every format rule, measurement
//! and signature check lives in `keygate-eif`.

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};

use keygate_eif::{
    Arch, BuildInfo, BuildTime, EifBuilder, EifError, EifImage, Input, Measurements, Metadata, Signer, HASH_ALGORITHM,
};
use serde_json::{json, Map, Value};

use crate::error::CliError;

/// Largest PEM file (certificate or key) read.
const MAX_PEM_FILE: u64 = 1024 * 1024;
/// Bytes of the kernel config read (only its third line is used).
const MAX_CONFIG_PREFIX: u64 = 64 * 1024;

/// `keygate eif` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum EifCommand {
    /// Build an EIF, reproducibly, byte-compatible with AWS's eif_build (`--json`: nitro-cli's
    /// `{"Measurements": …}` shape plus a `Keygate` object).
    Build(Box<BuildArgs>),
    /// Show an EIF's sections, metadata, signature status and PCRs (`--json`: nitro-cli's
    /// describe-eif fields plus a `Keygate` object).
    Describe(DescribeArgs),
    /// Verify a signed EIF's signature (exit 1 if unsigned or invalid).
    Verify(VerifyArgs),
    /// PCR8 for a signing certificate, as `nitro-cli pcr --signing-certificate`.
    Pcr8(Pcr8Args),
}

/// Arguments of `keygate eif build`.
#[derive(Debug, clap::Args)]
pub(crate) struct BuildArgs {
    /// Kernel image (bzImage / Image).
    #[arg(long, value_name = "FILE")]
    kernel: PathBuf,
    /// Kernel .config; its third line gives the OS and kernel version in the metadata.
    #[arg(long, value_name = "FILE")]
    kernel_config: PathBuf,
    /// Kernel command line.
    #[arg(long, value_name = "STR")]
    cmdline: String,
    /// Ramdisk: a cpio.gz file, or a directory turned into one deterministically.
    /// Repeat for more; the first is measured into PCR1, the others into PCR2.
    #[arg(long = "ramdisk", value_name = "FILE|DIR", required = true)]
    ramdisks: Vec<PathBuf>,
    /// PEM certificate to sign the image with (P-384); needs --private-key.
    #[arg(long, value_name = "PEM", requires = "private_key")]
    signing_certificate: Option<PathBuf>,
    /// PEM private key (P-384, SEC1 or PKCS#8) of the signing certificate.
    #[arg(long, value_name = "PEM", requires = "signing_certificate")]
    private_key: Option<PathBuf>,
    /// Build time written to the metadata (RFC 3339). Default: SOURCE_DATE_EPOCH if
    /// set, else 1970-01-01T00:00:00+00:00 — never the clock, so builds reproduce.
    #[arg(long, value_name = "RFC3339")]
    build_time: Option<String>,
    /// Output file (written atomically).
    #[arg(short = 'o', long = "output", value_name = "OUT.eif")]
    output: PathBuf,
    /// Target architecture flag.
    #[arg(long, default_value = "x86_64", value_parser = ["x86_64", "aarch64"])]
    arch: String,
    /// Image name in the metadata (default: the kernel's file name, as eif_build).
    #[arg(long)]
    image_name: Option<String>,
    /// Image version in the metadata.
    #[arg(long, default_value = "1.0")]
    image_version: String,
    /// Build tool name in the metadata.
    #[arg(long, default_value = "keygate")]
    build_tool: String,
    /// Build tool version in the metadata (default: this keygate's version).
    #[arg(long)]
    build_tool_version: Option<String>,
}

/// Arguments of `keygate eif describe`.
#[derive(Debug, clap::Args)]
pub(crate) struct DescribeArgs {
    /// The EIF.
    #[arg(value_name = "FILE.eif")]
    eif: PathBuf,
}

/// Arguments of `keygate eif verify`.
#[derive(Debug, clap::Args)]
pub(crate) struct VerifyArgs {
    /// The EIF.
    #[arg(value_name = "FILE.eif")]
    eif: PathBuf,
}

/// Arguments of `keygate eif pcr8`.
#[derive(Debug, clap::Args)]
pub(crate) struct Pcr8Args {
    /// PEM signing certificate.
    #[arg(long, value_name = "PEM")]
    signing_certificate: PathBuf,
}

pub(crate) fn run(cmd: EifCommand) -> Result<(), CliError> {
    match cmd {
        EifCommand::Build(args) => build(*args),
        EifCommand::Describe(args) => describe(&args),
        EifCommand::Verify(args) => verify(&args),
        EifCommand::Pcr8(args) => pcr8(&args),
    }
}

/// Map a library error to the CLI's exit codes: I/O 3, anything else bad input 2.
fn eif_error(context: &str, e: EifError) -> CliError {
    match e {
        EifError::Io { .. } => CliError::io(context, e),
        other => CliError::input(format!("{context}: {other}")),
    }
}

fn read_capped(path: &Path, cap: u64, what: &str) -> Result<Vec<u8>, CliError> {
    let file = std::fs::File::open(path).map_err(|e| CliError::io(format!("opening {what} {}", path.display()), e))?;
    let mut buf = Vec::new();
    file.take(cap.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(|e| CliError::io(format!("reading {what} {}", path.display()), e))?;
    if u64::try_from(buf.len()).unwrap_or(u64::MAX) > cap {
        return Err(CliError::input(format!("{what} {} is larger than {cap} bytes", path.display())));
    }
    Ok(buf)
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn build_time(arg: Option<&str>) -> Result<BuildTime, CliError> {
    let parsed = match (arg, std::env::var("SOURCE_DATE_EPOCH")) {
        (Some(t), _) => BuildTime::from_rfc3339(t),
        (None, Ok(epoch)) if !epoch.is_empty() => BuildTime::from_source_date_epoch(&epoch),
        (None, _) => Ok(BuildTime::default()),
    };
    parsed.map_err(|e| CliError::input(e.to_string()))
}

fn build(args: BuildArgs) -> Result<(), CliError> {
    let time = build_time(args.build_time.as_deref())?;
    let config = read_capped_prefix(&args.kernel_config)?;
    let (operating_system, kernel_version) = keygate_eif::os_and_kernel_from_config(&config)
        .map_err(|e| eif_error(&format!("{}", args.kernel_config.display()), e))?;
    let image_name = match args.image_name {
        Some(n) => n,
        None => args
            .kernel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| CliError::input("--kernel has no file name"))?,
    };
    let metadata = Metadata {
        image_name,
        image_version: args.image_version,
        build: BuildInfo {
            build_time: time.to_rfc3339(),
            build_tool: args.build_tool,
            build_tool_version: args.build_tool_version.unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned()),
            operating_system,
            kernel_version,
        },
        docker_info: Value::Null,
        custom: Value::Null,
    };

    let mut builder = EifBuilder::new(Input::File(args.kernel.clone()), &args.cmdline, metadata)
        .map_err(|e| eif_error("building", e))?;
    for path in &args.ramdisks {
        let meta =
            std::fs::metadata(path).map_err(|e| CliError::io(format!("reading ramdisk {}", path.display()), e))?;
        let input = if meta.is_dir() {
            Input::Bytes(
                keygate_eif::ramdisk_from_dir(path)
                    .map_err(|e| eif_error(&format!("ramdisk {}", path.display()), e))?,
            )
        } else {
            Input::File(path.clone())
        };
        builder.add_ramdisk(input).map_err(|e| eif_error("building", e))?;
    }
    if args.arch == "aarch64" {
        builder.set_arch(Arch::Aarch64);
    }
    if let (Some(cert), Some(key)) = (&args.signing_certificate, &args.private_key) {
        let cert_pem = read_capped(cert, MAX_PEM_FILE, "signing certificate")?;
        let mut key_pem = read_capped(key, MAX_PEM_FILE, "private key")?;
        let signer = Signer::from_pem(cert_pem, &key_pem);
        zeroize::Zeroize::zeroize(&mut key_pem);
        builder.sign_with(signer.map_err(|e| eif_error("signing", e))?);
    }

    // Written as it is made, atomically: a full disk leaves the previous image and no part.
    let out = keygate_enclave::atomic::write_file_streamed(&args.output, Default::default(), |f| {
        builder.write(f).map_err(|e| eif_error(&format!("writing {}", args.output.display()), e))
    })?;

    let json = {
        let mut v = json!({ "Measurements": measurements_json(&out.measurements) });
        if let Some(obj) = v.as_object_mut() {
            obj.insert(
                "Keygate".to_owned(),
                json!({
                    "Output": args.output.display().to_string(),
                    "FileSize": out.file_len,
                    "Crc32": format!("{:08x}", out.crc32),
                    "BuildTime": time.to_rfc3339(),
                }),
            );
        }
        v
    };
    let text = format!(
        "Output file: {}\nSize: {} bytes, CRC32 {:08x}\n{}",
        args.output.display(),
        out.file_len,
        out.crc32,
        measurements_text(&out.measurements)
    );
    crate::output::print(&crate::output::Shown { json, text })
}

fn read_capped_prefix(path: &Path) -> Result<Vec<u8>, CliError> {
    let file =
        std::fs::File::open(path).map_err(|e| CliError::io(format!("opening kernel config {}", path.display()), e))?;
    let mut buf = Vec::new();
    file.take(MAX_CONFIG_PREFIX)
        .read_to_end(&mut buf)
        .map_err(|e| CliError::io(format!("reading kernel config {}", path.display()), e))?;
    Ok(buf)
}

/// nitro-cli's measurement map: HashAlgorithm, PCR0, PCR1, PCR2 and (signed) PCR8.
fn measurements_json(m: &Measurements) -> Value {
    let mut map = Map::new();
    map.insert("HashAlgorithm".to_owned(), json!(HASH_ALGORITHM));
    map.insert("PCR0".to_owned(), json!(hex::encode(m.pcr0)));
    map.insert("PCR1".to_owned(), json!(hex::encode(m.pcr1)));
    map.insert("PCR2".to_owned(), json!(hex::encode(m.pcr2)));
    if let Some(pcr8) = m.pcr8 {
        map.insert("PCR8".to_owned(), json!(hex::encode(pcr8)));
    }
    Value::Object(map)
}

fn measurements_text(m: &Measurements) -> String {
    let mut t =
        format!("PCR0: {}\nPCR1: {}\nPCR2: {}\n", hex::encode(m.pcr0), hex::encode(m.pcr1), hex::encode(m.pcr2));
    if let Some(pcr8) = m.pcr8 {
        t += &format!("PCR8: {}\n", hex::encode(pcr8));
    }
    t
}

/// A JSON result: pretty as text (nitro-cli's look), one line under the global `--json` (the
/// verbs' own `--json` is the same flag).
fn print_json(v: &Value) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string()) + "\n";
    crate::output::print(&crate::output::Shown { json: v, text })
}

fn rfc3339(unix: i64) -> String {
    BuildTime::from_unix_seconds(unix).map(|t| t.to_rfc3339()).unwrap_or_else(|_| unix.to_string())
}

/// Signature status: (nitro-cli's SignatureCheck — the signature verifies over the
/// image's PCR0 — and keygate's full verdict, which also checks validity at `now`).
fn signature_status(image: &EifImage, now: i64) -> (bool, Result<(), EifError>) {
    match image.verify_signature(now) {
        Ok(_) => (true, Ok(())),
        Err(e @ EifError::CertificateNotValidNow { .. }) => (true, Err(e)),
        Err(e) => (false, Err(e)),
    }
}

fn describe(args: &DescribeArgs) -> Result<(), CliError> {
    let image = keygate_eif::read_file(&args.eif).map_err(|e| eif_error(&format!("{}", args.eif.display()), e))?;
    let now = now_unix();
    let m = image.measurements();
    let status = image.is_signed().then(|| signature_status(&image, now));

    let json = {
        let mut top = Map::new();
        top.insert("EifVersion".to_owned(), json!(image.version()));
        top.insert("Measurements".to_owned(), measurements_json(m));
        top.insert("IsSigned".to_owned(), json!(image.is_signed()));
        // The reader rejects a file whose CRC does not match.
        top.insert("CheckCRC".to_owned(), json!(true));
        if let Some((check, _)) = &status {
            top.insert("SignatureCheck".to_owned(), json!(check));
        }
        if let Some(md) = image.metadata() {
            top.insert("ImageName".to_owned(), json!(md.image_name));
            top.insert("ImageVersion".to_owned(), json!(md.image_version));
            let mut meta = Map::new();
            meta.insert("BuildTime".to_owned(), json!(md.build.build_time));
            meta.insert("BuildTool".to_owned(), json!(md.build.build_tool));
            meta.insert("BuildToolVersion".to_owned(), json!(md.build.build_tool_version));
            meta.insert("OperatingSystem".to_owned(), json!(md.build.operating_system));
            meta.insert("KernelVersion".to_owned(), json!(md.build.kernel_version));
            meta.insert("DockerInfo".to_owned(), md.docker_info.clone());
            if let Value::Object(custom) = &md.custom {
                for (k, v) in custom {
                    meta.insert(k.clone(), v.clone());
                }
            }
            top.insert("Metadata".to_owned(), Value::Object(meta));
        }
        let sections: Vec<Value> = image
            .sections()
            .iter()
            .enumerate()
            .map(|(i, s)| json!({"Index": i, "Type": s.kind.name(), "Offset": s.offset, "Size": s.size}))
            .collect();
        let mut keygate = json!({
            "Arch": image.arch().name(),
            "DefaultMemory": image.default_mem(),
            "DefaultCpus": image.default_cpus(),
            "Crc32": format!("{:08x}", image.crc32()),
            "FileSize": image.file_len(),
            "Cmdline": String::from_utf8_lossy(image.cmdline()),
            "Sections": sections,
        });
        if let (Some(obj), Some(sig)) = (keygate.as_object_mut(), image.signatures().first()) {
            let cert = sig.certificate();
            let verdict = match &status {
                Some((_, Ok(()))) => "valid".to_owned(),
                Some((_, Err(e))) => format!("invalid: {e}"),
                None => "unsigned".to_owned(),
            };
            obj.insert(
                "Signature".to_owned(),
                json!({
                    "Status": verdict,
                    "SignedPcr": sig.register_index(),
                    "Subject": cert.subject(),
                    "Issuer": cert.issuer(),
                    "NotBefore": rfc3339(cert.not_before()),
                    "NotAfter": rfc3339(cert.not_after()),
                    "Count": image.signatures().len(),
                }),
            );
        }
        top.insert("Keygate".to_owned(), keygate);
        Value::Object(top)
    };
    let mut t = String::new();

    let _ = writeln!(t, "EIF version {}, {}", image.version(), image.arch().name());
    let _ = writeln!(
        t,
        "Size {} bytes, CRC32 {:08x} (ok), default memory {} MiB, {} vCPUs",
        image.file_len(),
        image.crc32(),
        image.default_mem() / (1024 * 1024),
        image.default_cpus()
    );
    let _ = writeln!(t, "Sections:");
    for (i, s) in image.sections().iter().enumerate() {
        let _ = writeln!(t, "  {i:>2} {:<9} offset {:>10} size {:>10}", s.kind.name(), s.offset, s.size);
    }
    let _ = writeln!(t, "Cmdline: {}", String::from_utf8_lossy(image.cmdline()));
    if let Some(md) = image.metadata() {
        let _ = writeln!(
            t,
            "Image {} {}, built {} by {} {} ({} {})",
            md.image_name,
            md.image_version,
            md.build.build_time,
            md.build.build_tool,
            md.build.build_tool_version,
            md.build.operating_system,
            md.build.kernel_version
        );
    }
    match (&status, image.signatures().first()) {
        (Some((_, verdict)), Some(sig)) => {
            let cert = sig.certificate();
            match verdict {
                Ok(()) => {
                    let _ = writeln!(t, "Signature: valid");
                }
                Err(e) => {
                    let _ = writeln!(t, "Signature: INVALID ({e})");
                }
            }
            let _ = writeln!(
                t,
                "  certificate {} (issuer {}), valid {} to {}",
                cert.subject(),
                cert.issuer(),
                rfc3339(cert.not_before()),
                rfc3339(cert.not_after())
            );
        }
        _ => {
            let _ = writeln!(t, "Signature: none (unsigned image)");
        }
    }
    t += &measurements_text(m);
    crate::output::print(&crate::output::Shown { json, text: t })
}

fn verify(args: &VerifyArgs) -> Result<(), CliError> {
    let image = keygate_eif::read_file(&args.eif).map_err(|e| eif_error(&format!("{}", args.eif.display()), e))?;
    match image.verify_signature(now_unix()) {
        Ok(n) => crate::output::print(&super::reports::EifVerified {
            eif: args.eif.display().to_string(),
            signature_valid: true,
            pcr_signatures: n,
        }),
        Err(e) => Err(CliError::refused(format!("{}: {e}", args.eif.display()))),
    }
}

fn pcr8(args: &Pcr8Args) -> Result<(), CliError> {
    let pem = read_capped(&args.signing_certificate, MAX_PEM_FILE, "signing certificate")?;
    let pcr8 = keygate_eif::pcr8_from_certificate_pem(&pem)
        .map_err(|e| eif_error(&format!("{}", args.signing_certificate.display()), e))?;
    print_json(&json!({ "PCR8": hex::encode(pcr8) }))
}
