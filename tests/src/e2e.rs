//! What the end-to-end test files share beside the process kit: the mock PCR arguments, the
//! checks of a command's outcome, a one-image release policy, a process with its log file, and
//! the development KRE (`keygate-enclave-dev` with the mock NSM) on a Unix socket with the
//! parent's audit follower. It decides nothing for the product and trusts the binaries only to exit or to
//! open their sockets; every helper panics with the output when a check fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::{bin, keygate, spawn_logged, wait_for_socket, AuditFollower, KillOnDrop};

/// How long a started process may take to open its socket.
pub const START_LIMIT: Duration = Duration::from_secs(15);

/// 48 bytes of `b`, in hex: a mock PCR value.
pub fn hex48(b: u8) -> String {
    format!("{b:02x}").repeat(48)
}

/// `flag I=hex48(b)` for PCR0 up to PCR`count - 1`, as command-line arguments.
pub fn pcr_args(flag: &str, b: u8, count: u8) -> Vec<String> {
    (0..count).flat_map(|i| [flag.to_owned(), format!("{i}={}", hex48(b))]).collect()
}

/// `0=HEX,1=HEX,2=HEX` with every PCR `hex48(b)` (an image for `policy propose --allow`).
pub fn pcr_list(b: u8) -> String {
    (0..3).map(|i| format!("{i}={}", hex48(b))).collect::<Vec<_>>().join(",")
}

/// A path as a command-line argument.
pub fn path_arg(p: &Path) -> String {
    p.display().to_string()
}

/// The address of the Unix socket `sock` (`unix:PATH`).
pub fn unix(sock: &Path) -> String {
    format!("unix:{}", sock.display())
}

