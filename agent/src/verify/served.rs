//! Stage 9: proving that the expected certificate is the one served.
//!
//! This module turns single probes ([`super::probe`]) into the answers the
//! engine, `certctl verify` and the drift watch need: a [`ServedCheck`]
//! comparing what one endpoint served with what was expected, and
//! [`until_served`], the loop that applies the verification rule to every
//! endpoint of a target with backoff and jitter between attempts, reporting
//! every handshake as it happens.
//!
//! The rule: an endpoint passes after `consecutive` matching handshakes in a
//! row, each on a fresh connection with a full handshake (no resumption),
//! spaced `settle / (consecutive - 1)` apart so that together they span
//! `settle`. Any other result (another leaf, a refused connection, ...)
//! ends the endpoint's series for this attempt and restarts its count.
//! Several servers behind one address (nginx's old and new workers during a
//! reload, the backends of a load balancer during a rolling reload) hand
//! out the old certificate for a while after the first new one was seen;
//! the series outlasts that handover. A target is verified when every
//! endpoint passed; an endpoint that passed is not probed again in later
//! attempts. Attempt `n` is one series for each endpoint that has not
//! passed yet; the waits between attempts follow the [`Schedule`], so
//! `attempts` bounds the whole verification.
//!
//! Guarantees: a check is `Verified` only when the served leaf's DER SHA-256
//! equals the expected one (and, with `require_chain_match`, the served
//! intermediates equal the deployed chain) after a handshake in which the
//! server proved possession of the key. Waits between attempts end early
//! when the deploy's cancellation token fires (shutdown, or a newer deploy
//! of the same target waiting for the lock); the attempt that follows a cut
//! wait is the last one, and the spacing inside a series (at most `settle`,
//! itself at most a minute) is never cut, so cancellation shortens
//! verification but never weakens the rule or turns a failure into a
//! success.

use std::future::Future;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::backoff::{self, Schedule};
use super::probe::{self, Probe, Roots};
use crate::bundle::Cert;
use crate::config::{VerifyConfig, VerifyEndpoint};
pub use crate::model::check::{
    Attempt, CheckState, Checks, EXPIRY_WARNING, ServedCheck, with_expiry,
};
use crate::model::fmt::short_or_nothing as short;

