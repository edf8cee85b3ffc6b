//! The output formats of a [`Profile`]: folded stacks and an SVG flame graph
//! (pprof is in [`super::pprof`]), and writing all three files.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use inferno::flamegraph::color::MultiPalette;
use inferno::flamegraph::{self, Palette};

use super::{Frame, Profile, ProfileError, StackKey, Symbolizer};

/// The folded-stacks file [`Profile::write_all`] writes.
pub const FOLDED_FILE: &str = "profile.folded";
/// The SVG flame graph file [`Profile::write_all`] writes.
pub const SVG_FILE: &str = "profile.svg";
/// The gzipped pprof file [`Profile::write_all`] writes.
pub const PPROF_FILE: &str = "profile.pb.gz";
/// The title of the SVG flame graph.
pub const SVG_TITLE: &str = "Metronome guest profile";

/// The suffix of kernel frames in folded stacks, as `perf script` and
/// `stackcollapse-perf.pl --kernel` write it.
const KERNEL_SUFFIX: &str = "_[k]";

/// Symbolizes each (address, is return address) once.
pub(super) struct FrameCache<'a> {
    symbolizer: &'a Symbolizer,
    frames: HashMap<(u64, bool), Vec<Frame>>,
}

impl<'a> FrameCache<'a> {
    pub(super) fn new(symbolizer: &'a Symbolizer) -> Self {
        FrameCache {
            symbolizer,
            frames: HashMap::new(),
        }
    }

    /// The frames at `addr`, innermost first.
    pub(super) fn get(&mut self, addr: u64, is_return_address: bool) -> &[Frame] {
        let symbolizer = self.symbolizer;
        self.frames
            .entry((addr, is_return_address))
            .or_insert_with(|| symbolizer.frames(addr, is_return_address))
    }
}

/// Appends `name` to a folded stack, with the characters that would break
/// the format (the frame separator `;` and line breaks) replaced.
fn push_frame(stack: &mut String, name: &str, suffix: &str) {
    if !stack.is_empty() {
        stack.push(';');
    }
    if name.is_empty() {
        stack.push_str("[unknown]");
    } else {
        stack.extend(name.chars().map(|c| match c {
            ';' => ',',
            '\n' | '\r' => ' ',
            c => c,
        }));
    }
    stack.push_str(suffix);
}

/// The root frame of a sample: its thread's name, or its id if unnamed.
pub(super) fn thread_root(key: &StackKey) -> String {
    if key.thread_name.is_empty() {
        format!("[tid {}]", key.tid)
    } else {
        key.thread_name.clone()
    }
}

impl Profile {
    /// The profile in Brendan Gregg's folded format: one line per distinct
    /// stack, `<thread name>;<outer fn>;…;<leaf fn> <count>`, sorted by stack.
    ///
    /// The root is the thread name, then the user stack's frames outermost
    /// first, then the kernel stack's frames outermost first, each suffixed
    /// `_[k]` as `perf` does. Inlined functions are frames of their own.
    /// A `;` in a name is written as `,`.
    pub fn folded(&self) -> String {
        let mut cache = FrameCache::new(&self.symbolizer);
        let mut lines: BTreeMap<String, u64> = BTreeMap::new();
        for (key, weight) in self.weighted_stacks() {
            let mut stack = String::new();
            push_frame(&mut stack, &thread_root(key), "");
            for (user, stack_addrs, suffix) in [
                (true, &key.user_stack, ""),
                (false, &key.kernel_stack, KERNEL_SUFFIX),
            ] {
                for (i, &addr) in stack_addrs.iter().enumerate().rev() {
                    for frame in cache.get(addr, key.is_return_address(user, i)).iter().rev() {
                        push_frame(&mut stack, &frame.function, suffix);
                    }
                }
            }
            let count = lines.entry(stack).or_insert(0);
            *count = count.saturating_add(weight);
        }
        let mut out = String::new();
        for (stack, count) in lines {
            // Cannot panic: writing to a String does not fail.
            writeln!(out, "{stack} {count}").expect("writing to a String");
        }
        out
    }

