//! Asynchronous block I/O between a file (or block device) and guest memory.
//!
//! Reads land in the guest's pages and writes leave from them: the kernel is
//! handed iovecs that point into the DMA windows' mmaps, so no byte is copied
//! by us. Requests go to io_uring where the kernel offers it, or to a small
//! pool of threads making the same calls (preadv, pwritev, fdatasync,
//! fallocate) where io_uring is missing or refused (seccomp, old kernels,
//! `io_uring_disabled`). Either way completions are collected in a queue and
//! announced on one eventfd, so the caller's event loop wakes once per batch.
//!
//! A read or write that needs no device I/O is served within `submit`, on
//! the caller's thread, as io_uring itself would serve it: buffered requests
//! are tried with RWF_NOWAIT (done at once when the pages are cached), and a
//! file in memory (tmpfs, ramfs, hugetlbfs: no device behind it; tmpfs does
//! not take RWF_NOWAIT) is copied at once. Handing such a request to a
//! kernel worker or one of our threads costs more than the copy: two thread
//! switches and a wake-up of the caller's loop.
//!
//! A request holds an `Arc` of every mapping it touches until it completes:
//! a window unmapped while I/O into it is in flight stays mapped in this
//! process until then, so the kernel never writes to memory we gave back.

mod job;
mod threads;
mod uring;

use crate::mmap::{Mapping, MappingError};
use job::{Inline, Job};
use rustix::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, StatxFlags};
use rustix::io::Errno;
use std::path::Path;
use std::sync::Arc;

/// Which engine moves the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    IoUring,
    Threads,
}

/// Which engine to use: io_uring when the kernel lets us (`Auto`), or one in particular.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineChoice {
    Auto,
    Only(Engine),
}

#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// O_DIRECT: bypass the page cache; every request must then be aligned (`Alignment`).
    pub direct: bool,
    pub read_only: bool,
    pub engine: EngineChoice,
    /// Requests in flight at most; more are refused with `Errno::AGAIN`.
    pub depth: u32,
}

/// What O_DIRECT asks of a request: its file offset and length are multiples
/// of `offset`, and every memory segment's address and length of `memory`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alignment {
    pub memory: u32,
    pub offset: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    #[error("cannot open {path}: {errno}")]
    Open { path: String, errno: Errno },
    #[error("{path}: the filesystem refuses O_DIRECT; open it without `direct`")]
    DirectRefused { path: String },
    #[error("{path} is neither a regular file nor a block device")]
    NotBlock { path: String },
    #[error("queue depth {0} is outside 1..={MAX_DEPTH}")]
    Depth(u32),
    #[error("io_uring is unavailable here ({0}); the thread engine works everywhere")]
    NoUring(Errno),
    #[error("cannot set up the queue: {0}")]
    Setup(Errno),
}

impl OpenError {
    pub fn errno(&self) -> Errno {
        match self {
            OpenError::Open { errno, .. } => *errno,
            OpenError::DirectRefused { .. } | OpenError::Depth(_) => Errno::INVAL,
            OpenError::NotBlock { .. } => Errno::NODEV,
            OpenError::NoUring(e) | OpenError::Setup(e) => *e,
        }
    }
}

/// The deepest queue a device may ask for (io_uring's SQ is sized to it).
pub const MAX_DEPTH: u32 = 4096;

/// Whether a segment of guest memory is written (a read from the file lands
/// in it) or read (a write to the file leaves from it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    IntoMemory,
    FromMemory,
}

/// A piece of guest memory a request moves data to or from, bounds- and
/// permission-checked against its window, which it keeps mapped.
#[derive(Debug)]
pub struct Segment {
    mapping: Arc<Mapping>,
    offset: u64,
    len: usize,
}

impl Segment {
    /// `len` bytes at `offset` of `mapping`: `OutOfBounds` (EFAULT) past the
    /// window, `Forbidden` (EPERM) when the window lacks the access.
    pub fn new(mapping: &Arc<Mapping>, offset: u64, len: usize, direction: Direction) -> Result<Segment, MappingError> {
        let prot = mapping.protection();
        match direction {
            Direction::IntoMemory if !prot.write => return Err(MappingError::Forbidden("writable")),
            Direction::FromMemory if !prot.read => return Err(MappingError::Forbidden("readable")),
            _ => {}
        }
        if offset.checked_add(len as u64).is_none_or(|end| end > mapping.len() as u64) {
            return Err(MappingError::OutOfBounds { offset, len: len as u64, size: mapping.len() as u64 });
        }
        Ok(Segment { mapping: mapping.clone(), offset, len })
    }

    fn address(&self) -> *mut u8 {
        // SAFETY: in bounds (checked in `new`) of a mapping this segment keeps alive.
        unsafe { self.mapping.as_ptr().add(self.offset as usize) }
    }
}

