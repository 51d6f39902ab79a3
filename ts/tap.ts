/**
 * A host TAP interface: Ethernet frames between this process and the host's
 * own network stack, for a virtual NIC whose wire is the host
 * (examples/virtio-net `--tap`). Each packet read or written is virtio-net's
 * 12-byte header (`TAP_VNET_HEADER`) then the frame; every offload is off,
 * so the kernel sends whole frames with their checksums done and takes the
 * same. All I/O is non-blocking, on the event loop.
 */
import { brand } from './brand.js';
import { VfioUserError } from './errors.js';
import type { NativeTap } from './native-binding.js';
import { describeFailure, errnoOf, native } from './native.js';
import { Errno } from './protocol/index.js';

/** Bytes of virtio-net header (`virtio_net_hdr` with `num_buffers`) before each frame. */
export const TAP_VNET_HEADER = 12;

export type TapOperation = 'open' | 'read' | 'write' | 'mtu' | 'watch';

/** A TAP operation failed: `errno` is the kernel's (EBADF once closed). */
export class TapError extends VfioUserError {
  static {
    brand(this, 'TapError');
  }

  constructor(
    readonly errno: number,
    readonly interfaceName: string,
    readonly operation: TapOperation,
  ) {
    super(`TAP ${interfaceName}: ${operation} failed: ${describeFailure(errno)}`);
  }
}

function tapError(error: unknown, name: string, operation: TapOperation): TapError {
  return new TapError(errnoOf(error) ?? Errno.EINVAL, name, operation);
}

export class TapInterface {
  private constructor(private readonly handle: NativeTap) {}

  /**
   * Attaches to TAP interface `name` (a persistent one, `ip tuntap add dev
   * NAME mode tap [user U]`), or creates it, which needs CAP_NET_ADMIN and
   * lasts until `close()` (`tap%d` takes the first free number). Throws
   * `TapError`: EINVAL for a name Linux refuses or a TUN interface, ENOENT
   * without /dev/net/tun, EPERM without the right to it, EBUSY when another
   * process has it open.
   */
  static open(name: string): TapInterface {
    try {
      return new TapInterface(native.NativeTap.open(name));
    } catch (error) {
      throw tapError(error, name, 'open');
    }
  }

  /** The interface's name (with `%d` filled in). */
  get name(): string {
    return this.handle.name;
  }

  /** The interface's MTU now. */
  get mtu(): number {
    return this.call('mtu', () => this.handle.mtu());
  }

  /**
   * Calls `onReadable` whenever packets wait and reading is on: take them
   * with `read()` until it returns undefined, or until there is nowhere to
   * put them (then turn `reading` off). Does not keep the process alive.
   */
  watch(onReadable: () => void): void {
    this.call('watch', () => this.handle.watch(onReadable));
  }

  /** Whether `watch`'s callback runs. Off, the kernel holds what arrives (up to the interface's txqueuelen, then drops). */
  set reading(on: boolean) {
    this.handle.setReading(on);
  }

  /**
   * The next packet (header, then frame) or undefined when none waits.
   * Throws `TapError` EBADFD when the interface was deleted, EBADF once closed.
   */
  read(): Buffer | undefined {
    return this.call('read', () => this.handle.read() ?? undefined);
  }

  /**
   * Hands one packet (header, then frame) to the host without waiting: 0, or
   * the errno of a packet the host dropped (EIO while the interface is down).
   * Throws `TapError` EBADF once closed.
   */
  write(packet: Uint8Array): number {
    return this.call('write', () => this.handle.write(packet));
  }

  /** Stops watching and closes the fd; an interface `open` created goes away. Idempotent. */
  close(): void {
    this.handle.close();
  }

  private call<T>(operation: TapOperation, f: () => T): T {
    try {
      return f();
    } catch (error) {
      throw tapError(error, this.name, operation);
    }
  }
}
