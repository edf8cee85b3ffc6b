//! Unit tests, named after the spec statements they check (SEED-SPEC
//! sections 3 and 5).
//!
//! Most run N simulated vCPUs against one fake clock ([`Sim`]): each vCPU's
//! host deadline expires at the programmed deadline plus a random latency.

use super::*;

const MS: u64 = 1_000_000;
const US: u64 = 1_000;

/// xorshift64 (Marsaglia 2003): deterministic randomness without crates.
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// One action with `samplers`, one timer with `period_ns` on it.
fn one_timer(samplers: u32, period_ns: u64) -> Kperf {
    let mut k = Kperf::new();
    k.set_action_count(1).unwrap();
    k.set_action_samplers(1, samplers).unwrap();
    k.set_timer_count(1).unwrap();
    k.set_timer_period(0, period_ns).unwrap();
    k.set_timer_action(0, 1).unwrap();
    k
}

fn handled(expiry: CpuExpiry) -> (Vec<Fire>, Option<u64>) {
    match expiry {
        CpuExpiry::Handled {
            fires,
            next_deadline,
        } => (fires, next_deadline),
        other => panic!("expected Handled, got {other:?}"),
    }
}

/// What a simulated vCPU saw fire.
#[derive(Clone, Copy, Debug)]
struct Seen {
    now: u64,
    cpu: usize,
    fire: Fire,
}

/// N simulated vCPUs sharing one fake clock: each vCPU's host deadline
/// expires at the programmed deadline plus a random latency.
struct Sim {
    kperf: Kperf,
    now: u64,
    /// Programmed host deadline and the time it will actually expire.
    armed: Vec<Option<(u64, u64)>>,
    rng: u64,
    max_latency: u64,
    /// Every this many expiries, one is this late instead (0: never).
    stall_every: u64,
    stall: u64,
    expiries: u64,
    seen: Vec<Seen>,
}

impl Sim {
    fn new(kperf: Kperf, ncpus: usize, start: u64, max_latency: u64) -> Self {
        let mut sim = Sim {
            kperf,
            now: start,
            armed: vec![None; ncpus],
            rng: 0x2545_f491_4f6c_dd1d,
            max_latency,
            stall_every: 0,
            stall: 0,
            expiries: 0,
            seen: Vec::new(),
        };
        let programs = sim.kperf.set_sampling(true, start, ncpus).unwrap();
        for (cpu, program) in programs.into_iter().enumerate() {
            sim.program(cpu, program);
        }
        sim
    }

    /// Latency in 1..=max_latency: a host timer never expires exactly at
    /// its deadline in ns.
    fn program(&mut self, cpu: usize, deadline: Option<u64>) {
        self.armed[cpu] = deadline.map(|d| {
            self.expiries += 1;
            let latency = if self.stall_every != 0 && self.expiries % self.stall_every == 0 {
                self.stall
            } else {
                1 + xorshift(&mut self.rng) % self.max_latency
            };
            (d, d.max(self.now) + latency)
        });
    }

    /// Runs every expiry up to `until`.
    fn run_until(&mut self, until: u64) {
        while let Some((cpu, at)) = self
            .armed
            .iter()
            .enumerate()
            .filter_map(|(cpu, a)| a.map(|(_, at)| (cpu, at)))
            .min_by_key(|&(_, at)| at)
        {
            if at > until {
                break;
            }
            self.now = at;
            let (fires, next) = handled(self.kperf.expire(cpu, at));
            for fire in fires {
                self.seen.push(Seen { now: at, cpu, fire });
            }
            self.program(cpu, next);
        }
        self.now = until;
    }

    fn idle(&mut self, cpu: usize) {
        self.kperf.cpu_idle(cpu);
        self.armed[cpu] = None;
    }

    fn wake(&mut self, cpu: usize) -> Option<u64> {
        let deadline = self.kperf.cpu_wake(cpu, self.now);
        self.program(cpu, deadline);
        deadline
    }

    fn leaders(&self) -> Vec<Seen> {
        self.seen
            .iter()
            .copied()
            .filter(|s| s.fire.leader)
            .collect()
    }

    fn samples_of(&self, cpu: usize) -> usize {
        self.seen
            .iter()
            .filter(|s| s.cpu == cpu && s.fire.sample.is_some())
            .count()
    }
}

// --- Constants and encoding (CFG-A-5, TR-E-*, KperfError) -------------

#[test]
fn test_cfg_a5_sampler_and_flag_bits() {
    let samplers = [
        sampler::TH_INFO,
        sampler::TH_SNAPSHOT,
        sampler::KSTACK,
        sampler::USTACK,
        sampler::PMC_THREAD,
        sampler::PMC_CPU,
        sampler::PMC_CONFIG,
        sampler::MEMINFO,
        sampler::TH_SCHEDULING,
        sampler::TH_DISPATCH,
        sampler::TK_SNAPSHOT,
        sampler::SYS_MEM,
        sampler::TH_INSCYC,
        sampler::TK_INFO,
    ];
    for (bit, value) in samplers.into_iter().enumerate() {
        assert_eq!(value, 1 << bit);
    }
    let flags = [
        sample_flags::PEND_USER,
        sample_flags::IDLE_THREADS,
        sample_flags::EMPTY_CALLSTACK,
        sample_flags::CONTINUATION,
        sample_flags::NON_INTERRUPT,
        sample_flags::SYSTEM,
        sample_flags::ONLY_SYSTEM,
        sample_flags::TASK_ONLY,
        sample_flags::THREAD_ONLY,
    ];
    for (bit, value) in flags.into_iter().enumerate() {
        assert_eq!(value, 1 << bit);
    }
    assert_eq!(sampler::TASK_MASK, 0x2480);
    assert_eq!(sampler::THREAD_MASK, 0x131f);
    assert_eq!(sampler::SYSTEM_MASK, 0x800);
    // The three masks are disjoint and leave out only the PMC CPU and
    // config samplers.
    assert_eq!(sampler::TASK_MASK & sampler::THREAD_MASK, 0);
    assert_eq!(
        sampler::TASK_MASK | sampler::THREAD_MASK | sampler::SYSTEM_MASK,
        0x3fff & !(sampler::PMC_CPU | sampler::PMC_CONFIG)
    );
}

#[test]
fn test_cfg_a5_sampler_names_follow_the_bits() {
    for (bit, (name, value)) in sampler::NAMES.into_iter().enumerate() {
        assert_eq!(value, 1 << bit, "{name}");
        assert_eq!(sampler::parse_list(name), Ok(value));
        assert_eq!(sampler::parse_list(&name.to_uppercase()), Ok(value));
    }
    assert_eq!(sampler::NAMES[0], ("th_info", sampler::TH_INFO));
    assert_eq!(sampler::NAMES[11], ("sys_mem", sampler::SYS_MEM));
    assert_eq!(sampler::ALL, 0x3fff);
}

#[test]
fn test_sampler_lists_parse_and_bad_ones_are_named() {
    use sampler::parse_list;
    assert_eq!(parse_list("th_info,ustack,kstack"), Ok(0b1101));
    assert_eq!(parse_list("SYS_MEM"), Ok(1 << 11));
    assert_eq!(parse_list("0xc"), Ok(0xc));
    assert_eq!(parse_list("12"), Ok(12));
    let err = parse_list("ustack,bogus").unwrap_err().to_string();
    assert!(
        err.contains("unknown sampler 'bogus'") && err.contains("th_info"),
        "{err}"
    );
    assert!(parse_list("0").is_err());
    assert!(parse_list("0x100000").is_err());
    assert!(parse_list("0xzz").is_err());
}

#[test]
fn test_sampler_list_errors_say_what_is_allowed() {
    use sampler::parse_list;
    assert_eq!(parse_list(" kstack , TH_info "), Ok(0b101));
    assert_eq!(parse_list("0x3fff"), Ok(sampler::ALL));
    assert_eq!(
        parse_list("ustack,bogus"),
        Err(SamplerListError::UnknownName("bogus".into()))
    );
    let err = parse_list("bogus").unwrap_err().to_string();
    for (name, _) in sampler::NAMES {
        assert!(err.contains(name), "{err} lacks {name}");
    }
    assert_eq!(
        parse_list("kstack,"),
        Err(SamplerListError::UnknownName(String::new()))
    );
    assert_eq!(
        parse_list("0xzz"),
        Err(SamplerListError::BadNumber("0xzz".into()))
    );
    assert_eq!(
        parse_list("99999999999"),
        Err(SamplerListError::BadNumber("99999999999".into()))
    );
    assert_eq!(
        parse_list(""),
        Err(SamplerListError::BadNumber(String::new()))
    );
    // 0X is not the hex prefix, so it is read as a name.
    assert_eq!(
        parse_list("0XC"),
        Err(SamplerListError::UnknownName("0XC".into()))
    );
    assert_eq!(parse_list("0"), Err(SamplerListError::BadBits(0)));
    assert_eq!(parse_list("0x4000"), Err(SamplerListError::BadBits(0x4000)));
    assert_eq!(
        SamplerListError::BadBits(0x4000).to_string(),
        "sampler bits 0x4000 are not a non-empty subset of 0x3fff"
    );
    assert!(SamplerListError::BadNumber("0xzz".into())
        .to_string()
        .contains("decimal or 0x hex"));
}

