//! How the agent spells times, durations and fingerprints in messages, file
//! names and ids: one spelling everywhere.
//!
//! Calendar arithmetic is not done here: instants go through `humantime`
//! (file stamps, deploy ids) or the `time` crate behind `x509-parser`
//! (certificate validity, which may lie before 1970, where `humantime`
//! refuses to format).

use std::fmt::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use x509_parser::time::ASN1Time;

/// `9f3a…e1c2`: enough of a fingerprint to recognise it.
pub fn short_hex(hex: &str) -> String {
    if hex.len() <= 12 {
        hex.to_owned()
    } else {
        format!("{}…{}", &hex[..6], &hex[hex.len() - 4..])
    }
}

/// [`short_hex`], or `nothing` for an empty fingerprint (nothing served).
pub fn short_or_nothing(hex: &str) -> String {
    if hex.is_empty() {
        "nothing".to_owned()
    } else {
        short_hex(hex)
    }
}

/// `850ms`, `1.2s`.
pub fn fmt_duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// Unix seconds as RFC 3339 UTC, e.g. `2025-01-01T00:00:00Z`.
pub fn rfc3339(unix: i64) -> String {
    match ASN1Time::from_timestamp(unix) {
        Ok(t) => {
            let t = t.to_datetime();
            format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            )
        }
        Err(_) => format!("@{unix}"),
    }
}

/// `20261122T144939.032Z`: UTC to the millisecond, sorts by time, safe in a
/// file name.
pub fn file_stamp(t: SystemTime) -> String {
    let t = t.max(SystemTime::UNIX_EPOCH);
    humantime::format_rfc3339_millis(t)
        .to_string()
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect()
}

/// Whether `c` is shown escaped: control characters (C0, DEL, C1) and the
/// invisible characters that reorder or break lines (line and paragraph
/// separators, zero-width and bidirectional controls, BOM).
fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

/// A name or path from outside (the drop directory) as it is shown in
/// log lines, reason files, events and status: one line, every byte
/// visible. Control and invisible characters become `\n`, `\t`, `\r`,
/// `\xNN` or `\u{NNNN}`, bytes that are not UTF-8 `\xNN`, and a backslash
/// `\\`, so a shown name cannot forge a line or hide what it is.
pub fn escape(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len());
    for chunk in raw.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if hidden(c) && (c as u32) < 0x100 => {
                    let _ = write!(out, "\\x{:02x}", c as u32);
                }
                c if hidden(c) => {
                    let _ = write!(out, "\\u{{{:04x}}}", c as u32);
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// [`escape`] of a path.
pub fn shown(path: &Path) -> String {
    escape(path.as_os_str().as_bytes())
}

/// `text` as one line: unchanged when nothing in it is hidden, else
/// [`escape`]d (for values that are already shown, such as messages that
/// embed escaped names, kept as they are).
pub fn one_line(text: &str) -> std::borrow::Cow<'_, str> {
    if is_one_line(text) {
        std::borrow::Cow::Borrowed(text)
    } else {
        std::borrow::Cow::Owned(escape(text.as_bytes()))
    }
}

/// Whether `text` shows as it is: nothing in it is hidden (no control or
/// invisible character), so it cannot break or forge a line.
pub fn is_one_line(text: &str) -> bool {
    !text.chars().any(hidden)
}

/// What a server said, for a message: its first `limit` characters as
/// [`one_line`], with `…` when it was longer.
pub fn clipped(text: &str, limit: usize) -> String {
    let mut short: String = text.chars().take(limit).collect();
    let cut = short.len() < text.len();
    short = one_line(&short).into_owned();
    if cut {
        short.push('…');
    }
    short
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_compact_utc_millis() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_001);
        assert_eq!(file_stamp(t), "20261118T110640.001Z");
        assert_eq!(file_stamp(SystemTime::UNIX_EPOCH), "19700101T000000.000Z");
    }

    #[test]
    fn rfc3339_is_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339(253_402_300_799), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn short_fingerprints() {
        assert_eq!(short_hex("0123456789abcdef"), "012345…cdef");
        assert_eq!(short_hex("abc"), "abc");
        assert_eq!(short_or_nothing(""), "nothing");
    }

    #[test]
    fn hostile_names_are_shown_on_one_line() {
        let forged = "x\nreason:   deployed\nretry: rm -rf / | sh\n.pem";
        let e = escape(forged.as_bytes());
        assert_eq!(e, "x\\nreason:   deployed\\nretry: rm -rf / | sh\\n.pem");
        assert!(!e.contains('\n'));
        assert_eq!(escape(b"a\x0bb\x1b[31mc\x7f"), "a\\x0bb\\x1b[31mc\\x7f");
        assert_eq!(escape(b"tab\there\rcr"), "tab\\there\\rcr");
        assert_eq!(
            escape("bidi\u{202e}gpj.pem".as_bytes()),
            "bidi\\u{202e}gpj.pem"
        );
        assert_eq!(escape("ls\u{2028}x\u{85}".as_bytes()), "ls\\u{2028}x\\x85");
        assert_eq!(escape(b"w\xffb"), "w\\xffb");
        // A literal backslash is escaped too: `a\\n` never reads as a newline.
        assert_eq!(escape(br"a\n"), r"a\\n");
        // Ordinary names and paths are shown as they are.
        assert_eq!(
            shown(Path::new("/var/lib/certctl/drop/web.pem")),
            "/var/lib/certctl/drop/web.pem"
        );
        assert_eq!(escape("café ü.pem".as_bytes()), "café ü.pem");
        assert_eq!(one_line("plain \\n text"), "plain \\n text");
        assert_eq!(one_line("two\nlines"), "two\\nlines");
        for b in 0u8..=255 {
            let e = escape(&[b'a', b, b'z']);
            assert!(e.chars().all(|c| !hidden(c)), "{b:#x}: {e:?}");
        }
    }
}