/// One request. Offsets and lengths are bytes of the file.
#[derive(Debug)]
pub enum Request {
    Read { at: u64, segments: Vec<Segment> },
    Write { at: u64, segments: Vec<Segment> },
    /// fdatasync: completed writes become durable.
    Flush,
    /// Deallocates the range (it reads as zeros after); where the filesystem
    /// cannot punch holes, zeros are written instead.
    Discard { at: u64, len: u64 },
    /// The range reads as zeros after: FALLOC_FL_ZERO_RANGE, or writes of
    /// zeros where the filesystem lacks it.
    WriteZeroes { at: u64, len: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub tag: u64,
    pub result: Result<(), Errno>,
}

/// The open file and what requests on it must respect.
#[derive(Debug)]
struct Target {
    fd: OwnedFd,
    size: u64,
    read_only: bool,
    alignment: Option<Alignment>,
}

/// How requests may be served within `submit` (see the module's comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InlineIo {
    /// O_DIRECT and block devices: every request waits for a device.
    Never,
    /// Buffered: tried with RWF_NOWAIT.
    NoWait,
    /// A file in memory: always.
    Memory,
}

/// Filesystems whose files are memory (statfs f_type): tmpfs, ramfs, hugetlbfs.
const MEMORY_FILESYSTEMS: [u64; 3] = [0x0102_1994, 0x8584_58f6, 0x9584_58f6];

enum Backend {
    Uring(Box<uring::Uring>),
    Threads(threads::Threads),
}

/// An open file or block device with its queue of requests.
pub struct Queue {
    target: Arc<Target>,
    backend: Backend,
    eventfd: Arc<OwnedFd>,
    depth: usize,
    in_flight: usize,
    inline: InlineIo,
    /// Transfers pushed since the last `submit`, to be tried inline first
    /// (boxed as the engines take them).
    #[allow(clippy::vec_box)]
    staged: Vec<Box<Job>>,
    /// Completions of requests served inline, for the next `reap`.
    served: Vec<Completion>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").field("target", &self.target).field("engine", &self.engine()).field("in_flight", &self.in_flight).finish()
    }
}

/// The engine `Auto` means: `VFIO_USER_BLOCK_ENGINE=threads` forces the
/// thread pool (to test it, or where io_uring misbehaves), `io_uring` insists on io_uring.
pub fn engine_from_env() -> EngineChoice {
    match std::env::var("VFIO_USER_BLOCK_ENGINE").as_deref() {
        Ok("threads") => EngineChoice::Only(Engine::Threads),
        Ok("io_uring") => EngineChoice::Only(Engine::IoUring),
        _ => EngineChoice::Auto,
    }
}

impl Queue {
    pub fn open(path: &Path, options: &OpenOptions) -> Result<Queue, OpenError> {
        if options.depth == 0 || options.depth > MAX_DEPTH {
            return Err(OpenError::Depth(options.depth));
        }
        let shown = path.display().to_string();
        let mut flags = OFlags::CLOEXEC | if options.read_only { OFlags::RDONLY } else { OFlags::RDWR };
        if options.direct {
            flags |= OFlags::DIRECT;
        }
        let fd = rustix::fs::open(path, flags, Mode::empty()).map_err(|errno| match errno {
            Errno::INVAL if options.direct => OpenError::DirectRefused { path: shown.clone() },
            errno => OpenError::Open { path: shown.clone(), errno },
        })?;
        let stat = rustix::fs::statx(&fd, "", AtFlags::EMPTY_PATH, StatxFlags::TYPE | StatxFlags::SIZE | StatxFlags::DIOALIGN)
            .map_err(|errno| OpenError::Open { path: shown.clone(), errno })?;
        let kind = FileType::from_raw_mode(stat.stx_mode.into());
        let block_device = kind == FileType::BlockDevice;
        if !block_device && kind != FileType::RegularFile {
            return Err(OpenError::NotBlock { path: shown });
        }
        let size = if block_device {
            rustix::fs::seek(&fd, rustix::fs::SeekFrom::End(0)).map_err(|errno| OpenError::Open { path: shown.clone(), errno })?
        } else {
            stat.stx_size
        };
        let alignment = options.direct.then(|| direct_alignment(&fd, &stat, block_device));
        let eventfd = Arc::new(crate::eventfd::create().map_err(OpenError::Setup)?);
        let depth = options.depth;
        let backend = match options.engine {
            EngineChoice::Only(Engine::Threads) => Backend::Threads(threads::Threads::new(depth, eventfd.clone())),
            EngineChoice::Only(Engine::IoUring) => Backend::Uring(Box::new(uring::Uring::new(depth, &eventfd).map_err(OpenError::NoUring)?)),
            EngineChoice::Auto => match uring::Uring::new(depth, &eventfd) {
                Ok(ring) => Backend::Uring(Box::new(ring)),
                Err(_) => Backend::Threads(threads::Threads::new(depth, eventfd.clone())),
            },
        };
        let inline = if options.direct || block_device {
            InlineIo::Never
        } else if rustix::fs::fstatfs(&fd).is_ok_and(|s| MEMORY_FILESYSTEMS.contains(&(s.f_type as u64))) {
            InlineIo::Memory
        } else {
            InlineIo::NoWait
        };
        let target = Arc::new(Target { fd, size, read_only: options.read_only, alignment });
        Ok(Queue { target, backend, eventfd, depth: depth as usize, in_flight: 0, inline, staged: Vec::new(), served: Vec::new() })
    }

