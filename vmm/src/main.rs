//! `metronome`: run a guest under KVM with exact, observable time.
//!
//! Exit codes: 0 guest exited 0; 1 guest exited non-zero; 2 invalid input;
//! 3 guest fault or panic; 4 `--timeout`; 5 SIGINT/SIGTERM; 6 host error; 7 a
//! thread made a system call its seccomp filter forbids (`vmm::seccomp`;
//! `--no-seccomp` turns the filters off, for debugging only).
//!
//! With `--api-sock PATH` the VMM serves the API on PATH and boots nothing
//! until `InstanceStart`; the VM options on the command line are the
//! configuration the API starts from. The server runs until SIGINT or
//! SIGTERM (a VM still running then stops with outcome `signal`), and exits
//! 0 then; 2 for invalid options or an existing PATH without
//! `--api-sock-force`; 6 when the socket cannot be served.
//!
//! With `--config-file FILE` the pre-boot API bodies come from FILE and the
//! VM boots at once (`vmm::api::config_file`); a flag that sets what a
//! section of the file sets is refused (exit 2, naming both). With
//! `--api-sock` as well, the API serves the running instance; `--no-api`
//! refuses `--api-sock`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::parser::ValueSource;
use clap::{ArgGroup, ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use metronome_abi::{exit, Workload};
use vmm::api::{self, ApiServeError, ConfigFile, ConfigFileError, Instance, OnVmEnd};
use vmm::config::{ConfigError, KperfConfig, KperfShorthand};
use vmm::seccomp::{self, ThreadKind};
use vmm::{
    BuildVmError, ConsoleSink, KernelSource, SamplingConfig, Summary, Vm, VmConfig, VmController,
};

#[derive(Parser, Debug)]
#[command(
    name = "metronome",
    version,
    about = "Run a guest under KVM with exact, observable time",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

// The run options are large and parsed once: boxing them buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Boot the guest and run its workload (the default).
    Run(RunArgs),
    /// Measure timer lateness, sampling overhead against perf, boot time
    /// and memory in one run; print the Markdown tables.
    Bench(BenchArgs),
}

/// `metronome bench`'s options.
#[derive(clap::Args, Debug, Clone)]
struct BenchArgs {
    /// The CI smoke run: 1,000 timer deliveries per phase and 0.7 s sampling
    /// windows instead of 10,000 and 4 s (under a minute).
    #[arg(long)]
    quick: bool,
    /// Write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write the Markdown tables to FILE (they are printed either way).
    #[arg(long, value_name = "FILE")]
    markdown: Option<PathBuf>,
    /// Write the SVG latency histograms (timer_halted.svg, timer_busy.svg) to DIR.
    #[arg(long, value_name = "DIR")]
    svg_dir: Option<PathBuf>,
    /// Do not run perf (its overhead figures are then null).
    #[arg(long)]
    no_perf: bool,
    /// Debugging only: no seccomp filter on any thread (a warning says so).
    #[arg(long)]
    no_seccomp: bool,
}

