//! The API's request and answer bodies, and how a pre-boot request changes
//! the VM configuration. Every request type denies unknown fields; every
//! change is checked by [`VmConfig::validate`] before it is kept, so the
//! API's rules are the command line's.

use std::path::PathBuf;
use std::time::Duration;

use metronome_abi::{ClockintrStat, Workload};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::errors::ApiError;
use crate::config::{KernelSource, VmConfig};
use crate::summary::workload_name;

/// `GET /`: what the instance is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct InstanceInfo {
    /// The instance id (`metronome-<pid>`).
    pub id: String,
    /// `Not started`, `Running`, `Paused` or `Exited`.
    pub state: &'static str,
    /// The VMM's version.
    pub vmm_version: &'static str,
    /// `metronome`.
    pub app_name: &'static str,
}

/// `PUT`/`GET /machine-config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs.
    pub vcpu_count: u32,
    /// Guest memory in MiB.
    pub mem_size_mib: u64,
}

/// A pre-boot part of the configuration: `PUT` sets it (a field left out
/// takes the command line's value), `GET` reads it.
pub trait PreBootSection: DeserializeOwned + Send + Sync + 'static {
    /// Its path.
    const PATH: &'static str;
    /// What `GET` answers.
    type Current: Serialize;
    /// Its values in `config`.
    fn current(config: &VmConfig) -> Self::Current;
    /// Sets it in `config`, fields left out from `defaults`; the caller then
    /// checks the whole configuration ([`change`]).
    fn apply(&self, config: &mut VmConfig, defaults: &VmConfig) -> Result<(), ApiError>;
}

impl PreBootSection for MachineConfig {
    const PATH: &'static str = "/machine-config";
    type Current = Self;

    fn current(config: &VmConfig) -> Self {
        Self {
            vcpu_count: config.vcpus,
            mem_size_mib: config.mem_mib,
        }
    }

    fn apply(&self, config: &mut VmConfig, _defaults: &VmConfig) -> Result<(), ApiError> {
        config.vcpus = self.vcpu_count;
        config.mem_mib = self.mem_size_mib;
        Ok(())
    }
}

/// The workloads `PUT /boot-source` offers, by the command line's names
/// ([`workload_name`]): every one but `kick-stress`, which the command
/// line's `--kick-stress-hz` chooses, and the bench's own (`metronome
/// bench` runs them).
fn api_workloads() -> impl Iterator<Item = Workload> {
    (0..).map_while(Workload::from_u32).filter(|w| {
        !matches!(
            w,
            Workload::KickStress | Workload::BenchIdle | Workload::BenchCompute
        )
    })
}

/// The workload called `name`.
fn workload_by_name(name: &str) -> Result<Workload, ApiError> {
    api_workloads()
        .find(|w| workload_name(*w) == name)
        .ok_or_else(|| {
            let names: Vec<&str> = api_workloads().map(workload_name).collect();
            ApiError::bad_request(format!(
                "workload '{name}' is not a workload: one of {}",
                names.join(", ")
            ))
        })
}

/// `PUT /boot-source`: a field left out takes the command line's value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// A guest kernel ELF on the host; the embedded kernel when left out.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub kernel_image_path: Option<PathBuf>,
    /// The guest workload, by the command line's name (`demo`, `profile`, ...).
    #[serde(default)]
    pub workload: Option<String>,
    /// Guest workload time in seconds, after which the guest exits 0.
    #[serde(default)]
    pub duration_s: Option<f64>,
}

/// `GET /boot-source`: the boot source in force.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct BootSourceInfo {
    /// The kernel ELF, or `null` for the embedded kernel.
    #[schema(value_type = Option<String>)]
    pub kernel_image_path: Option<PathBuf>,
    /// The workload's name.
    pub workload: &'static str,
    /// Guest workload time in seconds, or `null` (until stopped).
    pub duration_s: Option<f64>,
}

impl PreBootSection for BootSource {
    const PATH: &'static str = "/boot-source";
    type Current = BootSourceInfo;

    fn current(config: &VmConfig) -> BootSourceInfo {
        BootSourceInfo {
            kernel_image_path: match &config.kernel {
                KernelSource::Embedded => None,
                KernelSource::File(path) => Some(path.clone()),
            },
            workload: workload_name(config.workload),
            duration_s: config.duration.map(|d| d.as_secs_f64()),
        }
    }

