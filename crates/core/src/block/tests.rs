use super::*;
use crate::mmap::Protection;
use rustix::fs::{ftruncate, Mode, OFlags};
use rustix::io::{pread, pwrite};
use std::path::PathBuf;

const RW: Protection = Protection { read: true, write: true };
const PAGE: usize = 4096;

/// Both engines where this kernel has io_uring; a kernel without it still tests the threads.
fn engines() -> Vec<Engine> {
    let probe = crate::eventfd::create().unwrap();
    match uring::Uring::new(4, &probe) {
        Ok(_) => vec![Engine::IoUring, Engine::Threads],
        Err(e) => {
            eprintln!("io_uring unavailable here ({e}): testing the thread engine only");
            vec![Engine::Threads]
        }
    }
}

/// A file of `size` bytes, byte i = i * 7, in `dir`; removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(dir: &str, name: &str, size: usize) -> TempFile {
        let path = PathBuf::from(dir).join(format!("vfio-user-block-{name}-{}", std::process::id()));
        let fd = rustix::fs::open(&path, OFlags::RDWR | OFlags::CREATE | OFlags::TRUNC | OFlags::CLOEXEC, Mode::from_raw_mode(0o600)).unwrap();
        let bytes: Vec<u8> = (0..size).map(|i| (i * 7) as u8).collect();
        assert_eq!(pwrite(&fd, &bytes, 0).unwrap(), size);
        TempFile(path)
    }

    fn read(&self, at: u64, len: usize) -> Vec<u8> {
        let fd = rustix::fs::open(&self.0, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).unwrap();
        let mut out = vec![0u8; len];
        assert_eq!(pread(&fd, &mut out, at).unwrap(), len);
        out
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn options(engine: Engine) -> OpenOptions {
    OpenOptions { direct: false, read_only: false, engine: EngineChoice::Only(engine), depth: 8 }
}

/// Guest memory: a memfd of `pages` pages mapped as one window.
fn guest(pages: usize) -> (OwnedFd, Arc<Mapping>) {
    let fd = crate::memfd::create("guest", (pages * PAGE) as u64).unwrap();
    let m = Arc::new(Mapping::new(&fd, 0, (pages * PAGE) as u64, RW).unwrap());
    (fd, m)
}

fn segment(m: &Arc<Mapping>, offset: usize, len: usize, direction: Direction) -> Segment {
    Segment::new(m, offset as u64, len, direction).unwrap()
}

/// Waits for `n` completions, as an event loop would: poll the eventfd, reap.
fn wait(q: &mut Queue, n: usize) -> Vec<Completion> {
    q.submit();
    let mut out = Vec::new();
    q.reap(&mut out);
    while out.len() < n {
        let mut fds = [rustix::event::PollFd::new(&q.eventfd, rustix::event::PollFlags::IN)];
        rustix::event::poll(&mut fds, None).unwrap();
        q.reap(&mut out);
    }
    assert_eq!(q.in_flight(), 0);
    out
}

fn expected(at: usize, len: usize) -> Vec<u8> {
    (at..at + len).map(|i| (i * 7) as u8).collect()
}

#[test]
fn reads_land_in_guest_pages_across_segments_and_windows() {
    for engine in engines() {
        let file = TempFile::new("/tmp", &format!("read-{engine:?}"), 64 * 1024);
        let mut q = Queue::open(&file.0, &options(engine)).unwrap();
        assert_eq!((q.engine(), q.size(), q.alignment()), (engine, 64 * 1024, None));
        let (_a_fd, a) = guest(4);
        let (_b_fd, b) = guest(4);
        // 100 bytes at the end of a's page 0, 8000 bytes of b, 3 bytes in a's page 3.
        let segments = vec![
            segment(&a, PAGE - 100, 100, Direction::IntoMemory),
            segment(&b, 10, 8000, Direction::IntoMemory),
            segment(&a, 3 * PAGE, 3, Direction::IntoMemory),
        ];
        q.push(42, Request::Read { at: 1000, segments }).unwrap();
        assert_eq!(wait(&mut q, 1), [Completion { tag: 42, result: Ok(()) }]);
        let (mut x, mut y, mut z) = (vec![0u8; 100], vec![0u8; 8000], vec![0u8; 3]);
        a.read_at((PAGE - 100) as u64, &mut x).unwrap();
        b.read_at(10, &mut y).unwrap();
        a.read_at(3 * PAGE as u64, &mut z).unwrap();
        assert_eq!([x, y, z].concat(), expected(1000, 8103), "{engine:?}");
        // The kernel wrote those pages: they are dirty for migration.
        assert!(a.dirty().is_dirty(0) && !a.dirty().is_dirty(1) && a.dirty().is_dirty(3));
        assert!(b.dirty().is_dirty(0) && b.dirty().is_dirty(1) && !b.dirty().is_dirty(2));
    }
}

#[test]
fn writes_leave_from_guest_pages_and_flush() {
    for engine in engines() {
        let file = TempFile::new("/tmp", &format!("write-{engine:?}"), 64 * 1024);
        let mut q = Queue::open(&file.0, &options(engine)).unwrap();
        let (_fd, m) = guest(2);
        m.write_at(0, &[0xaa; 2 * PAGE]).unwrap();
        m.write_at(PAGE as u64, b"second").unwrap();
        let segments = vec![segment(&m, PAGE, 6, Direction::FromMemory), segment(&m, 0, 10, Direction::FromMemory)];
        q.push(1, Request::Write { at: 5000, segments }).unwrap();
        q.push(2, Request::Flush).unwrap();
        let mut tags: Vec<_> = wait(&mut q, 2).into_iter().map(|c| (c.tag, c.result)).collect();
        tags.sort_by_key(|(tag, _)| *tag);
        assert_eq!(tags, [(1, Ok(())), (2, Ok(()))]);
        assert_eq!(file.read(4999, 18), [&expected(4999, 1)[..], b"second", &[0xaa; 10], &expected(5016, 1)].concat());
    }
}

#[test]
fn discard_and_write_zeroes_read_back_as_zeros_on_disk_and_on_tmpfs() {
    // ext4 punches holes and zeroes ranges; tmpfs punches but has no ZERO_RANGE, so zeros are written.
    for dir in ["/tmp", "/dev/shm"] {
        for engine in engines() {
            let file = TempFile::new(dir, &format!("zero-{engine:?}"), 1 << 20);
            let mut q = Queue::open(&file.0, &options(engine)).unwrap();
            q.push(1, Request::Discard { at: 4096, len: 8192 }).unwrap();
            q.push(2, Request::WriteZeroes { at: 100_000, len: 300_000 }).unwrap();
            let results: Vec<_> = wait(&mut q, 2).into_iter().map(|c| c.result).collect();
            assert_eq!(results, [Ok(()), Ok(())], "{dir} {engine:?}");
            assert_eq!(file.read(4095, 8194), [&expected(4095, 1)[..], &[0; 8192], &expected(12288, 1)].concat());
            assert_eq!(file.read(99_999, 300_002), [&expected(99_999, 1)[..], &vec![0; 300_000], &expected(400_000, 1)].concat());
        }
    }
}

#[test]
fn bad_requests_are_refused_before_anything_starts() {
    for engine in engines() {
        let file = TempFile::new("/tmp", &format!("refuse-{engine:?}"), 8192);
        let mut q = Queue::open(&file.0, &OpenOptions { depth: 2, ..options(engine) }).unwrap();
        let (_fd, m) = guest(1);
        let read = |at| Request::Read { at, segments: vec![segment(&m, 0, 16, Direction::IntoMemory)] };
        assert_eq!(q.push(1, read(8192 - 15)), Err(Errno::INVAL));
        assert_eq!(q.push(1, read(u64::MAX - 4)), Err(Errno::INVAL));
        assert_eq!(q.push(1, Request::Discard { at: 4096, len: 4097 }), Err(Errno::INVAL));
        // The depth bounds what is in flight.
        q.push(1, read(0)).unwrap();
        q.push(2, read(16)).unwrap();
        assert_eq!(q.push(3, read(32)), Err(Errno::AGAIN));
        assert_eq!(wait(&mut q, 2).len(), 2);
        q.push(3, read(32)).unwrap();
        assert_eq!(wait(&mut q, 1)[0].result, Ok(()));

        let mut ro = Queue::open(&file.0, &OpenOptions { read_only: true, ..options(engine) }).unwrap();
        let write = Request::Write { at: 0, segments: vec![segment(&m, 0, 16, Direction::FromMemory)] };
        assert_eq!(ro.push(1, write), Err(Errno::BADF));
        assert_eq!(ro.push(1, Request::WriteZeroes { at: 0, len: 16 }), Err(Errno::BADF));
        assert!(ro.read_only());
    }
}

#[test]
fn segments_outside_their_window_or_its_permissions_are_refused() {
    let fd = crate::memfd::create("guest", 2 * PAGE as u64).unwrap();
    let m = Arc::new(Mapping::new(&fd, 0, 2 * PAGE as u64, Protection { read: true, write: false }).unwrap());
    assert!(matches!(Segment::new(&m, PAGE as u64, PAGE + 1, Direction::FromMemory), Err(MappingError::OutOfBounds { .. })));
    assert!(matches!(Segment::new(&m, u64::MAX, 2, Direction::FromMemory), Err(MappingError::OutOfBounds { .. })));
    assert_eq!(Segment::new(&m, 0, 1, Direction::IntoMemory).unwrap_err().errno(), Errno::PERM);
    Segment::new(&m, 0, 2 * PAGE, Direction::FromMemory).unwrap();
}

#[test]
fn an_unmapped_window_stays_mapped_until_its_io_completes() {
    for engine in engines() {
        let file = TempFile::new("/tmp", &format!("unmap-{engine:?}"), 64 * 1024);
        let mut q = Queue::open(&file.0, &options(engine)).unwrap();
        let (fd, m) = guest(16);
        let weak = Arc::downgrade(&m);
        q.push(7, Request::Read { at: 0, segments: vec![segment(&m, 0, 64 * 1024, Direction::IntoMemory)] }).unwrap();
        drop(m); // the window's owner unmaps it
        assert_eq!(wait(&mut q, 1)[0].result, Ok(()));
        // The data landed in the memory (still the guest's file), and the mapping went with the job.
        assert!(weak.upgrade().is_none());
        let mut back = vec![0u8; 64];
        assert_eq!(pread(&fd, &mut back, 1000).unwrap(), 64);
        assert_eq!(back, expected(1000, 64));
    }
}

#[test]
fn a_read_into_guest_memory_the_client_truncated_fails_with_efault() {
    for engine in engines() {
        let file = TempFile::new("/tmp", &format!("trunc-{engine:?}"), 64 * 1024);
        let mut q = Queue::open(&file.0, &options(engine)).unwrap();
        let (fd, m) = guest(4);
        ftruncate(&fd, PAGE as u64).unwrap();
        q.push(1, Request::Read { at: 0, segments: vec![segment(&m, 2 * PAGE, PAGE, Direction::IntoMemory)] }).unwrap();
        q.push(2, Request::Write { at: 0, segments: vec![segment(&m, 2 * PAGE, PAGE, Direction::FromMemory)] }).unwrap();
        let results: Vec<_> = wait(&mut q, 2).into_iter().map(|c| c.result).collect();
        assert_eq!(results, [Err(Errno::FAULT), Err(Errno::FAULT)], "{engine:?}");
    }
}

#[test]
fn direct_io_reports_and_checks_its_alignment() {
    for engine in engines() {
        let file = TempFile::new("/tmp", &format!("direct-{engine:?}"), 64 * 1024);
        let mut q = match Queue::open(&file.0, &OpenOptions { direct: true, ..options(engine) }) {
            Err(OpenError::DirectRefused { .. }) => {
                eprintln!("the temporary directory's filesystem refuses O_DIRECT");
                return;
            }
            other => other.unwrap(),
        };
        let align = q.alignment().expect("direct I/O has an alignment");
        let (mem, off) = (align.memory as usize, align.offset as usize);
        assert!(mem.is_power_of_two() && off.is_power_of_two() && off <= PAGE, "{align:?}");
        let (_fd, m) = guest(4);
        let read = |at: u64, offset: usize, len: usize| Request::Read { at, segments: vec![segment(&m, offset, len, Direction::IntoMemory)] };
        assert_eq!(q.push(1, read(off as u64 / 2 + 1, 0, PAGE)), Err(Errno::INVAL));
        assert_eq!(q.push(1, read(0, 0, off + 1)), Err(Errno::INVAL));
        if mem > 1 {
            assert_eq!(q.push(1, read(0, 1, off)), Err(Errno::INVAL));
        }
        q.push(1, read(2 * PAGE as u64, PAGE, 2 * PAGE)).unwrap();
        assert_eq!(wait(&mut q, 1)[0].result, Ok(()));
        let mut back = vec![0u8; 2 * PAGE];
        m.read_at(PAGE as u64, &mut back).unwrap();
        assert_eq!(back, expected(2 * PAGE, 2 * PAGE));
    }
}

#[test]
fn opening_checks_what_it_opens() {
    let missing = Queue::open(Path::new("/nonexistent/vfio-user-block"), &options(Engine::Threads)).unwrap_err();
    assert_eq!(missing.errno(), Errno::NOENT);
    assert_eq!(Queue::open(Path::new("/tmp"), &options(Engine::Threads)).unwrap_err().errno(), Errno::ISDIR);
    let file = TempFile::new("/tmp", "depth", 4096);
    assert_eq!(Queue::open(&file.0, &OpenOptions { depth: 0, ..options(Engine::Threads) }).unwrap_err(), OpenError::Depth(0));
    assert_eq!(Queue::open(Path::new("/dev/null"), &options(Engine::Threads)).unwrap_err().errno(), Errno::NODEV);
}

#[test]
fn dropping_a_queue_waits_for_its_requests() {
    for engine in engines() {
        let file = TempFile::new("/tmp", &format!("drop-{engine:?}"), 1 << 20);
        let mut q = Queue::open(&file.0, &options(engine)).unwrap();
        let (fd, m) = guest(256);
        for i in 0..8u64 {
            let at = i * 128 * 1024;
            q.push(i, Request::Read { at, segments: vec![segment(&m, at as usize, 128 * 1024, Direction::IntoMemory)] }).unwrap();
        }
        drop(m);
        // Pushed, not yet submitted: dropping the queue submits and waits for them.
        drop(q);
        let mut back = vec![0u8; 16];
        assert_eq!(pread(&fd, &mut back, 1_000_000).unwrap(), 16);
        assert_eq!(back, expected(1_000_000, 16));
    }
}

#[test]
fn transfers_that_need_no_device_are_served_within_submit() {
    // tmpfs is memory (reads and writes are copies); on /tmp (a disk
    // filesystem here) a read of cached pages is served with RWF_NOWAIT.
    for (dir, write_too) in [("/dev/shm", true), ("/tmp", false)] {
        for engine in engines() {
            let file = TempFile::new(dir, &format!("inline-{engine:?}"), 64 * 1024);
            let mut q = Queue::open(&file.0, &options(engine)).unwrap();
            let (_fd, m) = guest(4);
            q.push(1, Request::Read { at: 4096, segments: vec![segment(&m, 0, 2 * PAGE, Direction::IntoMemory)] }).unwrap();
            if write_too {
                q.push(2, Request::Write { at: 0, segments: vec![segment(&m, PAGE, 100, Direction::FromMemory)] }).unwrap();
            }
            q.submit();
            let mut out = Vec::new();
            q.reap(&mut out);
            assert_eq!(out.len(), 1 + write_too as usize, "{dir} {engine:?}: served at once");
            assert!(out.iter().all(|c| c.result == Ok(())), "{out:?}");
            assert_eq!(q.in_flight(), 0);
            assert!(!crate::eventfd::ready(q.eventfd(), rustix::event::PollFlags::IN).unwrap(), "no engine involved");
            let mut back = vec![0u8; 2 * PAGE];
            m.read_at(0, &mut back).unwrap();
            assert_eq!(back, expected(4096, 2 * PAGE));
            if write_too {
                assert_eq!(file.read(0, 100), expected(4096 + PAGE, 100));
            }
        }
    }
}
