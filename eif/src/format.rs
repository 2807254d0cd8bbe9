//! The EIF container layout: the fixed header and the section headers, as AWS's
//! `aws-nitro-enclaves-image-format` (`src/defs/mod.rs`) defines them. All integers
//! are big-endian. This module only converts between bytes and structs; the rules
//! about which layouts are acceptable live in the reader.

use std::fmt;

/// `.eif` in ASCII.
pub const EIF_MAGIC: [u8; 4] = *b".eif";
/// The version this crate writes (V4: with the metadata section).
pub const EIF_VERSION: u16 = 4;
/// Slots in the header's section table.
pub const MAX_SECTIONS: usize = 32;
/// Size of the fixed EIF header.
pub const HEADER_LEN: usize = 548;
/// Size of a section header (type, flags, size).
pub const SECTION_HEADER_LEN: usize = 12;
/// Header flag bit: set for aarch64 images, clear for x86_64.
pub const FLAG_ARCH_ARM64: u16 = 0x1;
/// Default enclave memory written by `eif_build` (1 GiB).
pub const DEFAULT_MEM: u64 = 1024 * 1024 * 1024;
/// Default enclave vCPU count written by `eif_build`.
pub const DEFAULT_CPUS: u64 = 2;

/// `HEADER_LEN` as a file offset.
pub(crate) const HEADER_LEN_U64: u64 = 548;
/// `SECTION_HEADER_LEN` as a file offset.
pub(crate) const SECTION_HEADER_LEN_U64: u64 = 12;
/// Bytes of the header covered by the CRC: all but the trailing CRC field.
pub(crate) const HEADER_CRC_COVERED: usize = HEADER_LEN - 4;

/// The kind of an EIF section (the `u16` type in its section header).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SectionKind {
    /// The kernel image (bzImage / Image).
    Kernel,
    /// The kernel command line (no terminating NUL).
    Cmdline,
    /// A ramdisk (gzip-compressed cpio newc archive).
    Ramdisk,
    /// The CBOR array of PCR signatures.
    Signature,
    /// The JSON metadata document.
    Metadata,
}

impl SectionKind {
    /// The on-disk type value.
    pub fn type_value(self) -> u16 {
        match self {
            SectionKind::Kernel => 1,
            SectionKind::Cmdline => 2,
            SectionKind::Ramdisk => 3,
            SectionKind::Signature => 4,
            SectionKind::Metadata => 5,
        }
    }

    /// The kind for an on-disk type value; 0 ("invalid") and unknown values give `None`.
    pub fn from_type_value(value: u16) -> Option<Self> {
        match value {
            1 => Some(SectionKind::Kernel),
            2 => Some(SectionKind::Cmdline),
            3 => Some(SectionKind::Ramdisk),
            4 => Some(SectionKind::Signature),
            5 => Some(SectionKind::Metadata),
            _ => None,
        }
    }

    /// A short lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            SectionKind::Kernel => "kernel",
            SectionKind::Cmdline => "cmdline",
            SectionKind::Ramdisk => "ramdisk",
            SectionKind::Signature => "signature",
            SectionKind::Metadata => "metadata",
        }
    }
}

impl fmt::Display for SectionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Target architecture, from the header flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// x86_64 (flag bit clear).
    X86_64,
    /// aarch64 (flag bit set).
    Aarch64,
}

impl Arch {
    /// The name `eif_build --arch` and nitro-cli use.
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    pub(crate) fn flags(self) -> u16 {
        match self {
            Arch::X86_64 => 0,
            Arch::Aarch64 => FLAG_ARCH_ARM64,
        }
    }
}

/// The fixed header, field for field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RawHeader {
    pub(crate) magic: [u8; 4],
    pub(crate) version: u16,
    pub(crate) flags: u16,
    pub(crate) default_mem: u64,
    pub(crate) default_cpus: u64,
    pub(crate) reserved: u16,
    pub(crate) num_sections: u16,
    pub(crate) section_offsets: [u64; MAX_SECTIONS],
    pub(crate) section_sizes: [u64; MAX_SECTIONS],
    pub(crate) unused: u32,
    pub(crate) crc32: u32,
}

/// A forward-only reader over a byte array whose length is known at compile time,
/// so every read is checked by the type system rather than by indexing.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        match self.0.split_first_chunk::<N>() {
            Some((head, rest)) => {
                self.0 = rest;
                *head
            }
            // Unreachable for the fixed-size inputs below; zeros keep this total.
            None => [0; N],
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.take())
    }
}

