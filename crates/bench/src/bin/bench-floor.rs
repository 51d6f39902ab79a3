//! bench-floor: the native floor. A bare, blocking request/reply server on a UNIX socket path,
//! shaped like the simplest C server: per request, one read of the 16-byte header, one read of
//! the body, one write of the reply. No fd passing, no dispatch beyond the command number.
//!
//! bench-floor --socket PATH [--clients K]
//!
//! Serves one client at a time and exits after K clients have disconnected (default 1; 0 = never).
//! Prints "ready" on stdout once it is listening.
//!
//! REGION_READ (9) is answered with header + the 16 request bytes + `count` zero bytes.
//! VERSION (1) is answered with header + major 0 + minor 0 (20 bytes). Anything else gets an
//! EINVAL error reply (bare header). Commands with No_reply get no reply.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;

use vfio_user_bench::{
    encode_region_read_reply, Args, Header, CMD_REGION_READ, CMD_VERSION, EINVAL, FLAG_ERROR,
    FLAG_NO_REPLY, FLAG_REPLY, HEADER_SIZE, MAX_DATA_XFER, REGION_ACCESS_SIZE,
};

/// Largest request body accepted (a VERSION with a generous JSON, or a REGION_WRITE of 1 MiB).
const MAX_BODY: usize = REGION_ACCESS_SIZE + MAX_DATA_XFER as usize;

/// Serves one connection until EOF. Returns Err only for I/O errors other than a clean close.
fn serve(mut sock: UnixStream) -> Result<(), String> {
    let mut hdr = [0u8; HEADER_SIZE];
    let mut body: Vec<u8> = vec![0u8; 4096];
    let mut reply: Vec<u8> = Vec::with_capacity(4096);
    loop {
        match sock.read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(format!("read header: {e}")),
        }
        let h = Header::decode(&hdr);
        let size = h.size as usize;
        if size < HEADER_SIZE || size - HEADER_SIZE > MAX_BODY {
            return Err(format!("bad msg_size {size}; closing"));
        }
        let blen = size - HEADER_SIZE;
        if body.len() < blen {
            body.resize(blen, 0);
        }
        if blen > 0 {
            sock.read_exact(&mut body[..blen])
                .map_err(|e| format!("read body: {e}"))?;
        }
        if h.flags & FLAG_NO_REPLY != 0 {
            continue;
        }
        reply.clear();
        match h.command {
            CMD_REGION_READ if blen == REGION_ACCESS_SIZE => {
                let mut req = [0u8; REGION_ACCESS_SIZE];
                req.copy_from_slice(&body[..REGION_ACCESS_SIZE]);
                let count = u32::from_le_bytes([req[12], req[13], req[14], req[15]]);
                if count > MAX_DATA_XFER {
                    error_reply(&mut reply, &h);
                } else {
                    encode_region_read_reply(&mut reply, h.msg_id, h.command, &req);
                }
            }
            CMD_VERSION => {
                reply.resize(HEADER_SIZE + 4, 0);
                Header {
                    msg_id: h.msg_id,
                    command: h.command,
                    size: (HEADER_SIZE + 4) as u32,
                    flags: FLAG_REPLY,
                    error: 0,
                }
                .encode(&mut reply[..HEADER_SIZE]);
            }
            _ => error_reply(&mut reply, &h),
        }
        sock.write_all(&reply)
            .map_err(|e| format!("write reply: {e}"))?;
    }
}

fn error_reply(reply: &mut Vec<u8>, h: &Header) {
    reply.resize(HEADER_SIZE, 0);
    Header {
        msg_id: h.msg_id,
        command: h.command,
        size: HEADER_SIZE as u32,
        flags: FLAG_REPLY | FLAG_ERROR,
        error: EINVAL,
    }
    .encode(&mut reply[..HEADER_SIZE]);
}

fn run() -> Result<(), String> {
    let args = Args::parse(std::env::args().skip(1), &[])?;
    if let Some(k) = args.unknown(&["socket", "clients"]) {
        return Err(format!(
            "unknown option --{k}\nusage: bench-floor --socket PATH [--clients K]"
        ));
    }
    let path = args.require("socket")?.to_string();
    let clients: u64 = args.num("clients", Some(1))?;

    // Replace a stale socket left by an earlier run, but never clobber a regular file.
    if let Ok(md) = std::fs::symlink_metadata(&path) {
        if md.file_type().is_socket() {
            let _ = std::fs::remove_file(&path);
        } else {
            return Err(format!("{path} exists and is not a socket"));
        }
    }
    let listener = UnixListener::bind(&path).map_err(|e| format!("bind {path}: {e}"))?;
    println!("ready");
    let _ = std::io::stdout().flush();

    let mut served = 0u64;
    let result = loop {
        if clients != 0 && served >= clients {
            break Ok(());
        }
        let sock = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => break Err(format!("accept: {e}")),
        };
        if let Err(e) = serve(sock) {
            eprintln!("bench-floor: {e}");
        }
        served += 1;
    };
    drop(listener);
    let _ = std::fs::remove_file(&path);
    result
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-floor: {e}");
            ExitCode::FAILURE
        }
    }
}
