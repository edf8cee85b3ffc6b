//! Unit tests, named after the spec statements they check (SEED-SPEC section 2, 6.3).
//!
//! Everything runs against a fake clock ([`FakeMachine`]) and a recording
//! interrupt clock ([`RecordingClock`]); time only moves when a test moves it
//! (or when a hardclock simulates a busy callback), so every test is exact and
//! deterministic.
//!
//! This module is a child of the crate root, so a few white-box tests use
//! private items (`schedule`, `unlink`, the generation counters) to reach
//! states the public API cannot produce on its own (an empty queue for
//! CI-D-3's spurious path, explicit insertions for CI-Q-1/2, generation wrap
//! for CI-D-7/CI-RATE-2). Each such use is marked "white-box".
//!
//! Statements not checkable here (they need the guest kernel or the VMM):
//! CI-RATE-4 (profil() in the guest kernel switches the rate), the sysctl ABI
//! part of TR-C-2 (MIB, EPERM/ENOTDIR/EINVAL) and the ddb printing of TR-C-4.

use super::*;
use std::string::ToString;
use std::vec;
use std::vec::Vec;

const MS: u64 = 1_000_000;
const SEC: u64 = 1_000_000_000;

// ---------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------

/// The kernel around the scheduler: a settable uptime clock and counters for
/// the three periodic kernel functions.
#[derive(Debug, Default)]
struct FakeMachine {
    now: u64,
    clock_ipl: bool,
    curproc: bool,
    hardclocks: u64,
    statclocks: u64,
    schedclocks: u64,
    /// ns added to `now` inside each hardclock, to simulate a busy callback (CI-D-4).
    on_hardclock_advance: u64,
    /// nsecuptime calls.
    reads: u64,
    /// When set, every kernel call is appended to `log` with the time it ran.
    record: bool,
    log: Vec<(EventKind, u64)>,
}

impl FakeMachine {
    /// At clock IPL, a process current, clock at `now`.
    fn at(now: u64) -> Self {
        Self {
            now,
            clock_ipl: true,
            curproc: true,
            ..Self::default()
        }
    }

    fn recording(now: u64) -> Self {
        Self {
            record: true,
            ..Self::at(now)
        }
    }

    fn total_calls(&self) -> u64 {
        self.hardclocks + self.statclocks + self.schedclocks
    }

    fn kinds_logged(&self) -> Vec<EventKind> {
        self.log.iter().map(|&(k, _)| k).collect()
    }

    fn times_of(&self, kind: EventKind) -> Vec<u64> {
        self.log
            .iter()
            .filter(|&&(k, _)| k == kind)
            .map(|&(_, t)| t)
            .collect()
    }

    fn note(&mut self, kind: EventKind) {
        if self.record {
            self.log.push((kind, self.now));
        }
    }
}

impl Machine for FakeMachine {
    fn nsecuptime(&mut self) -> u64 {
        self.reads += 1;
        self.now
    }
    fn at_clock_ipl(&self) -> bool {
        self.clock_ipl
    }
    fn hardclock(&mut self) {
        self.hardclocks += 1;
        self.note(EventKind::Hardclock);
        self.now += self.on_hardclock_advance;
    }
    fn statclock(&mut self) {
        self.statclocks += 1;
        self.note(EventKind::Statclock);
    }
    fn has_curproc(&self) -> bool {
        self.curproc
    }
    fn schedclock(&mut self) {
        self.schedclocks += 1;
        self.note(EventKind::Schedclock);
    }
}

/// An intrclock that records what it was asked to do.
#[derive(Debug, Default)]
struct RecordingClock {
    id: u32,
    rearms: Vec<u64>,
    triggers: u32,
}

impl IntrClock for RecordingClock {
    fn rearm(&mut self, nsecs: u64) {
        self.rearms.push(nsecs);
    }
    fn trigger(&mut self) {
        self.triggers += 1;
    }
}

fn rc(id: u32) -> RecordingClock {
    RecordingClock {
        id,
        ..RecordingClock::default()
    }
}

/// Records every random statclock interval.
#[derive(Debug, Default)]
struct Intervals(Vec<u64>);

impl IntervalSink for Intervals {
    fn interval(&mut self, ns: u64) {
        self.0.push(ns);
    }
}

/// Ignores intervals.
#[derive(Debug)]
struct NoSink;

impl IntervalSink for NoSink {
    fn interval(&mut self, _ns: u64) {}
}

type Queue = ClockQueue<RecordingClock>;

/// A fixed-period (non-random) configuration with profhz = stathz and no schedclock.
const fn fixed(hz: u32, stathz: u32) -> Config {
    Config {
        hz,
        stathz,
        profhz: stathz,
        schedhz: 0,
        flags: 0,
    }
}

/// A valid configuration without CL_RNDSTAT, for the precondition tests.
const VALID: Config = Config {
    hz: 100,
    stathz: 100,
    profhz: 1000,
    schedhz: 0,
    flags: 0,
};

/// An initialised global state.
fn global(config: Config) -> ClockIntr {
    let g = ClockIntr::new();
    g.init(&config, true).expect("valid configuration");
    g
}

/// A queue for CPU `unit` of `ncpus`, generator seed 1.
fn queue(unit: u32, ncpus: u32, primary: bool) -> Queue {
    ClockQueue::new(unit, ncpus, primary, 1)
}

/// A queue that has run its first `cpu_init` at `m.now`.
fn started(
    g: &ClockIntr,
    unit: u32,
    ncpus: u32,
    primary: bool,
    ic: Option<RecordingClock>,
    m: &mut FakeMachine,
) -> Queue {
    let mut q = queue(unit, ncpus, primary);
    q.cpu_init(g, m, ic).expect("cpu_init");
    q
}

fn dispatch(q: &mut Queue, g: &ClockIntr, m: &mut FakeMachine) -> DispatchReport {
    q.dispatch(g, m, &mut NoSink).expect("dispatch")
}

fn head(q: &Queue) -> Event {
    q.pending().next().expect("a pending event")
}

fn expiration_of(q: &Queue, kind: EventKind) -> u64 {
    q.pending()
        .find(|e| e.kind == kind)
        .expect("pending event of that kind")
        .expiration
}

fn pending_kinds(q: &Queue) -> Vec<EventKind> {
    q.pending().map(|e| e.kind).collect()
}

fn rearms(q: &Queue) -> &[u64] {
    &q.intrclock().expect("an intrclock").rearms
}

fn stats(q: &Queue) -> Stats {
    q.stats().0
}

/// Dispatches at every head expiration up to and including `until` (as a
/// prompt interrupt clock would); returns the number of dispatches.
fn run_until(
    q: &mut Queue,
    g: &ClockIntr,
    m: &mut FakeMachine,
    sink: &mut dyn IntervalSink,
    until: u64,
) -> u64 {
    let mut n = 0;
    loop {
        let next = head(q).expiration;
        if next > until {
            return n;
        }
        m.now = m.now.max(next);
        q.dispatch(g, m, sink).expect("dispatch");
        n += 1;
    }
}

/// A small deterministic generator for dispatch jitter (not the code under test).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The smallest `offset + k * period` strictly greater than `now`.
fn next_grid_point(offset: u64, period: u64, now: u64) -> u64 {
    if offset > now {
        offset
    } else {
        offset + ((now - offset) / period + 1) * period
    }
}

// ---------------------------------------------------------------------------
// 2.1 Global initialization
// ---------------------------------------------------------------------------

#[test]
fn test_ci_init_1_hardclock_period() {
    assert_eq!(
        global(Config {
            hz: 100,
            ..Config::openbsd_amd64()
        })
        .hardclock_period(),
        10_000_000
    );
    assert_eq!(global(fixed(1024, 1024)).hardclock_period(), 976_562);
}

#[test]
fn test_ci_init_1_hardclock_period_is_integer_division() {
    assert_eq!(global(fixed(1, 1)).hardclock_period(), 1_000_000_000);
    assert_eq!(global(fixed(3, 1)).hardclock_period(), 333_333_333);
    assert_eq!(global(fixed(7, 1)).hardclock_period(), 142_857_142);
    assert_eq!(global(fixed(1_000_000_000, 1)).hardclock_period(), 1);
}

#[test]
fn test_ci_init_1_uninitialized_reports_nothing() {
    let g = ClockIntr::new();
    assert!(!g.initialized());
    assert_eq!(g.hardclock_period(), 0);
}

#[test]
fn test_ci_init_2_hz1024_hardclock_count_over_uptime() {
    let g = global(fixed(1024, 1));
    let mut m = FakeMachine::at(0);
    let mut q = started(&g, 0, 1, true, Some(rc(0)), &mut m);
    // Check the count at several uptimes, including exact grid points and
    // the instant just before one.
    for u in [
        976_561,
        976_562,
        5 * 976_562 - 1,
        SEC,
        3 * SEC + 123_457,
        10 * SEC,
    ] {
        run_until(&mut q, &g, &mut m, &mut NoSink, u);
        assert_eq!(m.hardclocks, u / 976_562 + 1, "uptime {u}");
    }
    assert_eq!(m.hardclocks, 10_241);
}

#[test]
fn test_ci_init_2_non_divisor_frequency_runs_slightly_fast() {
    let g = global(fixed(1024, 1));
    let mut m = FakeMachine::at(0);
    let mut q = started(&g, 0, 1, true, None, &mut m);
    m.now = 4000 * SEC;
    dispatch(&mut q, &g, &mut m);
    assert_eq!(m.hardclocks, 4000 * SEC / 976_562 + 1);
    assert_eq!(m.hardclocks, 4_096_003);
    // An exact 1024 Hz clock would have ticked 4000 * 1024 + 1 times.
    assert!(m.hardclocks > 4000 * 1024 + 1);
}

fn init_err(config: Config) -> Error {
    let g = ClockIntr::new();
    let err = g.init(&config, true).unwrap_err();
    assert!(
        !g.initialized(),
        "a failed init leaves the state uninitialised"
    );
    assert_eq!(config.validate(), Err(err));
    err
}

#[test]
fn test_ci_init_3_hz_out_of_range() {
    assert_eq!(init_err(Config { hz: 0, ..VALID }), Error::Hz(0));
    assert_eq!(
        init_err(Config {
            hz: 1_000_000_001,
            ..VALID
        }),
        Error::Hz(1_000_000_001)
    );
    assert_eq!(
        init_err(Config {
            hz: u32::MAX,
            ..VALID
        }),
        Error::Hz(u32::MAX)
    );
    assert!(ClockIntr::new()
        .init(&Config { hz: 1, ..VALID }, true)
        .is_ok());
    assert!(ClockIntr::new()
        .init(
            &Config {
                hz: 1_000_000_000,
                ..VALID
            },
            true
        )
        .is_ok());
}

#[test]
fn test_ci_init_3_stathz_out_of_range() {
    assert_eq!(init_err(Config { stathz: 0, ..VALID }), Error::Stathz(0));
    assert_eq!(
        init_err(Config {
            stathz: 1_000_000_001,
            profhz: 1_000_000_001,
            ..VALID
        }),
        Error::Stathz(1_000_000_001)
    );
    assert!(ClockIntr::new()
        .init(
            &Config {
                stathz: 1,
                profhz: 1,
                ..VALID
            },
            true
        )
        .is_ok());
    assert!(ClockIntr::new()
        .init(
            &Config {
                stathz: 1_000_000_000,
                profhz: 1_000_000_000,
                ..VALID
            },
            true
        )
        .is_ok());
}

