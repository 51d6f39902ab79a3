//! The io_uring engine: requests are pushed to the submission ring from the
//! owning thread and handed to the kernel together by `submit` (one system
//! call for a batch of requests); the kernel signals the queue's
//! eventfd as it posts completions, and `reap` walks the completion ring.
//! Short transfers and fallbacks are resubmitted from there.

use super::job::{Job, Step};
use crate::block::Completion;
use io_uring::{opcode, register::Probe, squeue, types, IoUring};
use rustix::fd::{AsRawFd, OwnedFd};
use rustix::io::Errno;
use std::os::fd::RawFd;

pub(super) struct Uring {
    ring: IoUring,
    /// Jobs in flight by slot (the entries' user_data); boxed, so the iovecs
    /// the kernel reads stay put.
    jobs: Vec<Option<Box<Job>>>,
    free: Vec<usize>,
}

/// The operations every job may need; a kernel without one of them gets the thread engine.
const NEEDED: [u8; 4] = [opcode::Readv::CODE, opcode::Writev::CODE, opcode::Fsync::CODE, opcode::Fallocate::CODE];

impl Uring {
    /// A ring for `depth` requests signalling `eventfd`; fails where the
    /// kernel lacks io_uring, refuses it (seccomp, `io_uring_disabled`), or
    /// lacks an operation we use.
    pub fn new(depth: u32, eventfd: &OwnedFd) -> Result<Uring, Errno> {
        let errno = |e: std::io::Error| Errno::from_io_error(&e).unwrap_or(Errno::IO);
        let ring = IoUring::new(depth.next_power_of_two()).map_err(errno)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe).map_err(errno)?;
        if !NEEDED.iter().all(|&code| probe.is_supported(code)) {
            return Err(Errno::NOSYS);
        }
        ring.submitter().register_eventfd(eventfd.as_raw_fd()).map_err(errno)?;
        Ok(Uring { ring, jobs: Vec::new(), free: Vec::new() })
    }

    /// Takes a job the queue has room for and pushes its first step; `submit` starts it.
    pub fn start(&mut self, fd: RawFd, job: Box<Job>) {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.jobs.push(None);
            self.jobs.len() - 1
        });
        self.jobs[slot] = Some(job);
        self.push(fd, slot);
    }

    fn push(&mut self, fd: RawFd, slot: usize) {
        let job = self.jobs[slot].as_mut().expect("a job in its slot");
        let fd = types::Fd(fd);
        let entry: squeue::Entry = match job.step() {
            Step::Readv(iov, at) => opcode::Readv::new(fd, iov.as_ptr(), iov.len() as u32).offset(at).build(),
            Step::Writev(iov, at) => opcode::Writev::new(fd, iov.as_ptr(), iov.len() as u32).offset(at).build(),
            Step::Fdatasync => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
            Step::Fallocate { mode, at, len } => opcode::Fallocate::new(fd, len).offset(at).mode(mode).build(),
        };
        // SAFETY: the entry points at the job's iovecs (and they at memory the
        // job keeps mapped); the job stays boxed in its slot until its
        // completion is reaped. The ring has an entry per slot in use, so the
        // push cannot fail.
        unsafe { self.ring.submission().push(&entry.user_data(slot as u64)) }.expect("a free submission entry");
    }

    /// Hands what was pushed to the kernel, if anything. A failure leaves
    /// the entries in the ring for the next submit (at the latest, the next reap's).
    pub fn submit(&mut self) {
        if !self.ring.submission().is_empty() {
            let _ = self.ring.submit();
        }
    }

    pub fn reap(&mut self, fd: RawFd, out: &mut Vec<Completion>) {
        let done: Vec<(usize, i32)> = self.ring.completion().map(|c| (c.user_data() as usize, c.result())).collect();
        for (slot, result) in done {
            let job = self.jobs[slot].as_mut().expect("a completion for a job in flight");
            match job.advance(result.into()) {
                None => self.push(fd, slot),
                Some(result) => {
                    let job = self.jobs[slot].take().expect("checked above");
                    self.free.push(slot);
                    out.push(job.finish(result));
                }
            }
        }
        self.submit();
    }
}
