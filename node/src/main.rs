//! `ferry`: parse the command line, run the command, map the outcome to an exit code.

use clap::Parser;
use ferry::cli::{Cli, Command};
use ferry::{DemoOptions, LocalSyncOptions, exit};

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { exit::USAGE } else { exit::OK };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    init_logging(cli.verbose, cli.quiet);
    let result = match cli.command {
        Command::Sync(args) => ferry::run_local_sync(&LocalSyncOptions {
            source: args.source,
            target: args.target,
            state_dir: args.state_dir,
            delete: args.delete,
            numeric_ids: args.numeric_ids,
            json: args.json,
        }),
        Command::Demo(args) => {
            ferry::run_demo(&DemoOptions { files: args.files, rounds: args.rounds, seed: args.seed, keep: args.keep })
                .map(|()| exit::OK)
        }
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ferry: error: {e:#}");
            std::process::exit(exit::ERROR);
        }
    }
}

fn init_logging(verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}