fn shorts(hexes: &[String]) -> String {
    hexes
        .iter()
        .map(|h| short(h))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the endpoints must serve.
#[derive(Debug, Clone)]
pub struct Expect {
    /// Lowercase hex SHA-256 of the leaf's DER.
    pub leaf_sha256: String,
    /// The deployed intermediates, in deployed order (hex SHA-256 of DER).
    pub chain_sha256: Vec<String>,
    /// SNI to send, one per endpoint of the verify settings, in order.
    pub server_names: Vec<String>,
}

impl Expect {
    /// Expect `leaf` and `chain`, with the SNI the target's verify
    /// settings give each endpoint for `leaf`.
    pub fn of(v: &VerifyConfig, leaf: &Cert, chain: &[Cert]) -> Self {
        Self {
            leaf_sha256: leaf.sha256_hex(),
            chain_sha256: chain.iter().map(Cert::sha256_hex).collect(),
            server_names: v
                .endpoints
                .iter()
                .map(|e| server_name(e, &leaf.dns_names))
                .collect(),
        }
    }
}

/// The SNI to send: `server_name` when set, else the leaf's first DNS SAN,
/// else the endpoint's host (an IP address there means no SNI is sent).
pub fn server_name(e: &VerifyEndpoint, dns_names: &[String]) -> String {
    if let Some(name) = &e.server_name {
        return name.clone();
    }
    if let Some(first) = dns_names.iter().find(|n| !n.starts_with("*.")) {
        return first.clone();
    }
    if let Some(wild) = dns_names.first() {
        // "*.example.com" is not a name a client sends; any label will do.
        return format!("certctl-verify{}", &wild[1..]);
    }
    endpoint_host(&e.address).to_owned()
}

fn endpoint_host(endpoint: &str) -> &str {
    let host = endpoint.rsplit_once(':').map_or(endpoint, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Probes endpoint `index` of `v` once and compares.
pub async fn check_once(v: &VerifyConfig, index: usize, expect: &Expect) -> ServedCheck {
    let e = &v.endpoints[index];
    let server_name = expect.server_names.get(index).cloned().unwrap_or_default();
    let mut check = ServedCheck {
        endpoint: e.address.clone(),
        server_name: server_name.clone(),
        protocol: e.protocol,
        want_sha256: expect.leaf_sha256.clone(),
        served_sha256: String::new(),
        served_chain_sha256: Vec::new(),
        served_subject: String::new(),
        served_not_after: 0,
        state: CheckState::Unreachable,
        reason: "",
        error: String::new(),
        checked: SystemTime::now(),
        tls_version: String::new(),
        ca_validated: false,
    };
    let roots = match &v.ca_file {
        None => None,
        Some(path) => {
            let path = path.clone();
            match tokio::task::spawn_blocking(move || Roots::load(&path)).await {
                Ok(Ok(roots)) => Some(roots),
                Ok(Err(e)) => {
                    check.reason = "ca-file";
                    check.error = format!("verify.ca_file: {e}");
                    return check;
                }
                Err(e) => {
                    check.reason = "ca-file";
                    check.error = format!("verify.ca_file could not be read: {e}");
                    return check;
                }
            }
        }
    };
    let probe = Probe {
        endpoint: &e.address,
        server_name: &server_name,
        protocol: e.protocol,
        timeout: v.timeout,
        roots: roots.as_ref(),
    };
    let served = match probe::probe(&probe).await {
        Ok(served) => served,
        Err(e) => {
            check.reason = e.reason();
            check.error = e.to_string();
            return check;
        }
    };
    check.served_sha256 = served.leaf_sha256;
    check.served_chain_sha256 = served.chain_sha256;
    check.served_subject = served.subject;
    check.served_not_after = served.not_after_unix;
    check.tls_version = served.tls_version;
    check.ca_validated = served.ca_validated;
    compare(&mut check, expect, v.require_chain_match);
    check
}

/// Sets `state`, `reason` and `error` of a successful probe from what was
/// expected.
fn compare(check: &mut ServedCheck, expect: &Expect, require_chain_match: bool) {
    if check.served_sha256 != expect.leaf_sha256 {
        check.state = CheckState::Mismatch;
        check.reason = "mismatch";
        check.error = format!(
            "{} served {} ({}), want {}",
            check.endpoint,
            short(&check.served_sha256),
            check.served_subject,
            short(&expect.leaf_sha256)
        );
    } else if require_chain_match && check.served_chain_sha256 != expect.chain_sha256 {
        check.state = CheckState::ChainMismatch;
        check.reason = "chain-mismatch";
        check.error = format!(
            "{} served the right leaf but {} intermediate(s) [{}], the deployed chain has {} [{}] \
             (verify.require_chain_match = true)",
            check.endpoint,
            check.served_chain_sha256.len(),
            shorts(&check.served_chain_sha256),
            expect.chain_sha256.len(),
            shorts(&expect.chain_sha256)
        );
    } else {
        check.state = CheckState::Verified;
    }
}

/// How many matches in a row an endpoint must give, and over what span.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Matching handshakes in a row; 0 behaves like 1.
    pub consecutive: u32,
    /// The span from the first to the last of them.
    pub settle: Duration,
}

impl Rule {
    pub fn of(v: &VerifyConfig) -> Self {
        Rule {
            consecutive: v.consecutive.max(1),
            settle: v.settle,
        }
    }

    /// The wait between two handshakes of a series.
    pub fn spacing(&self) -> Duration {
        match self.consecutive {
            0 | 1 => Duration::ZERO,
            n => self.settle / (n - 1),
        }
    }
}

/// What the loop needs from the world: a handshake with an endpoint and a
/// wait. The real one probes and sleeps; tests script both.
pub trait Prober {
    /// One handshake with endpoint `index`, compared with what is expected.
    fn check(&mut self, index: usize) -> impl Future<Output = ServedCheck> + Send;
    /// Waits `d`; a `cancellable` wait ends early when `cancel` fires.
    /// `true` when the whole wait elapsed.
    fn wait(
        &mut self,
        d: Duration,
        cancellable: bool,
        cancel: &CancellationToken,
    ) -> impl Future<Output = bool> + Send;
}

struct Live<'a> {
    v: &'a VerifyConfig,
    expect: &'a Expect,
}

impl Prober for Live<'_> {
    fn check(&mut self, index: usize) -> impl Future<Output = ServedCheck> + Send {
        check_once(self.v, index, self.expect)
    }

    async fn wait(&mut self, d: Duration, cancellable: bool, cancel: &CancellationToken) -> bool {
        if cancellable {
            crate::failpoint::hit("during-verify-wait");
            backoff::sleep_or_cancel(d, cancel).await
        } else {
            tokio::time::sleep(d).await;
            true
        }
    }
}

