//! The end of a sampled run: per-vCPU sampling figures, the symbolized profile
//! files and the trace.

use std::path::Path;
use std::sync::atomic::Ordering;

use vm_memory::GuestMemoryMmap;

use super::buffer::StackSample;
use super::{chrome, samplers, trace, SamplingShared};
use crate::config::KperfConfig;
use crate::profile::{Profile, Sample, Symbolizer};
use crate::summary::{
    EffectiveSamplingConfig, FunctionShare, Percentiles, SamplingSummary, VcpuSamplingSummary,
};
use crate::vcpu::VcpuRunStats;

/// Builds the sampling summary and writes the files the configuration asks for
/// (after the vCPUs stopped: it drains their guest event rings a last time
/// from `mem`). Failures to write are reported in `errors`; they do not
/// change the outcome.
pub fn finish(
    sampling: &SamplingShared,
    stats: &[VcpuRunStats],
    (kernel_image, mem): (&[u8], &GuestMemoryMmap),
    uptime_ns: u64,
    errors: &mut Vec<String>,
) -> SamplingSummary {
    for id in 0..sampling.guest_events().vcpus() {
        sampling.drain_guest_events(id, mem);
    }
    let mut cost = metronome_devices::LatencyHistogram::new();
    let config = effective_config(sampling);
    // The profile's period: the shortest on-CPU timer's (a profile mixing
    // timers of several periods has no single period; pprof takes one).
    let profile_timer = config.kperf.shortest_on_cpu_timer();
    let mut summary = SamplingSummary {
        period_ns: profile_timer.map_or(0, |t| t.period_ns),
        samplers: profile_timer
            .and_then(|t| config.kperf.action(t.action_id))
            .map_or(0, |a| a.samplers.0),
        config: config.clone(),
        trace_dropped: sampling.trace().map_or(0, |t| t.dropped()),
        ..Default::default()
    };
    let secs = (uptime_ns as f64 / 1e9).max(1e-9);
    for s in stats {
        let v = &s.sampling;
        let dropped = sampling.samples.dropped(s.id);
        cost.merge(&v.cost);
        summary.samples += v.samples;
        summary.timer_fires += v.leader_fires;
        summary.dropped += dropped;
        summary.walk_errors += v.walk_errors;
        summary.vcpus.push(VcpuSamplingSummary {
            id: s.id,
            timer_fires: v.timer_fires,
            leader_fires: v.leader_fires,
            samples: v.samples,
            dropped,
            walk_errors: v.walk_errors,
            not_running: v.not_running,
            achieved_hz: v.samples as f64 / secs,
            trace_guest_events: sampling.guest_events().drained(s.id),
            trace_ring_dropped: if sampling.trace().is_some() {
                sampling.guest_events().dropped(mem, s.id)
            } else {
                0
            },
        });
    }
    summary.trace_ring_dropped = summary.vcpus.iter().map(|v| v.trace_ring_dropped).sum();
    summary.cost_per_sample_ns = Percentiles::of(&cost);
    // The CPU profile: the samples that describe a place in the code.
    let samples = sampling.samples.drain();
    let mut totals = sampling.samples.take_totals();
    summary.user_functions = user_functions(&samples, kernel_image);
    if let Some(dir) = &sampling.config.profile_dir {
        match write_profile(samples, kernel_image, summary.period_ns, dir, "profile") {
            Ok(files) => summary.files.extend(files),
            Err(e) => errors.push(format!(
                "cannot write the profile to '{}': {e}",
                dir.display()
            )),
        }
    }
    pet_report(sampling, kernel_image, &mut summary, &mut totals, errors);
    summary.samplers_captured = totals.captured;
    summary.sys_mem_vmm_resident_bytes = totals.vmm_resident;
    summary.meminfo_guest_in_use_bytes = totals.guest_in_use;
    if let Some(buffer) = sampling.trace() {
        let records = buffer.take();
        let tracks = chrome::Tracks {
            vcpus: sampling.guest_events().vcpus(),
            threads: super::samplers::thread_table(mem)
                .iter()
                .filter(|t| t.tid != 0)
                .map(|t| (t.tid, thread_name(&t.name)))
                .collect(),
        };
        let chrome_file = sampling
            .config
            .profile_dir
            .as_ref()
            .map(|d| d.join("trace.json"));
        for path in sampling.config.trace_file.iter().chain(&chrome_file) {
            match write_trace(&records, &tracks, uptime_ns, path) {
                Ok(()) => summary.files.push(path.display().to_string()),
                Err(e) => errors.push(format!(
                    "cannot write the trace to '{}': {e}",
                    path.display()
                )),
            }
        }
    }
    summary
}

