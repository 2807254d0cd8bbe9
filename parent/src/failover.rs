//! Failover between the members of a KRE cluster (several KREs serving the same keys), for the
//! clients that fetch keys: `keygate fetch` and the KMS plugin.
//!
//! It decides, without I/O: which member to ask first (a random one per client so that load
//! spreads, then the last one that served), when to ask the next member too (the current one
//! failed in a way another member may not, or has not answered within the hedge delay), when to
//! start another round over the members (after a jittered backoff) and when to give up (the
//! rounds or the time budget are spent). [`classify`] decides which outcomes another member may
//! answer differently: a member that cannot serve now (transport failures, `busy`, `sealed`,
//! `policy_stale`, ...) is passed over; a refusal that is the policy's verdict (`image_not_allowed`,
//! a bad attestation, ...) ends the fetch at once, so that a client never shops around for a
//! member that says yes to a revoked image.
//!
//! It trusts nothing a member says: each attempt is a whole, independent handshake (its own
//! Hello nonce, the member's own challenge, a fresh attestation and ephemeral key), checked
//! against the same expected KRE images as every other member's by `peer::client`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use keygate_enclave::net::transport::Addr;
use keygate_enclave::peer::client::{ClientError, TransportError};
use keygate_enclave::wire::DenyCode;

use crate::backoff::Backoff;
use crate::cmd::args::parse_duration;
use crate::error::CliError;

/// Most members one client names (`--kre`, repeated): attempts run at once are at most this.
pub(crate) const MAX_MEMBERS: usize = 16;

/// The least and the most hedge delay a flag takes.
pub(crate) const HEDGE_RANGE: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(60));

/// The order in which a client asks the members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Order {
    /// Start at a random member (then at the last one that served): clients spread their load.
    Random,
    /// Always start at the first `--kre` given, then the next ones in turn (a primary and
    /// standbys).
    Listed,
}

/// The failover flags `keygate fetch` and `keygate kms-plugin` share.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct FailoverArgs {
    /// With several --kre: the order to ask them in: `random` (a random first KRE, then the
    /// last one that served, so that clients spread their load) or `listed` (always from the
    /// first --kre given).
    #[arg(long, value_enum, default_value = "random")]
    pub(crate) kre_order: Order,
    /// With several --kre: when an attempt has not answered after this long, the same request
    /// (with its own nonce and attestation) goes to the next KRE too; the first valid answer
    /// wins (10ms to 60s).
    #[arg(long, default_value = "300ms", value_parser = parse_duration, value_name = "DURATION")]
    pub(crate) hedge: Duration,
}

impl FailoverArgs {
    /// Checks the flags and the members (`--kre`, repeated): 1 to [`MAX_MEMBERS`], none twice.
    pub(crate) fn check(&self, members: &[Addr]) -> Result<(), CliError> {
        check_members(members).map_err(CliError::input)?;
        let (lo, hi) = HEDGE_RANGE;
        if self.hedge < lo || self.hedge > hi {
            return Err(CliError::input(format!("--hedge must be between {lo:?} and {hi:?}, not {:?}", self.hedge)));
        }
        Ok(())
    }
}

/// Why a list of members is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum MembersError {
    #[error("give at least one --kre")]
    None,
    #[error("--kre is given {0} times; at most {MAX_MEMBERS} KREs")]
    TooMany(usize),
    #[error("--kre {0} is given twice")]
    Twice(String),
}

/// 1 to [`MAX_MEMBERS`] members, none twice.
pub(crate) fn check_members(members: &[Addr]) -> Result<(), MembersError> {
    if members.is_empty() {
        return Err(MembersError::None);
    }
    if members.len() > MAX_MEMBERS {
        return Err(MembersError::TooMany(members.len()));
    }
    let names: Vec<String> = members.iter().map(ToString::to_string).collect();
    for (i, n) in names.iter().enumerate() {
        if names[..i].contains(n) {
            return Err(MembersError::Twice(n.clone()));
        }
    }
    Ok(())
}

