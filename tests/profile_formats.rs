//! Writes a guest profile built from synthetic samples at real guest kernel
//! function addresses, and checks its three files with their consumers: the
//! folded stacks by content, the SVG flame graph with an XML parser (and
//! `rsvg-convert`, if installed), the pprof profile with `go tool pprof`.
//!
//! `go` and `rsvg-convert` are required when `CI=true`; elsewhere a missing
//! one skips that check with a note.

// An integration-test crate is test-only as a whole.
#![allow(clippy::tests_outside_test_module)]

mod common;
use common::{in_ci, run_tool};
use std::fs;
use std::path::{Path, PathBuf};

use object::{Object, ObjectSymbol, SymbolKind};
use quick_xml::events::Event;
use quick_xml::Reader;
use vmm::profile::{Profile, Sample, Symbolizer, FOLDED_FILE, PPROF_FILE, SVG_FILE, SVG_TITLE};

/// The full, demangled path of the guest functions used here.
fn qualified(name: &str) -> String {
    format!("metronome_guest::workloads::{name}")
}

/// The address of `metronome_guest::workloads::<name>` in the guest kernel,
/// from its symbol table. Both Rust manglings spell the path as
/// length-prefixed identifiers (legacy adds a `17h<hash>E` suffix).
fn function_address(elf: &object::File<'_>, name: &str) -> u64 {
    let path = format!("9workloads{}{name}", name.len());
    let matches: Vec<u64> = elf
        .symbols()
        .filter(|s| s.kind() == SymbolKind::Text && s.size() > 0)
        .filter(|s| {
            s.name().is_ok_and(|n| {
                n.split_once(&path)
                    .is_some_and(|(_, rest)| rest.is_empty() || rest.starts_with("17h"))
            })
        })
        .map(|s| s.address())
        .collect();
    assert_eq!(matches.len(), 1, "one function ::workloads::{name}");
    matches[0]
}

fn scratch_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("profile-formats-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    dir
}

/// Parses `svg` fully as XML; returns the text of its `<title>` elements.
fn parse_svg(svg: &str) -> Vec<String> {
    let mut reader = Reader::from_str(svg);
    reader.config_mut().check_end_names = true;
    let mut depth = 0usize;
    let mut roots = 0;
    let mut in_title = false;
    let mut titles = Vec::new();
    loop {
        let event = reader
            .read_event()
            .unwrap_or_else(|e| panic!("bad XML at {}: {e}", reader.error_position()));
        match event {
            Event::Start(e) => {
                if depth == 0 {
                    roots += 1;
                    assert_eq!(e.name().as_ref(), b"svg", "the root is <svg>");
                }
                depth += 1;
                if e.name().as_ref() == b"title" {
                    in_title = true;
                    titles.push(String::new());
                }
            }
            Event::End(e) => {
                depth = depth.checked_sub(1).expect("balanced tags");
                if e.name().as_ref() == b"title" {
                    in_title = false;
                }
            }
            Event::Text(t) if in_title => {
                let text = t.decode().expect("UTF-8 text");
                titles.last_mut().expect("in a title").push_str(&text);
            }
            Event::GeneralRef(r) if in_title => {
                let c = match r.resolve_char_ref().expect("a valid character reference") {
                    Some(c) => c.to_string(),
                    None => {
                        let name = r.decode().expect("UTF-8 entity");
                        quick_xml::escape::resolve_predefined_entity(&name)
                            .unwrap_or_else(|| panic!("unknown entity &{name};"))
                            .to_owned()
                    }
                };
                titles.last_mut().expect("in a title").push_str(&c);
            }
            Event::Eof => break,
            _ => {}
        }
    }
    assert_eq!(depth, 0, "every element is closed");
    assert_eq!(roots, 1, "one root element");
    titles
}

