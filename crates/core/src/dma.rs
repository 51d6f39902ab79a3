//! One client's DMA window table: the guest memory windows its DMA_MAPs
//! declared, each backed by a mapping of the client's fd or, without one,
//! reachable only through DMA_READ/DMA_WRITE messages. DMA_MAP and DMA_UNMAP
//! are validated and applied here, with the errnos the protocol wants, so
//! that the connection's reader can answer them without entering JS; JS
//! keeps a mirror of the table for zero-copy lookups and learns of changes
//! in batches (`take_changes`).
//!
//! The table does not know how a window is backed: `B` is whatever the
//! caller makes from the client's fd (the napi layer keeps the mapping and
//! the views handed out over it).

use crate::memfd;
use crate::mmap::Protection;
use rustix::io::Errno;
use std::fmt::Display;
use std::os::fd::BorrowedFd;

/// vfio-user commands the table answers.
pub const DMA_MAP: u16 = 2;
pub const DMA_UNMAP: u16 = 3;

/// Windows start and end on 4 KiB pages.
const PAGE: u64 = 4096;

/// DMA_MAP flags (libvfio-user's MMAP and FILE_IO included).
const MAP_READ: u32 = 1 << 0;
const MAP_WRITE: u32 = 1 << 1;
const MAP_MMAP: u32 = 1 << 2;
const MAP_FILE_IO: u32 = 1 << 3;
/// DMA_UNMAP flags (the kernel's values).
const UNMAP_GET_DIRTY_BITMAP: u32 = 1 << 0;
const UNMAP_ALL: u32 = 1 << 1;

const MAP_REQUEST_SIZE: usize = 32;
/// The DMA_UNMAP request and its reply (without the legacy bitmap).
pub const UNMAP_SIZE: usize = 24;
/// The legacy dirty-bitmap header that follows a GET_DIRTY_BITMAP request.
const BITMAP_HEADER_SIZE: usize = 16;
/// Counts carried in a message must fit a JS number (as the TypeScript codec requires).
const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// A DMA_MAP or DMA_UNMAP the table refuses: the errno for the reply and
/// what was wrong, for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub errno: Errno,
    pub reason: String,
}

fn refuse(errno: Errno, reason: impl Into<String>) -> Refusal {
    Refusal { errno, reason: reason.into() }
}

/// What a window's backing must tell the table: which file it maps, to spot
/// a DMA_MAP that repeats a live window exactly.
pub trait Backing {
    fn file_identity(&self) -> (u64, u64);
}

#[derive(Debug)]
pub struct Window<B> {
    pub iova: u64,
    pub size: u64,
    pub readable: bool,
    pub writable: bool,
    /// Offset into the client's file (0 for a window without one).
    pub file_offset: u64,
    /// None for a message-based window (mapped without an fd).
    pub backing: Option<B>,
    /// Tells apart windows that took turns at one IOVA, for the change log.
    id: u64,
    /// The change log has handed this window out.
    announced: bool,
}

impl<B> Window<B> {
    fn overlaps(&self, iova: u64, size: u64) -> bool {
        // Both ranges are non-empty and do not wrap (checked before insertion).
        iova <= self.iova + (self.size - 1) && self.iova <= iova + (size - 1)
    }
}

/// One DMA_MAP, decoded.
pub struct MapRequest<'fd> {
    pub iova: u64,
    pub size: u64,
    pub readable: bool,
    pub writable: bool,
    /// The client's fd, borrowed for the call.
    pub fd: Option<BorrowedFd<'fd>>,
    pub file_offset: u64,
}

/// A change to the table, as the mirror applies it (in order).
pub enum Change<'a, B> {
    Mapped(&'a Window<B>),
    Unmapped { iova: u64 },
    UnmappedAll,
}

/// What the log holds: a mapped window is looked up when the log is taken,
/// so one mapped and unmapped in between is never handed out at all.
enum Logged {
    Mapped { iova: u64, id: u64 },
    Unmapped { iova: u64 },
    UnmappedAll,
}

