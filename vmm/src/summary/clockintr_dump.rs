//! A host-side equivalent of ddb's `show all clockintr` (spec TR-C-4): for
//! every vCPU, the running event, the pending events in queue order ("pend")
//! and the established events that are not pending ("est"), read from the
//! shared pages the guest keeps current.

use std::fmt::Write;

use metronome_abi::event_kind;

use super::{read_vcpu_page, VcpuPage};
use crate::vm::VmShared;

fn kind_name(kind: u64) -> &'static str {
    match kind & 0xff {
        event_kind::HARDCLOCK => "clockintr_hardclock",
        event_kind::STATCLOCK => "clockintr_statclock",
        event_kind::SCHEDCLOCK => "clockintr_schedclock",
        _ => "?",
    }
}

fn secs(ns: u64) -> String {
    format!("{}.{:09}", ns / 1_000_000_000, ns % 1_000_000_000)
}

/// The dump, one block per vCPU.
pub fn clockintr_dump(shared: &VmShared) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>20} {:>5} {:>20} {:>5} FUNC",
        "UPTIME", "CPU", "EXPIRATION", "STATE"
    );
    let uptime = secs(shared.now());
    for id in 0..shared.vcpus.len() as u32 {
        let Some(VcpuPage { page, .. }) = read_vcpu_page(&shared.mem, id) else {
            continue;
        };
        if page.cpu_inits == 0 {
            let _ = writeln!(
                out,
                "{uptime:>20} {id:>5} {:>20} {:>5} (clockintr not initialised)",
                "-", "-"
            );
            continue;
        }
        if page.running != event_kind::NONE {
            let _ = writeln!(
                out,
                "{uptime:>20} {id:>5} {:>20} {:>5} {}",
                "-",
                "run",
                kind_name(page.running)
            );
        }
        for event in page.pending.iter().filter(|e| e.kind != event_kind::NONE) {
            let state = if event.kind & 0x100 != 0 {
                "est"
            } else {
                "pend"
            };
            let expiration = if state == "pend" {
                secs(event.expiration)
            } else {
                "-".to_string()
            };
            let _ = writeln!(
                out,
                "{uptime:>20} {id:>5} {expiration:>20} {state:>5} {}",
                kind_name(event.kind)
            );
        }
    }
    out
}
