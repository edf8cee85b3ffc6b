//! Bad input: one clear error line and exit code 2, never a panic or a hang.

// An integration-test crate is test-only as a whole.
#![allow(clippy::tests_outside_test_module)]

mod common;
use common::{metronome, scratch};

fn expect_bad_input(args: &[&str], needle: &str) {
    let output = metronome().args(args).output().expect("run metronome");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(2),
        "args {args:?}: stderr: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "exactly one error line for {args:?}, got: {stderr}"
    );
    assert!(
        lines[0].contains(needle),
        "{args:?}: expected '{needle}' in: {}",
        lines[0]
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn test_vcpus_zero_is_rejected() {
    expect_bad_input(
        &["run", "--vcpus", "0"],
        "--vcpus 0 is out of range: a VM has 1 to 64 vCPUs",
    );
}

#[test]
fn test_vcpus_1000_is_rejected() {
    expect_bad_input(&["--vcpus", "1000"], "--vcpus 1000 is out of range");
}

#[test]
fn test_tiny_memory_is_rejected() {
    expect_bad_input(
        &["run", "--mem-mib", "1"],
        "--mem-mib 1 is out of range: guest memory is 64 to 3072 MiB",
    );
}

#[test]
fn test_missing_kernel_file_is_rejected() {
    expect_bad_input(
        &["run", "--kernel", "/nonexistent/kernel.elf"],
        "cannot read kernel file '/nonexistent/kernel.elf': No such file",
    );
}

#[test]
fn test_non_elf_kernel_is_rejected() {
    let path = scratch("not-elf");
    std::fs::write(&path, b"this is not an ELF file").unwrap();
    expect_bad_input(
        &["run", "--kernel", path.to_str().unwrap()],
        "is not an ELF file",
    );
}

#[test]
fn test_elf_for_another_architecture_is_rejected() {
    // A minimal 64-bit little-endian ELF header for AArch64 (e_machine 183).
    let mut header = vec![0u8; 64];
    header[..4].copy_from_slice(b"\x7fELF");
    header[4] = 2; // 64-bit
    header[5] = 1; // little endian
    header[6] = 1; // version
    header[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    header[18..20].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
    header[20..24].copy_from_slice(&1u32.to_le_bytes());
    header[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    header[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    header[58..60].copy_from_slice(&64u16.to_le_bytes()); // e_shentsize
    let path = scratch("aarch64.elf");
    std::fs::write(&path, header).unwrap();
    expect_bad_input(
        &["run", "--kernel", path.to_str().unwrap()],
        "x86_64 ELF executables only",
    );
}

#[test]
fn test_malformed_numbers_are_rejected() {
    expect_bad_input(
        &["run", "--vcpus", "two"],
        "invalid value 'two' for '--vcpus <N>'",
    );
    expect_bad_input(&["run", "--duration", "-1"], "--duration");
    expect_bad_input(&["run", "--timeout", "0"], "out of range");
}

#[test]
fn test_unknown_flag_is_rejected() {
    expect_bad_input(
        &["run", "--frobnicate"],
        "unexpected argument '--frobnicate'",
    );
}

#[test]
fn test_help_exits_zero() {
    let output = metronome().arg("--help").output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&output.stdout).contains("--vcpus"));
}

/// A `--kperf` file that breaks a rule: exit 2, one line naming it (before
/// any VM is built: no KVM needed).
#[test]
fn test_bad_kperf_files_are_rejected_with_the_rule() {
    let base =
        r#""action_count": 1, "timer_count": 1, "actions": [{"id": 1, "samplers": ["th_info"]}]"#;
    for (json, needle) in [
        (
            format!(r#"{{{base}, "bogus": 1}}"#),
            "unknown field `bogus`, expected one of `action_count`",
        ),
        (
            r#"{"action_count": 1,"#.to_string(),
            "does not follow the kperf configuration schema",
        ),
        (
            r#"{"action_count": 1, "timer_count": 1, "actions": [{"id": 1, "samplers": ["nope"]}]}"#
                .to_string(),
            "unknown sampler 'nope': allowed are th_info",
        ),
        (
            r#"{"action_count": 1, "timer_count": 1, "actions": [{"id": 2, "samplers": 1}]}"#
                .to_string(),
            "action id 2 is out of range: action ids are 1 to action_count (1) (CFG-A-2)",
        ),
        (
            r#"{"action_count": 33, "timer_count": 1}"#.to_string(),
            "action_count 33 is out of range: 1 to 32 actions (CFG-A-1",
        ),
        (
            r#"{"action_count": 1, "timer_count": 9}"#.to_string(),
            "timer_count 9 is out of range: 0 to 8 timers (CFG-T-1",
        ),
        (
            format!(r#"{{{base}, "timers": [{{"id": 0, "period_ns": 1000000, "action_id": 2}}]}}"#),
            "timer 0: action_id 2 is beyond action_count (1)",
        ),
        (
            r#"{"action_count": 1, "timer_count": 1, "actions": [{"id": 1, "samplers": ["pmc_thread", "pmc_cpu"]}]}"#
                .to_string(),
            "action 1 has both pmc_thread and pmc_cpu: they exclude each other (CFG-A-3)",
        ),
        (
            format!(r#"{{{base}, "pet": {{"timer_id": 0, "idle_rate": 0}}}}"#),
            "PET idle rate 0 is refused: it is at least 1 (AMB-13",
        ),
        (
            format!(r#"{{{base}, "pet": {{"timer_id": 1}}}}"#),
            "pet.timer_id 1 is not a timer",
        ),
    ] {
        let path = scratch("bad-kperf.json");
        std::fs::write(&path, &json).unwrap();
        expect_bad_input(&["run", "--kperf", path.to_str().unwrap()], needle);
    }
    let missing = scratch("missing-kperf.json");
    expect_bad_input(
        &["run", "--kperf", missing.to_str().unwrap()],
        "cannot read the --kperf file",
    );
}

#[test]
fn test_kperf_file_conflicts_with_the_shorthands() {
    for flag in [
        &["--sample-period-us", "1000"][..],
        &["--samplers", "kstack"][..],
        &["--pet-period-ms", "10"][..],
    ] {
        let mut args = vec!["run", "--kperf", "any.json"];
        args.extend_from_slice(flag);
        expect_bad_input(&args, "cannot be used with");
    }
    expect_bad_input(
        &["run", "--lightweight-pet"],
        "required arguments were not provided: --pet-period-ms",
    );
    expect_bad_input(
        &["run", "--pet-period-ms", "0"],
        "--pet-period-ms 0 is out of range: 1 to 10000 ms",
    );
    expect_bad_input(
        &[
            "run",
            "--sample-period-us",
            "1000",
            "--trace",
            "t",
            "--trace-level",
            "3",
        ],
        "3 is not in 0..=2",
    );
}

/// Every refused sampler: exit 2 and one line saying why, from `--samplers`
/// and from a `--kperf` file alike. `th_dispatch` everywhere; the PMC
/// samplers where the host cannot count guest events (AMB-14), as on the
/// kvm_pvm development machines.
#[test]
fn test_refused_samplers_exit_2_with_their_reason() {
    let mut refused = vec![("th_dispatch", "the guest kernel has no dispatch queues")];
    match vmm::pmu::probe() {
        Err(why) => {
            for pmc in ["pmc_thread", "pmc_cpu", "pmc_config", "th_inscyc"] {
                refused.push((
                    pmc,
                    "needs a host PMU that counts guest events; this host has none",
                ));
            }
            println!("no guest PMU here ({why}): the PMC samplers are refused");
        }
        Ok(()) => println!("this host counts guest events: the PMC samplers are accepted"),
    }
    for (name, why) in refused {
        let needle = format!("action 1: sampler {name} is refused: ");
        for args in [
            vec!["run", "--sample-period-us", "1000", "--samplers"],
            vec!["run", "--pet-period-ms", "10", "--samplers"],
        ] {
            let list = format!("th_info,{name}");
            let mut args = args.clone();
            args.push(&list);
            expect_bad_input(&args, &needle);
            expect_bad_input(&args, why);
        }
        let path = scratch("refused-sampler.json");
        std::fs::write(
            &path,
            format!(
                r#"{{"action_count": 1, "timer_count": 1,
                    "actions": [{{"id": 1, "samplers": ["kstack", "{name}"]}}],
                    "timers": [{{"id": 0, "period_ns": 1000000, "action_id": 1}}]}}"#
            ),
        )
        .unwrap();
        expect_bad_input(&["run", "--kperf", path.to_str().unwrap()], &needle);
    }
}
