//! One request on its way through an engine: what system call it needs
//! next, and what a result of that call means (the rest of a short
//! transfer, a fallback to writing zeros, done). Both engines drive jobs
//! through the same `step` / `advance` pair, so they behave alike.

use super::{Request, Segment, Target};
use crate::block::Completion;
use rustix::io::Errno;
use std::os::fd::RawFd;
use std::sync::OnceLock;

/// iovecs per system call (the kernel's UIO_MAXIOV).
const IOV_MAX: usize = 1024;
/// Zeros are written from one shared buffer, this many bytes per iovec.
const ZERO_CHUNK: usize = 1 << 20;
/// iovecs per zero-writing call: 64 MiB.
const ZERO_IOVS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
    Punch,
    ZeroRange,
    /// Writing zeros where fallocate cannot: from `zeros()`, `left` bytes at `at`.
    ZeroWrites,
}

/// The next system call of a job.
pub(super) enum Step<'a> {
    Readv(&'a [libc::iovec], u64),
    Writev(&'a [libc::iovec], u64),
    Fdatasync,
    Fallocate { mode: i32, at: u64, len: u64 },
}

/// What serving a job on the caller's thread came to.
pub(super) enum Inline {
    /// It is over (done or failed).
    Done(Result<(), Errno>),
    /// The kernel would have waited (pages not cached) or the call was
    /// interrupted: the engine takes the job from where it stopped.
    Engine,
    /// The filesystem does not take RWF_NOWAIT: it never will.
    NoWaitRefused,
}

/// Calls per inline attempt at most: each moves bytes or ends the job, so
/// only repeated interruptions reach it.
const INLINE_CALLS: usize = 16;

pub(super) struct Job {
    pub tag: u64,
    kind: Kind,
    /// File position of the next byte.
    at: u64,
    /// Bytes still to move (or the range's length for fallocate).
    left: u64,
    /// The memory the iovecs point into, kept mapped until the job is dropped.
    segments: Vec<Segment>,
    iov: Vec<libc::iovec>,
    /// First iovec not yet fully transferred.
    next: usize,
}

// SAFETY: the iovecs point into mappings the job holds by `Arc` (or into the
// static zero buffer); whichever thread runs the job, they stay valid.
unsafe impl Send for Job {}

impl Job {
    /// Checks `request` against the target and builds the job.
    pub fn new(tag: u64, request: Request, target: &Target) -> Result<Box<Job>, Errno> {
        let (kind, at, segments, len) = match request {
            Request::Read { at, segments } => {
                let len = segments.iter().map(|s| s.len as u64).sum();
                (Kind::Read, at, segments, len)
            }
            Request::Write { at, segments } => {
                let len = segments.iter().map(|s| s.len as u64).sum();
                (Kind::Write, at, segments, len)
            }
            Request::Flush => (Kind::Flush, 0, Vec::new(), 0),
            Request::Discard { at, len } => (Kind::Punch, at, Vec::new(), len),
            Request::WriteZeroes { at, len } => (Kind::ZeroRange, at, Vec::new(), len),
        };
        if kind != Kind::Read && kind != Kind::Flush && target.read_only {
            return Err(Errno::BADF);
        }
        if at.checked_add(len).is_none_or(|end| end > target.size) {
            return Err(Errno::INVAL);
        }
        if let Some(align) = target.alignment {
            let (offset, memory) = (align.offset as u64, align.memory as usize);
            if !at.is_multiple_of(offset) || !len.is_multiple_of(offset) {
                return Err(Errno::INVAL);
            }
            if segments.iter().any(|s| !(s.address() as usize).is_multiple_of(memory) || !s.len.is_multiple_of(memory)) {
                return Err(Errno::INVAL);
            }
        }
        let iov = segments.iter().map(|s| libc::iovec { iov_base: s.address().cast(), iov_len: s.len }).collect();
        Ok(Box::new(Job { tag, kind, at, left: len, segments, iov, next: 0 }))
    }

    /// Whether the job moves data (the kind that may be served inline).
    pub fn is_transfer(&self) -> bool {
        matches!(self.kind, Kind::Read | Kind::Write)
    }

    /// Moves the job's data now, on this thread: with `nowait`, only as far
    /// as cached pages go (RWF_NOWAIT); without, as far as it takes (for a
    /// file in memory, a copy).
    pub fn run_inline(&mut self, fd: RawFd, nowait: bool) -> Inline {
        let flags = if nowait { libc::RWF_NOWAIT } else { 0 };
        for _ in 0..INLINE_CALLS {
            let result = match self.step() {
                // SAFETY: the iovecs point into mappings this job keeps alive (see `new`).
                Step::Readv(iov, at) => unsafe { libc::preadv2(fd, iov.as_ptr(), iov.len() as i32, at as i64, flags) },
                // SAFETY: as above.
                Step::Writev(iov, at) => unsafe { libc::pwritev2(fd, iov.as_ptr(), iov.len() as i32, at as i64, flags) },
                _ => return Inline::Engine,
            };
            let result = if result < 0 { -(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO) as i64) } else { result as i64 };
            match result {
                r if r == -(libc::EAGAIN as i64) || r == -(libc::EINTR as i64) => return Inline::Engine,
                r if nowait && r == -(libc::EOPNOTSUPP as i64) => return Inline::NoWaitRefused,
                r => {
                    if let Some(done) = self.advance(r) {
                        return Inline::Done(done);
                    }
                }
            }
        }
        Inline::Engine
    }

    /// The system call to make next.
    pub fn step(&mut self) -> Step<'_> {
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        match self.kind {
            Kind::Read | Kind::Write => {
                let end = self.iov.len().min(self.next + IOV_MAX);
                let iov = &self.iov[self.next..end];
                if self.kind == Kind::Read { Step::Readv(iov, self.at) } else { Step::Writev(iov, self.at) }
            }
            Kind::Flush => Step::Fdatasync,
            Kind::Punch => Step::Fallocate { mode: PUNCH, at: self.at, len: self.left },
            Kind::ZeroRange => Step::Fallocate { mode: ZERO, at: self.at, len: self.left },
            Kind::ZeroWrites => {
                let zeros = zeros();
                self.iov.clear();
                let mut left = self.left;
                while left > 0 && self.iov.len() < ZERO_IOVS {
                    let n = left.min(ZERO_CHUNK as u64) as usize;
                    self.iov.push(libc::iovec { iov_base: zeros.cast_mut().cast(), iov_len: n });
                    left -= n as u64;
                }
                Step::Writev(&self.iov, self.at)
            }
        }
    }

    /// Takes the result of the last step (bytes or -errno): the job's result
    /// when it is over, `None` when it needs another step.
    pub fn advance(&mut self, result: i64) -> Option<Result<(), Errno>> {
        if result < 0 {
            let errno = Errno::from_raw_os_error(-result as i32);
            return match (self.kind, errno) {
                (_, Errno::INTR | Errno::AGAIN) => None,
                (Kind::Punch | Kind::ZeroRange, Errno::OPNOTSUPP) => {
                    self.kind = Kind::ZeroWrites;
                    None
                }
                _ => Some(Err(errno)),
            };
        }
        match self.kind {
            Kind::Flush | Kind::Punch | Kind::ZeroRange => Some(Ok(())),
            Kind::Read | Kind::Write | Kind::ZeroWrites => {
                let n = result as u64;
                if n == 0 && self.left > 0 {
                    // The file shrank under a read, or the device took nothing.
                    return Some(Err(Errno::IO));
                }
                self.at += n;
                self.left -= n.min(self.left);
                if self.kind != Kind::ZeroWrites {
                    self.consume(n as usize);
                }
                (self.left == 0).then_some(Ok(()))
            }
        }
    }

    /// Moves past `n` transferred bytes of the iovecs.
    fn consume(&mut self, mut n: usize) {
        while n > 0 && self.next < self.iov.len() {
            let v = &mut self.iov[self.next];
            let took = n.min(v.iov_len);
            // SAFETY: stays within the segment the iovec describes.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(took) }.cast();
            v.iov_len -= took;
            n -= took;
            if v.iov_len == 0 {
                self.next += 1;
            }
        }
    }

    /// The completion; a read's pages are marked dirty in their windows
    /// (written by the kernel, not through the mapping's copies; a failed
    /// read may have written part of them).
    pub fn finish(self, result: Result<(), Errno>) -> Completion {
        if self.kind == Kind::Read {
            for s in &self.segments {
                s.mapping.dirty().mark(s.offset, s.len as u64);
            }
        }
        Completion { tag: self.tag, result }
    }
}

/// A page-aligned buffer of zeros, shared by every zero-writing job (aligned
/// for O_DIRECT too).
fn zeros() -> *const u8 {
    static ZEROS: OnceLock<usize> = OnceLock::new();
    *ZEROS.get_or_init(|| {
        let layout = std::alloc::Layout::from_size_align(ZERO_CHUNK, 4096).expect("valid layout");
        // SAFETY: a non-zero size; the buffer lives (and stays zero: only ever read) for the process.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "cannot allocate the zero buffer");
        ptr as usize
    }) as *const u8
}
