//! `keygate status`: what the KRE says of itself on its parent channel — sealed or serving,
//! the committed and pending generations, the policy head, the audit buffer — as a table or
//! as the KRE's own JSON. It decides only the exit code: 0 serving, 4 answering but not
//! serving (sealed: awaiting its state or unsealing), and the CLI's usual codes for a KRE that
//! cannot be asked. It trusts nothing it prints: the report is the KRE's word, unauthenticated,
//! for operators; the authenticated facts are in the audit trail and the receipts.

use std::fmt::Write as _;

use keygate_enclave::net::transport::Addr;
use keygate_enclave::wire::Message;
use serde_json::Value;

use crate::error::CliError;
use crate::kre_client;

/// The exit code of a KRE that answers but does not serve.
pub(crate) const NOT_SERVING: u8 = 4;

/// `keygate status`.
#[derive(Debug, clap::Args)]
pub(crate) struct StatusArgs {
    /// The KRE's parent channel (`--parent-listen`; never proxied).
    #[arg(long)]
    kre: Addr,
    /// Print the KRE's report as JSON (one line) instead of a table (the global `--json`).
    #[arg(long)]
    json: bool,
}

/// The KRE's status report, as it sent it and parsed.
pub(crate) fn report(kre: &Addr, timeout: std::time::Duration) -> Result<(String, Value), CliError> {
    let json = match kre_client::ask(kre, &Message::Status, timeout)? {
        Message::StatusReport { json } => json,
        m => return Err(kre_client::unexpected(&m)),
    };
    let report: Value =
        serde_json::from_str(&json).map_err(|e| CliError::refused(format!("the KRE's status is not JSON: {e}")))?;
    Ok((json, report))
}

pub(crate) fn run(a: StatusArgs) -> Result<(), CliError> {
    let (json, report) = report(&a.kre, kre_client::DEFAULT_TIMEOUT)?;
    // `status --json` and the global `--json` are one flag (clap hands it to both).
    let text = if a.json { format!("{json}\n") } else { table(&a.kre.to_string(), &report) };
    crate::output::print(&crate::output::Shown { json: &report, text })?;
    match phase(&report) {
        Phase::Serving => Ok(()),
        p => Err(CliError { code: NOT_SERVING, message: format!("the KRE is not serving: {}", p.describe(&report)) }),
    }
}

/// Where the KRE is, from its report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// A KRE without custodians (a static policy), or unsealed.
    Serving,
    /// Waiting for its stored state (or a genesis).
    Awaiting,
    /// Collecting custodian shares.
    Unsealing,
    /// Unsealed as a cluster member, waiting for a serving member's confirmation.
    Confirming,
}

pub(crate) fn phase(report: &Value) -> Phase {
    match report.pointer("/state/phase").and_then(Value::as_str) {
        None | Some("serving") => Phase::Serving,
        Some("unsealing") => Phase::Unsealing,
        Some("confirming") => Phase::Confirming,
        Some(_) => Phase::Awaiting,
    }
}

impl Phase {
    /// The phase as a metric label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Phase::Serving => "serving",
            Phase::Awaiting => "awaiting",
            Phase::Unsealing => "unsealing",
            Phase::Confirming => "confirming",
        }
    }

    /// Every phase.
    pub(crate) const ALL: [Phase; 4] = [Phase::Serving, Phase::Awaiting, Phase::Unsealing, Phase::Confirming];

    /// The phase as one line for people (the status table, a health reason).
    pub(crate) fn describe(self, report: &Value) -> String {
        let n = |key: &str| report.pointer(&format!("/state/{key}")).and_then(Value::as_u64).unwrap_or(0);
        match self {
            Phase::Serving => "serving".to_owned(),
            Phase::Awaiting => "sealed (awaiting its stored state: run `keygate state sync`)".to_owned(),
            Phase::Unsealing => format!(
                "sealed, unsealing generation {}: {} of {} custodian shares",
                n("unsealing_generation"),
                n("shares_accepted"),
                n("threshold")
            ),
            Phase::Confirming => format!(
                "sealed, generation {} unsealed and waiting for a serving member to confirm it is the newest \
                 (`keygate member join --kre KRE --from MEMBER`)",
                n("committed_generation")
            ),
        }
    }
}

