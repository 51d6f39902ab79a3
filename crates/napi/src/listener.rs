//! `NativeListener`: a listening UNIX socket polled on the JS thread's loop.

use crate::js::{self, Callbacks};
use crate::uv::{Poll, READABLE};
use napi::bindgen_prelude::*;
use napi_derive::napi;
use std::cell::RefCell;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::rc::Rc;

struct Listening {
    fd: Option<OwnedFd>,
    path: PathBuf,
    /// The socket file we created, so close() never unlinks a replacement.
    inode: u64,
    poll: Option<Poll>,
    js: Option<Rc<Callbacks>>,
    paused: bool,
}

#[napi]
pub struct NativeListener {
    inner: Rc<RefCell<Listening>>,
}

#[napi]
impl NativeListener {
    /// Listens at `path` (file mode `mode`); each accepted connection's fd is
    /// handed to `onConnection(fd)`, which owns it from then on.
    #[napi(constructor, ts_args_type = "path: string, mode: number, onConnection: (fd: number) => void")]
    pub fn new(env: Env, path: String, mode: u32, on_connection: Function<'_>) -> Result<Self> {
        let path = PathBuf::from(path);
        let fd = vfio_user_core::socket::listen(&path, mode, 16).map_err(|e| {
            Error::new(Status::GenericFailure, format!("E{}: cannot listen on {}: {}", e.raw_os_error(), path.display(), std::io::Error::from(e)))
        })?;
        let inode = std::fs::metadata(&path).map(|m| m.ino()).unwrap_or(0);
        let raw = env.raw();
        let raw_fd = fd.as_raw_fd();
        let inner = Rc::new(RefCell::new(Listening {
            fd: Some(fd),
            path,
            inode,
            poll: None,
            js: Some(Callbacks::new(raw, "VfioUserListener", &[on_connection.raw()])?),
            paused: false,
        }));
        let target = inner.clone();
        let mut poll = Poll::new(raw, raw_fd, Box::new(move |_status, _events| accept_ready(&target)))?;
        poll.set_events(READABLE);
        inner.borrow_mut().poll = Some(poll);
        Ok(NativeListener { inner })
    }

    /// Stops accepting: further clients wait in the backlog.
    #[napi]
    pub fn pause(&self) {
        let mut l = self.inner.borrow_mut();
        l.paused = true;
        if let Some(p) = l.poll.as_mut() {
            p.set_events(0);
        }
    }

    #[napi]
    pub fn resume(&self) {
        let mut l = self.inner.borrow_mut();
        l.paused = false;
        if let Some(p) = l.poll.as_mut() {
            p.set_events(READABLE);
        }
    }

    #[napi]
    pub fn set_keep_alive(&self, keep_alive: bool) {
        if let Some(p) = self.inner.borrow().poll.as_ref() {
            p.set_ref(keep_alive);
        }
    }

    /// Stops listening and removes the socket file.
    #[napi]
    pub fn close(&self) {
        let mut l = self.inner.borrow_mut();
        if let Some(poll) = l.poll.take() {
            poll.close();
        }
        if l.fd.take().is_some() && std::fs::metadata(&l.path).is_ok_and(|m| m.ino() == l.inode) {
            let _ = std::fs::remove_file(&l.path);
        }
        l.js.take();
    }
}

fn accept_ready(inner: &Rc<RefCell<Listening>>) {
    loop {
        let (js, accepted) = {
            let l = inner.borrow();
            let (false, Some(fd), Some(js)) = (l.paused, l.fd.as_ref(), l.js.clone()) else { return };
            (js, vfio_user_core::socket::accept(fd))
        };
        let fd = match accepted {
            Ok(Some(fd)) => fd,
            // EMFILE and friends: the client stays in the backlog; retried on
            // the next readiness.
            Ok(None) | Err(_) => return,
        };
        let raw = fd.into_raw_fd();
        js.call(&mut js.scope(), 0, |env| vec![js::int(env, raw)]);
    }
}