#[test]
fn test_ci_init_3_profhz_below_stathz() {
    assert_eq!(
        init_err(Config {
            stathz: 100,
            profhz: 50,
            ..VALID
        }),
        Error::ProfhzRange {
            profhz: 50,
            stathz: 100
        }
    );
    assert_eq!(
        init_err(Config {
            stathz: 100,
            profhz: 0,
            ..VALID
        }),
        Error::ProfhzRange {
            profhz: 0,
            stathz: 100
        }
    );
}

#[test]
fn test_ci_init_3_profhz_above_max() {
    // A multiple of stathz, but above 10^9.
    assert_eq!(
        init_err(Config {
            stathz: 100,
            profhz: 1_000_000_100,
            ..VALID
        }),
        Error::ProfhzRange {
            profhz: 1_000_000_100,
            stathz: 100
        }
    );
    assert!(ClockIntr::new()
        .init(
            &Config {
                stathz: 100,
                profhz: 1_000_000_000,
                ..VALID
            },
            true
        )
        .is_ok());
}

#[test]
fn test_ci_init_3_profhz_not_multiple_of_stathz() {
    assert_eq!(
        init_err(Config {
            stathz: 100,
            profhz: 150,
            ..VALID
        }),
        Error::ProfhzMultiple {
            profhz: 150,
            stathz: 100
        }
    );
    assert_eq!(
        init_err(Config {
            stathz: 128,
            profhz: 1000,
            ..VALID
        }),
        Error::ProfhzMultiple {
            profhz: 1000,
            stathz: 128
        }
    );
    // profhz == stathz is a multiple.
    assert!(ClockIntr::new()
        .init(
            &Config {
                stathz: 100,
                profhz: 100,
                ..VALID
            },
            true
        )
        .is_ok());
}

#[test]
fn test_ci_init_3_schedhz_out_of_range() {
    assert_eq!(
        init_err(Config {
            schedhz: -1,
            ..VALID
        }),
        Error::Schedhz(-1)
    );
    assert_eq!(
        init_err(Config {
            schedhz: i64::MIN,
            ..VALID
        }),
        Error::Schedhz(i64::MIN)
    );
    assert_eq!(
        init_err(Config {
            schedhz: 1_000_000_001,
            ..VALID
        }),
        Error::Schedhz(1_000_000_001)
    );
    assert!(ClockIntr::new()
        .init(
            &Config {
                schedhz: 0,
                ..VALID
            },
            true
        )
        .is_ok());
    let g = global(Config {
        schedhz: 1_000_000_000,
        ..VALID
    });
    assert_eq!(g.schedclock_period(), 1);
}

#[test]
fn test_ci_init_3_unknown_flags() {
    assert_eq!(init_err(Config { flags: 1, ..VALID }), Error::Flags(1));
    assert_eq!(
        init_err(Config {
            flags: 0x4000_0000,
            ..VALID
        }),
        Error::Flags(0x4000_0000)
    );
    assert_eq!(
        init_err(Config {
            flags: CL_RNDSTAT | 0x10,
            ..VALID
        }),
        Error::Flags(0x10)
    );
    assert_eq!(CL_RNDSTAT, 0x8000_0000);
    assert_eq!(CL_FLAG_MASK, CL_RNDSTAT);
    assert!(ClockIntr::new()
        .init(
            &Config {
                flags: CL_RNDSTAT,
                ..VALID
            },
            true
        )
        .is_ok());
}

#[test]
fn test_ci_init_3_not_primary() {
    let g = ClockIntr::new();
    assert_eq!(g.init(&VALID, false), Err(Error::InitNotPrimary));
    assert!(!g.initialized());
    // The primary can still initialise afterwards.
    assert_eq!(g.init(&VALID, true), Ok(()));
}

#[test]
fn test_ci_init_3_init_twice() {
    let g = global(VALID);
    assert_eq!(g.init(&VALID, true), Err(Error::InitTwice));
    let other = Config {
        hz: 1024,
        stathz: 128,
        profhz: 1024,
        schedhz: 16,
        flags: CL_RNDSTAT,
    };
    assert_eq!(g.init(&other, true), Err(Error::InitTwice));
    // The first configuration stays in force.
    assert_eq!(g.config(), VALID);
    assert_eq!(g.hardclock_period(), 10_000_000);
    assert_eq!(g.schedclock_period(), 0);
    assert!(!g.randomized());
}

#[test]
fn test_ci_init_3_failed_init_can_be_retried() {
    let g = ClockIntr::new();
    assert_eq!(g.init(&Config { hz: 0, ..VALID }, true), Err(Error::Hz(0)));
    assert!(!g.initialized());
    assert_eq!(g.init(&VALID, true), Ok(()));
    assert!(g.initialized());
    assert_eq!(g.config(), VALID);
}

#[test]
fn test_ci_init_3_amb_4_rndstat_too_fast() {
    let too_fast = Config {
        hz: 100,
        stathz: 500_000_000,
        profhz: 500_000_000,
        schedhz: 0,
        flags: CL_RNDSTAT,
    };
    assert_eq!(init_err(too_fast), Error::RndstatTooFast(500_000_000));
    // The same rates without CL_RNDSTAT are fine (fixed period, no mask).
    assert!(ClockIntr::new()
        .init(
            &Config {
                flags: 0,
                ..too_fast
            },
            true
        )
        .is_ok());
    // profhz alone too fast.
    assert_eq!(
        init_err(Config {
            stathz: 250_000_000,
            ..too_fast
        }),
        Error::RndstatTooFast(500_000_000)
    );
    // 250 MHz is the fastest randomizable rate: avg 4, var 2, min 3, mask 1.
    let g = global(Config {
        stathz: 250_000_000,
        profhz: 250_000_000,
        ..too_fast
    });
    assert_eq!(
        g.active_statvar(),
        StatVar {
            avg: 4,
            min: 3,
            mask: 1
        }
    );
    // Just above 250 MHz: avg 3, var 1, mask 0.
    assert_eq!(
        init_err(Config {
            stathz: 250_000_001,
            profhz: 250_000_001,
            ..too_fast
        }),
        Error::RndstatTooFast(250_000_001)
    );
}

#[test]
fn test_ci_init_3_amb_4_rndstat_rejects_wrapping_mask() {
    // avg = floor(10^9 / f) = 1 for f in 500,000,001..=10^9: var = 0 and
    // mask = var - 1 wraps to all ones, so a "1 ns" statclock would draw
    // intervals of up to 2^31 ns. AMB-4 and the crate docs say such rates
    // are rejected with CL_RNDSTAT.
    assert_eq!(StatVar::new(1_000_000_000).mask, u32::MAX);
    for freq in [500_000_001, 600_000_000, 999_999_999, 1_000_000_000] {
        let config = Config {
            hz: 100,
            stathz: freq,
            profhz: freq,
            schedhz: 0,
            flags: CL_RNDSTAT,
        };
        assert_eq!(
            config.validate(),
            Err(Error::RndstatTooFast(freq)),
            "freq {freq}"
        );
        assert_eq!(
            ClockIntr::new().init(&config, true),
            Err(Error::RndstatTooFast(freq)),
            "freq {freq}"
        );
    }
    // profhz alone in the wrapping range.
    let config = Config {
        hz: 100,
        stathz: 100,
        profhz: 1_000_000_000,
        schedhz: 0,
        flags: CL_RNDSTAT,
    };
    assert_eq!(config.validate(), Err(Error::RndstatTooFast(1_000_000_000)));
}

#[test]
fn test_ci_init_3_display_names_the_rule() {
    let cases: [(Error, &str); 15] = [
        (Error::Hz(0), "CI-INIT-3"),
        (Error::Stathz(0), "CI-INIT-3"),
        (
            Error::ProfhzRange {
                profhz: 50,
                stathz: 100,
            },
            "CI-INIT-3",
        ),
        (
            Error::ProfhzMultiple {
                profhz: 150,
                stathz: 100,
            },
            "CI-INIT-3",
        ),
        (Error::Schedhz(-1), "CI-INIT-3"),
        (Error::Flags(1), "CI-INIT-3"),
        (Error::RndstatTooFast(500_000_000), "AMB-4"),
        (Error::InitNotPrimary, "CI-INIT-3"),
        (Error::InitTwice, "CI-INIT-3"),
        (Error::CpuInitBeforeInit, "CI-CPU-7"),
        (Error::CpuNotInitialized, "CI-CPU-7"),
        (Error::RecursiveDispatch, "CI-D-1"),
        (Error::NotAtClockIpl, "CI-D-2"),
        (
            Error::StatclockRate {
                freq: 101,
                stathz: 100,
                profhz: 1000,
            },
            "CI-RATE-1",
        ),
        (Error::RateBeforeInit, "CI-RATE-1"),
    ];
    let mut messages = Vec::new();
    for (err, rule) in cases {
        let msg = err.to_string();
        assert!(msg.contains(rule), "{msg:?} should name {rule}");
        // The fixed message (no number formatting) names the same rule.
        assert!(
            err.message().contains(rule),
            "{:?} should name {rule}",
            err.message()
        );
        messages.push(msg);
    }
    // Every misuse has a distinct message.
    for (i, a) in messages.iter().enumerate() {
        for b in &messages[i + 1..] {
            assert_ne!(a, b);
        }
    }
    assert!(Error::Hz(1_000_000_001).to_string().contains("1000000001"));
    assert!(Error::Schedhz(-1).to_string().contains("-1"));
    let profhz = Error::ProfhzMultiple {
        profhz: 150,
        stathz: 100,
    }
    .to_string();
    assert!(profhz.contains("150") && profhz.contains("100"));
    assert!(Error::RndstatTooFast(500_000_000)
        .to_string()
        .contains("500000000"));
}

#[test]
fn test_ci_init_4_schedhz_zero_has_no_schedclock() {
    let g = global(Config {
        schedhz: 0,
        ..fixed(100, 100)
    });
    assert_eq!(g.schedclock_period(), 0);
    let mut m = FakeMachine::at(0);
    let mut q = started(&g, 0, 1, true, Some(rc(0)), &mut m);
    assert_eq!(q.pending().count(), 2);
    assert!(q.pending().all(|e| e.kind != EventKind::Schedclock));
    assert_eq!(q.idle_events().count(), 0);
    run_until(&mut q, &g, &mut m, &mut NoSink, SEC);
    assert_eq!(m.schedclocks, 0);
    assert!(m.hardclocks > 0 && m.statclocks > 0);
    assert_eq!(q.pending().count(), 2);
}

#[test]
fn test_ci_init_4_schedhz_16_runs_16_times_per_second() {
    let g = global(Config {
        schedhz: 16,
        ..Config::openbsd_amd64()
    });
    assert_eq!(g.schedclock_period(), 62_500_000);
    for (unit, ncpus, primary) in [(0, 2, true), (1, 2, false)] {
        let mut m = FakeMachine::at(0);
        let mut q = started(&g, unit, ncpus, primary, Some(rc(unit)), &mut m);
        assert_eq!(q.pending().count(), 3);
        run_until(&mut q, &g, &mut m, &mut NoSink, SEC);
        assert_eq!(m.schedclocks, 16, "cpu {unit}");
        run_until(&mut q, &g, &mut m, &mut NoSink, 10 * SEC);
        assert_eq!(m.schedclocks, 160, "cpu {unit}");
    }
}

