//! The demo's Kubernetes part: a real `keygate kms-plugin` process serving the keys the demo's
//! control plane fetched, driven over its Unix socket with the KMS v2 gRPC calls that
//! kube-apiserver makes (Status, Encrypt, Decrypt), then a key rotation.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use keygate_tests::{spawn_logged, wait_for_socket, ProcessInDir, TempDir};

use super::tour::{Misbehaved, Outcome, Tour};
use crate::cmd::kms_plugin::connect_unix;
use crate::cmd::kms_plugin::pb::key_management_service_client::KeyManagementServiceClient;
use crate::cmd::kms_plugin::pb::{DecryptRequest, EncryptRequest, StatusRequest};
use crate::error::CliError;

/// The cluster label in the plugin's key ids (the demo's cluster).
const CLUSTER: &str = "prod-eu1";

type Client = KeyManagementServiceClient<tonic::transport::Channel>;

/// The plugin process, killed when dropped, and its private directory, removed.
struct Plugin {
    p: ProcessInDir,
}

impl Plugin {
    fn log(&self) -> String {
        std::fs::read_to_string(self.p.dir.join("plugin.log")).unwrap_or_default()
    }
}

/// The key id to serve: `etcd-kek` if present, else the first `<id>.v<N>.key` in `dir`.
fn pick_key(dir: &Path) -> Result<String, CliError> {
    let mut ids: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| CliError::io(format!("reading {}", dir.display()), e))?
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter_map(|n| n.strip_suffix(".key").and_then(|s| s.rsplit_once(".v")).map(|(id, _)| id.to_owned()))
        .collect();
    ids.sort();
    if ids.iter().any(|i| i == "etcd-kek") {
        return Ok("etcd-kek".to_owned());
    }
    ids.into_iter().next().ok_or_else(|| CliError::input(format!("no <key-id>.v<N>.key files in {}", dir.display())))
}

/// Copies the `<key>.v<N>.key` files into a private directory (the demo rotates there, not in
/// the control plane's key directory). Returns the highest version copied.
fn copy_keys(from: &Path, to: &Path, key: &str) -> Result<u32, CliError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().mode(0o700).create(to).map_err(|e| CliError::io("creating the plugin's key dir", e))?;
    let mut newest = 0;
    for e in std::fs::read_dir(from).map_err(|e| CliError::io(format!("reading {}", from.display()), e))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(v) = name.strip_prefix(&format!("{key}.v")).and_then(|r| r.strip_suffix(".key")) else { continue };
        let Ok(v) = v.parse::<u32>() else { continue };
        let target = to.join(&name);
        std::fs::copy(e.path(), &target).map_err(|e| CliError::io("copying a key file", e))?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| CliError::io("restricting a key file", e))?;
        newest = newest.max(v);
    }
    Ok(newest)
}

fn write_new_version(dir: &Path, key: &str, version: u32) -> Result<(), Misbehaved> {
    let bytes = zeroize::Zeroizing::new({
        let mut b = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
        b
    });
    let path = dir.join(format!("{key}.v{version}.key"));
    keygate_enclave::atomic::write_file_with(&path, &*bytes, keygate_enclave::atomic::WriteOptions::PRIVATE)
        .map_err(|e| format!("writing version {version}: {e}").into())
}

async fn connect(sock: &Path, plugin: &mut Plugin) -> Result<Client, Misbehaved> {
    wait_for_socket(sock, Some(&mut plugin.p.child), Duration::from_secs(15)).map_err(|e| match e {
        keygate_tests::SocketWaitError::Exited(status) => format!("the plugin exited ({status}): {}", plugin.log()),
        e => format!("the plugin {e}"),
    })?;
    connect_unix(sock).await.map_err(|e| format!("connecting to the plugin: {e}").into())
}

