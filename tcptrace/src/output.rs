//! The `--output` file: buffered, rotated by size at line boundaries, reopened on SIGHUP
//! (so logrotate's move-then-HUP works), kept out of the page cache once written out
//! (`DropBehind`), and never fatal: a full disk or an unwritable path is reported once on
//! stderr and counted, and tracing goes on to the other outputs.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// SIGHUPs received so far: every output file that has not seen the latest one reopens at
/// its next line boundary. A count, not a flag one file would clear: each file reopens,
/// and none takes the request from another.
static HUPS: AtomicU64 = AtomicU64::new(0);

/// Asks every output file to reopen at its next line boundary (SIGHUP, for logrotate).
pub fn request_reopen() {
    HUPS.fetch_add(1, Ordering::Relaxed);
}
/// Write errors on the output file since start (exported as a metric).
pub static WRITE_ERRORS: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Copy, Debug, Default)]
pub struct Rotation {
    /// Rotate once the file reaches this many bytes (0: never).
    pub max_bytes: u64,
    /// Rotated files kept: FILE.1 (newest) … FILE.N.
    pub keep: u32,
}

/// What an output file failed to take: counted as it happens, read at the end (from
/// another thread, for live tracing's writer thread).
#[derive(Debug, Default)]
pub struct Lost {
    /// Failed writes, flushes and (re)opens.
    pub failures: AtomicU64,
    /// Output dropped: lines (newlines in it) and bytes.
    pub lines: AtomicU64,
    pub bytes: AtomicU64,
}

impl Lost {
    fn dropped(&self, data: &[u8]) {
        if !data.is_empty() {
            let lines = memchr::memchr_iter(b'\n', data).count() as u64;
            self.lines.fetch_add(lines, Ordering::Relaxed);
            self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
    }

    /// One sentence if output to `path` was lost (a scripted run must not look fine).
    pub fn check(&self, path: &Path) -> anyhow::Result<()> {
        let bytes = self.bytes.load(Ordering::Relaxed);
        if bytes == 0 {
            return Ok(());
        }
        anyhow::bail!(
            "{} lines of output ({bytes} bytes) could not be written to {} ({} write errors, the first reported above)",
            self.lines.load(Ordering::Relaxed),
            path.display(),
            self.failures.load(Ordering::Relaxed)
        )
    }
}

/// What goes on after a write error, as the message says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Live tracing: the other outputs go on, and this file resumes when it can.
    Tracing,
    /// A replay's `-o`: the replay goes on, and fails at the end.
    Replay,
}

pub struct OutputFile {
    path: PathBuf,
    purpose: Purpose,
    lost: Arc<Lost>,
    file: Option<BufWriter<File>>,
    rotation: Rotation,
    size: u64,
    at_line_start: bool,
    /// Whether the current failure was already reported (one message per failure spell).
    failing: bool,
    /// Bytes were buffered since the last flush: only a flush that writes them proves the
    /// file works again.
    pending: bool,
    /// The line every file this starts begins with (CSV's header row), if any.
    header: Option<Vec<u8>>,
    /// The current file was started empty and has no header yet.
    needs_header: bool,
    /// The SIGHUPs this file has reopened for (see `HUPS`).
    hups_seen: u64,
    /// Page-cache drop-behind for the current file, if it is one that has its own disk
    /// pages (not a device, a pipe or tmpfs).
    drop_behind: Option<DropBehind>,
}

/// How far the log grows between two drop-behind steps.
const DROP_WINDOW: u64 = 8 << 20;

/// Keeps a growing log from filling the page cache: every `DROP_WINDOW` bytes, starts the
/// write-out of the window just written (asynchronously) and drops from the cache what was
/// written out before it. A log of a busy host grows by ~100 MB/s in NDJSON; left to the
/// page cache it evicts what the host's applications cached, and each new page costs an
/// allocation (on this project's VM, the daemon's write of a transition took more CPU than
/// all of its own work on it). The last window or two stay cached, for `tail -f`.
#[derive(Debug)]
struct DropBehind {
    /// Offset up to which write-out was started.
    started: u64,
    /// Offset up to which the cache was dropped.
    dropped: u64,
    /// Where the file ended when opened: what came before is not this run's to drop.
    floor: u64,
    /// Bytes written since the last step.
    unstepped: u64,
}

