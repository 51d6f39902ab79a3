/**
 * `vfio-user lspci`: pure decoding of hand-built config spaces (every
 * capability kind, broken chains), golden output against served devices,
 * and the CLI end to end.
 *
 * Golden files live in __test__/golden/. They are only rewritten on purpose:
 *   UPDATE_GOLDEN=1 npx vitest run __test__/lspci.test.ts
 */
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, test } from 'vitest';
import {
  DeviceInfoFlags,
  IrqInfoFlags,
  RegionCapId,
  RegionInfoFlags,
  type DeviceInfo,
  type IrqInfo,
  type RegionCap,
  type RegionInfo,
  type SetIrqs,
} from '../ts/protocol/index.js';
import type { RegionDescription, VfioUserDevice } from '../ts/device.js';
import { decode, type DeviceSnapshot, type LspciReport } from '../ts/lspci/decode.js';
import { formatJson, formatSize, formatText } from '../ts/lspci/format.js';
import type { Capability } from '../ts/lspci/caps.js';
import type { ExtendedCapability } from '../ts/lspci/ext-caps.js';
import { lspci } from '../ts/cli/lspci.js';
import { DoorbellDevice } from '../examples/msix-device.js';
import { QueueCard } from '../examples/nvme-doorbell.js';
import { serve, SPAWNING_TEST_MS, STARTED_MS, tempSocketPath, until } from './helpers.js';

const root = join(__dirname, '..');
const GOLDEN = join(__dirname, 'golden');

function expectGolden(name: string, actual: string): void {
  const path = join(GOLDEN, name);
  if (process.env.UPDATE_GOLDEN === '1') {
    mkdirSync(GOLDEN, { recursive: true });
    writeFileSync(path, actual);
    return;
  }
  expect(existsSync(path), `${path} is missing; create it with UPDATE_GOLDEN=1`).toBe(true);
  expect(actual).toBe(readFileSync(path, 'utf8'));
}

// ---- a hand-built PCIe config space with every capability kind ----

function put(config: Buffer, offset: number, width: 1 | 2 | 4, value: number): void {
  config.writeUIntLE(value >>> 0, offset, width);
}

/** A standard capability header: ID and next pointer. */
function cap(config: Buffer, at: number, id: number, next: number): void {
  put(config, at, 1, id);
  put(config, at + 1, 1, next);
}

/** An extended capability header: ID, version, next pointer. */
function extCap(config: Buffer, at: number, id: number, version: number, next: number): void {
  put(config, at, 4, (next << 20) | (version << 16) | id);
}

