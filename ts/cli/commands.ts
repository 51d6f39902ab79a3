/**
 * The `vfio-user` command: `serve` a device module, describe a server's
 * device with `lspci`, watch a VMM and a server talk with `trace`. Every
 * subcommand takes --help; the exit status is 0 on success, 1 when the work
 * failed, 2 when the command line was wrong. main.ts runs it as a program;
 * tests call `main()` with their own output.
 */
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { serve, untilSignal } from './serve.js';
import { lspci } from './lspci.js';
import { examplePath, listExamples } from './examples.js';
import { setMessageObserver } from '../channel.js';
import { colorFor, messageLogger } from '../debug.js';
import { startTrace } from './trace.js';
import { MAX_REQUEST_TIMEOUT_MS, type ServerOptions } from '../server/server.js';
import { fuzzCommand } from './fuzz.js';

export const Exit = { OK: 0, FAILURE: 1, USAGE: 2 } as const;

/** Where a command writes: the process's streams, or a test's. */
export interface Output {
  write(text: string): unknown;
  isTTY?: boolean;
}

export interface CommandIo {
  stdout: Output;
  stderr: Output;
}

const EXIT_STATUS = `exit status:
  0  success (serve, trace: stopped by SIGINT or SIGTERM; fuzz: nothing
     found)
  1  failure: the module did not load or gave no device, a socket or
     protocol error, the peer refused; fuzz found something
  2  usage error: unknown command or option, a bad value, missing or
     extra argument`;

/** The command line was wrong: exit 2 with a pointer to --help. */
class CommandLineError extends Error {}

type Options = NonNullable<ParseArgsConfig['options']>;
type Values = ReturnType<typeof parseArgs>['values'];

interface Subcommand {
  summary: string;
  help: string;
  options: Options;
  /** Whether what follows `--` is handed on (to the served module) instead of parsed. */
  handsOnRest?: boolean;
  /** `rest` is what followed `--` on the command line. Resolves with the exit status when not OK. */
  run(values: Values, positionals: string[], rest: string[], io: CommandIo): Promise<void | number>;
}

const help: Options = { help: { type: 'boolean', short: 'h' } };
const verbose: Options = { verbose: { type: 'boolean', short: 'v' } };

const VERBOSE_HELP = `  -v, --verbose          print every message decoded to stderr (as
                         DEBUG=vfio-user does for any program)`;

/** --verbose: every message decoded on stderr. */
function applyVerbose(values: Values): void {
  if (values.verbose) setMessageObserver(messageLogger());
}

