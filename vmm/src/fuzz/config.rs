//! The JSON files from the command line: `--kperf` and `--config-file`.

use std::path::Path;

use crate::api::ConfigFile;
use crate::config::{KperfConfig, SamplingConfig};
use crate::VmConfig;

/// `value` serialised and parsed again: the same value, or a panic naming
/// `what`.
fn round_trip<T>(value: &T, what: &str)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let text = serde_json::to_string(value)
        .unwrap_or_else(|e| panic!("{what}: a parsed value does not serialise: {e}"));
    let again: T = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{what}: {text} does not parse again: {e}"));
    assert_eq!(&again, value, "{what}: {text} parses to another value");
}

/// Target `kperf_json`: `data` as a `--kperf` file.
///
/// # Panics
///
/// When a parsed configuration does not survive a round trip through JSON,
/// or an accepted one's engine does not read back ([`KperfConfig::from_engine`])
/// to a configuration that sets up the same engine again.
pub fn kperf_json(data: &[u8]) {
    let Ok(config) = serde_json::from_slice::<KperfConfig>(data) else {
        return;
    };
    round_trip(&config, "kperf");
    let _ = config.check_samplers(Ok(()));
    let _ = config.shortest_on_cpu_timer();
    let Ok(engine) = config.engine_on_request() else {
        return;
    };
    let read_back = KperfConfig::from_engine(&engine);
    round_trip(&read_back, "kperf read back");
    let again = read_back
        .engine_on_request()
        .unwrap_or_else(|e| panic!("the engine's own configuration {read_back:?} is refused: {e}"));
    assert_eq!(
        KperfConfig::from_engine(&again),
        read_back,
        "the engine's configuration is not a fixed point"
    );
}

/// Target `config_file_json`: `data` as a `--config-file`, applied to the
/// default command line.
///
/// # Panics
///
/// When a parsed file does not survive a round trip through JSON, or an
/// applied one yields a configuration that does not validate.
pub fn config_file_json(data: &[u8]) {
    let Ok(file) = serde_json::from_slice::<ConfigFile>(data) else {
        return;
    };
    round_trip(&file, "config file");
    let _ = file.check_flags(|flag| flag.len() % 2 == 0);
    let files = SamplingConfig::new(KperfConfig::default());
    if let Ok(config) = file.apply(Path::new("fuzz.json"), &VmConfig::default(), &files) {
        if let Err(e) = config.validate() {
            panic!("an applied --config-file does not validate: {e}");
        }
    }
}

/// A kperf configuration using every knob.
const KPERF: &str = r#"{"action_count": 2, "timer_count": 3,
  "actions": [{"id": 1, "samplers": ["th_info", "ustack", "kstack"], "user_stack_depth": 64,
               "kernel_stack_depth": 16, "filter_tid": 3, "userdata": 7},
              {"id": 2, "samplers": ["th_info"], "tier": "hybrid", "kick_every": 4}],
  "timers": [{"id": 0, "period_ns": 1000000, "action_id": 1},
             {"id": 1, "period_ns": 20000, "action_id": 2},
             {"id": 2, "period_ns": 5000000, "action_id": 1}],
  "pet": {"timer_id": 2, "lightweight": true, "idle_rate": 3},
  "background": true}"#;

/// Seeds of `kperf_json`.
pub fn kperf_seeds() -> Vec<Vec<u8>> {
    super::texts(&[
        KPERF,
        r#"{"action_count": 1, "timer_count": 1, "actions": [{"id": 1, "samplers": ["ustack"]}],
            "timers": [{"id": 0, "period_ns": 100000, "action_id": 1}]}"#,
        r#"{"action_count": 1, "timer_count": 1, "actions": [{"id": 1, "samplers": ["th_info"],
            "tier": "no-exit"}], "timers": [{"id": 0, "period_ns": 100000, "action_id": 1}]}"#,
        r#"{"action_count": 0, "timer_count": 0}"#,
    ])
}

/// Seeds of `config_file_json`.
pub fn config_file_seeds() -> Vec<Vec<u8>> {
    let whole = format!(
        r#"{{"machine-config": {{"vcpu_count": 2, "mem_size_mib": 128}},
            "boot-source": {{"workload": "demo", "duration_s": 0.5}},
            "clock": {{"hz": 100, "stathz": 128, "profhz": 1024}},
            "kperf": {KPERF}}}"#
    );
    super::texts(&[
        whole.as_str(),
        r#"{"machine-config": {"vcpu_count": 1}}"#,
        r#"{"boot-source": {"kernel_image_path": "/nonexistent", "workload": "profile"}}"#,
        r#"{"clock": {"hz": 1000}}"#,
        "{}",
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::tests::check_target;

    /// Found by libFuzzer: an action count above the actions listed left
    /// actions at kperf's defaults, which the configuration in force wrote
    /// as `"samplers": []` and the parser then refused.
    #[test]
    fn test_regression_default_actions_read_back() {
        kperf_json(include_bytes!("regressions/kperf_json-default-action.json"));
    }

    #[test]
    fn test_kperf_json_property() {
        check_target("kperf_json", 4000, 21);
    }

    #[test]
    fn test_config_file_json_property() {
        check_target("config_file_json", 4000, 22);
    }
}
