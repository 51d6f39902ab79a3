/** Migration v2 state machine (§7) and DEVICE_FEATURE rules (§6.14), against CounterDevice over real sockets. */
import { afterEach, describe, expect, test } from 'vitest';
import { Command, Errno, MigrationFlags, MigrationState as S, PciDevice, Region, type VfioUserClient } from '../ts/index.js';
import * as protocol from '../ts/protocol/index.js';
import { migrationPath } from '../ts/server/migration/index.js';
import { serve, until, type Served } from './helpers.js';
import { CounterDevice, SCRATCH } from './migration-device.js';

const { DeviceFeatureFlags: FF, FeatureIndex: F } = protocol;
const name = (s: number) => Object.entries(S).find(([, v]) => v === s)![0];
const MAIN = [S.STOP, S.RUNNING, S.STOP_COPY, S.RESUMING, S.PRE_COPY];

let served: Served<CounterDevice> | undefined;
afterEach(async () => {
  await served?.close();
  served = undefined;
});

async function start(options: { preCopy?: boolean; deviceErrors?: 'expected' } = {}): Promise<{ device: CounterDevice; client: VfioUserClient }> {
  served = await serve(new CounterDevice({ preCopy: options.preCopy }), { deviceErrors: options.deviceErrors });
  return { device: served.device, client: await served.client() };
}

/** A raw DEVICE_FEATURE request, for combinations the encoder refuses to build. */
function rawFeature(client: VfioUserClient, argsz: number, flags: number, data: Uint8Array = Buffer.alloc(0)): Promise<{ payload: Buffer }> {
  const b = Buffer.alloc(8 + data.length);
  b.writeUInt32LE(argsz, 0);
  b.writeUInt32LE(flags, 4);
  b.set(data, 8);
  return (client as any).request(Command.DEVICE_FEATURE, b);
}

const einval = { errno: Errno.EINVAL, command: Command.DEVICE_FEATURE };

describe('migrationPath: the arc table and the shortest paths', () => {
  // What kernel VFIO's vfio_mig_get_next_state walks, without the P2P states.
  const expected: Record<string, string | undefined> = {
    'STOP>RUNNING': 'RUNNING', 'STOP>STOP_COPY': 'STOP_COPY', 'STOP>RESUMING': 'RESUMING', 'STOP>PRE_COPY': 'RUNNING PRE_COPY',
    'RUNNING>STOP': 'STOP', 'RUNNING>STOP_COPY': 'STOP STOP_COPY', 'RUNNING>RESUMING': 'STOP RESUMING', 'RUNNING>PRE_COPY': 'PRE_COPY',
    'STOP_COPY>STOP': 'STOP', 'STOP_COPY>RUNNING': 'STOP RUNNING', 'STOP_COPY>RESUMING': 'STOP RESUMING', 'STOP_COPY>PRE_COPY': undefined,
    'RESUMING>STOP': 'STOP', 'RESUMING>RUNNING': 'STOP RUNNING', 'RESUMING>STOP_COPY': 'STOP STOP_COPY', 'RESUMING>PRE_COPY': 'STOP RUNNING PRE_COPY',
    'PRE_COPY>STOP': 'RUNNING STOP', 'PRE_COPY>RUNNING': 'RUNNING', 'PRE_COPY>STOP_COPY': 'STOP_COPY', 'PRE_COPY>RESUMING': 'RUNNING STOP RESUMING',
  };

  test('every pair of states, with PRE_COPY offered', () => {
    for (const from of MAIN) {
      for (const to of MAIN) {
        const path = migrationPath(from, to, true)?.map(name).join(' ');
        expect(path, `${name(from)}>${name(to)}`).toBe(from === to ? '' : expected[`${name(from)}>${name(to)}`]);
      }
    }
  });

  test('without PRE_COPY its arcs are gone and the rest is unchanged', () => {
    for (const from of MAIN) {
      for (const to of MAIN) {
        const path = migrationPath(from, to, false);
        if (from === S.PRE_COPY || to === S.PRE_COPY) expect(path).toBeUndefined();
        else expect(path).toEqual(migrationPath(from, to, true));
      }
    }
  });

  test('saving states are never inside a path', () => {
    for (const from of MAIN) {
      for (const to of MAIN) {
        const inner = migrationPath(from, to, true)?.slice(0, -1) ?? [];
        expect(inner.filter((s) => s === S.PRE_COPY || s === S.STOP_COPY), `${name(from)}>${name(to)}`).toEqual([]);
      }
    }
  });

  test('ERROR, the P2P states and unknown values have no path', () => {
    for (const bad of [S.ERROR, S.RUNNING_P2P, S.PRE_COPY_P2P, 8, 0xffffffff]) {
      expect(migrationPath(S.RUNNING, bad as S, true)).toBeUndefined();
      expect(migrationPath(bad as S, S.RUNNING, true)).toBeUndefined();
    }
  });
});