/** An NVMe-like PCIe endpoint: 64-bit BAR0, MSI-X in BAR2, an I/O BAR4, a ROM. */
function fullConfig(): Buffer {
  const c = Buffer.alloc(4096);
  put(c, 0x00, 2, 0x1234); // vendor
  put(c, 0x02, 2, 0x11e8); // device
  put(c, 0x04, 2, 0x0406); // Mem+ BusMaster+ DisINTx+
  put(c, 0x06, 2, 0x0010); // Cap+
  put(c, 0x08, 1, 0x02); // revision
  put(c, 0x09, 1, 0x02); // prog-if: NVM Express
  put(c, 0x0a, 1, 0x08); // non-volatile memory
  put(c, 0x0b, 1, 0x01); // mass storage
  put(c, 0x0c, 1, 0x10); // 64-byte cache lines
  put(c, 0x10, 4, 0xfe00000c); // BAR0: 64-bit prefetchable memory...
  put(c, 0x14, 4, 0x00000001); // ...at 0x1_fe000000
  put(c, 0x18, 4, 0x00000000); // BAR2: 32-bit memory, unassigned
  put(c, 0x20, 4, 0x0000c001); // BAR4: I/O at 0xc000
  put(c, 0x2c, 2, 0x1af4); // subsystem vendor
  put(c, 0x2e, 2, 0x1100); // subsystem
  put(c, 0x34, 1, 0x40);
  put(c, 0x3c, 1, 11); // interrupt line
  put(c, 0x3d, 1, 1); // INTA

  cap(c, 0x40, 0x01, 0x50); // Power Management
  put(c, 0x42, 2, 0xc803); // v3, PME from D0/D3hot/D3cold
  put(c, 0x44, 2, 0x0008); // D0, NoSoftRst+

  cap(c, 0x50, 0x05, 0x70); // MSI
  put(c, 0x52, 2, 0x0186); // 8 vectors capable, 64-bit, maskable, disabled
  put(c, 0x54, 4, 0xfee00000);
  put(c, 0x58, 4, 0x00000001);
  put(c, 0x5c, 2, 0x4021);
  put(c, 0x60, 4, 0x000000fe); // mask
  put(c, 0x64, 4, 0x00000001); // pending

  cap(c, 0x70, 0x11, 0x80); // MSI-X
  put(c, 0x72, 2, 0x8007); // enabled, 8 entries
  put(c, 0x74, 4, 0x00000002); // table: BAR2 + 0
  put(c, 0x78, 4, 0x00000802); // PBA: BAR2 + 0x800

  cap(c, 0x80, 0x10, 0xc0); // PCI Express v2 endpoint
  put(c, 0x82, 2, 0x0002);
  put(c, 0x84, 4, 0x10008021); // MaxPayload 256, ExtTag+, RBE+, FLReset+
  put(c, 0x88, 2, 0x2810); // RlxdOrd+ NoSnoop+, MaxPayload 128, MaxReadReq 512
  put(c, 0x8a, 2, 0x0000);
  put(c, 0x8c, 4, 0x01016c43); // port 1, 8GT/s x4, ASPM L0s L1
  put(c, 0x90, 2, 0x0040); // CommClk+
  put(c, 0x92, 2, 0x2011); // 2.5GT/s x1, DLActive+

  cap(c, 0xc0, 0x09, 0xd0); // vendor-specific
  put(c, 0xc2, 1, 0x0c);
  cap(c, 0xd0, 0x42, 0xd8); // unknown ID
  cap(c, 0xd8, 0x03, 0x00); // VPD: named, not decoded

  extCap(c, 0x100, 0x0001, 2, 0x148); // AER
  put(c, 0x108, 4, 0x00100000); // UEMsk: UnsupReq
  put(c, 0x10c, 4, 0x00062030); // UESvrt: DLP SDES FCP RxOF MalfTLP
  put(c, 0x110, 4, 0x00000001); // CESta: RxErr
  put(c, 0x114, 4, 0x00002000); // CEMsk: AdvNonFatalErr
  put(c, 0x118, 4, 0x000000b4); // first error 0x14, ECRCGenCap+ ECRCChkCap+
  put(c, 0x11c, 4, 0x11223344);
  extCap(c, 0x148, 0x0003, 1, 0x158); // Device Serial Number
  c.writeBigUInt64LE(0x0011223344556677n, 0x14c);
  extCap(c, 0x158, 0x000b, 1, 0x170); // VSEC
  put(c, 0x15c, 4, (0x010 << 20) | (1 << 16) | 0x0001);
  extCap(c, 0x170, 0x0010, 1, 0x180); // SR-IOV: named, not decoded
  extCap(c, 0x180, 0x002a, 1, 0x000); // unknown
  return c;
}

// ---- snapshots for pure decoding ----

const rw = RegionInfoFlags.READ | RegionInfoFlags.WRITE;

function regionInfo(index: number, size: bigint, flags = rw, caps: RegionCap[] = []): RegionInfo {
  return { argsz: 32, flags: size ? flags : 0, index, capOffset: 0, size, offset: 0n, caps, unknownCapIds: [] };
}