/// What a DMA_MAP or DMA_UNMAP message did.
pub struct Applied<B> {
    /// The reply's payload (empty for DMA_MAP).
    pub reply: Vec<u8>,
    /// Windows the message removed; the caller releases their backing.
    pub removed: Vec<Window<B>>,
}

pub struct DmaTable<B> {
    /// Sorted by IOVA; windows never overlap.
    windows: Vec<Window<B>>,
    max_windows: usize,
    next_id: u64,
    log: Vec<Logged>,
}

impl<B: Backing> DmaTable<B> {
    pub fn new(max_windows: usize) -> Self {
        DmaTable { windows: Vec::new(), max_windows, next_id: 0, log: Vec::new() }
    }

    pub fn len(&self) -> usize {
        self.windows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Adds a window; `make` maps the fd (offset, size, protection) when
    /// there is one. An exact repeat of a live window (the same range,
    /// permissions, offset and file) is accepted and changes nothing, as
    /// QEMU re-sends maps and libvfio-user accepts them; any other overlap
    /// is EEXIST.
    pub fn map<E: Display>(
        &mut self,
        req: &MapRequest<'_>,
        make: impl FnOnce(BorrowedFd<'_>, u64, u64, Protection) -> Result<B, E>,
    ) -> Result<(), Refusal> {
        if req.size == 0 {
            return Err(refuse(Errno::INVAL, "size is 0"));
        }
        if req.iova.checked_add(req.size - 1).is_none() {
            return Err(refuse(Errno::INVAL, "iova + size wraps past 2^64"));
        }
        if !req.iova.is_multiple_of(PAGE) || !req.size.is_multiple_of(PAGE) {
            return Err(refuse(Errno::INVAL, "iova and size must be 4 KiB aligned"));
        }
        let at = self.lower_bound(req.iova);
        // Only the neighbours can overlap: windows never do.
        for w in &self.windows[at.saturating_sub(1)..(at + 1).min(self.windows.len())] {
            if !w.overlaps(req.iova, req.size) {
                continue;
            }
            if is_repeat(w, req) {
                return Ok(());
            }
            return Err(refuse(Errno::EXIST, format!("overlaps the window at {:#x}", w.iova)));
        }
        if self.windows.len() >= self.max_windows {
            return Err(refuse(Errno::NOSPC, format!("{} windows are mapped already", self.max_windows)));
        }
        let prot = Protection { read: req.readable, write: req.writable };
        let backing = match req.fd {
            Some(fd) => Some(make(fd, req.file_offset, req.size, prot).map_err(|e| refuse(Errno::INVAL, e.to_string()))?),
            None => None,
        };
        let id = self.next_id;
        self.next_id += 1;
        let window = Window {
            iova: req.iova,
            size: req.size,
            readable: req.readable,
            writable: req.writable,
            file_offset: req.file_offset,
            backing,
            id,
            announced: false,
        };
        self.windows.insert(at, window);
        self.log(Logged::Mapped { iova: req.iova, id });
        Ok(())
    }

    /// Removes the window that matches exactly; ENOENT when none does.
    pub fn unmap(&mut self, iova: u64, size: u64) -> Result<Window<B>, Refusal> {
        let at = self.lower_bound(iova);
        if !self.windows.get(at).is_some_and(|w| w.iova == iova && w.size == size) {
            return Err(refuse(Errno::NOENT, "no window matches exactly"));
        }
        let window = self.windows.remove(at);
        // A window the mirror never saw leaves nothing for it to undo.
        if window.announced {
            self.log(Logged::Unmapped { iova });
        }
        Ok(window)
    }

    /// Removes every window.
    pub fn unmap_all(&mut self) -> Vec<Window<B>> {
        let announced = self.windows.iter().any(|w| w.announced);
        // Whatever the log held is undone by this.
        let earlier_removal = self.log.iter().any(|l| !matches!(l, Logged::Mapped { .. }));
        self.log.clear();
        if announced || earlier_removal {
            self.log.push(Logged::UnmappedAll);
        }
        std::mem::take(&mut self.windows)
    }

    /// Applies a DMA_MAP or DMA_UNMAP message (`payload` after the header)
    /// that came with `fds` (which the caller closes after): the protocol's
    /// errno rules, then the change.
    pub fn apply_message<E: Display>(
        &mut self,
        command: u16,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
        make: impl FnOnce(BorrowedFd<'_>, u64, u64, Protection) -> Result<B, E>,
    ) -> Result<Applied<B>, Refusal> {
        match command {
            DMA_MAP => {
                let req = parse_map(payload, fds)?;
                self.map(&req, make)?;
                Ok(Applied { reply: Vec::new(), removed: Vec::new() })
            }
            DMA_UNMAP => {
                // SPDK's NVMe host attaches the window's fd to every DMA_UNMAP, and libvfio-user
                // accepts it: the fds mean nothing here.
                let unmap = parse_unmap(payload)?;
                let removed = if unmap.flags & UNMAP_ALL != 0 {
                    self.unmap_all()
                } else {
                    vec![self.unmap(unmap.iova, unmap.size)?]
                };
                let mut reply = Vec::with_capacity(UNMAP_SIZE);
                reply.extend_from_slice(&(UNMAP_SIZE as u32).to_le_bytes());
                reply.extend_from_slice(&unmap.flags.to_le_bytes());
                reply.extend_from_slice(&unmap.iova.to_le_bytes());
                reply.extend_from_slice(&unmap.size.to_le_bytes());
                Ok(Applied { reply, removed })
            }
            _ => Err(refuse(Errno::NOSYS, format!("command {command} is not DMA_MAP or DMA_UNMAP"))),
        }
    }

    /// Whether changes wait to be taken.
    pub fn has_changes(&self) -> bool {
        !self.log.is_empty()
    }

    /// Hands the changes since the last call to `apply`, in order, and
    /// forgets them. A window mapped and unmapped in between is skipped.
    pub fn take_changes(&mut self, mut apply: impl FnMut(Change<'_, B>)) {
        for logged in std::mem::take(&mut self.log) {
            match logged {
                Logged::Mapped { iova, id } => {
                    let at = self.lower_bound(iova);
                    if let Some(w) = self.windows.get_mut(at).filter(|w| w.id == id) {
                        w.announced = true;
                        apply(Change::Mapped(w));
                    }
                }
                Logged::Unmapped { iova } => apply(Change::Unmapped { iova }),
                Logged::UnmappedAll => apply(Change::UnmappedAll),
            }
        }
    }

    fn log(&mut self, entry: Logged) {
        self.log.push(entry);
        // A client that maps and unmaps while nobody takes the log leaves
        // entries of windows already gone: dropped once they outnumber the
        // live windows, so the log stays within a small multiple of the table.
        if self.log.len() > 2 * self.windows.len() + 64 {
            let windows = &self.windows;
            self.log.retain(|l| match l {
                Logged::Mapped { iova, id } => {
                    let at = windows.partition_point(|w| w.iova < *iova);
                    windows.get(at).is_some_and(|w| w.id == *id)
                }
                _ => true,
            });
        }
    }

    /// The first index whose window starts at or after `iova`.
    fn lower_bound(&self, iova: u64) -> usize {
        self.windows.partition_point(|w| w.iova < iova)
    }
}

/// Whether `req` repeats `w` exactly: the same range, permissions and file
/// offset, and the same file too (the same range backed by another file is a
/// new mapping). The new fd is looked up only here, so a map that overlaps
/// nothing costs no fstat of its own.
fn is_repeat<B: Backing>(w: &Window<B>, req: &MapRequest<'_>) -> bool {
    if (w.iova, w.size, w.readable, w.writable, w.file_offset) != (req.iova, req.size, req.readable, req.writable, req.file_offset) {
        return false;
    }
    match (&w.backing, req.fd) {
        (None, None) => true,
        (Some(b), Some(fd)) => memfd::file_identity(fd).is_ok_and(|file| file == b.file_identity()),
        _ => false,
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A DMA_MAP request's fields, checked in the order the TypeScript codec
/// and handler check them (the same errnos either way).
fn parse_map<'fd>(payload: &[u8], fds: &[BorrowedFd<'fd>]) -> Result<MapRequest<'fd>, Refusal> {
    if payload.len() < MAP_REQUEST_SIZE {
        return Err(refuse(Errno::INVAL, format!("DMA_MAP request needs {MAP_REQUEST_SIZE} bytes, got {}", payload.len())));
    }
    let argsz = u32_at(payload, 0);
    if (argsz as usize) < MAP_REQUEST_SIZE {
        return Err(refuse(Errno::INVAL, format!("argsz {argsz} < {MAP_REQUEST_SIZE}")));
    }
    if fds.len() > 1 {
        return Err(refuse(Errno::INVAL, "at most one fd"));
    }
    let flags = u32_at(payload, 4);
    if flags & MAP_FILE_IO != 0 {
        return Err(refuse(Errno::NOTSUP, "FILE_IO maps are not supported"));
    }
    if flags & !(MAP_READ | MAP_WRITE | MAP_MMAP) != 0 {
        return Err(refuse(Errno::INVAL, format!("unknown flags {flags:#x}")));
    }
    let fd = fds.first().copied();
    if fd.is_none() && flags & MAP_MMAP != 0 {
        return Err(refuse(Errno::INVAL, "MMAP without an fd"));
    }
    Ok(MapRequest {
        iova: u64_at(payload, 16),
        size: u64_at(payload, 24),
        readable: flags & MAP_READ != 0,
        writable: flags & MAP_WRITE != 0,
        fd,
        // Without an fd the offset means nothing.
        file_offset: if fd.is_some() { u64_at(payload, 8) } else { 0 },
    })
}

struct UnmapRequest {
    flags: u32,
    iova: u64,
    size: u64,
}

/// A DMA_UNMAP request's fields. The legacy (migration v1) dirty bitmap is
/// refused: EINVAL when malformed, ENOTSUP otherwise.
fn parse_unmap(payload: &[u8]) -> Result<UnmapRequest, Refusal> {
    if payload.len() < UNMAP_SIZE {
        return Err(refuse(Errno::INVAL, format!("DMA_UNMAP request needs {UNMAP_SIZE} bytes, got {}", payload.len())));
    }
    let argsz = u32_at(payload, 0);
    if (argsz as usize) < UNMAP_SIZE {
        return Err(refuse(Errno::INVAL, format!("argsz {argsz} < {UNMAP_SIZE}")));
    }
    let req = UnmapRequest { flags: u32_at(payload, 4), iova: u64_at(payload, 8), size: u64_at(payload, 16) };
    let all = req.flags & UNMAP_ALL != 0;
    if req.flags & UNMAP_GET_DIRTY_BITMAP != 0 {
        let with_bitmap = UNMAP_SIZE + BITMAP_HEADER_SIZE;
        if payload.len() < with_bitmap {
            return Err(refuse(Errno::INVAL, format!("DMA_UNMAP with dirty bitmap needs {with_bitmap} bytes, got {}", payload.len())));
        }
        let bitmap_size = u64_at(payload, 32);
        if bitmap_size > MAX_SAFE_INTEGER {
            return Err(refuse(Errno::INVAL, format!("bitmap size {bitmap_size} is too large")));
        }
        if all {
            return Err(refuse(Errno::INVAL, "GET_DIRTY_BITMAP with ALL"));
        }
        return Err(refuse(Errno::NOTSUP, "migration v1 dirty bitmaps are not supported"));
    }
    if all && (req.iova != 0 || req.size != 0) {
        return Err(refuse(Errno::INVAL, "ALL needs address and size 0"));
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmap::Mapping;
    use std::os::fd::{AsFd, OwnedFd};

    impl Backing for Mapping {
        fn file_identity(&self) -> (u64, u64) {
            Mapping::file_identity(self)
        }
    }

    fn memfd(size: u64) -> OwnedFd {
        memfd::create("dma-table-test", size).unwrap()
    }

    fn make(fd: BorrowedFd<'_>, offset: u64, size: u64, prot: Protection) -> Result<Mapping, crate::MappingError> {
        Mapping::new(fd, offset, size, prot)
    }

    fn req(iova: u64, size: u64, fd: Option<BorrowedFd<'_>>) -> MapRequest<'_> {
        MapRequest { iova, size, readable: true, writable: true, fd, file_offset: 0 }
    }

    fn map_payload(flags: u32, offset: u64, iova: u64, size: u64) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&32u32.to_le_bytes());
        p.extend_from_slice(&flags.to_le_bytes());
        for v in [offset, iova, size] {
            p.extend_from_slice(&v.to_le_bytes());
        }
        p
    }

    fn unmap_payload(flags: u32, iova: u64, size: u64) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&24u32.to_le_bytes());
        p.extend_from_slice(&flags.to_le_bytes());
        p.extend_from_slice(&iova.to_le_bytes());
        p.extend_from_slice(&size.to_le_bytes());
        p
    }

    fn errno_of<T>(r: Result<T, Refusal>) -> Errno {
        r.err().expect("refused").errno
    }

    /// The changes as (kind, iova) pairs.
    fn changes(t: &mut DmaTable<Mapping>) -> Vec<(&'static str, u64)> {
        let mut out = Vec::new();
        t.take_changes(|c| {
            out.push(match c {
                Change::Mapped(w) => ("map", w.iova),
                Change::Unmapped { iova } => ("unmap", iova),
                Change::UnmappedAll => ("all", 0),
            })
        });
        out
    }

    #[test]
    fn maps_with_and_without_fd_and_unmaps_exactly() {
        let fd = memfd(0x4000);
        let mut t = DmaTable::<Mapping>::new(8);
        t.map(&req(0x10000, 0x4000, Some(fd.as_fd())), make).unwrap();
        t.map(&req(0x20000, 0x1000, None), make).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(errno_of(t.unmap(0x10000, 0x1000)), Errno::NOENT);
        assert_eq!(errno_of(t.unmap(0x11000, 0x3000)), Errno::NOENT);
        let w = t.unmap(0x10000, 0x4000).unwrap();
        assert!(w.backing.is_some());
        assert!(t.unmap(0x20000, 0x1000).unwrap().backing.is_none());
        assert!(t.is_empty());
    }

    #[test]
    fn refuses_bad_ranges() {
        let mut t = DmaTable::<Mapping>::new(8);
        assert_eq!(errno_of(t.map(&req(0x1000, 0, None), make)), Errno::INVAL);
        assert_eq!(errno_of(t.map(&req(u64::MAX - 0xfff, 0x2000, None), make)), Errno::INVAL);
        assert_eq!(errno_of(t.map(&req(0x1800, 0x1000, None), make)), Errno::INVAL);
        assert_eq!(errno_of(t.map(&req(0x1000, 0x800, None), make)), Errno::INVAL);
        // The last page of the address space is a valid window.
        t.map(&req(u64::MAX - 0xfff, 0x1000, None), make).unwrap();
        // A file too short for the window: the mapping refuses, EINVAL.
        let short = memfd(0x1000);
        assert_eq!(errno_of(t.map(&req(0x4000, 0x2000, Some(short.as_fd())), make)), Errno::INVAL);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn overlaps_are_eexist_and_exact_repeats_are_accepted() {
        let (a, b) = (memfd(0x4000), memfd(0x4000));
        let mut t = DmaTable::<Mapping>::new(8);
        t.map(&req(0x10000, 0x2000, Some(a.as_fd())), make).unwrap();
        changes(&mut t);
        // The same window of the same file (another fd of it, as a client re-sends).
        let again = a.try_clone().unwrap();
        t.map(&req(0x10000, 0x2000, Some(again.as_fd())), make).unwrap();
        assert_eq!(t.len(), 1);
        assert!(!t.has_changes(), "a repeat changes nothing");
        // Another file, other permissions, another offset, a neighbour's page: EEXIST.
        assert_eq!(errno_of(t.map(&req(0x10000, 0x2000, Some(b.as_fd())), make)), Errno::EXIST);
        let read_only = MapRequest { writable: false, ..req(0x10000, 0x2000, Some(a.as_fd())) };
        assert_eq!(errno_of(t.map(&read_only, make)), Errno::EXIST);
        let moved = MapRequest { file_offset: 0x1000, ..req(0x10000, 0x2000, Some(a.as_fd())) };
        assert_eq!(errno_of(t.map(&moved, make)), Errno::EXIST);
        assert_eq!(errno_of(t.map(&req(0xf000, 0x2000, None), make)), Errno::EXIST);
        assert_eq!(errno_of(t.map(&req(0x11000, 0x1000, None), make)), Errno::EXIST);
        assert_eq!(errno_of(t.map(&req(0x10000, 0x2000, None), make)), Errno::EXIST);
        // Touching is not overlapping.
        t.map(&req(0xf000, 0x1000, None), make).unwrap();
        t.map(&req(0x12000, 0x1000, None), make).unwrap();
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn at_most_max_windows() {
        let mut t = DmaTable::<Mapping>::new(2);
        t.map(&req(0x1000, 0x1000, None), make).unwrap();
        t.map(&req(0x2000, 0x1000, None), make).unwrap();
        assert_eq!(errno_of(t.map(&req(0x3000, 0x1000, None), make)), Errno::NOSPC);
        // A repeat is not a new window.
        t.map(&req(0x2000, 0x1000, None), make).unwrap();
    }

    #[test]
    fn changes_come_in_order_and_skip_windows_already_gone() {
        let mut t = DmaTable::<Mapping>::new(8);
        t.map(&req(0x1000, 0x1000, None), make).unwrap();
        t.map(&req(0x2000, 0x1000, None), make).unwrap();
        t.unmap(0x2000, 0x1000).unwrap();
        assert_eq!(changes(&mut t), [("map", 0x1000)]);
        assert!(!t.has_changes());
        // An announced window unmapped, then another at its IOVA.
        t.unmap(0x1000, 0x1000).unwrap();
        t.map(&req(0x1000, 0x1000, None), make).unwrap();
        assert_eq!(changes(&mut t), [("unmap", 0x1000), ("map", 0x1000)]);
        // Unmapped and mapped again before anyone looked: only the live one.
        t.unmap(0x1000, 0x1000).unwrap();
        t.map(&req(0x1000, 0x1000, None), make).unwrap();
        t.unmap(0x1000, 0x1000).unwrap();
        t.map(&req(0x1000, 0x1000, None), make).unwrap();
        assert_eq!(changes(&mut t), [("unmap", 0x1000), ("map", 0x1000)]);
    }

    #[test]
    fn unmap_all_replaces_what_came_before() {
        let mut t = DmaTable::<Mapping>::new(8);
        t.map(&req(0x1000, 0x1000, None), make).unwrap();
        t.unmap_all();
        assert!(!t.has_changes(), "nothing was announced");
        t.map(&req(0x1000, 0x1000, None), make).unwrap();
        changes(&mut t);
        t.map(&req(0x2000, 0x1000, None), make).unwrap();
        assert_eq!(t.unmap_all().len(), 2);
        t.map(&req(0x3000, 0x1000, None), make).unwrap();
        assert_eq!(changes(&mut t), [("all", 0), ("map", 0x3000)]);
    }

    #[test]
    fn the_log_stays_small_while_nobody_takes_it() {
        let mut t = DmaTable::<Mapping>::new(8);
        t.map(&req(0x1000, 0x1000, None), make).unwrap();
        changes(&mut t);
        t.unmap(0x1000, 0x1000).unwrap();
        for _ in 0..10_000 {
            t.map(&req(0x2000, 0x1000, None), make).unwrap();
            t.unmap(0x2000, 0x1000).unwrap();
        }
        t.map(&req(0x3000, 0x1000, None), make).unwrap();
        assert!(t.log.len() <= 2 * t.len() + 65);
        assert_eq!(changes(&mut t), [("unmap", 0x1000), ("map", 0x3000)]);
    }

    #[test]
    fn map_messages_follow_the_protocol_rules() {
        let fd = memfd(0x2000);
        let fds = [fd.as_fd()];
        let two = [fd.as_fd(), fd.as_fd()];
        let mut t = DmaTable::<Mapping>::new(8);
        let rw = MAP_READ | MAP_WRITE;
        let mut apply = |p: &[u8], fds: &[BorrowedFd<'_>]| t.apply_message(DMA_MAP, p, fds, make).map(|_| ());
        assert_eq!(errno_of(apply(&map_payload(rw, 0, 0x1000, 0x1000)[..31], &fds)), Errno::INVAL);
        let mut small_argsz = map_payload(rw, 0, 0x1000, 0x1000);
        small_argsz[0] = 31;
        assert_eq!(errno_of(apply(&small_argsz, &fds)), Errno::INVAL);
        assert_eq!(errno_of(apply(&map_payload(rw, 0, 0x1000, 0x1000), &two)), Errno::INVAL);
        assert_eq!(errno_of(apply(&map_payload(rw | MAP_FILE_IO, 0, 0x1000, 0x1000), &fds)), Errno::NOTSUP);
        assert_eq!(errno_of(apply(&map_payload(rw | 1 << 9, 0, 0x1000, 0x1000), &fds)), Errno::INVAL);
        assert_eq!(errno_of(apply(&map_payload(rw | MAP_MMAP, 0, 0x1000, 0x1000), &[])), Errno::INVAL);
        apply(&map_payload(rw | MAP_MMAP, 0x1000, 0x1000, 0x1000), &fds).unwrap();
        // Longer payloads (a larger argsz) are fine.
        let mut longer = map_payload(rw, 0, 0x8000, 0x1000);
        longer[0] = 40;
        longer.extend_from_slice(&[0; 8]);
        apply(&longer, &[]).unwrap();
        let mut offsets = Vec::new();
        t.take_changes(|c| {
            if let Change::Mapped(w) = c {
                offsets.push((w.iova, w.file_offset, w.backing.is_some()));
            }
        });
        assert_eq!(offsets, [(0x1000, 0x1000, true), (0x8000, 0, false)]);
    }

    #[test]
    fn unmap_messages_follow_the_protocol_rules() {
        let mut t = DmaTable::<Mapping>::new(8);
        t.map(&req(0x1000, 0x1000, None), make).unwrap();
        t.map(&req(0x2000, 0x1000, None), make).unwrap();
        let mut apply = |p: &[u8]| t.apply_message(DMA_UNMAP, p, &[], make);
        assert_eq!(errno_of(apply(&unmap_payload(0, 0x1000, 0x1000)[..23])), Errno::INVAL);
        let mut small_argsz = unmap_payload(0, 0x1000, 0x1000);
        small_argsz[0] = 23;
        assert_eq!(errno_of(apply(&small_argsz)), Errno::INVAL);
        assert_eq!(errno_of(apply(&unmap_payload(UNMAP_GET_DIRTY_BITMAP, 0x1000, 0x1000))), Errno::INVAL);
        let mut bitmap = unmap_payload(UNMAP_GET_DIRTY_BITMAP, 0x1000, 0x1000);
        bitmap.extend_from_slice(&4096u64.to_le_bytes());
        bitmap.extend_from_slice(&8u64.to_le_bytes());
        assert_eq!(errno_of(apply(&bitmap)), Errno::NOTSUP);
        bitmap[4] |= UNMAP_ALL as u8;
        assert_eq!(errno_of(apply(&bitmap)), Errno::INVAL);
        assert_eq!(errno_of(apply(&unmap_payload(UNMAP_ALL, 0x1000, 0))), Errno::INVAL);
        assert_eq!(errno_of(apply(&unmap_payload(0, 0x1000, 0x2000))), Errno::NOENT);
        let one = apply(&unmap_payload(0, 0x1000, 0x1000)).unwrap();
        assert_eq!(one.reply, unmap_payload(0, 0x1000, 0x1000));
        assert_eq!(one.removed.len(), 1);
        let all = apply(&unmap_payload(UNMAP_ALL, 0, 0)).unwrap();
        assert_eq!(all.reply, unmap_payload(UNMAP_ALL, 0, 0));
        assert_eq!(all.removed.len(), 1);
        assert!(t.is_empty());
    }
}
