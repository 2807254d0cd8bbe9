//! End to end: the real `keygate kms-plugin` serving the Kubernetes KMS v2 API on a Unix
//! socket, driven by gRPC clients as kube-apiserver drives it, on key files and on a real
//! `keygate-enclave-dev` (the KRE with the mock NSM) with a short lease.
//!
//! The Rust client below does not use the plugin's generated code: its messages are written
//! by hand from the published k8s.io/kms/apis/v2 api.proto (names and field numbers), so a
//! mistake in the plugin's .proto would show here. A second, independent client in Python
//! (grpcio, stubs generated at test time from the plugin's .proto) runs too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use keygate_tests::e2e::{dev_kre, pcr_args, pcr_list, prod_policy_for, unix, Logged};
use keygate_tests::scrape::{free_loopback_addr, python_ready, sample, scrape};
use keygate_tests::{bin, keygate, run_with_limit, TempDir};
use tonic::{Code, Status};

// ---- the KMS v2 messages (package v2), from the published API ----

#[derive(Clone, PartialEq, prost::Message)]
struct StatusRequest {}

#[derive(Clone, PartialEq, prost::Message)]
struct StatusResponse {
    #[prost(string, tag = "1")]
    version: String,
    #[prost(string, tag = "2")]
    healthz: String,
    #[prost(string, tag = "3")]
    key_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct DecryptRequest {
    #[prost(bytes = "vec", tag = "1")]
    ciphertext: Vec<u8>,
    #[prost(string, tag = "2")]
    uid: String,
    #[prost(string, tag = "3")]
    key_id: String,
    #[prost(map = "string, bytes", tag = "4")]
    annotations: HashMap<String, Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct DecryptResponse {
    #[prost(bytes = "vec", tag = "1")]
    plaintext: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct EncryptRequest {
    #[prost(bytes = "vec", tag = "1")]
    plaintext: Vec<u8>,
    #[prost(string, tag = "2")]
    uid: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct EncryptResponse {
    #[prost(bytes = "vec", tag = "1")]
    ciphertext: Vec<u8>,
    #[prost(string, tag = "2")]
    key_id: String,
    #[prost(map = "string, bytes", tag = "3")]
    annotations: HashMap<String, Vec<u8>>,
}

/// A KMS v2 client over a Unix socket.
#[derive(Clone)]
struct Kms(tonic::client::Grpc<tonic::transport::Channel>);

impl Kms {
    async fn connect(sock: &Path) -> Kms {
        let path = sock.to_path_buf();
        let channel = tonic::transport::Endpoint::from_static("http://kms.invalid")
            .timeout(Duration::from_secs(10))
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?))
                }
            }))
            .await
            .expect("connect to the plugin");
        Kms(tonic::client::Grpc::new(channel))
    }

    async fn call<Q, R>(&mut self, method: &'static str, req: Q) -> Result<R, Status>
    where
        Q: prost::Message + Send + Sync + 'static,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        self.0.ready().await.map_err(|e| Status::unknown(e.to_string()))?;
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
        let codec = tonic::codec::ProstCodec::<Q, R>::default();
        Ok(self.0.unary(tonic::Request::new(req), path, codec).await?.into_inner())
    }

    async fn status(&mut self) -> StatusResponse {
        self.call("/v2.KeyManagementService/Status", StatusRequest {}).await.expect("Status")
    }

    async fn encrypt(&mut self, plaintext: &[u8]) -> Result<EncryptResponse, Status> {
        let req = EncryptRequest { plaintext: plaintext.to_vec(), uid: "uid-e".into() };
        self.call("/v2.KeyManagementService/Encrypt", req).await
    }

    async fn decrypt(&mut self, ciphertext: &[u8], key_id: &str) -> Result<Vec<u8>, Status> {
        self.decrypt_with(ciphertext, key_id, HashMap::new()).await
    }

    async fn decrypt_with(
        &mut self,
        ciphertext: &[u8],
        key_id: &str,
        annotations: HashMap<String, Vec<u8>>,
    ) -> Result<Vec<u8>, Status> {
        let req =
            DecryptRequest { ciphertext: ciphertext.to_vec(), uid: "uid-d".into(), key_id: key_id.into(), annotations };
        self.call::<_, DecryptResponse>("/v2.KeyManagementService/Decrypt", req).await.map(|r| r.plaintext)
    }

    /// Polls Status until `pred` holds (at most `limit`); returns the last Status.
    async fn wait_status(&mut self, limit: Duration, pred: impl Fn(&StatusResponse) -> bool) -> StatusResponse {
        let start = Instant::now();
        loop {
            let s = self.status().await;
            if pred(&s) {
                return s;
            }
            assert!(start.elapsed() < limit, "Status never satisfied the condition within {limit:?}: {s:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

// ---- processes ----

const SEED: &str = "kms-e2e-seed";
const GOOD: u8 = 0x5a;
const KRE_PCR: u8 = 0x4b;

struct Proc {
    process: Logged,
    /// For a KRE: the parent's audit follower (releases are withheld without one).
    follower: Option<keygate_tests::AuditFollower>,
}

impl Proc {
    /// Starts `cmd` with its standard error in the file `log`.
    fn spawn(cmd: &mut Command, log: PathBuf) -> Proc {
        Proc { process: Logged::start(cmd, &log), follower: None }
    }

    fn log(&self) -> String {
        self.process.log()
    }
}

/// A KRE allowing (or not) the GOOD image in cluster `prod`, on `sock`.
fn start_kre(dir: &Path, sock: &Path, allow_good: bool, name: &str) -> Proc {
    let pcr = if allow_good { GOOD } else { 0x77 };
    let policy_path = dir.join(format!("{name}.policy.json"));
    std::fs::write(&policy_path, prod_policy_for("cp", pcr).to_string()).expect("policy");
    let mut cmd = dev_kre(SEED);
    cmd.args(["--listen".into(), unix(sock), "--policy".into(), policy_path.display().to_string()]).args(pcr_args(
        "--mock-pcr",
        KRE_PCR,
        3,
    ));
    let mut p = Proc::spawn(&mut cmd, dir.join(format!("{name}.log")));
    p.process.wait_for_socket(sock);
    let parent = format!("unix:{}.parent", sock.display());
    p.follower = Some(keygate_tests::AuditFollower::start(&parent, &dir.join(format!("{name}.audit"))));
    p
}

fn plugin_args(sock: &Path, extra: &[String]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "kms-plugin".into(),
        "--listen".into(),
        unix(sock),
        "--cluster".into(),
        "prod".into(),
        "--key-id".into(),
        "etcd-kek".into(),
    ];
    a.extend(extra.iter().cloned());
    a
}

/// A plugin on the key directory `keys`, with `more` arguments.
fn start_plugin_on_dir(dir: &Path, keys: &Path, more: &[String]) -> (Proc, PathBuf) {
    let sock = dir.join("kms.sock");
    let mut extra = vec!["--keys".to_owned(), keys.display().to_string(), "--rescan".into(), "100ms".into()];
    extra.extend_from_slice(more);
    let mut p = Proc::spawn(Command::new(bin("keygate")).args(plugin_args(&sock, &extra)), dir.join("plugin.log"));
    p.process.wait_for_socket(&sock);
    (p, sock)
}

fn start_plugin_on_kre(dir: &Path, kre_sock: &Path, lease: &str, grace: &str) -> (Proc, PathBuf) {
    start_plugin_expecting(dir, kre_sock, lease, grace, "kms", pcr_args("--expect-kre-pcr", KRE_PCR, 3))
}

/// A plugin on the KRE at `kre_sock` that accepts the KRE images `expect` names, socket
/// `dir/<name>.sock`.
fn start_plugin_expecting(
    dir: &Path,
    kre_sock: &Path,
    lease: &str,
    grace: &str,
    name: &str,
    expect: Vec<String>,
) -> (Proc, PathBuf) {
    let sock = dir.join(format!("{name}.sock"));
    let mut extra: Vec<String> = vec![
        "--kre".into(),
        unix(kre_sock),
        "--nsm".into(),
        "mock".into(),
        "--mock-seed".into(),
        SEED.into(),
        "--lease".into(),
        lease.into(),
        "--grace".into(),
        grace.into(),
        "--fetch-timeout".into(),
        "2s".into(),
        "--receipts".into(),
        dir.join("plugin-receipts").display().to_string(),
    ];
    extra.extend(pcr_args("--mock-pcr", GOOD, 3));
    extra.extend(expect);
    let log = dir.join(format!("{}.log", if name == "kms" { "plugin" } else { name }));
    let mut p = Proc::spawn(Command::new(bin("keygate")).args(plugin_args(&sock, &extra)), log);
    p.process.wait_for_socket(&sock);
    (p, sock)
}

/// A plugin on the key directory `<dir>/keys` holding version 1 (bytes 0x11): the keys, the
/// plugin and its socket.
fn plugin_with_key_v1(dir: &Path) -> (PathBuf, Proc, PathBuf) {
    let keys = dir.join("keys");
    write_key(&keys, 1, 0x11);
    let (plugin, sock) = start_plugin_on_dir(dir, &keys, &[]);
    (keys, plugin, sock)
}

/// A client of the plugin on `sock`, once the plugin reports itself healthy.
async fn healthy(sock: &Path) -> Kms {
    let mut kms = Kms::connect(sock).await;
    kms.wait_status(Duration::from_secs(10), |s| s.healthz == "ok").await;
    kms
}

fn write_key(keys: &Path, version: u32, byte: u8) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(keys).expect("mkdir");
    let tmp = keys.join(format!(".tmp-{version}"));
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).expect("open");
    f.write_all(&[byte; 32]).expect("write");
    std::fs::rename(&tmp, keys.join(format!("etcd-kek.v{version}.key"))).expect("rename");
}