#[test]
fn test_ci_init_5_statvars_precomputed_and_stathz_active() {
    for config in [
        Config::openbsd_amd64(),
        Config {
            hz: 1024,
            stathz: 128,
            profhz: 1024,
            schedhz: 0,
            flags: CL_RNDSTAT,
        },
        Config {
            hz: 100,
            stathz: 3,
            profhz: 9,
            schedhz: 0,
            flags: 0,
        },
    ] {
        let g = global(config);
        let (stat, prof) = g.statvars();
        assert_eq!(stat, StatVar::new(config.stathz));
        assert_eq!(prof, StatVar::new(config.profhz));
        assert_eq!(g.active_statvar(), stat);
        assert_eq!(
            u64::from(g.active_statvar().avg),
            SEC / u64::from(config.stathz)
        );
    }
}

#[test]
fn test_ci_init_6_cpu_init_requires_init() {
    let g = ClockIntr::new();
    let mut m = FakeMachine::at(0);
    let mut q = queue(0, 1, true);
    assert_eq!(
        q.cpu_init(&g, &mut m, Some(rc(0))),
        Err(Error::CpuInitBeforeInit)
    );
    assert!(!q.initialized());
    g.init(&VALID, true).unwrap();
    assert_eq!(q.cpu_init(&g, &mut m, Some(rc(0))), Ok(()));
    assert!(q.initialized());
}

// ---------------------------------------------------------------------------
// 2.2 Per-CPU initialization and resume
// ---------------------------------------------------------------------------

#[test]
fn test_ci_cpu_1_establishes_two_or_three_events() {
    let mut m = FakeMachine::at(0);
    let g = global(VALID);
    let q = started(&g, 0, 1, true, None, &mut m);
    assert_eq!(
        pending_kinds(&q),
        vec![EventKind::Hardclock, EventKind::Statclock]
    );

    let g = global(Config {
        schedhz: 16,
        ..VALID
    });
    let q = started(&g, 0, 1, true, None, &mut m);
    let mut kinds = pending_kinds(&q);
    kinds.sort_by_key(|k| k.name());
    assert_eq!(
        kinds,
        vec![
            EventKind::Hardclock,
            EventKind::Schedclock,
            EventKind::Statclock
        ]
    );
}

#[test]
fn test_ci_cpu_1_no_intrclock_never_rearms() {
    let g = global(Config {
        schedhz: 16,
        ..Config::openbsd_amd64()
    });
    let mut m = FakeMachine::at(0);
    let mut q = started(&g, 1, 2, false, None, &mut m);
    assert!(q.intrclock().is_none());
    let mut jitter = Lcg(7);
    let mut outcomes = [0u32; 3];
    for _ in 0..2000 {
        m.now += jitter.below(15 * MS);
        let r = dispatch(&mut q, &g, &mut m);
        assert_eq!(r.rearm, None);
        outcomes[r.outcome as usize] += 1;
    }
    // Both prompt and early dispatches were exercised.
    assert!(outcomes[Outcome::Prompt as usize] > 0 && outcomes[Outcome::Early as usize] > 0);
    assert!(q.intrclock().is_none());
    assert_eq!(q.trigger(), Ok(()));
}

#[test]
fn test_ci_cpu_1_intrclock_rearmed_once_per_dispatch() {
    let g = global(Config {
        schedhz: 16,
        ..Config::openbsd_amd64()
    });
    let mut m = FakeMachine::at(0);
    let mut q = started(&g, 1, 2, false, Some(rc(5)), &mut m);
    assert_eq!(q.intrclock().unwrap().id, 5);
    let mut jitter = Lcg(9);
    for i in 0..2000 {
        m.now += jitter.below(15 * MS);
        let r = dispatch(&mut q, &g, &mut m);
        assert!(q.pending().count() > 0);
        assert_eq!(rearms(&q).len(), i + 1);
        assert_eq!(r.rearm, Some(*rearms(&q).last().unwrap()));
    }
}

#[test]
fn test_ci_cpu_2_second_cpu_init_keeps_first_intrclock() {
    let g = global(Config::openbsd_amd64());
    let mut m = FakeMachine::at(0);
    let mut q = started(&g, 1, 2, false, Some(rc(1)), &mut m);
    m.now = 3 * MS;
    q.cpu_init(&g, &mut m, Some(rc(2))).unwrap();
    assert_eq!(q.intrclock().unwrap().id, 1);
    m.now = head(&q).expiration;
    dispatch(&mut q, &g, &mut m);
    q.trigger().unwrap();
    assert_eq!(q.intrclock().unwrap().id, 1);
    assert_eq!(rearms(&q).len(), 1);
    assert_eq!(q.intrclock().unwrap().triggers, 1);
}

#[test]
fn test_ci_cpu_2_cannot_acquire_intrclock_later() {
    let g = global(fixed(100, 100));
    let mut m = FakeMachine::at(0);
    let mut q = started(&g, 1, 4, false, None, &mut m);
    m.now = 12 * MS;
    q.cpu_init(&g, &mut m, Some(rc(2))).unwrap();
    assert!(q.intrclock().is_none());
    // Still staggered as a CPU without intrclock (multiplier 0).
    assert_eq!(expiration_of(&q, EventKind::Hardclock) % 10_000_000, 0);
    m.now = head(&q).expiration;
    assert_eq!(dispatch(&mut q, &g, &mut m).rearm, None);
}

#[test]
fn test_ci_cpu_3_primary_first_dispatch_catches_up_from_zero() {
    for init_at in [0, 1, 7 * MS] {
        let g = global(Config::openbsd_amd64());
        let mut m = FakeMachine::at(init_at);
        let mut q = started(&g, 0, 1, true, Some(rc(0)), &mut m);
        assert_eq!(expiration_of(&q, EventKind::Hardclock), 0);
        m.now = 2_345 * MS;
        let r = dispatch(&mut q, &g, &mut m);
        assert_eq!(m.hardclocks, 235, "cpu_init at {init_at}");
        assert_eq!(r.calls.hardclock, 235);
        assert_eq!(expiration_of(&q, EventKind::Hardclock), 2_350 * MS);
    }
}

#[test]
fn test_ci_cpu_3_secondary_first_call_is_advanced() {
    let g = global(Config::openbsd_amd64());
    let mut m = FakeMachine::at(7 * MS);
    let mut q = started(&g, 1, 1, false, None, &mut m);
    // No intrclock: offset 0, advanced to the first grid point after 7 ms.
    assert_eq!(expiration_of(&q, EventKind::Hardclock), 10 * MS);
    let mut m = FakeMachine::at(2_345 * MS);
    q = started(&g, 0, 1, false, Some(rc(0)), &mut m);
    assert_eq!(expiration_of(&q, EventKind::Hardclock), 2_350 * MS);
    dispatch(&mut q, &g, &mut m);
    assert_eq!(m.hardclocks, 0);
}

#[test]
fn test_ci_cpu_4_stagger_offsets() {
    let g = global(Config {
        schedhz: 16,
        ..fixed(100, 100)
    });
    // (unit, primary, has intrclock, expected multiplier)
    for (unit, primary, has_ic, k) in [
        (0, true, true, 0),
        (1, false, true, 1),
        (2, false, true, 2),
        (3, false, false, 0),
    ] {
        let mut m = FakeMachine::at(0);
        let ic = has_ic.then(|| rc(unit));
        let mut q = started(&g, unit, 4, primary, ic, &mut m);
        let check = |q: &Queue| {
            assert_eq!(
                expiration_of(q, EventKind::Hardclock) % 10_000_000,
                k * 2_500_000,
                "cpu {unit}"
            );
            assert_eq!(
                expiration_of(q, EventKind::Statclock) % 10_000_000,
                k * 2_500_000,
                "cpu {unit}"
            );
            assert_eq!(
                expiration_of(q, EventKind::Schedclock) % 62_500_000,
                k * 15_625_000,
                "cpu {unit}"
            );
        };
        check(&q);
        run_until(&mut q, &g, &mut m, &mut NoSink, SEC);
        check(&q);
        // Callbacks ran at the staggered times.
        let mut jitter = Lcg(u64::from(unit));
        for _ in 0..100 {
            m.now += jitter.below(30 * MS);
            dispatch(&mut q, &g, &mut m);
            check(&q);
        }
    }
}

#[test]
fn test_ci_cpu_4_offset_divides_first() {
    // (976,562 / 3) * 2 = 651,040, whereas 976,562 * 2 / 3 = 651,041.
    let g = global(fixed(1024, 1024));
    let mut m = FakeMachine::at(0);
    let q = started(&g, 2, 3, false, Some(rc(2)), &mut m);
    assert_eq!(expiration_of(&q, EventKind::Hardclock), 651_040);
    assert_eq!(expiration_of(&q, EventKind::Statclock), 651_040);
}

#[test]
fn test_ci_cpu_5_reinit_places_events_after_uptime() {
    let g = global(Config {
        schedhz: 16,
        ..Config::openbsd_amd64()
    });
    let mut m = FakeMachine::at(0);
    let mut q = started(&g, 1, 4, false, Some(rc(1)), &mut m);
    run_until(&mut q, &g, &mut m, &mut NoSink, 100 * MS);
    let counters = (m.hardclocks, m.statclocks, m.schedclocks);
    let n_rearms = rearms(&q).len();
    let st = q.stats();
    for u in [
        1_234_567_891,
        2_002_500_000, /* exactly on the hardclock grid */
    ] {
        m.now = u;
        let reads = m.reads;
        q.cpu_init(&g, &mut m, None).unwrap();
        assert_eq!(m.reads, reads + 1);
        assert_eq!(q.uptime(), u);
        assert_eq!(
            expiration_of(&q, EventKind::Hardclock),
            next_grid_point(2_500_000, 10_000_000, u)
        );
        assert_eq!(
            expiration_of(&q, EventKind::Statclock),
            next_grid_point(2_500_000, 10_000_000, u)
        );
        assert_eq!(
            expiration_of(&q, EventKind::Schedclock),
            next_grid_point(15_625_000, 62_500_000, u)
        );
        assert!(q.pending().all(|e| e.expiration > u));
        // No callback ran, nothing touched the intrclock or the statistics.
        assert_eq!((m.hardclocks, m.statclocks, m.schedclocks), counters);
        assert_eq!(rearms(&q).len(), n_rearms);
        assert_eq!(q.stats(), st);
    }
    assert_eq!(expiration_of(&q, EventKind::Hardclock), 2_012_500_000);
}

#[test]
fn test_ci_cpu_5_primary_reinit_is_advanced() {
    let g = global(Config::openbsd_amd64());
    let mut m = FakeMachine::at(0);
    let mut q = started(&g, 0, 2, true, Some(rc(0)), &mut m);
    assert_eq!(expiration_of(&q, EventKind::Hardclock), 0);
    m.now = 2_345 * MS;
    q.cpu_init(&g, &mut m, None).unwrap();
    assert_eq!(expiration_of(&q, EventKind::Hardclock), 2_350 * MS);
    dispatch(&mut q, &g, &mut m);
    assert_eq!(m.hardclocks, 0);
}

#[test]
fn test_ci_cpu_6_gap_without_reinit_catches_up() {
    let g = global(fixed(100, 100));
    let mut m = FakeMachine::at(0);
    let mut q = started(&g, 1, 2, false, Some(rc(1)), &mut m);
    run_until(&mut q, &g, &mut m, &mut NoSink, SEC);
    let before = m.hardclocks;
    // The clock jumps 1 s past the pending expiration.
    m.now = head(&q).expiration + SEC;
    let r = dispatch(&mut q, &g, &mut m);
    assert_eq!(r.calls.hardclock, 101);
    assert_eq!(m.hardclocks - before, 101);
    // A 1 s gap measured from the last dispatch: 100 calls.
    let last = m.now;
    m.now = last + SEC;
    assert_eq!(dispatch(&mut q, &g, &mut m).calls.hardclock, 100);
}

