//! The one instance the API drives: its configuration until it starts, then
//! its VM on a VMM thread, then the summary once it has exited.
//!
//! ```text
//! Not started ---- InstanceStart ----> Running <--- Pause/Resume ---> Paused
//!      ^   (build fails: stays)           |                             |
//!      +----------------------------------+-- guest exit, SendExit, ---+--> Exited
//!                                             --timeout, signal
//! ```
//!
//! The API thread reaches the running VM through [`VmController`], which is
//! thread-safe and takes only short locks the vCPUs also take (the pause
//! state, a vCPU's irq lock); calls that wait (pause waits for every vCPU to
//! park) run on the runtime's blocking pool, never on the API thread, and
//! nothing here is on a vCPU's or timer's path.

use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::{oneshot, watch};

use super::errors::ApiError;
use crate::config::{KperfConfig, SamplingConfig};
use crate::sampling::export::RunRecords;
use crate::vm::{BuildVmError, SignalWatch, Vm, VmController};
use crate::{Summary, VmConfig};

/// What the process does with a VM's summary when the VM ends (the command
/// line's reporting: `--summary-json`, `--dump-clockintr`, the human summary).
pub type OnVmEnd = Box<dyn Fn(&Summary, &VmController) + Send + Sync>;

/// Where the instance is in its life.
#[derive(Debug)]
enum Phase {
    /// Configurable; nothing built yet.
    NotStarted,
    /// InstanceStart is building the VM on the VMM thread.
    Starting,
    /// The VM runs (or is paused: `paused`).
    Running {
        controller: VmController,
        paused: bool,
    },
    /// The VM ended; its summary, and what its profiles and trace were
    /// written from (with sampling).
    Exited {
        summary: Box<Summary>,
        records: Option<Arc<RunRecords>>,
    },
}

/// Where a run's profiles, trace and summary are read from.
#[derive(Debug, Clone)]
pub enum Readout {
    /// The VM runs (or is paused): copies, nothing drained.
    Running(VmController),
    /// The VM ended: what the end of the run kept (`None` without
    /// sampling), and its summary.
    Exited {
        /// The stacks and trace the end-of-run files hold.
        records: Option<Arc<RunRecords>>,
        /// The run's summary.
        summary: Box<Summary>,
    },
}

/// The instance state, behind [`Instance`]'s lock (held briefly, never
/// across an await or a VM operation).
#[derive(Debug)]
struct State {
    /// The configuration InstanceStart builds: the command line's, changed
    /// by the pre-boot requests.
    config: VmConfig,
    phase: Phase,
    /// The VMM thread, once started.
    thread: Option<JoinHandle<()>>,
    /// The process is ending: a VM still being built is not started.
    shutting_down: bool,
}

/// The instance, shared by the API's handlers and the VMM thread.
pub struct Instance {
    /// The command line's configuration: what a field left out of a
    /// pre-boot request falls back to.
    pub defaults: VmConfig,
    state: Mutex<State>,
    /// Becomes true when the VM has exited and its summary is kept.
    exited: watch::Sender<bool>,
    on_end: OnVmEnd,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Phase {
    /// The state name of `GET /`: `Not started`, `Running`, `Paused` or `Exited`.
    fn name(&self) -> &'static str {
        match self {
            Self::NotStarted | Self::Starting => "Not started",
            Self::Running { paused: false, .. } => "Running",
            Self::Running { paused: true, .. } => "Paused",
            Self::Exited { .. } => "Exited",
        }
    }
}

