//! The no-exit tier's perf reader thread, "perf-reader": created the first
//! time sampling starts with a no-exit or hybrid timer, it empties every
//! vCPU thread's perf ring and attributes the samples
//! ([`crate::sampling::no_exit::run_reader`]); closed at the VM's end.

use std::sync::Arc;

use super::VmShared;

/// Spawns the reader thread unless it runs already or the VM ended.
pub fn ensure(shared: &Arc<VmShared>) -> std::io::Result<()> {
    let Some(sampling) = &shared.sampling else {
        return Ok(());
    };
    sampling.no_exit.ensure_reader(|| {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("perf-reader".into())
            .spawn(move || {
                crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::PerfReader);
                if let Some(sampling) = &shared.sampling {
                    let epoch_ns = shared.clock.to_monotonic(0);
                    crate::sampling::no_exit::run_reader(sampling, &shared.mem, epoch_ns);
                }
            })
    })
}
