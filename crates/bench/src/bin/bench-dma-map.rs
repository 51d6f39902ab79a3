//! bench-dma-map: the DMA_MAP + DMA_UNMAP rate of a vfio-user server, as a guest behind a vIOMMU
//! makes it pay: every I/O maps a window of guest RAM and unmaps it after.
//!
//! bench-dma-map --socket PATH --pairs N --warmup W --depth D
//!
//! Guest RAM is a size-sealed memfd, as QEMU's memory backend makes it; each DMA_MAP carries that
//! fd (SCM_RIGHTS) and maps one 4 KiB page of it at its own IOVA; the DMA_UNMAP of that window
//! follows at once. Up to D commands are in flight (QEMU does not wait for each reply either;
//! D = 1 waits for each, as a guest's vIOMMU around a single I/O);
//! every reply is checked (id, command, no error). Prints one JSON line:
//! {"pairs_per_sec":..,"pairs":N,"seconds":..,"cpu_ns":..}
//! where `cpu_ns` is the time this client spent on a CPU during the timed pairs (from
//! /proc/self/schedstat), so that a caller can tell the cost of the pairs from time the core
//! spent on other processes.

use std::io::{ErrorKind, IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Instant;

use rustix::fs::{fcntl_add_seals, ftruncate, memfd_create, MemfdFlags, SealFlags};
use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use vfio_user_bench::{
    client_main,     check_reply_header, encode_dma_map, encode_dma_unmap, encode_version_request, Args, Header,
    CMD_DMA_MAP, CMD_DMA_UNMAP, CMD_VERSION, DMA_MAP_REQUEST_SIZE, DMA_UNMAP_REQUEST_SIZE,
    HEADER_SIZE,
};

const USAGE: &str = "usage: bench-dma-map --socket PATH --pairs N [--warmup W] [--depth D]";

const PAGE: u64 = 4096;
/// Distinct windows (IOVAs and pages of the memfd) the pairs cycle through.
const SLOTS: u64 = 256;
const IOVA_BASE: u64 = 0x1_0000_0000;

struct Config {
    socket: String,
    pairs: u64,
    warmup: u64,
    depth: u64,
}

fn parse_args() -> Result<Config, String> {
    let args = Args::parse(std::env::args().skip(1), &["help"])?;
    if args.flag("help") {
        return Err(USAGE.to_string());
    }
    if let Some(k) = args.unknown(&["socket", "pairs", "warmup", "depth", "help"]) {
        return Err(format!("unknown option --{k}\n{USAGE}"));
    }
    let cfg = Config {
        socket: args.require("socket")?.to_string(),
        pairs: args.num("pairs", None)?,
        warmup: args.num("warmup", Some(1000))?,
        depth: args.num("depth", Some(32))?,
    };
    if cfg.pairs == 0 {
        return Err("--pairs must be at least 1".into());
    }
    // A slot's next DMA_MAP must come after its DMA_UNMAP has been sent. Depth 1 waits for each
    // reply before the next command, as a guest's vIOMMU maps and unmaps around one I/O.
    if cfg.depth < 1 || cfg.depth > 2 * SLOTS {
        return Err(format!("--depth must be 1..={}", 2 * SLOTS));
    }
    Ok(cfg)
}

/// Replies arrive in order; this frames them out of the stream.
struct Replies {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Replies {
    fn new() -> Self {
        Replies { buf: vec![0u8; 64 * 1024], start: 0, end: 0 }
    }

    /// The next whole reply's header and body, reading as needed.
    fn next(&mut self, sock: &mut UnixStream) -> Result<(Header, &[u8]), String> {
        loop {
            let have = self.end - self.start;
            if have >= HEADER_SIZE {
                let h = Header::decode(&self.buf[self.start..]);
                let size = h.size as usize;
                if !(HEADER_SIZE..=4096).contains(&size) {
                    return Err(format!("reply msg_size {size} is not plausible"));
                }
                if have >= size {
                    let body = self.start + HEADER_SIZE..self.start + size;
                    self.start += size;
                    return Ok((h, &self.buf[body]));
                }
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            match sock.read(&mut self.buf[self.end..]) {
                Ok(0) => return Err("server closed the connection".into()),
                Ok(n) => self.end += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }
}

/// Guest RAM as QEMU backs it: a memfd whose size is sealed.
fn guest_ram() -> Result<OwnedFd, String> {
    let fd = memfd_create("bench-guest-ram", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
        .map_err(|e| format!("memfd_create: {e}"))?;
    ftruncate(&fd, SLOTS * PAGE).map_err(|e| format!("ftruncate: {e}"))?;
    fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW).map_err(|e| format!("seal: {e}"))?;
    Ok(fd)
}

fn send_with_fd(sock: &UnixStream, bytes: &[u8], fd: &OwnedFd) -> Result<(), String> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = SendAncillaryBuffer::new(&mut space);
    let fds = [fd.as_fd()];
    cmsg.push(SendAncillaryMessage::ScmRights(&fds));
    let mut sent = 0;
    while sent < bytes.len() {
        // The fd rides on the first byte; a short send continues without it.
        let res = if sent == 0 {
            sendmsg(sock, &[IoSlice::new(bytes)], &mut cmsg, SendFlags::NOSIGNAL)
        } else {
            sendmsg(sock, &[IoSlice::new(&bytes[sent..])], &mut SendAncillaryBuffer::default(), SendFlags::NOSIGNAL)
        };
        match res {
            Ok(n) => sent += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(format!("sendmsg DMA_MAP: {e}")),
        }
    }
    Ok(())
}

/// Runs `pairs` map/unmap pairs, numbered from `first`, with at most `depth` commands in flight.
fn run_pairs(sock: &mut UnixStream, replies: &mut Replies, ram: &OwnedFd, msg_id: &mut u16, first: u64, pairs: u64, depth: u64) -> Result<(), String> {
    let total = 2 * pairs;
    let (mut sent, mut answered) = (0u64, 0u64);
    let mut map = [0u8; DMA_MAP_REQUEST_SIZE];
    let mut unmap = [0u8; DMA_UNMAP_REQUEST_SIZE];
    let mut expect = *msg_id;
    while answered < total {
        while sent < total && sent - answered < depth {
            let slot = (first + sent / 2) % SLOTS;
            let iova = IOVA_BASE + slot * PAGE;
            if sent % 2 == 0 {
                encode_dma_map(&mut map, *msg_id, slot * PAGE, iova, PAGE);
                send_with_fd(sock, &map, ram)?;
            } else {
                encode_dma_unmap(&mut unmap, *msg_id, iova, PAGE);
                sock.write_all(&unmap).map_err(|e| format!("write DMA_UNMAP: {e}"))?;
            }
            *msg_id = msg_id.wrapping_add(1);
            sent += 1;
        }
        let (h, body) = replies.next(sock)?;
        let (command, size) = if answered % 2 == 0 {
            (CMD_DMA_MAP, HEADER_SIZE)
        } else {
            (CMD_DMA_UNMAP, DMA_UNMAP_REQUEST_SIZE)
        };
        let name = if command == CMD_DMA_MAP { "DMA_MAP" } else { "DMA_UNMAP" };
        check_reply_header(&h, expect, command, Some(size as u32)).map_err(|e| format!("{name}: {e}"))?;
        if command == CMD_DMA_UNMAP && body[8..16] != unmap_address(first + answered / 2).to_le_bytes() {
            return Err("DMA_UNMAP: the reply does not echo the window".into());
        }
        expect = expect.wrapping_add(1);
        answered += 1;
    }
    Ok(())
}

/// Nanoseconds this (single-threaded) process has run on a CPU.
fn cpu_ns() -> Result<u64, String> {
    let stat = std::fs::read_to_string("/proc/self/schedstat").map_err(|e| format!("/proc/self/schedstat: {e}"))?;
    stat.split_whitespace()
        .next()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| format!("/proc/self/schedstat: unexpected {stat:?}"))
}

fn unmap_address(pair: u64) -> u64 {
    IOVA_BASE + (pair % SLOTS) * PAGE
}

fn run(cfg: &Config) -> Result<String, String> {
    let mut sock = UnixStream::connect(&cfg.socket).map_err(|e| format!("connect {}: {e}", cfg.socket))?;
    let mut replies = Replies::new();
    let mut msg_id: u16 = 0;
    sock.write_all(&encode_version_request(msg_id)).map_err(|e| format!("write VERSION: {e}"))?;
    let (h, body) = replies.next(&mut sock)?;
    check_reply_header(&h, msg_id, CMD_VERSION, None).map_err(|e| format!("VERSION: {e}"))?;
    if body.len() < 4 || body[0..2] != [0, 0] {
        return Err("VERSION: the reply is not major 0".into());
    }
    msg_id = msg_id.wrapping_add(1);

    let ram = guest_ram()?;
    run_pairs(&mut sock, &mut replies, &ram, &mut msg_id, 0, cfg.warmup, cfg.depth)?;
    let (start, cpu_start) = (Instant::now(), cpu_ns()?);
    run_pairs(&mut sock, &mut replies, &ram, &mut msg_id, cfg.warmup, cfg.pairs, cfg.depth)?;
    let (seconds, cpu) = (start.elapsed().as_secs_f64(), cpu_ns()? - cpu_start);
    Ok(format!(
        "{{\"pairs_per_sec\":{:.1},\"pairs\":{},\"seconds\":{:.6},\"cpu_ns\":{}}}",
        cfg.pairs as f64 / seconds,
        cfg.pairs,
        seconds,
        cpu
    ))
}

fn main() -> ExitCode {
    client_main("bench-dma-map", parse_args, run)
}
