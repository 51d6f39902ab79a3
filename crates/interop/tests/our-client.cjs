'use strict';
// Driven by our_client_rust_vmm_server.rs: OUR client (the built package,
// dist/ts/index.js) against rust-vmm's vfio_user 0.1.7 Server.
//
//   node our-client.cjs <repository root> <socket path>
//
// Prints exactly one JSON line on stdout: {"ok":true,...results} or
// {"ok":false,"step":...,"error":...,"partial":{...}}; the Rust test asserts
// on it. Nothing here decides pass/fail beyond "a step threw": expected
// rejections are recorded (name, errno) and the Rust side checks them.

const path = require('node:path');

const [root, socket] = process.argv.slice(2);
if (!root || !socket) {
  process.stderr.write('usage: node our-client.cjs <repository root> <socket path>\n');
  process.exit(2);
}
const { connect, GuestMemory, Region } = require(path.join(root, 'dist/ts/index.js'));
// The addon is internal to the package: fd checks and eventfds come from it directly.
const { native } = require(path.join(root, 'dist/ts/native.js'));

const result = {};
let step = 'load';
const cleanups = [];

const hex = (bytes) => Buffer.from(bytes).toString('hex');

/** Runs a promise that should fail; records how it failed (or that it did not). */
async function rejection(promise) {
  try {
    await promise;
    return { rejected: false };
  } catch (error) {
    return { rejected: true, name: error.name, errno: error.errno ?? null, message: error.message };
  }
}

