//! Servers that watch files instead of taking a reload: traefik's file
//! provider and envoy's file-based SDS. The "reload" of these kinds is a
//! configuration file the agent writes next to the server's own
//! configuration, derived from what is on disk now.
//!
//! - **traefik** watches its dynamic configuration files, not the
//!   certificate files they name (traefik/traefik#3083, #5495), and reads
//!   `certFile`/`keyFile` when the configuration is loaded. The agent
//!   rewrites the dynamic configuration after every switch with a comment
//!   naming the generation and the leaf's SHA-256, so the file changes
//!   exactly when the served set does, traefik reloads, and reads the new
//!   pair through the stable names.
//! - **envoy** re-reads a secret's `certificate_chain` and `private_key`
//!   when an entry of its `watched_directory` is moved to: the `..data`
//!   switch of the generations layout is that move. The SDS file itself
//!   names only stable paths, so it is written when its content differs
//!   (the first deploy, a changed `secret_name`), never on every deploy.
//!
//! Guarantees: both files are written through
//! [`atomic::publish`](crate::atomic::publish) (temp,
//! fsync, rename, directory fsync), so a reader never sees a partial file;
//! the content is computed from the files on disk when the hook runs, so a
//! rollback (files restored first) rewrites it for the restored set; with
//! no certificate on disk (a first deploy rolled back), the file is
//! removed, so the server is not pointed at files that do not exist. Paths
//! are written as YAML double-quoted scalars (or JSON strings), whatever
//! characters they hold.

use std::path::{Path, PathBuf};

use crate::atomic::{self, FsError};

/// Mode of a new dynamic configuration or SDS file: it names files and
/// holds no key, and the server (often not root) must read it.
pub const CONFIG_MODE: u32 = 0o644;

/// The temp-file tag of the hooks' writes.
const TAG: &str = "hook";

/// Why a watched-file hook could not write its file.
#[derive(Debug, thiserror::Error)]
pub enum WatchedError {
    #[error("cannot read {path} to describe it in {file}: {why}")]
    Read {
        path: PathBuf,
        file: PathBuf,
        why: String,
    },
    #[error("cannot write {file}: {source}")]
    Write {
        file: PathBuf,
        #[source]
        source: FsError,
    },
}

/// The traefik dynamic configuration for `target`'s `cert` and `key`:
/// what is written, and a line for the stage message. `generation` is the
/// set `..data` points at (generations layout), named in the file so that
/// it changes with every switch; the caller reads it.
pub fn write_traefik(
    config: &Path,
    target: &str,
    cert: &Path,
    key: &Path,
    generation: Option<&str>,
) -> Result<String, WatchedError> {
    let Some(leaf) = leaf_sha256(cert, config)? else {
        return remove(config);
    };
    let text = traefik_yaml(target, cert, key, generation, &leaf);
    atomic::publish(config, text.as_bytes(), CONFIG_MODE, TAG).map_err(|source| {
        WatchedError::Write {
            file: config.to_owned(),
            source,
        }
    })?;
    Ok(format!(
        "traefik dynamic configuration {} written ({})",
        config.display(),
        generation.map_or_else(
            || format!("leaf {}", short(&leaf)),
            |g| format!("generation {g}")
        )
    ))
}

/// The envoy SDS file for `secret` on `cert` and `key`, written when it
/// differs from what is there.
pub fn write_envoy(
    sds: &Path,
    secret: &str,
    cert: &Path,
    key: &Path,
) -> Result<String, WatchedError> {
    if leaf_sha256(cert, sds)?.is_none() {
        return remove(sds);
    }
    let json = sds.extension().is_some_and(|e| e == "json");
    let text = if json {
        envoy_json(secret, cert, key)
    } else {
        envoy_yaml(secret, cert, key)
    };
    if std::fs::read(sds).is_ok_and(|old| old == text.as_bytes()) {
        return Ok(format!(
            "envoy SDS file {} unchanged; envoy re-reads the files when ..data is switched in {}",
            sds.display(),
            atomic::parent(cert).display()
        ));
    }
    atomic::publish(sds, text.as_bytes(), CONFIG_MODE, TAG).map_err(|source| {
        WatchedError::Write {
            file: sds.to_owned(),
            source,
        }
    })?;
    Ok(format!(
        "envoy SDS file {} written (secret {secret})",
        sds.display()
    ))
}

/// The SHA-256 of the leaf in `cert` (followed through links); `None` when
/// there is no file.
fn leaf_sha256(cert: &Path, file: &Path) -> Result<Option<String>, WatchedError> {
    let read = |why: String| WatchedError::Read {
        path: cert.to_owned(),
        file: file.to_owned(),
        why,
    };
    match crate::disk::leaf_in(cert) {
        Ok(Some(c)) => Ok(Some(c.sha256_hex())),
        Ok(None) => Ok(None),
        Err(crate::disk::DiskError::NoCertificate { .. }) => {
            Err(read("it holds no certificate".to_owned()))
        }
        Err(crate::disk::DiskError::Read { source, .. }) => Err(read(source.to_string())),
        Err(crate::disk::DiskError::Pem { error, .. }) => Err(read(error.to_string())),
        Err(e) => Err(read(e.to_string())),
    }
}

