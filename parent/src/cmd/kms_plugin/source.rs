//! Where the plugin's keys come from: a directory of key files (`--keys`), or the KRE itself
//! (`--kre`), re-attesting on the lease.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keygate_attestation::secret::Secret;
use keygate_enclave::peer::client::ClientError;
use keygate_enclave::wire::Id;
use zeroize::Zeroizing;

use super::keyring::{parse_version, Insert};
use super::metrics::FetchOutcome;
use super::{Mode, Shared};
use crate::cmd::fetch::{write_receipt, Fetcher};
use crate::failover::Failover;

/// Most directory entries looked at per scan.
const MAX_DIR_ENTRIES: usize = 4096;

/// The directory could not be read at all.
#[derive(Debug, thiserror::Error)]
#[error("reading {dir}: {source}")]
pub(crate) struct ScanError {
    dir: String,
    source: std::io::Error,
}

/// The result of one scan: the versions found, and the files refused (with why).
#[derive(Debug, Default)]
pub(crate) struct Scan {
    pub(crate) versions: BTreeMap<u32, Secret<32>>,
    pub(crate) refused: Vec<String>,
}

/// Reads every `<key-id>.v<N>.key` in `dir` (as `keygate fetch` writes them): a regular file
/// (not a symlink) of exactly 32 bytes that only its owner can read. Other files are ignored,
/// key files that break a rule are refused and named in `refused`.
pub(crate) fn scan_dir(dir: &Path, key_id: &Id) -> Result<Scan, ScanError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| ScanError { dir: dir.display().to_string(), source };
    let mut scan = Scan::default();
    let prefix = format!("{key_id}.v");
    for entry in std::fs::read_dir(dir).map_err(err)?.take(MAX_DIR_ENTRIES) {
        let entry = entry.map_err(err)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(version) = name.strip_prefix(&prefix).and_then(|r| r.strip_suffix(".key")).and_then(parse_version)
        else {
            continue;
        };
        let path = entry.path();
        let refuse = |why: &str| format!("{}: {why}", path.display());
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) => {
                scan.refused.push(refuse(&e.to_string()));
                continue;
            }
        };
        if !meta.file_type().is_file() {
            scan.refused.push(refuse("not a regular file"));
            continue;
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            scan.refused.push(refuse(&format!("mode {mode:o}: key files must be readable by their owner only")));
            continue;
        }
        match read_key(&path) {
            Ok(Some(key)) => {
                scan.versions.insert(version, key);
            }
            Ok(None) => scan.refused.push(refuse("not exactly 32 bytes")),
            Err(e) => scan.refused.push(refuse(&e.to_string())),
        }
    }
    Ok(scan)
}

fn read_key(path: &Path) -> std::io::Result<Option<Secret<32>>> {
    let mut buf = Zeroizing::new(Vec::with_capacity(33));
    std::fs::File::open(path)?.take(33).read_to_end(&mut buf)?;
    Ok(Secret::from_slice(&buf))
}

/// `--keys`: rescans the directory every `every`, mirroring it into the key ring (a removed
/// file's version is forgotten, a new one becomes current).
pub(crate) async fn watch_dir(shared: Arc<Shared>, dir: std::path::PathBuf, key_id: Id, every: Duration) {
    let mut last_versions: Option<Vec<u32>> = None;
    let mut last_problem: Option<String> = None;
    loop {
        let result = {
            let (dir, key_id) = (dir.clone(), key_id.clone());
            tokio::task::spawn_blocking(move || scan_dir(&dir, &key_id)).await
        };
        let problem = match shared.write() {
            Ok(mut st) => {
                let problem = match result {
                    Ok(Ok(scan)) => {
                        st.ring.replace(scan.versions);
                        if scan.refused.is_empty() {
                            None
                        } else {
                            Some(format!("refused key files: {}", scan.refused.join("; ")))
                        }
                    }
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(e) => Some(format!("scan task: {e}")),
                };
                if let Mode::Dir { problem: p, .. } = &mut st.mode {
                    p.clone_from(&problem);
                }
                let versions = st.ring.versions();
                if last_versions.as_ref() != Some(&versions) {
                    match st.ring.current() {
                        Some(v) => tracing::info!(
                            versions = ?versions,
                            current = %st.ring.kms_key_id(v),
                            "keys loaded from {}",
                            dir.display()
                        ),
                        None => tracing::warn!("no key files {key_id}.v<N>.key in {}: not ready", dir.display()),
                    }
                    last_versions = Some(versions);
                }
                problem
            }
            Err(_) => Some("internal: state lock poisoned".to_owned()),
        };
        if problem != last_problem {
            if let Some(p) = &problem {
                tracing::warn!("{p}");
            }
            last_problem = problem;
        }
        tokio::time::sleep(every).await;
    }
}