/// The standard error of `o`, as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `keygate` with owned arguments (30 s limit).
pub fn keygate_args(args: &[String]) -> Output {
    keygate(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Asserts that the command succeeded; returns its standard output.
pub fn ok(o: Output) -> String {
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts that the command was refused (exit 1) with `needle` in its standard error.
pub fn refused(o: Output, needle: &str) {
    exited(&o, 1, needle);
}

/// `keygate policy init --approver APPROVER --threshold 1 --activation-delay DELAY -o OUT`: a
/// genesis bundle with one approver, which must succeed.
pub fn policy_init(approver: &Path, delay: &str, out: &Path) {
    let (a, o) = (path_arg(approver), path_arg(out));
    ok(keygate(&["policy", "init", "--approver", &a, "--threshold", "1", "--activation-delay", delay, "-o", &o]));
}

/// `keygate policy propose --from FROM --allow A ... -o OUT`, which must succeed; its output.
pub fn propose(from: &Path, allow: &[String], out: &Path) -> String {
    let mut args = vec!["policy".to_owned(), "propose".into(), "--from".into(), path_arg(from)];
    for a in allow {
        args.extend(["--allow".into(), a.clone()]);
    }
    args.extend(["-o".into(), path_arg(out)]);
    ok(keygate_args(&args))
}

/// Asserts that the command exited with `code` and `needle` in its standard error.
pub fn exited(o: &Output, code: i32, needle: &str) {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stdout: {} stderr: {e}", String::from_utf8_lossy(&o.stdout));
    assert!(e.contains(needle), "expected `{needle}` in: {e}");
}

/// A release policy: cluster `prod` allows the one image `name` with PCR0-2 `pcrs`.
pub fn prod_policy(name: &str, pcrs: [&str; 3]) -> serde_json::Value {
    serde_json::json!({"clusters": {"prod": {"images": [
        {"name": name, "pcrs": {"0": pcrs[0], "1": pcrs[1], "2": pcrs[2]}}
    ]}}})
}

/// [`prod_policy`] for the mock image whose PCR0-2 are all `hex48(b)`.
pub fn prod_policy_for(name: &str, b: u8) -> serde_json::Value {
    let h = hex48(b);
    prod_policy(name, [&h, &h, &h])
}

/// `keygate-enclave-dev` with the mock NSM seeded `seed`, its standard streams closed (the
/// caller adds `--listen`, the policy, PCRs and anything else).
pub fn dev_kre(seed: &str) -> Command {
    let mut cmd = Command::new(bin("keygate-enclave-dev"));
    cmd.args(["--nsm", "mock", "--mock-seed", seed]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    cmd
}

/// `keygate fetch` of key `etcd` of cluster `prod` from the development KRE at `kre` (PCRs
/// `pcr_list(kre_pcr)`, one value), as the control plane whose mock image has PCR0..2 of
/// `image`, no retries; the key goes to `out`.
pub fn fetch_prod_etcd(seed: &str, kre_pcr: u8, kre: &str, image: u8, out: &Path) -> Output {
    let mut args: Vec<String> =
        ["fetch", "--kre", kre, "--cluster", "prod", "--key-id", "etcd", "--out", &path_arg(out)]
            .iter()
            .map(|x| x.to_string())
            .collect();
    args.extend(["--nsm", "mock", "--mock-seed", seed, "--retries", "0"].map(String::from));
    args.extend(pcr_args("--expect-kre-pcr", kre_pcr, 1));
    args.extend(pcr_args("--mock-pcr", image, 3));
    keygate_args(&args)
}

/// A process of a test, killed when dropped, with its standard error in a log file.
#[derive(Debug)]
pub struct Logged {
    /// The process.
    pub process: KillOnDrop,
    log: PathBuf,
}

impl Logged {
    /// Starts `cmd` with stdin and stdout closed and its standard error in the new file `log`.
    pub fn start(cmd: &mut Command, log: &Path) -> Self {
        let child = spawn_logged(cmd, log).unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        Self { process: KillOnDrop(child), log: log.to_path_buf() }
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until it listens on `sock`; panics with its log when it exits first or after
    /// [`START_LIMIT`].
    pub fn wait_for_socket(&mut self, sock: &Path) {
        if let Err(e) = wait_for_socket(sock, Some(&mut self.process.0), START_LIMIT) {
            panic!("{e}: {}", self.log());
        }
    }

    /// Kills it (kill -9); what it logged.
    pub fn stop(mut self) -> String {
        self.process.kill();
        self.log()
    }
}

/// A running development KRE and the parent's audit follower (releases and state steps are
/// withheld without one); both are stopped when dropped.
#[derive(Debug)]
pub struct DevKre {
    _child: KillOnDrop,
    sock: PathBuf,
    _follower: AuditFollower,
}

impl DevKre {
    /// Starts `cmd` (a [`dev_kre`] listening on `sock`), waits for its release socket, and
    /// follows its audit trail into `followed`.
    pub fn start(cmd: &mut Command, sock: &Path, followed: &Path) -> Self {
        let mut child = KillOnDrop(cmd.spawn().expect("keygate-enclave-dev"));
        if let Err(e) = wait_for_socket(sock, Some(&mut child.0), START_LIMIT) {
            panic!("KRE {e}");
        }
        let follower = AuditFollower::start(&format!("unix:{}.parent", sock.display()), followed);
        Self { _child: child, sock: sock.to_path_buf(), _follower: follower }
    }

    /// The release channel's socket.
    pub fn sock(&self) -> &Path {
        &self.sock
    }

    /// The release channel.
    pub fn addr(&self) -> String {
        unix(&self.sock)
    }

    /// The parent channel (state, audit, status, policy delivery).
    pub fn parent(&self) -> String {
        format!("unix:{}.parent", self.sock.display())
    }

    /// The custodian channel (unseal, reshare).
    pub fn custodian(&self) -> String {
        format!("unix:{}.custodian", self.sock.display())
    }

    /// The member channel, when the KRE was started with `--member-listen` at this path.
    pub fn member(&self) -> String {
        format!("unix:{}.member", self.sock.display())
    }

    /// kill -9 (and the follower with it).
    pub fn kill(self) {
        drop(self);
    }
}

/// The one JSON document a `keygate --json` verb printed on stdout (asserted to be exactly one
/// line, with exit code `code`).
pub fn json_stdout(o: &Output, code: i32) -> serde_json::Value {
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(code), "stdout: {out} stderr: {}", stderr(o));
    assert_eq!(out.lines().count(), 1, "one JSON line expected on stdout: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {out}"))
}

/// The `{"error":{"code","kind","message"}}` object a failed `keygate --json` verb printed as
/// the last line of stderr, after checking its exit code is `code` and every stderr line is JSON.
pub fn json_error(o: &Output, code: i32, kind: &str) -> serde_json::Value {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stdout: {} stderr: {e}", String::from_utf8_lossy(&o.stdout));
    let lines: Vec<serde_json::Value> = e
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|err| panic!("stderr line is not JSON ({err}): {l}")))
        .collect();
    let last = lines.last().unwrap_or_else(|| panic!("nothing on stderr")).clone();
    assert_eq!(last["error"]["code"], code, "{last}");
    assert_eq!(last["error"]["kind"], kind, "{last}");
    assert!(last["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{last}");
    last
}
