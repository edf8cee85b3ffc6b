//! The metrics in the Prometheus text exposition format (version 0.0.4),
//! written by the `prometheus-client` crate's encoder.
//!
//! Every name starts with `metronome_` and carries its unit: counters end in
//! `_total`, the lateness histograms are in seconds (`_seconds`), the uptime
//! is a gauge in seconds. Per-vCPU series have a `vcpu` label.

use std::collections::BTreeMap;
use std::collections::HashMap;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::{LatencyHistogram, VcpuMetrics, VmMetrics};

/// The `Content-Type` of the text format.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The metrics `vm` and the API's answers by status code `api_requests`
/// in the text format.
pub fn encode(vm: &VmMetrics, api_requests: &BTreeMap<u16, u64>) -> String {
    let mut registry = Registry::with_prefix("metronome");
    registry.register_collector(Box::new(Exposition {
        vm: vm.clone(),
        api_requests: api_requests.clone(),
    }));
    let mut text = String::new();
    // Cannot fail: writing to a String does not fail, and every value here
    // is encodable.
    prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
        .expect("encoding metrics into a String");
    text
}

/// A snapshot to encode (a collector is `'static`, so it owns its data).
#[derive(Debug)]
struct Exposition {
    vm: VmMetrics,
    api_requests: BTreeMap<u16, u64>,
}

/// The labels of one series.
type Labels = Vec<(&'static str, String)>;

/// The `vcpu` label of `v`.
fn vcpu(v: &VcpuMetrics) -> Labels {
    vec![("vcpu", v.id.to_string())]
}

/// Each vCPU's (on-CPU, PET) pair of a per-buffer counter, labelled by vCPU
/// and `buffer` (`oncpu`, `pet`).
fn per_buffer(
    vcpus: &[VcpuMetrics],
    pick: fn(&VcpuMetrics) -> (u64, u64),
) -> impl Iterator<Item = (Labels, u64)> + '_ {
    vcpus.iter().flat_map(move |v| {
        let (oncpu, pet) = pick(v);
        [("oncpu", oncpu), ("pet", pet)].map(|(buffer, n)| {
            let mut labels = vcpu(v);
            labels.push(("buffer", buffer.to_owned()));
            (labels, n)
        })
    })
}

/// One counter family: `name` (`_total` is appended) with its series.
fn counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in series {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One counter without labels: `name` (`_total` is appended).
fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    ConstCounter::new(value).encode(encoder.encode_descriptor(
        name,
        help,
        None,
        MetricType::Counter,
    )?)
}

/// One latency histogram family in seconds (`_seconds` is appended).
fn histograms<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels, &'a LatencyHistogram)>,
) -> Result<(), std::fmt::Error> {
    let mut family =
        encoder.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
    for (labels, histogram) in series {
        // The encoder wants each bucket's own count and accumulates them.
        let mut below = 0;
        let buckets: Vec<(f64, u64)> = histogram
            .buckets
            .iter()
            .map(|b| {
                let own = b.count.saturating_sub(below);
                below = b.count;
                (b.le_ns as f64 / 1e9, own)
            })
            .collect();
        family.encode_family(&labels)?.encode_histogram(
            histogram.sum_ns as f64 / 1e9,
            histogram.count,
            &buckets,
            None::<&HashMap<usize, Exemplar<NoLabelSet, f64>>>,
        )?;
    }
    Ok(())
}

/// One timer advance family in seconds (`_seconds` is appended), a series
/// per vCPU and wake path (`path`: `running`, `halted`) with the ns values
/// `running` and `halted` pick; `counter` or a gauge.
fn by_path(
    encoder: &mut DescriptorEncoder,
    (name, help, counter): (&str, &str, bool),
    vcpus: &[VcpuMetrics],
    running: fn(&VcpuMetrics) -> u64,
    halted: fn(&VcpuMetrics) -> u64,
) -> Result<(), std::fmt::Error> {
    let kind = if counter {
        MetricType::Counter
    } else {
        MetricType::Gauge
    };
    let mut family = encoder.encode_descriptor(name, help, Some(&Unit::Seconds), kind)?;
    for v in vcpus {
        for (path, ns) in [("running", running(v)), ("halted", halted(v))] {
            let mut labels = vcpu(v);
            labels.push(("path", path.to_owned()));
            let (series, seconds) = (family.encode_family(&labels)?, ns as f64 / 1e9);
            if counter {
                ConstCounter::new(seconds).encode(series)?;
            } else {
                ConstGauge::new(seconds).encode(series)?;
            }
        }
    }
    Ok(())
}

