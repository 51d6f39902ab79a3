/** The message observer, DEBUG=vfio-user, and the decoded view of messages they print. */
import { afterEach, describe, expect, test } from 'vitest';
import { setMessageObserver } from '../ts/channel.js';
import { colorFor, debugRequested, messageLogger } from '../ts/debug.js';
import { formatMessage, messageJson, MessageDescriber } from '../ts/protocol/describe.js';
import { connect, EventfdIrq, GuestMemory, IrqIndex, Region } from '../ts/index.js';
import * as protocol from '../ts/protocol/index.js';
import { serve, type Served } from './helpers.js';
import { DmaTestDevice, PAGE } from './dma-device.js';

let served: Served<any> | undefined;
const cleanups: (() => void)[] = [];
afterEach(async () => {
  setMessageObserver(undefined);
  await served?.close();
  served = undefined;
  cleanups.splice(0).forEach((cleanup) => cleanup());
});

function logged(): string[] {
  const lines: string[] = [];
  setMessageObserver(messageLogger((line) => lines.push(line)));
  return lines;
}

describe('the message observer', () => {
  test('sees every message of a session at both ends, decoded, reads answered natively included', async () => {
    const lines = logged();
    served = await serve();
    const client = await served.client();
    expect((await client.regionRead(Region.CONFIG, 0n, 4)).readUInt32LE(0)).toBe(0x0dc8494f);
    await expect(client.getRegionInfo(42)).rejects.toMatchObject({ errno: protocol.Errno.EINVAL });
    const ram = new GuestMemory(PAGE);
    cleanups.push(() => ram.close());
    await client.dmaMap({ iova: 0x100000n, memory: ram });
    const ev = new EventfdIrq();
    cleanups.push(() => ev.close());
    await client.setIrqs({ index: IrqIndex.INTX, eventfds: [ev] });
    await client.regionWrite(Region.BAR2, 0n, Buffer.from([0xa5]), { posted: true });
    await client.regionRead(Region.BAR2, 0n, 1);

    // Config space reads are answered natively unless someone is watching.
    expect(served.server.session!.readsAnsweredNatively).toBe(0);
    for (const side of ['client', 'server']) {
      const seen = lines.filter((line) => line.startsWith(`vfio-user(${side}): `)).map((line) => line.slice(`vfio-user(${side}): `.length));
      expect(seen).toEqual([
        'client→server VERSION #1 version=0.2 maxMsgFds=16 maxDataXferSize=1048576',
        'server→client VERSION reply #1 version=0.2 maxMsgFds=16 maxDataXferSize=1048576 maxDmaMaps=65535 pgsizes=4096 writeMultiple=true',
        'client→server REGION_READ #2 region=CONFIG offset=0x0 count=4',
        'server→client REGION_READ reply #2 region=CONFIG offset=0x0 count=4 data=4f49c80d',
        'client→server DEVICE_GET_REGION_INFO #3 region=42 argsz=32',
        'server→client DEVICE_GET_REGION_INFO error #3 EINVAL (22)',
        'client→server DMA_MAP #4 flags=READ|WRITE address=0x100000 size=0x1000 offset=0x0 fds=1',
        'server→client DMA_MAP reply #4',
        'client→server DEVICE_SET_IRQS #5 index=INTX flags=DATA_EVENTFD|ACTION_TRIGGER start=0 count=1 fds=1',
        'server→client DEVICE_SET_IRQS reply #5',
        'client→server REGION_WRITE #6 no-reply region=BAR2 offset=0x0 count=1 data=a5',
        'client→server REGION_READ #7 region=BAR2 offset=0x0 count=1',
        'server→client REGION_READ reply #7 region=BAR2 offset=0x0 count=1 data=a5',
      ]);
    }
  });

  test('labels messages on the twin socket and matches their replies', async () => {
    const lines = logged();
    const device = new DmaTestDevice();
    served = await serve(device);
    const client = await connect(served.path, { twinSocket: true });
    cleanups.push(() => client.close());
    const ram = new GuestMemory(PAGE);
    cleanups.push(() => ram.close());
    ram.write(0, Buffer.from('twin'));
    await client.dmaMap({ iova: 0x100000n, memory: ram, shareFd: false });
    expect((await device.dma.readAsync(0x100000n, 4)).toString()).toBe('twin');
    expect(lines).toContain('vfio-user(server): twin server→client DMA_READ #1 address=0x100000 count=4');
    expect(lines).toContain('vfio-user(client): twin client→server DMA_READ reply #1 address=0x100000 count=4 data=7477696e');
    expect(lines.find((line) => line.includes('VERSION reply'))).toMatch(/twinSocket=\{supported=true fdIndex=0\} .*fds=1/);
  });

  test('prints nothing when no observer is set', async () => {
    const lines: string[] = [];
    setMessageObserver(messageLogger((line) => lines.push(line)));
    setMessageObserver(undefined);
    served = await serve();
    const client = await served.client();
    await client.regionRead(Region.CONFIG, 0n, 4);
    expect(lines).toEqual([]);
    expect(served.server.session!.readsAnsweredNatively).toBe(1);
  });
});

describe('DEBUG', () => {
  test('names vfio-user as the debug package reads the list', () => {
    for (const on of ['vfio-user', '*', 'express,vfio-user', 'vfio-*', 'a b vfio-user']) expect(debugRequested(on), on).toBe(true);
    for (const off of [undefined, '', 'express', 'vfio-user-x', '*,-vfio-user', 'vfio.user']) expect(debugRequested(off), off).toBe(false);
  });
});

