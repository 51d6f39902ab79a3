//! Message framing over a non-blocking UNIX stream socket.
//!
//! A vfio-user message is a 16-byte header whose `msg_size` (bytes 4..8)
//! counts the whole message, followed by the body. fds travel as SCM_RIGHTS
//! on the sendmsg that carries the message, so they are taken from the
//! recvmsg calls that read the header; the body is read as plain bytes
//! (a plain recv makes the kernel close any fds wrongly attached there).
//! Reads and writes may be partial at any byte: state is kept between calls.

use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::io::Errno;
use rustix::net::{
    recv, recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};
use std::collections::VecDeque;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;

pub const HEADER_SIZE: usize = 16;

/// Room for fds in one recvmsg. Peers are told a much smaller `max_msg_fds`;
/// more than fit here sets MSG_CTRUNC and the kernel closes the excess.
const MAX_RECV_FDS: usize = 64;

/// One whole message as it came off the wire.
#[derive(Debug)]
pub struct Frame {
    /// Header and body.
    pub bytes: Vec<u8>,
    /// fds received with the header, owned (and closed on drop) by the frame.
    pub fds: Vec<OwnedFd>,
    /// The peer attached more fds than fit: the message cannot be trusted.
    pub fds_truncated: bool,
}

#[derive(Debug)]
pub enum ReadOutcome {
    Frame(Frame),
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
    #[error("socket error: {0}")]
    Os(#[from] Errno),
}

struct Outgoing {
    bytes: Vec<u8>,
    sent: usize,
    /// Still to be attached: only ever non-empty while nothing was sent.
    fds: Vec<OwnedFd>,
}

/// A framed connection. It never blocks: reads say `WouldBlock`, writes that
/// cannot complete are queued until `flush` is called on writability.
pub struct FrameConnection {
    fd: OwnedFd,
    max_frame: usize,
    header: [u8; HEADER_SIZE],
    header_got: usize,
    /// The message being read, header included, once its size is known.
    message: Vec<u8>,
    message_got: usize,
    fds: Vec<OwnedFd>,
    fds_truncated: bool,
    cmsg_space: Vec<MaybeUninit<u8>>,
    queue: VecDeque<Outgoing>,
}

impl FrameConnection {
    /// Wraps a connected, non-blocking stream socket. Messages larger than
    /// `max_frame` bytes (header included) are refused as untrustworthy.
    pub fn new(fd: OwnedFd, max_frame: usize) -> Self {
        FrameConnection {
            fd,
            max_frame,
            header: [0; HEADER_SIZE],
            header_got: 0,
            message: Vec::new(),
            message_got: 0,
            fds: Vec::new(),
            fds_truncated: false,
            cmsg_space: vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_RECV_FDS))],
            queue: VecDeque::new(),
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame;
    }

    /// Reads until one whole message is in, or the socket runs dry.
    pub fn read_frame(&mut self) -> Result<ReadOutcome, FramingError> {
        while self.header_got < HEADER_SIZE {
            match self.read_header_bytes()? {
                None => return Ok(ReadOutcome::WouldBlock),
                Some(0) if self.header_got == 0 => {
                    self.fds.clear();
                    return Ok(ReadOutcome::Closed);
                }
                Some(0) => return Err(FramingError::Truncated),
                Some(_) => {}
            }
        }
        if self.message.is_empty() {
            let size = u32::from_le_bytes(self.header[4..8].try_into().unwrap());
            if (size as usize) < HEADER_SIZE {
                return Err(FramingError::SizeBelowHeader(size));
            }
            if size as usize > self.max_frame {
                return Err(FramingError::SizeAboveLimit { size, limit: self.max_frame });
            }
            self.message = vec![0; size as usize];
            self.message[..HEADER_SIZE].copy_from_slice(&self.header);
            self.message_got = HEADER_SIZE;
        }
        while self.message_got < self.message.len() {
            match recv(&self.fd, &mut self.message[self.message_got..], RecvFlags::DONTWAIT) {
                Ok((0, _)) => return Err(FramingError::Truncated),
                Ok((n, _)) => self.message_got += n,
                Err(Errno::AGAIN) => return Ok(ReadOutcome::WouldBlock),
                Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.header_got = 0;
        self.message_got = 0;
        Ok(ReadOutcome::Frame(Frame {
            bytes: std::mem::take(&mut self.message),
            fds: std::mem::take(&mut self.fds),
            fds_truncated: std::mem::replace(&mut self.fds_truncated, false),
        }))
    }

    /// One recvmsg into the rest of the header: `None` if it would block,
    /// `Some(0)` at end of stream.
    fn read_header_bytes(&mut self) -> Result<Option<usize>, FramingError> {
        let mut cmsg = RecvAncillaryBuffer::new(&mut self.cmsg_space);
        let mut iov = [IoSliceMut::new(&mut self.header[self.header_got..])];
        let res = loop {
            match recvmsg(&self.fd, &mut iov, &mut cmsg, RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC) {
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => return Ok(None),
                other => break other?,
            }
        };
        for msg in cmsg.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = msg {
                self.fds.extend(fds);
            }
        }
        if res.flags.contains(ReturnFlags::CTRUNC) {
            self.fds_truncated = true;
        }
        self.header_got += res.bytes;
        Ok(Some(res.bytes))
    }

    /// Sends one message with `fds` attached, or queues what the socket
    /// cannot take now. Order is kept: nothing overtakes a queued message.
    pub fn send(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), Errno> {
        if !self.queue.is_empty() {
            return self.enqueue(bytes, 0, fds);
        }
        match self.send_some(bytes, fds) {
            Ok(n) if n == bytes.len() => Ok(()),
            Ok(n) => self.enqueue(bytes, n, &[]),
            Err(Errno::AGAIN) => self.enqueue(bytes, 0, fds),
            Err(e) => Err(e),
        }
    }

    fn enqueue(&mut self, bytes: &[u8], sent: usize, fds: &[BorrowedFd<'_>]) -> Result<(), Errno> {
        let fds = fds.iter().map(|fd| fd.try_clone_to_owned().map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO)));
        self.queue.push_back(Outgoing { bytes: bytes[sent..].to_vec(), sent: 0, fds: fds.collect::<Result<_, _>>()? });
        Ok(())
    }

    fn send_some(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<usize, Errno> {
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
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

    fn open_fd_count() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
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
    fn end_of_stream_at_a_boundary_is_closed_and_inside_a_message_is_an_error() {
        let (a, b) = pair().unwrap();
        let mut rx = FrameConnection::new(b, 1 << 20);
        drop(a);
        assert!(matches!(rx.read_frame().unwrap(), ReadOutcome::Closed));

        let (a, b) = pair().unwrap();
        let mut rx = FrameConnection::new(b, 1 << 20);
        rustix::io::write(&a, &message(4, &[0; 16])[..20]).unwrap();
        drop(a);
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
        let before = open_fd_count();
        {
            let (a, b) = pair().unwrap();
            let mut rx = FrameConnection::new(b, 1 << 20);
            let ev = crate::eventfd::create().unwrap();
            let many: Vec<BorrowedFd<'_>> = (0..MAX_RECV_FDS + 10).map(|_| ev.as_fd()).collect();
            let tx = FrameConnection::new(a, 1 << 20);
            tx.send_some(&message(8, &[0; 20]), &many).unwrap();
            let frame = read_one(&mut rx);
            assert!(frame.fds_truncated);
            assert!(frame.fds.len() < MAX_RECV_FDS + 10);
        }
        assert_eq!(open_fd_count(), before);
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
        assert_eq!(tx.send(&message(1, &[]), &[]).unwrap_err(), Errno::PIPE);
    }
}
