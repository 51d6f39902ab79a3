/**
 * `EventfdIrq`: the VMM's end of one interrupt vector. It owns an eventfd the
 * client hands to the server with SET_IRQS; the server signals it to
 * interrupt. Listening for 'interrupt' watches it on the event loop (no
 * polling); without listeners the signals add up in the counter for `take()`.
 */
import { EventEmitter } from 'node:events';
import { native } from '../native.js';
import { UsageError } from '../errors.js';

export interface EventfdIrqEvents {
  /** The server signalled; `count` is how many signals arrived since the last read (at least 1). */
  interrupt: [count: number];
}

export class EventfdIrq extends EventEmitter<EventfdIrqEvents> {
  private readonly eventfd = new native.NativeEventfd();

  constructor() {
    super();
    // Watched only while someone listens, so `take()` never races the loop for the counter.
    // (The typed emitter does not list Node's own listener events, hence the untyped view.)
    const emitter = this as unknown as EventEmitter;
    emitter.on('newListener', (event) => {
      if (event === 'interrupt' && this.listenerCount('interrupt') === 0 && !this.closed) {
        this.eventfd.watch((count) => this.emit('interrupt', count));
      }
    });
    emitter.on('removeListener', (event) => {
      if (event === 'interrupt' && this.listenerCount('interrupt') === 0) this.eventfd.unwatch();
    });
  }

  /** The eventfd's number, for SET_IRQS; the server gets a copy, this object keeps its own. */
  get fd(): number {
    const fd = this.eventfd.fd;
    if (fd < 0) throw new UsageError('the EventfdIrq is closed');
    return fd;
  }

  get closed(): boolean {
    return this.eventfd.fd < 0;
  }

  /** Reads and clears the counter: how many signals arrived since the last read (0: none). */
  take(): number {
    if (this.closed) throw new UsageError('the EventfdIrq is closed');
    return this.eventfd.take();
  }

  /**
   * The next interrupt after this call: resolves with its count. Signals that
   * arrived while nobody listened are still in the counter and count too.
   */
  next(): Promise<number> {
    return new Promise((resolve) => this.once('interrupt', resolve));
  }

  /** Stops watching and closes the eventfd; the server's copy stays open until it lets go. */
  close(): void {
    this.eventfd.close();
    this.removeAllListeners('interrupt');
  }
}
