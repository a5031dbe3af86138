//! A `tracing` layer that writes to the systemd journal through its native
//! protocol (`systemd.journal-fields(7)`, datagrams to
//! `/run/systemd/journal/socket`), with the agent's fields as journal fields.
//!
//! Field mapping: every field of the event and of the spans it is in
//! becomes a journal field of the same name in upper case (`target` →
//! `TARGET`, `deploy_id` → `DEPLOY_ID`, `stage` → `STAGE`, `outcome` →
//! `OUTCOME`, `cert_sha256` → `CERT_SHA256`, `not_after` → `NOT_AFTER`); an
//! event field replaces a span field of the same name. `MESSAGE` is the
//! human line: `web: <message> stage=committed …` (the deploy's target
//! first, then the event's other fields, as on stderr). `PRIORITY` follows
//! the level (error 3, warn 4, info 6, debug and trace 7);
//! `SYSLOG_IDENTIFIER=certctl-agent`; `CODE_FILE`, `CODE_LINE` and
//! `CODE_MODULE` (the Rust module) say where the line was logged.
//!
//! Why not `tracing-journald`: it always writes the Rust module path as
//! `TARGET=`, which would put two values in the field that means "the
//! certctl target" to operators (`journalctl TARGET=web`), and it writes
//! span metadata (`SPAN_NAME`, `SPAN_CODE_FILE`, …) into every entry. The
//! protocol itself is a few lines, done here.
//!
//! Guarantees: field names are valid journal names (`[A-Z0-9_]`, starting
//! with a letter, at most 64 bytes; a field whose name would clash with one
//! set here gets an `F_` prefix); values with a newline use the protocol's
//! length-prefixed form, so nothing a value holds can forge another field;
//! values are cut at [`MAX_VALUE`] bytes; a send that fails (journald
//! restarting) loses that line and never blocks or panics.

use std::fmt::{self, Write as _};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// Where journald listens for native-protocol datagrams.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";
/// Longest value written (bytes); longer ones are cut with a marker.
pub const MAX_VALUE: usize = 32 * 1024;
/// `SYSLOG_IDENTIFIER` of every entry.
const IDENTIFIER: &str = "certctl-agent";
/// Names this layer writes itself.
const RESERVED: [&str; 6] = [
    "MESSAGE",
    "PRIORITY",
    "SYSLOG_IDENTIFIER",
    "CODE_FILE",
    "CODE_LINE",
    "CODE_MODULE",
];

/// True when stderr is the journal stream systemd set up for this service
/// (`JOURNAL_STREAM=<dev>:<inode>` names stderr's file).
pub fn stderr_is_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    nix::sys::stat::fstat(std::io::stderr()).is_ok_and(|st| st.st_dev == dev && st.st_ino == ino)
}

// === impl JournalLayer ===

/// The journal layer; see the module documentation.
#[derive(Debug)]
pub struct JournalLayer {
    socket: UnixDatagram,
    path: PathBuf,
}

impl JournalLayer {
    /// A layer writing to the system journal; fails when it does not answer.
    pub fn connect() -> std::io::Result<Self> {
        Self::at(Path::new(JOURNAL_SOCKET))
    }

    /// A layer writing to the journal socket at `path` (tests use their own).
    pub fn at(path: &Path) -> std::io::Result<Self> {
        let socket = UnixDatagram::unbound()?;
        // journald ignores empty datagrams: a cheap probe that it listens.
        socket.send_to(&[], path)?;
        Ok(Self {
            socket,
            path: path.to_owned(),
        })
    }
}

/// Fields of a span, recorded once and copied into each of its events.
struct SpanFields(Vec<(String, String)>);

