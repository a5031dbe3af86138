//! Configuration tests: the shipped files parse, the contract's example
//! parses, every bad input gives the message an operator needs, and defaults
//! resolve as documented. Users and groups come from [`FakeHost`], so results
//! do not depend on the machine running the tests.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

// === support ===

struct FakeHost {
    users: HashMap<&'static str, u32>,
    groups: HashMap<&'static str, u32>,
    euid: u32,
}

impl FakeHost {
    /// A Debian-like host with the certctl group, agent running as root.
    fn debian() -> FakeHost {
        FakeHost {
            users: HashMap::from([("root", 0), ("www-data", 33), ("alice", 1000)]),
            groups: HashMap::from([
                ("root", 0),
                ("www-data", 33),
                ("certctl", 990),
                ("ops", 1001),
            ]),
            euid: 0,
        }
    }
}

impl Host for FakeHost {
    fn user_id(&self, name: &str) -> Result<Option<u32>, String> {
        Ok(self.users.get(name).copied())
    }
    fn group_id(&self, name: &str) -> Result<Option<u32>, String> {
        Ok(self.groups.get(name).copied())
    }
    fn user_name(&self, uid: u32) -> Option<String> {
        self.users
            .iter()
            .find(|(_, id)| **id == uid)
            .map(|(n, _)| (*n).to_owned())
    }
    fn group_name(&self, gid: u32) -> Option<String> {
        self.groups
            .iter()
            .find(|(_, id)| **id == gid)
            .map(|(n, _)| (*n).to_owned())
    }
    fn euid(&self) -> u32 {
        self.euid
    }
}

/// A temporary directory holding `agent.toml`'s directory, with `tls/` and
/// `ca.pem` in it.
struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir(dir.path().join("tls")).expect("mkdir tls");
        fs::write(dir.path().join("ca.pem"), "not read at load").expect("write ca.pem");
        Env { dir }
    }

    fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("agent.toml")
    }

    /// `text` with `{dir}` replaced by the directory.
    fn subst(&self, text: &str) -> String {
        text.replace("{dir}", &self.dir.path().display().to_string())
    }

    fn parse_on(&self, text: &str, host: &FakeHost) -> Result<Config, ConfigError> {
        parse_with(&self.subst(text), &self.config_path(), host)
    }

    fn parse(&self, text: &str) -> Result<Config, ConfigError> {
        self.parse_on(text, &FakeHost::debian())
    }

    fn ok(&self, text: &str) -> Config {
        match self.parse(text) {
            Ok(config) => config,
            Err(e) => panic!("expected a valid config, got:\n{e}\n--- config:\n{text}"),
        }
    }
}

/// A valid nginx target `web` with `extra` appended to its table.
fn web(extra: &str) -> String {
    format!(
        "[[target]]\nname = \"web\"\nkind = \"nginx\"\ncert_path = \"tls/web.crt\"\nkey_path = \"tls/web.key\"\n{extra}\n"
    )
}

/// A valid nginx target `web` with a `[target.verify]` table holding `verify`.
fn web_verify(verify: &str) -> String {
    format!("{}[target.verify]\n{verify}\n", web(""))
}

// === shipped files ===

#[test]
fn example_config_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/agent.toml");
    let config = match parse(include_str!("../../../examples/agent.toml"), &path) {
        Ok(config) => config,
        Err(e) => panic!("examples/agent.toml:\n{e}"),
    };
    let examples = absolute_clean(&path.with_file_name(""));
    assert_eq!(config.agent.socket, examples.join("run/agent.sock"));
    assert_eq!(config.agent.drop_dir, examples.join("run/drop"));
    assert_eq!(config.agent.state_dir, examples.join("run/state"));
    assert!(config.agent.deploy_groups.is_empty());
    let demo = config.target("demo").expect("target demo");
    assert_eq!(demo.kind, Kind::File);
    assert!(demo.cert_path.starts_with(examples.join("run/demo")));
    assert!(demo.validate.is_empty() && demo.reload.is_empty());
    assert!(demo.owner.is_none() && demo.default_owner.is_none());
}

#[test]
fn packaging_config_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/agent.toml");
    let config = match parse(include_str!("../../../packaging/agent.toml"), &path) {
        Ok(config) => config,
        Err(e) => panic!("packaging/agent.toml:\n{e}"),
    };
    assert!(config.targets.is_empty());
    assert_eq!(
        config.agent.socket,
        PathBuf::from("/run/certctl/agent.sock")
    );
    assert_eq!(
        config.agent.drop_dir,
        PathBuf::from("/var/lib/certctl/drop")
    );
    assert_eq!(
        config.agent.state_dir,
        PathBuf::from("/var/lib/certctl/state")
    );
    assert_eq!(config.agent.settle, Duration::from_secs(2));
    assert_eq!(config.agent.clock_skew_grace, Duration::from_secs(300));
    assert!(config.agent.metrics_listen.is_none());
}

/// Commented-out examples in the shipped files must be valid too: uncomment
/// the nginx target of each and parse it with its paths moved to a temp dir.
#[test]
fn commented_examples_parse() {
    for (name, text) in [
        (
            "examples/agent.toml",
            include_str!("../../../examples/agent.toml"),
        ),
        (
            "packaging/agent.toml",
            include_str!("../../../packaging/agent.toml"),
        ),
    ] {
        let env = Env::new();
        let block: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("#[[target]]"))
            .take_while(|l| l.starts_with('#'))
            .map(|l| l.strip_prefix('#').unwrap_or(l))
            .collect();
        assert!(!block.is_empty(), "{name}: no commented [[target]] example");
        let uncommented = block
            .join("\n")
            .replace("/etc/nginx/tls", "{dir}/tls")
            .replace("/etc/ssl/internal-ca.pem", "{dir}/ca.pem");
        let config = match env.parse(&uncommented) {
            Ok(config) => config,
            Err(e) => panic!("{name}: commented nginx example:\n{e}\n---\n{uncommented}"),
        };
        assert_eq!(config.targets.len(), 1, "{name}");
        assert!(
            config.targets[0].verify.is_some(),
            "{name}: example shows [target.verify]"
        );
    }
}

