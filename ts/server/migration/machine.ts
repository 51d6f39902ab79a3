/** The migration state machine, one per device. */
import type { DeviceMigration, MigrationPhase, VfioUserDevice } from '../../device.js';
import { Command, Errno, MigrationFlags, MigrationState, ProtocolError } from '../../protocol/index.js';
import { migrationPath } from './paths.js';
import { parseStream, SaveStream } from './stream.js';

const S = MigrationState;
const stateNames = new Map<number, string>(Object.entries(MigrationState).map(([name, n]) => [n, name]));
const stateName = (n: number) => stateNames.get(n) ?? `state ${n}`;

/**
 * The migration state of one device. It outlives sessions (a client that
 * reconnects finds the device where it was), so it is kept per device, and
 * its operations are serialised: a disconnect's return to RUNNING finishes
 * before the next client's first request.
 */
export class MigrationStateMachine {
  private current: MigrationState = S.RUNNING;
  private save: SaveStream | undefined;
  /** MIG_DATA_WRITE payloads of the resume session. */
  private resume: Buffer[] | undefined;
  private tail: Promise<unknown> = Promise.resolve();

  constructor(readonly device: DeviceMigration) {}

  /** The state now; a transition under way is not finished (see `settledState`). */
  get state(): MigrationState {
    return this.current;
  }

  /** The state once every transition already asked for is done (GET MIG_DEVICE_STATE). */
  settledState(): Promise<MigrationState> {
    return this.exclusive(async () => this.current);
  }

  /** MIGRATION feature flags (§6.14): STOP_COPY is mandatory. */
  get flags(): number {
    return MigrationFlags.STOP_COPY | (this.device.preCopy ? MigrationFlags.PRE_COPY : 0);
  }

  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.tail.then(fn);
    this.tail = run.catch(() => undefined);
    return run;
  }

  /**
   * SET MIG_DEVICE_STATE: walks the path before resolving. When an arc fails,
   * the device stays in the last state reached (the failed arc's source, as
   * in kernel VFIO), or in ERROR when that state could not be restored.
   */
  setState(target: number): Promise<void> {
    return this.exclusive(async () => {
      const fail = (why: string) => new ProtocolError(Errno.EINVAL, Command.DEVICE_FEATURE, why);
      if (this.current === S.ERROR) throw fail('the device is in ERROR: only DEVICE_RESET leaves it');
      if (target === S.ERROR) throw fail('ERROR cannot be requested');
      const path = migrationPath(this.current, target as MigrationState, this.device.preCopy ?? false);
      if (!path) throw fail(`no transition from ${stateName(this.current)} to ${stateName(target)}`);
      await this.walk(path);
    });
  }

  private async walk(path: readonly MigrationState[]): Promise<void> {
    for (const next of path) {
      await this.arc(this.current, next);
      this.current = next;
    }
  }

  /** One arc of ARCS; `from` is whichever state the table allows into `to`. */
  private async arc(from: MigrationState, to: MigrationState): Promise<void> {
    const device = this.device;
    switch (to) {
      case S.STOP:
        if (from === S.RUNNING) await device.stop?.();
        else if (from === S.STOP_COPY) this.endSave();
        else await this.load();
        return;
      case S.RUNNING:
        if (from === S.STOP) await device.start?.();
        else this.endSave();
        return;
      case S.PRE_COPY:
        await this.beginSave('precopy');
        return;
      case S.STOP_COPY:
        if (from === S.STOP) return this.beginSave('stopcopy');
        // From PRE_COPY: the precopy session goes on, its unread data first,
        // unless the stop-copy unit supersedes it.
        await device.stop?.();
        try {
          if (device.fullStopCopy) {
            await this.beginSave('stopcopy');
          } else {
            await this.save!.add('stopcopy');
          }
        } catch (error) {
          await this.restart();
          throw error;
        }
        return;
      case S.RESUMING:
        this.resume = [];
        return;
    }
  }

  /** Starts a save session with its unit 0, ending the one before (if any) once that is saved. */
  private async beginSave(phase: MigrationPhase): Promise<void> {
    const save = new SaveStream(this.device);
    await save.add(phase);
    this.endSave();
    this.save = save;
  }

  private endSave(): void {
    this.save?.close();
    this.save = undefined;
  }

  /** Undoes a stop() whose arc failed later; if the device will not start, it is in ERROR. */
  private async restart(): Promise<void> {
    try {
      await this.device.start?.();
    } catch {
      this.enterError();
    }
  }

  private enterError(): void {
    this.endSave();
    this.resume = undefined;
    this.current = S.ERROR;
  }

  /**
   * RESUMING→STOP: loads the received units in order. A bad stream or a
   * first unit the device refuses leaves the device untouched in RESUMING,
   * with the data dropped (the client may write the stream again); a later
   * unit failing leaves it half loaded, which only ERROR can describe.
   */
  private async load(): Promise<void> {
    const received = Buffer.concat(this.resume!);
    this.resume = [];
    const units = parseStream(received);
    for (const [i, { data, unit }] of units.entries()) {
      try {
        await this.device.load(data, unit);
      } catch (error) {
        if (i > 0) this.enterError();
        throw error;
      }
    }
    this.resume = undefined;
  }

  /** MIG_DATA_READ. In PRE_COPY, a read after the end of the data asks the device for another unit. */
  read(size: number): Promise<Buffer> {
    return this.exclusive(async () => {
      if (this.current !== S.PRE_COPY && this.current !== S.STOP_COPY) {
        throw new ProtocolError(Errno.EINVAL, Command.MIG_DATA_READ, `no data to read in ${stateName(this.current)}`);
      }
      if (this.current === S.PRE_COPY && this.save!.drained) await this.save!.add('precopy');
      return this.save!.read(size);
    });
  }

  /** MIG_DATA_WRITE: kept until RESUMING→STOP loads it. */
  write(data: Uint8Array): Promise<void> {
    return this.exclusive(async () => {
      if (this.current !== S.RESUMING) {
        throw new ProtocolError(Errno.EINVAL, Command.MIG_DATA_WRITE, `data can only be written in RESUMING, not in ${stateName(this.current)}`);
      }
      this.resume!.push(Buffer.from(data));
    });
  }

  /**
   * After DEVICE_RESET. The migration state is left alone (a VMM's own state
   * machine would lose track of it; libvfio-user #844), except ERROR, which
   * a reset is the way out of (§7).
   */
  afterReset(): Promise<void> {
    return this.exclusive(async () => {
      if (this.current !== S.ERROR) return;
      await this.device.start?.();
      this.current = S.RUNNING;
    });
  }

  /**
   * The client left mid-migration: the device goes back to RUNNING, as if
   * the migration had been cancelled. Received data is dropped, not loaded.
   * ERROR stays for the next client to see and reset.
   */
  abandon(): Promise<void> {
    return this.exclusive(async () => {
      if (this.current === S.ERROR) return;
      if (this.current === S.RESUMING) {
        this.resume = undefined;
        this.current = S.STOP;
      }
      await this.walk(migrationPath(this.current, S.RUNNING, this.device.preCopy ?? false)!);
    });
  }
}

const machines = new WeakMap<VfioUserDevice, MigrationStateMachine>();

/** The device's state machine (keyed by the device, which outlives sessions), made on first use. */
export function migrationStateOf(device: VfioUserDevice, migration: DeviceMigration): MigrationStateMachine {
  let machine = machines.get(device);
  if (!machine) machines.set(device, (machine = new MigrationStateMachine(migration)));
  return machine;
}
