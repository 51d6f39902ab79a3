/**
 * `npm run bench`, virtio rings: what a request costs over a packed ring
 * against a split one, in one run. Two child processes (a server meets one
 * ring layout, as a device serves whatever its driver negotiated; sharing a
 * process would make the kit's calls into the ring polymorphic), each with a
 * device that completes every chain at once (no I/O), served over a socket
 * and driven by the package's VirtioDriver: BENCH_BATCH chains of three
 * buffers (a 16-byte header, 512 B of data, a status byte, as virtio-blk's
 * requests) made available, one notification, all used entries collected.
 * Two figures per request:
 *
 *   device   the kit's side: pop (walk and check) and complete, timed in onQueue
 *   total    the batch's wall time over the socket, driver side included
 *
 * Medians over BENCH_ROUNDS (default 9) interleaved rounds of BENCH_BATCHES
 * (default 200) batches; ratios are packed to split (1.00x or less: packed
 * costs no more). Prints a table, then one JSON line.
 */
import { fork, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { join } from 'node:path';
import { connect, createServer, GuestMemory, VirtioDevice, VirtioDriver, type Virtqueue } from '../ts/index.js';
import { envInt, median, runMain, scratchDir } from './children.js';

const ROUNDS = envInt('BENCH_ROUNDS', 9, 1);
const BATCHES = envInt('BENCH_BATCHES', 200, 1);
const BATCH = envInt('BENCH_BATCH', 32, 1);
type RingKind = 'split' | 'packed';
interface Figures {
  device: number;
  total: number;
}

/** A device that answers every chain at once; it counts the nanoseconds it spends doing so. */
class Sink extends VirtioDevice {
  deviceNs = 0n;

  constructor() {
    super({ deviceId: 63, queues: [{ size: 256 }], onQueue: (q) => this.drain(q) });
  }

  private drain(queue: Virtqueue): void {
    const start = process.hrtime.bigint();
    for (let chain = queue.pop(); chain; chain = queue.pop()) queue.complete(chain, 1);
    this.deviceNs += process.hrtime.bigint() - start;
  }
}

async function setUp(ring: RingKind) {
  const device = new Sink();
  const server = createServer(device);
  const socket = join(scratchDir(), `virtio-${ring}.sock`);
  await server.listen(socket);
  const client = await connect(socket);
  const memory = new GuestMemory(4 << 20);
  const driver = await VirtioDriver.connect(client, { memory });
  await driver.initialize({ ring });
  const close = async () => {
    driver.close();
    client.close();
    await server.close();
    device.close();
    memory.close();
  };
  return { device, driver, close };
}

/** One round of BATCHES batches on `ring`: ns per request, device side and total. */
async function round(ring: Awaited<ReturnType<typeof setUp>>): Promise<Figures> {
  const { device, driver } = ring;
  const q = driver.queues[0];
  const header = Buffer.alloc(16);
  const data = Buffer.alloc(512);
  device.deviceNs = 0n;
  const start = process.hrtime.bigint();
  for (let b = 0; b < BATCHES; b++) {
    const done = Array.from({ length: BATCH }, () => q.submit([{ data: header }, { data }, { writable: 1 }], { notify: false }));
    await q.kick();
    await Promise.all(done);
  }
  const requests = BATCHES * BATCH;
  return { device: Number(device.deviceNs) / requests, total: Number(process.hrtime.bigint() - start) / requests };
}

/** A child: serves and drives one ring layout, a round per 'round' message from the parent. */
async function child(kind: RingKind): Promise<number> {
  const ring = await setUp(kind);
  await round(ring); // warm-up: compiled before anything is measured
  process.send!('ready');
  for (;;) {
    const [message] = (await once(process, 'message')) as [string];
    if (message !== 'round') break;
    process.send!(await round(ring));
  }
  await ring.close();
  return 0;
}

async function main(): Promise<number> {
  const children = {} as Record<RingKind, ChildProcess>;
  for (const kind of ['split', 'packed'] as const) {
    children[kind] = fork(__filename, { env: { ...process.env, VIRTIO_RINGS_CHILD: kind } });
    await once(children[kind], 'message');
  }
  const ask = async (kind: RingKind): Promise<Figures> => {
    const reply = once(children[kind], 'message');
    children[kind].send('round');
    return (await reply)[0] as Figures;
  };
  const figures = { split: { device: [] as number[], total: [] as number[] }, packed: { device: [] as number[], total: [] as number[] } };
  for (let r = 0; r < ROUNDS; r++) {
    for (const kind of r % 2 === 0 ? (['split', 'packed'] as const) : (['packed', 'split'] as const)) {
      const f = await ask(kind);
      figures[kind].device.push(f.device);
      figures[kind].total.push(f.total);
    }
  }
  for (const c of Object.values(children)) {
    c.send('close');
    await once(c, 'exit');
  }
  const result = {
    splitDeviceNs: median(figures.split.device), packedDeviceNs: median(figures.packed.device),
    splitTotalNs: median(figures.split.total), packedTotalNs: median(figures.packed.total),
    deviceRatio: median(figures.packed.device) / median(figures.split.device),
    totalRatio: median(figures.packed.total) / median(figures.split.total),
  };
  console.log(`virtio rings: ns per request, batches of ${BATCH} (median of ${ROUNDS} rounds of ${BATCHES} batches)`);
  console.log('          split   packed');
  console.log(`  device ${result.splitDeviceNs.toFixed(0).padStart(6)}   ${result.packedDeviceNs.toFixed(0).padStart(6)}   ${result.deviceRatio.toFixed(2)}x`);
  console.log(`  total  ${result.splitTotalNs.toFixed(0).padStart(6)}   ${result.packedTotalNs.toFixed(0).padStart(6)}   ${result.totalRatio.toFixed(2)}x`);
  console.log(JSON.stringify({ bench: 'virtio-rings', ...result }));
  return 0;
}

const kind = process.env.VIRTIO_RINGS_CHILD as RingKind | undefined;
runMain(kind ? () => child(kind) : main);
