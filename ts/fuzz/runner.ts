/**
 * The fuzz runner: connects to a served device, learns its profile, then
 * performs a seeded sequence of operations drawn from its modes, checking
 * after each that the device answered within the deadline, raised no device
 * error and that its process lives, and at quiet points that its fds and
 * memory stay put. On a finding it shrinks the sequence by replays against
 * fresh devices (the failing operation alone first, then delta debugging)
 * and reports the seed and the shortest sequence that still fails.
 */
import { setImmediate as nextTurn, setTimeout as sleep } from 'node:timers/promises';
import { connect, GuestMemory, type VfioUserClient } from '../client/client.js';
import { EventfdIrq } from '../client/eventfd-irq.js';
import { ConnectionClosedError, TimeoutError, UsageError } from '../errors.js';
import { Cfg, Command as PciCommand } from '../pci/spec.js';
import { commandName, Errno, errnoName, MigrationState, ProtocolError, Region } from '../protocol/index.js';
import { FuzzFinding, GUEST_MEMORY, type DeviceProfile, type FindingKind, type FuzzContext, type FuzzMode, type FuzzOp } from './mode.js';
import { pciMode } from './modes/pci.js';
import { profileDevice } from './profile.js';
import { Random } from './random.js';
import { processHealth, type FuzzTarget, type TargetInstance } from './targets.js';

export interface FuzzOptions {
  /** The seed (a 32-bit unsigned integer); the same seed and device give the same operations. */
  seed?: number;
  /** Operations to perform (10000 by default). */
  ops?: number;
  /** Device-class modes to run beside the generic 'pci' mode (which every run has). */
  modes?: readonly FuzzMode[];
  /** How long the device may take to answer a request or finish work a mode waits for (5000 ms, QEMU's reply timeout). */
  deadlineMs?: number;
  /** Device errors that are not findings (a device that throws on purpose); none by default. */
  allowDeviceError?(error: Error, command: number | undefined): boolean;
  /** Perform exactly these operations (a saved reproducer) instead of generating them. */
  replay?: readonly FuzzOp[];
  /** Most replays spent shrinking a failing sequence (48 by default; 0 reports it unshrunk). */
  shrinkAttempts?: number;
  /** Progress lines (the seed first), for a command line or a test log. */
  log?(line: string): void;
}

export interface FuzzFindingReport {
  kind: FindingKind;
  message: string;
  /** How many operations the run had performed when it found it (the failing one included). */
  at: number;
  /** The shortest sequence found that still fails this way, replayable with `replay`. */
  reproducer: FuzzOp[];
  /** Whether `reproducer` was confirmed by a replay against a fresh device. */
  confirmed: boolean;
  /** What the serving process printed, when it was a child. */
  serverOutput?: string;
}

export interface FuzzReport {
  seed: number;
  modes: string[];
  /** Operations performed (up to and including a failing one). */
  ops: number;
  /**
   * The device's answers, not findings: error replies by errno name, 'refused
   * by the client' for ops the client would not send, and what modes tallied
   * (the NVMe mode: 'nvme: success' and 'nvme: status 0x...').
   */
  answers: Record<string, number>;
  elapsedMs: number;
  finding?: FuzzFindingReport;
}

/** The seed when none is given: different each run, printed so a failure replays. */
export function randomSeed(): number {
  return (Date.now() ^ (process.pid << 16)) >>> 0;
}

/** The JSON a reproducer is saved as, for `vfio-user fuzz --replay FILE` and `replay`. */
export interface ReproducerFile {
  seed: number;
  modes: string[];
  finding: { kind: FindingKind; message: string };
  ops: FuzzOp[];
}

const DEFAULT_OPS = 10_000;
const DEFAULT_DEADLINE_MS = 5000;
const DEFAULT_SHRINK_ATTEMPTS = 48;
/** Every so many operations, the fuzzer reconnects and checks the server's fds and memory at rest. */
const CHECK_EVERY = 2500;
/**
 * Growth of the server's fd count at rest, over a run, that is a leak. A
 * few fds may come and go legitimately (a device opening its backing file
 * lazily); a per-request leak passes this within the first check.
 */
