//! `keygate-enclave-dev`: the key release enclave with the mock NSM, for the end-to-end tests,
//! the demo and the bench. It is `keygate-enclave` plus one NSM backend, `--nsm mock`, whose
//! attestation documents are signed by a test PKI derived from `--mock-seed`: never put this
//! binary in an enclave image. Being a different binary (not a cargo feature of the production
//! one) is what keeps the mock NSM out of `keygate-enclave` whatever the workspace build
//! enables; `--version` names the backends each binary has.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;

use keygate_attestation::mock::{system_clock, MockNsm};
use keygate_attestation::PcrExpectation;
use keygate_enclave::cli::{self, EnclaveArgs, NsmBackend, OpenedNsm, MOCK};

#[derive(Debug, clap::Parser)]
#[command(
    name = "keygate-enclave-dev",
    about = "keygate key release enclave, development build with the mock NSM (NEVER in production)"
)]
struct Cli {
    #[command(flatten)]
    enclave: EnclaveArgs,
    /// Mock NSM: seed of the mock PKI.
    #[arg(long)]
    mock_seed: Option<String>,
    /// Mock NSM: this KRE's PCRs (repeatable).
    #[arg(long = "mock-pcr", value_name = "N=HEX")]
    mock_pcr: Vec<PcrExpectation>,
    /// Mock NSM: the parent instance id (`i-…`) this KRE runs on: PCR4 becomes SHA-384(48
    /// zero bytes ‖ id), as on Nitro, so that cluster members differ (`docs/cluster.md`).
    /// Overrides a `--mock-pcr 4=…`.
    #[arg(long, value_name = "INSTANCE_ID")]
    mock_parent_instance: Option<String>,
    /// Mock NSM: the parent's IAM role ARN: PCR3 becomes SHA-384(48 zero bytes ‖ ARN). Needs
    /// --mock-parent-instance.
    #[arg(long, value_name = "ROLE_ARN", requires = "mock_parent_instance")]
    mock_parent_role: Option<String>,
    /// Benchmarks only: answer releases without waiting for the parent to store their audit
    /// entries (`keygate bench release --write-ahead off` measures what write-ahead costs).
    #[arg(long)]
    bench_without_write_ahead: bool,
    /// Mock NSM: sign documents with the fast crypto backend (aws-lc-rs), randomized rather
    /// than deterministic, so that a benchmark measures the KRE and not the mock's signer.
    #[arg(long)]
    mock_fast_signing: bool,
}

/// Why the mock NSM cannot start.
#[derive(Debug, thiserror::Error)]
enum MockError {
    #[error("--nsm mock needs --mock-seed")]
    NoSeed,
}

/// `--nsm mock`: a [`MockNsm`] from `--mock-seed` and `--mock-pcr`.
#[derive(Debug)]
struct Mock<'a> {
    seed: Option<&'a str>,
    pcrs: &'a [PcrExpectation],
    parent: Option<(&'a str, Option<&'a str>)>,
    fast_signing: bool,
}

impl NsmBackend for Mock<'_> {
    fn name(&self) -> &'static str {
        MOCK
    }

    fn open(&self) -> Result<OpenedNsm, Box<dyn std::error::Error + Send + Sync>> {
        let seed = self.seed.ok_or(MockError::NoSeed)?;
        let pcrs = self.pcrs.iter().map(|e| (e.index, e.value.clone())).collect();
        let mut nsm = MockNsm::new(seed.as_bytes(), pcrs, system_clock()).with_instance("kre");
        if let Some((instance, role)) = self.parent {
            nsm = nsm.with_parent(instance, role);
        }
        if self.fast_signing {
            nsm = nsm.with_fast_signing(keygate_attestation::crypto::default_backend());
        }
        let anchor = nsm.root_anchor();
        for line in [
            "################################################################",
            "#  MOCK NSM IN USE: this KRE's attestation is NOT genuine.     #",
            "#  Documents are signed by a test PKI. NEVER use in production. #",
            "################################################################",
        ] {
            tracing::warn!("{line}");
        }
        Ok(OpenedNsm { nsm: Arc::new(nsm), default_root: Some(anchor) })
    }
}

fn main() -> ExitCode {
    // Started by the demo: die with it, even when it is killed with kill -9.
    keygate_tests::die_with_parent_if_asked();
    let cli: Cli = cli::parse(&[MOCK]);
    let mock = Mock {
        seed: cli.mock_seed.as_deref(),
        pcrs: &cli.mock_pcr,
        parent: cli.mock_parent_instance.as_deref().map(|i| (i, cli.mock_parent_role.as_deref())),
        fast_signing: cli.mock_fast_signing,
    };
    let dev = cli::DevOptions { write_ahead: !cli.bench_without_write_ahead };
    cli::run_with("keygate-enclave-dev", cli.enclave, &[&mock], dev)
}