#[test]
fn test_ci_cpu_6_gap_with_reinit_skips_missed_periods() {
    let g = global(fixed(100, 100));
    for delay in [0, 1, 5 * MS, 10 * MS] {
        let mut m = FakeMachine::at(0);
        let mut q = started(&g, 1, 2, false, Some(rc(1)), &mut m);
        run_until(&mut q, &g, &mut m, &mut NoSink, SEC);
        m.now += SEC;
        q.cpu_init(&g, &mut m, None).unwrap();
        let before = m.total_calls();
        m.now += delay;
        let r = dispatch(&mut q, &g, &mut m);
        assert!(r.calls.hardclock <= 1, "delay {delay}");
        assert!(r.calls.statclock <= 1, "delay {delay}");
        assert!(m.total_calls() - before <= 2);
    }
}

#[test]
fn test_ci_cpu_7_cpu_init_before_init() {
    let g = ClockIntr::new();
    let mut m = FakeMachine::at(0);
    let mut q = queue(1, 2, false);
    assert_eq!(
        q.cpu_init(&g, &mut m, Some(rc(1))),
        Err(Error::CpuInitBeforeInit)
    );
    assert!(!q.initialized());
    assert!(q.intrclock().is_none());
    assert_eq!(q.pending().count(), 0);
}

#[test]
fn test_ci_cpu_7_dispatch_and_trigger_before_cpu_init() {
    let g = global(VALID);
    let mut m = FakeMachine::at(5 * MS);
    let mut q = queue(0, 1, true);
    assert_eq!(
        q.dispatch(&g, &mut m, &mut NoSink),
        Err(Error::CpuNotInitialized)
    );
    assert_eq!(q.trigger(), Err(Error::CpuNotInitialized));
    assert_eq!(m.total_calls(), 0);
    assert_eq!(q.stats().0, Stats::default());
    // The failed dispatch did not leave the CPU marked as dispatching.
    q.cpu_init(&g, &mut m, Some(rc(0))).unwrap();
    assert!(q.dispatch(&g, &mut m, &mut NoSink).is_ok());
    assert_eq!(q.trigger(), Ok(()));
    assert_ne!(
        Error::CpuInitBeforeInit.to_string(),
        Error::CpuNotInitialized.to_string()
    );
}

#[test]
fn test_ci_cpu_8_cpu_init_does_not_touch_intrclock() {
    let g = global(Config {
        schedhz: 16,
        ..Config::openbsd_amd64()
    });
    let mut m = FakeMachine::at(3 * MS);
    let mut q = started(&g, 1, 2, false, Some(rc(1)), &mut m);
    assert!(rearms(&q).is_empty());
    assert_eq!(q.intrclock().unwrap().triggers, 0);
    m.now = 5 * SEC;
    q.cpu_init(&g, &mut m, Some(rc(9))).unwrap();
    assert!(rearms(&q).is_empty());
    assert_eq!(q.intrclock().unwrap().triggers, 0);
    assert_eq!(m.total_calls(), 0);
}

// ---------------------------------------------------------------------------
// 2.3 Event queue and ordering
// ---------------------------------------------------------------------------

#[test]
fn test_ci_q_1_insert_fifo_among_equal_expirations() {
    // White-box: A(100), B(100), C(50) inserted through `schedule`.
    let g = global(Config {
        schedhz: 100,
        ..VALID
    });
    let mut m = FakeMachine::at(0);
    let mut q = started(&g, 0, 1, true, None, &mut m);
    q.schedule(HARDCLOCK, 100); // A
    q.schedule(STATCLOCK, 100); // B
    q.schedule(SCHEDCLOCK, 50); // C
    assert_eq!(
        pending_kinds(&q),
        vec![
            EventKind::Schedclock,
            EventKind::Hardclock,
            EventKind::Statclock
        ]
    );
    let exps: Vec<u64> = q.pending().map(|e| e.expiration).collect();
    assert_eq!(exps, vec![50, 100, 100]);
}

#[test]
fn test_ci_q_1_equal_periods_keep_establishment_order() {
    // hz == stathz == schedhz, fixed period, same stagger: all three events
    // expire together and stay in the order they were queued.
    let g = global(Config {
        schedhz: 100,
        ..fixed(100, 100)
    });
    let mut m = FakeMachine::recording(0);
    let mut q = started(&g, 1, 2, false, Some(rc(1)), &mut m);
    let order = vec![
        EventKind::Hardclock,
        EventKind::Statclock,
        EventKind::Schedclock,
    ];
    assert_eq!(pending_kinds(&q), order);
    assert!(q.pending().all(|e| e.expiration == 5 * MS));
    for i in 0..5 {
        m.now = head(&q).expiration;
        dispatch(&mut q, &g, &mut m);
        assert_eq!(pending_kinds(&q), order);
        assert_eq!(m.kinds_logged()[3 * i..], order[..]);
    }
}

#[test]
fn test_ci_q_2_reschedule_moves_behind_equal_peers() {
    // White-box.
    let g = global(Config {
        schedhz: 100,
        ..VALID
    });
    let mut m = FakeMachine::at(0);
    let mut q = started(&g, 0, 1, true, None, &mut m);
    q.schedule(HARDCLOCK, 100);
    q.schedule(STATCLOCK, 100);
    q.schedule(SCHEDCLOCK, 100);
    assert_eq!(
        pending_kinds(&q),
        vec![
            EventKind::Hardclock,
            EventKind::Statclock,
            EventKind::Schedclock
        ]
    );
    // Rescheduling the head to the same time moves it to the back.
    q.schedule(HARDCLOCK, 100);
    assert_eq!(
        pending_kinds(&q),
        vec![
            EventKind::Statclock,
            EventKind::Schedclock,
            EventKind::Hardclock
        ]
    );
    assert_eq!(q.pending().count(), 3);
    // Rescheduling earlier moves it to the front.
    q.schedule(SCHEDCLOCK, 99);
    assert_eq!(
        pending_kinds(&q),
        vec![
            EventKind::Schedclock,
            EventKind::Statclock,
            EventKind::Hardclock
        ]
    );
}

#[test]
fn test_ci_q_2_cpu_init_requeues_behind_equal_peers() {
    // hz 100, stathz 50, one CPU with offset 0, fixed statclock.
    let g = global(fixed(100, 50));
    let mut m = FakeMachine::recording(5 * MS);
    let mut q = started(&g, 0, 1, false, Some(rc(0)), &mut m);
    assert_eq!(expiration_of(&q, EventKind::Hardclock), 10 * MS);
    assert_eq!(expiration_of(&q, EventKind::Statclock), 20 * MS);
    m.now = 10 * MS;
    dispatch(&mut q, &g, &mut m);
    // hardclock was requeued at 20 ms behind the statclock already there.
    assert_eq!(
        pending_kinds(&q),
        vec![EventKind::Statclock, EventKind::Hardclock]
    );
    // cpu_init reschedules hardclock, then statclock: statclock ends up behind.
    m.now = 15 * MS;
    q.cpu_init(&g, &mut m, None).unwrap();
    assert_eq!(
        pending_kinds(&q),
        vec![EventKind::Hardclock, EventKind::Statclock]
    );
    assert!(q.pending().all(|e| e.expiration == 20 * MS));
}

#[test]
fn test_ci_q_3_two_or_three_pending_after_every_dispatch() {
    for (schedhz, established) in [(0, 2), (16, 3), (100, 3)] {
        let g = global(Config {
            schedhz,
            ..Config::openbsd_amd64()
        });
        let mut m = FakeMachine::at(0);
        m.on_hardclock_advance = 200_000;
        let mut q = started(&g, 1, 3, false, Some(rc(1)), &mut m);
        let mut jitter = Lcg(schedhz as u64);
        for _ in 0..3000 {
            m.now += jitter.below(25 * MS);
            m.curproc = jitter.below(2) == 0;
            dispatch(&mut q, &g, &mut m);
            assert_eq!(q.pending().count(), established);
            assert_eq!(q.idle_events().count(), 0);
            assert_eq!(q.running(), None);
        }
    }
}

#[test]
fn test_ci_q_4_queues_are_per_cpu() {
    let g = global(Config {
        schedhz: 16,
        ..Config::openbsd_amd64()
    });
    let mut m0 = FakeMachine::at(0);
    let mut m1 = FakeMachine::at(0);
    let mut q0 = started(&g, 0, 2, true, Some(rc(0)), &mut m0);
    let q1 = started(&g, 1, 2, false, Some(rc(1)), &mut m1);
    let pending1: Vec<Event> = q1.pending().collect();
    run_until(&mut q0, &g, &mut m0, &mut NoSink, SEC);
    assert!(m0.hardclocks > 0);
    assert_eq!(q1.pending().collect::<Vec<_>>(), pending1);
    assert_eq!(q1.stats().0, Stats::default());
    assert_eq!(m1.total_calls(), 0);
    assert!(rearms(&q1).is_empty());
}

// ---------------------------------------------------------------------------
// 2.4 Dispatch
// ---------------------------------------------------------------------------

#[test]
fn test_ci_d_1_recursive_dispatch_is_an_error() {
    let g = global(Config::openbsd_amd64());
    let mut m = FakeMachine::at(0);
    let mut q = started(&g, 0, 1, true, Some(rc(0)), &mut m);
    m.now = 50 * MS;
    q.set_dispatching_for_test();
    let reads = m.reads;
    assert_eq!(
        q.dispatch(&g, &mut m, &mut NoSink),
        Err(Error::RecursiveDispatch)
    );
    // Checked before anything else: below clock IPL it is still "recursive".
    m.clock_ipl = false;
    assert_eq!(
        q.dispatch(&g, &mut m, &mut NoSink),
        Err(Error::RecursiveDispatch)
    );
    assert_eq!(m.reads, reads);
    assert_eq!(m.total_calls(), 0);
    assert_eq!(q.stats().0, Stats::default());
    assert!(rearms(&q).is_empty());
}

#[test]
fn test_ci_d_1_mark_cleared_on_exit() {
    let g = global(Config::openbsd_amd64());
    let mut m = FakeMachine::at(0);
    let mut q = started(&g, 0, 1, true, Some(rc(0)), &mut m);
    for i in 1..=10 {
        m.now = i * 10 * MS;
        assert!(q.dispatch(&g, &mut m, &mut NoSink).is_ok());
    }
}

#[test]
fn test_ci_d_2_not_at_clock_ipl() {
    let g = global(Config::openbsd_amd64());
    let mut m = FakeMachine::at(0);
    let mut q = started(&g, 0, 1, true, Some(rc(0)), &mut m);
    m.now = 50 * MS;
    m.clock_ipl = false;
    let reads = m.reads;
    assert_eq!(
        q.dispatch(&g, &mut m, &mut NoSink),
        Err(Error::NotAtClockIpl)
    );
    assert_eq!(m.reads, reads);
    assert_eq!(m.total_calls(), 0);
    assert_eq!(q.stats().0, Stats::default());
    assert!(rearms(&q).is_empty());
    // At clock IPL the same CPU dispatches normally (the busy mark was cleared).
    m.clock_ipl = true;
    assert_eq!(dispatch(&mut q, &g, &mut m).outcome, Outcome::Prompt);
}

