//! `keygate attestation ...`
use crate::CliError;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum AttestationCommand {}

pub(crate) fn run(cmd: AttestationCommand) -> Result<(), CliError> {
    match cmd {}
}