function snapshot(config: Buffer, sizes: Record<number, bigint> = {}): DeviceSnapshot {
  const device: DeviceInfo = { argsz: 16, flags: DeviceInfoFlags.PCI | DeviceInfoFlags.RESET, numRegions: 9, numIrqs: 5 };
  const regions = Array.from({ length: 9 }, (_, i) => ({ index: i, info: regionInfo(i, i === 7 ? BigInt(config.length) : sizes[i] ?? 0n) }));
  const irqs = Array.from({ length: 5 }, (_, i): { index: number; info: IrqInfo } => ({ index: i, info: { argsz: 16, flags: IrqInfoFlags.EVENTFD, index: i, count: 1 } }));
  return { device, regions, irqs, config, warnings: [] };
}

const FULL_SIZES = { 0: 0x4000n, 2: 0x1000n, 4: 32n, 6: 2048n };

function capAt<K extends Capability['kind']>(report: LspciReport, kind: K): Extract<Capability, { kind: K }> {
  const found = report.capabilities.items.find((c) => c.kind === kind);
  if (!found) throw new Error(`no ${kind} capability`);
  return found as Extract<Capability, { kind: K }>;
}

function extCapAt<K extends ExtendedCapability['kind']>(report: LspciReport, kind: K): Extract<ExtendedCapability, { kind: K }> {
  const found = report.extendedCapabilities?.items.find((c) => c.kind === kind);
  if (!found) throw new Error(`no ${kind} extended capability`);
  return found as Extract<ExtendedCapability, { kind: K }>;
}

/** A conventional config space whose chain the test fills in. */
function chainConfig(first: number, size = 256): Buffer {
  const c = Buffer.alloc(size);
  put(c, 0x06, 2, 0x0010);
  put(c, 0x34, 1, first);
  return c;
}

describe('decode: header and BARs', () => {
  const report = decode(snapshot(fullConfig(), FULL_SIZES));

  test('IDs, class names, revision, command/status, interrupt', () => {
    expect(report).toMatchObject({
      vendorId: 0x1234,
      deviceId: 0x11e8,
      subsystem: { vendorId: 0x1af4, deviceId: 0x1100 },
      class: { base: 1, sub: 8, progIf: 2, name: 'Non-Volatile memory controller', progIfName: 'NVM Express' },
      revision: 2,
      headerType: { raw: 0, layout: 0, multifunction: false },
      cacheLineBytes: 64,
      interrupt: { pin: 1, pinName: 'A', line: 11 },
    });
    expect(report.command.flags).toMatchObject({ 'I/O': false, Mem: true, BusMaster: true, DisINTx: true });
    expect(report.status.flags.Cap).toBe(true);
    expect(report.status.devsel).toBe('fast');
  });

  test('BAR types from the registers, sizes from the region info; a 64-bit BAR takes two slots', () => {
    expect(report.bars).toEqual([
      { index: 0, kind: 'memory', memoryType: '64-bit', prefetchable: true, address: 0x1fe000000n, size: 0x4000n, enabled: true },
      { index: 2, kind: 'memory', memoryType: '32-bit', prefetchable: false, address: 0n, size: 0x1000n, enabled: true },
      { index: 4, kind: 'io', address: 0xc000n, size: 32n, enabled: false },
    ]);
    expect(report.rom).toEqual({ address: 0, enabled: false, size: 2048n });
  });

  test('a subsystem vendor of 0 or ffff prints no Subsystem line, as lspci does', () => {
    for (const vendor of [0x0000, 0xffff]) {
      const c = fullConfig();
      put(c, 0x2c, 2, vendor);
      const text = formatText(decode(snapshot(c, FULL_SIZES)));
      expect(text).not.toContain('Subsystem:');
    }
    expect(formatText(report)).toContain('\tSubsystem: Device [1af4:1100]');
  });

  test('a config space shorter than the header is refused', () => {
    expect(() => decode(snapshot(Buffer.alloc(32)))).toThrow(RangeError);
  });
});

