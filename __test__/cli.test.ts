/** `vfio-user serve`: a device module served to any client until a signal. */
import { spawn } from 'node:child_process';
import { existsSync, readFileSync, renameSync, rmSync } from 'node:fs';
import { createServer as createNetServer } from 'node:net';
import { join } from 'node:path';
import { describe, expect, test } from 'vitest';
import { once } from 'node:events';
import { Command, connect, ConnectionClosedError, Errno, Region } from '../ts/index.js';
import { encodeMessage, encodeRegionReadRequest, encodeVersion } from '../ts/protocol/index.js';
import { main } from '../ts/cli/commands.js';
import { rawConnect, SPAWNING_TEST_MS, STARTED_MS, tempSocketPath, until } from './helpers.js';

const root = join(__dirname, '..');
const tsx = join(root, 'node_modules', '.bin', 'tsx');
/** The command from source: Node with tsx's loader (quicker than the tsx launcher). */
const cli = ['--import', 'tsx', join(root, 'ts/cli/main.ts')];

/** Runs the command to completion. */
async function run(args: string[], command = cli, env: NodeJS.ProcessEnv = process.env): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const child = spawn(process.execPath, [...command, ...args], { cwd: root, env, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d) => (stdout += d));
  child.stderr.on('data', (d) => (stderr += d));
  const code = await new Promise<number | null>((r) => child.on('exit', r));
  return { code, stdout, stderr };
}