    fn apply(&self, config: &mut VmConfig, defaults: &VmConfig) -> Result<(), ApiError> {
        config.kernel = match &self.kernel_image_path {
            None => defaults.kernel.clone(),
            Some(path) if path.is_file() => KernelSource::File(path.clone()),
            Some(path) => {
                return Err(ApiError::bad_request(format!(
                    "kernel_image_path '{}' is not a file: give the path of a guest kernel ELF, or leave the field out for the embedded kernel",
                    path.display()
                )))
            }
        };
        config.workload = match &self.workload {
            None => defaults.workload,
            Some(name) => workload_by_name(name)?,
        };
        config.duration = match self.duration_s {
            None => defaults.duration,
            Some(secs) => Some(
                Duration::try_from_secs_f64(secs)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "duration_s {secs} is out of range: it must be longer than 0 s and at most 1 day"
                        ))
                    })?,
            ),
        };
        Ok(())
    }
}

/// `PUT /clock`: the guest's clockintr frequencies; a field left out takes
/// the command line's default for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClockConfig {
    /// hardclock frequency.
    pub hz: u32,
    /// statclock frequency; `hz` when left out.
    #[serde(default)]
    pub stathz: Option<u32>,
    /// statclock frequency while profiling; 10 × `stathz` when left out.
    #[serde(default)]
    pub profhz: Option<u32>,
    /// schedclock frequency; 0 (none) when left out.
    #[serde(default)]
    pub schedhz: i64,
    /// Randomize the statclock (CL_RNDSTAT); true when left out.
    #[serde(default = "randomize_default")]
    pub randomize_statclock: bool,
    /// Seed of the guest's statclock generator; the command line's when left out.
    #[serde(default)]
    pub stat_seed: Option<u64>,
}

fn randomize_default() -> bool {
    true
}

impl PreBootSection for ClockConfig {
    const PATH: &'static str = "/clock";
    type Current = Self;

    fn current(config: &VmConfig) -> Self {
        Self {
            hz: config.clock.hz,
            stathz: Some(config.clock.stathz),
            profhz: Some(config.clock.profhz),
            schedhz: config.clock.schedhz,
            randomize_statclock: config.clock.flags & clockintr::CL_RNDSTAT != 0,
            stat_seed: Some(config.stat_seed),
        }
    }

    fn apply(&self, config: &mut VmConfig, defaults: &VmConfig) -> Result<(), ApiError> {
        let stathz = self.stathz.unwrap_or(self.hz);
        config.clock = clockintr::Config {
            hz: self.hz,
            stathz,
            profhz: self.profhz.unwrap_or(stathz.saturating_mul(10)),
            schedhz: self.schedhz,
            flags: if self.randomize_statclock {
                clockintr::CL_RNDSTAT
            } else {
                0
            },
        };
        config.stat_seed = self.stat_seed.unwrap_or(defaults.stat_seed);
        Ok(())
    }
}

/// `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceAction {
    /// What to do.
    pub action_type: ActionType,
}

/// The actions `PUT /actions` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
pub enum ActionType {
    /// Build the VM from the configuration and start it.
    InstanceStart,
    /// Stop every vCPU out of the guest (the guest clock runs on).
    Pause,
    /// Let the vCPUs run again.
    Resume,
    /// No metrics sink is configured: acknowledged, nothing is written.
    FlushMetrics,
    /// End the VM; answers once it has stopped and its summary is ready.
    SendExit,
}

/// `GET /clockintr`: every vCPU's clockintr statistics and pending events.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ClockintrInfo {
    /// Guest uptime (the device clock) when read, in ns.
    pub uptime_ns: u64,
    /// Per vCPU, each read consistently.
    pub vcpus: Vec<ClockintrStat>,
    /// Their field-wise sum (kern.clockintr.stats).
    pub total: ClockintrStat,
    /// Per vCPU: hardclock calls and the resume re-sync figures.
    pub clocks: Vec<crate::summary::VcpuClock>,
    /// Every vCPU's pending clockintr events, like ddb's `show all clockintr`.
    pub dump: String,
}

