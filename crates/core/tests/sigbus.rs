//! The SIGBUS handler as a process sees it: which signals it claims, what it
//! chains, and what happens when another handler is installed after it.
//! Each case runs in a child process of this binary (a signal disposition is
//! process-wide, and getting it wrong kills the process), the parent checks
//! how the child ended.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use vfio_user_core::{memfd, Mapping, MappingError, Protection};

const RW: Protection = Protection { read: true, write: true };

/// A mapping of a 2-page file cut to 1 page: reading page 1 faults.
fn truncated() -> (rustix::fd::OwnedFd, Mapping) {
    let fd = memfd::create("sigbus-test", 2 * 4096).unwrap();
    let m = Mapping::new(&fd, 0, 2 * 4096, RW).unwrap();
    rustix::fs::ftruncate(&fd, 4096).unwrap();
    (fd, m)
}

fn recovers(m: &Mapping) {
    let mut out = [0u8; 4];
    assert!(matches!(m.read_at(4096, &mut out), Err(MappingError::Fault { .. })));
}

fn kill_bus() {
    // SAFETY: plain syscalls.
    unsafe { libc::kill(libc::getpid(), libc::SIGBUS) };
}

fn set_handler(handler: libc::sighandler_t, siginfo: bool) -> libc::sigaction {
    // SAFETY: a zeroed sigaction is valid; the handler has the right type for its flags.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler;
        action.sa_flags = if siginfo { libc::SA_SIGINFO | libc::SA_NODEFER } else { 0 };
        let mut old: libc::sigaction = std::mem::zeroed();
        assert_eq!(libc::sigaction(libc::SIGBUS, &action, &mut old), 0);
        old
    }
}

static FIRST: AtomicUsize = AtomicUsize::new(0);
static LATER: AtomicUsize = AtomicUsize::new(0);

extern "C" fn count_first(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    FIRST.fetch_add(1, Ordering::SeqCst);
}

/// A handler that never chains: a fault it returns from would fault again
/// forever, so it gives up (exit 3) after a few.
extern "C" fn count_later(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    if LATER.fetch_add(1, Ordering::SeqCst) >= 3 {
        // SAFETY: async-signal-safe.
        unsafe { libc::_exit(3) };
    }
}

/// Cases run in the child, by name.
fn run_case(name: &str) {
    match name {
        "kill-with-ignored-previous" => {
            set_handler(libc::SIG_IGN, false);
            let (_fd, m) = truncated();
            recovers(&m);
            kill_bus();
            // Ignored as before, and faults are still recovered.
            recovers(&m);
            recovers(&m);
        }
        "kill-with-default-previous" => {
            // Rust's runtime has a SIGBUS handler of its own (stack overflows): not the default.
            set_handler(libc::SIG_DFL, false);
            let (_fd, m) = truncated();
            recovers(&m);
            kill_bus();
            // The default action of a sent SIGBUS ends the process.
        }
        "handlers-before-and-after" => {
            set_handler(count_first as *const () as libc::sighandler_t, true);
            let (_fd, m) = truncated();
            recovers(&m);
            kill_bus();
            assert_eq!(FIRST.load(Ordering::SeqCst), 1, "a sent SIGBUS goes to the handler before ours");
            set_handler(count_later as *const () as libc::sighandler_t, true);
            // A new mapping puts ours back in front: faults in copies are ours again.
            let (_fd2, m2) = truncated();
            recovers(&m);
            recovers(&m2);
            assert_eq!(LATER.load(Ordering::SeqCst), 0);
            kill_bus();
            assert_eq!(LATER.load(Ordering::SeqCst), 1, "a sent SIGBUS goes to the handler installed after ours");
            assert_eq!(FIRST.load(Ordering::SeqCst), 1, "which did not chain on");
        }
        other => panic!("no case {other}"),
    }
}

/// Names the case a child runs. Not an argument: `cargo test NAME` passes its filter to every test
/// binary, this one included.
const CASE: &str = "VFIO_USER_SIGBUS_CASE";

fn child(name: &str) -> ExitStatus {
    Command::new(std::env::current_exe().unwrap()).env(CASE, name).status().unwrap()
}

fn main() {
    if let Ok(name) = std::env::var(CASE) {
        run_case(&name);
        std::process::exit(0);
    }
    let mut failed = Vec::new();
    let mut check = |name: &str, ok: &dyn Fn(ExitStatus) -> bool| {
        let status = child(name);
        let pass = ok(status);
        println!("sigbus case {name}: {status} ({})", if pass { "ok" } else { "FAILED" });
        if !pass {
            failed.push(name.to_string());
        }
    };
    check("kill-with-ignored-previous", &|s| s.success());
    check("kill-with-default-previous", &|s| s.signal() == Some(libc::SIGBUS));
    check("handlers-before-and-after", &|s| s.success());
    if !failed.is_empty() {
        eprintln!("failed: {failed:?}");
        std::process::exit(1);
    }
}
