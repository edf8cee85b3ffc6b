//! The SIGSYS handler: a forbidden system call ends the process with one
//! line naming the thread and the call.
//!
//! The handler runs on the offending thread, inside its filter, so it uses
//! only what every list allows and what is async-signal-safe: the thread's
//! name from a thread-local filled before the filter was installed, the
//! call's name from a static table, a message built in a stack buffer, one
//! `write(2)` to standard error and `_exit(2)` (`exit_group`).

use std::cell::Cell;

use super::names::SYSCALL_NAMES;

/// `siginfo_t.si_code` of a SIGSYS sent by `SECCOMP_RET_TRAP`.
const SYS_SECCOMP: i32 = 1;
/// The thread name's bytes (a `comm` is at most 15 bytes and a NUL).
const NAME_LEN: usize = 16;

thread_local! {
    /// The calling thread's name, NUL-padded (all NUL: not recorded).
    /// Const-initialised and without a destructor, so that the handler's
    /// read is a plain TLS load.
    static THREAD_NAME: Cell<[u8; NAME_LEN]> = const { Cell::new([0; NAME_LEN]) };
}

/// Records the calling thread's `comm` (`prctl(PR_GET_NAME)`).
pub(super) fn label_current_thread() {
    let mut name = [0u8; NAME_LEN];
    // SAFETY: PR_GET_NAME writes at most 16 bytes, NUL included, to a
    // 16-byte buffer that lives across the call.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    THREAD_NAME.with(|cell| cell.set(name));
}

/// The `_sigsys` member of `siginfo_t` (`include/uapi/asm-generic/siginfo.h`):
/// the fields after `si_signo`, `si_errno`, `si_code` and padding.
#[repr(C)]
struct SigSys {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    call_addr: *mut libc::c_void,
    syscall: i32,
    arch: u32,
}

/// A fixed buffer a message is appended to, truncated if too long.
struct Line {
    bytes: [u8; 192],
    len: usize,
}

impl Line {
    fn push(&mut self, text: &[u8]) {
        for &b in text {
            if self.len < self.bytes.len() {
                self.bytes[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn push_decimal(&mut self, mut value: u32) {
        let mut digits = [0u8; 10];
        let mut n = 0;
        loop {
            digits[n] = b'0' + (value % 10) as u8;
            n += 1;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        digits[..n].reverse();
        self.push(&digits[..n]);
    }
}

/// The report line for system call `nr` made by thread `name`
/// (NUL-padded), newline included.
fn format_violation(name: &[u8; NAME_LEN], nr: i32) -> Line {
    let mut line = Line {
        bytes: [0; 192],
        len: 0,
    };
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
    line.push(b"metronome: seccomp: thread '");
    if name_len == 0 {
        line.push(b"(unnamed)");
    } else {
        line.push(&name[..name_len]);
    }
    line.push(b"' made the forbidden system call ");
    let known = usize::try_from(nr)
        .ok()
        .and_then(|i| SYSCALL_NAMES.get(i))
        .filter(|s| !s.is_empty());
    line.push(known.map_or(b"(unknown)".as_slice(), |s| s.as_bytes()));
    line.push(b" (");
    match u32::try_from(nr) {
        Ok(nr) => line.push_decimal(nr),
        Err(_) => line.push(b"negative"),
    }
    line.push(b")\n");
    line
}

extern "C" fn on_sigsys(_signo: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler;
    // for SIGSYS its union is `_sigsys`, laid out as `SigSys`.
    let info = unsafe { &*info.cast::<SigSys>() };
    if info.code != SYS_SECCOMP {
        return;
    }
    let name = THREAD_NAME.with(Cell::get);
    let line = format_violation(&name, info.syscall);
    // SAFETY: write(2) and _exit(2) are async-signal-safe and allowed by
    // every filter; the buffer lives across the call.
    unsafe {
        libc::write(libc::STDERR_FILENO, line.bytes.as_ptr().cast(), line.len);
        libc::_exit(metronome_abi::exit::VMM_SECCOMP);
    }
}

/// Installs the process's SIGSYS handler.
pub(super) fn install_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; the handler has the SA_SIGINFO
    // signature and is async-signal-safe (see the module docs).
    let ret = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            on_sigsys;
        action.sa_sigaction = handler as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut())
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(line: &Line) -> String {
        String::from_utf8(line.bytes[..line.len].to_vec()).unwrap()
    }

    fn name(s: &str) -> [u8; NAME_LEN] {
        let mut name = [0; NAME_LEN];
        name[..s.len()].copy_from_slice(s.as_bytes());
        name
    }

    #[test]
    fn test_the_message_names_the_thread_and_the_call() {
        let line = format_violation(&name("vcpu0"), libc::SYS_getpgid as i32);
        assert_eq!(
            text(&line),
            "metronome: seccomp: thread 'vcpu0' made the forbidden system call getpgid (121)\n"
        );
        let line = format_violation(&name("kperf-pet-sampl"), libc::SYS_socket as i32);
        assert_eq!(
            text(&line),
            "metronome: seccomp: thread 'kperf-pet-sampl' made the forbidden system call socket (41)\n"
        );
    }

    #[test]
    fn test_unknown_calls_and_unnamed_threads_are_said_so() {
        let line = format_violation(&[0; NAME_LEN], 100_000);
        assert_eq!(
            text(&line),
            "metronome: seccomp: thread '(unnamed)' made the forbidden system call (unknown) (100000)\n"
        );
        let line = format_violation(&name("x"), -1);
        assert!(text(&line).ends_with("(unknown) (negative)\n"));
    }

    #[test]
    fn test_the_table_matches_libc() {
        assert_eq!(SYSCALL_NAMES[libc::SYS_ioctl as usize], "ioctl");
        assert_eq!(
            SYSCALL_NAMES[libc::SYS_perf_event_open as usize],
            "perf_event_open"
        );
        assert_eq!(SYSCALL_NAMES[libc::SYS_clone3 as usize], "clone3");
    }

    #[test]
    fn test_the_label_is_the_comm() {
        let named = std::thread::Builder::new()
            .name("label-test".into())
            .spawn(|| {
                label_current_thread();
                THREAD_NAME.with(Cell::get)
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(named, name("label-test"));
    }
}
