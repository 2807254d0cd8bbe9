//! Fuzz target: the audit entry, checkpoint, receipt and durability receipt decoders and the audit file readers must
//! never panic or allocate without bound, and whatever decodes must re-encode to the same bytes
//! (the encoding is canonical: the chain digests and signatures are over exactly these bytes).
//! Whatever entries a file yields, the history check of linked runs (`chain_linked` entries,
//! event type 12) must name its gaps without panicking, however the runs are split.
#![no_main]

use keygate_enclave::audit::{files, verify_history, AuditEntry, Checkpoint, PolicyReceipt, Receipt};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(e) = AuditEntry::decode(data) {
        let again =
            AuditEntry::new(*e.chain_id(), e.seq(), *e.prev(), e.time_ms(), e.policy_version(), e.event().clone())
                .expect("a decoded entry re-encodes");
        assert_eq!(again.bytes(), data, "entry encoding is not canonical");
    }
    if let Ok(c) = Checkpoint::decode(data) {
        let again = Checkpoint::assemble(
            *c.chain_id(),
            c.seq(),
            *c.head(),
            c.time_ms(),
            *c.public_key(),
            *c.signature(),
            c.binding_document().to_vec(),
        )
        .expect("a decoded checkpoint re-encodes");
        assert_eq!(again.bytes(), data, "checkpoint encoding is not canonical");
    }
    if let Ok(r) = Receipt::decode(data) {
        assert_eq!(&r.to_bytes()[..], data, "receipt encoding is not canonical");
        let _ = r.verify(keygate_attestation::crypto::default_backend());
    }
    if let Ok(r) = PolicyReceipt::decode(data) {
        assert_eq!(r.to_bytes(), data, "durability receipt encoding is not canonical");
    }
    let _ = files::parse_entries_file(data);
    let _ = files::parse_checkpoints_file(data);
    // The same bytes behind each magic, so the record parser is reached directly.
    let mut framed = files::ENTRIES_MAGIC.to_vec();
    framed.extend_from_slice(data);
    if let Ok(entries) = files::parse_entries_file(&framed) {
        let cut = entries.len() / 2;
        let _ = verify_history(&[&entries]);
        let _ = verify_history(&[&entries[..cut], &entries[cut..]]);
    }
    let mut framed = files::CHECKPOINTS_MAGIC.to_vec();
    framed.extend_from_slice(data);
    let _ = files::parse_checkpoints_file(&framed);
});
