//! What a mail server on loopback serves: implicit TLS, or the plaintext
//! dialogue up to `STARTTLS` (SMTP, RFC 3207), `STARTTLS` (IMAP, RFC 3501 §6.2.1)
//! or `STLS` (POP3, RFC 2595 §4), then a real handshake.
//!
//! The handshake is [`super::tls`]'s: any certificate is accepted, the
//! handshake signatures are checked against the presented leaf. The plaintext
//! part reads one byte at a time, so nothing of the server's TLS records is
//! consumed before rustls takes over the socket. This is the tests' own,
//! independent view of what is served; it shares no code with the agent's
//! verification.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use rustls::ClientConnection;
use rustls::pki_types::ServerName;

use super::pki::sha256_hex;
use super::tls::client_config;

/// Per-probe bound on connect, on each read and on the whole exchange.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest plaintext line accepted from a server.
const MAX_LINE: usize = 4096;
/// Name sent in `EHLO`.
const EHLO_NAME: &str = "probe.certctl.test";

/// How a client reaches TLS on a mail port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MailProtocol {
    /// TLS from the first byte (imaps, pop3s, smtps).
    Tls,
    /// SMTP greeting, `EHLO`, `STARTTLS`.
    Smtp,
    /// IMAP greeting, `STARTTLS`.
    Imap,
    /// POP3 greeting, `STLS`.
    Pop3,
}

impl MailProtocol {
    /// The `[target.verify] protocol` that speaks this dialogue.
    pub fn verify_protocol(self) -> &'static str {
        match self {
            MailProtocol::Tls => "tls",
            MailProtocol::Smtp => "smtp-starttls",
            MailProtocol::Imap => "imap-starttls",
            MailProtocol::Pop3 => "pop3-starttls",
        }
    }
}

/// Certificates served on `127.0.0.1:port` for `sni` after the `proto` dialogue, leaf first, as DER.
pub fn probe(port: u16, sni: &str, proto: MailProtocol) -> Result<Vec<Vec<u8>>, String> {
    let server_name = ServerName::try_from(sni.to_owned())
        .map_err(|e| format!("bad server name {sni:?}: {e}"))?;
    let mut line = Line::connect(port)?;
    match proto {
        MailProtocol::Tls => {}
        MailProtocol::Smtp => {
            line.smtp_reply(220, "greeting")?;
            line.send(&format!("EHLO {EHLO_NAME}"))?;
            let ehlo = line.smtp_reply(250, "EHLO")?;
            // Extension keywords follow the code and separator on each line.
            if !ehlo.iter().any(|l| {
                l.get(4..)
                    .is_some_and(|k| k.eq_ignore_ascii_case("STARTTLS"))
            }) {
                return Err(format!("{} does not offer STARTTLS: {ehlo:?}", line.addr));
            }
            line.send("STARTTLS")?;
            line.smtp_reply(220, "STARTTLS")?;
        }
        MailProtocol::Imap => {
            let greeting = line.read_line()?;
            if !greeting.starts_with("* OK") {
                return Err(format!("{} greeted with {greeting:?}", line.addr));
            }
            line.send("a1 STARTTLS")?;
            loop {
                let l = line.read_line()?;
                if let Some(status) = l.strip_prefix("a1 ") {
                    if status.starts_with("OK") {
                        break;
                    }
                    return Err(format!("{} refused STARTTLS: {l:?}", line.addr));
                }
            }
        }
        MailProtocol::Pop3 => {
            let greeting = line.read_line()?;
            if !greeting.starts_with("+OK") {
                return Err(format!("{} greeted with {greeting:?}", line.addr));
            }
            line.send("STLS")?;
            let reply = line.read_line()?;
            if !reply.starts_with("+OK") {
                return Err(format!("{} refused STLS: {reply:?}", line.addr));
            }
        }
    }
    line.handshake(server_name, sni)
}

/// SHA-256 hex of the served leaf's DER.
pub fn served_leaf_sha256(port: u16, sni: &str, proto: MailProtocol) -> Result<String, String> {
    let chain = probe(port, sni, proto)?;
    Ok(sha256_hex(&chain[0]))
}

