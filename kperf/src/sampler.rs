//! Sampler bits of an action (`SAMPLER_*` of `action.h`, CFG-A-5), their
//! names, and the parser of a sampler list ([`parse_list`]).
//!
//! ```
//! use kperf::sampler;
//!
//! let bits = sampler::parse_list("th_info,USTACK,kstack").unwrap();
//! assert_eq!(bits, sampler::TH_INFO | sampler::USTACK | sampler::KSTACK);
//! assert_eq!(sampler::parse_list("0xc"), Ok(sampler::KSTACK | sampler::USTACK));
//! assert!(sampler::parse_list("kstack,bogus").is_err());
//! ```

/// Thread info: pid, tid, dispatch queue, run mode.
pub const TH_INFO: u32 = 1 << 0;
/// Thread snapshot.
pub const TH_SNAPSHOT: u32 = 1 << 1;
/// Kernel call stack.
pub const KSTACK: u32 = 1 << 2;
/// User call stack.
pub const USTACK: u32 = 1 << 3;
/// Per-thread PMC counters.
pub const PMC_THREAD: u32 = 1 << 4;
/// Per-CPU PMC counters; exclusive with [`PMC_THREAD`].
pub const PMC_CPU: u32 = 1 << 5;
/// PMC configuration.
pub const PMC_CONFIG: u32 = 1 << 6;
/// Task memory info.
pub const MEMINFO: u32 = 1 << 7;
/// Thread scheduling info.
pub const TH_SCHEDULING: u32 = 1 << 8;
/// Thread dispatch-queue info.
pub const TH_DISPATCH: u32 = 1 << 9;
/// Task snapshot.
pub const TK_SNAPSHOT: u32 = 1 << 10;
/// System memory: the only "system" sampler.
pub const SYS_MEM: u32 = 1 << 11;
/// Thread instructions and cycles.
pub const TH_INSCYC: u32 = 1 << 12;
/// Task info.
pub const TK_INFO: u32 = 1 << 13;

/// The samplers that describe a task.
pub const TASK_MASK: u32 = MEMINFO | TK_SNAPSHOT | TK_INFO;
/// The samplers that describe a thread.
pub const THREAD_MASK: u32 =
    TH_INFO | TH_SNAPSHOT | KSTACK | USTACK | PMC_THREAD | TH_SCHEDULING | TH_DISPATCH | TH_INSCYC;
/// The samplers that describe the whole system.
pub const SYSTEM_MASK: u32 = SYS_MEM;

/// Every sampler by name, in bit order: the `SAMPLER_*` suffix of
/// `action.h` in lower case (`th_info` is [`TH_INFO`]).
pub const NAMES: [(&str, u32); 14] = [
    ("th_info", TH_INFO),
    ("th_snapshot", TH_SNAPSHOT),
    ("kstack", KSTACK),
    ("ustack", USTACK),
    ("pmc_thread", PMC_THREAD),
    ("pmc_cpu", PMC_CPU),
    ("pmc_config", PMC_CONFIG),
    ("meminfo", MEMINFO),
    ("th_scheduling", TH_SCHEDULING),
    ("th_dispatch", TH_DISPATCH),
    ("tk_snapshot", TK_SNAPSHOT),
    ("sys_mem", SYS_MEM),
    ("th_inscyc", TH_INSCYC),
    ("tk_info", TK_INFO),
];

/// Every known sampler bit: the union of [`NAMES`].
pub const ALL: u32 = {
    let mut all = 0;
    let mut i = 0;
    while i < NAMES.len() {
        all |= NAMES[i].1;
        i += 1;
    }
    all
};

/// A sampler list [`parse_list`] refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SamplerListError {
    /// A name that is not in [`NAMES`].
    #[error("unknown sampler '{0}': allowed are {names}", names = allowed_names())]
    UnknownName(String),
    /// A list that looks like a number but does not parse as a `u32`.
    #[error("'{0}' is not a sampler number: expected decimal or 0x hex")]
    BadNumber(String),
    /// No sampler at all, or bits outside [`ALL`].
    #[error("sampler bits {0:#x} are not a non-empty subset of {ALL:#x}")]
    BadBits(u32),
}

/// The names of [`NAMES`], comma-separated.
fn allowed_names() -> String {
    NAMES.map(|(name, _)| name).join(", ")
}

/// Parses a sampler list into sampler bits: comma-separated names of
/// [`NAMES`], case-insensitive (`th_info,ustack,kstack`), or one number,
/// decimal or `0x` hex (`0xc`). Blanks around the list and each name are
/// ignored.
///
/// # Errors
///
/// - [`SamplerListError::UnknownName`]: a name not in [`NAMES`] (the message
///   lists every allowed name);
/// - [`SamplerListError::BadNumber`]: all digits, or `0x` and then anything,
///   that is not a `u32`;
/// - [`SamplerListError::BadBits`]: no sampler (`0`), or bits outside
///   [`ALL`].
pub fn parse_list(list: &str) -> Result<u32, SamplerListError> {
    let list = list.trim();
    let number = list
        .strip_prefix("0x")
        .map(|hex| u32::from_str_radix(hex, 16))
        .or_else(|| {
            list.chars()
                .all(|c| c.is_ascii_digit())
                .then(|| list.parse())
        });
    let bits = match number {
        Some(Ok(bits)) => bits,
        Some(Err(_)) => return Err(SamplerListError::BadNumber(list.to_owned())),
        None => {
            let mut bits = 0;
            for name in list.split(',').map(str::trim) {
                let Some((_, bit)) = NAMES.iter().find(|(n, _)| n.eq_ignore_ascii_case(name))
                else {
                    return Err(SamplerListError::UnknownName(name.to_owned()));
                };
                bits |= bit;
            }
            bits
        }
    };
    if bits == 0 || bits & !ALL != 0 {
        return Err(SamplerListError::BadBits(bits));
    }
    Ok(bits)
}
