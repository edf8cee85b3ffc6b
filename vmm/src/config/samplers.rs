//! Sampler sets in the kperf configuration: [`Samplers`] (names or a number
//! in JSON) and which samplers this VM refuses ([`sampler_refusal`]).

use std::fmt;

use kperf::{sampler, SamplerListError};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::RefOr;

use crate::pmu::NoGuestPmu;

/// [`kperf::sampler`] bits. In JSON: a list of sampler names
/// (`["th_info", "ustack"]`), a comma-separated string of them, or a number;
/// each name or number as [`sampler::parse_list`] takes it. Written back as
/// the list of names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Samplers(pub u32);

impl Samplers {
    /// The names of the bits, in bit order; a bit without a name as hex.
    pub fn names(self) -> Vec<String> {
        let mut names: Vec<String> = sampler::NAMES
            .iter()
            .filter(|(_, bit)| self.0 & bit != 0)
            .map(|(name, _)| (*name).to_string())
            .collect();
        if self.0 & !sampler::ALL != 0 {
            names.push(format!("{:#x}", self.0 & !sampler::ALL));
        }
        names
    }
}

impl Serialize for Samplers {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.names().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Samplers {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SamplersVisitor)
    }
}

/// The OpenAPI schema: what [`Samplers`] reads (a list of names, a
/// comma-separated string of them, or a number); it writes the list.
impl utoipa::PartialSchema for Samplers {
    fn schema() -> RefOr<Schema> {
        let names = sampler::NAMES
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>();
        let list = ArrayBuilder::new()
            .items(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .description(Some(format!(
                        "A sampler name ({}), or a bit number",
                        names.join(", ")
                    ))),
            )
            .description(Some("Empty: no samplers, kperf's default for an action"));
        OneOfBuilder::new()
            .description(Some(
                "The samplers: a list of names (as written back), a comma-separated string of \
                 them, or the bits as a number (CFG-A-5)",
            ))
            .item(list)
            .item(ObjectBuilder::new().schema_type(Type::String))
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(1)),
            )
            .into()
    }
}

impl utoipa::ToSchema for Samplers {}

/// Reads [`Samplers`] from a number, a string or a list of strings.
struct SamplersVisitor;

/// A sampler list error as a JSON error, citing the sampler table (CFG-A-5).
fn sampler_error<E: de::Error>(error: SamplerListError) -> E {
    E::custom(format!("{error} (CFG-A-5)"))
}

impl<'de> Visitor<'de> for SamplersVisitor {
    type Value = Samplers;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("sampler names (a list like [\"th_info\", \"kstack\"]) or a sampler number")
    }

    fn visit_u64<E: de::Error>(self, bits: u64) -> Result<Samplers, E> {
        sampler::parse_list(&bits.to_string())
            .map(Samplers)
            .map_err(sampler_error)
    }

    fn visit_str<E: de::Error>(self, list: &str) -> Result<Samplers, E> {
        sampler::parse_list(list)
            .map(Samplers)
            .map_err(sampler_error)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Samplers, A::Error> {
        // An empty list is no samplers, kperf's default for an action: what
        // the configuration in force writes for an action left at its
        // defaults (`KperfConfig::from_engine`), so that it reads back.
        let mut bits = 0;
        while let Some(name) = seq.next_element::<String>()? {
            bits |= sampler::parse_list(&name).map_err(sampler_error)?;
        }
        Ok(Samplers(bits))
    }
}

/// Why `bit` ([`sampler`]) cannot be taken in this VM, or `None` if it can;
/// `pmu` is whether the host counts guest events ([`crate::pmu::probe`]).
///
/// - `th_dispatch` records the libdispatch queue a thread serves; the guest
///   kernel has no dispatch queues: always refused.
/// - The PMC samplers (`pmc_thread`, `pmc_cpu`, `pmc_config`, `th_inscyc`)
///   need a host PMU that counts guest events: refused without one (AMB-14:
///   refusing rather than logging zero counters, which would look measured).
pub fn sampler_refusal(bit: u32, pmu: Result<(), NoGuestPmu>) -> Option<String> {
    const PMC: u32 =
        sampler::PMC_THREAD | sampler::PMC_CPU | sampler::PMC_CONFIG | sampler::TH_INSCYC;
    if bit == sampler::TH_DISPATCH {
        return Some(
            "th_dispatch records the libdispatch queue a thread serves; the guest kernel has no \
             dispatch queues, so there is nothing to capture"
                .to_string(),
        );
    }
    match pmu {
        Err(why) if bit & PMC != 0 => Some(format!(
            "it needs a host PMU that counts guest events; this host has none ({why}) (AMB-14: \
             refused rather than logging zero counters)"
        )),
        _ => None,
    }
}
