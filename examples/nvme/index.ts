/**
 * An NVMe controller (NVMe 1.4, one namespace of 512-byte blocks) that a
 * stock Linux guest binds, formats and benchmarks. `vfio-user serve` loads
 * this folder; arguments after `--` reach the default export:
 *
 *   vfio-user serve examples/nvme --socket /tmp/nvme.sock -- --image disk.img [--size 1G]
 *       [--doorbells mmap|trap|ioeventfd] [--shadow-doorbells on|off] [--serial SN]
 *
 * `--image FILE` is a raw image, created sparse at `--size` (default 1 GiB)
 * when missing; without it the namespace lives in memory (`--size` bytes).
 * `--shadow-doorbells off` stops offering Doorbell Buffer Config, so a
 * guest writes every doorbell to the register (to compare; not with
 * ioeventfd doorbells). `--serial` sets Identify's serial number (random by
 * default).
 *
 *   controller.ts  BAR0 registers, handshakes, resets, interrupts, migration
 *   doorbells.ts   where doorbell values come from: mapped page, trapped writes, ioeventfds, shadow pages
 *   admin.ts       admin commands: Identify, queues, features, log pages, events
 *   io.ts          Read, Write, Flush, Write Zeroes, Dataset Management
 *   command.ts     submission entries, status codes, PRPs
 *   queues.ts      submission and completion rings, fetched and posted in batches
 *   coalescing.ts  interrupt coalescing (Set Features 0x08)
 *   shadow.ts      shadow doorbells and EventIdx (Doorbell Buffer Config)
 *   state.ts       migration state, checked before it is loaded
 *   store.ts       the backing file or memory
 */
import { parseArgs } from 'node:util';
import { UsageError } from 'vfio-user';
import { NvmeController, type DoorbellMode } from './controller.js';
import { BLOCK_SIZE } from './io.js';
import { FileStore, MemoryStore } from './store.js';

export { NvmeController, type DoorbellMode, type NvmeOptions } from './controller.js';
export { FileStore, MemoryStore, type BackingStore } from './store.js';

const DOORBELL_MODES: readonly DoorbellMode[] = ['trap', 'mmap', 'ioeventfd'];

const UNITS: Record<string, number> = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 };

/** "1G", "512M", "1048576": bytes, a whole number of blocks. */
export function parseSize(text: string): number {
  const m = /^(\d+)([KMGT]?)(?:i?B)?$/i.exec(text);
  const bytes = m ? Number(m[1]) * UNITS[m[2].toUpperCase()] : NaN;
  if (!Number.isSafeInteger(bytes) || bytes <= 0 || bytes % BLOCK_SIZE !== 0) {
    throw new UsageError(`--size ${text}: expected a positive number of bytes, a multiple of ${BLOCK_SIZE} (suffixes K, M, G, T)`);
  }
  return bytes;
}

/** The device `vfio-user serve` serves. */
export default function createDevice(args: readonly string[] = []): NvmeController {
  const { values } = parseArgs({
    args: [...args],
    options: {
      image: { type: 'string' },
      size: { type: 'string', default: '1G' },
      doorbells: { type: 'string', default: 'mmap' },
      'shadow-doorbells': { type: 'string', default: 'on' },
      serial: { type: 'string' },
    },
    strict: true,
  });
  if (!DOORBELL_MODES.includes(values.doorbells as DoorbellMode)) throw new UsageError(`--doorbells ${values.doorbells}: expected ${DOORBELL_MODES.join(', ')}`);
  const shadow = values['shadow-doorbells'];
  if (shadow !== 'on' && shadow !== 'off') throw new UsageError(`--shadow-doorbells ${shadow}: expected on or off`);
  const size = parseSize(values.size);
  const store = values.image ? new FileStore(values.image, size) : new MemoryStore(size);
  try {
    return new NvmeController({ store, doorbells: values.doorbells as DoorbellMode, shadowDoorbells: shadow === 'on', serial: values.serial });
  } catch (error) {
    store.close();
    throw error;
  }
}
