//! `keygate completions` and `keygate man`: shell completion scripts and man pages, both
//! generated from the clap definitions the caller hands in (`Cli::command()`), so they can
//! never drift from the parser. It decides only where the output goes: completions to stdout,
//! man pages as one file per (sub)command in a directory it creates if missing. It trusts
//! clap_complete and clap_mangen to render; a write that fails is a typed [`GenError`].

use std::io::Write;
use std::path::{Path, PathBuf};

use clap_complete::Shell;

use crate::error::CliError;

#[derive(Debug, clap::Args)]
pub(crate) struct CompletionsArgs {
    /// The shell whose completion script is printed on stdout.
    #[arg(value_enum)]
    shell: Shell,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ManArgs {
    /// Directory the pages are written to (created if missing): keygate.1, keygate-policy.1,
    /// keygate-policy-push.1, … one per subcommand.
    dir: PathBuf,
}

/// Why a completion script or a man page could not be written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum GenError {
    #[error("cannot create the man page directory {}: {source}", dir.display())]
    CreateDir { dir: PathBuf, source: std::io::Error },
    #[error("cannot write man pages to {}: {source}", dir.display())]
    WriteMan { dir: PathBuf, source: std::io::Error },
    #[error("cannot write the completion script: {0}")]
    WriteStdout(std::io::Error),
    #[error("cannot write a man page: {0}")]
    WritePage(#[from] keygate_enclave::atomic::AtomicWriteError),
}

impl From<GenError> for CliError {
    fn from(e: GenError) -> Self {
        Self { code: 3, message: e.to_string() }
    }
}

/// The completion script of `shell` for `cmd`, named as the binary (`keygate`).
pub(crate) fn completion_script(shell: Shell, mut cmd: clap::Command) -> Vec<u8> {
    let name = cmd.get_name().to_owned();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    script
}

/// Writes one man page per visible (sub)command of `cmd` into `dir` (`keygate.1`,
/// `keygate-policy.1`, `keygate-policy-push.1`, …), creating it if missing. Every page's
/// source line names the tool and its version (`keygate 0.1.0`), subcommands' too.
pub(crate) fn write_man_pages(cmd: clap::Command, dir: &Path) -> Result<(), GenError> {
    // Each page rendered in memory, then written atomically (clap_mangen's own `generate_to`
    // writes in place).
    fn write(cmd: clap::Command, source: &str, dir: &Path) -> Result<(), GenError> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            write(sub.clone(), source, dir)?;
        }
        let man = clap_mangen::Man::new(cmd).source(source);
        let mut page = Vec::new();
        man.render(&mut page).map_err(|source| GenError::WriteMan { dir: dir.to_owned(), source })?;
        Ok(keygate_enclave::atomic::write_file(&dir.join(man.get_filename()), &page)?)
    }
    std::fs::create_dir_all(dir).map_err(|source| GenError::CreateDir { dir: dir.to_owned(), source })?;
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let source = format!("{} {}", cmd.get_name(), cmd.get_version().unwrap_or_default());
    write(cmd, source.trim_end(), dir)
}

pub(crate) fn completions(a: CompletionsArgs, cmd: clap::Command) -> Result<(), CliError> {
    let script = completion_script(a.shell, cmd);
    let mut out = std::io::stdout().lock();
    out.write_all(&script).and_then(|()| out.flush()).map_err(GenError::WriteStdout)?;
    Ok(())
}

pub(crate) fn man(a: ManArgs, cmd: clap::Command) -> Result<(), CliError> {
    Ok(write_man_pages(cmd, &a.dir)?)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn top_level_names() -> Vec<String> {
        crate::Cli::command().get_subcommands().map(|c| c.get_name().to_owned()).collect()
    }

    #[test]
    fn bash_script_names_every_top_level_subcommand() {
        let script = String::from_utf8(completion_script(Shell::Bash, crate::Cli::command())).expect("utf-8");
        let names = top_level_names();
        assert!(names.len() >= 10, "{names:?}");
        assert!(names.iter().any(|n| n == "completions") && names.iter().any(|n| n == "man"));
        // The bash script's dispatch has a case `keygate,NAME)` per subcommand.
        let missing: Vec<_> = names.iter().filter(|n| !script.contains(&format!("keygate,{n})"))).collect();
        assert!(missing.is_empty(), "the bash script names no {missing:?}");
    }

    #[test]
    fn every_shell_has_a_script() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish, Shell::Elvish, Shell::PowerShell] {
            let script = completion_script(shell, crate::Cli::command());
            assert!(!script.is_empty(), "{shell}");
        }
    }

    /// Every visible (sub)command's man page name: `keygate`, `keygate-policy`, ….
    fn page_names(cmd: &clap::Command, prefix: &str, out: &mut Vec<String>) {
        let name = if prefix.is_empty() { cmd.get_name().to_owned() } else { format!("{prefix}-{}", cmd.get_name()) };
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
            page_names(sub, &name, out);
        }
        out.push(name);
    }

    #[test]
    fn man_writes_a_roff_page_per_subcommand() {
        let dir = keygate_tests::TempDir::new("keygate-man-unit").expect("dir");
        let out = dir.path().join("man1");
        write_man_pages(crate::Cli::command(), &out).expect("man pages");
        let mut names = Vec::new();
        page_names(&crate::Cli::command(), "", &mut names);
        for must in ["keygate", "keygate-policy", "keygate-policy-push", "keygate-man"] {
            assert!(names.iter().any(|n| n == must), "{must} not among {names:?}");
        }
        for name in &names {
            let page = std::fs::read_to_string(out.join(format!("{name}.1")))
                .unwrap_or_else(|e| panic!("no page {name}.1: {e}"));
            let th = page.lines().find(|l| l.starts_with(".TH ")).unwrap_or_else(|| panic!("{name}.1 is not roff"));
            assert!(th.starts_with(&format!(".TH {name} 1 ")), "{th}");
            assert!(th.contains(concat!("\"keygate ", env!("CARGO_PKG_VERSION"), "\"")), "{th}");
        }
        let written = std::fs::read_dir(&out).expect("dir").count();
        assert_eq!(written, names.len(), "one page per subcommand: {names:?}");
    }

    #[test]
    fn a_refused_directory_is_a_typed_error_with_the_io_exit_code() {
        let dir = keygate_tests::TempDir::new("keygate-man-refused").expect("dir");
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").expect("write");
        let err = write_man_pages(crate::Cli::command(), &file).expect_err("a file is not a directory");
        assert!(matches!(err, GenError::CreateDir { .. } | GenError::WritePage(_)), "{err:?}");
        let cli = CliError::from(err);
        assert_eq!(cli.code, 3);
        assert!(cli.message.contains("not-a-dir"), "{}", cli.message);
        let err = write_man_pages(crate::Cli::command(), &file.join("sub")).expect_err("under a file");
        assert!(matches!(err, GenError::CreateDir { .. }), "{err:?}");
    }
}
