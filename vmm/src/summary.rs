//! The run summary: a stable, machine-readable record of one VM run
//! (`--summary-json`), and its short human form.
//!
//! Field names are part of the interface; later features add fields, never
//! rename them.

use std::collections::BTreeMap;

use serde::Serialize;

/// Percentiles of a latency histogram, in ns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest value.
    pub max: u64,
    /// Number of values.
    pub count: u64,
}

/// The timer device's view of one vCPU.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TimerSummary {
    /// Rearm writes.
    pub rearms: u64,
    /// Trigger writes (rearm(0) included).
    pub triggers: u64,
    /// rearm(0) writes, treated as trigger.
    pub rearm_zero: u64,
    /// Cancel writes.
    pub cancels: u64,
    /// Timer interrupts injected.
    pub injections: u64,
    /// Expiries that found the timer vector still pending.
    pub coalesced: u64,
    /// Rearms beyond the device maximum, clamped.
    pub clamped: u64,
    /// Injections before the deadline (must be 0).
    pub early_injections: u64,
    /// Deadline-to-injection lateness on the host.
    pub host_lateness_ns: Percentiles,
}

/// The stress generator's record for one vCPU.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StressSummary {
    /// Stress interrupts raised.
    pub sent: u64,
    /// Rounds skipped because one was still pending.
    pub skipped: u64,
    /// Stress interrupts injected.
    pub injected: u64,
    /// Stress interrupts the guest's handler counted.
    pub guest_received: u64,
}

/// What the guest kernel counted on one vCPU (from its shared page).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GuestVcpuSummary {
    /// Timer interrupts handled.
    pub timer_interrupts: u64,
    /// Scheduler ticks.
    pub ticks: u64,
    /// IPIs handled.
    pub ipis_received: u64,
    /// System calls.
    pub syscalls: u64,
    /// Ping-pong messages handled.
    pub pingpong: u64,
}

/// One vCPU.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VcpuSummary {
    /// vCPU id.
    pub id: u32,
    /// Distinct user threads that ran on this vCPU (guest-reported).
    pub user_threads_run: u64,
    /// Context switches (guest-reported).
    pub context_switches: u64,
    /// Interrupts the VMM injected.
    pub interrupts_injected: u64,
    /// IPIs the VMM injected into this vCPU.
    pub ipis_received: u64,
    /// HLT exits.
    pub halts: u64,
    /// Exits by reason.
    pub exits: BTreeMap<String, u64>,
    /// Kicks other threads sent to this vCPU.
    pub kicks: u64,
    /// Accesses to ports or MMIO addresses with no device.
    pub bus_misses: u64,
    /// The timer device.
    pub timer: TimerSummary,
    /// The kick stress test (zero unless enabled).
    pub stress: StressSummary,
    /// The guest's own counters.
    pub guest: GuestVcpuSummary,
}

/// The whole run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// How the run ended: `guest_exit`, `fault`, `panic`, `triple_fault`,
    /// `emulation`, `timeout`, `signal` or `host_error`.
    pub outcome: String,
    /// The human-readable reason.
    pub message: String,
    /// The guest's exit status, when it exited by itself.
    pub guest_exit_code: Option<u32>,
    /// Device clock (guest uptime) when the VM stopped.
    pub guest_uptime_ns: u64,
    /// Host wall time from process start to the end of the run.
    pub host_wall_ns: u64,
    /// Host wall time from process start to the guest's exit request.
    pub host_wall_to_exit_ns: u64,
    /// Number of vCPUs.
    pub vcpu_count: u32,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// The workload name.
    pub workload: String,
    /// Values the guest reported (`report` system call), by key.
    pub reports: BTreeMap<String, u64>,
    /// Per vCPU.
    pub vcpus: Vec<VcpuSummary>,
    /// The process exit code the VMM uses for this outcome.
    pub exit_code: i32,
}

impl Summary {
    /// A few lines for people.
    pub fn human(&self) -> String {
        let mut out = format!(
            "metronome: {} after {:.3} s guest uptime ({:.3} s wall), {} vCPU(s)\n",
            self.message,
            self.guest_uptime_ns as f64 / 1e9,
            self.host_wall_ns as f64 / 1e9,
            self.vcpu_count
        );
        for v in &self.vcpus {
            out.push_str(&format!(
                "  vCPU {}: {} threads, {} context switches, {} interrupts ({} timer, {} IPI), \
                 {} halts, timer lateness p50 {} us p99 {} us\n",
                v.id,
                v.user_threads_run,
                v.context_switches,
                v.interrupts_injected,
                v.timer.injections,
                v.ipis_received,
                v.halts,
                v.timer.host_lateness_ns.p50 / 1000,
                v.timer.host_lateness_ns.p99 / 1000,
            ));
        }
        out
    }
}
