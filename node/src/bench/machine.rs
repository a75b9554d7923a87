//! What `parley bench` reads from `/proc`: the machine it ran on (CPU, memory, kernel, load and
//! the other busy processes), CPU time of processes (utime + stime) and their resident memory.
//!
//! Numbers from one box mean little without the box: every report carries this, and the CPU
//! snapshot of all processes taken at the start and end names whatever else was running.

use std::collections::HashMap;

use serde::Serialize;

/// How many of the busiest processes during the run the report lists.
const TOP_PROCESSES: usize = 8;

/// The machine a report was measured on.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Machine {
    pub cpu_model: String,
    /// CPUs this process may run on.
    pub cores: usize,
    pub memory_bytes: u64,
    pub kernel: String,
    /// `/proc/loadavg` (1, 5, 15 minutes) when the run started and when it ended.
    pub loadavg_start: String,
    pub loadavg_end: String,
    /// Open-file limit of the bench process (soft).
    pub nofile_limit: u64,
    /// The processes that used the most CPU during the run among those still alive at its end
    /// (the bench's own nodes included; its load processes have exited by then).
    pub busiest_processes: Vec<ProcessCpu>,
}

/// CPU one process used during the run.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct ProcessCpu {
    pub pid: u32,
    pub comm: String,
    pub cpu_s: f64,
}

/// CPU ticks of every process at one moment, to tell later what ran meanwhile.
pub(crate) struct Snapshot(HashMap<u32, (String, u64)>);

impl Machine {
    /// Describe this machine now (the end-of-run fields are filled by [`Machine::finish`]).
    pub fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".to_string());
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:").map(kib_field))
            .unwrap_or(0);
        Machine {
            cpu_model,
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            memory_bytes,
            kernel: read_trim("/proc/sys/kernel/osrelease"),
            loadavg_start: loadavg(),
            loadavg_end: String::new(),
            nofile_limit: nofile_limit(),
            busiest_processes: Vec::new(),
        }
    }

    /// Record the end of the run: load average and the busiest processes since `start`.
    pub fn finish(&mut self, start: &Snapshot) {
        self.loadavg_end = loadavg();
        let end = Snapshot::take();
        let mut used: Vec<ProcessCpu> = end
            .0
            .iter()
            .map(|(&pid, (comm, ticks))| {
                let before = start.0.get(&pid).map_or(0, |(_, t)| *t);
                ProcessCpu { pid, comm: comm.clone(), cpu_s: ticks.saturating_sub(before) as f64 / ticks_per_sec() }
            })
            .filter(|p| p.cpu_s > 0.0)
            .collect();
        used.sort_by(|a, b| b.cpu_s.total_cmp(&a.cpu_s));
        used.truncate(TOP_PROCESSES);
        self.busiest_processes = used;
    }
}

impl Snapshot {
    pub fn take() -> Snapshot {
        let mut all = HashMap::new();
        for pid in pids() {
            if let Some(stat) = ProcStat::read(pid) {
                all.insert(pid, (stat.comm, stat.ticks));
            }
        }
        Snapshot(all)
    }
}

/// The fields of `/proc/<pid>/stat` the bench uses.
struct ProcStat {
    comm: String,
    ppid: u32,
    /// utime + stime, in clock ticks.
    ticks: u64,
}

impl ProcStat {
    fn read(pid: u32) -> Option<ProcStat> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `comm` is in parentheses and may itself contain spaces or parentheses: split at the last ')'.
        let open = text.find('(')?;
        let close = text.rfind(')')?;
        let comm = text[open + 1..close].to_string();
        let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
        // Fields after comm start at field 3 (state); ppid is 4, utime 14, stime 15.
        let ppid = rest.get(1)?.parse().ok()?;
        let utime: u64 = rest.get(11)?.parse().ok()?;
        let stime: u64 = rest.get(12)?.parse().ok()?;
        Some(ProcStat { comm, ppid, ticks: utime + stime })
    }
}

fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect()
}

fn ticks_per_sec() -> f64 {
    #[allow(unsafe_code)]
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// CPU time (user + system) of `pid` so far, ms; `None` if it is gone.
pub(crate) fn cpu_ms(pid: u32) -> Option<f64> {
    ProcStat::read(pid).map(|s| s.ticks as f64 * 1000.0 / ticks_per_sec())
}

/// Sum of [`cpu_ms`] over `pids` (vanished processes count as 0).
pub(crate) fn total_cpu_ms(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|&p| cpu_ms(p)).sum()
}

/// CPU time this process has used, ms.
pub(crate) fn self_cpu_ms() -> u64 {
    cpu_ms(std::process::id()).unwrap_or(0.0) as u64
}

/// CPU time the whole machine spent busy (everything but idle and iowait, all CPUs) so far, ms:
/// what the phases compare their own processes' CPU with, to show what else ran.
pub(crate) fn machine_busy_ms() -> f64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else { return 0.0 };
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|n| n.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already inside user).
    let busy: u64 = v.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, n)| n).sum();
    busy as f64 * 1000.0 / ticks_per_sec()
}

/// `pid` and all its direct children (a postmaster and its backends and helpers).
pub(crate) fn with_children(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    out.extend(pids().into_iter().filter(|&p| ProcStat::read(p).is_some_and(|s| s.ppid == pid)));
    out
}

/// The parent of `pid`.
pub(crate) fn parent_of(pid: u32) -> Option<u32> {
    ProcStat::read(pid).map(|s| s.ppid)
}

/// Resident memory of `pid` (VmRSS), bytes.
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:").map(kib_field))
}

/// "  123456 kB" → bytes.
fn kib_field(v: &str) -> u64 {
    v.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0) * 1024
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_default()
}

fn loadavg() -> String {
    read_trim("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn nofile_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    #[allow(unsafe_code)]
    // SAFETY: getrlimit writes into the struct we own.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    if ok {
        lim.rlim_cur
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        assert!(cpu_ms(me).is_some());
        assert!(rss_bytes(me).unwrap_or(0) > 0);
        assert!(parent_of(me).is_some());
        let m = Machine::probe();
        assert!(m.cores >= 1);
        assert!(m.memory_bytes > 0);
    }
}
