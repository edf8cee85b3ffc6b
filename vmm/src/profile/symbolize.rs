//! Guest address to function, file and line, from the guest kernel ELF.
//!
//! Function names come from the ELF symbol table (the full, demangled Rust
//! path of the function containing the address) and, for frames inlined into
//! it, from the DWARF inline records (`debug = "line-tables-only"` keeps those,
//! with the inlined function's short name). Files and lines come from the
//! DWARF line tables.
//!
//! Every address in a code section has a name: where no function symbol
//! covers it (an assembly label without `.type`/`.size`, padding between
//! functions), it takes the nearest preceding symbol of any type in its
//! section, or the section's name before the first one.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use gimli::{EndianArcSlice, RunTimeEndian};
use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, SectionKind, SymbolKind};

use super::ProfileError;

/// The DWARF reader: section data owned by the [`Symbolizer`].
type Reader = EndianArcSlice<RunTimeEndian>;

/// One source-level frame at a guest address.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frame {
    /// The function, demangled and without a trailing `::h<hash>`; `0x…` (the
    /// address in hex) when the address is in no known function.
    pub function: String,
    /// The source file, when the line tables cover the address.
    pub file: Option<String>,
    /// The source line, when the line tables cover the address.
    pub line: Option<u32>,
    /// The address that was looked up, as given (a return address is given
    /// unchanged here, though it is resolved at `addr - 1`).
    pub addr: u64,
}

/// A function symbol from the ELF symbol table: `[start, end)`, demangled.
#[derive(Debug)]
struct FunctionSymbol {
    start: u64,
    end: u64,
    name: String,
}

/// Resolves guest addresses in one ELF image to frames.
///
/// It is `Send` but not `Sync`: DWARF units are parsed lazily, on first
/// lookup, behind unsynchronized cells.
pub struct Symbolizer {
    /// Function symbols sorted by start address.
    symbols: Vec<FunctionSymbol>,
    /// The fallback names in the code sections, sorted by start address: every
    /// symbol there, whatever its type, and each section's start; each ends
    /// where its section ends (see [`Symbolizer::label`]).
    labels: Vec<FunctionSymbol>,
    /// The DWARF lookup context (empty if the image has no debug information).
    dwarf: addr2line::Context<Reader>,
    /// The address ranges of the image's code sections, sorted: DWARF is only
    /// consulted there, for the linker leaves the debug information of the
    /// functions it discarded in place, at address 0.
    code: Vec<(u64, u64)>,
    /// The lowest and highest-plus-one addresses of the image's loadable
    /// segments, if it has any.
    image: Option<(u64, u64)>,
    /// The image's GNU build id, if it has one.
    build_id: Option<Vec<u8>>,
}

impl fmt::Debug for Symbolizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Symbolizer")
            .field("symbols", &self.symbols.len())
            .field("image", &self.image)
            .field("build_id", &self.build_id)
            .finish_non_exhaustive()
    }
}