describe('vfio-user serve', { timeout: SPAWNING_TEST_MS }, () => {
  test('serves a TS device module and cleans up on SIGTERM', async () => {
    const socket = tempSocketPath();
    const child = spawn(tsx, [join(root, 'ts/cli/main.ts'), 'serve', join(root, 'examples/gpio.ts'), '--socket', socket.path], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d) => (stderr += d));
    try {
      await until(() => existsSync(socket.path), STARTED_MS);
      const client = await connect(socket.path, { timeoutMs: STARTED_MS });
      expect((await client.regionRead(Region.CONFIG, 0n, 4)).readUInt32LE(0)).toBe(0x0dc8494f);
      await client.regionWrite(Region.BAR2, 0n, Buffer.from([3]));
      expect((await client.regionRead(Region.BAR2, 0n, 1))[0]).toBe(3);
      client.close();
      child.kill('SIGTERM');
      const code = await new Promise<number | null>((r) => child.on('exit', r));
      expect(code).toBe(0);
      expect(existsSync(socket.path)).toBe(false);
      expect(stderr).toMatch(/serving .*gpio\.ts/);
    } finally {
      child.kill('SIGKILL');
      socket.cleanup();
    }
  });

  test.each(['SIGTERM', 'SIGINT'] as const)('%s closes the server, calls the device\'s close() and exits 0 though device code holds a timer', async (signal) => {
    const socket = tempSocketPath();
    const closed = `${socket.path}.closed`;
    const child = spawn(process.execPath, [...cli, 'serve', join(root, '__test__/fixtures/ticking-device.ts'), '--socket', socket.path, '--', closed], { cwd: root, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d) => (stderr += d));
    try {
      await until(() => stderr.includes('serving') || child.exitCode !== null, STARTED_MS);
      const client = await connect(socket.path, { timeoutMs: STARTED_MS });
      expect((await client.regionRead(Region.CONFIG, 0n, 4)).readUInt32LE(0)).toBe(0x00031234);
      const exited = new Promise<number | null>((r) => child.on('exit', r));
      // With the client still attached: the server lets it go before the device closes.
      child.kill(signal);
      expect(await exited, stderr).toBe(0);
      expect(existsSync(socket.path)).toBe(false);
      expect(readFileSync(closed, 'utf8')).toMatch(/^closed after \d+ ticks$/);
      client.close();
    } finally {
      child.kill('SIGKILL');
      socket.cleanup();
      rmSync(closed, { force: true });
    }
  });

  test('serves on a listening socket handed over as --fd, the backend convention', async () => {
    const socket = tempSocketPath();
    // A socket some other program bound: Node's server unlinks its path on close,
    // so it listens under another name that is then renamed into place.
    const outside = createNetServer();
    await new Promise<void>((r) => outside.listen(`${socket.path}.bound`, r));
    renameSync(`${socket.path}.bound`, socket.path);
    const listening = (outside as unknown as { _handle: { fd: number } })._handle.fd;
    // Node itself with tsx's loader: the tsx launcher would not pass fd 3 on to its child.
    const args = ['--import', 'tsx', join(root, 'ts/cli/main.ts'), 'serve', join(root, 'examples/gpio.ts'), '--fd=3'];
    const child = spawn(process.execPath, args, { cwd: root, stdio: ['ignore', 'ignore', 'pipe', listening] });
    outside.close();
    let stderr = '';
    child.stderr!.on('data', (d) => (stderr += d));
    try {
      await until(() => stderr.includes('serving') || child.exitCode !== null, STARTED_MS);
      expect(stderr).toMatch(/serving/);
      const client = await connect(socket.path, { timeoutMs: STARTED_MS });
      expect((await client.regionRead(Region.CONFIG, 0n, 4)).readUInt32LE(0)).toBe(0x0dc8494f);
      client.close();
      child.kill('SIGTERM');
      expect(await new Promise<number | null>((r) => child.on('exit', r))).toBe(0);
      expect(stderr).toMatch(/serving .*gpio\.ts on fd 3/);
    } finally {
      child.kill('SIGKILL');
      socket.cleanup();
    }
  });

  test('arguments after -- reach the factory of a module given as a folder', async () => {
    const socket = tempSocketPath();
    const module = join(root, '__test__/fixtures/args-device');
    // Node itself with tsx's loader: a SIGKILL to the tsx launcher would leave its child serving.
    const child = spawn(process.execPath, [...cli, 'serve', module, '--socket', socket.path, '--', '--device-id', '0xbeef'], { cwd: root, stdio: ['ignore', 'ignore', 'pipe'] });
    try {
      await until(() => existsSync(socket.path), STARTED_MS);
      const client = await connect(socket.path, { timeoutMs: STARTED_MS });
      expect((await client.regionRead(Region.CONFIG, 0n, 4)).readUInt32LE(0)).toBe(0xbeef1234);
      client.close();
      const exited = new Promise<number | null>((r) => child.on('exit', r));
      child.kill('SIGTERM');
      expect(await exited).toBe(0);
    } finally {
      child.kill('SIGKILL');
      socket.cleanup();
    }
  });

  test('a module without a device is a clear error', async () => {
    const socket = tempSocketPath();
    const child = spawn(tsx, [join(root, 'ts/cli/main.ts'), 'serve', join(root, 'ts/protocol/constants.ts'), '--socket', socket.path], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d) => (stderr += d));
    const code = await new Promise<number | null>((r) => child.on('exit', r));
    expect(code).toBe(1);
    expect(stderr).toMatch(/must export a device/);
    socket.cleanup();
  });

  test('--example serves a device shipped in the built package', async () => {
    const socket = tempSocketPath();
    // The compiled command and examples, laid out as an installed package has them.
    const child = spawn(process.execPath, [join(root, 'dist/ts/cli/main.js'), 'serve', '--example', 'gpio', '--socket', socket.path], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d) => (stderr += d));
    try {
      await until(() => existsSync(socket.path) || child.exitCode !== null, STARTED_MS);
      const client = await connect(socket.path, { timeoutMs: STARTED_MS });
      expect((await client.regionRead(Region.CONFIG, 0n, 4)).readUInt32LE(0)).toBe(0x0dc8494f);
      client.close();
      expect(stderr).toMatch(/serving .*dist\/examples\/gpio\.js/);
    } finally {
      child.kill('SIGKILL');
      socket.cleanup();
    }
  });

  test('--verbose and DEBUG=vfio-user print every message decoded; without them nothing is printed', async () => {
    const socket = tempSocketPath();
    const child = spawn(process.execPath, [...cli, 'serve', '--example', 'gpio', '--socket', socket.path, '--verbose'], { cwd: root, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d) => (stderr += d));
    try {
      await until(() => existsSync(socket.path) || child.exitCode !== null, STARTED_MS);
      const client = await connect(socket.path, { timeoutMs: STARTED_MS });
      await client.regionRead(Region.BAR2, 6n, 1);
      client.close();
      await until(() => stderr.includes('REGION_READ reply'), STARTED_MS);
      expect(stderr).toContain('vfio-user(server): client→server REGION_READ #2 region=BAR2 offset=0x6 count=1\n');
      expect(stderr).toContain('vfio-user(server): server→client REGION_READ reply #2 region=BAR2 offset=0x6 count=1 data=00\n');

      const { DEBUG: _, ...quiet } = process.env;
      const silent = await run(['lspci', socket.path], cli, quiet);
      expect(silent.code).toBe(0);
      expect(silent.stderr).toBe('');
      const debug = await run(['lspci', socket.path], cli, { ...quiet, DEBUG: 'vfio-user' });
      expect(debug.stdout).toBe(silent.stdout);
      expect(debug.stderr).toMatch(/^vfio-user\(client\): client→server VERSION #1 version=0\.2/);
      expect(debug.stderr).toMatch(/vfio-user\(client\): server→client REGION_READ reply #\d+ region=CONFIG offset=0x0 count=256 data=\[256 bytes\] 4f49c80d/);
    } finally {
      child.kill('SIGKILL');
      socket.cleanup();
    }
  });

  test('--allow-uid/gid/pid, --request-timeout-ms and --max-queued-bytes reach the server', async () => {
    const socket = tempSocketPath();
    const fixture = join(root, '__test__/fixtures/stalling-device.ts');
    const start = (options: string[]) => {
      const child = spawn(process.execPath, [...cli, 'serve', fixture, '--socket', socket.path, ...options], { cwd: root, stdio: ['ignore', 'ignore', 'pipe'] });
      const out = { child, stderr: '' };
      child.stderr.on('data', (d) => (out.stderr += d));
      return out;
    };
    const stop = async (child: ReturnType<typeof spawn>) => {
      child.kill('SIGTERM');
      if (child.exitCode === null) await once(child, 'exit');
    };
    const uid = process.getuid!();
    const refusing = start(['--allow-uid', `${uid + 1}`]);
    try {
      await until(() => refusing.stderr.includes('serving') || refusing.child.exitCode !== null, STARTED_MS);
      await expect(connect(socket.path, { timeoutMs: STARTED_MS })).rejects.toThrow(ConnectionClosedError);
      await until(() => refusing.stderr.includes('refused'), STARTED_MS);
      expect(refusing.stderr).toContain(`vfio-user: refused a client (pid ${process.pid}): uid ${uid} is not allowed`);
    } finally {
      await stop(refusing.child);
    }
    const bounded = start([`--allow-uid=${uid + 1},${uid}`, '--allow-gid', `${process.getgid!()}`, '--allow-pid', `${process.pid}`, '--request-timeout-ms', '50', '--max-queued-bytes', '2097152']);
    try {
      await until(() => bounded.stderr.includes('serving') || bounded.child.exitCode !== null, STARTED_MS);
      const client = await connect(socket.path, { timeoutMs: STARTED_MS });
      await expect(client.regionRead(Region.BAR2, 0n, 1)).rejects.toMatchObject({ errno: Errno.ETIMEDOUT });
      client.close();
      await until(() => bounded.stderr.includes('client disconnected'), STARTED_MS);
      expect(bounded.stderr).toContain('vfio-user: REGION_READ timed out; the client was answered ETIMEDOUT');
      // A client that reads no replies: cut off past 2 MiB of them.
      const raw = await rawConnect(socket.path);
      raw.on('error', () => {}); // the server resets a socket it cut off with requests unread
      raw.write(encodeMessage({ msgId: 1, command: Command.VERSION }, encodeVersion({ major: 0, minor: 2, capabilities: {} })));
      await once(raw, 'data');
      raw.pause();
      const read = encodeRegionReadRequest({ offset: 0n, region: Region.BAR0, count: 1 << 20 });
      for (let id = 2; id < 40; id++) raw.write(encodeMessage({ msgId: id, command: Command.REGION_READ }, read));
      await until(() => bounded.stderr.includes('unread'), STARTED_MS);
      expect(bounded.stderr).toMatch(/client disconnected \(.*left more than 2097152 bytes unread/);
      raw.destroy();
    } finally {
      await stop(bounded.child);
      socket.cleanup();
    }
  });

  test('--list-examples names every shipped device example', async () => {
    const { code, stdout } = await run(['serve', '--list-examples'], [join(root, 'dist/ts/cli/main.js')]);
    expect(code).toBe(0);
    const names = stdout.trim().split('\n').map((line) => line.split(/\s+/)[0]);
    expect(names).toEqual(expect.arrayContaining(['gpio', 'msix-device', 'nvme-doorbell']));
    expect(names).not.toContain('demo');
  });
});

/** Runs a command line in this process (no Node start per case), capturing what it prints. */
async function runHere(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = { stdout: '', stderr: '' };
  const code = await main(args, { stdout: { write: (text) => (out.stdout += text) }, stderr: { write: (text) => (out.stderr += text) } });
  return { code, ...out };
}

describe('vfio-user command line', () => {
  test('--help at the top and on every subcommand prints usage and exits 0', async () => {
    const top = await runHere(['--help']);
    expect(top.code).toBe(0);
    expect(top.stdout).toMatch(/usage: vfio-user COMMAND/);
    expect(top.stdout).toMatch(/exit status:/);
    const commands = [...top.stdout.matchAll(/^ {2}([a-z]+) {2,}/gm)].map((match) => match[1]);
    expect(commands).toEqual(expect.arrayContaining(['serve', 'lspci', 'trace']));
    for (const command of commands) {
      const sub = await runHere([command, '-h']);
      expect(sub.code, command).toBe(0);
      expect(sub.stdout, command).toMatch(new RegExp(`usage:[\\s\\S]*vfio-user ${command}`));
      expect(sub.stdout, command).toMatch(/2 +usage error/);
    }
  });

  test('usage errors exit 2 and say what was wrong', async () => {
    const cases: [string[], RegExp][] = [
      [[], /usage: vfio-user COMMAND/],
      [['frob'], /unknown command frob/],
      [['serve', '--bogus'], /Unknown option '--bogus'/],
      [['serve', 'a.ts'], /exactly one of --socket/],
      [['serve', 'a.ts', 'b.ts', '--socket', 'x'], /give one MODULE/],
      [['serve', 'a.ts', '--example', 'gpio', '--socket', 'x'], /not both/],
      [['serve', '--example', 'nope', '--socket', 'x'], /no example called nope; the examples are: .*gpio/],
      [['serve', 'a.ts', '--fd=x'], /--fd wants a file descriptor/],
      [['serve', 'a.ts', '--socket', 'x', '--mode', '999'], /--mode wants octal/],
      [['serve', 'a.ts', '--socket', 'x', '--allow-uid', '1000,me'], /--allow-uid wants a whole number from 0 to 4294967295, not me/],
      [['serve', 'a.ts', '--socket', 'x', '--allow-gid=-1'], /--allow-gid wants a whole number/],
      [['serve', 'a.ts', '--socket', 'x', '--request-timeout-ms', '0'], /--request-timeout-ms wants a whole number from 1 to 2147483647, not 0/],
      [['serve', 'a.ts', '--socket', 'x', '--max-queued-bytes', '8M'], /--max-queued-bytes wants a whole number from 1/],
      [['lspci'], /give one SOCKET/],
      [['trace', '--listen', 'x'], /give both --listen PATH and --connect PATH/],
      [['trace', '--listen', 'x', '--connect', 'y', 'z'], /unexpected argument z/],
    ];
    for (const [args, message] of cases) {
      const { code, stderr } = await runHere(args);
      expect(code, args.join(' ')).toBe(2);
      expect(stderr, args.join(' ')).toMatch(message);
      expect(stderr, args.join(' ')).toMatch(/--help|usage:/);
    }
  });

  test('the program exits with that status: 0 for --help, 2 for a usage error, 1 for a failure at run time', async () => {
    const socket = tempSocketPath();
    try {
      const [help, usage, failure] = await Promise.all([run(['serve', '--help']), run(['serve', '--bogus']), run(['lspci', socket.path])]);
      expect([help.code, usage.code, failure.code]).toEqual([0, 2, 1]);
      expect(help.stdout).toMatch(/usage:[\s\S]*vfio-user serve/);
      expect(usage.stderr).toMatch(/Unknown option '--bogus'[\s\S]*Run `vfio-user serve --help` for usage/);
      expect(failure.stderr).toMatch(/^vfio-user: .*cannot connect/m);
    } finally {
      socket.cleanup();
    }
  }, SPAWNING_TEST_MS);
});
