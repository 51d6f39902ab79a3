//! `NativeConnection`: one framed vfio-user connection polled on the JS
//! thread's loop. Each whole message goes to `onMessage(bytes, fds)`; a
//! REGION_READ of a region whose bytes the device shares natively, and
//! DMA_MAP and DMA_UNMAP (the client's DMA window table), are answered here
//! without entering JS, when that cannot reorder replies.

use crate::dma::{NativeDmaTable, Table};
use crate::js::{self, CallbackScope, Callbacks};
use crate::regions::{NativeRegionReads, RegionReads};
use crate::slab::Slab;
use crate::uv::{Poll, READABLE, WRITABLE};
use napi::bindgen_prelude::*;
use napi::sys;
use napi_derive::napi;
use std::cell::RefCell;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use rustix::io::Errno;
use vfio_user_core::dma::{DMA_MAP, DMA_UNMAP};
use vfio_user_core::{FrameConnection, FramingError, ReadOutcome, HEADER_SIZE};

/// Socket reads per wake-up before yielding to the rest of the loop; the poll
/// is level-triggered, so what is left in the socket is read on the next turn.
const BATCH: usize = 64;

const REGION_READ: u16 = 9;
/// A REGION_READ request: header plus offset, region and count.
const REGION_READ_SIZE: usize = HEADER_SIZE + 16;
/// Messages up to this size are kept on the stack, as they may be answered
/// natively: REGION_READ (32 bytes), DMA_MAP (48), DMA_UNMAP (40), and the
/// latter two with a somewhat larger argsz.
const SMALL: usize = 64;

/// What became of a message's bytes while they were read.
enum Incoming {
    /// Kept on the stack (the first `len` bytes): it may be answered natively.
    Small { bytes: [u8; SMALL], len: usize },
    /// Copied for JS: a view of `buffer`.
    Js { buffer: sys::napi_value, offset: usize, len: usize },
    /// Nobody listens any more (closed locally).
    Dropped,
    /// No ArrayBuffer could be had for the bytes: the connection ends.
    NoMemory,
}
const REPLY: u32 = 1;
const ERROR: u32 = 0x20;

/// What became of a message offered to the native path.
enum Native {
    Answered,
    /// Not served natively: it goes to JS.
    NotServed,
    /// The reply could not be queued: the peer is cut off for this reason.
    Failed(Failure),
}
const ON_MESSAGE: usize = 0;
const ON_CLOSE: usize = 1;

struct State {
    frames: Option<FrameConnection>,
    poll: Option<Poll>,
    /// Messages handed to JS whose handling has not finished (async handlers).
    busy: u32,
    reads: Option<Rc<RefCell<RegionReads>>>,
    native_reads: u32,
    /// The client's DMA window table, once DMA_MAP/UNMAP may be answered here.
    dma: Option<Table>,
    native_dma: u32,
    /// A local close waits for queued replies to drain first.
    closing: bool,
}

struct Conn {
    env: sys::napi_env,
    state: RefCell<State>,
    slab: RefCell<Slab>,
    js: RefCell<Option<Rc<Callbacks>>>,
}

#[napi]
pub struct NativeConnection {
    conn: Rc<Conn>,
}

