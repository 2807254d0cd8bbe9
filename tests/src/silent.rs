//! A KRE member that accepts connections and never answers (a hung process, a stalled host):
//! what a client's failover must not wait on. It decides nothing; it counts and holds the
//! connections it accepts (at most [`MAX_HELD`]; more are accepted, counted and closed) until
//! it is dropped.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// Most connections held open at once.
pub const MAX_HELD: usize = 64;

/// A listener on a Unix socket that holds every connection open without a byte of answer.
#[derive(Debug)]
pub struct Silent {
    listen: PathBuf,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Silent {
    /// Listens on `listen` (which must not exist yet).
    pub fn start(listen: &Path) -> std::io::Result<Silent> {
        let listener = UnixListener::bind(listen)?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (accepted.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut held: Vec<UnixStream> = Vec::new();
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                a.fetch_add(1, Ordering::SeqCst);
                if held.len() < MAX_HELD {
                    held.push(conn);
                }
            }
        });
        Ok(Silent { listen: listen.to_path_buf(), accepted, stop, thread: Some(thread) })
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.listen);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
