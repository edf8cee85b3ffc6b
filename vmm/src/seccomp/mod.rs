//! seccomp filters, one allow-list per kind of thread ([`ThreadKind`]).
//!
//! Every list is compiled once, by [`init`] at startup (rust-vmm's
//! `seccompiler` turns each into a BPF program), and each thread installs
//! its own with [`install`] before it runs guest code or reads a request.
//! The filter applies to the calling thread only (no TSYNC) and is
//! inherited by the threads it spawns afterwards, whose own filters then
//! stack on it (the kernel runs every filter; the strictest answer wins).
//! Threads are therefore spawned before their parent is filtered, or the
//! parent's list holds what the child needs: the VMM thread's list includes
//! the PET sampler's and the perf reader's, which it may start at run time
//! (`lists.rs`).
//!
//! A call outside the list returns `SECCOMP_RET_TRAP`: the kernel sends
//! SIGSYS to the thread, whose handler (`report.rs`) writes
//!
//! ```text
//! metronome: seccomp: thread 'vcpu0' made the forbidden system call getpgid (121)
//! ```
//!
//! to standard error and ends the process with exit code
//! [`metronome_abi::exit::VMM_SECCOMP`] (7).
//!
//! Without [`init`] (the library's tests, embedders) [`install`] does
//! nothing: the `metronome` binary calls it unless `--no-seccomp`.
//!
//! Test-only: `METRONOME_TEST_SECCOMP_VIOLATION=KIND` (a [`ThreadKind`]
//! name), read once by [`init`], makes the first thread of that kind call
//! `getpgid` right after installing its filter, which every list denies.
//! The integration tests use it to see each filter end the VMM.

mod lists;
mod names;
mod report;

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

/// The test-only variable naming the thread kind that makes a forbidden call.
pub const VIOLATION_VAR: &str = "METRONOME_TEST_SECCOMP_VIOLATION";

/// A kind of thread, with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU thread (`vcpuN`, `vmm/src/vcpu/`): `KVM_RUN`, injection, kicks,
    /// its POSIX timers, the console, sampling.
    Vcpu,
    /// The API thread (`metronome-api`, `api/server.rs`) and the threads of
    /// its runtime's blocking pool: the socket's connections, the answers.
    Api,
    /// The thread that runs a VM's event loop and writes its files: the main
    /// thread on the command line, `metronome-vmm` in API mode.
    Vmm,
    /// The main thread in API mode, once the API and VMM threads exist: it
    /// waits for the API thread and removes the socket.
    Main,
    /// The PET sampler (`kperf-pet-sampling`, `vm/pet_thread.rs`).
    Pet,
    /// The no-exit tier's perf reader (`perf-reader`, `vm/no_exit_thread.rs`).
    PerfReader,
    /// The SIGINT/SIGTERM thread (`metronome-sig`, `stop_signals.rs`).
    Signal,
    /// The stress interrupt generator (`kick-stress`, `vm/stress.rs`).
    Stress,
}

impl ThreadKind {
    /// Every kind (the compiled filters are kept in this order).
    pub const ALL: [ThreadKind; 8] = [
        Self::Vcpu,
        Self::Api,
        Self::Vmm,
        Self::Main,
        Self::Pet,
        Self::PerfReader,
        Self::Signal,
        Self::Stress,
    ];

