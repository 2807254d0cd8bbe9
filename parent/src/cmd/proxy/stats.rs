//! What the proxy counts, per channel: connections open now, connections forwarded, those it
//! closed without forwarding (by reason) and how long forwarded ones lasted. Nothing here is
//! secret: channel names, reasons and times only. The counts are the parent's own view; the
//! KRE's refusals inside a forwarded connection are in its status report.

use std::time::Instant;

use keygate_enclave::wire::Channel;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChannelLabel {
    channel: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    channel: &'static str,
    reason: &'static str,
}

/// A proxied connection's lifetime, 1 ms to about 60 s (the default `max_lifetime`).
fn lifetime_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 3.0, 11))
}

/// The proxy's metrics. Cloning shares them (each family is reference-counted).
#[derive(Debug, Clone)]
pub(crate) struct ProxyMetrics {
    open: Family<ChannelLabel, Gauge>,
    forwarded: Family<ChannelLabel, Counter>,
    refused: Family<RefusedLabels, Counter>,
    duration: Family<ChannelLabel, Histogram, fn() -> Histogram>,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self {
            open: Family::default(),
            forwarded: Family::default(),
            refused: Family::default(),
            duration: Family::new_with_constructor(lifetime_histogram),
        }
    }
}

/// A connection being forwarded: counted open until dropped, then its lifetime observed.
pub(crate) struct Open<'a> {
    metrics: &'a ProxyMetrics,
    channel: &'static str,
    since: Instant,
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        let label = ChannelLabel { channel: self.channel };
        self.metrics.open.get_or_create(&label).dec();
        self.metrics.duration.get_or_create(&label).observe(self.since.elapsed().as_secs_f64());
    }
}

impl ProxyMetrics {
    /// Registers the proxy's metrics in `registry` (which carries the daemon's prefix).
    pub(crate) fn register(&self, registry: &mut Registry) {
        let proxy = registry.sub_registry_with_prefix("proxy");
        proxy.register("connections_open", "Connections being forwarded now, by channel", self.open.clone());
        proxy.register("connections", "Connections accepted for forwarding, by channel", self.forwarded.clone());
        proxy.register(
            "connections_refused",
            "Connections closed without forwarding, by channel and reason (a deny code, \
             connection_limit, per_source_limit or kre_unreachable)",
            self.refused.clone(),
        );
        proxy.register_with_unit(
            "connection_duration",
            "Time from accepting a connection to its end, by channel",
            Unit::Seconds,
            self.duration.clone(),
        );
    }

    /// A connection on `channel` starts being served.
    pub(crate) fn open(&self, channel: Channel) -> Open<'_> {
        let label = ChannelLabel { channel: channel.as_str() };
        self.forwarded.get_or_create(&label).inc();
        self.open.get_or_create(&label).inc();
        Open { metrics: self, channel: label.channel, since: Instant::now() }
    }

    /// A connection on `channel` was closed without forwarding, for `reason`.
    pub(crate) fn refused(&self, channel: Channel, reason: &'static str) {
        self.refused.get_or_create(&RefusedLabels { channel: channel.as_str(), reason }).inc();
    }
}
