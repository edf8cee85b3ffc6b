//! Typed VM configuration, validated at the edge.
//!
//! The command line (and later the API socket) produce a [`VmConfig`]; nothing
//! here touches KVM. [`VmConfig::validate`] checks every rule before a VM is
//! built, so that bad input ends with one clear error and never reaches KVM.
//!
//! - this module: the VM, its clock options and what sampling writes;
//! - [`kperf`]: the kperf configuration (actions, timers, PET), from JSON or
//!   the command line's shorthands, and the engine it sets up.

pub mod kperf;
mod kperf_error;
mod samplers;

use std::path::PathBuf;
use std::time::Duration;

use ::kperf::trace::Level;
use metronome_abi::{layout, Workload, MAX_VCPUS};

pub use self::kperf::{
    ActionConfig, KperfConfig, KperfConfigError, KperfShorthand, PetConfig, SampleTier, Samplers,
    TimerConfig,
};

/// Where the kernel comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelSource {
    /// The guest kernel embedded in the binary.
    Embedded,
    /// An ELF file on the host.
    File(PathBuf),
}

/// Where the guest console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleSink {
    /// The VMM's standard output.
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
    /// Discarded.
    Null,
}

/// Everything needed to build and run one VM.
#[derive(Clone, Debug, PartialEq)]
pub struct VmConfig {
    /// Number of vCPUs (1..=[`MAX_VCPUS`]).
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// The guest kernel.
    pub kernel: KernelSource,
    /// Guest workload time; the guest exits 0 after this much uptime. `None` = until stopped.
    pub duration: Option<Duration>,
    /// Host wall-clock limit; the VMM ends the VM when it passes.
    pub timeout: Option<Duration>,
    /// The guest console.
    pub console: ConsoleSink,
    /// The workload the guest runs.
    pub workload: Workload,
    /// Workload parameter (ping-pong round trips per partner).
    pub workload_arg: u64,
    /// Send stress interrupts to every vCPU at this rate (Hz) while the guest runs.
    pub kick_stress_hz: Option<u32>,
    /// The guest's clockintr frequencies and flags (validated by clockintr itself).
    pub clock: clockintr::Config,
    /// Seed of the guest's statclock generator.
    pub stat_seed: u64,
    /// A guest thread switches statclock profiling on for the middle third of the run.
    pub profile_middle_third: bool,
    /// Host-side sampling (kptimer), when wanted.
    pub sampling: Option<SamplingConfig>,
    /// Timer advance: each vCPU arms its host timer early by the wake
    /// latency it learns, then waits for the deadline and injects at it
    /// (`crate::vcpu::advance`). On by default; `--no-timer-advance` turns it off.
    pub timer_advance: bool,
}

/// What host-side sampling is asked to do: the kperf configuration, and
/// where its results go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SamplingConfig {
    /// The actions, timers and PET knobs of the engine.
    pub kperf: KperfConfig,
    /// Where to write profile.folded, profile.svg and profile.pb.gz.
    pub profile_dir: Option<PathBuf>,
    /// Where to write the trace as JSON lines.
    pub trace_file: Option<PathBuf>,
    /// The trace keeps the events of this level and below (TR-E-3:
    /// `kperf.debug_level`).
    pub trace_level: Level,
    /// Sampling starts with the VM (the command line); `false`: it waits
    /// for [`crate::VmController::sampling_start`] (the API), and the
    /// configuration may have no action yet.
    pub start_at_boot: bool,
}

impl SamplingConfig {
    /// The trace level when none is given: info (1), which keeps
    /// `TM_HNDLR` end records.
    pub const DEFAULT_TRACE_LEVEL: Level = Level::Info;

    /// Sampling with `kperf`, no files, the default trace level.
    pub fn new(kperf: KperfConfig) -> Self {
        Self {
            kperf,
            profile_dir: None,
            trace_file: None,
            trace_level: Self::DEFAULT_TRACE_LEVEL,
            start_at_boot: true,
        }
    }

    /// The API's sampling when the command line configured none: an empty
    /// kperf configuration (no actions, no timers), sampling off until asked.
    pub fn on_request() -> Self {
        Self {
            start_at_boot: false,
            ..Self::new(KperfConfig::default())
        }
    }

