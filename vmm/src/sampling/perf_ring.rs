//! One `perf_event_open` cpu-clock event on a vCPU thread and its mmap ring
//! buffer: the no-exit tier's sample source ([`super::no_exit`]).
//!
//! The event is what `perf kvm --guest record -e cpu-clock` asks for (read
//! with `perf record -vv` on this host): a software `cpu-clock` event
//! (`PERF_TYPE_SOFTWARE`, `PERF_COUNT_SW_CPU_CLOCK`) with `exclude_host`,
//! sampling `IP | TID | TIME`. Here it is opened per vCPU thread (pid = the
//! thread's tid, any CPU), in period mode (the kperf timer's period in ns),
//! with `use_clockid` = `CLOCK_MONOTONIC` so that a sample's time converts to
//! device time by subtracting the VM's epoch ([`crate::host_time`]). The
//! sample is taken in the host kernel's hrtimer interrupt while the thread
//! runs: in guest mode its IP is the guest's (`PERF_RECORD_MISC_GUEST_USER`
//! or `_GUEST_KERNEL` in the header's cpumode); otherwise the thread was in
//! the host (an exit being handled; on kvm_pvm also the guest's CPL0 code,
//! which the host emulates), and the IP is the host's.
//!
//! The ring (perf_event_open(2), "MMAP layout"): one metadata page, then
//! `2^n` data pages. The kernel writes records at `data_head` and publishes
//! it; the reader loads `data_head`, then (acquire: no read of a record
//! before the load of the head that covers it) copies the bytes from its
//! `data_tail` to `data_head` out of the ring, a record that wraps past the
//! end in two pieces ([`unwrap_ring`]), and stores the new `data_tail`
//! (release: every copy done before the kernel may overwrite those bytes).
//! Records the kernel could not write because the ring was full are reported
//! in `PERF_RECORD_LOST` records, which are counted ([`parse`]).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use perf_event_open_sys::bindings::{
    perf_event_attr, perf_event_header, perf_event_mmap_page, PERF_COUNT_SW_CPU_CLOCK,
    PERF_FLAG_FD_CLOEXEC, PERF_RECORD_LOST, PERF_RECORD_LOST_SAMPLES,
    PERF_RECORD_MISC_CPUMODE_MASK, PERF_RECORD_MISC_GUEST_KERNEL, PERF_RECORD_MISC_GUEST_USER,
    PERF_RECORD_SAMPLE, PERF_SAMPLE_IP, PERF_SAMPLE_TID, PERF_SAMPLE_TIME, PERF_TYPE_SOFTWARE,
};

/// Data pages of each ring (a power of two): 256 KiB, about 6,500 samples,
/// over 300 ms at 20 kHz, against a reader that empties it every 10 ms.
pub const DATA_PAGES: usize = 64;

/// Where the vCPU was when a sample was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Guest user mode (CPL3): the IP is a guest user address.
    GuestUser,
    /// Guest kernel mode: the IP is a guest kernel address.
    GuestKernel,
    /// The thread was in the host: the IP is the host's, not the guest's.
    Host,
}

/// One parsed record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    /// A sample (`PERF_SAMPLE_IP | PERF_SAMPLE_TID | PERF_SAMPLE_TIME`).
    Sample {
        /// The instruction pointer.
        ip: u64,
        /// Where the vCPU was (the header's cpumode).
        mode: Mode,
        /// The host thread sampled.
        tid: u32,
        /// `CLOCK_MONOTONIC`, ns.
        time_ns: u64,
    },
    /// Records the kernel dropped because the ring was full.
    Lost(u64),
}

/// What [`parse`] found besides the records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParseStats {
    /// Records of other types (skipped).
    pub other: u64,
    /// Bytes that could not be parsed (a header with an impossible size):
    /// the rest of that read is skipped.
    pub corrupt_bytes: u64,
}

const HEADER: usize = std::mem::size_of::<perf_event_header>();
/// A sample's body: ip, pid and tid, time.
const SAMPLE_BODY: usize = 8 + 4 + 4 + 8;

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn mode(misc: u16) -> Mode {
    match u32::from(misc) & PERF_RECORD_MISC_CPUMODE_MASK {
        PERF_RECORD_MISC_GUEST_USER => Mode::GuestUser,
        PERF_RECORD_MISC_GUEST_KERNEL => Mode::GuestKernel,
        _ => Mode::Host,
    }
}

