/**
 * A served NVMe controller and a host driving it, for the validation and
 * regression tests: in each doorbell mode the example offers, with the
 * server's device errors collected (a command's failure must be an NVMe
 * status, never an exception escaping to the library).
 */
import { expect } from 'vitest';
import createDevice from '../examples/nvme/index.js';
import { Csts, type NvmeController } from '../examples/nvme/controller.js';
import type { TestCleanups } from './cleanups.js';
import { serve, type Served, type ServeOptions } from './helpers.js';
import { NvmeHost } from './nvme-host.js';

/** How the host rings: the controller's doorbell mode, and whether the host sets up shadow doorbells as Linux does. */
export type Setup = 'trap' | 'trap+shadow' | 'mmap' | 'ioeventfd';
/** Every doorbell mode (ioeventfd always goes with shadow doorbells: a kick carries no value). */
export const SETUPS: readonly Setup[] = ['trap', 'trap+shadow', 'mmap', 'ioeventfd'];

/** NVMe statuses the tests expect: Status Code Type << 8 | Status Code. */
export const S = {
  SUCCESS: 0x000, INVALID_OPCODE: 0x001, INVALID_FIELD: 0x002, DATA_TRANSFER_ERROR: 0x004, INTERNAL_ERROR: 0x006,
  ABORTED_BY_REQUEST: 0x007, INVALID_NAMESPACE: 0x00b, COMMAND_SEQUENCE_ERROR: 0x00c, PRP_OFFSET_INVALID: 0x013,
  LBA_OUT_OF_RANGE: 0x080, COMPLETION_QUEUE_INVALID: 0x100, INVALID_QUEUE_ID: 0x101, INVALID_QUEUE_SIZE: 0x102,
  AER_LIMIT_EXCEEDED: 0x105, INVALID_INTERRUPT_VECTOR: 0x108, INVALID_LOG_PAGE: 0x109, INVALID_QUEUE_DELETION: 0x10c,
  FEATURE_NOT_SAVEABLE: 0x10d, FEATURE_NOT_NAMESPACE_SPECIFIC: 0x10f,
} as const;
export const Op = { FLUSH: 0x00, WRITE: 0x01, READ: 0x02, WRITE_ZEROES: 0x08, DSM: 0x09 } as const;

export interface NvmeRig {
  served: Served<NvmeController>;
  host: NvmeHost;
  /** What the server reported as deviceError: stays empty. */
  deviceErrors: Error[];
}

/** Serves `device` and attaches a host to it; everything is closed after the test. */
export async function attachNvme(cleanups: TestCleanups, device: NvmeController, options: ServeOptions = {}): Promise<NvmeRig> {
  const served = await serve(device, options);
  cleanups.defer(() => device.close());
  cleanups.defer(() => served.close());
  const deviceErrors: Error[] = [];
  served.server.on('deviceError', (error) => deviceErrors.push(error));
  const host = await NvmeHost.attach(await served.client());
  cleanups.defer(() => host.close());
  return { served, host, deviceErrors };
}

/** A controller on `size` bytes of memory in `setup`'s mode, enabled, with I/O queue pair 1 of `ioEntries`. */
export async function bringUpNvme(cleanups: TestCleanups, setup: Setup, { size = '4M', ioEntries = 16 } = {}): Promise<NvmeRig> {
  const [doorbells, shadow] = setup.split('+');
  const rig = await attachNvme(cleanups, createDevice(['--size', size, '--doorbells', doorbells]));
  const h = rig.host;
  expect((await h.enable()) & Csts.RDY).toBe(Csts.RDY);
  if (shadow || doorbells === 'ioeventfd') expect((await h.shadowDoorbells()).status).toBe(S.SUCCESS);
  expect((await h.createIoQueuePair(1, ioEntries)).map((c) => c.status)).toEqual([S.SUCCESS, S.SUCCESS]);
  return rig;
}

/** Writes a page of `fill` at LBA 0 and reads it back: the controller still works. */
export async function roundTrip(h: NvmeHost, fill: number): Promise<void> {
  const page = h.alloc(4096);
  h.write(page, Buffer.alloc(4096, fill));
  expect((await h.submit(1, { opcode: Op.WRITE, nsid: 1, prp1: page, cdw12: 7 })).status).toBe(S.SUCCESS);
  const back = h.alloc(4096);
  expect((await h.submit(1, { opcode: Op.READ, nsid: 1, prp1: back, cdw12: 7 })).status).toBe(S.SUCCESS);
  expect(h.read(back, 4096)).toEqual(Buffer.alloc(4096, fill));
}

export function u64(value: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(value);
  return b;
}