describe('MIG_DEVICE_STATE over the wire', () => {
  test('every arc, each calling the device hook it needs', async () => {
    const { device, client } = await start({ preCopy: true });
    const m = client.migration;
    expect(await m.state()).toBe(S.RUNNING);
    const steps: [S, string[]][] = [
      [S.PRE_COPY, ['save:precopy:0']],
      [S.RUNNING, []],
      [S.STOP, ['stop']],
      [S.STOP_COPY, ['save:stopcopy:0']],
      [S.STOP, []],
      [S.RESUMING, []],
      [S.STOP, []], // nothing was written: nothing to load
      [S.RUNNING, ['start']],
      [S.PRE_COPY, ['save:precopy:0']],
      [S.STOP_COPY, ['stop', 'save:stopcopy:1']], // the precopy session goes on
      [S.STOP, []],
      [S.RUNNING, ['start']],
    ];
    for (const [state, calls] of steps) {
      device.calls.length = 0;
      await m.setState(state);
      expect(await m.state(), name(state)).toBe(state);
      expect(device.calls, name(state)).toEqual(calls);
    }
    expect(device.running).toBe(true);
  });

  test('multi-arc transitions take the shortest path', async () => {
    const { device, client } = await start({ preCopy: true });
    const m = client.migration;
    await m.setState(S.STOP_COPY); // RUNNING → STOP → STOP_COPY
    expect(device.calls).toEqual(['stop', 'save:stopcopy:0']);
    await m.setState(S.RESUMING); // via STOP
    await m.setState(S.RUNNING); // RESUMING → STOP → RUNNING
    expect(await m.state()).toBe(S.RUNNING);
    device.calls.length = 0;
    await m.setState(S.PRE_COPY);
    await m.setState(S.STOP); // PRE_COPY → RUNNING → STOP, never through STOP_COPY
    expect(device.calls).toEqual(['save:precopy:0', 'stop']);
    expect(await m.state()).toBe(S.STOP);
  });

  test('STOP_COPY → PRE_COPY is refused and changes nothing', async () => {
    const { device, client } = await start({ preCopy: true });
    await client.migration.setState(S.STOP_COPY);
    device.calls.length = 0;
    await expect(client.migration.setState(S.PRE_COPY)).rejects.toMatchObject(einval);
    expect(await client.migration.state()).toBe(S.STOP_COPY);
    expect(device.calls).toEqual([]);
  });

  test('ERROR, P2P states, unknown values and unoffered PRE_COPY are EINVAL', async () => {
    const { client } = await start();
    expect(await client.migration.flags()).toBe(MigrationFlags.STOP_COPY);
    for (const bad of [S.ERROR, S.RUNNING_P2P, S.PRE_COPY_P2P, 8, 0xffffffff, S.PRE_COPY]) {
      await expect(client.migration.setState(bad as S), `state ${bad}`).rejects.toMatchObject(einval);
    }
    expect(await client.migration.state()).toBe(S.RUNNING);
  });

  test('a failed arc fails the device (EIO until DEVICE_RESET) and leaves it in the state it was in', async () => {
    const { device, client } = await start({ deviceErrors: 'expected' });
    const errors: Error[] = [];
    served!.server.on('deviceError', (error) => errors.push(error));
    device.failing.add('save:stopcopy');
    await expect(client.migration.setState(S.STOP_COPY)).rejects.toMatchObject({ errno: Errno.EIO, command: Command.DEVICE_FEATURE });
    expect(errors.map((e) => e.message)).toEqual(['save:stopcopy:0 failed']);
    await expect(client.migration.state()).rejects.toMatchObject({ errno: Errno.EIO });
    device.failing.clear();
    await client.reset();
    expect(await client.migration.state()).toBe(S.STOP); // RUNNING → STOP succeeded, STOP → STOP_COPY did not
    await client.migration.setState(S.STOP_COPY);
  });

  test('an arc that cannot be undone puts the device in ERROR; only DEVICE_RESET leaves it', async () => {
    const { device, client } = await start({ preCopy: true, deviceErrors: 'expected' });
    const errors: Error[] = [];
    served!.server.on('deviceError', (error) => errors.push(error));
    await client.migration.setState(S.PRE_COPY);
    device.failing.add('save:stopcopy').add('start'); // PRE_COPY → STOP_COPY stops, fails to save, cannot restart
    await expect(client.migration.setState(S.STOP_COPY)).rejects.toMatchObject({ errno: Errno.EIO });
    await expect(client.migration.state()).rejects.toMatchObject({ errno: Errno.EIO }); // failed: nothing reaches it
    await expect(client.reset()).rejects.toMatchObject({ errno: Errno.EIO }); // the reset works, leaving ERROR does not: start fails
    await expect(client.migration.state()).rejects.toMatchObject({ errno: Errno.EIO });
    expect(errors.map((e) => e.message)).toEqual(['save:stopcopy:1 failed', 'start failed']);
    device.failing.clear();
    await client.reset();
    expect(await client.migration.state()).toBe(S.RUNNING);
    expect(device.running).toBe(true);
  });

  test('DEVICE_RESET does not change the migration state', async () => {
    const { device, client } = await start({ preCopy: true });
    await client.migration.setState(S.PRE_COPY);
    await client.reset();
    expect(await client.migration.state()).toBe(S.PRE_COPY);
    await client.migration.setState(S.STOP);
    await client.reset();
    expect(await client.migration.state()).toBe(S.STOP);
    expect(device.running).toBe(false);
  });
});

