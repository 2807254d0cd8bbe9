//! Fuzz the EIF reader: arbitrary bytes must give `Ok` or a typed error — never a
//! panic, never an allocation driven by a declared size. Each input is read twice:
//! as given, and with the header CRC recomputed so that mutations get past the CRC
//! check into the section, metadata and signature parsers. When an input parses,
//! signature verification and the accessors run on it too.
#![no_main]

use libfuzzer_sys::fuzz_target;

/// CRC-32/ISO-HDLC, bitwise (slow but dependency-free; inputs are small).
fn crc32(parts: &[&[u8]]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for part in parts {
        for &byte in *part {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
            }
        }
    }
    !crc
}

fn check(data: &[u8]) {
    if let Ok(image) = keygate_eif::read_eif(data) {
        let _ = image.verify_signature(1_893_456_000);
        let m = image.measurements();
        assert_eq!(m.pcr8.is_some(), image.is_signed());
        let end = image.sections().last().map(|s| s.offset + 12 + s.size);
        assert_eq!(u64::try_from(data.len()).ok(), end);
        // Measuring must not depend on how the bytes are split into reads.
        let (a, b) = data.split_at(data.len() / 2);
        let again = keygate_eif::read_eif(std::io::Read::chain(a, b));
        assert_eq!(again.ok().map(|i| *i.measurements()), Some(*m));
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() >= keygate_eif::HEADER_LEN {
        let (head, body) = data.split_at(keygate_eif::HEADER_LEN - 4);
        let crc = crc32(&[head, body.get(4..).unwrap_or(&[])]);
        let mut fixed = data.to_vec();
        if let Some(slot) = fixed.get_mut(keygate_eif::HEADER_LEN - 4..keygate_eif::HEADER_LEN) {
            slot.copy_from_slice(&crc.to_be_bytes());
        }
        check(&fixed);
    }
});
