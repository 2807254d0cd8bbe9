//! Writing an EIF byte-for-byte as AWS's `EifBuilder` (`eif_build`, `nitro-cli
//! build-enclave`) does: header, then kernel, cmdline, metadata, ramdisks and (for a
//! signed image) the signature section, each behind a 12-byte section header.
//!
//! Every input is read exactly once: sections are streamed to the output while the
//! PCRs and the CRC are computed, and the header — which holds the section table and
//! the CRC of everything after it — is written last, over a placeholder. The CRC of
//! the header is combined with the CRC of the body (CRC32 is linear), which gives the
//! same value as AWS's single pass over header-then-body.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crc32fast::Hasher as Crc32;

use crate::error::EifError;
use crate::format::{
    Arch, RawHeader, RawSectionHeader, SectionKind, DEFAULT_CPUS, DEFAULT_MEM, EIF_MAGIC, EIF_VERSION,
    HEADER_CRC_COVERED, HEADER_LEN, HEADER_LEN_U64, MAX_SECTIONS, SECTION_HEADER_LEN_U64,
};
use crate::metadata::Metadata;
use crate::pcr::PcrHasher;
use crate::reader::MAX_CMDLINE_LEN;
use crate::signature::Signer;
use crate::Measurements;

const CHUNK: usize = 64 * 1024;
/// Sections other than ramdisks: kernel, cmdline, metadata, signature.
const FIXED_SECTIONS: usize = 4;
/// Most ramdisks an image can hold.
pub const MAX_RAMDISKS: usize = MAX_SECTIONS - FIXED_SECTIONS;

/// Where a kernel or ramdisk comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// A file, read once while the image is written.
    File(PathBuf),
    /// Bytes in memory (for example a ramdisk built from a directory).
    Bytes(Vec<u8>),
}

impl Input {
    fn describe(&self) -> String {
        match self {
            Input::File(p) => p.display().to_string(),
            Input::Bytes(b) => format!("<{} bytes in memory>", b.len()),
        }
    }
}

/// The result of a build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildOutput {
    /// PCRs of the image written.
    pub measurements: Measurements,
    /// Its length in bytes.
    pub file_len: u64,
    /// Its CRC32 (as stored in the header).
    pub crc32: u32,
}

/// The inputs of one image.
#[derive(Debug)]
pub struct EifBuilder {
    kernel: Input,
    cmdline: Vec<u8>,
    metadata: Metadata,
    ramdisks: Vec<Input>,
    signer: Option<Signer>,
    arch: Arch,
    default_mem: u64,
    default_cpus: u64,
}

impl EifBuilder {
    /// An unsigned x86_64 image with no ramdisks yet; `eif_build`'s defaults for
    /// memory (1 GiB) and vCPUs (2).
    pub fn new(kernel: Input, cmdline: &str, metadata: Metadata) -> Result<Self, EifError> {
        let cmdline = cmdline.as_bytes().to_vec();
        if cmdline.contains(&0) {
            return Err(EifError::CmdlineNul);
        }
        let len = u64::try_from(cmdline.len()).unwrap_or(u64::MAX);
        if len > MAX_CMDLINE_LEN {
            return Err(EifError::SectionTooLarge { kind: SectionKind::Cmdline, size: len, limit: MAX_CMDLINE_LEN });
        }
        Ok(EifBuilder {
            kernel,
            cmdline,
            metadata,
            ramdisks: Vec::new(),
            signer: None,
            arch: Arch::X86_64,
            default_mem: DEFAULT_MEM,
            default_cpus: DEFAULT_CPUS,
        })
    }

    /// Append a ramdisk. The first one is measured into PCR1, the others into PCR2.
    pub fn add_ramdisk(&mut self, ramdisk: Input) -> Result<(), EifError> {
        if self.ramdisks.len() >= MAX_RAMDISKS {
            return Err(EifError::TooManyRamdisks { count: self.ramdisks.len() + 1, max: MAX_RAMDISKS });
        }
        self.ramdisks.push(ramdisk);
        Ok(())
    }

    /// Sign the image (PCR0) with this key and certificate.
    pub fn sign_with(&mut self, signer: Signer) {
        self.signer = Some(signer);
    }

    /// Set the architecture flag.
    pub fn set_arch(&mut self, arch: Arch) {
        self.arch = arch;
    }

