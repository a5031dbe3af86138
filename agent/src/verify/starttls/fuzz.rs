//! Fuzzing the STARTTLS preambles: whatever a server sends, in whatever
//! pieces, the client ends (no hang past its deadline, no panic), consumes
//! nothing after a go-ahead, never reports success unless the server
//! said every word of a real upgrade, and never puts a server's control
//! characters into a message.
//!
//! Time is tokio's paused clock, so a server that stalls costs nothing.

use std::time::Duration;

use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

use super::*;
use crate::model::fmt::is_one_line;

fn config(cases: u32) -> ProptestConfig {
    crate::fuzzing::config(cases)
}

/// What the client saw: its result and the bytes left on the stream after
/// it returned.
struct Outcome {
    result: Result<(), StarttlsError>,
    rest: Vec<u8>,
}

/// Runs `protocol`'s client against a server that writes `pieces` one by
/// one (ignoring what the client says), then hangs up or, with `stall`,
/// keeps the connection open without a word.
fn converse(protocol: VerifyProtocol, pieces: Vec<Vec<u8>>, stall: bool) -> Outcome {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a test runtime");
    rt.block_on(async move {
        let (mut client, server) = duplex(256 * 1024);
        let (mut from_client, mut to_client) = tokio::io::split(server);
        let drain = tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = from_client.read_to_end(&mut sink).await;
        });
        let talk = tokio::spawn(async move {
            for p in pieces {
                if to_client.write_all(&p).await.is_err() {
                    return;
                }
                tokio::task::yield_now().await;
            }
            if stall {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            let _ = to_client.shutdown().await;
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let result = tokio::time::timeout(
            Duration::from_secs(11),
            negotiate(protocol, &mut client, "[127.0.0.1]", deadline),
        )
        .await
        .expect("the preamble ends by its deadline");
        let mut rest = Vec::new();
        if result.is_ok() {
            // The server's task has written everything by now or stalls:
            // read what is there without waiting for more.
            let _ = tokio::time::timeout(Duration::from_millis(1), async {
                let mut buf = [0u8; 4096];
                while let Ok(n) = client.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    rest.extend_from_slice(&buf[..n]);
                }
            })
            .await;
        }
        talk.abort();
        drop(client);
        let _ = drain.await;
        Outcome { result, rest }
    })
}

/// `bytes` cut at the given points (each taken modulo the length).
fn cut(bytes: &[u8], points: &[usize]) -> Vec<Vec<u8>> {
    if bytes.is_empty() {
        return Vec::new();
    }
    let mut at: Vec<usize> = points.iter().map(|p| p % bytes.len()).collect();
    at.push(0);
    at.push(bytes.len());
    at.sort_unstable();
    at.dedup();
    at.windows(2).map(|w| bytes[w[0]..w[1]].to_vec()).collect()
}

/// Every message is one line with nothing hidden, and its reason is one of
/// the documented codes.
fn check_error(e: &StarttlsError) -> Result<(), TestCaseError> {
    let text = e.to_string();
    prop_assert!(
        is_one_line(&text),
        "a server's bytes reached the message unescaped: {text:?}"
    );
    prop_assert!(
        [
            "timeout",
            "closed",
            "io",
            "greeting",
            "no-starttls",
            "starttls-refused",
            "bad-reply"
        ]
        .contains(&e.reason())
    );
    Ok(())
}

const PROTOCOLS: [VerifyProtocol; 3] = [
    VerifyProtocol::SmtpStarttls,
    VerifyProtocol::ImapStarttls,
    VerifyProtocol::Pop3Starttls,
];

/// Stand-in for the first TLS bytes after a go-ahead.
const TLS: &[u8] = b"\x16\x03\x01\x02\x00";

// === well-formed conversations, varied ===

fn eol() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just("\r\n"), Just("\n")]
}

/// A keyword that is not the upgrade's (so it never offers it by accident).
fn other_keyword() -> impl Strategy<Value = String> {
    "[A-Z][A-Z0-9-]{0,12}( [a-zA-Z0-9=]{1,8}){0,2}".prop_filter("not an upgrade keyword", |k| {
        let w = k.split(' ').next().unwrap_or_default();
        !w.eq_ignore_ascii_case("STARTTLS") && !w.eq_ignore_ascii_case("STLS")
    })
}

