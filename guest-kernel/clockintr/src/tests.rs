//! Unit tests, named after the spec statements they check (SEED-SPEC section 2, 6.3).

use super::*;
use std::vec::Vec;

#[test]
fn test_ci_init_1_hardclock_period() {
    let g = ClockIntr::new();
    g.init(&Config { hz: 1024, ..Config::openbsd_amd64() }, true).unwrap_err();
}