/// Parses the records in `bytes` (whole records, in ring order, already
/// unwrapped by [`unwrap_ring`]) into `sink`.
pub fn parse(bytes: &[u8], mut sink: impl FnMut(Record)) -> ParseStats {
    let mut stats = ParseStats::default();
    let mut at = 0;
    while at < bytes.len() {
        let (Some(kind), Some(misc), Some(size)) = (
            u32_at(bytes, at),
            u16_at(bytes, at + 4),
            u16_at(bytes, at + 6),
        ) else {
            stats.corrupt_bytes += (bytes.len() - at) as u64;
            break;
        };
        let size = usize::from(size);
        if size < HEADER || at + size > bytes.len() {
            stats.corrupt_bytes += (bytes.len() - at) as u64;
            break;
        }
        let body = &bytes[at + HEADER..at + size];
        match kind {
            PERF_RECORD_SAMPLE if body.len() >= SAMPLE_BODY => {
                sink(Record::Sample {
                    ip: u64_at(body, 0).unwrap_or_default(),
                    mode: mode(misc),
                    tid: u32_at(body, 12).unwrap_or_default(),
                    time_ns: u64_at(body, 16).unwrap_or_default(),
                });
            }
            // id, lost.
            PERF_RECORD_LOST if body.len() >= 16 => {
                sink(Record::Lost(u64_at(body, 8).unwrap_or_default()));
            }
            PERF_RECORD_LOST_SAMPLES if body.len() >= 8 => {
                sink(Record::Lost(u64_at(body, 0).unwrap_or_default()));
            }
            _ => stats.other += 1,
        }
        at += size;
    }
    stats
}

/// Copies the bytes from `tail` to `head` (free-running byte counters) out
/// of a ring of `size` bytes (a power of two) into one buffer, the piece
/// that wraps past the end second. `copy(offset, dst)` copies `dst.len()`
/// bytes at `offset` of the ring (never past its end). `None` when `head`
/// is more than `size` ahead of `tail` (not where a writer could put it).
pub fn unwrap_ring(
    size: usize,
    tail: u64,
    head: u64,
    mut copy: impl FnMut(usize, &mut [u8]),
) -> Option<Vec<u8>> {
    let len = usize::try_from(head.wrapping_sub(tail)).ok()?;
    if len > size {
        return None;
    }
    let mut out = vec![0; len];
    // Cannot truncate: masked below `size`.
    let start = (tail & (size as u64 - 1)) as usize;
    let first = len.min(size - start);
    copy(start, &mut out[..first]);
    copy(0, &mut out[first..]);
    Some(out)
}

/// The ring's counters after one [`PerfEvent::read`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Bytes consumed.
    pub bytes: u64,
    /// `PERF_RECORD_LOST` totals.
    pub lost: u64,
    /// Reads that found an implausible head (skipped to it).
    pub bad_heads: u64,
    /// As [`ParseStats`].
    pub parse: ParseStats,
}

/// A cpu-clock sampling event on one thread, and its mapped ring.
#[derive(Debug)]
pub struct PerfEvent {
    fd: OwnedFd,
    /// The mapping: the metadata page, then the data pages.
    base: *mut u8,
    len: usize,
    data_offset: usize,
    data_size: usize,
}

// SAFETY: the mapping is owned by this value alone and unmapped once (Drop);
// the kernel is the only other writer, through the ring protocol.
unsafe impl Send for PerfEvent {}

impl PerfEvent {
    /// The attributes of the event: see the module docs.
    pub fn attr(period_ns: u64) -> perf_event_attr {
        let mut attr = perf_event_attr {
            type_: PERF_TYPE_SOFTWARE,
            // Cannot truncate: the struct is a few hundred bytes.
            size: std::mem::size_of::<perf_event_attr>() as u32,
            config: u64::from(PERF_COUNT_SW_CPU_CLOCK),
            sample_type: u64::from(PERF_SAMPLE_IP | PERF_SAMPLE_TID | PERF_SAMPLE_TIME),
            clockid: libc::CLOCK_MONOTONIC,
            ..Default::default()
        };
        attr.__bindgen_anon_1.sample_period = period_ns.max(1);
        // Wake a poller when a quarter of the ring is filled (the reader
        // polls with a timeout; see `no_exit`).
        attr.__bindgen_anon_2.wakeup_watermark = (DATA_PAGES * page_size() / 4) as u32;
        attr.set_watermark(1);
        attr.set_exclude_host(1);
        attr.set_use_clockid(1);
        attr
    }

