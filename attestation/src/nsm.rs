//! The Nitro Secure Module interface and its hardware backend.
//!
//! The hardware backend talks to `/dev/nsm` through `aws-nitro-enclaves-nsm-api`. It compiles
//! everywhere and fails with [`NsmError::DeviceAbsent`] where there is no device. The mock
//! backend (feature `mock`) lives in [`crate::mock`].

use std::fmt;

/// What an attestation document should carry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttestRequest {
    /// `user_data` (≤ [`MAX_USER_DATA`](crate::document::MAX_USER_DATA) bytes).
    pub user_data: Option<Vec<u8>>,
    /// `nonce` (≤ [`MAX_NONCE`](crate::document::MAX_NONCE) bytes).
    pub nonce: Option<Vec<u8>>,
    /// `public_key` (≤ [`MAX_PUBLIC_KEY`](crate::document::MAX_PUBLIC_KEY) bytes; may be empty).
    pub public_key: Option<Vec<u8>>,
}

/// A PCR as the NSM describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcrDescription {
    /// Locked PCRs can no longer be extended.
    pub lock: bool,
    /// The PCR's value.
    pub data: Vec<u8>,
}

/// Why an NSM request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NsmError {
    /// No `/dev/nsm`: not inside a Nitro enclave.
    #[error("no Nitro Secure Module (/dev/nsm not present): not running inside a Nitro enclave")]
    DeviceAbsent,
    /// The device could not be opened.
    #[error("cannot open /dev/nsm")]
    Open,
    /// The NSM returned an error code.
    #[error("NSM returned an error: {0}")]
    Device(String),
    /// The NSM answered with an unexpected response type.
    #[error("NSM returned an unexpected response")]
    UnexpectedResponse,
    /// A request field exceeds the NSM's limits.
    #[error("request field `{0}` too large")]
    TooLarge(&'static str),
    /// The mock NSM could not produce a document.
    #[error("mock NSM: {0}")]
    Mock(String),
}

/// A source of attestation documents and randomness.
pub trait Nsm: Send + Sync + fmt::Debug {
    /// "hardware" or "mock": said loudly at start-up.
    fn kind(&self) -> &'static str;
    /// An attestation document (COSE_Sign1 bytes) carrying `req`.
    fn attest(&self, req: &AttestRequest) -> Result<Vec<u8>, NsmError>;
    /// Describes PCR `index`.
    fn describe_pcr(&self, index: u16) -> Result<PcrDescription, NsmError>;
    /// Fills `buf` with random bytes from the module.
    fn random(&self, buf: &mut [u8]) -> Result<(), NsmError>;
}

pub(crate) fn check_request(req: &AttestRequest) -> Result<(), NsmError> {
    if req.user_data.as_ref().is_some_and(|v| v.len() > crate::document::MAX_USER_DATA) {
        return Err(NsmError::TooLarge("user_data"));
    }
    if req.nonce.as_ref().is_some_and(|v| v.len() > crate::document::MAX_NONCE) {
        return Err(NsmError::TooLarge("nonce"));
    }
    if req.public_key.as_ref().is_some_and(|v| v.len() > crate::document::MAX_PUBLIC_KEY) {
        return Err(NsmError::TooLarge("public_key"));
    }
    Ok(())
}

/// The real NSM at `/dev/nsm`.
#[derive(Debug)]
pub struct HardwareNsm {
    fd: i32,
}

/// Path of the NSM device inside a Nitro enclave.
pub const NSM_DEVICE: &str = "/dev/nsm";

impl HardwareNsm {
    /// Opens `/dev/nsm`.
    pub fn open() -> Result<Self, NsmError> {
        if !std::path::Path::new(NSM_DEVICE).exists() {
            return Err(NsmError::DeviceAbsent);
        }
        let fd = aws_nitro_enclaves_nsm_api::driver::nsm_init();
        if fd < 0 {
            return Err(NsmError::Open);
        }
        Ok(Self { fd })
    }

    fn request(&self, req: aws_nitro_enclaves_nsm_api::api::Request) -> aws_nitro_enclaves_nsm_api::api::Response {
        aws_nitro_enclaves_nsm_api::driver::nsm_process_request(self.fd, req)
    }
}

impl Drop for HardwareNsm {
    fn drop(&mut self) {
        aws_nitro_enclaves_nsm_api::driver::nsm_exit(self.fd);
    }
}

impl Nsm for HardwareNsm {
    fn kind(&self) -> &'static str {
        "hardware"
    }

    fn attest(&self, req: &AttestRequest) -> Result<Vec<u8>, NsmError> {
        use aws_nitro_enclaves_nsm_api::api::{Request, Response};
        check_request(req)?;
        let r = self.request(Request::Attestation {
            user_data: req.user_data.clone().map(Into::into),
            nonce: req.nonce.clone().map(Into::into),
            public_key: req.public_key.clone().map(Into::into),
        });
        match r {
            Response::Attestation { document } => Ok(document),
            Response::Error(e) => Err(NsmError::Device(format!("{e:?}"))),
            _ => Err(NsmError::UnexpectedResponse),
        }
    }

    fn describe_pcr(&self, index: u16) -> Result<PcrDescription, NsmError> {
        use aws_nitro_enclaves_nsm_api::api::{Request, Response};
        match self.request(Request::DescribePCR { index }) {
            Response::DescribePCR { lock, data } => Ok(PcrDescription { lock, data }),
            Response::Error(e) => Err(NsmError::Device(format!("{e:?}"))),
            _ => Err(NsmError::UnexpectedResponse),
        }
    }

    fn random(&self, buf: &mut [u8]) -> Result<(), NsmError> {
        use aws_nitro_enclaves_nsm_api::api::{Request, Response};
        let mut filled = 0;
        // The NSM returns up to 256 bytes per request; bound the number of requests.
        let mut budget = buf.len() / 16 + 16;
        while filled < buf.len() {
            if budget == 0 {
                return Err(NsmError::UnexpectedResponse);
            }
            budget -= 1;
            match self.request(Request::GetRandom {}) {
                Response::GetRandom { random } => {
                    let n = random.len().min(buf.len() - filled);
                    buf[filled..filled + n].copy_from_slice(&random[..n]);
                    filled += n;
                }
                Response::Error(e) => return Err(NsmError::Device(format!("{e:?}"))),
                _ => return Err(NsmError::UnexpectedResponse),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardware_backend_reports_missing_device() {
        if std::path::Path::new(NSM_DEVICE).exists() {
            return; // inside a real enclave: nothing to assert here
        }
        assert_eq!(HardwareNsm::open().map(|_| ()), Err(NsmError::DeviceAbsent));
    }
}
