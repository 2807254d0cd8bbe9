//! The plugin's Prometheus metrics (served by `--metrics-listen`): what the gRPC service and
//! the key source count as they run, and the gauges read from the plugin's state at each
//! scrape. Nothing here is secret: methods, codes, outcomes, times and key ids only.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `keygate_kms_operations_total` | counter | `method` (Status, Encrypt, Decrypt), `code` (gRPC) |
//! | `keygate_kms_operation_duration_seconds` | histogram | `method` |
//! | `keygate_kms_key_fetches_total` | counter | `outcome`, `deny_code` (`--kre` only) |
//! | `keygate_kms_lease_remaining_seconds` | gauge | (`--kre` only) |
//! | `keygate_kms_current_key_info` | gauge, 1 | `key_id` (absent while no key is held) |
//! | `keygate_kms_keys_held` | gauge | |

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use super::{Mode, Shared};
use crate::metrics::Health;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FetchLabels {
    outcome: &'static str,
    deny_code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabel {
    key_id: String,
}

/// How a fetch from the KRE ended (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FetchOutcome {
    /// Keys fetched or the lease renewed.
    Ok,
    /// The KRE refused (`deny_code` says why; a revocation or a transient refusal).
    Denied(&'static str),
    /// The answer failed the client's checks (a relay or a substituted KRE): keys kept.
    RefusedAnswer,
    /// The KRE released a different key for a held version: keys kept.
    Conflict,
    /// Anything else: transport, the local NSM, no key released.
    Error,
}

/// Latency buckets, 100 µs to about 2 s (requests time out at `--request-timeout`).
fn operation_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_1, 3.0, 10))
}

/// The plugin's metrics, registered under the `keygate_` prefix.
#[derive(Debug)]
pub(crate) struct KmsMetrics {
    registry: Registry,
    operations: Family<OperationLabels, Counter>,
    latency: Family<MethodLabel, Histogram, fn() -> Histogram>,
    fetches: Family<FetchLabels, Counter>,
    lease_remaining: Gauge<f64, AtomicU64>,
    current_key: Family<KeyLabel, Gauge>,
    keys_held: Gauge,
}

impl KmsMetrics {
    /// Registers every metric; `lease` = the keys are on a lease (`--kre`).
    pub(crate) fn new(lease: bool) -> Self {
        let mut registry = Registry::with_prefix("keygate");
        let m = Self {
            operations: Family::default(),
            latency: Family::new_with_constructor(operation_histogram),
            fetches: Family::default(),
            lease_remaining: Gauge::default(),
            current_key: Family::default(),
            keys_held: Gauge::default(),
            registry: Registry::default(),
        };
        let kms = registry.sub_registry_with_prefix("kms");
        kms.register("operations", "KMS v2 calls answered, by method and gRPC status code", m.operations.clone());
        kms.register_with_unit("operation_duration", "Time to answer a KMS v2 call", Unit::Seconds, m.latency.clone());
        if lease {
            kms.register("key_fetches", "Key fetches from the KRE, by outcome and deny code", m.fetches.clone());
            kms.register_with_unit(
                "lease_remaining",
                "Time until the lease ends and Encrypt stops without a refresh (0: none held or revoked)",
                Unit::Seconds,
                m.lease_remaining.clone(),
            );
        }
        kms.register("current_key_info", "The key_id Encrypt seals under (value 1)", m.current_key.clone());
        kms.register(
            "keys_held",
            "Key versions held (the current one and older ones that still open)",
            m.keys_held.clone(),
        );
        Self { registry, ..m }
    }

    /// One call answered with `code` after `took`.
    pub(crate) fn operation(&self, method: &'static str, code: tonic::Code, took: Duration) {
        self.operations.get_or_create(&OperationLabels { method, code: code_name(code) }).inc();
        self.latency.get_or_create(&MethodLabel { method }).observe(took.as_secs_f64());
    }

    /// One fetch from the KRE ended.
    pub(crate) fn fetch(&self, outcome: FetchOutcome) {
        let (outcome, deny_code) = match outcome {
            FetchOutcome::Ok => ("ok", ""),
            FetchOutcome::Denied(code) => ("denied", code),
            FetchOutcome::RefusedAnswer => ("refused_answer", ""),
            FetchOutcome::Conflict => ("conflict", ""),
            FetchOutcome::Error => ("error", ""),
        };
        self.fetches.get_or_create(&FetchLabels { outcome, deny_code }).inc();
    }
}

/// gRPC's own names of the codes (as grpc-go and its Prometheus middleware spell them).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// What `--metrics-listen` serves: the metrics, with the gauges read from the state at each
/// scrape, and the plugin's healthz (what Status reports) as the health.
#[derive(Debug)]
pub(crate) struct KmsExporter(pub(crate) Arc<Shared>);