/// Applies the rule to every endpoint of `v` until all passed or the
/// attempts are used up, waiting with backoff and jitter between attempts
/// and reporting each handshake. `Ok` holds every endpoint's passing
/// check, `Err` every endpoint's last check (at least one failed).
pub async fn until_served(
    v: &VerifyConfig,
    expect: &Expect,
    cancel: &CancellationToken,
    rollback: bool,
    report: impl FnMut(&Attempt),
) -> Result<Checks, Checks> {
    let schedule = Schedule {
        attempts: v.attempts.max(1),
        backoff: v.backoff,
        max_backoff: v.max_backoff,
    };
    let mut live = Live { v, expect };
    run_rule(
        &mut live,
        v.endpoints.len(),
        schedule,
        Rule::of(v),
        cancel,
        rollback,
        report,
    )
    .await
}

/// One attempt of the rule for every endpoint, no retries, nothing
/// reported: what `certctl verify`, the drift watch and an unchanged
/// deploy's first look use.
pub async fn check_now(v: &VerifyConfig, expect: &Expect) -> Checks {
    let schedule = Schedule {
        attempts: 1,
        backoff: Duration::ZERO,
        max_backoff: Duration::ZERO,
    };
    let mut live = Live { v, expect };
    let cancel = CancellationToken::new();
    match run_rule(
        &mut live,
        v.endpoints.len(),
        schedule,
        Rule::of(v),
        &cancel,
        false,
        |_| {},
    )
    .await
    {
        Ok(c) | Err(c) => c,
    }
}

