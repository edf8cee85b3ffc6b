//! `metronome --config-file FILE`: the bodies of the pre-boot PUTs in one
//! JSON file, under their paths' names, booted at once:
//!
//! ```json
//! {"machine-config": {"vcpu_count": 2, "mem_size_mib": 128},
//!  "boot-source": {"workload": "profile", "duration_s": 2},
//!  "clock": {"hz": 100},
//!  "kperf": {"action_count": 1, "timer_count": 1,
//!            "actions": [{"id": 1, "samplers": ["th_info", "ustack", "kstack"]}],
//!            "timers": [{"id": 0, "period_ns": 1000000, "action_id": 1}]}}
//! ```
//!
//! Each section is the API's own request type ([`MachineConfig`],
//! [`BootSource`], [`ClockConfig`]) or the `--kperf` file's
//! ([`KperfConfig`]), applied by the same code as the PUT, so the file and
//! the API cannot drift. Every section is optional; unknown keys are
//! refused. A `kperf` section switches sampling on at boot, as `--kperf`
//! does.
//!
//! The command line fills in what the file leaves out, but it may not set
//! what a section of the file sets: a flag of a section the file has
//! ([`SECTION_FLAGS`]) is refused with an error naming both, so that no
//! value silently wins over another.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::errors::ApiError;
use super::types::{BootSource, ClockConfig, MachineConfig, PreBootSection};
use crate::config::{KperfConfig, SamplingConfig, VmConfig};

/// The `--config-file` document.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The body of `PUT /machine-config`.
    #[serde(rename = "machine-config", default)]
    pub machine_config: Option<MachineConfig>,
    /// The body of `PUT /boot-source`.
    #[serde(rename = "boot-source", default)]
    pub boot_source: Option<BootSource>,
    /// The body of `PUT /clock`.
    #[serde(default)]
    pub clock: Option<ClockConfig>,
    /// The `--kperf` file's object; sampling starts with the VM.
    #[serde(default)]
    pub kperf: Option<KperfConfig>,
}

/// Each section and the command-line flags (clap ids) that set the same
/// things: a flag given with its section in the file is refused.
pub const SECTION_FLAGS: [(&str, &[&str]); 4] = [
    ("machine-config", &["vcpus", "mem_mib"]),
    ("boot-source", &["kernel", "workload", "duration"]),
    (
        "clock",
        &[
            "hz",
            "stathz",
            "profhz",
            "schedhz",
            "rndstat",
            "no_rndstat",
            "stat_seed",
        ],
    ),
    (
        "kperf",
        &[
            "kperf",
            "sample_period_us",
            "pet_period_ms",
            "samplers",
            "sample_tid",
            "lightweight_pet",
            "pet_idle_rate",
        ],
    ),
];

/// Why a `--config-file` cannot be used. Each message says what was wrong
/// and what is allowed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("cannot read the --config-file '{}'", path.display())]
    Read {
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Not JSON, an unknown key, a wrong type or a missing field.
    #[error(
        "the --config-file '{}' is not a configuration: a JSON object with the optional keys \
         \"machine-config\", \"boot-source\", \"clock\" and \"kperf\", each the body of that PUT \
         (README, \"The --config-file\")",
        path.display()
    )]
    Parse {
        /// The path given.
        path: PathBuf,
        /// What serde_json found.
        #[source]
        source: serde_json::Error,
    },
    /// A value out of range or breaking a rule.
    #[error("the --config-file '{}' is refused: {message}", path.display())]
    Invalid {
        /// The path given.
        path: PathBuf,
        /// The rule broken, in the API's field names.
        message: String,
    },
    /// A command-line flag sets what a section of the file sets.
    #[error(
        "--{flag} and the --config-file's \"{section}\" section both set the {section} \
         configuration: give it in one place (leave out the flag, or the section)"
    )]
    Conflict {
        /// The flag, without its dashes.
        flag: String,
        /// The section.
        section: &'static str,
    },
}

impl ConfigFile {
    /// Reads and parses the file at `path`.
    ///
    /// # Errors
    ///
    /// [`ConfigFileError::Read`] or [`ConfigFileError::Parse`].
    pub fn read(path: &Path) -> Result<Self, ConfigFileError> {
        crate::config::read_json_file(
            path,
            |path, source| ConfigFileError::Read { path, source },
            |path, source| ConfigFileError::Parse { path, source },
        )
    }

