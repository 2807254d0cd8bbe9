//! `keygate parent`'s Prometheus metrics and health (served with `metrics_listen`): what its
//! proxies and tasks count as they run, and the KRE's own status report, asked on the parent
//! channel every `status_every` and mirrored into gauges and counters.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `keygate_kre_up` | gauge (0/1) | the last status ask was answered |
//! | `keygate_kre_phase` | gauge (0/1) | `phase` (serving, awaiting, unsealing) |
//! | `keygate_kre_state_generation` | gauge | `state` (committed, pending) |
//! | `keygate_kre_policy_version`, `keygate_kre_policy_durable_version` | gauge | |
//! | `keygate_kre_audit_buffered_entries`, `keygate_kre_audit_buffer_capacity_entries` | gauge | |
//! | `keygate_kre_audit_last_sequence`, `keygate_kre_audit_acknowledged_sequence` | gauge | |
//! | `keygate_kre_releases_total`, `keygate_kre_keys_released_total` | counter | |
//! | `keygate_kre_refusals_total` | counter | `code` (a deny code) |
//! | `keygate_parent_task_steps_total` | counter | `task`, `outcome` (ok, failed) |
//! | `keygate_member_joins_total` | counter | `outcome` (ok, failed): each join attempt (`join_from`) |
//! | `keygate_proxy_*` | see `cmd::proxy::stats` | `channel` |
//!
//! The KRE's counts restart from 0 with the KRE; the counters here add what the KRE counted
//! since the previous ask, and after a restart (a count lower than the last) its whole count,
//! so they only grow, as Prometheus expects of a counter.
//!
//! Health (`/healthz`): 200 while the KRE answers, serves and every task's last step
//! succeeded; otherwise 503 with the first reason. Nothing here is secret: the status report
//! carries no key material, and the KRE's word in it is unauthenticated (for operators).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, PoisonError};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::Value;

use crate::cmd::proxy::ProxyMetrics;
use crate::cmd::status::{phase, Phase};
use crate::metrics::{Exporter, Health};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    task: &'static str,
    outcome: &'static str,
}

/// The KRE's counts at the previous ask.
#[derive(Debug, Default)]
struct Seen {
    releases: u64,
    keys: u64,
    refusals: BTreeMap<String, u64>,
}

/// What has gone wrong, by source: the KRE's status ask, and each task's last step.
#[derive(Debug, Default)]
struct Faults {
    kre: Option<String>,
    tasks: BTreeMap<&'static str, String>,
}

