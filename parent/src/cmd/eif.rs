//! `keygate eif ...`: build, describe and measure Enclave Image Format files.
//! (Owned by the EIF work; wired into `main.rs` as `Command::Eif`.)

use crate::CliError;

/// `keygate eif` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum EifCommand {}

pub(crate) fn run(cmd: EifCommand) -> Result<(), CliError> {
    match cmd {}
}
