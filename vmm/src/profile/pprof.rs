//! The pprof output of a [`Profile`]: a gzipped `perftools.profiles.Profile`
//! protocol buffer, encoded with `prost`, as `go tool pprof` reads it.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write;

use flate2::write::GzEncoder;
use flate2::Compression;
use prost::Message;

use super::write::{thread_root, FrameCache};
use super::{Profile, ProfileError, Symbolizer};

/// The file name recorded in the pprof mapping of the guest kernel image.
pub(super) const IMAGE_NAME: &str = "metronome-guest.elf";

impl Profile {
    /// Writes the profile as a gzipped `perftools.profiles.Profile`, as
    /// `go tool pprof` reads it.
    ///
    /// One sample type, `samples`/`count`; one location per distinct address
    /// (and lookup: leaf or return address) with a line per inlined frame,
    /// innermost first; samples' locations leaf first (the kernel stack, then
    /// the user stack), labelled with the string label `thread` and the
    /// numeric labels `vcpu` and `tid`. With a period
    /// ([`Profile::set_period_ns`]) the period type is `cpu`/`nanoseconds`.
    pub fn write_pprof(&self, out: impl Write) -> Result<(), ProfileError> {
        let bytes = self.pprof().encode_to_vec();
        let mut gz = GzEncoder::new(out, Compression::default());
        gz.write_all(&bytes)?;
        gz.finish()?.flush()?;
        Ok(())
    }

    /// The profile as a `perftools.profiles.Profile` message.
    fn pprof(&self) -> pb::Profile {
        let mut b = PprofBuilder::new(&self.symbolizer);
        let samples_type = b.value_type("samples", "count");
        b.profile.sample_type.push(samples_type);
        if let Some(period) = self.period_ns {
            b.profile.period_type = Some(b.value_type("cpu", "nanoseconds"));
            b.profile.period = i64::try_from(period).unwrap_or(i64::MAX);
        }
        for (key, weight) in self.weighted_stacks() {
            let mut location_id = Vec::with_capacity(key.kernel_stack.len() + key.user_stack.len());
            for (user, stack) in [(false, &key.kernel_stack), (true, &key.user_stack)] {
                for (i, &addr) in stack.iter().enumerate() {
                    location_id.push(b.location(addr, key.is_return_address(user, i)));
                }
            }
            let label = vec![
                pb::Label {
                    key: b.string("thread"),
                    str: b.string(&thread_root(key)),
                    ..Default::default()
                },
                // A unit on numeric labels: pprof drops a numeric label
                // whose value and unit are both 0, as vCPU 0's would be.
                pb::Label {
                    key: b.string("vcpu"),
                    num: i64::from(key.vcpu),
                    num_unit: b.string("vcpu"),
                    ..Default::default()
                },
                pb::Label {
                    key: b.string("tid"),
                    num: i64::try_from(key.tid).unwrap_or(i64::MAX),
                    num_unit: b.string("tid"),
                    ..Default::default()
                },
            ];
            b.profile.sample.push(pb::Sample {
                location_id,
                value: vec![i64::try_from(weight).unwrap_or(i64::MAX)],
                label,
            });
        }
        b.finish()
    }
}

/// Builds a pprof message: interns strings, functions and locations.
struct PprofBuilder<'a> {
    cache: FrameCache<'a>,
    profile: pb::Profile,
    strings: HashMap<String, i64>,
    functions: HashMap<(String, Option<String>), u64>,
    locations: HashMap<(u64, bool), u64>,
    /// The guest image's address range, mapped as mapping 1.
    image: Option<(u64, u64)>,
}

impl<'a> PprofBuilder<'a> {
    fn new(symbolizer: &'a Symbolizer) -> Self {
        let mut b = PprofBuilder {
            cache: FrameCache::new(symbolizer),
            profile: pb::Profile::default(),
            strings: HashMap::new(),
            functions: HashMap::new(),
            locations: HashMap::new(),
            image: symbolizer.image_range(),
        };
        // The string table starts with "".
        b.string("");
        if let Some((start, limit)) = b.image {
            let build_id = symbolizer
                .build_id()
                .map(|id| {
                    id.iter().fold(String::new(), |mut s, byte| {
                        // Cannot panic: writing to a String does not fail.
                        write!(s, "{byte:02x}").expect("writing to a String");
                        s
                    })
                })
                .unwrap_or_default();
            let mapping = pb::Mapping {
                id: 1,
                memory_start: start,
                memory_limit: limit,
                file_offset: 0,
                filename: b.string(IMAGE_NAME),
                build_id: b.string(&build_id),
                has_functions: true,
                has_filenames: true,
                has_line_numbers: true,
                has_inline_frames: true,
            };
            b.profile.mapping.push(mapping);
        }
        b
    }

