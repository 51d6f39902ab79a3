//! libuv handles on the loop of the JS thread that created them: a poll
//! handle (an fd became readable or writable) and an idle handle (run on
//! every turn of the loop, which then does not block).
//!
//! This is the hot path's design choice: the socket is watched by the same
//! loop that runs JS, so a message is read and answered on that thread with
//! no thread hop (see docs/architecture.md); doorbells in memory are scanned
//! by that loop too. libuv's symbols are exported by the Node binary; only
//! these few calls are declared by hand.

use napi::sys;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::cell::{Cell, RefCell};
use std::os::raw::{c_int, c_void};
use std::rc::Rc;

pub const READABLE: c_int = 1;
pub const WRITABLE: c_int = 2;
const UV_IDLE: c_int = 6;
const UV_POLL: c_int = 8;

extern "C" {
    fn uv_handle_size(kind: c_int) -> usize;
    fn uv_poll_init(lp: *mut sys::uv_loop_s, handle: *mut c_void, fd: c_int) -> c_int;
    fn uv_poll_start(handle: *mut c_void, events: c_int, cb: unsafe extern "C" fn(*mut c_void, c_int, c_int)) -> c_int;
    fn uv_poll_stop(handle: *mut c_void) -> c_int;
    fn uv_idle_init(lp: *mut sys::uv_loop_s, handle: *mut c_void) -> c_int;
    fn uv_idle_start(handle: *mut c_void, cb: unsafe extern "C" fn(*mut c_void)) -> c_int;
    fn uv_idle_stop(handle: *mut c_void) -> c_int;
    fn uv_close(handle: *mut c_void, cb: unsafe extern "C" fn(*mut c_void));
    fn uv_ref(handle: *mut c_void);
    fn uv_unref(handle: *mut c_void);
}

pub type Callback = Box<dyn FnMut(c_int, c_int)>;

/// What the uv handle's `data` points at (one strong count held by libuv
/// until the close callback).
struct HandleState {
    handle: *mut c_void,
    layout: Layout,
    callback: RefCell<Option<Callback>>,
    closing: Cell<bool>,
    cleanup: Cell<sys::napi_async_cleanup_hook_handle>,
}

impl Drop for HandleState {
    fn drop(&mut self) {
        // SAFETY: allocated in Poll::new with this layout; libuv let go of it
        // (the last strong count is dropped in on_close or after init failed).
        unsafe { dealloc(self.handle.cast(), self.layout) };
    }
}

/// A libuv handle of ours: allocated and initialised on the JS thread's
/// loop, its callback boxed, closed once (on drop at the latest, or when a
/// Worker's environment is torn down).
struct Handle {
    state: Rc<HandleState>,
}

impl Handle {
    /// Allocates a handle of `kind` and initialises it with `init`.
    fn new(env: sys::napi_env, kind: c_int, callback: Callback, init: impl FnOnce(*mut sys::uv_loop_s, *mut c_void) -> c_int) -> napi::Result<Handle> {
        let mut lp = std::ptr::null_mut();
        // SAFETY: plain N-API / libuv calls on the JS thread.
        unsafe {
            check(sys::napi_get_uv_event_loop(env, &mut lp), "napi_get_uv_event_loop")?;
            let layout = Layout::from_size_align(uv_handle_size(kind), 16).map_err(|e| napi::Error::from_reason(e.to_string()))?;
            let handle = alloc_zeroed(layout).cast::<c_void>();
            let state = Rc::new(HandleState {
                handle,
                layout,
                callback: RefCell::new(Some(callback)),
                closing: Cell::new(false),
                cleanup: Cell::new(std::ptr::null_mut()),
            });
            let rc = init(lp, handle);
            if rc != 0 {
                return Err(napi::Error::from_reason(format!("libuv handle init failed ({rc})")));
            }
            // uv_handle_t starts with `void *data`.
            *(handle as *mut *const HandleState) = Rc::into_raw(state.clone());
            let mut cleanup = std::ptr::null_mut();
            check(
                sys::napi_add_async_cleanup_hook(env, Some(on_env_teardown), handle, &mut cleanup),
                "napi_add_async_cleanup_hook",
            )?;
            state.cleanup.set(cleanup);
            Ok(Handle { state })
        }
    }

    fn raw(&self) -> Option<*mut c_void> {
        (!self.state.closing.get()).then_some(self.state.handle)
    }

