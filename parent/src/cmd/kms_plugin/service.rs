//! The gRPC service: `v2.KeyManagementService` (Status, Encrypt, Decrypt) over the key ring,
//! under the lease. Every refusal maps to one gRPC code; no message carries key material.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tonic::{Code, Request, Response, Status};

use super::keyring::{KeyringError, MAX_KMS_KEY_ID, MAX_PLAINTEXT, OVERHEAD};
use super::pb::key_management_service_server::KeyManagementService;
use super::pb::{DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse};
use super::{Refusal, Shared};

/// The API version the plugin reports (kube-apiserver checks it).
pub(crate) const API_VERSION: &str = "v2";
/// Longest request `uid` accepted (kube-apiserver sends a UUID).
const MAX_UID: usize = 256;
/// kube-apiserver's limit on annotations (keys + values).
const MAX_ANNOTATIONS: usize = 32 * 1024;

/// The plugin's gRPC service.
#[derive(Debug)]
pub(crate) struct KmsService {
    shared: Arc<Shared>,
}

impl KmsService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

fn keyring_status(e: KeyringError) -> Status {
    let code = match &e {
        KeyringError::UnknownKeyId(_) => Code::NotFound,
        KeyringError::NoKey => Code::Unavailable,
        KeyringError::Seal => Code::Internal,
        _ => Code::InvalidArgument,
    };
    Status::new(code, e.to_string())
}

fn refusal_status(r: Refusal) -> Status {
    let code = match r {
        Refusal::Revoked(_) => Code::PermissionDenied,
        Refusal::Unavailable(_) => Code::Unavailable,
    };
    Status::new(code, r.to_string())
}

fn poisoned() -> Status {
    Status::internal("internal: state lock poisoned")
}

/// A request that breaks the API's limits (before any key is touched).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
enum RequestError {
    #[error("uid is {0} bytes; at most {MAX_UID}")]
    UidTooLong(usize),
    #[error("annotations total {0} bytes; the limit is {MAX_ANNOTATIONS}")]
    AnnotationsTooLarge(usize),
    #[error("unexpected annotations: keygate's ciphertexts carry none")]
    UnexpectedAnnotations,
}

impl From<RequestError> for Status {
    fn from(e: RequestError) -> Self {
        Status::invalid_argument(e.to_string())
    }
}

fn check_uid(uid: &str) -> Result<(), RequestError> {
    if uid.len() > MAX_UID {
        return Err(RequestError::UidTooLong(uid.len()));
    }
    Ok(())
}

/// keygate's Encrypt returns no annotations, so Decrypt accepts none: anything else was not
/// produced by this plugin. The size is checked first, against kube-apiserver's limit.
fn check_annotations(a: &HashMap<String, Vec<u8>>) -> Result<(), RequestError> {
    let size: usize = a.iter().map(|(k, v)| k.len().saturating_add(v.len())).fold(0, usize::saturating_add);
    if size > MAX_ANNOTATIONS {
        return Err(RequestError::AnnotationsTooLarge(size));
    }
    if !a.is_empty() {
        return Err(RequestError::UnexpectedAnnotations);
    }
    Ok(())
}

#[tonic::async_trait]
impl KeyManagementService for KmsService {
    async fn status(&self, request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        self.counted("Status", self.answer_status(request)).await
    }

    async fn encrypt(&self, request: Request<EncryptRequest>) -> Result<Response<EncryptResponse>, Status> {
        self.counted("Encrypt", self.answer_encrypt(request)).await
    }

    async fn decrypt(&self, request: Request<DecryptRequest>) -> Result<Response<DecryptResponse>, Status> {
        self.counted("Decrypt", self.answer_decrypt(request)).await
    }
}

impl KmsService {
    /// Runs one call, counting it by `method` and the code it answers with, and timing it.
    async fn counted<T>(
        &self,
        method: &'static str,
        call: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let start = Instant::now();
        let answer = call.await;
        let code = answer.as_ref().map_or_else(Status::code, |_| Code::Ok);
        self.shared.metrics.operation(method, code, start.elapsed());
        answer
    }

    async fn answer_status(&self, _request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let st = self.shared.read().map_err(|_| poisoned())?;
        let healthz = st.healthz(Instant::now());
        let key_id = st.ring.current().map(|v| st.ring.kms_key_id(v)).unwrap_or_default();
        Ok(Response::new(StatusResponse { version: API_VERSION.to_owned(), healthz, key_id }))
    }

    async fn answer_encrypt(&self, request: Request<EncryptRequest>) -> Result<Response<EncryptResponse>, Status> {
        let req = request.into_inner();
        check_uid(&req.uid)?;
        let plaintext = zeroize::Zeroizing::new(req.plaintext);
        if plaintext.is_empty() || plaintext.len() > MAX_PLAINTEXT {
            return Err(keyring_status(KeyringError::PlaintextSize(plaintext.len())));
        }
        let mut nonce = [0u8; 12];
        {
            use rand_core::RngCore;
            rand_core::OsRng.fill_bytes(&mut nonce);
        }
        let st = self.shared.read().map_err(|_| poisoned())?;
        st.can_encrypt(Instant::now()).map_err(refusal_status)?;
        let (ciphertext, key_id) =
            st.ring.seal(keygate_attestation::crypto::default_backend(), nonce, &plaintext).map_err(keyring_status)?;
        tracing::debug!(uid = %req.uid, key_id = %key_id, "encrypt");
        Ok(Response::new(EncryptResponse { ciphertext, key_id, annotations: HashMap::new() }))
    }

    async fn answer_decrypt(&self, request: Request<DecryptRequest>) -> Result<Response<DecryptResponse>, Status> {
        let req = request.into_inner();
        check_uid(&req.uid)?;
        check_annotations(&req.annotations)?;
        if req.key_id.len() > MAX_KMS_KEY_ID {
            return Err(keyring_status(KeyringError::MalformedKeyId));
        }
        if req.ciphertext.len() <= OVERHEAD || req.ciphertext.len() > OVERHEAD + MAX_PLAINTEXT {
            return Err(keyring_status(KeyringError::CiphertextSize(req.ciphertext.len())));
        }
        let st = self.shared.read().map_err(|_| poisoned())?;
        st.can_decrypt(Instant::now()).map_err(refusal_status)?;
        let result = st.ring.open(keygate_attestation::crypto::default_backend(), &req.key_id, &req.ciphertext);
        drop(st);
        match result {
            Ok(plaintext) => {
                tracing::debug!(uid = %req.uid, key_id = %req.key_id, "decrypt");
                // prost needs an owned Vec: the one copy of the plaintext that leaves the plugin.
                Ok(Response::new(DecryptResponse { plaintext: plaintext.expose().to_vec() }))
            }
            Err(e) => {
                tracing::warn!(uid = %req.uid, error = %e, "decrypt refused");
                Err(keyring_status(e))
            }
        }
    }
}
