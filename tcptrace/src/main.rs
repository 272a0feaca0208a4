//! The `tcptrace` binary: parses flags, sets up logging on stderr, runs the chosen mode,
//! and turns any error into one clear sentence and a non-zero exit.

use clap::Parser;
use tcptrace::cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp(None)
        .format_target(false)
        .init();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tcptrace: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = match cli.command {
        None => rt.block_on(tcptrace::live::trace(cli.trace)),
        Some(Command::Trace(args)) => rt.block_on(tcptrace::live::trace(args)),
        Some(Command::Analyze(args)) => tcptrace::analyze::analyze(args),
        Some(Command::Demo(args)) => rt.block_on(tcptrace::demo::demo(args)),
        Some(Command::LeakyServer { bind }) => {
            tcptrace::leaky::serve(&bind).map_err(|e| anyhow::anyhow!("leaky server: {e}"))
        }
    };
    if let Err(e) = result {
        // One sentence (with its causes), never a backtrace.
        eprintln!("tcptrace: {e:#}");
        std::process::exit(1);
    }
}