impl Symbolizer {
    /// Reads the symbol table and DWARF debug information of the ELF image
    /// `elf` (a copy of what is needed is kept; `elf` may be dropped).
    ///
    /// An image without symbols or debug information is accepted: its
    /// addresses then resolve to `0x…` frames or to bare function names.
    pub fn new(elf: &[u8]) -> Result<Self, ProfileError> {
        let file = object::File::parse(elf).map_err(ProfileError::Elf)?;
        let endian = if file.is_little_endian() {
            RunTimeEndian::Little
        } else {
            RunTimeEndian::Big
        };

        let mut symbols: Vec<FunctionSymbol> = file
            .symbols()
            .filter(|s| s.kind() == SymbolKind::Text && s.is_definition() && s.address() != 0)
            .filter_map(|s| {
                // A nameless symbol names nothing (a hostile image has them).
                let name = s.name().ok().filter(|n| !n.is_empty())?;
                Some(FunctionSymbol {
                    start: s.address(),
                    end: s.address().saturating_add(s.size()),
                    name: demangle(name).into_owned(),
                })
            })
            .collect();
        // Larger symbols first among those at the same address, so that an
        // alias with a size wins over a zero-sized label.
        symbols.sort_by(|a, b| a.start.cmp(&b.start).then(b.end.cmp(&a.end)));
        // A zero-sized symbol extends to the next symbol, as `nm`-based tools
        // assume; the last one covers only its own address.
        for i in 0..symbols.len() {
            if symbols[i].end == symbols[i].start {
                let next = symbols[i + 1..]
                    .iter()
                    .map(|s| s.start)
                    .find(|&start| start > symbols[i].start);
                symbols[i].end = next.unwrap_or(symbols[i].start + 1);
            }
        }

        let load = |id: gimli::SectionId| -> Result<Reader, ProfileError> {
            let data = match file.section_by_name(id.name()) {
                Some(section) => section.uncompressed_data().map_err(ProfileError::Elf)?,
                None => Cow::Borrowed(&[][..]),
            };
            Ok(EndianArcSlice::new(Arc::from(&*data), endian))
        };
        let dwarf = gimli::Dwarf::load(load)?;
        let dwarf = addr2line::Context::from_dwarf(dwarf).map_err(ProfileError::Dwarf)?;

        let mut code: Vec<(u64, u64)> = file
            .sections()
            .filter(|s| s.kind() == SectionKind::Text && s.size() > 0)
            .map(|s| (s.address(), s.address().saturating_add(s.size())))
            .collect();
        code.sort_unstable();
        let labels = labels(&file, &code);

        let image = file
            .segments()
            .filter(|s| s.size() > 0)
            .map(|s| (s.address(), s.address().saturating_add(s.size())))
            .reduce(|(lo, hi), (start, end)| (lo.min(start), hi.max(end)));
        let build_id = file.build_id().ok().flatten().map(<[u8]>::to_vec);

        Ok(Symbolizer {
            symbols,
            labels,
            dwarf,
            code,
            image,
            build_id,
        })
    }

    /// The frames at `addr`, innermost (inlined) first, the function that
    /// contains `addr` last; never empty.
    ///
    /// `is_return_address` is for every stack element but the first: it is
    /// looked up at `addr - 1`, inside the call instruction. An address in no
    /// known function yields one frame named like `0x2001a3`.
    ///
    /// [`FOLDED_STACK`] yields the one frame `[stack table full]`.
    pub fn frames(&self, addr: u64, is_return_address: bool) -> Vec<Frame> {
        if addr == FOLDED_STACK {
            return vec![Frame {
                function: FOLDED_FRAME.to_owned(),
                file: None,
                line: None,
                addr,
            }];
        }
        let probe = if is_return_address {
            addr.saturating_sub(1)
        } else {
            addr
        };
        let mut frames = self.dwarf_frames(probe, addr);
        let symbol = self.symbol(probe);
        match (frames.last_mut(), symbol) {
            // The symbol table has the function's full path; DWARF written
            // with line tables only has its short name.
            (Some(outer), Some(symbol)) => outer.function = symbol.name.clone(),
            (None, Some(symbol)) => frames.push(Frame {
                function: symbol.name.clone(),
                file: None,
                line: None,
                addr,
            }),
            (None, None) => frames.push(Frame {
                function: unknown(addr),
                file: None,
                line: None,
                addr,
            }),
            (Some(_), None) => {}
        }
        frames
    }

    /// The name of the function symbol containing `addr`, demangled;
    /// [`FOLDED_FRAME`] for [`FOLDED_STACK`].
    pub fn function_name(&self, addr: u64) -> Option<&str> {
        if addr == FOLDED_STACK {
            return Some(FOLDED_FRAME);
        }
        self.symbol(addr).map(|s| s.name.as_str())
    }

    /// The lowest and highest-plus-one addresses of the image's loadable
    /// segments.
    pub fn image_range(&self) -> Option<(u64, u64)> {
        self.image
    }

    /// The image's GNU build id, if it has one.
    pub fn build_id(&self) -> Option<&[u8]> {
        self.build_id.as_deref()
    }

    /// The function symbol containing `addr`, or else its fallback name in
    /// a code section ([`Symbolizer::label`]).
    fn symbol(&self, addr: u64) -> Option<&FunctionSymbol> {
        let after = self.symbols.partition_point(|s| s.start <= addr);
        // Overlapping symbols are rare; look back a few for one that contains
        // `addr` rather than trusting the nearest start alone.
        self.symbols[..after]
            .iter()
            .rev()
            .take(8)
            .find(|s| addr < s.end)
            .or_else(|| self.label(addr))
    }