fn seed(i: u8) -> Vec<u8> {
    (0..32).map(|j| i.wrapping_mul(31).wrapping_add(j)).collect()
}

// ---- on key files ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_encrypt_decrypt_round_trip_and_refusals() {
    let dir = TempDir::new("keygate-kms-plugin").expect("tmp");
    let (_, plugin, sock) = plugin_with_key_v1(dir.path());
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&sock).expect("meta").permissions().mode() & 0o777, 0o600);
    }
    let mut kms = Kms::connect(&sock).await;
    let s = kms.wait_status(Duration::from_secs(10), |s| s.healthz == "ok").await;
    assert_eq!((s.version.as_str(), s.key_id.as_str()), ("v2", "prod/etcd-kek/v1"));

    let pt = seed(1);
    let e = kms.encrypt(&pt).await.expect("encrypt");
    assert_eq!(e.key_id, "prod/etcd-kek/v1");
    assert!(e.annotations.is_empty());
    assert!(!e.ciphertext.is_empty() && e.ciphertext.len() <= 1024, "kube-apiserver's 1 kB limit");
    assert_eq!(kms.decrypt(&e.ciphertext, &e.key_id).await.expect("decrypt"), pt);
    let again = kms.encrypt(&pt).await.expect("encrypt");
    assert_ne!(again.ciphertext, e.ciphertext, "a fresh nonce per encryption");

    // Every single-bit flip and every truncation is refused.
    for i in 0..e.ciphertext.len() {
        let mut t = e.ciphertext.clone();
        t[i] ^= 0x80;
        let err = kms.decrypt(&t, &e.key_id).await.expect_err("tampered ciphertext decrypted");
        assert_eq!(err.code(), Code::InvalidArgument, "byte {i}: {err:?}");
    }
    for n in [0, 1, 13, 29, e.ciphertext.len() - 1] {
        let err = kms.decrypt(&e.ciphertext[..n], &e.key_id).await.expect_err("truncated ciphertext decrypted");
        assert_eq!(err.code(), Code::InvalidArgument, "length {n}");
    }
    // Unknown key ids: another version, cluster or key; and ids that are not ours at all.
    for id in ["prod/etcd-kek/v2", "stage/etcd-kek/v1", "prod/secrets/v1"] {
        let err = kms.decrypt(&e.ciphertext, id).await.expect_err("unknown key_id accepted");
        assert_eq!(err.code(), Code::NotFound, "{id}: {err:?}");
    }
    for id in ["", "etcd-kek", "prod/etcd-kek/v01", &"k".repeat(2000)] {
        let err = kms.decrypt(&e.ciphertext, id).await.expect_err("malformed key_id accepted");
        assert_eq!(err.code(), Code::InvalidArgument, "{id:.20}: {err:?}");
    }
    // Annotations keygate never produced are refused.
    let ann = HashMap::from([("v1.ciphertext.example.com".to_owned(), b"x".to_vec())]);
    let err = kms.decrypt_with(&e.ciphertext, &e.key_id, ann).await.expect_err("annotations accepted");
    assert_eq!(err.code(), Code::InvalidArgument);
    // Sizes are bounded: empty, over 512 bytes, and a message over the gRPC cap.
    assert_eq!(kms.encrypt(&[]).await.expect_err("empty").code(), Code::InvalidArgument);
    assert_eq!(kms.encrypt(&[7; 513]).await.expect_err("513").code(), Code::InvalidArgument);
    assert!(kms.encrypt(&[7; 512]).await.is_ok());
    let huge = kms.encrypt(&vec![7; 200 * 1024]).await.expect_err("200 KiB message accepted");
    assert_ne!(huge.code(), Code::Ok);
    // The plugin still serves, and never logged key or plaintext bytes.
    assert_eq!(kms.decrypt(&e.ciphertext, &e.key_id).await.expect("decrypt"), pt);
    let log = plugin.log();
    assert!(!log.contains(&hex::encode([0x11; 32])) && !log.contains(&hex::encode(&pt)), "{log}");
    assert!(log.contains("keys loaded"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_changes_the_key_id_and_old_ciphertexts_still_decrypt() {
    let dir = TempDir::new("keygate-kms-plugin").expect("tmp");
    let (keys, _plugin, sock) = plugin_with_key_v1(dir.path());
    let mut kms = healthy(&sock).await;
    let old = kms.encrypt(&seed(1)).await.expect("encrypt");
    assert_eq!(old.key_id, "prod/etcd-kek/v1");

    write_key(&keys, 2, 0x22);
    let start = Instant::now();
    kms.wait_status(Duration::from_secs(5), |s| s.key_id == "prod/etcd-kek/v2" && s.healthz == "ok").await;
    eprintln!("rotation seen by Status after {:?}", start.elapsed());
    let new = kms.encrypt(&seed(2)).await.expect("encrypt");
    assert_eq!(new.key_id, "prod/etcd-kek/v2");
    assert_eq!(kms.decrypt(&old.ciphertext, &old.key_id).await.expect("old still decrypts"), seed(1));
    assert_eq!(kms.decrypt(&new.ciphertext, &new.key_id).await.expect("new decrypts"), seed(2));
    // A ciphertext presented under the other version's key_id does not open.
    assert_eq!(kms.decrypt(&old.ciphertext, &new.key_id).await.expect_err("swap").code(), Code::InvalidArgument);

    // The old version's file is removed (retired): its ciphertexts no longer decrypt.
    std::fs::remove_file(keys.join("etcd-kek.v1.key")).expect("rm");
    let start = Instant::now();
    loop {
        match kms.decrypt(&old.ciphertext, &old.key_id).await {
            Err(e) if e.code() == Code::NotFound => break,
            _ => assert!(start.elapsed() < Duration::from_secs(5), "retired version still decrypts"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(kms.decrypt(&new.ciphertext, &new.key_id).await.expect("new decrypts"), seed(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients() {
    let dir = TempDir::new("keygate-kms-plugin").expect("tmp");
    let (_, _plugin, sock) = plugin_with_key_v1(dir.path());
    healthy(&sock).await;
    let (conns, tasks, rounds) = (4usize, 8usize, 25usize);
    let start = Instant::now();
    let mut handles = Vec::new();
    for c in 0..conns {
        let kms = Kms::connect(&sock).await;
        for t in 0..tasks {
            let mut kms = kms.clone();
            handles.push(tokio::spawn(async move {
                for r in 0..rounds {
                    let pt = seed(u8::try_from((c * 97 + t * 13 + r) % 251).unwrap_or(0));
                    let e = kms.encrypt(&pt).await.expect("encrypt");
                    assert_eq!(kms.decrypt(&e.ciphertext, &e.key_id).await.expect("decrypt"), pt);
                }
            }));
        }
    }
    for h in handles {
        h.await.expect("task");
    }
    let n = conns * tasks * rounds;
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{n} concurrent Encrypt+Decrypt pairs in {secs:.2} s ({:.0} pairs/s)",
        f64::from(u32::try_from(n).unwrap_or(0)) / secs
    );
    assert!(start.elapsed() < Duration::from_secs(60));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_without_keys_and_refuses_unsafe_key_files() {
    let dir = TempDir::new("keygate-kms-plugin").expect("tmp");
    let keys = dir.path().join("keys");
    std::fs::create_dir_all(&keys).expect("mkdir");
    let (_plugin, sock) = start_plugin_on_dir(dir.path(), &keys, &[]);
    let mut kms = Kms::connect(&sock).await;
    let s = kms.status().await;
    assert_ne!(s.healthz, "ok");
    assert!(s.key_id.is_empty() && s.healthz.contains("no key files"), "{s:?}");
    assert_eq!(kms.encrypt(&seed(1)).await.expect_err("no key").code(), Code::Unavailable);

    // A group-readable key file is refused and named.
    {
        use std::os::unix::fs::PermissionsExt;
        let p = keys.join("etcd-kek.v1.key");
        std::fs::write(&p, [0x11; 32]).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let s = kms.wait_status(Duration::from_secs(5), |s| s.healthz.contains("mode 640")).await;
        assert!(s.key_id.is_empty(), "{s:?}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let s = kms.wait_status(Duration::from_secs(5), |s| s.healthz == "ok").await;
    assert_eq!(s.key_id, "prod/etcd-kek/v1");
    let e = kms.encrypt(&seed(1)).await.expect("encrypt");
    assert_eq!(kms.decrypt(&e.ciphertext, &e.key_id).await.expect("decrypt"), seed(1));
    // A key file of the wrong length is refused too, and Status says so.
    std::fs::write(keys.join("etcd-kek.v2.key"), [0x22; 31]).expect("write");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(keys.join("etcd-kek.v2.key"), std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let s = kms.wait_status(Duration::from_secs(5), |s| s.healthz.contains("not exactly 32 bytes")).await;
    assert_eq!(s.key_id, "prod/etcd-kek/v1");
}

#[test]
fn bad_command_lines_are_refused() {
    let dir = TempDir::new("keygate-kms-plugin").expect("tmp");
    let sock = format!("unix:{}", dir.path().join("s").display());
    let d = dir.path().display().to_string();
    let base = ["kms-plugin", "--listen", &sock, "--cluster", "prod", "--key-id", "etcd-kek"];
    let cases: Vec<Vec<&str>> = vec![
        vec!["--keys", &d, "--kre", "unix:/nonexistent"],
        vec![],
        vec!["--kre", "unix:/nonexistent", "--nsm", "mock", "--mock-seed", "s"],
        vec!["--keys", &d, "--lease", "0s"],
        vec!["--keys", &d, "--lease", "10s", "--grace", "11s"],
        vec!["--keys", &d, "--lease", "ten"],
    ];
    for extra in cases {
        let args: Vec<&str> = base.iter().copied().chain(extra.iter().copied()).collect();
        let o = keygate(&args);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let o = keygate(&["kms-plugin", "--listen", "tcp:127.0.0.1:1", "--cluster", "p", "--key-id", "k", "--keys", &d]);
    assert_eq!(o.status.code(), Some(2));
}

// ---- the independent Python client ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_agrees_with_the_plugin() {
    if !python_ready("grpc, grpc_tools") {
        return;
    }
    let dir = TempDir::new("keygate-kms-plugin").expect("tmp");
    let (_, _plugin, sock) = plugin_with_key_v1(dir.path());
    let mut kms = healthy(&sock).await;
    // Rust seals, Python opens; Python seals, Rust opens.
    let mine = kms.encrypt(&seed(9)).await.expect("encrypt");
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = run_with_limit(
        Command::new("python3")
            .arg(manifest.join("python/kms_client.py"))
            .arg("--socket")
            .arg(&sock)
            .arg("--proto")
            .arg(manifest.join("../parent/proto/kms/v2/api.proto"))
            .arg("--workdir")
            .arg(dir.path().join("py"))
            .args(["--expect-key-id", "prod/etcd-kek/v1"])
            .args(["--foreign-key-id", &mine.key_id])
            .args(["--foreign-ciphertext", &hex::encode(&mine.ciphertext)])
            .args(["--foreign-plaintext", &hex::encode(seed(9))]),
        Duration::from_secs(120),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "python client failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(stdout.trim().lines().last().unwrap_or_default()).expect("JSON report");
    assert_eq!(report["failed"], 0, "{report}");
    assert!(report["passed"].as_u64().unwrap_or(0) >= 8, "{report}");
    let theirs = &report["sample"];
    let ct = hex::decode(theirs["ciphertext"].as_str().expect("ct")).expect("hex");
    let pt = hex::decode(theirs["plaintext"].as_str().expect("pt")).expect("hex");
    let id = theirs["key_id"].as_str().expect("key_id");
    assert_eq!(kms.decrypt(&ct, id).await.expect("Python's ciphertext decrypts"), pt);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_healthz_over_http_parse_as_prometheus_text() {
    if !python_ready("prometheus_client") {
        return;
    }
    let dir = TempDir::new("keygate-kms-plugin").expect("tmp");
    let keys = dir.path().join("keys");
    write_key(&keys, 1, 0x11);
    let addr = free_loopback_addr();
    let (plugin, sock) = start_plugin_on_dir(dir.path(), &keys, &["--metrics-listen".into(), addr.clone()]);
    let mut kms = healthy(&sock).await;
    let before = scrape(&addr);
    let e = kms.encrypt(&seed(3)).await.expect("encrypt");
    assert_eq!(kms.decrypt(&e.ciphertext, &e.key_id).await.expect("decrypt"), seed(3));
    let after = scrape(&addr);

    let ops = |s: &serde_json::Value, method: &str| {
        sample(
            s,
            "keygate_kms_operations",
            "keygate_kms_operations_total",
            serde_json::json!({"method": method, "code": "OK"}),
        )
    };
    let latency = "keygate_kms_operation_duration_seconds";
    let count = |s: &serde_json::Value, method: &str| {
        sample(s, latency, &format!("{latency}_count"), serde_json::json!({ "method": method }))
    };
    assert!(after["content_type"].as_str().unwrap_or_default().starts_with("text/plain; version=0.0.4"), "{after}");
    assert_eq!(after["families"]["keygate_kms_operations"]["type"], "counter", "{after}");
    assert_eq!(after["families"][latency]["type"], "histogram", "{after}");
    for method in ["Encrypt", "Decrypt"] {
        assert_eq!((ops(&before, method), ops(&after, method)), (0.0, 1.0), "{method}: {after}");
        assert_eq!((count(&before, method), count(&after, method)), (0.0, 1.0), "{method}: {after}");
    }
    assert!(ops(&after, "Status") >= 1.0, "the health polls: {after}");
    let key = serde_json::json!({"key_id": "prod/etcd-kek/v1"});
    assert_eq!(sample(&after, "keygate_kms_current_key_info", "keygate_kms_current_key_info", key), 1.0, "{after}");
    assert_eq!(sample(&after, "keygate_kms_keys_held", "keygate_kms_keys_held", serde_json::json!({})), 1.0);
    assert_eq!(after["healthz"], serde_json::json!([200, "ok\n"]), "{after}");
    assert_eq!(after["not_found"], 404, "{after}");
    assert!(plugin.log().contains("metrics and health served over HTTP"), "{}", plugin.log());
}

// ---- on a real KRE, with a lease ----

/// A KRE upgrade: the plugin names the old image with `--expect-kre-pcr` and the new one with
/// `--expect-kre-image`, and is served by a KRE of the new image; a plugin that names neither
/// the running image never holds a key and says why in its health.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_accepts_either_kre_image_during_an_upgrade() {
    let dir = TempDir::new("keygate-kms-plugin").expect("tmp");
    let kre_sock = dir.path().join("kre.sock");
    let _kre = start_kre(dir.path(), &kre_sock, true, "kre1");
    let expecting = |image: u8| {
        let mut e = pcr_args("--expect-kre-pcr", 0x11, 3);
        e.extend(["--expect-kre-image".into(), pcr_list(image)]);
        e
    };
    let (upgraded, sock) = start_plugin_expecting(dir.path(), &kre_sock, "30s", "5s", "upgraded", expecting(KRE_PCR));
    let mut kms = Kms::connect(&sock).await;
    let s = kms.wait_status(Duration::from_secs(15), |s| s.healthz == "ok").await;
    assert_eq!(s.key_id, "prod/etcd-kek/v1", "{}", upgraded.log());
    let e = kms.encrypt(&seed(5)).await.expect("encrypt");
    assert_eq!(kms.decrypt(&e.ciphertext, &e.key_id).await.expect("decrypt"), seed(5));

    let (stale, sock) = start_plugin_expecting(dir.path(), &kre_sock, "30s", "5s", "stale", expecting(0x22));
    let mut kms = Kms::connect(&sock).await;
    let s = kms.wait_status(Duration::from_secs(15), |s| s.healthz.contains("attestation refused")).await;
    assert!(s.healthz.contains("PCR0 mismatch"), "{}: {}", s.healthz, stale.log());
    assert!(kms.encrypt(&seed(6)).await.is_err(), "no key, no Encrypt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kre_lease_is_renewed_and_a_revoked_image_stops_within_the_lease() {
    let dir = TempDir::new("keygate-kms-plugin").expect("tmp");
    let kre_sock = dir.path().join("kre.sock");
    let kre = start_kre(dir.path(), &kre_sock, true, "kre1");
    let (plugin, sock) = start_plugin_on_kre(dir.path(), &kre_sock, "2s", "1s");
    let mut kms = Kms::connect(&sock).await;
    let start = Instant::now();
    let s = kms.wait_status(Duration::from_secs(15), |s| s.healthz == "ok").await;
    eprintln!("first fetch: Status ok after {:?}", start.elapsed());
    assert_eq!(s.key_id, "prod/etcd-kek/v1");
    let e = kms.encrypt(&seed(3)).await.expect("encrypt");
    assert_eq!(kms.decrypt(&e.ciphertext, &e.key_id).await.expect("decrypt"), seed(3));

    // Longer than one lease: it is renewed by re-attesting, so the plugin stays healthy.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    assert_eq!(kms.status().await.healthz, "ok", "{}", plugin.log());
    assert!(kms.encrypt(&seed(4)).await.is_ok());
    assert!(plugin.log().matches("lease renewed").count() >= 2, "{}", plugin.log());
    // Every fetch (the first and each renewal) kept its audit receipt, and the trail the
    // parent's follower stored holds each one's entry.
    let receipts = dir.path().join("plugin-receipts");
    let kept = std::fs::read_dir(&receipts)
        .map(|d| d.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "receipt")).count())
        .unwrap_or(0);
    assert!(kept >= 3, "{kept} receipts kept: {}", plugin.log());
    let root = dir.path().join("root.pem");
    let s = |p: &Path| p.display().to_string();
    assert!(keygate_tests::keygate(&["attestation", "mock-root", "--seed", SEED, "-o", &s(&root)]).status.success());
    let o = keygate_tests::keygate(&[
        "audit",
        "verify",
        &s(&dir.path().join("kre1.audit")),
        "--root",
        &s(&root),
        "--receipts",
        &s(&receipts),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // The pipeline revokes the image: the KRE restarts with a policy that no longer allows it.
    drop(kre);
    let revoked_at = Instant::now();
    let kre2 = start_kre(dir.path(), &kre_sock, false, "kre2");
    let s = kms.wait_status(Duration::from_secs(5), |s| s.healthz != "ok").await;
    let encrypt_stopped = revoked_at.elapsed();
    assert!(s.healthz.contains("revoked") && s.healthz.contains("image_not_allowed"), "{s:?}");
    assert_eq!(kms.encrypt(&seed(5)).await.expect_err("encrypt after revocation").code(), Code::PermissionDenied);
    let start = Instant::now();
    loop {
        match kms.decrypt(&e.ciphertext, &e.key_id).await {
            Ok(pt) => assert_eq!(pt, seed(3)),
            Err(err) => {
                assert_eq!(err.code(), Code::Unavailable, "{err:?}");
                break;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(5), "decrypt never stopped: {}", plugin.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let decrypt_stopped = revoked_at.elapsed();
    eprintln!("revocation: encrypt refused after {encrypt_stopped:?}, decrypt after {decrypt_stopped:?} (lease 2 s)");
    // One lease after the last renewal once the refusal is seen; lease + grace at worst (if the
    // restarted KRE was not up in time to refuse), plus scheduling slack.
    assert!(decrypt_stopped < Duration::from_millis(4500), "{decrypt_stopped:?}");
    let s = kms.wait_status(Duration::from_secs(2), |s| s.healthz.contains("keys dropped")).await;
    assert!(s.healthz.contains("image_not_allowed"), "{s:?}");
    // The status is computed when asked; the log line comes from the plugin's refresh loop,
    // which may run a moment later on a loaded machine.
    let logged = |p: &Proc, line: &str| {
        let start = Instant::now();
        while !p.log().contains(line) && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        p.log().contains(line)
    };
    assert!(logged(&plugin, "keys dropped"), "{}", plugin.log());
    assert!(logged(&kre2, "request denied"), "{}", kre2.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_before_the_kre_and_keeps_decrypting_for_the_grace_when_it_is_gone() {
    let dir = TempDir::new("keygate-kms-plugin").expect("tmp");
    let kre_sock = dir.path().join("kre.sock");
    // The plugin starts first (as kube-apiserver's static pod may): not ready, retrying.
    let (plugin, sock) = start_plugin_on_kre(dir.path(), &kre_sock, "2s", "2s");
    let mut kms = Kms::connect(&sock).await;
    let s = kms.status().await;
    assert!(s.healthz.contains("no keys yet"), "{s:?}");
    assert_eq!(kms.encrypt(&seed(1)).await.expect_err("no keys yet").code(), Code::Unavailable);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let kre = start_kre(dir.path(), &kre_sock, true, "kre");
    let up = Instant::now();
    kms.wait_status(Duration::from_secs(5), |s| s.healthz == "ok").await;
    eprintln!("KRE up -> Status ok after {:?}", up.elapsed());
    let e = kms.encrypt(&seed(6)).await.expect("encrypt");

    // The KRE goes away (unreachable, not a refusal).
    drop(kre);
    let gone = Instant::now();
    let s = kms.wait_status(Duration::from_secs(5), |s| s.healthz != "ok").await;
    let expired = gone.elapsed();
    assert!(s.healthz.contains("lease expired"), "{s:?}");
    // The outage shows in healthz, not in the key_id: a changed key_id would make kube-apiserver
    // start migrating every DEK seed (KMS v2: Status and Encrypt name the same key_id).
    assert_eq!(s.key_id, e.key_id, "a transient KRE outage keeps the last key_id");
    assert_eq!(kms.encrypt(&seed(7)).await.expect_err("encrypt after the lease").code(), Code::Unavailable);
    // Decrypt-only during the grace…
    assert_eq!(kms.decrypt(&e.ciphertext, &e.key_id).await.expect("decrypt in the grace"), seed(6));
    // …then nothing.
    let start = Instant::now();
    while kms.decrypt(&e.ciphertext, &e.key_id).await.is_ok() {
        assert!(start.elapsed() < Duration::from_secs(5), "decrypt never stopped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dropped = gone.elapsed();
    eprintln!("KRE gone: encrypt refused after {expired:?}, decrypt after {dropped:?} (lease 2 s, grace 2 s)");
    assert!(dropped >= Duration::from_millis(1500) && dropped < Duration::from_millis(5500), "{dropped:?}");
    assert!(kms.status().await.healthz.contains("keys dropped"));
    assert!(plugin.log().contains("retrying with backoff"), "{}", plugin.log());
}

/// A relay between the plugin and the KRE answers refreshes with keys of its own (at a newer
/// version): the plugin refuses every such answer as an attack, keeps the keys it holds
/// (never adopting the relay's version, never reading it as a revocation), and renews as soon
/// as the path is honest again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_cannot_make_the_plugin_adopt_its_keys_or_revoke_its_own() {
    use keygate_tests::relay::{Attack, Relay};
    let dir = TempDir::new("keygate-kms-plugin").expect("tmp");
    let kre_sock = dir.path().join("kre.sock");
    let _kre = start_kre(dir.path(), &kre_sock, true, "kre");
    let relay_sock = dir.path().join("relay.sock");
    let pcrs = (0..3).map(|i| (i, vec![GOOD; 48])).collect();
    let root =
        keygate_attestation::mock::MockNsm::new(SEED.as_bytes(), pcrs, keygate_attestation::mock::system_clock())
            .root_anchor();
    let relay = Relay::start(&relay_sock, &kre_sock, root, Attack::Forward);
    let (plugin, sock) = start_plugin_on_kre(dir.path(), &relay_sock, "2s", "1s");
    let mut kms = Kms::connect(&sock).await;
    kms.wait_status(Duration::from_secs(15), |s| s.healthz == "ok").await;
    let before = kms.encrypt(&seed(3)).await.expect("encrypt");
    assert_eq!(before.key_id, "prod/etcd-kek/v1");

    relay.set_version(2);
    relay.set(Attack::SubstituteReleased);
    let n = relay.handled();
    let start = Instant::now();
    while relay.handled() < n + 2 {
        assert!(start.elapsed() < Duration::from_secs(10), "no refresh through the relay: {}", plugin.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = plugin.log();
    assert!(log.contains("refused the KRE's answer") && log.contains("did not attest"), "{log}");
    // Still the KRE's own key: the relay's v2 was never adopted, nothing was revoked.
    let s = kms.status().await;
    assert!(!s.healthz.contains("revoked"), "{s:?}");
    assert_eq!(kms.decrypt(&before.ciphertext, &before.key_id).await.expect("decrypt"), seed(3));
    if let Ok(e) = kms.encrypt(&seed(4)).await {
        assert_eq!(e.key_id, "prod/etcd-kek/v1", "the relay's version was adopted");
    }

    relay.set(Attack::Forward);
    let s = kms.wait_status(Duration::from_secs(10), |s| s.healthz == "ok").await;
    assert_eq!(s.key_id, "prod/etcd-kek/v1");
    let after = kms.encrypt(&seed(5)).await.expect("encrypt after the attack");
    assert_eq!(kms.decrypt(&after.ciphertext, &after.key_id).await.expect("decrypt"), seed(5));
    assert_eq!(kms.decrypt(&before.ciphertext, &before.key_id).await.expect("decrypt"), seed(3));
}
