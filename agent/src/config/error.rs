//! Configuration errors and their messages.
//!
//! Every message starts with the file. Shape errors from the TOML reader
//! (syntax, unknown or missing keys, wrong types) carry a line and column;
//! value errors from validation carry the key path, e.g.
//! `target "web" (target[0]).key_mode`, and are all reported together, one per
//! line.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Why a configuration could not be used. The agent exits 64 on any of these.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {source}{}", path.display(), read_hint(source))]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The TOML is malformed, or has an unknown key, a missing key or a value
    /// of the wrong type.
    #[error("{}: line {line}, column {column}: {message}", path.display())]
    Syntax {
        /// The file, absolute.
        path: PathBuf,
        /// 1-based.
        line: usize,
        /// 1-based, in characters.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// One or more values are invalid.
    #[error("{}", Invalid(path, problems))]
    Invalid {
        /// The file, absolute.
        path: PathBuf,
        /// Every problem found, in file order.
        problems: Vec<Problem>,
    },
}

/// One invalid value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Where, e.g. `agent.settle` or `target "web" (target[0]).key_mode`.
    pub key: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

impl ConfigError {
    /// The configuration file concerned.
    pub fn path(&self) -> &Path {
        match self {
            ConfigError::Read { path, .. }
            | ConfigError::Syntax { path, .. }
            | ConfigError::Invalid { path, .. } => path,
        }
    }
}

/// Displays the problems one per line, each naming the file.
struct Invalid<'a>(&'a Path, &'a [Problem]);

impl fmt::Display for Invalid<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.1.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}: {problem}", self.0.display())?;
        }
        Ok(())
    }
}

fn read_hint(err: &io::Error) -> &'static str {
    match err.kind() {
        io::ErrorKind::NotFound => ": pass --config PATH or create it (see examples/agent.toml)",
        io::ErrorKind::PermissionDenied => ": run as a user that may read it, or fix its mode",
        _ => "",
    }
}

/// Turns an error of the TOML reader into [`ConfigError::Syntax`].
pub(super) fn syntax(path: &Path, text: &str, err: &toml::de::Error) -> ConfigError {
    let start = err.span().map_or(0, |span| span.start);
    let (line, column) = line_column(text, start);
    let spanned = err
        .span()
        .and_then(|span| text.get(span))
        .unwrap_or_default();
    ConfigError::Syntax {
        path: path.to_path_buf(),
        line,
        column,
        message: rewrite(err.message().trim(), spanned),
    }
}

/// At most this many unknown keys are collected before the rest of the
/// file is checked: a file with more is not a certctl configuration.
pub(super) const MAX_UNKNOWN_KEYS: usize = 100;

/// Whether the TOML reader refused a key it does not know.
pub(super) fn is_unknown_key(err: &toml::de::Error) -> bool {
    err.message().trim().starts_with("unknown field `")
}

/// A reader error as one [`Problem`] of a list: the key is the line and
/// column (`line 3, column 1`), the message as in [`syntax`].
pub(super) fn syntax_problem(text: &str, err: &toml::de::Error) -> Problem {
    match syntax(Path::new(""), text, err) {
        ConfigError::Syntax {
            line,
            column,
            message,
            ..
        } => Problem {
            key: format!("line {line}, column {column}"),
            message,
        },
        other => Problem {
            key: String::new(),
            message: other.to_string(),
        },
    }
}

/// 1-based line and character column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Rewrites serde's wording into the configuration's ("key", not "field"),
/// with a suggestion for a misspelt key.
fn rewrite(message: &str, spanned: &str) -> String {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let Some((key, expected)) = rest.split_once('`') else {
            return message.to_owned();
        };
        let candidates = backticked(expected);
        return match suggest(key, &candidates) {
            Some(best) => format!("unknown key \"{key}\" (did you mean \"{best}\"?)"),
            None if candidates.is_empty() => format!("unknown key \"{key}\""),
            None => format!(
                "unknown key \"{key}\" (known keys here: {})",
                candidates.join(", ")
            ),
        };
    }
    if let Some(rest) = message.strip_prefix("missing field `")
        && let Some(key) = rest.strip_suffix('`')
    {
        return format!("missing required key \"{key}\"");
    }
    if message == "duplicate key" && !spanned.is_empty() && !spanned.contains('\n') {
        return format!("duplicate key \"{}\"", spanned.trim());
    }
    message.replace('\n', "; ")
}

/// The backtick-quoted words of serde's "expected one of `a`, `b`".
fn backticked(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// The candidate closest to `word`, if it is close enough to be a typo.
pub(super) fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance, counting an adjacent transposition as one edit.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // rows[i][j]: distance between a[..i] and b[..j]; three rows suffice.
    let mut prev2: Vec<usize> = vec![0; b.len() + 1];
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                cur[j] = cur[j].min(prev2[j - 2] + 1);
            }
        }
        prev2 = std::mem::replace(&mut prev, cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("reload", "reload"), 0);
        assert_eq!(edit_distance("relaod", "reload"), 1);
        assert_eq!(edit_distance("settl", "settle"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn suggestions() {
        let keys = ["name", "kind", "reload", "validate"];
        assert_eq!(suggest("relaod", &keys), Some("reload"));
        assert_eq!(suggest("knd", &keys), Some("kind"));
        assert_eq!(suggest("colour", &keys), None);
    }

    #[test]
    fn line_columns() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 6), (2, 1));
        // Column counts characters: "bé " is 3 characters, 4 bytes.
        assert_eq!(line_column(text, 10), (2, 4));
        assert_eq!(line_column(text, 999), (3, 1));
    }
}
