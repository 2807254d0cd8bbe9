//! The KRE's audit trail: the one owner of the audit log, the tally of anonymous refusals and
//! the count of withheld answers. It decides how a refusal is recorded (an entry of its own,
//! or only counted when nothing authenticated caused it) and cuts recorded text to what an
//! entry holds. The entries, chain and buffer limits are `crate::audit`'s; spec:
//! docs/audit.md.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::audit::{AnonymousTally, AuditConfig, AuditEvent, AuditLog, AuditSigner, ANONYMOUS_PERIOD_MS, MAX_TEXT};

use super::error::{Denial, Stage};
use super::lock;

/// The audit log and the anonymous tally (lock order: tally, then log; see the module `kre`).
#[derive(Debug)]
pub(super) struct AuditTrail {
    log: Mutex<AuditLog>,
    /// Refusals before any authenticated step, counted per code and written as one audit
    /// entry per period (never from the release capacity).
    anonymous: Mutex<AnonymousTally>,
    /// Answers withheld because the parent did not acknowledge storing their entries in time.
    withheld: AtomicU64,
}

impl AuditTrail {
    pub(super) fn new(config: AuditConfig, signer: AuditSigner) -> Self {
        Self {
            log: Mutex::new(AuditLog::new(config, signer)),
            anonymous: Mutex::new(AnonymousTally::new(ANONYMOUS_PERIOD_MS)),
            withheld: AtomicU64::new(0),
        }
    }

    /// The audit log.
    pub(super) fn log(&self) -> MutexGuard<'_, AuditLog> {
        lock(&self.log)
    }

    /// Records a refusal in the audit trail. A refusal before any authenticated step (a
    /// malformed or foreign frame, a refused Hello, a timeout) is only counted, and the counts
    /// are written as one entry per period from the reserve, so anonymous traffic can neither
    /// fill the buffer nor thin out what releases need. Any other refusal is an entry of its
    /// own; when even the reserve is exhausted the log counts it as unrecorded and writes an
    /// `Unrecorded` entry once there is room.
    pub(super) fn record_denial(&self, d: &Denial, now_ms: u64) {
        let Some(event) = denial_event(d) else {
            lock(&self.anonymous).record(d.code().as_str(), now_ms);
            self.flush_anonymous(now_ms, false);
            return;
        };
        if let Err(e) = self.log().append(event, now_ms) {
            // Counted as unrecorded by the log and written as an `Unrecorded` entry later.
            tracing::debug!(error = %e, "refusal not recorded yet");
        }
    }

    /// Writes the anonymous refusals' aggregate entry when its period is over (or now, with
    /// `force`, e.g. before an audit pull). A refused append keeps the counts for later.
    pub(super) fn flush_anonymous(&self, now_ms: u64, force: bool) {
        let mut tally = lock(&self.anonymous);
        if let Err(e) = self.log().append_anonymous(&mut tally, now_ms, force) {
            tracing::debug!(error = %e, "anonymous refusals kept for the next entry");
        }
    }

    /// Counts an answer withheld because its audit entry was not acknowledged in time.
    pub(super) fn count_withheld(&self) {
        self.withheld.fetch_add(1, Ordering::Relaxed);
    }

    /// Answers withheld so far.
    pub(super) fn withheld(&self) -> u64 {
        self.withheld.load(Ordering::Relaxed)
    }
}

/// The entry recording a refusal, or `None` when it is only counted as anonymous: nothing an
/// unauthenticated peer causes takes an entry of its own, so refusals before a verified
/// attestation (a Release whose document fails, or one refused before it was checked) are
/// counted with the other anonymous refusals. The reason is cut to what an entry holds, so
/// that a long one is recorded, not refused.
fn denial_event(d: &Denial) -> Option<AuditEvent> {
    let anonymous = match d.stage {
        Stage::Challenge => true,
        Stage::Release => d.requester.is_none(),
        Stage::Policy { .. } | Stage::State { .. } => false,
    };
    if anonymous {
        return None;
    }
    let (code, reason) = (d.code().as_str().to_owned(), cut_text(d.error.to_string()));
    Some(match &d.stage {
        Stage::Challenge | Stage::Release => AuditEvent::ReleaseDenied {
            code,
            reason,
            requester: d.requester.clone(),
            cluster: d.cluster.clone(),
            key_ids: d.key_ids.clone(),
        },
        Stage::Policy { version, digest } => {
            AuditEvent::PolicyRefused { version: *version, digest: *digest, code, reason }
        }
        Stage::State { step } => state_event(step, false, reason),
    })
}

/// Appends `events` (entries that release nothing), in order. A refused append is counted as
/// unrecorded by the log, which writes an `Unrecorded` entry once there is room.
pub(super) fn append_admin(log: &mut AuditLog, events: Vec<AuditEvent>, now_ms: u64) {
    for event in events {
        if let Err(e) = log.append(event, now_ms) {
            tracing::debug!(error = %e, "audit entry not recorded; counted as unrecorded");
        }
    }
}

