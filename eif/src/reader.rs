//! Reading and measuring an EIF in one forward pass.
//!
//! The input is untrusted. The header is decoded and its section table checked in
//! full before any section is read: a count over 32, a non-zero slot past the
//! count, an overlap, a gap or an overflowing size is rejected up front. Sections are
//! then read in order; kernel and ramdisks are streamed through the PCR hashers and
//! the CRC in fixed-size chunks, never buffered, and only the small sections
//! (cmdline, metadata, signature) are held in memory, each under a cap checked
//! *before* allocating. The CRC is checked, trailing bytes are rejected, and only
//! then are the metadata JSON and the signature CBOR parsed.

use std::io::Read;

use crc32fast::Hasher as Crc32;

use crate::error::EifError;
use crate::format::{
    Arch, RawHeader, RawSectionHeader, SectionKind, EIF_MAGIC, EIF_VERSION, FLAG_ARCH_ARM64, HEADER_CRC_COVERED,
    HEADER_LEN, HEADER_LEN_U64, MAX_SECTIONS, SECTION_HEADER_LEN, SECTION_HEADER_LEN_U64,
};
use crate::metadata::Metadata;
use crate::pcr::PcrHasher;
use crate::signature::{parse_signature_section, PcrSignature};
use crate::Measurements;

/// Largest kernel command line accepted (bytes).
pub const MAX_CMDLINE_LEN: u64 = 64 * 1024;
/// Largest metadata section accepted (bytes).
pub const MAX_METADATA_LEN: u64 = 1024 * 1024;
/// Largest signature section accepted (bytes).
pub const MAX_SIGNATURE_LEN: u64 = 256 * 1024;

const CHUNK: usize = 64 * 1024;

/// One section as found in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectionInfo {
    /// Its kind.
    pub kind: SectionKind,
    /// Offset of its section header in the file.
    pub offset: u64,
    /// Size of its data (without the 12-byte section header).
    pub size: u64,
}

/// A well-formed EIF, read and measured. Only [`read_eif`] makes one.
#[derive(Clone, Debug)]
pub struct EifImage {
    version: u16,
    arch: Arch,
    default_mem: u64,
    default_cpus: u64,
    crc32: u32,
    file_len: u64,
    sections: Vec<SectionInfo>,
    cmdline: Vec<u8>,
    metadata: Option<Metadata>,
    signatures: Vec<PcrSignature>,
    measurements: Measurements,
}

impl EifImage {
    /// Format version from the header.
    pub fn version(&self) -> u16 {
        self.version
    }
    /// Target architecture.
    pub fn arch(&self) -> Arch {
        self.arch
    }
    /// Default enclave memory (bytes) from the header.
    pub fn default_mem(&self) -> u64 {
        self.default_mem
    }
    /// Default vCPU count from the header.
    pub fn default_cpus(&self) -> u64 {
        self.default_cpus
    }
    /// The (verified) CRC32 from the header.
    pub fn crc32(&self) -> u32 {
        self.crc32
    }
    /// Total file length.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }
    /// Sections in file order.
    pub fn sections(&self) -> &[SectionInfo] {
        &self.sections
    }
    /// The kernel command line bytes.
    pub fn cmdline(&self) -> &[u8] {
        &self.cmdline
    }
    /// The metadata document, if the image has one (v4).
    pub fn metadata(&self) -> Option<&Metadata> {
        self.metadata.as_ref()
    }
    /// Whether the image has a signature section.
    pub fn is_signed(&self) -> bool {
        !self.signatures.is_empty()
    }
    /// The PCR signatures (empty for an unsigned image).
    pub fn signatures(&self) -> &[PcrSignature] {
        &self.signatures
    }
    /// PCR0, 1, 2 and (signed images) 8.
    pub fn measurements(&self) -> &Measurements {
        &self.measurements
    }

    /// Verify every PCR signature at time `now` (Unix seconds). Returns the number of
    /// signatures verified; an unsigned image is an error ([`EifError::NotSigned`]).
    pub fn verify_signature(&self, now: i64) -> Result<usize, EifError> {
        if self.signatures.is_empty() {
            return Err(EifError::NotSigned);
        }
        for (i, sig) in self.signatures.iter().enumerate() {
            sig.verify(i, &self.measurements, now)?;
        }
        Ok(self.signatures.len())
    }
}

/// Read bytes until `buf` is full or the input ends; return how many were read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize, EifError> {
    let mut filled = 0;
    while filled < buf.len() {
        let Some(rest) = buf.get_mut(filled..) else {
            break;
        };
        match r.read(rest) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(EifError::Io { context: "reading the EIF", source: e }),
        }
    }
    Ok(filled)
}

