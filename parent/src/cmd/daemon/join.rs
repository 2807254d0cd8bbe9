//! `keygate parent`'s member join task (`join_from`): when its KRE awaits its state after a
//! restart, the daemon joins it from another member, as `keygate member join` does, instead
//! of waiting for an operator or M custodians. It decides, without I/O, when to join (the
//! KRE's status says it awaits its state, or that it holds a stored state no custodian has
//! begun to unseal) and in which order to list the members (random, so that among equally new
//! offers restarted members spread over the serving ones); the join itself is the verb's code
//! (every listed member asked at once, the newest offer taken), and
//! both KREs check everything (`docs/cluster.md`). With `policy_store` it also replays the
//! kept bundles (`policy restore`) when the KRE's policy is behind the head its committed
//! state records, as it is after a join, an adoption or an unseal: releases wait
//! (`policy_stale`) until then. It trusts the KRE's status report only to decide whether to
//! try: a wrong report costs a refused join or push, never a key.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keygate_enclave::net::transport::Addr;
use serde_json::Value;

use super::metrics::DaemonMetrics;
use super::supervise::blocking;
use crate::cmd::member::{self, StateAt};
use crate::cmd::{policy, status};
use crate::error::CliError;
use crate::storage::bundles::BundleStore;

/// How often the task asks the KRE whether it awaits its state (a status ask on the parent
/// channel): a restarted KRE is joined within about this long.
pub(crate) const JOIN_POLL: Duration = Duration::from_millis(250);

/// How long the status ask waits for the KRE.
const STATUS_TIMEOUT: Duration = Duration::from_secs(3);

/// Whether the KRE whose status is `report` should be joined from a member: it awaits its
/// state (fresh after a restart), or holds a stored state that no custodian has sent a share
/// for yet (the daemon's own state sync hands the stored blob to an awaiting KRE), or was
/// unsealed by custodians as a member and waits for a serving member's confirmation (the join
/// confirms it, `docs/cluster.md`). Not while custodians unseal, not while it serves, and not
/// for a KRE without custodians (no state).
pub(crate) fn should_join(report: &Value) -> bool {
    match report.pointer("/state/phase").and_then(Value::as_str) {
        Some("awaiting_state" | "confirming") => true,
        Some("unsealing") => report.pointer("/state/shares_accepted").and_then(Value::as_u64) == Some(0),
        _ => false,
    }
}

/// Whether the KRE whose status is `report` serves with a policy older than the head its
/// committed state records (its releases wait, `policy_stale`, until the bundles are pushed).
pub(crate) fn should_restore(report: &Value) -> bool {
    let serving = report.pointer("/state/phase").and_then(Value::as_str) == Some("serving");
    let durable = report.pointer("/policy_durable_version").and_then(Value::as_u64).unwrap_or(0);
    let held = report.pointer("/policy_version").and_then(Value::as_u64).unwrap_or(0);
    serving && durable > held
}

/// Whether to look for a newer pipeline timestamp for the KRE whose status is `report` at
/// `now_ms`: its policy names a timestamp key, and it holds none that lets it release, or the
/// one it holds is past half its maximum age (the pipeline signs more often than that, so a
/// member whose pipeline pushes go elsewhere gets them from the shared store in time).
pub(crate) fn should_push_timestamp(report: &Value, now_ms: u64) -> bool {
    let Some(max_age_s) = report.pointer("/policy_timestamp_max_age_s").and_then(Value::as_u64) else {
        return false;
    };
    match report.pointer("/policy_fresh_until_ms").and_then(Value::as_u64) {
        None => true,
        Some(until) => until.saturating_sub(now_ms) < max_age_s.saturating_mul(1000) / 2,
    }
}

/// Whether `kept` (a timestamp's bytes) is newer than the one the KRE's status reports.
fn kept_is_newer(report: &Value, kept: &[u8]) -> bool {
    let Ok(t) = keygate_attestation::freshness::decode(kept) else { return false };
    let held = report
        .pointer("/policy_timestamp/version")
        .and_then(Value::as_u64)
        .zip(report.pointer("/policy_timestamp/issued_ms").and_then(Value::as_u64));
    held.is_none_or(|h| (t.version, t.issued_ms) > h)
}