describe('decode: capabilities', () => {
  const report = decode(snapshot(fullConfig(), FULL_SIZES));

  test('the whole chain, in order', () => {
    expect(report.capabilities.problem).toBeUndefined();
    expect(report.capabilities.items.map((c) => [c.offset, c.kind])).toEqual([
      [0x40, 'power-management'], [0x50, 'msi'], [0x70, 'msi-x'], [0x80, 'express'], [0xc0, 'vendor'], [0xd0, 'other'], [0xd8, 'other'],
    ]);
  });

  test('Power Management: PMC and PMCSR', () => {
    const pm = capAt(report, 'power-management');
    expect(pm).toMatchObject({ version: 3, auxCurrentMa: 0, powerState: 0, dataSelect: 0, dataScale: 0 });
    expect(pm.pmeFrom).toEqual({ D0: true, D1: false, D2: false, D3hot: true, D3cold: true });
    expect(pm.pmcsr.flags).toEqual({ NoSoftRst: true, 'PME-Enable': false, PME: false });
  });

  test('MSI: count, 64-bit, masking, enable', () => {
    expect(capAt(report, 'msi')).toMatchObject({
      enabled: false, vectorsCapable: 8, vectorsEnabled: 1, is64Bit: true, maskable: true,
      address: 0x1fee00000n, data: 0x4021, mask: 0xfe, pending: 1,
    });
  });

  test('MSI: a 32-bit capability without masking has no mask/pending', () => {
    const c = chainConfig(0x40);
    cap(c, 0x40, 0x05, 0);
    put(c, 0x42, 2, 0x0001 | (1 << 1) | (1 << 4)); // enabled, 2 capable, 2 enabled
    put(c, 0x44, 4, 0xfee01000);
    put(c, 0x48, 2, 0x0031);
    const msi = capAt(decode(snapshot(c)), 'msi');
    expect(msi).toMatchObject({ enabled: true, vectorsCapable: 2, vectorsEnabled: 2, is64Bit: false, maskable: false, address: 0xfee01000n, data: 0x31 });
    expect(msi.mask).toBeUndefined();
  });

  test('MSI-X: table size, table/PBA BIR and offset, enable and function mask', () => {
    expect(capAt(report, 'msi-x')).toMatchObject({
      enabled: true, functionMasked: false, tableSize: 8, table: { bar: 2, offset: 0 }, pba: { bar: 2, offset: 0x800 },
    });
  });

  test('PCI Express: type, DevCap, DevCtl, DevSta, link', () => {
    const exp = capAt(report, 'express');
    expect(exp).toMatchObject({ version: 2, portType: 0, portTypeName: 'Endpoint', interruptMessage: 0 });
    expect(exp.deviceCapabilities).toMatchObject({ maxPayload: 256, phantomFunctions: 0, l0sLatency: '<64ns', l1Latency: '<1us', slotPowerLimitW: 0 });
    expect(exp.deviceCapabilities.flags).toMatchObject({ ExtTag: true, RBE: true, FLReset: true, AttnBtn: false });
    expect(exp.deviceControl).toMatchObject({ maxPayload: 128, maxReadRequest: 512 });
    expect(exp.deviceControl.flags).toMatchObject({ RlxdOrd: true, NoSnoop: true, FLReset: false, ExtTag: false });
    expect(Object.values(exp.deviceStatus.flags)).not.toContain(true);
    expect(exp.link?.capability).toMatchObject({ port: 1, speed: '8GT/s', width: 4, aspm: 'L0s L1', l0sExit: '<4us', l1Exit: '<4us' });
    expect(exp.link?.control).toMatchObject({ aspm: 'Disabled', readCompletionBoundary: 64 });
    expect(exp.link?.control.flags.CommClk).toBe(true);
    expect(exp.link?.status).toMatchObject({ speed: '2.5GT/s', width: 1 });
    expect(exp.link?.status.flags.DLActive).toBe(true);
  });

  test('PCI Express: DevCtl shows FLReset only when DevCap has it; RC integrated endpoints have no link', () => {
    const c = chainConfig(0x40);
    cap(c, 0x40, 0x10, 0);
    put(c, 0x42, 2, 0x0092); // v2, type 9
    const exp = capAt(decode(snapshot(c)), 'express');
    expect(exp.portTypeName).toBe('Root Complex Integrated Endpoint');
    expect(exp.link).toBeUndefined();
    expect('FLReset' in exp.deviceControl.flags).toBe(false);
  });

  test('vendor-specific length; unknown and named-but-undecoded IDs', () => {
    expect(capAt(report, 'vendor')).toMatchObject({ offset: 0xc0, length: 0x0c });
    const others = report.capabilities.items.filter((c) => c.kind === 'other');
    expect(others).toEqual([
      { kind: 'other', offset: 0xd0, id: 0x42, name: undefined, flags: 0 },
      { kind: 'other', offset: 0xd8, id: 0x03, name: 'Vital Product Data', flags: 0 },
    ]);
  });

  test('Status Cap- means no list, whatever 0x34 says', () => {
    const c = fullConfig();
    put(c, 0x06, 2, 0);
    expect(decode(snapshot(c)).capabilities).toEqual({ items: [] });
  });
});