fn u64_of(n: usize) -> u64 {
    // usize is at most 64 bits on every supported target.
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Check the header's fixed fields and section table; return the section count.
fn check_header(h: &RawHeader) -> Result<usize, EifError> {
    if h.magic != EIF_MAGIC {
        return Err(EifError::BadMagic { found: h.magic });
    }
    if !(1..=EIF_VERSION).contains(&h.version) {
        return Err(EifError::UnsupportedVersion { version: h.version });
    }
    if h.flags & !FLAG_ARCH_ARM64 != 0 {
        return Err(EifError::UnknownFlags { flags: h.flags });
    }
    if h.reserved != 0 {
        return Err(EifError::ReservedNotZero { field: "reserved" });
    }
    if h.unused != 0 {
        return Err(EifError::ReservedNotZero { field: "unused" });
    }
    let count = usize::from(h.num_sections);
    if count > MAX_SECTIONS {
        return Err(EifError::TooManySections { count: h.num_sections, max: MAX_SECTIONS });
    }
    let mut expected = HEADER_LEN_U64;
    for (index, (&offset, &size)) in h.section_offsets.iter().zip(h.section_sizes.iter()).enumerate() {
        if index >= count {
            if offset != 0 || size != 0 {
                return Err(EifError::UnusedTableEntry { index });
            }
            continue;
        }
        if offset < expected {
            return Err(EifError::OverlappingSections { index, offset, previous_end: expected });
        }
        if offset > expected {
            return Err(EifError::GapBetweenSections { index, offset, expected });
        }
        expected = offset
            .checked_add(SECTION_HEADER_LEN_U64)
            .and_then(|v| v.checked_add(size))
            .ok_or(EifError::SizeOverflow { index, size })?;
    }
    Ok(count)
}

/// Where a section's bytes go.
enum Sink<'a> {
    /// Streamed into these PCR hashers.
    Measure(Vec<&'a mut PcrHasher>),
    /// Kept (a small section, size already capped).
    Keep(&'a mut Vec<u8>),
}

/// Read, check and measure an EIF from `input`, which must start at the header and
/// end at the end of the last section.
pub fn read_eif<R: Read>(mut input: R) -> Result<EifImage, EifError> {
    let mut header_bytes = [0u8; HEADER_LEN];
    let got = read_full(&mut input, &mut header_bytes)?;
    if got < HEADER_LEN {
        return Err(EifError::TruncatedHeader { len: got, needed: HEADER_LEN });
    }
    let header = RawHeader::decode(&header_bytes);
    let count = check_header(&header)?;

    let mut crc = Crc32::new();
    crc.update(header_bytes.get(..HEADER_CRC_COVERED).unwrap_or(&[]));

    let mut pcr0 = PcrHasher::new();
    let mut pcr1 = PcrHasher::new();
    let mut pcr2 = PcrHasher::new();
    let mut sections = Vec::with_capacity(count);
    let mut cmdline = Vec::new();
    let mut metadata_bytes = Vec::new();
    let mut signature_bytes = Vec::new();
    let mut has = [false; 5];
    let mut ramdisks = 0usize;
    let mut last_rank = 0usize;
    let mut chunk = vec![0u8; CHUNK];

    for index in 0..count {
        let offset = header.section_offsets.get(index).copied().unwrap_or(0);
        let table_size = header.section_sizes.get(index).copied().unwrap_or(0);
        let needed = SECTION_HEADER_LEN_U64.saturating_add(table_size);

        let mut sh_bytes = [0u8; SECTION_HEADER_LEN];
        let got = read_full(&mut input, &mut sh_bytes)?;
        if got < SECTION_HEADER_LEN {
            return Err(EifError::TruncatedSection { index, offset, needed, available: u64_of(got) });
        }
        let sh = RawSectionHeader::decode(&sh_bytes);
        let kind = SectionKind::from_type_value(sh.section_type)
            .ok_or(EifError::InvalidSectionType { index, value: sh.section_type })?;
        if sh.flags != 0 {
            return Err(EifError::InvalidSectionFlags { index, flags: sh.flags });
        }
        if sh.size != table_size {
            return Err(EifError::SectionSizeMismatch { index, table: table_size, section_header: sh.size });
        }

        // Order: kernel, cmdline, metadata, ramdisk..., signature.
        let rank = match kind {
            SectionKind::Kernel => 0,
            SectionKind::Cmdline => 1,
            SectionKind::Metadata => 2,
            SectionKind::Ramdisk => 3,
            SectionKind::Signature => 4,
        };
        if has.get(rank).copied().unwrap_or(false) && kind != SectionKind::Ramdisk {
            return Err(EifError::DuplicateSection { index, kind });
        }
        if rank < last_rank {
            return Err(EifError::SectionOutOfOrder { index, kind });
        }
        if let Some(slot) = has.get_mut(rank) {
            *slot = true;
        }
        last_rank = rank;

        let cap = match kind {
            SectionKind::Cmdline => Some(MAX_CMDLINE_LEN),
            SectionKind::Metadata => Some(MAX_METADATA_LEN),
            SectionKind::Signature => Some(MAX_SIGNATURE_LEN),
            SectionKind::Kernel | SectionKind::Ramdisk => None,
        };
        if let Some(limit) = cap {
            if sh.size > limit {
                return Err(EifError::SectionTooLarge { kind, size: sh.size, limit });
            }
        }

        crc.update(&sh_bytes);
        let sink = match kind {
            SectionKind::Kernel => Sink::Measure(vec![&mut pcr0, &mut pcr1]),
            SectionKind::Cmdline => Sink::Keep(&mut cmdline),
            SectionKind::Metadata => Sink::Keep(&mut metadata_bytes),
            SectionKind::Signature => Sink::Keep(&mut signature_bytes),
            SectionKind::Ramdisk => {
                ramdisks += 1;
                if ramdisks == 1 {
                    Sink::Measure(vec![&mut pcr0, &mut pcr1])
                } else {
                    Sink::Measure(vec![&mut pcr0, &mut pcr2])
                }
            }
        };
        let mut sink = sink;
        if let Sink::Keep(buf) = &mut sink {
            // Capped above, so this allocation is bounded.
            buf.reserve_exact(usize::try_from(sh.size).unwrap_or(0));
        }
        let mut remaining = sh.size;
        while remaining > 0 {
            let want = usize::try_from(remaining.min(u64_of(CHUNK))).unwrap_or(CHUNK);
            let buf = chunk.get_mut(..want).unwrap_or(&mut []);
            let got = read_full(&mut input, buf)?;
            let data = buf.get(..got).unwrap_or(&[]);
            crc.update(data);
            match &mut sink {
                Sink::Measure(hashers) => {
                    for h in hashers.iter_mut() {
                        h.update(data);
                    }
                }
                Sink::Keep(keep) => keep.extend_from_slice(data),
            }
            remaining -= u64_of(got);
            if got < want {
                return Err(EifError::TruncatedSection { index, offset, needed, available: needed - remaining });
            }
        }
        // Cmdline bytes are measured after they are kept (they are small).
        if kind == SectionKind::Cmdline {
            pcr0.update(&cmdline);
            pcr1.update(&cmdline);
        }
        sections.push(SectionInfo { kind, offset, size: sh.size });
    }

    let end = sections.last().map(|s| s.offset + SECTION_HEADER_LEN_U64 + s.size).unwrap_or(HEADER_LEN_U64);
    let mut probe = [0u8; 1];
    if read_full(&mut input, &mut probe)? != 0 {
        return Err(EifError::TrailingData { offset: end });
    }

    let computed = crc.finalize();
    if computed != header.crc32 {
        return Err(EifError::CrcMismatch { stored: header.crc32, computed });
    }

    for kind in [SectionKind::Kernel, SectionKind::Cmdline, SectionKind::Ramdisk] {
        if !sections.iter().any(|s| s.kind == kind) {
            return Err(EifError::MissingSection { kind });
        }
    }

    let metadata = if sections.iter().any(|s| s.kind == SectionKind::Metadata) {
        Some(Metadata::from_json(&metadata_bytes)?)
    } else {
        None
    };
    let signatures = if sections.iter().any(|s| s.kind == SectionKind::Signature) {
        parse_signature_section(&signature_bytes)?
    } else {
        Vec::new()
    };
    // nitro-cli measures the first signature's certificate into PCR8.
    let pcr8 = signatures.first().map(|s| s.certificate().pcr8());

    let arch = if header.flags & FLAG_ARCH_ARM64 != 0 { Arch::Aarch64 } else { Arch::X86_64 };
    Ok(EifImage {
        version: header.version,
        arch,
        default_mem: header.default_mem,
        default_cpus: header.default_cpus,
        crc32: header.crc32,
        file_len: end,
        sections,
        cmdline,
        metadata,
        signatures,
        measurements: Measurements { pcr0: pcr0.finish(), pcr1: pcr1.finish(), pcr2: pcr2.finish(), pcr8 },
    })
}
