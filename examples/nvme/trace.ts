/**
 * Where a command's time goes: for each command, the microseconds from the
 * batch of doorbells that brought it (delivered to JS) to each stage: entry
 * fetched, I/O submitted (the command handed to the store), I/O done,
 * completion posted, interrupt signalled. `DEBUG=vfio-user:nvme` prints one
 * line per command to stderr; `npm run bench` collects the figures instead
 * (`samples`).
 */
import { debugRequested } from 'vfio-user';

export const STAGES = ['fetched', 'submitted', 'done', 'posted', 'interrupted'] as const;
export type Stage = (typeof STAGES)[number];

/** The DEBUG name that turns the per-command trace on. */
export const TRACE_NAME = 'vfio-user:nvme';

interface Traced {
  sq: number;
  cid: number;
  opcode: number;
  /** performance.now() of the command's doorbell batch. */
  start: number;
  times: Partial<Record<Stage, number>>;
}

/** Samples kept per stage: enough for percentiles, bounded for a long run. */
const MAX_SAMPLES = 1 << 18;

export class CommandTrace {
  /** Microseconds from the doorbell batch, per stage, for every command traced. */
  readonly samples: Record<Stage, number[]> = { fetched: [], submitted: [], done: [], posted: [], interrupted: [] };
  private start = 0;
  /** Commands fetched and not yet posted, by SQ and command ID. */
  private readonly running = new Map<number, Traced>();
  /** Posted completions waiting for their CQ's interrupt, by CQ. */
  private readonly waiting = new Map<number, Traced[]>();

  constructor(private readonly print?: (line: string) => void) {}

  /** A trace that prints, when DEBUG asks for it; otherwise none. */
  static fromEnvironment(): CommandTrace | undefined {
    return debugRequested(process.env.DEBUG, TRACE_NAME) ? new CommandTrace((line) => process.stderr.write(`${line}\n`)) : undefined;
  }

  /** A batch of doorbells reached the controller (or it went on with queues it held). */
  batch(): void {
    this.start = performance.now();
  }

  fetched(sq: number, cid: number, opcode: number): void {
    // A host may reuse an ID whose command it gave up on: the newest counts.
    this.running.set(key(sq, cid), { sq, cid, opcode, start: this.start, times: { fetched: (performance.now() - this.start) * 1000 } });
  }

  submitted(sq: number, cid: number): void {
    this.mark(this.running.get(key(sq, cid)), 'submitted');
  }

  done(sq: number, cid: number): void {
    this.mark(this.running.get(key(sq, cid)), 'done');
  }

  /** The completion of `cid` on SQ `sq` was posted to CQ `cq` (one the trace did not see fetched is not counted). */
  posted(cq: number, sq: number, cid: number): void {
    const c = this.running.get(key(sq, cid));
    if (!c) return;
    this.running.delete(key(sq, cid));
    this.mark(c, 'posted');
    const list = this.waiting.get(cq);
    if (list) list.push(c);
    else this.waiting.set(cq, [c]);
  }

  /** CQ `cq`'s interrupt was signalled (or it has none): its posted commands are done. */
  interrupted(cq: number): void {
    const list = this.waiting.get(cq);
    if (!list) return;
    this.waiting.delete(cq);
    for (const c of list) {
      this.mark(c, 'interrupted');
      for (const stage of STAGES) {
        const s = this.samples[stage];
        if (s.length < MAX_SAMPLES) s.push(c.times[stage] ?? NaN);
      }
      this.print?.(`${TRACE_NAME}: sq ${c.sq} cid ${c.cid} opcode 0x${c.opcode.toString(16)}: ${STAGES.map((stage) => `${stage} +${(c.times[stage] ?? NaN).toFixed(1)}`).join(', ')} µs from its doorbell batch`);
    }
  }

  private mark(c: Traced | undefined, stage: Stage): void {
    if (c) c.times[stage] = (performance.now() - c.start) * 1000;
  }
}

function key(sq: number, cid: number): number {
  return sq * 0x10000 + cid;
}
