//! `CliError`: how every `keygate` verb reports a failure — one line on stderr (text, or a JSON
//! object under `--json`: `crate::output`) and an exit code (1 refused or verification failed,
//! 2 bad input, 3 I/O, 4 a KRE that answers but does not serve). It decides only the exit code
//! and the kind named for it; the message is the verb's own.

use std::fmt;

/// A failure reported to the user as one line on stderr and a non-zero exit code.
#[derive(Debug)]
pub(crate) struct CliError {
    /// Process exit code: 1 = refused / verification failed, 2 = bad input, 3 = I/O.
    pub(crate) code: u8,
    pub(crate) message: String,
}

impl CliError {
    pub(crate) fn refused(message: impl fmt::Display) -> Self {
        Self { code: 1, message: message.to_string() }
    }
    pub(crate) fn input(message: impl fmt::Display) -> Self {
        Self { code: 2, message: message.to_string() }
    }
    pub(crate) fn io(context: impl fmt::Display, err: impl fmt::Display) -> Self {
        Self { code: 3, message: format!("{context}: {err}") }
    }
    /// The exit code's name in the `--json` error object.
    pub(crate) fn kind(&self) -> &'static str {
        match self.code {
            1 => "refused",
            2 => "input",
            3 => "io",
            4 => "not_serving",
            _ => "error",
        }
    }
}

/// A file not written (a full disk, a refused directory; the previous file is untouched): an
/// I/O failure naming the file and the step.
impl From<keygate_enclave::atomic::AtomicWriteError> for CliError {
    fn from(e: keygate_enclave::atomic::AtomicWriteError) -> Self {
        Self { code: 3, message: e.to_string() }
    }
}