#[napi]
impl NativeConnection {
    /// Takes ownership of `fd`, a connected non-blocking stream socket.
    /// `onMessage(buffer, offset, length, fds, fdsTruncated)` gets the message
    /// as a view of a shared ArrayBuffer (never overwritten) and owns the fds
    /// (the peer sent more than fit when `fdsTruncated`); it returns `true`
    /// when it finishes the message later (and then calls `complete()`), or
    /// the bytes of a reply to send now, without fds; `onClose(error?, errno?)`
    /// runs once when the peer goes away or the stream breaks, not after a
    /// local `close()`: `errno` names a failure the system reported (or
    /// ENOBUFS for a peer cut off for not reading), `error` says what broke
    /// when the system's word for `errno` would not.
    #[napi(
        constructor,
        ts_args_type = "fd: number, maxFrame: number, onMessage: (buffer: ArrayBuffer, offset: number, length: number, fds: number[] | undefined, fdsTruncated: boolean) => boolean | Uint8Array | void, onClose: (error?: string, errno?: number) => void"
    )]
    pub fn new(
        env: Env,
        fd: i32,
        max_frame: u32,
        on_message: Function<'_>,
        on_close: Function<'_>,
    ) -> Result<Self> {
        if fd < 0 {
            return Err(Error::new(Status::InvalidArg, "fd must be a non-negative integer"));
        }
        let raw = env.raw();
        // SAFETY: the caller hands over ownership of the fd.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let callbacks = Callbacks::new(raw, "VfioUserConnection", &[on_message.raw(), on_close.raw()])?;
        let conn = Rc::new(Conn {
            env: raw,
            slab: RefCell::new(Slab::new(raw)),
            state: RefCell::new(State {
                frames: Some(FrameConnection::new(owned, max_frame as usize)),
                poll: None,
                busy: 0,
                reads: None,
                native_reads: 0,
                dma: None,
                native_dma: 0,
                closing: false,
            }),
            js: RefCell::new(Some(callbacks)),
        });
        // The poll's callback holds the connection strongly, as an open Node
        // socket stays alive unreferenced; teardown closes the poll, which
        // drops the callback and so the cycle.
        let target = conn.clone();
        let mut poll = Poll::new(raw, fd, Box::new(move |status, events| target.on_ready(status, events)))?;
        poll.set_events(READABLE);
        conn.state.borrow_mut().poll = Some(poll);
        Ok(NativeConnection { conn })
    }

    /// Sends one message; `fds` (borrowed, not closed) travel with it. A
    /// failure throws an Error whose `code` is the errno in decimal: the
    /// socket's own, ENOTCONN once closed, or ENOBUFS (with the reason as
    /// the message) for a peer cut off for not reading.
    #[napi]
    pub fn send(&self, bytes: &[u8], fds: Option<Vec<i32>>) -> Result<(), String> {
        let mut state = self.conn.state.borrow_mut();
        if state.closing || state.frames.is_none() {
            return Err(errno_error(Errno::NOTCONN, "the connection is closed"));
        }
        let fds = fds.unwrap_or_default();
        if fds.iter().any(|fd| *fd < 0) {
            return Err(Error::new(Status::InvalidArg.as_ref().to_string(), "fds must be non-negative integers".to_string()));
        }
        // SAFETY: the caller keeps these fds open for the duration of the call.
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|fd| unsafe { BorrowedFd::borrow_raw(*fd) }).collect();
        let Some(frames) = state.frames.as_mut() else {
            return Err(errno_error(Errno::NOTCONN, "the connection is closed"));
        };
        match frames.send(bytes, &borrowed) {
            Ok(()) => {
                state.watch();
                Ok(())
            }
            Err(FramingError::Os(e)) => Err(errno_error(e, "")),
            Err(e) => {
                // A peer that stopped reading: what is queued for it is dropped now.
                drop(state);
                self.conn.teardown();
                Err(errno_error(Errno::NOBUFS, &e.to_string()))
            }
        }
    }

    /// One message that `onMessage` deferred has been fully handled.
    #[napi]
    pub fn complete(&self) {
        let mut state = self.conn.state.borrow_mut();
        state.busy = state.busy.saturating_sub(1);
    }

    /// Region bytes REGION_READ may be answered from without entering JS;
    /// `null` sends every read to JS (before negotiation, during migration).
    #[napi]
    pub fn set_region_reads(&self, reads: Option<&NativeRegionReads>) {
        self.conn.state.borrow_mut().reads = reads.map(|r| r.shared());
    }

    /// The window table DMA_MAP and DMA_UNMAP are applied to without
    /// entering JS; `null` sends them to JS (before negotiation, or while
    /// messages are observed).
    #[napi]
    pub fn set_dma_table(&self, table: Option<&NativeDmaTable>) {
        self.conn.state.borrow_mut().dma = table.map(|t| t.shared());
    }

    #[napi]
    pub fn set_max_frame(&self, max_frame: u32) {
        if let Some(frames) = self.conn.state.borrow_mut().frames.as_mut() {
            frames.set_max_frame(max_frame as usize);
        }
    }

    /// Most fds one incoming message may carry (this side's `max_msg_fds`):
    /// the rest are closed on arrival and `fdsTruncated` is set.
    #[napi]
    pub fn set_max_fds(&self, max_fds: u32) {
        if let Some(frames) = self.conn.state.borrow_mut().frames.as_mut() {
            frames.set_max_fds(max_fds as usize);
        }
    }

    /// Most bytes queued for a peer that does not read before the
    /// connection is cut off (a send throws ENOBUFS, a native reply ends it
    /// through `onClose`).
    #[napi]
    pub fn set_max_queued(&self, bytes: f64) {
        if let Some(frames) = self.conn.state.borrow_mut().frames.as_mut() {
            frames.set_max_queued(bytes as usize);
        }
    }

    /// Bytes waiting for the peer to read (for tests and stats).
    #[napi(getter)]
    pub fn queued(&self) -> f64 {
        self.conn.state.borrow().frames.as_ref().map_or(0.0, |f| f.queued() as f64)
    }

    /// How many REGION_READs were answered natively (for tests and stats).
    #[napi(getter)]
    pub fn native_reads(&self) -> u32 {
        self.conn.state.borrow().native_reads
    }

    /// How many DMA_MAPs and DMA_UNMAPs were answered natively (for tests and stats).
    #[napi(getter)]
    pub fn native_dma(&self) -> u32 {
        self.conn.state.borrow().native_dma
    }

    #[napi(getter)]
    pub fn closed(&self) -> bool {
        self.conn.state.borrow().frames.is_none()
    }

    /// Whether the connection keeps the process alive (like socket.ref()).
    #[napi]
    pub fn set_keep_alive(&self, keep_alive: bool) {
        if let Some(poll) = self.conn.state.borrow().poll.as_ref() {
            poll.set_ref(keep_alive);
        }
    }

    /// Stops reading and closes once queued replies are sent. `onClose` is
    /// not called for a close the caller asked for.
    #[napi]
    pub fn close(&self) {
        let drained = {
            let mut state = self.conn.state.borrow_mut();
            state.closing = true;
            // What a poll callback gathered so far goes out too (or is queued).
            let sent = state.frames.as_mut().map(|f| f.uncork());
            matches!(sent, Some(Err(_))) || !state.frames.as_ref().is_some_and(|f| f.wants_write())
        };
        self.conn.js.borrow_mut().take();
        if drained {
            self.conn.teardown();
        } else {
            self.conn.state.borrow_mut().watch();
        }
    }
}

