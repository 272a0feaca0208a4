//! The owner's cgroup, by the id the kernel records (`bpf_get_current_cgroup_id`: the
//! inode number of the cgroup's directory in the cgroup v2 hierarchy), turned into its path
//! and the container id that path shows (docker, containerd, CRI-O, podman), and the
//! `--cgroup`/`--container` filters on them.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::engine::IdMap;
use crate::event::Transition;

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified`
/// on hybrid systems), from /proc/self/mountinfo, read once.
pub fn cgroup2_root() -> Option<PathBuf> {
    static ROOT: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        text.lines().find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            if post.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            pre.split_whitespace().nth(4).map(PathBuf::from)
        })
    })
    .clone()
}

/// The container id in a cgroup path: the last 64-hex-digit run in it, as runtimes name
/// their scopes (`docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope`,
/// `libpod-<id>.scope`, `/docker/<id>`, `/kubepods/…/<id>`).
pub fn container_id(path: &str) -> Option<&str> {
    let b = path.as_bytes();
    let mut end = b.len();
    while end >= 64 {
        let mut start = end;
        while start > 0 && b[start - 1].is_ascii_hexdigit() && !b[start - 1].is_ascii_uppercase() {
            start -= 1;
        }
        if end - start == 64 {
            return Some(&path[start..end]);
        }
        end = if start == end { end - 1 } else { start };
    }
    None
}

/// cgroup id → path (relative to the v2 root, e.g. `/system.slice/docker-….scope`), from a
/// walk of the hierarchy, redone at most once a second when an id is not found.
pub struct CgroupIndex {
    root: Option<PathBuf>,
    paths: HashMap<u64, String>,
    last_scan: Option<Instant>,
}

impl CgroupIndex {
    pub fn new() -> CgroupIndex {
        CgroupIndex {
            root: cgroup2_root(),
            paths: HashMap::new(),
            last_scan: None,
        }
    }

    /// The path of cgroup `id`; None if unknown (not a cgroup v2 id, or removed).
    pub fn path(&mut self, id: u64) -> Option<&str> {
        if id == 0 {
            return None;
        }
        if !self.paths.contains_key(&id)
            && self
                .last_scan
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            self.rescan();
        }
        self.paths.get(&id).map(String::as_str)
    }

    fn rescan(&mut self) {
        self.last_scan = Some(Instant::now());
        let Some(root) = self.root.clone() else {
            return;
        };
        self.paths.clear();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            let rel = dir.strip_prefix(&root).unwrap_or(Path::new(""));
            self.paths
                .insert(meta.ino(), format!("/{}", rel.to_string_lossy()));
            if let Ok(rd) = std::fs::read_dir(&dir) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(e.path());
                    }
                }
            }
        }
    }
}

impl Default for CgroupIndex {
    fn default() -> Self {
        CgroupIndex::new()
    }
}

/// The cgroup id of process `pid`'s cgroup v2 (`0::/path` in /proc/PID/cgroup).
pub fn cgroup_id_of_pid(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let root = cgroup2_root()?;
    let dir = root.join(rel.trim_start_matches('/'));
    std::fs::metadata(dir).ok().map(|m| m.ino())
}

/// `--cgroup` / `--container`: kept when the owner's cgroup is the given one or below it,
/// or shows a container id starting with the given one. Connections whose owner is
/// unknown are not kept (as with `--pid`).
#[derive(Debug, Clone, Default)]
pub struct CgroupFilter {
    /// A path relative to the v2 root, starting with `/`.
    pub under: Option<String>,
    pub container: Option<String>,
}

impl CgroupFilter {
    /// From the flags: `cgroup` is a path below the v2 root or an absolute path into it.
    pub fn new(cgroup: Option<&str>, container: Option<&str>) -> Result<CgroupFilter, String> {
        let under = match cgroup {
            None => None,
            Some(c) => {
                let root = cgroup2_root().ok_or_else(|| {
                    "--cgroup needs the cgroup v2 hierarchy, and none is mounted".to_string()
                })?;
                let abs = if Path::new(c).starts_with(&root) {
                    PathBuf::from(c)
                } else {
                    root.join(c.trim_start_matches('/'))
                };
                if !abs.is_dir() {
                    return Err(format!(
                        "--cgroup {c:?}: no such cgroup (looked for {})",
                        abs.display()
                    ));
                }
                let rel = abs.strip_prefix(&root).unwrap_or(Path::new(""));
                Some(format!("/{}", rel.to_string_lossy()))
            }
        };
        let container = match container {
            None => None,
            Some(id) => {
                let id = id.to_ascii_lowercase();
                if id.len() < 4 || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(format!(
                        "--container {id:?}: a container id is 4 to 64 hex digits (as `docker ps` or `crictl ps` show it)"
                    ));
                }
                Some(id)
            }
        };
        Ok(CgroupFilter { under, container })
    }

    pub fn is_active(&self) -> bool {
        self.under.is_some() || self.container.is_some()
    }

    /// Whether the connection of `t` is kept, resolving its owner's cgroup in `index`.
    pub fn keeps(&self, t: &Transition, index: &mut CgroupIndex) -> bool {
        if !self.is_active() {
            return true;
        }
        let Some(path) = index.path(t.meta.cgroup_id) else {
            return false;
        };
        if let Some(under) = &self.under
            && !(path == under
                || path.starts_with(under.as_str())
                    && (under == "/" || path.as_bytes().get(under.len()) == Some(&b'/')))
        {
            return false;
        }
        if let Some(want) = &self.container
            && !container_id(path).is_some_and(|id| id.starts_with(want.as_str()))
        {
            return false;
        }
        true
    }
}

/// Stamps each event with its owner's container and applies the cgroup filters, with the
/// cgroup id → container lookups cached.
#[derive(Default)]
pub struct Annotator {
    index: CgroupIndex,
    containers: IdMap<[u8; 12]>,
    filter: CgroupFilter,
}

impl Annotator {
    pub fn new(filter: CgroupFilter) -> Annotator {
        Annotator {
            filter,
            ..Annotator::default()
        }
    }

    /// Fills `t.meta.container`; false when the cgroup filters drop the event.
    pub fn annotate(&mut self, t: &mut Transition) -> bool {
        let id = t.meta.cgroup_id;
        if id > 1 {
            let c = match self.containers.get(&id) {
                Some(c) => *c,
                None => {
                    let mut c = [0u8; 12];
                    if let Some(full) = self.index.path(id).and_then(container_id) {
                        c.copy_from_slice(&full.as_bytes()[..12]);
                    }
                    if self.containers.len() > 100_000 {
                        self.containers.clear();
                    }
                    self.containers.insert(id, c);
                    c
                }
            };
            t.meta.container = c;
        }
        self.filter.keeps(t, &mut self.index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_from_runtime_cgroup_paths() {
        let id = "4f9d3c2b1a0e9f8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e4d";
        for p in [
            format!("/system.slice/docker-{id}.scope"),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-{id}.scope"
            ),
            format!("/docker/{id}"),
            format!("/machine.slice/libpod-{id}.scope/container"),
        ] {
            assert_eq!(container_id(&p), Some(id), "{p}");
        }
        assert_eq!(container_id("/system.slice/sshd.service"), None);
        assert_eq!(container_id(&format!("/x/{}", &id[..63])), None);
        assert_eq!(container_id("/"), None);
    }

    #[test]
    fn bad_filters_are_one_sentence() {
        let e = CgroupFilter::new(None, Some("xyz")).unwrap_err();
        assert!(e.starts_with("--container \"xyz\""), "{e}");
        if cgroup2_root().is_some() {
            let e = CgroupFilter::new(Some("/no/such/cgroup"), None).unwrap_err();
            assert!(
                e.starts_with("--cgroup \"/no/such/cgroup\": no such cgroup"),
                "{e}"
            );
            let own = cgroup_id_of_pid(std::process::id()).expect("own cgroup");
            let mut idx = CgroupIndex::new();
            assert!(idx.path(own).is_some_and(|p| p.starts_with('/')));
        }
    }
}