/// What an attempt's failure means for the other members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// This member cannot serve now (unreachable, no answer, busy, sealed, behind on the policy
    /// or the audit trail): the next member is asked at once, and a later round may ask this
    /// one again.
    Transient,
    /// The policy's answer for now, not a member's trouble (a rule not yet in force, a change
    /// not yet durable): no further member is asked in this round; the next round, after the
    /// backoff, asks again.
    Wait,
    /// The member's answer failed this client's checks (not the expected KRE, or someone on
    /// the path answering in its place): the other members are asked, each checked on its own;
    /// if none serves, the fetch fails with this error and no further round runs.
    Untrusted,
    /// The verdict (the policy refuses this requester, the request is invalid) or a local
    /// failure no member can change: the fetch fails at once with it.
    Final,
}

/// The class of a refusal code (see [`Class`]). Unknown codes are final.
pub(crate) fn deny_class(code: DenyCode) -> Class {
    match code {
        DenyCode::Busy
        | DenyCode::Timeout
        | DenyCode::ChallengeExpired
        | DenyCode::Sealed
        | DenyCode::StatePending
        | DenyCode::PolicyStale
        | DenyCode::Internal
        | DenyCode::AuditFull
        | DenyCode::AuditUnacknowledged => Class::Transient,
        DenyCode::ActivationPending | DenyCode::PolicyNotDurable => Class::Wait,
        _ => Class::Final,
    }
}

/// The class of an attempt's failure (see [`Class`]).
pub(crate) fn classify(e: &ClientError) -> Class {
    match e {
        ClientError::Transport(_) => Class::Transient,
        ClientError::Denied { code, .. } => deny_class(*code),
        e if e.is_attack() => Class::Untrusted,
        _ => Class::Final,
    }
}

/// The member a run starts at: the last one that served, if any and `order` is random; else a
/// random one (`random`), or with `Order::Listed` the first.
pub(crate) fn first_member(members: usize, order: Order, last_good: Option<usize>, random: u32) -> usize {
    let n = members.max(1);
    match (order, last_good) {
        (Order::Listed, _) => 0,
        (Order::Random, Some(g)) if g < n => g,
        (Order::Random, _) => usize::try_from(random).unwrap_or(0) % n,
    }
}

/// How a run is paced and bounded.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    /// When the newest attempt has not answered after this long, the next member is asked too.
    pub(crate) hedge: Duration,
    /// The whole run's time limit.
    pub(crate) budget: Duration,
    /// Rounds over the members after the first (each after a backoff).
    pub(crate) retries: u32,
    /// The waits between rounds.
    pub(crate) backoff: Backoff,
}

/// Why a run gave up (when no attempt served).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GiveUp {
    /// A final answer (see [`Class::Final`]).
    Final,
    /// A round ended with an untrusted answer and none served.
    Untrusted,
    /// Every round failed.
    Rounds,
    /// The budget ran out, or would before the next round could start.
    Budget,
}

/// What the driver does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Start an attempt at this member (an index into the members).
    Start(usize),
    /// Wait for a running attempt's answer, at most until then; then ask again.
    WaitUntil(Instant),
    /// Every member failed this round: the next round starts at `at`, after `delay`.
    NewRound { at: Instant, delay: Duration },
    /// Stop: drop the running attempts and report.
    GiveUp(GiveUp),
}

/// A run's schedule: a state machine over the attempts' outcomes, on the caller's clock.
#[derive(Debug)]
pub(crate) struct Schedule {
    members: usize,
    first: usize,
    hedge: Duration,
    deadline: Instant,
    rounds_left: u32,
    backoff: Backoff,
    /// Members started in this round.
    started: usize,
    /// Attempts running.
    running: usize,
    /// When the next member is asked although attempts are running.
    hedge_at: Option<Instant>,
    /// A `Wait` answer closed the round: no further member is asked in it.
    closed: bool,
    resume_at: Option<Instant>,
    untrusted: bool,
    final_: bool,
}