    /// Opens the event on host thread `tid` (any CPU), enabled, and maps
    /// its ring.
    pub fn open(tid: i32, period_ns: u64) -> io::Result<Self> {
        let mut attr = Self::attr(period_ns);
        // SAFETY: `attr` is a zero-initialised perf_event_attr whose `size`
        // is its own size; pid `tid` and cpu -1 follow that thread on every
        // CPU; no group (-1). The call does not retain the pointer.
        let fd = unsafe {
            perf_event_open_sys::perf_event_open(
                &mut attr,
                tid,
                -1,
                -1,
                PERF_FLAG_FD_CLOEXEC.into(),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let len = (1 + DATA_PAGES) * page_size();
        // SAFETY: a new shared mapping of the event's ring, of the size
        // perf_event_open(2) requires (1 + 2^n pages); checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = base.cast::<u8>();
        // SAFETY: the metadata page is mapped; data_offset and data_size are
        // written by the kernel before mmap returns.
        let (data_offset, data_size) = unsafe {
            let meta = base.cast::<perf_event_mmap_page>();
            (
                std::ptr::addr_of!((*meta).data_offset).read_volatile(),
                std::ptr::addr_of!((*meta).data_size).read_volatile(),
            )
        };
        let mut event = Self {
            fd,
            base,
            len,
            data_offset: page_size(),
            data_size: DATA_PAGES * page_size(),
        };
        // Kernels that fill in the offsets (4.1 and later) are believed when
        // they lie inside the mapping.
        if let (Ok(offset), Ok(size)) = (usize::try_from(data_offset), usize::try_from(data_size)) {
            if size.is_power_of_two() && offset >= page_size() && offset + size <= len {
                (event.data_offset, event.data_size) = (offset, size);
            }
        }
        Ok(event)
    }

    /// Stops the event counting and sampling (the ring keeps what it has).
    pub fn disable(&self) {
        // SAFETY: an ioctl on the event's own descriptor.
        unsafe { perf_event_open_sys::ioctls::DISABLE(self.fd.as_raw_fd(), 0) };
    }

    fn counter(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: `offset` is that of `data_head` or `data_tail`, 8-byte
        // aligned fields of the mapped metadata page, which lives as long
        // as `self`; the kernel accesses them atomically too.
        unsafe { &*self.base.add(offset).cast::<AtomicU64>() }
    }

    /// Moves every record the kernel published into `sink`; see the module
    /// docs for the protocol.
    pub fn read(&mut self, mut sink: impl FnMut(Record)) -> ReadStats {
        let head_at = std::mem::offset_of!(perf_event_mmap_page, data_head);
        let tail_at = std::mem::offset_of!(perf_event_mmap_page, data_tail);
        let head = self.counter(head_at).load(Ordering::Acquire);
        let tail = self.counter(tail_at).load(Ordering::Relaxed);
        let mut stats = ReadStats::default();
        if head == tail {
            return stats;
        }
        let data = self.base.wrapping_add(self.data_offset);
        let size = self.data_size;
        let bytes = unwrap_ring(size, tail, head, |at, dst| {
            // SAFETY: `at + dst.len()` stays inside the data area (unwrap_ring
            // never copies past its end); those bytes lie between the tail
            // and the head, which the kernel does not write until the new
            // tail is stored below.
            unsafe { std::ptr::copy_nonoverlapping(data.add(at), dst.as_mut_ptr(), dst.len()) }
        });
        match bytes {
            Some(bytes) => {
                stats.parse = parse(&bytes, |record| {
                    if let Record::Lost(n) = record {
                        stats.lost += n;
                    }
                    sink(record);
                });
                stats.bytes = bytes.len() as u64;
            }
            None => stats.bad_heads += 1,
        }
        self.counter(tail_at).store(head, Ordering::Release);
        stats
    }
}

impl Drop for PerfEvent {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, unmapped once; nothing borrows
        // it past `self`.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: u32, misc: u16, size: u16) -> Vec<u8> {
        let mut out = kind.to_le_bytes().to_vec();
        out.extend(misc.to_le_bytes());
        out.extend(size.to_le_bytes());
        out
    }

    fn sample(ip: u64, misc: u16, tid: u32, time: u64) -> Vec<u8> {
        let mut out = header(PERF_RECORD_SAMPLE, misc, (HEADER + SAMPLE_BODY) as u16);
        out.extend(ip.to_le_bytes());
        out.extend(7u32.to_le_bytes());
        out.extend(tid.to_le_bytes());
        out.extend(time.to_le_bytes());
        out
    }

    fn lost(n: u64) -> Vec<u8> {
        let mut out = header(PERF_RECORD_LOST, 0, (HEADER + 16) as u16);
        out.extend(1u64.to_le_bytes());
        out.extend(n.to_le_bytes());
        out
    }

    /// A ring of `size` bytes holding `records` written from byte counter
    /// `start` on, as the kernel writes them (wrapping at the end).
    fn ring_with(size: usize, start: u64, records: &[u8]) -> Vec<u8> {
        let mut ring = vec![0xee; size];
        for (i, b) in records.iter().enumerate() {
            ring[(start as usize + i) % size] = *b;
        }
        ring
    }

    fn read_ring(ring: &[u8], tail: u64, head: u64) -> (Vec<Record>, ParseStats) {
        let bytes = unwrap_ring(ring.len(), tail, head, |at, dst| {
            dst.copy_from_slice(&ring[at..at + dst.len()]);
        })
        .unwrap();
        let mut out = Vec::new();
        let stats = parse(&bytes, |r| out.push(r));
        (out, stats)
    }

    #[test]
    fn test_samples_and_lost_records_parse_with_their_mode() {
        let guest_user = PERF_RECORD_MISC_GUEST_USER as u16;
        let host_kernel = 1;
        let mut bytes = sample(0x20_1000, guest_user, 42, 1_000);
        bytes.extend(lost(5));
        bytes.extend(sample(0xffff_8000_0000_1000, host_kernel, 42, 2_000));
        bytes.extend(header(3, 0, 16)); // PERF_RECORD_COMM-like: skipped
        bytes.extend([0; 8]);
        let mut out = Vec::new();
        let stats = parse(&bytes, |r| out.push(r));
        assert_eq!(
            out,
            vec![
                Record::Sample {
                    ip: 0x20_1000,
                    mode: Mode::GuestUser,
                    tid: 42,
                    time_ns: 1_000
                },
                Record::Lost(5),
                Record::Sample {
                    ip: 0xffff_8000_0000_1000,
                    mode: Mode::Host,
                    tid: 42,
                    time_ns: 2_000
                },
            ]
        );
        assert_eq!(
            stats,
            ParseStats {
                other: 1,
                corrupt_bytes: 0
            }
        );
        let kernel = sample(1, PERF_RECORD_MISC_GUEST_KERNEL as u16, 1, 1);
        parse(&kernel, |r| {
            assert!(matches!(
                r,
                Record::Sample {
                    mode: Mode::GuestKernel,
                    ..
                }
            ))
        });
    }

    #[test]
    fn test_a_record_split_by_the_end_of_the_ring_is_reassembled() {
        let size = 128;
        let records: Vec<u8> = (0..4u64)
            .flat_map(|n| sample(0x1000 + n, 5, 9, 100 + n))
            .collect();
        // 4 samples of 32 bytes from offset 100 of the ring wrap: the first
        // straddles the end. The counters are free-running, far past `size`.
        let start = 1_000_000 * size as u64 + 100;
        let head = start + records.len() as u64;
        let ring = ring_with(size, start, &records);
        let (out, stats) = read_ring(&ring, start, head);
        assert_eq!(stats, ParseStats::default());
        let ips: Vec<u64> = out
            .iter()
            .map(|r| match r {
                Record::Sample { ip, .. } => *ip,
                Record::Lost(_) => 0,
            })
            .collect();
        assert_eq!(ips, vec![0x1000, 0x1001, 0x1002, 0x1003]);
    }

    #[test]
    fn test_a_head_beyond_the_ring_or_a_bad_size_is_not_read_past() {
        assert!(unwrap_ring(64, 0, 65, |_, _| unreachable!()).is_none());
        assert!(unwrap_ring(64, 10, 9, |_, _| unreachable!()).is_none());
        assert_eq!(
            unwrap_ring(64, 7, 7, |_, dst| assert!(dst.is_empty())),
            Some(vec![])
        );
        // A size below the header, then a size past the bytes read.
        for bad in [
            header(PERF_RECORD_SAMPLE, 0, 4),
            header(PERF_RECORD_SAMPLE, 0, 200),
        ] {
            let mut bytes = sample(1, 5, 1, 1);
            bytes.extend(&bad);
            let mut n = 0;
            let stats = parse(&bytes, |_| n += 1);
            assert_eq!((n, stats.corrupt_bytes), (1, bad.len() as u64));
        }
    }

    #[test]
    fn test_lost_records_are_totalled_across_a_wrap() {
        let size = 64;
        let mut records = lost(3);
        records.extend(lost(4));
        let start = 50;
        let ring = ring_with(size, start, &records);
        let (out, _) = read_ring(&ring, start, start + records.len() as u64);
        assert_eq!(out, vec![Record::Lost(3), Record::Lost(4)]);
    }

    #[test]
    fn test_the_attributes_are_perf_kvm_guests_with_the_monotonic_clock() {
        let attr = PerfEvent::attr(50_000);
        assert_eq!((attr.type_, attr.config), (PERF_TYPE_SOFTWARE, 0));
        // SAFETY: reading the union member this code wrote.
        assert_eq!(unsafe { attr.__bindgen_anon_1.sample_period }, 50_000);
        assert_eq!(attr.sample_type, 1 | 2 | 4);
        assert_eq!((attr.exclude_host(), attr.use_clockid()), (1, 1));
        assert_eq!(attr.clockid, libc::CLOCK_MONOTONIC);
        assert_eq!(attr.freq(), 0);
    }
}