#[test]
fn test_ci_d_3_early_dispatch_rearms_remaining_time() {
    let g = global(Config::openbsd_amd64());
    let mut m = FakeMachine::at(0);
    let mut q = started(&g, 1, 2, false, Some(rc(1)), &mut m);
    m.now = head(&q).expiration;
    let first = dispatch(&mut q, &g, &mut m);
    assert_eq!(first.outcome, Outcome::Prompt);
    let remaining = first.rearm.unwrap();
    assert!(remaining > MS);
    q.trigger().unwrap();
    assert_eq!(q.intrclock().unwrap().triggers, 1);

    let before = q.stats().0;
    let calls = m.total_calls();
    let reads = m.reads;
    m.now += MS;
    let r = dispatch(&mut q, &g, &mut m);
    assert_eq!(r.outcome, Outcome::Early);
    assert_eq!(r.calls, Calls::default());
    assert_eq!(r.rearm, Some(remaining - MS));
    assert_eq!(rearms(&q), &[remaining, remaining - MS]);
    assert_eq!(m.total_calls(), calls);
    assert_eq!(m.reads, reads + 1, "an early dispatch reads the clock once");
    let after = q.stats().0;
    assert_eq!(after.early, before.early + 1);
    assert_eq!(after.earliness, before.earliness + remaining - MS);
    assert_eq!(after.dispatched, before.dispatched);
    assert_eq!(after.prompt, before.prompt);
    assert_eq!(after.run, before.run);
    assert_eq!(after.lateness, before.lateness);
    assert_eq!(after.spurious, 0);

    // Immediately (no time passed): early by the whole remaining time.
    let r = dispatch(&mut q, &g, &mut m);
    assert_eq!(r.outcome, Outcome::Early);
    assert_eq!(q.stats().0.early, before.early + 2);
    assert_eq!(
        q.stats().0.earliness,
        before.earliness + 2 * (remaining - MS)
    );
}

#[test]
fn test_ci_d_3_early_without_intrclock_does_not_rearm() {
    let g = global(Config::openbsd_amd64());
    let mut m = FakeMachine::at(0);
    let mut q = started(&g, 1, 2, false, None, &mut m);
    let exp = head(&q).expiration;
    m.now = exp - 3;
    let r = dispatch(&mut q, &g, &mut m);
    assert_eq!(r.outcome, Outcome::Early);
    assert_eq!(r.rearm, None);
    assert_eq!(q.stats().0.early, 1);
    assert_eq!(q.stats().0.earliness, 3);
}

#[test]
fn test_ci_d_3_spurious_when_queue_empty() {
    // The built-in events are always pending after cpu_init, so the public API
    // cannot empty the queue. White-box: unlink every event.
    let g = global(Config::openbsd_amd64());
    let mut m = FakeMachine::at(0);
    let mut q = started(&g, 0, 1, true, Some(rc(0)), &mut m);
    for slot in 0..MAX_EVENTS {
        q.unlink(slot);
    }
    assert_eq!(q.pending().count(), 0);
    assert_eq!(q.idle_events().count(), 2);
    m.now = 5 * SEC;
    let reads = m.reads;
    let r = dispatch(&mut q, &g, &mut m);
    assert_eq!(r.outcome, Outcome::Spurious);
    assert_eq!(r.rearm, None);
    assert_eq!(r.calls, Calls::default());
    assert!(rearms(&q).is_empty(), "a spurious dispatch does not rearm");
    assert_eq!(m.total_calls(), 0);
    assert_eq!(m.reads, reads + 1);
    assert_eq!(
        q.stats().0,
        Stats {
            spurious: 1,
            ..Stats::default()
        }
    );
}

#[test]
fn test_ci_d_4_busy_callback_runs_next_event_in_same_dispatch() {
    // Primary, hz 100, fixed statclock at 64 Hz (15.625 ms).
    let g = global(fixed(100, 64));
    let mut m = FakeMachine::recording(0);
    let mut q = started(&g, 0, 1, true, Some(rc(0)), &mut m);
    assert_eq!(expiration_of(&q, EventKind::Hardclock), 0);
    assert_eq!(expiration_of(&q, EventKind::Statclock), 15_625_000);
    m.now = 10 * MS;
    m.on_hardclock_advance = 3 * MS;
    let reads = m.reads;
    let r = dispatch(&mut q, &g, &mut m);
    // Two hardclocks (points 0 and 10 ms) leave the clock at 16 ms, past the
    // statclock's 15.625 ms: the re-read sees it and statclock runs too.
    assert_eq!(r.outcome, Outcome::Prompt);
    assert_eq!(
        r.calls,
        Calls {
            hardclock: 2,
            statclock: 1,
            schedclock: 0
        }
    );
    assert_eq!(q.stats().0.run, 2);
    assert_eq!(q.stats().0.prompt, 1);
    assert_eq!(
        m.reads,
        reads + 3,
        "entry, re-read before statclock, re-read before giving up"
    );
    assert_eq!((r.start, r.end), (10 * MS, 16 * MS));
    assert_eq!(q.uptime(), 16 * MS);
    assert_eq!(q.stats().0.dispatched, 6 * MS);
    assert_eq!(q.stats().0.lateness, 10 * MS);
    // One interrupt, one rearm, measured from the fresher time.
    assert_eq!(rearms(&q), &[4 * MS]);
    assert_eq!(
        m.kinds_logged(),
        vec![
            EventKind::Hardclock,
            EventKind::Hardclock,
            EventKind::Statclock
        ]
    );
}

#[test]
fn test_ci_d_4_no_reread_past_deadline_stops_loop() {
    // Without a busy callback, the re-read shows nothing new: run == 1.
    let g = global(fixed(100, 64));
    let mut m = FakeMachine::at(0);
    let mut q = started(&g, 0, 1, true, Some(rc(0)), &mut m);
    m.now = 10 * MS;
    let reads = m.reads;
    let r = dispatch(&mut q, &g, &mut m);
    assert_eq!(
        r.calls,
        Calls {
            hardclock: 2,
            statclock: 0,
            schedclock: 0
        }
    );
    assert_eq!(q.stats().0.run, 1);
    assert_eq!(m.reads, reads + 2);
    assert_eq!(rearms(&q), &[5_625_000]);
}

#[test]
fn test_ci_d_5_one_positive_rearm_per_dispatch() {
    for (seed, busy) in [(1u64, 0u64), (2, 250_000), (3, 4 * MS)] {
        let g = global(Config {
            schedhz: 16,
            ..Config::openbsd_amd64()
        });
        let mut m = FakeMachine::at(0);
        m.on_hardclock_advance = busy;
        let mut q = ClockQueue::new(2, 4, false, seed);
        q.cpu_init(&g, &mut m, Some(rc(2))).unwrap();
        let mut jitter = Lcg(seed);
        let mut last_rearm = 0;
        for i in 0..5000 {
            // Anywhere from "immediately" to twice the requested delay.
            m.now += match jitter.below(4) {
                0 => 0,
                1 => jitter.below(last_rearm.max(1)),
                2 => last_rearm,
                _ => last_rearm + jitter.below(last_rearm + 1),
            };
            let r = dispatch(&mut q, &g, &mut m);
            assert_ne!(r.outcome, Outcome::Spurious);
            assert_eq!(rearms(&q).len(), i + 1);
            last_rearm = *rearms(&q).last().unwrap();
            assert!(last_rearm >= 1);
            assert_eq!(r.rearm, Some(last_rearm));
            assert_eq!(last_rearm, head(&q).expiration - r.end);
        }
    }
}

#[test]
fn test_ci_d_6_outcome_prompt_iff_callbacks_ran() {
    let g = global(Config {
        schedhz: 16,
        ..Config::openbsd_amd64()
    });
    let mut m = FakeMachine::at(0);
    let mut q = started(&g, 1, 2, false, Some(rc(1)), &mut m);
    let mut jitter = Lcg(11);
    let mut seen = [0u32; 3];
    for _ in 0..5000 {
        m.now += jitter.below(12 * MS);
        m.curproc = jitter.below(3) != 0;
        let run_before = q.stats().0.run;
        let r = dispatch(&mut q, &g, &mut m);
        let ran = q.stats().0.run > run_before;
        assert_eq!(r.outcome == Outcome::Prompt, ran);
        if r.outcome != Outcome::Prompt {
            assert_eq!(r.calls, Calls::default());
        }
        seen[r.outcome as usize] += 1;
    }
    assert!(seen[Outcome::Prompt as usize] > 0 && seen[Outcome::Early as usize] > 0);
}

#[test]
fn test_ci_d_6_idle_schedclock_run_is_prompt() {
    // Only schedclock expires and no process is current: the callback still
    // ran (the event advanced), so the dispatch is prompt with zero calls.
    let g = global(Config {
        schedhz: 100,
        ..fixed(1, 1)
    });
    let mut m = FakeMachine::at(0);
    let mut q = started(&g, 0, 1, false, Some(rc(0)), &mut m);
    m.curproc = false;
    m.now = 10 * MS;
    let r = dispatch(&mut q, &g, &mut m);
    assert_eq!(r.outcome, Outcome::Prompt);
    assert_eq!(r.calls, Calls::default());
    assert_eq!(q.stats().0.run, 1);
}

#[test]
fn test_ci_d_7_statistics_account_every_dispatch() {
    let g = global(Config {
        schedhz: 16,
        ..Config::openbsd_amd64()
    });
    let mut m = FakeMachine::at(0);
    m.on_hardclock_advance = 100_000;
    let mut q = started(&g, 1, 2, false, Some(rc(1)), &mut m);
    let mut jitter = Lcg(3);
    let (mut n, mut dispatched, mut lateness, mut earliness) = (0u64, 0u64, 0u64, 0u64);
    let (mut prompt, mut early) = (0u64, 0u64);
    let mut gen = q.stats().1;
    assert_ne!(gen, 0);
    for _ in 0..5000 {
        m.now += jitter.below(12 * MS);
        let head_before = head(&q).expiration;
        let r = dispatch(&mut q, &g, &mut m);
        n += 1;
        dispatched += r.end - r.start;
        match r.outcome {
            Outcome::Prompt => {
                prompt += 1;
                lateness += r.start - head_before;
            }
            Outcome::Early => {
                early += 1;
                assert_eq!(r.end, r.start);
                earliness += head_before - r.start;
            }
            Outcome::Spurious => unreachable!(),
        }
        let (s, new_gen) = q.stats();
        assert_ne!(new_gen, 0);
        assert_ne!(new_gen, gen);
        gen = new_gen;
        assert_eq!(s.prompt + s.early + s.spurious, n);
    }
    let s = stats(&q);
    assert_eq!((s.prompt, s.early, s.spurious), (prompt, early, 0));
    assert_eq!(s.dispatched, dispatched);
    assert!(dispatched > 0);
    assert_eq!(s.lateness, lateness);
    assert_eq!(s.earliness, earliness);
    assert!(s.run >= s.prompt);
}

#[test]
fn test_ci_d_7_generation_skips_zero_on_wrap() {
    let g = global(Config::openbsd_amd64());
    let mut m = FakeMachine::at(0);
    let mut q = started(&g, 0, 1, true, None, &mut m);
    assert_eq!(q.stats().1, 1);
    dispatch(&mut q, &g, &mut m);
    assert_eq!(q.stats().1, 2);
    // White-box: force the wrap.
    q.gen = u32::MAX;
    dispatch(&mut q, &g, &mut m);
    assert_eq!(q.stats().1, 1);
}

// ---------------------------------------------------------------------------
// 2.5 Periodic events and catch-up
// ---------------------------------------------------------------------------