/// Applies a pre-boot change to a copy of `config` and keeps it only if the
/// whole configuration still passes [`VmConfig::validate`].
pub fn change(
    config: &mut VmConfig,
    edit: impl FnOnce(&mut VmConfig) -> Result<(), ApiError>,
) -> Result<(), ApiError> {
    let mut candidate = config.clone();
    edit(&mut candidate)?;
    candidate.validate().map_err(|e| ApiError::config(&e))?;
    *config = candidate;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn test_machine_config_parses_and_applies() {
        let m: MachineConfig = put(r#"{"vcpu_count": 4, "mem_size_mib": 256}"#).unwrap();
        let mut config = VmConfig::default();
        change(&mut config, |c| m.apply(c, &VmConfig::default())).unwrap();
        assert_eq!((config.vcpus, config.mem_mib), (4, 256));
        assert_eq!(MachineConfig::current(&config), m);
    }

    #[test]
    fn test_request_types_refuse_unknown_fields_and_wrong_types() {
        let e =
            put::<MachineConfig>(r#"{"vcpu_count": 1, "mem_size_mib": 64, "x": 1}"#).unwrap_err();
        assert!(e.contains("unknown field `x`"), "{e}");
        let e = put::<MachineConfig>(r#"{"vcpu_count": "two", "mem_size_mib": 64}"#).unwrap_err();
        assert!(e.contains("expected u32"), "{e}");
        let e = put::<MachineConfig>(r#"{"vcpu_count": 2}"#).unwrap_err();
        assert!(e.contains("missing field `mem_size_mib`"), "{e}");
        let e = put::<InstanceAction>(r#"{"action_type": "Reboot"}"#).unwrap_err();
        assert!(e.contains("expected one of `InstanceStart`"), "{e}");
        let boot: BootSource = put(r#"{"workload": "busy"}"#).unwrap();
        let e = boot
            .apply(&mut VmConfig::default(), &VmConfig::default())
            .unwrap_err();
        assert_eq!(
            e.fault_message,
            "workload 'busy' is not a workload: one of demo, pingpong, fault, spin-cpl0, exit-now, profile, chaos"
        );
    }

    #[test]
    fn test_out_of_range_changes_are_refused_and_not_kept() {
        let mut config = VmConfig::default();
        let m = MachineConfig {
            vcpu_count: 0,
            mem_size_mib: 128,
        };
        let e = change(&mut config, |c| m.apply(c, &VmConfig::default())).unwrap_err();
        assert!(e.fault_message.starts_with("vcpu_count 0 is out of range"));
        assert_eq!(config, VmConfig::default());
        let clock: ClockConfig = put(r#"{"hz": 100, "profhz": 150}"#).unwrap();
        let defaults = VmConfig::default();
        let e = change(&mut config, |c| clock.apply(c, &defaults)).unwrap_err();
        assert!(
            e.fault_message
                .contains("profhz 150 is not a multiple of stathz 100"),
            "{}",
            e.fault_message
        );
        let boot: BootSource = put(r#"{"duration_s": -1}"#).unwrap();
        let e = change(&mut config, |c| boot.apply(c, &defaults)).unwrap_err();
        assert!(e.fault_message.starts_with("duration_s -1 is out of range"));
        let boot: BootSource = put(r#"{"duration_s": 100000}"#).unwrap();
        let e = change(&mut config, |c| boot.apply(c, &defaults)).unwrap_err();
        assert!(e
            .fault_message
            .starts_with("duration_s 100000s is out of range"));
        let boot: BootSource = put(r#"{"kernel_image_path": "/nonexistent/kernel"}"#).unwrap();
        let e = change(&mut config, |c| boot.apply(c, &defaults)).unwrap_err();
        assert!(e.fault_message.contains("is not a file"));
        assert_eq!(config, VmConfig::default());
    }

    #[test]
    fn test_left_out_fields_take_the_defaults() {
        let defaults = VmConfig {
            stat_seed: 7,
            ..VmConfig::default()
        };
        let mut config = defaults.clone();
        let clock: ClockConfig = put(r#"{"hz": 64}"#).unwrap();
        change(&mut config, |c| clock.apply(c, &defaults)).unwrap();
        assert_eq!(
            config.clock,
            clockintr::Config {
                hz: 64,
                stathz: 64,
                profhz: 640,
                schedhz: 0,
                flags: clockintr::CL_RNDSTAT
            }
        );
        assert_eq!(config.stat_seed, 7);
        let boot: BootSource = put(r#"{"workload": "exit-now", "duration_s": 1.5}"#).unwrap();
        change(&mut config, |c| boot.apply(c, &defaults)).unwrap();
        let info = BootSource::current(&config);
        assert_eq!(info.workload, "exit-now");
        assert_eq!(info.duration_s, Some(1.5));
        assert_eq!(info.kernel_image_path, None);
    }
}