    /// The engine this configuration sets up ([`KperfConfig::engine`]; with
    /// sampling started on request, [`KperfConfig::engine_on_request`]).
    ///
    /// # Errors
    ///
    /// The first rule broken.
    pub fn engine(&self) -> Result<::kperf::Kperf, KperfConfigError> {
        if self.start_at_boot {
            self.kperf.engine()
        } else {
            self.kperf.engine_on_request()
        }
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            vcpus: 2,
            mem_mib: 128,
            kernel: KernelSource::Embedded,
            duration: Some(Duration::from_secs(3)),
            timeout: None,
            console: ConsoleSink::Stdout,
            workload: Workload::Demo,
            workload_arg: 1000,
            kick_stress_hz: None,
            clock: clockintr::Config::openbsd_amd64(),
            stat_seed: 1,
            profile_middle_third: false,
            sampling: None,
            timer_advance: true,
        }
    }
}

/// A configuration rule that was broken.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// vCPU count out of range.
    #[error("--vcpus {0} is out of range: a VM has 1 to {MAX_VCPUS} vCPUs")]
    Vcpus(u32),
    /// Memory size out of range.
    #[error(
        "--mem-mib {0} is out of range: guest memory is {min} to {max} MiB",
        min = layout::MIN_MEM_MIB,
        max = layout::MAX_MEM_MIB
    )]
    Memory(u64),
    /// Duration out of range.
    #[error("--duration {0:?} is out of range: it must be longer than 0 s and at most 1 day")]
    Duration(Duration),
    /// Timeout out of range.
    #[error("--timeout {0:?} is out of range: it must be longer than 0 s and at most 1 day")]
    Timeout(Duration),
    /// Stress rate out of range.
    #[error("--kick-stress-hz {0} is out of range: 1 to 100000")]
    StressRate(u32),
    /// A clock configuration clockintr_init would reject (CI-INIT-3, AMB-4).
    #[error("invalid clock configuration: {0}")]
    Clock(clockintr::Error),
    /// A sampling period out of range.
    #[error("--sample-period-us {0} is out of range: 1 to 10000000 us (periods below 20 us are raised to 20 us, KT-MIN-1)")]
    SamplePeriod(u64),
    /// A PET period out of range.
    #[error("--pet-period-ms {0} is out of range: 1 to 10000 ms (periods below 2 ms are raised to 2 ms, KT-MIN-1)")]
    PetPeriod(u64),
    /// A kperf configuration that breaks a rule.
    #[error(transparent)]
    Kperf(#[from] KperfConfigError),
    /// hz beyond what this VMM can deliver.
    #[error("--hz {0} is too high for this VMM: at most 10000")]
    HzTooHigh(u32),
    /// The chaos workload with a single vCPU.
    #[error("--workload chaos needs at least 2 vCPUs (vCPU 0 stays well-behaved, the others misbehave); --vcpus is {0}")]
    ChaosVcpus(u32),
}

/// Reads the JSON file at `path` as a `T`; `read` and `parse` word the two
/// ways it can fail (the `--kperf` and `--config-file` files).
pub(crate) fn read_json_file<T: serde::de::DeserializeOwned, E>(
    path: &std::path::Path,
    read: impl FnOnce(PathBuf, std::io::Error) -> E,
    parse: impl FnOnce(PathBuf, serde_json::Error) -> E,
) -> Result<T, E> {
    let text = std::fs::read_to_string(path).map_err(|e| read(path.to_owned(), e))?;
    serde_json::from_str(&text).map_err(|e| parse(path.to_owned(), e))
}

/// Longest duration or timeout accepted.
const MAX_SPAN: Duration = Duration::from_secs(24 * 3600);

