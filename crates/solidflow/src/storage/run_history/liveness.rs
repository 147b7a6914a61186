//! Telling whether the process that runs a `STARTED` run is still alive.
//!
//! On the run's own host the answer comes from the kernel: the recorded pid must still
//! exist, not be a zombie, and have the recorded start time in the same boot (so a pid
//! reused by another process does not count). From another host only the heartbeat
//! can tell: a run whose last heartbeat is older than the timeout is taken as dead.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::record::RunRecord;

/// How long another host's run may go without a heartbeat before it is taken as dead,
/// unless `SOLIDFLOW_HEARTBEAT_TIMEOUT` (seconds) says otherwise.
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(120);

/// The environment variable that sets the heartbeat timeout in seconds.
pub const HEARTBEAT_TIMEOUT_ENV: &str = "SOLIDFLOW_HEARTBEAT_TIMEOUT";

/// The heartbeat timeout from [`HEARTBEAT_TIMEOUT_ENV`], else the default.
pub fn heartbeat_timeout_from_env() -> Duration {
    std::env::var(HEARTBEAT_TIMEOUT_ENV)
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(DEFAULT_HEARTBEAT_TIMEOUT)
}

/// How often a running process writes its heartbeat for a given timeout: often enough
/// that a few missed beats (a busy disk) do not make a live run look dead.
pub(super) fn heartbeat_interval(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(15))
}

/// When a process started, precisely enough to recognise it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessStart {
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
    /// Start time in clock ticks after boot (`/proc/<pid>/stat`, field 22).
    pub ticks: u64,
    /// The same moment as wall-clock time, for people.
    pub at: DateTime<Utc>,
}

impl ProcessStart {
    /// This process's start (`None` where `/proc` is not available).
    pub fn current() -> Option<Self> {
        Self::of(std::process::id())
    }

    /// The start of process `pid`, if it exists and is not a zombie.
    pub fn of(pid: u32) -> Option<Self> {
        let stat = proc_stat(pid)?;
        if stat.zombie {
            return None;
        }
        let boot_id = boot_id()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let btime = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<i64>().ok())?;
        let millis = btime * 1000 + (stat.start_ticks * 1000 / hz) as i64;
        Some(Self {
            boot_id,
            ticks: stat.start_ticks,
            at: DateTime::from_timestamp_millis(millis).unwrap_or_default(),
        })
    }
}

struct ProcStat {
    zombie: bool,
    start_ticks: u64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ...`: comm may hold spaces and parentheses, so split after the last `)`.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat {
        zombie: matches!(fields.first(), Some(&"Z") | Some(&"X")),
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
}

/// Whether process `pid` exists at all (a zombie counts as gone).
fn pid_exists(pid: u32) -> bool {
    if let Some(stat) = proc_stat(pid) {
        return !stat.zombie;
    }
    if std::path::Path::new("/proc/self").exists() {
        return false;
    }
    // No /proc: ask the kernel directly. EPERM means it exists under another user.
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Why the `STARTED` run `run` cannot still be running, or `None` if it may be.
///
/// `last_seen` is the latest sign of life (heartbeat or event); `this_host` is the
/// reader's host name.
pub(super) fn why_dead(
    run: &RunRecord,
    last_seen: DateTime<Utc>,
    now: DateTime<Utc>,
    timeout: Duration,
    this_host: &str,
) -> Option<String> {
    if let (Some(host), Some(pid)) = (&run.host, run.pid)
        && host == this_host
    {
        let recorded = run.process_start.as_ref();
        let current_boot = boot_id();
        if let (Some(start), Some(boot)) = (recorded, &current_boot)
            && &start.boot_id != boot
        {
            return Some(format!(
                "host {host} restarted since its process {pid} started the run"
            ));
        }
        if !pid_exists(pid) {
            return Some(format!("its process {pid} on host {host} is gone"));
        }
        return match (recorded, ProcessStart::of(pid)) {
            (Some(start), Some(now_start)) if start.ticks != now_start.ticks => Some(format!(
                "its process {pid} on host {host} is gone (pid {pid} now belongs to a process started at {})",
                now_start.at.to_rfc3339()
            )),
            _ => None,
        };
    }
    let silent = now
        .signed_duration_since(last_seen)
        .to_std()
        .unwrap_or_default();
    (silent > timeout).then(|| {
        let who = match (&run.host, run.pid) {
            (Some(host), Some(pid)) => format!("its process {pid} on host {host}"),
            _ => "its process (host and pid not recorded)".to_string(),
        };
        format!(
            "{who} sent no heartbeat for {} s (timeout {} s, set with {HEARTBEAT_TIMEOUT_ENV})",
            silent.as_secs(),
            timeout.as_secs_f64()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(host: &str, pid: u32, start: Option<ProcessStart>) -> RunRecord {
        let mut r = RunRecord::new("r", "p", "default", serde_json::json!({}));
        r.host = Some(host.into());
        r.pid = Some(pid);
        r.process_start = start;
        r
    }

    #[test]
    fn this_process_is_alive() {
        let me = record("here", std::process::id(), ProcessStart::current());
        let now = Utc::now();
        assert!(ProcessStart::current().is_some(), "needs /proc");
        assert_eq!(
            why_dead(&me, now, now, Duration::from_secs(1), "here"),
            None
        );
    }

    #[test]
    fn an_exited_process_is_dead_and_a_reused_pid_is_noticed() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let now = Utc::now();
        let gone = record("here", pid, None);
        let why = why_dead(&gone, now, now, Duration::from_secs(60), "here").unwrap();
        assert!(
            why.contains(&format!("process {pid} on host here is gone")),
            "{why}"
        );

        let mut other = ProcessStart::current().unwrap();
        other.ticks += 1;
        let reused = record("here", std::process::id(), Some(other));
        let why = why_dead(&reused, now, now, Duration::from_secs(60), "here").unwrap();
        assert!(why.contains("now belongs to a process started at"), "{why}");

        let mut rebooted = ProcessStart::current().unwrap();
        rebooted.boot_id = "another-boot".into();
        let old = record("here", std::process::id(), Some(rebooted));
        let why = why_dead(&old, now, now, Duration::from_secs(60), "here").unwrap();
        assert!(why.contains("restarted"), "{why}");
    }

    #[test]
    fn another_hosts_run_is_judged_by_its_heartbeat() {
        let run = record("elsewhere", 1, None);
        let now = Utc::now();
        let recent = now - chrono::Duration::seconds(5);
        let stale = now - chrono::Duration::seconds(300);
        let timeout = Duration::from_secs(60);
        assert_eq!(why_dead(&run, recent, now, timeout, "here"), None);
        let why = why_dead(&run, stale, now, timeout, "here").unwrap();
        assert!(
            why.contains("process 1 on host elsewhere sent no heartbeat for 300 s (timeout 60 s"),
            "{why}"
        );
    }
}
