//! Enclave Image Format (EIF): build, read, measure, sign and verify Nitro enclave
//! images, byte-compatible with AWS's `eif_build` and `nitro-cli build-enclave`.
//!
//! What this crate decides: whether a file is a well-formed EIF (every limit of the
//! format checked, each failure a distinct [`EifError`]), which PCR0/1/2/8 values an
//! image will report, and whether its signature verifies. What it trusts: nothing in
//! the file; the caller's clock (passed in) for certificate validity; and the
//! `Cargo.lock`-pinned deflate backend for the bytes of ramdisks it builds from
//! directories. See `docs/eif.md` for the layout and the exact PCR definitions.
//!
//! ```no_run
//! let m = keygate_eif::measure_file(std::path::Path::new("enclave.eif"))?;
//! println!("PCR0 {}", hex::encode(m.pcr0));
//! # Ok::<(), keygate_eif::EifError>(())
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod builder;
mod error;
mod format;
mod metadata;
mod pcr;
mod ramdisk;
mod reader;
mod signature;

use std::path::Path;

pub use builder::{BuildOutput, EifBuilder, Input, MAX_RAMDISKS};
pub use error::{CborError, EifError};
pub use format::{
    Arch, SectionKind, DEFAULT_CPUS, DEFAULT_MEM, EIF_MAGIC, EIF_VERSION, FLAG_ARCH_ARM64, HEADER_LEN, MAX_SECTIONS,
    SECTION_HEADER_LEN,
};
pub use metadata::{os_and_kernel_from_config, BuildInfo, BuildTime, Metadata};
pub use pcr::{pcr8_from_certificate_der, PcrHasher, PCR_LEN};
pub use ramdisk::{ramdisk_from_dir, MAX_DEPTH, MAX_ENTRIES, MAX_PATH_LEN};
pub use reader::{read_eif, EifImage, SectionInfo, MAX_CMDLINE_LEN, MAX_METADATA_LEN, MAX_SIGNATURE_LEN};
pub use signature::{pcr8_from_certificate_pem, PcrSignature, Signer, SigningCertificate, MAX_PCR_SIGNATURES};

/// The measurements of an image: what a Nitro enclave booted from it reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Measurements {
    /// PCR0: kernel, cmdline and all ramdisks.
    pub pcr0: [u8; 48],
    /// PCR1: kernel, cmdline and the first ramdisk.
    pub pcr1: [u8; 48],
    /// PCR2: the second and later ramdisks.
    pub pcr2: [u8; 48],
    /// PCR8: the signing certificate; `None` for an unsigned image.
    pub pcr8: Option<[u8; 48]>,
}

/// The hash algorithm string nitro-cli prints (`format!("{:?}", Sha384::new())` with
/// the sha2 0.9 its tools are built with).
pub const HASH_ALGORITHM: &str = "Sha384 { ... }";

/// Read, check and measure the EIF at `path` without rebuilding it.
pub fn measure_file(path: &Path) -> Result<Measurements, EifError> {
    Ok(*read_file(path)?.measurements())
}

/// Read, check and measure the EIF at `path`.
pub fn read_file(path: &Path) -> Result<EifImage, EifError> {
    let file = std::fs::File::open(path).map_err(EifError::io("opening the EIF"))?;
    read_eif(std::io::BufReader::with_capacity(64 * 1024, file))
}

#[cfg(test)]
mod tests;
