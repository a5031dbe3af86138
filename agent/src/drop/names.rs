//! Which names in the drop directory are drops, of which form, and which
//! are ignored. Pure: names in, decisions out.
//!
//! - `<name>.pem` is a bundle file for drop `<name>`; any other valid drop
//!   name is a directory drop (its type on disk is checked when it is read).
//! - Names that common writers use for files in progress are ignored, at
//!   the top level and inside directory drops: dotfiles (which covers
//!   rsync's `.name.XXXXXX`, emacs' `.#name` and the agent's own
//!   `.certctl-*`), `*.tmp`, `*.temp`, `*.part`, `*.swp`, `*~`, `#name#`
//!   and vim's write probe `4913`.
//! - A drop name follows the rule of target names:
//!   `[a-z0-9][a-z0-9._-]{0,62}`.

use std::ffi::OsStr;

/// Prefix of a drop the agent has taken (renamed aside in the drop
/// directory while it is checked and deployed):
/// `.certctl-claimed.<stamp>.<entry>`. A dotfile, so it is ignored like
/// any other.
pub const CLAIM_PREFIX: &str = ".certctl-claimed.";

/// The suffix that makes a file a bundle drop.
pub const BUNDLE_SUFFIX: &str = ".pem";

/// Extensions of the files a directory drop may hold (case-insensitive).
pub const DIR_FILE_EXTENSIONS: [&str; 3] = ["pem", "crt", "key"];

/// What a top-level entry of the drop directory is, by its name alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// `<name>.pem`: a bundle file for drop `name`.
    Bundle { name: String },
    /// `<name>`: a directory drop for `name` (if it is not a directory on
    /// disk, it is rejected as "not a drop").
    Directory { name: String },
    /// Not ignored, but not a drop name either: rejected.
    Invalid,
}

impl Entry {
    /// The drop name, when there is one.
    pub fn name(&self) -> Option<&str> {
        match self {
            Entry::Bundle { name } | Entry::Directory { name } => Some(name),
            Entry::Invalid => None,
        }
    }
}

/// Whether a writer's temp file or the agent's own file carries this name:
/// such entries are never taken, moved or reported.
pub fn is_ignored(name: &str) -> bool {
    name.starts_with('.')
        || name.ends_with('~')
        || (name.len() > 1 && name.starts_with('#') && name.ends_with('#'))
        || name == "4913"
        || [".tmp", ".temp", ".part", ".swp"]
            .iter()
            .any(|s| name.len() > s.len() && name.ends_with(s))
}

/// Classifies a top-level entry; `None` when it is ignored.
pub fn classify(entry: &OsStr) -> Option<Entry> {
    let Some(name) = entry.to_str() else {
        // Not UTF-8: not a drop name, but not silently skipped either.
        return Some(Entry::Invalid);
    };
    if is_ignored(name) {
        return None;
    }
    if let Some(stem) = name.strip_suffix(BUNDLE_SUFFIX)
        && valid_name(stem)
    {
        return Some(Entry::Bundle {
            name: stem.to_owned(),
        });
    }
    if valid_name(name) {
        return Some(Entry::Directory {
            name: name.to_owned(),
        });
    }
    Some(Entry::Invalid)
}

/// Whether a file inside a directory drop has one of the accepted extensions.
pub fn is_dir_file(name: &str) -> bool {
    name.rsplit_once('.').is_some_and(|(stem, ext)| {
        !stem.is_empty()
            && DIR_FILE_EXTENSIONS
                .iter()
                .any(|e| e.eq_ignore_ascii_case(ext))
    })
}

/// `[a-z0-9][a-z0-9._-]{0,62}`, the rule of target and drop names.
pub fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    first_ok
        && name.len() <= 63
        && bytes.all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

/// The longest entry name kept in a `rejected/` file name.
pub const SAFE_LEN: usize = 80;

