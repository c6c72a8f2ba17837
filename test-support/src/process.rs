//! The daemons as child processes: where their binaries are, free loopback ports, and
//! `Proc`, one running daemon with its log file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Start-up, recovery included, and a graceful stop.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Any single reply from a live server.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// A daemon's binary (`storaged`, `writerd`, `replicad`), from the directory cargo builds the
/// binaries of the test's profile into: the parent of the test's own `deps` directory (e.g.
/// target/release-checked/). `cargo test -p X` builds only X's binaries there; the others
/// come from building the workspace with the same profile first.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe.parent().and_then(Path::parent).expect("a test binary in target/PROFILE/deps/");
    let path = dir.join(name);
    if !path.exists() {
        let build = match dir.file_name().and_then(|d| d.to_str()) {
            Some("debug") => "cargo build --workspace".to_string(),
            Some("release") => "cargo build --release --workspace".to_string(),
            Some(profile) => format!("cargo build --profile {profile} --workspace"),
            None => "cargo build --workspace".to_string(),
        };
        panic!("no {} (build the workspace first: {build})", path.display());
    }
    path
}

pub fn free_port() -> u16 {
    borealis_net::free_port().expect("probe free loopback port")
}

/// A loopback TCP address free a moment ago (for `--metrics-listen`).
pub fn free_tcp_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// The daemons' log filter: `BOREALIS_TEST_LOG` (or `STORAGED_TEST_LOG`) when debugging a test, else `info`.
pub fn log_filter() -> String {
    std::env::var("BOREALIS_TEST_LOG").or_else(|_| std::env::var("STORAGED_TEST_LOG")).unwrap_or_else(|_| "info".into())
}

/// How a start-up ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Started {
    Ready,
    /// The daemon exited because another process took a port probed free (between the probe and its bind).
    PortTaken,
}

/// A child process logging to a file (its stderr), SIGKILLed on drop unless it was stopped.
pub struct Proc {
    pub child: Option<Child>,
    pub log: PathBuf,
    /// Lines of the log printed when the test panics with the process alive (none: 0).
    pub tail_on_panic: usize,
}

impl Proc {
    /// Runs `bin args`, stderr to `log`.
    pub fn spawn(bin: &Path, args: &[String], log: PathBuf) -> Proc {
        let mut cmd = Command::new(bin);
        cmd.args(args);
        Proc::spawn_command(cmd, log)
    }

    /// Runs `cmd` (e.g. a daemon under `prlimit`) as a daemon is run: the test log filter, no stdin or
    /// stdout, stderr to `log`.
    pub fn spawn_command(mut cmd: Command, log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).expect("create log");
        let child = cmd
            .env("RUST_LOG", log_filter())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
        Proc { child: Some(child), log, tail_on_panic: 0 }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log's last `lines` lines.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let tail: Vec<&str> = text.lines().rev().take(lines).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("process is running").id() as i32
    }

    /// Running (not exited, or exited and not reaped yet by `try_wait`).
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Waits until the log contains `needle`; panics if the process exits first.
    pub async fn wait_log(&mut self, needle: &str, timeout: Duration) {
        self.wait_log_more(needle, 0, timeout).await
    }

    /// Waits until the log contains `needle` more than `seen` times.
    pub async fn wait_log_more(&mut self, needle: &str, seen: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.log_text().matches(needle).count() <= seen {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().expect("poll child")) {
                panic!("{} exited ({status}) before logging {needle:?}; log:\n{}", self.log.display(), self.log_text());
            }
            assert!(Instant::now() < deadline, "no {needle:?} in {} within {timeout:?}; log:\n{}", self.log.display(), self.log_text());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the log contains `ready`, as `wait_log`, except that a process that exited
    /// because a port it was given is taken (its bind failed) is `PortTaken`, for the caller to
    /// try other ports.
    pub async fn wait_started(&mut self, ready: &str, timeout: Duration) -> Started {
        let deadline = Instant::now() + timeout;
        while !self.log_text().contains(ready) {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().expect("poll child")) {
                self.child = None;
                let log = self.log_text();
                if log.contains("bind UDP") || log.contains("bind metrics on") {
                    return Started::PortTaken;
                }
                panic!("{} exited during start-up ({status}); log:\n{log}", self.log.display());
            }
            assert!(Instant::now() < deadline, "no {ready:?} in {} within {timeout:?}; log:\n{}", self.log.display(), self.log_text());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Started::Ready
    }

    /// Sends `sig` (e.g. SIGSTOP/SIGCONT) to the running process.
    pub fn signal(&self, sig: i32) {
        let c = self.child.as_ref().expect("process is running");
        // SAFETY: signalling a child we own and have not reaped.
        unsafe { libc::kill(c.id() as i32, sig) };
    }

    /// SIGKILL (no flush, no goodbye) and reap; the exit status, if it was running.
    pub fn kill9(&mut self) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        let _ = c.kill();
        c.wait().ok()
    }

    /// SIGTERM, then waits for the exit status.
    pub async fn stop(&mut self) -> ExitStatus {
        let c = self.child.take().expect("process is running");
        // SAFETY: signalling a child we own and have not reaped.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        self.wait_exit_of(c).await
    }

    /// SIGTERM, then waits (blocking the thread) up to `timeout` for the exit status; past it,
    /// SIGKILL and a panic.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let mut c = self.child.take().expect("process is running");
        // SAFETY: signalling a child we own and have not reaped.
        let rc = unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0, "SIGTERM {}", self.log.display());
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = c.try_wait().expect("poll child") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("{} did not exit within {timeout:?} of SIGTERM; log:\n{}", self.log.display(), self.log_text());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the process to exit on its own.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.as_mut().expect("process is running").try_wait().expect("poll child") {
                self.child = None;
                return s;
            }
            assert!(Instant::now() < deadline, "{} still running after {timeout:?}; log:\n{}", self.log.display(), self.log_text());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn wait_exit_of(&mut self, mut c: Child) -> ExitStatus {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(s) = c.try_wait().expect("poll child") {
                return s;
            }
            assert!(Instant::now() < deadline, "{} did not stop; log:\n{}", self.log.display(), self.log_text());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
        if self.tail_on_panic > 0 && std::thread::panicking() {
            let tail = self.log_tail(self.tail_on_panic);
            eprintln!("---- {} (last {} lines) ----\n{tail}", self.log.display(), tail.lines().count());
        }
    }
}
