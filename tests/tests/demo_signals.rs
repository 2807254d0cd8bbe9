//! End to end: `keygate demo` stopped by SIGTERM or SIGINT once its KRE is up. It must exit
//! promptly (128 + the signal's number), leave none of the processes it started running, and
//! remove its temporary directories. Killed with SIGKILL it can clean nothing, but its
//! processes still die with it (they ask the kernel to, PR_SET_PDEATHSIG). Its processes are found in /proc (every descendant of
//! the demo, with its start time, so a reused pid is not mistaken for one of them); anything
//! left over is killed before the test ends.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use keygate_tests::{bin, TempDir};

/// How long the demo may take to bring its KRE up (a debug build, a loaded machine).
const UP_LIMIT: Duration = Duration::from_secs(90);
/// How long it may take to stop once signalled.
const STOP_LIMIT: Duration = Duration::from_secs(5);
/// The line the demo prints once its KRE and proxy listen.
const UP_LINE: &str = "the KRE and the proxy are up";

/// `(pid, parent pid, start time)` of every process in /proc.
fn processes() -> Vec<(u32, u32, u64)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        if let Some((ppid, start, _)) = stat(pid) {
            out.push((pid, ppid, start));
        }
    }
    out
}

/// `(parent pid, start time, state)` of `pid`, from /proc/PID/stat (fields after the name,
/// which may hold spaces and parentheses, so split after its last `)`).
fn stat(pid: u32) -> Option<(u32, u64, char)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // rest[0] is field 3 (state), field 4 ppid, field 22 starttime.
    let state = fields.first()?.chars().next()?;
    Some((fields.get(1)?.parse().ok()?, fields.get(19)?.parse().ok()?, state))
}

/// Every descendant of `root`: `pid -> start time`.
fn descendants(root: u32) -> HashMap<u32, u64> {
    let all = processes();
    let mut found: HashMap<u32, u64> = HashMap::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(pid, ppid, start) in &all {
            if ppid == p && found.insert(pid, start).is_none() {
                frontier.push(pid);
            }
        }
    }
    found
}

/// The ones of `procs` still running (same pid and start time, not a zombie).
fn still_running(procs: &HashMap<u32, u64>) -> Vec<u32> {
    procs
        .iter()
        .filter(|(pid, start)| stat(**pid).is_some_and(|(_, s, state)| s == **start && state != 'Z'))
        .map(|(pid, _)| *pid)
        .collect()
}

/// The entries of `dir` the demo made (`keygate-demo*`, and `keygate-etcd*` for the cluster
/// tour's etcd).
fn demo_dirs(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("keygate-demo") || n.starts_with("keygate-etcd"))
        .collect()
}

fn signal(pid: u32, name: &str) {
    assert!(Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status().expect("kill").success());
}

/// Starts the demo with its temporary files in a private directory, signals it once its KRE
/// is up, and checks what it leaves behind.
fn stops_cleanly_on(sig: &str, number: i32) {
    stops_cleanly(&["demo"], UP_LINE, sig, number);
}

/// [`stops_cleanly_on`] for `keygate ARGS`, signalled once it printed `up_line`.
fn stops_cleanly(args: &[&str], up_line: &str, sig: &str, number: i32) {
    let killed = sig == "KILL";
    let tmp = TempDir::new(&format!("keygate-demo-signals-{}-{sig}", args.join("-"))).expect("tmp");
    let mut demo = Command::new(bin("keygate"))
        .args(args)
        .env("TMPDIR", tmp.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("keygate demo");
    let pid = demo.id();
    let (tx, lines) = mpsc::channel();
    let stdout = demo.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let stderr = demo.stderr.take().expect("stderr");
    let err_reader = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());

    let start = Instant::now();
    let mut seen = String::new();
    loop {
        match lines.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
                if line.contains(up_line) {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the demo ended before its KRE was up: {seen}"),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if start.elapsed() > UP_LIMIT {
            let _ = demo.kill();
            panic!("the demo's KRE was not up within {UP_LIMIT:?}: {seen}");
        }
    }
    let children = descendants(pid);
    assert!(!children.is_empty(), "the demo runs its KRE and proxy as processes");
    assert!(!demo_dirs(tmp.path()).is_empty(), "the demo keeps its files under TMPDIR");

    signal(pid, sig);
    let signalled = Instant::now();
    let status = loop {
        if let Some(status) = demo.try_wait().expect("wait") {
            break Some(status);
        }
        if signalled.elapsed() > STOP_LIMIT {
            let _ = demo.kill();
            let _ = demo.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = signalled.elapsed();
    eprintln!("SIG{sig}: the demo exited {took:?} after the signal");
    // Orphans are reparented and reaped by init; give that a moment before looking.
    std::thread::sleep(Duration::from_millis(200));
    let left = still_running(&children);
    for p in &left {
        let _ = Command::new("kill").args(["-KILL", &p.to_string()]).status();
    }
    let dirs = demo_dirs(tmp.path());
    let stderr = err_reader.join().unwrap_or_default();

    let mut wrong = Vec::new();
    match status {
        None => wrong.push(format!("still running {STOP_LIMIT:?} after SIG{sig}")),
        Some(_) if killed => {}
        Some(s) if s.code() != Some(128 + number) => wrong.push(format!("exit status {s}, not {}", 128 + number)),
        Some(_) => {}
    }
    if !left.is_empty() {
        wrong.push(format!("{} of its {} processes outlived it: {left:?}", left.len(), children.len()));
    }
    if !dirs.is_empty() && !killed {
        wrong.push(format!("its temporary directories remain: {dirs:?}"));
    }
    assert!(wrong.is_empty(), "after SIG{sig} ({took:?}):\n  {}\nstderr: {stderr}", wrong.join("\n  "));
    assert!(killed || stderr.contains("stopped"), "it says why it stopped: {stderr}");
}

#[test]
fn the_demo_stops_its_processes_and_removes_its_files_on_sigterm() {
    stops_cleanly_on("TERM", 15);
}

#[test]
fn the_demo_stops_its_processes_and_removes_its_files_on_sigint() {
    stops_cleanly_on("INT", 2);
}

#[test]
fn the_demos_processes_die_with_it_on_sigkill() {
    stops_cleanly_on("KILL", 9);
}

/// The cluster tour runs etcd members too: SIGTERM stops them with the KREs and removes their
/// data directory.
#[test]
fn the_cluster_demo_stops_etcd_and_its_kres_and_removes_its_files_on_sigterm() {
    stops_cleanly(&["demo", "--cluster"], "a, b and c are up", "TERM", 15);
}

/// Killed with SIGKILL it cleans nothing, but etcd dies with it too (started through `setpriv
/// --pdeathsig KILL`), as do its KREs.
#[test]
fn the_cluster_demos_processes_die_with_it_on_sigkill() {
    stops_cleanly(&["demo", "--cluster"], "a, b and c are up", "KILL", 9);
}
