/**
 * The fuzzer: a hostile, seeded, reproducible client for any served device
 * (docs/testing.md, "Fuzz your device"). `fuzzDevice()` for tests,
 * `vfio-user fuzz` on the command line, `FuzzMode` for a device class's own
 * hostile driver.
 */
import type { DeviceFactory, VfioUserDevice } from '../device.js';
import { fuzz, type FuzzOptions, type FuzzReport } from './runner.js';
import { childTarget, inProcessTarget, type DeviceModule } from './targets.js';

export { FuzzFinding, GUEST_MEMORY, big, hex } from './mode.js';
export type { DeviceProfile, FindingKind, FuzzContext, FuzzMode, FuzzOp, MsixProfile, OpValue, RegionProfile } from './mode.js';
export { Random } from './random.js';
export { pciMode, type PciOp } from './modes/pci.js';
export { nvmeMode, type NvmeOp } from './modes/nvme.js';
export { FUZZ_MODES } from './modes/index.js';
export { fuzz, formatFinding, randomSeed, reproducerFile, type FuzzFindingReport, type FuzzOptions, type FuzzReport, type ReproducerFile } from './runner.js';
export { childTarget, inProcessTarget, socketTarget, type DeviceModule, type FuzzTarget, type TargetInstance } from './targets.js';

/**
 * Fuzzes a device: an instance or a factory served in this process (a
 * factory gives a fresh device per replay, so a finding is shrunk; its
 * `deviceError` events are seen directly), or `{ module, args }` served by a
 * child `vfio-user serve` (for a device that might hang or kill its
 * process). Resolves with the report; `report.finding` is set when the
 * device failed, with the seed and a shrunk reproducer.
 */
export function fuzzDevice(device: VfioUserDevice | DeviceFactory | DeviceModule, options: FuzzOptions = {}): Promise<FuzzReport> {
  const target = typeof device === 'object' && 'module' in device ? childTarget(device) : inProcessTarget(device);
  return fuzz(target, options);
}
