/**
 * vfio-user for Node: write PCI devices in TypeScript and serve them to
 * virtual machine monitors (QEMU's vfio-user-pci and others), or drive any
 * vfio-user server with the client.
 */
// The public types use Node's (Buffer, EventEmitter): TypeScript 6 no longer
// loads @types/node by itself, so the declarations ask for it.
/// <reference types="node" preserve="true" />
export {
  createServer,
  VfioUserServer,
  type AllowedPeers,
  type ListenOptions,
  type ServerOptions,
  type VfioUserServerEvents,
} from './server/server.js';
export type { ServerSession, SessionOptions } from './server/session.js';
export type { PeerCredentials } from './native-binding.js';
export { punchHole } from './sparse.js';
export { TAP_VNET_HEADER, TapError, TapInterface, type TapOperation } from './tap.js';
export {
  BlockDevice,
  BlockDeviceClosedError,
  BlockIoError,
  BlockOpenError,
  BlockQueueFullError,
  type BlockAlignment,
  type BlockCallback,
  type BlockEngine,
  type BlockOp,
  type BlockOpenOptions,
} from './block/index.js';
export {
  connect,
  VfioUserClient,
  GuestMemory,
  type GuestMemoryOptions,
  type ConnectOptions,
  type DmaMapOptions,
  type IrqAction,
  type RegionInfoWithFd,
  type SetIrqsOptions,
  type VfioUserClientEvents,
} from './client/client.js';
export { EventfdIrq, type EventfdIrqEvents } from './client/eventfd-irq.js';
export { PciConfigClient, type BarSizing, type ConfigWidth } from './client/pci.js';
export { migrate, MigrationClient, type MigrationResult } from './client/migration.js';
export { PciDevice } from './pci/device.js';
export type { PciBar } from './pci/bars.js';
export { IoEventfd, type IoEventfdEvents } from './pci/ioeventfds.js';
export { debugRequested } from './debug.js';
export { DoorbellSource, type DoorbellSourceEvents, type DoorbellSourceOptions, type DoorbellStats, type DoorbellTiming, type Ring } from './doorbells.js';
export {
  InvalidDeviceError,
  type AerCapability,
  type BarArea,
  type BarDescription,
  type BarHandlers,
  type BarIndex,
  type BarLocation,
  type Capability,
  type DeviceRegisters,
  type ExtendedCapability,
  type InterruptPin,
  type IoBar,
  type IoEventfdDescription,
  type MaxPayload,
  type MemoryBar,
  type MsiCapability,
  type MsiVectorCount,
  type MsixCapability,
  type PciDeviceDescription,
  type PciMigration,
  type PciExpressCapability,
  type PcieDeviceType,
  type PowerManagementCapability,
  type PowerState,
  type RegisterValue,
  type SerialNumberCapability,
  type VendorCapability,
  type VendorExtendedCapability,
} from './pci/description.js';
export { Cfg, CapabilityId, ExtendedCapabilityId } from './pci/spec.js';
export type { Delivery } from './pci/interrupts.js';
export type { DeviceIrq, IrqMode } from './pci/irq.js';
export {
  AsyncDmaRequiredError,
  DmaAccessError,
  DmaSpace,
  DmaSpaceClosedError,
  DmaViewError,
  GuestMemoryAccess,
  SharedMemory,
  DIRTY_PAGE_SIZE,
  MAX_VIEW_LENGTH,
  type DmaViewRefusal,
  type DmaWindow,
  type MapRequest,
  type MessageDma,
  type SgEntry,
  type SgList,
  type SharedRegionOptions,
} from './dma/index.js';
export type {
  VfioUserDevice,
  DeviceFactory,
  RegionDescription,
  RegionIoFd,
  DeviceAttachment,
  DeviceMigration,
  MigrationData,
  MigrationPhase,
  MigrationUnit,
} from './device.js';
export { DeviceContext } from './boundary.js';
export { ConnectionClosedError, HandlerResultError, PeerProtocolError, TimeoutError, TooManyRequestsError, UsageError, VfioUserError } from './errors.js';
export * from './virtio/index.js';
export {
  Command,
  Errno,
  IrqIndex,
  MigrationFlags,
  MigrationState,
  ProtocolError,
  Region,
  RegionInfoFlags,
  commandName,
  errnoName,
} from './protocol/index.js';
export {
  formatFinding,
  fuzzDevice,
  FuzzFinding,
  nvmeMode,
  type DeviceProfile,
  type FuzzContext,
  type FuzzMode,
  type FuzzOp,
  type FuzzOptions,
  type FuzzReport,
  type Random,
} from './fuzz/index.js';