    /// The index of `s` in the string table.
    fn string(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = i64::try_from(self.profile.string_table.len()).unwrap_or(i64::MAX);
        self.profile.string_table.push(s.to_owned());
        self.strings.insert(s.to_owned(), i);
        i
    }

    fn value_type(&mut self, ty: &str, unit: &str) -> pb::ValueType {
        pb::ValueType {
            r#type: self.string(ty),
            unit: self.string(unit),
        }
    }

    /// The id of the function `name` in `file`.
    fn function(&mut self, name: &str, file: Option<&str>) -> u64 {
        let key = (name.to_owned(), file.map(str::to_owned));
        if let Some(&id) = self.functions.get(&key) {
            return id;
        }
        let id = self.profile.function.len() as u64 + 1;
        let name = self.string(name);
        let filename = self.string(file.unwrap_or(""));
        self.profile.function.push(pb::Function {
            id,
            name,
            system_name: name,
            filename,
            start_line: 0,
        });
        self.functions.insert(key, id);
        id
    }

    /// The id of the location of `addr` (a return address or not).
    fn location(&mut self, addr: u64, is_return_address: bool) -> u64 {
        if let Some(&id) = self.locations.get(&(addr, is_return_address)) {
            return id;
        }
        let id = self.profile.location.len() as u64 + 1;
        let frames = self.cache.get(addr, is_return_address).to_vec();
        let line = frames
            .iter()
            .map(|f| pb::Line {
                function_id: self.function(&f.function, f.file.as_deref()),
                line: f.line.map_or(0, i64::from),
                column: 0,
            })
            .collect();
        let mapping_id = match self.image {
            Some((start, limit)) if (start..limit).contains(&addr) => 1,
            _ => 0,
        };
        self.profile.location.push(pb::Location {
            id,
            mapping_id,
            address: addr,
            line,
            is_folded: false,
        });
        self.locations.insert((addr, is_return_address), id);
        id
    }

    fn finish(self) -> pb::Profile {
        self.profile
    }
}

/// `perftools.profiles` messages (github.com/google/pprof, `proto/profile.proto`),
/// derived by hand for `prost`.
pub(crate) mod pb {
    /// `perftools.profiles.Profile`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(crate) struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "3")]
        pub mapping: Vec<Mapping>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "7")]
        pub drop_frames: i64,
        #[prost(int64, tag = "8")]
        pub keep_frames: i64,
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        #[prost(message, optional, tag = "11")]
        pub period_type: Option<ValueType>,
        #[prost(int64, tag = "12")]
        pub period: i64,
        #[prost(int64, repeated, tag = "13")]
        pub comment: Vec<i64>,
        #[prost(int64, tag = "14")]
        pub default_sample_type: i64,
    }

    /// `perftools.profiles.ValueType`.
    #[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
    pub(crate) struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    /// `perftools.profiles.Sample`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(crate) struct Sample {
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
        #[prost(message, repeated, tag = "3")]
        pub label: Vec<Label>,
    }

    /// `perftools.profiles.Label`.
    #[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
    pub(crate) struct Label {
        #[prost(int64, tag = "1")]
        pub key: i64,
        #[prost(int64, tag = "2")]
        pub str: i64,
        #[prost(int64, tag = "3")]
        pub num: i64,
        #[prost(int64, tag = "4")]
        pub num_unit: i64,
    }

    /// `perftools.profiles.Mapping`.
    #[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
    pub(crate) struct Mapping {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub memory_start: u64,
        #[prost(uint64, tag = "3")]
        pub memory_limit: u64,
        #[prost(uint64, tag = "4")]
        pub file_offset: u64,
        #[prost(int64, tag = "5")]
        pub filename: i64,
        #[prost(int64, tag = "6")]
        pub build_id: i64,
        #[prost(bool, tag = "7")]
        pub has_functions: bool,
        #[prost(bool, tag = "8")]
        pub has_filenames: bool,
        #[prost(bool, tag = "9")]
        pub has_line_numbers: bool,
        #[prost(bool, tag = "10")]
        pub has_inline_frames: bool,
    }

    /// `perftools.profiles.Location`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(crate) struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub mapping_id: u64,
        #[prost(uint64, tag = "3")]
        pub address: u64,
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
        #[prost(bool, tag = "5")]
        pub is_folded: bool,
    }

    /// `perftools.profiles.Line`.
    #[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
    pub(crate) struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        #[prost(int64, tag = "2")]
        pub line: i64,
        #[prost(int64, tag = "3")]
        pub column: i64,
    }

    /// `perftools.profiles.Function`.
    #[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
    pub(crate) struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
        #[prost(int64, tag = "4")]
        pub filename: i64,
        #[prost(int64, tag = "5")]
        pub start_line: i64,
    }
}
