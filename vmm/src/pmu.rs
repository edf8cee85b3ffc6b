//! The host PMU, for kperf's PMC samplers (`pmc_thread`, `pmc_cpu`,
//! `pmc_config`, `th_inscyc`; AMB-14).
//!
//! Those samplers read hardware counters. In a VMM the meaningful counters
//! are the guest's own: `perf_event_open` on the vCPU thread with
//! `exclude_host`, so that only what the CPU executes in guest mode counts.
//! That needs a host PMU that counts guest events; many hosts have none (a
//! VM without a virtual PMU, like the kvm_pvm development machines, where
//! `perf_event_open` of a hardware event fails with `ENOENT`).
//!
//! - [`probe`]: once per process, whether the host can count guest
//!   instructions and cycles. The kperf configuration refuses the PMC
//!   samplers when it cannot (AMB-14's "reject" branch: a zero counter would
//!   look like a measurement).
//! - [`GuestCounters`]: where the probe succeeds, the guest-only counters of
//!   one vCPU thread, opened on that thread at its first PMC sample and read
//!   at each sample ([`read_current_thread`]). This path cannot run on the
//!   development machines (no PMU): it is kept minimal and is not tested
//!   there.

use std::cell::OnceCell;
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::FromRawFd;
use std::sync::OnceLock;

use perf_event_open_sys::bindings::{
    perf_event_attr, PERF_COUNT_HW_CPU_CYCLES, PERF_COUNT_HW_INSTRUCTIONS, PERF_FLAG_FD_CLOEXEC,
    PERF_TYPE_HARDWARE,
};

/// The hardware events the PMC samplers count, in the order of their
/// values in a sample: guest instructions retired, then guest cycles.
pub const EVENTS: [(u64, &str); 2] = [
    (PERF_COUNT_HW_INSTRUCTIONS as u64, "instructions"),
    (PERF_COUNT_HW_CPU_CYCLES as u64, "cycles"),
];

/// Why the host cannot count guest events: the `errno` of the
/// `perf_event_open` that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoGuestPmu {
    /// The `errno`.
    pub errno: i32,
}

impl fmt::Display for NoGuestPmu {
    /// `perf_event_open: ENOENT, No such file or directory`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.errno {
            libc::ENOENT => "ENOENT".to_string(),
            libc::ENODEV => "ENODEV".to_string(),
            libc::EOPNOTSUPP => "EOPNOTSUPP".to_string(),
            libc::EINVAL => "EINVAL".to_string(),
            libc::EACCES => "EACCES".to_string(),
            libc::EPERM => "EPERM".to_string(),
            libc::EBUSY => "EBUSY".to_string(),
            libc::ENOSYS => "ENOSYS".to_string(),
            errno => format!("errno {errno}"),
        };
        let text = io::Error::from_raw_os_error(self.errno).to_string();
        // io::Error appends " (os error N)": keep the words only.
        let text = text.split(" (os error").next().unwrap_or_default();
        write!(f, "perf_event_open: {name}, {text}")
    }
}

/// The attributes of a guest-only hardware counter of `event` ([`EVENTS`]).
fn guest_only(event: u64) -> perf_event_attr {
    let mut attr = perf_event_attr {
        type_: PERF_TYPE_HARDWARE,
        // Cannot truncate: the struct is a few hundred bytes.
        size: std::mem::size_of::<perf_event_attr>() as u32,
        config: event,
        ..Default::default()
    };
    attr.set_exclude_host(1);
    attr.set_exclude_hv(1);
    attr
}

