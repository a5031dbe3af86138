//! `certctl rollback`: ask the agent to put the previous certificate set
//! back, and stream its stages like a deploy.

use certctl_proto::agent::v1 as pb;

use crate::cli::{Cli, RollbackArgs};
use crate::client::{self, CliError};
use crate::deploy::follow;

pub async fn run(cli: &Cli, args: &RollbackArgs) -> Result<u8, CliError> {
    let mut client = client::connect(&cli.socket).await?;
    let stream = client
        .rollback(pb::RollbackRequest {
            target: args.target.clone(),
            no_verify: args.no_verify,
            no_wait: args.no_wait,
        })
        .await?
        .into_inner();
    follow(cli, "rollback", &args.target, stream).await
}
