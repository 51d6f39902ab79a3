//! `NativeEventfd`: an eventfd this process owns (its own, or one a peer
//! sent that `isEventfd` accepted), optionally watched on the
//! JS thread's loop (the same libuv poll the sockets use), so a waiter costs
//! nothing while idle and hears each signal without polling.

use crate::js::{self, Callbacks};
use crate::uv::{Poll, READABLE};
use crate::os_error;
use napi::bindgen_prelude::*;
use napi_derive::napi;
use std::cell::RefCell;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use vfio_user_core::eventfd;

const ON_SIGNAL: usize = 0;

struct Watched {
    fd: Option<OwnedFd>,
    poll: Option<Poll>,
    js: Option<Rc<Callbacks>>,
    keep_alive: bool,
    /// A peer's eventfd (blocking maybe, read by the peer too): read with care.
    from_peer: bool,
}

impl Watched {
    fn new(fd: OwnedFd, from_peer: bool) -> Rc<RefCell<Watched>> {
        Rc::new(RefCell::new(Watched { fd: Some(fd), poll: None, js: None, keep_alive: true, from_peer }))
    }
}

/// Reads and clears `fd`'s counter, the careful way for a peer's eventfd.
fn take_counter(fd: &OwnedFd, from_peer: bool) -> rustix::io::Result<Option<u64>> {
    if from_peer { eventfd::take_from_peer(fd) } else { eventfd::take(fd) }
}

#[napi]
pub struct NativeEventfd {
    inner: Rc<RefCell<Watched>>,
}

#[napi]
impl NativeEventfd {
    /// A new non-blocking, close-on-exec eventfd with a zero counter.
    #[napi(constructor)]
    pub fn new() -> Result<Self> {
        let fd = eventfd::create().map_err(|e| os_error("eventfd", e))?;
        Ok(NativeEventfd { inner: Watched::new(fd, false) })
    }

    /// Takes ownership of `fd`, an eventfd a peer sent that `isEventfd`
    /// accepted (blocking or not, as the peer made it): INTx's resample eventfd, say, which
    /// the server watches. `close()` closes it.
    #[napi(factory)]
    pub fn from_fd(fd: i32) -> Result<Self> {
        if fd < 0 {
            return Err(Error::new(Status::InvalidArg, format!("{fd} is not a file descriptor")));
        }
        // SAFETY: the caller hands over ownership of the fd.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(NativeEventfd { inner: Watched::new(fd, true) })
    }

    /// The fd number, -1 once closed.
    #[napi(getter)]
    pub fn fd(&self) -> i32 {
        self.inner.borrow().fd.as_ref().map_or(-1, |fd| fd.as_raw_fd())
    }

    /// Reads and clears the counter: 0 if nothing was signalled.
    #[napi]
    pub fn take(&self) -> Result<f64> {
        let inner = self.inner.borrow();
        let fd = inner.fd.as_ref().ok_or_else(closed)?;
        let value = take_counter(fd, inner.from_peer).map_err(|e| os_error("eventfd read", e))?;
        Ok(value.unwrap_or(0) as f64)
    }

    /// Adds one to the counter.
    #[napi]
    pub fn signal(&self) -> Result<()> {
        let inner = self.inner.borrow();
        eventfd::signal(inner.fd.as_ref().ok_or_else(closed)?).map_err(|e| os_error("eventfd write", e))
    }

    /// Watches the counter: each time it becomes non-zero it is read and
    /// cleared, and `onSignal(count)` runs on this thread. Replaces a previous
    /// watcher. While watched, the eventfd keeps the event loop alive unless
    /// `setKeepAlive(false)`.
    #[napi(ts_args_type = "onSignal: (count: number) => void")]
    pub fn watch(&self, env: Env, on_signal: Function<'_>) -> Result<()> {
        let raw = env.raw();
        let js = Callbacks::new(raw, "VfioUserEventfd", &[on_signal.raw()])?;
        let mut inner = self.inner.borrow_mut();
        let fd = inner.fd.as_ref().ok_or_else(closed)?.as_raw_fd();
        inner.js = Some(js);
        if inner.poll.is_none() {
            // The callback holds the eventfd strongly, as a watched socket
            // stays alive unreferenced; unwatch() and close() drop the poll
            // and so the cycle.
            let target = self.inner.clone();
            let mut poll = Poll::new(raw, fd, Box::new(move |_status, _events| on_readable(&target)))?;
            poll.set_events(READABLE);
            poll.set_ref(inner.keep_alive);
            inner.poll = Some(poll);
        }
        Ok(())
    }

    /// Whether watching keeps the process alive (like `timer.ref()`); a
    /// device's doorbells should not, a VMM's interrupt lines may.
    #[napi]
    pub fn set_keep_alive(&self, keep_alive: bool) {
        let mut inner = self.inner.borrow_mut();
        inner.keep_alive = keep_alive;
        if let Some(poll) = inner.poll.as_ref() {
            poll.set_ref(keep_alive);
        }
    }

    /// Stops watching; signals accumulate in the counter for `take()`.
    #[napi]
    pub fn unwatch(&self) {
        let mut inner = self.inner.borrow_mut();
        if let Some(poll) = inner.poll.take() {
            poll.close();
        }
        inner.js.take();
    }

    /// Stops watching and closes the fd; idempotent.
    #[napi]
    pub fn close(&self) {
        self.unwatch();
        self.inner.borrow_mut().fd.take();
    }
}

fn closed() -> Error {
    Error::new(Status::GenericFailure, "EBADF: the eventfd is closed")
}

fn on_readable(inner: &Rc<RefCell<Watched>>) {
    // Nothing is borrowed while JS runs: the callback may unwatch or close.
    let (js, count) = {
        let w = inner.borrow();
        let (Some(fd), Some(js)) = (w.fd.as_ref(), w.js.clone()) else { return };
        (js, take_counter(fd, w.from_peer))
    };
    // A zero counter means another reader took it first; a read error cannot
    // happen on an eventfd we own.
    if let Ok(Some(count)) = count {
        js.call(&mut js.scope(), ON_SIGNAL, |env| vec![js::double(env, count as f64)]);
    }
}
