/**
 * The first device a user copies (README.md's and docs/first-device.md's
 * counter card) is driven as QEMU with KVM drives INTx: a trigger eventfd
 * (KVM's irqfd), a resample eventfd signalled at the guest's end of interrupt,
 * and a guest driver that acknowledges each interrupt in the card's register
 * before the EOI. Each interrupt must arrive once: a line left raised would
 * fire again at every EOI, the storm a real guest would see. The same drive
 * without the acknowledge shows what the check catches.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, test } from 'vitest';
import { createServer, EventfdIrq, IrqIndex, Region, type PciDevice, type VfioUserClient } from '../ts/index.js';
import { loadDevice } from '../ts/cli/serve.js';
import { native } from '../ts/native.js';
import { pciFunction } from '../ts/pci/device.js';
import { testCleanups } from './cleanups.js';
import { tempSocketPath, until } from './helpers.js';
import { COMMAND_MEMORY_BUS_MASTER, guest } from './pci-helpers.js';

const root = join(__dirname, '..');
// Inside the package, so the sample's 'vfio-user' resolves as in a user's project (the built dist/).
const dir = mkdtempSync(join(root, '.doc-interrupts-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** The ```ts sample of `markdown` that starts with `firstLine`, written out as the user saves it. */
function sample(markdown: string, firstLine: string): string {
  const text = readFileSync(join(root, markdown), 'utf8');
  const fence = new RegExp(`^\`\`\`ts[^\\n]*\\n(?=${firstLine})`, 'm').exec(text);
  if (fence === null) throw new Error(`${markdown} has no ts sample starting with ${firstLine}`);
  const start = fence.index + fence[0].length;
  const body = text.slice(start, text.indexOf('\n```', start));
  const path = join(dir, `${markdown.replace(/[/.]/g, '_')}_counter.mts`);
  writeFileSync(path, body);
  return path;
}

const REG = { RAISE: 8n, ACK: 12n } as const;

const t = testCleanups();

/** Serves the sample like `vfio-user serve` and wires INTx as QEMU does with KVM. */
async function wired(markdown: string, firstLine: string) {
  const device = (await loadDevice(sample(markdown, firstLine))) as PciDevice;
  const socket = tempSocketPath('counter.sock');
  const server = createServer(device);
  t.defer(() => {
    socket.cleanup();
    device.close();
  });
  t.defer(() => server.close());
  const deviceErrors: Error[] = [];
  server.on('deviceError', (error) => deviceErrors.push(error));
  t.defer(() => expect(deviceErrors).toEqual([]));
  await server.listen(socket.path);
  const client = await t.client(socket.path);
  await guest(client).setCfg16(0x04, COMMAND_MEMORY_BUS_MASTER);
  const trigger = new EventfdIrq();
  const resample = new EventfdIrq();
  t.defer(() => {
    trigger.close();
    resample.close();
  });
  await client.setIrqs({ index: IrqIndex.INTX, eventfds: [trigger] });
  // vfio_intx_enable_kvm: mask, hand over the resample eventfd, unmask.
  await client.setIrqs({ index: IrqIndex.INTX, count: 1, action: 'mask' });
  await client.setIrqs({ index: IrqIndex.INTX, eventfds: [resample], action: 'unmask' });
  await client.setIrqs({ index: IrqIndex.INTX, count: 1, action: 'unmask' });
  const lines = pciFunction(device).interrupts;
  return {
    client,
    /**
     * One interrupt and the guest's handling of it; returns how many more
     * times INTx fired once the EOI unmasked the line.
     */
    async round(acknowledge: boolean): Promise<number> {
      const fired = trigger.next();
      await client.regionWrite(Region.BAR0, REG.RAISE, Buffer.alloc(4));
      expect(await fired).toBe(1);
      expect(await status(client)).toBe(1);
      if (acknowledge) {
        await client.regionWrite(Region.BAR0, REG.ACK, Buffer.alloc(4));
        expect(await status(client)).toBe(0);
      }
      // KVM signals the resample eventfd at the guest's EOI: the server unmasks the line,
      // and a line still raised fires (and masks itself) again at once.
      native.eventfdSignal(resample.fd);
      let again = 0;
      await until(() => (again += trigger.take()) > 0 || !lines.isMasked(IrqIndex.INTX, 0));
      return again;
    },
  };
}

async function status(client: VfioUserClient): Promise<number> {
  return (await client.regionRead(Region.BAR0, REG.ACK, 4)).readUInt32LE(0);
}

describe.each([
  ['README.md', '// counter.ts:'],
  ['docs/first-device.md', '// counter.ts'],
])('the counter card of %s under a VMM', (markdown, firstLine) => {
  test('interrupts once per raise when the driver acknowledges each: no storm', async () => {
    const card = await wired(markdown, firstLine);
    for (let i = 0; i < 5; i++) expect(await card.round(true)).toBe(0);
  });

  test('without the acknowledge the line fires again at the EOI (what the check above would catch)', async () => {
    const card = await wired(markdown, firstLine);
    expect(await card.round(false)).toBe(1);
  });
});