/// The daemon's metrics and health.
#[derive(Debug)]
pub(crate) struct DaemonMetrics {
    registry: Registry,
    pub(crate) proxy: ProxyMetrics,
    up: Gauge,
    phase: Family<PhaseLabel, Gauge>,
    generation: Family<StateLabel, Gauge>,
    policy_version: Gauge,
    policy_durable: Gauge,
    audit_buffered: Gauge,
    audit_capacity: Gauge,
    audit_last: Gauge<u64, AtomicU64>,
    audit_acked: Gauge<u64, AtomicU64>,
    releases: Counter,
    keys_released: Counter,
    refusals: Family<CodeLabel, Counter>,
    steps: Family<StepLabels, Counter>,
    member_joins: Family<OutcomeLabel, Counter>,
    seen: Mutex<Seen>,
    faults: Mutex<Faults>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn gauge(v: Option<u64>) -> i64 {
    v.and_then(|v| i64::try_from(v).ok()).unwrap_or(0)
}

impl DaemonMetrics {
    /// Registers every metric under the `keygate` prefix.
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("keygate");
        let m = Self {
            registry: Registry::default(),
            proxy: ProxyMetrics::default(),
            up: Gauge::default(),
            phase: Family::default(),
            generation: Family::default(),
            policy_version: Gauge::default(),
            policy_durable: Gauge::default(),
            audit_buffered: Gauge::default(),
            audit_capacity: Gauge::default(),
            audit_last: Gauge::default(),
            audit_acked: Gauge::default(),
            releases: Counter::default(),
            keys_released: Counter::default(),
            refusals: Family::default(),
            steps: Family::default(),
            member_joins: Family::default(),
            seen: Mutex::default(),
            faults: Mutex::default(),
        };
        let kre = registry.sub_registry_with_prefix("kre");
        kre.register("up", "1 when the KRE answered the last status ask on its parent channel", m.up.clone());
        kre.register("phase", "The KRE's phase (1 for the current one)", m.phase.clone());
        kre.register(
            "state_generation",
            "The sealed state's committed generation, and the exported one not yet committed (0: none)",
            m.generation.clone(),
        );
        kre.register("policy_version", "The newest signed policy version the KRE holds", m.policy_version.clone());
        kre.register(
            "policy_durable_version",
            "The newest policy version the committed sealed state carries",
            m.policy_durable.clone(),
        );
        kre.register("audit_buffered_entries", "Audit entries the KRE holds unacknowledged", m.audit_buffered.clone());
        kre.register(
            "audit_buffer_capacity_entries",
            "Audit entries the KRE can hold before it refuses releases",
            m.audit_capacity.clone(),
        );
        kre.register("audit_last_sequence", "The newest audit entry's sequence number", m.audit_last.clone());
        kre.register(
            "audit_acknowledged_sequence",
            "The newest audit entry the parent acknowledged storing",
            m.audit_acked.clone(),
        );
        kre.register("releases", "Releases the KRE answered", m.releases.clone());
        kre.register("keys_released", "Data keys in the releases the KRE answered", m.keys_released.clone());
        kre.register("refusals", "Requests the KRE refused, by deny code", m.refusals.clone());
        registry.sub_registry_with_prefix("parent").register(
            "task_steps",
            "Steps of the daemon's tasks (state sync, audit pull, proxies, status), by outcome",
            m.steps.clone(),
        );
        registry.sub_registry_with_prefix("member").register(
            "joins",
            "Joins of the KRE from another member (join_from), by outcome, one per member asked",
            m.member_joins.clone(),
        );
        m.proxy.register(&mut registry);
        Self { registry, ..m }
    }

    /// A task's step ended (`Err` carries its failure, for the health reason).
    pub(crate) fn step(&self, task: &'static str, outcome: Result<(), &str>) {
        let label = if outcome.is_ok() { "ok" } else { "failed" };
        self.steps.get_or_create(&StepLabels { task, outcome: label }).inc();
        let mut faults = lock(&self.faults);
        match outcome {
            Ok(()) => faults.tasks.remove(task),
            Err(e) => faults.tasks.insert(task, e.to_owned()),
        };
    }

    /// A join of the KRE from a member succeeded (`true`) or failed.
    pub(crate) fn member_join(&self, ok: bool) {
        self.member_joins.get_or_create(&OutcomeLabel { outcome: if ok { "ok" } else { "failed" } }).inc();
    }

    /// The KRE did not answer its status ask.
    pub(crate) fn kre_unreachable(&self, reason: &str) {
        self.up.set(0);
        lock(&self.faults).kre = Some(format!("the KRE does not answer on its parent channel: {reason}"));
    }

    /// Mirrors the KRE's status `report`.
    pub(crate) fn kre_report(&self, report: &Value) {
        let u = |p: &str| report.pointer(p).and_then(Value::as_u64);
        self.up.set(1);
        let now = phase(report);
        for p in Phase::ALL {
            self.phase.get_or_create(&PhaseLabel { phase: p.as_str() }).set(i64::from(p == now));
        }
        self.generation.get_or_create(&StateLabel { state: "committed" }).set(gauge(u("/state/committed_generation")));
        self.generation.get_or_create(&StateLabel { state: "pending" }).set(gauge(u("/state/pending_generation")));
        self.policy_version.set(gauge(u("/policy_version")));
        self.policy_durable.set(gauge(u("/policy_durable_version")));
        self.audit_buffered.set(gauge(u("/audit/buffered")));
        self.audit_capacity.set(gauge(u("/audit/capacity")));
        self.audit_last.set(u("/audit/last_seq").unwrap_or(0));
        self.audit_acked.set(u("/audit/acked_up_to").unwrap_or(0));
        {
            let mut seen = lock(&self.seen);
            let releases = u("/answers/releases").unwrap_or(0);
            let keys = u("/answers/keys_released").unwrap_or(0);
            let refusals: BTreeMap<String, u64> = report
                .pointer("/answers/refusals")
                .and_then(Value::as_object)
                .map(|o| o.iter().filter_map(|(k, v)| Some((k.clone(), v.as_u64()?))).collect())
                .unwrap_or_default();
            // Any count lower than before: the KRE restarted, and every count began again.
            let restarted = releases < seen.releases
                || keys < seen.keys
                || seen.refusals.iter().any(|(k, before)| refusals.get(k).copied().unwrap_or(0) < *before);
            if restarted {
                *seen = Seen::default();
            }
            self.releases.inc_by(releases.saturating_sub(seen.releases));
            self.keys_released.inc_by(keys.saturating_sub(seen.keys));
            for (code, n) in &refusals {
                let before = seen.refusals.get(code).copied().unwrap_or(0);
                self.refusals.get_or_create(&CodeLabel { code: code.clone() }).inc_by(n.saturating_sub(before));
            }
            *seen = Seen { releases, keys, refusals };
        }
        lock(&self.faults).kre =
            (now != Phase::Serving).then(|| format!("the KRE is not serving: {}", now.describe(report)));
    }
}

