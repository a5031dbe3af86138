//! Stage 9: proving that the expected certificate is the one served.
//!
//! This module turns single probes ([`super::probe`]) into the answers the
//! engine, `certctl verify` and the drift watch need: a [`ServedCheck`]
//! comparing what the endpoint served with what was expected, and
//! [`until_served`], the retry loop with backoff and jitter whose every
//! attempt is reported as it happens.
//!
//! Guarantees: a check is `Verified` only when the served leaf's DER SHA-256
//! equals the expected one (and, with `require_chain_match`, the served
//! intermediates equal the deployed chain) after a handshake in which the
//! server proved possession of the key. Waits between attempts end early
//! when the deploy's cancellation token fires (shutdown, or a newer deploy
//! of the same target waiting for the lock); the attempt that follows a cut
//! wait is the last one, so cancellation shortens verification but never
//! turns a failure into a success.

use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::backoff::{self, Schedule};
use super::probe::{self, Probe, Roots};
use crate::bundle::Cert;
use crate::config::VerifyConfig;
pub use crate::model::check::{Attempt, CheckState, EXPIRY_WARNING, ServedCheck, with_expiry};
use crate::model::fmt::short_or_nothing as short;

fn shorts(hexes: &[String]) -> String {
    hexes
        .iter()
        .map(|h| short(h))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the endpoint must serve.
#[derive(Debug, Clone)]
pub struct Expect {
    /// Lowercase hex SHA-256 of the leaf's DER.
    pub leaf_sha256: String,
    /// The deployed intermediates, in deployed order (hex SHA-256 of DER).
    pub chain_sha256: Vec<String>,
    /// SNI to send.
    pub server_name: String,
}

impl Expect {
    /// Expect `leaf` and `chain`, with the SNI the target's verify
    /// settings give for `leaf`.
    pub fn of(v: &VerifyConfig, leaf: &Cert, chain: &[Cert]) -> Self {
        Self {
            leaf_sha256: leaf.sha256_hex(),
            chain_sha256: chain.iter().map(Cert::sha256_hex).collect(),
            server_name: server_name(v, &leaf.dns_names),
        }
    }
}

/// The SNI to send: `server_name` when set, else the leaf's first DNS SAN,
/// else the endpoint's host (an IP address there means no SNI is sent).
pub fn server_name(v: &VerifyConfig, dns_names: &[String]) -> String {
    if let Some(name) = &v.server_name {
        return name.clone();
    }
    if let Some(first) = dns_names.iter().find(|n| !n.starts_with("*.")) {
        return first.clone();
    }
    if let Some(wild) = dns_names.first() {
        // "*.example.com" is not a name a client sends; any label will do.
        return format!("certctl-verify{}", &wild[1..]);
    }
    endpoint_host(&v.endpoint).to_owned()
}

fn endpoint_host(endpoint: &str) -> &str {
    let host = endpoint.rsplit_once(':').map_or(endpoint, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Probes once and compares.
pub async fn check_once(v: &VerifyConfig, expect: &Expect) -> ServedCheck {
    let mut check = ServedCheck {
        endpoint: v.endpoint.clone(),
        server_name: expect.server_name.clone(),
        protocol: v.protocol,
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
        endpoint: &v.endpoint,
        server_name: &expect.server_name,
        protocol: v.protocol,
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

/// Probes until `expect` is served or the attempts are used up, waiting
/// with backoff and jitter between attempts and reporting each one.
/// `Ok` holds the successful check, `Err` the last failed one.
pub async fn until_served(
    v: &VerifyConfig,
    expect: &Expect,
    cancel: &CancellationToken,
    rollback: bool,
    mut report: impl FnMut(&Attempt),
) -> Result<ServedCheck, ServedCheck> {
    let schedule = Schedule {
        attempts: v.attempts.max(1),
        backoff: v.backoff,
        max_backoff: v.max_backoff,
    };
    let mut attempt = 1;
    loop {
        let check = check_once(v, expect).await;
        let ok = check.ok();
        let last = attempt >= schedule.attempts;
        let next_in = if ok || last {
            None
        } else if cancel.is_cancelled() {
            Some(Duration::ZERO)
        } else {
            schedule
                .base_delay(attempt)
                .map(|base| backoff::jitter(base, v.max_backoff))
        };
        report(&Attempt {
            attempt,
            attempts: schedule.attempts,
            check: check.clone(),
            next_in,
            rollback,
        });
        if ok {
            return Ok(check);
        }
        let Some(wait) = next_in else {
            return Err(check);
        };
        crate::failpoint::hit("during-verify-wait");
        let cut = cancel.is_cancelled() || !backoff::sleep_or_cancel(wait, cancel).await;
        attempt += 1;
        if cut {
            // One last look right away, then stop.
            let check = check_once(v, expect).await;
            report(&Attempt {
                attempt,
                attempts: schedule.attempts,
                check: check.clone(),
                next_in: None,
                rollback,
            });
            return if check.ok() { Ok(check) } else { Err(check) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kind::VerifyProtocol;

    fn vc(endpoint: &str, server_name: Option<&str>) -> VerifyConfig {
        VerifyConfig {
            endpoint: endpoint.to_owned(),
            server_name: server_name.map(str::to_owned),
            protocol: VerifyProtocol::Tls,
            attempts: 3,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(16),
            timeout: Duration::from_secs(1),
            interval: None,
            require_chain_match: false,
            ca_file: None,
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
            server_name: "www.example.com".to_owned(),
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
            next_in: Some(Duration::from_millis(2100)),
            rollback: false,
        };
        assert_eq!(
            a.describe(),
            "verify attempt 2/3: served 9f9f9f…9f9f, want 4a4a4a…4a4a; next in 2.1s"
        );
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
