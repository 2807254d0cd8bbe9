//! Reading a keygate component's `/metrics` and `/healthz` the way a scraper does: Python's
//! urllib for HTTP and prometheus_client's Prometheus text-format parser (an implementation
//! independent of ours), installed by `.ci/python-deps.sh`.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::run_with_limit;

/// Whether python3 can `import {modules}`. In CI it must (the test fails); elsewhere the
/// caller skips, saying so.
pub fn python_ready(modules: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have Python's {modules}: run .ci/python-deps.sh before the tests"
        );
        eprintln!("SKIPPED Python client: python3 with {modules} not found (run .ci/python-deps.sh)");
    }
    ok
}

/// `{content_type, families: {name: {type, samples: [[name, labels, value]]}}, healthz:
/// [status, body], not_found: status}` of `http://ADDR`.
const SCRAPE_PY: &str = r#"
import json, sys, urllib.error, urllib.request
from prometheus_client.parser import text_string_to_metric_families
base = "http://" + sys.argv[1]
def get(path):
    try:
        r = urllib.request.urlopen(base + path, timeout=10)
        return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()
_, ctype, body = get("/metrics")
families = {f.name: {"type": f.type, "samples": [[s.name, s.labels, s.value] for s in f.samples]}
            for f in text_string_to_metric_families(body)}
status, _, text = get("/healthz")
print(json.dumps({"content_type": ctype, "families": families, "healthz": [status, text],
                  "not_found": get("/nothing")[0]}))
"#;

/// Scrapes `http://{addr}`: `/metrics` parsed, `/healthz`'s status and body, and the status of
/// a path that does not exist.
pub fn scrape(addr: &str) -> serde_json::Value {
    let out = run_with_limit(Command::new("python3").args(["-c", SCRAPE_PY, addr]), Duration::from_secs(60));
    assert!(out.status.success(), "scrape failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON report")
}

/// The value of `sample` with exactly `labels` in `family` of a scrape (0 when absent).
pub fn sample(scraped: &serde_json::Value, family: &str, sample: &str, labels: serde_json::Value) -> f64 {
    let samples = scraped["families"][family]["samples"].as_array().cloned().unwrap_or_default();
    samples.iter().find(|s| s[0] == sample && s[1] == labels).and_then(|s| s[2].as_f64()).unwrap_or(0.0)
}

/// A loopback address with a port free now (bound by the kernel's choice, then released for
/// the component under test to take).
pub fn free_loopback_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    format!("127.0.0.1:{port}")
}