#[test]
fn test_tr_e1_kdebug_id_encoding() {
    use trace::*;
    assert_eq!(kdebug_id(DBG_PERF, 0, 0, DBG_FUNC_NONE), 0x2500_0000);
    assert_eq!(kdebug_id(DBG_PERF, 1, 5, DBG_FUNC_NONE), 0x2501_0014);
    assert_eq!(kdebug_id(DBG_PERF, 3, 0, DBG_FUNC_START), 0x2503_0001);
    assert_eq!(kdebug_id(DBG_PERF, 3, 0, DBG_FUNC_END), 0x2503_0002);
    assert_eq!(kdebug_id(DBG_PERF, 10, 4, DBG_FUNC_NONE), 0x250a_0010);
    // Fields are truncated to their width.
    assert_eq!(kdebug_id(0xff, 0xff, 0xffff, 0xff), 0xffff_ffff);
    assert_eq!(kdebug_id(0, 0, 0x4000, 4), 0);
}

#[test]
fn test_tr_e2_kptimer_event_ids() {
    use trace::*;
    assert_eq!(TM_FIRE, 0x2503_0000);
    assert_eq!(TM_HNDLR, 0x2503_0008);
    assert_eq!(PET_SCHED, 0x2504_0018);
    assert_eq!(PET_ERROR, 0x2504_0004);
    assert_eq!(PET_RUN, 0x2504_0008);
    assert_eq!(PET_IDLE, 0x2504_0010);
    assert_eq!(PET_SAMPLE, 0x2504_0014);
    assert_eq!(PET_SAMPLE_TASK, 0x2504_0020);
    assert_eq!(PET_SAMPLE_THREAD, 0x2504_0024);
    assert_eq!(TM_HNDLR | DBG_FUNC_START, 0x2503_0009);
    assert_eq!(TM_FIRE | DBG_FUNC_END, 0x2503_0002);
}

#[test]
fn test_tr_e2_constants_table() {
    use trace::*;
    let table = [
        (GEN_EVENT, 0x2500_0000),
        (TI_SAMPLE, 0x2501_0000),
        (TI_DATA, 0x2501_0004),
        (TI_CSWITCH, 0x2501_0014),
        (TI_DISPPEND, 0x2501_0030),
        (CS_KSAMPLE, 0x2502_0000),
        (CS_UPEND, 0x2502_0004),
        (CS_USAMPLE, 0x2502_0008),
        (CS_KDATA, 0x2502_000c),
        (CS_UDATA, 0x2502_0010),
        (CS_KHDR, 0x2502_0014),
        (CS_UHDR, 0x2502_0018),
        (CS_ERROR, 0x2502_001c),
        (TM_FIRE, 0x2503_0000),
        (TM_SCHED, 0x2503_0004),
        (TM_HNDLR, 0x2503_0008),
        (TM_PENDING, 0x2503_000c),
        (TM_SKIPPED, 0x2503_0010),
        (PET_THREAD, 0x2504_0000),
        (PET_ERROR, 0x2504_0004),
        (PET_RUN, 0x2504_0008),
        (PET_PAUSE, 0x2504_000c),
        (PET_IDLE, 0x2504_0010),
        (PET_SAMPLE, 0x2504_0014),
        (PET_SCHED, 0x2504_0018),
        (PET_END, 0x2504_001c),
        (PET_SAMPLE_TASK, 0x2504_0020),
        (PET_SAMPLE_THREAD, 0x2504_0024),
        (AST_HNDLR, 0x2505_0000),
        (KPC_CONFIG, 0x2506_0010),
        (MI_SYS_DATA, 0x250a_0008),
        (MI_SYS_DATA_2, 0x250a_000c),
        (MI_SYS_DATA_3, 0x250a_0010),
        // Beyond TR-E-2, the payload ids of the other samplers (XNU's
        // kperf/buffer.h).
        (TI_SNAPDATA, 0x2501_0024),
        (TI_INSCYCDATA, 0x2501_0044),
        (TI_SCHEDDATA_2, 0x2501_004c),
        (KPC_DATA, 0x2506_000c),
        (KPC_DATA_THREAD, 0x2506_0020),
        (TK_SNAP_DATA, 0x2508_0004),
        (TK_INFO_DATA, 0x2508_0010),
        (MI_DATA, 0x250a_0004),
    ];
    for (id, expected) in table {
        assert_eq!(id, expected, "{id:#x}");
    }
}

#[test]
fn test_tr_e3_each_event_has_the_level_the_spec_states() {
    use trace::*;
    let table = [
        // TR-P-1: TM_FIRE (data); the PET handler's TM_FIRE|end (info).
        (TM_FIRE, Level::Data),
        (TM_FIRE | DBG_FUNC_END, Level::Info),
        // TR-P-2: TM_HNDLR|start (data), TM_HNDLR|end (info).
        (TM_HNDLR | DBG_FUNC_START, Level::Data),
        (TM_HNDLR | DBG_FUNC_END, Level::Info),
        // TR-P-3: PET_SCHED (info).
        (PET_SCHED, Level::Info),
        // TR-P-4: GEN_EVENT start and end (data).
        (GEN_EVENT | DBG_FUNC_START, Level::Data),
        (GEN_EVENT | DBG_FUNC_END, Level::Data),
        // TR-E-3: PET_SAMPLE_THREAD only at 2 (verbose).
        (PET_SAMPLE_THREAD | DBG_FUNC_START, Level::Verbose),
        (PET_SAMPLE_THREAD | DBG_FUNC_END, Level::Verbose),
        (PET_SAMPLE_THREAD, Level::Verbose),
        (PET_SAMPLE_TASK | DBG_FUNC_START, Level::Verbose),
        // pet.c: the PET sampler's own markers (info).
        (PET_IDLE, Level::Info),
        (PET_RUN, Level::Info),
        (PET_SAMPLE | DBG_FUNC_END, Level::Info),
        (PET_ERROR, Level::Info),
        // A sample's payload (data) and its markers (info).
        (TI_DATA, Level::Data),
        (CS_UDATA, Level::Data),
        (CS_UPEND, Level::Info),
        (AST_HNDLR | DBG_FUNC_START, Level::Info),
        // Not kperf's: data, never filtered.
        (0x0102_0304, Level::Data),
    ];
    for (id, expected) in table {
        assert_eq!(level(id), expected, "{id:#x}");
    }
}

#[test]
fn test_tr_e3_debug_levels_keep_data_always_info_from_1_verbose_at_2() {
    use trace::*;
    let hndlr_end = TM_HNDLR | DBG_FUNC_END;
    let thread = PET_SAMPLE_THREAD | DBG_FUNC_START;
    // debug_level 0: no PET_SCHED, no TM_HNDLR end.
    let data = Level::from_debug_level(0).unwrap();
    assert!(data.records(TM_FIRE) && data.records(TM_HNDLR | DBG_FUNC_START));
    assert!(!data.records(hndlr_end) && !data.records(PET_SCHED) && !data.records(thread));
    // 1: present; PET_SAMPLE_THREAD only at 2.
    let info = Level::from_debug_level(1).unwrap();
    assert!(info.records(hndlr_end) && info.records(PET_SCHED) && !info.records(thread));
    let verbose = Level::from_debug_level(2).unwrap();
    assert!(verbose.records(thread) && verbose.records(hndlr_end) && verbose.records(TM_FIRE));
    assert_eq!(Level::from_debug_level(3), None);
    assert_eq!(verbose.debug_level(), 2);
    assert!(Level::Data < Level::Info && Level::Info < Level::Verbose);
}

#[test]
fn test_cfg_api1_errno_values_and_messages() {
    let table = [
        (KperfError::Inval, 22),
        (KperfError::Busy, 16),
        (KperfError::Canceled, 125),
        (KperfError::Perm, 1),
        (KperfError::Fault, 14),
        (KperfError::NoEnt, 2),
        (KperfError::NoMem, 12),
    ];
    for (error, errno) in table {
        assert_eq!(error.errno(), errno);
        assert!(!error.to_string().is_empty());
    }
    assert_eq!(
        KperfError::Inval.to_string(),
        "Invalid kperf argument (EINVAL)"
    );
}

