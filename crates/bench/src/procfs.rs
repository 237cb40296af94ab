//! CPU time and memory of the processes under test, from /proc: they run
//! as processes of their own so the load generator is not counted.

use std::path::Path;
use std::process::Command;

/// utime + stime of a process (all threads), seconds.
pub(crate) fn cpu_secs(pid: &str) -> f64 {
    let (user, sys) = cpu_split_secs(pid);
    user + sys
}

/// utime and stime of a process (all threads), seconds: user space, and
/// the kernel working for it (system calls, and on loopback the
/// receiving side's TCP processing of what it sends).
pub(crate) fn cpu_split_secs(pid: &str) -> (f64, f64) {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return (0.0, 0.0);
    };
    let Some(rest) = s.rfind(')').map(|i| &s[i + 1..]) else {
        return (0.0, 0.0);
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command name: state is field 3, utime 14, stime 15.
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let hz = clock_ticks();
    (field(11) as f64 / hz, field(12) as f64 / hz)
}

/// CPU seconds of each thread of `pid` whose name starts with `prefix`,
/// in the order of their names (so two snapshots line up).
pub(crate) fn thread_cpu(pid: &str, prefix: &str) -> Vec<f64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut threads: Vec<(String, f64)> = dir
        .filter_map(|e| {
            let tid = e.ok()?.file_name().into_string().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok()?;
            let comm = comm.trim();
            comm.starts_with(prefix)
                .then(|| (comm.to_owned(), cpu_secs(&format!("{pid}/task/{tid}"))))
        })
        .collect();
    threads.sort_by(|a, b| a.0.cmp(&b.0));
    threads.into_iter().map(|t| t.1).collect()
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// A `Vm*` line of /proc/<pid>/status, KiB.
pub(crate) fn status_kib(pid: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The soak's per-second samples as one line: RSS in MiB and, after a
/// slash, the audit records not yet written.
pub(crate) fn soak_timeline(samples: &[(u64, Option<u64>)]) -> String {
    let peak = samples.iter().filter_map(|s| s.1).max();
    let each: Vec<String> = samples
        .iter()
        .map(|(rss, pending)| match pending {
            Some(p) => format!("{:.0}/{p}", *rss as f64 / 1024.0),
            None => format!("{:.0}/-", *rss as f64 / 1024.0),
        })
        .collect();
    format!(
        "soak each second, RSS MiB / audit records pending (peak {}): {}",
        peak.map_or("-".to_string(), |p| p.to_string()),
        each.join(" ")
    )
}

pub(crate) fn dir_bytes(p: &Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => n += dir_bytes(&e.path()),
                Ok(m) => n += m.len(),
                Err(_) => {}
            }
        }
    }
    n
}
