//! Planning a deploy: which bytes go to which file, with which owner and mode.
//!
//! Pure: no I/O. The inputs are the target's configuration, the checked
//! bundle and what is on disk now (observed by the caller); the output is a
//! [`Plan`] that says, for every file, its exact bytes, its resolved owner
//! and mode, where each came from, and whether the file on disk already
//! matches. A plan whose files all match is a no-op.
//!
//! Precedence, separately for mode, owner and group: explicit configuration,
//! then the existing file, then the kind's default. A private key never
//! keeps an "other" permission bit: an existing looser mode is tightened to
//! the kind's default and reported as a warning (explicit modes with such
//! bits are refused when the configuration is loaded).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::atomic::Existing;
use crate::bundle::Bundle;
use crate::config::Target;
use crate::model::event::FileSummary;
pub use crate::model::file::{Role, Source};

/// One output of a deploy, before metadata is resolved.
#[derive(Debug, Clone)]
pub struct Output {
    pub path: PathBuf,
    pub role: Role,
    pub bytes: Zeroizing<Vec<u8>>,
    /// What an existing file's `sha256` is compared with when it is not
    /// the SHA-256 of `bytes` (a keystore's content digest).
    pub identity: Option<[u8; 32]>,
}

/// One file of a plan, fully resolved.
#[derive(Debug)]
pub struct PlannedFile {
    pub path: PathBuf,
    pub role: Role,
    pub bytes: Zeroizing<Vec<u8>>,
    pub sha256: [u8; 32],
    pub mode: u32,
    /// `None`: leave the owner the agent creates files with.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mode_source: Source,
    pub owner_source: Source,
    /// What was there before, if anything.
    pub existing: Option<Existing>,
    /// False when the file on disk already has these bytes, owner and mode.
    pub changed: bool,
}

/// The complete set of files a deploy writes.
#[derive(Debug)]
pub struct Plan {
    pub files: Vec<PlannedFile>,
    /// Things the operator should know (e.g. a loose key mode tightened).
    pub warnings: Vec<String>,
}

impl Plan {
    /// Nothing to write: every file already matches.
    pub fn is_noop(&self) -> bool {
        self.files.iter().all(|f| !f.changed)
    }
}

/// Why a bundle cannot be laid out for a target.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(
        "target {target} has chain_path {path} but the input has no chain certificates: \
         supply the intermediates (--chain or in the bundle), or remove chain_path from the target"
    )]
    MissingChain { target: String, path: PathBuf },
}

/// Lays the bundle out over the target's files (in-place layout): the key
/// to `key_path`; with `chain_path`, the leaf to `cert_path` and the chain to
/// `chain_path`; without it, the kind decides whether `cert_path` gets the
/// leaf followed by the chain (a "fullchain", what nginx expects) or the leaf
/// alone. A kind with `combined_pem` (haproxy) gets one file: leaf, chain,
/// then key.
pub fn outputs(target: &Target, bundle: &Bundle) -> Result<Vec<Output>, PlanError> {
    if target.kind.defaults().combined_pem {
        let fullchain = bundle.fullchain_pem();
        let key = bundle.key_pem();
        let mut bytes = Zeroizing::new(Vec::with_capacity(fullchain.len() + key.len()));
        bytes.extend_from_slice(fullchain.as_bytes());
        bytes.extend_from_slice(key.as_bytes());
        return Ok(vec![Output {
            path: target.cert_path.clone(),
            role: Role::Pem,
            bytes,
            identity: None,
        }]);
    }
    let mut out = Vec::with_capacity(3);
    match &target.chain_path {
        Some(chain_path) => {
            if bundle.chain.is_empty() {
                return Err(PlanError::MissingChain {
                    target: target.name.clone(),
                    path: chain_path.clone(),
                });
            }
            out.push(text_output(
                &target.cert_path,
                Role::Cert,
                bundle.leaf_pem(),
            ));
            out.push(text_output(chain_path, Role::Chain, bundle.chain_pem()));
        }
        None => {
            let cert = if target.kind.defaults().fullchain_in_cert {
                bundle.fullchain_pem()
            } else {
                bundle.leaf_pem()
            };
            out.push(text_output(&target.cert_path, Role::Cert, cert));
        }
    }
    let key = bundle.key_pem();
    out.push(Output {
        path: target.key_path.clone(),
        role: Role::Key,
        bytes: Zeroizing::new(key.as_bytes().to_vec()),
        identity: None,
    });
    Ok(out)
}