impl Instance {
    /// An instance not started yet, configured with `defaults`. Its VM
    /// always has the kperf engine, so that kperf can be configured at any
    /// time: without sampling on the command line, an empty configuration
    /// with sampling off ([`SamplingConfig::on_request`]).
    pub fn new(defaults: VmConfig, on_end: OnVmEnd) -> Arc<Self> {
        let mut config = defaults.clone();
        config
            .sampling
            .get_or_insert_with(SamplingConfig::on_request);
        Arc::new(Self {
            state: Mutex::new(State {
                config,
                phase: Phase::NotStarted,
                thread: None,
                shutting_down: false,
            }),
            defaults,
            exited: watch::Sender::new(false),
            on_end,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Not started`, `Running`, `Paused` or `Exited`.
    pub fn state_name(&self) -> &'static str {
        self.lock().phase.name()
    }

    /// The configuration InstanceStart would build.
    pub fn config(&self) -> VmConfig {
        self.lock().config.clone()
    }

    /// Changes the configuration with `edit`, before the instance started.
    pub fn configure(
        &self,
        what: &str,
        edit: impl FnOnce(&mut VmConfig, &VmConfig) -> Result<(), ApiError>,
    ) -> Result<(), ApiError> {
        let mut state = self.lock();
        if !matches!(state.phase, Phase::NotStarted) {
            return Err(ApiError::bad_request(format!(
                "{what} is pre-boot only: it can be changed before InstanceStart, and the instance has started"
            )));
        }
        super::types::change(&mut state.config, |c| edit(c, &self.defaults))
    }

    /// The running VM's controller, or why there is none; `action` names
    /// the request for the message.
    pub fn controller(&self, action: &str) -> Result<VmController, ApiError> {
        match &self.lock().phase {
            Phase::Running { controller, .. } => Ok(controller.clone()),
            phase => Err(ApiError::bad_request(format!(
                "{action} needs a running instance (Running or Paused); the instance is {}",
                phase.name()
            ))),
        }
    }

    /// Where the kperf engine is: `None` before InstanceStart (the pre-boot
    /// configuration, [`Instance::pre_boot_kperf`]), the running VM's
    /// controller after; `what` names the request for the message.
    pub fn kperf_home(&self, what: &str) -> Result<Option<VmController>, ApiError> {
        match &self.lock().phase {
            Phase::NotStarted => Ok(None),
            Phase::Running { controller, .. } => Ok(Some(controller.clone())),
            Phase::Starting => Err(ApiError::bad_request(format!(
                "{what} refused: InstanceStart is building the VM; send it again once it runs"
            ))),
            Phase::Exited { .. } => Err(ApiError::bad_request(format!(
                "{what} refused: the instance has exited; GET /summary holds the kperf configuration it ran with"
            ))),
        }
    }

    /// Before InstanceStart: runs `f` on a kperf engine built from the
    /// pre-boot configuration and on whether sampling starts with the VM;
    /// with `keep`, what `f` leaves is kept if `f` succeeds and the whole
    /// configuration still passes [`VmConfig::validate`].
    pub fn pre_boot_kperf<T>(
        &self,
        what: &str,
        keep: bool,
        f: impl FnOnce(&mut kperf::Kperf, &mut bool) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let mut state = self.lock();
        if !matches!(state.phase, Phase::NotStarted) {
            return Err(ApiError::bad_request(format!(
                "{what} refused: the instance started while it was served; send it again"
            )));
        }
        let sampling = state
            .config
            .sampling
            .get_or_insert_with(SamplingConfig::on_request);
        let mut engine = sampling
            .engine()
            .map_err(|e| ApiError::internal(format!("the pre-boot kperf configuration: {e}")))?;
        let mut at_boot = sampling.start_at_boot;
        let out = f(&mut engine, &mut at_boot)?;
        if keep {
            let kperf = KperfConfig::from_engine(&engine);
            super::types::change(&mut state.config, |config| {
                let sampling = config
                    .sampling
                    .get_or_insert_with(SamplingConfig::on_request);
                sampling.kperf = kperf;
                sampling.start_at_boot = at_boot;
                Ok(())
            })?;
        }
        Ok(out)
    }

    /// Records a pause or resume the controller carried out.
    pub fn set_paused(&self, paused: bool) {
        if let Phase::Running { paused: p, .. } = &mut self.lock().phase {
            *p = paused;
        }
    }

    /// The summary of the exited VM.
    pub fn summary(&self) -> Option<Summary> {
        match &self.lock().phase {
            Phase::Exited { summary, .. } => Some((**summary).clone()),
            _ => None,
        }
    }

    /// Where the run's profiles, trace and summary are read from once it
    /// started; before, why there is nothing yet (`what` names the request).
    pub fn readout(&self, what: &str) -> Result<Readout, ApiError> {
        match &self.lock().phase {
            Phase::Running { controller, .. } => Ok(Readout::Running(controller.clone())),
            Phase::Exited { summary, records } => Ok(Readout::Exited {
                records: records.clone(),
                summary: summary.clone(),
            }),
            phase => Err(ApiError::bad_request(format!(
                "{what} has nothing to show yet: the instance is {}; send InstanceStart (PUT /actions) first",
                phase.name()
            ))),
        }
    }

    /// Waits until the VM has exited and its summary is kept.
    pub async fn exited(&self) {
        let mut exited = self.exited.subscribe();
        // Cannot fail: the sender lives in `self`.
        let _ = exited.wait_for(|done| *done).await;
    }

    /// InstanceStart: builds the VM on a new VMM thread, starts it there,
    /// and answers once it runs (or why it could not be built). The thread
    /// then waits for the VM's end and keeps its summary.
    pub async fn start(self: &Arc<Self>) -> Result<(), ApiError> {
        let started_rx = {
            let mut state = self.lock();
            if !matches!(state.phase, Phase::NotStarted) {
                return Err(ApiError::bad_request(format!(
                    "InstanceStart is allowed once, while the instance is Not started; it is {}",
                    match state.phase {
                        Phase::Starting => "starting",
                        ref phase => phase.name(),
                    }
                )));
            }
            let (started_tx, started_rx) = oneshot::channel();
            let instance = self.clone();
            let config = state.config.clone();
            // Spawned under the lock, so that `shut_down` finds the thread to join.
            let spawned = std::thread::Builder::new()
                .name("metronome-vmm".into())
                .spawn(move || instance.run_vm(config, started_tx));
            match spawned {
                Ok(handle) => {
                    state.thread = Some(handle);
                    state.phase = Phase::Starting;
                }
                Err(e) => {
                    return Err(ApiError::internal(format!(
                        "cannot spawn the VMM thread: {e}"
                    )))
                }
            }
            started_rx
        };
        started_rx.await.unwrap_or_else(|_| {
            Err(ApiError::internal(
                "the VMM thread ended before the VM started",
            ))
        })
    }

    /// The VMM thread: build, start, wait, keep the summary.
    fn run_vm(&self, config: VmConfig, started: oneshot::Sender<Result<(), ApiError>>) {
        let process_start = Instant::now();
        let refuse = |started: oneshot::Sender<_>, error: ApiError| {
            self.lock().phase = Phase::NotStarted;
            let _ = started.send(Err(error));
        };
        let vm = match Vm::build(config) {
            Ok(vm) => vm,
            Err(e) => {
                let message = error_chain(&e);
                return refuse(
                    started,
                    match e {
                        BuildVmError::Config(_)
                        | BuildVmError::ReadKernel { .. }
                        | BuildVmError::Kernel { .. }
                        | BuildVmError::Console { .. } => ApiError::bad_request(message),
                        _ => ApiError::internal(message),
                    },
                );
            }
        };
        let mut state = self.lock();
        if state.shutting_down {
            drop(state);
            return refuse(started, ApiError::internal("the process is ending"));
        }
        let running = match vm.start_with(process_start, SignalWatch::Caller) {
            Ok(running) => running,
            Err((_vm, reason)) => {
                drop(state);
                return refuse(
                    started,
                    ApiError::internal(format!("cannot start the VM: {reason}")),
                );
            }
        };
        let controller = running.controller();
        state.phase = Phase::Running {
            controller: controller.clone(),
            paused: false,
        };
        drop(state);
        let _ = started.send(Ok(()));
        let (summary, records) = running.wait_keeping();
        (self.on_end)(&summary, &controller);
        self.lock().phase = Phase::Exited {
            summary: Box::new(summary),
            records: records.map(Arc::new),
        };
        self.exited.send_replace(true);
    }

    /// The process is ending on signal `signo`: a running VM is stopped
    /// with it, one being built is not started, and the VMM thread is joined
    /// (its summary reported).
    pub fn shut_down(&self, signo: i32) {
        let (controller, thread) = {
            let mut state = self.lock();
            state.shutting_down = true;
            let controller = match &state.phase {
                Phase::Running { controller, .. } => Some(controller.clone()),
                _ => None,
            };
            (controller, state.thread.take())
        };
        if let Some(controller) = controller {
            controller.stop_on_signal(signo);
        }
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

/// An error and its source chain on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    line
}