#[test]
fn test_ci_ev_1_nsec_advance_counts_whole_periods() {
    let mut next = 100;
    assert_eq!(nsec_advance(&mut next, 10, 99), 0);
    assert_eq!(next, 100);
    assert_eq!(nsec_advance(&mut next, 10, 100), 1);
    assert_eq!(next, 110);
    assert_eq!(nsec_advance(&mut next, 10, 119), 1);
    assert_eq!(next, 120);
    assert_eq!(nsec_advance(&mut next, 10, 175), 6);
    assert_eq!(next, 180);
    assert_eq!(nsec_advance(&mut next, 1, 180), 1);
    assert_eq!(next, 181);
}

#[test]
fn test_ci_ev_1_blocked_55ms_catches_up_by_repetition() {
    let g = global(fixed(100, 100));
    // The interrupt was due at 20 ms; blocked 55 ms after the last dispatch
    // (65 ms: 5 calls) or after the missed deadline (75 ms: 6 calls).
    for (dispatch_at, expected) in [(65 * MS, 5), (75 * MS, 6)] {
        let mut m = FakeMachine::recording(0);
        let mut q = started(&g, 0, 1, false, Some(rc(0)), &mut m);
        m.now = 10 * MS;
        dispatch(&mut q, &g, &mut m);
        let run = stats(&q).run;
        let hard = m.hardclocks;
        let logged = m.log.len();
        m.now = dispatch_at;
        let r = dispatch(&mut q, &g, &mut m);
        assert_eq!(r.calls.hardclock, expected);
        assert_eq!(m.hardclocks - hard, expected);
        // Back to back inside one hardclock callback run, then statclock's.
        let mut want = vec![EventKind::Hardclock; expected as usize];
        want.extend(vec![EventKind::Statclock; expected as usize]);
        assert_eq!(m.kinds_logged()[logged..], want[..]);
        // Two callbacks ran (TR-C-1), not 2 * expected.
        assert_eq!(stats(&q).run, run + 2);
        assert_eq!(
            expiration_of(&q, EventKind::Hardclock),
            dispatch_at - dispatch_at % (10 * MS) + 10 * MS
        );
    }
}

#[test]
fn test_ci_ev_2_statclock_fixed_mode_catches_up() {
    let g = global(fixed(1, 100));
    let mut m = FakeMachine::at(0);
    let mut q = started(&g, 0, 1, false, Some(rc(0)), &mut m);
    assert_eq!(expiration_of(&q, EventKind::Statclock), 10 * MS);
    m.now = 10 * MS + 73 * MS;
    let r = dispatch(&mut q, &g, &mut m);
    // Points 10, 20, ..., 80 ms.
    assert_eq!(r.calls.statclock, 8);
    assert_eq!(expiration_of(&q, EventKind::Statclock), 90 * MS);
    assert_eq!(stats(&q).run, 1);
}

#[test]
fn test_ci_ev_2_schedclock_catches_up() {
    let g = global(Config {
        schedhz: 100,
        ..fixed(1, 1)
    });
    let mut m = FakeMachine::at(0);
    let mut q = started(&g, 0, 1, false, Some(rc(0)), &mut m);
    m.now = 47 * MS;
    let r = dispatch(&mut q, &g, &mut m);
    assert_eq!(r.calls.schedclock, 4);
    assert_eq!(m.schedclocks, 4);
    assert_eq!(expiration_of(&q, EventKind::Schedclock), 50 * MS);
}

#[test]
fn test_ci_ev_2_schedclock_skipped_without_curproc() {
    let g = global(Config {
        schedhz: 100,
        ..fixed(1, 1)
    });
    let mut m = FakeMachine::at(0);
    m.curproc = false;
    let mut q = started(&g, 0, 1, false, Some(rc(0)), &mut m);
    assert_eq!(expiration_of(&q, EventKind::Schedclock), 10 * MS);
    m.now = 47 * MS;
    let r = dispatch(&mut q, &g, &mut m);
    assert_eq!(r.calls.schedclock, 0);
    assert_eq!(m.schedclocks, 0);
    // The event still advanced past the skipped points.
    assert_eq!(expiration_of(&q, EventKind::Schedclock), 50 * MS);
    assert_eq!(stats(&q).run, 1);
    // With a process current again, only the new points are charged.
    m.curproc = true;
    m.now = 50 * MS;
    assert_eq!(dispatch(&mut q, &g, &mut m).calls.schedclock, 1);
}

#[test]
fn test_ci_ev_3_hardclock_stays_on_grid() {
    let g = global(Config {
        schedhz: 16,
        ..Config::openbsd_amd64()
    });
    let mut m = FakeMachine::at(0);
    let mut q = started(&g, 3, 4, false, Some(rc(3)), &mut m);
    let offset = 7_500_000;
    let period = 10_000_000;
    let first = expiration_of(&q, EventKind::Hardclock);
    assert_eq!(first, offset);
    let mut jitter = Lcg(5);
    while m.hardclocks < 100_000 {
        // Every dispatch late by 0..30 ms (sometimes very late).
        let late = if jitter.below(100) == 0 {
            jitter.below(SEC)
        } else {
            jitter.below(30 * MS)
        };
        m.now += rearms(&q).last().copied().unwrap_or(0) + late;
        dispatch(&mut q, &g, &mut m);
        let exp = expiration_of(&q, EventKind::Hardclock);
        assert_eq!(exp % period, offset);
        assert!(exp > m.now && exp <= m.now + period);
    }
    // No accumulated error: one call per grid point passed.
    let exp = expiration_of(&q, EventKind::Hardclock);
    assert_eq!(m.hardclocks, (exp - first) / period);
    assert_eq!(
        expiration_of(&q, EventKind::Schedclock) % 62_500_000,
        3 * 15_625_000
    );
}

#[test]
fn test_ci_ev_4_ties_run_in_queue_order() {
    let g = global(Config {
        schedhz: 100,
        ..fixed(100, 100)
    });
    let mut m = FakeMachine::recording(0);
    let mut q = started(&g, 1, 2, false, Some(rc(1)), &mut m);
    m.now = 5 * MS;
    dispatch(&mut q, &g, &mut m);
    assert_eq!(
        m.kinds_logged(),
        vec![
            EventKind::Hardclock,
            EventKind::Statclock,
            EventKind::Schedclock
        ]
    );
}

#[test]
fn test_ci_ev_4_requeued_event_runs_after_earlier_queued_peer() {
    // hardclock (10 ms) and statclock (20 ms) meet at 20 ms; statclock was
    // queued at 20 ms first, so it runs first, even though hardclock runs
    // first when both are queued by cpu_init.
    let g = global(fixed(100, 50));
    let mut m = FakeMachine::recording(5 * MS);
    let mut q = started(&g, 0, 1, false, Some(rc(0)), &mut m);
    m.now = 10 * MS;
    dispatch(&mut q, &g, &mut m);
    m.now = 20 * MS;
    dispatch(&mut q, &g, &mut m);
    assert_eq!(
        m.kinds_logged(),
        vec![
            EventKind::Hardclock,
            EventKind::Statclock,
            EventKind::Hardclock
        ]
    );
    assert_eq!(m.log[1].1, 20 * MS);
}

#[test]
fn test_ci_ev_4_expiration_order_across_kinds() {
    // Within one catching-up dispatch, kinds run in expiration order of their heads.
    let g = global(Config {
        schedhz: 16,
        ..fixed(100, 64)
    });
    let mut m = FakeMachine::recording(0);
    let mut q = started(&g, 0, 1, false, Some(rc(0)), &mut m);
    let mut expected: Vec<(u64, EventKind)> = q.pending().map(|e| (e.expiration, e.kind)).collect();
    expected.sort_by_key(|&(t, _)| t);
    m.now = 100 * MS;
    dispatch(&mut q, &g, &mut m);
    let mut first_seen = Vec::new();
    for k in m.kinds_logged() {
        if !first_seen.contains(&k) {
            first_seen.push(k);
        }
    }
    assert_eq!(
        first_seen,
        expected.iter().map(|&(_, k)| k).collect::<Vec<_>>()
    );
}

// ---------------------------------------------------------------------------
// 2.6 Randomized statclock
// ---------------------------------------------------------------------------

#[test]
fn test_ci_rnd_1_statvar_triples() {
    assert_eq!(
        StatVar::new(100),
        StatVar {
            avg: 10_000_000,
            min: 7_902_848,
            mask: 4_194_303
        }
    );
    assert_eq!(
        StatVar::new(1000),
        StatVar {
            avg: 1_000_000,
            min: 868_928,
            mask: 262_143
        }
    );
    assert_eq!(
        StatVar::new(1024),
        StatVar {
            avg: 976_562,
            min: 845_490,
            mask: 262_143
        }
    );
}

#[test]
fn test_ci_rnd_1_var_is_largest_power_of_two_below_half_avg() {
    for freq in [
        1,
        2,
        3,
        7,
        60,
        64,
        100,
        128,
        1000,
        1024,
        8192,
        100_000,
        1_000_000,
        250_000_000,
    ] {
        let v = StatVar::new(freq);
        assert_eq!(u64::from(v.avg), SEC / u64::from(freq));
        let var = v.mask + 1;
        assert!(var.is_power_of_two(), "freq {freq}");
        assert!(var <= v.avg / 2 && v.avg / 2 < 2 * var, "freq {freq}");
        assert_eq!(v.min, v.avg - var / 2);
    }
    assert_eq!(
        StatVar::new(1),
        StatVar {
            avg: 1_000_000_000,
            min: 865_782_272,
            mask: 268_435_455
        }
    );
}

/// Draws at least `n` random statclock intervals in one catching-up dispatch.
fn draw_intervals(config: Config, seed: u64, n: u64) -> (Intervals, FakeMachine, Queue) {
    let g = global(config);
    let mut m = FakeMachine::at(0);
    let mut q = ClockQueue::new(0, 1, true, seed);
    q.cpu_init(&g, &mut m, None).unwrap();
    let avg = u64::from(g.active_statvar().avg);
    // Mean interval is avg; 0.1 % extra comfortably covers the spread of the sum.
    m.now = expiration_of(&q, EventKind::Statclock) + n * avg + n * avg / 1000;
    let mut sink = Intervals::default();
    q.dispatch(&g, &mut m, &mut sink).unwrap();
    assert!(sink.0.len() as u64 >= n);
    assert_eq!(sink.0.len() as u64, m.statclocks);
    (sink, m, q)
}

#[test]
fn test_ci_rnd_2_interval_distribution() {
    let n = 1_000_000usize;
    let (sink, _, _) = draw_intervals(
        Config {
            hz: 1,
            ..Config::openbsd_amd64()
        },
        1,
        n as u64,
    );
    let v = StatVar::new(100);
    let (min, mask) = (u64::from(v.min), u64::from(v.mask));
    let draws = &sink.0[..n];
    assert!(draws.iter().all(|&i| (7_902_849..=12_097_151).contains(&i)));
    assert!(draws.iter().all(|&i| (min + 1..=min + mask).contains(&i)));
    let mean = draws.iter().sum::<u64>() as f64 / n as f64;
    assert!((mean - 1e7).abs() < 1e4, "mean {mean}");
    // Flatness of off = interval - min over 16 bins of 2^18 values each
    // (bin 0 lacks off = 0, which is redrawn).
    let mut bins = [0u64; 16];
    for &i in draws {
        bins[((i - min) >> 18) as usize] += 1;
    }
    let per_value = n as f64 / mask as f64;
    let chi2: f64 = bins
        .iter()
        .enumerate()
        .map(|(b, &c)| {
            let values: u32 = if b == 0 { (1 << 18) - 1 } else { 1 << 18 };
            let expected = per_value * f64::from(values);
            (c as f64 - expected).powi(2) / expected
        })
        .sum();
    // 15 degrees of freedom: the 99.99th percentile is about 42.
    assert!(chi2 < 60.0, "chi-square {chi2}, bins {bins:?}");
}

