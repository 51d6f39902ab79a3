//! Shared pieces of the benchmark binaries: the vfio-user wire encoding they need
//! (header, VERSION, REGION_READ, DMA_MAP, DMA_UNMAP), a percentile helper and a tiny
//! argument parser.
//!
//! Only std is used here (bench-dma-map adds rustix for memfds and SCM_RIGHTS), so that a
//! benchmark client costs the same against every target.

use std::fmt;

/// Size of the vfio-user message header (§3).
pub const HEADER_SIZE: usize = 16;
/// VERSION command number.
pub const CMD_VERSION: u16 = 1;
/// REGION_READ command number.
pub const CMD_REGION_READ: u16 = 9;
/// DMA_MAP command number.
pub const CMD_DMA_MAP: u16 = 2;
/// DMA_UNMAP command number.
pub const CMD_DMA_UNMAP: u16 = 3;
/// DMA_MAP request: header + argsz, flags, offset, address, size.
pub const DMA_MAP_REQUEST_SIZE: usize = HEADER_SIZE + 32;
/// DMA_UNMAP request (and its reply): header + argsz, flags, address, size.
pub const DMA_UNMAP_REQUEST_SIZE: usize = HEADER_SIZE + 24;
/// DMA_MAP flags: the window is readable and writable by the device.
pub const DMA_MAP_READ_WRITE: u32 = 0b11;
/// flags: type bits (0-3).
pub const FLAG_TYPE_MASK: u32 = 0xf;
/// flags type value for a reply.
pub const FLAG_REPLY: u32 = 1;
/// flags: No_reply bit (commands only).
pub const FLAG_NO_REPLY: u32 = 0x10;
/// flags: Error bit (replies only).
pub const FLAG_ERROR: u32 = 0x20;
/// REGION_READ request body: offset u64, region u32, count u32.
pub const REGION_ACCESS_SIZE: usize = 16;
/// Total size of a REGION_READ request.
pub const REGION_READ_REQUEST_SIZE: usize = HEADER_SIZE + REGION_ACCESS_SIZE;
/// Largest `count` either binary will handle (the protocol default max_data_xfer_size).
pub const MAX_DATA_XFER: u32 = 1 << 20;
/// Capabilities the client proposes in VERSION (NUL-terminated on the wire).
pub const CLIENT_CAPS_JSON: &str =
    r#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576}}"#;
/// EINVAL, used by the floor for commands it does not know.
pub const EINVAL: u32 = 22;

/// The 16-byte message header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub msg_id: u16,
    pub command: u16,
    pub size: u32,
    pub flags: u32,
    pub error: u32,
}

impl Header {
    pub fn encode(&self, out: &mut [u8]) {
        out[0..2].copy_from_slice(&self.msg_id.to_le_bytes());
        out[2..4].copy_from_slice(&self.command.to_le_bytes());
        out[4..8].copy_from_slice(&self.size.to_le_bytes());
        out[8..12].copy_from_slice(&self.flags.to_le_bytes());
        out[12..16].copy_from_slice(&self.error.to_le_bytes());
    }

    pub fn decode(b: &[u8]) -> Header {
        Header {
            msg_id: u16::from_le_bytes([b[0], b[1]]),
            command: u16::from_le_bytes([b[2], b[3]]),
            size: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            flags: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            error: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        }
    }

    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_TYPE_MASK == FLAG_REPLY
    }
}

/// A complete VERSION request (major 0, minor 0, capabilities JSON + NUL).
pub fn encode_version_request(msg_id: u16) -> Vec<u8> {
    let size = HEADER_SIZE + 4 + CLIENT_CAPS_JSON.len() + 1;
    let mut out = vec![0u8; size];
    Header {
        msg_id,
        command: CMD_VERSION,
        size: size as u32,
        flags: 0,
        error: 0,
    }
    .encode(&mut out);
    // major 0, minor 0 are already zero.
    out[HEADER_SIZE + 4..size - 1].copy_from_slice(CLIENT_CAPS_JSON.as_bytes());
    out
}

/// Writes a REGION_READ request into `out` (32 bytes).
pub fn encode_region_read(
    out: &mut [u8; REGION_READ_REQUEST_SIZE],
    msg_id: u16,
    offset: u64,
    region: u32,
    count: u32,
) {
    Header {
        msg_id,
        command: CMD_REGION_READ,
        size: REGION_READ_REQUEST_SIZE as u32,
        flags: 0,
        error: 0,
    }
    .encode(&mut out[..HEADER_SIZE]);
    out[16..24].copy_from_slice(&offset.to_le_bytes());
    out[24..28].copy_from_slice(&region.to_le_bytes());
    out[28..32].copy_from_slice(&count.to_le_bytes());
}

