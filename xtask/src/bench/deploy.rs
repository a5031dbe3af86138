//! Figures 1 and 2: a deploy by the agent against the floor, and
//! `certctl deploy` as a user runs it against the shell recipe of deploy
//! hooks. Each pair is measured interleaved in one loop, alternating
//! between two certificate sets so that every deploy changes every file,
//! and alternating which side goes first.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use certctl_proto::agent::v1 as pb;

use super::agent::{self, Agent, write_file};
use super::floor::{Floor, FloorFile};
use super::pki::Set;
use super::stats::{Row, Samples, med_p99};

/// The deploy hook recipe: `install -m` the three files beside their
/// destinations, `mv` them into place, `sync`. `$1` holds the input
/// files, `$2` is the destination directory.
const RECIPE: &str = r#"set -e
install -m 0644 "$1/cert.pem" "$2/.cert.pem.new"
install -m 0644 "$1/chain.pem" "$2/.chain.pem.new"
install -m 0600 "$1/key.pem" "$2/.key.pem.new"
mv -f "$2/.cert.pem.new" "$2/cert.pem"
mv -f "$2/.chain.pem.new" "$2/chain.pem"
mv -f "$2/.key.pem.new" "$2/key.pem"
sync
"#;

fn request(target: &str, set: &Set) -> pb::DeployRequest {
    pb::DeployRequest {
        target: target.to_owned(),
        cert_pem: set.cert.as_bytes().to_vec(),
        key_pem: set.key.as_bytes().to_vec(),
        chain_pem: set.chain.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn expect_deployed(r: &pb::DeployResult, what: &str) -> Result<()> {
    if r.outcome != pb::Outcome::Deployed as i32 {
        bail!("{what}: outcome {} ({})", r.outcome, r.error);
    }
    Ok(())
}

/// Figure 1: the Deploy RPC round trip to DONE, timed in this process, vs
/// the floor writing the same three files in `floor_dir`. With `other`
/// (another build of the agent, `--compare-bin`), its deploys are measured
/// in the same loop too. The order of the contenders rotates every
/// iteration.
pub async fn overhead(
    agent: &Agent,
    other: Option<&Agent>,
    target: &str,
    floor_dir: &Path,
    sets: &[Set; 2],
    warmup: usize,
    n: usize,
) -> Result<Vec<Row>> {
    let mut client = agent.client().await?;
    let mut other_client = match other {
        Some(a) => Some(a.client().await?),
        None => None,
    };
    let mut floor = Floor::new(floor_dir)?;
    let (mut rpc, mut bare, mut rpc2) =
        (Samples::default(), Samples::default(), Samples::default());
    let contenders = if other.is_some() { 3 } else { 2 };
    for i in 0..warmup + n {
        let set = &sets[i % 2];
        let files = [
            FloorFile {
                name: "cert.pem",
                mode: 0o644,
                bytes: set.cert.as_bytes(),
            },
            FloorFile {
                name: "chain.pem",
                mode: 0o644,
                bytes: set.chain.as_bytes(),
            },
            FloorFile {
                name: "key.pem",
                mode: 0o600,
                bytes: set.key.as_bytes(),
            },
        ];
        for k in 0..contenders {
            let t = Instant::now();
            let into = match (i + k) % contenders {
                0 => {
                    let r = agent::deploy(&mut client, request(target, set)).await?;
                    expect_deployed(&r, "deploy")?;
                    &mut rpc
                }
                1 => {
                    floor.deploy(&files)?;
                    &mut bare
                }
                _ => {
                    if let Some(c) = other_client.as_mut() {
                        let r = agent::deploy(c, request(target, set)).await?;
                        expect_deployed(&r, "deploy (--compare-bin)")?;
                    }
                    &mut rpc2
                }
            };
            if i >= warmup {
                into.push(t.elapsed());
            }
        }
    }
    let mut compared = Vec::new();
    if other.is_some() {
        compared.push(
            Row::new(
                "1",
                "the same, by the agent given with --compare-bin (same loop)",
            )
            .n(n)
            .measured(med_p99(&rpc2))
            .baseline(format!("floor {}", med_p99(&bare)))
            .ratio(rpc2.median() / bare.median()),
        );
    }
    let ratio = rpc.median() / bare.median();
    let row = Row::new(
        "1",
        "deploy overhead: Deploy RPC to DONE, 3 files, `file` kind, vs the syscall floor",
    )
    .n(n)
    .measured(med_p99(&rpc))
    .baseline(format!("floor {}", med_p99(&bare)))
    .ratio(ratio)
    .goal("≤ 1.50×", ratio <= 1.5);
    // The same set again: everything but the writes (input checks, plan,
    // lock, the RPC itself): the agent's fixed cost.
    let last = &sets[(warmup + n - 1) % 2];
    let mut same = Samples::default();
    for _ in 0..n.min(100) {
        let t = Instant::now();
        let r = agent::deploy(&mut client, request(target, last)).await?;
        same.push(t.elapsed());
        if r.outcome != pb::Outcome::Unchanged as i32 {
            bail!(
                "deploy of the same set: outcome {} ({})",
                r.outcome,
                r.error
            );
        }
    }
    let fixed = Row::new(
        "1",
        "the same set again: Deploy RPC to DONE, `unchanged` (checks, plan, lock; nothing written)",
    )
    .n(same.len())
    .measured(med_p99(&same))
    .baseline(format!("floor {}", med_p99(&bare)))
    .ratio(same.median() / bare.median());
    let mut rows = vec![row];
    rows.extend(compared);
    rows.push(fixed);
    Ok(rows)
}

/// Figure 2: `certctl deploy` (process start to exit) vs `sh -c RECIPE`,
/// each deploying the same files into a directory of its own.
pub fn end_to_end(
    certctl: &Path,
    socket: &Path,
    target: &str,
    inputs: &[&Path; 2],
    recipe_dir: &Path,
    warmup: usize,
    n: usize,
) -> Result<Row> {
    let (mut ctl, mut sh) = (Samples::default(), Samples::default());
    let recipe = recipe_dir.join("recipe.sh");
    write_file(&recipe, RECIPE.as_bytes())?;
    let dest = recipe_dir.join("live");
    std::fs::create_dir_all(&dest)?;
    for i in 0..warmup + n {
        let input = inputs[i % 2];
        #[allow(clippy::disallowed_methods)] // the harness runs the CLI as a user would
        let mut deploy = Command::new(certctl);
        deploy
            .arg("--socket")
            .arg(socket)
            .args(["deploy", target, "--cert"])
            .arg(input.join("cert.pem"))
            .arg("--key")
            .arg(input.join("key.pem"))
            .arg("--chain")
            .arg(input.join("chain.pem"));
        #[allow(clippy::disallowed_methods)] // the shell recipe this is compared with
        let mut hook = Command::new("sh");
        hook.arg(&recipe).arg(input).arg(&dest);
        let hook_first = i % 4 >= 2;
        if hook_first {
            let t = time(&mut hook, "the shell recipe")?;
            if i >= warmup {
                sh.push(t);
            }
        }
        let t = time(&mut deploy, "certctl deploy")?;
        if i >= warmup {
            ctl.push(t);
        }
        if !hook_first {
            let t = time(&mut hook, "the shell recipe")?;
            if i >= warmup {
                sh.push(t);
            }
        }
    }
    let ratio = ctl.median() / sh.median();
    Ok(Row::new(
        "2",
        "end to end: `certctl deploy` process vs `install -m`×3 + `mv`×3 + `sync`",
    )
    .n(n)
    .measured(med_p99(&ctl))
    .baseline(format!("recipe {}", med_p99(&sh)))
    .ratio(ratio)
    .goal("≤ 1.00×", ratio <= 1.0))
}

/// Wall time of one run of `cmd` (spawn to exit); it must succeed.
fn time(cmd: &mut Command, what: &str) -> Result<std::time::Duration> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let t = Instant::now();
    let out = tokio::task::block_in_place(|| cmd.output()).with_context(|| what.to_owned())?;
    let took = t.elapsed();
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(took)
}