    /// The sections the file has.
    pub fn sections(&self) -> impl Iterator<Item = &'static str> {
        let present = [
            self.machine_config.is_some(),
            self.boot_source.is_some(),
            self.clock.is_some(),
            self.kperf.is_some(),
        ];
        SECTION_FLAGS
            .iter()
            .zip(present)
            .filter(|(_, present)| *present)
            .map(|((section, _), _)| *section)
    }

    /// Refuses a flag given on the command line (`given(id)`) that sets
    /// what a section of the file sets.
    ///
    /// # Errors
    ///
    /// [`ConfigFileError::Conflict`] for the first such flag.
    pub fn check_flags(&self, given: impl Fn(&str) -> bool) -> Result<(), ConfigFileError> {
        for section in self.sections() {
            let flags = SECTION_FLAGS
                .iter()
                .find(|(name, _)| *name == section)
                .map_or(&[][..], |(_, flags)| flags);
            if let Some(flag) = flags.iter().find(|flag| given(flag)) {
                return Err(ConfigFileError::Conflict {
                    flag: flag.replace('_', "-"),
                    section,
                });
            }
        }
        Ok(())
    }

    /// `base` (the command line's configuration) with the file's sections
    /// applied as their PUTs would apply them, checked whole. A `kperf`
    /// section becomes `files` (where the profile and trace go) with that
    /// kperf configuration, sampling on at boot.
    ///
    /// # Errors
    ///
    /// [`ConfigFileError::Invalid`]: the first rule broken.
    pub fn apply(
        &self,
        path: &Path,
        base: &VmConfig,
        files: &SamplingConfig,
    ) -> Result<VmConfig, ConfigFileError> {
        let invalid = |e: ApiError| ConfigFileError::Invalid {
            path: path.to_owned(),
            message: e.fault_message,
        };
        let mut config = base.clone();
        if let Some(machine) = &self.machine_config {
            machine.apply(&mut config, base).map_err(invalid)?;
        }
        if let Some(boot) = &self.boot_source {
            boot.apply(&mut config, base).map_err(invalid)?;
        }
        if let Some(clock) = &self.clock {
            clock.apply(&mut config, base).map_err(invalid)?;
        }
        if let Some(kperf) = &self.kperf {
            config.sampling = Some(SamplingConfig {
                kperf: kperf.clone(),
                start_at_boot: true,
                ..files.clone()
            });
        }
        config
            .validate()
            .map_err(|e| invalid(ApiError::config(&e)))?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const PATH: &str = "test.json";

    fn parse(json: &str) -> Result<ConfigFile, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    fn apply(json: &str) -> Result<VmConfig, String> {
        let file = parse(json)?;
        file.apply(
            Path::new(PATH),
            &VmConfig::default(),
            &SamplingConfig::new(KperfConfig::default()),
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn test_sections_are_the_put_bodies_and_kperf_starts_sampling() {
        let config = apply(
            r#"{"machine-config": {"vcpu_count": 3, "mem_size_mib": 96},
                "boot-source": {"workload": "profile", "duration_s": 2},
                "clock": {"hz": 64},
                "kperf": {"action_count": 1, "timer_count": 1,
                          "actions": [{"id": 1, "samplers": "th_info,kstack"}],
                          "timers": [{"id": 0, "period_ns": 1000000, "action_id": 1}]}}"#,
        )
        .unwrap();
        assert_eq!((config.vcpus, config.mem_mib), (3, 96));
        assert_eq!(config.workload, metronome_abi::Workload::Profile);
        assert_eq!(config.duration, Some(Duration::from_secs(2)));
        assert_eq!((config.clock.hz, config.clock.profhz), (64, 640));
        let sampling = config.sampling.unwrap();
        assert!(sampling.start_at_boot);
        assert_eq!(sampling.kperf.timers[0].period_ns, 1_000_000);
    }

    #[test]
    fn test_an_empty_file_keeps_the_command_line() {
        assert_eq!(apply("{}").unwrap(), VmConfig::default());
        assert_eq!(parse("{}").unwrap().sections().count(), 0);
    }

    #[test]
    fn test_bad_files_are_refused_saying_what_is_allowed() {
        let e = parse(r#"{"machine_config": {}}"#).unwrap_err();
        assert!(
            e.contains("unknown field `machine_config`, expected one of `machine-config`"),
            "{e}"
        );
        let e = parse(r#"{"clock": {"hz": "fast"}}"#).unwrap_err();
        assert!(e.contains("expected u32"), "{e}");
        let e = parse(r#"{"kperf": {"action_count": 1, "timer_count": 0, "x": 1}}"#).unwrap_err();
        assert!(e.contains("unknown field `x`"), "{e}");
        let e = parse("\"all\"").unwrap_err();
        assert!(e.contains("expected struct ConfigFile"), "{e}");
        let e = apply(r#"{"machine-config": {"vcpu_count": 0, "mem_size_mib": 128}}"#).unwrap_err();
        assert_eq!(
            e,
            "the --config-file 'test.json' is refused: vcpu_count 0 is out of range: a VM has 1 \
             to 64 vCPUs"
        );
        let e = apply(r#"{"boot-source": {"workload": "busy"}}"#).unwrap_err();
        assert!(
            e.contains("workload 'busy' is not a workload: one of demo"),
            "{e}"
        );
        let e = apply(r#"{"kperf": {"action_count": 0, "timer_count": 0}}"#).unwrap_err();
        assert!(e.contains("action_count 0 is out of range"), "{e}");
        let e = apply(
            r#"{"kperf": {"action_count": 1, "timer_count": 1,
                          "timers": [{"id": 0, "period_ns": 1000, "action_id": 2}]}}"#,
        )
        .unwrap_err();
        assert!(e.contains("action_id 2 is beyond action_count (1)"), "{e}");
    }

    #[test]
    fn test_a_flag_of_a_section_in_the_file_is_refused_naming_both() {
        let file =
            parse(r#"{"clock": {"hz": 100}, "kperf": {"action_count": 1, "timer_count": 0}}"#)
                .unwrap();
        assert_eq!(file.sections().collect::<Vec<_>>(), vec!["clock", "kperf"]);
        let e = file.check_flags(|id| id == "stat_seed").unwrap_err();
        assert_eq!(
            e.to_string(),
            "--stat-seed and the --config-file's \"clock\" section both set the clock \
             configuration: give it in one place (leave out the flag, or the section)"
        );
        let e = file.check_flags(|id| id == "sample_period_us").unwrap_err();
        assert!(e.to_string().starts_with("--sample-period-us and"), "{e}");
        // Flags of sections the file does not have are the command line's.
        file.check_flags(|id| id == "vcpus" || id == "workload")
            .unwrap();
    }
}