/// Writes a DMA_MAP request for `[address, address + size)` backed by the attached fd at `offset`.
pub fn encode_dma_map(out: &mut [u8; DMA_MAP_REQUEST_SIZE], msg_id: u16, offset: u64, address: u64, size: u64) {
    Header {
        msg_id,
        command: CMD_DMA_MAP,
        size: DMA_MAP_REQUEST_SIZE as u32,
        flags: 0,
        error: 0,
    }
    .encode(&mut out[..HEADER_SIZE]);
    out[16..20].copy_from_slice(&32u32.to_le_bytes());
    out[20..24].copy_from_slice(&DMA_MAP_READ_WRITE.to_le_bytes());
    out[24..32].copy_from_slice(&offset.to_le_bytes());
    out[32..40].copy_from_slice(&address.to_le_bytes());
    out[40..48].copy_from_slice(&size.to_le_bytes());
}

/// Writes a DMA_UNMAP request for exactly `[address, address + size)`; argsz offers room for the
/// 24-byte echo the reply carries.
pub fn encode_dma_unmap(out: &mut [u8; DMA_UNMAP_REQUEST_SIZE], msg_id: u16, address: u64, size: u64) {
    Header {
        msg_id,
        command: CMD_DMA_UNMAP,
        size: DMA_UNMAP_REQUEST_SIZE as u32,
        flags: 0,
        error: 0,
    }
    .encode(&mut out[..HEADER_SIZE]);
    out[16..20].copy_from_slice(&24u32.to_le_bytes());
    out[20..24].copy_from_slice(&0u32.to_le_bytes());
    out[24..32].copy_from_slice(&address.to_le_bytes());
    out[32..40].copy_from_slice(&size.to_le_bytes());
}

/// Body of a REGION_READ/WRITE request or reply, as decoded from the first 16 body bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionAccess {
    pub offset: u64,
    pub region: u32,
    pub count: u32,
}

impl RegionAccess {
    pub fn decode(b: &[u8]) -> RegionAccess {
        let mut off = [0u8; 8];
        off.copy_from_slice(&b[0..8]);
        RegionAccess {
            offset: u64::from_le_bytes(off),
            region: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            count: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        }
    }
}

/// Why a reply was not the one we expected.
#[derive(Debug, PartialEq, Eq)]
pub enum ReplyError {
    NotReply {
        flags: u32,
    },
    ErrorReply {
        errno: u32,
    },
    WrongId {
        want: u16,
        got: u16,
    },
    WrongCommand {
        want: u16,
        got: u16,
    },
    WrongSize {
        want: u32,
        got: u32,
    },
    WrongBody {
        want: RegionAccess,
        got: RegionAccess,
    },
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplyError::NotReply { flags } => write!(f, "expected a reply, got flags {flags:#x}"),
            ReplyError::ErrorReply { errno } => {
                write!(f, "server returned an error reply (errno {errno})")
            }
            ReplyError::WrongId { want, got } => {
                write!(f, "reply msg_id {got} does not echo request msg_id {want}")
            }
            ReplyError::WrongCommand { want, got } => {
                write!(f, "reply command {got}, expected {want}")
            }
            ReplyError::WrongSize { want, got } => {
                write!(f, "reply msg_size {got}, expected {want}")
            }
            ReplyError::WrongBody { want, got } => {
                write!(f, "reply body {got:?} does not echo request {want:?}")
            }
        }
    }
}

/// Checks a reply header against the request it answers. `want_size` of `None` skips the size check.
pub fn check_reply_header(
    h: &Header,
    msg_id: u16,
    command: u16,
    want_size: Option<u32>,
) -> Result<(), ReplyError> {
    if !h.is_reply() {
        return Err(ReplyError::NotReply { flags: h.flags });
    }
    if h.msg_id != msg_id {
        return Err(ReplyError::WrongId {
            want: msg_id,
            got: h.msg_id,
        });
    }
    if h.command != command {
        return Err(ReplyError::WrongCommand {
            want: command,
            got: h.command,
        });
    }
    if h.flags & FLAG_ERROR != 0 {
        return Err(ReplyError::ErrorReply { errno: h.error });
    }
    if let Some(want) = want_size {
        if h.size != want {
            return Err(ReplyError::WrongSize { want, got: h.size });
        }
    }
    Ok(())
}

