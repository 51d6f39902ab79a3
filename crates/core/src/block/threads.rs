//! The thread engine, for kernels without a usable io_uring: a few threads
//! take jobs from a shared queue and make the same calls synchronously
//! (preadv, pwritev, fdatasync, fallocate). A finished job goes to the
//! completion list, and the eventfd is signalled when that list stops being
//! empty: the reaper takes everything there, so one wake-up covers a batch.

use super::job::{Job, Step};
use super::Target;
use crate::block::Completion;
use rustix::fd::{AsRawFd, OwnedFd};
use rustix::io::Errno;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Threads per queue at most: enough to keep a disk busy, few enough for a small machine.
const MAX_THREADS: u32 = 4;

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    done: Mutex<Vec<Completion>>,
    eventfd: Arc<OwnedFd>,
}

struct Pending {
    jobs: VecDeque<(Box<Job>, Arc<Target>)>,
    closing: bool,
}

pub(super) struct Threads {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl Threads {
    pub fn new(depth: u32, eventfd: Arc<OwnedFd>) -> Threads {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending { jobs: VecDeque::new(), closing: false }),
            wake: Condvar::new(),
            done: Mutex::new(Vec::new()),
            eventfd,
        });
        let workers = (0..depth.min(MAX_THREADS))
            .map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("vfio-user-block-{i}"))
                    .spawn(move || work(&shared))
                    .expect("cannot start a block I/O thread")
            })
            .collect();
        Threads { shared, workers }
    }

    pub fn start(&mut self, job: Box<Job>, target: &Arc<Target>) {
        lock(&self.shared.pending).jobs.push_back((job, target.clone()));
        self.shared.wake.notify_one();
    }

    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut lock(&self.shared.done));
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        // The queue drained what was in flight; the workers find nothing left and leave.
        lock(&self.shared.pending).closing = true;
        self.shared.wake.notify_all();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// A poisoned lock only means a thread panicked holding it; the data is still consistent.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn work(shared: &Shared) {
    loop {
        let (mut job, target) = {
            let mut pending = lock(&shared.pending);
            loop {
                if let Some(next) = pending.jobs.pop_front() {
                    break next;
                }
                if pending.closing {
                    return;
                }
                pending = shared.wake.wait(pending).unwrap_or_else(|e| e.into_inner());
            }
        };
        let result = loop {
            let r = run(target.fd.as_raw_fd(), &mut job);
            if let Some(result) = job.advance(r) {
                break result;
            }
        };
        let completion = job.finish(result);
        let mut done = lock(&shared.done);
        done.push(completion);
        if done.len() == 1 {
            // A reaper that woke before this push takes it with the rest; one signal per batch.
            let _ = crate::eventfd::signal(&*shared.eventfd);
        }
    }
}

/// Makes a job's next call: bytes moved, or -errno.
fn run(fd: i32, job: &mut Job) -> i64 {
    // SAFETY: plain system calls on an fd the target keeps open, with iovecs
    // into memory the job keeps mapped.
    let r = unsafe {
        match job.step() {
            Step::Readv(iov, at) => libc::preadv64(fd, iov.as_ptr(), iov.len() as i32, at as i64) as i64,
            Step::Writev(iov, at) => libc::pwritev64(fd, iov.as_ptr(), iov.len() as i32, at as i64) as i64,
            Step::Fdatasync => libc::fdatasync(fd) as i64,
            Step::Fallocate { mode, at, len } => libc::fallocate64(fd, mode, at as i64, len as i64) as i64,
        }
    };
    if r < 0 {
        -(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO).raw_os_error() as i64)
    } else {
        r
    }
}
