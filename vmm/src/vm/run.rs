//! Running a built VM: the vCPU threads, the event loop on the calling
//! thread, and the orderly end: stress drain, synchronous sampling stop,
//! quiesce (every vCPU parked at an interruptible point), stop flag and kicks,
//! joins, summary.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

use super::events::{ExitSubscriber, TimeoutSubscriber};
use super::live::RunView;
use super::pet_thread::PetThread;
use super::requests::{self, RequestSubscriber, VmmLink};
use super::stress::{drain_stress, StressGenerator};
use super::{Vm, VmController, VmExit};
use crate::kick;
use crate::sampling::export::RunRecords;
use crate::stop_signals::{self, StopSignalWatch};
use crate::summary::Summary;
use crate::vcpu::{VcpuRunStats, VcpuRunner};

/// How long the end of a run waits for every vCPU to reach an interruptible
/// point before stopping it anyway.
const QUIESCE_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

impl Vm {
    /// Runs the VM until it ends; `process_start` anchors the wall-clock figures.
    pub fn run(self, process_start: Instant) -> Summary {
        match self.start(process_start) {
            Ok(running) => running.wait(),
            Err((vm, reason)) => {
                vm.shared.request_exit(reason);
                crate::summary::collect(&vm, &[], process_start.elapsed(), process_start.elapsed())
            }
        }
    }

    /// Starts the vCPU threads (and the stress generator, if configured). The
    /// calling thread must then [`RunningVm::wait`]; a [`VmController`] from
    /// [`RunningVm::controller`] drives the VM from other threads meanwhile.
    /// SIGINT and SIGTERM end the VM ([`SignalWatch::Vm`]).
    #[allow(clippy::result_large_err)]
    pub fn start(self, process_start: Instant) -> Result<RunningVm, (Vm, VmExit)> {
        self.start_with(process_start, SignalWatch::Vm)
    }

    /// [`Vm::start`], with the choice of who handles SIGINT and SIGTERM.
    #[allow(clippy::result_large_err)]
    pub fn start_with(
        mut self,
        process_start: Instant,
        watch: SignalWatch,
    ) -> Result<RunningVm, (Vm, VmExit)> {
        let shared = self.shared.clone();
        if let Err(e) = kick::install_handlers() {
            return Err((self, VmExit::Host(format!("signal handlers: {e}"))));
        }
        let signals = match watch {
            SignalWatch::Vm => {
                let target = shared.clone();
                match stop_signals::watch(move |signo| target.request_exit(VmExit::Signal(signo))) {
                    Ok(s) => Some(s),
                    Err(e) => return Err((self, VmExit::Host(format!("signal thread: {e}")))),
                }
            }
            SignalWatch::Caller => None,
        };
        let pio = Arc::new(std::mem::take(&mut self.devices.pio));
        let mmio = Arc::new(std::mem::take(&mut self.devices.mmio));
        let mut threads: Vec<JoinHandle<VcpuRunStats>> = Vec::new();
        for (id, fd) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
            let runner = VcpuRunner::new(id as u32, fd, shared.clone(), pio.clone(), mmio.clone());
            match std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || runner.run())
            {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    shared.request_exit(VmExit::Host(format!("spawning vCPU thread: {e}")));
                    // The vCPUs without a thread will never run or park.
                    for slot in &shared.vcpus[id..] {
                        slot.lock().exited = true;
                    }
                    break;
                }
            }
        }
        let stress = self
            .config
            .kick_stress_hz
            .map(|hz| StressGenerator::start(shared.clone(), hz));
        if let Err(e) = PetThread::ensure(&shared) {
            shared.request_exit(VmExit::Host(format!("spawning the PET thread: {e}")));
        }
        let view = Arc::new(RunView {
            config: self.config.clone(),
            device_errors: self.devices.errors.clone(),
            kernel_image: self.kernel_image.clone(),
            process_start,
        });
        if shared
            .sampling
            .as_ref()
            .is_some_and(|s| s.config.start_at_boot)
        {
            if let Err(e) = VmController::new(shared.clone(), view.clone()).sampling_start() {
                shared.request_exit(VmExit::Host(format!("starting sampling: {e}")));
            }
        }
        Ok(RunningVm {
            vm: self,
            view,
            threads,
            stress,
            signals,
            requests: None,
            process_start,
        })
    }
}

/// A VM whose vCPUs are running.
pub struct RunningVm {
    vm: Vm,
    view: Arc<RunView>,
    threads: Vec<JoinHandle<VcpuRunStats>>,
    stress: Option<StressGenerator>,
    /// With [`SignalWatch::Vm`]: SIGINT and SIGTERM end the VM while this
    /// lives (dropped when the event loop ends).
    signals: Option<StopSignalWatch>,
    /// The request channel's end, once [`RunningVm::link`] made one: the
    /// event loop watches it.
    requests: Option<RequestSubscriber>,
    process_start: Instant,
}

