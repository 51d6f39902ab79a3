/**
 * `npm run demo`: serves the PCI-IDIO-16 GPIO card on a UNIX socket and
 * drives it with the package's own client, the way a VMM and a guest driver
 * would, printing each step; then migrates the card live to a second server.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect, createServer, EventfdIrq, GuestMemory, IrqIndex, migrate, Region } from 'vfio-user';
import { IDIO16, PciIdio16 } from './gpio.js';

const hex = (n: number | bigint, width = 2) => `0x${n.toString(16).padStart(width, '0')}`;

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'vfio-user-demo-'));
  const path = join(dir, 'gpio.sock');
  const card = new PciIdio16();
  const server = createServer(card);
  await server.listen(path);
  console.log(`server: serving a PCI-IDIO-16 GPIO card on ${path}`);

  const client = await connect(path);
  const { major, minor, capabilities } = client.server;
  console.log(`client: negotiated vfio-user ${major}.${minor}, max transfer ${capabilities.maxDataXferSize} bytes, ${capabilities.maxMsgFds} fds per message`);

  const info = await client.getDeviceInfo();
  console.log(`client: device has ${info.numRegions} regions and ${info.numIrqs} IRQ types (flags ${hex(info.flags)})`);
  const ids = await client.regionRead(Region.CONFIG, 0n, 4);
  console.log(`client: config space says vendor ${hex(ids.readUInt16LE(0), 4)} device ${hex(ids.readUInt16LE(2), 4)} (answered natively: ${server.session?.readsAnsweredNatively} read)`);

  const bar2 = await client.pci.sizeBar(2);
  console.log(`client: sized BAR2 (wrote all ones, read back, restored): ${bar2.kind} BAR of ${bar2.size} bytes`);

  await client.regionWrite(Region.BAR2, BigInt(IDIO16.OUT0_7), Buffer.from([0xa5]));
  await client.regionWrite(Region.BAR2, BigInt(IDIO16.OUT8_15), Buffer.from([0x3c]), { posted: true });
  // A posted write has no reply; a read behind it is answered after it (messages are handled in order).
  const readBack = (await client.regionRead(Region.BAR2, BigInt(IDIO16.OUT8_15), 1))[0];
  console.log(`client: drove outputs 0-7 to 0xa5 and (posted) 8-15 to 0x3c, read back ${hex(readBack)}; the card outputs ${hex(card.outputs, 4)}`);

  const intx = new EventfdIrq();
  await client.setIrqs({ index: IrqIndex.INTX, eventfds: [intx] });
  await client.regionRead(Region.BAR2, BigInt(IDIO16.IRQ_CTL), 1);
  console.log('client: wired INTx to an eventfd and enabled the change interrupt');
  const interrupt = intx.next();
  card.setInputs(0x8001);
  console.log(`device: inputs changed to 0x8001; the client's eventfd fired (count ${await interrupt})`);
  const status = (await client.regionRead(Region.BAR2, BigInt(IDIO16.IRQ_STATUS), 1))[0];
  const inputs = await client.regionRead(Region.BAR2, BigInt(IDIO16.IN0_7), 1);
  const high = await client.regionRead(Region.BAR2, BigInt(IDIO16.IN8_15), 1);
  console.log(`client: IRQ status ${hex(status)}, inputs ${hex(inputs[0] | (high[0] << 8), 4)}; clearing the interrupt`);
  await client.regionWrite(Region.BAR2, BigInt(IDIO16.IN0_7), Buffer.from([0]));

  const ram = new GuestMemory(1 << 20);
  await client.dmaMap({ iova: 0x100000n, memory: ram });
  ram.write(0, Buffer.from('guest RAM'));
  const seen = card.dma.find(0x100000n, 9)?.mapping?.read(0, 9).toString();
  console.log(`client: mapped 1 MiB of guest RAM at IOVA 0x100000; the device reads "${seen}" through the shared mapping`);
  await client.dmaUnmap(0x100000n, 1n << 20n);

  await client.reset();
  console.log(`client: reset the device; outputs are back to ${hex(card.outputs, 4)}`);

  // Live migration: a second card on a second socket takes over the first one's state.
  await client.regionWrite(Region.BAR2, BigInt(IDIO16.OUT0_7), Buffer.from([0x5a]));
  const twin = new PciIdio16();
  const twinServer = createServer(twin);
  const twinPath = join(dir, 'gpio-2.sock');
  await twinServer.listen(twinPath);
  const twinClient = await connect(twinPath);
  const moved = await migrate(client, twinClient);
  const out = (await twinClient.regionRead(Region.BAR2, BigInt(IDIO16.OUT0_7), 1))[0];
  console.log(`client: migrated the card to ${twinPath} (${moved.stopCopyBytes} bytes); it outputs ${hex(out)} there`);
  twinClient.close();
  await twinServer.close();

  client.close();
  ram.close();
  intx.close();
  await server.close();
  rmSync(dir, { recursive: true, force: true });
  console.log('server: closed; socket removed');
}

main().catch((error) => {
  console.error(error);
  process.exitCode = 1;
});
