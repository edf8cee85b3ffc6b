//! The end of a sampled run: per-vCPU sampling figures, the symbolized profile
//! files and the trace; and the same figures while the run goes on ([`live`]).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

use super::buffer::StackSample;
use super::export::{self, ProfileStacks, RunRecords, TraceCopy};
use super::{samplers, trace, SamplingShared};
use crate::config::KperfConfig;
use crate::profile::Symbolizer;
use crate::summary::{
    EffectiveSamplingConfig, FunctionShare, Percentiles, SamplingSummary, VcpuSamplingSummary,
};
use crate::vcpu::VcpuRunStats;

/// Where the sampling figures' samples come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// The end of the run: the buffers are drained.
    Drain,
    /// A running VM: the buffers are copied and left as they are.
    Snapshot,
}

/// A profile's stack counts.
type Stacks = Vec<(StackSample, u64)>;

/// Both profiles' stack counts (on-CPU, PET) and the sampler totals of both.
type Taken = (Stacks, Stacks, samplers::Totals);

/// The stack counts of both profiles and the sampler totals, drained at the
/// end of the run or copied while it runs.
fn take_samples(sampling: &SamplingShared, source: Source) -> Taken {
    let (on_cpu, pet) = (&sampling.samples, &sampling.pet.samples);
    match source {
        Source::Drain => {
            let mut totals = on_cpu.take_totals();
            totals.merge(&pet.take_totals());
            (on_cpu.drain(), pet.drain(), totals)
        }
        Source::Snapshot => {
            let mut totals = on_cpu.snapshot_totals();
            totals.merge(&pet.snapshot_totals());
            (on_cpu.snapshot(), pet.snapshot(), totals)
        }
    }
}

/// The sampling figures while the VM runs, from each vCPU's counters `stats`
/// as last published: the end-of-run summary's, without files, and with
/// nothing drained (the end of the run still has every sample and record).
pub fn live(
    sampling: &SamplingShared,
    stats: &[VcpuRunStats],
    (kernel_image, mem): (&[u8], &GuestMemoryMmap),
    uptime_ns: u64,
) -> SamplingSummary {
    figures(
        sampling,
        stats,
        (kernel_image, mem),
        uptime_ns,
        Source::Snapshot,
    )
    .0
}

/// Builds the sampling summary and writes the files the configuration asks for
/// (after the vCPUs stopped: it drains their guest event rings a last time
/// from `mem`). Failures to write are reported in `errors`; they do not
/// change the outcome. Returns the stack counts and the trace the files were
/// written from, for readers after the run.
pub fn finish(
    sampling: &SamplingShared,
    stats: &[VcpuRunStats],
    (kernel_image, mem): (&Arc<[u8]>, &GuestMemoryMmap),
    uptime_ns: u64,
    errors: &mut Vec<String>,
) -> (SamplingSummary, RunRecords) {
    for id in 0..sampling.guest_events().vcpus() {
        sampling.drain_guest_events(id, mem, u64::MAX);
    }
    let (mut summary, samples, pet_samples) = figures(
        sampling,
        stats,
        (kernel_image, mem),
        uptime_ns,
        Source::Drain,
    );
    let records = RunRecords {
        on_cpu: ProfileStacks {
            stacks: samples,
            period_ns: summary.period_ns,
            kernel_image: kernel_image.clone(),
        },
        pet: ProfileStacks {
            stacks: pet_samples,
            // Thread samples are not periodic per CPU: the profile has no period.
            period_ns: 0,
            kernel_image: kernel_image.clone(),
        },
        pet_configured: export::pet_configured(sampling),
        trace: sampling.trace().map(|buffer| TraceCopy {
            records: buffer.take(),
            tracks: export::tracks(sampling, mem),
            end_ns: uptime_ns,
        }),
    };
    if let Some(dir) = &sampling.config.profile_dir {
        let profiles = [
            (&records.on_cpu, "profile", "profile"),
            (&records.pet, "pet", "PET profile"),
        ];
        for (stacks, stem, what) in profiles {
            if stem == "pet" && stacks.stacks.is_empty() {
                continue;
            }
            match stacks.profile().and_then(|p| p.write_files(dir, stem)) {
                Ok(files) => summary
                    .files
                    .extend(files.iter().map(|f| f.display().to_string())),
                Err(e) => errors.push(format!(
                    "cannot write the {what} to '{}': {e}",
                    dir.display()
                )),
            }
        }
    }
    if let Some(trace) = &records.trace {
        let chrome_file = sampling
            .config
            .profile_dir
            .as_ref()
            .map(|d| d.join("trace.json"));
        for path in sampling.config.trace_file.iter().chain(&chrome_file) {
            match write_trace(trace, path) {
                Ok(()) => summary.files.push(path.display().to_string()),
                Err(e) => errors.push(format!(
                    "cannot write the trace to '{}': {e}",
                    path.display()
                )),
            }
        }
    }
    (summary, records)
}

