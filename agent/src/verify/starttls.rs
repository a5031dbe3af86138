//! The plaintext preambles that come before the TLS handshake on mail ports:
//! SMTP `STARTTLS` (RFC 5321, RFC 3207), IMAP `STARTTLS` (RFC 9051, RFC 3501)
//! and POP3 `STLS` (RFC 2595, RFC 2449).
//!
//! Guarantees:
//! - **Nothing after the go-ahead is consumed.** Replies are read one byte at
//!   a time and reading stops at the end of the line that says "go ahead", so
//!   the next byte on the stream belongs to the TLS layer.
//! - **Bounded.** At most [`MAX_PREAMBLE`] bytes are read from the server in
//!   the whole exchange; a server that sends more is an error, not a memory
//!   problem. Every read and write is bounded by the caller's deadline.
//! - **The server's words are quoted.** A refusal or an unexpected reply is
//!   reported with what the server said (escaped, shortened), and a missing
//!   capability with what the server did offer and how to enable TLS.
//!
//! The functions are generic over the stream so they are tested against
//! scripted servers on in-memory pipes.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, timeout_at};

use super::phase::Phase;
use crate::kind::VerifyProtocol;
use crate::model::fmt::escape;

/// The most bytes read from the server before the TLS handshake.
pub const MAX_PREAMBLE: usize = 64 * 1024;

/// The longest stretch of a server reply quoted in an error message.
const QUOTE_LIMIT: usize = 200;

/// The IMAP tags we use, in order.
const IMAP_CAPABILITY_TAG: &str = "a001";
const IMAP_STARTTLS_TAG: &str = "a002";

/// Why the plaintext preamble did not end in a go-ahead for TLS.
#[derive(Debug, thiserror::Error)]
pub enum StarttlsError {
    /// The deadline passed while waiting for the server.
    #[error("timed out waiting for {awaiting}")]
    Timeout {
        phase: Phase,
        awaiting: &'static str,
    },
    /// The server hung up.
    #[error("the server closed the connection while we waited for {awaiting}")]
    Closed { awaiting: &'static str },
    /// Reading or writing failed (reset, broken pipe).
    #[error("the connection failed while we waited for {awaiting}: {source}")]
    Io {
        awaiting: &'static str,
        #[source]
        source: io::Error,
    },
    /// The greeting turned the session down (SMTP 554, IMAP `BYE`, POP3
    /// `-ERR`) or cannot lead to TLS (IMAP `PREAUTH`).
    #[error("the {protocol} server turned the session down in its greeting: {reply}{hint}")]
    Greeting {
        protocol: &'static str,
        reply: String,
        hint: &'static str,
    },
    /// The server's capabilities lack the STARTTLS keyword.
    #[error(
        "the server did not offer {keyword} in its {listing} (it offered: {offered}): {remedy}"
    )]
    NotOffered {
        keyword: &'static str,
        listing: &'static str,
        offered: String,
        remedy: &'static str,
    },
    /// A command on the way to TLS (EHLO, CAPABILITY, CAPA, STARTTLS, STLS)
    /// was answered with a refusal.
    #[error("the server refused {command}: {reply}")]
    Refused {
        command: &'static str,
        reply: String,
    },
    /// The server does not speak the protocol we expected.
    #[error("expected {expected} but the server sent {got}{hint}")]
    Garbled {
        expected: &'static str,
        got: String,
        hint: String,
    },
    /// The server sent more than [`MAX_PREAMBLE`] bytes before TLS.
    #[error(
        "the server sent more than {limit} bytes while we waited for {awaiting}: \
         this is not a mail server speaking the expected protocol"
    )]
    TooLong {
        awaiting: &'static str,
        limit: usize,
    },
}

impl StarttlsError {
    /// A short, stable code for events and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            StarttlsError::Timeout { .. } => "timeout",
            StarttlsError::Closed { .. } => "closed",
            StarttlsError::Io { .. } => "io",
            StarttlsError::Greeting { .. } => "greeting",
            StarttlsError::NotOffered { .. } => "no-starttls",
            StarttlsError::Refused { .. } => "starttls-refused",
            StarttlsError::Garbled { .. } | StarttlsError::TooLong { .. } => "bad-reply",
        }
    }
}

