/** The device profile the fuzzer's modes generate from (mode.ts: `DeviceProfile`). */
import { closeFds } from '../native.js';
import type { VfioUserClient } from '../client/client.js';
import { Cap, CapabilityId, CONFIG_SIZE, DevCap, Express, EXTENDED_CONFIG_SIZE, ExtCap, Msi, MsiX, Status, Cfg } from '../pci/spec.js';
import { Region } from '../protocol/index.js';
import type { DeviceProfile, RegionProfile } from './mode.js';

/** A capability list longer than config space could hold is broken; stop there. */
const MAX_CAPABILITIES = 64;

/** Asks the device what it is, by the same requests every time. */
export async function profileDevice(client: VfioUserClient): Promise<DeviceProfile> {
  const info = await client.getDeviceInfo();
  const regions: RegionProfile[] = [];
  for (let index = 0; index < info.numRegions; index++) {
    const region = await client.getRegionInfo(index);
    if (region.fd !== undefined) closeFds([region.fd]);
    regions.push({ index, size: region.size, flags: region.flags, caps: region.caps });
  }
  const irqs = [];
  for (let index = 0; index < info.numIrqs; index++) irqs.push(await client.getIrqInfo(index));
  const configSize = Number(regions[Region.CONFIG]?.size ?? 0n);
  const config = configSize === 0 ? Buffer.alloc(CONFIG_SIZE) : await client.regionRead(Region.CONFIG, 0n, Math.min(configSize, EXTENDED_CONFIG_SIZE));
  const profile: DeviceProfile = { info, regions, irqs, config, capabilities: [], extendedCapabilities: [], migration: await client.migration.supported() };
  if (config.length < CONFIG_SIZE) return profile;
  if (config.readUInt16LE(Cfg.STATUS) & Status.CAPABILITIES) {
    let at = config[Cfg.CAPABILITIES] & Cap.POINTER_MASK;
    for (let seen = 0; at !== 0 && at + 2 <= CONFIG_SIZE && seen < MAX_CAPABILITIES; seen++) {
      profile.capabilities.push({ id: config[at + Cap.ID], offset: at });
      at = config[at + Cap.NEXT] & Cap.POINTER_MASK;
    }
  }
  for (const { id, offset } of profile.capabilities) {
    if (id === CapabilityId.MSI && offset + Msi.CONTROL + 2 <= CONFIG_SIZE) {
      const control = config.readUInt16LE(offset + Msi.CONTROL);
      profile.msi ??= { offset, is64: (control & Msi.ADDRESS_64) !== 0, maskable: (control & Msi.MASKABLE) !== 0 };
    } else if (id === CapabilityId.MSIX && offset + MsiX.SIZE <= CONFIG_SIZE) {
      const table = config.readUInt32LE(offset + MsiX.TABLE);
      const pba = config.readUInt32LE(offset + MsiX.PBA);
      profile.msix ??= {
        offset,
        vectors: (config.readUInt16LE(offset + MsiX.CONTROL) & MsiX.TABLE_SIZE_MASK) + 1,
        tableRegion: table & MsiX.BIR_MASK,
        tableOffset: table & ~MsiX.BIR_MASK,
        pbaRegion: pba & MsiX.BIR_MASK,
        pbaOffset: pba & ~MsiX.BIR_MASK,
      };
    } else if (id === CapabilityId.PCI_EXPRESS && offset + Express.DEVCTL + 2 <= CONFIG_SIZE) {
      profile.express ??= { offset, flr: (config.readUInt32LE(offset + Express.DEVCAP) & DevCap.FLR) !== 0 };
    }
  }
  if (config.length >= EXTENDED_CONFIG_SIZE) {
    let at = CONFIG_SIZE;
    for (let seen = 0; at >= CONFIG_SIZE && at + 4 <= EXTENDED_CONFIG_SIZE && seen < MAX_CAPABILITIES; seen++) {
      const header = config.readUInt32LE(at);
      if (header === 0) break;
      profile.extendedCapabilities.push({ id: header & ExtCap.ID_MASK, offset: at });
      at = (header >>> ExtCap.NEXT_SHIFT) & ~3;
    }
  }
  return profile;
}
