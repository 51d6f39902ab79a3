/**
 * Per-BAR ioeventfds: eventfds the device creates and offers through
 * GET_REGION_IO_FDS, so a VMM can have KVM signal them on guest writes
 * instead of forwarding the writes over the socket.
 */
import { EventEmitter } from 'node:events';
import { native } from '../native.js';
import { ioeventfdMatches, KvmIoeventfdFlags } from '../protocol/index.js';
import { requestAttachment, type RegionIoFd } from '../device.js';
import type { DeviceContext } from '../boundary.js';
import { InvalidDeviceError, type BarArea, type IoEventfdDescription } from './description.js';

const SIZES: readonly number[] = [0, 1, 2, 4, 8];

/** Checks one BAR's ioeventfds against its size and its mappable areas (where writes never trap). */
export function checkIoEventfds(list: unknown, field: string, barSize: number, mappable: readonly BarArea[]): void {
  if (list === undefined) return;
  if (!Array.isArray(list)) throw new InvalidDeviceError(field, 'must be an array');
  // KVM refuses a second ioeventfd for the same address, length and match.
  const seen = new Map<string, number>();
  list.forEach((e: IoEventfdDescription, i) => {
    const at = `${field}[${i}]`;
    if (!SIZES.includes(e.size)) throw new InvalidDeviceError(`${at}.size`, `${String(e.size)} is not one of ${SIZES.join(', ')}`);
    const span = Math.max(e.size, 1);
    if (!Number.isInteger(e.offset) || e.offset < 0 || e.offset + span > barSize) {
      throw new InvalidDeviceError(`${at}.offset`, `${e.offset} is not inside the ${barSize}-byte BAR`);
    }
    const area = mappable.findIndex((a) => e.offset < a.offset + a.size && a.offset < e.offset + span);
    if (area >= 0) throw new InvalidDeviceError(`${at}.offset`, `inside mappable area ${area}: stores there never trap, so nothing would signal`);
    const match = datamatchOf(e, at);
    const key = `${e.offset}/${e.size}/${match ?? '*'}`;
    const first = seen.get(key);
    if (first !== undefined) throw new InvalidDeviceError(at, `repeats ${field}[${first}]`);
    seen.set(key, i);
  });
}

/** The checked `datamatch` as a bigint; KVM only compares values of a known width. */
function datamatchOf(e: IoEventfdDescription, at: string): bigint | undefined {
  if (e.datamatch === undefined) return undefined;
  if (e.size === 0) throw new InvalidDeviceError(`${at}.datamatch`, 'needs a size of 1, 2, 4 or 8');
  const value = typeof e.datamatch === 'bigint' ? e.datamatch : Number.isSafeInteger(e.datamatch) ? BigInt(e.datamatch) : -1n;
  if (value < 0n || value >= 1n << BigInt(8 * e.size)) {
    throw new InvalidDeviceError(`${at}.datamatch`, `${String(e.datamatch)} is not an unsigned ${8 * e.size}-bit integer`);
  }
  return value;
}

export interface IoEventfdEvents {
  /** Matching writes happened: `count` of them since the counter was last read (which this clears). */
  signal: [count: number];
}

/**
 * An ioeventfd of a BAR, owned by the device (closed by `PciDevice.close()`).
 * Listen for `'signal'` to be woken on this thread's event loop when it is
 * signalled (nothing runs while it is quiet); `take()` reads the counter
 * without waiting. While a listener is attached the event consumes the
 * counter. The library pauses the events while the device is stopped for
 * migration, so kicks stay in the counter and travel with the device state.
 */
export class IoEventfd extends EventEmitter<IoEventfdEvents> {
  readonly offset: number;
  readonly size: number;
  readonly datamatch: bigint | undefined;
  /** Watched on the loop only while someone listens and the device runs; never keeps the process alive. */
  private readonly eventfd = new native.NativeEventfd();
  private watching = false;
  private paused = false;

  constructor(
    description: IoEventfdDescription,
    /** A BAR's ioeventfd runs its listeners under the device's error boundary: one that throws fails the device, not the process. */
    private readonly context?: DeviceContext,
  ) {
    super();
    this.offset = description.offset;
    this.size = description.size;
    this.datamatch = description.datamatch === undefined ? undefined : BigInt(description.datamatch);
    this.eventfd.setKeepAlive(false);
    // Node's own events, which the typed map leaves out; 'newListener' comes
    // before the listener is added: count it.
    const emitter = this as EventEmitter;
    emitter.on('newListener', (event: string | symbol) => {
      if (event === 'signal') this.rewatch(1);
    });
    emitter.on('removeListener', (event: string | symbol) => {
      if (event === 'signal') this.rewatch();
    });
  }

  /** The eventfd (owned by this object; GET_REGION_IO_FDS sends dups). */
  get fd(): number {
    return this.eventfd.fd;
  }

  /** Reads and clears the counter: how many matching writes happened since the last take (0: none). */
  take(): number {
    return this.eventfd.take();
  }

  /** Stops `'signal'` events (the counter keeps counting) until `resume()`. */
  pause(): void {
    this.paused = true;
    this.rewatch();
  }

  resume(): void {
    this.paused = false;
    this.rewatch();
  }

  private rewatch(adding = 0): void {
    const wanted = !this.paused && this.eventfd.fd >= 0 && this.listenerCount('signal') + adding > 0;
    // The watch outlives whichever request (re)starts it (a migration's resume, a reset): its
    // signals must not run in that client's context, or device code would see that client's
    // guest memory, closed once it leaves, instead of the one attached when they come.
    if (wanted && !this.watching) {
      const signal = (count: number) => this.emit('signal', count);
      requestAttachment.exit(() => this.eventfd.watch((count) => (this.context ? this.context.run(signal, count) : signal(count))));
    }
    else if (!wanted && this.watching) this.eventfd.unwatch();
    this.watching = wanted;
  }

  /** Whether KVM would have turned this write into a signal. */
  matches(offset: number, data: Buffer): boolean {
    return ioeventfdMatches(this.offset, this.size, this.datamatch, offset, data);
  }

  signal(): void {
    this.eventfd.signal();
  }

  /** The GET_REGION_IO_FDS entry; `pio` for an I/O BAR (KVM registers those on the port bus). */
  entry(pio: boolean): RegionIoFd {
    const flags = (this.datamatch === undefined ? 0 : KvmIoeventfdFlags.DATAMATCH) | (pio ? KvmIoeventfdFlags.PIO : 0);
    return { offset: BigInt(this.offset), size: BigInt(this.size), fd: this.fd, flags, datamatch: this.datamatch };
  }

  close(): void {
    this.eventfd.close();
    this.watching = false;
  }
}
