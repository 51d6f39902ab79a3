/**
 * Boots the guest kit (scripts/peers/mkguest.sh, built into VFIO_USER_GUEST) under the QEMU in
 * VFIO_USER_QEMU, TCG only, with one vfio-user-pci device per socket, runs a shell script in it
 * as /test.sh and hands back its exit status and the console. The kit's `init`
 * (scripts/peers/guest-init) reports the status as `=== GUEST TEST RC=n`;
 * scripts/peers/run-guest.sh does the same from a shell, this does it from a test so the test
 * can watch the console while the guest runs (and act on a line it prints).
 *
 * The script travels in a second initramfs archive appended to the kit's (Linux unpacks both),
 * with any extra files the test adds.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';

export const QEMU = process.env.VFIO_USER_QEMU;
export const GUEST = process.env.VFIO_USER_GUEST;

export interface BootOptions {
  /** Run by busybox sh as /test.sh. */
  script: string;
  /** vfio-user server sockets, one vfio-user-pci device each. */
  sockets?: string[];
  /**
   * Each device behind a PCIe root port of its own, as a PCIe endpoint sits on real hardware.
   * On q35's root bus QEMU presents an endpoint as a Root Complex Integrated Endpoint instead.
   */
  rootPorts?: boolean;
  /** More QEMU arguments, as they are. */
  qemuArgs?: string[];
  /** Every console line (CR stripped), as it arrives. */
  onLine?: (line: string) => void;
  /** The whole run, boot included (default 240 s: TCG on a shared machine). */
  timeoutMs?: number;
  /** Ends the guest early (QEMU killed; `rc` is then null unless the script had reported). */
  signal?: AbortSignal;
  mem?: string;
}

export interface GuestRun {
  /** The script's exit status, or null if the guest never reported one. */
  rc: number | null;
  console: string;
  /** Why QEMU stopped, for messages. */
  exit: string;
}

/** One newc cpio entry (a regular file, root-owned). */
function cpioEntry(name: string, data: Buffer, mode: number, ino: number): Buffer {
  const hex = (n: number) => n.toString(16).padStart(8, '0');
  const nameBytes = Buffer.from(`${name}\0`);
  const fields = [ino, mode, 0, 0, 1, 0, data.length, 0, 0, 0, 0, nameBytes.length, 0];
  const header = Buffer.from(`070701${fields.map(hex).join('')}`);
  const pad = (n: number) => Buffer.alloc((4 - (n % 4)) % 4);
  return Buffer.concat([header, nameBytes, pad(header.length + nameBytes.length), data, pad(data.length)]);
}

/** A gzipped newc archive of `files` (name -> bytes; mode 0755) with its trailer. */
export function cpioArchive(files: Record<string, Buffer>): Buffer {
  const entries = Object.entries(files).map(([name, data], i) => cpioEntry(name, data, 0o100755, i + 1));
  entries.push(cpioEntry('TRAILER!!!', Buffer.alloc(0), 0, 0));
  return gzipSync(Buffer.concat(entries));
}

/** QEMU's -device for a vfio-user-pci device on `socket`, behind root port `port` if given. */
export function vfioUserPci(socket: string, port?: number): string[] {
  const device = { driver: 'vfio-user-pci', socket: { path: socket, type: 'unix' }, ...(port === undefined ? {} : { bus: `rp${port}` }) };
  const rootPort = port === undefined ? [] : ['-device', `pcie-root-port,id=rp${port},chassis=${port + 1}`];
  return [...rootPort, '-device', JSON.stringify(device)];
}

export function bootGuest(options: BootOptions): Promise<GuestRun> {
  if (!QEMU || !GUEST) throw new Error('VFIO_USER_QEMU and VFIO_USER_GUEST must name QEMU and the guest kit');
  const mem = options.mem ?? '1G';
  const initrd = Buffer.concat([
    readFileSync(join(GUEST, 'initramfs.cpio.gz')),
    cpioArchive({ 'test.sh': Buffer.from(options.script) }),
  ]);
  const dir = mkdtempSync(join(tmpdir(), 'vfio-user-guest-'));
  const initrdPath = join(dir, 'initrd');
  writeFileSync(initrdPath, initrd);
  const args = [
    '-accel', 'tcg', '-nodefaults', '-nographic', '-no-reboot', '-serial', 'stdio', '-smp', '1', '-m', mem,
    // vfio-user servers map guest memory from a shared memfd.
    '-object', `memory-backend-memfd,id=mem,size=${mem},share=on`, '-machine', 'q35,memory-backend=mem',
    '-kernel', join(GUEST, 'vmlinuz'), '-initrd', initrdPath,
    // no_timer_check: on a loaded host TCG can miss the kernel's IO-APIC timer check, which panics.
    '-append', 'console=ttyS0 panic=-1 loglevel=4 edd=off no_timer_check',
    ...(options.sockets ?? []).flatMap((socket, i) => vfioUserPci(socket, options.rootPorts ? i : undefined)),
    ...(options.qemuArgs ?? []),
  ];
  const qemu = spawn(QEMU, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  let partial = '';
  const take = (chunk: Buffer) => {
    // SeaBIOS sends terminal resets and escape sequences; lines end in CRLF.
    const text = chunk.toString('latin1').replace(/\x1b\[[0-9;?]*[A-Za-z]|\x1bc|\r/g, '');
    output += text;
    partial += text;
    const lines = partial.split('\n');
    partial = lines.pop()!;
    for (const line of lines) options.onLine?.(line);
  };
  qemu.stdout.on('data', take);
  qemu.stderr.on('data', take);
  const timer = setTimeout(() => qemu.kill('SIGKILL'), options.timeoutMs ?? 240_000);
  const stop = () => qemu.kill('SIGKILL');
  if (options.signal?.aborted) stop();
  options.signal?.addEventListener('abort', stop);
  return new Promise((resolve) => {
    qemu.on('close', (code, signal) => {
      clearTimeout(timer);
      options.signal?.removeEventListener('abort', stop);
      rmSync(dir, { recursive: true, force: true });
      const reported = [...output.matchAll(/=== GUEST TEST RC=(\d{1,3})/g)].pop();
      resolve({
        rc: reported ? Number(reported[1]) : null,
        console: output,
        exit: signal ? `QEMU killed by ${signal}` : `QEMU exited with ${code}`,
      });
    });
  });
}

/** The lines a script printed between `=== NAME BEGIN` and `=== NAME END`. */
export function section(console: string, name: string): string {
  const match = new RegExp(`=== ${name} BEGIN\\n([\\s\\S]*?)=== ${name} END`).exec(console);
  if (!match) throw new Error(`the guest printed no ${name} section:\n${console.slice(-4000)}`);
  return match[1];
}
