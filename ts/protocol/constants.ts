// Numeric constants of the vfio-user protocol (digest §3, §5, §8).
// Const objects plus derived union types; no TS enums.

export const HEADER_SIZE = 16;

/** Command numbers (§5). 14 (DIRTY_PAGES) was removed and is deliberately absent. */
export const Command = {
  VERSION: 1,
  DMA_MAP: 2,
  DMA_UNMAP: 3,
  DEVICE_GET_INFO: 4,
  DEVICE_GET_REGION_INFO: 5,
  DEVICE_GET_REGION_IO_FDS: 6,
  DEVICE_GET_IRQ_INFO: 7,
  DEVICE_SET_IRQS: 8,
  REGION_READ: 9,
  REGION_WRITE: 10,
  DMA_READ: 11,
  DMA_WRITE: 12,
  DEVICE_RESET: 13,
  REGION_WRITE_MULTI: 15,
  DEVICE_FEATURE: 16,
  MIG_DATA_READ: 17,
  MIG_DATA_WRITE: 18,
} as const;
export type Command = (typeof Command)[keyof typeof Command];

const commandNames = new Map<number, string>(
  Object.entries(Command).map(([name, n]) => [n, name]),
);

export function isKnownCommand(n: number): n is Command {
  return commandNames.has(n);
}

/** 'REGION_READ', or 'UNKNOWN(14)' for numbers that are not current commands. */
export function commandName(n: number): string {
  return commandNames.get(n) ?? `UNKNOWN(${n})`;
}

/** Header `flags` bits 0-3: message type. */
export const MessageType = { COMMAND: 0, REPLY: 1 } as const;
export type MessageType = (typeof MessageType)[keyof typeof MessageType];

/** Header `flags` bits. */
export const HeaderFlags = {
  TYPE_MASK: 0xf,
  NO_REPLY: 0x10,
  ERROR: 0x20,
} as const;

/** PCI region indexes. */
export const Region = {
  BAR0: 0,
  BAR1: 1,
  BAR2: 2,
  BAR3: 3,
  BAR4: 4,
  BAR5: 5,
  ROM: 6,
  CONFIG: 7,
  VGA: 8,
} as const;
export type Region = (typeof Region)[keyof typeof Region];
export const NUM_REGIONS = 9;

/** PCI IRQ indexes (IRQ types). */
export const IrqIndex = { INTX: 0, MSI: 1, MSIX: 2, ERR: 3, REQ: 4 } as const;
export type IrqIndex = (typeof IrqIndex)[keyof typeof IrqIndex];
export const NUM_IRQS = 5;

/** DEVICE_GET_INFO `flags`. */
export const DeviceInfoFlags = { RESET: 1 << 0, PCI: 1 << 1 } as const;

/** DEVICE_GET_REGION_INFO `flags`. */
export const RegionInfoFlags = { READ: 1 << 0, WRITE: 1 << 1, MMAP: 1 << 2, CAPS: 1 << 3 } as const;

/** Region-info capability ids. */
export const RegionCapId = { SPARSE_MMAP: 1, TYPE: 2 } as const;

/** DEVICE_GET_IRQ_INFO `flags`. */
export const IrqInfoFlags = {
  EVENTFD: 1 << 0,
  MASKABLE: 1 << 1,
  AUTOMASKED: 1 << 2,
  NORESIZE: 1 << 3,
} as const;

/** DEVICE_SET_IRQS `flags`: exactly one DATA bit and one ACTION bit. */
export const SetIrqsFlags = {
  DATA_NONE: 1 << 0,
  DATA_BOOL: 1 << 1,
  DATA_EVENTFD: 1 << 2,
  ACTION_MASK: 1 << 3,
  ACTION_UNMASK: 1 << 4,
  ACTION_TRIGGER: 1 << 5,
  DATA_TYPE_MASK: 0x07,
  ACTION_TYPE_MASK: 0x38,
} as const;

/** DMA_MAP `flags`. MMAP/FILE_IO are libvfio-user extensions (#842). */
export const DmaMapFlags = { READ: 1 << 0, WRITE: 1 << 1, MMAP: 1 << 2, FILE_IO: 1 << 3 } as const;

/** DMA_UNMAP `flags` (kernel values; rust-vmm's are one bit off). */
export const DmaUnmapFlags = { GET_DIRTY_BITMAP: 1 << 0, ALL: 1 << 1 } as const;

/** DEVICE_FEATURE `flags`. */
export const DeviceFeatureFlags = {
  MASK: 0xffff,
  GET: 1 << 16,
  SET: 1 << 17,
  PROBE: 1 << 18,
} as const;

/** DEVICE_FEATURE feature indexes (low 16 bits of `flags`). */
export const FeatureIndex = {
  MIGRATION: 1,
  MIG_DEVICE_STATE: 2,
  DMA_LOGGING_START: 6,
  DMA_LOGGING_STOP: 7,
  DMA_LOGGING_REPORT: 8,
} as const;
export type FeatureIndex = (typeof FeatureIndex)[keyof typeof FeatureIndex];

/** MIGRATION feature `flags` bits (the field is u64 on the wire: use BigInt(...) with the helpers). */
export const MigrationFlags = { STOP_COPY: 1 << 0, P2P: 1 << 1, PRE_COPY: 1 << 2 } as const;

/** Migration v2 device states (§7). */
export const MigrationState = {
  ERROR: 0,
  STOP: 1,
  RUNNING: 2,
  STOP_COPY: 3,
  RESUMING: 4,
  RUNNING_P2P: 5,
  PRE_COPY: 6,
  PRE_COPY_P2P: 7,
} as const;
export type MigrationState = (typeof MigrationState)[keyof typeof MigrationState];

/** GET_REGION_IO_FDS entry `type`. IOEVENTFD_SHADOW is a libvfio-user extension. */
export const IoFdType = { IOEVENTFD: 0, IOREGIONFD: 1, IOEVENTFD_SHADOW: 2 } as const;
export type IoFdType = (typeof IoFdType)[keyof typeof IoFdType];

/** GET_REGION_IO_FDS entry `flags` for ioeventfds (KVM values). */
export const KvmIoeventfdFlags = {
  DATAMATCH: 1 << 0,
  PIO: 1 << 1,
  DEASSIGN: 1 << 2,
  VIRTIO_CCW_NOTIFY: 1 << 3,
} as const;

/** GET_REGION_IO_FDS entry `flags` for ioregionfds. */
export const KvmIoregionFlags = { PIO: 1 << 0, POSTED_WRITES: 1 << 1 } as const;