describe('decode: broken capability chains end the walk', () => {
  test('a loop is reported where it closes', () => {
    const c = chainConfig(0x40);
    cap(c, 0x40, 0x01, 0x50);
    cap(c, 0x50, 0x05, 0x40);
    const chain = decode(snapshot(c)).capabilities;
    expect(chain.items.map((i) => i.offset)).toEqual([0x40, 0x50]);
    expect(chain.problem).toEqual({ at: 0x40, reason: 'looped' });
  });

  test('a capability pointing at itself', () => {
    const c = chainConfig(0x48);
    cap(c, 0x48, 0x09, 0x48);
    expect(decode(snapshot(c)).capabilities.problem).toEqual({ at: 0x48, reason: 'looped' });
  });

  test('a 48-capability cycle through all of 0x40-0xFC still ends', () => {
    const c = chainConfig(0x40);
    for (let at = 0x40; at <= 0xfc; at += 4) cap(c, at, 0x09, at === 0xfc ? 0x40 : at + 4);
    const chain = decode(snapshot(c)).capabilities;
    expect(chain.items).toHaveLength(48);
    expect(chain.problem?.reason).toBe('looped');
  });

  test('pointers into the header are out of range', () => {
    expect(decode(snapshot(chainConfig(0x20))).capabilities).toEqual({ items: [], problem: { at: 0x20, reason: 'out of range' } });
    const c = chainConfig(0x40);
    cap(c, 0x40, 0x01, 0x08);
    expect(decode(snapshot(c)).capabilities.problem).toEqual({ at: 0x08, reason: 'out of range' });
  });

  test('an ID of 0xff is a broken chain', () => {
    const c = chainConfig(0x40);
    cap(c, 0x40, 0xff, 0xff);
    expect(decode(snapshot(c)).capabilities.problem).toEqual({ at: 0x40, reason: 'broken' });
  });

  test('a capability running past the config bytes is truncated, not a crash', () => {
    const c = chainConfig(0xfc);
    cap(c, 0xfc, 0x11, 0); // MSI-X needs 12 bytes; only 4 remain
    expect(decode(snapshot(c)).capabilities.items).toEqual([{ kind: 'truncated', offset: 0xfc, id: 0x11 }]);
  });

  test('a server config region shorter than 256 bytes bounds the walk', () => {
    const c = chainConfig(0x40, 0x44);
    cap(c, 0x40, 0x01, 0x80);
    const chain = decode(snapshot(c)).capabilities;
    expect(chain.items).toEqual([{ kind: 'truncated', offset: 0x40, id: 1 }]);
    expect(chain.problem).toEqual({ at: 0x80, reason: 'out of range' });
  });
});