/// Opens a guest-only counter of `event` on the calling thread, any CPU.
fn open(event: u64) -> Result<File, NoGuestPmu> {
    let mut attr = guest_only(event);
    // SAFETY: `attr` is a zero-initialised perf_event_attr whose `size` is
    // its own size, so the kernel reads only initialised bytes; pid 0 and
    // cpu -1 count the calling thread wherever it runs; no group (-1). The
    // call does not retain the pointer.
    let fd = unsafe {
        perf_event_open_sys::perf_event_open(&mut attr, 0, -1, -1, PERF_FLAG_FD_CLOEXEC.into())
    };
    if fd < 0 {
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        return Err(NoGuestPmu { errno });
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Whether every event of [`EVENTS`] opens as a guest-only counter with
/// `open`; the first failure otherwise. The counters are closed again.
pub fn probe_with(open: impl Fn(u64) -> Result<File, NoGuestPmu>) -> Result<(), NoGuestPmu> {
    for (event, _) in EVENTS {
        open(event)?;
    }
    Ok(())
}

/// Whether this host counts guest events (probed once per process).
pub fn probe() -> Result<(), NoGuestPmu> {
    static PROBE: OnceLock<Result<(), NoGuestPmu>> = OnceLock::new();
    *PROBE.get_or_init(|| probe_with(open))
}

/// The guest-only counters of one vCPU thread (one per event of
/// [`EVENTS`]).
#[derive(Debug)]
pub struct GuestCounters {
    counters: Vec<File>,
}

impl GuestCounters {
    /// Opens the counters on the calling thread.
    ///
    /// # Errors
    ///
    /// The first `perf_event_open` that failed.
    pub fn open() -> Result<Self, NoGuestPmu> {
        let counters = EVENTS
            .iter()
            .map(|&(event, _)| open(event))
            .collect::<Result<_, _>>()?;
        Ok(Self { counters })
    }

    /// The values of [`EVENTS`] counted so far (0 for a counter that cannot
    /// be read).
    pub fn read(&self) -> [u64; 2] {
        let mut values = [0; 2];
        for (value, mut counter) in values.iter_mut().zip(&self.counters) {
            let mut bytes = [0u8; 8];
            if counter.read_exact(&mut bytes).is_ok() {
                *value = u64::from_ne_bytes(bytes);
            }
        }
        values
    }
}

thread_local! {
    /// The calling vCPU thread's counters, opened at its first PMC sample.
    static COUNTERS: OnceCell<Option<GuestCounters>> = const { OnceCell::new() };
}

/// The calling (vCPU) thread's guest instructions and cycles so far; `None`
/// where the host cannot count them.
pub fn read_current_thread() -> Option<[u64; 2]> {
    COUNTERS.with(|cell| {
        cell.get_or_init(|| GuestCounters::open().ok())
            .as_ref()
            .map(GuestCounters::read)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_amb_14_the_probe_reports_the_first_failing_open() {
        let fails = |event: u64| {
            if event == PERF_COUNT_HW_CPU_CYCLES as u64 {
                Err(NoGuestPmu {
                    errno: libc::EOPNOTSUPP,
                })
            } else {
                File::open("/dev/null").map_err(|_| NoGuestPmu { errno: 0 })
            }
        };
        assert_eq!(
            probe_with(fails),
            Err(NoGuestPmu {
                errno: libc::EOPNOTSUPP
            })
        );
        let works = |_| File::open("/dev/null").map_err(|_| NoGuestPmu { errno: 0 });
        assert_eq!(probe_with(works), Ok(()));
    }

    #[test]
    fn test_the_reason_names_the_errno() {
        let text = NoGuestPmu {
            errno: libc::ENOENT,
        }
        .to_string();
        assert_eq!(text, "perf_event_open: ENOENT, No such file or directory");
    }

    #[test]
    fn test_a_host_without_a_cpu_pmu_has_no_guest_counters() {
        // Only one direction holds everywhere: without a core PMU in sysfs
        // (as in a VM without a virtual PMU), nothing counts guest events.
        let pmus = ["cpu", "cpu_core", "cpu_atom"];
        let has_pmu = pmus.iter().any(|p| {
            std::path::Path::new("/sys/bus/event_source/devices")
                .join(p)
                .exists()
        });
        if !has_pmu {
            assert!(probe().is_err());
            assert_eq!(read_current_thread(), None);
        }
    }

    #[test]
    fn test_counters_are_guest_only_hardware_events() {
        let attr = guest_only(EVENTS[0].0);
        assert_eq!(attr.type_, PERF_TYPE_HARDWARE);
        assert_eq!(attr.config, PERF_COUNT_HW_INSTRUCTIONS as u64);
        assert_eq!((attr.exclude_host(), attr.exclude_guest()), (1, 0));
    }
}
