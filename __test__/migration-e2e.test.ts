/** Live migration end to end: a device moved between two servers through two clients. */
import { afterEach, describe, expect, test } from 'vitest';
import { Command, Errno, migrate, MigrationState as S, Region, type VfioUserClient } from '../ts/index.js';
import { serve, type Served } from './helpers.js';
import { BAR_PAGE, CounterDevice, SCRATCH } from './migration-device.js';

const servers: Served<CounterDevice>[] = [];
afterEach(async () => {
  for (const s of servers.splice(0)) await s.close();
});

async function pair(options: { preCopy?: boolean; fullStopCopy?: boolean; destinationErrors?: 'expected' } = {}) {
  const { preCopy, fullStopCopy } = options;
  const source = await serve(new CounterDevice({ preCopy, fullStopCopy }));
  const destination = await serve(new CounterDevice({ preCopy, fullStopCopy }), { deviceErrors: options.destinationErrors });
  servers.push(source, destination);
  return { source, destination, from: await source.client(), to: await destination.client() };
}

/** Gives the device state through the client, as a guest would. */
async function exercise(client: VfioUserClient, seed: number): Promise<void> {
  await client.regionWrite(Region.CONFIG, BigInt(SCRATCH), Buffer.from([seed, seed + 1, seed + 2, seed + 3]));
  await client.regionWrite(Region.BAR0, 0n, Buffer.from([seed, 0, 0, 0]));
  await client.regionWrite(Region.BAR0, 0n, Buffer.from([1, 1, 0, 0]));
  await client.regionWrite(Region.BAR0, BigInt(7 * BAR_PAGE + 12), Buffer.from(`page seven ${seed}`));
}

describe('migrate()', () => {
  test('stop-copy only: the destination ends up with the source’s state and runs it', async () => {
    const { source, destination, from, to } = await pair();
    await exercise(from, 40);
    const result = await migrate(from, to);
    expect(result.precopyBytes).toBe(0);
    expect(result.stopCopyBytes).toBeGreaterThan(64 * 1024);
    expect(destination.device.snapshot().equals(source.device.snapshot())).toBe(true);
    expect(destination.device.counter).toBe(40 + 0x101);
    expect(await from.migration.state()).toBe(S.STOP);
    expect(await to.migration.state()).toBe(S.RUNNING);
    expect(source.device.running).toBe(false);
    expect(destination.device.running).toBe(true);
    expect(destination.device.calls).toEqual(['stop', 'load:stopcopy:0', 'start']);
    // The guest carries on at the destination; REGION_READ sees the migrated bytes.
    expect((await to.regionRead(Region.CONFIG, BigInt(SCRATCH), 4)).toString('hex')).toBe('28292a2b');
    await to.regionWrite(Region.BAR0, 0n, Buffer.from([1, 0, 0, 0]));
    expect(destination.device.counter).toBe(40 + 0x101 + 1);
  });

  test('with PRE_COPY: bulk data while running, then only what changed', async () => {
    const { source, destination, from, to } = await pair({ preCopy: true });
    await exercise(from, 7);
    const result = await migrate(from, to);
    expect(result.precopyBytes).toBeGreaterThan(64 * 1024);
    expect(result.stopCopyBytes).toBeLessThan(1024); // nothing changed: config, counter, no pages
    expect(destination.device.snapshot().equals(source.device.snapshot())).toBe(true);
    expect(destination.device.calls).toEqual(['stop', 'load:precopy:0', 'load:stopcopy:1', 'start']);
  });

  test('a full stop-copy unit starts the stream over; the destination loads only it', async () => {
    const { source, destination, from, to } = await pair({ preCopy: true, fullStopCopy: true });
    await exercise(from, 9);
    const result = await migrate(from, to);
    expect(result.precopyBytes).toBeGreaterThan(64 * 1024);
    expect(result.stopCopyBytes).toBeGreaterThan(64 * 1024); // the whole state again
    expect(destination.device.snapshot().equals(source.device.snapshot())).toBe(true);
    expect(source.device.calls).toEqual(['save:precopy:0', 'stop', 'save:stopcopy:0']);
    expect(destination.device.calls).toEqual(['stop', 'load:stopcopy:0', 'start']);
  });

  test('a migration that fails sets the source running again', async () => {
    const { source, destination, from, to } = await pair({ destinationErrors: 'expected' });
    destination.device.failing.add('load:stopcopy');
    await expect(migrate(from, to)).rejects.toMatchObject({ errno: Errno.EIO, command: Command.DEVICE_FEATURE });
    expect(await from.migration.state()).toBe(S.RUNNING);
    expect(source.device.running).toBe(true);
    // The destination's device failed: EIO until its reset, which leaves the migration state alone.
    await expect(to.migration.state()).rejects.toMatchObject({ errno: Errno.EIO });
    await to.reset();
    expect(await to.migration.state()).toBe(S.RESUMING); // the first unit was refused: nothing was applied
  });
});