/// Who handles SIGINT and SIGTERM while a VM runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignalWatch {
    /// The VM: [`Vm::start`] blocks them in the calling thread (before it
    /// spawns the vCPU threads) and has the signal thread
    /// ([`crate::stop_signals`]) end the VM with them until
    /// [`RunningVm::wait`]'s event loop ends (the command line).
    Vm,
    /// The caller, which has blocked them in every thread before starting the
    /// VM and ends it with [`VmController::stop_on_signal`] (the API server,
    /// where a signal ends the process, not just the VM).
    Caller,
}

impl std::fmt::Debug for RunningVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningVm")
            .field("vm", &self.vm)
            .finish_non_exhaustive()
    }
}

impl RunningVm {
    /// A handle to drive the VM from other threads.
    pub fn controller(&self) -> VmController {
        VmController::new(self.vm.shared.clone(), self.view.clone())
    }

    /// A channel to this VM's event loop ([`super::requests`]): requests sent
    /// on the link run on the thread that calls [`RunningVm::wait`], between
    /// its other events. One channel per VM: a second call replaces the
    /// first, whose link then reports [`requests::LinkClosed`].
    ///
    /// # Errors
    ///
    /// The eventfd cannot be made.
    pub fn link(&mut self) -> std::io::Result<VmmLink> {
        let (link, subscriber) = requests::channel(self.controller())?;
        self.requests = Some(subscriber);
        Ok(link)
    }

    /// Runs the event loop until the VM ends (guest exit, fault, signal,
    /// timeout, or [`VmController::stop`]), stops and joins the vCPUs, and
    /// returns the summary.
    pub fn wait(self) -> Summary {
        self.wait_keeping().0
    }

    /// [`RunningVm::wait`], also returning what the profile and trace files
    /// were written from (with sampling), for readers after the run.
    pub fn wait_keeping(mut self) -> (Summary, Option<RunRecords>) {
        let shared = self.vm.shared.clone();
        let exit_wall = match self.event_loop() {
            Ok(()) => self.process_start.elapsed(),
            Err(reason) => {
                shared.request_exit(reason);
                self.process_start.elapsed()
            }
        };
        // The watch ends with the event loop: from here on SIGINT and SIGTERM
        // take their default action, so a stuck shutdown can still be
        // interrupted. A caller that watches them keeps its own watch.
        drop(self.signals.take());
        if let Some(stress) = self.stress.take() {
            stress.stop();
            drain_stress(&shared);
        }
        let controller = self.controller();
        if shared.sampling.is_some() {
            // Stopping while off does nothing; an error means another thread's
            // stop is in progress, which the stop flag below completes.
            let _ = controller.sampling_stop();
        }
        shared.quiesce(QUIESCE_LIMIT);
        shared.stop_all();
        let stats: Vec<VcpuRunStats> = std::mem::take(&mut self.threads)
            .into_iter()
            .map(|t| t.join().unwrap_or_default())
            .collect();
        PetThread::close(&shared);
        if let Some(sampling) = &shared.sampling {
            // The perf reader's last pass, before the profile is drained.
            sampling.no_exit.close_and_join();
        }
        let mut summary =
            crate::summary::collect(&self.vm, &stats, self.process_start.elapsed(), exit_wall);
        let mut records = None;
        if let Some(sampling) = &shared.sampling {
            let (figures, kept) = crate::sampling::report::finish(
                sampling,
                &stats,
                (&self.vm.kernel_image, &shared.mem),
                summary.guest_uptime_ns,
                &mut summary.errors,
            );
            summary.sampling = Some(figures);
            records = Some(kept);
        }
        (summary, records)
    }

    fn event_loop(&mut self) -> Result<(), VmExit> {
        let shared = self.vm.shared.clone();
        let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().map_err(|e| VmExit::Host(format!("event manager: {e}")))?;
        let exit_watch = Arc::new(Mutex::new(ExitSubscriber::new(shared.clone())));
        manager.add_subscriber(exit_watch.clone());
        // Dropped with the manager when the loop ends: later requests fail.
        if let Some(requests) = self.requests.take() {
            manager.add_subscriber(Arc::new(Mutex::new(requests)));
        }
        if let Some(limit) = self.vm.config.timeout {
            let timeout = TimeoutSubscriber::new(shared.clone(), limit)
                .map_err(|e| VmExit::Host(format!("timerfd: {e}")))?;
            manager.add_subscriber(Arc::new(Mutex::new(timeout)));
        }
        while !exit_watch.lock().unwrap_or_else(|p| p.into_inner()).fired {
            manager
                .run()
                .map_err(|e| VmExit::Host(format!("event loop: {e}")))?;
        }
        Ok(())
    }
}
