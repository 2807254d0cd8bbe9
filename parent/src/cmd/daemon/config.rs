//! `keygate parent`'s configuration: its keys, their defaults, and where each value comes from,
//! in this order: the flag (`--sync-every`), the environment (`KEYGATE_PARENT_SYNC_EVERY`), the
//! TOML file (`sync_every = "5s"`), the default. It refuses a file key it does not know and a
//! value that does not parse, naming the key and where the value came from. It trusts
//! `parse_duration` and the transport's address parser for the values' syntax; the environment
//! is handed in as a map, so nothing here reads the process's own.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keygate_enclave::net::transport::Addr;

use crate::cmd::args::parse_duration;
use crate::cmd::proxy::{Slots, Timeouts};
use crate::storage::etcd::EtcdUrl;

/// The environment variable of the configuration file's path.
pub(crate) const CONFIG_ENV: &str = "KEYGATE_PARENT_CONFIG";

/// The help text after the flags: the precedence.
const PRECEDENCE: &str = "Every key is a flag, an environment variable KEYGATE_PARENT_<KEY> \
(e.g. KEYGATE_PARENT_SYNC_EVERY) and a key of the TOML file (`sync_every = \"5s\"`); a flag wins \
over the environment, the environment over the file, the file over the default. Unknown file \
keys are refused. Durations: a bare number of seconds or `250ms`, `30s`, `5m`, `1h 30m`.";

