//! `NativeEventfdWatch`: an eventfd polled on the JS thread's loop, the way
//! the sockets are (uv.rs): each time it is signalled, the counter is read
//! (which clears it) and handed to JS. Nothing runs while it is quiet, so a
//! doorbell or an interrupt line costs no timer and no polling.

use crate::js::{self, Callbacks};
use crate::uv::{Poll, READABLE};
use napi::bindgen_prelude::*;
use napi_derive::napi;
use std::cell::RefCell;
use std::os::fd::BorrowedFd;
use std::rc::Rc;
use vfio_user_core::eventfd;

struct Watching {
    fd: i32,
    poll: Option<Poll>,
    js: Option<Rc<Callbacks>>,
}

#[napi]
pub struct NativeEventfdWatch {
    inner: Rc<RefCell<Watching>>,
}

#[napi]
impl NativeEventfdWatch {
    /// Watches `fd`, a non-blocking eventfd the caller keeps owning (and
    /// closes only after `close()`): `onSignal(count)` runs on this thread's
    /// loop with the counter read when it became non-zero. It does not keep
    /// the process alive unless `setKeepAlive(true)`.
    #[napi(constructor, ts_args_type = "fd: number, onSignal: (count: number) => void")]
    pub fn new(env: Env, fd: i32, on_signal: Function<'_>) -> Result<Self> {
        if fd < 0 {
            return Err(Error::new(Status::InvalidArg, format!("{fd} is not a file descriptor")));
        }
        let raw = env.raw();
        let inner = Rc::new(RefCell::new(Watching { fd, poll: None, js: Some(Callbacks::new(raw, "VfioUserEventfd", &[on_signal.raw()])?) }));
        let target = inner.clone();
        let mut poll = Poll::new(raw, fd, Box::new(move |status, _events| signalled(&target, status)))?;
        poll.set_events(READABLE);
        poll.set_ref(false);
        inner.borrow_mut().poll = Some(poll);
        Ok(NativeEventfdWatch { inner })
    }

    #[napi]
    pub fn set_keep_alive(&self, keep_alive: bool) {
        if let Some(poll) = self.inner.borrow().poll.as_ref() {
            poll.set_ref(keep_alive);
        }
    }

    /// Stops watching; the counter is left as it is. Idempotent.
    #[napi]
    pub fn close(&self) {
        stop(&self.inner);
    }

    #[napi(getter)]
    pub fn closed(&self) -> bool {
        self.inner.borrow().poll.is_none()
    }
}

fn stop(inner: &Rc<RefCell<Watching>>) {
    let mut w = inner.borrow_mut();
    if let Some(poll) = w.poll.take() {
        poll.close();
    }
    w.js.take();
}

fn signalled(inner: &Rc<RefCell<Watching>>, status: i32) {
    let (fd, js) = {
        let w = inner.borrow();
        let Some(js) = w.js.clone() else { return };
        (w.fd, js)
    };
    // SAFETY: the owner keeps the fd open while the watch is open.
    let taken = if status < 0 { Err(()) } else { eventfd::take(unsafe { BorrowedFd::borrow_raw(fd) }).map_err(drop) };
    match taken {
        Ok(Some(count)) => {
            js.call(&mut js.scope(), 0, |env| vec![js::double(env, count as f64)]);
        }
        // Another reader took the count first.
        Ok(None) => {}
        // Not a readable eventfd (closed under us, say): polling on would spin.
        Err(()) => stop(inner),
    }
}
