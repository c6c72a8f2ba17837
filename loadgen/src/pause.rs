//! Gray failure: members that stall without dying. A thread SIGSTOPs a set of
//! processes and all their descendants at the start of every period of a duty
//! cycle and SIGCONTs them `pause_ms` later, until the `Pauser` is dropped,
//! which leaves them running.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;

use crate::cluster::{az_of, CLUSTER_NODES};
use crate::procs;

/// How a paused member stalls: stopped for `pause_ms` at the start of every `pause_every_ms`.
#[derive(clap::Args, Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct DutyCycle {
    /// Gray failure: how long each pause lasts (SIGSTOP to SIGCONT), ms.
    #[arg(long, default_value_t = 50)]
    pub pause_ms: u64,
    /// Gray failure: a pause starts this often, ms.
    #[arg(long, default_value_t = 250)]
    pub pause_every_ms: u64,
}

impl DutyCycle {
    pub fn check(&self) -> Result<()> {
        if self.pause_ms == 0 || self.pause_ms >= self.pause_every_ms {
            bail!("--pause-ms must be positive and less than --pause-every-ms (got {} and {})", self.pause_ms, self.pause_every_ms);
        }
        Ok(())
    }

    /// "50 ms paused in every 250 ms".
    pub fn describe(&self) -> String {
        format!("{} ms paused in every {} ms", self.pause_ms, self.pause_every_ms)
    }
}

/// Gray failure of an embedded cluster: storage nodes paused on a duty cycle for the whole load.
#[derive(clap::Args, Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct GrayFailure {
    /// Gray failure: storage nodes of the embedded cluster to pause on the duty cycle of --pause-ms and
    /// --pause-every-ms (SIGSTOP, then SIGCONT) for the whole load, each in an AZ of its own (at most 3); 0: none.
    #[arg(long, default_value_t = 0)]
    pub pause_nodes: usize,
    #[command(flatten)]
    #[serde(flatten)]
    pub duty: DutyCycle,
}

impl GrayFailure {
    /// A valid duty cycle, and no more paused nodes than the embedded cluster has AZs.
    pub fn check(&self) -> Result<()> {
        self.duty.check()?;
        one_per_az(&(1..=CLUSTER_NODES).collect::<Vec<_>>(), self.pause_nodes).map(drop)
    }
}

/// Pauses its targets on a duty cycle from `start` until dropped.
pub struct Pauser {
    /// Set (and notified) to stop.
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

fn signal(pids: &[i32], sig: libc::c_int) {
    for &pid in pids {
        // SAFETY: kill(2) of one process (pid > 0), listed as a member of a tree just before.
        unsafe { libc::kill(pid, sig) };
    }
}

impl Pauser {
    /// Pauses `roots` and their descendants, listed afresh at each pause (parents first, so none forks
    /// an unpaused child meanwhile; a stopped process cannot exit, so the same list is resumed). The roots
    /// must be loadgen's unreaped children, whose pids cannot have been reused, for as long as this runs.
    pub fn start(roots: Vec<i32>, duty: DutyCycle) -> Self {
        assert!(duty.check().is_ok(), "{duty:?}");
        assert!(roots.iter().all(|&pid| pid > 0), "kill(2) of {roots:?} would signal more than the members");
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let (flag, wake) = &*stopped;
            // Sleeps until `until` unless stopped first; true once stopped.
            let wait = |until: Instant| {
                let mut done = flag.lock().expect("pauser flag");
                while !*done {
                    let Some(left) = until.checked_duration_since(Instant::now()) else { break };
                    done = wake.wait_timeout(done, left).expect("pauser flag").0;
                }
                *done
            };
            let mut period = Instant::now();
            loop {
                let members = procs::tree_pids(&roots);
                signal(&members, libc::SIGSTOP);
                let stopped = wait(period + Duration::from_millis(duty.pause_ms));
                signal(&members, libc::SIGCONT);
                period += Duration::from_millis(duty.pause_every_ms);
                if stopped || wait(period) {
                    return;
                }
            }
        });
        Pauser { stop, thread: Some(thread) }
    }
}

impl Drop for Pauser {
    fn drop(&mut self) {
        let (flag, wake) = &*self.stop;
        *flag.lock().expect("pauser flag") = true;
        wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Storage nodes to pause: `count` of them, each in an availability zone of its own (the first node
/// of each AZ, in node order). Fails if the nodes span fewer AZs.
pub fn one_per_az(node_ids: &[u32], count: usize) -> Result<Vec<u32>> {
    let mut azs = Vec::new();
    let mut chosen = Vec::new();
    for &id in node_ids {
        if chosen.len() < count && !azs.contains(&az_of(id)) {
            azs.push(az_of(id));
            chosen.push(id);
        }
    }
    if chosen.len() < count {
        bail!("cannot pause {count} storage nodes in distinct AZs: the cluster's nodes are in {} AZs", azs.len());
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_of_distinct_azs() {
        let nodes = [1, 2, 3, 4, 5, 6];
        assert_eq!(one_per_az(&nodes, 0).unwrap(), Vec::<u32>::new());
        assert_eq!(one_per_az(&nodes, 2).unwrap(), vec![1, 3]);
        assert_eq!(one_per_az(&nodes, 3).unwrap(), vec![1, 3, 5]);
        assert!(one_per_az(&nodes, 4).unwrap_err().to_string().contains("in 3 AZs"));
    }

    #[test]
    fn duty_cycle_bounds() {
        let duty = DutyCycle { pause_ms: 50, pause_every_ms: 250 };
        assert!(duty.check().is_ok());
        assert!(DutyCycle { pause_ms: 0, pause_every_ms: 250 }.check().is_err());
        assert!(DutyCycle { pause_ms: 250, pause_every_ms: 250 }.check().is_err());
        assert!(GrayFailure { pause_nodes: 3, duty }.check().is_ok());
        assert!(GrayFailure { pause_nodes: 4, duty }.check().is_err(), "the embedded cluster has 3 AZs");
    }

    /// The state letter of /proc/PID/stat.
    fn state(pid: i32) -> char {
        crate::cluster::proc_stat_fields(&pid.to_string()).expect("child alive")[0].chars().next().unwrap()
    }

    fn wait_for(pid: i32, want: impl Fn(char) -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !want(state(pid)) {
            assert!(Instant::now() < deadline, "child never {what} (state {})", state(pid));
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn pauses_and_resumes_a_process_tree_then_leaves_it_running() {
        // A shell whose child sleeps: both are paused. The shell's pid is the root.
        let mut child = std::process::Command::new("sh").args(["-c", "sleep 60; true"]).spawn().unwrap();
        let root = child.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(10);
        let sleeper = loop {
            if let Some(&pid) = procs::tree_pids(&[root]).get(1) {
                break pid;
            }
            assert!(Instant::now() < deadline, "the shell did not start its child");
            std::thread::sleep(Duration::from_millis(1));
        };
        let pauser = Pauser::start(vec![root], DutyCycle { pause_ms: 100, pause_every_ms: 200 });
        // Stopped, then running again, then stopped in the next period.
        for pid in [root, sleeper] {
            wait_for(pid, |s| s == 'T', "stopped");
            wait_for(pid, |s| s != 'T', "resumed");
            wait_for(pid, |s| s == 'T', "stopped again");
        }
        drop(pauser);
        for pid in [root, sleeper] {
            wait_for(pid, |s| s != 'T', "resumed when the pauser was dropped");
        }
        // SAFETY: the sleeper is our child's child, alive (just seen running).
        unsafe { libc::kill(sleeper, libc::SIGKILL) };
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
