//! `keygate`: the command-line tool for every actor outside the key release enclave:
//! attestation tools, the control-plane fetch client, the parent proxy, pipeline
//! commands and the local demo. It parses and dispatches; `cmd` holds the verbs, `demo` the
//! demo, `kre_client` the round trip to a KRE, `storage` the parent's durable stores, `error`
//! the failure every verb reports.

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

mod backoff;
mod cmd;
#[cfg(feature = "mock")]
mod demo;
mod error;
mod failover;
mod kre_client;
mod metrics;
mod output;
mod storage;

#[derive(Debug, Parser)]
#[command(name = "keygate", version, about = "keygate: attested key release for confidential control planes")]
struct Cli {
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true)]
    log_json: bool,
    /// Print results as JSON: one document on stdout, a failure as one JSON object on stderr.
    ///
    /// Each verb prints one JSON document on stdout instead of its text (a verb that writes
    /// files: what it wrote; a long-running verb: one JSON line per event it would print) and
    /// a failure as one `{"error":{"code":N,"kind":"refused|input|io|not_serving","message":"…"}}`
    /// line on stderr, with the same exit code; warnings become `{"warning":{"message":"…"}}`
    /// lines on stderr. `completions` and `man` print their artifact as is; the demo and the
    /// benchmarks print text (docs/operations.md).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Verify attestation documents and produce mock ones.
    #[command(subcommand)]
    Attestation(cmd::attestation::AttestationCommand),
    /// The KRE's tamper-evident audit trail: pull, verify offline, show (docs/audit.md).
    #[command(subcommand)]
    Audit(cmd::audit::AuditCommand),
    /// Boot key fetch: attest to the KRE and write the released data keys.
    Fetch(cmd::fetch::FetchArgs),
    /// Forward connections between the host side and the KRE.
    Proxy(cmd::proxy::ProxyArgs),
    /// The parent instance's side as one supervised daemon: the proxies, `state sync` and
    /// `audit pull` following, each restarted after a failure (docs/operations.md).
    Parent(cmd::daemon::DaemonArgs),
    /// Generate an approver (or custodian) P-384 key pair.
    Keygen(cmd::policy::KeygenArgs),
    /// Pipeline-signed policy bundles: init, propose, sign, assemble, verify, show, push.
    #[command(subcommand)]
    Policy(cmd::policy::PolicyCommand),
    /// The KRE's phase (sealed, unsealing M of N, serving), generations, policy head and audit
    /// buffer, as a table or `--json`; exit 0 serving, 4 not serving.
    Status(cmd::status::StatusArgs),
    /// The KRE's sealed state on the parent: store and commit what it exports, hand a
    /// restarted KRE its stored state (docs/durability.md).
    #[command(subcommand)]
    State(cmd::custodian::StateCommand),
    /// Custodians of the state key: genesis and the unseal ceremony (docs/durability.md).
    #[command(subcommand)]
    Custodian(cmd::custodian::CustodianCommand),
    /// Cluster members: join from a serving member, without custodians (docs/cluster.md).
    #[command(subcommand)]
    Member(cmd::member::MemberCommand),
    /// Benchmarks (docs/benchmarks.md); their tables are text even under `--json`.
    #[cfg(feature = "mock")]
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
    /// Run the local demo of the full flow on the mock NSM (text even under `--json`).
    #[cfg(feature = "mock")]
    Demo(demo::DemoArgs),
    /// Build, describe and measure enclave images (EIF).
    #[command(subcommand)]
    Eif(cmd::eif::EifCommand),
    /// Kubernetes KMS v2 plugin: kube-apiserver seals etcd's DEKs with the attested key.
    KmsPlugin(cmd::kms_plugin::KmsPluginArgs),
    /// Print a shell completion script for `keygate` on stdout (the script even under `--json`).
    Completions(cmd::completions::CompletionsArgs),
    /// Write `keygate`'s man pages, one per subcommand, into a directory (`--json` changes
    /// nothing).
    Man(cmd::completions::ManArgs),
}

fn main() -> ExitCode {
    // Started by the demo: die with it, even when it is killed with kill -9.
    #[cfg(feature = "mock")]
    keygate_tests::die_with_parent_if_asked();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    output::set_format(if cli.json { output::Format::Json } else { output::Format::Text });
    keygate_enclave::cli::init_logging(cli.log_json);
    let result = match cli.command {
        Command::Attestation(c) => cmd::attestation::run(c),
        Command::Audit(c) => cmd::audit::run(c),
        Command::Eif(c) => cmd::eif::run(c),
        #[cfg(feature = "mock")]
        Command::Demo(a) => demo::run(a),
        #[cfg(feature = "mock")]
        Command::Bench(c) => cmd::bench::run(c),
        Command::Status(a) => cmd::status::run(a),
        Command::Fetch(a) => cmd::fetch::run(a),
        Command::Keygen(a) => cmd::policy::keygen(a),
        Command::Policy(c) => cmd::policy::run(c),
        Command::Proxy(a) => cmd::proxy::run(a),
        Command::Parent(a) => cmd::daemon::run(a),
        Command::KmsPlugin(a) => cmd::kms_plugin::run(a),
        Command::State(c) => cmd::custodian::run_state(c),
        Command::Custodian(c) => cmd::custodian::run_custodian(c),
        Command::Member(c) => cmd::member::run(c),
        Command::Completions(a) => cmd::completions::completions(a, Cli::command()),
        Command::Man(a) => cmd::completions::man(a, Cli::command()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            output::print_error(&e);
            ExitCode::from(e.code)
        }
    }
}

/// A command line clap refuses: clap's own text and exit code (2), or, when `--json` is among
/// the arguments, the error object (kind `input`). `--help` and `--version` print as clap does.
fn usage_error(e: &clap::Error) -> ExitCode {
    if !e.use_stderr() || !std::env::args_os().any(|a| a == "--json") {
        e.exit()
    }
    let text = e.render().to_string();
    let message = text.trim().strip_prefix("error: ").unwrap_or(text.trim());
    output::set_format(output::Format::Json);
    output::print_error(&error::CliError::input(message));
    ExitCode::from(2)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every subcommand and argument under `cmd` (path from the root) that has no help text;
    /// clap's own `help` subcommand and `--help`/`--version` flags are not ours to document.
    fn undocumented(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if matches!(id, "help" | "version") {
                continue;
            }
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                out.push(format!("{path} <{id}>"));
            }
        }
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            let sub_path = format!("{path} {}", sub.get_name());
            if sub.get_about().is_none() && sub.get_long_about().is_none() {
                out.push(sub_path.clone());
            }
            undocumented(sub, &sub_path, out);
        }
    }

    #[test]
    fn every_subcommand_and_argument_has_help_text() {
        let mut cmd = Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        undocumented(&cmd, "keygate", &mut missing);
        assert!(missing.is_empty(), "no help text for:\n  {}", missing.join("\n  "));
    }

    #[test]
    fn the_clap_definitions_are_consistent() {
        Cli::command().debug_assert();
    }
}
