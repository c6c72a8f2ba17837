//! Process trees from /proc: the processes loadgen started (Borealis' daemons,
//! PostgreSQL's postmasters) and all their descendants (PostgreSQL's backends
//! and auxiliary processes, each in a session and process group of its own,
//! so a process group does not cover a server). Gray failure pauses whole
//! trees, and their CPU time is read the same way for every system under test.
//!
//! A process's /proc/PID/stat holds `utime + stime` of all its threads, live
//! or exited, and `cutime + cstime`: the same of every child it has reaped.
//! The CPU of a tree at an instant is the sum of both over its live members,
//! so a child that exits and is reaped between two readings still counts (in
//! its parent's `cutime`), and the difference of two readings is the CPU the
//! tree used in between. One race remains: a child reaped while /proc is being
//! read may be missed by that reading (a parent is read before its children,
//! so it is never counted twice); the load's sessions live for the whole
//! measurement, so only short-lived helpers could be affected.

use std::collections::HashMap;

use crate::cluster::proc_stat_fields;

/// A process's parent and CPU ticks, from /proc/PID/stat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Proc {
    pub pid: i32,
    pub ppid: i32,
    /// utime + stime: every thread of the process, live or exited.
    pub own_ticks: u64,
    /// cutime + cstime: the children it has reaped (and theirs).
    pub reaped_ticks: u64,
}

/// One reading of /proc/PID/stat; None if the process is gone.
fn read(pid: i32) -> Option<Proc> {
    let f = proc_stat_fields(&pid.to_string())?;
    // Fields 4 (ppid), 14-17 (utime, stime, cutime, cstime) in proc(5)'s numbering; the list starts at field 3.
    let field = |i: usize| f.get(i - 3)?.parse::<i64>().ok();
    let ticks = |a: usize, b: usize| Some((field(a)? + field(b)?).max(0) as u64);
    Some(Proc { pid, ppid: field(4)? as i32, own_ticks: ticks(14, 15)?, reaped_ticks: ticks(16, 17)? })
}

/// Every process in /proc now, in ascending pid order (a parent usually before its children).
pub fn snapshot() -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut pids: Vec<i32> = dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    pids.sort_unstable();
    pids.into_iter().filter_map(read).collect()
}

/// `roots` (those in `procs`; one that is gone is left out) and all their descendants, each once,
/// every parent before its children.
pub fn tree<'a>(procs: &'a [Proc], roots: &[i32]) -> Vec<&'a Proc> {
    let mut children: HashMap<i32, Vec<&Proc>> = HashMap::new();
    for p in procs {
        children.entry(p.ppid).or_default().push(p);
    }
    let mut members: Vec<&Proc> = procs.iter().filter(|p| roots.contains(&p.pid)).collect();
    let mut next = 0;
    while let Some(p) = members.get(next) {
        next += 1;
        let kids = children.get(&p.pid).into_iter().flatten().filter(|c| !roots.contains(&c.pid));
        members.extend(kids.copied().collect::<Vec<_>>());
    }
    members
}

/// The pids of `roots` and their descendants now, every parent before its children.
pub fn tree_pids(roots: &[i32]) -> Vec<i32> {
    tree(&snapshot(), roots).iter().map(|p| p.pid).collect()
}

/// The CPU ticks of `roots` and their descendants in `procs`: own and reaped children's, summed.
pub fn tree_ticks(procs: &[Proc], roots: &[i32]) -> u64 {
    tree(procs, roots).iter().map(|p| p.own_ticks + p.reaped_ticks).sum()
}

/// Clock ticks per second of /proc's CPU times.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// CPU seconds that `roots` and their descendants have used so far.
pub fn tree_cpu_seconds(roots: &[i32]) -> f64 {
    tree_ticks(&snapshot(), roots) as f64 / ticks_per_second()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: i32, ppid: i32, own_ticks: u64, reaped_ticks: u64) -> Proc {
        Proc { pid, ppid, own_ticks, reaped_ticks }
    }

    #[test]
    fn a_tree_counts_its_descendants_and_their_reaped_children() {
        // Two postmasters (10, 20) with backends, a grandchild, and processes outside the trees.
        let start =
            [p(1, 0, 5_000, 0), p(10, 1, 100, 7), p(11, 10, 50, 0), p(12, 10, 30, 0), p(13, 12, 4, 0), p(20, 1, 200, 0), p(21, 20, 60, 0), p(99, 1, 900, 0)];
        assert_eq!(tree_ticks(&start, &[10, 20]), 100 + 7 + 50 + 30 + 4 + 200 + 60);
        assert_eq!(tree_ticks(&start, &[12]), 34);
        assert_eq!(tree_ticks(&start, &[42]), 0, "a root that is gone counts nothing");
        let pids: Vec<i32> = tree(&start, &[10, 20]).iter().map(|q| q.pid).collect();
        assert_eq!(pids, [10, 20, 11, 12, 21, 13], "parents first");
        assert_eq!(tree(&start, &[10, 12]).len(), 4, "a root under another root counts once");
        // During the window: backend 11 exits after using 20 more ticks and is reaped (its 70 move into
        // 10's cutime); backend 14 starts and uses 5; the postmaster uses 10; 13 exits unreaped (a zombie
        // keeps its ticks); 21 uses 40; the processes outside use more but do not count.
        let end = [
            p(1, 0, 9_000, 0),
            p(10, 1, 110, 7 + 70),
            p(12, 10, 30, 0),
            p(13, 12, 4, 0),
            p(14, 10, 5, 0),
            p(20, 1, 200, 0),
            p(21, 20, 100, 0),
            p(99, 1, 5_000, 0),
        ];
        assert_eq!(tree_ticks(&end, &[10, 20]) - tree_ticks(&start, &[10, 20]), 10 + 20 + 5 + 40);
    }

    #[test]
    fn this_process_is_read() {
        let me = std::process::id() as i32;
        let procs = snapshot();
        let mine = procs.iter().find(|q| q.pid == me).expect("this process is in /proc");
        // SAFETY: getppid has no preconditions.
        assert_eq!(mine.ppid, unsafe { libc::getppid() });
        let spin = std::time::Instant::now();
        while spin.elapsed() < std::time::Duration::from_millis(50) {
            std::hint::black_box(spin.elapsed());
        }
        assert!(tree_cpu_seconds(&[me]) > 0.0);
    }
}