#[test]
fn test_ci_rnd_2_intervals_match_reference_algorithm() {
    // The queue's intervals are min + off, off = next() & mask redrawn while 0,
    // from the CPU's Park-Miller generator.
    for (seed, unit) in [(1u64, 0u32), (12_345, 3)] {
        let g = global(Config {
            hz: 1,
            ..Config::openbsd_amd64()
        });
        let mut m = FakeMachine::at(0);
        let mut q = ClockQueue::new(unit, 4, unit == 0, seed);
        q.cpu_init(&g, &mut m, Some(rc(unit))).unwrap();
        m.now = 10 * SEC;
        let mut sink = Intervals::default();
        q.dispatch(&g, &mut m, &mut sink).unwrap();
        let v = g.active_statvar();
        let mut rng = ParkMiller::for_cpu(seed, unit);
        let reference: Vec<u64> = (0..sink.0.len())
            .map(|_| loop {
                let off = rng.next() & v.mask;
                if off != 0 {
                    break u64::from(v.min) + u64::from(off);
                }
            })
            .collect();
        assert_eq!(sink.0, reference);
        // And the expiration is the grid start plus their sum.
        let start = next_grid_point(u64::from(unit) * 2_500_000, 10_000_000, 0);
        assert_eq!(
            expiration_of(&q, EventKind::Statclock),
            start + sink.0.iter().sum::<u64>()
        );
    }
}

#[test]
fn test_ci_rnd_2_redraws_zero_offsets() {
    // stathz 250 MHz: mask 1, so half the generator outputs give off = 0 and
    // are redrawn; every interval is then min + 1 = avg.
    let config = Config {
        hz: 1,
        stathz: 250_000_000,
        profhz: 250_000_000,
        schedhz: 0,
        flags: CL_RNDSTAT,
    };
    let (sink, _, _) = draw_intervals(config, 1, 10_000);
    assert!(sink.0.iter().all(|&i| i == 4));
}

#[test]
fn test_ci_rnd_3_stall_100ms_calls_statclock_8_to_13_times() {
    let g = global(Config {
        hz: 1,
        ..Config::openbsd_amd64()
    });
    let mut counts = [0u32; 14];
    for seed in 1..=200u64 {
        let mut m = FakeMachine::at(0);
        let mut q = ClockQueue::new(0, 1, true, seed);
        q.cpu_init(&g, &mut m, Some(rc(0))).unwrap();
        run_until(&mut q, &g, &mut m, &mut NoSink, 50 * MS);
        // Stall 100 ms measured from the last dispatch and from the deadline.
        for from_deadline in [false, true] {
            let stall_from = if from_deadline {
                expiration_of(&q, EventKind::Statclock)
            } else {
                m.now
            };
            m.now = stall_from + 100 * MS;
            let mut sink = Intervals::default();
            let r = q.dispatch(&g, &mut m, &mut sink).unwrap();
            let c = r.calls.statclock;
            assert!((8..=13).contains(&c), "seed {seed}: {c} statclocks");
            assert_eq!(sink.0.len() as u64, c);
            counts[c as usize] += 1;
        }
    }
    // The count varies with the drawn intervals.
    assert!(counts.iter().filter(|&&c| c > 0).count() >= 3, "{counts:?}");
}

#[test]
fn test_ci_rnd_4_park_miller_minimal_standard() {
    let mut rng = ParkMiller::new(1);
    assert_eq!(rng.next(), 16_807);
    assert_eq!(rng.next(), 282_475_249);
    assert_eq!(rng.next(), 1_622_650_073);
    assert_eq!(rng.next(), 984_943_658);
    // Park & Miller's check value: z(10001) = 1,043,618,065 from z(1) = 1.
    let mut rng = ParkMiller::new(1);
    let mut last = 0;
    for _ in 0..10_000 {
        last = rng.next();
        assert!((1..=0x7fff_ffff).contains(&last));
    }
    assert_eq!(last, 1_043_618_065);
    // CPU 0 with seed 1 is OpenBSD's generator.
    assert_eq!(ParkMiller::for_cpu(1, 0), ParkMiller::new(1));
}

#[test]
fn test_ci_rnd_4_cpu0_seed1_first_interval() {
    let g = global(Config {
        hz: 1,
        ..Config::openbsd_amd64()
    });
    let mut m = FakeMachine::at(0);
    let mut q = ClockQueue::new(0, 1, true, 1);
    q.cpu_init(&g, &mut m, Some(rc(0))).unwrap();
    m.now = 10 * MS;
    let mut sink = Intervals::default();
    q.dispatch(&g, &mut m, &mut sink).unwrap();
    // min + (16807 & mask)
    assert_eq!(sink.0, vec![7_902_848 + 16_807]);
    assert_eq!(expiration_of(&q, EventKind::Statclock), 10 * MS + 7_919_655);
}

fn interval_sequence(seed: u64, unit: u32) -> Vec<u64> {
    let g = global(Config::openbsd_amd64());
    let mut m = FakeMachine::at(0);
    let mut q = ClockQueue::new(unit, 2, unit == 0, seed);
    q.cpu_init(&g, &mut m, Some(rc(unit))).unwrap();
    let mut sink = Intervals::default();
    let mut jitter = Lcg(99);
    for _ in 0..500 {
        m.now += jitter.below(30 * MS);
        q.dispatch(&g, &mut m, &mut sink).unwrap();
    }
    assert!(sink.0.len() > 500);
    sink.0
}

#[test]
fn test_ci_rnd_4_seeded_run_reproduces_interval_sequence() {
    assert_eq!(interval_sequence(1, 0), interval_sequence(1, 0));
    assert_eq!(interval_sequence(42, 1), interval_sequence(42, 1));
    assert_ne!(interval_sequence(1, 0), interval_sequence(2, 0));
    assert_ne!(interval_sequence(42, 0), interval_sequence(42, 1));
}

#[test]
fn test_ci_rnd_5_cpu_init_places_statclock_on_avg_grid() {
    let g = global(Config::openbsd_amd64());
    assert!(g.randomized());
    let avg = 10_000_000;
    for (unit, primary) in [(0, true), (1, false), (3, false)] {
        let offset = u64::from(unit) * avg / 4;
        let mut m = FakeMachine::at(123_456_789);
        let mut q = ClockQueue::new(unit, 4, primary, 77);
        q.cpu_init(&g, &mut m, Some(rc(unit))).unwrap();
        assert_eq!(expiration_of(&q, EventKind::Statclock) % avg, offset);
        assert_eq!(
            expiration_of(&q, EventKind::Statclock),
            next_grid_point(offset, avg, m.now)
        );
        // Random intervals move it off the grid; a resume puts it back.
        let mut off_grid = false;
        for _ in 0..50 {
            m.now = head(&q).expiration;
            dispatch(&mut q, &g, &mut m);
            off_grid |= expiration_of(&q, EventKind::Statclock) % avg != offset;
        }
        assert!(off_grid);
        m.now += 777 * MS + 3;
        q.cpu_init(&g, &mut m, None).unwrap();
        assert_eq!(
            expiration_of(&q, EventKind::Statclock),
            next_grid_point(offset, avg, m.now)
        );
    }
}

#[test]
fn test_ci_rnd_6_openbsd_amd64_defaults() {
    let c = Config::openbsd_amd64();
    assert_eq!(
        c,
        Config {
            hz: 100,
            stathz: 100,
            profhz: 1000,
            schedhz: 0,
            flags: CL_RNDSTAT
        }
    );
    assert_eq!(c.validate(), Ok(()));
    let g = global(c);
    assert!(g.randomized());
    assert_eq!(g.config(), c);
    assert!(!global(VALID).randomized());
}

// ---------------------------------------------------------------------------
// 2.7 Statclock rate switching
// ---------------------------------------------------------------------------

#[test]
fn test_ci_rate_1_rejects_other_frequencies() {
    let g = global(Config::openbsd_amd64());
    let err = g.setstatclockrate(101).unwrap_err();
    assert_eq!(
        err,
        Error::StatclockRate {
            freq: 101,
            stathz: 100,
            profhz: 1000
        }
    );
    let msg = err.to_string();
    assert!(
        msg.contains("101") && msg.contains("100") && msg.contains("1000"),
        "{msg}"
    );
    assert_eq!(
        g.setstatclockrate(0),
        Err(Error::StatclockRate {
            freq: 0,
            stathz: 100,
            profhz: 1000
        })
    );
    assert_eq!(g.active_statvar(), StatVar::new(100));
    assert_eq!(g.setstatclockrate(100), Ok(()));
    assert_eq!(g.setstatclockrate(1000), Ok(()));
}

#[test]
fn test_ci_rate_1_before_init() {
    let g = ClockIntr::new();
    assert_eq!(g.setstatclockrate(100), Err(Error::RateBeforeInit));
    assert_eq!(g.setstatclockrate(0), Err(Error::RateBeforeInit));
}

#[test]
fn test_ci_rate_2_switch_swaps_active_triple() {
    let g = global(Config::openbsd_amd64());
    let (stat, prof) = g.statvars();
    g.setstatclockrate(1000).unwrap();
    assert_eq!(g.active_statvar(), prof);
    assert_eq!(
        g.active_statvar(),
        StatVar {
            avg: 1_000_000,
            min: 868_928,
            mask: 262_143
        }
    );
    assert_eq!(g.statvars(), (stat, prof));
    g.setstatclockrate(100).unwrap();
    assert_eq!(g.active_statvar(), stat);
    // Idempotent.
    g.setstatclockrate(100).unwrap();
    assert_eq!(g.active_statvar(), stat);
}

#[test]
fn test_ci_rate_2_generation_skips_zero_on_wrap() {
    let g = global(Config::openbsd_amd64());
    // White-box: force the wrap; a reader must not spin on generation 0.
    g.active_gen.store(u32::MAX, Ordering::Relaxed);
    g.setstatclockrate(1000).unwrap();
    assert_eq!(g.active_gen.load(Ordering::Relaxed), 1);
    assert_eq!(g.active_statvar(), StatVar::new(1000));
}

#[test]
fn test_ci_rate_2_readers_never_see_mixed_triple() {
    use std::sync::atomic::AtomicBool;
    let g = global(Config::openbsd_amd64());
    let (stat, prof) = g.statvars();
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut reads = 0u64;
            while !done.load(Ordering::Acquire) || reads < 1000 {
                let v = g.active_statvar();
                assert!(v == stat || v == prof, "mixed triple {v:?}");
                reads += 1;
            }
            reads
        });
        for i in 0..20_000 {
            g.setstatclockrate(if i % 2 == 0 { 1000 } else { 100 })
                .unwrap();
        }
        done.store(true, Ordering::Release);
        assert!(reader.join().unwrap() >= 1000);
    });
    assert_eq!(g.active_statvar(), stat);
}