const commands: Record<string, Subcommand> = {
  serve: {
    summary: 'serve a device module (or a shipped example) on a UNIX socket',
    help: `usage:
  vfio-user serve MODULE SOCKET-OPTION [OPTIONS] [-- ARGS...]
  vfio-user serve --example NAME SOCKET-OPTION [OPTIONS] [-- ARGS...]
  vfio-user serve --list-examples

Serve a device until SIGINT or SIGTERM. MODULE is a .ts or .js file, or a
folder with an index module; its default export is a device, or a factory
\`(args: string[]) => device\` (type DeviceFactory) that is called with the
ARGS after --.

options:
  -s, --socket PATH      listen on a new socket at PATH (removed on exit)
      --socket-path=PATH the same, as vhost-user style backends spell it
      --fd=N             listen on the already listening socket fd N
      --mode MODE        permissions of the new socket, octal (default 0600)
      --allow-uid UID[,UID...]
      --allow-gid GID[,GID...]
      --allow-pid PID[,PID...]
                         accept only clients whose uid (gid, pid), as the
                         kernel recorded it at connect (SO_PEERCRED), is
                         listed; others are closed before VERSION. Each may
                         be repeated; a client must match every one given
      --request-timeout-ms MS
                         answer ETIMEDOUT to a command the device has not
                         answered within MS ms, and run the client's next
                         commands (default: no limit)
      --max-queued-bytes N
                         cut off a client that leaves more than N bytes of
                         replies unread (default 8388608)
      --example NAME     serve the example NAME shipped in the package
      --list-examples    list the shipped examples and exit
${VERBOSE_HELP}
  -h, --help             show this help

${EXIT_STATUS}`,
    options: {
      ...help,
      ...verbose,
      socket: { type: 'string', short: 's' },
      // The vhost-user style backend conventions (§2 of the protocol digest).
      'socket-path': { type: 'string' },
      fd: { type: 'string' },
      mode: { type: 'string' },
      'allow-uid': { type: 'string', multiple: true },
      'allow-gid': { type: 'string', multiple: true },
      'allow-pid': { type: 'string', multiple: true },
      'request-timeout-ms': { type: 'string' },
      'max-queued-bytes': { type: 'string' },
      example: { type: 'string' },
      'list-examples': { type: 'boolean' },
    },
    handsOnRest: true,
    async run(values, positionals, rest, io) {
      if (values['list-examples']) {
        const examples = listExamples();
        const width = Math.max(...examples.map((example) => example.name.length));
        for (const { name, summary } of examples) io.stdout.write(`${name.padEnd(width)}  ${summary}\n`);
        return;
      }
      const example = values.example as string | undefined;
      if (positionals.length !== (example === undefined ? 1 : 0)) {
        throw new CommandLineError(example === undefined ? 'give one MODULE (or --example NAME)' : 'give either MODULE or --example NAME, not both');
      }
      const path = (values.socket ?? values['socket-path']) as string | undefined;
      const fd = values.fd === undefined ? undefined : Number(values.fd);
      if ((path === undefined) === (fd === undefined)) throw new CommandLineError('give exactly one of --socket PATH, --socket-path=PATH, --fd=N');
      if (fd !== undefined && !(Number.isInteger(fd) && fd >= 0)) throw new CommandLineError(`--fd wants a file descriptor number, not ${values.fd}`);
      const mode = socketMode(values.mode);
      const server = serverOptions(values);
      const module = example === undefined ? positionals[0] : examplePathOrUsage(example);
      applyVerbose(values);
      await serve(module, path ?? { fd: fd! }, { mode, args: rest, server });
      // Stopped by SIGINT or SIGTERM, the server and the device closed: a handle device code
      // still holds (a setInterval it never cleared) must not keep the process running.
      process.exit(Exit.OK);
    },
  },
  lspci: {
    summary: "describe a vfio-user server's device like lspci -vv",
    help: `usage: vfio-user lspci SOCKET [--json] [--verbose]

Connect to the vfio-user server at SOCKET and describe its device like
lspci -vv (IDs, command/status, BARs, capabilities, extended capabilities),
then its regions and IRQs. Read-only: BAR sizes come from the region info,
not from sizing writes.

options:
      --json             print one JSON object instead; 64-bit values
                         (sizes, offsets, addresses, serial numbers) are
                         "0x..." hex strings, everything else plain numbers
${VERBOSE_HELP}
  -h, --help             show this help

${EXIT_STATUS}`,
    options: { ...help, ...verbose, json: { type: 'boolean' } },
    async run(values, positionals, _rest, io) {
      if (positionals.length !== 1) throw new CommandLineError('give one SOCKET');
      applyVerbose(values);
      io.stdout.write(await lspci(positionals[0], { json: values.json === true }));
    },
  },
  trace: {
    summary: 'sit between a VMM and a server and print every message decoded',
    help: `usage: vfio-user trace --listen PATH --connect PATH [--json] [--mode MODE]

Listen at --listen PATH for a VMM (point the VMM there instead of at the
server); for each client, connect to the server at --connect PATH and pass
every message and fd through unchanged until either end leaves, printing each
message decoded on stdout: command, msg_id, flags, decoded fields, fd count,
errno of error replies; a reply is decoded by the request it answers.
Connection events go to stderr. A negotiated twin socket is relayed as well
(the client gets a socket of the trace's in the VERSION reply), so DMA_READ
and DMA_WRITE show too. Stops on SIGINT or SIGTERM.

options:
      --listen PATH      the socket the VMM connects to (created; removed on exit)
      --connect PATH     the server's socket
      --json             one JSON object per line instead of text: session,
                         from, to, socket ("twin" on the twin socket), type,
                         id, command, flags, size, fds, fields (64-bit values
                         as "0x..." strings, bytes as {bytes, hex}),
                         errno/error, problem
      --mode MODE        permissions of the --listen socket, octal (default 0600)
  -h, --help             show this help

Text is colored when stdout is a terminal, unless NO_COLOR is set.

${EXIT_STATUS}`,
    options: { ...help, listen: { type: 'string' }, connect: { type: 'string' }, json: { type: 'boolean' }, mode: { type: 'string' } },
    async run(values, positionals, _rest, io) {
      const listen = values.listen as string | undefined;
      const connect = values.connect as string | undefined;
      if (listen === undefined || connect === undefined) throw new CommandLineError('give both --listen PATH and --connect PATH');
      if (positionals.length > 0) throw new CommandLineError(`unexpected argument ${positionals[0]}`);
      const trace = startTrace({
        listen,
        connect,
        mode: socketMode(values.mode),
        json: values.json === true,
        color: colorFor(io.stdout),
        print: (line) => io.stdout.write(`${line}\n`),
        log: (line) => io.stderr.write(`vfio-user trace: ${line}\n`),
      });
      await untilSignal();
      trace.stop();
    },
  },
  fuzz: {
    summary: 'attack a served device with a hostile, seeded client',
    help: `usage:
  vfio-user fuzz SOCKET [OPTIONS]
  vfio-user fuzz --serve MODULE [OPTIONS] [-- ARGS...]
  vfio-user fuzz --example NAME [OPTIONS] [-- ARGS...]

Connect to the vfio-user server at SOCKET (or serve MODULE, or a shipped
example, in a child \`vfio-user serve\` restarted for every replay) and
perform a seeded sequence of hostile operations: config writes (BAR sizing,
command register, capabilities, MSI and MSI-X), region accesses of every
size and offset in and out of range, DMA windows that overlap, move and
vanish, interrupt wiring and teardown, resets (DEVICE_RESET, FLR),
migration states and data, disconnects with a request in flight, and what
the --mode options add. After each operation it checks that every request
was answered within the deadline, that the server answered no EIO (a
device error) and, when the server runs on this machine, that its process
lives with steady fds and memory.

On a finding it prints the seed, what went wrong and a reproducing sequence
of operations (JSON, one per line), shrunk by replays when the device can
be started afresh (--serve, --example); over SOCKET it cannot restart the
server, so the sequence is the whole run.

options:
      --seed N           the seed, 0 to 4294967295 (default: from the clock,
                         printed); the same seed gives the same operations
      --ops N            operations to perform (default 10000)
      --mode NAME        add a device-class mode (may be repeated): nvme
                         drives an NVMe controller as a hostile host,
                         virtio a virtio-pci device as a hostile driver
      --deadline-ms MS   how long the device may take to answer (default 5000)
      --replay FILE      perform the operations saved in FILE instead
      --save FILE        on a finding, save the reproducer to FILE
      --serve MODULE     serve MODULE in a child process (ARGS after --)
      --example NAME     serve the shipped example NAME in a child process
  -h, --help             show this help

exit status:
  0  nothing found
  1  a finding (printed), or the fuzzer could not run
  2  usage error`,
    options: {
      ...help,
      seed: { type: 'string' },
      ops: { type: 'string' },
      mode: { type: 'string', multiple: true },
      'deadline-ms': { type: 'string' },
      replay: { type: 'string' },
      save: { type: 'string' },
      serve: { type: 'string' },
      example: { type: 'string' },
    },
    handsOnRest: true,
    async run(values, positionals, rest, io) {
      const module = values.example !== undefined ? examplePathOrUsage(values.example as string) : (values.serve as string | undefined);
      if ((values.example !== undefined && values.serve !== undefined) || (module === undefined) === (positionals.length === 0)) {
        throw new CommandLineError('give one SOCKET, or --serve MODULE, or --example NAME');
      }
      if (positionals.length > 1) throw new CommandLineError(`unexpected argument ${positionals[1]}`);
      if (module === undefined && rest.length > 0) throw new CommandLineError('ARGS after -- go to a served module (--serve, --example)');
      const number = (flag: string, min: number, max: number) => (values[flag] === undefined ? undefined : wholeNumber(flag, values[flag] as string, min, max));
      const report = await fuzzCommand({
        target: module === undefined ? { socket: positionals[0] } : { module, args: rest },
        seed: number('seed', 0, 0xffffffff),
        ops: number('ops', 0, Number.MAX_SAFE_INTEGER),
        deadlineMs: number('deadline-ms', 1, MAX_REQUEST_TIMEOUT_MS),
        modes: (values.mode as string[] | undefined) ?? [],
        replay: values.replay as string | undefined,
        save: values.save as string | undefined,
        log: (line) => io.stderr.write(`vfio-user fuzz: ${line}\n`),
        print: (text) => io.stdout.write(text),
      });
      return report.finding ? Exit.FAILURE : Exit.OK;
    },
  },
};