impl crate::metrics::Exporter for KmsExporter {
    fn registry(&self) -> &prometheus_client::registry::Registry {
        &self.0.metrics.registry
    }

    fn refresh(&self) {
        let m = &self.0.metrics;
        let Ok(st) = self.0.read() else { return };
        let now = Instant::now();
        let versions = st.ring.versions();
        m.keys_held.set(i64::try_from(versions.len()).unwrap_or(i64::MAX));
        // Replaced only when it changed: a concurrent scrape never sees the info missing.
        match st.ring.current().map(|v| KeyLabel { key_id: st.ring.kms_key_id(v) }) {
            Some(key) if m.current_key.get(&key).is_some() => {}
            Some(key) => {
                m.current_key.clear();
                m.current_key.get_or_create(&key).set(1);
            }
            None => m.current_key.clear(),
        }
        if let Mode::Kre { lease } = &st.mode {
            m.lease_remaining.set(lease.encrypt_remaining(now).as_secs_f64());
        }
    }

    fn health(&self) -> Health {
        let Ok(st) = self.0.read() else {
            return Health::Unhealthy("internal: state lock poisoned".to_owned());
        };
        match st.healthz(Instant::now()) {
            h if h == "ok" => Health::Ok,
            h => Health::Unhealthy(h),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::kms_plugin::{KeyRing, Lease, LeasePolicy, State};
    use crate::metrics::Exporter;
    use keygate_attestation::secret::Secret;
    use keygate_enclave::wire::Id;

    fn scrape(e: &KmsExporter) -> String {
        e.refresh();
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, e.registry()).expect("encode");
        out
    }

    fn ring() -> KeyRing {
        KeyRing::new(Id::new("prod").expect("id"), Id::new("etcd-kek").expect("id"))
    }

    #[test]
    fn gauges_follow_the_state_and_health_is_the_status_healthz() {
        let e = KmsExporter(Shared::new(State { ring: ring(), mode: Mode::Dir { dir: "/k".into(), problem: None } }));
        assert_eq!(e.health(), Health::Unhealthy("no key files in /k".to_owned()));
        let text = scrape(&e);
        assert!(
            text.contains("keygate_kms_keys_held 0\n") && !text.contains("keygate_kms_current_key_info{"),
            "{text}"
        );
        assert!(!text.contains("lease_remaining") && !text.contains("key_fetches"), "no lease on key files: {text}");
        for (v, b) in [(1, 1u8), (2, 2)] {
            e.0.write().expect("lock").ring.insert(v, Secret::new([b; 32])).expect("insert");
        }
        e.0.metrics.operation("Encrypt", tonic::Code::Ok, Duration::from_millis(2));
        e.0.metrics.operation("Decrypt", tonic::Code::InvalidArgument, Duration::from_millis(1));
        assert_eq!(e.health(), Health::Ok);
        let text = scrape(&e);
        for line in [
            "keygate_kms_keys_held 2\n",
            "keygate_kms_current_key_info{key_id=\"prod/etcd-kek/v2\"} 1\n",
            "keygate_kms_operations_total{method=\"Encrypt\",code=\"OK\"} 1\n",
            "keygate_kms_operations_total{method=\"Decrypt\",code=\"InvalidArgument\"} 1\n",
            "keygate_kms_operation_duration_seconds_count{method=\"Encrypt\"} 1\n",
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
        assert!(!text.contains("v1\""), "only the current key is the info: {text}");
        e.0.write().expect("lock").ring.clear();
        let text = scrape(&e);
        assert!(text.contains("keygate_kms_keys_held 0\n") && !text.contains("current_key_info{"), "{text}");
    }

    #[test]
    fn the_lease_and_fetches_are_shown_on_a_kre() {
        let now = Instant::now();
        let mut lease = Lease::new(LeasePolicy { lease: Duration::from_secs(600), grace: Duration::ZERO }, now);
        lease.on_success(now);
        let e = KmsExporter(Shared::new(State { ring: ring(), mode: Mode::Kre { lease } }));
        e.0.metrics.fetch(FetchOutcome::Ok);
        e.0.metrics.fetch(FetchOutcome::Denied("image_not_allowed"));
        let text = scrape(&e);
        assert!(text.contains("keygate_kms_key_fetches_total{outcome=\"ok\",deny_code=\"\"} 1\n"), "{text}");
        assert!(
            text.contains("keygate_kms_key_fetches_total{outcome=\"denied\",deny_code=\"image_not_allowed\"} 1\n"),
            "{text}"
        );
        let left: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("keygate_kms_lease_remaining_seconds "))
            .and_then(|v| v.parse().ok())
            .expect("lease gauge");
        assert!((590.0..=600.0).contains(&left), "{left}");
    }
}
