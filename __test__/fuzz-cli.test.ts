/**
 * `vfio-user fuzz` (run through main(), as the program runs it): exit 0 and
 * the seed when a served device holds, exit 1 with the seed and the
 * sequence when it does not, and a saved reproducer that replays. (Shrinking
 * and findings in child processes: fuzz-planted.test.ts.)
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, test } from 'vitest';
import { main } from '../ts/cli/commands.js';
import { createServer } from '../ts/index.js';
import throwingDevice from './fixtures/throwing-device.js';
import { serve } from './helpers.js';

function capture() {
  const out = { stdout: '', stderr: '' };
  return { out, io: { stdout: { write: (t: string) => (out.stdout += t) }, stderr: { write: (t: string) => (out.stderr += t) } } };
}

const dir = mkdtempSync(join(tmpdir(), 'vfu-fuzz-cli-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('vfio-user fuzz', () => {
  test('a server that holds: exit 0, the seed and the answers counted', async () => {
    const served = await serve();
    try {
      const { out, io } = capture();
      expect(await main(['fuzz', served.path, '--seed', '5', '--ops', '400'], io)).toBe(0);
      expect(out.stderr).toContain('with seed 5: 400 operations');
      expect(out.stdout).toMatch(/^400 operations in \d+ ms, seed 5; answers: .*EINVAL \d+/);
      expect(out.stdout).toContain('no finding');
    } finally {
      await served.close();
    }
  });

  test('a device that throws: exit 1 with the seed and the sequence; the saved reproducer replays', async () => {
    // Served here, not by serve() from helpers.ts: its device errors are this test's point.
    const server = createServer(throwingDevice);
    const path = join(dir, 'throwing.sock');
    await server.listen(path);
    try {
      const saved = join(dir, 'finding.json');
      const { out, io } = capture();
      expect(await main(['fuzz', path, '--seed', '9', '--save', saved], io)).toBe(1);
      expect(out.stdout).toMatch(/FINDING \(device-error\) after \d+ operations, seed 9: EIO answered to REGION_READ/);
      // Over a socket nothing restarts the server: the sequence is not shrunk.
      expect(out.stdout).toMatch(/reproducer \(\d+ operations, not confirmed\):\n {2}\{"mode":"pci"/);
      const file = JSON.parse(readFileSync(saved, 'utf8'));
      expect(file).toMatchObject({ seed: 9, modes: ['pci'], finding: { kind: 'device-error' } });
      const replay = capture();
      expect(await main(['fuzz', path, '--replay', saved], replay.io)).toBe(1);
      expect(replay.out.stdout).toContain(`FINDING (device-error) after ${file.ops.length} operations`);
    } finally {
      await server.close();
    }
  });

  test('usage: one target, known modes', async () => {
    const { out, io } = capture();
    expect(await main(['fuzz'], io)).toBe(2);
    expect(await main(['fuzz', 'a.sock', '--example', 'gpio'], io)).toBe(2);
    expect(await main(['fuzz', 'a.sock', '--seed', '-1'], io)).toBe(2);
    expect(out.stderr).toContain('give one SOCKET, or --serve MODULE, or --example NAME');
    await expect(main(['fuzz', 'a.sock', '--mode', 'nope'], io)).rejects.toThrow(/no fuzz mode called nope; the modes are: pci, nvme, virtio/);
  });
});
