//! The production verbs, each thin: parse its arguments, call the crate that decides, print.
//! A module per family of verbs, not strictly one per top-level subcommand:
//!
//! | module | verbs |
//! |---|---|
//! | `attestation` | `attestation verify / mock / mock-root` |
//! | `audit` | `audit pull / verify / show` |
//! | `bench` | `bench …` (docs/benchmarks.md) |
//! | `completions` | `completions` and `man` (generated from the clap definitions) |
//! | `custodian` | `state sync` and `custodian init / unseal / reshare` (the sealed state's two sides) |
//! | `daemon` | `parent` (the proxies, `state sync` and `audit pull` as one supervised daemon) |
//! | `eif` | `eif …` |
//! | `fetch` | `fetch` (and the fetch client the KMS plugin, the bench and the demo use) |
//! | `kms_plugin` | `kms-plugin` |
//! | `policy` | `keygen` and `policy …` |
//! | `proxy` | `proxy` |
//! | `reports` | what each verb prints: its `--json` struct and its text (through `crate::output`) |
//! | `status` | `status` (the KRE's own report, as a table or JSON) |
//!
//! `keygate demo` is not here: it lives in `crate::demo`, reached only through its entry point.
//! `bench`, the demo, `attestation mock | mock-root` and `--nsm mock` exist only with the
//! default feature `mock`.

pub(crate) mod args;
pub(crate) mod attestation;
pub(crate) mod audit;
#[cfg(feature = "mock")]
pub(crate) mod bench;
pub(crate) mod completions;
pub(crate) mod custodian;
pub(crate) mod daemon;
pub(crate) mod eif;
pub(crate) mod fetch;
pub(crate) mod kms_plugin;
pub(crate) mod member;
pub(crate) mod policy;
pub(crate) mod proxy;
pub(crate) mod reports;
pub(crate) mod status;