/// The flags, one per key (all text, parsed with the other sources' values), and the key list.
macro_rules! keys {
    ($( $(#[doc = $doc:literal])* $key:ident: $value:literal ),* $(,)?) => {
        /// `keygate parent`.
        #[derive(Debug, Default, clap::Args)]
        #[command(after_help = PRECEDENCE)]
        pub(crate) struct DaemonArgs {
            /// The configuration file (TOML). Environment KEYGATE_PARENT_CONFIG.
            #[arg(long, value_name = "FILE")]
            pub(crate) config: Option<PathBuf>,
            $(
                $(#[doc = $doc])*
                #[arg(long, value_name = $value)]
                pub(crate) $key: Option<String>,
            )*
        }

        /// Every key of the configuration, as the file names it.
        pub(crate) const KEYS: &[&str] = &[$(stringify!($key)),*];

        impl DaemonArgs {
            /// The keys given as flags, with their values.
            fn flags(&self) -> BTreeMap<&'static str, String> {
                let mut given = BTreeMap::new();
                $(
                    if let Some(v) = &self.$key {
                        given.insert(stringify!($key), v.clone());
                    }
                )*
                given
            }
        }
    };
}

keys! {
    /// The KRE's parent channel (state, audit; never proxied): vsock:CID:PORT or unix:PATH.
    /// Required. Environment KEYGATE_PARENT_KRE_PARENT.
    kre_parent: "ADDR",
    /// The release channel's host side: unix:PATH, tcp:IP:PORT or tcp:HOST:PORT (a DNS name,
    /// resolved when binding). Required.
    /// Environment KEYGATE_PARENT_RELEASE_LISTEN.
    release_listen: "ADDR",
    /// The KRE's release channel port: vsock:CID:PORT, unix:PATH or tcp:HOST:PORT. Required.
    /// Environment KEYGATE_PARENT_RELEASE_TO.
    release_to: "ADDR",
    /// The custodian channel's host side (opt-in; with --custodian-to): unix:PATH,
    /// tcp:IP:PORT or tcp:HOST:PORT.
    /// Environment KEYGATE_PARENT_CUSTODIAN_LISTEN.
    custodian_listen: "ADDR",
    /// The KRE's custodian channel port (opt-in; with --custodian-listen).
    /// Environment KEYGATE_PARENT_CUSTODIAN_TO.
    custodian_to: "ADDR",
    /// The member channel's host side (opt-in; with --member-to; docs/cluster.md): unix:PATH,
    /// tcp:IP:PORT or tcp:HOST:PORT. Environment KEYGATE_PARENT_MEMBER_LISTEN.
    member_listen: "ADDR",
    /// The KRE's member channel port (`--member-listen` of the KRE; opt-in; with
    /// --member-listen). Environment KEYGATE_PARENT_MEMBER_TO.
    member_to: "ADDR",
    /// The sealed state directory: `state sync` follows when set.
    /// Environment KEYGATE_PARENT_STATE_DIR.
    state_dir: "DIR",
    /// The sealed state in etcd instead of a directory (etcd://HOST:PORT[,HOST:PORT...][/PREFIX]):
    /// `state sync` follows when set. Environment KEYGATE_PARENT_STATE_STORE.
    state_store: "URL",
    /// The audit directory: `audit pull` follows when set.
    /// Environment KEYGATE_PARENT_AUDIT_DIR.
    audit_dir: "DIR",
    /// Where `audit pull` follows into instead of audit_dir: a directory, or etcd
    /// (etcd://HOST:PORT[,HOST:PORT...][/PREFIX]), shared by the parents of a cluster.
    /// Environment KEYGATE_PARENT_AUDIT_STORE.
    audit_store: "DIR|etcd://…",
    /// The pause between state sync rounds (default 5s). Environment KEYGATE_PARENT_SYNC_EVERY.
    sync_every: "DURATION",
    /// How long each audit round waits in the KRE for new entries (default 1s, at most 5s).
    /// Environment KEYGATE_PARENT_AUDIT_FOLLOW.
    audit_follow: "DURATION",
    /// How long a client has to send its first frame's header (default 5s).
    /// Environment KEYGATE_PARENT_FIRST_FRAME_TIMEOUT.
    first_frame_timeout: "DURATION",
    /// How long to connect to the KRE (default 5s). Environment KEYGATE_PARENT_CONNECT_TIMEOUT.
    connect_timeout: "DURATION",
    /// How long a proxied connection may live in all (default 60s).
    /// Environment KEYGATE_PARENT_MAX_LIFETIME.
    max_lifetime: "DURATION",
    /// Most concurrent connections per proxied channel (default 4096).
    /// Environment KEYGATE_PARENT_MAX_CONNECTIONS.
    max_connections: "N",
    /// Most concurrent connections from one source (default 64).
    /// Environment KEYGATE_PARENT_MAX_PER_SOURCE.
    max_per_source: "N",
    /// How long a stop (SIGTERM, SIGINT) waits for the tasks' current steps (default 5s).
    /// Environment KEYGATE_PARENT_SHUTDOWN_GRACE.
    shutdown_grace: "DURATION",
    /// Serve Prometheus metrics and a health check over HTTP here (GET /metrics, /healthz),
    /// e.g. 127.0.0.1:9464; off unless set. Environment KEYGATE_PARENT_METRICS_LISTEN.
    metrics_listen: "IP:PORT",
    /// With metrics_listen: how often the KRE's status is asked for the metrics and health
    /// (default 5s). Environment KEYGATE_PARENT_STATUS_EVERY.
    status_every: "DURATION",
    /// The other members' member channels (their parents' `member_listen`), comma-separated
    /// (a TOML list of strings in the file; at most 16): when the KRE awaits its state, the
    /// daemon joins it from one of them (`keygate member join`), without custodians. Needs
    /// state_dir or state_store. Environment KEYGATE_PARENT_JOIN_FROM.
    join_from: "ADDR,...",
    /// The bundles `policy push --store` keeps (a directory or etcd://…): replayed to the KRE (`policy restore`) when
    /// its policy is behind the head its committed state records (after a join, an adoption
    /// or an unseal). Environment KEYGATE_PARENT_POLICY_STORE.
    policy_store: "DIR|etcd://…",
}

/// One proxied channel: its host side and the KRE's port.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Forward {
    pub(crate) listen: Addr,
    pub(crate) to: Addr,
}

/// What `keygate parent` runs.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// The KRE's parent channel, which the state and audit tasks ask.
    pub(crate) kre_parent: Addr,
    /// The proxies: the release channel, and the custodian channel where configured.
    pub(crate) release: Forward,
    pub(crate) custodian: Option<Forward>,
    /// The member channel, where configured.
    pub(crate) member: Option<Forward>,
    /// `state sync` following into this directory, pausing `sync_every` between rounds.
    pub(crate) state_dir: Option<PathBuf>,
    /// Or into etcd.
    pub(crate) state_store: Option<EtcdUrl>,
    pub(crate) sync_every: Duration,
    /// `audit pull` following into this directory, each round waiting `audit_follow` in the KRE.
    pub(crate) audit_dir: Option<PathBuf>,
    /// Or into this store (a directory or etcd).
    pub(crate) audit_store: Option<crate::storage::audit::AuditStore>,
    pub(crate) audit_follow: Duration,
    /// Each proxy's limits.
    pub(crate) slots: Slots,
    pub(crate) timeouts: Timeouts,
    /// How long a stop waits for the tasks' current steps.
    pub(crate) shutdown_grace: Duration,
    /// Metrics and health over HTTP, asking the KRE's status every `status_every`.
    pub(crate) metrics_listen: Option<std::net::SocketAddr>,
    pub(crate) status_every: Duration,
    /// The members a KRE awaiting its state joins from (none: the member join task is off).
    pub(crate) join_from: Vec<Addr>,
    /// The bundles replayed to a KRE whose policy is behind its committed state's head.
    pub(crate) policy_store: Option<crate::storage::bundles::BundleStore>,
}

