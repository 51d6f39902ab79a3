/**
 * Virtio 1.2 numbers the transport and the rings use (OASIS virtio v1.2,
 * sections 2 and 4.1), named once here.
 */

/** Device status bits (§2.1). */
export const Status = {
  ACKNOWLEDGE: 1,
  DRIVER: 2,
  DRIVER_OK: 4,
  FEATURES_OK: 8,
  NEEDS_RESET: 0x40,
  FAILED: 0x80,
} as const;

/** Reserved feature bits the kit implements (§6); device types use bits 0-23. */
export const Feature = {
  RING_INDIRECT_DESC: 28,
  RING_EVENT_IDX: 29,
  VERSION_1: 32,
  ACCESS_PLATFORM: 33,
  RING_PACKED: 34,
  /** The driver's notifications carry the queue index and where its ring stands (§2.9). */
  NOTIFICATION_DATA: 38,
  RING_RESET: 40,
} as const;

/** Device types (§5) of the examples; any 1-63 works with the kit. */
export const VirtioDeviceType = {
  NET: 1,
  BLOCK: 2,
  CONSOLE: 3,
  ENTROPY: 4,
} as const;

/** `bit` as a feature mask. */
export const featureBit = (bit: number): bigint => 1n << BigInt(bit);

/** Virtio's PCI identity (§4.1.2): modern-only devices are 0x1040 + device type. */
export const VIRTIO_PCI_VENDOR = 0x1af4;
export const VIRTIO_PCI_DEVICE_BASE = 0x1040;

/** `cfg_type` of the vendor-specific capabilities (§4.1.4). */
export const CapType = {
  COMMON: 1,
  NOTIFY: 2,
  ISR: 3,
  DEVICE: 4,
  PCI: 5,
} as const;

/**
 * Offsets in a `virtio_pci_cap` counted from the capability's ID byte: the
 * PCI model owns ID, next and length; the rest is ours.
 */
export const Cap = {
  CFG_TYPE: 3,
  BAR: 4,
  ID: 5,
  OFFSET: 8,
  LENGTH: 12,
  /** notify_off_multiplier (NOTIFY) or pci_cfg_data (PCI). */
  EXTRA: 16,
  SIZE: 16,
  EXTENDED_SIZE: 20,
} as const;

/** `virtio_pci_common_cfg` (§4.1.4.3). */
export const Common = {
  DEVICE_FEATURE_SELECT: 0x00,
  DEVICE_FEATURE: 0x04,
  DRIVER_FEATURE_SELECT: 0x08,
  DRIVER_FEATURE: 0x0c,
  CONFIG_MSIX_VECTOR: 0x10,
  NUM_QUEUES: 0x12,
  DEVICE_STATUS: 0x14,
  CONFIG_GENERATION: 0x15,
  QUEUE_SELECT: 0x16,
  QUEUE_SIZE: 0x18,
  QUEUE_MSIX_VECTOR: 0x1a,
  QUEUE_ENABLE: 0x1c,
  QUEUE_NOTIFY_OFF: 0x1e,
  QUEUE_DESC: 0x20,
  QUEUE_DRIVER: 0x28,
  QUEUE_DEVICE: 0x30,
  QUEUE_NOTIFY_DATA: 0x38,
  QUEUE_RESET: 0x3a,
  SIZE: 0x3c,
} as const;

/** "No MSI-X vector" in config_msix_vector and queue_msix_vector. */
export const NO_VECTOR = 0xffff;

/** ISR status bits (§4.1.4.5). */
export const Isr = { QUEUE: 1, CONFIG: 2 } as const;

/** Split virtqueue layout (§2.7). */
export const Desc = {
  SIZE: 16,
  ADDR: 0,
  LEN: 8,
  FLAGS: 12,
  NEXT: 14,
  F_NEXT: 1,
  F_WRITE: 2,
  F_INDIRECT: 4,
} as const;

export const Ring = {
  FLAGS: 0,
  IDX: 2,
  /** avail: ring[] of u16 heads; used: ring[] of { u32 id, u32 len }. */
  ENTRIES: 4,
  USED_ELEM_SIZE: 8,
  /** avail.flags: the driver wants no interrupt. */
  AVAIL_NO_INTERRUPT: 1,
  /** used.flags: the device wants no notification. */
  USED_NO_NOTIFY: 1,
} as const;

/** Largest split queue (§2.7: Queue Size is at most 32768). */
export const MAX_QUEUE_SIZE = 32768;

/** Packed virtqueue layout (§2.8): descriptors share Desc's flags and size; `id` replaces `next`. */
export const PackedDesc = {
  ID: 12,
  FLAGS: 14,
  /** Set to the writer's wrap counter: AVAIL by the driver making a descriptor available (USED the inverse), both by the device using it. */
  F_AVAIL: 1 << 7,
  F_USED: 1 << 15,
} as const;

/** `pvirtq_event_suppress` (§2.8.10): the driver area is the driver's, the device area the device's. */
export const EventSuppress = {
  /** le16: descriptor offset in bits 0-14, wrap counter in bit 15. */
  OFF_WRAP: 0,
  FLAGS: 2,
  SIZE: 4,
  ENABLE: 0,
  DISABLE: 1,
  /** Notify for the descriptor at OFF_WRAP only (with RING_EVENT_IDX). */
  DESC: 2,
  WRAP: 1 << 15,
} as const;