// --- Dead reckoning and leader election (KT-F-*) ------------------------

#[test]
fn test_kt_f2_dead_reckoning_examples() {
    assert_eq!(dead_reckon(100, 10, 125), 130);
    assert_eq!(dead_reckon(100, 10, 130), 140);
    assert_eq!(dead_reckon(100, 10, 95), 100);
    // A deadline equal to now is kept; just after it moves one period.
    assert_eq!(dead_reckon(100, 10, 100), 100);
    assert_eq!(dead_reckon(100, 10, 101), 110);
    // Period 0 has no grid; the end of time saturates.
    assert_eq!(dead_reckon(100, 0, 500), 100);
    assert_eq!(dead_reckon(0, 10, u64::MAX - 3), u64::MAX);
}

#[test]
fn test_kt_f2_result_is_on_grid_and_after_now() {
    let mut rng = 7u64;
    for _ in 0..100_000 {
        let deadline = xorshift(&mut rng) % 1_000_000;
        let period = 1 + xorshift(&mut rng) % 10_000;
        let now = deadline + xorshift(&mut rng) % 1_000_000;
        let next = dead_reckon(deadline, period, now);
        if now == deadline {
            assert_eq!(next, deadline);
        } else {
            assert!(next > now && next - now <= period);
            assert_eq!((next - deadline) % period, 0);
        }
    }
}

#[test]
fn test_kt_f3_equality_does_not_fire() {
    let mut k = one_timer(sampler::TH_INFO, MS);
    assert_eq!(k.set_sampling(true, 0, 1).unwrap(), vec![Some(MS)]);
    let (fires, next) = handled(k.expire(0, MS));
    assert!(fires.is_empty());
    // The deadline is kept, so the VMM expires again just after it.
    assert_eq!(next, Some(MS));
    let (fires, next) = handled(k.expire(0, MS + 1));
    assert_eq!(fires.len(), 1);
    assert_eq!(next, Some(2 * MS));
}

#[test]
fn test_kt_f4_leader_then_follower_under_elect() {
    let mut timer = KpTimer {
        period_ns: 10,
        action: 1,
        deadline: 100,
    };
    // First vCPU past 100 leads; the global deadline moves to 110.
    assert_eq!(
        timer.elect(100, 103),
        Election::Leader { next_deadline: 110 }
    );
    assert_eq!(timer.deadline, 110);
    // Second vCPU, same fire: follows.
    assert_eq!(
        timer.elect(100, 105),
        Election::Follower { next_deadline: 110 }
    );
    // A vCPU that missed fires (deadline 60) adopts the global deadline.
    assert_eq!(
        timer.elect(60, 107),
        Election::Follower { next_deadline: 110 }
    );
    // A late leader dead-reckons: 110 + 10 = 120 < 135 -> 140.
    assert_eq!(
        timer.elect(110, 135),
        Election::Leader { next_deadline: 140 }
    );
}

#[test]
fn test_kt_f7_stopped_timer_does_not_fire() {
    let mut timer = KpTimer {
        period_ns: 10,
        action: 1,
        deadline: 0,
    };
    assert_eq!(timer.elect(100, 105), Election::Stopped);
    assert_eq!(timer.deadline, 0);
    let mut disabled = KpTimer {
        period_ns: 0,
        action: 1,
        deadline: 50,
    };
    assert_eq!(disabled.elect(40, 45), Election::Stopped);
}

#[test]
fn test_kt_f4_one_leader_per_period_not_n() {
    let start = 3 * MS;
    let periods = 5000;
    let mut sim = Sim::new(one_timer(sampler::TH_INFO, MS), 4, start, 200 * US);
    sim.run_until(start + periods * MS);
    let leaders = sim.leaders().len() as u64;
    // Within 5 % of the periods elapsed, not 4 times that.
    assert!(leaders.abs_diff(periods) <= periods / 20, "{leaders}");
    assert!(sim.seen.len() as u64 >= 4 * leaders - 4);
}

#[test]
fn test_kt_f5_leader_fires_keep_the_cadence() {
    let start = 0;
    let mut sim = Sim::new(one_timer(sampler::TH_INFO, MS), 4, start, 200 * US);
    sim.run_until(5000 * MS);
    let leaders = sim.leaders();
    for pair in leaders.windows(2) {
        // Latency-adjusted (the deadline each leader answered): >= 95 %.
        let nominal = pair[1].fire.deadline - pair[0].fire.deadline;
        assert!(nominal * 100 >= 95 * MS, "{nominal}");
        // Raw: at least the period minus the worst latency.
        assert!(pair[1].now - pair[0].now >= MS - 200 * US);
    }
    // The cadence never drifts off the start grid.
    assert!(leaders.iter().all(|s| s.fire.deadline % MS == 0));
}

#[test]
fn test_kt_f4_missed_fires_resynchronize_without_oversampling() {
    let start = 0;
    let mut sim = Sim::new(one_timer(sampler::TH_INFO, MS), 4, start, 200 * US);
    // Every 37th host timer is 3.5 periods late.
    sim.stall_every = 37;
    sim.stall = 3 * MS + MS / 2;
    sim.run_until(2000 * MS);
    let leaders = sim.leaders();
    assert!(leaders.len() <= 2000);
    assert!(leaders.len() >= 1900, "{}", leaders.len());
    for pair in leaders.windows(2) {
        assert!(pair[1].fire.deadline >= pair[0].fire.deadline + MS);
    }
    assert!(sim.seen.iter().all(|s| s.fire.next_deadline % MS == 0));
}

#[test]
fn test_kt_f6_single_timer_rearms_to_the_global_deadline() {
    let mut k = one_timer(sampler::TH_INFO, MS);
    k.set_sampling(true, 0, 2).unwrap();
    for now in [MS + 10, MS + 20] {
        for cpu in 0..2 {
            let (_, next) = handled(k.expire(cpu, now));
            assert_eq!(next, Some(k.timer(0).unwrap().deadline));
        }
    }
}

#[test]
fn test_amb12_rearm_over_all_timers_or_fired_only() {
    let mut k = Kperf::new();
    k.set_action_count(1).unwrap();
    k.set_action_samplers(1, sampler::TH_INFO).unwrap();
    k.set_timer_count(2).unwrap();
    for (id, period) in [(0, MS), (1, 3 * MS / 2)] {
        k.set_timer_period(id, period).unwrap();
        k.set_timer_action(id, 1).unwrap();
    }
    let mut compat = k.clone();
    compat.set_compat_fired_only(true);
    assert!(!k.compat_fired_only());

    assert_eq!(k.set_sampling(true, 0, 1).unwrap(), vec![Some(MS)]);
    let (fires, next) = handled(k.expire(0, MS + 100));
    assert_eq!(fires.len(), 1);
    // Timer 1 is due at 1.5 ms and is not missed.
    assert_eq!(next, Some(3 * MS / 2));

    compat.set_sampling(true, 0, 1).unwrap();
    let (fires, next) = handled(compat.expire(0, MS + 100));
    assert_eq!(fires.len(), 1);
    // XNU: only timer 0's new deadline, so timer 1 fires late.
    assert_eq!(next, Some(2 * MS));
    // And an expiry where nothing fires disarms the vCPU.
    let (fires, next) = handled(compat.expire(0, MS + 200));
    assert!(fires.is_empty());
    assert_eq!(next, None);
}

// --- Sampling decisions (KT-SM-*) ---------------------------------------

#[test]
fn test_kt_sm1_system_only_action_samples_once_per_fire() {
    let start = 0;
    let mut sim = Sim::new(one_timer(sampler::SYS_MEM, MS), 4, start, 200 * US);
    sim.run_until(500 * MS);
    let leaders = sim.leaders().len();
    let samples: Vec<&Seen> = sim
        .seen
        .iter()
        .filter(|s| s.fire.sample.is_some())
        .collect();
    assert_eq!(samples.len(), leaders);
    for seen in samples {
        assert!(seen.fire.leader);
        let sample = seen.fire.sample.unwrap();
        assert_eq!(sample.flags, sample_flags::PEND_USER | sample_flags::SYSTEM);
        assert_eq!((sample.action, sample.timer), (1, 0));
    }
}

