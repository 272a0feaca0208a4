//! `cargo xtask`: what cargo alone can't do. Sets up the eBPF toolchain, then runs the
//! tracer, the tests or the benchmark, so that a fresh machine needs one command each.

mod bench;
mod setup;

use std::process::Command;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "tcptrace developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install whatever the eBPF build needs (idempotent).
    Setup,
    /// Set up, build, and run the tracer; arguments after `--` go to tcptrace.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, lint (as `lint`), then run every test, kernel tests included (needs root).
    /// This is what CI runs.
    Test {
        /// Extra arguments passed to `cargo test` after `--` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// rustfmt --check and clippy -D warnings on every crate, the eBPF one included.
    Lint,
    /// Measure tracing overhead on a loopback churn load: untraced, tcptrace, bcc tcpstates.
    Bench(bench::BenchArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => setup::ensure_toolchain(true),
        Task::Run { args } => {
            let bin = build_tracer()?;
            let status = Command::new(&bin).args(&args).status()?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Task::Test { args } => {
            setup::ensure_toolchain(false)?;
            if !setup::is_root() {
                bail!("the kernel tests load eBPF programs: run `cargo xtask test` as root");
            }
            lint()?;
            // Default members: the eBPF crate only builds for the bpf target (build.rs does that).
            let mut test = vec!["test", "--release"];
            if !args.is_empty() {
                test.push("--");
                test.extend(args.iter().map(String::as_str));
            }
            cargo(&test)
        }
        Task::Lint => {
            setup::ensure_toolchain(false)?;
            lint()
        }
        Task::Bench(args) => bench::run(args, &workspace_root()),
    }
}

fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// rustfmt --check, clippy -D warnings on the userspace crates, and the eBPF crate's own
/// clippy pass for its target.
fn lint() -> Result<()> {
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&[
        "clippy",
        "--release",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    ebpf_clippy()
}

/// Sets up the toolchain and builds the release `tcptrace` binary; returns its path.
pub(crate) fn build_tracer() -> Result<std::path::PathBuf> {
    setup::ensure_toolchain(false)?;
    cargo(&[
        "build",
        "--release",
        "--package",
        "tcptrace",
        "--bin",
        "tcptrace",
    ])?;
    Ok(workspace_root().join("target/release/tcptrace"))
}

fn cargo(args: &[&str]) -> Result<()> {
    setup::run(
        Command::new(env!("CARGO"))
            .args(args)
            .current_dir(workspace_root()),
    )
}

/// The eBPF crate is linted for its real target, with the nightly toolchain that builds it.
fn ebpf_clippy() -> Result<()> {
    setup::run(
        Command::new("rustup")
            .args([
                "run",
                "nightly",
                "cargo",
                "clippy",
                "--package",
                "tcptrace-ebpf",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ])
            .current_dir(workspace_root()),
    )
}

#[cfg(test)]
mod tests {
    use super::workspace_root;

    /// The README's quick start names the test command (the `sh` block's line that says it
    /// is what CI runs); `.ci/run` must carry that very line, comment included, so that
    /// what users run is what CI runs. Its other lines may only set up the environment.
    #[test]
    fn ci_runs_the_readme_test_command() {
        let root = workspace_root();
        let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
        let quick_start = readme
            .split("## Quick start")
            .nth(1)
            .and_then(|s| s.split("```sh").nth(1))
            .and_then(|s| s.split("```").next())
            .expect("a quick start with an sh block");
        let readme_test: Vec<&str> = quick_start
            .lines()
            .filter(|l| l.contains("what CI runs"))
            .map(str::trim)
            .collect();
        assert_eq!(readme_test.len(), 1, "{quick_start}");
        let command = readme_test[0].split('#').next().map(str::trim);
        assert_eq!(command, Some("cargo xtask test"), "{quick_start}");
        let ci = std::fs::read_to_string(root.join(".ci/run")).expect(".ci/run");
        let commands: Vec<&str> = ci
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter(|l| !["set ", "cd ", "export "].iter().any(|p| l.starts_with(p)))
            .collect();
        assert_eq!(commands, readme_test, ".ci/run:\n{ci}");
    }
}