impl Schedule {
    /// A run over `members` (at least one) starting at `first`, from `now`.
    pub(crate) fn new(members: usize, first: usize, policy: &Policy, now: Instant) -> Self {
        let members = members.clamp(1, MAX_MEMBERS);
        Self {
            members,
            first: first % members,
            hedge: policy.hedge,
            deadline: now + policy.budget,
            rounds_left: policy.retries,
            backoff: policy.backoff.clone(),
            started: 0,
            running: 0,
            hedge_at: None,
            closed: false,
            resume_at: None,
            untrusted: false,
            final_: false,
        }
    }

    /// The run's deadline.
    #[cfg(test)]
    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// What to do at `now`.
    pub(crate) fn next(&mut self, now: Instant) -> Next {
        if self.final_ {
            return Next::GiveUp(GiveUp::Final);
        }
        if let Some(at) = self.resume_at {
            if now < at {
                return Next::WaitUntil(at);
            }
            self.resume_at = None;
            self.started = 0;
            self.closed = false;
            self.hedge_at = None;
        }
        if now >= self.deadline {
            return Next::GiveUp(GiveUp::Budget);
        }
        let more = self.started < self.members && !self.closed;
        if more && (self.running == 0 || self.hedge_at.is_some_and(|t| now >= t)) {
            let m = (self.first + self.started) % self.members;
            self.started += 1;
            self.running += 1;
            self.hedge_at = Some(now + self.hedge);
            return Next::Start(m);
        }
        if self.running > 0 {
            let until = match self.hedge_at {
                Some(t) if more => t.min(self.deadline),
                _ => self.deadline,
            };
            return Next::WaitUntil(until);
        }
        // The round is over and nothing served.
        if self.untrusted {
            return Next::GiveUp(GiveUp::Untrusted);
        }
        if self.rounds_left == 0 {
            return Next::GiveUp(GiveUp::Rounds);
        }
        let delay = self.backoff.next_wait();
        let at = now + delay;
        if at >= self.deadline {
            return Next::GiveUp(GiveUp::Budget);
        }
        self.rounds_left -= 1;
        self.resume_at = Some(at);
        Next::NewRound { at, delay }
    }

    /// A running attempt failed, as `class`, at `now`.
    pub(crate) fn on_failure(&mut self, class: Class, now: Instant) {
        self.running = self.running.saturating_sub(1);
        match class {
            Class::Transient => self.hedge_at = Some(now),
            Class::Untrusted => {
                self.untrusted = true;
                self.hedge_at = Some(now);
            }
            Class::Wait => self.closed = true,
            Class::Final => self.final_ = true,
        }
    }
}

/// Why no member served.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FailoverError {
    /// A member refused for good (the policy's verdict), or the local NSM failed: no further
    /// member was asked.
    #[error("{kre}: {error}")]
    Final { kre: String, error: ClientError },
    /// A member's answer failed this client's checks, and no other member served.
    #[error("{kre}: {error} (and no other KRE served)")]
    Untrusted { kre: String, error: ClientError },
    /// Every round failed.
    #[error("no KRE served after {attempts} attempts over {members} KRE(s) in {elapsed:?}; last: {kre}: {error}")]
    Exhausted { attempts: u32, members: usize, elapsed: Duration, kre: String, error: ClientError },
    /// The budget ran out.
    #[error("no KRE served within the budget of {budget:?} ({attempts} attempts over {members} KRE(s)); last: {kre}: {error}")]
    Budget { budget: Duration, attempts: u32, members: usize, kre: String, error: ClientError },
}

impl FailoverError {
    /// The attempt's error that decided the outcome (for the KMS plugin's lease: a revocation,
    /// an attack, or an outage).
    pub(crate) fn client_error(&self) -> &ClientError {
        match self {
            Self::Final { error, .. }
            | Self::Untrusted { error, .. }
            | Self::Exhausted { error, .. }
            | Self::Budget { error, .. } => error,
        }
    }
}

/// A client's members and how it fails over between them. It remembers the last member that
/// served, for the next run.
#[derive(Debug)]
pub(crate) struct Failover {
    members: Vec<Addr>,
    order: Order,
    policy: Policy,
    /// The last member that served, or `usize::MAX`.
    last_good: AtomicUsize,
}