#[test]
fn test_kt_sm2_sample_request_carries_the_action_settings() {
    let mut k = one_timer(sampler::TH_INFO | sampler::USTACK, MS);
    k.set_action_ucallstack_depth(1, 16).unwrap();
    k.set_action_kcallstack_depth(1, 8).unwrap();
    k.set_action_filter(1, 42).unwrap();
    k.set_action_userdata(1, 7).unwrap();
    let deadlines = k.set_sampling(true, 0, 1).unwrap();
    let (fires, _) = handled(k.expire(0, deadlines[0].unwrap() + 1));
    let request = fires[0].sample.expect("the leader samples");
    assert_eq!(request.settings, k.action(1));
    assert_eq!(
        (
            request.settings.samplers,
            request.settings.ucallstack_depth,
            request.settings.kcallstack_depth,
            request.settings.pid_filter,
            request.settings.userdata,
        ),
        (sampler::TH_INFO | sampler::USTACK, 16, 8, 42, 7)
    );
    // The null action and ids beyond the count sample nothing.
    assert_eq!(k.action(0).samplers, 0);
    assert_eq!(k.action(5).samplers, 0);
}

#[test]
fn test_kt_sm1_non_system_action_samples_every_busy_cpu() {
    let start = 0;
    let mut sim = Sim::new(
        one_timer(sampler::SYS_MEM | sampler::TH_INFO, MS),
        4,
        start,
        200 * US,
    );
    sim.run_until(500 * MS);
    let leaders = sim.leaders().len();
    for seen in &sim.seen {
        let sample = seen.fire.sample.expect("every vCPU samples");
        let system = if seen.fire.leader {
            sample_flags::SYSTEM
        } else {
            0
        };
        assert_eq!(sample.flags, sample_flags::PEND_USER | system);
    }
    assert!(sim.seen.len() >= 4 * leaders - 4);
}

#[test]
fn test_kt_sm1_has_non_system_is_false_beyond_the_count() {
    let mut k = Kperf::new();
    k.set_action_count(2).unwrap();
    k.set_action_samplers(1, sampler::SYS_MEM).unwrap();
    k.set_action_samplers(2, sampler::KSTACK).unwrap();
    assert!(!k.action_has_non_system(0));
    assert!(!k.action_has_non_system(1));
    assert!(k.action_has_non_system(2));
    assert!(!k.action_has_non_system(3));
    assert!(k.action_has_thread(2) && !k.action_has_task(2));
    k.set_action_samplers(1, sampler::MEMINFO).unwrap();
    assert!(k.action_has_task(1) && !k.action_has_thread(1));
    assert!(!k.action_has_task(99) && !k.action_has_thread(99));
}

#[test]
fn test_kt_sm3_every_busy_cpu_samples_once_per_fire() {
    let start = 0;
    let mut sim = Sim::new(one_timer(sampler::TH_INFO, MS), 4, start, 200 * US);
    sim.run_until(5000 * MS);
    let leaders = sim.leaders().len();
    for cpu in 0..4 {
        let samples = sim.samples_of(cpu);
        // Saturation above 95 %, and never more than once per fire.
        assert!(samples * 100 > leaders * 95, "cpu {cpu}: {samples}");
        assert!(samples <= leaders + 1);
    }
    // Per fire (the deadline answered), each vCPU at most once.
    let mut per_fire = std::collections::HashMap::new();
    for seen in &sim.seen {
        *per_fire
            .entry((seen.fire.deadline, seen.cpu))
            .or_insert(0u32) += 1;
    }
    assert!(per_fire.values().all(|&n| n == 1));
}

// --- Idle vCPUs (KT-I-*) ----------------------------------------------------

#[test]
fn test_kt_i1_idle_cpu_gets_no_fires_and_realigns_on_wake() {
    let start = 0;
    let mut sim = Sim::new(one_timer(sampler::TH_INFO, MS), 4, start, 200 * US);
    sim.run_until(10 * MS + MS / 2);
    sim.idle(3);
    let idle_from = sim.now;
    sim.run_until(110 * MS + MS / 3);
    let idle_to = sim.now;
    assert!(sim
        .seen
        .iter()
        .all(|s| s.cpu != 3 || s.now < idle_from || s.now > idle_to));
    // The others kept firing meanwhile.
    assert!(sim
        .seen
        .iter()
        .any(|s| s.cpu == 0 && s.now > idle_from + 90 * MS));

    // On wake: one deadline on the global grid, after now; no burst.
    let deadline = sim.wake(3).unwrap();
    assert!(deadline > idle_to && deadline - idle_to <= MS);
    assert_eq!(deadline % MS, 0);
    let before = sim.seen.len();
    sim.run_until(idle_to + 5 * MS);
    let from_cpu3: Vec<&Seen> = sim.seen[before..].iter().filter(|s| s.cpu == 3).collect();
    assert!((4..=6).contains(&from_cpu3.len()), "{}", from_cpu3.len());
    assert_eq!(from_cpu3[0].fire.deadline, deadline);
}

#[test]
fn test_kt_i1_wake_with_every_cpu_idle_skips_missed_fires() {
    let mut k = one_timer(sampler::TH_INFO, MS);
    k.set_sampling(true, 0, 2).unwrap();
    k.cpu_idle(0);
    k.cpu_idle(1);
    // A deadline that raced the idle transition is ignored.
    assert_eq!(handled(k.expire(0, MS + 5)), (vec![], None));
    // 50 ms later the global deadline (1 ms) is stale; wake reckons.
    assert_eq!(k.cpu_wake(1, 50 * MS + 300), Some(51 * MS));
    let (fires, next) = handled(k.expire(1, 51 * MS + 10));
    assert!(fires[0].leader);
    assert_eq!(next, Some(52 * MS));
    assert!(k.is_cpu_idle(0) && !k.is_cpu_idle(1));
}

#[test]
fn test_kt_st2_idle_cpus_are_not_programmed_at_start() {
    let mut k = one_timer(sampler::TH_INFO, MS);
    k.cpu_idle(1);
    assert_eq!(
        k.set_sampling(true, 0, 3).unwrap(),
        vec![Some(MS), None, Some(MS)]
    );
    assert_eq!(k.cpu_wake(1, 10), Some(MS));
}

#[test]
fn test_kt_i2_hot_added_cpu_joins_the_grid() {
    let mut k = one_timer(sampler::TH_INFO, MS);
    k.set_sampling(true, 0, 2).unwrap();
    assert_eq!(k.expire(2, MS + 1), CpuExpiry::NoSuchCpu);
    assert_eq!(k.cpu_wake(2, 2 * MS + 500), Some(3 * MS));
    assert!(matches!(k.expire(2, 3 * MS + 1), CpuExpiry::Handled { .. }));
    // Online while off: cleared, nothing to program.
    k.set_sampling(false, 4 * MS, 3).unwrap();
    assert_eq!(k.cpu_wake(1, 5 * MS), None);
}

// --- Minimum periods (KT-MIN-*) --------------------------------------

#[test]
fn test_kt_min1_short_periods_are_raised() {
    let mut k = Kperf::new();
    k.set_timer_count(2).unwrap();
    k.set_timer_period(0, US).unwrap();
    assert_eq!(k.timer_period(0), Ok(20_000));
    k.set_pet_timer(1).unwrap();
    k.set_timer_period(1, US).unwrap();
    assert_eq!(k.timer_period(1), Ok(2_000_000));
    // 0 stays 0 (disabled) on an on-CPU timer.
    k.set_timer_period(0, 0).unwrap();
    assert_eq!(k.timer_period(0), Ok(0));
    // Background minima.
    k.set_background(true);
    k.set_timer_period(0, US).unwrap();
    assert_eq!(k.timer_period(0), Ok(1_000_000));
    k.set_timer_period(1, US).unwrap();
    assert_eq!(k.timer_period(1), Ok(5_000_000));
    // At or above the minimum: unchanged.
    k.set_timer_period(0, 1_000_001).unwrap();
    assert_eq!(k.timer_period(0), Ok(1_000_001));
}

#[test]
fn test_kt_min2_limits() {
    let k = Kperf::new();
    assert_eq!(
        k.limits(),
        Limits {
            timer_min_period_ns: 20_000,
            timer_min_bg_period_ns: 1_000_000,
            timer_min_pet_period_ns: 2_000_000,
            timer_min_bg_pet_period_ns: 5_000_000,
        }
    );
    assert_eq!(k.min_period_ns(false), 20_000);
    assert_eq!(min_period_ns(true, true), 5_000_000);
}