/// A NUL-padded guest thread name.
fn thread_name(name: &[u8; 16]) -> String {
    let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    String::from_utf8_lossy(&name[..len]).into_owned()
}

/// The configuration in force, read back from the engine.
fn effective_config(sampling: &SamplingShared) -> EffectiveSamplingConfig {
    let engine = sampling.engine();
    EffectiveSamplingConfig {
        kperf: KperfConfig::from_engine(&engine),
        limits: engine.limits().into(),
        trace_level: sampling.config.trace_level.debug_level(),
    }
}

/// The CPL3 instruction-pointer histogram by function.
fn user_functions(samples: &[(StackSample, u64)], kernel_image: &[u8]) -> Vec<FunctionShare> {
    let Ok(symbolizer) = Symbolizer::new(kernel_image) else {
        return Vec::new();
    };
    let mut counts: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    let mut total = 0u64;
    for (stack, count) in samples {
        if stack.cpl != 3 {
            continue;
        }
        let Some(&rip) = stack.user_stack.first() else {
            continue;
        };
        let name = symbolizer
            .function_name(rip)
            .map_or_else(|| format!("{rip:#x}"), str::to_string);
        *counts.entry(name).or_default() += count;
        total += count;
    }
    let mut shares: Vec<FunctionShare> = counts
        .into_iter()
        .map(|(function, samples)| FunctionShare {
            function,
            samples,
            percent: 100.0 * samples as f64 / total.max(1) as f64,
        })
        .collect();
    shares.sort_by(|a, b| b.samples.cmp(&a.samples).then(a.function.cmp(&b.function)));
    shares
}

/// PET's figures (traditional and lightweight), and its profile of every
/// thread (`pet.*`: pass samples or self-samples).
fn pet_report(
    sampling: &SamplingShared,
    kernel_image: &[u8],
    summary: &mut SamplingSummary,
    totals: &mut samplers::Totals,
    errors: &mut Vec<String>,
) {
    let pet = &sampling.pet;
    summary.pet_passes = pet.passes.load(std::sync::atomic::Ordering::Relaxed);
    summary.pet_broadcasts = sampling.engine().pet_broadcasts();
    summary.threads_sampled = pet
        .threads_sampled
        .load(std::sync::atomic::Ordering::Relaxed);
    summary.pet_sample_ns = Percentiles::of(&pet.pass_ns.lock().unwrap_or_else(|p| p.into_inner()));
    summary.pet_remote_missed = pet.remote_missed.load(Ordering::Relaxed);
    let lightweight = &sampling.lightweight;
    summary.lightweight_self_samples = lightweight.self_samples.load(Ordering::Relaxed);
    summary.lightweight_refused = lightweight.refused.load(Ordering::Relaxed);
    let samples = pet.samples.drain();
    totals.merge(&pet.samples.take_totals());
    if let (Some(dir), false) = (&sampling.config.profile_dir, samples.is_empty()) {
        // Thread samples are not periodic per CPU: the profile has no period.
        match write_profile(samples, kernel_image, 0, dir, "pet") {
            Ok(files) => summary.files.extend(files),
            Err(e) => errors.push(format!(
                "cannot write the PET profile to '{}': {e}",
                dir.display()
            )),
        }
    }
}

fn write_profile(
    samples: Vec<(StackSample, u64)>,
    kernel_image: &[u8],
    period_ns: u64,
    dir: &Path,
    stem: &str,
) -> Result<Vec<String>, crate::profile::ProfileError> {
    let mut profile = Profile::new(Symbolizer::new(kernel_image)?);
    if period_ns > 0 {
        profile.set_period_ns(period_ns);
    }
    for (stack, count) in samples {
        profile.add(&Sample {
            vcpu: stack.vcpu,
            tid: stack.tid,
            thread_name: if stack.tid == 0 {
                "idle".to_string()
            } else {
                stack.thread_name
            },
            user_stack: stack.user_stack,
            kernel_stack: stack.kernel_stack,
            user_leaf_after_trap: stack.user_leaf_after_trap,
            weight: count,
        });
    }
    let files = profile.write_files(dir, stem)?;
    Ok(files.iter().map(|f| f.display().to_string()).collect())
}

/// Writes the trace to `path`: Chrome trace-event JSON when the name ends in
/// `.json` (`trace.json` in the profile directory), otherwise JSON lines in
/// recording order.
fn write_trace(
    records: &[super::TraceRecord],
    tracks: &chrome::Tracks,
    end_ns: u64,
    path: &Path,
) -> std::io::Result<()> {
    let file = std::fs::File::create(path)?;
    if path.extension().is_some_and(|e| e == "json") {
        chrome::write_chrome(records, tracks, end_ns, file)
    } else {
        trace::write_json_lines(records, file)
    }
}
