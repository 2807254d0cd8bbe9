//! The two kinds of Nitro attestation document (an enclave's NSM, an instance's NitroTPM):
//! a leaf type that the parser, the errors and the policies all name.

use std::fmt;

/// Which kind of Nitro attestation document this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DocumentKind {
    /// Produced by a Nitro enclave's NSM: PCRs under `pcrs`.
    Enclave,
    /// Produced by NitroTPM on an EC2 instance (`nitro-tpm-attest`): PCRs under `nitrotpm_pcrs`.
    NitroTpm,
}

impl DocumentKind {
    /// The stable lower-case name used in CLI output, JSON and policies.
    pub fn as_str(self) -> &'static str {
        match self {
            DocumentKind::Enclave => "enclave",
            DocumentKind::NitroTpm => "nitrotpm",
        }
    }
}

impl fmt::Display for DocumentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
