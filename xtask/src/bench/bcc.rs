//! bcc's tcpstates as the reference tracer: install it, and give it kernel headers. This
//! kernel ships none, so Debian's linux-headers-amd64 (a common tree plus an amd64 tree) is
//! merged into one folder under target/ and handed over through BCC_KERNEL_SOURCE.
//! Idempotent: a second run only checks two paths and a stamp file.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const TOOL: &str = "/usr/sbin/tcpstates-bpfcc";
const PACKAGES: &[&str] = &["bpfcc-tools", "linux-headers-amd64"];
const STAMP: &str = ".merged-from";

#[derive(Clone, Debug)]
pub struct Bcc {
    pub tool: PathBuf,
    pub kernel_source: PathBuf,
}

/// Everything bcc needs, or one sentence saying why it can't be had.
pub fn prepare(target_dir: &Path) -> Result<Bcc, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("loading BPF programs needs root".to_owned());
    }
    if !Path::new(TOOL).exists() || header_trees().is_none() {
        eprintln!("bench: apt-get install {} (once)", PACKAGES.join(" "));
        let out = Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(PACKAGES)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("could not run apt-get: {e}"))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let last = err
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            return Err(format!(
                "apt-get install {} failed: {last}",
                PACKAGES.join(" ")
            ));
        }
    }
    if !Path::new(TOOL).exists() {
        return Err(format!("{TOOL} is missing after installing bpfcc-tools"));
    }
    let (common, arch, version) =
        header_trees().ok_or("no /usr/src/linux-headers-*-common and -amd64 pair found")?;
    let merged = target_dir.join("bcc-headers").join(&version);
    merge(&common, &arch, &merged)?;
    Ok(Bcc {
        tool: PathBuf::from(TOOL),
        kernel_source: merged,
    })
}

/// The newest (common, amd64, version) header pair in /usr/src.
fn header_trees() -> Option<(PathBuf, PathBuf, String)> {
    let mut versions: Vec<String> = std::fs::read_dir("/usr/src")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| {
            Some(
                n.strip_prefix("linux-headers-")?
                    .strip_suffix("-amd64")?
                    .to_owned(),
            )
        })
        .filter(|v| Path::new(&format!("/usr/src/linux-headers-{v}-common")).is_dir())
        .collect();
    versions.sort_by_key(|v| natural_key(v));
    let v = versions.pop()?;
    Some((
        PathBuf::from(format!("/usr/src/linux-headers-{v}-common")),
        PathBuf::from(format!("/usr/src/linux-headers-{v}-amd64")),
        v,
    ))
}

/// "6.1.0-56" sorts after "6.1.0-9".
fn natural_key(v: &str) -> Vec<u64> {
    v.split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// Hard links (same filesystem, so no copy): the common tree, then the amd64 tree over it.
fn merge(common: &Path, arch: &Path, merged: &Path) -> Result<(), String> {
    let stamp = format!("{}\n{}\n", common.display(), arch.display());
    if std::fs::read_to_string(merged.join(STAMP)).is_ok_and(|s| s == stamp) {
        return Ok(());
    }
    eprintln!(
        "bench: merging {} and {} into {}",
        common.display(),
        arch.display(),
        merged.display()
    );
    let partial = merged.with_extension("partial");
    for dir in [&partial, merged] {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| format!("remove {}: {e}", dir.display()))?;
        }
    }
    std::fs::create_dir_all(&partial).map_err(|e| format!("create {}: {e}", partial.display()))?;
    let copy = |from: &Path, extra: &[&str]| -> Result<(), String> {
        let out = Command::new("cp")
            .arg("-al")
            .args(extra)
            .arg(from.join("."))
            .arg(&partial)
            .output()
            .map_err(|e| format!("could not run cp: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "merging kernel headers failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    copy(common, &[])?;
    copy(arch, &["--remove-destination"])?;
    std::fs::write(partial.join(STAMP), stamp).map_err(|e| format!("write stamp: {e}"))?;
    std::fs::rename(&partial, merged).map_err(|e| format!("rename {}: {e}", partial.display()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn versions_sort_numerically() {
        let mut v = vec!["6.1.0-56", "6.1.0-9", "6.1.0-100"];
        v.sort_by_key(|s| super::natural_key(s));
        assert_eq!(v, ["6.1.0-9", "6.1.0-56", "6.1.0-100"]);
    }
}