describe('colors', () => {
  test('only on a terminal, and never with NO_COLOR set', () => {
    const saved = process.env.NO_COLOR;
    try {
      delete process.env.NO_COLOR;
      expect(colorFor({ isTTY: true })).toBe(true);
      expect(colorFor({ isTTY: false })).toBe(false);
      process.env.NO_COLOR = '1';
      expect(colorFor({ isTTY: true })).toBe(false);
    } finally {
      if (saved === undefined) delete process.env.NO_COLOR;
      else process.env.NO_COLOR = saved;
    }
    const view = new MessageDescriber().describe('client', protocol.encodeMessage({ msgId: 1, command: protocol.Command.DEVICE_RESET }), 0);
    expect(formatMessage(view, { color: true })).toBe('\x1b[2mclient→server\x1b[0m \x1b[36mDEVICE_RESET\x1b[0m #1');
  });
});

describe('MessageDescriber', () => {
  const { Command } = protocol;

  test('decodes a reply by the command of the request it answers and flags a mismatch', () => {
    const describer = new MessageDescriber();
    describer.describe('client', protocol.encodeMessage({ msgId: 7, command: Command.REGION_WRITE }, protocol.encodeRegionWriteRequest({ region: 0, offset: 8n }, Buffer.from([1]))), 0);
    // A reply that says DMA_MAP but answers the REGION_WRITE #7.
    const reply = protocol.encodeReply(7, Command.DMA_MAP, Buffer.from(protocol.encodeRegionWriteRequest({ region: 0, offset: 8n }, Buffer.alloc(0))));
    const view = describer.describe('server', reply, 0);
    expect(view).toMatchObject({ type: 'reply', name: 'REGION_WRITE', problem: 'answers REGION_WRITE but says DMA_MAP' });
    expect(view.fields).toEqual({ region: 'BAR0', offset: 8n, count: 0 });
    // The same id again has no request waiting.
    expect(describer.describe('server', reply, 0).problem).toMatch(/no request/);
  });

  test('DEVICE_FEATURE data is decoded by feature: migration state, dirty logging', () => {
    const describer = new MessageDescriber();
    const feature = (msgId: number, flags: number, data: Buffer) =>
      describer.describe('client', protocol.encodeMessage({ msgId, command: Command.DEVICE_FEATURE }, protocol.encodeDeviceFeatureRequest({ flags, data })), 0);
    const { DeviceFeatureFlags: F, FeatureIndex: I } = protocol;
    expect(feature(1, F.SET | I.MIG_DEVICE_STATE, protocol.encodeMigDeviceState({ deviceState: protocol.MigrationState.STOP_COPY })).fields).toEqual({ feature: 'MIG_DEVICE_STATE', op: 'SET', state: 'STOP_COPY' });
    const start = protocol.encodeDmaLoggingStart({ pageSize: 4096n, ranges: [{ iova: 0x10000n, length: 0x4000n }] });
    expect(formatMessage(feature(2, F.SET | I.DMA_LOGGING_START, start))).toBe('client→server DEVICE_FEATURE #2 feature=DMA_LOGGING_START op=SET pageSize=0x1000 ranges=[{iova=0x10000 length=0x4000}]');
  });

  test('a body the codec refuses is shown with the reason', () => {
    const view = new MessageDescriber().describe('client', protocol.encodeMessage({ msgId: 1, command: Command.DMA_MAP }, Buffer.alloc(3)), 0);
    expect(view.problem).toMatch(/undecodable body: .*DMA_MAP/);
    expect(formatMessage(view)).toBe(`client→server DMA_MAP #1 payload=000000 (${view.problem})`);
  });

  test('JSON: 64-bit values as hex strings, bytes as { bytes, hex }, errors with errno', () => {
    const describer = new MessageDescriber();
    const map = describer.describe('client', protocol.encodeMessage({ msgId: 2, command: Command.DMA_MAP }, protocol.encodeDmaMapRequest({ flags: 3, offset: 0n, address: 1n << 40n, size: 0x2000n })), 1);
    expect(JSON.parse(JSON.stringify(messageJson(map)))).toEqual({
      from: 'client', to: 'server', type: 'command', id: 2, command: 'DMA_MAP', flags: 0, size: 48, fds: 1,
      fields: { flags: 'READ|WRITE', address: '0x10000000000', size: '0x2000', offset: '0x0' },
    });
    const error = describer.describe('server', protocol.encodeErrorReply(2, Command.DMA_MAP, protocol.Errno.ENOMEM), 0);
    expect(messageJson(error)).toMatchObject({ type: 'error', errno: 12, error: 'ENOMEM', fields: {} });
    const big = describer.describe('server', protocol.encodeMessage({ msgId: 3, command: Command.DMA_WRITE }, protocol.encodeDmaWriteRequest(0n, Buffer.alloc(1000, 0xab))), 0);
    expect(messageJson(big).fields).toMatchObject({ data: { bytes: 1000, hex: 'ab'.repeat(256), elided: true } });
    expect(formatMessage(big)).toBe(`server→client DMA_WRITE #3 address=0x0 count=1000 data=[1000 bytes] ${'ab'.repeat(16)}…`);
  });
});
