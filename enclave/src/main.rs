//! `keygate-enclave`: the key release enclave process, the binary that goes into an enclave
//! image. Its only NSM backend is the hardware one (`/dev/nsm`); the mock NSM lives in a
//! differently named binary, `keygate-enclave-dev` (crate `enclave-dev/`), and this crate has
//! no code that could select it. Everything else is [`keygate_enclave::cli`].
#![forbid(unsafe_code)]

use std::process::ExitCode;

use keygate_enclave::cli::{self, EnclaveArgs};

#[derive(Debug, clap::Parser)]
#[command(name = "keygate-enclave", about = "keygate key release enclave")]
struct Cli {
    #[command(flatten)]
    enclave: EnclaveArgs,
}

fn main() -> ExitCode {
    let cli: Cli = cli::parse(&[]);
    cli::run("keygate-enclave", cli.enclave, &[])
}