describe('decode: extended capabilities', () => {
  const report = decode(snapshot(fullConfig(), FULL_SIZES));

  test('AER, DSN, VSEC and unknown IDs', () => {
    const list = report.extendedCapabilities!;
    expect(list.problem).toBeUndefined();
    expect(list.items.map((c) => [c.offset, c.kind, c.version])).toEqual([
      [0x100, 'aer', 2], [0x148, 'serial-number', 1], [0x158, 'vendor', 1], [0x170, 'other', 1], [0x180, 'other', 1],
    ]);
    const aer = extCapAt(report, 'aer');
    expect(aer.uncorrectableMask.flags.UnsupReq).toBe(true);
    expect(Object.entries(aer.uncorrectableSeverity.flags).filter(([, v]) => v).map(([k]) => k)).toEqual(['DLP', 'SDES', 'FCP', 'RxOF', 'MalfTLP']);
    expect(aer.correctableStatus.flags.RxErr).toBe(true);
    expect(aer.correctableMask.flags.AdvNonFatalErr).toBe(true);
    expect(aer.control).toMatchObject({ firstErrorPointer: 0x14 });
    expect(aer.control.flags).toMatchObject({ ECRCGenCap: true, ECRCGenEn: false, ECRCChkCap: true });
    expect(aer.headerLog).toEqual([0x11223344, 0, 0, 0]);
    expect(extCapAt(report, 'serial-number').serial).toBe(0x0011223344556677n);
    expect(extCapAt(report, 'vendor')).toMatchObject({ vsecId: 1, vsecRevision: 1, vsecLength: 0x10 });
    expect(list.items.slice(3)).toEqual([
      { kind: 'other', offset: 0x170, id: 0x10, version: 1, name: 'Single Root I/O Virtualization (SR-IOV)' },
      { kind: 'other', offset: 0x180, id: 0x2a, version: 1, name: undefined },
    ]);
  });

  test('none in a 256-byte config space; an empty list when 0x100 reads 0', () => {
    expect(decode(snapshot(fullConfig().subarray(0, 256))).extendedCapabilities).toBeUndefined();
    expect(decode(snapshot(Buffer.alloc(4096))).extendedCapabilities).toEqual({ items: [] });
  });

  test('loops, out-of-range pointers and all-ones headers end the walk', () => {
    const looped = Buffer.alloc(4096);
    extCap(looped, 0x100, 0x0003, 1, 0x200);
    extCap(looped, 0x200, 0x0003, 1, 0x100);
    expect(decode(snapshot(looped)).extendedCapabilities).toMatchObject({ items: [{ offset: 0x100 }, { offset: 0x200 }], problem: { at: 0x100, reason: 'looped' } });

    const backwards = Buffer.alloc(4096);
    extCap(backwards, 0x100, 0x0003, 1, 0x0f0);
    expect(decode(snapshot(backwards)).extendedCapabilities?.problem).toEqual({ at: 0x0f0, reason: 'out of range' });

    const broken = Buffer.alloc(4096);
    put(broken, 0x100, 4, 0xffffffff);
    expect(decode(snapshot(broken)).extendedCapabilities).toEqual({ items: [], problem: { at: 0x100, reason: 'broken' } });
  });

  test('a capability at the very end is truncated', () => {
    const c = Buffer.alloc(4096);
    extCap(c, 0x100, 0x0003, 1, 0xffc);
    extCap(c, 0xffc, 0x0001, 1, 0);
    expect(decode(snapshot(c)).extendedCapabilities?.items[1]).toEqual({ kind: 'truncated', offset: 0xffc, id: 1, version: 1 });
  });
});