/// One running attempt: its member and its future.
type Running<'a, T> = Vec<(usize, Pin<Box<dyn Future<Output = Result<T, ClientError>> + Send + 'a>>)>;

impl Failover {
    /// `members` must be 1 to [`MAX_MEMBERS`] (checked by the verbs' arguments).
    pub(crate) fn new(members: Vec<Addr>, order: Order, policy: Policy) -> Self {
        Self { members, order, policy, last_good: AtomicUsize::new(usize::MAX) }
    }

    pub(crate) fn members(&self) -> &[Addr] {
        &self.members
    }

    /// Runs `attempt` against the members as the [`Schedule`] says, until one serves (its
    /// answer, and the member's index) or the schedule gives up. Attempts still running when
    /// one serves, or when the run gives up, are dropped (their connections closed).
    pub(crate) async fn run<'a, T, F, Fut>(&'a self, mut attempt: F) -> Result<(T, usize), FailoverError>
    where
        F: FnMut(&'a Addr) -> Fut,
        Fut: Future<Output = Result<T, ClientError>> + Send + 'a,
    {
        let start = Instant::now();
        let last_good = Some(self.last_good.load(Ordering::Relaxed)).filter(|g| *g != usize::MAX);
        let random = rand_core::RngCore::next_u32(&mut rand_core::OsRng);
        let first = first_member(self.members.len(), self.order, last_good, random);
        let mut schedule = Schedule::new(self.members.len(), first, &self.policy, start);
        let mut running: Running<'a, T> = Vec::new();
        let mut attempts = 0u32;
        let mut last: Option<(usize, ClientError)> = None;
        let mut untrusted: Option<(usize, ClientError)> = None;
        loop {
            let until = match schedule.next(Instant::now()) {
                Next::Start(m) => {
                    let Some(addr) = self.members.get(m) else { continue };
                    if !running.is_empty() {
                        tracing::info!(kre = %addr, "no answer within the hedge delay: asking the next KRE too");
                    }
                    attempts = attempts.saturating_add(1);
                    running.push((m, Box::pin(attempt(addr))));
                    continue;
                }
                Next::WaitUntil(t) => t,
                Next::NewRound { at, delay } => {
                    if let Some((_, e)) = &last {
                        tracing::warn!(error = %e, kres = self.members.len(), "fetch failed; retrying in {delay:?}");
                    }
                    at
                }
                Next::GiveUp(why) => {
                    let cut = running.first().map(|(m, _)| *m);
                    drop(running);
                    return Err(self.give_up(why, start, attempts, untrusted.or(last), cut));
                }
            };
            let answered = tokio::time::timeout_at(until.into(), next_answer(&mut running)).await;
            let Ok(Some((m, result))) = answered else { continue };
            match result {
                Ok(v) => {
                    self.last_good.store(m, Ordering::Relaxed);
                    return Ok((v, m));
                }
                Err(e) => {
                    let class = classify(&e);
                    let kre = self.name(m);
                    // (With one KRE, the round's end says it, as before clusters.)
                    match class {
                        Class::Final => {}
                        _ if self.members.len() == 1 => {}
                        Class::Untrusted => {
                            tracing::error!(%kre, error = %e, "refused a KRE's answer; asking the other KREs")
                        }
                        _ => tracing::warn!(%kre, error = %e, "KRE attempt failed; asking the other KREs"),
                    }
                    schedule.on_failure(class, Instant::now());
                    if class == Class::Untrusted && untrusted.is_none() {
                        untrusted = Some((m, e));
                    } else {
                        last = Some((m, e));
                    }
                }
            }
        }
    }

    fn name(&self, m: usize) -> String {
        self.members.get(m).map(ToString::to_string).unwrap_or_default()
    }

    fn give_up(
        &self,
        why: GiveUp,
        start: Instant,
        attempts: u32,
        reported: Option<(usize, ClientError)>,
        cut: Option<usize>,
    ) -> FailoverError {
        let members = self.members.len();
        let (m, error) = reported.unwrap_or_else(|| {
            let m = cut.unwrap_or(0);
            (m, TransportError::NoAnswer { kre: self.name(m), within: self.policy.budget }.into())
        });
        let kre = self.name(m);
        match why {
            GiveUp::Final => FailoverError::Final { kre, error },
            GiveUp::Untrusted => FailoverError::Untrusted { kre, error },
            GiveUp::Rounds => FailoverError::Exhausted { attempts, members, elapsed: start.elapsed(), kre, error },
            GiveUp::Budget => FailoverError::Budget { budget: self.policy.budget, attempts, members, kre, error },
        }
    }
}

