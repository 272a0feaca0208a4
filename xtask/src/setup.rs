//! Installs the eBPF build chain that works on this project's machines, idempotently:
//! the nightly toolchain's rust-src, LLVM 22 development packages and bpf-linker 0.13.0.
//! A ready machine is detected with cheap queries (no network, no compile), so a second
//! run costs well under a second.

use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

/// The versions that work together here: rustc 1.97 nightly ships LLVM 22, and bpf-linker
/// must link the same LLVM major version. Newer aya releases need rustc 1.98.
const NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    // `ip netns` for the kernel tests that build their own network namespaces.
    "iproute2",
];

pub fn ensure_toolchain(verbose: bool) -> Result<()> {
    ensure_nightly_rust_src(verbose)?;
    ensure_apt_packages(verbose)?;
    ensure_bpf_linker(verbose)?;
    Ok(())
}

fn ensure_nightly_rust_src(verbose: bool) -> Result<()> {
    let toolchains = output("rustup", &["toolchain", "list"])
        .context("rustup is required to build the eBPF program; install it from your distribution or rustup.rs")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        step(verbose, "installing the nightly toolchain");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
        ]))?;
    }
    let installed = output(
        "rustup",
        &["component", "list", "--toolchain", NIGHTLY, "--installed"],
    )?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        step(verbose, "adding rust-src to the nightly toolchain");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))?;
    } else if verbose {
        eprintln!("setup: nightly rust-src present");
    }
    Ok(())
}

fn missing_apt_packages() -> Vec<&'static str> {
    APT_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| {
            let status = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", pkg])
                .stderr(Stdio::null())
                .output();
            !matches!(status, Ok(o) if String::from_utf8_lossy(&o.stdout).ends_with("install ok installed"))
        })
        .collect()
}

fn ensure_apt_packages(verbose: bool) -> Result<()> {
    let missing = missing_apt_packages();
    if missing.is_empty() {
        if verbose {
            eprintln!("setup: apt packages present ({})", APT_PACKAGES.join(", "));
        }
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing packages {}: run this command as root so it can apt-get install them",
            missing.join(" ")
        );
    }
    step(verbose, &format!("apt-get install {}", missing.join(" ")));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}

fn bpf_linker_version() -> Option<String> {
    let out = Command::new("bpf-linker").arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn ensure_bpf_linker(verbose: bool) -> Result<()> {
    if let Some(v) = bpf_linker_version() {
        if v.split_whitespace().any(|w| w == BPF_LINKER_VERSION) {
            if verbose {
                eprintln!("setup: {v} present");
            }
            return Ok(());
        }
        step(
            verbose,
            &format!("replacing {v} with bpf-linker {BPF_LINKER_VERSION}"),
        );
    } else {
        step(
            verbose,
            &format!(
                "building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (takes a few minutes, once)"
            ),
        );
    }
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", LLVM_PREFIX))?;
    if bpf_linker_version().is_none() {
        bail!("bpf-linker was installed but is not on PATH: add ~/.cargo/bin to PATH");
    }
    Ok(())
}

pub fn is_root() -> bool {
    output("id", &["-u"])
        .map(|s| s.trim() == "0")
        .unwrap_or(false)
}

fn step(_verbose: bool, what: &str) {
    // Always said: installing is slow and the user should know why.
    eprintln!("setup: {what}");
}

fn output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("could not run {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