    /// Bytes: the file's size when opened, or the block device's.
    pub fn size(&self) -> u64 {
        self.target.size
    }

    pub fn engine(&self) -> Engine {
        match self.backend {
            Backend::Uring(_) => Engine::IoUring,
            Backend::Threads(_) => Engine::Threads,
        }
    }

    /// What O_DIRECT requires of requests; `None` for buffered I/O.
    pub fn alignment(&self) -> Option<Alignment> {
        self.target.alignment
    }

    pub fn read_only(&self) -> bool {
        self.target.read_only
    }

    pub fn depth(&self) -> usize {
        self.depth
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Readable when completions may be waiting; `reap` clears it.
    pub fn eventfd(&self) -> BorrowedFd<'_> {
        self.eventfd.as_fd()
    }

    /// Queues a request; its completion carries `tag`. A transfer that may be
    /// served inline waits for the next `submit`; otherwise io_uring gets it
    /// at the next `submit` (so a batch costs one system call), the thread
    /// engine at once. Refused, with nothing queued: AGAIN when `depth`
    /// requests are in flight, INVAL for a range outside the device or not
    /// aligned as O_DIRECT needs, EBADF for a change to a read-only device.
    pub fn push(&mut self, tag: u64, request: Request) -> Result<(), Errno> {
        if self.in_flight >= self.depth {
            return Err(Errno::AGAIN);
        }
        let job = Job::new(tag, request, &self.target)?;
        if self.inline != InlineIo::Never && job.is_transfer() {
            self.staged.push(job);
        } else {
            self.start(job);
        }
        self.in_flight += 1;
        Ok(())
    }

    fn start(&mut self, job: Box<Job>) {
        match &mut self.backend {
            Backend::Uring(ring) => ring.start(self.target.fd.as_raw_fd(), job),
            Backend::Threads(pool) => pool.start(job, &self.target),
        }
    }

    /// Serves what it can of the requests pushed since the last call inline
    /// (their completions wait for `reap`) and hands the rest to the kernel.
    pub fn submit(&mut self) {
        let fd = self.target.fd.as_raw_fd();
        for mut job in std::mem::take(&mut self.staged) {
            let outcome = match self.inline {
                InlineIo::Never => Inline::Engine,
                InlineIo::NoWait => job.run_inline(fd, true),
                InlineIo::Memory => job.run_inline(fd, false),
            };
            match outcome {
                Inline::Done(result) => self.served.push(job.finish(result)),
                Inline::Engine => self.start(job),
                Inline::NoWaitRefused => {
                    self.inline = InlineIo::Never;
                    self.start(job);
                }
            }
        }
        if let Backend::Uring(ring) = &mut self.backend {
            ring.submit();
        }
    }

    /// Clears the eventfd and appends the requests completed since the last
    /// call to `out`.
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        // A zero counter is fine (another reap took it); reading cannot fail on our own eventfd.
        let _ = crate::eventfd::take(&self.eventfd);
        let before = out.len();
        out.append(&mut self.served);
        match &mut self.backend {
            Backend::Uring(ring) => ring.reap(self.target.fd.as_raw_fd(), out),
            Backend::Threads(pool) => pool.reap(out),
        }
        self.in_flight -= out.len() - before;
    }

    /// Blocks until nothing is in flight, collecting the completions.
    pub fn drain(&mut self, out: &mut Vec<Completion>) {
        self.submit();
        loop {
            self.reap(out);
            if self.in_flight == 0 {
                break;
            }
            let _ = rustix::event::poll(&mut [rustix::event::PollFd::new(&*self.eventfd, rustix::event::PollFlags::IN)], None);
        }
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // The kernel or a worker may still be writing to memory the jobs keep mapped.
        self.drain(&mut Vec::new());
    }
}

/// O_DIRECT's requirements as statx reports them (Linux 6.1+), else the
/// logical block size of a block device, else a page (safe on every
/// filesystem).
fn direct_alignment(fd: &OwnedFd, stat: &rustix::fs::Statx, block_device: bool) -> Alignment {
    if stat.stx_mask & StatxFlags::DIOALIGN.bits() != 0 && stat.stx_dio_offset_align != 0 {
        return Alignment { memory: stat.stx_dio_mem_align.max(1), offset: stat.stx_dio_offset_align };
    }
    let fallback = if block_device { rustix::fs::ioctl_blksszget(fd).unwrap_or(4096) } else { 4096 };
    Alignment { memory: fallback, offset: fallback }
}

#[cfg(test)]
mod tests;