impl DropBehind {
    /// For `file`, opened at `size`, if its pages are a cache of a disk's (what came
    /// before `size` is someone else's to keep cached or not).
    fn for_file(file: &File, is_file: bool, size: u64) -> Option<DropBehind> {
        // tmpfs pages are the file itself: dropping them would push it to swap.
        if !is_file || on_tmpfs(file) != Some(false) {
            return None;
        }
        Some(DropBehind::from(size))
    }

    /// Nothing stepped yet, in a file that ends at `size`.
    fn from(size: u64) -> DropBehind {
        DropBehind {
            started: size,
            dropped: size,
            floor: size,
            unstepped: 0,
        }
    }

    /// After `n` more bytes went to `file`.
    #[inline]
    fn after_write(&mut self, file: &File, n: usize) {
        self.unstepped += n as u64;
        if self.unstepped >= DROP_WINDOW {
            self.step(file);
        }
    }

    #[cold]
    fn step(&mut self, file: &File) {
        self.unstepped = 0;
        let fd = file.as_raw_fd();
        // Where the kernel has the file up to: appending, the position is its end after our
        // last write, whoever else appends or truncates it.
        // SAFETY: a plain syscall on a valid open fd.
        let end = unsafe { libc::lseek(fd, 0, libc::SEEK_CUR) };
        let Ok(end) = u64::try_from(end) else {
            return;
        };
        if end < self.started {
            // Truncated under us (logrotate's `copytruncate`): all that is there is ours.
            *self = DropBehind::from(0);
        }
        // The window before this one has had its write-out started a window ago; the one
        // before that is covered again for pages that were still being written then.
        let drop_to = self.started;
        let drop_from = self.dropped.saturating_sub(DROP_WINDOW).max(self.floor);
        // Advice only: a failure leaves the pages to the kernel's own reclaim.
        // SAFETY: plain syscalls on a valid open fd.
        unsafe {
            libc::sync_file_range(
                fd,
                self.started as libc::off64_t,
                (end - self.started) as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
            if drop_to > drop_from {
                libc::posix_fadvise(
                    fd,
                    drop_from as libc::off_t,
                    (drop_to - drop_from) as libc::off_t,
                    libc::POSIX_FADV_DONTNEED,
                );
            }
        }
        self.dropped = drop_to;
        self.started = end;
    }
}

/// Whether `file` is on tmpfs; None if its filesystem cannot be told.
fn on_tmpfs(file: &File) -> Option<bool> {
    let mut fs = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: a valid open fd, and a buffer the size of `statfs`.
    if unsafe { libc::fstatfs(file.as_raw_fd(), fs.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: fstatfs filled it, as it returned 0.
    Some(unsafe { fs.assume_init() }.f_type == libc::TMPFS_MAGIC)
}

/// An output path, opened for appending.
struct Opened {
    file: BufWriter<File>,
    size: u64,
    /// A file this run starts: empty, and a regular file (a device or a pipe reopened
    /// after an error is the same stream going on).
    starts_new: bool,
    drop_behind: Option<DropBehind>,
}

fn open(path: &Path) -> io::Result<Opened> {
    let f = OpenOptions::new().create(true).append(true).open(path)?;
    let m = f.metadata()?;
    let size = m.len();
    Ok(Opened {
        drop_behind: DropBehind::for_file(&f, m.is_file(), size),
        file: BufWriter::with_capacity(1 << 16, f),
        size,
        starts_new: size == 0 && m.is_file(),
    })
}

impl OutputFile {
    /// Opens (appending) or creates `path`. Failing to open it at start is an error: the
    /// user asked for a file that cannot be written, and nothing was captured yet.
    pub fn create(path: &Path) -> anyhow::Result<OutputFile> {
        Self::with_rotation(path, Rotation::default())
    }

    pub fn with_rotation(path: &Path, rotation: Rotation) -> anyhow::Result<OutputFile> {
        let Opened {
            file,
            size,
            drop_behind,
            ..
        } = open(path)
            .map_err(|e| anyhow::anyhow!("cannot write the output file {}: {e}", path.display()))?;
        Ok(OutputFile {
            path: path.to_path_buf(),
            purpose: Purpose::Tracing,
            lost: Arc::default(),
            file: Some(file),
            rotation,
            size,
            at_line_start: true,
            failing: false,
            pending: false,
            header: None,
            needs_header: size == 0,
            hups_seen: HUPS.load(Ordering::Relaxed),
            drop_behind,
        })
    }

    /// A line to begin every file this starts with (the first, each rotated-to and each
    /// reopened one, when empty): CSV's header row. A file appended to already has one.
    pub fn with_header(mut self, header: Option<Vec<u8>>) -> OutputFile {
        self.header = header;
        self
    }

    /// What to say after a write error (live tracing's message by default).
    pub fn for_purpose(mut self, purpose: Purpose) -> OutputFile {
        self.purpose = purpose;
        self
    }

    /// The count of what this file failed to take, readable once it is dropped (its last
    /// flush included) or from another thread.
    pub fn lost(&self) -> Arc<Lost> {
        Arc::clone(&self.lost)
    }

    fn report(&mut self, what: &str, e: &io::Error) {
        WRITE_ERRORS.fetch_add(1, Ordering::Relaxed);
        self.lost.failures.fetch_add(1, Ordering::Relaxed);
        if !self.failing {
            self.failing = true;
            let goes_on = match self.purpose {
                Purpose::Tracing => {
                    "tracing goes on, and output to this file resumes when it can be written"
                }
                Purpose::Replay => {
                    "the analysis goes on, and what this file could not take is counted"
                }
            };
            log::error!("{what} {} failed ({e}); {goes_on}", self.path.display());
        }
    }

    /// Drops the file after an error, and what it still buffered, unwritten (dropping the
    /// writer would try to write it once more), counted as lost.
    fn discard(&mut self) {
        if let Some(f) = self.file.take() {
            let (_file, unwritten) = f.into_parts();
            if let Ok(buf) = unwritten {
                self.lost.dropped(&buf);
            }
        }
        self.pending = false;
    }

    /// Rotated name `FILE.n`.
    fn rotated(&self, n: u32) -> PathBuf {
        let mut s = self.path.clone().into_os_string();
        s.push(format!(".{n}"));
        PathBuf::from(s)
    }

    /// Flushes and closes the current file; what it could not write is counted as lost.
    fn close(&mut self) -> io::Result<()> {
        if let Some(f) = self.file.as_mut()
            && let Err(e) = f.flush()
        {
            self.discard();
            return Err(e);
        }
        self.file = None;
        if std::mem::take(&mut self.pending) {
            self.failing = false;
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.close()?;
        if self.rotation.keep == 0 {
            std::fs::remove_file(&self.path).or_else(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })?;
        } else {
            for n in (1..self.rotation.keep).rev() {
                let from = self.rotated(n);
                if from.exists() {
                    std::fs::rename(&from, self.rotated(n + 1))?;
                }
            }
            std::fs::rename(&self.path, self.rotated(1))?;
        }
        self.reopen()
    }

    fn reopen(&mut self) -> io::Result<()> {
        if let Err(e) = self.close() {
            self.report("writing to", &e);
        }
        self.open()
    }

    /// Opens the path (again): a file this starts empty gets the header.
    fn open(&mut self) -> io::Result<()> {
        let opened = open(&self.path)?;
        self.file = Some(opened.file);
        self.size = opened.size;
        self.needs_header = opened.starts_new;
        self.drop_behind = opened.drop_behind;
        Ok(())
    }

    /// Housekeeping that may only happen between lines: SIGHUP reopen, rotation, and
    /// retrying a file that failed.
    fn at_boundary(&mut self) {
        // A plain load: this runs once per line.
        let hups = HUPS.load(Ordering::Relaxed);
        if hups != self.hups_seen {
            self.hups_seen = hups;
            if let Err(e) = self.reopen() {
                self.report("reopening", &e);
            }
        }
        if self.rotation.max_bytes > 0
            && self.size >= self.rotation.max_bytes
            && let Err(e) = self.rotate()
        {
            self.report("rotating", &e);
        }
        if self.file.is_none()
            && let Err(e) = self.open()
        {
            self.report("opening", &e);
        }
    }
}

impl OutputFile {
    /// How much of `buf` to write before housekeeping is due again: all of it, unless the
    /// file reaches its rotation size inside it; then up to the end of the line where it
    /// does, so that a write of many lines rotates where one line at a time would have.
    fn piece_len(&self, buf: &[u8]) -> usize {
        let max = self.rotation.max_bytes;
        if max == 0 || self.size + buf.len() as u64 <= max {
            return buf.len();
        }
        let from = max.saturating_sub(self.size).saturating_sub(1) as usize;
        memchr::memchr(b'\n', &buf[from..]).map_or(buf.len(), |p| from + p + 1)
    }

    fn write_piece(&mut self, buf: &[u8]) {
        if self.at_line_start {
            self.at_boundary();
            if self.needs_header
                && self.file.is_some()
                && let Some(header) = self.header.take()
            {
                self.put(&header);
                self.header = Some(header);
            }
            self.needs_header = false;
        }
        self.put(buf);
        if let Some(&last) = buf.last() {
            self.at_line_start = last == b'\n';
        }
    }

    fn put(&mut self, buf: &[u8]) {
        if let Some(f) = self.file.as_mut() {
            match f.write_all(buf) {
                // Buffered only: the failure spell ends at a flush that reaches the file.
                Ok(()) => {
                    self.size += buf.len() as u64;
                    self.pending = true;
                    if let Some(d) = self.drop_behind.as_mut() {
                        d.after_write(f.get_ref(), buf.len());
                    }
                }
                Err(e) => {
                    self.report("writing to", &e);
                    // Drop the buffered remainder; the next line starts clean in a reopened file.
                    // Nothing buffered is left: only a later write that reaches the file ends
                    // the failure spell (else an empty flush of the reopened file would, and
                    // the next failure would be reported again). `buf` counts as lost whole
                    // (a direct write of a large one may have written part of it).
                    self.lost.dropped(buf);
                    self.discard();
                }
            }
        } else {
            self.lost.dropped(buf);
        }
    }
}

impl Write for OutputFile {
    /// One line, part of one, or many: housekeeping (reopen, rotation, retry) happens at
    /// line boundaries only, and a rotation due inside a write of many lines splits it there.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut rest = buf;
        while !rest.is_empty() {
            let (piece, after) = rest.split_at(self.piece_len(rest));
            self.write_piece(piece);
            rest = after;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some(f) = self.file.as_mut() {
            match f.flush() {
                Ok(()) if self.pending => {
                    self.pending = false;
                    self.failing = false;
                }
                Ok(()) => {}
                Err(e) => {
                    self.report("writing to", &e);
                    self.discard();
                }
            }
        }
        if self.at_line_start {
            self.at_boundary();
        }
        Ok(())
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// Whether `--output` names stdout (`-`), in every mode.
pub fn is_stdout(path: &Path) -> bool {
    path.as_os_str() == "-"
}

/// `--output -`: stdout, buffered. Binary records are refused on a terminal.
pub fn stdout_output(binary: bool) -> anyhow::Result<BufWriter<io::Stdout>> {
    if binary && io::IsTerminal::is_terminal(&io::stdout()) {
        anyhow::bail!(
            "--format binary writes binary records, not text: send --output - to a file or a pipe (e.g. | tcptrace analyze -)"
        );
    }
    Ok(BufWriter::with_capacity(1 << 16, io::stdout()))
}

/// Parses sizes such as `100M`, `1.5G`, `64KiB`, `4096`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 100M, 1G)"))?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use K, M or G)")),
    };
    if n < 0.0 {
        return Err(format!("{s:?} is negative"));
    }
    Ok((n * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file kept with two rotations: `.2`, `.1`, then the current one.
    fn oldest_first(p: &Path) -> [PathBuf; 3] {
        [
            p.with_extension("ndjson.2"),
            p.with_extension("ndjson.1"),
            p.to_path_buf(),
        ]
    }

    fn page_size() -> usize {
        // SAFETY: sysconf has no preconditions.
        unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
    }

    /// Pages in a `DROP_WINDOW`: what a window wholly in the page cache counts.
    fn pages_per_window() -> usize {
        DROP_WINDOW as usize / page_size()
    }

    /// Pages of `path` in the page cache, per `DROP_WINDOW` of the file.
    fn cached_pages_per_window(path: &Path) -> Vec<usize> {
        let f = File::open(path).unwrap();
        let len = f.metadata().unwrap().len() as usize;
        // SAFETY: a read-only shared mapping of an open file, unmapped below; mincore only
        // reports residency and faults nothing in.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            let mut vec = vec![0u8; len.div_ceil(page_size())];
            assert_eq!(libc::mincore(p, len, vec.as_mut_ptr()), 0);
            libc::munmap(p, len);
            vec.chunks(pages_per_window())
                .map(|w| w.iter().filter(|b| **b & 1 != 0).count())
                .collect()
        }
    }

    /// A file on a disk's filesystem: the page cache is what drop-behind works on (the
    /// system's temporary directory may be tmpfs, where it rightly does nothing).
    fn on_disk(name: &str) -> PathBuf {
        let d = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/test-scratch")
            .join(format!("{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d.join("out.ndjson")
    }

    /// A log written for long leaves the page cache behind it: what was written out is
    /// dropped, window by window, and the last windows stay (for `tail -f`).
    #[test]
    fn a_growing_log_leaves_the_page_cache_behind_it_and_keeps_its_tail() {
        let path = on_disk("drop-behind");
        let mut f = OutputFile::create(&path).unwrap();
        assert!(
            f.drop_behind.is_some(),
            "{} is on a disk's filesystem: drop-behind applies",
            path.display()
        );
        let line = [[b'x'; 1023].as_slice(), b"\n"].concat();
        let sync = File::open(&path).unwrap();
        for _ in 0..5 {
            for _ in 0..DROP_WINDOW / 1024 {
                f.write_all(&line).unwrap();
            }
            // Written out before the next window's step drops it (the step only starts the
            // write-out, and pages still being written stay cached).
            f.flush().unwrap();
            sync.sync_data().unwrap();
        }
        f.flush().unwrap();
        let cached = cached_pages_per_window(&path);
        assert_eq!(cached.len(), 5, "{cached:?}");
        let full = pages_per_window();
        assert_eq!(
            &cached[..3],
            &[0, 0, 0],
            "written-out windows dropped: {cached:?}"
        );
        assert_eq!(cached[4], full, "the last window stays cached: {cached:?}");
        drop(f);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    /// Appending to a log keeps what was there before cached, and tmpfs is left alone:
    /// there the pages are the file (dropping them would push it to swap).
    #[test]
    fn drop_behind_leaves_what_it_did_not_write_and_tmpfs_alone() {
        let path = on_disk("drop-behind-append");
        std::fs::write(&path, vec![b'y'; DROP_WINDOW as usize]).unwrap();
        File::open(&path).unwrap().sync_data().unwrap();
        let mut f = OutputFile::create(&path).unwrap();
        let chunk = vec![b'z'; DROP_WINDOW as usize];
        for _ in 0..3 {
            f.write_all(&chunk).unwrap();
            f.flush().unwrap();
            File::open(&path).unwrap().sync_data().unwrap();
        }
        let full = pages_per_window();
        let cached = cached_pages_per_window(&path);
        assert_eq!(
            cached[0], full,
            "the earlier content stays cached: {cached:?}"
        );
        assert_eq!(
            cached[1], 0,
            "this run's written-out window is dropped: {cached:?}"
        );
        drop(f);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();

        let shm = Path::new("/dev/shm");
        assert_eq!(
            on_tmpfs(&File::open(shm).unwrap()),
            Some(true),
            "this test expects /dev/shm to be tmpfs, as on any Linux"
        );
        let p = shm.join(format!("tcptrace-drop-behind-{}", std::process::id()));
        let f = OutputFile::create(&p).unwrap();
        assert!(f.drop_behind.is_none(), "no drop-behind on tmpfs");
        drop(f);
        std::fs::remove_file(&p).unwrap();
    }

    /// A log truncated under tcptrace (logrotate's `copytruncate`) is still left behind
    /// by the page cache as it grows again, from its start.
    #[test]
    fn a_log_truncated_under_it_is_still_dropped_behind() {
        let path = on_disk("drop-behind-truncated");
        // Appended to: what was there is not tcptrace's to drop, until the truncation.
        std::fs::write(&path, vec![b'y'; DROP_WINDOW as usize]).unwrap();
        let mut f = OutputFile::create(&path).unwrap();
        let chunk = vec![b'z'; DROP_WINDOW as usize];
        let sync = File::open(&path).unwrap();
        for _ in 0..3 {
            f.write_all(&chunk).unwrap();
            f.flush().unwrap();
            sync.sync_data().unwrap();
        }
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        for _ in 0..4 {
            f.write_all(&chunk).unwrap();
            f.flush().unwrap();
            sync.sync_data().unwrap();
        }
        let full = pages_per_window();
        let cached = cached_pages_per_window(&path);
        assert_eq!(cached.len(), 4, "{cached:?}");
        assert_eq!(
            &cached[..2],
            &[0, 0],
            "written-out windows dropped: {cached:?}"
        );
        assert_eq!(cached[3], full, "the last window stays cached: {cached:?}");
        drop(f);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tcptrace-out-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d.join("out.ndjson")
    }

    /// On a full disk the failure spell lasts until something reaches the file: an empty
    /// flush of the reopened file must not end it (that reported the error twice).
    #[test]
    fn a_full_disk_is_one_failure_spell_however_writes_and_flushes_interleave() {
        let mut f = OutputFile::create(Path::new("/dev/full")).unwrap();
        let big = vec![b'x'; 100 << 10];
        f.write_all(b"a line\n").unwrap();
        f.write_all(&big).unwrap(); // does not fit the buffer: reaches the device, fails
        assert!(f.failing);
        f.write_all(b"\n").unwrap();
        f.flush().unwrap(); // reopens the file at the line boundary
        f.flush().unwrap(); // nothing buffered in the reopened file
        assert!(f.failing, "nothing reached the file, the spell goes on");
        f.write_all(b"another line\n").unwrap();
        f.flush().unwrap(); // fails again: still the same spell
        assert!(f.failing);
    }

    /// What a full disk took is counted, line by line, and fails the run at its end (live
    /// tracing goes on past write errors, but must not then exit as if all was well).
    #[test]
    fn what_a_full_disk_drops_is_counted_and_fails_the_run() {
        let path = Path::new("/dev/full");
        let f = OutputFile::create(path).unwrap();
        let lost = f.lost();
        let mut f = f;
        for i in 0..3000 {
            writeln!(f, "line {i:04} of the capture").unwrap();
        }
        f.flush().unwrap();
        drop(f);
        assert_eq!(lost.lines.load(Ordering::Relaxed), 3000);
        assert_eq!(lost.bytes.load(Ordering::Relaxed), 3000 * 25);
        let err = lost.check(path).expect_err("output was lost").to_string();
        assert!(
            err.starts_with("3000 lines of output (75000 bytes) could not be written to /dev/full"),
            "{err}"
        );

        let p = tmp("nothing-lost");
        let f = OutputFile::create(&p).unwrap();
        let lost = f.lost();
        let mut f = f;
        writeln!(f, "fine").unwrap();
        drop(f);
        assert!(lost.check(&p).is_ok());
    }

    #[test]
    fn rotates_at_line_boundaries_and_keeps_n_files() {
        let p = tmp("rotate");
        let mut f = OutputFile::with_rotation(
            &p,
            Rotation {
                max_bytes: 100,
                keep: 2,
            },
        )
        .unwrap();
        for i in 0..30 {
            // Written in two pieces: rotation must never split a line.
            write!(f, "{{\"n\":{i},").unwrap();
            writeln!(f, "\"pad\":\"xxxxxxxxxxxxxxxx\"}}").unwrap();
        }
        f.flush().unwrap();
        drop(f);
        let mut all = Vec::new();
        for path in oldest_first(&p) {
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(
                text.len() <= 100 + 40,
                "{} is {} bytes",
                path.display(),
                text.len()
            );
            for line in text.lines() {
                let v: serde_json::Value = serde_json::from_str(line).expect("whole lines only");
                all.push(v["n"].as_u64().unwrap());
            }
        }
        assert!(
            !p.with_extension("ndjson.3").exists(),
            "only 2 rotated files are kept"
        );
        // The newest lines survive, in order.
        assert_eq!(all.last(), Some(&29));
        assert!(all.windows(2).all(|w| w[1] == w[0] + 1), "{all:?}");
    }

    /// The output thread hands over many lines in one write: rotation still falls on the
    /// line where the size is reached, as with one line at a time.
    #[test]
    fn a_write_of_many_lines_rotates_where_one_line_at_a_time_would() {
        let lines: Vec<String> = (0..30)
            .map(|i| format!("{{\"n\":{i},\"pad\":\"xxxxxxxxxxxxxxxx\"}}\n"))
            .collect();
        let files = |name: &str, whole: bool| -> Vec<String> {
            let p = tmp(name);
            let rotation = Rotation {
                max_bytes: 100,
                keep: 2,
            };
            let mut f = OutputFile::with_rotation(&p, rotation).unwrap();
            if whole {
                f.write_all(lines.concat().as_bytes()).unwrap();
            } else {
                for l in &lines {
                    f.write_all(l.as_bytes()).unwrap();
                }
            }
            drop(f);
            oldest_first(&p)
                .iter()
                .map(|path| std::fs::read_to_string(path).unwrap())
                .collect()
        };
        let one_write = files("rotate-chunk", true);
        assert_eq!(one_write, files("rotate-lines", false));
        assert!(
            one_write
                .iter()
                .all(|t| t.len() <= 100 + 40 && t.ends_with('\n'))
        );
    }

    /// CSV's header: every file tcptrace starts (the first, each rotation, a reopened new
    /// file) begins with exactly one; a file appended to gets none mid-file.
    #[test]
    fn every_file_started_begins_with_the_header_and_an_appended_one_gets_none() {
        let header = b"type,n\n".to_vec();
        let p = tmp("header-rotate");
        let rotation = Rotation {
            max_bytes: 100,
            keep: 2,
        };
        let mut f = OutputFile::with_rotation(&p, rotation)
            .unwrap()
            .with_header(Some(header.clone()));
        for i in 0..30 {
            write!(f, "row,").unwrap();
            writeln!(f, "{i:020}").unwrap();
        }
        drop(f);
        for path in oldest_first(&p) {
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(
                text.starts_with("type,n\nrow,"),
                "{}: {text:?}",
                path.display()
            );
            assert_eq!(text.matches("type,n").count(), 1, "{text:?}");
        }

        // A reopened file (SIGHUP after logrotate moved it) is a new file: a header.
        let p = tmp("header-reopen");
        let mut f = OutputFile::create(&p)
            .unwrap()
            .with_header(Some(header.clone()));
        writeln!(f, "row,1").unwrap();
        f.flush().unwrap();
        let moved = p.with_extension("moved");
        std::fs::rename(&p, &moved).unwrap();
        f.reopen().unwrap();
        writeln!(f, "row,2").unwrap();
        drop(f);
        assert_eq!(std::fs::read_to_string(&moved).unwrap(), "type,n\nrow,1\n");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "type,n\nrow,2\n");

        // Appending to a file that has rows: no second header.
        let p = tmp("header-append");
        std::fs::write(&p, "type,n\nrow,0\n").unwrap();
        let mut f = OutputFile::create(&p).unwrap().with_header(Some(header));
        writeln!(f, "row,1").unwrap();
        drop(f);
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "type,n\nrow,0\nrow,1\n"
        );
    }

    #[test]
    fn sighup_reopens_so_a_moved_file_is_replaced() {
        let p = tmp("hup");
        let mut f = OutputFile::create(&p).unwrap();
        writeln!(f, "first").unwrap();
        f.flush().unwrap();
        let moved = p.with_extension("moved");
        std::fs::rename(&p, &moved).unwrap();
        writeln!(f, "second").unwrap(); // still the moved file: no HUP yet
        request_reopen();
        writeln!(f, "third").unwrap();
        f.flush().unwrap();
        assert_eq!(std::fs::read_to_string(&moved).unwrap(), "first\nsecond\n");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "third\n");
    }

    #[test]
    fn an_unwritable_file_is_an_error_at_start_and_sizes_parse() {
        let err = OutputFile::create(Path::new("/nonexistent-dir/out.ndjson"))
            .err()
            .expect("no such directory");
        assert!(
            err.to_string()
                .starts_with("cannot write the output file /nonexistent-dir/out.ndjson"),
            "{err}"
        );
        assert_eq!(parse_size("100M"), Ok(100 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("10T").is_err());
    }
}