#[test]
fn test_profile_formats_folded_svg_pprof() {
    let kernel = metronome_resources::GUEST_KERNEL;
    let elf = object::File::parse(kernel).expect("the guest kernel is an ELF file");
    let spinner = function_address(&elf, "spinner");
    let sleeper = function_address(&elf, "sleeper");
    let work = function_address(&elf, "work");

    let mut profile = Profile::new(Symbolizer::new(kernel).expect("symbolizer"));
    profile.set_period_ns(1_000_000);
    let sample = |vcpu, tid, thread: &str, user: Vec<u64>, kernel: Vec<u64>| Sample {
        vcpu,
        tid,
        thread_name: thread.into(),
        user_stack: user,
        kernel_stack: kernel,
        user_leaf_after_trap: false,
        weight: 1,
    };
    // `work` called from `spinner` (a return address, looked up one byte
    // back, so at the function's first instruction), three times.
    for _ in 0..3 {
        profile.add(&sample(0, 2, "spinner/0", vec![work, spinner + 1], vec![]));
    }
    // In the kernel (at `work`) on behalf of `spinner`, once.
    profile.add(&sample(0, 2, "spinner/0", vec![spinner], vec![work]));
    // `sleeper`, twice, on two vCPUs: one folded line.
    profile.add(&sample(1, 3, "sleeper/1", vec![sleeper], vec![]));
    profile.add(&sample(2, 3, "sleeper/1", vec![sleeper], vec![]));
    // An address in no function.
    profile.add(&sample(1, 4, "lost/1", vec![0x10], vec![]));
    assert_eq!(profile.sample_count(), 7);

    let dir = scratch_dir();
    profile.write_all(&dir).expect("writes the three files");

    // (1) Folded stacks: one sorted line per stack, demangled names.
    let folded = fs::read_to_string(dir.join(FOLDED_FILE)).expect("folded file");
    let expected = [
        "lost/1;0x10 1".to_owned(),
        format!("sleeper/1;{} 2", qualified("sleeper")),
        format!("spinner/0;{};{} 3", qualified("spinner"), qualified("work")),
        format!(
            "spinner/0;{};{}_[k] 1",
            qualified("spinner"),
            qualified("work")
        ),
    ];
    assert_eq!(folded.lines().collect::<Vec<_>>(), expected, "{folded}");

    // (2) The SVG is well-formed XML naming the functions.
    let svg_path = dir.join(SVG_FILE);
    let svg = fs::read_to_string(&svg_path).expect("svg file");
    let titles = parse_svg(&svg);
    assert!(svg.contains(SVG_TITLE));
    for name in ["spinner", "sleeper", "work"] {
        let name = qualified(name);
        assert!(
            titles.iter().any(|t| t.starts_with(&format!("{name} ("))),
            "no frame {name} in {titles:?}"
        );
    }
    assert!(
        titles.iter().any(|t| t.starts_with("all (7 samples")),
        "{titles:?}"
    );
    let png = dir.join("profile.png");
    let png_arg = png.to_str().expect("UTF-8 path");
    let svg_arg = svg_path.to_str().expect("UTF-8 path");
    match run_tool("rsvg-convert", &["-o", png_arg, svg_arg]) {
        Some(out) => {
            assert!(
                out.status.success(),
                "rsvg-convert failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let png = fs::read(&png).expect("the PNG was written");
            assert!(png.len() > 8, "the PNG is empty");
            assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG file");
        }
        None if in_ci() => {
            panic!("CI=true but rsvg-convert is not on PATH (apt-get install librsvg2-bin)")
        }
        None => eprintln!("skip: rsvg-convert is not on PATH, the SVG was not rendered"),
    }

    // (3) `go tool pprof` reads the profile and names the functions.
    let pprof = dir.join(PPROF_FILE);
    let gz = fs::read(&pprof).expect("pprof file");
    assert_eq!(&gz[..2], b"\x1f\x8b", "gzipped");
    let pprof_arg = pprof.to_str().expect("UTF-8 path");
    match run_tool("go", &["tool", "pprof", "-top", pprof_arg]) {
        Some(out) => {
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success(),
                "go tool pprof failed\nstdout: {stdout}\nstderr: {stderr}"
            );
            for name in ["spinner", "sleeper", "work"] {
                assert!(
                    stdout.contains(&qualified(name)),
                    "pprof -top does not name {name}:\n{stdout}\nstderr: {stderr}"
                );
            }
            assert!(stdout.contains("0x10"), "{stdout}");
        }
        None if in_ci() => panic!("CI=true but go is not on PATH (apt-get install golang-go)"),
        None => eprintln!("skip: go is not on PATH, the pprof file was not read by go tool pprof"),
    }

    fs::remove_dir_all(&dir).expect("removes the scratch directory");
}