    fn set_ref(&self, keep_alive: bool) {
        if let Some(handle) = self.raw() {
            // SAFETY: the handle is initialised and not closing.
            unsafe {
                if keep_alive {
                    uv_ref(handle)
                } else {
                    uv_unref(handle)
                }
            }
        }
    }

    fn close(&self) {
        close_handle(&self.state);
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.close();
    }
}

pub struct Poll {
    handle: Handle,
    events: c_int,
}

impl Poll {
    pub fn new(env: sys::napi_env, fd: c_int, callback: Callback) -> napi::Result<Poll> {
        // SAFETY: a handle of the poll type's size, on the JS thread's loop.
        let handle = Handle::new(env, UV_POLL, callback, |lp, handle| unsafe { uv_poll_init(lp, handle, fd) })?;
        Ok(Poll { handle, events: 0 })
    }

    /// Watches for `events` (READABLE | WRITABLE); 0 stops watching.
    pub fn set_events(&mut self, events: c_int) {
        let Some(handle) = self.handle.raw() else { return };
        if events == self.events {
            return;
        }
        // SAFETY: the handle is initialised and not closing.
        unsafe {
            if events == 0 {
                uv_poll_stop(handle);
            } else {
                uv_poll_start(handle, events, on_poll);
            }
        }
        self.events = events;
    }

    /// Whether this handle keeps the event loop (and so the process) alive.
    pub fn set_ref(&self, keep_alive: bool) {
        self.handle.set_ref(keep_alive);
    }

    pub fn close(&self) {
        self.handle.close();
    }
}

/// Runs its callback on every turn of the loop while started; the loop does
/// not block in its poll phase meanwhile. It never keeps the process alive.
pub struct Idle {
    handle: Handle,
    started: bool,
}

impl Idle {
    pub fn new(env: sys::napi_env, mut callback: Box<dyn FnMut()>) -> napi::Result<Idle> {
        // SAFETY: a handle of the idle type's size, on the JS thread's loop.
        let handle = Handle::new(env, UV_IDLE, Box::new(move |_, _| callback()), |lp, handle| unsafe { uv_idle_init(lp, handle) })?;
        handle.set_ref(false);
        Ok(Idle { handle, started: false })
    }

    pub fn set_running(&mut self, running: bool) {
        let Some(handle) = self.handle.raw() else { return };
        if running == self.started {
            return;
        }
        // SAFETY: the handle is initialised and not closing.
        unsafe {
            if running {
                uv_idle_start(handle, on_idle);
            } else {
                uv_idle_stop(handle);
            }
        }
        self.started = running;
    }

    pub fn close(&self) {
        self.handle.close();
    }
}

fn close_handle(state: &HandleState) {
    if !state.closing.replace(true) {
        // SAFETY: closed once; uv_close stops polling itself.
        unsafe { uv_close(state.handle, on_close) };
    }
}

unsafe fn state_of<'a>(handle: *mut c_void) -> &'a HandleState {
    &**(handle as *mut *const HandleState)
}

unsafe extern "C" fn on_idle(handle: *mut c_void) {
    on_poll(handle, 0, 0);
}

unsafe extern "C" fn on_poll(handle: *mut c_void, status: c_int, events: c_int) {
    let state = state_of(handle);
    // Taken out while it runs, so a close from inside the callback cannot
    // drop the closure under itself.
    let taken = state.callback.borrow_mut().take();
    if let Some(mut callback) = taken {
        callback(status, events);
        if !state.closing.get() {
            *state.callback.borrow_mut() = Some(callback);
        }
    }
}

unsafe extern "C" fn on_close(handle: *mut c_void) {
    let state = Rc::from_raw(*(handle as *mut *const HandleState));
    state.callback.borrow_mut().take();
    sys::napi_remove_async_cleanup_hook(state.cleanup.get());
}

/// A Worker is being torn down: its loop must not be closed with our handle
/// still open, so close it now (the close callback releases the hook).
unsafe extern "C" fn on_env_teardown(_hook: sys::napi_async_cleanup_hook_handle, handle: *mut c_void) {
    close_handle(state_of(handle));
}

pub fn check(status: sys::napi_status, what: &str) -> napi::Result<()> {
    if status == sys::Status::napi_ok {
        Ok(())
    } else {
        Err(napi::Error::from_reason(format!("{what} failed (napi status {status})")))
    }
}