    /// Write the image to `out` from its start, and return its measurements.
    pub fn write<W: Write + Seek>(&self, out: &mut W) -> Result<BuildOutput, EifError> {
        if self.ramdisks.is_empty() {
            return Err(EifError::MissingSection { kind: SectionKind::Ramdisk });
        }
        let io_w = EifError::io("writing the EIF");
        out.seek(SeekFrom::Start(0)).map_err(io_w)?;
        out.write_all(&[0u8; HEADER_LEN]).map_err(EifError::io("writing the EIF"))?;

        let mut w =
            SectionWriter { out, crc: Crc32::new(), pos: HEADER_LEN_U64, offsets: Vec::new(), sizes: Vec::new() };
        let mut pcr0 = PcrHasher::new();
        let mut pcr1 = PcrHasher::new();
        let mut pcr2 = PcrHasher::new();

        w.input(SectionKind::Kernel, &self.kernel, &mut [&mut pcr0, &mut pcr1])?;
        w.bytes(SectionKind::Cmdline, &self.cmdline, &mut [&mut pcr0, &mut pcr1])?;
        w.bytes(SectionKind::Metadata, &self.metadata.to_json()?, &mut [])?;
        for (i, ramdisk) in self.ramdisks.iter().enumerate() {
            if i == 0 {
                w.input(SectionKind::Ramdisk, ramdisk, &mut [&mut pcr0, &mut pcr1])?;
            } else {
                w.input(SectionKind::Ramdisk, ramdisk, &mut [&mut pcr0, &mut pcr2])?;
            }
        }
        let mut measurements =
            Measurements { pcr0: pcr0.finish(), pcr1: pcr1.finish(), pcr2: pcr2.finish(), pcr8: None };
        if let Some(signer) = &self.signer {
            let section = signer.signature_section(&measurements.pcr0)?;
            w.bytes(SectionKind::Signature, &section, &mut [])?;
            measurements.pcr8 = Some(signer.certificate().pcr8());
        }

        let mut header = RawHeader {
            magic: EIF_MAGIC,
            version: EIF_VERSION,
            flags: self.arch.flags(),
            default_mem: self.default_mem,
            default_cpus: self.default_cpus,
            reserved: 0,
            num_sections: u16::try_from(w.offsets.len()).unwrap_or(u16::MAX),
            section_offsets: [0; MAX_SECTIONS],
            section_sizes: [0; MAX_SECTIONS],
            unused: 0,
            crc32: 0,
        };
        for (slot, v) in header.section_offsets.iter_mut().zip(&w.offsets) {
            *slot = *v;
        }
        for (slot, v) in header.section_sizes.iter_mut().zip(&w.sizes) {
            *slot = *v;
        }
        let mut crc = Crc32::new();
        crc.update(header.encode().get(..HEADER_CRC_COVERED).unwrap_or(&[]));
        crc.combine(&w.crc);
        header.crc32 = crc.finalize();

        let file_len = w.pos;
        let out = w.out;
        out.seek(SeekFrom::Start(0))
            .and_then(|_| out.write_all(&header.encode()))
            .and_then(|()| out.seek(SeekFrom::Start(file_len)))
            .and_then(|_| out.flush())
            .map_err(EifError::io("writing the EIF header"))?;
        Ok(BuildOutput { measurements, file_len, crc32: header.crc32 })
    }

    /// Write the image to `path` atomically: to a temporary file beside it, synced,
    /// then renamed over `path`.
    pub fn write_file(&self, path: &Path) -> Result<BuildOutput, EifError> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "image.eif".to_owned());
        let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
        let result = (|| {
            let mut file = File::create(&tmp).map_err(EifError::io("creating the output file"))?;
            let output = self.write(&mut file)?;
            file.sync_all().map_err(EifError::io("syncing the output file"))?;
            std::fs::rename(&tmp, path).map_err(EifError::io("renaming the output file"))?;
            Ok(output)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

struct SectionWriter<'a, W: Write> {
    out: &'a mut W,
    /// CRC of everything after the header.
    crc: Crc32,
    pos: u64,
    offsets: Vec<u64>,
    sizes: Vec<u64>,
}

impl<W: Write> SectionWriter<'_, W> {
    fn header(&mut self, kind: SectionKind, size: u64) -> Result<(), EifError> {
        let sh = RawSectionHeader::new(kind, size).encode();
        self.out.write_all(&sh).map_err(EifError::io("writing the EIF"))?;
        self.crc.update(&sh);
        self.offsets.push(self.pos);
        self.sizes.push(size);
        self.pos = self
            .pos
            .checked_add(SECTION_HEADER_LEN_U64)
            .and_then(|p| p.checked_add(size))
            .ok_or(EifError::SizeOverflow { index: self.offsets.len() - 1, size })?;
        Ok(())
    }

    fn data(&mut self, data: &[u8], hashers: &mut [&mut PcrHasher]) -> Result<(), EifError> {
        self.out.write_all(data).map_err(EifError::io("writing the EIF"))?;
        self.crc.update(data);
        for h in hashers.iter_mut() {
            h.update(data);
        }
        Ok(())
    }

    fn bytes(&mut self, kind: SectionKind, data: &[u8], hashers: &mut [&mut PcrHasher]) -> Result<(), EifError> {
        self.header(kind, u64::try_from(data.len()).unwrap_or(u64::MAX))?;
        self.data(data, hashers)
    }

    fn input(&mut self, kind: SectionKind, input: &Input, hashers: &mut [&mut PcrHasher]) -> Result<(), EifError> {
        match input {
            Input::Bytes(b) => self.bytes(kind, b, hashers),
            Input::File(path) => {
                let mut file = File::open(path).map_err(EifError::io("opening an input file"))?;
                let len = file.metadata().map_err(EifError::io("reading input file metadata"))?.len();
                self.header(kind, len)?;
                let mut buf = vec![0u8; CHUNK];
                let mut remaining = len;
                while remaining > 0 {
                    let want = usize::try_from(remaining.min(u64::try_from(CHUNK).unwrap_or(0))).unwrap_or(CHUNK);
                    let chunk = buf.get_mut(..want).unwrap_or(&mut []);
                    let got = match file.read(chunk) {
                        Ok(0) => return Err(EifError::InputChanged { what: input.describe() }),
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(EifError::Io { context: "reading an input file", source: e }),
                    };
                    let data = chunk.get(..got).unwrap_or(&[]);
                    self.data(data, hashers)?;
                    remaining -= u64::try_from(got).unwrap_or(remaining);
                }
                let mut probe = [0u8; 1];
                if file.read(&mut probe).map_err(EifError::io("reading an input file"))? != 0 {
                    return Err(EifError::InputChanged { what: input.describe() });
                }
                Ok(())
            }
        }
    }
}