/// Most members `join_from` names.
pub(crate) const MAX_JOIN_FROM: usize = crate::failover::MAX_MEMBERS;

/// Where a value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    Flag,
    Env,
    File,
}

/// Why the configuration is refused.
#[derive(Debug, PartialEq, thiserror::Error)]
pub(crate) enum ConfigError {
    #[error("reading the configuration file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("the configuration file {path} is not TOML: {reason}")]
    Syntax { path: PathBuf, reason: String },
    #[error("the configuration file {path} has an unknown key `{key}` (keys: {})", KEYS.join(", "))]
    UnknownKey { path: PathBuf, key: String },
    #[error("{}: {reason}", Described(.origin, .key))]
    BadValue { key: &'static str, origin: Origin, reason: String },
    #[error("`{0}` is not set: give --{flag}, {env} or `{0}` in the configuration file", flag = flag_name(.0), env = env_name(.0))]
    Missing(&'static str),
    #[error("custodian_listen and custodian_to go together: `{0}` is not set")]
    CustodianHalf(&'static str),
    #[error("member_listen and member_to go together: `{0}` is not set")]
    MemberHalf(&'static str),
    #[error("state_dir and state_store exclude each other: the sealed state goes to one store")]
    TwoStateStores,
    #[error("audit_dir and audit_store exclude each other: the audit trail goes to one store")]
    TwoAuditStores,
    #[error("join_from needs the stored state: set state_dir or state_store")]
    JoinWithoutStore,
}

/// A key as its origin names it: `--sync-every`, `KEYGATE_PARENT_SYNC_EVERY`, `file key`.
struct Described<'a>(&'a Origin, &'a str);

impl fmt::Display for Described<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Origin::Flag => write!(f, "flag --{}", flag_name(self.1)),
            Origin::Env => write!(f, "environment {}", env_name(self.1)),
            Origin::File => write!(f, "file key `{}`", self.1),
        }
    }
}

fn flag_name(key: &str) -> String {
    key.replace('_', "-")
}

/// `KEYGATE_PARENT_<KEY>`.
pub(crate) fn env_name(key: &str) -> String {
    format!("KEYGATE_PARENT_{}", key.to_ascii_uppercase())
}

/// The values of every source, before parsing.
struct Layers<'a> {
    flags: BTreeMap<&'static str, String>,
    env: &'a HashMap<String, String>,
    file: BTreeMap<String, String>,
}

