/**
 * Interrupt coalescing as the host sets it (Set Features 0x08, NVMe 1.4
 * §5.21.1.8): a vector's interrupt is held until THR + 1 completions were
 * posted for it, or TIME x 100 µs passed since the first of them, whichever
 * comes first. TIME 0 is no delay, so coalescing is off by default (and
 * Linux never sets it; `nvme set-feature -f 8 -v ...` does). The controller
 * decides which vectors may be coalesced at all: not the admin queue's,
 * nor one whose Interrupt Vector Configuration sets Coalescing Disable.
 *
 * A held interrupt is never lost: its timer runs under the device's error
 * boundary; a change of the settings, and a migration's stop, send held
 * interrupts at once; only when the host has consumed every completion on
 * the vector (its CQ head doorbells) is a held one dropped, since it would
 * announce nothing.
 */
import type { DeviceContext } from 'vfio-user';

/** Aggregation Time is in units of 100 µs. */
const TIME_UNIT_MS = 0.1;

/** THR (bits 7:0, 0's based) and TIME (bits 15:8) of Set Features 0x08's dword 11. */
function coalescingSettings(value: number): { threshold: number; timeMs: number } {
  return { threshold: (value & 0xff) + 1, timeMs: ((value >>> 8) & 0xff) * TIME_UNIT_MS };
}

export class InterruptCoalescing {
  /** Completions posted per vector since its last interrupt, while that interrupt is held (0: none held). */
  private readonly held: number[] = [];
  /** Per vector with a held interrupt: what stops its timer. */
  private readonly timers: ((() => void) | undefined)[] = [];

  constructor(
    /** The device's error boundary: timers run under it. */
    private readonly context: DeviceContext,
    /** Signals `vector` (in whatever interrupt mode the host chose). */
    private readonly signal: (vector: number) => void,
  ) {}

  /**
   * `n` completions were posted for `vector`; `setting` is Set Features
   * 0x08's value, or 0 where the vector is not coalesced. Signals now, or
   * holds the interrupt.
   */
  completed(vector: number, n: number, setting: number): void {
    // TIME 0: no delay (coalescing off, the reset value).
    if ((setting & 0xff00) === 0) return this.release(vector);
    const { threshold, timeMs } = coalescingSettings(setting);
    const count = (this.held[vector] ?? 0) + n;
    if (count >= threshold) return this.release(vector);
    this.held[vector] = count;
    if (this.timers[vector] !== undefined) return;
    // Node's timers count whole milliseconds: a shorter time ends at the next turn of the event loop
    // (completions that arrived together are posted by then).
    if (timeMs < 1) {
      const immediate = this.context.setImmediate(() => this.expired(vector));
      this.timers[vector] = () => clearImmediate(immediate);
    } else {
      const timeout = this.context.setTimeout(() => this.expired(vector), Math.floor(timeMs));
      this.timers[vector] = () => clearTimeout(timeout);
    }
  }

  /** Whether `vector`'s interrupt is being held. */
  holds(vector: number): boolean {
    return (this.held[vector] ?? 0) > 0;
  }

  /** The host consumed every completion on `vector`: a held interrupt would announce nothing. */
  drained(vector: number): void {
    this.cancel(vector);
  }

  /** Signals every held interrupt now (the settings changed, or the device stops for migration). */
  releaseAll(): void {
    this.held.forEach((count, vector) => {
      if (count > 0) this.release(vector);
    });
  }

  /** Drops every held interrupt (a controller reset: no queue is left). */
  reset(): void {
    this.held.forEach((_, vector) => this.cancel(vector));
  }

  private expired(vector: number): void {
    this.timers[vector] = undefined;
    if (this.holds(vector)) this.release(vector);
  }

  private release(vector: number): void {
    this.cancel(vector);
    this.signal(vector);
  }

  private cancel(vector: number): void {
    this.held[vector] = 0;
    const stop = this.timers[vector];
    this.timers[vector] = undefined;
    stop?.();
  }
}