const USAGE = `usage: vfio-user COMMAND [OPTIONS]

commands:
${Object.entries(commands)
  .map(([name, command]) => `  ${name.padEnd(7)}${command.summary}`)
  .join('\n')}

Run \`vfio-user COMMAND --help\` for a command's options.

DEBUG=vfio-user in the environment of any program that uses the library
(or --verbose) prints every message it sends and receives, decoded, to
stderr; the library prints nothing otherwise.

${EXIT_STATUS}`;

/** --mode: octal permission bits like 0660. */
function socketMode(mode: Values[string]): number | undefined {
  if (mode === undefined) return undefined;
  if (typeof mode !== 'string' || !/^0?[0-7]{3}$/.test(mode)) throw new CommandLineError(`--mode wants octal permissions like 0660, not ${mode}`);
  return parseInt(mode, 8);
}

/** A whole number from `min` to `max` given to `--flag`. */
function wholeNumber(flag: string, text: string, min: number, max: number): number {
  const value = /^\d+$/.test(text) ? Number(text) : NaN;
  if (!(value >= min && value <= max)) throw new CommandLineError(`--${flag} wants a whole number from ${min} to ${max}, not ${text}`);
  return value;
}

/** The server's hardening options: --allow-uid/gid/pid, --request-timeout-ms, --max-queued-bytes. */
function serverOptions(values: Values): ServerOptions {
  const options: ServerOptions = {};
  const ids = (flag: string) => {
    const given = values[flag] as string[] | undefined;
    // Any id the kernel can report: uid_t, gid_t and pid_t fit 32 bits.
    return given?.flatMap((list) => list.split(',')).map((id) => wholeNumber(flag, id, 0, 0xffffffff));
  };
  const peers = Object.entries({ uids: ids('allow-uid'), gids: ids('allow-gid'), pids: ids('allow-pid') }).filter(([, list]) => list !== undefined);
  if (peers.length > 0) options.allowedPeers = Object.fromEntries(peers);
  const timeout = values['request-timeout-ms'] as string | undefined;
  if (timeout !== undefined) options.requestTimeoutMs = wholeNumber('request-timeout-ms', timeout, 1, MAX_REQUEST_TIMEOUT_MS);
  const queued = values['max-queued-bytes'] as string | undefined;
  if (queued !== undefined) options.maxQueuedBytes = wholeNumber('max-queued-bytes', queued, 1, Number.MAX_SAFE_INTEGER);
  return options;
}