#[test]
fn test_kt_min3_mode_switch_does_not_reclamp() {
    let mut k = Kperf::new();
    k.set_timer_count(1).unwrap();
    k.set_timer_period(0, 30 * US).unwrap();
    k.set_background(true);
    assert!(k.background());
    assert_eq!(k.timer_period(0), Ok(30 * US));
    k.set_timer_period(0, 30 * US).unwrap();
    assert_eq!(k.timer_period(0), Ok(MS));
    k.set_background(false);
    assert_eq!(k.timer_period(0), Ok(MS));
}

// --- Start and stop (KT-ST-*, KT-SP-*) ----------------------------------

#[test]
fn test_kt_st1_period_zero_timer_never_fires() {
    let mut k = Kperf::new();
    k.set_action_count(1).unwrap();
    k.set_action_samplers(1, sampler::TH_INFO).unwrap();
    k.set_timer_count(3).unwrap();
    k.set_timer_period(0, MS).unwrap();
    k.set_timer_action(0, 1).unwrap();
    k.set_timer_action(1, 1).unwrap(); // period 0
    k.set_timer_period(2, MS / 2).unwrap(); // action 0
    k.set_sampling(true, 0, 1).unwrap();
    assert_eq!(k.timer(1).unwrap().deadline, 0);
    assert_eq!(k.timer(2).unwrap().deadline, 0);
    assert_eq!(k.cpu_deadline(0, 1), None);
    assert_eq!(k.cpu_deadline(0, 2), None);
    let mut now = 0;
    let mut next = Some(MS);
    for _ in 0..100 {
        now = next.unwrap() + 10;
        let (fires, n) = handled(k.expire(0, now));
        assert!(fires.iter().all(|f| f.timer == 0));
        next = n;
    }
    assert!(now > 99 * MS);
}

#[test]
fn test_kt_st2_every_running_cpu_is_programmed() {
    let mut k = one_timer(sampler::TH_INFO, MS);
    let programs = k.set_sampling(true, 5 * MS, 4).unwrap();
    assert_eq!(programs, vec![Some(6 * MS); 4]);
    assert_eq!(k.timer(0).unwrap().deadline, 6 * MS);
    assert!(k.started());
    // A second start changes nothing.
    assert_eq!(k.start(7 * MS, 4), programs);
    assert_eq!(k.set_sampling(true, 8 * MS, 4).unwrap(), programs);
}

#[test]
fn test_kt_st3_start_with_all_periods_zero_is_started() {
    let mut k = Kperf::new();
    k.set_action_count(1).unwrap();
    k.set_timer_count(2).unwrap();
    assert_eq!(k.set_sampling(true, 0, 2).unwrap(), vec![None, None]);
    assert!(k.started());
    assert_eq!(k.set_timer_period(0, MS), Err(KperfError::Busy));
    assert_eq!(k.set_timer_action(0, 1), Err(KperfError::Busy));
    assert_eq!(k.set_timer_count(1), Err(KperfError::Busy));
    assert_eq!(k.set_pet_timer(0), Err(KperfError::Busy));
    assert_eq!(k.set_lightweight_pet(true), Err(KperfError::Busy));
    // The id is checked before busy (CFG-T-2).
    assert_eq!(k.set_timer_period(2, MS), Err(KperfError::Inval));
    assert_eq!(k.set_timer_action(5, 1), Err(KperfError::Inval));
}

#[test]
fn test_kt_sp1_after_stop_no_fires() {
    let mut k = one_timer(sampler::TH_INFO, MS);
    k.set_sampling(true, 0, 2).unwrap();
    handled(k.expire(0, MS + 1));
    assert_eq!(k.set_sampling(false, MS + 2, 2).unwrap(), vec![None, None]);
    assert!(!k.started());
    assert_eq!(k.timer(0).unwrap().deadline, 0);
    assert_eq!(k.cpu_deadline(0, 0), None);
    assert_eq!(k.cpu_deadline(1, 0), None);
    // A host deadline that outlived the stop.
    assert_eq!(k.expire(1, MS + 3), CpuExpiry::NotRunning);
    // Stop on stopped timers is a no-op; setters work again.
    k.stop();
    k.set_timer_period(0, 2 * MS).unwrap();
}

#[test]
fn test_kt_sp1_start_stop_stress() {
    let mut k = one_timer(sampler::TH_INFO, MS);
    let mut now = 0;
    for _ in 0..500 {
        let programs = k.set_sampling(true, now, 2).unwrap();
        assert_eq!(programs, vec![Some(now + MS); 2]);
        now += MS + 7;
        assert_eq!(handled(k.expire(0, now)).0.len(), 1);
        k.set_sampling(false, now, 2).unwrap();
        assert_eq!(k.expire(1, now + 1), CpuExpiry::NotRunning);
    }
}

#[test]
fn test_kt_f1_shutdown_clears_the_cpu_and_samples_nothing() {
    let mut k = one_timer(sampler::TH_INFO, MS);
    k.set_sampling(true, 0, 2).unwrap();
    assert_eq!(k.begin_shutdown(), Ok(true));
    assert_eq!(k.sampling_state(), SamplingState::Shutdown);
    assert!(!k.sampling());
    assert_eq!(k.expire(0, MS + 1), CpuExpiry::ShuttingDown);
    assert_eq!(k.cpu_deadline(0, 0), None);
    // Neither transition is allowed mid-shutdown (XNU would panic).
    assert_eq!(k.set_sampling(true, MS, 2), Err(KperfError::Busy));
    assert_eq!(k.set_sampling(false, MS, 2), Err(KperfError::Busy));
    assert_eq!(k.begin_shutdown(), Err(KperfError::Busy));
    k.finish_shutdown();
    assert_eq!(k.sampling_state(), SamplingState::Off);
    assert_eq!(k.expire(0, MS + 2), CpuExpiry::NotRunning);
    assert_eq!(k.begin_shutdown(), Ok(false));
}

#[test]
fn test_kt_f1_stop_with_kicks_in_flight_samples_nothing_then_restarts() {
    let mut sim = Sim::new(
        one_timer(sampler::TH_INFO | sampler::KSTACK, MS),
        4,
        0,
        50 * US,
    );
    sim.run_until(10 * MS);
    // vCPU 3 halted before the stop; the others' deadline of 10 ms passed,
    // and their kicks are in flight (they expire after now, 1..=50 us late).
    sim.idle(3);
    let in_flight: Vec<(usize, u64)> = (0..3)
        .map(|cpu| {
            let (deadline, at) = sim.armed[cpu].expect("a kick in flight");
            assert!(at > deadline, "the deadline has passed when it runs");
            (cpu, at)
        })
        .collect();
    // Control: without the stop, each of those expiries fires and samples.
    for &(cpu, at) in &in_flight {
        let (fires, _) = handled(sim.kperf.clone().expire(cpu, at));
        assert!(fires.iter().any(|f| f.sample.is_some()));
    }
    let seen_before = sim.seen.len();

    // 1. Begin: On -> Shutdown, every deadline cancelled.
    assert_eq!(sim.kperf.begin_shutdown(), Ok(true));
    assert_eq!(sim.kperf.sampling_state(), SamplingState::Shutdown);
    assert!(!sim.kperf.started());
    assert_eq!(sim.kperf.pet_deadline(), None);
    for cpu in 0..4 {
        assert_eq!(sim.kperf.cpu_next_deadline(cpu), None);
    }
    // 2. Wait: the kicks in flight land; no fire, no sample, no re-arm.
    for (cpu, at) in in_flight {
        assert_eq!(sim.kperf.expire(cpu, at), CpuExpiry::ShuttingDown);
        assert_eq!(sim.kperf.cpu_deadline(cpu, 0), None);
        sim.armed[cpu] = None;
    }
    // The halted vCPU wakes during the wait: nothing to program.
    assert_eq!(sim.kperf.cpu_wake(3, 10 * MS + 60 * US), None);
    assert_eq!(sim.kperf.cpu_deadline(3, 0), None);
    assert_eq!(sim.kperf.pet_fired(10 * MS + 70 * US), None);
    assert_eq!(sim.kperf.pet_rearm(10 * MS + 70 * US, 0), None);
    // Long after every deadline: still nothing (and no panic).
    assert_eq!(sim.kperf.expire(0, 50 * MS), CpuExpiry::ShuttingDown);
    assert_eq!(sim.seen.len(), seen_before);

    // 3. Finish: Shutdown -> Off; a stale expiry is now NotRunning.
    sim.kperf.finish_shutdown();
    assert_eq!(sim.kperf.sampling_state(), SamplingState::Off);
    assert_eq!(sim.kperf.expire(1, 50 * MS), CpuExpiry::NotRunning);

    // Starting again works: fresh deadlines on every vCPU, the cadence
    // resumes from the restart, one leader per period.
    let restart = 60 * MS;
    sim.now = restart;
    let programs = sim.kperf.set_sampling(true, restart, 4).unwrap();
    assert_eq!(programs, vec![Some(restart + MS); 4]);
    for (cpu, program) in programs.into_iter().enumerate() {
        sim.program(cpu, program);
    }
    sim.run_until(restart + 10 * MS + 500 * US);
    let after: Vec<Seen> = sim.seen[seen_before..].to_vec();
    assert!(after.iter().all(|s| s.now > restart + MS));
    let leaders = after.iter().filter(|s| s.fire.leader).count();
    assert_eq!(leaders, 10);
    for cpu in 0..4 {
        assert_eq!(sim.samples_of(cpu), sim.samples_of(0), "vCPU {cpu}");
    }
}