/// `members` in the order to ask them: a random permutation, `draw(n)` giving a number in
/// `0..n` (Fisher–Yates); each member exactly once.
pub(crate) fn order(members: &[Addr], mut draw: impl FnMut(u32) -> u32) -> Vec<Addr> {
    let mut list = members.to_vec();
    for i in (1..list.len()).rev() {
        let bound = u32::try_from(i + 1).unwrap_or(u32::MAX);
        let j = usize::try_from(draw(bound) % bound).unwrap_or(0);
        list.swap(i, j);
    }
    list
}

/// A number in `0..n` from the OS's random source.
fn os_draw(n: u32) -> u32 {
    rand_core::RngCore::next_u32(&mut rand_core::OsRng) % n.max(1)
}

/// One round of the task: asks the KRE's status; when [`should_join`], joins it from the
/// newest offer of the listed members (asked at once, listed in a random order). A failed join
/// is logged with every member's reason and counted; the round then fails (and the task backs
/// off). A KRE that does not answer is not the join's failure (the status task reports it):
/// the round does nothing. With `bundles`, a KRE that joined, or serves behind its committed
/// policy head ([`should_restore`]), gets the kept bundles replayed; a failed replay fails the
/// round.
pub(crate) async fn round(
    kre: Addr,
    members: Vec<Addr>,
    at: Option<StateAt>,
    bundles: Option<BundleStore>,
    metrics: Option<Arc<DaemonMetrics>>,
) -> Result<(), CliError> {
    blocking(move || {
        let Ok((_, report)) = status::report(&kre, STATUS_TIMEOUT) else { return Ok(()) };
        let held = report.pointer("/policy_version").and_then(Value::as_u64).unwrap_or(0);
        let replay = |why: &str| match &bundles {
            Some(dir) => {
                let n = policy::restore_chain(&kre, dir, held)?;
                tracing::info!(task = "member join", pushed = n, store = %dir, "{why}: the kept bundles replayed");
                Ok(n)
            }
            None => Ok(0),
        };
        if bundles.is_some() && should_restore(&report) {
            // Nothing newer kept: a failed step (logged, backed off), not a busy loop.
            if replay("the KRE's policy is behind its committed state")? == 0 {
                return Err(CliError::refused(format!(
                    "the KRE's policy is behind the head its committed state records (v{}), and the policy store holds no newer bundle",
                    report.pointer("/policy_durable_version").and_then(Value::as_u64).unwrap_or(0)
                )));
            }
            return Ok(());
        }
        if let Some(store) = bundles.as_ref().filter(|_| should_push_timestamp(&report, crate::cmd::attestation::now_ms())) {
            let mut kept = store.open().map_err(policy::stored_error)?;
            if kept.timestamp().map_err(policy::stored_error)?.is_some_and(|t| kept_is_newer(&report, &t)) {
                policy::timestamp::replay(&kre, &mut kept)?;
                tracing::info!(task = "member join", store = %store, "the kept policy timestamp pushed");
            }
        }
        let Some(at) = at.filter(|_| !members.is_empty() && should_join(&report)) else { return Ok(()) };
        let started = Instant::now();
        match member::join(&kre, &order(&members, os_draw), &at) {
            Ok(j) => {
                // One count per member asked: ok for the offer taken, failed for each member
                // that offered nothing (logged with its reason).
                if let Some(m) = &metrics {
                    m.member_join(true);
                    j.skipped.iter().for_each(|_| m.member_join(false));
                }
                for why in &j.skipped {
                    tracing::warn!(task = "member join", error = %why, "a member offered nothing");
                }
                tracing::info!(
                    task = "member join",
                    from = %j.from,
                    generation = j.report.committed_generation,
                    elapsed_ms = started.elapsed().as_millis(),
                    "the KRE joined from a member and serves"
                );
                replay("joined").map(|_| ())
            }
            Err(e) => {
                if let Some(m) = &metrics {
                    members.iter().for_each(|_| m.member_join(false));
                }
                tracing::warn!(task = "member join", error = %e.message, "a join failed");
                Err(CliError::refused(format!("no member joined the KRE ({})", e.message)))
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn joins_only_a_kre_awaiting_its_state_or_not_yet_unsealed() {
        let state = |s: Value| json!({ "state": s });
        let rows = [
            (state(json!({"phase": "awaiting_state"})), true),
            (state(json!({"phase": "unsealing", "shares_accepted": 0, "threshold": 2})), true),
            // Custodians have begun: their unseal goes on undisturbed.
            (state(json!({"phase": "unsealing", "shares_accepted": 1, "threshold": 2})), false),
            // A report that does not say how far the unseal is: not guessed.
            (state(json!({"phase": "unsealing"})), false),
            (state(json!({"phase": "serving", "committed_generation": 3})), false),
            // Unsealed as a member: a join confirms it.
            (state(json!({"phase": "confirming", "committed_generation": 3})), true),
            // A KRE without custodians has no state to join.
            (json!({"policy_version": 1}), false),
            (state(json!({"phase": "something new"})), false),
            (state(json!({"phase": 1})), false),
        ];
        for (report, join) in rows {
            assert_eq!(should_join(&report), join, "{report}");
        }
    }

    #[test]
    fn replays_the_bundles_only_to_a_serving_kre_behind_its_committed_policy_head() {
        let report = |phase: &str, held: Value, durable: Value| json!({"state": {"phase": phase}, "policy_version": held, "policy_durable_version": durable});
        let rows = [
            (report("serving", json!(3), json!(5)), true),
            (report("serving", Value::Null, json!(2)), true),
            (report("serving", json!(5), json!(5)), false),
            // A policy pushed but not yet committed is ahead, not behind.
            (report("serving", json!(6), json!(5)), false),
            (report("serving", json!(1), Value::Null), false),
            // Sealed: nothing to replay to yet (the join comes first).
            (report("awaiting_state", json!(1), json!(5)), false),
            (report("unsealing", json!(1), json!(5)), false),
        ];
        for (r, restore) in rows {
            assert_eq!(should_restore(&r), restore, "{r}");
        }
    }

    #[test]
    fn looks_for_a_timestamp_only_when_the_policy_needs_one_and_the_held_one_is_missing_or_half_old() {
        let now = 1_000_000;
        let rows = [
            (json!({"policy_version": 2}), false),
            (json!({"policy_timestamp_max_age_s": 60, "policy_fresh_until_ms": null}), true),
            (json!({"policy_timestamp_max_age_s": 60, "policy_fresh_until_ms": now + 59_000}), false),
            (json!({"policy_timestamp_max_age_s": 60, "policy_fresh_until_ms": now + 30_000}), false),
            (json!({"policy_timestamp_max_age_s": 60, "policy_fresh_until_ms": now + 29_999}), true),
            (json!({"policy_timestamp_max_age_s": 60, "policy_fresh_until_ms": now - 1}), true),
        ];
        for (r, look) in rows {
            assert_eq!(should_push_timestamp(&r, now), look, "{r}");
        }
        use keygate_attestation::freshness::{encode, Timestamp};
        let kept = encode(&Timestamp { version: 3, digest: [0; 48], issued_ms: 500, key: [4; 97], signature: [0; 96] });
        assert!(kept_is_newer(&json!({}), &kept));
        assert!(kept_is_newer(&json!({"policy_timestamp": {"version": 3, "issued_ms": 499}}), &kept));
        assert!(kept_is_newer(&json!({"policy_timestamp": {"version": 2, "issued_ms": 900}}), &kept));
        assert!(!kept_is_newer(&json!({"policy_timestamp": {"version": 3, "issued_ms": 500}}), &kept));
        assert!(!kept_is_newer(&json!({"policy_timestamp": {"version": 4, "issued_ms": 1}}), &kept));
        assert!(!kept_is_newer(&json!({}), b"not a timestamp"));
    }

    fn addrs(n: usize) -> Vec<Addr> {
        (0..n).map(|i| Addr::Unix(format!("/m{i}").into())).collect()
    }

    #[test]
    fn asks_every_member_once_in_the_drawn_order() {
        let members = addrs(3);
        // Draws of 0 each time: swaps (2,0) then (1,0).
        assert_eq!(order(&members, |_| 0), vec![members[1].clone(), members[2].clone(), members[0].clone()]);
        // Draws of n-1 leave the list as it is.
        assert_eq!(order(&members, |n| n - 1), members);
        // An out-of-range draw still gives a permutation.
        let mut o = order(&members, |_| u32::MAX);
        o.sort_by_key(ToString::to_string);
        assert_eq!(o, members);
        assert!(order(&[], |_| 0).is_empty());
        assert_eq!(order(&addrs(1), |_| 0), addrs(1));
    }

    #[test]
    fn the_random_order_starts_at_every_member() {
        let members = addrs(3);
        let mut first = std::collections::BTreeSet::new();
        for _ in 0..200 {
            first.insert(order(&members, os_draw)[0].to_string());
        }
        assert_eq!(first.len(), 3, "{first:?}");
    }
}