impl<S> tracing_subscriber::Layer<S> for JournalLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut v = Fields::default();
        attrs.record(&mut v);
        span.extensions_mut().insert(SpanFields(v.fields));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut v = Fields::default();
        values.record(&mut v);
        let mut ext = span.extensions_mut();
        if let Some(SpanFields(fields)) = ext.get_mut::<SpanFields>() {
            for (name, value) in v.fields {
                set(fields, name, value);
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields: Vec<(String, String)> = Vec::new();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(SpanFields(f)) = span.extensions().get::<SpanFields>() {
                    for (name, value) in f {
                        set(&mut fields, name.clone(), value.clone());
                    }
                }
            }
        }
        let mut v = Fields::default();
        event.record(&mut v);
        let mut message = String::new();
        if let Some((_, target)) = fields.iter().chain(&v.fields).rfind(|(n, _)| n == "target") {
            let _ = write!(message, "{target}: ");
        }
        message.push_str(&v.message);
        for (name, value) in &v.fields {
            if name != "target" {
                let _ = write!(message, " {name}={value}");
            }
        }
        for (name, value) in v.fields {
            set(&mut fields, name, value);
        }
        let meta = event.metadata();
        let mut payload = Vec::with_capacity(512);
        put(&mut payload, "MESSAGE", &message);
        put(&mut payload, "PRIORITY", priority(*meta.level()));
        put(&mut payload, "SYSLOG_IDENTIFIER", IDENTIFIER);
        put(&mut payload, "CODE_MODULE", meta.target());
        if let Some(file) = meta.file() {
            put(&mut payload, "CODE_FILE", file);
        }
        if let Some(line) = meta.line() {
            put(&mut payload, "CODE_LINE", &line.to_string());
        }
        for (name, value) in &fields {
            put(&mut payload, &journal_name(name), value);
        }
        // Nothing can be done about a lost line: journald is restarting or
        // gone; the next line tries again.
        let _ = self.socket.send_to(&payload, &self.path);
    }
}

/// Sets `name` in `fields`, replacing an earlier value.
fn set(fields: &mut Vec<(String, String)>, name: String, value: String) {
    match fields.iter_mut().find(|(n, _)| *n == name) {
        Some(slot) => slot.1 = value,
        None => fields.push((name, value)),
    }
}

fn priority(level: Level) -> &'static str {
    match level {
        Level::ERROR => "3",
        Level::WARN => "4",
        Level::INFO => "6",
        _ => "7",
    }
}

/// A valid journal field name for a `tracing` field name.
fn journal_name(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    let first_letter = s.find(|c: char| c.is_ascii_uppercase()).unwrap_or(s.len());
    s.drain(..first_letter);
    if s.is_empty() {
        s.push_str("FIELD");
    }
    if RESERVED.contains(&s.as_str()) {
        s.insert_str(0, "F_");
    }
    s.truncate(64);
    s
}

/// Appends one field: `NAME=value\n`, or the length-prefixed binary form
/// when the value holds a newline.
fn put(buf: &mut Vec<u8>, name: &str, value: &str) {
    let value = cut(value);
    if value.contains('\n') {
        buf.extend_from_slice(name.as_bytes());
        buf.push(b'\n');
        buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
        buf.extend_from_slice(value.as_bytes());
        buf.push(b'\n');
    } else {
        buf.extend_from_slice(name.as_bytes());
        buf.push(b'=');
        buf.extend_from_slice(value.as_bytes());
        buf.push(b'\n');
    }
}

fn cut(value: &str) -> std::borrow::Cow<'_, str> {
    if value.len() <= MAX_VALUE {
        return value.into();
    }
    let mut end = MAX_VALUE;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[cut at {MAX_VALUE} bytes]", &value[..end]).into()
}