    /// The nearest label at or before `addr` in the code section holding
    /// `addr`: its fallback name.
    fn label(&self, addr: u64) -> Option<&FunctionSymbol> {
        let after = self.labels.partition_point(|l| l.start <= addr);
        self.labels[..after].last().filter(|l| addr < l.end)
    }

    /// Whether `addr` is in one of the image's code sections.
    fn in_code(&self, addr: u64) -> bool {
        let after = self.code.partition_point(|&(start, _)| start <= addr);
        self.code[..after]
            .last()
            .is_some_and(|&(_, end)| addr < end)
    }

    /// The DWARF frames at `probe`, innermost first; empty outside the code
    /// sections and where DWARF does not cover `probe` (or is malformed there).
    fn dwarf_frames(&self, probe: u64, addr: u64) -> Vec<Frame> {
        let mut frames = Vec::new();
        if !self.in_code(probe) {
            return frames;
        }
        let Ok(mut iter) = self.dwarf.find_frames(probe).skip_all_loads() else {
            return frames;
        };
        while let Ok(Some(frame)) = iter.next() {
            let function = frame
                .function
                .as_ref()
                .and_then(|name| name.raw_name().ok())
                // An empty DW_AT_name (a hostile image has them) is no name.
                .filter(|name| !name.is_empty())
                .map(|name| demangle(&name).into_owned());
            let (file, line) = match frame.location {
                Some(location) => (location.file.map(str::to_owned), location.line),
                None => (None, None),
            };
            frames.push(Frame {
                function: function.unwrap_or_else(|| unknown(addr)),
                file,
                line,
                addr,
            });
        }
        frames
    }
}

/// The fallback names of the code sections `code` of `file` (sorted, as
/// `[start, end)`): every symbol defined in them, whatever its type, and a
/// label named after each section at its start, so that every address in a
/// code section follows one. Each label ends where its section ends. Sorted by
/// start; of the labels at one address the last is used, so function symbols
/// go after the others and section names before them.
fn labels(file: &object::File<'_>, code: &[(u64, u64)]) -> Vec<FunctionSymbol> {
    let section_of = |addr: u64| {
        let after = code.partition_point(|&(start, _)| start <= addr);
        code[..after]
            .last()
            .filter(|&&(_, end)| addr < end)
            .copied()
    };
    // (rank among labels at one address, label)
    let mut labels: Vec<(u8, FunctionSymbol)> = file
        .symbols()
        .filter(|s| {
            s.is_definition() && !matches!(s.kind(), SymbolKind::Section | SymbolKind::File)
        })
        .filter_map(|s| {
            let (_, end) = section_of(s.address())?;
            let name = s.name().ok().filter(|n| !n.is_empty())?;
            let rank = if s.kind() == SymbolKind::Text { 2 } else { 1 };
            let label = FunctionSymbol {
                start: s.address(),
                end,
                name: demangle(name).into_owned(),
            };
            Some((rank, label))
        })
        .collect();
    labels.extend(file.sections().filter_map(|section| {
        let (start, end) = section_of(section.address())?;
        let label = FunctionSymbol {
            start,
            end,
            name: section.name().ok().filter(|n| !n.is_empty())?.to_owned(),
        };
        (start == section.address() && section.kind() == SectionKind::Text).then_some((0, label))
    }));
    labels.sort_by(|(a_rank, a), (b_rank, b)| {
        (a.start, a_rank, &a.name).cmp(&(b.start, b_rank, &b.name))
    });
    labels.into_iter().map(|(_, label)| label).collect()
}

/// The pseudo address of a sample counted without its stack, because the
/// stack table it went to was full: a profile shows it as [`FOLDED_FRAME`].
/// It is not canonical, so no real frame has it; a sampled stack that holds
/// it (garbage) ends before it when it is counted (`sampling/buffer.rs`).
pub const FOLDED_STACK: u64 = 0x8000_0000_0000_0000;

/// The frame name of [`FOLDED_STACK`].
pub const FOLDED_FRAME: &str = "[stack table full]";

/// The name of a frame at an address in no known function.
fn unknown(addr: u64) -> String {
    format!("{addr:#x}")
}