/// Runs the preamble of `protocol` on `io` (nothing for [`VerifyProtocol::Tls`]).
/// `client_name` is our name in SMTP `EHLO`: a host name or an address
/// literal such as `[192.0.2.1]`.
pub async fn negotiate<S>(
    protocol: VerifyProtocol,
    io: &mut S,
    client_name: &str,
    deadline: Instant,
) -> Result<(), StarttlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match protocol {
        VerifyProtocol::Tls => Ok(()),
        VerifyProtocol::SmtpStarttls => smtp(io, client_name, deadline).await,
        VerifyProtocol::ImapStarttls => imap(io, deadline).await,
        VerifyProtocol::Pop3Starttls => pop3(io, deadline).await,
    }
}

// === SMTP ===

/// SMTP (RFC 5321 §4.2, RFC 3207): `220` greeting, `EHLO`, a `250` reply
/// listing `STARTTLS`, `STARTTLS`, `220`.
pub async fn smtp<S>(io: &mut S, client_name: &str, deadline: Instant) -> Result<(), StarttlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut c = Conn::new(io, deadline);

    let greeting = c.smtp_reply().await?;
    if greeting.code != 220 {
        return Err(StarttlsError::Greeting {
            protocol: "SMTP",
            reply: greeting.quote(),
            hint: "",
        });
    }

    c.send(
        format!("EHLO {client_name}\r\n").as_bytes(),
        "the EHLO reply",
    )
    .await?;
    let ehlo = c.smtp_reply().await?;
    if ehlo.code != 250 {
        return Err(StarttlsError::Refused {
            command: "EHLO",
            reply: ehlo.quote(),
        });
    }
    // The first line is the server's name; each further line is one
    // extension keyword with its parameters (RFC 5321 §4.1.1.1).
    let keywords: Vec<&str> = ehlo
        .texts
        .iter()
        .skip(1)
        .filter_map(|t| t.split_ascii_whitespace().next())
        .collect();
    if !keywords.iter().any(|k| k.eq_ignore_ascii_case("STARTTLS")) {
        return Err(StarttlsError::NotOffered {
            keyword: "STARTTLS",
            listing: "EHLO reply",
            offered: offered(&keywords),
            remedy: "enable TLS in the server (postfix: smtpd_tls_security_level = may), \
                     or use verify.protocol = tls for an implicit-TLS port (465)",
        });
    }

    c.send(b"STARTTLS\r\n", "the STARTTLS reply").await?;
    let go = c.smtp_reply().await?;
    if go.code != 220 {
        return Err(StarttlsError::Refused {
            command: "STARTTLS",
            reply: go.quote(),
        });
    }
    Ok(())
}

/// One SMTP reply: its code and the text of each line.
struct SmtpReply {
    code: u16,
    texts: Vec<String>,
    raw: Vec<String>,
}

impl SmtpReply {
    fn quote(&self) -> String {
        quote(&self.raw.join(" / "))
    }
}

/// Splits `line` into (code, last line?, text) per RFC 5321 §4.2:
/// three digits, then `-` (more lines follow), a space or the end.
fn smtp_line(line: &str) -> Option<(u16, bool, &str)> {
    let bytes = line.as_bytes();
    if bytes.len() < 3
        || !bytes[..3].iter().all(u8::is_ascii_digit)
        || !(b'2'..=b'5').contains(&bytes[0])
    {
        return None;
    }
    let code = line[..3].parse().ok()?;
    match bytes.get(3) {
        None => Some((code, true, "")),
        Some(b' ') => Some((code, true, &line[4..])),
        Some(b'-') => Some((code, false, &line[4..])),
        Some(_) => None,
    }
}

// === IMAP ===

