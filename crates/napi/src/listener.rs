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
    /// The socket file we created and its inode, so close() removes it and
    /// never a replacement; none for an adopted socket (not ours to remove).
    file: Option<(PathBuf, u64)>,
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
    /// handed to `onConnection(fd)`, which owns it from then on. A failed
    /// accept (EMFILE...) stops accepting and calls `onConnection(-errno)`;
    /// `resume()` starts again.
    #[napi(constructor, ts_args_type = "path: string, mode: number, onConnection: (fdOrErrno: number) => void")]
    pub fn new(env: Env, path: String, mode: u32, on_connection: Function<'_>) -> Result<Self> {
        let path = PathBuf::from(path);
        let fd = vfio_user_core::socket::listen(&path, mode, 16).map_err(|e| {
            Error::new(Status::GenericFailure, format!("E{}: cannot listen on {}: {}", e.raw_os_error(), path.display(), std::io::Error::from(e)))
        })?;
        let inode = std::fs::metadata(&path).map(|m| m.ino()).unwrap_or(0);
        Self::start(env, fd, Some((path, inode)), on_connection)
    }

    /// Serves on an already listening UNIX socket `fd` (the `--fd` backend
    /// convention), taking ownership of it; close() leaves its file alone.
    #[napi(factory, ts_args_type = "fd: number, onConnection: (fdOrErrno: number) => void")]
    pub fn adopt(env: Env, fd: i32, on_connection: Function<'_>) -> Result<Self> {
        if fd < 0 {
            return Err(Error::new(Status::InvalidArg, format!("{fd} is not a file descriptor")));
        }
        // SAFETY: the caller hands over ownership of the fd.
        let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let fd = vfio_user_core::socket::adopt_listener(owned).map_err(|e| {
            Error::new(Status::InvalidArg, format!("E{}: fd {fd} is not a listening UNIX stream socket: {}", e.raw_os_error(), std::io::Error::from(e)))
        })?;
        Self::start(env, fd, None, on_connection)
    }

    fn start(env: Env, fd: OwnedFd, file: Option<(PathBuf, u64)>, on_connection: Function<'_>) -> Result<Self> {
        let raw = env.raw();
        let raw_fd = fd.as_raw_fd();
        let inner = Rc::new(RefCell::new(Listening {
            fd: Some(fd),
            file,
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
        if let (Some(_), Some((path, inode))) = (l.fd.take(), l.file.as_ref()) {
            if std::fs::metadata(path).is_ok_and(|m| m.ino() == *inode) {
                let _ = std::fs::remove_file(path);
            }
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
        let raw = match accepted {
            Ok(Some(fd)) => fd.into_raw_fd(),
            Ok(None) => return,
            // EMFILE and friends: the client stays in the backlog, and the
            // level-triggered poll would retry at once, forever. Stop polling
            // and tell JS (a negative errno), which resumes a little later.
            Err(e) => {
                if let Some(poll) = inner.borrow_mut().poll.as_mut() {
                    poll.set_events(0);
                }
                -e.raw_os_error()
            }
        };
        js.call(&mut js.scope(), 0, |env| vec![js::int(env, raw)]);
        if raw < 0 {
            return;
        }
    }
}
