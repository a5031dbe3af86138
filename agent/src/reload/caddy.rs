//! caddy's admin API: loading a certificate into the running server.
//!
//! The certificate (leaf and chain) and its key become one entry of the TLS
//! app's `certificates.load_pem`, tagged and identified (`@id`) as
//! `certctl-<target>`. A config change makes caddy provision its TLS app
//! again, which also re-reads every `load_files` certificate, so a config
//! that loads the target's files (`tls cert key` in a Caddyfile) serves the
//! same certificate.
//!
//! The update is one of, in order: `PATCH /id/<id>` (the entry exists),
//! `POST /config/apps/tls/certificates/load_pem/...` (append it), `PUT
//! /config/apps/tls/certificates/load_pem` (the TLS app or its
//! `certificates` do not exist yet: create them). Every request carries
//! `Cache-Control: must-revalidate`, so caddy reloads even when the entry
//! did not change (the same certificate pushed again after a missed reload).
//!
//! Guarantees: success means caddy answered 200 to the change, i.e. it
//! loaded the new config; caddy keeps the old config when a change fails.
//! The JSON body holding the key is built in a zeroizing buffer sized so it
//! never reallocates.

use serde::Serialize;
use zeroize::Zeroizing;

use super::http::{self, Endpoint, HttpError, Response};

/// Why caddy did not take the certificate.
#[derive(Debug, thiserror::Error)]
pub enum CaddyError {
    #[error(
        "caddy admin API: {0}; check that caddy runs with this admin address (`admin` in the Caddyfile's global options, `admin.listen` in JSON)"
    )]
    Http(#[from] HttpError),
    #[error("caddy admin API at {endpoint} refused `{request}` ({status}): {error}")]
    Refused {
        endpoint: String,
        request: String,
        status: u16,
        error: String,
    },
}

/// The longest stretch of caddy's error quoted in a message.
const QUOTE_LIMIT: usize = 500;

#[derive(Serialize)]
struct LoadPem<'a> {
    #[serde(rename = "@id")]
    id: &'a str,
    certificate: &'a str,
    key: &'a str,
    tags: [&'a str; 1],
}

/// Loads `certificate` (leaf then chain, PEM) and `key` into caddy as the
/// `load_pem` entry `id`. Returns a line for the stage message.
pub async fn load_pem(
    endpoint: &Endpoint,
    id: &str,
    certificate: &str,
    key: &str,
) -> Result<String, CaddyError> {
    let entry = LoadPem {
        id,
        certificate,
        key,
        tags: [id],
    };
    // JSON escaping at most doubles a PEM (newlines become `\n`).
    let cap = 2 * (certificate.len() + key.len()) + 4 * id.len() + 128;
    let mut one = Zeroizing::new(Vec::with_capacity(cap));
    let mut list = Zeroizing::new(Vec::with_capacity(cap + 2));
    // Serializing plain strings into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *one, &entry);
    let _ = serde_json::to_writer(&mut *list, &[&entry]);
    let force = [("Cache-Control", "must-revalidate")];

    let patch = format!("/id/{id}");
    let r = http::request(endpoint, "PATCH", &patch, &force, &one).await?;
    if r.status == 200 {
        return Ok(format!(
            "caddy admin API: certificate {id} replaced through {endpoint}"
        ));
    }
    if r.status != 404 {
        return Err(refused(endpoint, "PATCH", &patch, &r));
    }
    let append = "/config/apps/tls/certificates/load_pem/...";
    let r = http::request(endpoint, "POST", append, &force, &list).await?;
    if r.status == 200 {
        return Ok(format!(
            "caddy admin API: certificate {id} loaded through {endpoint}"
        ));
    }
    if !r.body.contains("invalid traversal path") {
        return Err(refused(endpoint, "POST", append, &r));
    }
    let create = "/config/apps/tls/certificates/load_pem";
    let r = http::request(endpoint, "PUT", create, &force, &list).await?;
    if r.status == 200 {
        return Ok(format!(
            "caddy admin API: TLS certificates created with {id} through {endpoint}"
        ));
    }
    Err(refused(endpoint, "PUT", create, &r))
}