async fn wait_for_key_id(client: &mut Client, want: &str) -> Outcome {
    let start = Instant::now();
    loop {
        let s = client.status(StatusRequest {}).await.map_err(Misbehaved::because)?.into_inner();
        if s.healthz == "ok" && s.key_id == want {
            return Ok(s.key_id);
        }
        if start.elapsed() > Duration::from_secs(10) {
            return Err(format!("Status still says healthz={:?} key_id={:?}", s.healthz, s.key_id).into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The tour's KMS section, on the key files in `keys_dir` (as `keygate fetch` wrote them).
pub(super) fn kms_tour(tour: &mut Tour, keys_dir: &Path) -> Result<(), CliError> {
    tour.section("Kubernetes: kube-apiserver's KMS v2 plugin on the released key");
    let key = pick_key(keys_dir)?;
    let dir = TempDir::new("keygate-demo-kms").map_err(|e| CliError::io("creating the plugin's directory", e))?;
    let keys = dir.path().join("keys");
    let sock = dir.path().join("kms.sock");
    let exe = std::env::current_exe().map_err(|e| CliError::io("locating keygate", e))?;
    let newest = copy_keys(keys_dir, &keys, &key)?;
    let child = spawn_logged(
        Command::new(exe)
            .args([
                "kms-plugin",
                "--listen",
                &format!("unix:{}", sock.display()),
                "--cluster",
                CLUSTER,
                "--key-id",
                &key,
            ])
            .arg("--keys")
            .arg(&keys)
            .args(["--rescan", "200ms"]),
        &dir.path().join("plugin.log"),
    )
    .map_err(|e| CliError::io("starting keygate kms-plugin", e))?;
    let mut plugin = Plugin { p: ProcessInDir { child, dir: dir.keep() } };
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| CliError::io("runtime", e))?;
    rt.block_on(async {
        let mut client = match connect(&sock, &mut plugin).await {
            Ok(c) => c,
            Err(e) => {
                tour.step("the plugin starts on the released key", Err(e));
                return;
            }
        };
        let first_id = format!("{CLUSTER}/{key}/v{newest}");
        tour.step(
            "the plugin starts on the released key and reports healthy (Status)",
            wait_for_key_id(&mut client, &first_id).await.map(|id| {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&sock).map(|m| m.permissions().mode() & 0o777).unwrap_or(0);
                format!("healthz ok, key_id {id}, socket {} mode {mode:o}", sock.display())
            }),
        );

        // What kube-apiserver does when it generates a DEK seed.
        let seed = zeroize::Zeroizing::new({
            let mut b = vec![0u8; 32];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
            b
        });
        let sealed = client.encrypt(EncryptRequest { plaintext: seed.to_vec(), uid: "demo-1".into() }).await;
        let sealed = sealed.map(|r| r.into_inner());
        tour.step(
            "Encrypt seals a 32-byte DEK seed with the attested key",
            match &sealed {
                Ok(r) => Ok(format!("{}-byte ciphertext under key_id {}", r.ciphertext.len(), r.key_id)),
                Err(e) => Err(Misbehaved::because(e)),
            },
        );
        let Ok(sealed) = sealed else { return };
        let opened = client
            .decrypt(DecryptRequest {
                ciphertext: sealed.ciphertext.clone(),
                uid: "demo-2".into(),
                key_id: sealed.key_id.clone(),
                annotations: Default::default(),
            })
            .await;
        tour.step(
            "Decrypt returns the same seed",
            match opened {
                Ok(r) if r.get_ref().plaintext == *seed => Ok("identical, compared in memory (never printed)".into()),
                Ok(_) => Err("a different plaintext came back".into()),
                Err(e) => Err(Misbehaved::because(e)),
            },
        );
        let mut tampered = sealed.ciphertext.clone();
        if let Some(b) = tampered.last_mut() {
            *b ^= 1;
        }
        let refused = client
            .decrypt(DecryptRequest {
                ciphertext: tampered,
                uid: "demo-3".into(),
                key_id: sealed.key_id.clone(),
                annotations: Default::default(),
            })
            .await;
        tour.step(
            "a ciphertext with one flipped bit is refused",
            match refused {
                Err(s) if s.code() == tonic::Code::InvalidArgument => Ok(format!("refused: {}", s.message())),
                Err(s) => Err(format!("refused with the wrong code: {s}").into()),
                Ok(_) => Err("a tampered ciphertext decrypted".into()),
            },
        );

        // Rotation: a new key version appears; kube-apiserver sees the key_id change.
        let next = newest.saturating_add(1);
        let rotated = match write_new_version(&keys, &key, next) {
            Ok(()) => wait_for_key_id(&mut client, &format!("{CLUSTER}/{key}/v{next}")).await,
            Err(e) => Err(e),
        };
        let old = client
            .decrypt(DecryptRequest {
                ciphertext: sealed.ciphertext.clone(),
                uid: "demo-4".into(),
                key_id: sealed.key_id.clone(),
                annotations: Default::default(),
            })
            .await;
        tour.step(
            "after a rotation Status names the new key_id and the old ciphertext still decrypts",
            match (rotated, old) {
                (Ok(id), Ok(r)) if r.get_ref().plaintext == *seed => {
                    Ok(format!("key_id {} -> {id}; old seed recovered", sealed.key_id))
                }
                (Err(e), _) => Err(e),
                (_, Err(e)) => Err(format!("old ciphertext refused: {e}").into()),
                (_, Ok(_)) => Err("old ciphertext decrypted to something else".into()),
            },
        );
    });
    drop(rt);
    drop(plugin);
    Ok(())
}