/// The one output of a keystore target: the encoded keystore, and the
/// content digest an existing keystore must have to count as unchanged
/// (`None`: compare bytes, i.e. always write).
pub fn keystore_output(
    target: &Target,
    bytes: Zeroizing<Vec<u8>>,
    identity: Option<[u8; 32]>,
) -> Output {
    Output {
        path: target.cert_path.clone(),
        role: Role::Keystore,
        bytes,
        identity,
    }
}

fn text_output(path: &Path, role: Role, text: String) -> Output {
    Output {
        path: path.to_owned(),
        role,
        bytes: Zeroizing::new(text.into_bytes()),
        identity: None,
    }
}

/// The owner/mode policy of a target, separated from the rest of its
/// configuration so planning can be tested with plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub owner: Option<u32>,
    pub group: Option<u32>,
    pub default_owner: Option<u32>,
    pub default_group: Option<u32>,
    pub cert_mode: Option<u32>,
    pub key_mode: Option<u32>,
    pub default_cert_mode: u32,
    pub default_key_mode: u32,
}

impl Policy {
    pub fn of(target: &Target) -> Self {
        Self {
            owner: target.owner.as_ref().map(|i| i.id),
            group: target.group.as_ref().map(|i| i.id),
            default_owner: target.default_owner.as_ref().map(|i| i.id),
            default_group: target.default_group.as_ref().map(|i| i.id),
            cert_mode: target.cert_mode,
            key_mode: target.key_mode,
            default_cert_mode: target.default_cert_mode,
            default_key_mode: target.default_key_mode,
        }
    }
}

/// Resolves owner and mode of every output against what is on disk
/// (`existing[i]` belongs to `outputs[i]`) and marks what changes.
pub fn plan(policy: &Policy, outputs: Vec<Output>, existing: Vec<Option<Existing>>) -> Plan {
    let mut warnings = Vec::new();
    let files = outputs
        .into_iter()
        .zip(existing.into_iter().chain(std::iter::repeat(None)))
        .map(|(output, existing)| resolve(policy, output, existing, &mut warnings))
        .collect();
    Plan { files, warnings }
}

fn resolve(
    policy: &Policy,
    output: Output,
    existing: Option<Existing>,
    warnings: &mut Vec<String>,
) -> PlannedFile {
    let is_key = output.role.holds_key();
    let (explicit_mode, default_mode) = if is_key {
        (policy.key_mode, policy.default_key_mode)
    } else {
        (policy.cert_mode, policy.default_cert_mode)
    };
    let (mut mode, mut mode_source) = match (explicit_mode, &existing) {
        (Some(m), _) => (m, Source::Explicit),
        (None, Some(e)) => (e.mode & 0o777, Source::Existing),
        (None, None) => (default_mode, Source::Default),
    };
    if is_key && mode & 0o007 != 0 {
        warnings.push(format!(
            "{}: existing mode {:04o} lets any local user read the private key; tightened to {:04o}",
            output.path.display(),
            mode,
            default_mode & !0o007
        ));
        mode = default_mode & !0o007;
        mode_source = Source::Default;
    }

    let (uid, uid_source) = pick(
        policy.owner,
        existing.as_ref().map(|e| e.uid),
        policy.default_owner,
    );
    let (gid, gid_source) = pick(
        policy.group,
        existing.as_ref().map(|e| e.gid),
        policy.default_group,
    );
    // One word for both: the stronger source wins the label.
    let owner_source = if uid_source == Source::Explicit || gid_source == Source::Explicit {
        Source::Explicit
    } else {
        uid_source.min_label(gid_source)
    };

    let sha256: [u8; 32] = Sha256::digest(output.bytes.as_slice()).into();
    let identity = output.identity.unwrap_or(sha256);
    let changed = match &existing {
        None => true,
        Some(e) => {
            e.sha256 != identity
                || e.mode & 0o7777 != mode
                || uid.is_some_and(|u| u != e.uid)
                || gid.is_some_and(|g| g != e.gid)
        }
    };
    PlannedFile {
        path: output.path,
        role: output.role,
        bytes: output.bytes,
        sha256,
        mode,
        uid,
        gid,
        mode_source,
        owner_source,
        existing,
        changed,
    }
}