/// The comments of the shipped examples name every kind and every layout
/// this version has, so they cannot fall behind the code.
#[test]
fn commented_examples_name_every_kind_and_layout() {
    for (name, text) in [
        (
            "examples/agent.toml",
            include_str!("../../../examples/agent.toml"),
        ),
        (
            "packaging/agent.toml",
            include_str!("../../../packaging/agent.toml"),
        ),
    ] {
        // The key's own line and the comment lines aligned under it.
        let comment_of = |key: &str| -> String {
            let mut lines = text
                .lines()
                .skip_while(|l| !l.starts_with(&format!("#{key} ")));
            let first = lines.next().unwrap_or_default();
            std::iter::once(first)
                .chain(lines.take_while(|l| l.starts_with("#      ")))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let kinds = comment_of("kind");
        for kind in Kind::ALL {
            assert!(
                kinds.contains(kind.as_str()),
                "{name}: the kind comment lacks {kind}: {kinds}"
            );
        }
        let layouts = comment_of("layout");
        for layout in [Layout::InPlace, Layout::Generations] {
            assert!(
                layouts.contains(layout.as_str()),
                "{name}: the layout comment lacks {}: {layouts}",
                layout.as_str()
            );
        }
        assert!(!text.contains("only layout"), "{name}");
    }
}

/// The example of CONTRACT.md, with its paths moved to a temp dir.
const CONTRACT_EXAMPLE: &str = r#"
[agent]
socket      = "/run/certctl/agent.sock"   # gRPC control socket
drop_dir    = "/var/lib/certctl/drop"     # watched drop directory
state_dir   = "/var/lib/certctl/state"    # journal, history, backups of record
# who may use the socket (kernel-checked peer credentials); root is always allowed
deploy_groups = ["certctl"]               # may deploy / rollback / reload
read_groups   = []                        # may only read status / history / watch
settle        = "2s"                      # quiet time before a file written in place is taken
drop_owners   = []                        # optional: only files owned by these users/groups are accepted
metrics_listen = "127.0.0.1:9793"         # optional Prometheus endpoint; off when absent

[[target]]
name       = "web"                        # [a-z0-9][a-z0-9._-]{0,62}
kind       = "nginx"                      # see "Target kinds"
drop       = "web"                        # drop name this target takes (default: name); targets may share one
layout     = "in-place"                   # or "generations": cert/key/chain paths must share one directory and
                                          # become stable symlinks through <dir>/..data (one-rename switch)
cert_path  = "{dir}/tls/web.crt"
key_path   = "{dir}/tls/web.key"
chain_path = "{dir}/tls/web.chain.pem"   # optional; kind decides what "no chain_path" means
owner      = "root"                           # optional; precedence: explicit > existing file > kind default
group      = "www-data"
cert_mode  = "0644"                           # optional; same precedence
key_mode   = "0640"                           # a private key is never left readable or writable by "other":
                                              # an existing looser mode is tightened to the kind default, with a warning
validate = ["nginx", "-t"]                    # argv, never a shell string; optional (kind default)
reload   = ["nginx", "-s", "reload"]          # argv; optional (kind default)
command_timeout  = "30s"
backup_retention = 3

[target.verify]   # post-deploy check; on whenever endpoint is set. Without it, results say "unverified", never "verified".
endpoint    = "127.0.0.1:443"
server_name = "www.example.com"                # SNI; default: first DNS SAN of the new certificate
protocol    = "tls"                            # tls | smtp-starttls | imap-starttls | pop3-starttls
attempts    = 3
backoff     = "1s"                             # first wait, doubling
max_backoff = "16s"                            # cap
timeout     = "10s"                            # per attempt
interval    = "1h"                             # optional drift watch: re-probe and report served != deployed
require_chain_match = false                    # also require the served intermediates to equal the deployed chain
ca_file     = "{dir}/ca.pem"       # optional: validate the served chain and name against this CA
"#;

#[test]
fn contract_example_parses() {
    let env = Env::new();
    let config = env.ok(CONTRACT_EXAMPLE);
    let dir = env.dir();
    assert_eq!(config.path, env.config_path());
    assert_eq!(
        config.agent,
        AgentConfig {
            socket: "/run/certctl/agent.sock".into(),
            drop_dir: "/var/lib/certctl/drop".into(),
            state_dir: "/var/lib/certctl/state".into(),
            deploy_groups: vec![Group {
                name: "certctl".into(),
                gid: 990
            }],
            read_groups: vec![],
            settle: Duration::from_secs(2),
            drop_owners: vec![],
            metrics_listen: Some("127.0.0.1:9793".parse().expect("addr")),
            clock_skew_grace: Duration::from_secs(300),
            rejected_keep: 100,
            rejected_max_age: Duration::from_secs(30 * 86400),
        }
    );
    let ident = |name: &str, id| {
        Some(Ident {
            name: name.into(),
            id,
        })
    };
    assert_eq!(
        config.targets,
        vec![Target {
            name: "web".into(),
            kind: Kind::Nginx,
            drop: "web".into(),
            layout: Layout::InPlace,
            cert_path: dir.join("tls/web.crt"),
            key_path: dir.join("tls/web.key"),
            chain_path: Some(dir.join("tls/web.chain.pem")),
            owner: ident("root", 0),
            group: ident("www-data", 33),
            default_owner: ident("root", 0),
            default_group: ident("www-data", 33),
            cert_mode: Some(0o644),
            key_mode: Some(0o640),
            default_cert_mode: 0o644,
            default_key_mode: 0o640,
            validate: vec!["nginx".into(), "-t".into()],
            reload: vec!["nginx".into(), "-s".into(), "reload".into()],
            reload_hook: None,
            command_timeout: Duration::from_secs(30),
            backup_retention: 3,
            verify: Some(VerifyConfig {
                endpoints: vec![VerifyEndpoint {
                    address: "127.0.0.1:443".into(),
                    server_name: Some("www.example.com".into()),
                    protocol: VerifyProtocol::Tls,
                }],
                consecutive: 3,
                settle: Duration::from_secs(1),
                attempts: 3,
                backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(16),
                timeout: Duration::from_secs(10),
                interval: Some(Duration::from_secs(3600)),
                require_chain_match: false,
                ca_file: Some(dir.join("ca.pem")),
            }),
            keystore: None,
            ssh: None,
        }]
    );
    assert!(config.target("web").is_some() && config.target("nope").is_none());
    assert_eq!(config.targets_for_drop("web").count(), 1);
}

// === errors ===

/// Each bad config and a substring its message must contain (`{dir}` is the
/// config directory in both).
fn bad_configs() -> Vec<(&'static str, String, &'static str)> {
    vec![
        // Shape: unknown keys at every level, with suggestions.
        (
            "unknown top-level key",
            "[[targets]]\nname = \"web\"\n".into(),
            "line 1, column 3: unknown key \"targets\" (did you mean \"target\"?)",
        ),
        (
            "unknown agent key",
            "[agent]\nsettl = \"2s\"\n".into(),
            "line 2, column 1: unknown key \"settl\" (did you mean \"settle\"?)",
        ),
        (
            "unknown target key",
            web("relaod = []"),
            "line 6, column 1: unknown key \"relaod\" (did you mean \"reload\"?)",
        ),
        (
            "unknown verify key",
            web_verify("endpont = \"127.0.0.1:443\""),
            "unknown key \"endpont\" (did you mean \"endpoint\"?)",
        ),
        (
            "unknown key, no suggestion",
            web("colour = \"blue\""),
            "unknown key \"colour\" (known keys here: name, kind",
        ),
        (
            "missing key",
            "[[target]]\nname = \"web\"\nkind = \"file\"\nkey_path = \"tls/k\"\n".into(),
            "target \"web\" (target[0]): missing required key \"cert_path\"",
        ),
        (
            "wrong type",
            "[agent]\nsettle = 2\n".into(),
            "line 2, column 10: invalid type: integer `2`, expected a string",
        ),
        ("toml syntax", "[agent\n".into(), "line 1, column 7"),
        (
            "duplicate key",
            "[agent]\nsettle = \"1s\"\nsettle = \"2s\"\n".into(),
            "line 3, column 1: duplicate key \"settle\"",
        ),
        // Durations.
        (
            "bad duration",
            "[agent]\nsettle = \"two seconds\"\n".into(),
            "agent.settle: \"two seconds\" is not a duration (examples: \"500ms\", \"2s\", \"1m\")",
        ),
        (
            "duration without unit",
            web("command_timeout = \"30\""),
            "target \"web\" (target[0]).command_timeout: \"30\" is not a duration",
        ),
        (
            "zero timeout",
            web("command_timeout = \"0s\""),
            "command_timeout: \"0s\" is too short: must be more than 0",
        ),
        (
            "long timeout",
            web("command_timeout = \"2h\""),
            "command_timeout: \"2h\" is too long: at most 1h",
        ),
        (
            "long clock skew grace",
            "[agent]\nclock_skew_grace = \"2days\"\n".into(),
            "agent.clock_skew_grace: \"2days\" is too long",
        ),
        (
            "no rejected drop kept",
            "[agent]\nrejected_keep = 0\n".into(),
            "agent.rejected_keep: 0 is out of range: use 1 to 100000 (at least the latest",
        ),
        (
            "short rejected age",
            "[agent]\nrejected_max_age = \"10m\"\n".into(),
            "agent.rejected_max_age: \"10m\" is too short: must be at least 1h",
        ),
        (
            "rejected age in words",
            "[agent]\nrejected_max_age = \"a month\"\n".into(),
            "agent.rejected_max_age: \"a month\" is not a duration",
        ),
        // Modes.
        (
            "integer mode",
            web("key_mode = 640"),
            "target \"web\" (target[0]).key_mode: 640 is a number; modes are octal strings, so quote it: key_mode = \"0640\"",
        ),
        (
            "other-readable key",
            web("key_mode = \"0644\""),
            "target \"web\" (target[0]).key_mode: \"0644\" would let any local user read the private key: use \"0600\" or \"0640\"",
        ),
        (
            "other-writable key",
            web("key_mode = \"0602\""),
            "would let any local user overwrite the private key",
        ),
        (
            "setgid",
            web("cert_mode = \"2644\""),
            "cert_mode: \"2644\" sets a setuid, setgid or sticky bit",
        ),
        (
            "not octal",
            web("cert_mode = \"0684\""),
            "cert_mode: \"0684\" is not an octal mode",
        ),
        (
            "symbolic mode",
            web("cert_mode = \"rw-r--r--\""),
            "is not an octal mode: write it like \"0640\"",
        ),
        // Names.
        (
            "bad target name",
            web("").replace("\"web\"", "\"Web\""),
            "target \"Web\" (target[0]).name: \"Web\" is not a valid target name",
        ),
        (
            "bad drop name",
            web("drop = \"a/b\""),
            "drop: \"a/b\" is not a valid drop name",
        ),
        (
            "duplicate names",
            format!("{}{}", web(""), web("").replace("web.", "other.")),
            "target \"web\" (target[1]).name: \"web\" is already the name of target[0]: target names must be unique",
        ),
        // Paths.
        (
            "duplicate paths across targets",
            format!("{}{}", web(""), web("").replace("\"web\"", "\"api\"")),
            "target \"api\" (target[1]).cert_path: {dir}/tls/web.crt is also target \"web\" (target[0]).cert_path",
        ),
        (
            "duplicate paths in a target",
            web("chain_path = \"./tls/web.crt\""),
            "chain_path: {dir}/tls/web.crt is also target \"web\" (target[0]).cert_path",
        ),
        (
            "duplicate paths through ..",
            web("chain_path = \"tls/../tls/web.key\""),
            "is also target \"web\" (target[0]).key_path",
        ),
        (
            "missing parent dir",
            web("").replace("tls/web.crt", "/nonexistent-certctl/tls/web.crt"),
            "cert_path: directory /nonexistent-certctl/tls does not exist: create it, or fix the path (certctl does not create target directories)",
        ),
        (
            "relative missing parent",
            web("").replace("tls/web.key", "ngnix/web.key"),
            "key_path: directory {dir}/ngnix does not exist",
        ),
        (
            "path is a directory",
            web("").replace("tls/web.crt", "tls"),
            "cert_path: {dir}/tls is a directory",
        ),
        (
            "trailing slash",
            web("").replace("tls/web.crt", "tls/web/"),
            "names a directory",
        ),
        (
            "empty path",
            web("").replace("tls/web.crt", ""),
            "cert_path: is empty",
        ),
        (
            "target inside drop_dir",
            format!("[agent]\ndrop_dir = \"tls\"\n{}", web("")),
            "cert_path: {dir}/tls/web.crt is inside agent.drop_dir",
        ),
        (
            "drop_dir inside state_dir",
            "[agent]\nstate_dir = \"run\"\ndrop_dir = \"run/drop\"\n".into(),
            "agent.drop_dir: {dir}/run/drop and agent.state_dir {dir}/run overlap",
        ),
        // Kinds and layouts.
        (
            "traefik without its dynamic configuration",
            web("").replace("nginx", "traefik"),
            "target \"web\" (target[0]): missing required key \"dynamic_config\" (kind traefik writes the file provider's dynamic configuration there)",
        ),
        (
            "unknown kind",
            web("").replace("nginx", "foo"),
            "kind: unknown kind \"foo\" (available: file, nginx, apache, haproxy, postfix, dovecot, caddy, traefik, envoy, keystore)",
        ),
        (
            "generations layout across directories",
            web("layout = \"generations\"\nchain_path = \"other/chain.pem\""),
            "layout: \"generations\" switches the whole set with one symlink in one directory: cert_path, key_path and chain_path must be in the same directory",
        ),
        (
            "generations layout with a reserved name",
            web("layout = \"generations\"").replace("tls/web.key", "tls/..data"),
            "the names \"..data\" and \".certctl*\" are the layout's own",
        ),
        (
            "unknown layout",
            web("layout = \"inplace\""),
            "unknown layout \"inplace\"",
        ),
        // Users and groups.
        (
            "unknown user",
            web("owner = \"nginxx\""),
            "owner: no user \"nginxx\" on this host: create it, or fix the name",
        ),
        (
            "unknown group",
            web("group = \"wwwdata\""),
            "group: no group \"wwwdata\" on this host",
        ),
        (
            "id out of range",
            web("owner = \"99999999999\""),
            "owner: \"99999999999\" is not a valid user id",
        ),
        (
            "unknown deploy group",
            "[agent]\ndeploy_groups = [\"certctl\", \"wheel\"]\n".into(),
            "agent.deploy_groups[1]: no group \"wheel\"",
        ),
        (
            "unknown read group",
            "[agent]\nread_groups = [\"auditors\"]\n".into(),
            "agent.read_groups[0]: no group \"auditors\"",
        ),
        (
            "unknown drop owner",
            "[agent]\ndrop_owners = [\"acme\"]\n".into(),
            "agent.drop_owners[0]: no user or group \"acme\"",
        ),
        // Commands.
        (
            "empty program",
            web("reload = [\"\", \"-s\"]"),
            "reload: the program (first element) is empty",
        ),
        (
            "shell string",
            web("reload = [\"systemctl reload nginx\"]"),
            "never shell strings; write [\"systemctl\", \"reload\", \"nginx\"]",
        ),
        (
            "backup retention 0",
            web("backup_retention = 0"),
            "backup_retention: 0 is out of range: use 1 to 100 (rollback restores the newest backup",
        ),
        (
            "backup retention too big",
            web("backup_retention = 1000"),
            "backup_retention: 1000 is out of range",
        ),
        // Agent values.
        (
            "bad metrics_listen",
            "[agent]\nmetrics_listen = \"localhost:9793\"\n".into(),
            "agent.metrics_listen: \"localhost:9793\" is not an IP address and port",
        ),
        // Verify.
        (
            "attempts 0",
            web_verify("endpoint = \"127.0.0.1:443\"\nattempts = 0"),
            "target \"web\" (target[0]).verify.attempts: 0 is out of range: use 1 to 20",
        ),
        (
            "attempts 21",
            web_verify("endpoint = \"127.0.0.1:443\"\nattempts = 21"),
            "verify.attempts: 21 is out of range",
        ),
        (
            "max_backoff < backoff",
            web_verify("endpoint = \"127.0.0.1:443\"\nbackoff = \"5s\"\nmax_backoff = \"2s\""),
            "verify.max_backoff: 2s is less than backoff (5s)",
        ),
        (
            "endpoint without port",
            web_verify("endpoint = \"127.0.0.1\""),
            "verify.endpoint: \"127.0.0.1\" has no port: write HOST:PORT",
        ),
        (
            "bare ipv6 endpoint",
            web_verify("endpoint = \"::1:443\""),
            "put an IPv6 address in brackets",
        ),
        (
            "bad server_name",
            web_verify("endpoint = \"127.0.0.1:443\"\nserver_name = \"www.example.com:443\""),
            "verify.server_name: \"www.example.com:443\" is not a DNS name",
        ),
        (
            "unknown protocol",
            web_verify("endpoint = \"127.0.0.1:25\"\nprotocol = \"starttls\""),
            "verify.protocol: unknown protocol \"starttls\" (expected one of: tls, smtp-starttls, imap-starttls, pop3-starttls)",
        ),
        (
            "verify without endpoint",
            web_verify("attempts = 5\ntimeout = \"3s\""),
            "target \"web\" (target[0]).verify: sets attempts, timeout but no endpoint",
        ),
        (
            "endpoint and endpoints",
            web_verify("endpoint = \"127.0.0.1:443\"\nendpoints = [\"[::1]:443\"]"),
            "target \"web\" (target[0]).verify.endpoints: is set together with verify.endpoint: keep one of the two keys",
        ),
        (
            "empty endpoints",
            web_verify("endpoints = []"),
            "verify.endpoints: is empty: list at least one \"HOST:PORT\"",
        ),
        (
            "bad endpoint in endpoints",
            web_verify("endpoints = [\"127.0.0.1:443\", \"::1:443\"]"),
            "verify.endpoints[1]: \"::1:443\" is ambiguous: put an IPv6 address in brackets",
        ),
        (
            "bad ipv6 in brackets",
            web_verify("endpoints = [\"[::g]:443\"]"),
            "verify.endpoints[0]: \"[::g]:443\" has \"::g\" in brackets, which is not an IPv6 address",
        ),
        (
            "bad address in an endpoint table",
            web_verify("endpoints = [{ address = \"127.0.0.1\", server_name = \"a.test\" }]"),
            "verify.endpoints[0].address: \"127.0.0.1\" has no port",
        ),
        (
            "bad server_name in an endpoint table",
            web_verify(
                "endpoints = [{ address = \"127.0.0.1:443\", server_name = \"a.test:443\" }]",
            ),
            "verify.endpoints[0].server_name: \"a.test:443\" is not a DNS name",
        ),
        (
            "bad protocol in an endpoint table",
            web_verify("endpoints = [{ address = \"127.0.0.1:25\", protocol = \"smtp\" }]"),
            "verify.endpoints[0].protocol: unknown protocol \"smtp\"",
        ),
        (
            "an endpoint listed twice",
            web_verify("endpoints = [\"127.0.0.1:443\", \"127.0.0.1:443\"]"),
            "verify.endpoints[1]: \"127.0.0.1:443\" is listed twice: remove one of the entries",
        ),
        (
            "unknown key in an endpoint table",
            web_verify("endpoints = [{ address = \"127.0.0.1:443\", sni = \"a.test\" }]"),
            "line 8, column 43: unknown key \"sni\" (known keys here: address, server_name, protocol)",
        ),
        (
            "consecutive 0",
            web_verify("endpoint = \"127.0.0.1:443\"\nconsecutive = 0"),
            "target \"web\" (target[0]).verify.consecutive: 0 is out of range: use 1 to 20: 1 passes on the first matching handshake",
        ),
        (
            "consecutive 21",
            web_verify("endpoint = \"127.0.0.1:443\"\nconsecutive = 21"),
            "verify.consecutive: 21 is out of range: use 1 to 20",
        ),
        (
            "settle not a duration",
            web_verify("endpoint = \"127.0.0.1:443\"\nsettle = \"soon\""),
            "verify.settle: \"soon\" is not a duration",
        ),
        (
            "settle too long",
            web_verify("endpoint = \"127.0.0.1:443\"\nsettle = \"2m\""),
            "verify.settle: \"2m\" is too long: at most 1m",
        ),
        (
            "settle without a span",
            web_verify("endpoint = \"127.0.0.1:443\"\nconsecutive = 1\nsettle = \"2s\""),
            "verify.settle: \"2s\" is the span that consecutive matches must cover, but consecutive = 1 has no span: raise consecutive (e.g. 3) or remove settle",
        ),
        (
            "consecutive without endpoint",
            web_verify("consecutive = 3"),
            "verify: sets consecutive but no endpoint",
        ),
        (
            "missing ca_file",
            web_verify("endpoint = \"127.0.0.1:443\"\nca_file = \"missing-ca.pem\""),
            "verify.ca_file: cannot use {dir}/missing-ca.pem: No such file or directory",
        ),
        (
            "zero verify timeout",
            web_verify("endpoint = \"127.0.0.1:443\"\ntimeout = \"0s\""),
            "verify.timeout: \"0s\" is too short",
        ),
        (
            "tiny interval",
            web_verify("endpoint = \"127.0.0.1:443\"\ninterval = \"10ms\""),
            "verify.interval: \"10ms\" is too short: must be at least 1s",
        ),
    ]
}

#[test]
fn bad_configs_are_rejected_with_a_useful_message() {
    let mut failures = Vec::new();
    for (case, text, expected) in bad_configs() {
        let env = Env::new();
        let expected = env.subst(expected);
        match env.parse(&text) {
            Ok(_) => failures.push(format!("{case}: accepted\n{text}")),
            Err(e) => {
                let message = e.to_string();
                let prefix = format!("{}: ", env.config_path().display());
                if !message.contains(&expected) || !message.starts_with(&prefix) {
                    failures.push(format!(
                        "{case}:\n  got:      {message}\n  expected: {prefix}…{expected}…"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn all_problems_are_reported_one_per_line() {
    let env = Env::new();
    let text = format!(
        "[agent]\nsettle = \"soon\"\n{}",
        web("key_mode = \"0644\"\nowner = \"nobody-here\"\nlayout = \"generations\"")
            .replace("tls/web.key", "tls/..data")
    );
    let Err(ConfigError::Invalid { path, problems }) = env.parse(&text) else {
        panic!("expected Invalid");
    };
    assert_eq!(path, env.config_path());
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "agent.settle",
            "target \"web\" (target[0]).layout",
            "target \"web\" (target[0]).owner",
            "target \"web\" (target[0]).key_mode",
        ]
    );
    let message = env
        .parse(&text)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert_eq!(message.lines().count(), 4);
    let prefix = format!("{}: ", env.config_path().display());
    assert!(message.lines().all(|l| l.starts_with(&prefix)), "{message}");
}

#[test]
fn unknown_keys_are_reported_with_every_other_problem() {
    let env = Env::new();
    let text = format!(
        "[agent]\nsettl = \"2s\"\nsettle = \"soon\"\n{}[target.verify]\nendpont = \"127.0.0.1:443\"\n",
        web("relaod = []\nkey_mode = \"0644\"").replace("\"nginx\"", "\"ngnix\"")
    );
    let Err(ConfigError::Invalid { problems, .. }) = env.parse(&text) else {
        panic!("expected Invalid");
    };
    let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        [
            "line 2, column 1: unknown key \"settl\" (did you mean \"settle\"?)",
            "line 9, column 1: unknown key \"relaod\" (did you mean \"reload\"?)",
            "line 12, column 1: unknown key \"endpont\" (did you mean \"endpoint\"?)",
            "agent.settle: \"soon\" is not a duration (examples: \"500ms\", \"2s\", \"1m\")",
            "target \"web\" (target[0]).kind: unknown kind \"ngnix\" (available: file, nginx, \
             apache, haproxy, postfix, dovecot, caddy, traefik, envoy, keystore): did you mean \"nginx\"?",
            "target \"web\" (target[0]).key_mode: \"0644\" would let any local user read the \
             private key: use \"0600\" or \"0640\"",
        ],
        "{text}"
    );
}

#[test]
fn misspelt_values_get_a_suggestion() {
    let env = Env::new();
    for (text, expected) in [
        (
            web("").replace("\"nginx\"", "\"apahce\""),
            "did you mean \"apache\"?",
        ),
        (web("layout = \"in-plce\""), "did you mean \"in-place\"?"),
    ] {
        let message = env
            .parse(&text)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains(expected), "{message}\n{text}");
    }
    let message = env
        .parse(&web("").replace("\"nginx\"", "\"tomcat\""))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(!message.contains("did you mean"), "{message}");
}

#[test]
fn many_unknown_keys_stop_at_the_limit() {
    let env = Env::new();
    let keys: String = (0..150).map(|i| format!("junk{i} = 1\n")).collect();
    let Err(ConfigError::Invalid { problems, .. }) = env.parse(&format!("[agent]\n{keys}")) else {
        panic!("expected Invalid");
    };
    assert_eq!(problems.len(), super::error::MAX_UNKNOWN_KEYS + 1);
}

#[test]
fn missing_file() {
    let err = load(Path::new("/nonexistent-certctl/agent.toml"))
        .err()
        .map(|e| e.to_string());
    assert_eq!(
        err.as_deref(),
        Some(
            "cannot read /nonexistent-certctl/agent.toml: No such file or directory (os error 2): \
             pass --config PATH or create it (see examples/agent.toml)"
        )
    );
}

#[test]
fn load_reads_the_file() {
    let env = Env::new();
    fs::write(env.config_path(), web("")).expect("write config");
    let config = load(&env.config_path()).expect("valid config");
    assert_eq!(config.targets[0].cert_path, env.dir().join("tls/web.crt"));
}

// === defaults and resolution ===

#[test]
fn empty_file_gives_agent_defaults_and_no_targets() {
    let env = Env::new();
    let config = env.ok("");
    assert!(config.targets.is_empty());
    assert_eq!(
        config.agent.deploy_groups,
        [Group {
            name: "certctl".into(),
            gid: 990
        }]
    );
    assert!(config.agent.read_groups.is_empty() && config.agent.drop_owners.is_empty());
    assert_eq!(config.warnings().len(), 1, "{:?}", config.warnings());
}

#[test]
fn default_deploy_group_is_dropped_when_absent() {
    let env = Env::new();
    let mut host = FakeHost::debian();
    host.groups.remove("certctl");
    let config = env.parse_on("", &host).expect("valid");
    assert!(config.agent.deploy_groups.is_empty());
    // Named explicitly, it must exist.
    let err = env
        .parse_on("[agent]\ndeploy_groups = [\"certctl\"]\n", &host)
        .err()
        .map(|e| e.to_string());
    assert!(err.is_some_and(|e| e.contains("agent.deploy_groups[0]: no group \"certctl\"")));
}

#[test]
fn agent_values() {
    let env = Env::new();
    let config = env.ok(
        "[agent]\nsocket = \"run/agent.sock\"\ndeploy_groups = [\"ops\", \"1001\", \"4242\"]\n\
         read_groups = [\"www-data\"]\nsettle = \"500ms\"\ndrop_owners = [\"alice\", \"ops\", \"77\"]\n\
         metrics_listen = \"[::1]:9793\"\nclock_skew_grace = \"0s\"\n",
    );
    let agent = &config.agent;
    assert_eq!(agent.socket, env.dir().join("run/agent.sock"));
    // Duplicates (by gid) collapse; a numeric gid without a name keeps its number.
    assert_eq!(
        agent.deploy_groups,
        [
            Group {
                name: "ops".into(),
                gid: 1001
            },
            Group {
                name: "4242".into(),
                gid: 4242
            }
        ]
    );
    assert_eq!(
        agent.read_groups,
        [Group {
            name: "www-data".into(),
            gid: 33
        }]
    );
    assert_eq!(agent.settle, Duration::from_millis(500));
    assert_eq!(agent.drop_owners, ["alice", "ops", "77"]);
    assert_eq!(agent.clock_skew_grace, Duration::ZERO);
    assert!(
        config
            .warnings()
            .iter()
            .all(|w| !w.contains("metrics_listen"))
    );

    let config = env.ok("[agent]\nmetrics_listen = \"0.0.0.0:9793\"\n");
    assert!(
        config
            .warnings()
            .iter()
            .any(|w| w.contains("not a loopback address"))
    );
}

#[test]
fn nginx_defaults() {
    let env = Env::new();
    let config = env.ok(&web(""));
    let t = &config.targets[0];
    assert_eq!(t.drop, "web");
    assert_eq!(t.layout, Layout::InPlace);
    assert_eq!(t.chain_path, None);
    assert_eq!(t.validate, ["nginx", "-t"]);
    assert_eq!(t.reload, ["nginx", "-s", "reload"]);
    assert_eq!((t.owner.clone(), t.group.clone()), (None, None));
    assert_eq!(
        t.default_owner,
        Some(Ident {
            name: "root".into(),
            id: 0
        })
    );
    assert_eq!(
        t.default_group,
        Some(Ident {
            name: "www-data".into(),
            id: 33
        })
    );
    assert_eq!((t.cert_mode, t.key_mode), (None, None));
    assert_eq!((t.default_cert_mode, t.default_key_mode), (0o644, 0o640));
    assert_eq!(t.command_timeout, Duration::from_secs(30));
    assert_eq!(t.backup_retention, 3);
    assert_eq!(t.verify, None);
    assert_eq!(t.paths().count(), 2);
}

#[test]
fn nginx_default_group_falls_back_to_nginx() {
    let env = Env::new();
    let mut host = FakeHost::debian();
    host.groups.remove("www-data");
    host.groups.insert("nginx", 101);
    let config = env.parse_on(&web(""), &host).expect("valid");
    assert_eq!(
        config.targets[0].default_group,
        Some(Ident {
            name: "nginx".into(),
            id: 101
        })
    );

    host.groups.remove("nginx");
    let config = env.parse_on(&web(""), &host).expect("valid");
    assert_eq!(config.targets[0].default_group, None);
}

#[test]
fn non_root_agent_gets_no_default_owner_or_group() {
    let env = Env::new();
    let mut host = FakeHost::debian();
    host.euid = 1000;
    let config = env
        .parse_on(&web("owner = \"alice\""), &host)
        .expect("valid");
    let t = &config.targets[0];
    assert_eq!(
        (t.default_owner.clone(), t.default_group.clone()),
        (None, None)
    );
    // Explicit values still apply.
    assert_eq!(
        t.owner,
        Some(Ident {
            name: "alice".into(),
            id: 1000
        })
    );
}

#[test]
fn file_kind_defaults() {
    let env = Env::new();
    let config = env.ok(&web("").replace("nginx", "file"));
    let t = &config.targets[0];
    assert!(t.validate.is_empty() && t.reload.is_empty());
    assert_eq!(
        (t.default_owner.clone(), t.default_group.clone()),
        (None, None)
    );
    assert_eq!((t.default_cert_mode, t.default_key_mode), (0o644, 0o600));
}

#[test]
fn explicit_empty_commands_disable_defaults() {
    let env = Env::new();
    let config = env.ok(&web("validate = []\nreload = []"));
    assert!(config.targets[0].validate.is_empty() && config.targets[0].reload.is_empty());
}

#[test]
fn explicit_values_override_defaults() {
    let env = Env::new();
    let config = env.ok(&web(
        "drop = \"shared\"\nchain_path = \"tls/web.chain\"\nowner = \"33\"\ngroup = \"ops\"\n\
         cert_mode = \"444\"\nkey_mode = \"0400\"\nvalidate = [\"/usr/sbin/nginx\", \"-t\", \"-q\"]\n\
         reload = [\"systemctl\", \"reload\", \"nginx\"]\ncommand_timeout = \"1m 30s\"\nbackup_retention = 10",
    ));
    let t = &config.targets[0];
    assert_eq!(t.drop, "shared");
    assert_eq!(t.chain_path, Some(env.dir().join("tls/web.chain")));
    assert_eq!(
        t.owner,
        Some(Ident {
            name: "www-data".into(),
            id: 33
        })
    );
    assert_eq!(
        t.group,
        Some(Ident {
            name: "ops".into(),
            id: 1001
        })
    );
    assert_eq!((t.cert_mode, t.key_mode), (Some(0o444), Some(0o400)));
    assert_eq!(t.validate, ["/usr/sbin/nginx", "-t", "-q"]);
    assert_eq!(t.reload, ["systemctl", "reload", "nginx"]);
    assert_eq!(t.command_timeout, Duration::from_secs(90));
    assert_eq!(t.backup_retention, 10);
    assert_eq!(t.paths().count(), 3);
    assert_eq!(config.targets_for_drop("shared").count(), 1);
    assert_eq!(config.targets_for_drop("web").count(), 0);
}

#[test]
fn verify_defaults() {
    let env = Env::new();
    let config = env.ok(&web_verify("endpoint = \"localhost:8443\""));
    assert_eq!(
        config.targets[0].verify,
        Some(VerifyConfig {
            endpoints: vec![VerifyEndpoint {
                address: "localhost:8443".into(),
                server_name: None,
                protocol: VerifyProtocol::Tls,
            }],
            consecutive: 3,
            settle: Duration::from_secs(1),
            attempts: 3,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(16),
            timeout: Duration::from_secs(10),
            interval: None,
            require_chain_match: false,
            ca_file: None,
        })
    );
    // An empty [target.verify] table is the same as none.
    assert_eq!(env.ok(&web_verify("")).targets[0].verify, None);
    // A backoff above the default cap raises the cap.
    let config = env.ok(&web_verify(
        "endpoint = \"127.0.0.1:25\"\nprotocol = \"smtp-starttls\"\nbackoff = \"30s\"",
    ));
    let verify = config.targets[0].verify.clone().expect("verify");
    assert_eq!(
        (verify.backoff, verify.max_backoff),
        (Duration::from_secs(30), Duration::from_secs(30))
    );
    assert_eq!(verify.first().protocol, VerifyProtocol::SmtpStarttls);
}

#[test]
fn verify_endpoints_strings_tables_ipv6_and_their_own_names_and_protocols() {
    let env = Env::new();
    let config = env.ok(&web_verify(
        "endpoints = [\"127.0.0.1:443\", \"[::1]:443\", \
         { address = \"127.0.0.1:8443\", server_name = \"b.example.com\" }, \
         { address = \"[::1]:25\", protocol = \"smtp-starttls\" }]\n\
         server_name = \"a.example.com\"\nconsecutive = 5\nsettle = \"2s\"",
    ));
    let v = config.targets[0].verify.clone().expect("verify");
    let got: Vec<(&str, Option<&str>, VerifyProtocol)> = v
        .endpoints
        .iter()
        .map(|e| (e.address.as_str(), e.server_name.as_deref(), e.protocol))
        .collect();
    assert_eq!(
        got,
        [
            ("127.0.0.1:443", Some("a.example.com"), VerifyProtocol::Tls),
            ("[::1]:443", Some("a.example.com"), VerifyProtocol::Tls),
            ("127.0.0.1:8443", Some("b.example.com"), VerifyProtocol::Tls),
            (
                "[::1]:25",
                Some("a.example.com"),
                VerifyProtocol::SmtpStarttls
            ),
        ]
    );
    assert_eq!(v.server_names(), ["a.example.com", "b.example.com"]);
    assert_eq!((v.consecutive, v.settle), (5, Duration::from_secs(2)));
    // One address under two names is two endpoints.
    let config = env.ok(&web_verify(
        "endpoints = [{ address = \"127.0.0.1:443\", server_name = \"a.test\" }, \
         { address = \"127.0.0.1:443\", server_name = \"b.test\" }]",
    ));
    assert_eq!(
        config.targets[0].verify.as_ref().unwrap().endpoints.len(),
        2
    );
    // consecutive = 1: no span, whatever the default settle.
    let config = env.ok(&web_verify("endpoint = \"[::1]:443\"\nconsecutive = 1"));
    let v = config.targets[0].verify.clone().unwrap();
    assert_eq!((v.consecutive, v.settle), (1, Duration::ZERO));
    let config = env.ok(&web_verify(
        "endpoint = \"[::1]:443\"\nconsecutive = 1\nsettle = \"0s\"",
    ));
    assert_eq!(config.targets[0].verify.as_ref().unwrap().consecutive, 1);
}

#[test]
fn relative_paths_resolve_against_the_config_directory() {
    let env = Env::new();
    fs::create_dir(env.dir().join("conf")).expect("mkdir conf");
    let text = "[agent]\nstate_dir = \"../state\"\ndrop_dir = \"./drop\"\n\
                [[target]]\nname = \"web\"\nkind = \"file\"\ncert_path = \"../tls/web.crt\"\n\
                key_path = \"{dir}/tls/web.key\"\nreload = [\"./bin/reload\", \"--now\"]\n\
                [target.verify]\nendpoint = \"127.0.0.1:443\"\nca_file = \"../ca.pem\"\n";
    let path = env.dir().join("conf/./agent.toml");
    let config = parse_with(&env.subst(text), &path, &FakeHost::debian()).expect("valid");
    let conf = env.dir().join("conf");
    assert_eq!(config.path, conf.join("agent.toml"));
    // `..` is kept: resolving it lexically could name another file when a directory is a symlink.
    assert_eq!(config.agent.state_dir, conf.join("../state"));
    assert_eq!(config.agent.drop_dir, conf.join("drop"));
    let t = &config.targets[0];
    assert_eq!(t.cert_path, conf.join("../tls/web.crt"));
    assert_eq!(t.key_path, env.dir().join("tls/web.key"));
    // A program with a '/' is a path; a bare name is looked up in PATH at run time.
    assert_eq!(
        t.reload,
        [
            conf.join("bin/reload").display().to_string(),
            "--now".into()
        ]
    );
    assert_eq!(
        t.verify.as_ref().and_then(|v| v.ca_file.clone()),
        Some(conf.join("../ca.pem"))
    );
    assert!(
        config
            .targets
            .iter()
            .flat_map(Target::paths)
            .all(Path::is_absolute)
    );
}

#[test]
fn relative_config_path_is_made_absolute() {
    let config =
        parse_with("", Path::new("some/dir/agent.toml"), &FakeHost::debian()).expect("valid");
    assert!(config.path.is_absolute());
    assert!(config.path.ends_with("some/dir/agent.toml"));
}

#[test]
fn symlinked_directories_do_not_hide_duplicate_files() {
    let env = Env::new();
    std::os::unix::fs::symlink(env.dir().join("tls"), env.dir().join("alias")).expect("symlink");
    let text = format!(
        "{}{}",
        web(""),
        web("")
            .replace("\"web\"", "\"api\"")
            .replace("tls/web.crt", "alias/web.crt")
    );
    let err = env
        .parse(&text)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("target \"api\" (target[1]).cert_path"),
        "{err}"
    );
}

#[test]
fn string_modes_accept_three_or_four_digits() {
    let env = Env::new();
    let config = env.ok(&web("cert_mode = \"640\"\nkey_mode = \"0\""));
    assert_eq!(
        (config.targets[0].cert_mode, config.targets[0].key_mode),
        (Some(0o640), Some(0))
    );
}

/// `absolute()` as the module applies it to the config path.
fn absolute_clean(path: &Path) -> PathBuf {
    std::path::absolute(path)
        .expect("absolute")
        .components()
        .collect()
}