#[test]
fn test_ci_rate_3_queued_expiration_not_moved_fixed_mode() {
    let g = global(Config {
        hz: 1,
        stathz: 100,
        profhz: 1000,
        schedhz: 0,
        flags: 0,
    });
    let mut m = FakeMachine::recording(0);
    let mut q = started(&g, 0, 1, false, Some(rc(0)), &mut m);
    m.now = 10 * MS;
    dispatch(&mut q, &g, &mut m);
    assert_eq!(expiration_of(&q, EventKind::Statclock), 20 * MS);
    // Switch right after a statclock: the queued 20 ms stays.
    g.setstatclockrate(1000).unwrap();
    assert_eq!(expiration_of(&q, EventKind::Statclock), 20 * MS);
    run_until(&mut q, &g, &mut m, &mut NoSink, 23 * MS);
    assert_eq!(
        m.times_of(EventKind::Statclock),
        vec![10 * MS, 20 * MS, 21 * MS, 22 * MS, 23 * MS]
    );
    // Back to stathz: the next one still comes 1 ms later, then every 10 ms.
    g.setstatclockrate(100).unwrap();
    assert_eq!(expiration_of(&q, EventKind::Statclock), 24 * MS);
    run_until(&mut q, &g, &mut m, &mut NoSink, 44 * MS);
    assert_eq!(
        m.times_of(EventKind::Statclock)[5..],
        [24 * MS, 34 * MS, 44 * MS]
    );
}

#[test]
fn test_ci_rate_3_random_mode_switch_applies_at_next_reschedule() {
    let g = global(Config {
        hz: 1,
        ..Config::openbsd_amd64()
    });
    let mut m = FakeMachine::at(0);
    let mut q = started(&g, 0, 1, false, Some(rc(0)), &mut m);
    m.now = 10 * MS;
    let mut sink = Intervals::default();
    q.dispatch(&g, &mut m, &mut sink).unwrap();
    let queued = expiration_of(&q, EventKind::Statclock);
    g.setstatclockrate(1000).unwrap();
    assert_eq!(expiration_of(&q, EventKind::Statclock), queued);
    m.now = queued - 1;
    q.dispatch(&g, &mut m, &mut sink).unwrap();
    assert_eq!(m.statclocks, 1, "the queued stathz-rate expiration is kept");
    sink.0.clear();
    run_until(&mut q, &g, &mut m, &mut sink, queued + 200 * MS);
    assert!(sink.0.len() > 150);
    // min + 1 ..= min + mask for profhz 1000.
    assert!(sink.0.iter().all(|&i| (868_929..=1_131_071).contains(&i)));
}

// ---------------------------------------------------------------------------
// 2.8 Trigger
// ---------------------------------------------------------------------------

#[test]
fn test_ci_trg_1_trigger_uses_intrclock() {
    let g = global(Config::openbsd_amd64());
    let mut m = FakeMachine::at(0);
    let mut q = started(&g, 0, 1, true, Some(rc(0)), &mut m);
    assert_eq!(q.trigger(), Ok(()));
    let ic = q.intrclock().unwrap();
    assert_eq!(ic.triggers, 1);
    assert!(ic.rearms.is_empty());
    // Trigger does not dispatch by itself.
    assert_eq!(m.total_calls(), 0);
    assert_eq!(q.stats().0, Stats::default());
}

#[test]
fn test_ci_trg_1_trigger_without_intrclock_does_nothing() {
    let g = global(Config::openbsd_amd64());
    let mut m = FakeMachine::at(0);
    let mut q = started(&g, 1, 2, false, None, &mut m);
    assert_eq!(q.trigger(), Ok(()));
    assert!(q.intrclock().is_none());
    assert_eq!(m.total_calls(), 0);
}

// ---------------------------------------------------------------------------
// 6.3 Statistics (TR-C)
// ---------------------------------------------------------------------------

#[test]
fn test_tr_c_1_run_counts_callbacks_not_calls() {
    let g = global(fixed(100, 1));
    let mut m = FakeMachine::at(0);
    let mut q = started(&g, 0, 1, true, Some(rc(0)), &mut m);
    m.now = 40 * MS;
    let r = dispatch(&mut q, &g, &mut m);
    assert_eq!(r.calls.hardclock, 5);
    assert_eq!(r.calls.statclock, 0);
    let s = stats(&q);
    assert_eq!(s.run, 1);
    assert_eq!(s.prompt, 1);
    assert_eq!(s.lateness, 40 * MS);
}

/// Dispatches once; returns the report and how each of the seven statistics
/// changed, in TR-C-1 order: dispatched, early, earliness, lateness, prompt,
/// run, spurious.
fn dispatch_delta(q: &mut Queue, g: &ClockIntr, m: &mut FakeMachine) -> (DispatchReport, [u64; 7]) {
    let fields = |s: Stats| {
        [
            s.dispatched,
            s.early,
            s.earliness,
            s.lateness,
            s.prompt,
            s.run,
            s.spurious,
        ]
    };
    let before = fields(stats(q));
    let r = dispatch(q, g, m);
    let after = fields(stats(q));
    (r, core::array::from_fn(|i| after[i] - before[i]))
}

#[test]
fn test_tr_c_1_each_dispatch_updates_exactly_its_fields() {
    // Secondary CPU 1 of 2, hz = stathz = 100 in fixed mode: cpu_init places
    // hardclock and statclock both at 5 ms, so the first dispatch is early.
    let g = global(fixed(100, 100));
    let mut m = FakeMachine::at(MS);
    m.on_hardclock_advance = 1_000;
    let mut q = started(&g, 1, 2, false, Some(rc(1)), &mut m);
    assert_eq!(
        pending_kinds(&q),
        vec![EventKind::Hardclock, EventKind::Statclock]
    );
    let first = head(&q).expiration;
    assert_eq!(first, 5 * MS);

    // Early: early + 1, earliness + (head - now); nothing else.
    let (r, delta) = dispatch_delta(&mut q, &g, &mut m);
    assert_eq!(r.outcome, Outcome::Early);
    assert_eq!(delta, [0, 1, first - MS, 0, 0, 0, 0]);

    // Prompt, 3 ms late, both events due: dispatched + the 1 us the hardclock
    // took, lateness + 3 ms, prompt + 1, run + 2 (callbacks, not calls).
    m.now = first + 3 * MS;
    let (r, delta) = dispatch_delta(&mut q, &g, &mut m);
    assert_eq!(r.outcome, Outcome::Prompt);
    assert_eq!((r.calls.hardclock, r.calls.statclock), (1, 1));
    assert_eq!(delta, [1_000, 0, 0, 3 * MS, 1, 2, 0]);

    // Spurious (white-box: empty the queue): spurious + 1; nothing else.
    for slot in 0..MAX_EVENTS {
        q.unlink(slot);
    }
    let (r, delta) = dispatch_delta(&mut q, &g, &mut m);
    assert_eq!(r.outcome, Outcome::Spurious);
    assert_eq!(delta, [0, 0, 0, 0, 0, 0, 1]);
}

#[test]
fn test_tr_c_2_sum_over_cpus() {
    let g = global(Config {
        schedhz: 16,
        ..Config::openbsd_amd64()
    });
    let mut total = Stats::default();
    let mut parts = Vec::new();
    for unit in 0..4 {
        let mut m = FakeMachine::at(0);
        let mut q = started(&g, unit, 4, unit == 0, Some(rc(unit)), &mut m);
        let mut jitter = Lcg(u64::from(unit) + 1);
        for _ in 0..200 {
            m.now += jitter.below(20 * MS);
            dispatch(&mut q, &g, &mut m);
        }
        parts.push(stats(&q));
        total.add(&stats(&q));
    }
    let sum = |f: fn(&Stats) -> u64| parts.iter().map(f).sum::<u64>();
    assert_eq!(total.dispatched, sum(|s| s.dispatched));
    assert_eq!(total.early, sum(|s| s.early));
    assert_eq!(total.earliness, sum(|s| s.earliness));
    assert_eq!(total.lateness, sum(|s| s.lateness));
    assert_eq!(total.prompt, sum(|s| s.prompt));
    assert_eq!(total.run, sum(|s| s.run));
    assert_eq!(total.prompt + total.early + total.spurious, 800);
}

#[test]
fn test_tr_c_3_add_includes_spurious() {
    // Deliberate deviation (AMB-5): 7.3's sysctl sum reports spurious as 0;
    // this library sums it, as OpenBSD 7.4 does.
    let a = Stats {
        dispatched: 1,
        early: 2,
        earliness: 3,
        lateness: 4,
        prompt: 5,
        run: 6,
        spurious: 7,
    };
    let b = Stats {
        dispatched: 10,
        early: 20,
        earliness: 30,
        lateness: 40,
        prompt: 50,
        run: 60,
        spurious: 70,
    };
    let mut sum = a;
    sum.add(&b);
    assert_eq!(
        sum,
        Stats {
            dispatched: 11,
            early: 22,
            earliness: 33,
            lateness: 44,
            prompt: 55,
            run: 66,
            spurious: 77
        }
    );
    let mut zero = Stats::default();
    zero.add(&a);
    assert_eq!(zero, a);
}

#[test]
fn test_tr_c_4_pending_listing_is_the_queue_dispatch_follows() {
    // After every real cpu_init and dispatch, the listing holds 2-3 events in
    // increasing expiration order, all after the cached uptime, and it is the
    // queue the next dispatch runs: a dispatch at the head's expiration calls
    // back exactly the listed events that are due, in listed order, and
    // re-lists each of them later.
    for schedhz in [0, 16] {
        let g = global(Config {
            schedhz,
            ..fixed(100, 64)
        });
        let mut m = FakeMachine::recording(0);
        let mut q = started(&g, 2, 3, false, Some(rc(2)), &mut m);
        for round in 0..300 {
            let listing: Vec<Event> = q.pending().collect();
            let expected = if schedhz == 0 { 2 } else { 3 };
            assert_eq!(listing.len(), expected, "round {round}: {listing:?}");
            assert!(listing
                .windows(2)
                .all(|w| w[0].expiration <= w[1].expiration));
            assert!(listing.iter().all(|e| e.expiration > q.uptime()));
            assert_eq!(q.idle_events().count(), 0);
            assert_eq!(q.running(), None);

            m.now = listing[0].expiration;
            m.log.clear();
            let r = dispatch(&mut q, &g, &mut m);
            assert_eq!(r.outcome, Outcome::Prompt);
            let due: Vec<EventKind> = listing
                .iter()
                .filter(|e| e.expiration <= m.now)
                .map(|e| e.kind)
                .collect();
            assert_eq!(m.kinds_logged(), due, "round {round}: {listing:?}");
            for kind in due {
                assert!(expiration_of(&q, kind) > m.now);
            }
        }
    }
}

#[test]
fn test_tr_c_4_idle_events_lists_established_non_pending() {
    let g = global(Config {
        schedhz: 16,
        ..Config::openbsd_amd64()
    });
    let mut m = FakeMachine::at(0);
    let mut q = queue(0, 1, true);
    assert_eq!(q.pending().count(), 0);
    assert_eq!(
        q.idle_events().count(),
        0,
        "nothing established before cpu_init"
    );
    q.cpu_init(&g, &mut m, None).unwrap();
    assert_eq!(q.idle_events().count(), 0);
    // White-box: take statclock off the queue, as while its callback runs.
    let stat = expiration_of(&q, EventKind::Statclock);
    q.unlink(STATCLOCK);
    assert_eq!(
        q.idle_events().collect::<Vec<_>>(),
        vec![Event {
            kind: EventKind::Statclock,
            expiration: stat
        }]
    );
    assert_eq!(q.pending().count(), 2);
    assert!(q.pending().all(|e| e.kind != EventKind::Statclock));
}