/// IMAP (RFC 9051 §7.1, §6.2.1; RFC 3501): `* OK` greeting, the capability
/// list from its `[CAPABILITY …]` code or from `CAPABILITY`, then
/// `STARTTLS` answered by a tagged `OK`.
pub async fn imap<S>(io: &mut S, deadline: Instant) -> Result<(), StarttlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut c = Conn::new(io, deadline);

    let greeting = c.imap_line().await?;
    let Some(rest) = strip_prefix_ci(&greeting, "* ") else {
        return Err(garbled("an IMAP greeting (\"* OK …\")", &greeting));
    };
    let (status, text) = split_word(rest);
    if status.eq_ignore_ascii_case("PREAUTH") {
        return Err(StarttlsError::Greeting {
            protocol: "IMAP",
            reply: quote(&greeting),
            hint: "; a pre-authenticated session cannot start TLS (RFC 9051 §6.2.1): \
                   verify an implicit-TLS port with verify.protocol = tls",
        });
    }
    if status.eq_ignore_ascii_case("BYE") {
        return Err(StarttlsError::Greeting {
            protocol: "IMAP",
            reply: quote(&greeting),
            hint: "",
        });
    }
    if !status.eq_ignore_ascii_case("OK") {
        return Err(garbled("an IMAP greeting (\"* OK …\")", &greeting));
    }

    let mut caps = capability_code(text).unwrap_or_default();
    if !has_word(&caps, "STARTTLS") {
        // RFC 9051 §6.1.1: ask, the greeting need not list capabilities.
        c.send(
            format!("{IMAP_CAPABILITY_TAG} CAPABILITY\r\n").as_bytes(),
            "the CAPABILITY reply",
        )
        .await?;
        let (done, untagged) = c.imap_tagged(IMAP_CAPABILITY_TAG, "CAPABILITY").await?;
        caps.clear();
        for line in &untagged {
            if let Some(list) = strip_prefix_ci(line, "* CAPABILITY ") {
                caps.extend(list.split_ascii_whitespace().map(str::to_owned));
            }
        }
        // A tagged OK may carry the list as a response code as well.
        if let Some(list) = capability_code(split_word(&done).1) {
            caps.extend(list);
        }
        if !has_word(&caps, "STARTTLS") {
            let words: Vec<&str> = caps.iter().map(String::as_str).collect();
            return Err(StarttlsError::NotOffered {
                keyword: "STARTTLS",
                listing: "CAPABILITY reply",
                offered: offered(&words),
                remedy: "enable TLS in the server (dovecot: ssl = yes), \
                         or use verify.protocol = tls for an implicit-TLS port (993)",
            });
        }
    }

    c.send(
        format!("{IMAP_STARTTLS_TAG} STARTTLS\r\n").as_bytes(),
        "the STARTTLS reply",
    )
    .await?;
    c.imap_tagged(IMAP_STARTTLS_TAG, "STARTTLS").await?;
    Ok(())
}

/// The words of a `[CAPABILITY …]` response code at the start of `text`.
fn capability_code(text: &str) -> Option<Vec<String>> {
    let inner = text.strip_prefix('[')?;
    let inner = &inner[..inner.find(']')?];
    let list = strip_prefix_ci(inner, "CAPABILITY ")?;
    Some(list.split_ascii_whitespace().map(str::to_owned).collect())
}

// === POP3 ===

/// POP3 (RFC 1939, RFC 2449 §5, RFC 2595 §4): `+OK` greeting, `CAPA` listing
/// `STLS` in its dot-terminated reply, then `STLS` answered by `+OK`.
pub async fn pop3<S>(io: &mut S, deadline: Instant) -> Result<(), StarttlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut c = Conn::new(io, deadline);

    let greeting = c.line().await?;
    if strip_prefix_ci(&greeting, "-ERR").is_some() {
        return Err(StarttlsError::Greeting {
            protocol: "POP3",
            reply: quote(&greeting),
            hint: "",
        });
    }
    if !pop3_ok(&greeting) {
        return Err(garbled("a POP3 greeting (\"+OK …\")", &greeting));
    }

    c.send(b"CAPA\r\n", "the CAPA reply").await?;
    let status = c.line().await?;
    let mut caps = Vec::new();
    if pop3_ok(&status) {
        loop {
            let line = c.line().await?;
            if line == "." {
                break;
            }
            // Byte-stuffing (RFC 1939 §3): a leading dot is doubled.
            let line = line.strip_prefix('.').unwrap_or(&line);
            if let Some(word) = line.split_ascii_whitespace().next() {
                caps.push(word.to_owned());
            }
        }
    } else if strip_prefix_ci(&status, "-ERR").is_none() {
        return Err(garbled("a reply to CAPA (\"+OK\" or \"-ERR\")", &status));
    }
    if !has_word(&caps, "STLS") {
        let offered = if caps.is_empty() && !pop3_ok(&status) {
            format!("nothing, it refused CAPA with {}", quote(&status))
        } else {
            let words: Vec<&str> = caps.iter().map(String::as_str).collect();
            offered(&words)
        };
        return Err(StarttlsError::NotOffered {
            keyword: "STLS",
            listing: "CAPA reply",
            offered,
            remedy: "enable TLS in the server (dovecot: ssl = yes), \
                     or use verify.protocol = tls for an implicit-TLS port (995)",
        });
    }

    c.send(b"STLS\r\n", "the STLS reply").await?;
    let go = c.line().await?;
    if !pop3_ok(&go) {
        return Err(StarttlsError::Refused {
            command: "STLS",
            reply: quote(&go),
        });
    }
    Ok(())
}