describe('DEVICE_FEATURE rules', () => {
  test('PROBE answers for the operations asked, echoes the request and changes nothing', async () => {
    const { client } = await start();
    const state = protocol.encodeMigDeviceState({ deviceState: S.STOP });
    const probe = await rawFeature(client, 16, FF.PROBE | FF.GET | FF.SET | F.MIG_DEVICE_STATE, state);
    expect(probe.payload.toString('hex')).toBe(Buffer.concat([Buffer.from('1000000002000700', 'hex'), state]).toString('hex'));
    expect(await client.migration.state()).toBe(S.RUNNING);
    await rawFeature(client, 8, FF.PROBE | F.DMA_LOGGING_REPORT); // the feature exists
    await rawFeature(client, 8, FF.PROBE | FF.SET | F.DMA_LOGGING_START);
    expect(await client.migration.supported()).toBe(true);
    await expect(rawFeature(client, 8, FF.PROBE | FF.SET | F.MIGRATION)).rejects.toMatchObject(einval);
    await expect(rawFeature(client, 8, FF.PROBE | FF.GET | F.DMA_LOGGING_STOP)).rejects.toMatchObject(einval);
  });

  test('GET and SET: exclusive without PROBE, one of them needed, each only where supported', async () => {
    const { client } = await start();
    await expect(rawFeature(client, 16, FF.GET | FF.SET | F.MIG_DEVICE_STATE, Buffer.alloc(8))).rejects.toMatchObject(einval);
    await expect(rawFeature(client, 16, F.MIG_DEVICE_STATE, Buffer.alloc(8))).rejects.toMatchObject(einval);
    await expect(rawFeature(client, 16, FF.SET | F.MIGRATION, Buffer.alloc(8))).rejects.toMatchObject(einval);
    await expect(rawFeature(client, 32, FF.SET | F.DMA_LOGGING_REPORT, Buffer.alloc(24))).rejects.toMatchObject(einval);
    await expect(rawFeature(client, 16, FF.GET | 3)).rejects.toMatchObject({ errno: Errno.ENOTSUP, command: Command.DEVICE_FEATURE });
  });

  test('GET appends its data and sets argsz; a too small argsz or short SET data is EINVAL; SET echoes', async () => {
    const { client } = await start({ preCopy: true });
    const get = await rawFeature(client, 64, FF.GET | F.MIGRATION);
    expect(get.payload.toString('hex')).toBe('10000000' + '01000100' + '0500000000000000');
    await expect(rawFeature(client, 15, FF.GET | F.MIGRATION)).rejects.toMatchObject(einval);
    await expect(rawFeature(client, 12, FF.GET | F.MIG_DEVICE_STATE)).rejects.toMatchObject(einval);
    await expect(rawFeature(client, 12, FF.SET | F.MIG_DEVICE_STATE, Buffer.alloc(4))).rejects.toMatchObject(einval);
    const state = protocol.encodeMigDeviceState({ deviceState: S.STOP });
    await expect(rawFeature(client, 8, FF.SET | F.MIG_DEVICE_STATE, state)).rejects.toMatchObject(einval);
    const set = await rawFeature(client, 16, FF.SET | F.MIG_DEVICE_STATE, state);
    expect(set.payload.toString('hex')).toBe('1000000002000200' + state.toString('hex'));
    expect(await client.migration.state()).toBe(S.STOP);
  });
});