/// The `UnsealStep` entry of a durable-state step (its detail cut to the entry limit).
pub(super) fn state_event(step: &str, ok: bool, detail: String) -> AuditEvent {
    AuditEvent::UnsealStep { step: step.to_owned(), ok, detail: cut_text(detail) }
}

/// Text recorded in an audit entry (a reason, a detail) is cut to [`MAX_TEXT`] bytes, at a
/// char boundary, ending in `…` when cut: an over-long reason must not make the entry
/// unencodable, and so unrecorded.
fn cut_text(mut text: String) -> String {
    if text.len() <= MAX_TEXT {
        return text;
    }
    let mut end = MAX_TEXT.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end = end.saturating_sub(1);
    }
    text.truncate(end);
    text.push('…');
    text
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use keygate_attestation::mock::MockNsm;
    use keygate_attestation::policy::PolicyDenial;
    use keygate_attestation::{DocumentKind, Verifier};

    use super::*;
    use crate::audit::Requester;
    use crate::kre::Error;
    use crate::wire::Id;

    const T: u64 = 1_795_478_400_000;

    fn trail() -> AuditTrail {
        let nsm = MockNsm::new(b"core-test", BTreeMap::new(), Arc::new(|| T));
        let crypto = Verifier::new(nsm.root_anchor()).crypto();
        AuditTrail::new(AuditConfig::default(), AuditSigner::start(&nsm, crypto).expect("signer"))
    }

    /// A refusal with a reason longer than an entry holds is recorded, its reason cut at a
    /// char boundary, for every kind of refusal that carries one.
    #[test]
    fn a_denial_with_a_very_long_reason_is_recorded_cut() {
        let trail = trail();
        // 5,000 bytes of two-byte chars after the 9 bytes "cluster `", so that `MAX_TEXT - 3`
        // is mid-char.
        let error = || Error::Policy(PolicyDenial::UnknownCluster("é".repeat(2_500)));
        let long = error().to_string();
        let stages =
            [Stage::Release, Stage::Policy { version: Some(2), digest: None }, Stage::State { step: "commit" }];
        for stage in stages {
            let before = trail.log().status().last_seq;
            // A Release refusal has its own entry once the requester's document was verified.
            let deny = Denial { requester: Some(requester()), ..Denial::at(stage, error()) };
            trail.record_denial(&deny, T);
            let log = trail.log();
            assert_eq!(log.status().last_seq, before + 1, "recorded");
            assert_eq!(log.status().unrecorded_pending, 0);
            let entries = log.entries_after(before, 1);
            let text = match entries[0].event() {
                AuditEvent::ReleaseDenied { reason, .. } | AuditEvent::PolicyRefused { reason, .. } => reason,
                AuditEvent::UnsealStep { detail, .. } => detail,
                other => panic!("unexpected {other:?}"),
            };
            assert!(text.len() <= MAX_TEXT && text.len() > MAX_TEXT - 4, "{}", text.len());
            assert!(text.ends_with('…'));
            assert!(long.starts_with(text.trim_end_matches('…')));
        }
    }

    fn requester() -> Requester {
        Requester {
            module_id: "i-0123".into(),
            kind: DocumentKind::Enclave,
            pcrs: BTreeMap::new(),
            document_sha384: [1; 48],
        }
    }

    fn denial(stage: Stage, requester: Option<Requester>) -> Denial {
        Denial { requester, ..Denial::at(stage, Error::Policy(PolicyDenial::UnknownCluster("no".into()))) }
    }

    #[test]
    fn only_authenticated_refusals_take_an_entry() {
        assert!(denial_event(&denial(Stage::Challenge, Some(requester()))).is_none());
        assert!(denial_event(&denial(Stage::Release, None)).is_none());
        let Some(AuditEvent::ReleaseDenied { code, reason, requester: Some(r), .. }) =
            denial_event(&Denial { cluster: Id::new("prod").ok(), ..denial(Stage::Release, Some(requester())) })
        else {
            panic!("a verified requester's refusal is an entry");
        };
        assert_eq!(
            (code.as_str(), reason.as_str(), r.module_id.as_str()),
            ("image_not_allowed", "cluster `no` is not in the policy", "i-0123")
        );
        assert!(matches!(
            denial_event(&denial(Stage::Policy { version: Some(3), digest: None }, None)),
            Some(AuditEvent::PolicyRefused { version: Some(3), .. })
        ));
        assert!(matches!(
            denial_event(&denial(Stage::State { step: "load" }, None)),
            Some(AuditEvent::UnsealStep { ok: false, .. })
        ));
    }

    #[test]
    fn short_text_is_kept_and_long_text_cut_at_a_char_boundary() {
        assert_eq!(cut_text("short".into()), "short");
        let exact = "a".repeat(MAX_TEXT);
        assert_eq!(cut_text(exact.clone()), exact);
        let cut = cut_text("é".repeat(MAX_TEXT));
        assert!(cut.len() <= MAX_TEXT && cut.ends_with('…'));
    }
}