describe('format', () => {
  test('sizes in lspci style', () => {
    expect([8n, 1024n, 0x4000n, 0x100000n, 1536n, 3n << 30n].map(formatSize)).toEqual(['8', '1K', '16K', '1M', '1536', '3G']);
  });

  test('broken chains print where they broke', () => {
    const c = chainConfig(0x40, 4096);
    cap(c, 0x40, 0x01, 0x40);
    extCap(c, 0x100, 0x0003, 1, 0x100);
    const text = formatText(decode(snapshot(c)));
    expect(text).toContain('\tCapabilities: [40] <chain looped>\n');
    expect(text).toContain('\tCapabilities: [100] <chain looped>\n');
    expect(formatText(decode(snapshot(chainConfig(0x20))))).toContain('\tCapabilities: [20] <chain broken: pointer out of range>\n');
  });

  test('JSON turns bigints into hex strings', () => {
    const json = JSON.parse(formatJson(decode(snapshot(fullConfig(), FULL_SIZES))));
    expect(json.bars[0]).toMatchObject({ address: '0x1fe000000', size: '0x4000' });
    expect(json.extendedCapabilities.items[1].serial).toBe('0x11223344556677');
    expect(json.vendorId).toBe(0x1234);
  });
});

// ---- served devices ----

/**
 * A device served straight from a config-space Buffer, standing in for the
 * PCI model's capabilities (in progress elsewhere). Reads only; counts
 * config reads so the test can check lspci reads in large chunks.
 */
class ConfigDevice implements VfioUserDevice {
  readonly flags = DeviceInfoFlags.PCI | DeviceInfoFlags.RESET;
  readonly numIrqs = 5;
  readonly numRegions: number;
  configReads = 0;

  constructor(
    private readonly config: Buffer,
    private readonly regions: RegionDescription[],
    private readonly irqCounts: number[],
  ) {
    this.numRegions = regions.length;
  }

  regionInfo(index: number): RegionDescription {
    return this.regions[index];
  }

  read(region: number, offset: number, count: number): Uint8Array {
    if (region !== 7) return Buffer.alloc(count);
    this.configReads++;
    return Buffer.from(this.config.subarray(offset, offset + count));
  }

  write(): void {
    throw new Error('lspci must not write');
  }

  irqInfo(index: number): { count: number; flags: number } {
    return { count: this.irqCounts[index], flags: IrqInfoFlags.EVENTFD | (index === 1 ? IrqInfoFlags.NORESIZE : 0) };
  }

  setIrqs(_request: SetIrqs, _fds: number[]): void {}
  reset(): void {}

  attach(): void {}
  detach(): void {}
}

function fullDevice(): ConfigDevice {
  const none: RegionDescription = { size: 0n, flags: 0 };
  const regions: RegionDescription[] = [
    {
      size: 0x4000n,
      flags: rw | RegionInfoFlags.MMAP,
      offset: 0x10000n,
      caps: [{ id: RegionCapId.SPARSE_MMAP, areas: [{ offset: 0x1000n, size: 0x1000n }, { offset: 0x3000n, size: 0x1000n }] }],
    },
    none,
    { size: 0x1000n, flags: rw },
    none,
    { size: 32n, flags: rw },
    none,
    { size: 2048n, flags: RegionInfoFlags.READ },
    { size: 4096n, flags: rw },
    none,
    { size: 0x2000n, flags: RegionInfoFlags.READ, caps: [{ id: RegionCapId.TYPE, type: 0x80000001, subtype: 2 }] },
  ];
  return new ConfigDevice(fullConfig(), regions, [1, 8, 8, 1, 1]);
}

