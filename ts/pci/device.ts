/**
 * A PCI device declared in TypeScript: IDs, BARs, expansion ROM,
 * capabilities, interrupts. The library emulates what a guest's PCI core
 * touches (the type-0 header, BAR and ROM sizing, PM, MSI, MSI-X with its
 * table and PBA, PCIe with FLR, extended capabilities); device code handles
 * BAR accesses through the description's handlers, resets its own state in
 * `onReset`, and raises interrupts with `irq.raise()`.
 *
 * This class is what device code sees and may subclass: the protocol side
 * (the VfioUserDevice a session serves) lives in a PciFunction it keeps to
 * itself, so no member a subclass defines can replace the library's answers.
 */
import { UsageError } from '../errors.js';
import { deviceContract, type VfioUserDevice } from '../device.js';
import type { DmaSpace } from '../dma/space.js';
import type { DeviceContext } from '../boundary.js';
import type { PciBar } from './bars.js';
import type { BarIndex, PciDeviceDescription, PowerState } from './description.js';
import { PciFunction } from './function.js';
import type { DeviceIrq } from './irq.js';

export class PciDevice {
  readonly #function: PciFunction;
  /**
   * Not a hook: the library resets config space, BARs and interrupts itself
   * and then calls the description's `onReset`, the place for device code's
   * own reset. Declared so that a subclass's `reset()` is a type error.
   */
  protected declare readonly reset?: never;

  constructor(description: PciDeviceDescription) {
    // A subclass's reset() would never be called: say so instead of ignoring it (plain JS has no type check).
    if ('reset' in this) {
      throw new UsageError(`${new.target.name} defines reset(): put device code's reset in the description's onReset hook`);
    }
    this.#function = new PciFunction(description);
  }

  /** The protocol side, for the session. @internal */
  get [deviceContract](): VfioUserDevice {
    return this.#function;
  }

  /**
   * The device's own work, scheduled under the error boundary:
   * `context.setTimeout()`, `setInterval()`, `setImmediate()`, `run()`
   * (docs/errors.md). What throws there fails the device, not the process.
   */
  get context(): DeviceContext {
    return this.#function.context;
  }

  /** Raising interrupts from device code. */
  get irq(): DeviceIrq {
    return this.#function.irq;
  }

  /**
   * BAR `index` for device code: its memory (`bytes`, shared with the
   * client's mappings for a shared BAR) and its ioeventfds.
   */
  bar(index: BarIndex): PciBar {
    return this.#function.bar(index);
  }

  /**
   * Runs the description's `onClose`, then frees what the device allocated:
   * its BARs' ioeventfds and the memfds of `shared: true` BARs (a
   * SharedMemory passed in stays the caller's). Call it once the device is no
   * longer served (`vfio-user serve` does on SIGTERM and SIGINT): a session
   * answers reads of a shared BAR natively from its memory. Idempotent.
   */
  close(): void {
    this.#function.close();
  }

  /**
   * Guest memory of the attached client (throws when none is attached). Code
   * serving a request gets its own client's memory even after that client
   * left: closed, so every access throws DmaSpaceClosedError.
   */
  get dma(): DmaSpace {
    return this.#function.dma;
  }

  /** Whether a client is attached. */
  get attached(): boolean {
    return this.#function.attached;
  }

  /** Why the device does not migrate (undefined when it does; docs/pci-model.md, "Migration"). */
  get migrationBlocker(): string | undefined {
    return this.#function.migrationBlocker;
  }

  // ---- state the guest controls, for device code ----

  /** Command register I/O Space decode bit. The VMM maps I/O BARs only while it is set. */
  get ioEnabled(): boolean {
    return this.#function.ioEnabled;
  }

  /** Command register Memory Space decode bit. The VMM maps memory BARs only while it is set. */
  get memoryEnabled(): boolean {
    return this.#function.memoryEnabled;
  }

  /** Bus Master Enable: without it the device must not DMA, and MSI/MSI-X are dropped. */
  get busMaster(): boolean {
    return this.#function.busMaster;
  }

  /**
   * Stopped for migration (STOP, STOP_COPY, RESUMING): interrupts are held
   * pending, and device code must not DMA or change state on its own.
   */
  get stopped(): boolean {
    return this.#function.stopped;
  }

  /** PMCSR power state; D0 for a device without a PM capability. */
  get powerState(): PowerState {
    return this.#function.powerState;
  }
}

/** The PCI function behind `device`: config space, interrupt lines, the contract. @internal */
export function pciFunction(device: PciDevice): PciFunction {
  return device[deviceContract] as PciFunction;
}
