//! Supervision of PostgreSQL's processes: postmasters loadgen starts (each in a process group
//! of its own, as the `postgres` user when loadgen is root, dying with loadgen) and stops
//! (immediate shutdown, then SIGKILL to whatever is left under it), the tools it runs to
//! completion, and the dynamic shared memory segments a killed server leaves behind.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cluster::proc_stat_fields;
use crate::procs;

const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The uid and gid to run PostgreSQL as: `postgres` when loadgen is root, else loadgen's own (None).
pub(super) fn server_user() -> Result<Option<(u32, u32)>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = CString::new("postgres").expect("no NUL");
    // SAFETY: getpwnam with a valid C string; the fields are read at once, before any other getpw* call.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        bail!(
            "loadgen runs as root and PostgreSQL refuses to: there is no `postgres` user to run it as (install postgresql-15, or run loadgen as another user)"
        );
    }
    // SAFETY: pw is non-null and points to getpwnam's static record.
    Ok(Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) }))
}

/// SIGKILLs a process and every process under it when dropped, unless disarmed (`None`) first.
struct KillTreeOnDrop(Option<i32>);

impl Drop for KillTreeOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            for member in procs::tree_pids(&[pid]) {
                // SAFETY: our unreaped child (armed only until it is reaped) and the processes under it, listed just now.
                unsafe { libc::kill(member, libc::SIGKILL) };
            }
        }
    }
}

