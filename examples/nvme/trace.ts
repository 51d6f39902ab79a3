/**
 * Where a command's time goes: for each command, the microseconds from the
 * moment its doorbell was seen to each stage: the batch of doorbells that
 * brought it delivered to JS ("seen": the doorbell's way from native
 * detection to JS), entry fetched, I/O submitted (the command handed to the
 * store), I/O done, completion posted (staged: a batch's entries are
 * written to the CQ together, just before its interrupt), interrupt
 * signalled. A doorbell found in watched memory (a mapped page, a shadow
 * page) is seen when native code finds it (`DoorbellSource#lastBatchSeenAt`);
 * a trapped write or a kick is seen as it is delivered, so its times start
 * at delivery and it has no "seen" figure (NaN). `DEBUG=vfio-user:nvme` prints one line per command to
 * stderr; `npm run bench` collects the figures instead (`samples`).
 */
import { debugRequested } from 'vfio-user';

export const STAGES = ['seen', 'fetched', 'submitted', 'done', 'posted', 'interrupted'] as const;
export type Stage = (typeof STAGES)[number];

/** The DEBUG name that turns the per-command trace on. */
export const TRACE_NAME = 'vfio-user:nvme';

interface Traced {
  sq: number;
  cid: number;
  opcode: number;
  /** performance.now() of the moment the command's doorbell was seen. */
  start: number;
  times: Partial<Record<Stage, number>>;
}

/** Samples kept per stage: enough for percentiles, bounded for a long run. */
const MAX_SAMPLES = 1 << 18;

export class CommandTrace {
  /** Microseconds from the doorbell seen, per stage, for every command traced (NaN: a stage not measured). */
  readonly samples: Record<Stage, number[]> = { seen: [], fetched: [], submitted: [], done: [], posted: [], interrupted: [] };
  /** performance.now() of the moment the current batch's doorbell was seen. */
  private start = 0;
  /** Microseconds the current batch took from native detection to JS (NaN: seen on delivery). */
  private seen = NaN;
  /** Commands fetched and not yet posted, by SQ and command ID. */
  private readonly running = new Map<number, Traced>();
  /** Posted completions waiting for their CQ's interrupt, by CQ. */
  private readonly waiting = new Map<number, Traced[]>();

  constructor(private readonly print?: (line: string) => void) {}

  /** A trace that prints, when DEBUG asks for it; otherwise none. */
  static fromEnvironment(): CommandTrace | undefined {
    return debugRequested(process.env.DEBUG, TRACE_NAME) ? new CommandTrace((line) => process.stderr.write(`${line}\n`)) : undefined;
  }

  /**
   * A batch of doorbells reached the controller, first seen natively at
   * `seenAt` (performance.now() time); NaN for a batch seen on delivery, or
   * when the controller goes on with queues it held.
   */
  batch(seenAt = NaN): void {
    const now = performance.now();
    this.start = Number.isFinite(seenAt) ? seenAt : now;
    this.seen = Number.isFinite(seenAt) ? (now - seenAt) * 1000 : NaN;
  }

  fetched(sq: number, cid: number, opcode: number): void {
    // A host may reuse an ID whose command it gave up on: the newest counts.
    this.running.set(key(sq, cid), { sq, cid, opcode, start: this.start, times: { seen: this.seen, fetched: (performance.now() - this.start) * 1000 } });
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
      const stages = STAGES.filter((stage) => Number.isFinite(c.times[stage]));
      const from = Number.isFinite(c.times.seen) ? 'its doorbell seen' : 'its doorbell batch reaching JS';
      this.print?.(`${TRACE_NAME}: sq ${c.sq} cid ${c.cid} opcode 0x${c.opcode.toString(16)}: ${stages.map((stage) => `${stage} +${c.times[stage]!.toFixed(1)}`).join(', ')} µs from ${from}`);
    }
  }

  private mark(c: Traced | undefined, stage: Stage): void {
    if (c) c.times[stage] = (performance.now() - c.start) * 1000;
  }
}

function key(sq: number, cid: number): number {
  return sq * 0x10000 + cid;
}