#[test]
fn test_kt_f1_shutdown_expiry_counts_no_lightweight_pet_generation() {
    let mut k = one_timer(sampler::TH_INFO, 2 * MS);
    k.set_pet_timer(0).unwrap();
    k.set_lightweight_pet(true).unwrap();
    k.set_sampling(true, 0, 2).unwrap();
    let (fires, _) = handled(k.clone().expire(0, 2 * MS + 1));
    assert!(fires[0].leader && fires[0].pet);
    assert_eq!(k.begin_shutdown(), Ok(true));
    assert_eq!(k.expire(0, 2 * MS + 1), CpuExpiry::ShuttingDown);
    assert_eq!(k.pet_generation(), 0);
    assert!(!k.lightweight_pet_active());
    k.finish_shutdown();
    k.set_sampling(true, 10 * MS, 2).unwrap();
    let (fires, _) = handled(k.expire(0, 12 * MS + 1));
    assert!(fires[0].leader);
    assert_eq!(k.pet_generation(), 1);
}

#[test]
fn test_kt_sp2_reset_keeps_counts_and_clears_the_rest() {
    let mut k = Kperf::new();
    k.set_action_count(2).unwrap();
    k.set_action_samplers(1, sampler::KSTACK).unwrap();
    k.set_action_userdata(2, 7).unwrap();
    k.set_action_filter(2, 42).unwrap();
    k.set_action_ucallstack_depth(1, 16).unwrap();
    k.set_action_kcallstack_depth(1, 8).unwrap();
    k.set_timer_count(3).unwrap();
    for id in 0..3 {
        k.set_timer_period(id, MS).unwrap();
        k.set_timer_action(id, 1).unwrap();
    }
    k.set_pet_timer(2).unwrap();
    k.set_pet_idle_rate(3).unwrap();
    k.set_background(true);
    k.set_sampling(true, 0, 2).unwrap();

    k.reset();
    assert_eq!(k.sampling_state(), SamplingState::Off);
    assert!(!k.started());
    assert_eq!(k.timer_count(), 3);
    assert_eq!(k.action_count(), 2);
    for id in 0..3 {
        assert_eq!(k.timer_period(id), Ok(0));
        assert_eq!(k.timer_action(id), Ok(0));
        assert_eq!(k.cpu_deadline(0, id), None);
    }
    assert_eq!(k.pet_timer(), PET_TIMER_NONE);
    assert_eq!(k.pet_action(), 0);
    assert_eq!(k.pet_deadline(), None);
    assert_eq!(k.pet_idle_rate(), 15);
    assert!(!k.lightweight_pet());
    for id in 1..=2 {
        assert_eq!(k.action_samplers(id), Ok(0));
        assert_eq!(k.action_userdata(id), Ok(0));
        assert_eq!(k.action_filter(id), Ok(-1));
        assert_eq!(k.action_ucallstack_depth(id), Ok(256));
        assert_eq!(k.action_kcallstack_depth(id), Ok(128));
    }
    // The background profile belongs to the tool, not to kperf.
    assert!(k.background());
    // Reset while off is fine too.
    k.reset();
}

// --- Sampling state machine (CFG-S-*) ---------------------------------

#[test]
fn test_cfg_s1_transitions() {
    let mut k = Kperf::new();
    assert_eq!(k.set_sampling(true, 0, 1), Err(KperfError::Canceled));
    assert_eq!(k.sampling_state(), SamplingState::Off);
    k.set_action_count(1).unwrap();
    assert!(k.set_sampling(true, 0, 1).is_ok());
    assert!(k.set_sampling(true, 0, 1).is_ok());
    assert!(k.sampling());
    assert!(k.set_sampling(false, 0, 1).is_ok());
    assert!(k.set_sampling(false, 0, 1).is_ok());
    assert!(!k.sampling());
    assert_eq!(k.sampling_state(), SamplingState::Off);
    // Disabling something never enabled is fine.
    assert_eq!(Kperf::new().set_sampling(false, 0, 2), Ok(vec![None, None]));
}

#[test]
fn test_cfg_s1_lightweight_pet_activity_follows_sampling() {
    let mut k = one_timer(sampler::TH_INFO, 2 * MS);
    k.set_lightweight_pet(true).unwrap();
    assert!(!k.lightweight_pet_active());
    k.set_sampling(true, 0, 1).unwrap();
    assert!(k.lightweight_pet_active());
    k.set_sampling(false, 0, 1).unwrap();
    assert!(!k.lightweight_pet_active());
}

// --- Actions (CFG-A-*) ----------------------------------------------

#[test]
fn test_cfg_a1_count_only_grows() {
    let mut k = Kperf::new();
    assert_eq!(k.set_action_count(4), Ok(()));
    assert_eq!(k.set_action_count(2), Err(KperfError::Inval));
    assert_eq!(k.set_action_count(4), Ok(()));
    assert_eq!(k.set_action_count(33), Err(KperfError::Inval));
    assert_eq!(k.set_action_count(32), Ok(()));
    assert_eq!(k.action_count(), 32);
    for id in 1..=32 {
        assert_eq!(k.action_samplers(id), Ok(0));
        assert_eq!(k.action_userdata(id), Ok(0));
        assert_eq!(k.action_filter(id), Ok(-1));
        assert_eq!(k.action_ucallstack_depth(id), Ok(256));
        assert_eq!(k.action_kcallstack_depth(id), Ok(128));
    }
}

#[test]
fn test_cfg_a1_count_grows_while_sampling() {
    let mut k = one_timer(sampler::TH_INFO, MS);
    k.set_sampling(true, 0, 1).unwrap();
    assert_eq!(k.set_action_count(3), Ok(()));
    assert_eq!(k.set_action_samplers(3, sampler::KSTACK), Ok(()));
}

#[test]
fn test_cfg_a2_id_matrix() {
    let mut k = Kperf::new();
    k.set_action_count(3).unwrap();
    let count = k.action_count();
    let inval = Err(KperfError::Inval);
    for id in [0, 1, count, count + 1] {
        let set_ok = id != 0 && id <= count;
        let get_ok = id <= count;
        let expect = |ok: bool| if ok { Ok(()) } else { inval };
        assert_eq!(k.set_action_samplers(id, sampler::TH_INFO), expect(set_ok));
        assert_eq!(k.set_action_userdata(id, 9), expect(set_ok));
        assert_eq!(k.set_action_filter(id, 5), expect(set_ok));
        assert_eq!(k.set_action_ucallstack_depth(id, 64), expect(set_ok));
        assert_eq!(k.set_action_kcallstack_depth(id, 32), expect(set_ok));
        if !get_ok {
            assert_eq!(k.action_samplers(id), inval.map(|()| 0));
            assert_eq!(k.action_userdata(id), inval.map(|()| 0));
            assert_eq!(k.action_filter(id), inval.map(|()| 0));
            assert_eq!(k.action_ucallstack_depth(id), inval.map(|()| 0));
            assert_eq!(k.action_kcallstack_depth(id), inval.map(|()| 0));
        } else if id == 0 {
            // The null action reads as the defaults.
            assert_eq!(k.action_samplers(0), Ok(0));
            assert_eq!(k.action_userdata(0), Ok(0));
            assert_eq!(k.action_filter(0), Ok(-1));
            assert_eq!(k.action_ucallstack_depth(0), Ok(256));
            assert_eq!(k.action_kcallstack_depth(0), Ok(128));
        } else {
            assert_eq!(k.action_samplers(id), Ok(sampler::TH_INFO));
            assert_eq!(k.action_userdata(id), Ok(9));
            assert_eq!(k.action_filter(id), Ok(5));
            assert_eq!(k.action_ucallstack_depth(id), Ok(64));
            assert_eq!(k.action_kcallstack_depth(id), Ok(32));
        }
    }
}