impl VmConfig {
    /// Checks every rule; the first broken one is the error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if !(layout::MIN_MEM_MIB..=layout::MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(ConfigError::Memory(self.mem_mib));
        }
        if let Some(d) = self.duration {
            if d.is_zero() || d > MAX_SPAN {
                return Err(ConfigError::Duration(d));
            }
        }
        if let Some(t) = self.timeout {
            if t.is_zero() || t > MAX_SPAN {
                return Err(ConfigError::Timeout(t));
            }
        }
        if let Some(rate) = self.kick_stress_hz {
            if rate == 0 || rate > 100_000 {
                return Err(ConfigError::StressRate(rate));
            }
        }
        self.clock.validate().map_err(ConfigError::Clock)?;
        if let Some(sampling) = &self.sampling {
            sampling.engine()?;
            sampling.kperf.check_samplers(crate::pmu::probe())?;
        }
        if self.clock.hz > 10_000 {
            return Err(ConfigError::HzTooHigh(self.clock.hz));
        }
        if self.workload == Workload::Chaos && self.vcpus < 2 {
            return Err(ConfigError::ChaosVcpus(self.vcpus));
        }
        Ok(())
    }

    /// Guest RAM in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_default_config_is_valid() {
        VmConfig::default().validate().unwrap();
    }

    #[test]
    fn test_each_rule_rejects() {
        let base = VmConfig::default();
        let cases = [
            (
                VmConfig {
                    vcpus: 0,
                    ..base.clone()
                },
                ConfigError::Vcpus(0),
            ),
            (
                VmConfig {
                    vcpus: 1000,
                    ..base.clone()
                },
                ConfigError::Vcpus(1000),
            ),
            (
                VmConfig {
                    mem_mib: 1,
                    ..base.clone()
                },
                ConfigError::Memory(1),
            ),
            (
                VmConfig {
                    mem_mib: 1 << 20,
                    ..base.clone()
                },
                ConfigError::Memory(1 << 20),
            ),
            (
                VmConfig {
                    duration: Some(Duration::ZERO),
                    ..base.clone()
                },
                ConfigError::Duration(Duration::ZERO),
            ),
            (
                VmConfig {
                    timeout: Some(Duration::ZERO),
                    ..base.clone()
                },
                ConfigError::Timeout(Duration::ZERO),
            ),
            (
                VmConfig {
                    kick_stress_hz: Some(0),
                    ..base.clone()
                },
                ConfigError::StressRate(0),
            ),
            (
                VmConfig {
                    clock: clockintr::Config {
                        hz: 0,
                        ..base.clock
                    },
                    ..base.clone()
                },
                ConfigError::Clock(clockintr::Error::Hz(0)),
            ),
            (
                VmConfig {
                    clock: clockintr::Config {
                        hz: 20_000,
                        ..base.clock
                    },
                    ..base.clone()
                },
                ConfigError::HzTooHigh(20_000),
            ),
            (
                VmConfig {
                    workload: Workload::Chaos,
                    vcpus: 1,
                    ..base.clone()
                },
                ConfigError::ChaosVcpus(1),
            ),
        ];
        for (config, error) in cases {
            let refused = config.validate().expect_err("refused");
            assert_eq!(refused.to_string(), error.to_string());
        }
    }

    #[test]
    fn test_sampling_rules_reject_with_kperf_reasons() {
        let with = |kperf: KperfConfig| VmConfig {
            sampling: Some(SamplingConfig::new(kperf)),
            ..VmConfig::default()
        };
        with(KperfConfig::on_cpu(
            1_000_000,
            ::kperf::sampler::TH_INFO,
            None,
        ))
        .validate()
        .unwrap();
        let both_pmc = ::kperf::sampler::PMC_THREAD | ::kperf::sampler::PMC_CPU;
        let refused = with(KperfConfig::on_cpu(1_000_000, both_pmc, None))
            .validate()
            .expect_err("CFG-A-3");
        assert!(
            matches!(
                refused,
                ConfigError::Kperf(KperfConfigError::PmcThreadAndCpu(1))
            ),
            "{refused}"
        );
        assert!(refused.to_string().contains("CFG-A-3"), "{refused}");
    }

    #[test]
    fn test_error_messages_name_the_rule() {
        let message = ConfigError::Vcpus(0).to_string();
        assert!(
            message.contains("--vcpus 0") && message.contains("1 to 64"),
            "{message}"
        );
        let message = ConfigError::Memory(1).to_string();
        assert!(message.contains("64 to 3072 MiB"), "{message}");
    }
}