fn pick(
    explicit: Option<u32>,
    existing: Option<u32>,
    default: Option<u32>,
) -> (Option<u32>, Source) {
    match (explicit, existing, default) {
        (Some(v), _, _) => (Some(v), Source::Explicit),
        (None, Some(v), _) => (Some(v), Source::Existing),
        (None, None, Some(v)) => (Some(v), Source::Default),
        (None, None, None) => (None, Source::Agent),
    }
}

impl Source {
    fn rank(self) -> u8 {
        match self {
            Source::Explicit => 0,
            Source::Existing => 1,
            Source::Default => 2,
            Source::Agent => 3,
        }
    }

    fn min_label(self, other: Source) -> Source {
        if self.rank() <= other.rank() {
            self
        } else {
            other
        }
    }
}

impl From<&PlannedFile> for FileSummary {
    fn from(f: &PlannedFile) -> Self {
        Self {
            path: f.path.clone(),
            role: f.role,
            sha256: f.sha256,
            mode: f.mode,
            uid: f.uid,
            gid: f.gid,
            changed: f.changed,
            mode_source: f.mode_source,
            owner_source: f.owner_source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        owner: None,
        group: None,
        default_owner: Some(0),
        default_group: Some(33),
        cert_mode: None,
        key_mode: None,
        default_cert_mode: 0o644,
        default_key_mode: 0o640,
    };

    fn out(role: Role, bytes: &[u8]) -> Output {
        Output {
            path: PathBuf::from(format!("/t/{}", role.as_str())),
            role,
            bytes: Zeroizing::new(bytes.to_vec()),
            identity: None,
        }
    }

    fn existing(bytes: &[u8], uid: u32, gid: u32, mode: u32) -> Existing {
        Existing {
            uid,
            gid,
            mode,
            sha256: Sha256::digest(bytes).into(),
        }
    }

    struct Case {
        name: &'static str,
        policy: Policy,
        role: Role,
        existing: Option<Existing>,
        want_mode: (u32, Source),
        want_owner: (Option<u32>, Option<u32>, Source),
        want_changed: bool,
        want_warning: bool,
    }

    #[test]
    fn owner_and_mode_precedence() {
        let explicit = Policy {
            owner: Some(1000),
            group: Some(1001),
            cert_mode: Some(0o600),
            key_mode: Some(0o600),
            ..POLICY
        };
        let no_defaults = Policy {
            default_owner: None,
            default_group: None,
            ..POLICY
        };
        let cases = [
            Case {
                name: "new cert takes kind defaults",
                policy: POLICY,
                role: Role::Cert,
                existing: None,
                want_mode: (0o644, Source::Default),
                want_owner: (Some(0), Some(33), Source::Default),
                want_changed: true,
                want_warning: false,
            },
            Case {
                name: "new key takes kind defaults",
                policy: POLICY,
                role: Role::Key,
                existing: None,
                want_mode: (0o640, Source::Default),
                want_owner: (Some(0), Some(33), Source::Default),
                want_changed: true,
                want_warning: false,
            },
            Case {
                name: "existing file's mode and owner win over defaults",
                policy: POLICY,
                role: Role::Cert,
                existing: Some(existing(b"old", 5, 6, 0o604)),
                want_mode: (0o604, Source::Existing),
                want_owner: (Some(5), Some(6), Source::Existing),
                want_changed: true,
                want_warning: false,
            },
            Case {
                name: "explicit wins over existing",
                policy: explicit.clone(),
                role: Role::Key,
                existing: Some(existing(b"old", 5, 6, 0o640)),
                want_mode: (0o600, Source::Explicit),
                want_owner: (Some(1000), Some(1001), Source::Explicit),
                want_changed: true,
                want_warning: false,
            },
            Case {
                name: "loose existing key mode is tightened with a warning",
                policy: POLICY,
                role: Role::Key,
                existing: Some(existing(b"new", 0, 33, 0o644)),
                want_mode: (0o640, Source::Default),
                want_owner: (Some(0), Some(33), Source::Existing),
                want_changed: true,
                want_warning: true,
            },
            Case {
                name: "identical bytes, owner and mode: unchanged",
                policy: POLICY,
                role: Role::Cert,
                existing: Some(existing(b"new", 0, 33, 0o644)),
                want_mode: (0o644, Source::Existing),
                want_owner: (Some(0), Some(33), Source::Existing),
                want_changed: false,
                want_warning: false,
            },
            Case {
                name: "identical bytes but explicit owner differs: changed",
                policy: explicit,
                role: Role::Cert,
                existing: Some(existing(b"new", 0, 33, 0o600)),
                want_mode: (0o600, Source::Explicit),
                want_owner: (Some(1000), Some(1001), Source::Explicit),
                want_changed: true,
                want_warning: false,
            },
            Case {
                name: "no defaults and no file: the agent's own user",
                policy: no_defaults,
                role: Role::Cert,
                existing: None,
                want_mode: (0o644, Source::Default),
                want_owner: (None, None, Source::Agent),
                want_changed: true,
                want_warning: false,
            },
        ];
        for case in cases {
            let plan = plan(
                &case.policy,
                vec![out(case.role, b"new")],
                vec![case.existing],
            );
            let f = &plan.files[0];
            assert_eq!((f.mode, f.mode_source), case.want_mode, "{}", case.name);
            assert_eq!(
                (f.uid, f.gid, f.owner_source),
                case.want_owner,
                "{}",
                case.name
            );
            assert_eq!(f.changed, case.want_changed, "{}", case.name);
            assert_eq!(
                !plan.warnings.is_empty(),
                case.want_warning,
                "{}",
                case.name
            );
            assert_eq!(
                f.sha256,
                <[u8; 32]>::from(Sha256::digest(b"new")),
                "{}",
                case.name
            );
        }
    }

    #[test]
    fn noop_only_when_every_file_matches() {
        let same = existing(b"new", 0, 33, 0o644);
        let key_same = existing(b"key", 0, 33, 0o640);
        let p = plan(
            &POLICY,
            vec![out(Role::Cert, b"new"), out(Role::Key, b"key")],
            vec![Some(same.clone()), Some(key_same)],
        );
        assert!(p.is_noop());
        let p = plan(
            &POLICY,
            vec![out(Role::Cert, b"new"), out(Role::Key, b"other key")],
            vec![Some(same), Some(existing(b"key", 0, 33, 0o640))],
        );
        assert!(!p.is_noop());
        assert!(!p.files[0].changed && p.files[1].changed);
    }

    #[test]
    fn a_keystore_is_compared_by_what_it_holds() {
        let digest = [7u8; 32];
        let keystore = |identity| Output {
            identity,
            ..out(Role::Keystore, b"fresh salts")
        };
        let holding = |sha256| Existing {
            uid: 0,
            gid: 33,
            mode: 0o640,
            sha256,
        };
        // Other bytes, same content: unchanged, with the key's mode.
        let p = plan(
            &POLICY,
            vec![keystore(Some(digest))],
            vec![Some(holding(digest))],
        );
        assert!(p.is_noop());
        assert_eq!(p.files[0].mode, 0o640);
        // A keystore that did not open (other password): its byte digest
        // never equals a content digest.
        let p = plan(
            &POLICY,
            vec![keystore(Some(digest))],
            vec![Some(holding([1; 32]))],
        );
        assert!(!p.is_noop());
        // No identity (JKS): bytes decide.
        let p = plan(&POLICY, vec![keystore(None)], vec![Some(holding(digest))]);
        assert!(!p.is_noop());
        assert!(Role::Keystore.holds_key());
        let p = plan(&POLICY, vec![keystore(None)], vec![None]);
        assert_eq!(p.files[0].mode, 0o640, "a keystore takes the key's mode");
    }

    #[test]
    fn mode_change_alone_is_a_change() {
        let p = plan(
            &POLICY,
            vec![out(Role::Cert, b"x")],
            vec![Some(existing(b"x", 0, 33, 0o600))],
        );
        // The existing mode wins, so nothing changes...
        assert!(p.is_noop());
        let explicit = Policy {
            cert_mode: Some(0o644),
            ..POLICY
        };
        // ...unless a mode is configured explicitly.
        let p = plan(
            &explicit,
            vec![out(Role::Cert, b"x")],
            vec![Some(existing(b"x", 0, 33, 0o600))],
        );
        assert!(!p.is_noop());
    }
}
