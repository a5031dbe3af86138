//! How the agent spells times, durations and fingerprints in messages, file
//! names and ids: one spelling everywhere.
//!
//! Calendar arithmetic is not done here: instants go through `humantime`
//! (file stamps, deploy ids) or the `time` crate behind `x509-parser`
//! (certificate validity, which may lie before 1970, where `humantime`
//! refuses to format).

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
}
