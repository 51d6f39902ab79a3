//! Message framing over a non-blocking UNIX stream socket.
//!
//! A vfio-user message is a 16-byte header whose `msg_size` (bytes 4..8)
//! counts the whole message, followed by the body. Reads go into a buffer in
//! large recvmsg calls, so a small request costs one read, like any stream
//! server; whole messages are then cut out of the buffer.
//!
//! fds travel as SCM_RIGHTS on the sendmsg that carries a message. Linux ends
//! a stream read right after the first chunk that carried fds, and a chunk
//! holds the data of one sendmsg only, so fds that arrive belong to the last
//! message that starts in the bytes of that read (or, if none starts there,
//! to the message the read continued). Peers send a message, or its header,
//! in one sendmsg with its fds, so this attributes every fd exactly.
//! Reads and writes may be partial at any byte: state is kept between calls.

use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::io::Errno;
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};
use std::collections::VecDeque;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;

pub const HEADER_SIZE: usize = 16;

/// Room for fds in one recvmsg. Peers are told a much smaller `max_msg_fds`;
/// more than fit here sets MSG_CTRUNC and the kernel closes the excess.
const MAX_RECV_FDS: usize = 64;

/// Bytes queued for a peer that does not read, by default, before sends fail
/// with `Backlog`: room for a few of the largest replies (1 MiB of data).
pub const DEFAULT_MAX_QUEUED: usize = 8 * 1024 * 1024;

/// The read buffer's usual size; it grows for a larger message and shrinks
/// back once that message is consumed.
const READ_BUFFER: usize = 64 * 1024;

/// One whole message as it came off the wire; `B` is what the caller made
/// of its bytes (a copy by default).
#[derive(Debug)]
pub struct Frame<B = Vec<u8>> {
    /// Header and body.
    pub bytes: B,
    /// fds that came with it, owned (and closed on drop) by the frame.
    pub fds: Vec<OwnedFd>,
    /// The peer attached more fds than fit: the message cannot be trusted.
    pub fds_truncated: bool,
}

#[derive(Debug)]
pub enum ReadOutcome<B = Vec<u8>> {
    Frame(Frame<B>),
    /// Nothing more to read now; wait for the socket to become readable.
    WouldBlock,
    /// The peer closed the connection at a message boundary.
    Closed,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FramingError {
    #[error("message size {0} is smaller than the 16-byte header")]
    SizeBelowHeader(u32),
    #[error("message size {size} exceeds the limit of {limit} bytes")]
    SizeAboveLimit { size: u32, limit: usize },
    #[error("the peer closed the connection in the middle of a message")]
    Truncated,
    #[error("the peer left more than {limit} bytes unread")]
    Backlog { limit: usize },
    #[error("socket error: {0}")]
    Os(#[from] Errno),
}

impl FramingError {
    /// The errno that names this failure: the system's own, or ENOBUFS for
    /// a peer cut off for not reading; none for a broken protocol.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            FramingError::Os(e) => Some(*e),
            FramingError::Backlog { .. } => Some(Errno::NOBUFS),
            _ => None,
        }
    }
}

struct Outgoing {
    bytes: Vec<u8>,
    sent: usize,
    /// Still to be attached: only ever non-empty while nothing was sent.
    fds: Vec<OwnedFd>,
}

/// fds received for the message that starts at stream position `at`.
struct ReceivedFds {
    at: u64,
    fds: Vec<OwnedFd>,
    truncated: bool,
}

/// A framed connection. It never blocks: reads say `WouldBlock`, writes that
/// cannot complete are queued until `flush` is called on writability.
pub struct FrameConnection {
    fd: OwnedFd,
    max_frame: usize,
    buf: Vec<u8>,
    /// Unconsumed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// Stream position of `buf[0]`, to tie fds to message starts.
    base: u64,
    fds: VecDeque<ReceivedFds>,
    /// The last read did not fill the space offered: the socket was empty,
    /// so asking again now would only return EAGAIN.
    drained: bool,
    eof: bool,
    cmsg_space: Vec<MaybeUninit<u8>>,
    /// Most fds one message may carry; the rest are closed on arrival and
    /// the message is flagged `fds_truncated`.
    max_fds: usize,
    queue: VecDeque<Outgoing>,
    /// Unsent bytes in `queue`, and the most it may hold.
    queued: usize,
    max_queued: usize,
    /// Between `cork` and `uncork`: small messages without fds are gathered
    /// in `gathered` for one sendmsg (kept allocated from batch to batch).
    corked: bool,
    gathered: Vec<u8>,
}