/// `+OK`, alone or followed by a space and text.
fn pop3_ok(line: &str) -> bool {
    strip_prefix_ci(line, "+OK").is_some_and(|rest| rest.is_empty() || rest.starts_with(' '))
}

// === impl Conn ===

/// One side of the plaintext conversation: the stream, the deadline and the
/// byte budget, and what we are waiting for (for messages).
struct Conn<'a, S> {
    io: &'a mut S,
    deadline: Instant,
    budget: usize,
    phase: Phase,
    awaiting: &'static str,
}

impl<'a, S> Conn<'a, S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn new(io: &'a mut S, deadline: Instant) -> Self {
        Conn {
            io,
            deadline,
            budget: MAX_PREAMBLE,
            phase: Phase::Greeting,
            awaiting: "the greeting",
        }
    }

    /// Sends `command`; what comes back is described as `awaiting`.
    async fn send(&mut self, command: &[u8], awaiting: &'static str) -> Result<(), StarttlsError> {
        self.phase = Phase::Starttls;
        self.awaiting = awaiting;
        let write = async {
            self.io.write_all(command).await?;
            self.io.flush().await
        };
        match timeout_at(self.deadline, write).await {
            Err(_) => Err(self.timeout()),
            Ok(Err(source)) => Err(self.io_error(source)),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// One line without its line ending (CRLF, or a bare LF from a lenient
    /// server), read byte by byte so nothing after it is consumed. Bytes that
    /// are not UTF-8 are replaced, which only matters for messages.
    async fn line(&mut self) -> Result<String, StarttlsError> {
        let mut line = Vec::new();
        loop {
            let byte = self.byte().await?;
            if byte == b'\n' {
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(String::from_utf8_lossy(&line).into_owned());
            }
            line.push(byte);
        }
    }

    async fn byte(&mut self) -> Result<u8, StarttlsError> {
        if self.budget == 0 {
            return Err(StarttlsError::TooLong {
                awaiting: self.awaiting,
                limit: MAX_PREAMBLE,
            });
        }
        let mut byte = [0u8; 1];
        match timeout_at(self.deadline, self.io.read(&mut byte)).await {
            Err(_) => Err(self.timeout()),
            Ok(Err(source)) => Err(self.io_error(source)),
            Ok(Ok(0)) => Err(StarttlsError::Closed {
                awaiting: self.awaiting,
            }),
            Ok(Ok(_)) => {
                self.budget -= 1;
                Ok(byte[0])
            }
        }
    }

    /// A whole SMTP reply, all lines of a multi-line one.
    async fn smtp_reply(&mut self) -> Result<SmtpReply, StarttlsError> {
        let mut reply = SmtpReply {
            code: 0,
            texts: Vec::new(),
            raw: Vec::new(),
        };
        loop {
            let line = self.line().await?;
            let Some((code, last, text)) = smtp_line(&line) else {
                return Err(garbled("an SMTP reply (\"220 …\")", &line));
            };
            if !reply.raw.is_empty() && code != reply.code {
                return Err(garbled(
                    "the same reply code on every line of a multi-line SMTP reply",
                    &line,
                ));
            }
            reply.code = code;
            reply.texts.push(text.to_owned());
            reply.raw.push(line);
            if last {
                return Ok(reply);
            }
        }
    }

    /// One IMAP response line with any literals (`{n}` at the end of a line,
    /// RFC 9051 §4.3) read and kept inline.
    async fn imap_line(&mut self) -> Result<String, StarttlsError> {
        let mut line = self.line().await?;
        while let Some(n) = literal_len(&line) {
            for _ in 0..n {
                line.push(char::from(self.byte().await?));
            }
            line.push_str(&self.line().await?);
        }
        Ok(line)
    }

    /// Reads responses until the one tagged `tag`; returns it when it is `OK`,
    /// with the untagged lines before it. `* BYE` ends the session.
    async fn imap_tagged(
        &mut self,
        tag: &str,
        command: &'static str,
    ) -> Result<(String, Vec<String>), StarttlsError> {
        let mut untagged = Vec::new();
        loop {
            let line = self.imap_line().await?;
            if let Some(rest) = line
                .strip_prefix(tag)
                .and_then(|rest| rest.strip_prefix(' '))
            {
                let (status, _) = split_word(rest);
                if status.eq_ignore_ascii_case("OK") {
                    return Ok((rest.to_owned(), untagged));
                }
                if status.eq_ignore_ascii_case("NO") || status.eq_ignore_ascii_case("BAD") {
                    return Err(StarttlsError::Refused {
                        command,
                        reply: quote(&line),
                    });
                }
                return Err(garbled("a tagged OK, NO or BAD", &line));
            }
            if strip_prefix_ci(&line, "* BYE").is_some() {
                return Err(StarttlsError::Refused {
                    command,
                    reply: quote(&line),
                });
            }
            if !line.starts_with("* ") {
                return Err(garbled(
                    "an IMAP response (\"* …\" or a tagged reply)",
                    &line,
                ));
            }
            untagged.push(line);
        }
    }

    fn timeout(&self) -> StarttlsError {
        StarttlsError::Timeout {
            phase: self.phase,
            awaiting: self.awaiting,
        }
    }

    fn io_error(&self, source: io::Error) -> StarttlsError {
        StarttlsError::Io {
            awaiting: self.awaiting,
            source,
        }
    }
}

/// The length of the literal announced at the end of an IMAP line:
/// `{n}` or the non-synchronizing `{n+}`.
fn literal_len(line: &str) -> Option<usize> {
    let open = line.strip_suffix('}')?;
    let start = open.rfind('{')?;
    let digits = &open[start + 1..];
    let digits = digits.strip_suffix('+').unwrap_or(digits);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

// === Helpers ===

fn strip_prefix_ci<'l>(line: &'l str, prefix: &str) -> Option<&'l str> {
    let head = line.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &line[prefix.len()..])
}