#[test]
fn test_cfg_a3_depth_boundaries() {
    let mut k = Kperf::new();
    k.set_action_count(1).unwrap();
    let inval = Err(KperfError::Inval);
    for (depth, expect) in [(1, inval), (2, Ok(())), (256, Ok(())), (257, inval)] {
        assert_eq!(k.set_action_ucallstack_depth(1, depth), expect, "{depth}");
    }
    assert_eq!(k.action_ucallstack_depth(1), Ok(256));
    for (depth, expect) in [(0, inval), (1, Ok(())), (128, Ok(())), (129, inval)] {
        assert_eq!(k.set_action_kcallstack_depth(1, depth), expect, "{depth}");
    }
    assert_eq!(k.action_kcallstack_depth(1), Ok(128));
    // The id is checked before the depth.
    assert_eq!(k.set_action_ucallstack_depth(2, 1), inval);
}

#[test]
fn test_cfg_a3_amb14_pmc_bits_accepted_but_not_both() {
    let mut k = Kperf::new();
    k.set_action_count(1).unwrap();
    k.set_action_samplers(1, sampler::TH_INFO).unwrap();
    assert_eq!(
        k.set_action_samplers(1, sampler::PMC_THREAD | sampler::PMC_CPU),
        Err(KperfError::Inval)
    );
    assert_eq!(k.action_samplers(1), Ok(sampler::TH_INFO));
    for bits in [sampler::PMC_THREAD, sampler::PMC_CPU | sampler::PMC_CONFIG] {
        assert_eq!(k.set_action_samplers(1, bits), Ok(()));
        assert_eq!(k.action_samplers(1), Ok(bits));
    }
}

// --- Timers (CFG-T-*) -----------------------------------------------

#[test]
fn test_cfg_t1_hidden_timers_reappear() {
    let mut k = Kperf::new();
    assert_eq!(k.set_timer_count(9), Err(KperfError::Inval));
    k.set_timer_count(2).unwrap();
    k.set_timer_period(1, 5 * MS).unwrap();
    k.set_timer_action(1, 3).unwrap();
    k.set_timer_count(1).unwrap();
    assert_eq!(k.timer_period(1), Err(KperfError::Inval));
    assert_eq!(k.timer(1), None);
    k.set_timer_count(2).unwrap();
    assert_eq!(k.timer_period(1), Ok(5 * MS));
    assert_eq!(k.timer_action(1), Ok(3));
    assert_eq!(k.set_timer_count(8), Ok(()));
}

#[test]
fn test_cfg_t2_action_not_checked_against_count() {
    let mut k = Kperf::new();
    k.set_action_count(1).unwrap();
    k.set_timer_count(1).unwrap();
    k.set_timer_period(0, MS).unwrap();
    assert_eq!(k.set_timer_action(0, 99), Ok(()));
    assert_eq!(k.timer_action(0), Ok(99));
    k.set_sampling(true, 0, 2).unwrap();
    // It fires; the leader still gets a request (which the sampler
    // drops, KT-SM-4), a follower none.
    let (fires, _) = handled(k.expire(0, MS + 1));
    assert_eq!(fires[0].sample.map(|s| s.action), Some(99));
    let (fires, _) = handled(k.expire(1, MS + 2));
    assert_eq!(fires[0].sample, None);
    assert!(!k.action_has_non_system(99));
}

#[test]
fn test_cfg_t2_getters_check_the_id() {
    let mut k = Kperf::new();
    k.set_timer_count(2).unwrap();
    for id in [0, 1] {
        assert_eq!(k.timer_period(id), Ok(0));
        assert_eq!(k.timer_action(id), Ok(0));
    }
    for id in [2, 8, PET_TIMER_NONE] {
        assert_eq!(k.timer_period(id), Err(KperfError::Inval));
        assert_eq!(k.timer_action(id), Err(KperfError::Inval));
        assert_eq!(k.set_timer_period(id, MS), Err(KperfError::Inval));
        assert_eq!(k.set_timer_action(id, 1), Err(KperfError::Inval));
    }
}

#[test]
fn test_cfg_t3_pet_timer_clamp_and_out_of_range_id() {
    let mut k = Kperf::new();
    assert_eq!(k.pet_timer(), PET_TIMER_NONE);
    k.set_timer_count(1).unwrap();
    k.set_timer_action(0, 4).unwrap();
    k.set_pet_timer(0).unwrap();
    assert_eq!(k.timer_period(0), Ok(2 * MS));
    assert_eq!(k.pet_action(), 4);
    k.set_pet_timer(5).unwrap();
    assert_eq!(k.pet_timer(), 5);
    assert_eq!(k.pet_action(), 0);
    // The old PET timer keeps its raised period.
    assert_eq!(k.timer_period(0), Ok(2 * MS));
}

#[test]
fn test_cfg_t2_pet_timer_settings_reconfigure_pet() {
    let mut k = Kperf::new();
    k.set_timer_count(1).unwrap();
    k.set_pet_timer(0).unwrap();
    k.set_timer_action(0, 2).unwrap();
    assert_eq!(k.pet_action(), 2);
    // PET-L-4: in lightweight mode only set_pet_timer captures it.
    k.set_lightweight_pet(true).unwrap();
    k.set_timer_action(0, 3).unwrap();
    assert_eq!(k.pet_action(), 2);
    k.set_pet_timer(0).unwrap();
    assert_eq!(k.pet_action(), 3);
}

#[test]
fn test_amb_11_lightweight_pet_recaptures_its_action_at_start() {
    let mut k = Kperf::new();
    k.set_action_count(3).unwrap();
    k.set_timer_count(1).unwrap();
    k.set_timer_period(0, 10 * MS).unwrap();
    k.set_lightweight_pet(true).unwrap();
    // PET-L-4's order: the PET timer first, then its action: not captured.
    k.set_pet_timer(0).unwrap();
    k.set_timer_action(0, 3).unwrap();
    assert_eq!(k.pet_action(), 0);
    // AMB-11: starting takes it afresh.
    k.set_sampling(true, 0, 1).unwrap();
    assert_eq!(k.pet_action(), 3);
    // Traditional mode is untouched: it captures at every change anyway.
    k.set_sampling(false, 0, 1).unwrap();
    k.set_lightweight_pet(false).unwrap();
    k.set_timer_action(0, 2).unwrap();
    assert_eq!(k.pet_action(), 2);
    k.set_sampling(true, 0, 1).unwrap();
    assert_eq!(k.pet_action(), 2);
}

// --- PET (CFG-P-1, PET-*) -------------------------------------------

#[test]
fn test_cfg_p1_amb13_idle_rate() {
    let mut k = Kperf::new();
    assert_eq!(k.pet_idle_rate(), 15);
    assert_eq!(k.set_pet_idle_rate(0), Err(KperfError::Inval));
    assert_eq!(k.set_pet_idle_rate(1), Ok(()));
    assert_eq!(k.pet_idle_rate(), 1);
    k.set_action_count(1).unwrap();
    k.set_sampling(true, 0, 1).unwrap();
    assert_eq!(k.set_pet_idle_rate(40), Ok(()));
    assert_eq!(k.pet_idle_rate(), 40);
}

/// Traditional PET on timer 0 (10 ms) plus an on-CPU timer 1 (1 ms).
fn traditional_pet() -> Kperf {
    let mut k = Kperf::new();
    k.set_action_count(2).unwrap();
    k.set_action_samplers(1, sampler::TH_INFO | sampler::USTACK)
        .unwrap();
    k.set_action_samplers(2, sampler::KSTACK).unwrap();
    k.set_timer_count(2).unwrap();
    k.set_pet_timer(0).unwrap();
    k.set_timer_period(0, 10 * MS).unwrap();
    k.set_timer_action(0, 1).unwrap();
    k.set_timer_period(1, MS).unwrap();
    k.set_timer_action(1, 2).unwrap();
    k
}

#[test]
fn test_pet_h1_traditional_pet_is_not_an_on_cpu_timer() {
    let mut k = traditional_pet();
    k.set_timer_period(1, 0).unwrap();
    assert_eq!(k.set_sampling(true, 0, 3).unwrap(), vec![None; 3]);
    assert_eq!(k.pet_deadline(), Some(10 * MS));
    assert_eq!(k.timer(0).unwrap().deadline, 0);
    assert_eq!(k.pet_action(), 1);
}