const FD_SLACK = 16;
/**
 * Growth of the server's RSS at rest that is a leak: coarse, since V8 grows
 * its heap as it likes. It catches a device that allocates what a guest
 * asks (a 4 GiB log page); the leak tests catch small leaks.
 */
const RSS_SLACK = 512 << 20;
const EVENTFDS = 8;
/**
 * How long a run waits after its last check before a last round trip:
 * device code running on its own (a timer a write armed) may fail only
 * then, and a served device's failure shows only as EIO to a request. So a
 * replay of the one operation that armed it fails as the whole run did.
 */
const LINGER_MS = 50;
/** How long waitFor checks on every loop turn before it settles for once a millisecond. */
const SPIN_MS = 5;

/** The per-run state a mode sees as its FuzzContext. */
class Session implements FuzzContext {
  client!: VfioUserClient;
  device!: DeviceProfile;
  readonly memoryIova = GUEST_MEMORY.iova;
  /** Bumped by every reconnect: an op that reconnected has disturbed every mode. */
  connections = 0;
  private reconnecting = false;

  constructor(
    private readonly instance: TargetInstance,
    readonly memory: GuestMemory,
    readonly eventfds: readonly EventfdIrq[],
    readonly deadlineMs: number,
    readonly answers: Record<string, number>,
  ) {}

  tally(answer: string): void {
    this.answers[answer] = (this.answers[answer] ?? 0) + 1;
  }

  async connect(): Promise<void> {
    this.client = await connect(this.instance.path, { timeoutMs: this.deadlineMs });
    this.connections++;
  }

  /** Whether a closed connection was the fuzzer's doing. */
  get expectingClose(): boolean {
    return this.reconnecting;
  }

  async reconnect(): Promise<void> {
    this.reconnecting = true;
    try {
      this.client.close();
      await this.connect();
    } finally {
      this.reconnecting = false;
    }
    await this.mapMemory();
  }

  async mapMemory(): Promise<void> {
    await this.client.dmaMap({ iova: this.memoryIova, memory: this.memory });
  }

  async waitFor(what: string, done: () => boolean | Promise<boolean>): Promise<void> {
    const start = Date.now();
    while (!(await done())) {
      const waited = Date.now() - start;
      if (waited > this.deadlineMs) throw new FuzzFinding('stalled', `${what}: not within ${this.deadlineMs} ms`);
      // Every loop turn for a few ms (replies and an in-process device arrive in them), then every millisecond.
      if (waited < SPIN_MS) await nextTurn();
      else await sleep(1);
    }
  }

  /**
   * Puts back what modes start from: a connection, the guest memory window,
   * memory space and bus mastering on, the device RUNNING.
   */
  async restore(): Promise<void> {
    if (this.client.closed) await this.reconnect();
    if (this.device.migration) {
      try {
        await this.client.migration.setState(MigrationState.RUNNING);
      } catch (error) {
        if (!(error instanceof ProtocolError)) throw error;
        // ERROR (or a state with no arc to RUNNING): a reset brings the device back.
        await this.client.reset();
        await this.client.migration.setState(MigrationState.RUNNING);
      }
    }
    await this.client.dmaUnmapAll();
    await this.mapMemory();
    const command = await this.client.pci.read(Cfg.COMMAND, 2);
    await this.client.pci.write(Cfg.COMMAND, 2, command | PciCommand.MEMORY | PciCommand.BUS_MASTER);
  }
}

interface AttemptResult {
  performed: FuzzOp[];
  answers: Record<string, number>;
  finding?: FuzzFinding;
  serverOutput?: string;
  profile?: DeviceProfile;
}

/** Where an attempt's operations come from. */
type OpSource = { kind: 'generate'; random: Random; count: number } | { kind: 'list'; ops: readonly FuzzOp[] };