    /// Writes an SVG flame graph of [`Profile::folded`], drawn by `inferno`,
    /// titled [`SVG_TITLE`]; kernel frames are orange.
    ///
    /// Fails with [`ProfileError::Empty`], writing nothing, if the profile has
    /// no samples.
    pub fn write_svg(&self, out: impl Write) -> Result<(), ProfileError> {
        let folded = self.folded();
        if folded.is_empty() {
            return Err(ProfileError::Empty);
        }
        let mut options = flamegraph::Options::default();
        options.title = SVG_TITLE.to_owned();
        // Colors from names, so that a profile always draws the same.
        options.hash = true;
        // Orange for `_[k]`, yellow for `::` paths, as `--colors java`.
        options.colors = Palette::Multi(MultiPalette::Java);
        flamegraph::from_lines(&mut options, folded.lines(), out)?;
        Ok(())
    }

    /// Writes [`FOLDED_FILE`], [`SVG_FILE`] and [`PPROF_FILE`] into `dir`,
    /// creating it if need be.
    ///
    /// Fails with [`ProfileError::Empty`], writing nothing, if the profile has
    /// no samples.
    pub fn write_all(&self, dir: &Path) -> Result<(), ProfileError> {
        self.write_files(dir, "profile").map(drop)
    }

    /// Writes `<stem>.folded`, `<stem>.svg` and `<stem>.pb.gz` into `dir`
    /// (creating it if need be) and returns their paths; as
    /// [`Profile::write_all`] otherwise.
    pub fn write_files(&self, dir: &Path, stem: &str) -> Result<[PathBuf; 3], ProfileError> {
        if self.weighted_stacks().next().is_none() {
            return Err(ProfileError::Empty);
        }
        fs::create_dir_all(dir).map_err(|source| ProfileError::File {
            path: dir.to_owned(),
            source,
        })?;
        let files = ["folded", "svg", "pb.gz"].map(|ext| dir.join(format!("{stem}.{ext}")));
        write_file(&files[0], |w| {
            w.write_all(self.folded().as_bytes())?;
            Ok(())
        })?;
        write_file(&files[1], |w| self.write_svg(w))?;
        write_file(&files[2], |w| self.write_pprof(w))?;
        Ok(files)
    }
}

/// Writes `path` with `write`, whole or not at all
/// ([`crate::outfile::write_atomically`]), naming `path` in any error.
fn write_file(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> Result<(), ProfileError>,
) -> Result<(), ProfileError> {
    crate::outfile::write_atomically(path, |w| match write(w) {
        Err(ProfileError::Io(source)) => Err(ProfileError::File {
            path: path.to_owned(),
            source,
        }),
        other => other,
    })
}

