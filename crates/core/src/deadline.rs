//! A deadline for one system call that may block: a POSIX timer of the
//! calling thread, armed only around the call, whose signal (a no-op handler
//! installed without SA_RESTART) makes a call still blocked return EINTR.
//!
//! Why: a peer's eventfd may be blocking (its O_NONBLOCK flag is shared with
//! the peer, see `eventfd::is_eventfd`), and writing one whose counter the peer
//! holds at its maximum blocks. The timer fires only if the call outlasts
//! `LIMIT`; a call that does not wait never sees it (a signal ends a wait,
//! not a write that is running), so the common case costs two
//! `timer_settime` calls.
//!
//! The signal is the highest real-time signal with no handler when the first
//! deadline is armed; its handler does nothing. Each thread that arms one
//! gets its own timer (SIGEV_THREAD_ID), deleted when the thread exits.

use std::sync::OnceLock;
use std::time::Duration;

/// How long a call may stay blocked before it is interrupted. Not shorter:
/// a timer due before the machine's next one reprograms the clock device,
/// which tripled the cost of arming it here (1 ms: 4.6 µs per signal, 10 ms:
/// 1.4 µs, against 0.6 µs unguarded).
pub const LIMIT: Duration = Duration::from_millis(10);

extern "C" fn wake(_: libc::c_int) {}

/// The signal our handler owns, chosen and installed once per process;
/// `None` if every real-time signal is taken or the handler cannot be set.
fn signal_number() -> Option<libc::c_int> {
    static SIGNAL: OnceLock<Option<libc::c_int>> = OnceLock::new();
    *SIGNAL.get_or_init(|| {
        (libc::SIGRTMIN()..=libc::SIGRTMAX()).rev().find(|&sig| {
            // SAFETY: sigaction with valid pointers; the handler is async-signal-safe (empty).
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 || old.sa_sigaction != libc::SIG_DFL {
                    return false;
                }
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = wake as *const () as libc::sighandler_t;
                libc::sigemptyset(&mut action.sa_mask);
                // No SA_RESTART: the point is that the blocked call returns EINTR.
                action.sa_flags = 0;
                libc::sigaction(sig, &action, std::ptr::null_mut()) == 0
            }
        })
    })
}

/// This thread's timer.
struct Timer(libc::timer_t);

impl Timer {
    fn create() -> Option<Timer> {
        let sig = signal_number()?;
        // SAFETY: plain libc calls with valid, initialised arguments.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            // A thread that blocks the signal would never be interrupted.
            if libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) != 0 {
                return None;
            }
            let mut event: libc::sigevent = std::mem::zeroed();
            event.sigev_notify = libc::SIGEV_THREAD_ID;
            event.sigev_signo = sig;
            // The syscall, not glibc's gettid(): that wrapper came in glibc 2.30, past the 2.17 we link against.
            event.sigev_notify_thread_id = libc::syscall(libc::SYS_gettid) as libc::pid_t;
            let mut timer: libc::timer_t = std::mem::zeroed();
            (libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut timer) == 0).then_some(Timer(timer))
        }
    }

    /// Periodic, not one-shot: should the thread be preempted before the
    /// call starts, the next expiry still interrupts it.
    fn set(&self, period: Duration) -> bool {
        let time = libc::timespec { tv_sec: period.as_secs() as _, tv_nsec: period.subsec_nanos() as _ };
        let spec = libc::itimerspec { it_interval: time, it_value: time };
        // SAFETY: self.0 is a live timer of this process.
        unsafe { libc::timer_settime(self.0, 0, &spec, std::ptr::null_mut()) == 0 }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        // SAFETY: self.0 is a live timer, deleted once.
        unsafe { libc::timer_delete(self.0) };
    }
}

thread_local! {
    static TIMER: Option<Timer> = Timer::create();
}

/// Whether this thread can bound a call (a timer and a signal were available).
pub fn available() -> bool {
    TIMER.with(|timer| timer.is_some())
}

/// Runs `call` with this thread's deadline armed: a call blocked for longer
/// than `LIMIT` returns EINTR. `None` (and `call` not run) where no deadline
/// is available: the caller decides whether to risk the call unbounded.
pub fn bounded<T>(call: impl FnOnce() -> T) -> Option<T> {
    TIMER.with(|timer| {
        let timer = timer.as_ref()?;
        if !timer.set(LIMIT) {
            return None;
        }
        let result = call();
        timer.set(Duration::ZERO);
        Some(result)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The threads that own a POSIX timer of this process.
    fn timer_threads() -> Vec<String> {
        let text = std::fs::read_to_string("/proc/self/timers").unwrap();
        text.lines().filter_map(|line| line.strip_prefix("notify:")).map(|n| n.trim().to_string()).collect()
    }

    #[test]
    fn a_blocked_read_returns_eintr() {
        let (r, _w) = rustix::pipe::pipe().unwrap();
        let result = bounded(|| rustix::io::read(&r, &mut [0u8; 1])).expect("a deadline on Linux");
        assert_eq!(result, Err(rustix::io::Errno::INTR));
    }

    #[test]
    fn a_call_that_does_not_wait_returns_its_result() {
        let (r, w) = rustix::pipe::pipe().unwrap();
        assert_eq!(bounded(|| rustix::io::write(&w, b"x")), Some(Ok(1)));
        assert_eq!(bounded(|| rustix::io::read(&r, &mut [0u8; 1])), Some(Ok(1)));
    }

    #[test]
    fn a_threads_timer_is_deleted_when_it_exits() {
        let (tid, owners) = std::thread::spawn(|| {
            assert!(available());
            // SAFETY: gettid takes no arguments and cannot fail.
            (format!("signal/tid.{}", unsafe { libc::syscall(libc::SYS_gettid) }), timer_threads())
        })
        .join()
        .unwrap();
        assert!(owners.contains(&tid), "{tid} not in {owners:?}");
        assert!(!timer_threads().contains(&tid));
    }
}