describe('served devices (golden output)', () => {
  test('the GPIO card', async () => {
    const served = await serve();
    try {
      expectGolden('lspci-gpio.txt', await lspci(served.path));
      expectGolden('lspci-gpio.json', await lspci(served.path, { json: true }));
    } finally {
      await served.close();
    }
  });

  test('a PCIe device with every capability kind, read in two REGION_READs', async () => {
    const device = fullDevice();
    const served = await serve(device);
    try {
      const text = await lspci(served.path);
      expect(device.configReads).toBe(2);
      expectGolden('lspci-caps.txt', text);
      expectGolden('lspci-caps.json', await lspci(served.path, { json: true }));
    } finally {
      await served.close();
    }
  });

  test('the PCI model with every capability it emulates (examples/msix-device.ts)', async () => {
    const served = await serve(new DoorbellDevice());
    try {
      expectGolden('lspci-msix-device.txt', await lspci(served.path));
      expectGolden('lspci-msix-device.json', await lspci(served.path, { json: true }));
    } finally {
      await served.close();
    }
  });

  test('a shared BAR with a sparse doorbell page and MSI-X in its trapped pages (examples/nvme-doorbell.ts)', async () => {
    const served = await serve(new QueueCard());
    try {
      expectGolden('lspci-nvme-doorbell.txt', await lspci(served.path));
      expectGolden('lspci-nvme-doorbell.json', await lspci(served.path, { json: true }));
    } finally {
      await served.close();
      served.device.close();
    }
  });

  test('a server with a looping chain is described, not hung on', async () => {
    const config = chainConfig(0x40, 4096);
    cap(config, 0x40, 0x05, 0x40);
    extCap(config, 0x100, 0x0003, 1, 0x100);
    const regions: RegionDescription[] = Array.from({ length: 9 }, (_, i) => (i === 7 ? { size: 4096n, flags: rw } : { size: 0n, flags: 0 }));
    const served = await serve(new ConfigDevice(config, regions, [0, 0, 0, 1, 1]));
    try {
      const text = await lspci(served.path);
      expect(text).toContain('\tCapabilities: [40] <chain looped>\n');
      expect(text).toContain('\tCapabilities: [100] <chain looped>\n');
    } finally {
      await served.close();
    }
  });
});

// ---- the CLI ----

const tsx = join(root, 'node_modules', '.bin', 'tsx');
const main = join(root, 'ts/cli/main.ts');

function run(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(tsx, [main, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    child.on('exit', (code) => resolve({ code, stdout, stderr }));
  });
}

describe('vfio-user lspci', { timeout: SPAWNING_TEST_MS }, () => {
  test('describes a device served by vfio-user serve, as text and as JSON', async () => {
    const socket = tempSocketPath();
    const server = spawn(tsx, [main, 'serve', join(root, 'examples/gpio.ts'), '--socket', socket.path], { stdio: 'ignore' });
    try {
      await until(() => existsSync(socket.path), STARTED_MS);
      const text = await run(['lspci', socket.path]);
      expect(text.stderr).toBe('');
      expect(text.code).toBe(0);
      expect(text.stdout).toMatch(/^Signal processing controller \[1180\]: Device \[494f:0dc8\]/);
      const json = await run(['lspci', socket.path, '--json']);
      expect(json.code).toBe(0);
      expect(JSON.parse(json.stdout)).toMatchObject({ vendorId: 0x494f, deviceId: 0x0dc8 });
    } finally {
      server.kill('SIGTERM');
      await new Promise((r) => server.on('exit', r));
      socket.cleanup();
    }
  });

  test('serves the shared-BAR example (its poll timer must not get in the way) and matches the golden text', async () => {
    const socket = tempSocketPath();
    const server = spawn(tsx, [main, 'serve', join(root, 'examples/nvme-doorbell.ts'), '--socket', socket.path], { stdio: 'ignore' });
    try {
      await until(() => existsSync(socket.path), STARTED_MS);
      const text = await run(['lspci', socket.path]);
      expect([text.code, text.stderr]).toEqual([0, '']);
      expect(text.stdout).toBe(readFileSync(join(GOLDEN, 'lspci-nvme-doorbell.txt'), 'utf8'));
    } finally {
      server.kill('SIGTERM');
      await new Promise((r) => server.on('exit', r));
      socket.cleanup();
    }
  });

  test('a missing socket is an error, a missing argument a usage error', async () => {
    const missing = await run(['lspci', '/nonexistent/vfio-user.sock']);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/^vfio-user: /);
    const usage = await run(['lspci']);
    expect(usage.code).toBe(2);
    expect(usage.stderr).toMatch(/give one SOCKET\nRun `vfio-user lspci --help` for usage/);
  });
});