/// `--kre`: fetches the key from the KRE, then re-fetches (re-attests) on the lease; drops the
/// keys when the lease says so; keeps each fetch's audit receipt in `receipts`, when given.
/// Each fetch is one round over the KREs in `members` (`failover`): the lease sees the member
/// that served, or the error that decided the round (a refusal, a refused answer, an outage).
/// Runs until the process ends.
pub(crate) async fn refresh_from_kre(
    shared: Arc<Shared>,
    fetcher: Fetcher,
    members: Failover,
    key_id: Id,
    receipts: Option<std::path::PathBuf>,
) {
    loop {
        let (next, drop_at, held) = match shared.read() {
            Ok(st) => match &st.mode {
                Mode::Kre { lease } => (lease.next_attempt(), lease.drop_at(), !st.ring.is_empty()),
                Mode::Dir { .. } => return,
            },
            Err(_) => return,
        };
        let now = Instant::now();
        if let Some(d) = drop_at.filter(|d| held && now >= *d) {
            if let Ok(mut st) = shared.write() {
                st.ring.clear();
            }
            tracing::warn!(ended_ago = ?now.duration_since(d), "lease over: keys dropped (zeroized)");
            continue;
        }
        if now < next {
            let wake = match drop_at.filter(|_| held) {
                Some(d) if d < next => d,
                _ => next,
            };
            tokio::time::sleep_until(wake.into()).await;
            continue;
        }
        let result = match members.run(|kre| fetcher.once_at(kre)).await {
            Ok((fetched, m)) => {
                if members.members().len() > 1 {
                    let kre = members.members().get(m).map(ToString::to_string).unwrap_or_default();
                    tracing::debug!(%kre, "served by");
                }
                Ok(fetched)
            }
            Err(e) => {
                if members.members().len() > 1 {
                    tracing::warn!(error = %e, "no KRE served this refresh");
                }
                Err(e.client_error().clone())
            }
        };
        if let (Ok(fetched), Some(dir)) = (&result, &receipts) {
            // Every release the KRE made is kept, whether or not its keys are taken below: the
            // receipt proves the release's entry must be in the stored trail. A receipt that
            // cannot be written is reported, never a reason to drop keys.
            let (dir, receipt) = (dir.clone(), fetched.receipt.clone());
            match tokio::task::spawn_blocking(move || write_receipt(&dir, &receipt)).await {
                Ok(Ok(path)) => tracing::info!(path = %path.display(), "audit receipt kept"),
                Ok(Err(e)) => tracing::error!(error = %e.message, "audit receipt NOT kept"),
                Err(e) => tracing::error!(error = %e, "audit receipt NOT kept"),
            }
        }
        let done = Instant::now();
        let Ok(mut st) = shared.write() else { return };
        let st = &mut *st;
        let Mode::Kre { lease } = &mut st.mode else { return };
        match result {
            Ok(fetched) if version_jump(st.ring.current(), &fetched.keys, &key_id).is_some() => {
                let why = version_jump(st.ring.current(), &fetched.keys, &key_id).unwrap_or_default();
                lease.on_refused_answer(done, format!("refused the KRE's answer: {why}"));
                shared.metrics.fetch(FetchOutcome::RefusedAnswer);
                tracing::error!(%why, refused_total = lease.refused_answers(), "refused the KRE's answer (versions the KRE's policy cannot produce): keys kept");
            }
            Ok(fetched) => {
                let mut outcome = Ok(Vec::new());
                for k in fetched.keys.iter().filter(|k| k.key_id == key_id) {
                    match st.ring.insert(k.version, k.key.clone()) {
                        Ok(Insert::New) => {
                            if let Ok(v) = &mut outcome {
                                v.push(k.version);
                            }
                        }
                        Ok(Insert::Same) => {}
                        Err(conflict) => outcome = Err(conflict),
                    }
                }
                if outcome.is_ok() {
                    // Versions the policy retired are no longer released: stop opening them.
                    let released: Vec<u32> =
                        fetched.keys.iter().filter(|k| k.key_id == key_id).map(|k| k.version).collect();
                    let retired = st.ring.forget_retired(&released, keygate_enclave::kre::MAX_VERSIONS_RELEASED);
                    if !retired.is_empty() {
                        tracing::warn!(retired = ?retired, "KEK versions retired by the policy: forgotten (zeroized)");
                    }
                }
                match outcome {
                    Ok(_) if st.ring.is_empty() => {
                        lease.on_failure(done, format!("the KRE released no key `{key_id}`"), false);
                        shared.metrics.fetch(FetchOutcome::Error);
                        tracing::error!("the KRE released no key `{key_id}`");
                    }
                    Ok(new) => {
                        lease.on_success(done);
                        shared.metrics.fetch(FetchOutcome::Ok);
                        let current = st.ring.current().map(|v| st.ring.kms_key_id(v)).unwrap_or_default();
                        if new.is_empty() {
                            tracing::info!(current = %current, "lease renewed (re-attested to the KRE)");
                        } else {
                            tracing::info!(current = %current, new_versions = ?new, "keys fetched from the KRE");
                        }
                    }
                    Err(conflict) => {
                        // Never replace a key that data may be sealed under: keep the held one,
                        // let the lease run down, and say so loudly.
                        let why = format!("the KRE released a different key: {conflict}");
                        tracing::error!("{why}");
                        lease.on_failure(done, why, false);
                        shared.metrics.fetch(FetchOutcome::Conflict);
                    }
                }
            }
            Err(e) if e.is_attack() => {
                // Only someone other than the expected KRE fails the client's checks: keep the
                // held keys (they came from the attested KRE), report, retry with backoff.
                lease.on_refused_answer(done, format!("refused the KRE's answer: {e}"));
                shared.metrics.fetch(FetchOutcome::RefusedAnswer);
                tracing::error!(error = %e, refused_total = lease.refused_answers(), "refused the KRE's answer (an attack on the path, not a revocation): keys kept");
            }
            Err(e) => {
                let revocation = e.is_refusal();
                if revocation {
                    tracing::error!(error = %e, "key fetch refused: encryption stops now, decryption at the lease end");
                } else {
                    tracing::warn!(error = %e, "key fetch failed; retrying with backoff");
                }
                shared.metrics.fetch(match &e {
                    ClientError::Denied { code, .. } => FetchOutcome::Denied(code.as_str()),
                    _ => FetchOutcome::Error,
                });
                lease.on_failure(done, e.to_string(), revocation);
            }
        }
    }
}

