//! Shared mappings of fds passed by a peer (guest memory, shareable BARs).
//! Copies through a mapping survive the file shrinking under it (they fail
//! with `Fault`), and every byte written through one is marked in its dirty
//! bitmap.

use crate::dirty::DirtyBitmap;
use crate::safe_copy;
use rustix::fd::AsFd;
use rustix::mm::{mmap, munmap, MapFlags, ProtFlags};
use std::ptr::NonNull;

/// What the mapping may be used for; mirrors DMA_MAP's READ/WRITE flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protection {
    pub read: bool,
    pub write: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MappingError {
    #[error("mapping size must be non-zero")]
    Empty,
    #[error("offset {offset} + size {size} is beyond the end of the file ({file_size} bytes)")]
    BeyondFile { offset: u64, size: u64, file_size: u64 },
    #[error("access at {offset} of {len} bytes is outside the {size}-byte mapping")]
    OutOfBounds { offset: u64, len: u64, size: u64 },
    #[error("the word at {offset} is not aligned to 4 bytes in memory")]
    Unaligned { offset: u64 },
    #[error("the mapping is not {0}")]
    Forbidden(&'static str),
    #[error("the backing file no longer covers {len} bytes at {offset} (it was truncated)")]
    Fault { offset: u64, len: u64 },
    #[error("mmap failed: {0}")]
    Os(#[from] rustix::io::Errno),
}

impl MappingError {
    /// The errno that names this failure: EFAULT for memory that cannot be
    /// reached (out of bounds, truncated), EPERM for a missing permission.
    pub fn errno(&self) -> rustix::io::Errno {
        use rustix::io::Errno;
        match self {
            MappingError::Empty | MappingError::BeyondFile { .. } | MappingError::Unaligned { .. } => Errno::INVAL,
            MappingError::OutOfBounds { .. } | MappingError::Fault { .. } => Errno::FAULT,
            MappingError::Forbidden(_) => Errno::PERM,
            MappingError::Os(e) => *e,
        }
    }
}

/// A MAP_SHARED mapping, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    base: NonNull<u8>,
    /// Distance from `base` to the first byte the caller asked for: mmap
    /// needs a page-aligned (huge-page-aligned on hugetlbfs) file offset,
    /// the protocol does not promise one.
    lead: usize,
    len: usize,
    /// The whole mapping from `base`: `lead + len` rounded up to whole pages.
    mapped: usize,
    prot: Protection,
    dirty: DirtyBitmap,
    /// The file was sealed against shrinking when mapped, so no page of the
    /// mapping can ever fault: plain loads and stores are safe.
    size_sealed: bool,
    /// Device and inode of the file mapped.
    file: (u64, u64),
}

// SAFETY: the mapping is plain shared memory; it is owned (unmapped once) by
// this value, and accesses go through bounds-checked copies.
unsafe impl Send for Mapping {}
// SAFETY: every `&self` access is a bounds-checked copy (or an atomic load)
// of memory a peer writes concurrently anyway, and the dirty bitmap is
// atomic; nothing is cached outside the shared memory. A thread that watches
// a mapping (doorbells) reads it while its owner copies through it, and block
// I/O shares it (with the kernel) through `Arc` for the I/O's lifetime.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `size` bytes of `fd` from `offset`, refusing ranges past the end
    /// of the file (the first touch of such a page would SIGBUS the process).
    pub fn new(fd: impl AsFd, offset: u64, size: u64, prot: Protection) -> Result<Self, MappingError> {
        if size == 0 {
            return Err(MappingError::Empty);
        }
        // One fstat serves the bounds check and the file's identity (a DMA_MAP costs this per I/O
        // behind a vIOMMU).
        let stat = crate::memfd::file_stat(&fd)?;
        if offset.checked_add(size).is_none_or(|end| end > stat.size) {
            return Err(MappingError::BeyondFile { offset, size, file_size: stat.size });
        }
        let granule = map_granule(&fd)?;
        let lead = offset % granule;
        let len = usize::try_from(size).map_err(|_| MappingError::Os(rustix::io::Errno::NOMEM))?;
        // Huge pages are unmapped whole too (munmap rejects a partial one).
        let mapped = usize::try_from((lead + size).div_ceil(granule) * granule).map_err(|_| MappingError::Os(rustix::io::Errno::NOMEM))?;
        let mut flags = ProtFlags::empty();
        if prot.read {
            flags |= ProtFlags::READ;
        }
        if prot.write {
            flags |= ProtFlags::WRITE;
        }
        let size_sealed = crate::memfd::cannot_shrink(&fd);
        if !size_sealed {
            safe_copy::reassert();
        }
        // SAFETY: a fresh shared mapping at an address of the kernel's choice
        // aliases no Rust object.
        let ptr = unsafe {
            mmap(std::ptr::null_mut(), mapped, flags, MapFlags::SHARED, fd, offset - lead)?
        };
        Ok(Mapping {
            base: NonNull::new(ptr.cast()).expect("mmap returned null"),
            lead: lead as usize,
            len,
            mapped,
            prot,
            dirty: DirtyBitmap::new(size),
            size_sealed,
            file: stat.identity,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn protection(&self) -> Protection {
        self.prot
    }

    /// Device and inode of the file mapped (as `memfd::file_identity` gives them).
    pub fn file_identity(&self) -> (u64, u64) {
        self.file
    }

    /// Whether the backing file can never shrink under this mapping.
    pub fn size_sealed(&self) -> bool {
        self.size_sealed
    }

    /// The first byte of the requested range.
    pub fn as_ptr(&self) -> *mut u8 {
        // SAFETY: lead is within the mapping.
        unsafe { self.base.as_ptr().add(self.lead) }
    }

    fn check(&self, offset: u64, len: usize) -> Result<usize, MappingError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.len as u64 => Ok(offset as usize),
            _ => Err(MappingError::OutOfBounds { offset, len: len as u64, size: self.len as u64 }),
        }
    }

    /// Pages written through this mapping (by copies, or by views the
    /// binding handed out for writing and marked).
    pub fn dirty(&self) -> &DirtyBitmap {
        &self.dirty
    }

    /// Copies `out.len()` bytes from `offset` of the mapping.
    pub fn read_at(&self, offset: u64, out: &mut [u8]) -> Result<(), MappingError> {
        // SAFETY: `out` is valid for writes of its length.
        unsafe { self.read_to_ptr(offset, out.as_mut_ptr(), out.len()) }
    }

    /// Copies `len` bytes from `offset` of the mapping to `out`, which may be
    /// memory someone else writes meanwhile (a view of guest memory): no
    /// reference is ever formed over it.
    ///
    /// # Safety
    /// `out` must be valid for writes of `len` bytes for the whole call.
    pub unsafe fn read_to_ptr(&self, offset: u64, out: *mut u8, len: usize) -> Result<(), MappingError> {
        let at = self.readable(offset, len)?;
        // SAFETY: in bounds and mapped (self is alive), `out` valid per the
        // caller; the peer may write concurrently, which makes the bytes racy
        // but the copy sound.
        unsafe { safe_copy::copy(out, self.as_ptr().add(at), len) }.map_err(|_| MappingError::Fault { offset, len: len as u64 })
    }

    /// The aligned 32-bit word at `offset`, read in one access (never torn,
    /// as a doorbell register is), with acquire ordering: what the writer
    /// stored before it is visible after.
    pub fn load_u32(&self, offset: u64) -> Result<u32, MappingError> {
        let at = self.readable(offset, 4)?;
        // SAFETY: in bounds.
        let ptr = unsafe { self.as_ptr().add(at) };
        if !(ptr as usize).is_multiple_of(4) {
            return Err(MappingError::Unaligned { offset });
        }
        if self.size_sealed {
            // SAFETY: in bounds, aligned, and the file cannot shrink, so the
            // load cannot fault; an atomic load is sound on memory another
            // process stores to.
            let word = unsafe { &*(ptr as *const std::sync::atomic::AtomicU32) };
            return Ok(word.load(std::sync::atomic::Ordering::Acquire));
        }
        let mut out = [0u8; 4];
        self.read_at(offset, &mut out)?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        Ok(u32::from_ne_bytes(out))
    }

    /// Copies `data` to `offset` of the mapping and marks the pages dirty.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), MappingError> {
        // SAFETY: `data` is valid for reads of its length.
        unsafe { self.write_from_ptr(offset, data.as_ptr(), data.len()) }
    }

    /// Copies `len` bytes from `data`, which may be memory someone else
    /// writes meanwhile, to `offset` of the mapping and marks the pages dirty.
    ///
    /// # Safety
    /// `data` must be valid for reads of `len` bytes for the whole call.
    pub unsafe fn write_from_ptr(&self, offset: u64, data: *const u8, len: usize) -> Result<(), MappingError> {
        let at = self.writable(offset, len)?;
        self.dirty.mark(offset, len as u64);
        // SAFETY: in bounds, mapped and writable; `data` valid per the caller.
        unsafe { safe_copy::copy(self.as_ptr().add(at), data, len) }.map_err(|_| MappingError::Fault { offset, len: len as u64 })
    }

    /// Copies `len` bytes from `offset` of this mapping to `to_offset` of
    /// `to` (which may be this mapping; the ranges may overlap).
    pub fn copy_to(&self, offset: u64, to: &Mapping, to_offset: u64, len: usize) -> Result<(), MappingError> {
        let from = self.readable(offset, len)?;
        let at = to.writable(to_offset, len)?;
        to.dirty.mark(to_offset, len as u64);
        // SAFETY: both ranges in bounds of live mappings; the target is writable.
        unsafe { safe_copy::copy(to.as_ptr().add(at), self.as_ptr().add(from), len) }
            // Either side may be the truncated one; name the source range.
            .map_err(|_| MappingError::Fault { offset, len: len as u64 })
    }

    fn readable(&self, offset: u64, len: usize) -> Result<usize, MappingError> {
        if !self.prot.read {
            return Err(MappingError::Forbidden("readable"));
        }
        self.check(offset, len)
    }

    fn writable(&self, offset: u64, len: usize) -> Result<usize, MappingError> {
        if !self.prot.write {
            return Err(MappingError::Forbidden("writable"));
        }
        self.check(offset, len)
    }
}