/// The first running attempt to finish, removed from `running`; `None` (never ready) when
/// nothing runs, so the caller's timeout decides.
async fn next_answer<T>(running: &mut Running<'_, T>) -> Option<(usize, Result<T, ClientError>)> {
    std::future::poll_fn(|cx| {
        for i in 0..running.len() {
            if let Some((_, f)) = running.get_mut(i) {
                if let Poll::Ready(r) = f.as_mut().poll(cx) {
                    let (m, _) = running.swap_remove(i);
                    return Poll::Ready(Some((m, r)));
                }
            }
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn policy(hedge: u64, budget: u64, retries: u32) -> Policy {
        Policy { hedge: MS(hedge), budget: MS(budget), retries, backoff: Backoff::new(MS(100), MS(400), 0) }
    }

    /// Which refusals another member may answer differently. A policy verdict must never be
    /// retried elsewhere: a client would shop around for a member that still says yes to a
    /// revoked image.
    #[test]
    fn every_deny_code_has_its_class() {
        use Class::*;
        let table = [
            (DenyCode::Malformed, Final),
            (DenyCode::UnsupportedVersion, Final),
            (DenyCode::UnexpectedMessage, Final),
            (DenyCode::FrameTooLarge, Final),
            (DenyCode::WrongChannel, Final),
            (DenyCode::Timeout, Transient),
            (DenyCode::Busy, Transient),
            (DenyCode::InvalidRequest, Final),
            (DenyCode::AttestationInvalid, Final),
            (DenyCode::DebugMode, Final),
            (DenyCode::NonceMismatch, Final),
            (DenyCode::ChallengeExpired, Transient),
            (DenyCode::NonceReused, Final),
            (DenyCode::UserDataMismatch, Final),
            (DenyCode::PublicKeyInvalid, Final),
            (DenyCode::UnknownCluster, Final),
            (DenyCode::ImageNotAllowed, Final),
            (DenyCode::ActivationPending, Wait),
            (DenyCode::Sealed, Transient),
            (DenyCode::StatePending, Transient),
            (DenyCode::StateRefused, Final),
            (DenyCode::PolicyStale, Transient),
            (DenyCode::PolicyNotDurable, Wait),
            (DenyCode::Internal, Transient),
            (DenyCode::PolicyRefused, Final),
            (DenyCode::PolicyStatic, Final),
            (DenyCode::AuditFull, Transient),
            (DenyCode::AuditUnacknowledged, Transient),
            (DenyCode::Unknown(999), Final),
        ];
        assert_eq!(table.len(), DenyCode::ALL.len() + 1, "every code is in the table");
        for (code, class) in table {
            assert_eq!(deny_class(code), class, "{code}");
            let e = ClientError::Denied { code, reason: "r".into() };
            assert_eq!(classify(&e), class, "{code}");
            // Whatever another member may change is something the fetch retries anyway.
            if class != Final {
                assert!(e.is_retryable(), "{code}");
            } else {
                assert!(e.is_refusal(), "{code}");
            }
        }
        let t = TransportError::Connect { kre: "unix:/x".into(), kind: std::io::ErrorKind::ConnectionRefused };
        assert_eq!(classify(&t.into()), Transient);
        assert_eq!(classify(&TransportError::NoAnswer { kre: "k".into(), within: MS(1) }.into()), Transient);
        assert_eq!(classify(&ClientError::UnattestedWrap), Untrusted);
        assert_eq!(classify(&ClientError::KreBinding("x")), Untrusted);
        assert_eq!(classify(&ClientError::Nsm(keygate_attestation::NsmError::DeviceAbsent)), Final);
    }

    #[test]
    fn members_are_one_to_sixteen_distinct_addresses() {
        let a = |s: &str| s.parse::<Addr>().expect("addr");
        assert_eq!(check_members(&[]), Err(MembersError::None));
        assert_eq!(check_members(&[a("unix:/a")]), Ok(()));
        assert_eq!(check_members(&[a("unix:/a"), a("unix:/b")]), Ok(()));
        assert_eq!(
            check_members(&[a("unix:/a"), a("unix:/b"), a("unix:/a")]),
            Err(MembersError::Twice("unix:/a".into()))
        );
        let many: Vec<Addr> = (0..=MAX_MEMBERS).map(|i| a(&format!("unix:/k{i}"))).collect();
        assert_eq!(check_members(&many[..MAX_MEMBERS]), Ok(()));
        assert_eq!(check_members(&many), Err(MembersError::TooMany(MAX_MEMBERS + 1)));
    }

    #[test]
    fn the_first_member_is_random_then_the_last_good_one_or_the_first_listed() {
        assert_eq!(first_member(3, Order::Random, None, 7), 1);
        assert_eq!(first_member(3, Order::Random, None, 8), 2);
        assert_eq!(first_member(3, Order::Random, Some(2), 7), 2);
        assert_eq!(first_member(3, Order::Random, Some(9), 7), 1, "a stale index is ignored");
        assert_eq!(first_member(3, Order::Listed, Some(2), 7), 0);
        assert_eq!(first_member(1, Order::Random, None, u32::MAX), 0);
        let starts: std::collections::BTreeSet<_> = (0..30).map(|r| first_member(3, Order::Random, None, r)).collect();
        assert_eq!(starts.len(), 3, "every member is a start");
    }

    #[test]
    fn members_are_asked_in_turn_from_the_first_and_a_failure_moves_on_at_once() {
        let t0 = Instant::now();
        let mut s = Schedule::new(3, 2, &policy(300, 10_000, 0), t0);
        assert_eq!(s.next(t0), Next::Start(2));
        assert_eq!(s.next(t0), Next::WaitUntil(t0 + MS(300)));
        s.on_failure(Class::Transient, t0 + MS(5));
        assert_eq!(s.next(t0 + MS(5)), Next::Start(0));
        s.on_failure(Class::Transient, t0 + MS(6));
        assert_eq!(s.next(t0 + MS(6)), Next::Start(1));
        s.on_failure(Class::Transient, t0 + MS(7));
        assert_eq!(s.next(t0 + MS(7)), Next::GiveUp(GiveUp::Rounds));
    }

    #[test]
    fn a_silent_member_is_hedged_after_the_delay_and_both_run() {
        let t0 = Instant::now();
        let mut s = Schedule::new(3, 0, &policy(300, 10_000, 0), t0);
        assert_eq!(s.next(t0), Next::Start(0));
        assert_eq!(s.next(t0 + MS(299)), Next::WaitUntil(t0 + MS(300)));
        assert_eq!(s.next(t0 + MS(300)), Next::Start(1));
        assert_eq!(s.next(t0 + MS(301)), Next::WaitUntil(t0 + MS(600)));
        assert_eq!(s.next(t0 + MS(600)), Next::Start(2));
        // Every member asked: wait for any answer until the deadline.
        assert_eq!(s.next(t0 + MS(601)), Next::WaitUntil(t0 + MS(10_000)));
        assert_eq!(s.next(t0 + MS(10_000)), Next::GiveUp(GiveUp::Budget));
    }

    #[test]
    fn a_final_answer_stops_at_once_and_asks_no_other_member() {
        let t0 = Instant::now();
        let mut s = Schedule::new(2, 0, &policy(300, 10_000, 5), t0);
        assert_eq!(s.next(t0), Next::Start(0));
        s.on_failure(Class::Final, t0 + MS(5));
        assert_eq!(s.next(t0 + MS(5)), Next::GiveUp(GiveUp::Final));
        assert_eq!(s.next(t0 + MS(400)), Next::GiveUp(GiveUp::Final), "not even after the hedge delay");
        // Also while a hedged attempt runs: it is dropped.
        let mut s = Schedule::new(2, 0, &policy(300, 10_000, 5), t0);
        assert_eq!(s.next(t0), Next::Start(0));
        assert_eq!(s.next(t0 + MS(300)), Next::Start(1));
        s.on_failure(Class::Final, t0 + MS(310));
        assert_eq!(s.next(t0 + MS(310)), Next::GiveUp(GiveUp::Final));
    }

    #[test]
    fn a_wait_answer_closes_the_round_and_the_next_round_asks_again_after_the_backoff() {
        let t0 = Instant::now();
        let mut s = Schedule::new(2, 0, &policy(300, 10_000, 1), t0);
        assert_eq!(s.next(t0), Next::Start(0));
        s.on_failure(Class::Wait, t0 + MS(5));
        assert_eq!(s.next(t0 + MS(5)), Next::NewRound { at: t0 + MS(105), delay: MS(100) });
        assert_eq!(s.next(t0 + MS(50)), Next::WaitUntil(t0 + MS(105)));
        assert_eq!(s.next(t0 + MS(105)), Next::Start(0), "the same member first");
        s.on_failure(Class::Wait, t0 + MS(110));
        assert_eq!(s.next(t0 + MS(110)), Next::GiveUp(GiveUp::Rounds));
    }

    #[test]
    fn an_untrusted_answer_moves_on_but_ends_the_run_when_nobody_serves() {
        let t0 = Instant::now();
        let mut s = Schedule::new(2, 0, &policy(300, 10_000, 5), t0);
        assert_eq!(s.next(t0), Next::Start(0));
        s.on_failure(Class::Untrusted, t0 + MS(5));
        assert_eq!(s.next(t0 + MS(5)), Next::Start(1));
        s.on_failure(Class::Transient, t0 + MS(6));
        assert_eq!(s.next(t0 + MS(6)), Next::GiveUp(GiveUp::Untrusted), "no round after an attack");
    }

    #[test]
    fn rounds_back_off_and_the_budget_bounds_the_run() {
        let t0 = Instant::now();
        let mut s = Schedule::new(2, 1, &policy(300, 1_000, 10), t0);
        let mut now = t0;
        let mut rounds = 0;
        let mut asked = Vec::new();
        loop {
            match s.next(now) {
                Next::Start(m) => {
                    asked.push(m);
                    now += MS(10);
                    s.on_failure(Class::Transient, now);
                }
                Next::NewRound { at, delay } => {
                    rounds += 1;
                    assert_eq!(at, now + delay);
                    now = at;
                }
                Next::WaitUntil(t) => panic!("nothing runs, yet waits until {:?}", t - t0),
                Next::GiveUp(why) => {
                    assert_eq!(why, GiveUp::Budget);
                    break;
                }
            }
        }
        // 20 ms a round, then 100, 200, 400 ms of backoff: the fourth wait (400 ms) would end
        // past the 1 s deadline.
        assert_eq!(rounds, 3, "{asked:?}");
        assert_eq!(asked, [1, 0, 1, 0, 1, 0, 1, 0]);
        assert!(now < s.deadline());
    }

    fn failover(members: usize, hedge: u64, budget: u64, retries: u32) -> Failover {
        let addrs = (0..members).map(|i| format!("unix:/k{i}").parse().expect("addr")).collect();
        Failover::new(addrs, Order::Listed, policy(hedge, budget, retries))
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
    }

    fn denied(code: DenyCode) -> ClientError {
        ClientError::Denied { code, reason: "r".into() }
    }

    /// The driver over real futures: a member that never answers is hedged, the first answer
    /// wins, and the one that never answers is dropped.
    #[test]
    fn the_driver_hedges_a_silent_member_and_takes_the_first_answer() {
        let f = failover(3, 50, 10_000, 0);
        let asked = std::sync::Mutex::new(Vec::new());
        let start = Instant::now();
        let got = rt().block_on(f.run(|kre| {
            let name = kre.to_string();
            asked.lock().expect("lock").push(name.clone());
            async move {
                if name == "unix:/k0" {
                    std::future::pending::<()>().await;
                }
                Ok::<_, ClientError>(name)
            }
        }));
        let (v, m) = got.expect("served");
        assert_eq!((v.as_str(), m), ("unix:/k1", 1));
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(*asked.lock().expect("lock"), ["unix:/k0", "unix:/k1"], "k2 never asked");
        // The next run starts at the last member that served (random order only).
        assert_eq!(f.last_good.load(Ordering::Relaxed), 1);
    }

    /// A policy refusal ends the run: the next member is never asked, even after the hedge
    /// delay and with rounds left.
    #[test]
    fn the_driver_never_asks_another_member_after_a_final_refusal() {
        // A refusal while a hedged attempt runs ends the run at once; the hedged one is dropped.
        let f = failover(2, 10, 10_000, 5);
        let start = Instant::now();
        let got = rt().block_on(f.run(|kre| {
            let name = kre.to_string();
            async move {
                if name == "unix:/k0" {
                    tokio::time::sleep(MS(30)).await;
                    return Err(denied(DenyCode::ImageNotAllowed));
                }
                std::future::pending::<Result<(), ClientError>>().await
            }
        }));
        assert!(matches!(got, Err(FailoverError::Final { .. })), "{got:?}");
        assert!(start.elapsed() < Duration::from_secs(5), "not the budget: {:?}", start.elapsed());
        let f = failover(2, 1_000, 10_000, 5);
        let calls = AtomicUsize::new(0);
        let got = rt().block_on(f.run(|_| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(denied(DenyCode::ImageNotAllowed)) }
        }));
        assert!(matches!(got, Err(FailoverError::Final { .. })), "{got:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one member asked");
        // A member that cannot serve now is passed over.
        let f = failover(2, 1_000, 10_000, 0);
        let got = rt().block_on(f.run(|kre| {
            let name = kre.to_string();
            async move {
                if name == "unix:/k0" {
                    Err(denied(DenyCode::Sealed))
                } else {
                    Ok(name)
                }
            }
        }));
        assert_eq!(got.expect("served").1, 1);
    }

    /// Every member failing: a typed error naming the last failure, after the rounds.
    #[test]
    fn the_driver_reports_the_rounds_or_the_budget() {
        let f = failover(2, 1_000, 10_000, 1);
        let calls = AtomicUsize::new(0);
        let got = rt().block_on(f.run(|_| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(denied(DenyCode::Busy)) }
        }));
        match got {
            Err(FailoverError::Exhausted { attempts: 4, members: 2, error, .. }) => {
                assert_eq!(error, denied(DenyCode::Busy))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(calls.load(Ordering::SeqCst), 4, "two rounds over two members");
        let f = failover(2, 20, 200, 3);
        let start = Instant::now();
        let got = rt().block_on(f.run(|_| std::future::pending::<Result<(), ClientError>>()));
        assert!(start.elapsed() >= MS(200) && start.elapsed() < Duration::from_secs(5));
        match got {
            Err(FailoverError::Budget { attempts: 2, ref error, .. }) => {
                assert!(matches!(error, ClientError::Transport(TransportError::NoAnswer { .. })), "{error:?}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_budget_cuts_a_hedge_wait() {
        let t0 = Instant::now();
        let mut s = Schedule::new(2, 0, &policy(300, 200, 0), t0);
        assert_eq!(s.next(t0), Next::Start(0));
        assert_eq!(s.next(t0), Next::WaitUntil(t0 + MS(200)));
        assert_eq!(s.next(t0 + MS(200)), Next::GiveUp(GiveUp::Budget));
    }
}