/// An Error for JS whose `code` is `errno` in decimal (JS names it).
pub(crate) fn errno_error(errno: Errno, reason: &str) -> Error<String> {
    Error::new(errno.raw_os_error().to_string(), reason.to_string())
}

/// Why a connection ended, as `onClose` hears it.
struct Failure {
    errno: Option<Errno>,
    /// What broke, when `errno` alone does not say it.
    reason: Option<String>,
}

impl From<FramingError> for Failure {
    fn from(e: FramingError) -> Self {
        // An OS error is said by its errno alone; the others need words.
        let reason = (!matches!(e, FramingError::Os(_))).then(|| e.to_string());
        Failure { errno: e.errno(), reason }
    }
}

impl From<Errno> for Failure {
    fn from(e: Errno) -> Self {
        Failure { errno: Some(e), reason: None }
    }
}

impl State {
    /// Polls for what is wanted now: reads unless closing, writes if queued.
    fn watch(&mut self) {
        let wants_write = self.frames.as_ref().is_some_and(|f| f.wants_write());
        let events = if self.closing { 0 } else { READABLE } | if wants_write { WRITABLE } else { 0 };
        if let Some(poll) = self.poll.as_mut() {
            poll.set_events(events);
        }
    }
}

impl Conn {
    fn on_ready(self: &Rc<Self>, status: i32, events: i32) {
        let js = self.js.borrow().clone();
        let mut scope = js.as_ref().map(|j| j.scope());
        if status < 0 {
            // libuv reports any POLLERR as EBADF; the socket knows the real error.
            let pending = self.state.borrow().frames.as_ref().and_then(|f| f.take_error());
            let failure = match pending {
                Some(e) => Failure::from(e),
                None => Failure { errno: None, reason: Some(format!("the socket reported an error (libuv status {status})")) },
            };
            return self.fail(scope.as_mut(), js.as_deref(), failure);
        }
        if events & WRITABLE != 0 {
            let flushed = self.state.borrow_mut().frames.as_mut().map(|f| f.flush());
            if let Some(Err(e)) = flushed {
                return self.fail(scope.as_mut(), js.as_deref(), e.into());
            }
            let mut state = self.state.borrow_mut();
            if state.closing && !state.frames.as_ref().is_some_and(|f| f.wants_write()) {
                drop(state);
                return self.teardown();
            }
            state.watch();
        }
        if events & READABLE == 0 {
            return;
        }
        // Replies to the messages read now go out together (FrameConnection::cork).
        if let Some(frames) = self.state.borrow_mut().frames.as_mut() {
            frames.cork();
        }
        self.read_messages(&mut scope, js.as_ref());
        let sent = self.state.borrow_mut().frames.as_mut().map(|f| f.uncork());
        if let Some(Err(e @ FramingError::Backlog { .. })) = sent {
            return self.fail(scope.as_mut(), js.as_deref(), e.into());
        }
        // Other failures surface on the read side, as for every reply.
        self.state.borrow_mut().watch();
    }

