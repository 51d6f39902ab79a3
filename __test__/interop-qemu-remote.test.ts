/**
 * Interop row 3: our client drives QEMU's own device models exported by QEMU as a vfio-user
 * server (`-machine x-remote,vfio-user=on` + `-object x-vfio-user-server`): `vfio-user lspci`
 * of each agrees with what a guest's `lspci -vv` shows for the same model built into QEMU; BAR
 * reads, DMA both ways through a mapped window, INTx wiring, reset; and the remote machine
 * exits when its client leaves. Runs when VFIO_USER_QEMU and VFIO_USER_GUEST name the peers.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { afterEach, beforeAll, describe, expect, test } from 'vitest';
import { Cfg, connect, GuestMemory, IrqIndex, Region, type VfioUserClient } from '../ts/index.js';
import type { BarIndex } from '../ts/pci/description.js';
import { lspci } from '../ts/cli/lspci.js';
import { Command as PciCommand } from '../ts/pci/spec.js';
import { bootGuest, GUEST, QEMU, section } from './guest/boot.js';
import { deviceSection, lspciFields } from './guest/lspci-fields.js';
import { tempSocketPath, until } from './helpers.js';

const GUEST_TIMEOUT = 300_000;

interface Model {
  name: string;
  /** The -device arguments (without id). */
  device: string;
  ids: string;
}

const MODELS: Model[] = [
  { name: 'lsi53c895a', device: 'lsi53c895a', ids: '1000:0012' },
  { name: 'e1000e', device: 'e1000e', ids: '8086:10d3' },
  { name: 'nvme', device: 'nvme,serial=vfio-user-interop', ids: '1b36:0010' },
];

interface Remote {
  path: string;
  proc: ChildProcess;
  exited: Promise<number | null>;
  stderr(): string;
}

const remotes: Remote[] = [];
const cleanups: (() => void)[] = [];

/** QEMU exporting one device model on a fresh socket. */
async function startRemote(model: Model): Promise<Remote> {
  const socket = tempSocketPath('remote.sock');
  cleanups.push(socket.cleanup);
  const proc = spawn(QEMU!, [
    '-machine', 'x-remote,vfio-user=on', '-nodefaults', '-display', 'none', '-monitor', 'none', '-serial', 'none',
    '-device', `${model.device},id=dev0`,
    '-object', `x-vfio-user-server,id=vfu0,type=unix,path=${socket.path},device=dev0`,
  ], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  proc.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((resolve) => proc.on('exit', (code) => resolve(code)));
  const remote = { path: socket.path, proc, exited, stderr: () => stderr };
  remotes.push(remote);
  await until(() => existsSync(socket.path) || proc.exitCode !== null, 30_000);
  if (!existsSync(socket.path)) throw new Error(`QEMU did not export ${model.name}: ${stderr}`);
  return remote;
}

/**
 * Runs `attempt` (which connects to `remote`) again while the connection is refused: the socket
 * file appears at bind(), a moment before QEMU listens on it. A probe connection would not do:
 * the remote serves one client and exits when it leaves.
 */
async function whenListening<T>(attempt: () => Promise<T>): Promise<T> {
  for (let tries = 0; ; tries++) {
    try {
      return await attempt();
    } catch (error) {
      if (tries >= 100 || !/ECONNREFUSED|E111/.test(String(error))) throw error;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

afterEach(() => {
  for (const r of remotes.splice(0)) if (r.proc.exitCode === null) r.proc.kill('SIGKILL');
  for (const c of cleanups.splice(0)) c();
});

/**
 * Places every BAR as firmware would (memory from 0xc0000000, I/O from 0x1000, each aligned to
 * its size) and turns decoding and bus mastering on. QEMU's remote server reaches a BAR through
 * the address it decodes at, so BAR accesses fail (EINVAL) until then, as on real hardware.
 */
async function assignBars(client: VfioUserClient): Promise<void> {
  let memory = 0xc000_0000n;
  let io = 0x1000n;
  for (let index = 0; index < 6; index++) {
    const bar = await client.pci.sizeBar(index as BarIndex);
    if (bar.size === 0n) continue;
    const align = (at: bigint) => (at + bar.size - 1n) & -bar.size;
    const address = bar.kind === 'io' ? align(io) : align(memory);
    if (bar.kind === 'io') io = address + bar.size;
    else memory = address + (bar.size < 0x1000n ? 0x1000n : bar.size);
    const low = await client.pci.read(Cfg.BAR0 + 4 * index, 4);
    await client.pci.write(Cfg.BAR0 + 4 * index, 4, (Number(address & 0xffff_fff0n) | (low & 0xf)) >>> 0);
    if (bar.width === 64) await client.pci.write(Cfg.BAR0 + 4 * index + 4, 4, Number(address >> 32n));
    if (bar.width === 64) index++;
  }
  await client.pci.setCommand(PciCommand.IO | PciCommand.MEMORY | PciCommand.BUS_MASTER, true);
}

/** Resolves on the interrupt `next` promises, or fails saying which never came. */
function within<T>(what: string, promise: Promise<T>, ms = 10_000): Promise<T> {
  let timer: NodeJS.Timeout;
  const timeout = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`no ${what} within ${ms} ms`)), ms)));
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