/// The report as aligned `name  value` rows.
fn table(kre: &str, r: &Value) -> String {
    let text = |p: &str| match r.pointer(p) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".to_owned(),
        Some(v) => v.to_string(),
    };
    let short = |p: &str| {
        let s = text(p);
        match s.char_indices().nth(16) {
            Some((cut, _)) => format!("{}…", &s[..cut]),
            None => s,
        }
    };
    let mut rows: Vec<(&str, String)> = vec![("KRE", kre.to_owned()), ("Phase", phase(r).describe(r))];
    if r.pointer("/state").is_some_and(|s| !s.is_null()) {
        let pending = match r.pointer("/state/pending_generation").and_then(Value::as_u64) {
            Some(g) => format!("; generation {g} exported, not yet committed"),
            None => String::new(),
        };
        rows.push(("Generation", format!("{} committed{pending}", text("/state/committed_generation"))));
        rows.push((
            "Custodians",
            format!(
                "{} of {} (set {})",
                text("/state/threshold"),
                text("/state/custodians"),
                short("/state/set_digest")
            ),
        ));
    } else {
        rows.push(("Generation", "- (no custodians: a static policy, nothing sealed)".to_owned()));
    }
    if let Some(names) = r.pointer("/members/names").and_then(Value::as_array) {
        let names: Vec<&str> = names.iter().filter_map(Value::as_str).collect();
        let this = match r.pointer("/members/this").and_then(Value::as_str) {
            Some(n) => format!("; this KRE is {n}"),
            None => "; this KRE is not one of them".to_owned(),
        };
        rows.push(("Members", format!("{} ({}){this}", names.len(), names.join(", "))));
    }
    rows.push((
        "Policy",
        format!(
            "version {} (digest {}), durable up to {}{}",
            text("/policy_version"),
            short("/policy_digest"),
            text("/policy_durable_version"),
            if r.pointer("/policy_in_force_not_durable") == Some(&Value::Bool(true)) {
                "; the newest is in force but not yet durable"
            } else {
                ""
            }
        ),
    ));
    if let Some(max_age) = r.pointer("/policy_timestamp_max_age_s").and_then(Value::as_u64) {
        let held = match (
            r.pointer("/policy_timestamp/version").and_then(Value::as_u64),
            r.pointer("/policy_fresh_until_ms").and_then(Value::as_u64),
        ) {
            (_, Some(until)) => format!("releases may go on until {}", super::args::format_time_ms(until)),
            (Some(v), None) => format!("the held timestamp (policy version {v}) does not let releases go on"),
            (None, None) => "no timestamp held: releases wait for one".to_owned(),
        };
        rows.push(("Timestamps", format!("{held} (max age {max_age} s)")));
    }
    rows.push((
        "Audit",
        format!(
            "seq {}, acknowledged {}, buffered {} of {}{}",
            text("/audit/last_seq"),
            text("/audit/acked_up_to"),
            text("/audit/buffered"),
            text("/audit/capacity"),
            if r.pointer("/audit/full") == Some(&Value::Bool(true)) { " (FULL: releases refused)" } else { "" }
        ),
    ));
    rows.push(("Audit chain", short("/audit/chain_id")));
    rows.push(("Challenges", format!("{} live", text("/live_challenges"))));
    rows.push(("NSM", text("/nsm")));
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in rows {
        let _ = writeln!(out, "{k:<width$}  {v}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(state: Value) -> Value {
        serde_json::json!({
            "nsm": "mock", "policy_version": 3, "policy_digest": "ab".repeat(48),
            "policy_durable_version": 2, "policy_in_force_not_durable": true, "live_challenges": 1,
            "state": state,
            "audit": {"last_seq": 9, "acked_up_to": 8, "buffered": 1, "capacity": 4096, "full": false,
                      "chain_id": "cd".repeat(48)},
        })
    }

    #[test]
    fn phases_and_their_exit_codes_follow_the_state() {
        let serving = report(serde_json::json!({"phase": "serving", "committed_generation": 5,
            "pending_generation": 6, "threshold": 2, "custodians": 3, "set_digest": "ef".repeat(48)}));
        assert_eq!(phase(&serving), Phase::Serving);
        let t = table("unix:/k", &serving);
        assert!(t.contains("5 committed; generation 6 exported, not yet committed"), "{t}");
        assert!(t.contains("2 of 3 (set efefefefefefefef…)"), "{t}");
        assert!(t.contains("durable up to 2; the newest is in force but not yet durable"), "{t}");
        assert!(!t.contains("Some("), "{t}");

        let unsealing = report(serde_json::json!({"phase": "unsealing", "committed_generation": 0,
            "unsealing_generation": 7, "shares_accepted": 1, "threshold": 2, "custodians": 3}));
        assert_eq!(phase(&unsealing), Phase::Unsealing);
        assert!(table("k", &unsealing).contains("unsealing generation 7: 1 of 2 custodian shares"));

        let confirming = report(serde_json::json!({"phase": "confirming", "committed_generation": 4}));
        assert_eq!(phase(&confirming), Phase::Confirming);
        assert!(table("k", &confirming).contains("generation 4 unsealed and waiting for a serving member"));

        let awaiting = report(serde_json::json!({"phase": "awaiting_state"}));
        assert_eq!(phase(&awaiting), Phase::Awaiting);

        // A KRE without custodians has no sealed state and serves.
        let static_policy = report(Value::Null);
        assert_eq!(phase(&static_policy), Phase::Serving);
        assert!(table("k", &static_policy).contains("no custodians"));
    }
}
