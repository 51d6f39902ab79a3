/**
 * The NVM command set (§6): Read, Write, Flush, Write Zeroes and Dataset
 * Management on namespace 1. Data moves between the backing store and guest
 * memory directly (a file is read into the guest's pages), never through a
 * buffer of our own; the store's work completes the command later.
 */
import type { BlockCallback } from 'vfio-user';
import { checkFlags, checkTransfer, CommandError, forEachView, prpSegments, Status, type Command } from './command.js';
import type { NvmeController } from './controller.js';

export const IoOpcode = {
  FLUSH: 0x00,
  WRITE: 0x01,
  READ: 0x02,
  WRITE_ZEROES: 0x08,
  DATASET_MANAGEMENT: 0x09,
} as const;

export const NAMESPACE_ID = 1;
/** The broadcast NSID: every namespace (Flush; Get Log Page and features that are not per namespace). */
export const ALL_NAMESPACES = 0xffffffff;
/** LBA Data Size 2^9: 512-byte blocks. */
export const BLOCK_SHIFT = 9;
export const BLOCK_SIZE = 1 << BLOCK_SHIFT;

const FUA = 1 << 30;
/** Write Zeroes' Deallocate bit: the blocks may be freed (they read as zeros either way, DLFEAT). */
const DEAC = 1 << 25;
const DSM_DEALLOCATE = 1 << 2;
const DSM_RANGE = 16;

const IO_OPCODES: ReadonlySet<number> = new Set(Object.values(IoOpcode));

/**
 * A command's outcome: its status at once, or the store's work, which
 * fulfils with the status (nothing: success) or rejects with why it failed.
 */
export type Outcome = number | Promise<number | void> | StoreWork;

/** A read or write for the store to run: it starts when called, and calls `done` once. */
export type StoreWork = (done: BlockCallback) => void;

/**
 * Runs an I/O command: a status at once for a command that fails its checks,
 * or the store's work (which runs off the event loop). SMART counts a read or
 * write once it has succeeded (`countTransfer`).
 */
export function executeIo(ctrl: NvmeController, command: Command): Outcome {
  const op = command.opcode;
  if (!IO_OPCODES.has(op)) return Status.INVALID_OPCODE;
  checkFlags(command);
  if (op === IoOpcode.FLUSH) {
    if (command.nsid !== NAMESPACE_ID && command.nsid !== ALL_NAMESPACES) return Status.INVALID_NAMESPACE;
    return ctrl.store.flush();
  }
  // Namespace 1 only: 0, the broadcast NSID and any other are Invalid Namespace.
  if (command.nsid !== NAMESPACE_ID) return Status.INVALID_NAMESPACE;
  if (op === IoOpcode.DATASET_MANAGEMENT) return datasetManagement(ctrl, command);

  const blocks = (command.dw(12) & 0xffff) + 1;
  const length = blocks * BLOCK_SIZE;
  if (op === IoOpcode.WRITE_ZEROES) {
    const position = byteRange(ctrl, startingLba(command), blocks);
    return (command.dw(12) & DEAC) !== 0 ? ctrl.store.deallocate(position, length) : ctrl.store.zero(position, length);
  }
  // MDTS before the range, as QEMU checks them.
  checkTransfer(length);
  const position = byteRange(ctrl, startingLba(command), blocks);
  const segments = prpSegments(ctrl.dma, command, length);
  const { store, dma } = ctrl;
  if (op === IoOpcode.READ) return (done) => store.read(dma, segments, position, done);
  // Without a volatile write cache, or with Force Unit Access, the write is durable before it completes.
  const durable = !ctrl.features.writeCacheEnabled || (command.dw(12) & FUA) !== 0;
  if (!durable) return (done) => store.write(dma, segments, position, done);
  return (done) => store.write(dma, segments, position, (error) => (error ? done(error) : store.flush().then(() => done(null), done)));
}

/** SMART's counters, for an I/O command (opcode and dword 12) that succeeded. */
export function countTransfer(smart: NvmeController['smart'], opcode: number, dw12: number): void {
  const blocks = (dw12 & 0xffff) + 1;
  if (opcode === IoOpcode.READ) {
    smart.blocksRead += blocks;
    smart.readCommands++;
  } else if (opcode === IoOpcode.WRITE) {
    smart.blocksWritten += blocks;
    smart.writeCommands++;
  }
}

/** The starting LBA of a Read, Write or Write Zeroes (dwords 10-11). */
function startingLba(command: Command): number {
  return command.dw(11) * 0x100000000 + command.dw(10);
}

/**
 * The byte offset of `blocks` blocks at `lba`, or LBA Out of Range. An LBA
 * is exact as a number below 2^53, and one at or past it (rounded or not)
 * lies past any namespace, so no sum can wrap.
 */
function byteRange(ctrl: NvmeController, lba: number, blocks: number): number {
  if (lba + blocks > ctrl.blocks) {
    throw new CommandError(Status.LBA_OUT_OF_RANGE, `LBA ${lba} + ${blocks} is past the namespace's ${ctrl.blocks} blocks`);
  }
  return Number(lba) * BLOCK_SIZE;
}

/**
 * Deallocate (AD) gives the ranges back: a raw image gets holes punched in
 * it, and they read as zeros, as Identify Namespace says deallocated blocks
 * do (DLFEAT). The other attributes are hints, accepted and ignored.
 */
function datasetManagement(ctrl: NvmeController, command: Command): Outcome {
  const ranges = (command.dw(10) & 0xff) + 1;
  const list = Buffer.alloc(ranges * DSM_RANGE);
  const segments = prpSegments(ctrl.dma, command, list.length);
  forEachView(ctrl.dma, segments, (view, offset) => list.set(view, offset));
  if ((command.dw(11) & DSM_DEALLOCATE) === 0) return Status.SUCCESS;
  const freed: Array<[number, number]> = [];
  for (let i = 0; i < ranges; i++) {
    const blocks = list.readUInt32LE(DSM_RANGE * i + 4);
    if (blocks === 0) continue;
    freed.push([byteRange(ctrl, Number(list.readBigUInt64LE(DSM_RANGE * i + 8)), blocks), blocks * BLOCK_SIZE]);
  }
  // Every range is checked before any is freed; one at a time, so a command holds one store operation.
  return (async () => {
    for (const [position, length] of freed) await ctrl.store.deallocate(position, length);
  })();
}