#[test]
fn test_pet_h2_handler_kicks_and_samples() {
    let mut k = traditional_pet();
    assert_eq!(k.set_sampling(true, 0, 3).unwrap(), vec![Some(MS); 3]);
    assert_eq!(k.pet_fired(10 * MS - 1), None);
    let fire = k.pet_fired(10 * MS + 5).unwrap();
    assert_eq!((fire.timer, fire.action, fire.period_ns), (0, 1, 10 * MS));
    assert_eq!(fire.tm_fire_args(), [0, 1, 10 * MS, 1]);
    assert_eq!(fire.handler_cpu, 0);
    assert_eq!(fire.remote_cpus, vec![1, 2]);
    assert_eq!(fire.remote_sample.flags, sample_flags::PEND_USER);
    assert_eq!(
        fire.handler_sample.flags,
        sample_flags::PEND_USER | sample_flags::SYSTEM
    );
    assert_eq!(k.pet_broadcasts(), 1);
    // Disarmed until the sampler re-arms it.
    assert_eq!(k.pet_deadline(), None);
    assert_eq!(k.pet_fired(20 * MS), None);
    assert_eq!(k.pet_broadcasts(), 1);
    // The on-CPU timer 1 never reports the PET timer.
    let (fires, _) = handled(k.expire(1, MS + 1));
    assert_eq!(fires.len(), 1);
    assert_eq!((fires[0].timer, fires[0].pet), (1, false));
}

#[test]
fn test_pet_r1_rearm_examples() {
    let mut k = traditional_pet();
    k.set_sampling(true, 0, 1).unwrap();
    let schedule = k.pet_rearm(100 * MS, 3 * MS).unwrap();
    assert_eq!(
        schedule,
        PetSchedule {
            period_ns: 10 * MS,
            adjusted_period_ns: 7 * MS,
            sample_duration_ns: 3 * MS,
            deadline: 107 * MS,
        }
    );
    assert_eq!(k.pet_deadline(), Some(107 * MS));
    assert_eq!(k.pet_rearm(100 * MS, 12 * MS).unwrap().deadline, 110 * MS);
    k.set_sampling(false, 0, 1).unwrap();
    // Not sampling: no re-arm.
    assert_eq!(k.pet_rearm(100 * MS, 0), None);
    assert_eq!(k.pet_deadline(), None);

    k.set_timer_period(0, 2 * MS).unwrap();
    k.set_sampling(true, 0, 1).unwrap();
    let schedule = k.pet_rearm(50 * MS, 3 * MS / 2).unwrap();
    assert_eq!(schedule.adjusted_period_ns, 2 * MS);
    assert_eq!(schedule.deadline, 52 * MS);
}

#[test]
fn test_pet_c1_broadcast_counter_survives_reset() {
    let mut k = traditional_pet();
    let mut now = 0;
    k.set_sampling(true, now, 2).unwrap();
    for _ in 0..100 {
        now = k.pet_deadline().unwrap() + 50;
        k.pet_fired(now).unwrap();
        k.pet_rearm(now + MS, MS).unwrap();
    }
    assert_eq!(k.pet_broadcasts(), 100);
    k.reset();
    assert_eq!(k.pet_broadcasts(), 100);
    assert_eq!(k.pet_deadline(), None);
}

#[test]
fn test_pet_l1_lightweight_pet_is_on_cpu_and_counts_generations() {
    let mut k = one_timer(sampler::TH_INFO, 2 * MS);
    k.set_pet_timer(0).unwrap();
    k.set_lightweight_pet(true).unwrap();
    let mut sim = Sim::new(k, 3, 0, 100 * US);
    assert_eq!(sim.kperf.pet_deadline(), None);
    assert!((0..3).all(|cpu| sim.kperf.cpu_next_deadline(cpu) == Some(2 * MS)));
    sim.run_until(200 * MS);
    let leaders = sim.leaders();
    assert_eq!(sim.kperf.pet_generation(), leaders.len() as u64);
    assert!(leaders
        .iter()
        .all(|s| s.fire.pet && s.fire.tm_fire_args() == [0, 1, 2 * MS, 1]));
    assert_eq!(sim.kperf.pet_broadcasts(), 0);
}

#[test]
fn test_kt_sm_4_sampler_bits_are_reduced_by_the_sample_flags() {
    use sample_flags::*;
    use sampler::*;
    let all = ALL;
    // The leader takes everything; another vCPU everything but system memory.
    assert_eq!(sampled(all, PEND_USER | SYSTEM), all);
    assert_eq!(sampled(all, PEND_USER), all & !SYS_MEM);
    assert_eq!(
        sampled(all, SYSTEM | EMPTY_CALLSTACK),
        all & !(KSTACK | USTACK)
    );
    assert_eq!(sampled(all, SYSTEM | ONLY_SYSTEM), SYS_MEM);
    assert_eq!(sampled(all, SYSTEM | THREAD_ONLY), THREAD_MASK);
    assert_eq!(sampled(all, SYSTEM | TASK_ONLY), TASK_MASK);
    // A request carries its flags: `sampled()` applies them to its action.
    let request = SampleRequest {
        action: 1,
        settings: Action {
            samplers: SYS_MEM | TH_INFO,
            ..Action::default()
        },
        flags: PEND_USER,
        timer: 0,
    };
    assert_eq!(request.sampled().samplers, TH_INFO);
}

#[test]
fn test_kick_every_0_schedules_no_kick_and_n_kicks_every_nth_period() {
    // Never: no deadline on any vCPU, and an expiry fires nothing.
    let mut k = one_timer(sampler::TH_INFO, MS);
    k.set_action_kick_every(1, 0).unwrap();
    assert_eq!(k.set_sampling(true, 0, 2).unwrap(), vec![None, None]);
    let (fires, next) = handled(k.expire(0, 10 * MS));
    assert!(fires.is_empty());
    assert_eq!(next, None);
    // Every 4th period: deadlines 4 ms apart, the fire still names the
    // timer's own period.
    let mut k = one_timer(sampler::TH_INFO, MS);
    k.set_action_kick_every(1, 4).unwrap();
    assert_eq!(k.set_sampling(true, 0, 1).unwrap(), vec![Some(4 * MS)]);
    let (fires, next) = handled(k.expire(0, 4 * MS + 1));
    assert_eq!(fires.len(), 1);
    assert_eq!(fires[0].period_ns, MS);
    assert_eq!(next, Some(8 * MS));
}

#[test]
fn test_kick_every_is_refused_while_started_and_reset_to_1() {
    let mut k = one_timer(sampler::TH_INFO, MS);
    assert_eq!(k.action_kick_every(1), Ok(1));
    k.set_sampling(true, 0, 1).unwrap();
    assert_eq!(k.set_action_kick_every(1, 0), Err(KperfError::Busy));
    k.set_sampling(false, 0, 1).unwrap();
    k.set_action_kick_every(1, 0).unwrap();
    assert_eq!(k.set_action_kick_every(2, 0), Err(KperfError::Inval));
    k.reset();
    k.set_action_count(1).unwrap();
    assert_eq!(k.action_kick_every(1), Ok(1));
}

#[test]
fn test_one_on_cpu_timer_steps_every_vcpu_on_one_grid() {
    let k = one_timer(sampler::TH_INFO, MS);
    assert_eq!(k.fixed_on_cpu_period(), None, "not started");
    let mut sim = Sim::new(k, 3, 7, 300 * US);
    assert_eq!(sim.kperf.fixed_on_cpu_period(), Some(MS));
    sim.idle(2);
    sim.run_until(20 * MS);
    sim.wake(2);
    sim.run_until(40 * MS);
    // Every deadline any vCPU was given lies on the grid of the first one.
    for seen in &sim.seen {
        assert_eq!((seen.fire.next_deadline - 7) % MS, 0, "{seen:?}");
    }
    sim.kperf.set_sampling(false, 40 * MS, 3).unwrap();
    assert_eq!(sim.kperf.fixed_on_cpu_period(), None, "stopped");

    // Two on-CPU timers: not periodic. A traditional PET timer beside one
    // on-CPU timer runs as its one-shot: the on-CPU timer is still periodic.
    let mut two = one_timer(sampler::TH_INFO, MS);
    two.set_timer_count(2).unwrap();
    two.set_timer_period(1, 3 * MS).unwrap();
    two.set_timer_action(1, 1).unwrap();
    two.set_sampling(true, 0, 1).unwrap();
    assert_eq!(two.fixed_on_cpu_period(), None);
    two.set_sampling(false, 0, 1).unwrap();
    two.set_pet_timer(1).unwrap();
    two.set_sampling(true, 0, 1).unwrap();
    assert_eq!(two.pet_deadline().map(|d| d > 0), Some(true));
    assert_eq!(two.fixed_on_cpu_period(), Some(MS));
}
