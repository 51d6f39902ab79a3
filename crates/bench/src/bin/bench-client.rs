//! bench-client: a minimal blocking vfio-user client that times REGION_READ round trips.
//!
//! bench-client --socket PATH --region R --offset O --count C --iterations N --warmup W [--no-version]
//!
//! One request in flight at a time: one write of the 32-byte request, then reads until the whole
//! reply (its msg_size) has arrived. Each round trip is timed with `Instant`. Prints one JSON line:
//! {"ops_per_sec":..,"p50_us":..,"p99_us":..,"mean_us":..,"iterations":N}

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Instant;

use vfio_user_bench::{
    client_main,     check_reply_header, encode_region_read, encode_version_request, percentile, Args, Header,
    RegionAccess, CMD_REGION_READ, CMD_VERSION, HEADER_SIZE, MAX_DATA_XFER, REGION_ACCESS_SIZE,
    REGION_READ_REQUEST_SIZE,
};

const USAGE: &str =
    "usage: bench-client --socket PATH --region R --offset O --count C --iterations N --warmup W [--no-version]";

struct Config {
    socket: String,
    region: u32,
    offset: u64,
    count: u32,
    iterations: usize,
    warmup: usize,
    version: bool,
}

fn parse_args() -> Result<Config, String> {
    let args = Args::parse(std::env::args().skip(1), &["no-version", "help"])?;
    if args.flag("help") {
        return Err(USAGE.to_string());
    }
    if let Some(k) = args.unknown(&[
        "socket",
        "region",
        "offset",
        "count",
        "iterations",
        "warmup",
        "no-version",
        "help",
    ]) {
        return Err(format!("unknown option --{k}\n{USAGE}"));
    }
    let cfg = Config {
        socket: args.require("socket")?.to_string(),
        region: args.num("region", None)?,
        offset: args.num("offset", Some(0))?,
        count: args.num("count", Some(4))?,
        iterations: args.num("iterations", None)?,
        warmup: args.num("warmup", Some(0))?,
        version: !args.flag("no-version"),
    };
    if cfg.count > MAX_DATA_XFER {
        return Err(format!("--count {} exceeds {MAX_DATA_XFER}", cfg.count));
    }
    if cfg.iterations == 0 {
        return Err("--iterations must be at least 1".into());
    }
    Ok(cfg)
}

/// Reads exactly one message into the front of `buf` (grown if needed) and returns its header.
/// Reads into the whole buffer, so a small reply normally arrives in one `read`. Fails if the
/// peer sends more bytes than that message (nothing unsolicited is expected).
fn read_message(sock: &mut UnixStream, buf: &mut Vec<u8>) -> Result<Header, String> {
    let mut have = 0usize;
    let mut want = HEADER_SIZE; // until the header has arrived
    let mut sized = false;
    loop {
        if buf.len() < want {
            buf.resize(want, 0);
        }
        let n = match sock.read(&mut buf[have..]) {
            Ok(0) => {
                return Err(format!(
                    "server closed the connection ({have} bytes of a reply received)"
                ))
            }
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("read: {e}")),
        };
        have += n;
        if !sized && have >= HEADER_SIZE {
            let size = Header::decode(&buf[..HEADER_SIZE]).size as usize;
            if !(HEADER_SIZE..=HEADER_SIZE + REGION_ACCESS_SIZE + MAX_DATA_XFER as usize + 4096)
                .contains(&size)
            {
                return Err(format!("reply msg_size {size} is not plausible"));
            }
            want = size;
            sized = true;
        }
        if sized && have >= want {
            if have > want {
                return Err(format!(
                    "server sent {} bytes beyond the {want}-byte reply",
                    have - want
                ));
            }
            return Ok(Header::decode(&buf[..HEADER_SIZE]));
        }
    }
}

fn run(cfg: &Config) -> Result<String, String> {
    let mut sock =
        UnixStream::connect(&cfg.socket).map_err(|e| format!("connect {}: {e}", cfg.socket))?;
    let mut rx: Vec<u8> = vec![0u8; 4096 + REGION_READ_REQUEST_SIZE + cfg.count as usize];
    let mut msg_id: u16 = 0;

    if cfg.version {
        let req = encode_version_request(msg_id);
        sock.write_all(&req)
            .map_err(|e| format!("write VERSION: {e}"))?;
        let h = read_message(&mut sock, &mut rx)?;
        check_reply_header(&h, msg_id, CMD_VERSION, None).map_err(|e| format!("VERSION: {e}"))?;
        if (h.size as usize) < HEADER_SIZE + 4 {
            return Err(format!("VERSION reply too short ({} bytes)", h.size));
        }
        let major = u16::from_le_bytes([rx[16], rx[17]]);
        if major != 0 {
            return Err(format!("VERSION reply major {major}, expected 0"));
        }
        msg_id = msg_id.wrapping_add(1);
    }

    let want_size = (REGION_READ_REQUEST_SIZE + cfg.count as usize) as u32;
    let want_body = RegionAccess {
        offset: cfg.offset,
        region: cfg.region,
        count: cfg.count,
    };
    let mut req = [0u8; REGION_READ_REQUEST_SIZE];
    let mut samples: Vec<u64> = Vec::with_capacity(cfg.iterations);

    let mut one = |sock: &mut UnixStream, rx: &mut Vec<u8>, msg_id: u16| -> Result<(), String> {
        encode_region_read(&mut req, msg_id, cfg.offset, cfg.region, cfg.count);
        sock.write_all(&req)
            .map_err(|e| format!("write REGION_READ: {e}"))?;
        let h = read_message(sock, rx)?;
        check_reply_header(&h, msg_id, CMD_REGION_READ, Some(want_size))
            .map_err(|e| format!("REGION_READ: {e}"))?;
        let got = RegionAccess::decode(&rx[HEADER_SIZE..]);
        if got != want_body {
            return Err(format!(
                "REGION_READ: reply body {got:?} does not echo request {want_body:?}"
            ));
        }
        Ok(())
    };

    for _ in 0..cfg.warmup {
        one(&mut sock, &mut rx, msg_id)?;
        msg_id = msg_id.wrapping_add(1);
    }

    let start = Instant::now();
    for _ in 0..cfg.iterations {
        let t0 = Instant::now();
        one(&mut sock, &mut rx, msg_id)?;
        samples.push(t0.elapsed().as_nanos() as u64);
        msg_id = msg_id.wrapping_add(1);
    }
    let total = start.elapsed().as_secs_f64();
    drop(sock);

    let mean_ns = samples.iter().sum::<u64>() as f64 / samples.len() as f64;
    samples.sort_unstable();
    let us = |ns: u64| ns as f64 / 1000.0;
    Ok(format!(
        "{{\"ops_per_sec\":{:.1},\"p50_us\":{:.3},\"p99_us\":{:.3},\"mean_us\":{:.3},\"iterations\":{}}}",
        cfg.iterations as f64 / total,
        us(percentile(&samples, 50.0)),
        us(percentile(&samples, 99.0)),
        mean_ns / 1000.0,
        cfg.iterations
    ))
}

fn main() -> ExitCode {
    client_main("bench-client", parse_args, run)
}