/** One run against one start of the target. Findings end it; anything else wrong with the fuzzer itself throws. */
async function attempt(target: FuzzTarget, modes: readonly FuzzMode[], source: OpSource, options: FuzzOptions, known?: DeviceProfile): Promise<AttemptResult> {
  const deadlineMs = options.deadlineMs ?? DEFAULT_DEADLINE_MS;
  const instance = await target.start();
  const memory = new GuestMemory(GUEST_MEMORY.size, { name: 'vfio-user-fuzz' });
  const eventfds = Array.from({ length: EVENTFDS }, () => new EventfdIrq());
  const result: AttemptResult = { performed: [], answers: {} };
  const session = new Session(instance, memory, eventfds, deadlineMs, result.answers);
  const byName = new Map(modes.map((mode) => [mode.name, mode]));
  /** Modes whose picture of the device is out of date: restarted before their next op. */
  const stale = new Set(modes);
  let baseline: { fds?: number; rssBytes?: number } | undefined;

  const checkDeviceErrors = () => {
    for (const { error, command } of instance.takeDeviceErrors?.() ?? []) {
      if (options.allowDeviceError?.(error, command)) continue;
      throw new FuzzFinding('device-error', `deviceError in ${command === undefined ? 'device code running on its own' : commandName(command)}: ${error.stack ?? error.message}`);
    }
  };
  const health = (why: string) => {
    if (instance.pid === undefined) return undefined;
    const now = processHealth(instance.pid);
    if (!now.alive) throw new FuzzFinding('disconnected', `the server process ${instance.pid} died (${why})`);
    return now;
  };
  /** At rest (a fresh connection, nothing mapped or wired): fds and RSS against the start. */
  const checkAtRest = async () => {
    await session.reconnect();
    await session.client.dmaUnmapAll();
    const now = health('at rest');
    await session.mapMemory();
    if (!now) return;
    if (!baseline) {
      baseline = now;
      return;
    }
    if (now.fds !== undefined && baseline.fds !== undefined && now.fds > baseline.fds + FD_SLACK) {
      throw new FuzzFinding('leak', `the server process holds ${now.fds} fds at rest, ${baseline.fds} at the start`);
    }
    if (now.rssBytes !== undefined && baseline.rssBytes !== undefined && now.rssBytes > baseline.rssBytes + RSS_SLACK) {
      throw new FuzzFinding('leak', `the server process's RSS is ${now.rssBytes >> 20} MiB at rest, ${baseline.rssBytes >> 20} MiB at the start`);
    }
  };
  /** What an operation's failure means: an answer (counted), or a finding (thrown). */
  const judge = (error: unknown, op: FuzzOp) => {
    if (error instanceof FuzzFinding) throw error;
    if (error instanceof ProtocolError) {
      // Where a device error is not seen before its reply, an EIO stands for one.
      if (error.errno === Errno.EIO && !instance.errorsBeforeReplies) {
        throw new FuzzFinding('device-error', `EIO answered to ${commandName(error.command)}: the device failed (suspected; see the server's log)`);
      }
      session.tally(errnoName(error.errno));
      return;
    }
    if (error instanceof TimeoutError) {
      const state = instance.pid === undefined ? '' : ` (server process ${describeHealth(processHealth(instance.pid))})`;
      throw new FuzzFinding('unanswered', `no reply within ${deadlineMs} ms to ${op.mode}/${op.kind}${state}`);
    }
    if (error instanceof ConnectionClosedError && !session.expectingClose) {
      health('it closed the connection');
      throw new FuzzFinding('disconnected', `the server closed the connection during ${op.mode}/${op.kind}: ${error.message}`);
    }
    if (error instanceof UsageError) {
      session.tally('refused by the client');
      return;
    }
    throw error;
  };
  /** The device, restored to running, answers a config read (a finding otherwise). */
  const roundTrip = async (kind: string) => {
    try {
      await session.restore();
      await session.client.regionRead(Region.CONFIG, 0n, 4);
    } catch (error) {
      judge(error, { mode: 'runner', kind });
      throw new FuzzFinding('wrong-answer', `the device refused the ${kind}: ${(error as Error).message}`);
    }
  };

  try {
    try {
      await session.connect();
      session.device = result.profile = known ?? (await profileDevice(session.client));
      for (const mode of modes) {
        const why = mode.refuses?.(session.device);
        if (why !== undefined) throw new UsageError(`the ${mode.name} mode cannot drive this device: ${why}`);
      }
      await checkAtRest();
      const total = source.kind === 'list' ? source.ops.length : source.count;
      for (let i = 0; i < total; i++) {
        const op = source.kind === 'list' ? source.ops[i] : generate(source.random, modes, session.device);
        result.performed.push(op);
        const mode = byName.get(op.mode);
        if (!mode) throw new UsageError(`operation ${i} names the mode ${op.mode}, which this run does not have`);
        const connections = session.connections;
        try {
          if (stale.has(mode) && mode.restart) {
            await session.restore();
            await mode.restart(session);
          }
          stale.delete(mode);
          await mode.run(op, session);
        } catch (error) {
          judge(error, op);
        }
        checkDeviceErrors();
        // Whatever one mode did may have changed the device under the others (and a reconnect under all).
        const reconnected = session.connections !== connections;
        const disturbed = reconnected || (mode.disturbs?.(op) ?? true);
        for (const other of modes) if ((other !== mode && disturbed) || reconnected) stale.add(other);
        if ((i + 1) % CHECK_EVERY === 0) {
          health('checked');
          await checkAtRest();
          for (const other of modes) stale.add(other);
        }
      }
      // The device must still work afterwards: one clean round trip, then the check at rest, then
      // another after a while, for what device code does on its own meanwhile.
      await roundTrip('final round trip');
      checkDeviceErrors();
      await checkAtRest();
      checkDeviceErrors();
      await new Promise((resolve) => setTimeout(resolve, LINGER_MS));
      await roundTrip('round trip after the run');
      checkDeviceErrors();
    } catch (error) {
      if (!(error instanceof FuzzFinding)) throw error;
      result.finding = error;
    }
  } finally {
    for (const mode of modes) mode.close?.();
    session.client?.close();
    await instance.stop();
    result.serverOutput = instance.output?.();
    for (const eventfd of eventfds) eventfd.close();
    memory.close();
  }
  return result;
}