/// hugetlbfs's magic number (statfs f_type): files of huge pages, such as
/// QEMU's guest RAM with `hugetlb=on` or on a hugetlbfs mount.
const HUGETLBFS_MAGIC: u64 = 0x9584_58f6;

/// What an mmap of `fd` must be aligned to: the huge page size for a file on
/// hugetlbfs (mmap refuses offsets within a huge page), else the page size.
fn map_granule(fd: impl AsFd) -> Result<u64, MappingError> {
    let fs = rustix::fs::fstatfs(fd)?;
    if fs.f_type as u64 == HUGETLBFS_MAGIC {
        Ok(fs.f_bsize as u64)
    } else {
        Ok(rustix::param::page_size() as u64)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: base and mapped are exactly what mmap returned.
        let _ = unsafe { munmap(self.base.as_ptr().cast(), self.mapped) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    const RW: Protection = Protection { read: true, write: true };

    #[test]
    fn two_mappings_of_one_memfd_share_bytes() {
        let fd = crate::memfd::create("t", 8192).unwrap();
        let a = Mapping::new(&fd, 4096, 4096, RW).unwrap();
        let b = Mapping::new(&fd, 0, 8192, RW).unwrap();
        a.write_at(10, b"hello").unwrap();
        let mut out = [0u8; 5];
        b.read_at(4096 + 10, &mut out).unwrap();
        assert_eq!(&out, b"hello");
    }

    /// A memfd of 2 MiB huge pages, as QEMU's `memory-backend-memfd,hugetlb=on`
    /// makes guest RAM; None when the machine has no two huge pages free.
    fn hugetlb_memfd(size: u64) -> Option<rustix::fd::OwnedFd> {
        use rustix::fs::{ftruncate, memfd_create, MemfdFlags};
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let free: u64 = meminfo.lines().find_map(|l| l.strip_prefix("HugePages_Free:"))?.trim().parse().ok()?;
        if free < size / (2 << 20) {
            return None;
        }
        let fd = memfd_create("huge", MemfdFlags::CLOEXEC | MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB).ok()?;
        ftruncate(&fd, size).ok()?;
        Some(fd)
    }

    #[test]
    fn maps_a_huge_page_file_from_offsets_inside_a_huge_page() {
        let Some(fd) = hugetlb_memfd(4 << 20) else {
            eprintln!("skipped: no two free 2 MiB huge pages (/proc/sys/vm/nr_hugepages)");
            return;
        };
        assert_eq!(map_granule(&fd).unwrap(), 2 << 20);
        // QEMU maps guest RAM below 1 MiB in pieces: 0-0xc0000, then 0xc0000 on.
        let a = Mapping::new(&fd, 0xc_0000, 0x2_0000, RW).unwrap();
        let b = Mapping::new(&fd, 0, 4 << 20, RW).unwrap();
        let c = Mapping::new(&fd, (2 << 20) + 0x1000, 0x1000, RW).unwrap();
        a.write_at(0x10, b"huge").unwrap();
        c.write_at(0, b"page").unwrap();
        let mut out = [0u8; 4];
        b.read_at(0xc_0010, &mut out).unwrap();
        assert_eq!(&out, b"huge");
        b.read_at((2 << 20) + 0x1000, &mut out).unwrap();
        assert_eq!(&out, b"page");
        // A piece is unmapped whole (munmap refuses part of a huge page).
        let start = format!("{:x}-", a.as_ptr() as usize & !((2 << 20) - 1));
        let mapped = || std::fs::read_to_string("/proc/self/maps").unwrap().lines().any(|l| l.starts_with(&start));
        assert!(mapped());
        drop(a);
        assert!(!mapped(), "the mapping at {start} outlived its Mapping");
    }

    #[test]
    fn knows_which_file_it_maps() {
        let fd = crate::memfd::create("t", 8192).unwrap();
        let other = crate::memfd::create("u", 8192).unwrap();
        let m = Mapping::new(&fd, 4096, 4096, RW).unwrap();
        assert_eq!(m.file_identity(), crate::memfd::file_identity(&fd).unwrap());
        assert_ne!(m.file_identity(), crate::memfd::file_identity(&other).unwrap());
    }

    #[test]
    fn unaligned_file_offsets_are_honoured() {
        let fd = crate::memfd::create("t", 8192).unwrap();
        let whole = Mapping::new(&fd, 0, 8192, RW).unwrap();
        whole.write_at(100, &[7, 8, 9]).unwrap();
        let part = Mapping::new(&fd, 100, 16, RW).unwrap();
        let mut out = [0u8; 3];
        part.read_at(0, &mut out).unwrap();
        assert_eq!(out, [7, 8, 9]);
    }

    #[test]
    fn refuses_ranges_past_the_file_and_empty_ones() {
        let fd = crate::memfd::create("t", 4096).unwrap();
        assert!(matches!(Mapping::new(&fd, 0, 8192, RW), Err(MappingError::BeyondFile { .. })));
        assert!(matches!(Mapping::new(&fd, u64::MAX, 2, RW), Err(MappingError::BeyondFile { .. })));
        assert_eq!(Mapping::new(&fd, 0, 0, RW).unwrap_err(), MappingError::Empty);
    }

    #[test]
    fn accesses_are_bounds_and_permission_checked() {
        let fd = crate::memfd::create("t", 4096).unwrap();
        let m = Mapping::new(&fd, 0, 4096, Protection { read: true, write: false }).unwrap();
        let mut out = [0u8; 8];
        assert!(matches!(m.read_at(4090, &mut out), Err(MappingError::OutOfBounds { .. })));
        assert!(matches!(m.read_at(u64::MAX, &mut out), Err(MappingError::OutOfBounds { .. })));
        assert_eq!(m.write_at(0, &[1]).unwrap_err(), MappingError::Forbidden("writable"));
        m.read_at(4088, &mut out).unwrap();
        assert_eq!(m.write_at(0, &[1]).unwrap_err().errno(), rustix::io::Errno::PERM);
    }

    #[test]
    fn writes_and_copies_mark_pages_dirty() {
        let fd = crate::memfd::create("t", 4 * 4096).unwrap();
        let a = Mapping::new(&fd, 0, 2 * 4096, RW).unwrap();
        let b = Mapping::new(&fd, 2 * 4096, 2 * 4096, RW).unwrap();
        a.write_at(4090, b"abcdefgh").unwrap();
        assert!(a.dirty().is_dirty(0) && a.dirty().is_dirty(1));
        let mut out = [0u8; 8];
        a.read_at(4090, &mut out).unwrap();
        a.copy_to(4090, &b, 4096 + 5, 8).unwrap();
        assert!(!b.dirty().is_dirty(0) && b.dirty().is_dirty(1));
        b.read_at(4096 + 5, &mut out).unwrap();
        assert_eq!(&out, b"abcdefgh");
    }

    #[test]
    fn copies_within_one_mapping_may_overlap() {
        let fd = crate::memfd::create("t", 4096).unwrap();
        let m = Mapping::new(&fd, 0, 4096, RW).unwrap();
        m.write_at(0, b"0123456789").unwrap();
        m.copy_to(0, &m, 2, 8).unwrap();
        let mut out = [0u8; 10];
        m.read_at(0, &mut out).unwrap();
        assert_eq!(&out, b"0101234567");
    }
}