#[derive(clap::Args, Debug, Clone)]
#[command(group(
    ArgGroup::new("sampling")
        .multiple(true)
        .args(["sample_period_us", "pet_period_ms", "kperf", "config_file"])
))]
#[command(group(
    ArgGroup::new("trace_out")
        .multiple(true)
        .args(["trace", "profile_dir"])
))]
struct RunArgs {
    /// Number of vCPUs (1 to 64).
    #[arg(long, value_name = "N", default_value_t = 2)]
    vcpus: u32,
    /// Guest memory in MiB (64 to 3072).
    #[arg(long, value_name = "M", default_value_t = 128)]
    mem_mib: u64,
    /// Guest kernel ELF to boot instead of the embedded one.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Guest workload time in seconds; the guest then exits 0.
    #[arg(long, value_name = "SECS", default_value = "3", value_parser = parse_seconds, allow_negative_numbers = true)]
    duration: Duration,
    /// Host wall-clock limit in seconds; a guest still running then is stopped.
    #[arg(long, value_name = "SECS", value_parser = parse_seconds, allow_negative_numbers = true)]
    timeout: Option<Duration>,
    /// Write the guest console to FILE instead of standard output.
    #[arg(long, value_name = "FILE")]
    console: Option<PathBuf>,
    /// Write the run summary as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    summary_json: Option<PathBuf>,
    /// The guest workload.
    #[arg(long, value_enum, default_value_t = WorkloadArg::Demo)]
    workload: WorkloadArg,
    /// Ping-pong round trips per partner vCPU (with --workload pingpong).
    #[arg(long, value_name = "N", default_value_t = 1000)]
    rounds: u64,
    /// Send stress interrupts to every vCPU at this rate while the guest runs.
    #[arg(long, value_name = "HZ")]
    kick_stress_hz: Option<u32>,
    /// hardclock frequency (OpenBSD amd64 default 100).
    #[arg(long, value_name = "HZ", default_value_t = 100)]
    hz: u32,
    /// statclock frequency [default: hz].
    #[arg(long, value_name = "HZ")]
    stathz: Option<u32>,
    /// statclock frequency while profiling [default: 10 * stathz].
    #[arg(long, value_name = "HZ")]
    profhz: Option<u32>,
    /// schedclock frequency; 0 = no schedclock event.
    #[arg(
        long,
        value_name = "HZ",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    schedhz: i64,
    /// Randomize the statclock (CL_RNDSTAT; the default).
    #[arg(long, overrides_with = "no_rndstat")]
    rndstat: bool,
    /// Use a fixed statclock period.
    #[arg(long, overrides_with = "rndstat")]
    no_rndstat: bool,
    /// Seed of the guest's statclock generator.
    #[arg(long, value_name = "N", default_value_t = 1)]
    stat_seed: u64,
    /// A guest thread switches statclock profiling on for the middle third of the run.
    #[arg(long)]
    profile_middle_third: bool,
    /// Arm each vCPU's host timer at the deadline itself, not early by the
    /// wake latency it learns (timer advance is on by default).
    #[arg(long)]
    no_timer_advance: bool,
    /// Sample every vCPU from the host with a kperf configuration: a JSON
    /// file of actions, timers and PET (the schema is in README).
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "sample_period_us", "samplers", "sample_tid", "pet_period_ms", "lightweight_pet", "pet_idle_rate",
        "sample_tier",
    ])]
    kperf: Option<PathBuf>,
    /// How --sample-period-us samples: kick (stop the vCPU, take stacks),
    /// no-exit (perf_event in the host kernel: IP and thread, no exit) or
    /// hybrid (no-exit every period, a kick with stacks every --kick-every).
    #[arg(long, value_name = "TIER", requires = "sample_period_us")]
    sample_tier: Option<vmm::config::SampleTier>,
    /// With --sample-tier hybrid: a kick with stacks every N periods (2 to 1000; default 10).
    #[arg(long, value_name = "N", requires = "sample_tier")]
    kick_every: Option<u32>,
    /// Sample every vCPU from the host with a kptimer of this period (µs;
    /// below 20 µs is raised to 20 µs, as kperf does).
    #[arg(long, value_name = "N")]
    sample_period_us: Option<u64>,
    /// Also sample with a PET timer of this period (ms; below 2 ms is
    /// raised to 2 ms), with the same action.
    #[arg(long, value_name = "MS")]
    pet_period_ms: Option<u64>,
    /// Lightweight PET: the PET timer runs on the vCPUs (with --pet-period-ms).
    #[arg(long, requires = "pet_period_ms")]
    lightweight_pet: bool,
    /// PET passes an idle thread skips its call stacks for (with --pet-period-ms).
    #[arg(long, value_name = "N", default_value_t = kperf::PET_DEFAULT_IDLE_RATE, requires = "pet_period_ms")]
    pet_idle_rate: u32,
    /// What each sample takes: comma-separated kperf sampler names
    /// (th_info, ustack, kstack, sys_mem, ...) or a number.
    #[arg(long, value_name = "LIST", default_value = "th_info,ustack,kstack", value_parser = kperf::sampler::parse_list)]
    samplers: u32,
    /// Write profile.folded, profile.svg, profile.pb.gz and the trace as
    /// trace.json (Chrome trace-event JSON) here (with sampling).
    #[arg(long, value_name = "DIR", requires = "sampling")]
    profile_dir: Option<PathBuf>,
    /// Sample only this guest thread id (kperf's pid filter; -1 = every thread).
    #[arg(long, value_name = "TID", default_value_t = -1, allow_negative_numbers = true, requires = "sampling")]
    sample_tid: i32,
    /// Write the trace (kperf's TM_*/PET_* events, the guest's clock
    /// dispatches and thread switches): Chrome trace-event JSON if FILE ends
    /// in .json, JSON lines otherwise (with sampling).
    #[arg(long, value_name = "FILE", requires = "sampling")]
    trace: Option<PathBuf>,
    /// The trace keeps events of this level and below: 0 data, 1 info, 2
    /// verbose (kperf's debug_level).
    #[arg(long, value_name = "L", default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=2), requires = "trace_out")]
    trace_level: u32,
    /// Print every vCPU's pending clockintr events when the VM ends.
    #[arg(long)]
    dump_clockintr: bool,
    /// Print no human summary.
    #[arg(long)]
    quiet: bool,
    /// Serve the API (HTTP/1.1, JSON) on a Unix socket at PATH and boot on
    /// its InstanceStart; the VM options here are the defaults it starts from.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Replace an existing file at the --api-sock path.
    #[arg(long, requires = "api_sock")]
    api_sock_force: bool,
    /// Boot at once with the pre-boot API bodies in a JSON file:
    /// {"machine-config", "boot-source", "clock", "kperf"}; a flag of a
    /// section the file has is refused.
    #[arg(long, value_name = "FILE")]
    config_file: Option<PathBuf>,
    /// No API socket (with --config-file; refuses --api-sock).
    #[arg(long, requires = "config_file", conflicts_with = "api_sock")]
    no_api: bool,
    /// Debugging only: no seccomp filter on any thread (a warning says so).
    #[arg(long)]
    no_seccomp: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum WorkloadArg {
    /// CPL3 threads that compute, yield and sleep on every vCPU.
    Demo,
    /// IPI round trips between vCPU 0 and the others.
    Pingpong,
    /// A thread dereferences an unmapped address (tests fault reporting).
    Fault,
    /// vCPU 0 spins at CPL0 with interrupts off (tests --timeout).
    SpinCpl0,
    /// Exit right after boot (measures boot time).
    ExitNow,
    /// Threads with a designed profile: a 60/30/10 split across three leaf
    /// functions, a sleeper, a producer and a consumer blocked on it.
    Profile,
    /// The hostile guest: vCPU 0 runs the demo threads, every other vCPU
    /// misuses every device, the timer, interrupt masking, its frame
    /// pointers and the thread table (seeded by --stat-seed); needs 2 vCPUs.
    Chaos,
}

