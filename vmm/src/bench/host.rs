//! What the bench reads about the host and this process: the machine,
//! resident memory, and `perf` run against this process.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::report::HostInfo;

/// The machine: CPU model, usable CPUs, kernel release and KVM module.
pub fn host_info() -> HostInfo {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    HostInfo {
        cpu,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        kernel,
        kvm_module: kvm_modules(Path::new("/sys/module")),
    }
}

/// The KVM vendor modules under `sys_module` (`kvm_intel`, `kvm_amd`,
/// `kvm_pvm`, ...), comma-separated; `kvm` alone when only it is loaded.
fn kvm_modules(sys_module: &Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(sys_module)
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("kvm"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    let vendors: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| *n != "kvm")
        .collect();
    match (vendors.is_empty(), names.is_empty()) {
        (false, _) => vendors.join(","),
        (true, false) => "kvm".into(),
        (true, true) => "none".into(),
    }
}

/// This process's `VmRSS` and the resident bytes of the mappings that
/// overlap `ranges` (host address, length), both in bytes, from
/// `/proc/self/status` and `/proc/self/smaps`.
pub fn resident_bytes(ranges: &[(u64, u64)]) -> std::io::Result<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let vm_rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024;
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    Ok((vm_rss, resident_in(&smaps, ranges)))
}

/// Sums the `Rss:` of every smaps mapping that overlaps one of `ranges`.
fn resident_in(smaps: &str, ranges: &[(u64, u64)]) -> u64 {
    let mut total = 0;
    let mut inside = false;
    for line in smaps.lines() {
        let header = line
            .split_whitespace()
            .next()
            .and_then(|r| r.split_once('-'))
            .and_then(|(a, b)| {
                Some((
                    u64::from_str_radix(a, 16).ok()?,
                    u64::from_str_radix(b, 16).ok()?,
                ))
            });
        if let Some((start, end)) = header {
            inside = ranges
                .iter()
                .any(|&(addr, len)| start < addr + len && addr < end);
            continue;
        }
        if let Some(kb) = line.strip_prefix("Rss:") {
            if inside {
                let kb: u64 = kb.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
                total += kb * 1024;
            }
        }
    }
    total
}

/// `perf` sampling this process at a rate, until stopped.
#[derive(Debug)]
pub struct PerfRun {
    child: Child,
    output: PathBuf,
}

/// The perf command the bench runs (`{hz}` and `{pid}` filled in).
pub const PERF_COMMAND: &str = "perf kvm --guest record -e cpu-clock -F {hz} -p {pid}";

impl PerfRun {
    /// Starts `perf kvm --guest record -e cpu-clock -F hz -p <this process>`
    /// writing `output`, and waits (up to 10 s) until perf has opened its
    /// events (its output file has its header). The error says why perf
    /// cannot sample here (missing, not permitted, or no start).
    pub fn start(hz: u32, output: &Path) -> Result<Self, String> {
        let _ = std::fs::remove_file(output);
        let mut command = Command::new("perf");
        // SAFETY: between fork and exec the hook only calls sigemptyset,
        // sigprocmask and signal, all async-signal-safe, on a local set.
        unsafe {
            command.pre_exec(|| {
                // The VMM blocks SIGINT and SIGTERM in its threads, and keeps
                // SIGINT ignored if it started so; perf must take the SIGINT
                // that stops it.
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                Ok(())
            })
        };
        let child = command
            .args(["kvm", "--guest", "record", "-e", "cpu-clock", "-F"])
            .arg(hz.to_string())
            .arg("-p")
            .arg(std::process::id().to_string())
            .arg("-o")
            .arg(output)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run perf: {e}"))?;
        let mut run = Self {
            child,
            output: output.to_owned(),
        };
        let give_up = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = run.child.try_wait() {
                let stderr = run.stderr();
                return Err(format!("perf exited at once ({status}): {stderr}"));
            }
            let started = std::fs::metadata(&run.output).is_ok_and(|m| m.len() > 0);
            if started {
                return Ok(run);
            }
            if Instant::now() > give_up {
                run.interrupt();
                return Err("perf did not start within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderr(&mut self) -> String {
        let mut text = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut err, &mut text);
        }
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    fn interrupt(&mut self) {
        // SAFETY: kill with our own child's pid and a valid signal.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let _ = self.child.wait();
    }

    /// Stops perf (SIGINT, as a user's Ctrl-C) and returns the samples it
    /// reports having written, when it says.
    pub fn stop(mut self) -> Option<u64> {
        self.interrupt();
        let stderr = self.stderr();
        let _ = std::fs::remove_file(&self.output);
        perf_samples(&stderr)
    }
}

/// The `N` of perf record's "(N samples)".
fn perf_samples(stderr: &str) -> Option<u64> {
    let at = stderr.find(" samples)")?;
    let before = &stderr[..at];
    let start = before.rfind('(')? + 1;
    before[start..].trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_perf_sample_count_is_read_from_its_report() {
        let text = "[ perf record: Woken up 1 times to write data ] [ perf record: \
                    Captured and wrote 0.123 MB /tmp/x (3012 samples) ]";
        assert_eq!(perf_samples(text), Some(3012));
        assert_eq!(perf_samples("no such line"), None);
    }

    #[test]
    fn test_guest_ranges_count_only_their_mappings() {
        let smaps = "\
1000-3000 rw-p 00000000 00:00 0
Size:                  8 kB
Rss:                   8 kB
7000-9000 rw-p 00000000 00:00 0 [heap]
Rss:                   4 kB
";
        assert_eq!(resident_in(smaps, &[(0x2000, 0x10)]), 8 * 1024);
        assert_eq!(resident_in(smaps, &[(0x8000, 0x10)]), 4 * 1024);
        assert_eq!(resident_in(smaps, &[(0x4000, 0x100)]), 0);
    }

    #[test]
    fn test_kvm_module_names_the_vendor_module() {
        let dir = std::env::temp_dir().join(format!("metronome-kvm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("kvm")).unwrap();
        assert_eq!(kvm_modules(&dir), "kvm");
        std::fs::create_dir_all(dir.join("kvm_pvm")).unwrap();
        std::fs::create_dir_all(dir.join("ext4")).unwrap();
        assert_eq!(kvm_modules(&dir), "kvm_pvm");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(kvm_modules(&dir), "none");
    }
}