describe('migration data and device access by state', () => {
  test('MIG_DATA_READ only in PRE_COPY and STOP_COPY, MIG_DATA_WRITE only in RESUMING', async () => {
    const { client } = await start({ preCopy: true });
    const m = client.migration;
    const readFails = { errno: Errno.EINVAL, command: Command.MIG_DATA_READ };
    const writeFails = { errno: Errno.EINVAL, command: Command.MIG_DATA_WRITE };
    for (const state of [S.RUNNING, S.STOP, S.RESUMING]) {
      await m.setState(state);
      await expect(m.read(), name(state)).rejects.toMatchObject(readFails);
    }
    for (const state of [S.RUNNING, S.STOP, S.PRE_COPY]) {
      await m.setState(state);
      await expect(m.write(Buffer.alloc(8)), name(state)).rejects.toMatchObject(writeFails);
    }
    await expect(m.read()).resolves.toBeInstanceOf(Buffer);
    await expect(client.migDataRead(2 * 1024 * 1024)).rejects.toMatchObject({ errno: Errno.E2BIG, command: Command.MIG_DATA_READ });
    await m.setState(S.STOP_COPY);
    await expect(m.read()).resolves.toBeInstanceOf(Buffer);
    await expect(m.write(Buffer.alloc(8))).rejects.toMatchObject(writeFails);
  });

  test('a short read ends the data; in PRE_COPY a further read asks the device for another unit', async () => {
    const { device, client } = await start({ preCopy: true });
    const m = client.migration;
    await m.setState(S.PRE_COPY);
    const first = await m.readAll();
    expect(first.length).toBeGreaterThan(64 * 1024);
    expect(device.calls).toEqual(['save:precopy:0']);
    await client.regionWrite(Region.BAR0, 0x3000n, Buffer.from('dirty'));
    const second = await m.readAll();
    expect(device.calls).toEqual(['save:precopy:0', 'save:precopy:1']);
    expect(second.length).toBeLessThan(8 * 1024); // one page and the headers
    await m.setState(S.STOP_COPY);
    await m.readAll();
    expect((await m.read()).length).toBe(0); // STOP_COPY's end is final
    expect(device.calls.at(-1)).toBe('save:stopcopy:2');
  });

  test('MIG_DATA_READ replies are padded to the size asked for; size says how much is data', async () => {
    const { client } = await start();
    await client.migration.setState(S.STOP_COPY);
    const read = async () => (await (client as any).request(Command.MIG_DATA_READ, protocol.encodeMigDataReadRequest({ size: 4096 }))).payload as Buffer;
    let last: Buffer;
    do {
      last = await read();
      expect(last.length).toBe(8 + 4096); // libvfio-user's client fails on a shorter reply
    } while (last.readUInt32LE(4) === 4096);
    expect((await client.migration.read(4096)).length).toBe(0);
  });

  test('in STOP_COPY reads are served, natively too, and changes are refused; in STOP they go through', async () => {
    const { device, client } = await start();
    await client.regionWrite(Region.CONFIG, BigInt(SCRATCH), Buffer.from([1, 2, 3, 4]));
    await client.migration.setState(S.STOP_COPY);
    const nativeBefore = served!.server.session!.readsAnsweredNatively;
    expect([...(await client.regionRead(Region.CONFIG, BigInt(SCRATCH), 4))]).toEqual([1, 2, 3, 4]);
    expect(served!.server.session!.readsAnsweredNatively).toBe(nativeBefore + 1);
    expect((await client.regionRead(Region.BAR0, 0n, 4)).readUInt32LE(0)).toBe(0);
    const frozen = (command: number) => ({ errno: Errno.EINVAL, command });
    await expect(client.regionWrite(Region.CONFIG, BigInt(SCRATCH), Buffer.from([9]))).rejects.toMatchObject(frozen(Command.REGION_WRITE));
    await expect(client.reset()).rejects.toMatchObject(frozen(Command.DEVICE_RESET));
    expect(device.config[SCRATCH]).toBe(1);
    await client.migration.setState(S.STOP);
    await client.regionWrite(Region.BAR0, 0n, Buffer.from([5, 0, 0, 0]));
    expect(device.counter).toBe(5);
  });
});