/// Why a refresh's versions of `key_id` are ones the KRE's policy cannot produce after the
/// held `current`: the newest went backwards (the policy's KEK version only grows), or the
/// held current version is missing while older ones are still released (a policy retires
/// versions only below a floor, so it cannot retire a version and keep an older one).
pub(crate) fn version_jump(
    current: Option<u32>,
    keys: &[keygate_enclave::peer::client::ReleasedKey],
    key_id: &Id,
) -> Option<String> {
    let held = current?;
    let released: Vec<u32> = keys.iter().filter(|k| &k.key_id == key_id).map(|k| k.version).collect();
    let newest = released.iter().copied().max()?;
    if newest < held {
        return Some(format!("KEK version went backwards: the KRE released up to v{newest}, v{held} is held"));
    }
    if !released.contains(&held) && released.iter().any(|v| *v < held) {
        return Some(format!("KEK version v{held} is missing while older versions are still released"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate_enclave::peer::client::ReleasedKey;

    fn released(key: &str, versions: &[u32]) -> Vec<ReleasedKey> {
        versions
            .iter()
            .map(|v| ReleasedKey { key_id: Id::new(key).expect("id"), version: *v, key: Secret::new([1; 32]) })
            .collect()
    }

    /// What a KRE's policy can produce after a held current version: the same or newer
    /// current, older versions only with the held one (retirement is a floor).
    #[test]
    fn versions_a_policy_cannot_produce_are_refused() {
        let k = Id::new("etcd").expect("id");
        for (held, got, refused) in [
            (None, vec![1], false),
            (Some(3), vec![3, 2, 1], false),
            (Some(3), vec![4, 3, 2, 1], false),
            (Some(3), vec![9], false),
            (Some(3), vec![5, 4], false),
            (Some(3), vec![2, 1], true),
            (Some(3), vec![4, 2], true),
            (Some(3), vec![5, 4, 2], true),
        ] {
            let r = version_jump(held, &released("etcd", &got), &k);
            assert_eq!(r.is_some(), refused, "{held:?} {got:?}: {r:?}");
        }
        // Other key ids do not count.
        assert_eq!(version_jump(Some(3), &released("other", &[1]), &k), None);
    }
}