/// Removes the `load_pem` entry `id` (there is no certificate on disk to
/// load, e.g. after rolling back a first deploy). An entry that does not
/// exist is fine.
pub async fn unload(endpoint: &Endpoint, id: &str) -> Result<String, CaddyError> {
    let path = format!("/id/{id}");
    let r = http::request(endpoint, "DELETE", &path, &[], b"").await?;
    match r.status {
        200 => Ok(format!(
            "caddy admin API: no certificate on disk, entry {id} removed through {endpoint}"
        )),
        404 => Ok(format!(
            "caddy admin API: no certificate on disk and no entry {id} at {endpoint}: nothing to load"
        )),
        _ => Err(refused(endpoint, "DELETE", &path, &r)),
    }
}

fn refused(endpoint: &Endpoint, method: &str, path: &str, r: &Response) -> CaddyError {
    // caddy answers `{"error": "..."}`.
    let error = serde_json::from_str::<serde_json::Value>(&r.body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or_else(|| r.body.trim().to_owned());
    // caddy's words go into a log line: one line, every byte visible, cut.
    let error = crate::model::fmt::clipped(&error, QUOTE_LIMIT);
    CaddyError::Refused {
        endpoint: endpoint.to_string(),
        request: format!("{method} {path}"),
        status: r.status,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_entry_is_tagged_and_identified() {
        let entry = LoadPem {
            id: "certctl-web",
            certificate: "C\n",
            key: "K\n",
            tags: ["certctl-web"],
        };
        assert_eq!(
            serde_json::to_string(&entry).unwrap(),
            r#"{"@id":"certctl-web","certificate":"C\n","key":"K\n","tags":["certctl-web"]}"#
        );
    }
}

#[cfg(test)]
mod fuzz {
    //! Fuzzing caddy's refusals: whatever body comes with a refusal (JSON
    //! or not, any size, any bytes), the message is one bounded line.

    use proptest::prelude::*;

    use super::*;

    fn body() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            any::<String>().prop_map(|e| serde_json::json!({ "error": e }).to_string()),
            "[ -~\\n\\r\u{1b}\u{2028}\u{202e}]{0,2000}",
            Just("{\"error\": 5}".to_owned()),
            Just("{\"error\": \"line\\nforged: yes\"}".to_owned()),
        ]
    }

    proptest! {
        #![proptest_config(crate::fuzzing::config(256))]

        #[test]
        fn any_refusal_is_one_bounded_line(status in 100u16..600, body in body()) {
            let endpoint = Endpoint::Tcp { host: "127.0.0.1".to_owned(), port: 2019 };
            let e = refused(&endpoint, "PATCH", "/id/certctl-web", &Response { status, body });
            let text = e.to_string();
            prop_assert!(crate::model::fmt::is_one_line(&text), "{text:?}");
            // An escape is at most ten characters (`\u{NNNN}`).
            prop_assert!(text.chars().count() < 10 * QUOTE_LIMIT + 400, "{}", text.len());
        }
    }

    /// A JSON error with a newline in it forged a second log line, and a
    /// long one went into the message whole.
    #[test]
    fn a_refusal_cannot_forge_a_line_or_flood_the_log() {
        let endpoint = Endpoint::Tcp {
            host: "127.0.0.1".to_owned(),
            port: 2019,
        };
        let body = serde_json::json!({ "error": "bad\nlevel=info msg=deployed" }).to_string();
        let text = refused(&endpoint, "PUT", "/x", &Response { status: 400, body }).to_string();
        assert!(text.contains("bad\\nlevel=info"), "{text}");
        let body = serde_json::json!({ "error": "x".repeat(100_000) }).to_string();
        let text = refused(&endpoint, "PUT", "/x", &Response { status: 400, body }).to_string();
        assert!(text.len() < 1000 && text.ends_with('…'), "{}", text.len());
    }
}
