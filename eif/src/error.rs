//! The one error type of this crate: every way reading, measuring, building or
//! verifying an image can fail, each with its own variant so that callers (and
//! tests) can tell exactly which check rejected the input.

use crate::format::SectionKind;

/// Why an EIF could not be read, measured, built, signed or verified.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EifError {
    /// Reading or writing a file or stream failed.
    #[error("I/O error while {context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    // ----- container: header -----
    /// The input ends before the fixed-size EIF header does.
    #[error("truncated EIF header: {len} bytes, the header alone is {needed}")]
    TruncatedHeader {
        /// Bytes available.
        len: usize,
        /// Size of the header.
        needed: usize,
    },
    /// The first four bytes are not `.eif`.
    #[error("bad magic {found:02x?}: not an EIF file")]
    BadMagic {
        /// The bytes found.
        found: [u8; 4],
    },
    /// The format version is not one this reader understands (1..=4).
    #[error("unsupported EIF version {version}")]
    UnsupportedVersion {
        /// The version in the header.
        version: u16,
    },
    /// Header flags other than the architecture bit are set.
    #[error("unknown EIF header flags {flags:#06x}")]
    UnknownFlags {
        /// The flags in the header.
        flags: u16,
    },
    /// A reserved header field is not zero.
    #[error("reserved EIF header field `{field}` is not zero")]
    ReservedNotZero {
        /// Which field.
        field: &'static str,
    },
    /// The header declares more sections than the format allows.
    #[error("header declares {count} sections, at most {max} are allowed")]
    TooManySections {
        /// Declared count.
        count: u16,
        /// The format's maximum.
        max: usize,
    },
    /// A section-table slot beyond the declared section count is not zero.
    #[error("section table slot {index} is beyond the section count but not zero")]
    UnusedTableEntry {
        /// Table slot.
        index: usize,
    },
    /// A section starts before the previous one ends.
    #[error("section {index} at offset {offset} overlaps the previous section, which ends at {previous_end}")]
    OverlappingSections {
        /// Section index.
        index: usize,
        /// Declared offset.
        offset: u64,
        /// End of the previous section (or of the header).
        previous_end: u64,
    },
    /// A section starts after a gap of unaccounted bytes.
    #[error("section {index} at offset {offset} leaves a gap: expected it at {expected}")]
    GapBetweenSections {
        /// Section index.
        index: usize,
        /// Declared offset.
        offset: u64,
        /// Where it had to start.
        expected: u64,
    },
    /// Offsets or sizes add up beyond what 64 bits can address.
    #[error("section {index}: size {size} overflows the file offset")]
    SizeOverflow {
        /// Section index.
        index: usize,
        /// Declared size.
        size: u64,
    },

    // ----- container: sections -----
    /// The input ends inside a section header or a section's data.
    #[error("section {index} truncated: it needs {needed} bytes from offset {offset}, only {available} present")]
    TruncatedSection {
        /// Section index.
        index: usize,
        /// Offset of the section header.
        offset: u64,
        /// Bytes the section header plus data need.
        needed: u64,
        /// Bytes that were there.
        available: u64,
    },
    /// A section header carries an unknown section type.
    #[error("section {index} has invalid type {value}")]
    InvalidSectionType {
        /// Section index.
        index: usize,
        /// The type value found.
        value: u16,
    },
    /// A section header has non-zero flags.
    #[error("section {index} has non-zero flags {flags:#06x}")]
    InvalidSectionFlags {
        /// Section index.
        index: usize,
        /// The flags found.
        flags: u16,
    },
    /// The section header's size disagrees with the header's section table.
    #[error("section {index}: size {section_header} in its section header, {table} in the EIF header")]
    SectionSizeMismatch {
        /// Section index.
        index: usize,
        /// Size in the EIF header's table.
        table: u64,
        /// Size in the section's own header.
        section_header: u64,
    },
    /// A section that is held in memory is larger than its limit.
    #[error("{kind} section of {size} bytes exceeds the limit of {limit} bytes")]
    SectionTooLarge {
        /// Section kind.
        kind: SectionKind,
        /// Declared size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// Sections are not in the order kernel, cmdline, metadata, ramdisks, signature.
    #[error("section {index} ({kind}) is out of order")]
    SectionOutOfOrder {
        /// Section index.
        index: usize,
        /// Its kind.
        kind: SectionKind,
    },
    /// A section kind that may appear once appears twice.
    #[error("section {index}: second {kind} section")]
    DuplicateSection {
        /// Section index.
        index: usize,
        /// Its kind.
        kind: SectionKind,
    },
    /// A required section (kernel, cmdline, at least one ramdisk) is missing.
    #[error("no {kind} section")]
    MissingSection {
        /// The missing kind.
        kind: SectionKind,
    },
    /// Bytes follow the last section.
    #[error("trailing data after the last section, at offset {offset}")]
    TrailingData {
        /// Where the unexpected bytes start.
        offset: u64,
    },
    /// The CRC32 in the header does not match the file.
    #[error("CRC mismatch: header says {stored:#010x}, contents give {computed:#010x}")]
    CrcMismatch {
        /// CRC in the header.
        stored: u32,
        /// CRC computed over the file.
        computed: u32,
    },
    /// The metadata section is not the JSON document the format defines.
    #[error("invalid metadata section: {0}")]
    InvalidMetadata(#[source] serde_json::Error),

    // ----- signature section -----
    /// The signature section is not a CBOR array of PCR signatures.
    #[error("invalid signature section: {source}")]
    InvalidSignatureSection {
        /// What is wrong.
        #[source]
        source: CborError,
    },
    /// The signature section holds no PCR signature.
    #[error("signature section holds no PCR signature")]
    EmptySignatureSection,
    /// The signature section holds more PCR signatures than this reader accepts.
    #[error("signature section holds {count} PCR signatures, at most {max} are accepted")]
    TooManySignatures {
        /// Count found.
        count: usize,
        /// Maximum.
        max: usize,
    },
    /// A COSE_Sign1 structure is malformed.
    #[error("malformed COSE_Sign1: {reason}")]
    MalformedCose {
        /// What is wrong.
        reason: &'static str,
    },
    /// The COSE_Sign1 protected header does not name ES384.
    #[error("COSE algorithm is not ES384 (-35)")]
    UnsupportedCoseAlgorithm,
    /// The signed payload is not a CBOR `{register_index, register_value}` map.
    #[error("invalid signed PCR payload: {source}")]
    InvalidPcrPayload {
        /// What is wrong.
        #[source]
        source: CborError,
    },

    // ----- certificates and keys -----
    /// No `CERTIFICATE` PEM block could be decoded.
    #[error("no PEM certificate found: {reason}")]
    CertificatePem {
        /// What is wrong.
        reason: &'static str,
    },
    /// The certificate is not valid X.509 DER.
    #[error("invalid X.509 certificate: {reason}")]
    CertificateDer {
        /// What is wrong.
        reason: String,
    },
    /// The certificate's key is not an ECDSA P-384 key.
    #[error("signing certificate key is not ECDSA P-384")]
    UnsupportedCertificateKey,
    /// The private key could not be read.
    #[error("invalid private key: {reason}")]
    PrivateKey {
        /// What is wrong.
        reason: &'static str,
    },
    /// The private key does not belong to the signing certificate.
    #[error("private key does not match the signing certificate")]
    KeyCertificateMismatch,

    // ----- verification -----
    /// The image has no signature section.
    #[error("image is not signed")]
    NotSigned,
    /// The ECDSA signature does not verify with the certificate's key.
    #[error("PCR signature {index} does not verify with its certificate")]
    BadSignature {
        /// Which PCR signature.
        index: usize,
    },
    /// The signature is valid but signs a PCR value other than the image's.
    #[error("PCR signature {index} signs PCR{register} with a value that is not the image's")]
    SignedPcrMismatch {
        /// Which PCR signature.
        index: usize,
        /// The PCR register it names.
        register: i64,
    },
    /// The signing certificate is not valid at the given time.
    #[error("signing certificate not valid at {now}: valid from {not_before} to {not_after} (Unix seconds)")]
    CertificateNotValidNow {
        /// Time checked.
        now: i64,
        /// Start of validity.
        not_before: i64,
        /// End of validity.
        not_after: i64,
    },

    // ----- building -----
    /// The kernel command line contains a NUL byte.
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    /// An input file changed size while it was being copied.
    #[error("input `{what}` changed while it was being read")]
    InputChanged {
        /// Which input.
        what: String,
    },
    /// The kernel config file has no third line to read the OS and version from.
    #[error("kernel config: {reason}")]
    KernelConfig {
        /// What is wrong.
        reason: &'static str,
    },
    /// A build time could not be parsed or formatted.
    #[error("invalid build time: {reason}")]
    BuildTime {
        /// What is wrong.
        reason: String,
    },
    /// Too many ramdisks for the 32-slot section table.
    #[error("{count} ramdisks: at most {max} fit in an EIF")]
    TooManyRamdisks {
        /// Ramdisks given.
        count: usize,
        /// Maximum.
        max: usize,
    },
    /// A directory turned into a ramdisk contains something other than
    /// directories, regular files and symbolic links.
    #[error("ramdisk source `{path}`: unsupported file type (only directories, regular files and symlinks)")]
    UnsupportedFileType {
        /// Offending path.
        path: String,
    },
    /// A directory turned into a ramdisk is beyond a limit (entries, name length, depth).
    #[error("ramdisk source `{path}`: {reason}")]
    RamdiskLimit {
        /// Offending path.
        path: String,
        /// Which limit.
        reason: &'static str,
    },
}

/// Why CBOR in the signature section could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CborError {
    /// A value could not be encoded.
    #[error("CBOR encoding failed: {0}")]
    Encode(#[source] ciborium::ser::Error<std::io::Error>),
    /// The bytes are not one well-formed CBOR item of the expected shape.
    #[error(transparent)]
    Decode(#[from] ciborium::de::Error<std::io::Error>),
    /// Bytes follow the one CBOR item.
    #[error("{0} trailing bytes after the CBOR item")]
    TrailingBytes(usize),
}

impl EifError {
    pub(crate) fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> EifError {
        move |source| EifError::Io { context, source }
    }
}