describe('by hand, as a VMM iterating PRE_COPY', () => {
  test('writes while pre-copying travel in later units; the destination loads them in order', async () => {
    const { source, destination, from, to } = await pair({ preCopy: true });
    await exercise(from, 1);
    await to.migration.setState(S.RESUMING);
    await from.migration.setState(S.PRE_COPY);
    await to.migration.write(await from.migration.readAll());
    await from.regionWrite(Region.BAR0, BigInt(3 * BAR_PAGE), Buffer.from('written during pre-copy'));
    await to.migration.write(await from.migration.readAll()); // a second precopy unit
    await from.regionWrite(Region.BAR0, BigInt(9 * BAR_PAGE), Buffer.from('and after it'));
    await from.regionWrite(Region.CONFIG, BigInt(SCRATCH), Buffer.from([0xee]));
    // A third unit, read only in part: the stop-copy stream starts with the rest of it.
    await from.regionWrite(Region.BAR0, BigInt(11 * BAR_PAGE), Buffer.from('x'));
    await to.migration.write(await from.migration.read(16));
    await from.migration.setState(S.STOP_COPY);
    await to.migration.write(await from.migration.readAll());
    await to.migration.setState(S.RUNNING);
    expect(destination.device.snapshot().equals(source.device.snapshot())).toBe(true);
    expect(destination.device.calls).toEqual(['stop', 'load:precopy:0', 'load:precopy:1', 'load:precopy:2', 'load:stopcopy:3', 'start']);
  });

  test('a truncated, foreign or reordered stream fails RESUMING → STOP with EINVAL, before the device sees it', async () => {
    const { from, to, destination } = await pair({ preCopy: true });
    await from.migration.setState(S.PRE_COPY);
    const precopy = await from.migration.readAll();
    await from.regionWrite(Region.BAR0, 0n, Buffer.from([1, 0, 0, 0]));
    const second = await from.migration.readAll();
    const bad = { errno: Errno.EINVAL, command: Command.DEVICE_FEATURE };
    await to.migration.setState(S.RESUMING);
    for (const stream of [precopy.subarray(0, precopy.length - 1), Buffer.from('not a migration stream'), second]) {
      await to.migration.write(stream);
      await expect(to.migration.setState(S.STOP)).rejects.toMatchObject(bad);
      expect(await to.migration.state()).toBe(S.RESUMING); // the data was dropped: write it again
    }
    expect(destination.device.calls).toEqual(['stop']);
    await to.migration.write(Buffer.concat([precopy, second]));
    await to.migration.setState(S.STOP);
    expect(destination.device.calls).toEqual(['stop', 'load:precopy:0', 'load:precopy:1']);
  });

  test('as libvfio-user\'s client: pre-copy data read in part and dropped, only the stop-copy data carried', async () => {
    const { source, destination, from, to } = await pair({ preCopy: true, fullStopCopy: true });
    await exercise(from, 3);
    await from.migration.setState(S.PRE_COPY);
    expect((await from.migration.read(4096)).length).toBe(4096); // the rest of the unit stays unread
    await from.regionWrite(Region.BAR0, BigInt(5 * BAR_PAGE), Buffer.from('after the pre-copy read'));
    await from.migration.setState(S.STOP_COPY);
    const stopCopy = await from.migration.readAll();
    await to.migration.setState(S.RESUMING);
    await to.migration.write(stopCopy);
    await to.migration.setState(S.RUNNING);
    expect(destination.device.snapshot().equals(source.device.snapshot())).toBe(true);
    expect(destination.device.calls).toEqual(['stop', 'load:stopcopy:0', 'start']);
  });

  test('a unit refused after others were loaded leaves the device in ERROR, which its reset leaves', async () => {
    const { from, to, destination } = await pair({ preCopy: true, destinationErrors: 'expected' });
    await from.migration.setState(S.PRE_COPY);
    const precopy = await from.migration.readAll();
    await from.migration.setState(S.STOP_COPY);
    const stopCopy = await from.migration.readAll();
    destination.device.failing.add('load:stopcopy');
    await to.migration.setState(S.RESUMING);
    await to.migration.write(Buffer.concat([precopy, stopCopy]));
    await expect(to.migration.setState(S.STOP)).rejects.toMatchObject({ errno: Errno.EIO });
    destination.device.calls.length = 0;
    await to.reset();
    expect(destination.device.calls).toEqual(['start']); // out of ERROR: nothing else would start it
    expect(await to.migration.state()).toBe(S.RUNNING);
  });
});
