/** `vfio-user fuzz`: a hostile client against a served device (ts/fuzz). */
import { readFileSync, writeFileSync } from 'node:fs';
import { UsageError } from '../errors.js';
import { formatFinding, fuzz, reproducerFile, type FuzzReport, type ReproducerFile } from '../fuzz/runner.js';
import { childTarget, socketTarget, type FuzzTarget } from '../fuzz/targets.js';
import { FUZZ_MODES } from '../fuzz/modes/index.js';
import type { FuzzMode } from '../fuzz/mode.js';

export interface FuzzCommand {
  /** A running server's socket, or a module this command serves in a child (restarted to shrink). */
  target: { socket: string } | { module: string; args: string[] };
  seed?: number;
  ops?: number;
  modes: string[];
  deadlineMs?: number;
  replay?: string;
  save?: string;
  log(line: string): void;
  print(text: string): void;
}

/** The modes named on the command line (the generic 'pci' mode is always there). */
export function modesNamed(names: readonly string[]): FuzzMode[] {
  return names.filter((name) => name !== 'pci').map((name) => {
    const make = Object.hasOwn(FUZZ_MODES, name) ? FUZZ_MODES[name] : undefined;
    if (!make) throw new UsageError(`no fuzz mode called ${name}; the modes are: pci, ${Object.keys(FUZZ_MODES).join(', ')}`);
    return make();
  });
}

function readReproducer(path: string): ReproducerFile {
  const file = JSON.parse(readFileSync(path, 'utf8')) as ReproducerFile;
  if (!Array.isArray(file.ops) || !Array.isArray(file.modes)) throw new UsageError(`${path} is not a reproducer saved by vfio-user fuzz --save`);
  return file;
}

/** Runs the fuzzer; resolves with the report (a finding is in it). */
export async function fuzzCommand(command: FuzzCommand): Promise<FuzzReport> {
  const replayed = command.replay === undefined ? undefined : readReproducer(command.replay);
  const names = command.modes.length > 0 ? command.modes : (replayed?.modes ?? []);
  const target: FuzzTarget = 'socket' in command.target ? socketTarget(command.target.socket) : childTarget(command.target);
  const report = await fuzz(target, {
    seed: command.seed ?? replayed?.seed,
    ops: command.ops,
    modes: modesNamed(names),
    deadlineMs: command.deadlineMs,
    replay: replayed?.ops,
    log: command.log,
  });
  const answers = Object.entries(report.answers).map(([name, count]) => `${name} ${count}`).join(', ');
  command.print(`${report.ops} operations in ${report.elapsedMs} ms, seed ${report.seed}; answers: ${answers || 'none'}\n`);
  if (!report.finding) {
    command.print('no finding\n');
    return report;
  }
  command.print(`${formatFinding(report)}\n`);
  if (command.save !== undefined) {
    writeFileSync(command.save, `${JSON.stringify(reproducerFile(report), null, 2)}\n`);
    command.print(`reproducer saved to ${command.save}: replay it with --replay ${command.save}\n`);
  } else {
    command.print('save it with --save FILE and replay it with --replay FILE\n');
  }
  return report;
}
