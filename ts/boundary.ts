/**
 * The error boundary around device code. Everything the library calls in a
 * device (region and config handlers, resets, migration hooks, interrupt
 * and ioeventfd notifications) and everything device code schedules through
 * its `DeviceContext` (timers, immediates, async work) runs under it: an
 * exception there fails the device instead of the process. A failed device
 * is reported (`deviceError` on the server), its scheduled work is dropped,
 * its client gets EIO for what would reach device code until a DEVICE_RESET
 * succeeds, and the next client finds it reset (docs/errors.md).
 */
import type { VfioUserDevice } from './device.js';

/** Told of each failure: the error device code threw, and the command it was serving, if any. */
export type DeviceFailureListener = (error: Error, command: number | undefined) => void;

/**
 * Device code's way to run later without risking the process: Node's timer
 * functions, whose callbacks run under the boundary. The handles are Node's
 * own (`unref()`, `refresh()`, the global `clearTimeout()` all work). Once the
 * device fails, what it scheduled before is dropped: intervals stop, pending
 * callbacks do not run.
 */
export class DeviceContext {
  private failure: Error | undefined;
  /** Bumped by each failure: callbacks scheduled before it belong to a device state that is gone. */
  private generation = 0;
  private readonly listeners = new Set<DeviceFailureListener>();

  /** Whether device code threw since the last successful reset. */
  get failed(): boolean {
    return this.failure !== undefined;
  }

  setTimeout<A extends unknown[]>(callback: (...args: A) => unknown, ms?: number, ...args: A): NodeJS.Timeout {
    const generation = this.generation;
    return setTimeout(() => this.runFrom(generation, callback, args), ms);
  }

  setInterval<A extends unknown[]>(callback: (...args: A) => unknown, ms?: number, ...args: A): NodeJS.Timeout {
    const generation = this.generation;
    const interval: NodeJS.Timeout = setInterval(() => {
      if (generation !== this.generation) clearInterval(interval);
      else this.runFrom(generation, callback, args);
    }, ms);
    return interval;
  }

  setImmediate<A extends unknown[]>(callback: (...args: A) => unknown, ...args: A): NodeJS.Immediate {
    const generation = this.generation;
    return setImmediate(() => this.runFrom(generation, callback, args));
  }

  /**
   * Runs `callback` now under the boundary: a throw, or the rejection of
   * the promise it returns (async work), fails the device. For work that
   * starts from somewhere the library does not call, such as a promise chain
   * of the device's own.
   */
  run<A extends unknown[]>(callback: (...args: A) => unknown, ...args: A): void {
    this.runFrom(this.generation, callback, args);
  }

  private runFrom<A extends unknown[]>(generation: number, callback: (...args: A) => unknown, args: A): void {
    if (generation !== this.generation || this.failure) return;
    try {
      const result = callback(...args);
      if (isThenable(result)) result.then(undefined, (error: unknown) => this.fail(error));
    } catch (error) {
      this.fail(error);
    }
  }

  /**
   * Device code threw (`command`: the command it was serving). Reported to
   * every listener; the device stays failed until `recover()`.
   * @internal
   */
  fail(thrown: unknown, command?: number): void {
    const error = thrown instanceof Error ? thrown : new Error(`device code threw a non-Error: ${String(thrown)}`);
    const first = this.failure === undefined;
    this.failure ??= error;
    if (first) this.generation++;
    for (const listener of this.listeners) listener(error, command);
  }

  /**
   * Runs `reset`, the device's reset: when it succeeds, a failure is
   * cleared; when it throws, the caller reports it (the device stays failed).
   * @internal
   */
  async recover(reset: () => Promise<void>): Promise<void> {
    await reset();
    this.failure = undefined;
  }

  /** Listens for failures; returns the function that stops listening. @internal */
  onFailure(listener: DeviceFailureListener): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }
}

function isThenable(value: unknown): value is PromiseLike<unknown> {
  return typeof value === 'object' && value !== null && typeof (value as PromiseLike<unknown>).then === 'function';
}

/** Contexts of devices that bring none (a device that schedules no work of its own needs none). */
const contexts = new WeakMap<VfioUserDevice, DeviceContext>();

/** The device's context: its own, or one the library keeps for it. @internal */
export function contextOf(device: VfioUserDevice): DeviceContext {
  if (device.context) return device.context;
  let context = contexts.get(device);
  if (!context) contexts.set(device, (context = new DeviceContext()));
  return context;
}
