//! `NativeBlockDevice`: a file or block device and its queue of
//! asynchronous requests (`vfio_user_core::block`) between the file and
//! guest memory. Completions reach JS in batches: the queue's eventfd is
//! watched by the JS thread's loop (the uv poll the sockets use), and one
//! call of `onComplete` carries everything that finished since the last.
//! Requests return an errno (0 when queued) rather than throwing: the TS
//! layer raises typed errors that name the request; `submit` starts what
//! was queued.

use crate::js::{self, Callbacks};
use crate::mapping::NativeMapping;
use crate::uv::{Poll, READABLE};
use napi::bindgen_prelude::*;
use napi_derive::napi;
use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::rc::Rc;
use vfio_user_core::block::{self, Completion, Direction, Engine, EngineChoice, OpenOptions, Queue, Request, Segment};

const ON_COMPLETE: usize = 0;
const EFAULT: i32 = rustix::io::Errno::FAULT.raw_os_error();
const EBADF: i32 = rustix::io::Errno::BADF.raw_os_error();
const EINVAL: i32 = rustix::io::Errno::INVAL.raw_os_error();

/// A file position passed as a number: a non-negative safe integer.
fn position(offset: f64) -> Option<u64> {
    (offset >= 0.0 && offset.fract() == 0.0 && offset <= 9007199254740991.0).then_some(offset as u64)
}

struct Inner {
    queue: Option<Queue>,
    poll: Option<Poll>,
    js: Option<Rc<Callbacks>>,
    /// Guest memory for the next read or write, added one piece at a time.
    segments: Vec<Segment>,
}

#[napi(object)]
pub struct BlockAlignment {
    pub memory: u32,
    pub offset: u32,
}

#[napi]
pub struct NativeBlockDevice {
    inner: Rc<RefCell<Inner>>,
    size: u64,
    engine: Engine,
    alignment: Option<block::Alignment>,
}

#[napi]
impl NativeBlockDevice {
    /// Opens `path` for requests, `depth` at most in flight. `engine` is
    /// "io_uring", "threads", or "" for io_uring where the kernel allows it
    /// (VFIO_USER_BLOCK_ENGINE overrides ""). Throws with `code` the errno.
    /// `onComplete(done)` gets [tag, errno, tag, errno, ...] (errno 0: success).
    #[napi(factory, ts_args_type = "path: string, direct: boolean, readOnly: boolean, engine: string, depth: number, onComplete: (done: number[]) => void")]
    pub fn open(env: Env, path: String, direct: bool, read_only: bool, engine: String, depth: u32, on_complete: Function<'_>) -> std::result::Result<Self, Error<String>> {
        let fail = |code: i32, reason: String| Error::new(code.to_string(), reason);
        let engine = match engine.as_str() {
            "" => block::engine_from_env(),
            "io_uring" => EngineChoice::Only(Engine::IoUring),
            "threads" => EngineChoice::Only(Engine::Threads),
            other => return Err(fail(rustix::io::Errno::INVAL.raw_os_error(), format!("unknown engine {other:?}"))),
        };
        let queue = Queue::open(Path::new(&path), &OpenOptions { direct, read_only, engine, depth })
            .map_err(|e| fail(e.errno().raw_os_error(), e.to_string()))?;
        let js = Callbacks::new(env.raw(), "VfioUserBlockDevice", &[on_complete.raw()]).map_err(|e| fail(EFAULT, e.reason))?;
        let (size, engine, alignment) = (queue.size(), queue.engine(), queue.alignment());
        let fd = queue.eventfd().as_raw_fd();
        let inner = Rc::new(RefCell::new(Inner { queue: Some(queue), poll: None, js: Some(js), segments: Vec::new() }));
        // The poll holds the device strongly, as a watched eventfd does; close() breaks the cycle.
        let target = inner.clone();
        let mut poll = Poll::new(env.raw(), fd, Box::new(move |_status, _events| on_readable(&target))).map_err(|e| fail(EFAULT, e.reason))?;
        poll.set_events(READABLE);
        // Only requests in flight keep the process alive.
        poll.set_ref(false);
        inner.borrow_mut().poll = Some(poll);
        Ok(NativeBlockDevice { inner, size, engine, alignment })
    }

    #[napi(getter)]
    pub fn size(&self) -> BigInt {
        BigInt::from(self.size)
    }