function describeHealth(health: ReturnType<typeof processHealth>): string {
  if (!health.alive) return 'dead';
  return health.state === 'R' ? 'running: busy, perhaps in a loop' : `alive, state ${health.state}`;
}

function generate(random: Random, modes: readonly FuzzMode[], device: DeviceProfile): FuzzOp {
  const mode = random.weighted(modes.map((m) => [m, m.weight ?? 1] as const));
  return mode.generate(random, device);
}

/** The modes of a run: 'pci' first, then the device-class modes given. */
function runModes(modes: readonly FuzzMode[] = []): FuzzMode[] {
  const all = [pciMode as FuzzMode, ...modes.filter((mode) => mode.name !== pciMode.name)];
  const names = new Set(all.map((mode) => mode.name));
  if (names.size !== all.length) throw new UsageError('two fuzz modes share a name');
  return all;
}

/**
 * Fuzzes `target`: the operations of `options.seed` (or `options.replay`),
 * then, on a finding, shrinks the sequence when the target starts afresh.
 */
export async function fuzz(target: FuzzTarget, options: FuzzOptions = {}): Promise<FuzzReport> {
  const started = Date.now();
  const seed = options.seed ?? randomSeed();
  if (!Number.isInteger(seed) || seed < 0 || seed > 0xffffffff) throw new UsageError(`seed ${seed} must be a 32-bit unsigned integer`);
  const count = options.ops ?? DEFAULT_OPS;
  if (!Number.isSafeInteger(count) || count < 0) throw new UsageError(`ops ${count} must be a whole number`);
  const modes = runModes(options.modes);
  const log = options.log ?? (() => {});
  log(`fuzzing ${target.description} with seed ${seed}: ${options.replay ? `${options.replay.length} replayed` : count} operations, modes ${modes.map((m) => m.name).join(', ')}`);
  const source: OpSource = options.replay ? { kind: 'list', ops: options.replay } : { kind: 'generate', random: new Random(seed), count };
  const first = await attempt(target, modes, source, options);
  const report: FuzzReport = { seed, modes: modes.map((m) => m.name), ops: first.performed.length, answers: first.answers, elapsedMs: 0 };
  if (first.finding) {
    log(`finding after ${first.performed.length} operations: ${first.finding.kind}: ${first.finding.message}`);
    const shrunk = await shrink(target, modes, first.performed, first.finding.kind, options, first.profile, log);
    report.finding = {
      kind: first.finding.kind,
      message: first.finding.message,
      at: first.performed.length,
      reproducer: shrunk.ops,
      confirmed: shrunk.confirmed,
      serverOutput: first.serverOutput,
    };
  }
  report.elapsedMs = Date.now() - started;
  return report;
}