/// The first word of `text` and the rest after one space.
fn split_word(text: &str) -> (&str, &str) {
    text.split_once(' ').unwrap_or((text, ""))
}

fn has_word(words: &[String], wanted: &str) -> bool {
    words.iter().any(|w| w.eq_ignore_ascii_case(wanted))
}

/// The keywords a server listed, for a message: escaped, since they are
/// the server's bytes.
fn offered(words: &[&str]) -> String {
    if words.is_empty() {
        "nothing".to_owned()
    } else {
        let shown: Vec<String> = words.iter().map(|w| escape(w.as_bytes())).collect();
        shown.join(", ")
    }
}

fn garbled(expected: &'static str, got: &str) -> StarttlsError {
    let hint = match identify(got.as_bytes()) {
        Some(speaker) => format!(": {}", speaker.advice()),
        None => String::new(),
    };
    StarttlsError::Garbled {
        expected,
        got: quote(got),
        hint,
    }
}

/// `text` in quotes with control characters escaped, shortened to
/// [`QUOTE_LIMIT`] characters.
pub(crate) fn quote(text: &str) -> String {
    let mut short: String = text.chars().take(QUOTE_LIMIT).collect();
    if short.len() < text.len() {
        short.push('…');
    }
    format!("{short:?}")
}

/// What kind of server the first bytes it sent suggest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Speaker {
    Tls,
    Http,
    Smtp,
    Imap,
    Pop3,
    Ssh,
}

impl Speaker {
    /// Names the server and says which setting fits it.
    pub(crate) fn advice(self) -> &'static str {
        match self {
            Speaker::Tls => {
                "this looks like a TLS server (implicit TLS): use verify.protocol = tls"
            }
            Speaker::Http => "this looks like a plain HTTP server: check verify.endpoint",
            Speaker::Smtp => {
                "this looks like an SMTP server greeting: use verify.protocol = smtp-starttls"
            }
            Speaker::Imap => {
                "this looks like an IMAP server greeting: use verify.protocol = imap-starttls"
            }
            Speaker::Pop3 => {
                "this looks like a POP3 server greeting: use verify.protocol = pop3-starttls"
            }
            Speaker::Ssh => "this looks like an SSH server: check verify.endpoint",
        }
    }
}

/// Guesses who is talking from the first bytes it sent; cheap prefix checks.
pub(crate) fn identify(first: &[u8]) -> Option<Speaker> {
    let starts = |p: &[u8]| first.len() >= p.len() && first[..p.len()].eq_ignore_ascii_case(p);
    match first {
        // A TLS record header: handshake or alert, version 3.x.
        [0x15 | 0x16, 0x03, ..] => Some(Speaker::Tls),
        _ if starts(b"HTTP/") => Some(Speaker::Http),
        _ if starts(b"SSH-") => Some(Speaker::Ssh),
        _ if starts(b"* OK") || starts(b"* PREAUTH") || starts(b"* BYE") => Some(Speaker::Imap),
        _ if starts(b"+OK") || starts(b"-ERR") => Some(Speaker::Pop3),
        [
            b'2' | b'4' | b'5',
            b'0'..=b'9',
            b'0'..=b'9',
            b' ' | b'-',
            ..,
        ] => Some(Speaker::Smtp),
        _ => None,
    }
}

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;