function examplePathOrUsage(name: string): string {
  try {
    return examplePath(name);
  } catch (error) {
    throw new CommandLineError((error as Error).message);
  }
}

/** parseArgs reports a bad command line as a TypeError with an ERR_PARSE_ARGS_* code. */
const isParseError = (error: unknown): boolean =>
  error instanceof TypeError && String((error as { code?: unknown }).code).startsWith('ERR_PARSE_ARGS_');

/** Runs the command line `argv` (without node and the script); resolves with the exit status for a bad command line. */
export async function main(argv: string[], io: CommandIo = process): Promise<number> {
  const [name, ...args] = argv;
  if (name === undefined || name === '--help' || name === '-h') {
    (name === undefined ? io.stderr : io.stdout).write(`${USAGE}\n`);
    return name === undefined ? Exit.USAGE : Exit.OK;
  }
  const command = Object.hasOwn(commands, name) ? commands[name] : undefined;
  if (command === undefined) {
    io.stderr.write(`vfio-user: unknown command ${name}\n\n${USAGE}\n`);
    return Exit.USAGE;
  }
  // Everything after the first `--` belongs to the module, not to us.
  const end = command.handsOnRest ? args.indexOf('--') : -1;
  const rest = end < 0 ? [] : args.slice(end + 1);
  try {
    const { values, positionals } = parseArgs({ args: end < 0 ? args : args.slice(0, end), options: command.options, allowPositionals: true, strict: true });
    if (values.help) {
      io.stdout.write(`${command.help}\n`);
      return Exit.OK;
    }
    return (await command.run(values, positionals, rest, io)) ?? Exit.OK;
  } catch (error) {
    if (error instanceof CommandLineError || isParseError(error)) {
      // Node's own messages go on with advice about `--` that does not apply here.
      const reason = (error as Error).message.replace(/\. To specify a positional argument.*$/s, '');
      io.stderr.write(`vfio-user ${name}: ${reason}\nRun \`vfio-user ${name} --help\` for usage.\n`);
      return Exit.USAGE;
    }
    throw error;
  }
}
