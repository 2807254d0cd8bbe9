//! The kit's clean-up on a signal (`track_for_cleanup`, `clean_up`), in a process of its own:
//! the registry is process-wide, and no other test may share it.

use std::process::Command;

use keygate_tests::{clean_up, run_tracked, spawn_logged, track_for_cleanup, Cleaned, KillOnDrop, TempDir};

#[test]
fn clean_up_kills_recorded_children_and_removes_recorded_directories_once() {
    let untracked = TempDir::new("keygate-kit-untracked").expect("dir");
    let before = spawn_logged(Command::new("sleep").arg("30"), &untracked.path().join("before.log")).expect("sleep");
    let mut before = KillOnDrop(before);
    track_for_cleanup();
    let dir = TempDir::new("keygate-kit-cleanup").expect("dir");
    let mut sleeper = spawn_logged(Command::new("sleep").arg("30"), &dir.path().join("sleep.log")).expect("sleep");
    // Reaped by its owner: un-recorded, never killed later under a reused pid.
    let mut owned = KillOnDrop(spawn_logged(&mut Command::new("true"), &dir.path().join("t.log")).expect("true"));
    owned.kill();
    let ran = run_tracked(Command::new("sh").args(["-c", "echo out; echo err >&2"])).expect("sh");
    assert_eq!((ran.stdout.as_slice(), ran.stderr.as_slice()), (&b"out\n"[..], &b"err\n"[..]));
    let path = dir.keep();

    assert_eq!(clean_up(), Cleaned { killed: 1, removed: 1 });
    assert!(!sleeper.wait().expect("wait").success(), "the recorded child is killed");
    assert!(!path.exists(), "the recorded directory is removed");
    assert!(untracked.path().exists(), "a directory made before tracking is its owner's");
    assert!(before.0.try_wait().expect("wait").is_none(), "a child started before tracking is its owner's");
    before.kill();
    assert_eq!(clean_up(), Cleaned { killed: 0, removed: 0 }, "once");

    let late = run_tracked(Command::new("sleep").arg("30")).expect("sleep");
    assert!(!late.status.success(), "a child started after clean-up is killed at once");
}