/// A PostgreSQL tool run to completion, as the server user, in `dir`. Cancelled (Ctrl-C, an error elsewhere),
/// it is killed with every process it started (pg_basebackup streams WAL from a child process).
pub(super) async fn run_tool(bin: &Path, tool: &str, user: Option<(u32, u32)>, dir: &Path, args: &[&std::ffi::OsStr]) -> Result<()> {
    let path = bin.join(tool);
    let mut cmd = tokio::process::Command::new(&path);
    cmd.args(args).current_dir(dir).env("HOME", dir).kill_on_drop(true).stdin(Stdio::null());
    for var in ["PGHOST", "PGPORT", "PGDATA", "PGUSER", "PGDATABASE", "PGOPTIONS", "PGSERVICE"] {
        cmd.env_remove(var);
    }
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid);
    }
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().with_context(|| format!("run {}", path.display()))?;
    let mut running = KillTreeOnDrop(child.id().map(|pid| pid as i32));
    let out = child.wait_with_output().await;
    // Reaped: its pid may be reused from now on.
    running.0 = None;
    let out = out.with_context(|| format!("run {}", path.display()))?;
    if !out.status.success() {
        bail!("{tool} failed ({}): {}{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A postmaster loadgen started, in a process group of its own (its children each make their own).
pub struct Postmaster {
    pub name: String,
    pub port: u16,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Child,
    /// Reaped: the group id may be reused, so nothing is signalled any more.
    reaped: bool,
    /// The dynamic shared memory segments the server had mapped when it was killed: a killed
    /// server cannot remove them, and they would hold RAM in /dev/shm until a reboot.
    orphans: BTreeSet<PathBuf>,
    /// The processes SIGKILLed: `stop` waits until none runs.
    killed: Vec<i32>,
}

impl Postmaster {
    pub(super) fn spawn(bin: &Path, name: &str, data_dir: &Path, log: PathBuf, user: Option<(u32, u32)>, settings: &[(String, String)]) -> Result<Self> {
        let port = settings.iter().rev().find(|(k, _)| k == "port").and_then(|(_, v)| v.parse().ok()).context("a port setting")?;
        let log_file = std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut cmd = std::process::Command::new(bin.join("postgres"));
        cmd.arg("-D").arg(data_dir);
        for (k, v) in settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        for var in ["PGHOST", "PGPORT", "PGDATA", "PGUSER", "PGDATABASE", "PGOPTIONS"] {
            cmd.env_remove(var);
        }
        cmd.current_dir(data_dir).process_group(0).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log_file);
        if let Some((uid, gid)) = user {
            cmd.uid(uid).gid(gid);
        }
        // SAFETY: runs in the forked child before exec (after the uid change, which would clear it) and only calls prctl.
        unsafe {
            cmd.pre_exec(|| {
                // Dies with loadgen even when no destructor runs; its backends follow (PostgreSQL's postmaster-death signal).
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("start {name} ({})", bin.join("postgres").display()))?;
        Ok(Postmaster {
            name: name.to_string(),
            port,
            data_dir: data_dir.to_path_buf(),
            log,
            child,
            reaped: false,
            orphans: BTreeSet::new(),
            killed: Vec::new(),
        })
    }

    /// The postmaster's pid, which is its process group's id.
    pub fn pgid(&self) -> i32 {
        self.child.id() as i32
    }

    pub(super) fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Fails if the postmaster has exited (it should be serving).
    pub(super) fn check_running(&self) -> Result<()> {
        if !is_running(self.pgid()) {
            bail!("{} exited during start-up; {}:\n{}", self.name, self.log.display(), self.log_tail());
        }
        Ok(())
    }

    /// SIGKILL to the whole server at once (postmaster and every process under it, as a crash of its
    /// machine): returns when sent.
    pub fn kill(&mut self) -> Instant {
        if self.reaped {
            return Instant::now();
        }
        let members = self.members();
        self.orphans = with_listed_segments(mapped_shm_segments(&members));
        let at = Instant::now();
        self.sigkill(members);
        at
    }

    /// The postmaster and every process under it, parents first (PostgreSQL gives each child a process
    /// group of its own, so the postmaster's group is not the server). Listed while the postmaster is
    /// unreaped, so none of their pids can have been reused.
    fn members(&self) -> Vec<i32> {
        procs::tree_pids(&[self.pgid()])
    }

    /// SIGKILL to `members` (the postmaster first, so it forks no new child); `stop` waits for them.
    fn sigkill(&mut self, members: Vec<i32>) {
        for &pid in &members {
            // SAFETY: processes of the server, listed just now by `members`.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        self.killed.extend(members);
    }

    /// Immediate shutdown (SIGQUIT: the postmaster stops its backends and exits), SIGKILL to every process
    /// of the server after a timeout or if any is left; waits until none runs.
    pub fn stop(&mut self) -> Result<()> {
        if self.reaped {
            return Ok(());
        }
        let pid = self.pgid();
        if is_running(pid) {
            // SAFETY: signalling our own unreaped child.
            unsafe { libc::kill(pid, libc::SIGQUIT) };
            let deadline = Instant::now() + STOP_TIMEOUT;
            while is_running(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        // Whatever is left: the postmaster and its processes if it did not stop.
        let left = self.members();
        self.sigkill(left);
        let _ = self.child.wait();
        self.reaped = true;
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            let left: Vec<i32> = self.killed.iter().copied().filter(|&pid| is_running(pid)).collect();
            if left.is_empty() {
                for segment in std::mem::take(&mut self.orphans) {
                    let _ = std::fs::remove_file(segment);
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{}: processes {left:?} still run after SIGKILL", self.name);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Postmaster {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(error = %format!("{e:#}"), "stopping PostgreSQL");
        }
    }
}

/// Whether process `pid` exists and is not a zombie (state, field 3 of /proc/PID/stat, is not Z).
fn is_running(pid: i32) -> bool {
    proc_stat_fields(&pid.to_string()).is_some_and(|f| !f.first().is_some_and(|state| state.starts_with('Z')))
}

/// Where PostgreSQL's dynamic shared memory segments live, with the default
/// `dynamic_shared_memory_type = posix`: this prefix, then the segment's handle.
pub const SHM_SEGMENT_PREFIX: &str = "/dev/shm/PostgreSQL.";

/// PostgreSQL's dynamic shared memory segments that processes `pids` have mapped.
pub fn mapped_shm_segments(pids: &[i32]) -> BTreeSet<PathBuf> {
    let mapped = |maps: String| -> Vec<PathBuf> {
        maps.lines().filter_map(|line| line.split_whitespace().nth(5).filter(|p| p.starts_with(SHM_SEGMENT_PREFIX)).map(PathBuf::from)).collect()
    };
    pids.iter().filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()).flat_map(mapped).collect()
}

/// `segments` with every segment that a control segment among them lists as in use: what
/// PostgreSQL's next start would remove (`dsm_cleanup_using_control_segment`), since a segment
/// can outlive its last mapping (pinned). The layout is `dsm_control_header` of PostgreSQL 15's
/// dsm.c on a 64-bit machine: magic, nitems, maxitems, then 40-byte items of handle, refcnt,
/// first_page, npages, a pointer and `pinned`; anything without the magic is left alone.
fn with_listed_segments(mut segments: BTreeSet<PathBuf>) -> BTreeSet<PathBuf> {
    const MAGIC: u32 = 0x9a50_3d32;
    const ITEMS_AT: usize = 16;
    const ITEM_BYTES: usize = 40;
    let u32_at = |b: &[u8], at: usize| b.get(at..at + 4).map(|w| u32::from_ne_bytes(w.try_into().expect("4 bytes")));
    let mut listed = Vec::new();
    for control in segments.iter().filter_map(|path| std::fs::read(path).ok()).filter(|b| u32_at(b, 0) == Some(MAGIC)) {
        let nitems = u32_at(&control, 4).unwrap_or(0) as usize;
        for item in (0..nitems).map(|i| ITEMS_AT + i * ITEM_BYTES) {
            let (Some(handle), Some(refcnt)) = (u32_at(&control, item), u32_at(&control, item + 4)) else { break };
            // Refcount 0: a free slot. Odd handles live in the main shared memory area, not in /dev/shm.
            if refcnt > 0 && handle.is_multiple_of(2) {
                listed.push(PathBuf::from(format!("{SHM_SEGMENT_PREFIX}{handle}")));
            }
        }
    }
    segments.extend(listed);
    segments
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_running() {
        assert!(is_running(std::process::id() as i32));
        assert!(!is_running(0), "no process 0 in /proc");
    }
}