fn remove(file: &Path) -> Result<String, WatchedError> {
    let write = |source| WatchedError::Write {
        file: file.to_owned(),
        source,
    };
    if std::fs::symlink_metadata(file).is_err() {
        return Ok(format!(
            "no certificate on disk: {} not written",
            file.display()
        ));
    }
    atomic::remove(file).map_err(write)?;
    atomic::fsync_dir(atomic::parent(file)).map_err(write)?;
    Ok(format!(
        "no certificate on disk: {} removed",
        file.display()
    ))
}

fn short(hex: &str) -> String {
    crate::model::fmt::short_hex(hex)
}

// === rendering (pure) ===

/// `s` as a YAML double-quoted scalar (also a JSON string for printable
/// text).
pub fn yaml_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn path_text(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// traefik's dynamic configuration for one certificate.
pub fn traefik_yaml(
    target: &str,
    cert: &Path,
    key: &Path,
    generation: Option<&str>,
    leaf_sha256: &str,
) -> String {
    let which = match generation {
        Some(g) => format!("generation {g}, leaf sha256 {leaf_sha256}"),
        None => format!("leaf sha256 {leaf_sha256}"),
    };
    format!(
        "# Written by certctl for target {target}; changes on every deploy so traefik's file \
         provider reloads.\n\
         # {which}\n\
         tls:\n  certificates:\n    - certFile: {}\n      keyFile: {}\n",
        yaml_quote(&path_text(cert)),
        yaml_quote(&path_text(key)),
    )
}

/// envoy's SDS resource file (YAML) for one TLS certificate secret that
/// watches the certificate's directory.
pub fn envoy_yaml(secret: &str, cert: &Path, key: &Path) -> String {
    format!(
        "# Written by certctl. envoy re-reads the files when ..data is switched in the watched \
         directory.\n\
         resources:\n\
         - \"@type\": \"type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret\"\n  \
         name: {}\n  \
         tls_certificate:\n    \
         certificate_chain: {{ filename: {} }}\n    \
         private_key: {{ filename: {} }}\n    \
         watched_directory: {{ path: {} }}\n",
        yaml_quote(secret),
        yaml_quote(&path_text(cert)),
        yaml_quote(&path_text(key)),
        yaml_quote(&path_text(atomic::parent(cert))),
    )
}

/// The same resource as JSON, for an `sds_path` ending in `.json`.
pub fn envoy_json(secret: &str, cert: &Path, key: &Path) -> String {
    let value = serde_json::json!({
        "resources": [{
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
            "name": secret,
            "tls_certificate": {
                "certificate_chain": { "filename": path_text(cert) },
                "private_key": { "filename": path_text(key) },
                "watched_directory": { "path": path_text(atomic::parent(cert)) },
            },
        }],
    });
    let mut text = serde_json::to_string_pretty(&value).unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_quoting_survives_any_path() {
        assert_eq!(yaml_quote("/etc/a b/c.pem"), "\"/etc/a b/c.pem\"");
        assert_eq!(yaml_quote("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(yaml_quote("tab\there"), "\"tab\\u0009here\"");
        assert_eq!(yaml_quote("#: {x}"), "\"#: {x}\"");
    }

    #[test]
    fn the_traefik_file_names_the_stable_paths_and_the_set() {
        let text = traefik_yaml(
            "web",
            Path::new("/etc/traefik/certs/web/cert.pem"),
            Path::new("/etc/traefik/certs/web/key.pem"),
            Some("20261122T101500.123Z-4f2a"),
            "ab12",
        );
        assert_eq!(
            text,
            "# Written by certctl for target web; changes on every deploy so traefik's file \
             provider reloads.\n\
             # generation 20261122T101500.123Z-4f2a, leaf sha256 ab12\n\
             tls:\n  certificates:\n    - certFile: \"/etc/traefik/certs/web/cert.pem\"\n      \
             keyFile: \"/etc/traefik/certs/web/key.pem\"\n"
        );
        let in_place = traefik_yaml("web", Path::new("/c"), Path::new("/k"), None, "cd34");
        assert!(in_place.contains("\n# leaf sha256 cd34\n"), "{in_place}");
    }

    #[test]
    fn the_envoy_file_watches_the_certificate_directory() {
        let yaml = envoy_yaml(
            "web",
            Path::new("/etc/envoy/certs/web/cert.pem"),
            Path::new("/etc/envoy/certs/web/key.pem"),
        );
        assert!(
            yaml.contains("    watched_directory: { path: \"/etc/envoy/certs/web\" }\n"),
            "{yaml}"
        );
        assert!(yaml.contains("  name: \"web\"\n"), "{yaml}");
        let json: serde_json::Value = serde_json::from_str(&envoy_json(
            "web",
            Path::new("/d/cert.pem"),
            Path::new("/d/key.pem"),
        ))
        .unwrap();
        let secret = &json["resources"][0];
        assert_eq!(
            secret["@type"],
            "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
        );
        assert_eq!(
            secret["tls_certificate"]["certificate_chain"]["filename"],
            "/d/cert.pem"
        );
        assert_eq!(secret["tls_certificate"]["watched_directory"]["path"], "/d");
    }
}