impl Layers<'_> {
    /// The value that wins, and where it came from.
    fn raw(&self, key: &str) -> Option<(Origin, &str)> {
        (self.flags.get(key).map(|v| (Origin::Flag, v.as_str())))
            .or_else(|| self.env.get(&env_name(key)).map(|v| (Origin::Env, v.as_str())))
            .or_else(|| self.file.get(key).map(|v| (Origin::File, v.as_str())))
    }

    /// The parsed value of `key`, if any source sets it.
    fn get<T, E: fmt::Display>(
        &self,
        key: &'static str,
        parse: impl Fn(&str) -> Result<T, E>,
    ) -> Result<Option<T>, ConfigError> {
        self.raw(key)
            .map(|(origin, v)| parse(v).map_err(|e| ConfigError::BadValue { key, origin, reason: e.to_string() }))
            .transpose()
    }

    fn required<T, E: fmt::Display>(
        &self,
        key: &'static str,
        parse: impl Fn(&str) -> Result<T, E>,
    ) -> Result<T, ConfigError> {
        self.get(key, parse)?.ok_or(ConfigError::Missing(key))
    }

    fn duration(&self, key: &'static str, default: Duration) -> Result<Duration, ConfigError> {
        Ok(self.get(key, parse_duration)?.unwrap_or(default))
    }

    fn count(&self, key: &'static str, default: usize) -> Result<usize, ConfigError> {
        let parse = |v: &str| v.trim().parse::<usize>().map_err(|_| format!("`{v}` is not a whole number"));
        Ok(self.get(key, parse)?.unwrap_or(default))
    }
}

/// The file's keys and values (as text: a TOML string or integer). Unknown keys are refused.
fn file_values(path: &Path, text: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    let table: toml::Table =
        text.parse().map_err(|e: toml::de::Error| ConfigError::Syntax { path: path.into(), reason: e.to_string() })?;
    let mut values = BTreeMap::new();
    for (key, value) in table {
        let Some(&known) = KEYS.iter().find(|k| **k == key) else {
            return Err(ConfigError::UnknownKey { path: path.into(), key });
        };
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            // A list of strings (`join_from`): the same text as the flag's, comma-separated.
            toml::Value::Array(items) if items.iter().all(toml::Value::is_str) => {
                items.iter().filter_map(toml::Value::as_str).collect::<Vec<_>>().join(",")
            }
            other => {
                return Err(ConfigError::BadValue {
                    key: known,
                    origin: Origin::File,
                    reason: format!("expected a string or a whole number, not a {}", other.type_str()),
                })
            }
        };
        values.insert(known.to_owned(), text);
    }
    Ok(values)
}