fn case_of(word: &'static str) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<bool>(), word.len()).prop_map(move |up| {
        word.chars()
            .zip(up)
            .map(|(c, u)| {
                if u {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect()
    })
}

/// An SMTP server that upgrades: multi-line greeting, EHLO reply listing
/// STARTTLS among other extensions, `220` go-ahead.
fn smtp_upgrade() -> impl Strategy<Value = Vec<u8>> {
    (
        eol(),
        proptest::collection::vec("[ -~]{0,40}", 1..4),
        proptest::collection::vec(other_keyword(), 0..8),
        any::<prop::sample::Index>(),
        case_of("starttls"),
    )
        .prop_map(|(eol, greeting, mut keywords, at, starttls)| {
            let mut s = String::new();
            for (i, g) in greeting.iter().enumerate() {
                let sep = if i + 1 == greeting.len() { ' ' } else { '-' };
                s.push_str(&format!("220{sep}{g}{eol}"));
            }
            keywords.insert(at.index(keywords.len() + 1), starttls);
            s.push_str(&format!("250-mail.example{eol}"));
            for (i, k) in keywords.iter().enumerate() {
                let sep = if i + 1 == keywords.len() { ' ' } else { '-' };
                s.push_str(&format!("250{sep}{k}{eol}"));
            }
            s.push_str(&format!("220 2.0.0 Ready to start TLS{eol}"));
            s.into_bytes()
        })
}

/// An IMAP server that upgrades, listing STARTTLS in its greeting or in a
/// CAPABILITY reply that may carry literals.
fn imap_upgrade() -> impl Strategy<Value = Vec<u8>> {
    (
        eol(),
        any::<bool>(),
        proptest::collection::vec("[A-Z][A-Z0-9=+-]{0,12}", 0..8),
        any::<prop::sample::Index>(),
        case_of("starttls"),
        proptest::collection::vec("[ -~]{0,20}", 0..3),
    )
        .prop_map(|(eol, in_greeting, mut caps, at, starttls, literals)| {
            caps.insert(at.index(caps.len() + 1), starttls);
            let list = caps.join(" ");
            let mut s = String::new();
            if in_greeting {
                s.push_str(&format!("* OK [CAPABILITY {list}] ready{eol}"));
            } else {
                s.push_str(&format!("* OK ready{eol}"));
                for l in &literals {
                    s.push_str(&format!("* ID (\"x\" {{{}}}{eol}{l} \"y\"){eol}", l.len()));
                }
                s.push_str(&format!("* CAPABILITY {list}{eol}"));
                s.push_str(&format!("{IMAP_CAPABILITY_TAG} OK done{eol}"));
            }
            s.push_str(&format!(
                "{IMAP_STARTTLS_TAG} OK Begin TLS negotiation now{eol}"
            ));
            s.into_bytes()
        })
}

/// A POP3 server that upgrades: `+OK`, a CAPA list with STLS (dot-stuffed
/// lines among them), `+OK` to STLS.
fn pop3_upgrade() -> impl Strategy<Value = Vec<u8>> {
    (
        eol(),
        proptest::collection::vec(other_keyword(), 0..8),
        any::<prop::sample::Index>(),
        case_of("stls"),
        any::<bool>(),
    )
        .prop_map(|(eol, mut caps, at, stls, stuffed)| {
            caps.insert(at.index(caps.len() + 1), stls);
            let mut s = format!("+OK POP3 ready{eol}+OK Capability list follows{eol}");
            for c in &caps {
                if stuffed && c.starts_with('.') {
                    s.push('.');
                }
                s.push_str(&format!("{c}{eol}"));
            }
            s.push_str(&format!(".{eol}+OK Begin TLS{eol}"));
            s.into_bytes()
        })
}

fn upgrade() -> impl Strategy<Value = (VerifyProtocol, Vec<u8>)> {
    prop_oneof![
        smtp_upgrade().prop_map(|b| (VerifyProtocol::SmtpStarttls, b)),
        imap_upgrade().prop_map(|b| (VerifyProtocol::ImapStarttls, b)),
        pop3_upgrade().prop_map(|b| (VerifyProtocol::Pop3Starttls, b)),
    ]
}

/// Bytes a hostile or broken server may send: arbitrary, or lines of
/// protocol-looking words with control characters and odd line ends.
fn hostile_bytes() -> impl Strategy<Value = Vec<u8>> {
    let word = prop_oneof![
        Just(b"220".to_vec()),
        Just(b"220-".to_vec()),
        Just(b"250-STARTTLS".to_vec()),
        Just(b"250 STARTTLS\r".to_vec()),
        Just(b"* OK".to_vec()),
        Just(b"* CAPABILITY STARTTLS".to_vec()),
        Just(b"a001 OK".to_vec()),
        Just(b"a002 OK".to_vec()),
        Just(b"+OK".to_vec()),
        Just(b"STLS".to_vec()),
        Just(b".".to_vec()),
        Just(b"{99999999}".to_vec()),
        Just(b"{3}".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\x1b[2J".to_vec()),
        Just("\u{2028}\u{202e}".as_bytes().to_vec()),
        Just(b"\r".to_vec()),
        Just(b"\xff\xfe".to_vec()),
        Just(b" ".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..16),
    ];
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..2048),
        proptest::collection::vec(word, 0..64).prop_map(|w| w.concat()),
    ]
}

proptest! {
    #![proptest_config(config(128))]

    /// A real upgrade, varied in case, line ends, extensions and how the
    /// bytes are cut into writes, succeeds and leaves the TLS bytes after
    /// the go-ahead on the stream, untouched.
    #[test]
    fn a_varied_upgrade_succeeds_and_leaves_what_follows(
        (protocol, script) in upgrade(),
        points in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let mut all = script.clone();
        all.extend_from_slice(TLS);
        let out = converse(protocol, cut(&all, &points), true);
        prop_assert!(out.result.is_ok(), "{:?} for {:?}", out.result, String::from_utf8_lossy(&script));
        prop_assert_eq!(out.rest, TLS);
    }

    /// The same conversation cut short anywhere before its go-ahead ends
    /// is a failure (closed, or timed out when the server stalls), never a
    /// success.
    #[test]
    fn a_truncated_upgrade_never_succeeds(
        (protocol, script) in upgrade(),
        at in any::<prop::sample::Index>(),
        stall in any::<bool>(),
    ) {
        let keep = at.index(script.len());
        let out = converse(protocol, vec![script[..keep].to_vec()], stall);
        let e = out.result.expect_err("a truncated preamble failed");
        check_error(&e)?;
        prop_assert!(matches!(e.reason(), "closed" | "timeout"), "{e}");
    }

    /// Whatever a server sends, each client ends with a documented reason
    /// and a one-line message; success needs the upgrade's keyword.
    #[test]
    fn hostile_bytes_end_in_a_clean_failure(
        bytes in hostile_bytes(),
        points in proptest::collection::vec(any::<usize>(), 0..8),
        stall in any::<bool>(),
        which in 0usize..3,
    ) {
        let protocol = PROTOCOLS[which];
        let out = converse(protocol, cut(&bytes, &points), stall);
        match out.result {
            Ok(()) => {
                let text = String::from_utf8_lossy(&bytes).to_ascii_uppercase();
                prop_assert!(text.contains("STARTTLS") || text.contains("STLS"), "{text:?}");
            }
            Err(e) => check_error(&e)?,
        }
    }
}

// === regressions found by the properties above ===

/// An extension keyword with an escape sequence or a bidirectional
/// override in it was listed raw in the "it offered" part of the message.
#[test]
fn offered_keywords_are_escaped() {
    let script = "220 hi\r\n250-mail\r\n250-X\x1b[2JFORGED\r\n250 \u{202e}8BITMIME\r\n";
    let out = converse(
        VerifyProtocol::SmtpStarttls,
        vec![script.as_bytes().to_vec()],
        false,
    );
    let e = out.result.expect_err("no STARTTLS was offered");
    let text = e.to_string();
    assert!(is_one_line(&text), "{text:?}");
    assert!(
        text.contains("X\\x1b[2JFORGED, \\u{202e}8BITMIME"),
        "{text}"
    );
}