    /// Reads and dispatches up to a batch of messages (see `BATCH`).
    fn read_messages(self: &Rc<Self>, scope: &mut Option<CallbackScope<'_>>, js: Option<&Rc<Callbacks>>) {
        for handled in 0.. {
            let outcome = {
                let mut state = self.state.borrow_mut();
                if state.closing {
                    return;
                }
                let mut slab = self.slab.borrow_mut();
                // A small message may be answered here: keep it on the stack;
                // anything else goes straight to a slab.
                let take = |bytes: &[u8]| match bytes.len() <= SMALL {
                    true => {
                        let mut small = [0u8; SMALL];
                        small[..bytes.len()].copy_from_slice(bytes);
                        Incoming::Small { bytes: small, len: bytes.len() }
                    }
                    false => match scope.as_mut() {
                        Some(scope) => {
                            let env = scope.enter();
                            match slab.copy(env, bytes) {
                                Some((buffer, offset)) => Incoming::Js { buffer, offset, len: bytes.len() },
                                None => Incoming::NoMemory,
                            }
                        }
                        None => Incoming::Dropped,
                    },
                };
                match state.frames.as_mut() {
                    // Past the batch, only messages already buffered are
                    // handled: the poll cannot wake us for those.
                    Some(frames) if handled >= BATCH && !frames.has_buffered_frame() => return,
                    Some(frames) => frames.read_frame_with(take),
                    None => return,
                }
            };
            let frame = match outcome {
                Ok(ReadOutcome::Frame(frame)) => frame,
                Ok(ReadOutcome::WouldBlock) => return,
                Ok(ReadOutcome::Closed) => return self.end(scope.as_mut(), js.map(|j| &**j), None),
                Err(e) => return self.fail(scope.as_mut(), js.map(|j| &**j), e.into()),
            };
            let (Some(scope), Some(js)) = (scope.as_mut(), js) else { return };
            if let (Incoming::Small { bytes, len }, false) = (&frame.bytes, frame.fds_truncated) {
                // The frame's fds are closed when it is dropped, answered or not here.
                match self.answer_natively(&bytes[..*len], &frame.fds, scope) {
                    Native::Answered => continue,
                    Native::NotServed => {}
                    Native::Failed(failure) => return self.fail(Some(scope), Some(js), failure),
                }
            }
            let copied = match frame.bytes {
                Incoming::Small { bytes, len } => {
                    let env = scope.enter();
                    let copied = self.slab.borrow_mut().copy(env, &bytes[..len]);
                    copied.map(|(buffer, offset)| (buffer, offset, len))
                }
                Incoming::Js { buffer, offset, len } => Some((buffer, offset, len)),
                Incoming::NoMemory => None,
                Incoming::Dropped => return,
            };
            // The frame's fds are still owned here: dropped, they are closed.
            let Some((buffer, offset, len)) = copied else {
                let failure = Failure { errno: Some(Errno::NOMEM), reason: Some("no memory for a message's bytes".into()) };
                return self.fail(Some(scope), Some(js), failure);
            };
            let truncated = frame.fds_truncated;
            let raw: Vec<i32> = frame.fds.into_iter().map(|fd| fd.into_raw_fd()).collect();
            let result = js.call(scope, ON_MESSAGE, |env| {
                let fds = if raw.is_empty() { js::undefined(env) } else { js::int_array(env, &raw) };
                vec![buffer, js::int(env, offset as i32), js::int(env, len as i32), fds, js::boolean(env, truncated)]
            });
            let Some(result) = result else { continue };
            if js::is_true(self.env, result) {
                self.state.borrow_mut().busy += 1;
            } else if let Some(reply) = js::bytes_of(self.env, result) {
                // The reply came back as the return value: sent here, it spares
                // JS a native call per message.
                let sent = self.state.borrow_mut().frames.as_mut().map(|f| f.send(reply, &[]));
                if let Some(Err(e @ FramingError::Backlog { .. })) = sent {
                    return self.fail(Some(scope), Some(js), e.into());
                }
                // Other failures surface on the read side, as for native replies.
                self.state.borrow_mut().watch();
            }
        }
    }