    /// The kind's name, as [`VIOLATION_VAR`] takes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Vcpu => "vcpu",
            Self::Api => "api",
            Self::Vmm => "vmm",
            Self::Main => "main",
            Self::Pet => "pet",
            Self::PerfReader => "perf-reader",
            Self::Signal => "signal",
            Self::Stress => "stress",
        }
    }

    fn index(self) -> usize {
        // Cannot panic: ALL holds every kind.
        Self::ALL
            .iter()
            .position(|&k| k == self)
            .expect("ALL holds every kind")
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// Why the filters could not be made or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A list did not compile to BPF.
    #[error("cannot compile the seccomp filter of the {0} threads")]
    Compile(&'static str, #[source] seccompiler::BackendError),
    /// The kernel refused a filter.
    #[error("cannot install the seccomp filter of the {0} threads")]
    Install(&'static str, #[source] seccompiler::Error),
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
    /// [`VIOLATION_VAR`] names no thread kind.
    #[error("{VIOLATION_VAR}={0:?} names no thread kind; one of: vcpu, api, vmm, main, pet, perf-reader, signal, stress")]
    BadViolationVar(String),
}

impl SeccompError {
    /// The error and its sources on one line.
    pub fn chain(&self) -> String {
        let mut line = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            line.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        line
    }
}

/// The compiled filters, and the test-only violation.
struct Filters {
    programs: Vec<BpfProgram>,
    /// Per kind: whether its list allows `clone3`, and so whether its
    /// threads also get `no_clone3`.
    spawns: Vec<bool>,
    no_clone3: BpfProgram,
    violation: Option<ThreadKind>,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

/// Compiles `rules` to BPF: `matched` for a call they allow, `mismatch`
/// for any other; `name` names the filter in an error.
fn program(
    name: &'static str,
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
        .map_err(|e| SeccompError::Compile(name, e))?;
    filter
        .try_into()
        .map_err(|e| SeccompError::Compile(name, e))
}

/// Compiles thread kind `kind`'s filter from its allow-list, and says
/// whether the list lets it spawn threads (`clone3`).
fn compile(kind: ThreadKind, pid: libc::pid_t) -> Result<(BpfProgram, bool), SeccompError> {
    let rules = lists::rules(kind, pid);
    let spawns = rules.contains_key(&libc::SYS_clone3);
    let program = program(
        kind.name(),
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
    )?;
    Ok((program, spawns))
}

/// The filter a thread that may spawn threads installs beside its list's:
/// `clone3` fails with `ENOSYS`. Its flags are in memory, out of a filter's
/// reach; glibc then falls back to `clone`, whose flags the lists check
/// (threads only, never a process). Stacked filters give the strictest
/// answer, so the list's `Allow` of `clone3` becomes this `ENOSYS`, and a
/// thread whose list has no `clone3` still traps on it.
fn compile_no_clone3() -> Result<BpfProgram, SeccompError> {
    program(
        "clone3",
        [(libc::SYS_clone3, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )
}

/// Turns the filters on for this process: compiles every list, installs the
/// SIGSYS handler, probes the host PMU once (so that only the vCPU threads'
/// counters ever call `perf_event_open` on themselves), and reads
/// [`VIOLATION_VAR`]. Call it once at startup, before any thread that
/// installs a filter is spawned; later calls do nothing.
///
/// # Errors
///
/// A list does not compile, the handler cannot be installed, or
/// [`VIOLATION_VAR`] names no kind.
pub fn init() -> Result<(), SeccompError> {
    if FILTERS.get().is_some() {
        return Ok(());
    }
    let violation = match std::env::var(VIOLATION_VAR) {
        Ok(name) => Some(ThreadKind::from_name(&name).ok_or(SeccompError::BadViolationVar(name))?),
        Err(_) => None,
    };
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let (programs, spawns) = ThreadKind::ALL
        .into_iter()
        .map(|kind| compile(kind, pid))
        .collect::<Result<(Vec<_>, Vec<_>), _>>()?;
    let no_clone3 = compile_no_clone3()?;
    report::install_handler().map_err(SeccompError::Handler)?;
    install_panic_hook();
    // The probe's answer is cached for the process: its perf_event_open
    // happens here, unfiltered, not on the API thread at a kperf request.
    let _ = crate::pmu::probe();
    let _ = FILTERS.set(Filters {
        programs,
        spawns,
        no_clone3,
        violation,
    });
    Ok(())
}

/// A panic report that a filtered thread can write: the thread, the place
/// and the message with one `write(2)`, no backtrace (capturing one reads
/// the working directory and the executable's debug information, which no
/// filtered thread may), so that a dying vCPU thread is reported and the VM
/// ends with its report instead of a seccomp violation. `--no-seccomp` keeps
/// Rust's default hook and its backtraces.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".to_owned());
        let line = format!("thread '{name}' panicked{place}:\n{message}\n");
        // SAFETY: writing our own buffer to stderr.
        unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
    }));
}

/// Whether [`init`] turned the filters on.
pub fn enabled() -> bool {
    FILTERS.get().is_some()
}

/// Installs `kind`'s filter on the calling thread, after recording the
/// thread's name for the SIGSYS report; nothing without [`init`].
///
/// # Errors
///
/// The kernel refused the filter.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(filters) = FILTERS.get() else {
        return Ok(());
    };
    label_current_thread();
    seccompiler::apply_filter(&filters.programs[kind.index()])
        .map_err(|e| SeccompError::Install(kind.name(), e))?;
    if filters.spawns[kind.index()] {
        seccompiler::apply_filter(&filters.no_clone3)
            .map_err(|e| SeccompError::Install(kind.name(), e))?;
    }
    if filters.violation == Some(kind) {
        // Test-only (VIOLATION_VAR): a call every list denies.
        // SAFETY: getpgid(0) reads the caller's process group; no memory.
        unsafe { libc::syscall(libc::SYS_getpgid, 0) };
    }
    Ok(())
}

/// [`install`] for a thread without an error path: a refused filter ends
/// the process (exit code 6, a host error) with the reason on stderr.
pub fn install_or_exit(kind: ThreadKind) {
    if let Err(e) = install(kind) {
        eprintln!("metronome: error: {}", e.chain());
        std::process::exit(metronome_abi::exit::VMM_HOST_ERROR);
    }
}

/// Records the calling thread's name (its `comm`) for the SIGSYS report.
/// [`install`] does it; a thread that inherits a filter without installing
/// one (the API runtime's blocking pool) calls it at its start.
pub fn label_current_thread() {
    report::label_current_thread();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_every_list_compiles_to_bpf() {
        for kind in ThreadKind::ALL {
            let (program, _) = compile(kind, 1234).unwrap_or_else(|e| panic!("{kind:?}: {e}"));
            assert!(!program.is_empty(), "{kind:?}");
        }
    }

    #[test]
    fn test_clone3_is_answered_enosys_so_that_glibc_falls_back_to_clone() {
        let program = compile_no_clone3().expect("compiles");
        let ret = |nr: libc::c_long| lists::tests::evaluate(&program, nr, [0; 6]);
        // SECCOMP_RET_ERRNO | ENOSYS; anything else passes to the list.
        assert_eq!(ret(libc::SYS_clone3), 0x0005_0000 | libc::ENOSYS as u32);
        assert_eq!(ret(libc::SYS_clone), 0x7fff_0000);
        assert_eq!(ret(libc::SYS_getpgid), 0x7fff_0000);
    }

    #[test]
    fn test_kind_names_round_trip() {
        for kind in ThreadKind::ALL {
            assert_eq!(ThreadKind::from_name(kind.name()), Some(kind));
            assert_eq!(ThreadKind::ALL[kind.index()], kind);
        }
        assert_eq!(ThreadKind::from_name("vcpu0"), None);
    }

    #[test]
    fn test_the_bad_violation_variable_lists_the_kinds() {
        let text = SeccompError::BadViolationVar("gpu".into()).to_string();
        assert!(text.contains("\"gpu\""), "{text}");
        for kind in ThreadKind::ALL {
            assert!(text.contains(kind.name()), "{text}");
        }
    }
}
