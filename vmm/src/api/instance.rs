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
//! The API thread reaches the running VM only through the VMM thread: a
//! request is a closure sent on the VM's [`VmmLink`] (a channel plus an
//! eventfd the VMM thread's event loop watches) and run there with the
//! [`VmController`], its result coming back on a oneshot
//! ([`Instance::on_vmm`]). Such a closure never waits; what waits (a pause
//! until every vCPU has parked, a sampling stop until every vCPU has
//! acknowledged) waits on the runtime's blocking pool afterwards
//! ([`Instance::on_vmm_then_wait`]), so that the event loop still sees the
//! guest's exit or a signal, and nothing here is on a vCPU's or timer's path.

use std::fs::File;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::{oneshot, watch};

use super::errors::ApiError;
use super::metrics::RequestCounts;
use crate::config::{KperfConfig, SamplingConfig};
use crate::metrics::VmMetrics;
use crate::sampling::export::RunRecords;
use crate::seccomp::{self, ThreadKind};
use crate::vm::{BuildVmError, SignalWatch, Vm, VmController, VmmLink};
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
    /// The VM runs (or is paused: `paused`); `link` reaches its VMM thread.
    Running { link: VmmLink, paused: bool },
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
    /// The VM runs (or is paused): copies made on its VMM thread through
    /// the link, nothing drained.
    Running(VmmLink),
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
    /// The VMM thread: spawned by [`Instance::prepare_vmm_thread`] (or the
    /// first InstanceStart), waiting on `launcher` for a configuration.
    thread: Option<JoinHandle<()>>,
    /// Sends InstanceStart's configuration to the waiting VMM thread;
    /// dropped at shut-down, which ends a thread that never started a VM.
    launcher: Option<std::sync::mpsc::Sender<Launch>>,
    /// The process is ending: a VM still being built is not started.
    shutting_down: bool,
    /// Where FlushMetrics appends the metrics (`PUT /metrics`).
    metrics_sink: Option<Arc<Mutex<File>>>,
    /// The VM's metrics at the end of its run, once it exited.
    final_metrics: Option<VmMetrics>,
}

/// What InstanceStart hands the VMM thread: the configuration, and where to
/// answer whether the VM started.
type Launch = (VmConfig, oneshot::Sender<Result<(), ApiError>>);

