/**
 * `vfio-user lspci SOCKET [--json]`: connects to any vfio-user server as a
 * client, reads its device description and config space, and prints it the
 * way `lspci -vv` would, plus the vfio-user view (regions, IRQs).
 *
 * Read-only by design: config space is read, never written (no BAR sizing),
 * so running it against a server a VMM also uses changes nothing.
 */
import { connect, type VfioUserClient } from '../client/client.js';
import { closeFds } from '../native.js';
import { Region, type IrqInfo, type RegionInfo } from '../protocol/index.js';
import { decode, type Answer, type DeviceSnapshot } from '../lspci/decode.js';
import { formatJson, formatText } from '../lspci/format.js';
import { CONFIG_SIZE, EXTENDED_CONFIG_SIZE } from '../pci/spec.js';

/**
 * QEMU refuses devices with more than 100 regions or 50 IRQ types; asking a
 * server that claims billions about each one would never finish.
 */
const MAX_REGIONS = 100;
const MAX_IRQS = 50;

const message = (error: unknown): string => (error instanceof Error ? error.message : String(error));

async function query<T>(index: number, ask: (index: number) => Promise<T>): Promise<Answer<T>> {
  try {
    return { index, info: await ask(index) };
  } catch (error) {
    return { index, error: message(error) };
  }
}

async function regionInfo(client: VfioUserClient, index: number): Promise<RegionInfo> {
  const { fd, ...info } = await client.getRegionInfo(index);
  // A mappable region comes with its fd; we only describe it.
  if (fd !== undefined) closeFds([fd]);
  return info;
}

/**
 * Config space in at most two REGION_READs: the conventional 256 bytes, then
 * the extended part (up to 4 KiB) when the region has one. A failing
 * extended read keeps the conventional part and becomes a warning.
 */
async function readConfig(client: VfioUserClient, regionSize: bigint, warnings: string[]): Promise<Buffer> {
  const size = Number(regionSize < BigInt(EXTENDED_CONFIG_SIZE) ? regionSize : BigInt(EXTENDED_CONFIG_SIZE));
  const head = await client.regionRead(Region.CONFIG, 0n, Math.min(size, CONFIG_SIZE));
  if (size <= CONFIG_SIZE) return head;
  try {
    const tail = await client.regionRead(Region.CONFIG, BigInt(CONFIG_SIZE), size - CONFIG_SIZE);
    return Buffer.concat([head, tail]);
  } catch (error) {
    warnings.push(`reading extended config space failed: ${message(error)}`);
    return head;
  }
}

/** Everything lspci shows, fetched over an open connection. */
async function fetchSnapshot(client: VfioUserClient): Promise<DeviceSnapshot> {
  const device = await client.getDeviceInfo();
  const warnings: string[] = [];
  if (device.numRegions > MAX_REGIONS) warnings.push(`the server reports ${device.numRegions} regions; showing the first ${MAX_REGIONS}`);
  if (device.numIrqs > MAX_IRQS) warnings.push(`the server reports ${device.numIrqs} IRQ types; showing the first ${MAX_IRQS}`);
  const regions: Answer<RegionInfo>[] = [];
  for (let i = 0; i < Math.min(device.numRegions, MAX_REGIONS); i++) regions.push(await query(i, (n) => regionInfo(client, n)));
  const irqs: Answer<IrqInfo>[] = [];
  for (let i = 0; i < Math.min(device.numIrqs, MAX_IRQS); i++) irqs.push(await query(i, (n) => client.getIrqInfo(n)));
  const config = regions[Region.CONFIG];
  if (!config || 'error' in config || config.info.size === 0n) {
    throw new Error(`the server has no config space (region ${Region.CONFIG}): not a PCI device`);
  }
  return { device, regions, irqs, config: await readConfig(client, config.info.size, warnings), warnings };
}

/** Connects to `socket` and returns what `vfio-user lspci` prints. */
export async function lspci(socket: string, options: { json?: boolean } = {}): Promise<string> {
  const client = await connect(socket);
  try {
    const report = decode(await fetchSnapshot(client));
    return options.json ? formatJson(report) : formatText(report);
  } finally {
    client.close();
  }
}