impl From<crate::outfile::OutFileError> for ProfileError {
    fn from(e: crate::outfile::OutFileError) -> Self {
        Self::File {
            path: e.path,
            source: e.source,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use flate2::read::GzDecoder;

    use prost::Message;

    use super::*;
    use crate::profile::pprof::{pb, IMAGE_NAME};
    use crate::profile::{Sample, FOLDED_FRAME, FOLDED_STACK};

    fn profile() -> Profile {
        let symbolizer =
            Symbolizer::new(metronome_resources::GUEST_KERNEL).expect("the guest kernel parses");
        Profile::new(symbolizer)
    }

    fn sample(thread: &str, user: &[u64], kernel: &[u64], weight: u64) -> Sample {
        Sample {
            vcpu: 1,
            tid: 7,
            thread_name: thread.into(),
            user_stack: user.to_vec(),
            kernel_stack: kernel.to_vec(),
            user_leaf_after_trap: false,
            weight,
        }
    }

    /// The address of the kernel function whose demangled name ends `::suffix`.
    fn function(p: &Profile, suffix: &str) -> u64 {
        let symbolizer = p.symbolizer();
        let (lo, hi) = symbolizer.image_range().expect("the kernel has segments");
        (lo..hi)
            .find(|&a| {
                symbolizer
                    .function_name(a)
                    .is_some_and(|n| n.ends_with(&format!("::{suffix}")))
            })
            .unwrap_or_else(|| panic!("no ::{suffix} in the guest kernel"))
    }

    fn decode(p: &Profile) -> pb::Profile {
        let mut gz = Vec::new();
        p.write_pprof(&mut gz).expect("writes to a Vec");
        assert_eq!(&gz[..2], &[0x1f, 0x8b], "gzip magic");
        let mut raw = Vec::new();
        GzDecoder::new(&gz[..])
            .read_to_end(&mut raw)
            .expect("valid gzip");
        pb::Profile::decode(&raw[..]).expect("valid profile.proto")
    }

    #[test]
    fn test_folded_aggregates_and_sorts() {
        let mut p = profile();
        // Unknown addresses: frames named by address, deterministic.
        p.add(&sample("b/0", &[0x30, 0x20, 0x10], &[], 1));
        p.add(&sample("b/0", &[0x30, 0x20, 0x10], &[], 2));
        p.add(&sample("a/1", &[0x40], &[0x60, 0x50], 1));
        p.add(&sample("a/1", &[0x40], &[], 4));
        // The same folded stack from another vCPU is merged in the folded
        // output.
        p.add(&Sample {
            vcpu: 3,
            ..sample("a/1", &[0x40], &[], 1)
        });
        p.add(&sample("zero", &[0x40], &[], 0));
        assert_eq!(p.sample_count(), 6);
        assert_eq!(p.total_weight(), 9);
        assert_eq!(
            p.folded(),
            "a/1;0x40 5\n\
             a/1;0x40;0x50_[k];0x60_[k] 1\n\
             b/0;0x10;0x20;0x30 3\n"
        );
    }

    #[test]
    fn test_folded_names_kernel_functions() {
        let mut p = profile();
        let spinner = function(&p, "spinner");
        let work = function(&p, "work");
        // A leaf in `work`, called from `spinner` (the return address is
        // looked up one byte back).
        p.add(&sample("spinner/0", &[work, spinner + 1], &[], 2));
        p.add(&sample("", &[], &[work], 1));
        assert_eq!(
            p.folded(),
            "[tid 7];metronome_guest::workloads::work_[k] 1\n\
             spinner/0;metronome_guest::workloads::spinner;metronome_guest::workloads::work 2\n"
        );
    }

    #[test]
    fn test_a_folded_sample_is_its_thread_under_stack_table_full() {
        let mut p = profile();
        p.add(&sample("w/0", &[FOLDED_STACK], &[], 3));
        assert_eq!(p.folded(), "w/0;[stack table full] 3\n");
        let pb = decode(&p);
        let names: Vec<&str> = pb
            .function
            .iter()
            .map(|f| pb.string_table[f.name as usize].as_str())
            .collect();
        assert_eq!(names, [FOLDED_FRAME]);
    }

    #[test]
    fn test_push_frame_escapes_separators() {
        let mut s = String::new();
        push_frame(&mut s, "t", "");
        push_frame(&mut s, "<[u8; 4] as X>::f\n", "_[k]");
        push_frame(&mut s, "", "");
        assert_eq!(s, "t;<[u8, 4] as X>::f _[k];[unknown]");
    }

    #[test]
    fn test_empty_profile() {
        let p = profile();
        assert_eq!(p.folded(), "");
        assert!(matches!(p.write_svg(Vec::new()), Err(ProfileError::Empty)));
        let dir =
            std::env::temp_dir().join(format!("metronome-profile-empty-{}", std::process::id()));
        assert!(matches!(p.write_all(&dir), Err(ProfileError::Empty)));
        assert!(!dir.exists());
        // An empty pprof profile is still valid.
        let decoded = decode(&p);
        assert!(decoded.sample.is_empty());
        assert_eq!(decoded.string_table[0], "");
    }

    #[test]
    fn test_svg_has_title_and_frames() {
        let mut p = profile();
        let spinner = function(&p, "spinner");
        p.add(&sample("spinner/0", &[spinner], &[0x10], 3));
        let mut svg = Vec::new();
        p.write_svg(&mut svg).expect("draws");
        let svg = String::from_utf8(svg).expect("UTF-8");
        assert!(svg.starts_with("<?xml"), "{svg:.100}");
        assert!(svg.contains(SVG_TITLE));
        assert!(svg.contains("metronome_guest::workloads::spinner"));
        // inferno draws kernel frames without their `_[k]` annotation.
        assert!(svg.contains("<title>0x10 (3 samples"), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn test_pprof_round_trip() {
        let mut p = profile();
        p.set_period_ns(1_000_000);
        let spinner = function(&p, "spinner");
        let work = function(&p, "work");
        p.add(&sample("spinner/0", &[work, spinner + 1], &[], 2));
        p.add(&sample("spinner/0", &[work, spinner + 1], &[], 1));
        p.add(&Sample {
            vcpu: 2,
            tid: 9,
            ..sample("sleeper/2", &[spinner + 1], &[0x10], 1)
        });
        let d = decode(&p);
        let s = |i: i64| d.string_table[usize::try_from(i).expect("index")].as_str();

        assert_eq!(d.string_table[0], "");
        let mut unique = d.string_table.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), d.string_table.len(), "strings are interned");

        assert_eq!(d.sample_type.len(), 1);
        assert_eq!(s(d.sample_type[0].r#type), "samples");
        assert_eq!(s(d.sample_type[0].unit), "count");
        let period_type = d.period_type.expect("a period was set");
        assert_eq!(
            (s(period_type.r#type), s(period_type.unit)),
            ("cpu", "nanoseconds")
        );
        assert_eq!(d.period, 1_000_000);

        assert_eq!(d.mapping.len(), 1);
        assert_eq!(s(d.mapping[0].filename), IMAGE_NAME);
        assert!(d.mapping[0].has_functions && d.mapping[0].has_line_numbers);

        // Locations: `work` (leaf), `spinner + 1` as a return address and as
        // a leaf, and 0x10 (unknown, unmapped).
        assert_eq!(d.location.len(), 4);
        for (i, l) in d.location.iter().enumerate() {
            assert_eq!(l.id, i as u64 + 1);
            assert!(!l.line.is_empty());
        }
        let by_id = |id: u64| &d.location[usize::try_from(id - 1).expect("id")];
        let outer_fn = |id: u64| {
            let line = by_id(id).line.last().expect("a line");
            let f = &d.function[usize::try_from(line.function_id - 1).expect("id")];
            assert_eq!(f.name, f.system_name);
            (s(f.name), s(f.filename), line.line)
        };

        assert_eq!(d.sample.len(), 2);
        let (first, second) = (&d.sample[0], &d.sample[1]);
        // Samples come in (thread name, ...) order: "sleeper/2" first.
        assert_eq!(first.value, vec![1]);
        assert_eq!(first.location_id.len(), 2);
        assert_eq!(outer_fn(first.location_id[0]).0, "0x10");
        assert_eq!(by_id(first.location_id[0]).mapping_id, 0);
        assert_eq!(by_id(first.location_id[0]).address, 0x10);
        let (name, file, line) = outer_fn(first.location_id[1]);
        assert_eq!(name, "metronome_guest::workloads::spinner");
        assert!(file.ends_with(".rs"), "{file}");
        assert!(line > 0);
        assert_eq!(by_id(first.location_id[1]).mapping_id, 1);
        let labels: Vec<_> = first
            .label
            .iter()
            .map(|l| (s(l.key), s(l.str), l.num, s(l.num_unit)))
            .collect();
        assert_eq!(
            labels,
            vec![
                ("thread", "sleeper/2", 0, ""),
                ("vcpu", "", 2, "vcpu"),
                ("tid", "", 9, "tid")
            ]
        );

        // Identical samples are aggregated.
        assert_eq!(second.value, vec![3]);
        assert_eq!(second.location_id.len(), 2);
        assert_eq!(
            outer_fn(second.location_id[0]).0,
            "metronome_guest::workloads::work"
        );
        assert_eq!(by_id(second.location_id[0]).address, work);
        assert_eq!(
            outer_fn(second.location_id[1]).0,
            "metronome_guest::workloads::spinner"
        );
        assert_eq!(by_id(second.location_id[1]).address, spinner + 1);
        assert_ne!(
            second.location_id[1], first.location_id[1],
            "leaf and return lookups differ"
        );
        assert_eq!(s(second.label[0].str), "spinner/0");
    }

    #[test]
    fn test_write_all_writes_three_files() {
        let mut p = profile();
        p.add(&sample("t", &[function(&p, "sleeper")], &[], 1));
        let dir =
            std::env::temp_dir().join(format!("metronome-profile-unit-{}", std::process::id()));
        p.write_all(&dir).expect("writes");
        let folded = fs::read_to_string(dir.join(FOLDED_FILE)).expect("folded");
        assert_eq!(folded, "t;metronome_guest::workloads::sleeper 1\n");
        assert!(fs::metadata(dir.join(SVG_FILE)).expect("svg").len() > 0);
        assert!(fs::metadata(dir.join(PPROF_FILE)).expect("pprof").len() > 0);
        fs::remove_dir_all(&dir).expect("cleans up");
    }

    #[test]
    fn test_write_all_names_the_failing_path() {
        let mut p = profile();
        p.add(&sample("t", &[0x10], &[], 1));
        let err = p
            .write_all(Path::new("/proc/self/metronome-no-such-dir"))
            .expect_err("cannot create a directory in /proc");
        assert!(
            matches!(&err, ProfileError::File { path, .. } if path.ends_with("metronome-no-such-dir")),
            "{err:?}"
        );
    }
}
