//! `clockintr_dispatch`: run every expired event, rearm once, count the
//! dispatch in the statistics.

use super::ClockQueue;
use crate::{
    Calls, ClockIntr, DispatchReport, Error, EventKind, IntervalSink, IntrClock, Machine, Outcome,
};

impl<I: IntrClock> ClockQueue<I> {
    /// `clockintr_dispatch(frame)` (CI-D-1..7, CI-EV-1..4). Returns whether any
    /// callback ran, and a report of what happened.
    pub fn dispatch<M: Machine>(
        &mut self,
        global: &ClockIntr,
        machine: &mut M,
        sink: &mut dyn IntervalSink,
    ) -> Result<DispatchReport, Error> {
        if self.dispatching {
            return Err(Error::RecursiveDispatch);
        }
        self.dispatching = true;
        let result = self.dispatch_locked(global, machine, sink);
        self.dispatching = false;
        result
    }

    fn dispatch_locked<M: Machine>(
        &mut self,
        global: &ClockIntr,
        machine: &mut M,
        sink: &mut dyn IntervalSink,
    ) -> Result<DispatchReport, Error> {
        if !machine.at_clock_ipl() {
            return Err(Error::NotAtClockIpl);
        }
        if !self.initialized {
            return Err(Error::CpuNotInitialized);
        }
        let start = machine.nsecuptime();
        self.uptime = start;
        let mut report = DispatchReport {
            start,
            ..Default::default()
        };
        let mut run = 0u64;
        let mut lateness = 0;
        if let Some(head) = self.head() {
            if self.uptime >= head.expiration {
                lateness = start - head.expiration;
                while let Some(head) = self.head() {
                    if self.uptime < head.expiration {
                        // Double-check the time before giving up.
                        self.uptime = machine.nsecuptime();
                        if self.uptime < head.expiration {
                            break;
                        }
                    }
                    let slot = self.pend[0];
                    self.unlink(slot);
                    self.running = Some(head.kind);
                    self.run_event(slot, global, machine, sink, &mut report.calls);
                    self.running = None;
                    run += 1;
                }
            }
            // Rearm once if the CPU has an intrclock and events remain (CI-D-5).
            if let (Some(head), Some(ic)) = (self.head(), self.intrclock.as_mut()) {
                let nsecs = head.expiration - self.uptime;
                ic.rearm(nsecs);
                report.rearm = Some(nsecs);
            }
        }
        // Statistics, published under a generation number (CI-D-7).
        let ogen = self.gen;
        self.gen = 0;
        self.stats.dispatched += self.uptime - start;
        if run > 0 {
            self.stats.lateness += lateness;
            self.stats.prompt += 1;
            self.stats.run += run;
            report.outcome = Outcome::Prompt;
        } else if let Some(head) = self.head() {
            self.stats.early += 1;
            self.stats.earliness += head.expiration - self.uptime;
            report.outcome = Outcome::Early;
        } else {
            self.stats.spurious += 1;
            report.outcome = Outcome::Spurious;
        }
        self.gen = ogen.wrapping_add(1).max(1);
        report.end = self.uptime;
        Ok(report)
    }

    fn run_event<M: Machine>(
        &mut self,
        slot: usize,
        global: &ClockIntr,
        machine: &mut M,
        sink: &mut dyn IntervalSink,
        calls: &mut Calls,
    ) {
        let Some(event) = self.events[slot] else {
            return;
        };
        match event.kind {
            EventKind::Hardclock => {
                let count = self.advance(slot, global.hardclock_period());
                for _ in 0..count {
                    machine.hardclock();
                }
                calls.hardclock += count;
            }
            EventKind::Statclock => {
                let count = if global.randomized() {
                    let var = global.active_statvar();
                    let mut expiration = event.expiration;
                    let mut count = 0;
                    while expiration <= self.uptime {
                        let off = loop {
                            let off = self.rng.next() & var.mask;
                            if off != 0 {
                                break off;
                            }
                        };
                        let interval = u64::from(var.min) + u64::from(off);
                        sink.interval(interval);
                        expiration += interval;
                        count += 1;
                    }
                    self.schedule(slot, expiration);
                    count
                } else {
                    self.advance(slot, u64::from(global.active_statvar().avg))
                };
                for _ in 0..count {
                    machine.statclock();
                }
                calls.statclock += count;
            }
            EventKind::Schedclock => {
                let count = self.advance(slot, global.schedclock_period());
                if machine.has_curproc() {
                    for _ in 0..count {
                        machine.schedclock();
                    }
                    calls.schedclock += count;
                }
            }
        }
    }
}