/// The configuration from the flags, the environment `env` and the file's `text` (read from
/// `path`), by precedence.
pub(crate) fn resolve(
    args: &DaemonArgs,
    env: &HashMap<String, String>,
    file: Option<(&Path, &str)>,
) -> Result<Config, ConfigError> {
    let file = file.map(|(path, text)| file_values(path, text)).transpose()?.unwrap_or_default();
    let l = Layers { flags: args.flags(), env, file };
    let addr = |v: &str| v.trim().parse::<Addr>();
    let path = |v: &str| Ok::<_, std::convert::Infallible>(PathBuf::from(v));
    let custodian = match (l.get("custodian_listen", addr)?, l.get("custodian_to", addr)?) {
        (Some(listen), Some(to)) => Some(Forward { listen, to }),
        (None, None) => None,
        (Some(_), None) => return Err(ConfigError::CustodianHalf("custodian_to")),
        (None, Some(_)) => return Err(ConfigError::CustodianHalf("custodian_listen")),
    };
    let member = match (l.get("member_listen", addr)?, l.get("member_to", addr)?) {
        (Some(listen), Some(to)) => Some(Forward { listen, to }),
        (None, None) => None,
        (Some(_), None) => return Err(ConfigError::MemberHalf("member_to")),
        (None, Some(_)) => return Err(ConfigError::MemberHalf("member_listen")),
    };
    let secs = Duration::from_secs;
    let state_dir = l.get("state_dir", path)?;
    let state_store = l.get("state_store", |v: &str| v.trim().parse::<EtcdUrl>())?;
    if state_dir.is_some() && state_store.is_some() {
        return Err(ConfigError::TwoStateStores);
    }
    let audit_dir = l.get("audit_dir", path)?;
    let audit_store = l.get("audit_store", |v: &str| v.trim().parse::<crate::storage::audit::AuditStore>())?;
    if audit_dir.is_some() && audit_store.is_some() {
        return Err(ConfigError::TwoAuditStores);
    }
    let join_from = l.get("join_from", addr_list)?.unwrap_or_default();
    if !join_from.is_empty() && state_dir.is_none() && state_store.is_none() {
        return Err(ConfigError::JoinWithoutStore);
    }
    Ok(Config {
        kre_parent: l.required("kre_parent", addr)?,
        release: Forward { listen: l.required("release_listen", addr)?, to: l.required("release_to", addr)? },
        custodian,
        member,
        state_dir,
        state_store,
        sync_every: l.duration("sync_every", secs(5))?,
        audit_dir,
        audit_store,
        audit_follow: l.duration("audit_follow", secs(1))?,
        slots: Slots::new(l.count("max_connections", 4096)?, l.count("max_per_source", 64)?),
        timeouts: Timeouts::new(
            l.duration("first_frame_timeout", secs(5))?,
            l.duration("connect_timeout", secs(5))?,
            l.duration("max_lifetime", secs(60))?,
        ),
        shutdown_grace: l.duration("shutdown_grace", secs(5))?,
        metrics_listen: l.get("metrics_listen", |v: &str| v.trim().parse::<std::net::SocketAddr>())?,
        status_every: l.duration("status_every", secs(5))?,
        join_from,
        policy_store: l.get("policy_store", |v: &str| v.trim().parse::<crate::storage::bundles::BundleStore>())?,
    })
}

/// A comma-separated list of 1 to [`MAX_JOIN_FROM`] addresses, none given twice.
fn addr_list(v: &str) -> Result<Vec<Addr>, String> {
    let n = v.split(',').count();
    if n > MAX_JOIN_FROM {
        return Err(format!("{n} addresses; at most {MAX_JOIN_FROM}"));
    }
    let mut list: Vec<Addr> = Vec::with_capacity(n);
    for item in v.split(',').map(str::trim) {
        if item.is_empty() {
            return Err("an empty address in the list".to_owned());
        }
        let a = item.parse::<Addr>().map_err(|e| format!("`{item}`: {e}"))?;
        if list.contains(&a) {
            return Err(format!("`{item}` is given twice"));
        }
        list.push(a);
    }
    Ok(list)
}