    #[napi(getter, ts_return_type = "'io_uring' | 'threads'")]
    pub fn engine(&self) -> &'static str {
        match self.engine {
            Engine::IoUring => "io_uring",
            Engine::Threads => "threads",
        }
    }

    /// What O_DIRECT requires; null for buffered I/O.
    #[napi(getter)]
    pub fn alignment(&self) -> Option<BlockAlignment> {
        self.alignment.map(|a| BlockAlignment { memory: a.memory, offset: a.offset })
    }

    #[napi(getter)]
    pub fn in_flight(&self) -> u32 {
        self.inner.borrow().queue.as_ref().map_or(0, |q| q.in_flight() as u32)
    }

    /// Adds `length` bytes at `offset` of `mapping` to the next read
    /// (`intoMemory`) or write; 0, EFAULT (outside the window, or unmapped)
    /// or EPERM (the window lacks the access).
    #[napi]
    pub fn add_segment(&self, mapping: &NativeMapping, offset: f64, length: f64, into_memory: bool) -> i32 {
        let shared = mapping.shared();
        let guard = shared.borrow();
        let Some(m) = guard.as_ref() else { return EFAULT };
        if !(offset >= 0.0 && length >= 0.0 && offset.fract() == 0.0 && length.fract() == 0.0 && offset + length <= 9007199254740991.0) {
            return EFAULT;
        }
        let direction = if into_memory { Direction::IntoMemory } else { Direction::FromMemory };
        match Segment::new(m, offset as u64, length as usize, direction) {
            Ok(segment) => {
                self.inner.borrow_mut().segments.push(segment);
                0
            }
            Err(e) => e.errno().raw_os_error(),
        }
    }

    /// Forgets the segments added so far (a request that failed to resolve).
    #[napi]
    pub fn clear_segments(&self) {
        self.inner.borrow_mut().segments.clear();
    }

    /// Reads into the segments added since the last request; 0 or an errno
    /// (EAGAIN: the queue is full; EINVAL: outside the device or misaligned
    /// for O_DIRECT; EBADF: closed). `offset` is a safe integer: the TS
    /// layer refuses offsets past the device (whose size is below 2^53).
    #[napi]
    pub fn read(&self, tag: u32, offset: f64) -> i32 {
        let segments = std::mem::take(&mut self.inner.borrow_mut().segments);
        let Some(at) = position(offset) else { return EINVAL };
        self.enqueue(tag, Request::Read { at, segments })
    }

    /// Writes from the segments added since the last request; as `read`, and
    /// EBADF for a read-only device.
    #[napi]
    pub fn write(&self, tag: u32, offset: f64) -> i32 {
        let segments = std::mem::take(&mut self.inner.borrow_mut().segments);
        let Some(at) = position(offset) else { return EINVAL };
        self.enqueue(tag, Request::Write { at, segments })
    }

    /// A read (`into_memory`) or write of one segment: `add_segment` and
    /// `read`/`write` in one call, the common case of a request within one
    /// DMA window.
    #[napi]
    pub fn transfer_one(&self, tag: u32, into_memory: bool, mapping: &NativeMapping, map_offset: f64, length: f64, offset: f64) -> i32 {
        let errno = self.add_segment(mapping, map_offset, length, into_memory);
        if errno != 0 {
            return errno;
        }
        if into_memory { self.read(tag, offset) } else { self.write(tag, offset) }
    }

    #[napi]
    pub fn flush(&self, tag: u32) -> i32 {
        self.enqueue(tag, Request::Flush)
    }

    #[napi]
    pub fn discard(&self, tag: u32, offset: BigInt, length: BigInt) -> i32 {
        self.enqueue(tag, Request::Discard { at: u64_of(&offset), len: u64_of(&length) })
    }

    #[napi]
    pub fn write_zeroes(&self, tag: u32, offset: BigInt, length: BigInt) -> i32 {
        self.enqueue(tag, Request::WriteZeroes { at: u64_of(&offset), len: u64_of(&length) })
    }

    /// Hands the requests made since the last call to the kernel at once (one
    /// system call for a batch with io_uring); the TS layer calls it once per
    /// turn of the microtask queue that made requests. Returns what completed
    /// already, as `onComplete` would get it: io_uring serves reads of cached
    /// pages inside the submission, and they settle now rather than after
    /// another turn of the event loop. Null when nothing completed yet.
    #[napi]
    pub fn submit(&self) -> Option<Vec<i32>> {
        let mut inner = self.inner.borrow_mut();
        let state = &mut *inner;
        let queue = state.queue.as_mut()?;
        queue.submit();
        let mut done = Vec::new();
        queue.reap(&mut done);
        if let Some(poll) = state.poll.as_ref() {
            poll.set_ref(queue.in_flight() > 0);
        }
        // Undefined rather than an empty array: nothing to allocate when all went to the kernel.
        (!done.is_empty()).then(|| flatten(&done))
    }

    /// Stops watching and closes the file, after waiting for requests still in
    /// flight (their completions are not delivered). Idempotent.
    #[napi]
    pub fn close(&self) {
        let (poll, queue, js) = {
            let mut inner = self.inner.borrow_mut();
            inner.segments.clear();
            (inner.poll.take(), inner.queue.take(), inner.js.take())
        };
        if let Some(poll) = poll {
            poll.close();
        }
        drop(queue);
        drop(js);
    }

    fn enqueue(&self, tag: u32, request: Request) -> i32 {
        let mut inner = self.inner.borrow_mut();
        let inner = &mut *inner;
        let Some(queue) = inner.queue.as_mut() else { return EBADF };
        match queue.push(tag.into(), request) {
            Ok(()) => {
                if let Some(poll) = inner.poll.as_ref() {
                    poll.set_ref(true);
                }
                0
            }
            Err(e) => e.raw_os_error(),
        }
    }
}

/// A BigInt's value, or u64::MAX for one that does not fit (refused as outside the device).
fn u64_of(value: &BigInt) -> u64 {
    match value.get_u64() {
        (false, v, true) => v,
        _ => u64::MAX,
    }
}

fn on_readable(inner: &Rc<RefCell<Inner>>) {
    let mut done: Vec<Completion> = Vec::new();
    // Nothing is borrowed while JS runs: the callback may submit or close.
    let js = {
        let mut guard = inner.borrow_mut();
        let state = &mut *guard;
        let (Some(queue), Some(js)) = (state.queue.as_mut(), state.js.clone()) else { return };
        queue.reap(&mut done);
        if let Some(poll) = state.poll.as_ref() {
            poll.set_ref(queue.in_flight() > 0);
        }
        js
    };
    if done.is_empty() {
        return;
    }
    let flat = flatten(&done);
    js.call(&mut js.scope(), ON_COMPLETE, |env| vec![js::int_array(env, &flat)]);
}

/// Completions as JS gets them: [tag, errno, tag, errno, ...], errno 0 for success.
fn flatten(done: &[Completion]) -> Vec<i32> {
    done.iter().flat_map(|c| [c.tag as i32, c.result.err().map_or(0, |e| e.raw_os_error())]).collect()
}