/// Timer advance: the learned advance per path (a gauge) and the time
/// waited for deadlines per path (a counter), both in seconds.
fn timer_advance(
    encoder: &mut DescriptorEncoder,
    vcpus: &[VcpuMetrics],
) -> Result<(), std::fmt::Error> {
    let advance = (
        "timer_advance",
        "Timer advance: how early the host timer is armed, by wake path.",
        false,
    );
    by_path(
        encoder,
        advance,
        vcpus,
        |v| v.timer_advance_running_ns,
        |v| v.timer_advance_halted_ns,
    )?;
    let wait = (
        "timer_advance_wait",
        "Time waited for timer deadlines after an early wake; running: guest time lost.",
        true,
    );
    by_path(
        encoder,
        wait,
        vcpus,
        |v| v.timer_advance_running_wait_ns,
        |v| v.timer_advance_halted_wait_ns,
    )
}

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let vcpus = &self.vm.vcpus;
        let kperf = &self.vm.kperf;
        let uptime = ConstGauge::new(self.vm.guest_uptime_ns as f64 / 1e9);
        uptime.encode(encoder.encode_descriptor(
            "guest_uptime",
            "Guest uptime (the device clock).",
            Some(&Unit::Seconds),
            uptime.metric_type(),
        )?)?;
        counters(
            &mut encoder,
            "timer_deliveries",
            "Timer interrupts injected into the guest.",
            vcpus.iter().map(|v| (vcpu(v), v.timer_deliveries)),
        )?;
        histograms(
            &mut encoder,
            "timer_host_lateness",
            "Host lateness: timer deadline to the KVM_INTERRUPT that delivered it.",
            vcpus.iter().map(|v| (vcpu(v), &v.host_lateness_ns)),
        )?;
        histograms(
            &mut encoder,
            "timer_guest_lateness",
            "Guest lateness: programmed deadline to the timer interrupt's entry, as the guest reports it.",
            vcpus.iter().map(|v| (vcpu(v), &v.guest_lateness_ns)),
        )?;
        timer_advance(&mut encoder, vcpus)?;
        counters(
            &mut encoder,
            "kicks",
            "Kicks (signals out of KVM_RUN) sent to the vCPU.",
            vcpus.iter().map(|v| (vcpu(v), v.kicks)),
        )?;
        counters(
            &mut encoder,
            "vcpu_exits",
            "Exits from KVM_RUN by reason.",
            vcpus.iter().flat_map(|v| {
                v.exits.iter().map(|(reason, n)| {
                    let mut labels = vcpu(v);
                    labels.push(("reason", (*reason).to_owned()));
                    (labels, *n)
                })
            }),
        )?;
        counter(
            &mut encoder,
            "kperf_samples",
            "kperf samples taken (kept or dropped).",
            kperf.samples,
        )?;
        counter(
            &mut encoder,
            "kperf_timer_fires",
            "kperf timer fires the vCPUs answered.",
            kperf.timer_fires,
        )?;
        counter(
            &mut encoder,
            "kperf_pet_passes",
            "PET passes completed by the PET sampler thread.",
            kperf.pet_passes,
        )?;
        counter(
            &mut encoder,
            "kperf_pet_broadcasts",
            "PET broadcasts (the PET handler's passes).",
            kperf.pet_broadcasts,
        )?;
        counters(
            &mut encoder,
            "kperf_sample_drops",
            "kperf samples not in the profile: a new stack when the vCPU's stack table was full.",
            per_buffer(vcpus, |v| (v.sample_drops, v.pet_sample_drops)),
        )?;
        counters(
            &mut encoder,
            "kperf_stacks_folded",
            "kperf samples counted under [stack table full]: a new stack when the vCPU's stack table had spent its memory budget.",
            per_buffer(vcpus, |v| (v.stacks_folded, v.pet_stacks_folded)),
        )?;
        counter(
            &mut encoder,
            "kperf_trace_drops",
            "Trace records not kept because the trace buffer was full.",
            kperf.trace_drops,
        )?;
        counters(
            &mut encoder,
            "guest_trace_ring_drops",
            "Guest trace events lost on a full event ring or skipped by the host.",
            vcpus.iter().map(|v| (vcpu(v), v.trace_ring_drops)),
        )?;
        counters(
            &mut encoder,
            "api_requests",
            "API requests answered, by HTTP status code.",
            self.api_requests
                .iter()
                .map(|(status, n)| (vec![("status", status.to_string())], *n)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::KperfMetrics;

    fn sample() -> VmMetrics {
        let mut fine = metronome_devices::LatencyHistogram::new();
        for ns in [800, 20_000, 20_000, 2_000_000_000] {
            fine.record(ns);
        }
        VmMetrics {
            guest_uptime_ns: 1_500_000_000,
            vcpus: vec![VcpuMetrics {
                id: 1,
                timer_deliveries: 42,
                kicks: 7,
                exits: [("hlt", 3), ("io", 0)].into_iter().collect(),
                host_lateness_ns: LatencyHistogram::from_fine(fine.buckets(), fine.sum()),
                sample_drops: 2,
                timer_advance_running_ns: 12_000,
                timer_advance_halted_wait_ns: 1_500_000,
                ..Default::default()
            }],
            kperf: KperfMetrics {
                samples: 9,
                ..Default::default()
            },
        }
    }

    /// The value of the series written as `series` (name and labels).
    fn value<'a>(text: &'a str, series: &str) -> &'a str {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
    }

    #[test]
    fn test_text_format_names_units_labels_and_values() {
        let api = [(200, 5), (404, 1)].into_iter().collect();
        let text = encode(&sample(), &api);
        assert!(text.contains("# TYPE metronome_timer_deliveries_total counter\n"));
        assert_eq!(
            value(&text, "metronome_timer_deliveries_total{vcpu=\"1\"}"),
            "42"
        );
        assert_eq!(value(&text, "metronome_kicks_total{vcpu=\"1\"}"), "7");
        assert!(text.contains("# TYPE metronome_timer_advance_seconds gauge\n"));
        assert_eq!(
            value(
                &text,
                "metronome_timer_advance_seconds{vcpu=\"1\",path=\"running\"}"
            ),
            "0.000012"
        );
        assert!(text.contains("# TYPE metronome_timer_advance_wait_seconds_total counter\n"));
        assert_eq!(
            value(
                &text,
                "metronome_timer_advance_wait_seconds_total{vcpu=\"1\",path=\"halted\"}"
            ),
            "0.0015"
        );
        assert_eq!(
            value(
                &text,
                "metronome_vcpu_exits_total{vcpu=\"1\",reason=\"hlt\"}"
            ),
            "3"
        );
        assert_eq!(value(&text, "metronome_kperf_samples_total"), "9");
        assert_eq!(
            value(
                &text,
                "metronome_kperf_sample_drops_total{vcpu=\"1\",buffer=\"oncpu\"}"
            ),
            "2"
        );
        assert_eq!(
            value(&text, "metronome_api_requests_total{status=\"404\"}"),
            "1"
        );
        assert!(text.contains("# TYPE metronome_guest_uptime_seconds gauge\n"));
        assert_eq!(value(&text, "metronome_guest_uptime_seconds"), "1.5");
    }

    #[test]
    fn test_histogram_buckets_are_cumulative_in_seconds() {
        let text = encode(&sample(), &BTreeMap::new());
        assert!(text.contains("# TYPE metronome_timer_host_lateness_seconds histogram\n"));
        let bucket = |le: &str| {
            value(
                &text,
                &format!("metronome_timer_host_lateness_seconds_bucket{{vcpu=\"1\",le=\"{le}\"}}"),
            )
        };
        assert_eq!(bucket("1e-06"), "1");
        assert_eq!(bucket("2.5e-05"), "3");
        assert_eq!(bucket("1"), "3");
        assert_eq!(bucket("+Inf"), "4");
        assert_eq!(
            value(
                &text,
                "metronome_timer_host_lateness_seconds_count{vcpu=\"1\"}"
            ),
            "4"
        );
        let sum: f64 = value(
            &text,
            "metronome_timer_host_lateness_seconds_sum{vcpu=\"1\"}",
        )
        .parse()
        .unwrap();
        assert!((sum - 2.000_040_8).abs() < 1e-9, "{sum}");
        // The guest histogram is empty: zero buckets, still well formed.
        assert_eq!(
            value(
                &text,
                "metronome_timer_guest_lateness_seconds_bucket{vcpu=\"1\",le=\"+Inf\"}"
            ),
            "0"
        );
    }
}