    /// Answers a message here if it is one the native path serves and no
    /// earlier message is still being handled in JS.
    fn answer_natively(&self, msg: &[u8], fds: &[OwnedFd], scope: &mut CallbackScope<'_>) -> Native {
        let mut state = self.state.borrow_mut();
        if state.busy > 0 {
            return Native::NotServed;
        }
        // A command (type 0) that wants a reply, with no error field set.
        if msg.len() < HEADER_SIZE || u32_at(msg, 8) != 0 || u32_at(msg, 12) != 0 {
            return Native::NotServed;
        }
        let reply = match u16::from_le_bytes([msg[2], msg[3]]) {
            REGION_READ if fds.is_empty() => Self::region_read(&state, msg),
            DMA_MAP | DMA_UNMAP => Self::dma(&state, msg, fds, scope),
            _ => None,
        };
        let Some(reply) = reply else { return Native::NotServed };
        let Some(frames) = state.frames.as_mut() else { return Native::NotServed };
        match frames.send(&reply, &[]) {
            Ok(()) => {}
            Err(e @ FramingError::Backlog { .. }) => return Native::Failed(e.into()),
            // Let the read side see the broken stream and report it.
            Err(_) => return Native::Answered,
        }
        if u16::from_le_bytes([msg[2], msg[3]]) == REGION_READ {
            state.native_reads += 1;
        } else {
            state.native_dma += 1;
        }
        state.watch();
        Native::Answered
    }

    /// The reply to a plain REGION_READ from shared region bytes, if the
    /// region is served natively.
    fn region_read(state: &State, msg: &[u8]) -> Option<Vec<u8>> {
        if msg.len() != REGION_READ_SIZE {
            return None;
        }
        let reads = state.reads.as_ref()?;
        let offset = u64::from(u32_at(msg, 16)) | u64::from(u32_at(msg, 20)) << 32;
        let (region, count) = (u32_at(msg, 24), u32_at(msg, 28));
        let mut reply = reply_header(msg, 0);
        reply.extend_from_slice(&msg[16..32]);
        if !reads.borrow().read_into(region, offset, count, &mut reply) {
            return None;
        }
        let size = reply.len() as u32;
        reply[4..8].copy_from_slice(&size.to_le_bytes());
        Some(reply)
    }

    /// The reply to a DMA_MAP or DMA_UNMAP, applied to the window table: its
    /// payload, or the errno the table refused it with. A removed window's
    /// views are detached before the reply exists.
    fn dma(state: &State, msg: &[u8], fds: &[OwnedFd], scope: &mut CallbackScope<'_>) -> Option<Vec<u8>> {
        let table = state.dma.as_ref()?;
        let fds: Vec<BorrowedFd<'_>> = fds.iter().map(|fd| fd.as_fd()).collect();
        let command = u16::from_le_bytes([msg[2], msg[3]]);
        let applied = table.borrow_mut().apply_message(command, &msg[HEADER_SIZE..], &fds, || {
            scope.enter();
        });
        Some(match applied {
            Ok(payload) => {
                let mut reply = reply_header(msg, payload.len());
                reply.extend_from_slice(&payload);
                reply
            }
            Err(refusal) => {
                let mut reply = reply_header(msg, 0);
                reply[8..12].copy_from_slice(&(REPLY | ERROR).to_le_bytes());
                reply[12..16].copy_from_slice(&(refusal.errno.raw_os_error() as u32).to_le_bytes());
                reply
            }
        })
    }

    fn fail(&self, scope: Option<&mut CallbackScope<'_>>, js: Option<&Callbacks>, failure: Failure) {
        self.end(scope, js, Some(failure))
    }

    /// The peer went away (`None`: a clean end of stream) or the stream
    /// broke: close, then tell JS once.
    fn end(&self, scope: Option<&mut CallbackScope<'_>>, js: Option<&Callbacks>, failure: Option<Failure>) {
        self.teardown();
        let still_listening = self.js.borrow_mut().take().is_some();
        if let (true, Some(scope), Some(js)) = (still_listening, scope, js) {
            js.call(scope, ON_CLOSE, |env| match &failure {
                None => vec![],
                Some(Failure { errno, reason }) => vec![
                    reason.as_deref().map_or_else(|| js::undefined(env), |r| js::string(env, r)),
                    errno.map_or_else(|| js::undefined(env), |e| js::int(env, e.raw_os_error())),
                ],
            });
        }
    }

    fn teardown(&self) {
        let mut state = self.state.borrow_mut();
        state.closing = true;
        if let Some(poll) = state.poll.take() {
            poll.close();
        }
        state.frames.take();
        state.reads = None;
        state.dma = None;
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A successful reply's header to the command `msg` starts with, for a
/// payload of `payload` bytes.
fn reply_header(msg: &[u8], payload: usize) -> Vec<u8> {
    let mut reply = Vec::with_capacity(HEADER_SIZE + payload);
    reply.extend_from_slice(&msg[0..4]);
    reply.extend_from_slice(&((HEADER_SIZE + payload) as u32).to_le_bytes());
    reply.extend_from_slice(&REPLY.to_le_bytes());
    reply.extend_from_slice(&0u32.to_le_bytes());
    reply
}