/// `entry` as a part of a file name in `rejected/`: a valid drop entry as
/// it is, anything else with every byte outside `a-z A-Z 0-9 . _ -`
/// replaced by `_` and cut to [`SAFE_LEN`] bytes, so that the name stays
/// short, printable and a single component whatever was dropped (the
/// reason file names the entry as it was, escaped).
pub fn safe_component(entry: &[u8]) -> String {
    let mut s: String = entry
        .iter()
        .take(SAFE_LEN)
        .map(|&b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
                b as char
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.bytes().all(|b| b == b'.') {
        s = "_".repeat(s.len().max(1));
    }
    s
}

/// The claimed name for `entry`; `stamp` makes it unique.
pub fn claimed_name(entry: &str, stamp: &str) -> String {
    format!("{CLAIM_PREFIX}{stamp}.{entry}")
}

/// The public entry a claimed name was taken from, or `None` when `name`
/// is not a claimed name.
pub fn unclaimed_entry(name: &str) -> Option<&str> {
    let rest = name.strip_prefix(CLAIM_PREFIX)?;
    let (stamp, entry) = rest.split_once('.')?;
    (!stamp.is_empty() && !entry.is_empty() && !stamp.contains('/')).then_some(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writers_temp_files_are_ignored() {
        for name in [
            ".web.pem.tmp",
            ".web.pem.Xa81Zq", // rsync
            ".#web.pem",       // emacs lock
            "#web.pem#",       // emacs autosave
            "web.pem~",
            "web.pem.tmp",
            "web.tmp",
            "web.pem.part",
            "web.pem.temp",
            ".web.pem.swp",
            "web.swp",
            "4913", // vim's write probe
            ".certctl-claimed.1795358979035-1.web.pem",
            ".",
            "..",
        ] {
            assert!(is_ignored(name), "{name} should be ignored");
            assert_eq!(classify(OsStr::new(name)), None, "{name}");
        }
        for name in ["web.pem", "web", "mail.example.com", "#", "tmp", "a.tmpl"] {
            assert!(!is_ignored(name), "{name} should not be ignored");
        }
    }

    #[test]
    fn entries_are_bundles_directories_or_invalid() {
        let bundle = |n: &str| Some(Entry::Bundle { name: n.to_owned() });
        let dir = |n: &str| Some(Entry::Directory { name: n.to_owned() });
        assert_eq!(classify(OsStr::new("web.pem")), bundle("web"));
        assert_eq!(
            classify(OsStr::new("mail.example.com.pem")),
            bundle("mail.example.com")
        );
        assert_eq!(classify(OsStr::new("web")), dir("web"));
        // A valid drop name that is a file on disk is rejected when read.
        assert_eq!(classify(OsStr::new("web.crt")), dir("web.crt"));
        for bad in ["Web.pem", "web pem", "-web", "WEB", "web.PEM", ".pem"] {
            let got = classify(OsStr::new(bad));
            assert!(
                got == Some(Entry::Invalid) || got.is_none(),
                "{bad}: {got:?}"
            );
        }
        assert_eq!(classify(OsStr::new("Web.pem")), Some(Entry::Invalid));
        assert_eq!(classify(OsStr::new(&"a".repeat(64))), Some(Entry::Invalid));
        assert_eq!(classify(OsStr::new(&"a".repeat(63))), dir(&"a".repeat(63)));
        use std::os::unix::ffi::OsStrExt;
        assert_eq!(classify(OsStr::from_bytes(b"w\xffb")), Some(Entry::Invalid));
    }

    #[test]
    fn directory_drops_hold_pem_crt_and_key_files() {
        for ok in ["cert.pem", "privkey.pem", "web.crt", "web.key", "CHAIN.PEM"] {
            assert!(is_dir_file(ok), "{ok}");
        }
        for bad in [
            "README",
            "cert.der",
            ".pem",
            "key",
            "web.p12",
            "cert.pem.bak",
        ] {
            assert!(!is_dir_file(bad), "{bad}");
        }
    }

    #[test]
    fn hostile_entries_get_short_printable_rejected_names() {
        assert_eq!(safe_component(b"web.pem"), "web.pem");
        assert_eq!(safe_component(b"mail.example.com"), "mail.example.com");
        assert_eq!(
            safe_component(b"x\nreason:   deployed\n.pem"),
            "x_reason____deployed_.pem"
        );
        assert_eq!(safe_component(b"w\xffb/../c"), "w_b_.._c");
        assert_eq!(safe_component(b".."), "__");
        assert_eq!(safe_component(b""), "_");
        let long = "a".repeat(244) + ".pem";
        assert_eq!(safe_component(long.as_bytes()), "a".repeat(SAFE_LEN));
        // A valid bundle name always fits whole.
        assert!(63 + BUNDLE_SUFFIX.len() <= SAFE_LEN);
    }

    #[test]
    fn claimed_names_round_trip() {
        let c = claimed_name("web.pem", "1795358979035-7");
        assert!(is_ignored(&c));
        assert_eq!(unclaimed_entry(&c), Some("web.pem"));
        assert_eq!(
            unclaimed_entry(&claimed_name("mail.example.com", "1-2")),
            Some("mail.example.com")
        );
        assert_eq!(unclaimed_entry(".certctl-claimed."), None);
        assert_eq!(unclaimed_entry(".certctl-claimed.123"), None);
        assert_eq!(unclaimed_entry("web.pem"), None);
    }

    mod fuzz {
        use std::os::unix::ffi::OsStrExt;

        use proptest::prelude::*;

        use super::super::*;
        use crate::model::fmt::escape;

        fn config() -> ProptestConfig {
            crate::fuzzing::config(256)
        }

        proptest! {
            #![proptest_config(config())]

            /// Whatever the bytes, classifying never panics, and a drop
            /// name it gives is valid and is the entry (less `.pem`).
            #[test]
            fn any_entry_classifies_to_a_valid_name_or_none(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
                match classify(OsStr::from_bytes(&raw)) {
                    Some(Entry::Bundle { name }) => {
                        prop_assert!(valid_name(&name));
                        let entry = format!("{name}{BUNDLE_SUFFIX}");
                        prop_assert_eq!(entry.as_bytes(), &raw[..]);
                    }
                    Some(Entry::Directory { name }) => {
                        prop_assert!(valid_name(&name));
                        prop_assert_eq!(name.as_bytes(), &raw[..]);
                    }
                    Some(Entry::Invalid) | None => {}
                }
                let safe = safe_component(&raw);
                prop_assert!(!safe.is_empty() && safe.len() <= SAFE_LEN);
                prop_assert!(safe.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
                prop_assert!(safe != "." && safe != "..");
                let shown = escape(&raw);
                prop_assert!(!shown.chars().any(char::is_control), "{:?}", shown);
            }

            /// Every valid drop name is taken as a bundle and as a
            /// directory unless a writer's temp-file pattern covers it.
            #[test]
            fn valid_names_are_drops(name in "[a-z0-9][a-z0-9._-]{0,62}") {
                prop_assert!(valid_name(&name));
                let bundle = format!("{name}{BUNDLE_SUFFIX}");
                prop_assert_eq!(classify(OsStr::new(&bundle)), Some(Entry::Bundle { name: name.clone() }));
                let dir = classify(OsStr::new(&name));
                if is_ignored(&name) {
                    prop_assert_eq!(dir, None);
                } else if let Some(stem) = name.strip_suffix(BUNDLE_SUFFIX).filter(|s| valid_name(s)) {
                    prop_assert_eq!(dir, Some(Entry::Bundle { name: stem.to_owned() }));
                } else {
                    prop_assert_eq!(dir, Some(Entry::Directory { name: name.clone() }));
                }
                prop_assert_eq!(safe_component(bundle.as_bytes()), bundle.clone());
                let claimed = claimed_name(&bundle, "1795358979035-7");
                prop_assert!(is_ignored(&claimed));
                prop_assert_eq!(unclaimed_entry(&claimed), Some(bundle.as_str()));
            }

            /// Too long, upper case or a character outside the rule:
            /// never a drop name.
            #[test]
            fn names_breaking_the_rule_are_invalid(
                name in "[a-z0-9][a-z0-9._-]{0,62}",
                bad in "[A-Z \n\t\x0b\x1b/\\:;'\"$`|&<>*?]",
                at in 0usize..64,
            ) {
                let at = at.min(name.len());
                let broken = format!("{}{bad}{}", &name[..at], &name[at..]);
                prop_assert!(!valid_name(&broken));
                let long = format!("{name}{}", "a".repeat(64 - name.len().min(63)));
                prop_assert!(long.len() > 63 && !valid_name(&long));
            }
        }
    }
}