impl From<WorkloadArg> for Workload {
    fn from(arg: WorkloadArg) -> Self {
        match arg {
            WorkloadArg::Demo => Workload::Demo,
            WorkloadArg::Pingpong => Workload::PingPong,
            WorkloadArg::Fault => Workload::Fault,
            WorkloadArg::SpinCpl0 => Workload::SpinCpl0,
            WorkloadArg::ExitNow => Workload::ExitNow,
            WorkloadArg::Profile => Workload::Profile,
            WorkloadArg::Chaos => Workload::Chaos,
        }
    }
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("'{text}' is not a number of seconds"))?;
    if !(secs > 0.0 && secs <= 86_400.0) {
        return Err(format!(
            "{secs} s is out of range: more than 0 and at most 86400"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

impl RunArgs {
    /// The kperf configuration: the `--kperf` file, or the shorthands.
    fn kperf_config(&self) -> Result<Option<KperfConfig>, ConfigError> {
        if let Some(path) = &self.kperf {
            return Ok(Some(KperfConfig::from_file(path)?));
        }
        KperfShorthand {
            sample_period_us: self.sample_period_us,
            pet_period_ms: self.pet_period_ms,
            samplers: self.samplers,
            filter_tid: self.sample_tid,
            lightweight_pet: self.lightweight_pet,
            pet_idle_rate: self.pet_idle_rate,
        }
        .to_config()
        .map(|config| match self.sample_tier {
            Some(tier) => config.map(|c| c.with_tier(tier, self.kick_every)),
            None => config,
        })
    }

    fn to_config(&self) -> Result<VmConfig, ConfigError> {
        let sampling = self.kperf_config()?.map(|kperf| SamplingConfig {
            kperf,
            profile_dir: self.profile_dir.clone(),
            trace_file: self.trace.clone(),
            trace_level: kperf::trace::Level::from_debug_level(self.trace_level)
                .unwrap_or(SamplingConfig::DEFAULT_TRACE_LEVEL),
            start_at_boot: true,
        });
        Ok(VmConfig {
            vcpus: self.vcpus,
            mem_mib: self.mem_mib,
            kernel: self
                .kernel
                .clone()
                .map_or(KernelSource::Embedded, KernelSource::File),
            duration: Some(self.duration),
            timeout: self.timeout,
            console: self
                .console
                .clone()
                .map_or(ConsoleSink::Stdout, ConsoleSink::File),
            workload: if self.kick_stress_hz.is_some() && self.workload == WorkloadArg::Demo {
                Workload::KickStress
            } else {
                self.workload.into()
            },
            workload_arg: self.rounds,
            kick_stress_hz: self.kick_stress_hz,
            clock: {
                let stathz = self.stathz.unwrap_or(self.hz);
                clockintr::Config {
                    hz: self.hz,
                    stathz,
                    profhz: self.profhz.unwrap_or(stathz.saturating_mul(10)),
                    schedhz: self.schedhz,
                    flags: if self.no_rndstat {
                        0
                    } else {
                        clockintr::CL_RNDSTAT
                    },
                }
            },
            stat_seed: self.stat_seed,
            profile_middle_third: self.profile_middle_third,
            sampling,
            timer_advance: !self.no_timer_advance,
        })
    }
}

/// Prints an error and its source chain on one line.
fn print_error(error: &dyn std::error::Error) {
    let mut line = format!("metronome: error: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    eprintln!("{line}");
}

fn main() -> ExitCode {
    let process_start = Instant::now();
    // Before anything touches a signal disposition.
    vmm::stop_signals::note_inherited();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|matches| Cli::from_arg_matches(&matches).map(|cli| (matches, cli)));
    let (matches, cli) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => return clap_error(&e),
    };
    let run_matches = matches.subcommand_matches("run").unwrap_or(&matches);
    let no_seccomp = match &cli.command {
        Some(Command::Run(args)) => args.no_seccomp,
        Some(Command::Bench(args)) => args.no_seccomp,
        None => cli.run.no_seccomp,
    };
    if let Err(code) = seccomp_init(no_seccomp) {
        return code;
    }
    let args = match cli.command {
        Some(Command::Run(args)) => args,
        Some(Command::Bench(args)) => return bench(&args, process_start),
        None => cli.run,
    };
    let config = match args.to_config() {
        Ok(config) => config,
        Err(e) => {
            print_error(&e);
            return ExitCode::from(exit::VMM_BAD_INPUT as u8);
        }
    };
    let config = match &args.config_file {
        None => config,
        Some(path) => match with_config_file(&args, run_matches, path, config) {
            Ok(config) => config,
            Err(e) => {
                print_error(e.as_ref());
                return ExitCode::from(exit::VMM_BAD_INPUT as u8);
            }
        },
    };
    if let Some(path) = args.api_sock.clone() {
        if let Err(e) = config.validate() {
            print_error(&e);
            return ExitCode::from(exit::VMM_BAD_INPUT as u8);
        }
        return serve_api(args, config, &path);
    }
    let vm = match Vm::build(config) {
        Ok(vm) => vm,
        Err(e) => {
            print_error(&e);
            let code = match e {
                BuildVmError::Config(_)
                | BuildVmError::ReadKernel { .. }
                | BuildVmError::Kernel { .. }
                | BuildVmError::Console { .. } => exit::VMM_BAD_INPUT,
                _ => exit::VMM_HOST_ERROR,
            };
            return ExitCode::from(code as u8);
        }
    };
    match vm.start(process_start) {
        Ok(running) => {
            // The vCPUs (and the signal, PET, perf and stress threads)
            // run under their own filters; this thread, from here on the
            // VMM thread, under the VMM's.
            if let Err(e) = seccomp::install(ThreadKind::Vmm) {
                print_error(&e);
                return ExitCode::from(exit::VMM_HOST_ERROR as u8);
            }
            let controller = running.controller();
            let summary = running.wait();
            report(&args, &summary, &controller, false)
        }
        Err((vm, reason)) => {
            eprintln!("metronome: error: {reason}");
            drop(vm);
            ExitCode::from(exit::VMM_HOST_ERROR as u8)
        }
    }
}

/// `metronome bench`: runs it, prints the Markdown tables; exit 0, 5 on
/// SIGINT/SIGTERM, or 6 when a phase fails (the error and its causes on one
/// line).
/// Turns the seccomp filters on, or warns that they are off.
fn seccomp_init(off: bool) -> Result<(), ExitCode> {
    if off {
        eprintln!(
            "metronome: warning: --no-seccomp: NO SECCOMP FILTERS; every thread may make any \
             system call (for debugging only)"
        );
        return Ok(());
    }
    seccomp::init().map_err(|e| {
        print_error(&e);
        let code = match e {
            seccomp::SeccompError::BadViolationVar(_) => exit::VMM_BAD_INPUT,
            _ => exit::VMM_HOST_ERROR,
        };
        ExitCode::from(code as u8)
    })
}

fn bench(args: &BenchArgs, process_start: Instant) -> ExitCode {
    let options = vmm::bench::BenchOptions {
        quick: args.quick,
        json: args.json.clone(),
        markdown: args.markdown.clone(),
        svg_dir: args.svg_dir.clone(),
        no_perf: args.no_perf,
    };
    match vmm::bench::run(&options, process_start) {
        Ok(report) => {
            print!("{}", report.markdown());
            ExitCode::SUCCESS
        }
        Err(e) => {
            print_error(&e);
            let code = match e {
                vmm::bench::BenchError::Signalled(_) => exit::VMM_SIGNALLED,
                _ => exit::VMM_HOST_ERROR,
            };
            ExitCode::from(code as u8)
        }
    }
}

/// Prints clap's error (one line: what was wrong and what is allowed) and
/// exits 2; `--help` and `--version` print and exit 0.
fn clap_error(e: &clap::Error) -> ExitCode {
    if !e.use_stderr() {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    // clap's message up to the usage hint, folded onto one line.
    let rendered = e.render().to_string();
    let message: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .take_while(|l| !l.is_empty() && !l.starts_with("Usage:"))
        .collect();
    let message = message.join(" ");
    eprintln!("metronome: {}", message.trim_start_matches("error: "));
    ExitCode::from(exit::VMM_BAD_INPUT as u8)
}

/// `--config-file`: the command line's configuration `base` (valid; no
/// flag of a section the file has, [`ConfigFile::check_flags`]) with the
/// file's sections applied.
fn with_config_file(
    args: &RunArgs,
    matches: &ArgMatches,
    path: &std::path::Path,
    base: VmConfig,
) -> Result<VmConfig, Box<dyn std::error::Error>> {
    let file = ConfigFile::read(path)?;
    file.check_flags(|id| matches.value_source(id) == Some(ValueSource::CommandLine))?;
    base.validate()?;
    let files = SamplingConfig {
        profile_dir: args.profile_dir.clone(),
        trace_file: args.trace.clone(),
        trace_level: kperf::trace::Level::from_debug_level(args.trace_level)
            .unwrap_or(SamplingConfig::DEFAULT_TRACE_LEVEL),
        ..SamplingConfig::new(KperfConfig::default())
    };
    let config = file.apply(path, &base, &files)?;
    if config.sampling.is_none() && (args.profile_dir.is_some() || args.trace.is_some()) {
        return Err(Box::new(ConfigFileError::Invalid {
            path: path.to_owned(),
            message: "--profile-dir and --trace need sampling: a \"kperf\" section in the file \
                      (or --kperf, --sample-period-us, --pet-period-ms)"
                .into(),
        }));
    }
    Ok(config)
}

/// What the end of a VM prints and writes (`--dump-clockintr`,
/// `--summary-json`, the errors, the human summary), and its exit code.
/// With `api`, a stop the API asked for (SendExit) is not an error.
fn report(args: &RunArgs, summary: &Summary, controller: &VmController, api: bool) -> ExitCode {
    if args.dump_clockintr {
        print!("{}", controller.dump_clockintr());
    }
    if let Some(path) = &args.summary_json {
        let json = serde_json::to_string_pretty(summary).expect("the summary serialises");
        if let Err(e) = vmm::outfile::write_bytes(path, (json + "\n").as_bytes()) {
            eprintln!("metronome: error: the summary: {e}");
            return ExitCode::from(exit::VMM_HOST_ERROR as u8);
        }
    }
    let asked = api && summary.outcome == "stopped";
    if summary.exit_code != exit::VMM_OK && !asked {
        eprintln!("metronome: error: {}", summary.message);
    }
    for problem in &summary.errors {
        eprintln!("metronome: warning: {problem}");
    }
    if !args.quiet {
        print!("{}", summary.human());
    }
    ExitCode::from(summary.exit_code as u8)
}

/// `--api-sock`: serves the API until SIGINT or SIGTERM, with `config` (the
/// command line's, valid) as the configuration it starts from.
fn serve_api(args: RunArgs, config: VmConfig, path: &std::path::Path) -> ExitCode {
    let force = args.api_sock_force;
    // With --config-file the instance boots at once.
    let boot = args.config_file.is_some();
    let on_end: OnVmEnd = Box::new(move |summary, controller| {
        let _ = report(&args, summary, controller, true);
    });
    match api::serve_with(path, force, Instance::new(config, on_end), boot) {
        Ok(_signal) => ExitCode::SUCCESS,
        Err(e) => {
            print_error(&e);
            let code = match e {
                ApiServeError::SocketExists(_) => exit::VMM_BAD_INPUT,
                ApiServeError::Boot(e) if e.status.is_client_error() => exit::VMM_BAD_INPUT,
                _ => exit::VMM_HOST_ERROR,
            };
            ExitCode::from(code as u8)
        }
    }
}
