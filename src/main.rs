use std::process::ExitCode;

// jemalloc returns pages freed after a burst (issuance, a re-list) to the system within seconds.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use apitoken_operator::cli::{Cli, Command};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd { reference: true } => {
            print!("{}", apitoken_operator::api::field_reference());
            ExitCode::SUCCESS
        }
        Command::Crd { reference: false } => match apitoken_operator::api::crds_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: rendering the CRDs failed: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Version => {
            println!("apitoken-operator {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Run(args) => apitoken_operator::run::main(*args),
    }
}