async function main() {
  step = 'connect (VERSION)';
  const client = await connect(socket, { timeoutMs: 3000 });
  cleanups.push(() => client.close());
  let closeError = null;
  client.on('close', (error) => {
    closeError = error ? error.message : null;
  });
  const server = client.server;
  result.version = {
    major: server.major,
    minor: server.minor,
    maxMsgFds: server.capabilities.maxMsgFds,
    maxDataXferSize: server.capabilities.maxDataXferSize,
    migrationPgsize: server.capabilities.migration ? server.capabilities.migration.pgsize : null,
    presentKeys: server.presentKeys,
    unknownKeys: server.unknownKeys,
  };

  step = 'DEVICE_GET_INFO';
  result.deviceInfo = await client.getDeviceInfo();

  step = 'DEVICE_GET_REGION_INFO';
  result.regions = [];
  for (let index = 0; index < result.deviceInfo.numRegions; index++) {
    step = `DEVICE_GET_REGION_INFO ${index}`;
    const info = await client.getRegionInfo(index);
    let fd = null;
    if (info.fd !== undefined) {
      fd = { isEventfd: native.isEventfd(info.fd), size: native.fileSize(info.fd).toString() };
      native.closeFd(info.fd);
    }
    result.regions.push({
      index: info.index,
      argsz: info.argsz,
      flags: info.flags,
      capOffset: info.capOffset,
      size: info.size.toString(),
      offset: info.offset.toString(),
      caps: info.caps.map((cap) =>
        cap.areas
          ? { id: cap.id, areas: cap.areas.map((a) => ({ offset: a.offset.toString(), size: a.size.toString() })) }
          : { id: cap.id, type: cap.type, subtype: cap.subtype },
      ),
      unknownCapIds: info.unknownCapIds,
      fd,
    });
  }

  step = 'REGION_READ config';
  result.config = {
    ids: hex(await client.regionRead(Region.CONFIG, 0n, 4)),
    classRevision: hex(await client.regionRead(Region.CONFIG, 8n, 4)),
    subsystem: hex(await client.regionRead(Region.CONFIG, 0x2cn, 4)),
    header: hex(await client.regionRead(Region.CONFIG, 0n, 64)),
  };

  step = 'REGION_WRITE/READ BAR2';
  const bar2 = {};
  await client.regionWrite(Region.BAR2, 0x10n, Buffer.from([0x11, 0x22, 0x33, 0x44]));
  bar2.afterWrite = hex(await client.regionRead(Region.BAR2, 0x10n, 4));
  step = 'posted REGION_WRITE BAR2';
  await client.regionWrite(Region.BAR2, 0x20n, Buffer.from([0xde, 0xad, 0xbe, 0xef]), { posted: true });
  await client.regionWrite(Region.BAR2, 0x24n, Buffer.from([0xca, 0xfe]), { posted: true });
  // No reply comes for posted writes; the server handles messages in order,
  // so this read must already see both.
  bar2.afterPosted = hex(await client.regionRead(Region.BAR2, 0x20n, 8));
  result.bar2 = bar2;

  step = 'REGION_READ/WRITE BAR0 (memfd-backed)';
  const bar0 = {};
  bar0.initial = hex(await client.regionRead(Region.BAR0, 0n, 8));
  await client.regionWrite(Region.BAR0, 0x100n, Buffer.from('bar0 write', 'latin1'));
  bar0.afterWrite = Buffer.from(await client.regionRead(Region.BAR0, 0x100n, 10)).toString('latin1');
  result.bar0 = bar0;

  step = 'REGION_READ out of range';
  result.readOutOfRange = await rejection(client.regionRead(Region.BAR2, 0xfcn, 8));

  step = 'DMA_MAP with fd';
  const dma = {};
  const ram = new GuestMemory(2 << 20, { name: 'interop-ram' });
  cleanups.push(() => ram.close());
  const WINDOW_OFFSET = 1 << 20;
  ram.write(WINDOW_OFFSET, Buffer.from('hello from our client', 'latin1'));
  await client.dmaMap({ iova: 0x100000n, memory: ram, offset: WINDOW_OFFSET, size: 1 << 20 });
  // The backend wrote into the shared memfd while handling DMA_MAP.
  dma.seenByClient = ram.read(WINDOW_OFFSET + 64, 28).toString('latin1');

  step = 'DMA_MAP without fd';
  const bounce = new GuestMemory(64 * 1024, { name: 'interop-bounce' });
  cleanups.push(() => bounce.close());
  await client.dmaMap({ iova: 0x400000n, memory: bounce, shareFd: false });

  step = 'DMA_MAP overlapping';
  const other = new GuestMemory(64 * 1024, { name: 'interop-overlap' });
  cleanups.push(() => other.close());
  dma.overlap = await rejection(client.dmaMap({ iova: 0x180000n, memory: other }));

  step = 'DMA_UNMAP all';
  dma.unmapAll = await rejection(client.dmaUnmapAll());

  step = 'DMA_UNMAP';
  await client.dmaUnmap(0x100000n, 1n << 20n);
  await client.dmaUnmap(0x400000n, 64n * 1024n);
  dma.unmapUnknown = await rejection(client.dmaUnmap(0x100000n, 1n << 20n));
  result.dma = dma;

  step = 'DEVICE_GET_IRQ_INFO';
  result.irqs = [];
  for (let index = 0; index < result.deviceInfo.numIrqs; index++) {
    result.irqs.push(await client.getIrqInfo(index));
  }
  result.irqInfoOutOfRange = await rejection(client.getIrqInfo(result.deviceInfo.numIrqs));

  step = 'DEVICE_SET_IRQS';
  const intx = native.eventfdCreate();
  const msi = [native.eventfdCreate(), native.eventfdCreate()];
  for (const fd of [intx, ...msi]) cleanups.push(() => native.closeFd(fd));
  const irq = {};
  step = 'DEVICE_SET_IRQS INTx eventfd';
  await client.setIrqs({ index: 0, eventfds: [intx] });
  irq.intxOnAssign = native.eventfdTake(intx);
  step = 'DEVICE_SET_IRQS INTx loopback trigger';
  await client.setIrqs({ index: 0, action: 'trigger', count: 1 });
  irq.intxOnTrigger = native.eventfdTake(intx);
  step = 'DEVICE_SET_IRQS INTx de-assign';
  await client.setIrqs({ index: 0, eventfds: [], count: 1 });
  await client.setIrqs({ index: 0, action: 'trigger', count: 1 });
  irq.intxAfterDeassign = native.eventfdTake(intx);
  step = 'DEVICE_SET_IRQS MSI eventfds';
  // Two eventfds, but rust-vmm's max_msg_fds is 1: our client splits them.
  await client.setIrqs({ index: 1, eventfds: msi });
  irq.msiOnAssign = msi.map((fd) => native.eventfdTake(fd));
  step = 'DEVICE_SET_IRQS MSI loopback trigger vector 1';
  await client.setIrqs({ index: 1, action: 'trigger', start: 1, count: 1 });
  irq.msiOnTrigger1 = msi.map((fd) => native.eventfdTake(fd));
  step = 'DEVICE_SET_IRQS MSI disable';
  await client.setIrqs({ index: 1, action: 'trigger', start: 0, count: 0 });
  await client.setIrqs({ index: 1, action: 'trigger', start: 0, count: 2 });
  irq.msiAfterDisable = msi.map((fd) => native.eventfdTake(fd));
  result.irq = irq;

  step = 'DEVICE_RESET';
  await client.reset();
  result.afterReset = {
    bar2: hex(await client.regionRead(Region.BAR2, 0x10n, 4)),
    config: hex(await client.regionRead(Region.CONFIG, 0n, 4)),
  };

  step = 'close';
  result.closeError = closeError;
  result.closedBeforeClose = client.closed;
}

function finish(line, code) {
  for (const cleanup of cleanups.reverse()) {
    try {
      cleanup();
    } catch {
      // Best effort: the result line matters more than cleanup errors.
    }
  }
  process.stdout.write(JSON.stringify(line) + '\n', () => process.exit(code));
}

main().then(
  () => finish({ ok: true, ...result }, 0),
  (error) => finish({ ok: false, step, error: String(error && error.stack ? error.stack : error), partial: result }, 1),
);