/**
 * The shortest sequence that still fails with `kind`, by replays against
 * fresh starts of the target, deterministically: the shortest failing
 * suffix of 1, 2, 4... operations, then delta debugging on it (drop ever
 * smaller chunks while it fails).
 */
async function shrink(target: FuzzTarget, modes: readonly FuzzMode[], ops: FuzzOp[], kind: FindingKind, options: FuzzOptions, profile: DeviceProfile | undefined, log: (line: string) => void): Promise<{ ops: FuzzOp[]; confirmed: boolean }> {
  let budget = options.shrinkAttempts ?? DEFAULT_SHRINK_ATTEMPTS;
  if (!target.fresh || budget === 0) return { ops, confirmed: false };
  const fails = async (list: FuzzOp[]) => {
    budget--;
    const replay = await attempt(target, modes, { kind: 'list', ops: list }, options, profile);
    return replay.finding?.kind === kind;
  };
  // The cause is most often just before the failure: the shortest failing suffix (1, 2, 4... operations) first.
  let current = ops;
  let confirmed = false;
  for (let length = 1; length < ops.length && budget > 0; length *= 2) {
    if (await fails(ops.slice(-length))) {
      current = ops.slice(-length);
      confirmed = true;
      break;
    }
  }
  let chunks = 2;
  while (current.length > 1 && budget > 0) {
    const size = Math.ceil(current.length / chunks);
    let reduced = false;
    for (let start = 0; start < current.length && budget > 0; start += size) {
      const candidate = [...current.slice(0, start), ...current.slice(start + size)];
      if (candidate.length > 0 && (await fails(candidate))) {
        current = candidate;
        confirmed = true;
        chunks = Math.max(chunks - 1, 2);
        reduced = true;
        break;
      }
    }
    if (!reduced) {
      if (size === 1) break;
      chunks = Math.min(chunks * 2, current.length);
    }
  }
  if (!confirmed && budget > 0) confirmed = await fails(current);
  log(`shrunk to ${current.length} operations${confirmed ? '' : ' (not confirmed by a replay)'}`);
  return { ops: current, confirmed };
}

/** The reproducer of a report with a finding, as saved for `--replay`. */
export function reproducerFile(report: FuzzReport): ReproducerFile {
  if (!report.finding) throw new UsageError('the run found nothing to reproduce');
  return { seed: report.seed, modes: report.modes, finding: { kind: report.finding.kind, message: report.finding.message }, ops: report.finding.reproducer };
}

/** A finding as text: what, the seed, and the reproducing operations one per line. */
export function formatFinding(report: FuzzReport): string {
  const f = report.finding;
  if (!f) return `no finding in ${report.ops} operations (seed ${report.seed})`;
  const lines = [
    `FINDING (${f.kind}) after ${f.at} operations, seed ${report.seed}: ${f.message}`,
    `reproducer (${f.reproducer.length} operations${f.confirmed ? ', confirmed by a replay' : ', not confirmed'}):`,
    ...f.reproducer.map((op) => `  ${JSON.stringify(op)}`),
  ];
  if (f.serverOutput) lines.push('server output (tail):', f.serverOutput.trimEnd().split('\n').slice(-20).map((l) => `  ${l}`).join('\n'));
  return lines.join('\n');
}
