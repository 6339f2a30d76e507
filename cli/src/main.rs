//! `fulcrum`: the operator's command line for fulcrum.
//!
//! Thin over the libraries the control plane runs: a policy is validated by the very parser
//! and checks the control plane applies (`fulcrum_policy::PolicyFormat`, `fulcrum_core`), and
//! the served state is read from the control plane's HTTP API (`--server`) and admin API
//! (`--admin`, bearer token). One module per command group, as `kubectl` and `linkerd` group
//! theirs; output is a readable table by default and JSON with `-o json`.
//!
//! Exit codes, for scripts and CI: 0 success; 1 a negative answer (a policy is invalid, the
//! policies differ); 2 the command could not do its job (usage, a file, the network, the
//! control plane refused).

mod client;
mod endpoints;
mod output;
mod policy;
mod proxies;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::{client::Endpoints, output::Format};

/// fulcrum's command line: check and manage the balancing policy of a fulcrum control plane.
#[derive(Debug, Parser)]
#[command(
    name = "fulcrum",
    version,
    after_help = "Exit codes: 0 success, 1 a negative answer (invalid policy, policies differ), \
                  2 the command could not do its job (usage, file, network, refused)."
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
struct Global {
    #[command(flatten)]
    endpoints: Endpoints,
    /// Output format: a readable table, or JSON for scripts.
    #[arg(short, long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate, diff, list and roll back the balancing policy.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// List the proxies whose filters poll the control plane (`--server`), the snapshot
    /// version each runs and whether it is current, behind or stale.
    Proxies(proxies::ProxiesCommand),
    /// Show what one proxy's filter believes about each endpoint of a service: health,
    /// breaker state and why, time until re-admission, latency, in flight, share of picks.
    Endpoints(endpoints::EndpointsCommand),
}

/// What a command concluded, when it could do its job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Valid, identical, done: exit code 0.
    Yes,
    /// Invalid, different: exit code 1.
    No,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Policy(command) => command.run(&cli.global.endpoints, cli.global.output),
        Command::Proxies(command) => command.run(&cli.global.endpoints, cli.global.output),
        Command::Endpoints(command) => command.run(&cli.global.endpoints, cli.global.output),
    };
    match outcome {
        Ok(Verdict::Yes) => ExitCode::SUCCESS,
        Ok(Verdict::No) => ExitCode::from(1),
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
