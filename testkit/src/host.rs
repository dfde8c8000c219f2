//! Processes and threads on the host, from /proc.
use std::fs;

/// Numeric entries of a /proc directory (pids in /proc, tids in /proc/PID/task), sorted.
fn ids(dir: &str) -> Vec<u32> {
    let mut ids: Vec<u32> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    ids.sort_unstable();
    ids
}

/// Every process on the host.
pub fn pids() -> Vec<u32> {
    ids("/proc")
}

/// Thread ids of a process (empty once it is gone).
pub fn tids(pid: u32) -> Vec<u32> {
    ids(&format!("/proc/{pid}/task"))
}

/// A thread's name (`comm`), if it still exists.
pub fn comm(pid: u32, tid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
        .ok()
        .map(|s| s.trim_end_matches('\n').to_string())
}

/// (pid, comm) of the live processes whose name satisfies `pred`.
pub fn processes(pred: impl Fn(&str) -> bool) -> Vec<(u32, String)> {
    pids()
        .into_iter()
        .filter_map(|pid| Some((pid, comm(pid, pid)?)))
        .filter(|(pid, comm)| pred(comm) && is_alive(*pid))
        .collect()
}

/// The state letter of /proc/PID/stat (R, S, D, Z, X, ...).
fn state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parentheses: the state follows the last ')'.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// Exists and is not a zombie. A daemonized process is reaped by init,
/// possibly late. A leader can already be a zombie while its other threads
/// are still exiting (a group exit tears them down concurrently): see
/// [`other_threads`].
pub fn is_alive(pid: u32) -> bool {
    state(pid).is_some_and(|s| s != 'Z' && s != 'X')
}

/// Threads of `pid` other than the leader that still exist (their ids are
/// not free yet). 0 once the process is gone.
pub fn other_threads(pid: u32) -> usize {
    tids(pid).into_iter().filter(|t| *t != pid).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_this_process_and_its_threads() {
        let me = std::process::id();
        assert!(is_alive(me));
        assert!(pids().contains(&me));
        let tid = nix::unistd::gettid().as_raw() as u32;
        assert!(tids(me).contains(&tid));
        let name = comm(me, me).unwrap();
        assert!(processes(|c| c == name).iter().any(|(p, _)| *p == me));
        assert!(!is_alive(u32::MAX));
    }
}