/// Builds the floor's reply to a REGION_READ: header + the echoed 16 request bytes + `count` zeros.
/// `out` is resized as needed and reused across calls.
pub fn encode_region_read_reply(
    out: &mut Vec<u8>,
    msg_id: u16,
    command: u16,
    request_body: &[u8; REGION_ACCESS_SIZE],
) {
    let count = RegionAccess::decode(request_body).count as usize;
    let size = HEADER_SIZE + REGION_ACCESS_SIZE + count;
    out.clear();
    out.resize(size, 0);
    Header {
        msg_id,
        command,
        size: size as u32,
        flags: FLAG_REPLY,
        error: 0,
    }
    .encode(&mut out[..HEADER_SIZE]);
    out[HEADER_SIZE..HEADER_SIZE + REGION_ACCESS_SIZE].copy_from_slice(request_body);
}

/// A client binary's `main`: parse the arguments (exit 2 on a usage error), run, print the one
/// JSON line `run` returns (exit 1 on a failure, with the reason on stderr).
pub fn client_main<C>(
    name: &str,
    parse: impl FnOnce() -> Result<C, String>,
    run: impl FnOnce(&C) -> Result<String, String>,
) -> std::process::ExitCode {
    let cfg = match parse() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{name}: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(&cfg) {
        Ok(line) => {
            println!("{line}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{name}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Nearest-rank percentile of an ascending-sorted slice (`p` in 0..=100). Returns 0 for an empty slice.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let n = sorted.len();
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

/// Minimal `--name value` / `--flag` parser.
pub struct Args {
    pairs: Vec<(String, Option<String>)>,
}

impl Args {
    /// `flags` are the option names that take no value.
    pub fn parse(argv: impl Iterator<Item = String>, flags: &[&str]) -> Result<Args, String> {
        let mut pairs = Vec::new();
        let mut it = argv.peekable();
        while let Some(a) = it.next() {
            let Some(name) = a.strip_prefix("--") else {
                return Err(format!("unexpected argument {a:?}"));
            };
            if let Some((k, v)) = name.split_once('=') {
                pairs.push((k.to_string(), Some(v.to_string())));
            } else if flags.contains(&name) {
                pairs.push((name.to_string(), None));
            } else {
                let v = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
                pairs.push((name.to_string(), Some(v)));
            }
        }
        Ok(Args { pairs })
    }

    pub fn flag(&self, name: &str) -> bool {
        self.pairs.iter().any(|(k, _)| k == name)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }

    pub fn require(&self, name: &str) -> Result<&str, String> {
        self.get(name).ok_or_else(|| format!("missing --{name}"))
    }

    /// Parses a number, accepting a `0x` prefix.
    pub fn num<T: TryFrom<u64>>(&self, name: &str, default: Option<T>) -> Result<T, String> {
        match self.get(name) {
            None => default.ok_or_else(|| format!("missing --{name}")),
            Some(s) => {
                let v = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
                    Some(hex) => u64::from_str_radix(hex, 16),
                    None => s.parse::<u64>(),
                }
                .map_err(|e| format!("--{name} {s:?}: {e}"))?;
                T::try_from(v).map_err(|_| format!("--{name} {s:?}: out of range"))
            }
        }
    }

    /// Names that are not in `known`, for rejecting typos.
    pub fn unknown<'a>(&'a self, known: &[&str]) -> Option<&'a str> {
        self.pairs
            .iter()
            .map(|(k, _)| k.as_str())
            .find(|k| !known.contains(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_read_request_layout() {
        let mut b = [0u8; REGION_READ_REQUEST_SIZE];
        encode_region_read(&mut b, 0x1234, 0x1_0000_0002, 7, 4);
        assert_eq!(
            b,
            [
                0x34, 0x12, 9, 0, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // header
                2, 0, 0, 0, 1, 0, 0, 0, 7, 0, 0, 0, 4, 0, 0, 0, // offset, region, count
            ]
        );
        let h = Header::decode(&b);
        assert_eq!(
            h,
            Header {
                msg_id: 0x1234,
                command: 9,
                size: 32,
                flags: 0,
                error: 0
            }
        );
        assert_eq!(
            RegionAccess::decode(&b[16..]),
            RegionAccess {
                offset: 0x1_0000_0002,
                region: 7,
                count: 4
            }
        );
    }

    #[test]
    fn region_read_reply_round_trip() {
        let mut req = [0u8; REGION_READ_REQUEST_SIZE];
        encode_region_read(&mut req, 5, 0, 2, 4);
        let mut body = [0u8; REGION_ACCESS_SIZE];
        body.copy_from_slice(&req[16..]);
        let mut reply = Vec::new();
        encode_region_read_reply(&mut reply, 5, CMD_REGION_READ, &body);
        assert_eq!(reply.len(), 36);
        let h = Header::decode(&reply);
        assert_eq!(check_reply_header(&h, 5, CMD_REGION_READ, Some(36)), Ok(()));
        assert_eq!(&reply[16..32], &req[16..32]);
        assert_eq!(&reply[32..], &[0, 0, 0, 0]);
        assert_eq!(
            check_reply_header(&h, 6, CMD_REGION_READ, Some(36)),
            Err(ReplyError::WrongId { want: 6, got: 5 })
        );
        let err = Header {
            flags: FLAG_REPLY | FLAG_ERROR,
            error: 22,
            size: 16,
            ..h
        };
        assert_eq!(
            check_reply_header(&err, 5, CMD_REGION_READ, Some(36)),
            Err(ReplyError::ErrorReply { errno: 22 })
        );
        let cmd = Header { flags: 0, ..h };
        assert_eq!(
            check_reply_header(&cmd, 5, CMD_REGION_READ, None),
            Err(ReplyError::NotReply { flags: 0 })
        );
    }

    #[test]
    fn dma_map_and_unmap_layouts() {
        let mut map = [0u8; DMA_MAP_REQUEST_SIZE];
        encode_dma_map(&mut map, 7, 0x2000, 0x1_0000_0000, 0x1000);
        assert_eq!(
            Header::decode(&map),
            Header { msg_id: 7, command: CMD_DMA_MAP, size: 48, flags: 0, error: 0 }
        );
        assert_eq!(
            &map[16..],
            &[
                32, 0, 0, 0, 3, 0, 0, 0, // argsz, flags READ|WRITE
                0, 0x20, 0, 0, 0, 0, 0, 0, // offset
                0, 0, 0, 0, 1, 0, 0, 0, // address
                0, 0x10, 0, 0, 0, 0, 0, 0, // size
            ]
        );
        let mut unmap = [0u8; DMA_UNMAP_REQUEST_SIZE];
        encode_dma_unmap(&mut unmap, 8, 0x1_0000_0000, 0x1000);
        assert_eq!(
            Header::decode(&unmap),
            Header { msg_id: 8, command: CMD_DMA_UNMAP, size: 40, flags: 0, error: 0 }
        );
        assert_eq!(
            &unmap[16..],
            &[
                24, 0, 0, 0, 0, 0, 0, 0, // argsz, flags
                0, 0, 0, 0, 1, 0, 0, 0, // address
                0, 0x10, 0, 0, 0, 0, 0, 0, // size
            ]
        );
    }

    #[test]
    fn version_request_layout() {
        let v = encode_version_request(1);
        let h = Header::decode(&v);
        assert_eq!(h.command, CMD_VERSION);
        assert_eq!(h.size as usize, v.len());
        assert_eq!(&v[16..20], &[0, 0, 0, 0]);
        assert_eq!(*v.last().unwrap(), 0);
        assert_eq!(&v[20..v.len() - 1], CLIENT_CAPS_JSON.as_bytes());
    }

    #[test]
    fn percentile_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
        assert_eq!(percentile(&[1, 2, 3], 50.0), 2);
    }

    #[test]
    fn args_parse() {
        let a = Args::parse(
            [
                "--socket",
                "/tmp/s",
                "--count=4",
                "--no-version",
                "--offset",
                "0x10",
            ]
            .iter()
            .map(|s| s.to_string()),
            &["no-version"],
        )
        .unwrap();
        assert_eq!(a.require("socket").unwrap(), "/tmp/s");
        assert_eq!(a.num::<u32>("count", None).unwrap(), 4);
        assert_eq!(a.num::<u64>("offset", None).unwrap(), 16);
        assert_eq!(a.num::<u32>("region", Some(7)).unwrap(), 7);
        assert!(a.flag("no-version"));
        assert!(a.num::<u16>("count", None).is_ok());
        assert_eq!(
            a.unknown(&["socket", "count", "no-version"]),
            Some("offset")
        );
        assert!(Args::parse(["--socket"].iter().map(|s| s.to_string()), &[]).is_err());
    }
}
