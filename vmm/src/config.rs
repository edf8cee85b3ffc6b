//! Typed VM configuration, validated at the edge.
//!
//! The command line (and later the API socket) produce a [`VmConfig`]; nothing
//! here touches KVM. [`VmConfig::validate`] checks every rule before a VM is
//! built, so that bad input ends with one clear error and never reaches KVM.

use std::path::PathBuf;
use std::time::Duration;

use kperf::{Kperf, KperfError};
use metronome_abi::{layout, Workload, MAX_VCPUS};

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
}

/// What host-side sampling is asked to do: one kperf action and one kptimer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SamplingConfig {
    /// Timer period in ns (raised to the kptimer minimum silently, KT-MIN-1).
    pub period_ns: u64,
    /// Sampler bits of the timer's action ([`kperf::sampler`]).
    pub samplers: u32,
    /// Where to write profile.folded, profile.svg and profile.pb.gz.
    pub profile_dir: Option<PathBuf>,
    /// Where to write the trace as JSON lines.
    pub trace_file: Option<PathBuf>,
    /// Sample only this guest thread id (kperf's pid filter; -1 = all).
    pub filter_tid: i32,
    /// A traditional PET timer with this period (timer 1, the same action).
    pub pet_period_ns: Option<u64>,
}

impl SamplingConfig {
    /// The kperf engine this configuration sets up (pure: no threads, no
    /// timers): action 1 with the samplers and filter, timer 0 with the period.
    pub fn engine(&self) -> Result<Kperf, KperfError> {
        let mut kperf = Kperf::new();
        kperf.set_action_count(1)?;
        kperf.set_action_samplers(1, self.samplers)?;
        kperf.set_action_filter(1, self.filter_tid)?;
        let timers = if self.pet_period_ns.is_some() { 2 } else { 1 };
        kperf.set_timer_count(timers)?;
        kperf.set_timer_period(0, self.period_ns)?;
        kperf.set_timer_action(0, 1)?;
        if let Some(period) = self.pet_period_ns {
            kperf.set_timer_period(1, period)?;
            kperf.set_timer_action(1, 1)?;
            kperf.set_pet_timer(1)?;
        }
        Ok(kperf)
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
        }
    }
}

/// A configuration rule that was broken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
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
    /// A sampler set kperf refuses.
    #[error("--samplers {0:#x} is refused by kperf: {1} (CFG-A-3: pmc_thread and pmc_cpu exclude each other)")]
    Samplers(u32, KperfError),
    /// hz beyond what this VMM can deliver.
    #[error("--hz {0} is too high for this VMM: at most 10000")]
    HzTooHigh(u32),
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
            if !(1_000..=10_000_000_000).contains(&sampling.period_ns) {
                return Err(ConfigError::SamplePeriod(sampling.period_ns / 1_000));
            }
            if let Err(e) = sampling.engine() {
                return Err(ConfigError::Samplers(sampling.samplers, e));
            }
        }
        if self.clock.hz > 10_000 {
            return Err(ConfigError::HzTooHigh(self.clock.hz));
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
        assert_eq!(VmConfig::default().validate(), Ok(()));
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
        ];
        for (config, error) in cases {
            assert_eq!(config.validate(), Err(error));
        }
    }

    #[test]
    fn test_sampling_rules_reject_with_kperf_reasons() {
        let sampling = SamplingConfig {
            period_ns: 1_000_000,
            samplers: kperf::sampler::TH_INFO,
            profile_dir: None,
            trace_file: None,
            filter_tid: -1,
            pet_period_ns: None,
        };
        let with = |sampling: SamplingConfig| VmConfig {
            sampling: Some(sampling),
            ..VmConfig::default()
        };
        assert_eq!(with(sampling.clone()).validate(), Ok(()));
        let both_pmc = kperf::sampler::PMC_THREAD | kperf::sampler::PMC_CPU;
        assert_eq!(
            with(SamplingConfig {
                samplers: both_pmc,
                ..sampling.clone()
            })
            .validate(),
            Err(ConfigError::Samplers(both_pmc, KperfError::Inval))
        );
        assert_eq!(
            with(SamplingConfig {
                period_ns: 999,
                ..sampling.clone()
            })
            .validate(),
            Err(ConfigError::SamplePeriod(0))
        );
        // Below the kptimer minimum is accepted and raised (KT-MIN-1).
        let engine = SamplingConfig {
            period_ns: 5_000,
            ..sampling
        }
        .engine()
        .unwrap();
        assert_eq!(engine.timer_period(0), Ok(kperf::MIN_PERIOD_NS));
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
