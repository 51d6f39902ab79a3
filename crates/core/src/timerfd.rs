//! One-shot timers as fds (timerfd, CLOCK_MONOTONIC): an event loop polls
//! the fd, so a wait of tens of microseconds wakes it without a thread of
//! its own and without its millisecond timers' rounding.

use rustix::fd::{AsFd, OwnedFd};
use rustix::io;
use rustix::time::{timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec};
use std::time::Duration;

/// A non-blocking, close-on-exec timerfd, disarmed.
pub fn create() -> io::Result<OwnedFd> {
    timerfd_create(TimerfdClockId::Monotonic, TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC)
}

fn timespec(d: Duration) -> Timespec {
    Timespec { tv_sec: d.as_secs() as _, tv_nsec: d.subsec_nanos() as _ }
}

/// Makes `fd` readable once, `after` from now (at least a nanosecond: zero would disarm it).
pub fn arm(fd: impl AsFd, after: Duration) -> io::Result<()> {
    let value = timespec(after.max(Duration::from_nanos(1)));
    timerfd_settime(fd, TimerfdTimerFlags::empty(), &Itimerspec { it_interval: timespec(Duration::ZERO), it_value: value }).map(|_| ())
}

pub fn disarm(fd: impl AsFd) -> io::Result<()> {
    let zero = timespec(Duration::ZERO);
    timerfd_settime(fd, TimerfdTimerFlags::empty(), &Itimerspec { it_interval: zero, it_value: zero }).map(|_| ())
}

/// Clears an expiry; false when the timer had not fired.
pub fn take(fd: impl AsFd) -> io::Result<bool> {
    let mut buf = [0u8; 8];
    match rustix::io::read(fd, &mut buf) {
        Ok(_) => Ok(true),
        Err(io::Errno::AGAIN) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::event::{poll, PollFd, PollFlags};

    #[test]
    fn an_armed_timer_fires_once_and_a_disarmed_one_never() {
        let fd = create().unwrap();
        assert!(!take(&fd).unwrap());
        arm(&fd, Duration::from_micros(20)).unwrap();
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        assert_eq!(poll(&mut fds, None).unwrap(), 1);
        assert!(take(&fd).unwrap());
        assert!(!take(&fd).unwrap(), "one-shot");
        arm(&fd, Duration::from_millis(1)).unwrap();
        disarm(&fd).unwrap();
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        assert_eq!(poll(&mut fds, Some(&Timespec { tv_sec: 0, tv_nsec: 5_000_000 })).unwrap(), 0);
    }
}
