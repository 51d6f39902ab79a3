/** The NVMe controller's per-command trace: DEBUG=vfio-user:nvme prints where each command's time went. */
import { afterEach, describe, expect, test } from 'vitest';
import createDevice from '../examples/nvme/index.js';
import { CommandTrace, STAGES } from '../examples/nvme/trace.js';
import { debugRequested } from '../ts/index.js';
import { testCleanups } from './cleanups.js';
import { attachNvme, bringUpNvme, Op, S, SETUPS } from './nvme-setup.js';

const cleanups = testCleanups();
const debug = process.env.DEBUG;
afterEach(() => {
  if (debug === undefined) delete process.env.DEBUG;
  else process.env.DEBUG = debug;
});

describe.each(SETUPS)('with %s doorbells', (setup) => {
  test('each command is traced through its stages, in order, once its interrupt is signalled', async () => {
    const { served, host } = await bringUpNvme(cleanups, setup);
    const lines: string[] = [];
    const trace = (served.device.trace = new CommandTrace((line) => lines.push(line)));
    const page = host.alloc(4096);
    for (let i = 0; i < 3; i++) expect((await host.submit(1, { opcode: Op.READ, nsid: 1, prp1: page, cdw10: i, cdw12: 7 })).status).toBe(S.SUCCESS);
    expect(lines).toHaveLength(3);
    // A doorbell stored to the mapped page is seen when native code finds it; a trapped write or a kick when it reaches JS.
    const found = setup === 'mmap';
    const stages = 'fetched \\+[\\d.]+, submitted \\+[\\d.]+, done \\+[\\d.]+, posted \\+[\\d.]+, interrupted \\+[\\d.]+';
    const line = found ? `seen \\+[\\d.]+, ${stages} µs from its doorbell seen` : `${stages} µs from its doorbell batch reaching JS`;
    for (const l of lines) expect(l).toMatch(new RegExp(`^vfio-user:nvme: sq 1 cid \\d+ opcode 0x2: ${line}$`));
    for (const stage of STAGES) expect(trace.samples[stage]).toHaveLength(3);
    for (let i = 0; i < 3; i++) {
      const times = STAGES.map((stage) => trace.samples[stage][i]);
      expect(Number.isFinite(times[0])).toBe(found);
      const reached = found ? times : times.slice(1);
      expect(reached.every((t) => t >= 0)).toBe(true);
      expect([...reached].sort((a, b) => a - b)).toEqual(reached);
    }
  });
});

test('DEBUG=vfio-user:nvme turns the trace on, without the message log; other values leave it off', async () => {
  process.env.DEBUG = 'vfio-user:nvme';
  expect(debugRequested()).toBe(false);
  const traced = createDevice(['--size', '1M']);
  cleanups.defer(() => traced.close());
  expect(traced.trace).toBeInstanceOf(CommandTrace);
  for (const value of ['vfio-user', 'vfio-user:*,-vfio-user:nvme', '']) {
    process.env.DEBUG = value;
    const device = createDevice(['--size', '1M']);
    cleanups.defer(() => device.close());
    expect(device.trace).toBeUndefined();
  }
  process.env.DEBUG = 'vfio-user:*';
  const { served } = await attachNvme(cleanups, createDevice(['--size', '1M']));
  expect(served.device.trace).toBeInstanceOf(CommandTrace);
});