impl RawHeader {
    pub(crate) fn decode(bytes: &[u8; HEADER_LEN]) -> Self {
        let mut f = Fields(bytes);
        let magic = f.take::<4>();
        let version = f.u16();
        let flags = f.u16();
        let default_mem = f.u64();
        let default_cpus = f.u64();
        let reserved = f.u16();
        let num_sections = f.u16();
        let mut section_offsets = [0u64; MAX_SECTIONS];
        for slot in &mut section_offsets {
            *slot = f.u64();
        }
        let mut section_sizes = [0u64; MAX_SECTIONS];
        for slot in &mut section_sizes {
            *slot = f.u64();
        }
        let unused = f.u32();
        let crc32 = f.u32();
        RawHeader {
            magic,
            version,
            flags,
            default_mem,
            default_cpus,
            reserved,
            num_sections,
            section_offsets,
            section_sizes,
            unused,
            crc32,
        }
    }

    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = Vec::with_capacity(HEADER_LEN);
        out.extend_from_slice(&self.magic);
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.default_mem.to_be_bytes());
        out.extend_from_slice(&self.default_cpus.to_be_bytes());
        out.extend_from_slice(&self.reserved.to_be_bytes());
        out.extend_from_slice(&self.num_sections.to_be_bytes());
        for v in &self.section_offsets {
            out.extend_from_slice(&v.to_be_bytes());
        }
        for v in &self.section_sizes {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.extend_from_slice(&self.unused.to_be_bytes());
        out.extend_from_slice(&self.crc32.to_be_bytes());
        let mut fixed = [0u8; HEADER_LEN];
        // `out` has exactly HEADER_LEN bytes by construction (checked in tests).
        for (dst, src) in fixed.iter_mut().zip(out.iter()) {
            *dst = *src;
        }
        fixed
    }
}

/// A section header: type (raw), flags, data size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RawSectionHeader {
    pub(crate) section_type: u16,
    pub(crate) flags: u16,
    pub(crate) size: u64,
}

impl RawSectionHeader {
    pub(crate) fn new(kind: SectionKind, size: u64) -> Self {
        RawSectionHeader { section_type: kind.type_value(), flags: 0, size }
    }

    pub(crate) fn decode(bytes: &[u8; SECTION_HEADER_LEN]) -> Self {
        let mut f = Fields(bytes);
        RawSectionHeader { section_type: f.u16(), flags: f.u16(), size: f.u64() }
    }

    pub(crate) fn encode(&self) -> [u8; SECTION_HEADER_LEN] {
        let mut out = [0u8; SECTION_HEADER_LEN];
        let (t, rest) = out.split_at_mut(2);
        let (fl, sz) = rest.split_at_mut(2);
        t.copy_from_slice(&self.section_type.to_be_bytes());
        fl.copy_from_slice(&self.flags.to_be_bytes());
        sz.copy_from_slice(&self.size.to_be_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RawHeader {
        let mut section_offsets = [0u64; MAX_SECTIONS];
        let mut section_sizes = [0u64; MAX_SECTIONS];
        for i in 0..MAX_SECTIONS {
            section_offsets[i] = u64::try_from(i).unwrap_or(0) * 1000 + 7;
            section_sizes[i] = u64::MAX - u64::try_from(i).unwrap_or(0);
        }
        RawHeader {
            magic: EIF_MAGIC,
            version: 4,
            flags: 1,
            default_mem: DEFAULT_MEM,
            default_cpus: 2,
            reserved: 0x0102,
            num_sections: 5,
            section_offsets,
            section_sizes,
            unused: 0x0a0b0c0d,
            crc32: 0xdeadbeef,
        }
    }

    #[test]
    fn header_round_trips_and_has_the_reference_size() {
        let h = sample();
        let bytes = h.encode();
        assert_eq!(bytes.len(), 548);
        assert_eq!(RawHeader::decode(&bytes), h);
        assert_eq!(&bytes[..4], b".eif");
        // The CRC is the last field, big-endian.
        assert_eq!(&bytes[544..], &[0xde, 0xad, 0xbe, 0xef]);
        // default_mem sits right after magic, version, flags.
        assert_eq!(&bytes[8..16], &DEFAULT_MEM.to_be_bytes());
    }

    #[test]
    fn section_header_round_trips() {
        let s = RawSectionHeader { section_type: 4, flags: 3, size: 123 };
        let bytes = s.encode();
        assert_eq!(bytes, [0, 4, 0, 3, 0, 0, 0, 0, 0, 0, 0, 123]);
        assert_eq!(RawSectionHeader::decode(&bytes), s);
    }

    #[test]
    fn section_kinds_match_the_reference_numbering() {
        for v in 0..=6u16 {
            match SectionKind::from_type_value(v) {
                Some(k) => assert_eq!(k.type_value(), v),
                None => assert!(v == 0 || v == 6),
            }
        }
    }
}
