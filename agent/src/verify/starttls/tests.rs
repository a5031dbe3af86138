//! Each preamble against a scripted server on an in-memory pipe.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};
use tokio::task::JoinHandle;

use super::*;

/// One step of a scripted server.
enum Step {
    /// Write these bytes.
    Send(&'static str),
    /// Read one line and require it to be this (without CRLF).
    Expect(&'static str),
    /// Keep the connection open without answering.
    Hang,
}
use Step::{Expect, Hang, Send};

/// Bytes a server sends right after its go-ahead, standing in for TLS: the
/// client must leave them on the stream.
const AFTER_GO_AHEAD: &[u8] = b"\x16\x03\x01";

/// Runs `script` as the server end of a pipe, then closes it. The task
/// panics (failing the test when joined) if the client says something else.
fn server(script: Vec<Step>) -> (DuplexStream, JoinHandle<()>) {
    let (client, mut server) = duplex(128 * 1024);
    let task = tokio::spawn(async move {
        for step in script {
            match step {
                Send(text) => {
                    if server.write_all(text.as_bytes()).await.is_err() {
                        return; // the client gave up, as some tests expect
                    }
                }
                Expect(want) => {
                    let mut line = Vec::new();
                    let mut byte = [0u8; 1];
                    while server.read(&mut byte).await.expect("read") == 1 && byte[0] != b'\n' {
                        line.push(byte[0]);
                    }
                    assert_eq!(line.pop(), Some(b'\r'), "client lines end in CRLF");
                    assert_eq!(String::from_utf8_lossy(&line), want);
                }
                Hang => tokio::time::sleep(Duration::from_secs(3600)).await,
            }
        }
    });
    (client, task)
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

/// Runs `protocol` against `script`; on success also checks that the bytes
/// after the go-ahead are still on the stream, untouched.
async fn run(protocol: VerifyProtocol, script: Vec<Step>) -> Result<(), StarttlsError> {
    run_until(protocol, script, soon()).await
}

async fn run_until(
    protocol: VerifyProtocol,
    script: Vec<Step>,
    deadline: Instant,
) -> Result<(), StarttlsError> {
    let (mut client, task) = server(script);
    let result = negotiate(protocol, &mut client, "[127.0.0.1]", deadline).await;
    if result.is_ok() {
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.expect("read the rest");
        assert_eq!(
            rest, AFTER_GO_AHEAD,
            "bytes after the go-ahead were consumed"
        );
        task.await.expect("server script");
    }
    result
}

fn message(result: Result<(), StarttlsError>) -> (StarttlsError, String) {
    let err = result.expect_err("the preamble should fail");
    let text = err.to_string();
    (err, text)
}

const GO: &str = "\x16\x03\x01";

// === SMTP ===

fn smtp_script(greeting: &'static str, ehlo: &'static str, go: &'static str) -> Vec<Step> {
    vec![
        Send(greeting),
        Expect("EHLO [127.0.0.1]"),
        Send(ehlo),
        Expect("STARTTLS"),
        Send(go),
        Send(GO),
    ]
}

#[tokio::test]
async fn smtp_upgrades_after_multi_line_replies() {
    let script = smtp_script(
        "220-mx.example.test ESMTP\r\n220-no UCE\r\n220 ready\r\n",
        "250-mx.example.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n\
         250-starttls\r\n250 8BITMIME\r\n",
        "220 2.0.0 Ready to start TLS\r\n",
    );
    run(VerifyProtocol::SmtpStarttls, script)
        .await
        .expect("upgrade");
}

#[tokio::test]
async fn smtp_accepts_bare_codes_and_lf_line_ends() {
    let script = smtp_script("220\n", "250-mx\n250 STARTTLS\n", "220\r\n");
    run(VerifyProtocol::SmtpStarttls, script)
        .await
        .expect("upgrade");
}

#[tokio::test]
async fn smtp_without_starttls_says_what_was_offered_and_how_to_enable_it() {
    let script = vec![
        Send("220 mx ESMTP\r\n"),
        Expect("EHLO [127.0.0.1]"),
        Send("250-mx\r\n250-PIPELINING\r\n250 SIZE 1000\r\n"),
    ];
    let (err, text) = message(run(VerifyProtocol::SmtpStarttls, script).await);
    assert_eq!(err.reason(), "no-starttls");
    assert_eq!(
        text,
        "the server did not offer STARTTLS in its EHLO reply (it offered: PIPELINING, SIZE): \
         enable TLS in the server (postfix: smtpd_tls_security_level = may), \
         or use verify.protocol = tls for an implicit-TLS port (465)"
    );
}

#[tokio::test]
async fn smtp_refused_starttls_quotes_the_server() {
    let script = smtp_script(
        "220 mx\r\n",
        "250-mx\r\n250 STARTTLS\r\n",
        "454 4.7.0 TLS not available due to local problem\r\n",
    );
    let (err, text) = message(run(VerifyProtocol::SmtpStarttls, script).await);
    assert_eq!(err.reason(), "starttls-refused");
    assert_eq!(
        text,
        "the server refused STARTTLS: \"454 4.7.0 TLS not available due to local problem\""
    );
}

#[tokio::test]
async fn smtp_rejecting_greeting_is_quoted() {
    let script = vec![Send(
        "554-mx.example.test\r\n554 5.3.2 no service for you\r\n",
    )];
    let (err, text) = message(run(VerifyProtocol::SmtpStarttls, script).await);
    assert_eq!(err.reason(), "greeting");
    assert_eq!(
        text,
        "the SMTP server turned the session down in its greeting: \
         \"554-mx.example.test / 554 5.3.2 no service for you\""
    );
}

#[tokio::test]
async fn smtp_refused_ehlo() {
    let script = vec![
        Send("220 old\r\n"),
        Expect("EHLO [127.0.0.1]"),
        Send("502 5.5.1 command not implemented\r\n"),
    ];
    let (err, text) = message(run(VerifyProtocol::SmtpStarttls, script).await);
    assert_eq!(err.reason(), "starttls-refused");
    assert!(text.starts_with("the server refused EHLO: \"502"), "{text}");
}

#[tokio::test]
async fn smtp_recognises_other_servers() {
    for (greeting, hint) in [
        ("HTTP/1.1 400 Bad Request\r\n", "plain HTTP server"),
        ("* OK [CAPABILITY IMAP4rev1] ready\r\n", "imap-starttls"),
        ("+OK POP3 ready\r\n", "pop3-starttls"),
        ("SSH-2.0-OpenSSH_9.6\r\n", "SSH server"),
    ] {
        let (err, text) = message(run(VerifyProtocol::SmtpStarttls, vec![Send(greeting)]).await);
        assert_eq!(err.reason(), "bad-reply", "{greeting}");
        assert!(text.starts_with("expected an SMTP reply"), "{text}");
        assert!(text.contains(hint), "{text}");
    }
}

#[tokio::test]
async fn smtp_multi_line_reply_must_keep_its_code() {
    let script = vec![Send("220-mx\r\n221 bye\r\n")];
    let (err, text) = message(run(VerifyProtocol::SmtpStarttls, script).await);
    assert_eq!(err.reason(), "bad-reply");
    assert!(text.contains("\"221 bye\""), "{text}");
}

#[tokio::test]
async fn oversized_reply_is_cut_off() {
    let huge: &'static str = "2".repeat(MAX_PREAMBLE + 10).leak();
    let (err, text) = message(run(VerifyProtocol::SmtpStarttls, vec![Send(huge)]).await);
    assert!(matches!(err, StarttlsError::TooLong { limit, .. } if limit == MAX_PREAMBLE));
    assert_eq!(err.reason(), "bad-reply");
    assert!(text.contains("more than 65536 bytes while we waited for the greeting"));

    // Many short lines add up too.
    let lines: &'static str = "250-x\r\n".repeat(MAX_PREAMBLE / 7 + 1).leak();
    let script = vec![Send("220 mx\r\n"), Expect("EHLO [127.0.0.1]"), Send(lines)];
    let (err, _) = message(run(VerifyProtocol::SmtpStarttls, script).await);
    assert!(matches!(
        err,
        StarttlsError::TooLong {
            awaiting: "the EHLO reply",
            ..
        }
    ));
}

#[tokio::test]
async fn server_closing_early_is_reported_with_what_we_waited_for() {
    let script = vec![Send("220 mx\r\n"), Expect("EHLO [127.0.0.1]")];
    let (err, text) = message(run(VerifyProtocol::SmtpStarttls, script).await);
    assert_eq!(err.reason(), "closed");
    assert_eq!(
        text,
        "the server closed the connection while we waited for the EHLO reply"
    );

    let (err, _) = message(run(VerifyProtocol::SmtpStarttls, vec![Send("220 mx")]).await);
    assert!(matches!(
        err,
        StarttlsError::Closed {
            awaiting: "the greeting"
        }
    ));
}

#[tokio::test]
async fn silence_times_out_in_the_phase_it_happened() {
    let quick = || Instant::now() + Duration::from_millis(100);
    let started = Instant::now();
    let (err, _) = message(run_until(VerifyProtocol::SmtpStarttls, vec![Hang], quick()).await);
    assert!(
        matches!(
            err,
            StarttlsError::Timeout {
                phase: Phase::Greeting,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    let script = vec![
        Send("220 mx\r\n"),
        Expect("EHLO [127.0.0.1]"),
        Send("250-mx\r\n250 STARTTLS\r\n"),
        Expect("STARTTLS"),
        Hang,
    ];
    let (err, text) = message(run_until(VerifyProtocol::SmtpStarttls, script, quick()).await);
    assert!(
        matches!(
            err,
            StarttlsError::Timeout {
                phase: Phase::Starttls,
                awaiting: "the STARTTLS reply"
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.reason(), "timeout");
    assert_eq!(text, "timed out waiting for the STARTTLS reply");
}

// === IMAP ===

#[tokio::test]
async fn imap_uses_the_capabilities_of_the_greeting() {
    let script = vec![
        Send("* OK [CAPABILITY IMAP4rev1 SASL-IR STARTTLS AUTH=PLAIN] Dovecot ready.\r\n"),
        Expect("a002 STARTTLS"),
        Send("a002 OK Begin TLS negotiation now.\r\n"),
        Send(GO),
    ];
    run(VerifyProtocol::ImapStarttls, script)
        .await
        .expect("upgrade");
}

#[tokio::test]
async fn imap_asks_for_capabilities_when_the_greeting_has_none() {
    let script = vec![
        Send("* OK IMAP4rev1 server ready\r\n"),
        Expect("a001 CAPABILITY"),
        Send("* CAPABILITY IMAP4rev1 starttls LOGINDISABLED\r\na001 OK CAPABILITY completed\r\n"),
        Expect("a002 STARTTLS"),
        Send("* OK still here\r\na002 OK Begin TLS\r\n"),
        Send(GO),
    ];
    run(VerifyProtocol::ImapStarttls, script)
        .await
        .expect("upgrade");
}

#[tokio::test]
async fn imap_reads_capabilities_from_the_tagged_reply_and_skips_literals() {
    let script = vec![
        Send("* OK [CAPABILITY IMAP4rev1 LOGINDISABLED] ready\r\n"),
        Expect("a001 CAPABILITY"),
        Send("* ID (\"name\" {9}\r\na001 OK x)\r\n"),
        Send("a001 OK [CAPABILITY IMAP4rev1 STARTTLS] done\r\n"),
        Expect("a002 STARTTLS"),
        Send("a002 OK go\r\n"),
        Send(GO),
    ];
    run(VerifyProtocol::ImapStarttls, script)
        .await
        .expect("upgrade");
}

#[tokio::test]
async fn imap_without_starttls() {
    let script = vec![
        Send("* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n"),
        Expect("a001 CAPABILITY"),
        Send("* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\na001 OK done\r\n"),
    ];
    let (err, text) = message(run(VerifyProtocol::ImapStarttls, script).await);
    assert_eq!(err.reason(), "no-starttls");
    assert_eq!(
        text,
        "the server did not offer STARTTLS in its CAPABILITY reply \
         (it offered: IMAP4rev1, AUTH=PLAIN): enable TLS in the server (dovecot: ssl = yes), \
         or use verify.protocol = tls for an implicit-TLS port (993)"
    );
}

#[tokio::test]
async fn imap_refusals() {
    let script = vec![
        Send("* OK [CAPABILITY IMAP4rev1 STARTTLS] ready\r\n"),
        Expect("a002 STARTTLS"),
        Send("a002 NO [UNAVAILABLE] TLS is not configured\r\n"),
    ];
    let (err, text) = message(run(VerifyProtocol::ImapStarttls, script).await);
    assert_eq!(err.reason(), "starttls-refused");
    assert_eq!(
        text,
        "the server refused STARTTLS: \"a002 NO [UNAVAILABLE] TLS is not configured\""
    );

    let script = vec![
        Send("* OK ready\r\n"),
        Expect("a001 CAPABILITY"),
        Send("* BYE shutting down\r\n"),
    ];
    let (err, text) = message(run(VerifyProtocol::ImapStarttls, script).await);
    assert_eq!(err.reason(), "starttls-refused");
    assert!(text.contains("\"* BYE shutting down\""), "{text}");
}

#[tokio::test]
async fn imap_greetings_that_cannot_lead_to_tls() {
    let (err, text) = message(
        run(
            VerifyProtocol::ImapStarttls,
            vec![Send("* PREAUTH IMAP4rev1 logged in as mail\r\n")],
        )
        .await,
    );
    assert_eq!(err.reason(), "greeting");
    assert!(
        text.starts_with(
            "the IMAP server turned the session down in its greeting: \
             \"* PREAUTH IMAP4rev1 logged in as mail\"; a pre-authenticated session"
        ),
        "{text}"
    );

    let (err, text) = message(
        run(
            VerifyProtocol::ImapStarttls,
            vec![Send("* BYE too many connections\r\n")],
        )
        .await,
    );
    assert_eq!(err.reason(), "greeting");
    assert!(text.ends_with("\"* BYE too many connections\""), "{text}");

    let (err, text) = message(
        run(
            VerifyProtocol::ImapStarttls,
            vec![Send("220 smtp.example ESMTP\r\n")],
        )
        .await,
    );
    assert_eq!(err.reason(), "bad-reply");
    assert!(text.contains("smtp-starttls"), "{text}");
}

// === POP3 ===

#[tokio::test]
async fn pop3_upgrades() {
    let script = vec![
        Send("+OK Dovecot ready.\r\n"),
        Expect("CAPA"),
        Send("+OK\r\nCAPA\r\nTOP\r\n..weird\r\nSTLS\r\nSASL PLAIN\r\n.\r\n"),
        Expect("STLS"),
        Send("+OK Begin TLS negotiation now.\r\n"),
        Send(GO),
    ];
    run(VerifyProtocol::Pop3Starttls, script)
        .await
        .expect("upgrade");
}

#[tokio::test]
async fn pop3_without_stls() {
    let script = vec![
        Send("+OK ready\r\n"),
        Expect("CAPA"),
        Send("+OK Capability list follows\r\nUSER\r\nTOP\r\n.\r\n"),
    ];
    let (err, text) = message(run(VerifyProtocol::Pop3Starttls, script).await);
    assert_eq!(err.reason(), "no-starttls");
    assert_eq!(
        text,
        "the server did not offer STLS in its CAPA reply (it offered: USER, TOP): \
         enable TLS in the server (dovecot: ssl = yes), \
         or use verify.protocol = tls for an implicit-TLS port (995)"
    );

    let script = vec![
        Send("+OK ready\r\n"),
        Expect("CAPA"),
        Send("-ERR unknown command\r\n"),
    ];
    let (err, text) = message(run(VerifyProtocol::Pop3Starttls, script).await);
    assert_eq!(err.reason(), "no-starttls");
    assert!(
        text.contains("(it offered: nothing, it refused CAPA with \"-ERR unknown command\")"),
        "{text}"
    );
}

#[tokio::test]
async fn pop3_refusals() {
    let script = vec![
        Send("+OK ready\r\n"),
        Expect("CAPA"),
        Send("+OK\r\nSTLS\r\n.\r\n"),
        Expect("STLS"),
        Send("-ERR TLS not available\r\n"),
    ];
    let (err, text) = message(run(VerifyProtocol::Pop3Starttls, script).await);
    assert_eq!(err.reason(), "starttls-refused");
    assert_eq!(text, "the server refused STLS: \"-ERR TLS not available\"");

    let (err, text) = message(
        run(
            VerifyProtocol::Pop3Starttls,
            vec![Send("-ERR [SYS/TEMP] busy\r\n")],
        )
        .await,
    );
    assert_eq!(err.reason(), "greeting");
    assert!(text.ends_with("\"-ERR [SYS/TEMP] busy\""), "{text}");

    // Hanging up in the middle of the capability list.
    let script = vec![Send("+OK\r\n"), Expect("CAPA"), Send("+OK\r\nUSER\r\n")];
    let (err, text) = message(run(VerifyProtocol::Pop3Starttls, script).await);
    assert_eq!(err.reason(), "closed");
    assert!(text.ends_with("the CAPA reply"), "{text}");
}

// === Plain TLS and helpers ===

#[tokio::test]
async fn plain_tls_has_no_preamble() {
    run(VerifyProtocol::Tls, vec![Send(GO)])
        .await
        .expect("nothing to do");
}

#[test]
fn smtp_reply_lines() {
    assert_eq!(
        smtp_line("250-PIPELINING"),
        Some((250, false, "PIPELINING"))
    );
    assert_eq!(smtp_line("250 OK"), Some((250, true, "OK")));
    assert_eq!(smtp_line("220"), Some((220, true, "")));
    for bad in ["", "25", "2500 x", "abc def", "150 x", "650 x", "250x"] {
        assert_eq!(smtp_line(bad), None, "{bad:?}");
    }
}

#[test]
fn imap_literal_lengths() {
    assert_eq!(literal_len("* ID (\"x\" {12}"), Some(12));
    assert_eq!(literal_len("* ID {0+}"), Some(0));
    for none in ["* OK", "{}", "{x}", "* OK {12} more", "{-1}"] {
        assert_eq!(literal_len(none), None, "{none}");
    }
}

#[test]
fn identifies_servers_by_their_first_bytes() {
    assert_eq!(identify(b"\x16\x03\x03\x00\x10"), Some(Speaker::Tls));
    assert_eq!(identify(b"\x15\x03\x01\x00\x02"), Some(Speaker::Tls));
    assert_eq!(identify(b"HTTP/1.1 400 Bad Request"), Some(Speaker::Http));
    assert_eq!(identify(b"220 mx ESMTP"), Some(Speaker::Smtp));
    assert_eq!(identify(b"554-no"), Some(Speaker::Smtp));
    assert_eq!(identify(b"* OK ready"), Some(Speaker::Imap));
    assert_eq!(identify(b"+OK ready"), Some(Speaker::Pop3));
    assert_eq!(identify(b"SSH-2.0-x"), Some(Speaker::Ssh));
    for other in [&b""[..], b"hello", b"22", b"\x16", b"\x00\x00"] {
        assert_eq!(identify(other), None, "{other:?}");
    }
}

#[test]
fn quotes_are_escaped_and_short() {
    assert_eq!(quote("a\tb\u{1b}[31m"), "\"a\\tb\\u{1b}[31m\"");
    let long = "x".repeat(500);
    let q = quote(&long);
    assert_eq!(q.chars().count(), QUOTE_LIMIT + 3, "{q}");
    assert!(q.ends_with("…\""));
}