/// The loop of [`until_served`], over any [`Prober`].
pub async fn run_rule<P: Prober>(
    p: &mut P,
    endpoints: usize,
    schedule: Schedule,
    rule: Rule,
    cancel: &CancellationToken,
    rollback: bool,
    mut report: impl FnMut(&Attempt),
) -> Result<Checks, Checks> {
    let consecutive = rule.consecutive.max(1);
    let mut last: Vec<Option<ServedCheck>> = vec![None; endpoints];
    let mut passed = vec![false; endpoints];
    let mut attempt = 1;
    let mut final_attempt = schedule.attempts <= 1;
    loop {
        // The wait after this attempt, decided when it is first reported.
        let mut backoff_wait: Option<Duration> = None;
        for index in 0..endpoints {
            if passed[index] {
                continue;
            }
            let mut matches = 0;
            loop {
                let check = p.check(index).await;
                let ok = check.ok();
                matches = if ok { matches + 1 } else { 0 };
                let done = ok && matches >= consecutive;
                let next_in = if ok && !done {
                    Some(rule.spacing())
                } else if (index + 1..endpoints).any(|i| !passed[i]) {
                    // Another endpoint of this attempt follows at once.
                    Some(Duration::ZERO)
                } else {
                    let all_pass = done && (0..index).all(|i| passed[i]);
                    if all_pass || final_attempt {
                        None
                    } else {
                        let wait = *backoff_wait.get_or_insert_with(|| {
                            if cancel.is_cancelled() {
                                Duration::ZERO
                            } else {
                                schedule.base_delay(attempt).map_or(Duration::ZERO, |base| {
                                    backoff::jitter(base, schedule.max_backoff)
                                })
                            }
                        });
                        Some(wait)
                    }
                };
                report(&Attempt {
                    attempt,
                    attempts: schedule.attempts.max(1),
                    check: check.clone(),
                    matches,
                    consecutive,
                    next_in,
                    rollback,
                });
                last[index] = Some(check);
                if done {
                    passed[index] = true;
                    break;
                }
                if !ok {
                    break;
                }
                p.wait(rule.spacing(), false, cancel).await;
            }
        }
        let checks = Checks(last.iter().flatten().cloned().collect());
        if passed.iter().all(|p| *p) {
            return Ok(checks);
        }
        if final_attempt {
            return Err(checks);
        }
        let wait = backoff_wait.unwrap_or(Duration::ZERO);
        let cut = cancel.is_cancelled() || !p.wait(wait, true, cancel).await;
        attempt += 1;
        // After a cut wait: one last attempt right away, then stop.
        final_attempt = cut || attempt >= schedule.attempts;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kind::VerifyProtocol;

    fn vc(endpoint: &str, server_name: Option<&str>) -> VerifyEndpoint {
        VerifyEndpoint {
            address: endpoint.to_owned(),
            server_name: server_name.map(str::to_owned),
            protocol: VerifyProtocol::Tls,
        }
    }

    fn check(served: &str, chain: &[&str]) -> ServedCheck {
        ServedCheck {
            endpoint: "127.0.0.1:443".to_owned(),
            server_name: "www.example.com".to_owned(),
            protocol: VerifyProtocol::Tls,
            want_sha256: String::new(),
            served_sha256: served.to_owned(),
            served_chain_sha256: chain.iter().map(|s| (*s).to_owned()).collect(),
            served_subject: "CN=www.example.com".to_owned(),
            served_not_after: 0,
            state: CheckState::Unreachable,
            reason: "",
            error: String::new(),
            checked: SystemTime::UNIX_EPOCH,
            tls_version: "TLSv1.3".to_owned(),
            ca_validated: false,
        }
    }

    fn expect(leaf: &str, chain: &[&str]) -> Expect {
        Expect {
            leaf_sha256: leaf.to_owned(),
            chain_sha256: chain.iter().map(|s| (*s).to_owned()).collect(),
            server_names: vec!["www.example.com".to_owned()],
        }
    }

    #[test]
    fn sni_prefers_config_then_first_plain_dns_name_then_endpoint_host() {
        let names = vec!["*.example.com".to_owned(), "example.com".to_owned()];
        assert_eq!(
            server_name(&vc("127.0.0.1:443", Some("a.test")), &names),
            "a.test"
        );
        assert_eq!(
            server_name(&vc("127.0.0.1:443", None), &names),
            "example.com"
        );
        assert_eq!(
            server_name(&vc("127.0.0.1:443", None), &names[..1]),
            "certctl-verify.example.com"
        );
        assert_eq!(server_name(&vc("[::1]:443", None), &[]), "::1");
        assert_eq!(server_name(&vc("mail.test:25", None), &[]), "mail.test");
    }

    #[test]
    fn leaf_must_match_and_chain_only_when_required() {
        let mut c = check("aa", &["c1"]);
        compare(&mut c, &expect("aa", &["c2"]), false);
        assert_eq!(c.state, CheckState::Verified);

        let mut c = check("aa", &["c1"]);
        compare(&mut c, &expect("aa", &["c2"]), true);
        assert_eq!(c.state, CheckState::ChainMismatch);
        assert!(c.error.contains("require_chain_match"), "{}", c.error);

        let mut c = check("bb", &[]);
        compare(&mut c, &expect("aa", &[]), true);
        assert_eq!(c.state, CheckState::Mismatch);
        assert_eq!(c.reason, "mismatch");
        assert!(c.error.contains("served bb"), "{}", c.error);
    }

    #[test]
    fn attempt_lines_say_served_want_and_next_wait() {
        let mut c = check(&"9f".repeat(32), &[]);
        c.want_sha256 = "4a".repeat(32);
        c.state = CheckState::Mismatch;
        let a = Attempt {
            attempt: 2,
            attempts: 3,
            check: c,
            matches: 0,
            consecutive: 3,
            next_in: Some(Duration::from_millis(2100)),
            rollback: false,
        };
        assert_eq!(
            a.describe(),
            "verify attempt 2/3: served 9f9f9f…9f9f by 127.0.0.1:443, want 4a4a4a…4a4a; next in 2.1s"
        );
        let mut c = check(&"9f".repeat(32), &[]);
        c.endpoint = "127.0.0.1:8443".to_owned();
        c.state = CheckState::Verified;
        let a = Attempt {
            attempt: 2,
            attempts: 6,
            check: c,
            matches: 2,
            consecutive: 3,
            next_in: Some(Duration::from_millis(500)),
            rollback: false,
        };
        assert_eq!(
            a.describe(),
            "verify attempt 2/6: 2/3 consecutive matches, 127.0.0.1:8443 serves 9f9f9f…9f9f (TLSv1.3); next in 500ms"
        );
        let one = Attempt {
            consecutive: 1,
            matches: 1,
            next_in: None,
            ..a
        };
        assert_eq!(
            one.describe(),
            "verify attempt 2/6: 127.0.0.1:8443 serves 9f9f9f…9f9f (TLSv1.3)"
        );
    }

    // === the rule, on scripted handshakes ===

    /// Handshakes answered from a script per endpoint: `'y'` the expected
    /// leaf, `'o'` the old one, `'x'` refused. Waits are recorded, never
    /// slept; `cut_at` makes the n-th cancellable wait (1-based) a cut one.
    struct Script {
        answers: Vec<std::collections::VecDeque<char>>,
        probes: Vec<usize>,
        waits: Vec<(Duration, bool)>,
        cut_at: Option<usize>,
    }

    impl Script {
        fn new(per_endpoint: &[&str]) -> Self {
            Script {
                answers: per_endpoint.iter().map(|s| s.chars().collect()).collect(),
                probes: Vec::new(),
                waits: Vec::new(),
                cut_at: None,
            }
        }
    }

    impl Prober for Script {
        async fn check(&mut self, index: usize) -> ServedCheck {
            self.probes.push(index);
            let answer = self.answers[index].pop_front().unwrap_or('o');
            let mut c = check(if answer == 'y' { "new" } else { "old" }, &[]);
            c.endpoint = format!("127.0.0.{}:443", index + 1);
            c.want_sha256 = "new".to_owned();
            match answer {
                'y' => c.state = CheckState::Verified,
                'o' => {
                    c.state = CheckState::Mismatch;
                    c.reason = "mismatch";
                    c.error = format!("{} served old, want new", c.endpoint);
                }
                _ => {
                    c.served_sha256.clear();
                    c.reason = "refused";
                    c.error = format!("{}: connection refused", c.endpoint);
                }
            }
            c
        }

        async fn wait(
            &mut self,
            d: Duration,
            cancellable: bool,
            cancel: &CancellationToken,
        ) -> bool {
            self.waits.push((d, cancellable));
            let n = self.waits.iter().filter(|(_, c)| *c).count();
            if cancellable && self.cut_at == Some(n) {
                cancel.cancel();
                return false;
            }
            true
        }
    }

    const MS: Duration = Duration::from_millis(1);

    fn schedule(attempts: u32) -> Schedule {
        Schedule {
            attempts,
            backoff: 100 * MS,
            max_backoff: 400 * MS,
        }
    }

    fn rule(consecutive: u32, settle_ms: u64) -> Rule {
        Rule {
            consecutive,
            settle: Duration::from_millis(settle_ms),
        }
    }

    async fn run(s: &mut Script, attempts: u32, r: Rule) -> (Result<Checks, Checks>, Vec<Attempt>) {
        let cancel = CancellationToken::new();
        let mut seen = Vec::new();
        let n = s.answers.len();
        let out = run_rule(s, n, schedule(attempts), r, &cancel, false, |a| {
            seen.push(a.clone())
        })
        .await;
        (out, seen)
    }

    #[test]
    fn spacing_spreads_the_matches_over_settle() {
        assert_eq!(rule(3, 1000).spacing(), 500 * MS);
        assert_eq!(rule(5, 1000).spacing(), 250 * MS);
        assert_eq!(rule(2, 1000).spacing(), 1000 * MS);
        assert_eq!(rule(1, 1000).spacing(), Duration::ZERO);
        assert_eq!(rule(0, 1000).spacing(), Duration::ZERO);
    }

    #[tokio::test]
    async fn three_matches_in_a_row_pass_spread_over_settle() {
        let mut s = Script::new(&["yyy"]);
        let (out, seen) = run(&mut s, 3, rule(3, 1000)).await;
        let checks = out.expect("verified");
        assert!(checks.ok());
        assert_eq!(
            seen.iter()
                .map(|a| (a.attempt, a.matches))
                .collect::<Vec<_>>(),
            [(1, 1), (1, 2), (1, 3)]
        );
        assert_eq!(s.waits, [(500 * MS, false), (500 * MS, false)]);
        assert_eq!(seen[2].next_in, None);
        assert_eq!(seen[0].next_in, Some(500 * MS));
    }

    #[tokio::test]
    async fn a_mismatch_restarts_the_count_in_the_next_attempt() {
        // A worker handover: new, old, then new for good.
        let mut s = Script::new(&["yoyyy"]);
        let (out, seen) = run(&mut s, 3, rule(3, 1000)).await;
        assert!(out.expect("verified").ok());
        assert_eq!(
            seen.iter()
                .map(|a| (a.attempt, a.matches))
                .collect::<Vec<_>>(),
            [(1, 1), (1, 0), (2, 1), (2, 2), (2, 3)]
        );
        // The failed handshake announces the backoff (100ms ± 20%), which
        // is the one cancellable wait.
        let backoff = seen[1].next_in.expect("a wait follows");
        assert!(backoff >= 80 * MS && backoff < 120 * MS, "{backoff:?}");
        assert_eq!(
            s.waits,
            [
                (500 * MS, false),
                (backoff, true),
                (500 * MS, false),
                (500 * MS, false)
            ]
        );
    }

    #[tokio::test]
    async fn no_complete_series_within_the_attempts_fails_with_the_last_check() {
        // Two of three matches each time: never three in a row.
        let mut s = Script::new(&["yyoyyoyyo"]);
        let (out, seen) = run(&mut s, 3, rule(3, 0)).await;
        let checks = out.expect_err("not verified");
        assert_eq!(checks.0.len(), 1);
        assert_eq!(checks.0[0].state, CheckState::Mismatch);
        assert_eq!(seen.len(), 9);
        assert_eq!(seen.last().map(|a| (a.attempt, a.next_in)), Some((3, None)));
        assert_eq!(
            s.waits.iter().filter(|(_, c)| *c).count(),
            2,
            "{:?}",
            s.waits
        );
    }

    #[tokio::test]
    async fn an_unreachable_handshake_also_restarts_the_count() {
        let mut s = Script::new(&["yxyyy"]);
        let (out, seen) = run(&mut s, 2, rule(3, 0)).await;
        assert!(out.is_ok());
        assert_eq!(seen[1].check.reason, "refused");
        assert_eq!(seen[1].matches, 0);
        assert_eq!(seen[2].attempt, 2);
    }

    #[tokio::test]
    async fn consecutive_one_is_the_old_single_probe() {
        let mut s = Script::new(&["oy"]);
        let (out, seen) = run(&mut s, 3, rule(1, 0)).await;
        assert!(out.is_ok());
        assert_eq!(seen.len(), 2);
        assert!(
            s.waits.iter().all(|(_, c)| *c),
            "no series waits: {:?}",
            s.waits
        );
    }

    #[tokio::test]
    async fn every_endpoint_must_pass_and_a_passed_one_is_not_probed_again() {
        // Endpoint 1 passes at once; endpoint 2 serves the old leaf in the
        // first attempt and passes in the second.
        let mut s = Script::new(&["yyy", "oyyy"]);
        let (out, seen) = run(&mut s, 3, rule(3, 0)).await;
        let checks = out.expect("verified");
        assert_eq!(checks.0.len(), 2);
        assert_eq!(s.probes, [0, 0, 0, 1, 1, 1, 1]);
        assert_eq!(seen[2].next_in, Some(Duration::ZERO), "endpoint 2 follows");
        assert!(seen[3].next_in.is_some_and(|d| d > Duration::ZERO));
        assert_eq!(seen[4].attempt, 2);
    }

    #[tokio::test]
    async fn one_failing_endpoint_fails_the_target_and_is_named() {
        let mut s = Script::new(&["yyyyyyyyy", "ooo"]);
        let (out, _) = run(&mut s, 3, rule(3, 0)).await;
        let checks = out.expect_err("not verified");
        assert!(checks.0[0].ok());
        assert!(!checks.0[1].ok());
        assert_eq!(
            checks.decisive().map(|c| c.endpoint.as_str()),
            Some("127.0.0.2:443")
        );
        assert!(
            checks.error().starts_with("127.0.0.2:443 "),
            "{}",
            checks.error()
        );
        // The first endpoint passed in attempt 1 and was left alone.
        assert_eq!(s.probes.iter().filter(|i| **i == 0).count(), 3);
    }

    #[tokio::test]
    async fn a_cut_wait_leaves_one_last_full_attempt() {
        let mut s = Script::new(&["oyyy"]);
        s.cut_at = Some(1);
        let cancel = CancellationToken::new();
        let mut seen = Vec::new();
        let out = run_rule(
            &mut s,
            1,
            schedule(10),
            rule(3, 1000),
            &cancel,
            false,
            |a| seen.push(a.clone()),
        )
        .await;
        // The series after the cut keeps its spacing: the rule is not
        // weakened by cancellation.
        assert!(out.is_ok());
        assert_eq!(seen.len(), 4);
        assert_eq!(s.waits.iter().filter(|(_, c)| !*c).count(), 2);

        let mut s = Script::new(&["oo"]);
        s.cut_at = Some(1);
        let cancel = CancellationToken::new();
        let out = run_rule(
            &mut s,
            1,
            schedule(10),
            rule(3, 1000),
            &cancel,
            false,
            |_| {},
        )
        .await;
        assert!(out.is_err());
        assert_eq!(s.probes.len(), 2, "attempt 1, the cut, one last attempt");
    }

    #[test]
    fn expiring_only_when_verified_and_close() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let mut c = check("aa", &[]);
        c.state = CheckState::Verified;
        c.served_not_after = 1_000_000_000 + 3600;
        let e = with_expiry(c.clone(), now);
        assert_eq!(e.state, CheckState::Expiring);
        assert!(e.ok());
        assert_eq!(e.state.verification(), "verified");
        c.served_not_after = 1_000_000_000 + 90 * 24 * 3600;
        assert_eq!(with_expiry(c.clone(), now).state, CheckState::Verified);
        c.state = CheckState::Mismatch;
        c.served_not_after = 0;
        assert_eq!(with_expiry(c, now).state, CheckState::Mismatch);
    }
}
