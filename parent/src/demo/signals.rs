//! The demo stopped by SIGINT (Ctrl-C) or SIGTERM: it kills the processes it started and
//! removes its temporary directories (the kit records both, [`keygate_tests::clean_up`]), says
//! so on standard error and exits 128 + the signal's number. A signal thread does it, whatever
//! step the demo is in; the demo's own steps then stop at their next check.
//!
//! It decides only when to clean up; what is cleaned is the kit's record. Processes the demo
//! started are killed with SIGKILL: they keep nothing outside the demo's directories.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::error::CliError;

/// A signal arrived: the signal thread is cleaning up and will end the process.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// How long the demo's main thread waits, once a signal arrived, for the signal thread to end
/// the process.
const EXIT_WAIT: Duration = Duration::from_secs(10);

/// Starts recording the demo's processes and directories and the thread that cleans them up
/// on SIGINT or SIGTERM.
pub(super) fn clean_up_on_signal() -> Result<(), CliError> {
    keygate_tests::track_for_cleanup();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::io("starting the demo's signal thread", e))?;
    // Registered before the demo starts anything, so no signal falls between.
    let (mut int, mut term) = rt
        .block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            Ok::<_, std::io::Error>((signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?))
        })
        .map_err(|e| CliError::io("handling SIGINT and SIGTERM", e))?;
    std::thread::Builder::new()
        .name("demo-signals".into())
        .spawn(move || {
            let (name, number) = rt.block_on(async {
                tokio::select! {
                    _ = int.recv() => ("SIGINT", 2),
                    _ = term.recv() => ("SIGTERM", 15),
                }
            });
            STOPPING.store(true, Ordering::SeqCst);
            let done = keygate_tests::clean_up();
            eprintln!(
                "keygate demo: {name}: stopped {} process(es) and removed {} temporary director(ies)",
                done.killed, done.removed
            );
            std::process::exit(128 + number);
        })
        .map_err(|e| CliError::io("starting the demo's signal thread", e))?;
    Ok(())
}

/// Called when the demo's steps end: after a signal, the signal thread ends the process (the
/// steps may have failed because their processes were killed: that is not the demo's
/// outcome), so wait for it.
pub(super) fn wait_if_stopping() {
    if STOPPING.load(Ordering::SeqCst) {
        std::thread::sleep(EXIT_WAIT);
    }
}
