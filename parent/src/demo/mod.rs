//! `keygate demo`: the tour of the product, on ordinary Linux, with no set-up — the only entry
//! point into this folder from the rest of the CLI.
//!
//! Every step states what should happen, does it, and checks that it did; the demo exits 0
//! only if every step behaved as it should. It runs the real binaries (`keygate-enclave-dev`
//! with the mock NSM, `keygate proxy`, `keygate kms-plugin`, the CLI verbs) with the shared
//! process kit of `keygate_tests`; it trusts nothing they say beyond each step's check.
//!
//! Order: [`attestation`] (documents), [`release`] (pipeline, policy, key release, attacks,
//! durability), then [`kms`] on the keys the release part fetched. `keygate demo --cluster`
//! runs the other tour, [`cluster`] (a KRE cluster on a real etcd), instead.

mod attestation;
mod cluster;
mod kms;
mod release;
mod signals;
mod tour;

use crate::error::CliError;

#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Tour the KRE cluster instead (docs/cluster.md): three member KREs on a real etcd (`bash
    /// .ci/etcd-deps.sh` installs it); one is killed and joins again while clients fetch keys.
    #[arg(long)]
    cluster: bool,
}

pub(crate) fn run(args: DemoArgs) -> Result<(), CliError> {
    // SIGINT or SIGTERM: the demo's processes and directories go with it.
    signals::clean_up_on_signal()?;
    let result = if args.cluster { cluster_tour() } else { tour() };
    signals::wait_if_stopping();
    result
}

fn tour() -> Result<(), CliError> {
    println!("keygate demo: attested key release, end to end, on the mock NSM");
    let mut tour = tour::Tour::default();
    attestation::attestation_tour(&mut tour)?;
    let demo_dir = release::key_release_tour(&mut tour)?;
    // The control plane's kube-apiserver seals etcd's DEKs through the KMS v2 plugin, with the
    // keys the first fetch wrote (the plugin's own lease handles revocation in `--kre` mode).
    kms::kms_tour(&mut tour, &demo_dir.path().join(release::KEYS_DIR))?;
    drop(demo_dir);
    tour.finish()
}

fn cluster_tour() -> Result<(), CliError> {
    println!("keygate demo --cluster: a KRE cluster on a real etcd, end to end, on the mock NSM");
    let mut tour = tour::Tour::default();
    cluster::cluster_tour(&mut tour)?;
    tour.finish()
}