/// A corked batch is sent once it would pass this many bytes: past it, one
/// more system call costs less than copying the bytes into the batch.
const MAX_CORKED: usize = 64 * 1024;

impl FrameConnection {
    /// Wraps a connected, non-blocking stream socket. Messages larger than
    /// `max_frame` bytes (header included) are refused as untrustworthy.
    pub fn new(fd: OwnedFd, max_frame: usize) -> Self {
        FrameConnection {
            fd,
            max_frame,
            buf: vec![0; READ_BUFFER],
            start: 0,
            end: 0,
            base: 0,
            fds: VecDeque::new(),
            drained: false,
            eof: false,
            cmsg_space: vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_RECV_FDS))],
            max_fds: MAX_RECV_FDS,
            queue: VecDeque::new(),
            queued: 0,
            max_queued: DEFAULT_MAX_QUEUED,
            corked: false,
            gathered: Vec::new(),
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame;
    }

    /// Caps the fds one incoming message may carry (the `max_msg_fds` this
    /// side announced); at most the 64 one read has room for.
    pub fn set_max_fds(&mut self, max_fds: usize) {
        self.max_fds = max_fds.min(MAX_RECV_FDS);
    }

    /// Caps the bytes queued for a peer that does not read. A message always
    /// fits an empty queue, so one larger than the cap still goes out.
    pub fn set_max_queued(&mut self, max_queued: usize) {
        self.max_queued = max_queued;
    }

    /// The error pending on the socket (SO_ERROR, cleared by reading it):
    /// what a poll that reports only "error" means, ECONNRESET when the peer
    /// closed with our messages unread.
    pub fn take_error(&self) -> Option<Errno> {
        match rustix::net::sockopt::socket_error(&self.fd) {
            Ok(Ok(())) => None,
            Ok(Err(e)) | Err(e) => Some(e),
        }
    }

    /// Bytes waiting for the socket to become writable.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// The next whole message: from the buffer if one is there, else after
    /// reading. `WouldBlock` comes without a system call when the last read
    /// already drained the socket (the poll is level-triggered, so any data
    /// that arrives later wakes the caller again).
    pub fn read_frame(&mut self) -> Result<ReadOutcome, FramingError> {
        self.read_frame_with(<[u8]>::to_vec)
    }

    /// Like `read_frame`, but hands the message bytes to `take` in place, so
    /// the caller copies them once, straight to where they are needed.
    pub fn read_frame_with<B>(&mut self, take: impl FnOnce(&[u8]) -> B) -> Result<ReadOutcome<B>, FramingError> {
        loop {
            if let Some(size) = self.buffered_frame_size()? {
                return Ok(ReadOutcome::Frame(self.take_frame(size, take)));
            }
            if self.eof {
                return if self.start == self.end { Ok(ReadOutcome::Closed) } else { Err(FramingError::Truncated) };
            }
            if std::mem::replace(&mut self.drained, false) {
                return Ok(ReadOutcome::WouldBlock);
            }
            if !self.fill()? {
                return Ok(ReadOutcome::WouldBlock);
            }
        }
    }

    /// The size of the message at `start`, once its header is valid and the
    /// whole of it is buffered.
    fn buffered_frame_size(&self) -> Result<Option<usize>, FramingError> {
        let have = self.end - self.start;
        if have < HEADER_SIZE {
            return Ok(None);
        }
        let size = self.size_at(self.start)?;
        Ok((have >= size).then_some(size))
    }

    fn size_at(&self, at: usize) -> Result<usize, FramingError> {
        let size = u32::from_le_bytes(self.buf[at + 4..at + 8].try_into().unwrap());
        if (size as usize) < HEADER_SIZE {
            return Err(FramingError::SizeBelowHeader(size));
        }
        if size as usize > self.max_frame {
            return Err(FramingError::SizeAboveLimit { size, limit: self.max_frame });
        }
        Ok(size as usize)
    }

    /// Whether a whole message waits in the buffer (the socket may be empty,
    /// so only the caller's loop, not the poll, will get to it).
    pub fn has_buffered_frame(&self) -> bool {
        matches!(self.buffered_frame_size(), Ok(Some(_)) | Err(_))
    }

    fn take_frame<B>(&mut self, size: usize, take: impl FnOnce(&[u8]) -> B) -> Frame<B> {
        let at = self.base + self.start as u64;
        let bytes = take(&self.buf[self.start..self.start + size]);
        self.start += size;
        let (mut fds, mut fds_truncated) = (Vec::new(), false);
        // Entries before this message can only come from a peer that attached
        // fds mid-message; they were given to that message, so none remain.
        while self.fds.front().is_some_and(|r| r.at <= at) {
            let r = self.fds.pop_front().unwrap();
            if r.at == at {
                fds.extend(r.fds);
                fds_truncated |= r.truncated;
            }
        }
        if fds.len() > self.max_fds {
            fds.truncate(self.max_fds);
            fds_truncated = true;
        }
        if self.start == self.end {
            self.base += self.end as u64;
            self.start = 0;
            self.end = 0;
            if self.buf.len() > READ_BUFFER {
                self.buf.truncate(READ_BUFFER);
                self.buf.shrink_to_fit();
            }
        }
        Frame { bytes, fds, fds_truncated }
    }

    /// One recvmsg into the free end of the buffer; false if it would block.
    fn fill(&mut self) -> Result<bool, FramingError> {
        self.make_room();
        let mut cmsg = RecvAncillaryBuffer::new(&mut self.cmsg_space);
        let space = self.buf.len() - self.end;
        let mut iov = [IoSliceMut::new(&mut self.buf[self.end..])];
        let res = loop {
            match recvmsg(&self.fd, &mut iov, &mut cmsg, RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC) {
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => return Ok(false),
                other => break other?,
            }
        };
        let mut received = Vec::new();
        for msg in cmsg.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = msg {
                received.extend(fds);
            }
        }
        let truncated = res.flags.contains(ReturnFlags::CTRUNC);
        drop(cmsg);
        self.end += res.bytes;
        if res.bytes == 0 {
            self.eof = true;
            return Ok(true);
        }
        self.drained = res.bytes < space && received.is_empty() && !truncated;
        if !received.is_empty() || truncated {
            let at = self.base + self.last_message_start_before(self.end) as u64;
            match self.fds.back_mut() {
                Some(last) if last.at == at => {
                    last.fds.extend(received);
                    last.truncated |= truncated;
                }
                _ => self.fds.push_back(ReceivedFds { at, fds: received, truncated }),
            }
        }
        Ok(true)
    }

    /// The buffer index of the last message that starts before `end`,
    /// walking message sizes from `start`. A header not yet complete, or an
    /// invalid size (reported when that message is taken), ends the walk.
    fn last_message_start_before(&self, end: usize) -> usize {
        let mut at = self.start;
        while at + HEADER_SIZE <= end {
            match self.size_at(at) {
                Ok(size) if at + size < end => at += size,
                _ => break,
            }
        }
        at
    }

    /// Moves unconsumed bytes to the front and grows the buffer so the
    /// message being read fits whole.
    fn make_room(&mut self) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.base += self.start as u64;
            self.end -= self.start;
            self.start = 0;
        }
        let needed = if self.end >= HEADER_SIZE { self.size_at(0).unwrap_or(HEADER_SIZE) } else { HEADER_SIZE };
        if self.buf.len() < needed {
            self.buf.resize(needed, 0);
        }
    }

    /// Gathers what is sent from now until `uncork` into as few sendmsg
    /// calls as fit: a server answering a batch of pipelined commands wakes
    /// its peer once instead of once per reply. Messages with fds, and any
    /// that would overflow the batch, first send what was gathered, so order
    /// is kept.
    pub fn cork(&mut self) {
        self.corked = true;
    }

    /// Sends what was gathered since `cork` and stops gathering.
    pub fn uncork(&mut self) -> Result<(), FramingError> {
        self.corked = false;
        self.send_gathered()
    }

    fn send_gathered(&mut self) -> Result<(), FramingError> {
        if self.gathered.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.gathered);
        let sent = self.send_now(&batch, &[]);
        self.gathered = batch;
        self.gathered.clear();
        sent
    }

    /// Sends one message with `fds` attached (or gathers it, when corked),
    /// or queues what the socket cannot take now. Order is kept: nothing
    /// overtakes a gathered or queued message.
    /// `Backlog` when the queue would grow past its cap: a peer that stopped
    /// reading; nothing was queued and the caller should cut it off.
    pub fn send(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), FramingError> {
        if self.corked && fds.is_empty() && self.gathered.len() + bytes.len() <= MAX_CORKED {
            self.gathered.extend_from_slice(bytes);
            return Ok(());
        }
        self.send_gathered()?;
        self.send_now(bytes, fds)
    }

    fn send_now(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), FramingError> {
        if !self.queue.is_empty() {
            return self.enqueue(bytes, 0, fds);
        }
        match self.send_some(bytes, fds) {
            Ok(n) if n == bytes.len() => Ok(()),
            Ok(n) => self.enqueue(bytes, n, &[]),
            Err(Errno::AGAIN) => self.enqueue(bytes, 0, fds),
            Err(e) => Err(e.into()),
        }
    }

    fn enqueue(&mut self, bytes: &[u8], sent: usize, fds: &[BorrowedFd<'_>]) -> Result<(), FramingError> {
        let rest = bytes.len() - sent;
        if !self.queue.is_empty() && self.queued + rest > self.max_queued {
            return Err(FramingError::Backlog { limit: self.max_queued });
        }
        let fds = fds.iter().map(|fd| fd.try_clone_to_owned().map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO)));
        self.queue.push_back(Outgoing { bytes: bytes[sent..].to_vec(), sent: 0, fds: fds.collect::<Result<_, _>>()? });
        self.queued += rest;
        Ok(())
    }

    fn send_some(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<usize, Errno> {
        // Only a message with fds pays for a control buffer.
        let mut space = if fds.is_empty() { Vec::new() } else { vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))] };
        let mut cmsg = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !cmsg.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(Errno::INVAL);
        }
        loop {
            match sendmsg(&self.fd, &[IoSlice::new(bytes)], &mut cmsg, SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
                Err(Errno::INTR) => continue,
                other => return other,
            }
        }
    }

    /// Whether queued bytes wait for the socket to become writable.
    pub fn wants_write(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Sends queued messages until done or the socket is full.
    pub fn flush(&mut self) -> Result<(), Errno> {
        while let Some(mut out) = self.queue.pop_front() {
            let fds: Vec<BorrowedFd<'_>> = out.fds.iter().map(|f| f.as_fd()).collect();
            let sent = self.send_some(&out.bytes[out.sent..], &fds);
            drop(fds);
            match sent {
                Ok(n) => {
                    out.fds.clear();
                    out.sent += n;
                    self.queued -= n;
                    if out.sent < out.bytes.len() {
                        self.queue.push_front(out);
                    }
                }
                Err(e) => {
                    self.queue.push_front(out);
                    return if e == Errno::AGAIN { Ok(()) } else { Err(e) };
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socket::pair;
    use std::os::fd::AsRawFd;

    fn message(command: u16, body: &[u8]) -> Vec<u8> {
        let mut m = vec![0u8; HEADER_SIZE];
        m[0..2].copy_from_slice(&7u16.to_le_bytes());
        m[2..4].copy_from_slice(&command.to_le_bytes());
        m[4..8].copy_from_slice(&((HEADER_SIZE + body.len()) as u32).to_le_bytes());
        m.extend_from_slice(body);
        m
    }

    fn open_fds_named(name: &str) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().contains(name))
            .count()
    }

    fn read_one(conn: &mut FrameConnection) -> Frame {
        match conn.read_frame().unwrap() {
            ReadOutcome::Frame(f) => f,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    #[test]
    fn a_message_with_fds_arrives_whole_with_its_fds() {
        let (a, b) = pair().unwrap();
        let mut tx = FrameConnection::new(a, 1 << 20);
        let mut rx = FrameConnection::new(b, 1 << 20);
        let ev = crate::eventfd::create().unwrap();
        tx.send(&message(8, &[1, 2, 3, 4]), &[ev.as_fd(), ev.as_fd()]).unwrap();
        let frame = read_one(&mut rx);
        assert_eq!(frame.bytes, message(8, &[1, 2, 3, 4]));
        assert_eq!(frame.fds.len(), 2);
        assert!(!frame.fds_truncated);
        crate::eventfd::signal(&frame.fds[1]).unwrap();
        assert_eq!(crate::eventfd::take(&ev).unwrap(), Some(1));
        assert!(matches!(rx.read_frame().unwrap(), ReadOutcome::WouldBlock));
    }

    #[test]
    fn a_peer_closing_with_our_message_unread_leaves_econnreset_pending() {
        let (a, b) = pair().unwrap();
        let tx = {
            let mut tx = FrameConnection::new(a, 1 << 20);
            tx.send(&message(1, &[]), &[]).unwrap();
            tx
        };
        assert_eq!(tx.take_error(), None);
        drop(b);
        assert_eq!(tx.take_error(), Some(Errno::CONNRESET));
        // SO_ERROR is cleared by reading it.
        assert_eq!(tx.take_error(), None);
        assert_eq!(FramingError::Backlog { limit: 1 }.errno(), Some(Errno::NOBUFS));
        assert_eq!(FramingError::Os(Errno::PIPE).errno(), Some(Errno::PIPE));
        assert_eq!(FramingError::Truncated.errno(), None);
    }

    #[test]
    fn bytes_trickling_in_one_at_a_time_are_reassembled() {
        let (a, b) = pair().unwrap();
        let mut rx = FrameConnection::new(b, 1 << 20);
        let first = message(9, &[9; 16]);
        let second = message(10, &[5; 20]);
        let ev = crate::eventfd::create().unwrap();
        let mut frames = Vec::new();
        for (i, byte) in first.iter().chain(second.iter()).enumerate() {
            let fds = if i == first.len() { vec![ev.as_fd()] } else { vec![] };
            let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut cmsg = SendAncillaryBuffer::new(&mut space);
            if !fds.is_empty() {
                cmsg.push(SendAncillaryMessage::ScmRights(&fds));
            }
            sendmsg(&a, &[IoSlice::new(&[*byte])], &mut cmsg, SendFlags::empty()).unwrap();
            loop {
                match rx.read_frame().unwrap() {
                    ReadOutcome::Frame(f) => frames.push(f),
                    ReadOutcome::WouldBlock => break,
                    ReadOutcome::Closed => panic!("closed"),
                }
            }
        }
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].bytes, first);
        assert!(frames[0].fds.is_empty());
        assert_eq!(frames[1].bytes, second);
        assert_eq!(frames[1].fds.len(), 1);
    }

    #[test]
    fn back_to_back_messages_get_exactly_their_own_fds() {
        let (a, b) = pair().unwrap();
        let mut tx = FrameConnection::new(a, 1 << 20);
        let mut rx = FrameConnection::new(b, 1 << 20);
        let ev = crate::eventfd::create().unwrap();
        tx.send(&message(1, &[1; 8]), &[]).unwrap();
        tx.send(&message(2, &[2; 8]), &[ev.as_fd(), ev.as_fd()]).unwrap();
        tx.send(&message(3, &[3; 8]), &[]).unwrap();
        tx.send(&message(4, &[4; 8]), &[ev.as_fd()]).unwrap();
        let counts: Vec<(u8, usize)> = (0..4).map(|_| {
            let f = loop {
                if let ReadOutcome::Frame(f) = rx.read_frame().unwrap() {
                    break f;
                }
            };
            (f.bytes[2], f.fds.len())
        }).collect();
        assert_eq!(counts, vec![(1, 0), (2, 2), (3, 0), (4, 1)]);
    }

    #[test]
    fn fds_sent_with_a_separate_header_belong_to_that_message() {
        let (a, b) = pair().unwrap();
        let mut rx = FrameConnection::new(b, 1 << 20);
        let ev = crate::eventfd::create().unwrap();
        let whole = message(8, &[7; 20]);
        let fds = [ev.as_fd()];
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut cmsg = SendAncillaryBuffer::new(&mut space);
        cmsg.push(SendAncillaryMessage::ScmRights(&fds));
        sendmsg(&a, &[IoSlice::new(&whole[..HEADER_SIZE])], &mut cmsg, SendFlags::empty()).unwrap();
        rustix::io::write(&a, &whole[HEADER_SIZE..]).unwrap();
        let frame = loop {
            if let ReadOutcome::Frame(f) = rx.read_frame().unwrap() {
                break f;
            }
        };
        assert_eq!(frame.bytes, whole);
        assert_eq!(frame.fds.len(), 1);
    }

    #[test]
    fn a_message_larger_than_the_read_buffer_arrives_whole() {
        let (a, b) = pair().unwrap();
        let mut tx = FrameConnection::new(a, 1 << 22);
        let mut rx = FrameConnection::new(b, 1 << 22);
        let big = message(10, &(0..(3 * READ_BUFFER)).map(|i| i as u8).collect::<Vec<_>>());
        tx.send(&big, &[]).unwrap();
        tx.send(&message(4, &[9; 16]), &[]).unwrap();
        let mut frames = Vec::new();
        while frames.len() < 2 {
            tx.flush().unwrap();
            if let ReadOutcome::Frame(f) = rx.read_frame().unwrap() {
                frames.push(f);
            }
        }
        assert_eq!(frames[0].bytes, big);
        assert_eq!(frames[1].bytes, message(4, &[9; 16]));
    }

    #[test]
    fn end_of_stream_at_a_boundary_is_closed_and_inside_a_message_is_an_error() {
        let (a, b) = pair().unwrap();
        let mut rx = FrameConnection::new(b, 1 << 20);
        drop(a);
        assert!(matches!(rx.read_frame().unwrap(), ReadOutcome::Closed));

        let (a, b) = pair().unwrap();
        let mut rx = FrameConnection::new(b, 1 << 20);
        rustix::io::write(&a, &message(4, &[0; 16])[..20]).unwrap();
        drop(a);
        // The first read drains the partial message; the poll wakes us again
        // for the end of stream.
        assert!(matches!(rx.read_frame().unwrap(), ReadOutcome::WouldBlock));
        assert_eq!(rx.read_frame().unwrap_err(), FramingError::Truncated);
    }

    #[test]
    fn sizes_below_the_header_or_above_the_limit_are_refused() {
        let (a, b) = pair().unwrap();
        let mut rx = FrameConnection::new(b, 64);
        let mut bad = message(4, &[]);
        bad[4..8].copy_from_slice(&8u32.to_le_bytes());
        rustix::io::write(&a, &bad).unwrap();
        assert_eq!(rx.read_frame().unwrap_err(), FramingError::SizeBelowHeader(8));

        let (a, b) = pair().unwrap();
        let mut rx = FrameConnection::new(b, 64);
        rustix::io::write(&a, &message(10, &[0; 100])).unwrap();
        assert_eq!(rx.read_frame().unwrap_err(), FramingError::SizeAboveLimit { size: 116, limit: 64 });
    }

    #[test]
    fn too_many_fds_are_flagged_and_none_leak() {
        // Tests run in parallel threads: count only fds of our own memfd.
        let name = format!("too-many-{}", std::process::id());
        {
            let (a, b) = pair().unwrap();
            let mut rx = FrameConnection::new(b, 1 << 20);
            let ev = crate::memfd::create(&name, 4096).unwrap();
            let many: Vec<BorrowedFd<'_>> = (0..MAX_RECV_FDS + 10).map(|_| ev.as_fd()).collect();
            let tx = FrameConnection::new(a, 1 << 20);
            tx.send_some(&message(8, &[0; 20]), &many).unwrap();
            let frame = read_one(&mut rx);
            assert!(frame.fds_truncated);
            assert!(frame.fds.len() < MAX_RECV_FDS + 10);
            assert_eq!(open_fds_named(&name), frame.fds.len() + 1);
        }
        assert_eq!(open_fds_named(&name), 0);
    }

    #[test]
    fn fds_of_dropped_frames_are_closed() {
        let (a, b) = pair().unwrap();
        let mut tx = FrameConnection::new(a, 1 << 20);
        let mut rx = FrameConnection::new(b, 1 << 20);
        let ev = crate::eventfd::create().unwrap();
        tx.send(&message(2, &[0; 32]), &[ev.as_fd()]).unwrap();
        let frame = read_one(&mut rx);
        let raw = frame.fds[0].as_raw_fd();
        assert!(std::path::Path::new(&format!("/proc/self/fd/{raw}")).exists());
        drop(frame);
        assert!(!std::path::Path::new(&format!("/proc/self/fd/{raw}")).exists());
    }

    #[test]
    fn a_full_socket_queues_in_order_and_flush_drains_it() {
        let (a, b) = pair().unwrap();
        let mut tx = FrameConnection::new(a, 1 << 24);
        let mut rx = FrameConnection::new(b, 1 << 24);
        let ev = crate::eventfd::create().unwrap();
        let big = message(10, &vec![0xab; 1 << 20]);
        tx.send(&big, &[]).unwrap();
        assert!(tx.wants_write(), "a 1 MiB message should not fit the socket buffer");
        tx.send(&message(13, &[]), &[ev.as_fd()]).unwrap();
        let mut frames = Vec::new();
        while frames.len() < 2 {
            tx.flush().unwrap();
            if let ReadOutcome::Frame(f) = rx.read_frame().unwrap() {
                frames.push(f);
            }
        }
        assert!(!tx.wants_write());
        assert_eq!(frames[0].bytes, big);
        assert!(frames[0].fds.is_empty());
        assert_eq!(frames[1].bytes, message(13, &[]));
        assert_eq!(frames[1].fds.len(), 1);
    }

    #[test]
    fn sending_to_a_closed_peer_is_an_error_not_a_signal() {
        let (a, b) = pair().unwrap();
        let mut tx = FrameConnection::new(a, 1 << 20);
        drop(b);
        assert_eq!(tx.send(&message(1, &[]), &[]).unwrap_err(), FramingError::Os(Errno::PIPE));
    }

    #[test]
    fn a_peer_that_does_not_read_is_refused_past_the_queue_cap() {
        let (a, _b) = pair().unwrap();
        let mut tx = FrameConnection::new(a, 1 << 24);
        tx.set_max_queued(3 << 20);
        let big = message(9, &vec![0; 1 << 20]);
        // The socket buffer takes a little; the queue takes three more.
        let mut sent = 0;
        let error = loop {
            match tx.send(&big, &[]) {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
            assert!(sent < 16, "the queue grew past its cap");
        };
        assert_eq!(error, FramingError::Backlog { limit: 3 << 20 });
        assert!(tx.queued() <= 3 << 20, "{} bytes queued", tx.queued());
        assert!(tx.queued() > 2 << 20);
    }

    #[test]
    fn one_message_larger_than_the_cap_still_goes_out_and_the_count_drains() {
        let (a, b) = pair().unwrap();
        let mut tx = FrameConnection::new(a, 1 << 24);
        let mut rx = FrameConnection::new(b, 1 << 24);
        tx.set_max_queued(1024);
        let big = message(10, &vec![7; 1 << 20]);
        tx.send(&big, &[]).unwrap();
        assert!(tx.queued() > 1024);
        assert!(matches!(tx.send(&message(4, &[]), &[]), Err(FramingError::Backlog { limit: 1024 })));
        loop {
            tx.flush().unwrap();
            if let ReadOutcome::Frame(f) = rx.read_frame().unwrap() {
                assert_eq!(f.bytes, big);
                break;
            }
        }
        tx.flush().unwrap();
        assert_eq!(tx.queued(), 0);
        tx.send(&message(4, &[]), &[]).unwrap();
    }

    #[test]
    fn fds_past_the_announced_maximum_are_closed_and_flagged() {
        let name = format!("max-fds-{}", std::process::id());
        let (a, b) = pair().unwrap();
        let tx = FrameConnection::new(a, 1 << 20);
        let mut rx = FrameConnection::new(b, 1 << 20);
        rx.set_max_fds(2);
        let file = crate::memfd::create(&name, 4096).unwrap();
        tx.send_some(&message(8, &[0; 8]), &[file.as_fd(), file.as_fd()]).unwrap();
        tx.send_some(&message(8, &[0; 8]), &[file.as_fd(), file.as_fd(), file.as_fd()]).unwrap();
        let within = read_one(&mut rx);
        assert_eq!((within.fds.len(), within.fds_truncated), (2, false));
        let over = read_one(&mut rx);
        assert_eq!((over.fds.len(), over.fds_truncated), (2, true));
        // Ours, the two of the first message and the two kept of the second: the third is closed.
        assert_eq!(open_fds_named(&name), 5);
    }

    #[test]
    fn corked_messages_go_out_together_at_uncork_in_order() {
        let (a, b) = pair().unwrap();
        let mut tx = FrameConnection::new(a, 1 << 20);
        let mut rx = FrameConnection::new(b, 1 << 20);
        tx.cork();
        for command in 1..=3 {
            tx.send(&message(command, &[command as u8; 8]), &[]).unwrap();
        }
        let mut peek = [0u8; 1];
        let nothing = rustix::net::recv(rx.fd(), &mut peek, rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT).map(|_| ());
        assert_eq!(nothing.unwrap_err(), Errno::AGAIN, "nothing is sent while corked");
        tx.uncork().unwrap();
        for command in 1..=3 {
            assert_eq!(read_one(&mut rx).bytes, message(command, &[command as u8; 8]));
        }
        // Uncorked, a send goes out at once.
        tx.send(&message(4, &[]), &[]).unwrap();
        let flags = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
        assert_eq!(rustix::net::recv(rx.fd(), &mut peek, flags).unwrap().0, 1);
    }

    #[test]
    fn a_message_with_fds_or_too_large_to_gather_sends_the_batch_first() {
        let (a, b) = pair().unwrap();
        let mut tx = FrameConnection::new(a, 1 << 20);
        let mut rx = FrameConnection::new(b, 1 << 20);
        let ev = crate::eventfd::create().unwrap();
        let big = message(6, &vec![6; MAX_CORKED]);
        tx.cork();
        tx.send(&message(1, &[]), &[]).unwrap();
        tx.send(&message(2, &[]), &[ev.as_fd()]).unwrap();
        tx.send(&message(3, &[]), &[]).unwrap();
        tx.send(&big, &[]).unwrap();
        tx.send(&message(7, &[]), &[]).unwrap();
        tx.uncork().unwrap();
        let frames: Vec<Frame> = (0..5).map(|_| read_one(&mut rx)).collect();
        let commands: Vec<u16> = frames.iter().map(|f| u16::from_le_bytes([f.bytes[2], f.bytes[3]])).collect();
        assert_eq!(commands, [1, 2, 3, 6, 7]);
        assert_eq!(frames[1].fds.len(), 1);
        assert_eq!(frames[3].bytes, big);
    }
}