/// The instance, shared by the API's handlers and the VMM thread.
pub struct Instance {
    /// The command line's configuration: what a field left out of a
    /// pre-boot request falls back to.
    pub defaults: VmConfig,
    state: Mutex<State>,
    /// Becomes true when the VM has exited and its summary is kept.
    exited: watch::Sender<bool>,
    on_end: OnVmEnd,
    /// The API's answers by status code (`GET /metrics`).
    pub requests: RequestCounts,
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
                launcher: None,
                shutting_down: false,
                metrics_sink: None,
                final_metrics: None,
            }),
            defaults,
            exited: watch::Sender::new(false),
            on_end,
            requests: RequestCounts::default(),
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

    /// The link to the running VM's VMM thread, or why there is none;
    /// `action` names the request for the message.
    pub fn link(&self, action: &str) -> Result<VmmLink, ApiError> {
        match &self.lock().phase {
            Phase::Running { link, .. } => Ok(link.clone()),
            phase => Err(ApiError::bad_request(format!(
                "{action} needs a running instance (Running or Paused); the instance is {}",
                phase.name()
            ))),
        }
    }

    /// Runs `f` with the running VM's controller on its VMM thread (between
    /// the event loop's other events) and answers what it returned; `what`
    /// names the request for the messages. `f` must not wait.
    ///
    /// # Errors
    ///
    /// 400 when the instance is not Running or Paused, or the VM ended
    /// before `f` ran.
    pub async fn on_vmm<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce(&VmController) -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        on_link(&self.link(what)?, what, f).await
    }

    /// [`Instance::on_vmm`], then, with what `f` returned and a controller,
    /// `wait` on the runtime's blocking pool (off the API and VMM threads):
    /// for operations that `f` starts and that end when the vCPUs answer.
    ///
    /// # Errors
    ///
    /// As [`Instance::on_vmm`].
    pub async fn on_vmm_then_wait<T: Send + 'static, U: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce(&VmController) -> T + Send + 'static,
        wait: impl FnOnce(&VmController, T) -> U + Send + 'static,
    ) -> Result<U, ApiError> {
        let (started, controller) = self.on_vmm(what, move |c| (f(c), c.clone())).await?;
        tokio::task::spawn_blocking(move || wait(&controller, started))
            .await
            .map_err(|e| ApiError::internal(format!("{what} failed: {e}")))
    }

    /// Where the kperf engine is: `None` before InstanceStart (the pre-boot
    /// configuration, [`Instance::pre_boot_kperf`]), the link to the running
    /// VM's VMM thread after; `what` names the request for the message.
    pub fn kperf_home(&self, what: &str) -> Result<Option<VmmLink>, ApiError> {
        match &self.lock().phase {
            Phase::NotStarted => Ok(None),
            Phase::Running { link, .. } => Ok(Some(link.clone())),
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

    /// The VM's metrics: read now on the VMM thread while it runs (relaxed
    /// loads, each vCPU's irq lock held only to copy its timer histogram),
    /// kept from the end of the run after it exited, `None` before it runs
    /// or when the VM ends while the request is in flight.
    pub async fn vm_metrics(&self) -> Option<VmMetrics> {
        let link = {
            let state = self.lock();
            match &state.phase {
                Phase::Running { link, .. } => link.clone(),
                Phase::Exited { .. } => return state.final_metrics.clone(),
                Phase::NotStarted | Phase::Starting => return None,
            }
        };
        match on_link(&link, "GET /metrics", |c| c.metrics()).await {
            Ok(metrics) => Some(metrics),
            // It ended meanwhile: its final metrics, once they are kept.
            Err(_) => {
                self.exited().await;
                self.lock().final_metrics.clone()
            }
        }
    }

    /// Sets the metrics sink, before the instance started (`PUT /metrics`).
    pub fn set_metrics_sink(&self, file: File) -> Result<(), ApiError> {
        let mut state = self.lock();
        if !matches!(state.phase, Phase::NotStarted) {
            return Err(ApiError::bad_request(format!(
                "PUT /metrics is pre-boot only: the metrics sink can be set before InstanceStart, and the instance is {}",
                state.phase.name()
            )));
        }
        state.metrics_sink = Some(Arc::new(Mutex::new(file)));
        Ok(())
    }

    /// The metrics sink, if one was set.
    pub fn metrics_sink(&self) -> Option<Arc<Mutex<File>>> {
        self.lock().metrics_sink.clone()
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
            Phase::Running { link, .. } => Ok(Readout::Running(link.clone())),
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
            // Spawned under the lock, so that `shut_down` finds the thread to join.
            if state.launcher.is_none() {
                self.spawn_vmm_thread(&mut state)
                    .map_err(|e| ApiError::internal(format!("cannot spawn the VMM thread: {e}")))?;
            }
            let launch = (state.config.clone(), started_tx);
            let sent = state
                .launcher
                .as_ref()
                .is_some_and(|l| l.send(launch).is_ok());
            if !sent {
                return Err(ApiError::internal("the VMM thread has ended"));
            }
            state.phase = Phase::Starting;
            started_rx
        };
        started_rx.await.unwrap_or_else(|_| {
            Err(ApiError::internal(
                "the VMM thread ended before the VM started",
            ))
        })
    }

    /// Spawns the VMM thread now, to wait for InstanceStart: the API
    /// server does before its own thread installs the API's seccomp
    /// filter, which a thread spawned from it would inherit.
    ///
    /// # Errors
    ///
    /// The thread cannot be spawned.
    pub fn prepare_vmm_thread(self: &Arc<Self>) -> std::io::Result<()> {
        let mut state = self.lock();
        if state.launcher.is_none() && state.thread.is_none() {
            self.spawn_vmm_thread(&mut state)?;
        }
        Ok(())
    }

    fn spawn_vmm_thread(self: &Arc<Self>, state: &mut State) -> std::io::Result<()> {
        let (launcher, launches) = std::sync::mpsc::channel::<Launch>();
        let instance = self.clone();
        let handle = std::thread::Builder::new()
            .name("metronome-vmm".into())
            .spawn(move || {
                // Until a VM starts: a build that failed leaves the instance
                // Not started, and InstanceStart may come again.
                while let Ok((config, started)) = launches.recv() {
                    if instance.run_vm(config, started) {
                        break;
                    }
                }
            })?;
        state.thread = Some(handle);
        state.launcher = Some(launcher);
        Ok(())
    }

    /// The VMM thread: build, start, wait, keep the summary; false if the
    /// VM did not start.
    fn run_vm(&self, config: VmConfig, started: oneshot::Sender<Result<(), ApiError>>) -> bool {
        let process_start = Instant::now();
        let refuse = |started: oneshot::Sender<_>, error: ApiError| {
            self.lock().phase = Phase::NotStarted;
            let _ = started.send(Err(error));
            false
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
        let mut running = match vm.start_with(process_start, SignalWatch::Caller) {
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
        let link = match running.link() {
            Ok(link) => link,
            Err(e) => {
                drop(state);
                controller.stop();
                drop(running.wait());
                return refuse(
                    started,
                    ApiError::internal(format!("cannot make the VMM request eventfd: {e}")),
                );
            }
        };
        state.phase = Phase::Running {
            link,
            paused: false,
        };
        drop(state);
        // The vCPUs run under their own filters; from the first request on
        // this thread runs under the VMM's.
        seccomp::install_or_exit(ThreadKind::Vmm);
        let _ = started.send(Ok(()));
        let (summary, records) = running.wait_keeping();
        let mut metrics = controller.metrics();
        // The device clock runs on after the end: the uptime is the run's.
        metrics.guest_uptime_ns = summary.guest_uptime_ns;
        (self.on_end)(&summary, &controller);
        let mut state = self.lock();
        state.final_metrics = Some(metrics);
        state.phase = Phase::Exited {
            summary: Box::new(summary),
            records: records.map(Arc::new),
        };
        drop(state);
        self.exited.send_replace(true);
        true
    }

    /// The process is ending on signal `signo`: a running VM is stopped
    /// with it, one being built is not started, and the VMM thread is joined
    /// (its summary reported).
    pub fn shut_down(&self, signo: i32) {
        let (link, thread) = {
            let mut state = self.lock();
            state.shutting_down = true;
            let link = match &state.phase {
                Phase::Running { link, .. } => Some(link.clone()),
                _ => None,
            };
            // A thread still waiting for InstanceStart ends.
            state.launcher = None;
            (link, state.thread.take())
        };
        if let Some(link) = link {
            // A closed link: the VM is ending already.
            let _ = link.send(Box::new(move |c| c.stop_on_signal(signo)));
        }
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

/// Sends `f` on `link` and awaits what it returned on the VMM thread.
pub async fn on_link<T: Send + 'static>(
    link: &VmmLink,
    what: &str,
    f: impl FnOnce(&VmController) -> T + Send + 'static,
) -> Result<T, ApiError> {
    let ended = || {
        ApiError::bad_request(format!(
            "{what} refused: the VM has exited or is exiting; GET /summary holds its results once it has"
        ))
    };
    let (reply, answer) = oneshot::channel();
    link.send(Box::new(move |controller| {
        // The client may have gone: nobody waits for the answer then.
        let _ = reply.send(f(controller));
    }))
    .map_err(|_| ended())?;
    // An error: the loop ended with the request still queued.
    answer.await.map_err(|_| ended())
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
