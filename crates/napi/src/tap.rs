//! `NativeTap`: a TAP interface (`vfio_user_core::tap`) watched on the JS
//! thread's loop (the libuv poll the sockets use): `onReadable` runs when
//! packets wait, and the caller reads them until none is left or it has
//! nowhere to put them, then stops reading (`setReading(false)`): the kernel
//! holds what comes meanwhile, up to the interface's transmit queue length.

use crate::js::Callbacks;
use crate::uv::{Poll, READABLE};
use napi::bindgen_prelude::*;
use napi_derive::napi;
use std::cell::RefCell;
use std::os::fd::{AsFd, AsRawFd};
use std::rc::Rc;
use vfio_user_core::tap::{self, Tap, MAX_PACKET};

const ON_READABLE: usize = 0;

struct State {
    tap: Option<Tap>,
    poll: Option<Poll>,
    js: Option<Rc<Callbacks>>,
    /// One packet's worth, reused by every read.
    buf: Vec<u8>,
}

#[napi]
pub struct NativeTap {
    inner: Rc<RefCell<State>>,
    name: String,
}

fn errno_error(errno: rustix::io::Errno, what: &str) -> Error<String> {
    let text = std::io::Error::from_raw_os_error(errno.raw_os_error());
    Error::new(errno.raw_os_error().to_string(), format!("{what}: {text}"))
}

/// A failure of the binding itself (N-API, libuv), with its status as `code`.
fn native_error(e: Error) -> Error<String> {
    Error::new(e.status.to_string(), e.reason)
}

fn closed() -> Error<String> {
    errno_error(rustix::io::Errno::BADF, "the TAP is closed")
}

#[napi]
impl NativeTap {
    /// Attaches to TAP interface `name`, or creates it (`tap::open`); throws
    /// with the errno as `code`.
    #[napi(factory)]
    pub fn open(name: String) -> std::result::Result<Self, Error<String>> {
        let opened = tap::open(&name).map_err(|e| errno_error(e, &format!("cannot open TAP {name}")))?;
        let name = opened.name().to_string();
        Ok(NativeTap { inner: Rc::new(RefCell::new(State { tap: Some(opened), poll: None, js: None, buf: vec![0; MAX_PACKET] })), name })
    }

    /// The interface's name (a `%d` in the request filled in).
    #[napi(getter)]
    pub fn name(&self) -> String {
        self.name.clone()
    }

    /// The interface's MTU now (the host may change it).
    #[napi]
    pub fn mtu(&self) -> std::result::Result<u32, Error<String>> {
        tap::mtu(&self.name).map_err(|e| errno_error(e, &format!("MTU of {}", self.name)))
    }

    /// The next packet (vnet header, then the frame), or null when none
    /// waits. Throws with the errno (EBADFD: the interface was deleted).
    #[napi]
    pub fn read(&self) -> std::result::Result<Option<Buffer>, Error<String>> {
        let mut state = self.inner.borrow_mut();
        let State { tap, buf, .. } = &mut *state;
        let tap = tap.as_ref().ok_or_else(closed)?;
        match tap.read(buf) {
            Ok(Some(n)) => Ok(Some(buf[..n].to_vec().into())),
            Ok(None) => Ok(None),
            Err(e) => Err(errno_error(e, &format!("read from TAP {}", self.name))),
        }
    }

    /// Hands a packet (vnet header, then the frame; a buffer of the caller's,
    /// not a view of guest memory) to the host: 0, or the errno of a packet
    /// the host refused (EIO: the interface is down). Never waits.
    #[napi]
    pub fn write(&self, packet: &[u8]) -> std::result::Result<i32, Error<String>> {
        let state = self.inner.borrow();
        let tap = state.tap.as_ref().ok_or_else(closed)?;
        Ok(tap.write(packet).err().map_or(0, |e| e.raw_os_error()))
    }

    /// Calls `onReadable()` on this thread whenever packets wait and reading
    /// is on (it is, until `setReading(false)`). Replaces a previous callback.
    /// Watching does not keep the process alive.
    #[napi(ts_args_type = "onReadable: () => void")]
    pub fn watch(&self, env: Env, on_readable: Function<'_>) -> std::result::Result<(), Error<String>> {
        let raw = env.raw();
        let js = Callbacks::new(raw, "VfioUserTap", &[on_readable.raw()]).map_err(native_error)?;
        let mut state = self.inner.borrow_mut();
        let fd = state.tap.as_ref().ok_or_else(closed)?.as_fd().as_raw_fd();
        state.js = Some(js);
        if state.poll.is_none() {
            // The callback holds the state strongly; close() drops the poll and so the cycle.
            let target = self.inner.clone();
            let mut poll = Poll::new(raw, fd, Box::new(move |_status, _events| on_readable_packets(&target)))
                .map_err(native_error)?;
            poll.set_events(READABLE);
            poll.set_ref(false);
            state.poll = Some(poll);
        }
        Ok(())
    }

    /// Whether `onReadable` runs when packets wait: off while the reader has
    /// nowhere to put them, so the loop does not spin on a readable fd.
    #[napi]
    pub fn set_reading(&self, reading: bool) {
        if let Some(poll) = self.inner.borrow_mut().poll.as_mut() {
            poll.set_events(if reading { READABLE } else { 0 });
        }
    }

    /// Stops watching and closes the fd (an interface this process created
    /// goes away); idempotent.
    #[napi]
    pub fn close(&self) {
        let mut state = self.inner.borrow_mut();
        if let Some(poll) = state.poll.take() {
            poll.close();
        }
        state.js.take();
        state.tap.take();
    }
}

fn on_readable_packets(inner: &Rc<RefCell<State>>) {
    // Nothing is borrowed while JS runs: the callback reads, and may close.
    let Some(js) = inner.borrow().js.clone() else { return };
    js.call(&mut js.scope(), ON_READABLE, |_| vec![]);
}