/// The sampling figures from the vCPUs' counters and both profiles'
/// samples, taken from `source`; with the stack counts of both (on-CPU,
/// PET).
fn figures(
    sampling: &SamplingShared,
    stats: &[VcpuRunStats],
    (kernel_image, mem): (&[u8], &GuestMemoryMmap),
    uptime_ns: u64,
    source: Source,
) -> (SamplingSummary, Stacks, Stacks) {
    let (samples, pet_samples, totals) = take_samples(sampling, source);
    let mut cost = metronome_devices::LatencyHistogram::new();
    let config = effective_config(sampling);
    let profile_timer = config.kperf.shortest_on_cpu_timer();
    let mut summary = SamplingSummary {
        period_ns: export::on_cpu_period_ns(&config.kperf),
        samplers: profile_timer
            .and_then(|t| config.kperf.action(t.action_id))
            .map_or(0, |a| a.samplers.0),
        config: config.clone(),
        trace_dropped: sampling.trace().map_or(0, |t| t.dropped()),
        no_exit: sampling
            .no_exit
            .logging()
            .then(|| sampling.no_exit.summary()),
        ..Default::default()
    };
    let secs = (uptime_ns as f64 / 1e9).max(1e-9);
    for s in stats {
        let v = &s.sampling;
        let dropped = sampling.samples.dropped(s.id);
        let folded = sampling.samples.folded(s.id);
        cost.merge(&v.cost);
        summary.samples += v.samples;
        summary.timer_fires += v.leader_fires;
        summary.dropped += dropped;
        summary.folded += folded;
        summary.walk_errors += v.walk_errors;
        summary.vcpus.push(VcpuSamplingSummary {
            id: s.id,
            timer_fires: v.timer_fires,
            leader_fires: v.leader_fires,
            samples: v.samples,
            dropped,
            folded,
            walk_errors: v.walk_errors,
            not_running: v.not_running,
            timer_overruns: v.timer_overruns,
            timer_rearms: v.timer_rearms,
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
    summary.user_functions = user_functions(&samples, kernel_image);
    pet_figures(sampling, &mut summary);
    summary.samplers_captured = totals.captured;
    summary.sys_mem_vmm_resident_bytes = totals.vmm_resident;
    summary.meminfo_guest_in_use_bytes = totals.guest_in_use;
    (summary, samples, pet_samples)
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

/// PET's figures (traditional and lightweight).
fn pet_figures(sampling: &SamplingShared, summary: &mut SamplingSummary) {
    let pet = &sampling.pet;
    summary.pet_passes = pet.passes.load(Ordering::Relaxed);
    summary.pet_broadcasts = sampling.engine().pet_broadcasts();
    summary.threads_sampled = pet.threads_sampled.load(Ordering::Relaxed);
    summary.pet_sample_ns = Percentiles::of(&pet.pass_ns.lock().unwrap_or_else(|p| p.into_inner()));
    summary.pet_remote_missed = pet.remote_missed.load(Ordering::Relaxed);
    let lightweight = &sampling.lightweight;
    summary.lightweight_self_samples = lightweight.self_samples.load(Ordering::Relaxed);
    summary.lightweight_refused = lightweight.refused.load(Ordering::Relaxed);
}

/// Writes the trace to `path`: Chrome trace-event JSON when the name ends in
/// `.json` (`trace.json` in the profile directory), otherwise JSON lines in
/// recording order.
/// The file is written whole or not at all ([`crate::outfile`]).
fn write_trace(trace: &TraceCopy, path: &Path) -> std::io::Result<()> {
    crate::outfile::write_atomically(path, |file| {
        if path.extension().is_some_and(|e| e == "json") {
            trace.write_chrome(file)
        } else {
            trace::write_json_lines(&trace.records, file)
        }
    })
}