/// [`resolve`] with the file named by `--config` or [`CONFIG_ENV`], read from disk.
pub(crate) fn load(args: &DaemonArgs, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
    let Some(path) = args.config.clone().or_else(|| env.get(CONFIG_ENV).map(PathBuf::from)) else {
        return resolve(args, env, None);
    };
    let text =
        std::fs::read_to_string(&path).map_err(|e| ConfigError::Read { path: path.clone(), reason: e.to_string() })?;
    resolve(args, env, Some((&path, &text)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "parent.toml";
    const BASE: &str =
        "kre_parent = \"unix:/k.parent\"\nrelease_listen = \"tcp:127.0.0.1:5000\"\nrelease_to = \"unix:/k\"\n";

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (env_name(k), (*v).to_owned())).collect()
    }

    fn from(args: &DaemonArgs, pairs: &[(&str, &str)], extra: &str) -> Result<Config, ConfigError> {
        resolve(args, &env(pairs), Some((Path::new(FILE), &format!("{BASE}{extra}"))))
    }

    #[test]
    fn a_flag_wins_over_the_environment_over_the_file_over_the_default() {
        // (flag, environment, file, the value that wins; 0: the defaults) for two keys at once:
        // sync_every (seconds; 5 by default) and max_connections (4096 by default).
        let rows = [
            (Some("7"), Some("8"), Some("9"), 7),
            (Some("7"), Some("8"), None, 7),
            (Some("7"), None, Some("9"), 7),
            (None, Some("8"), Some("9"), 8),
            (None, Some("8"), None, 8),
            (None, None, Some("9"), 9),
            (None, None, None, 0),
        ];
        for (flag, from_env, file, wins) in rows {
            let args = DaemonArgs {
                sync_every: flag.map(str::to_owned),
                max_connections: flag.map(str::to_owned),
                ..DaemonArgs::default()
            };
            let e: Vec<(&str, &str)> =
                from_env.into_iter().flat_map(|v| [("sync_every", v), ("max_connections", v)]).collect();
            let text = file.map(|v| format!("sync_every = \"{v}s\"\nmax_connections = {v}\n")).unwrap_or_default();
            let cfg = from(&args, &e, &text).expect("config");
            let (secs, total) = if wins == 0 { (5, 4096) } else { (wins, wins) };
            let row = format!("flag {flag:?} env {from_env:?} file {file:?}");
            assert_eq!(cfg.sync_every, Duration::from_secs(secs), "{row}");
            assert_eq!(cfg.slots.total, usize::try_from(total).expect("small"), "{row}");
        }
    }

    /// The example the deploy recipe installs (deploy/parent.toml) is a valid configuration
    /// with every task on.
    #[test]
    fn the_deployed_example_configuration_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/parent.toml");
        let text = std::fs::read_to_string(&path).expect("deploy/parent.toml");
        let cfg = resolve(&DaemonArgs::default(), &env(&[]), Some((&path, &text))).expect("the example loads");
        assert!(cfg.custodian.is_some() && cfg.state_dir.is_some(), "{cfg:?}");
    }

    #[test]
    fn defaults_and_optional_tasks() {
        let cfg = from(&DaemonArgs::default(), &[], "").expect("config");
        assert_eq!((cfg.audit_follow, cfg.shutdown_grace), (Duration::from_secs(1), Duration::from_secs(5)));
        assert_eq!((cfg.slots.total, cfg.slots.per_source), (4096, 64));
        assert_eq!(cfg.timeouts.lifetime, Duration::from_secs(60));
        assert!(cfg.custodian.is_none() && cfg.state_dir.is_none() && cfg.audit_dir.is_none());
        let cfg = from(
            &DaemonArgs::default(),
            &[("max_connections", "10")],
            "custodian_listen = \"tcp:127.0.0.1:5002\"\ncustodian_to = \"unix:/k.custodian\"\nmax_connections = 99\naudit_dir = \"/a\"\nsync_every = 30\n",
        )
        .expect("config");
        assert_eq!(cfg.slots.total, 10);
        assert_eq!(cfg.sync_every, Duration::from_secs(30), "a bare number is seconds");
        assert_eq!(cfg.audit_dir, Some(PathBuf::from("/a")));
        assert_eq!(cfg.custodian.map(|c| c.to), Some(Addr::Unix(PathBuf::from("/k.custodian"))));
    }

    #[test]
    fn refuses_unknown_keys_and_bad_values_with_typed_errors() {
        let none = DaemonArgs::default();
        let err = from(&none, &[], "sync_evry = \"5s\"\n").expect_err("unknown key");
        assert_eq!(err, ConfigError::UnknownKey { path: FILE.into(), key: "sync_evry".into() });
        assert!(
            err.to_string()
                .starts_with("the configuration file parent.toml has an unknown key `sync_evry` (keys: kre_parent, "),
            "{err}"
        );
        let err = from(&none, &[("sync_every", "soon")], "").expect_err("bad env value");
        let reason = parse_duration("soon").expect_err("not a duration").to_string();
        assert_eq!(err, ConfigError::BadValue { key: "sync_every", origin: Origin::Env, reason: reason.clone() });
        assert_eq!(err.to_string(), format!("environment KEYGATE_PARENT_SYNC_EVERY: {reason}"));
        let flag = DaemonArgs { max_per_source: Some("many".into()), ..DaemonArgs::default() };
        assert_eq!(
            from(&flag, &[], "").expect_err("bad flag").to_string(),
            "flag --max-per-source: `many` is not a whole number"
        );
        assert_eq!(
            from(&none, &[], "audit_follow = true\n").expect_err("bad type").to_string(),
            "file key `audit_follow`: expected a string or a whole number, not a boolean"
        );
        assert!(
            matches!(from(&none, &[], "release_to = \"nowhere\"\n"), Err(ConfigError::Syntax { .. })),
            "a duplicate key"
        );
        let err = resolve(&none, &HashMap::new(), Some((Path::new(FILE), "release_to = \"unix:/k\"\n")))
            .expect_err("missing");
        assert_eq!(err, ConfigError::Missing("kre_parent"));
        assert_eq!(
            err.to_string(),
            "`kre_parent` is not set: give --kre-parent, KEYGATE_PARENT_KRE_PARENT or `kre_parent` in the configuration file"
        );
        assert_eq!(
            from(&none, &[("custodian_listen", "tcp:127.0.0.1:1")], "").expect_err("half"),
            ConfigError::CustodianHalf("custodian_to")
        );
        assert_eq!(
            from(&none, &[("member_to", "unix:/k.member")], "").expect_err("half"),
            ConfigError::MemberHalf("member_listen")
        );
        let cfg = from(&none, &[("member_listen", "tcp:127.0.0.1:5003"), ("member_to", "unix:/k.member")], "")
            .expect("a member forward");
        assert_eq!(cfg.member.map(|m| m.to), Some(Addr::Unix(PathBuf::from("/k.member"))));
        assert_eq!(
            from(&none, &[("state_store", "etcd://h:1")], "state_dir = \"/s\"\n").expect_err("two stores"),
            ConfigError::TwoStateStores
        );
        assert_eq!(
            from(&none, &[], "state_store = \"http://h:1\"\n").expect_err("not etcd").to_string(),
            "file key `state_store`: not an etcd URL: expected etcd://HOST:PORT[,HOST:PORT...][/PREFIX]"
        );
        let cfg = from(&none, &[], "state_store = \"etcd://10.0.0.1:2379,10.0.0.2:2379/kg\"\n").expect("etcd");
        assert_eq!(cfg.state_store.map(|u| u.to_string()).as_deref(), Some("etcd://10.0.0.1:2379,10.0.0.2:2379/kg"));
    }

    #[test]
    fn join_from_is_a_bounded_list_of_distinct_addresses_and_needs_a_store() {
        let none = DaemonArgs::default();
        assert!(from(&none, &[], "").expect("config").join_from.is_empty(), "off by default");
        let cfg = from(&none, &[("audit_store", "etcd://h:1/kg")], "").expect("an audit store in etcd");
        assert_eq!(cfg.audit_store.map(|s| s.to_string()).as_deref(), Some("etcd://h:1/kg"));
        let cfg = from(&none, &[], "audit_store = \"/a\"\n").expect("an audit store directory");
        assert_eq!(cfg.audit_store, Some(crate::storage::audit::AuditStore::Dir(PathBuf::from("/a"))));
        assert_eq!(
            from(&none, &[("audit_store", "etcd://h:1")], "audit_dir = \"/a\"\n").expect_err("two stores"),
            ConfigError::TwoAuditStores
        );
        assert!(from(&none, &[("audit_store", "etcd://")], "").is_err(), "a bad etcd URL");
        let cfg = from(&none, &[("policy_store", "/b")], "").expect("a policy store");
        assert_eq!(cfg.policy_store, Some(crate::storage::bundles::BundleStore::Dir(PathBuf::from("/b"))));
        let cfg = from(&none, &[("policy_store", "etcd://h:1/kg")], "").expect("a policy store in etcd");
        assert_eq!(cfg.policy_store.map(|s| s.to_string()).as_deref(), Some("etcd://h:1/kg"));
        assert!(from(&none, &[("policy_store", "etcd://")], "").is_err(), "a bad etcd URL");
        let m = |p: &str| Addr::Unix(PathBuf::from(p));
        let cfg = from(&none, &[], "state_dir = \"/s\"\njoin_from = [\"unix:/b.member\", \"unix:/c.member\"]\n")
            .expect("a list in the file");
        assert_eq!(cfg.join_from, vec![m("/b.member"), m("/c.member")]);
        let cfg = from(&none, &[("join_from", "unix:/b.member , tcp:10.0.0.3:5003")], "state_store = \"etcd://h:1\"\n")
            .expect("comma-separated in the environment");
        assert_eq!(cfg.join_from[1], Addr::Tcp("10.0.0.3:5003".parse().expect("addr")));
        let flag = DaemonArgs { join_from: Some("unix:/d.member".into()), ..DaemonArgs::default() };
        assert_eq!(
            from(&flag, &[("join_from", "unix:/b.member")], "state_dir = \"/s\"\n").expect("flag").join_from,
            [m("/d.member")]
        );
        assert_eq!(
            from(&none, &[("join_from", "unix:/b.member")], "").expect_err("no store"),
            ConfigError::JoinWithoutStore
        );
        let bad = |v: &str| from(&none, &[("join_from", v)], "state_dir = \"/s\"\n").expect_err(v).to_string();
        assert_eq!(bad("unix:/b,,unix:/c"), "environment KEYGATE_PARENT_JOIN_FROM: an empty address in the list");
        assert_eq!(bad("unix:/b,unix:/b"), "environment KEYGATE_PARENT_JOIN_FROM: `unix:/b` is given twice");
        assert!(bad("nowhere").starts_with("environment KEYGATE_PARENT_JOIN_FROM: `nowhere`: "), "{}", bad("nowhere"));
        let many = (0..=MAX_JOIN_FROM).map(|i| format!("unix:/m{i}")).collect::<Vec<_>>().join(",");
        assert_eq!(bad(&many), "environment KEYGATE_PARENT_JOIN_FROM: 17 addresses; at most 16");
        assert!(
            matches!(
                from(&none, &[], "state_dir = \"/s\"\njoin_from = [1]\n"),
                Err(ConfigError::BadValue { key: "join_from", origin: Origin::File, .. })
            ),
            "a list of numbers"
        );
    }

    #[test]
    fn host_names_are_taken_in_listen_and_to_addresses() {
        let cfg = from(
            &DaemonArgs::default(),
            &[("release_listen", "tcp:LocalHost:5000")],
            "custodian_listen = \"tcp:localhost:5002\"\ncustodian_to = \"tcp:kre.internal:5003\"\n",
        )
        .expect("config");
        assert_eq!(cfg.release.listen, Addr::TcpHost { host: "localhost".into(), port: 5000 });
        let custodian = cfg.custodian.expect("custodian");
        assert_eq!(custodian.listen, Addr::TcpHost { host: "localhost".into(), port: 5002 });
        assert_eq!(custodian.to, Addr::TcpHost { host: "kre.internal".into(), port: 5003 });
        let err = from(&DaemonArgs::default(), &[("release_listen", "tcp:bad_name!:1")], "").expect_err("bad name");
        assert!(matches!(err, ConfigError::BadValue { key: "release_listen", origin: Origin::Env, .. }), "{err:?}");
    }

    #[test]
    fn every_key_is_a_flag_documented_with_its_environment_variable() {
        use clap::CommandFactory;
        #[derive(clap::Parser)]
        struct Wrap {
            #[command(flatten)]
            args: DaemonArgs,
        }
        let cmd = Wrap::command();
        for key in KEYS {
            let arg = cmd.get_arguments().find(|a| a.get_id().as_str() == *key).expect("a flag per key");
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            assert!(help.contains(&env_name(key)), "--{} help names {}: {help}", flag_name(key), env_name(key));
        }
    }
}