/// Collects `message` and the other fields of an event or span.
#[derive(Default)]
struct Fields {
    message: String,
    fields: Vec<(String, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_owned();
        } else {
            set(&mut self.fields, field.name().to_owned(), value.to_owned());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record_str(field, &format!("{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use tracing_subscriber::layer::SubscriberExt;

    /// Parses one native-protocol datagram (both field forms).
    fn parse(mut d: &[u8]) -> HashMap<String, String> {
        let mut out = HashMap::new();
        while !d.is_empty() {
            let nl = d.iter().position(|b| *b == b'\n').unwrap();
            let line = &d[..nl];
            if let Some(eq) = line.iter().position(|b| *b == b'=') {
                out.insert(
                    String::from_utf8(line[..eq].to_vec()).unwrap(),
                    String::from_utf8(line[eq + 1..].to_vec()).unwrap(),
                );
                d = &d[nl + 1..];
            } else {
                let name = String::from_utf8(line.to_vec()).unwrap();
                let len = u64::from_le_bytes(d[nl + 1..nl + 9].try_into().unwrap()) as usize;
                let value = &d[nl + 9..nl + 9 + len];
                out.insert(name, String::from_utf8(value.to_vec()).unwrap());
                assert_eq!(d[nl + 9 + len], b'\n');
                d = &d[nl + 10 + len..];
            }
        }
        out
    }

    fn capture(f: impl FnOnce()) -> Vec<HashMap<String, String>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("socket");
        let rx = UnixDatagram::bind(&path).unwrap();
        let layer = JournalLayer::at(&path).unwrap();
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, f);
        rx.set_nonblocking(true).unwrap();
        let mut out = Vec::new();
        let mut buf = vec![0u8; 256 * 1024];
        while let Ok(n) = rx.recv(&mut buf) {
            if n > 0 {
                out.push(parse(&buf[..n]));
            }
        }
        out
    }

    #[test]
    fn span_and_event_fields_become_journal_fields() {
        let entries = capture(|| {
            let span = tracing::info_span!("deploy", target = "web", deploy_id = "20261122T1-abcd");
            let _g = span.enter();
            tracing::info!(stage = "committed", "2 file(s) renamed into place");
            tracing::warn!(
                outcome = "rolled_back",
                cert_sha256 = "ab12",
                not_after = "2026-12-22T14:49:19Z",
                "rolled back"
            );
        });
        assert_eq!(entries.len(), 2, "{entries:?}");
        let e = &entries[0];
        assert_eq!(e["TARGET"], "web");
        assert_eq!(e["DEPLOY_ID"], "20261122T1-abcd");
        assert_eq!(e["STAGE"], "committed");
        assert_eq!(e["PRIORITY"], "6");
        assert_eq!(e["SYSLOG_IDENTIFIER"], "certctl-agent");
        assert_eq!(
            e["MESSAGE"],
            "web: 2 file(s) renamed into place stage=committed"
        );
        assert!(e["CODE_MODULE"].starts_with("certctl_agent"), "{e:?}");
        assert!(e.contains_key("CODE_FILE") && e.contains_key("CODE_LINE"));
        let w = &entries[1];
        assert_eq!(w["PRIORITY"], "4");
        assert_eq!(w["OUTCOME"], "rolled_back");
        assert_eq!(w["CERT_SHA256"], "ab12");
        assert_eq!(w["NOT_AFTER"], "2026-12-22T14:49:19Z");
        assert_eq!(w["TARGET"], "web");
    }

    #[test]
    fn values_with_newlines_cannot_forge_fields() {
        let entries = capture(|| {
            tracing::error!(error = "bad\nPRIORITY=0", "it failed\nTARGET=evil");
        });
        let e = &entries[0];
        assert_eq!(e["PRIORITY"], "3");
        assert_eq!(e["ERROR"], "bad\nPRIORITY=0");
        assert_eq!(e["MESSAGE"], "it failed\nTARGET=evil error=bad\nPRIORITY=0");
        assert!(!e.contains_key("TARGET"), "{e:?}");
    }

    #[test]
    fn event_fields_replace_span_fields_and_names_are_sanitized() {
        let entries = capture(|| {
            let span = tracing::info_span!("probe", target = "old");
            let _g = span.enter();
            tracing::info!(target = "new", priority = 9, "x");
        });
        let e = &entries[0];
        assert_eq!(e["TARGET"], "new");
        assert_eq!(e["F_PRIORITY"], "9");
        assert_eq!(e["PRIORITY"], "6");
        assert_eq!(journal_name("cert.sha256"), "CERT_SHA256");
        assert_eq!(journal_name("_private"), "PRIVATE");
        assert_eq!(journal_name("9lives"), "LIVES");
        assert_eq!(journal_name("__"), "FIELD");
        assert_eq!(journal_name(&"a".repeat(100)).len(), 64);
    }

    #[test]
    fn long_values_are_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_VALUE);
        let c = cut(&long);
        assert!(c.len() < long.len());
        assert!(c.ends_with("bytes]"));
        assert_eq!(cut("short"), "short");
    }

    #[test]
    fn a_missing_journal_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(JournalLayer::at(&dir.path().join("nothing")).is_err());
    }
}