const u32 = (b: Buffer, at = 0) => b.readUInt32LE(at);
const le32 = (v: number) => { const b = Buffer.alloc(4); b.writeUInt32LE(v); return b; };
const le64 = (v: bigint) => { const b = Buffer.alloc(8); b.writeBigUInt64LE(v); return b; };

/** Each model's BAR, DMA and interrupt check, driven as a small driver of that device would. */
const drive: Record<string, (client: VfioUserClient, ram: GuestMemory, iova: bigint, intx: Promise<number>) => Promise<void>> = {
  // SCRIPTS: the chip fetches an INT instruction from our memory by DMA and interrupts.
  async lsi53c895a(client, ram, iova, intx) {
    const BAR1 = Region.BAR1;
    expect((await client.regionRead(BAR1, 0x0cn, 1))[0] & 0x80).toBe(0x80); // DSTAT: DMA FIFO empty
    const script = Buffer.alloc(8);
    script.writeUInt32LE(0x98080000, 0); // INT, unconditional
    script.writeUInt32LE(0x1234, 4);
    ram.write(0, script);
    await client.regionWrite(BAR1, 0x39n, Buffer.from([0x04])); // DIEN: SCRIPTS interrupt
    await client.regionWrite(BAR1, 0x2cn, le32(Number(iova))); // DSP: start there
    await within('INTx', intx);
    expect(u32(await client.regionRead(BAR1, 0x30n, 4))).toBe(0x1234); // DSPS: the INT's data
    expect((await client.regionRead(BAR1, 0x0cn, 1))[0] & 0x04).toBe(0x04); // DSTAT: SIR
  },
  // Interrupt Cause Set with the cause unmasked asserts INTx.
  async e1000e(client, _ram, _iova, intx) {
    const BAR0 = Region.BAR0;
    expect(u32(await client.regionRead(BAR0, 0x08n, 4)) & 0x3).toBe(0x3); // STATUS: full duplex, link up
    await client.regionWrite(BAR0, 0xd0n, le32(0x04)); // IMS: LSC
    await client.regionWrite(BAR0, 0xc8n, le32(0x04)); // ICS: LSC
    await within('INTx', intx);
    expect(u32(await client.regionRead(BAR0, 0xc0n, 4)) & 0x04).toBe(0x04); // ICR: LSC (read clears)
  },
  // Admin queue in our memory: an Identify Controller is fetched and answered by DMA, then INTx.
  async nvme(client, ram, iova, intx) {
    const BAR0 = Region.BAR0;
    const vs = u32(await client.regionRead(BAR0, 0x08n, 4));
    expect(vs).toBeGreaterThanOrEqual(0x00010400);
    const [ASQ, ACQ, DATA] = [0x1000, 0x2000, 0x3000];
    await client.regionWrite(BAR0, 0x24n, le32(0x0001_0001)); // AQA: 2-entry queues
    await client.regionWrite(BAR0, 0x28n, le64(iova + BigInt(ASQ)));
    await client.regionWrite(BAR0, 0x30n, le64(iova + BigInt(ACQ)));
    await client.regionWrite(BAR0, 0x14n, le32(0x0046_0001)); // CC: EN, IOSQES 6, IOCQES 4
    let csts = 0;
    for (let i = 0; i < 200 && !(csts & 1); i++) {
      csts = u32(await client.regionRead(BAR0, 0x1cn, 4));
      if (!(csts & 1)) await new Promise((r) => setTimeout(r, 10));
    }
    expect(csts & 1).toBe(1); // CSTS.RDY
    const sqe = Buffer.alloc(64);
    sqe[0] = 0x06; // Identify
    sqe.writeUInt16LE(0x7, 2); // command id
    sqe.writeBigUInt64LE(iova + BigInt(DATA), 24); // PRP1
    sqe.writeUInt32LE(1, 40); // CNS 1: controller
    ram.write(ASQ, sqe);
    await client.regionWrite(BAR0, 0x1000n, le32(1)); // SQ0 tail doorbell
    await within('INTx', intx);
    const cqe = ram.read(ACQ, 16);
    expect(cqe.readUInt16LE(12)).toBe(0x7); // command id
    expect(cqe.readUInt16LE(14) >> 1).toBe(0); // status: success
    expect(ram.read(DATA + 4, 20).toString().trim()).toBe('vfio-user-interop'); // serial number
    expect(ram.read(DATA + 24, 40).toString()).toMatch(/^QEMU NVMe Ctrl/); // model number
  },
};