/// Polls (bounded by `timeout`) until three probes in a row serve this
/// SHA-256 (right after a reload an old process can still answer with the
/// old leaf); Err says what was served last.
pub fn wait_until_served(
    port: u16,
    sni: &str,
    proto: MailProtocol,
    sha256: &str,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut in_a_row = 0;
    loop {
        let last = served_leaf_sha256(port, sni, proto);
        if last.as_deref() == Ok(sha256) {
            in_a_row += 1;
            if in_a_row == 3 {
                return Ok(());
            }
            continue;
        }
        in_a_row = 0;
        if Instant::now() >= deadline {
            return Err(format!(
                "127.0.0.1:{port} ({}, {sni}) still serves {last:?} after {timeout:?}, want {sha256}",
                proto.verify_protocol()
            ));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The plaintext greeting on `127.0.0.1:port` (SMTP: every line of the 220
/// reply, joined by `\n`), after which the client says goodbye. For readiness
/// checks: a server's greeting names it.
pub fn greeting(port: u16, proto: MailProtocol) -> Result<String, String> {
    let mut line = Line::connect(port)?;
    let (text, bye) = match proto {
        MailProtocol::Tls => return Err("an implicit-TLS port has no plaintext greeting".into()),
        MailProtocol::Smtp => (line.smtp_reply(220, "greeting")?.join("\n"), "QUIT"),
        MailProtocol::Imap => (line.read_line()?, "a1 LOGOUT"),
        MailProtocol::Pop3 => (line.read_line()?, "QUIT"),
    };
    let _ = line.send(bye);
    Ok(text)
}

// === impl Line ===

/// A plaintext line dialogue on a TCP connection, bounded by one deadline.
struct Line {
    sock: TcpStream,
    addr: SocketAddr,
    deadline: Instant,
}

impl Line {
    fn connect(port: u16) -> Result<Line, String> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let sock = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)
            .map_err(|e| format!("connect {addr}: {e}"))?;
        sock.set_read_timeout(Some(PROBE_TIMEOUT))
            .and_then(|()| sock.set_write_timeout(Some(PROBE_TIMEOUT)))
            .map_err(|e| format!("socket timeouts: {e}"))?;
        Ok(Line {
            sock,
            addr,
            deadline: Instant::now() + PROBE_TIMEOUT,
        })
    }

    /// Sends `text` and CRLF.
    fn send(&mut self, text: &str) -> Result<(), String> {
        self.sock
            .write_all(format!("{text}\r\n").as_bytes())
            .map_err(|e| format!("send {text:?} to {}: {e}", self.addr))
    }

    /// One line without its CRLF; byte by byte, so nothing after it is consumed.
    fn read_line(&mut self) -> Result<String, String> {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            if Instant::now() >= self.deadline {
                return Err(format!(
                    "{} sent no complete line within {PROBE_TIMEOUT:?} (so far {:?})",
                    self.addr,
                    String::from_utf8_lossy(&buf)
                ));
            }
            match self.sock.read(&mut byte) {
                Ok(0) => {
                    return Err(format!(
                        "{} closed the connection (after {:?})",
                        self.addr,
                        String::from_utf8_lossy(&buf)
                    ));
                }
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) => buf.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("read from {}: {e}", self.addr)),
            }
            if buf.len() > MAX_LINE {
                return Err(format!("{} sent a line over {MAX_LINE} bytes", self.addr));
            }
        }
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// An SMTP reply (all its lines), which must carry `code`.
    fn smtp_reply(&mut self, code: u16, what: &str) -> Result<Vec<String>, String> {
        let want = code.to_string();
        let mut lines = Vec::new();
        loop {
            let l = self.read_line()?;
            let last = l.as_bytes().get(3) != Some(&b'-');
            let ok = l.starts_with(&want);
            lines.push(l);
            if !ok {
                return Err(format!(
                    "{} answered {what} with {lines:?}, want {code}",
                    self.addr
                ));
            }
            if last {
                return Ok(lines);
            }
        }
    }

    /// The TLS handshake on the (now quiet) socket; the served chain, leaf first.
    fn handshake(
        mut self,
        server_name: ServerName<'static>,
        sni: &str,
    ) -> Result<Vec<Vec<u8>>, String> {
        let addr = self.addr;
        let mut conn = ClientConnection::new(client_config(), server_name)
            .map_err(|e| format!("tls client for {sni}: {e}"))?;
        while conn.is_handshaking() {
            if Instant::now() >= self.deadline {
                return Err(format!("tls handshake with {addr} ({sni}) timed out"));
            }
            match conn.complete_io(&mut self.sock) {
                Ok((0, 0)) if conn.is_handshaking() => {
                    return Err(format!("{addr} closed the connection during the handshake"));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("tls handshake with {addr} ({sni}): {e}")),
            }
        }
        let certs = conn
            .peer_certificates()
            .ok_or_else(|| format!("{addr} sent no certificate"))?
            .iter()
            .map(|c| c.to_vec())
            .collect();
        conn.send_close_notify();
        let _ = conn.complete_io(&mut self.sock);
        Ok(certs)
    }
}