describe('a client leaving mid-migration', () => {
  test('the device returns to RUNNING for the next client', async () => {
    const { device, client } = await start({ preCopy: true });
    await client.migration.setState(S.STOP_COPY);
    client.close();
    await until(() => device.running);
    expect(device.calls).toEqual(['stop', 'save:stopcopy:0', 'start']);
    const next = await served!.client();
    expect(await next.migration.state()).toBe(S.RUNNING);
  });

  test('data written for RESUMING is dropped, not loaded', async () => {
    const { device, client } = await start();
    await client.migration.setState(S.RESUMING);
    await client.migration.write(Buffer.alloc(100));
    client.close();
    await until(() => device.running);
    expect(device.calls).toEqual(['stop', 'start']);
    const next = await served!.client();
    expect(await next.migration.state()).toBe(S.RUNNING);
  });

  test('a device failed into ERROR is reset for the next client, out of ERROR too', async () => {
    const { device, client } = await start({ preCopy: true, deviceErrors: 'expected' });
    await client.migration.setState(S.PRE_COPY);
    device.failing.add('save:stopcopy').add('start');
    await expect(client.migration.setState(S.STOP_COPY)).rejects.toThrow();
    client.close();
    device.failing.clear();
    const next = await served!.client();
    expect(await next.migration.state()).toBe(S.RUNNING);
    expect(device.running).toBe(true);
  });
});

test('devices without migration answer ENOTSUP, and the client says so', async () => {
  const gpio = await serve(new PciDevice({ vendorId: 0x1234, deviceId: 0x5678, classCode: 0, migration: false }));
  try {
    const client = await gpio.client();
    expect(await client.migration.supported()).toBe(false);
    await expect(client.migration.state()).rejects.toMatchObject({ errno: Errno.ENOTSUP, command: Command.DEVICE_FEATURE });
  } finally {
    await gpio.close();
  }
});