/** A register each drive above leaves non-zero and a device reset clears: region and offset. */
const SET_BY_DRIVE: Record<string, [number, bigint]> = {
  lsi53c895a: [Region.BAR1, 0x38n], // DMODE, DIEN (SIR), DCNTL: DIEN is cleared by a soft reset
  e1000e: [Region.BAR0, 0xd0n], // IMS: LSC
  nvme: [Region.BAR0, 0x14n], // CC: enabled
};

describe.skipIf(!QEMU || !GUEST)('our client drives QEMU’s remote devices (skipped: VFIO_USER_QEMU and VFIO_USER_GUEST name the peers)', () => {
  let guestListing = '';

  beforeAll(async () => {
    // One guest with all three models built in: its lspci is what a VM sees of each.
    const run = await bootGuest({
      script: 'echo "=== LSPCI BEGIN"; lspci -vv -nn; echo "=== LSPCI END"',
      qemuArgs: MODELS.flatMap((m) => ['-device', m.device]),
      timeoutMs: GUEST_TIMEOUT,
    });
    if (run.rc !== 0) throw new Error(`the reference guest failed (${run.exit}):\n${run.console.slice(-3000)}`);
    guestListing = section(run.console, 'LSPCI');
  }, GUEST_TIMEOUT + 30_000);

  for (const model of MODELS) {
    test(`${model.name}: our lspci agrees with the guest’s lspci -vv; the remote exits when lspci leaves`, async () => {
      const remote = await startRemote(model);
      const ours = lspciFields(await whenListening(() => lspci(remote.path)));
      const slot = /^(\S+) .*\[([0-9a-f]{4}:[0-9a-f]{4})\]/gm;
      const match = [...guestListing.matchAll(slot)].find((m) => m[2] === model.ids);
      expect(match, `the guest shows no ${model.ids}`).toBeDefined();
      expect(ours).toEqual(lspciFields(deviceSection(guestListing, match![1])));
      expect(await remote.exited).toBe(0);
    }, 60_000);

    test(`${model.name}: BAR reads, DMA through a mapped window, INTx, reset`, async () => {
      const remote = await startRemote(model);
      const client = await whenListening(() => connect(remote.path));
      const info = await client.getDeviceInfo();
      expect(info.numRegions).toBeGreaterThanOrEqual(9);
      const ram = new GuestMemory(1 << 20);
      cleanups.push(() => ram.close());
      const iova = 0x1000_0000n;
      await client.dmaMap({ iova, memory: ram });
      await assignBars(client);
      const [intx] = await client.wireIrqs(IrqIndex.INTX);
      cleanups.push(() => intx.close());
      await drive[model.name](client, ram, iova, intx.next());
      // DEVICE_RESET resets the model (QEMU's device_cold_reset); config space, BARs included, stays.
      const [region, offset] = SET_BY_DRIVE[model.name];
      expect(u32(await client.regionRead(region, offset, 4))).not.toBe(0);
      await client.reset();
      expect(u32(await client.regionRead(region, offset, 4))).toBe(0);
      await client.dmaUnmap(iova, 1n << 20n);
      client.close();
      expect(await remote.exited).toBe(0);
    }, 60_000);
  }
});