impl Exporter for DaemonMetrics {
    fn registry(&self) -> &Registry {
        &self.registry
    }

    fn health(&self) -> Health {
        let faults = lock(&self.faults);
        if let Some(kre) = &faults.kre {
            return Health::Unhealthy(kre.clone());
        }
        match faults.tasks.iter().next() {
            Some((task, e)) => Health::Unhealthy(format!("task {task}: {e}")),
            None => Health::Ok,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(m: &DaemonMetrics) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, m.registry()).expect("encode");
        out
    }

    fn report(releases: u64, busy: u64, phase: &str) -> Value {
        serde_json::json!({
            "policy_version": 3, "policy_durable_version": 2,
            "state": {"phase": phase, "committed_generation": 7, "pending_generation": 8},
            "audit": {"last_seq": 40, "acked_up_to": 39, "buffered": 1, "capacity": 4096},
            "answers": {"releases": releases, "keys_released": 2 * releases, "refusals": {"busy": busy}},
        })
    }

    #[test]
    fn mirrors_the_report_and_counts_across_a_kre_restart() {
        let m = DaemonMetrics::new();
        m.kre_report(&report(5, 2, "serving"));
        m.kre_report(&report(7, 3, "serving"));
        // The KRE restarted: its counts begin again; the counters keep growing.
        m.kre_report(&report(1, 1, "serving"));
        let text = scrape(&m);
        for line in [
            "keygate_kre_releases_total 8",
            "keygate_kre_keys_released_total 16",
            "keygate_kre_refusals_total{code=\"busy\"} 4",
            "keygate_kre_state_generation{state=\"committed\"} 7",
            "keygate_kre_state_generation{state=\"pending\"} 8",
            "keygate_kre_phase{phase=\"serving\"} 1",
            "keygate_kre_phase{phase=\"awaiting\"} 0",
            "keygate_kre_audit_acknowledged_sequence 39",
            "keygate_kre_up 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert_eq!(m.health(), Health::Ok);
    }

    #[test]
    fn health_names_the_first_fault() {
        let m = DaemonMetrics::new();
        m.kre_report(&report(0, 0, "awaiting"));
        assert!(matches!(m.health(), Health::Unhealthy(r) if r.starts_with("the KRE is not serving: sealed")));
        m.kre_report(&report(0, 0, "serving"));
        m.step("audit pull", Err("connection refused"));
        assert_eq!(m.health(), Health::Unhealthy("task audit pull: connection refused".into()));
        m.step("audit pull", Ok(()));
        m.kre_unreachable("connection refused");
        assert!(matches!(m.health(), Health::Unhealthy(r) if r.contains("does not answer")));
        assert!(scrape(&m)
            .lines()
            .any(|l| l == "keygate_parent_task_steps_total{task=\"audit pull\",outcome=\"failed\"} 1"));
        m.member_join(false);
        m.member_join(false);
        m.member_join(true);
        let text = scrape(&m);
        for line in ["keygate_member_joins_total{outcome=\"failed\"} 2", "keygate_member_joins_total{outcome=\"ok\"} 1"]
        {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
