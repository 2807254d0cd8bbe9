//! Byte-level evidence that key material is wiped when it is dropped, in safe code: the test
//! notes where a secret's bytes live, drops it, and reads that memory back through
//! `/proc/self/mem` (a file read; casting a pointer to an address is safe). A plain buffer with
//! the same pattern, dropped the same way, is the control: its pattern must still be there,
//! or the method proves nothing. Everything the reads need (the file, the buffer) is made
//! before the drop, so no allocation between the drop and the read can reuse the memory.
//!
//! The allocator writes its free-list links into the first 16 bytes of a freed block, so only
//! the bytes after them are compared. What this cannot see: copies left behind by moves (Rust
//! moves are memcpy and the source is not wiped) — the code keeps secrets boxed or in place
//! where that matters, and this test does not claim more.

#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use keygate_attestation::secret::{Secret, SecretVec};

/// Bytes at the start of a freed block that the allocator may overwrite.
const ALLOCATOR_HEADER: usize = 16;

/// Reads `buf.len()` bytes at `addr` of this process into `buf` (prepared before the drop).
fn read_back(mem: &mut File, addr: usize, buf: &mut [u8]) -> std::io::Result<()> {
    mem.seek(SeekFrom::Start(u64::try_from(addr).map_err(std::io::Error::other)?))?;
    mem.read_exact(buf)
}

/// How many bytes after the allocator's header still hold `pattern`.
fn survivors(after_drop: &[u8], pattern: &[u8]) -> usize {
    after_drop.iter().zip(pattern).skip(ALLOCATOR_HEADER).filter(|(a, p)| a == p).count()
}

fn pattern(n: usize) -> Vec<u8> {
    // Non-zero everywhere, so a wiped byte never matches by chance.
    (0..n).map(|i| u8::try_from(i % 251).unwrap_or(0) + 1).collect()
}

/// Drops `value` after noting the address of its `len` secret bytes; returns what is there
/// afterwards, or `None` when this process cannot read its own memory.
fn after_drop<T>(value: T, addr_of: impl Fn(&T) -> usize, len: usize) -> Option<Vec<u8>> {
    let mut mem = match File::open("/proc/self/mem") {
        Ok(f) => f,
        Err(e) => {
            println!("SKIPPED: /proc/self/mem is not readable here: {e}");
            return None;
        }
    };
    let mut buf = vec![0u8; len];
    let addr = addr_of(&value);
    drop(value);
    match read_back(&mut mem, addr, &mut buf) {
        Ok(()) => Some(buf),
        Err(e) => {
            println!("SKIPPED: reading /proc/self/mem failed: {e}");
            None
        }
    }
}

#[test]
fn dropped_secrets_leave_no_key_bytes_in_memory_and_the_control_does() {
    const N: usize = 48;
    let p = pattern(4096);
    let fixed: [u8; N] = p[..N].try_into().expect("48 bytes");

    // The control: a boxed array and a Vec, dropped without wiping. If the pattern were gone
    // here too, the memory was reused or unreadable and the checks below would prove nothing.
    let Some(plain_box) = after_drop(Box::new(fixed), |b| b.as_ptr().addr(), N) else { return };
    let Some(plain_vec) = after_drop(p.clone(), |v| v.as_ptr().addr(), p.len()) else { return };
    assert!(survivors(&plain_box, &fixed) > (N - ALLOCATOR_HEADER) / 2, "control: the method sees a dropped array");
    assert!(survivors(&plain_vec, &p) > p.len() / 2, "control: the method sees a dropped Vec");

    // Fixed-size secrets (keys, KEKs, data keys, shares, P-384 scalars are `Secret<N>`).
    let secret = after_drop(Box::new(Secret::new(fixed)), |s| s.expose().as_ptr().addr(), N).expect("readable");
    assert_eq!(survivors(&secret, &fixed), 0, "a dropped Secret<48> left key bytes: {secret:02x?}");
    assert!(secret[ALLOCATOR_HEADER..].iter().all(|b| *b == 0), "wiped to zeros");
    let key: [u8; 32] = p[..32].try_into().expect("32 bytes");
    let secret = after_drop(Box::new(Secret::new(key)), |s| s.expose().as_ptr().addr(), 32).expect("readable");
    assert_eq!(survivors(&secret, &key), 0, "a dropped Secret<32> left key bytes");

    // Variable-length secrets (sealed-state plaintexts, shares files being built, …).
    let secret = after_drop(SecretVec::new(p.clone()), |s| s.expose().as_ptr().addr(), p.len()).expect("readable");
    assert_eq!(survivors(&secret, &p), 0, "a dropped SecretVec left key bytes");
}