/// Demangles a Rust symbol (legacy or v0 mangling) without its hash or crate
/// disambiguators; returns any other name unchanged.
pub(crate) fn demangle(name: &str) -> Cow<'_, str> {
    match rustc_demangle::try_demangle(name) {
        Ok(demangled) => Cow::Owned(format!("{demangled:#}")),
        Err(_) => Cow::Borrowed(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel() -> Symbolizer {
        Symbolizer::new(metronome_resources::GUEST_KERNEL).expect("the guest kernel parses")
    }

    #[test]
    fn test_demangle_legacy_drops_hash() {
        assert_eq!(
            demangle("_ZN15metronome_guest9workloads7spinner17h13af0d74d18065a5E"),
            "metronome_guest::workloads::spinner"
        );
    }

    #[test]
    fn test_demangle_v0_drops_disambiguators() {
        assert_eq!(
            demangle("_RNvNvNtCsgEmfK2I1SDS_4core9panicking18panic_nounwind_fmt7runtime"),
            "core::panicking::panic_nounwind_fmt::runtime"
        );
    }

    #[test]
    fn test_demangle_leaves_plain_names() {
        assert_eq!(demangle("memcpy"), "memcpy");
        assert_eq!(demangle("new<64>"), "new<64>");
    }

    #[test]
    fn test_unknown_address_is_hex() {
        let s = kernel();
        for is_return in [false, true] {
            let frames = s.frames(0x10, is_return);
            assert_eq!(
                frames,
                vec![Frame {
                    function: "0x10".into(),
                    file: None,
                    line: None,
                    addr: 0x10
                }]
            );
        }
        assert_eq!(s.frames(u64::MAX, false)[0].function, "0xffffffffffffffff");
    }

    #[test]
    fn test_the_folded_address_is_named_stack_table_full() {
        let s = kernel();
        for is_return in [false, true] {
            assert_eq!(s.frames(FOLDED_STACK, is_return)[0].function, FOLDED_FRAME);
        }
        assert_eq!(s.function_name(FOLDED_STACK), Some(FOLDED_FRAME));
    }

    /// The address of the first function symbol whose name ends with `::suffix`.
    fn function(s: &Symbolizer, suffix: &str) -> (u64, u64) {
        let sym = s
            .symbols
            .iter()
            .find(|f| f.name.ends_with(&format!("::{suffix}")))
            .unwrap_or_else(|| panic!("no function ::{suffix} in the guest kernel"));
        (sym.start, sym.end)
    }

    #[test]
    fn test_kernel_function_resolves_with_line() {
        let s = kernel();
        let (start, end) = function(&s, "spinner");
        let frames = s.frames(start, false);
        let outer = frames.last().expect("never empty");
        assert_eq!(outer.function, "metronome_guest::workloads::spinner");
        assert_eq!(outer.addr, start);
        assert!(
            outer.file.as_deref().is_some_and(|f| f.ends_with(".rs")),
            "{frames:?}"
        );
        assert!(outer.line.is_some(), "{frames:?}");
        // Every address inside the function resolves to it as the outer frame.
        for addr in start..end {
            let frames = s.frames(addr, false);
            assert_eq!(
                frames.last().map(|f| f.function.as_str()),
                Some("metronome_guest::workloads::spinner"),
                "{addr:#x}: {frames:?}"
            );
        }
        assert_eq!(
            s.function_name(start + 1),
            Some("metronome_guest::workloads::spinner")
        );
    }

    #[test]
    fn test_return_address_is_looked_up_in_the_call() {
        let s = kernel();
        let (start, end) = function(&s, "spinner");
        // The address just past the function, as a return address, is the
        // function's last instruction (a call that never returns, say).
        let frames = s.frames(end, true);
        assert_eq!(
            frames.last().map(|f| f.function.as_str()),
            Some("metronome_guest::workloads::spinner"),
            "{frames:?}"
        );
        assert_eq!(frames.last().map(|f| f.addr), Some(end));
        // And as a sampled RIP it is past the function's code: in the next
        // function, or in the padding after it, which the fallback names
        // after it but no line of it covers.
        let outer = s.frames(end, false).pop().expect("never empty");
        assert!(
            outer.function != "metronome_guest::workloads::spinner" || outer.line.is_none(),
            "{outer:?}"
        );
        assert!(start < end);
    }

    #[test]
    fn test_inlined_frames_are_innermost_first() {
        let s = kernel();
        // Find an address in the kernel with inlined frames; the outermost is
        // always the symbol's full path and the inner ones DWARF names.
        let (lo, hi) = s.image_range().expect("the kernel has segments");
        let inlined = (lo..hi.min(lo + 0x8000))
            .map(|a| s.frames(a, false))
            .find(|f| f.len() > 1)
            .expect("the kernel has inlined code");
        let outer = inlined.last().expect("never empty");
        assert!(outer.function.contains("::"), "{inlined:?}");
        assert!(inlined.iter().all(|f| !f.function.is_empty()));
        assert!(inlined[0].line.is_some(), "{inlined:?}");
    }

    /// The addresses of the interrupt entry stubs, in vector order, as the
    /// guest's `ISR_TABLE` (which the IDT is built from) holds them.
    fn entry_stubs(elf: &[u8]) -> Vec<u64> {
        let file = object::File::parse(elf).unwrap();
        let table = file
            .symbols()
            .find(|s| s.name() == Ok("ISR_TABLE"))
            .expect("the guest kernel has ISR_TABLE");
        let section = file
            .section_by_index(table.section_index().unwrap())
            .unwrap();
        let data = section.data().unwrap();
        let at = (table.address() - section.address()) as usize;
        data[at..at + 256 * 8]
            .chunks_exact(8)
            .map(|word| u64::from_le_bytes(word.try_into().unwrap()))
            .collect()
    }

    /// Checks that every entry stub and `isr_common` are named for their
    /// labels, at every address they span.
    fn check_entry_path_named(s: &Symbolizer, stubs: &[u64]) {
        let named = |addr: u64| s.frames(addr, false).last().unwrap().function.clone();
        for (vector, &stub) in stubs.iter().enumerate() {
            // Each stub is at most 12 bytes: push, push, jmp.
            for addr in stub..stub + 4 {
                assert_eq!(named(addr), format!("isr_{vector}"), "{addr:#x}");
            }
            assert_eq!(
                s.frames(stub + 4, true)[0].function,
                format!("isr_{vector}")
            );
        }
        let common = stubs[0] - 1; // isr_common's last byte, just before isr_0
        assert_eq!(named(common), "isr_common");
    }

    #[test]
    fn test_assembly_entry_stubs_are_named() {
        let stubs = entry_stubs(metronome_resources::GUEST_KERNEL);
        check_entry_path_named(&kernel(), &stubs);
    }

    #[test]
    fn test_assembly_labels_without_type_or_size_are_named_by_the_fallback() {
        // The guest image with every `isr_*` label turned into what the
        // assembler emits without `.type`/`.size`: NOTYPE, size 0.
        let mut elf = metronome_resources::GUEST_KERNEL.to_vec();
        let file = object::File::parse(metronome_resources::GUEST_KERNEL).unwrap();
        let (symtab, _) = file
            .section_by_name(".symtab")
            .and_then(|t| t.file_range())
            .expect("the guest kernel has a symbol table");
        const ENTRY: usize = 24; // sizeof(Elf64_Sym)
        let mut untyped = 0;
        for sym in file.symbols() {
            if sym.name().is_ok_and(|n| n.starts_with("isr_")) {
                let entry = symtab as usize + sym.index().0 * ENTRY;
                elf[entry + 4] &= 0xf0; // st_info: keep the binding, type STT_NOTYPE
                elf[entry + 16..entry + 24].fill(0); // st_size
                untyped += 1;
            }
        }
        assert_eq!(untyped, 257, "isr_common and 256 stubs");
        let s = Symbolizer::new(&elf).unwrap();
        assert!(s.symbols.iter().all(|f| !f.name.starts_with("isr_")));
        check_entry_path_named(&s, &entry_stubs(&elf));
    }

    #[test]
    fn test_no_code_address_is_a_bare_hex_address() {
        let s = kernel();
        for &(start, end) in &s.code {
            for addr in start..end {
                // A return address is looked up one byte before it.
                for (addr, is_return) in [(addr, false), (addr + 1, true)] {
                    let frames = s.frames(addr, is_return);
                    assert!(
                        frames.iter().all(|f| !f.function.starts_with("0x")),
                        "{addr:#x}: {frames:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn test_not_an_elf_is_an_error() {
        assert!(matches!(
            Symbolizer::new(b"not an elf"),
            Err(ProfileError::Elf(_))
        ));
    }
}
