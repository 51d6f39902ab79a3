/**
 * The Node `net` floor: a bare vfio-user responder written against Node's own `net` module, the
 * cheapest possible JS handler path (no fd passing, no native code). Anything served from JS can
 * at best match this.
 *
 *   node dist/bench/net-floor.js SOCKET_PATH [CLIENTS]
 *
 * Frames messages by msg_size out of a stream buffer; answers REGION_READ (9) with header + the
 * 16 request bytes + `count` zero bytes, VERSION (1) with header + major 0 + minor 0 (20 bytes),
 * anything else with an EINVAL error reply (bare header). Commands with No_reply get no reply.
 *
 * Prints "ready" once listening. Exits on SIGTERM/SIGINT, or after CLIENTS clients have
 * disconnected (default 1; 0 = never).
 */
import * as fs from 'node:fs';
import * as net from 'node:net';

const HEADER_SIZE = 16;
const CMD_VERSION = 1;
const CMD_REGION_READ = 9;
const FLAG_REPLY = 1;
const FLAG_NO_REPLY = 0x10;
const FLAG_ERROR = 0x20;
const EINVAL = 22;
const MAX_DATA_XFER = 1 << 20;
const MAX_MESSAGE = HEADER_SIZE + 16 + MAX_DATA_XFER;

function header(out: Buffer, msgId: number, command: number, size: number, flags: number, error: number): void {
  out.writeUInt16LE(msgId, 0);
  out.writeUInt16LE(command, 2);
  out.writeUInt32LE(size, 4);
  out.writeUInt32LE(flags, 8);
  out.writeUInt32LE(error, 12);
}

/** Builds the reply to the message `msg` (whole message, header included), or null for no reply. */
function handle(msg: Buffer): Buffer | null {
  const msgId = msg.readUInt16LE(0);
  const command = msg.readUInt16LE(2);
  const flags = msg.readUInt32LE(8);
  if (flags & FLAG_NO_REPLY) return null;
  if (command === CMD_REGION_READ && msg.length === HEADER_SIZE + 16) {
    const count = msg.readUInt32LE(HEADER_SIZE + 12);
    if (count <= MAX_DATA_XFER) {
      const size = HEADER_SIZE + 16 + count;
      const out = Buffer.alloc(size); // data bytes are zero
      header(out, msgId, command, size, FLAG_REPLY, 0);
      msg.copy(out, HEADER_SIZE, HEADER_SIZE, HEADER_SIZE + 16);
      return out;
    }
  } else if (command === CMD_VERSION) {
    const out = Buffer.alloc(HEADER_SIZE + 4); // major 0, minor 0
    header(out, msgId, command, HEADER_SIZE + 4, FLAG_REPLY, 0);
    return out;
  }
  const out = Buffer.allocUnsafe(HEADER_SIZE);
  header(out, msgId, command, HEADER_SIZE, FLAG_REPLY | FLAG_ERROR, EINVAL);
  return out;
}

function serveConnection(socket: net.Socket): void {
  let pending: Buffer | null = null;
  socket.on('data', (chunk: Buffer) => {
    let buf = pending ? Buffer.concat([pending, chunk]) : chunk;
    pending = null;
    let off = 0;
    while (buf.length - off >= HEADER_SIZE) {
      const size = buf.readUInt32LE(off + 4);
      if (size < HEADER_SIZE || size > MAX_MESSAGE) {
        socket.destroy(); // the stream can no longer be framed
        return;
      }
      if (buf.length - off < size) break;
      const reply = handle(buf.subarray(off, off + size));
      if (reply) socket.write(reply);
      off += size;
    }
    if (off < buf.length) pending = Buffer.from(buf.subarray(off)); // copy: chunk may be reused
  });
  socket.on('error', () => socket.destroy());
}

function main(): void {
  const path = process.argv[2];
  const clients = process.argv[3] === undefined ? 1 : Number(process.argv[3]);
  if (!path || !Number.isInteger(clients) || clients < 0) {
    process.stderr.write('usage: net-floor SOCKET_PATH [CLIENTS]\n');
    process.exit(2);
  }
  try {
    if (fs.lstatSync(path).isSocket()) fs.unlinkSync(path);
  } catch {
    // no stale socket
  }

  let closed = 0;
  const server = net.createServer((socket) => {
    serveConnection(socket);
    socket.on('close', () => {
      closed += 1;
      if (clients !== 0 && closed >= clients) shutdown(0);
    });
  });
  let done = false;
  function shutdown(code: number): void {
    if (done) return;
    done = true;
    server.close();
    try {
      fs.unlinkSync(path);
    } catch {
      // already gone
    }
    process.exit(code);
  }
  process.on('SIGTERM', () => shutdown(0));
  process.on('SIGINT', () => shutdown(0));
  server.on('error', (err) => {
    process.stderr.write(`net-floor: ${err.message}\n`);
    shutdown(1);
  });
  server.listen(path, () => {
    process.stdout.write('ready\n');
  });
}

main();
