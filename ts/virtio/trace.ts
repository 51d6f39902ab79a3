/**
 * Where a queue's time goes, under `DEBUG=vfio-user:virtio`: one line per
 * notification, with how long it came after the queue's last interrupt (the
 * driver's side: the guest, the VMM and the way back to this process), and
 * one per interrupt, with how long it came after the notification it
 * answers (the device's side: chains taken, served and published). At depth
 * 1 the two add up to a request's whole cycle. A notification found in
 * watched memory counts from when native code found it
 * (`DoorbellSource#lastBatchSeenAt`), a trapped one from its delivery.
 */
import { debugRequested } from '../debug.js';

/** The DEBUG name that turns the trace on. */
export const TRACE_NAME = 'vfio-user:virtio';

export class QueueTrace {
  private readonly notifiedAt: number[];
  private readonly interruptedAt: number[];

  constructor(queues: number, private readonly print: (line: string) => void) {
    this.notifiedAt = new Array<number>(queues).fill(Number.NaN);
    this.interruptedAt = new Array<number>(queues).fill(Number.NaN);
  }

  /** A trace that prints to stderr when DEBUG asks for it; otherwise none. */
  static fromEnvironment(queues: number): QueueTrace | undefined {
    return debugRequested(process.env.DEBUG, TRACE_NAME) ? new QueueTrace(queues, (line) => process.stderr.write(`${line}\n`)) : undefined;
  }

  /** Queue `queue` was notified; `seenAt` is when the notification was found (performance.now() time), NaN for now. */
  notified(queue: number, seenAt: number): void {
    const at = Number.isFinite(seenAt) ? seenAt : performance.now();
    this.notifiedAt[queue] = at;
    this.print(`virtio q${queue} notified: ${micros(at - this.interruptedAt[queue])} us after its last interrupt`);
  }

  /** Queue `queue`'s vector is signalled. */
  interrupted(queue: number): void {
    const at = performance.now();
    this.interruptedAt[queue] = at;
    this.print(`virtio q${queue} interrupt: ${micros(at - this.notifiedAt[queue])} us after its last notification`);
  }
}

function micros(ms: number): string {
  return Number.isFinite(ms) ? (ms * 1000).toFixed(1) : 'NaN';
}
