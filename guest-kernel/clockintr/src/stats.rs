//! What dispatches report: per-CPU statistics and per-dispatch instrumentation.

/// The per-CPU statistics (`struct clockintr_stat`, TR-C-1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Total ns spent dispatching.
    pub dispatched: u64,
    /// Dispatches that arrived before the first expiration.
    pub early: u64,
    /// Total ns by which they were early.
    pub earliness: u64,
    /// Total ns by which prompt dispatches were late.
    pub lateness: u64,
    /// Dispatches that ran at least one event.
    pub prompt: u64,
    /// Event callbacks run (not hardclock() calls; 7.3).
    pub run: u64,
    /// Dispatches with nothing scheduled.
    pub spurious: u64,
}

impl Stats {
    /// Field-wise sum, spurious included (as OpenBSD 7.4; 7.3 reports 0 there: AMB-5).
    pub fn add(&mut self, other: &Self) {
        self.dispatched += other.dispatched;
        self.early += other.early;
        self.earliness += other.earliness;
        self.lateness += other.lateness;
        self.prompt += other.prompt;
        self.run += other.run;
        self.spurious += other.spurious;
    }
}

/// Calls per dispatch, per callback kind, for instrumentation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Calls {
    /// hardclock() calls.
    pub hardclock: u64,
    /// statclock() calls.
    pub statclock: u64,
    /// schedclock() calls.
    pub schedclock: u64,
}

/// What one dispatch did, beyond its return value (instrumentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DispatchReport {
    /// The dispatch's outcome.
    pub outcome: Outcome,
    /// Calls made.
    pub calls: Calls,
    /// The cached uptime at entry.
    pub start: u64,
    /// The last cached uptime.
    pub end: u64,
    /// The rearm requested, if any.
    pub rearm: Option<u64>,
}

/// Which of the three statistics a dispatch counted in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Outcome {
    /// At least one callback ran.
    Prompt,
    /// Too early: nothing ran, rearmed for the remaining time.
    Early,
    /// Nothing scheduled.
    #[default]
    Spurious,
}
