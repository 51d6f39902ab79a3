/**
 * Live migration from the VMM's side: typed helpers over DEVICE_FEATURE and
 * MIG_DATA_READ/WRITE (`client.migration`), and `migrate(from, to)`, the
 * whole flow between two servers. See docs/migration.md.
 */
import type { VfioUserClient } from './client.js';
import {
  Command,
  decodeDmaLoggingReportReply,
  decodeDmaLoggingStart,
  decodeMigDeviceState,
  decodeMigrationFeature,
  DEVICE_FEATURE_SIZE,
  DeviceFeatureFlags,
  DMA_LOGGING_REPORT_SIZE,
  dmaLoggingBitmapSize,
  encodeDmaLoggingReportRequest,
  encodeDmaLoggingStart,
  encodeMigDeviceState,
  Errno,
  FeatureIndex,
  MigrationFlags,
  MigrationState,
  ProtocolError,
  type DmaLoggingRange,
} from '../protocol/index.js';

const { GET, SET, PROBE } = DeviceFeatureFlags;
const knownStates = new Set<number>(Object.values(MigrationState));

export class MigrationClient {
  constructor(private readonly client: VfioUserClient) {}

  /** Whether the server offers migration (PROBE of GET MIGRATION; ENOTSUP means no). */
  async supported(): Promise<boolean> {
    try {
      await this.client.deviceFeature(PROBE | GET | FeatureIndex.MIGRATION);
      return true;
    } catch (error) {
      if (error instanceof ProtocolError && error.errno === Errno.ENOTSUP) return false;
      throw error;
    }
  }

  /** MigrationFlags bits: STOP_COPY, and PRE_COPY when the device saves while running. */
  async flags(): Promise<number> {
    const reply = await this.client.deviceFeature(GET | FeatureIndex.MIGRATION, undefined, DEVICE_FEATURE_SIZE + 8);
    return Number(decodeMigrationFeature(reply.data).flags);
  }

  async state(): Promise<MigrationState> {
    const reply = await this.client.deviceFeature(GET | FeatureIndex.MIG_DEVICE_STATE, undefined, DEVICE_FEATURE_SIZE + 8);
    const { deviceState } = decodeMigDeviceState(reply.data);
    if (!knownStates.has(deviceState)) throw new ProtocolError(Errno.EPROTO, Command.DEVICE_FEATURE, `the server reported state ${deviceState}`);
    return deviceState as MigrationState;
  }

  /** Resolves once the server has completed the transition (over as many arcs as it takes). */
  async setState(state: MigrationState): Promise<void> {
    await this.client.deviceFeature(SET | FeatureIndex.MIG_DEVICE_STATE, encodeMigDeviceState({ deviceState: state }));
  }

  /** Largest MIG_DATA transfer both ends accept. */
  private get chunk(): number {
    return Math.min(this.client.server.capabilities.maxDataXferSize, this.client.maxDataXferSize);
  }

  /** One MIG_DATA_READ; fewer bytes than `size` means the end of the data. */
  read(size = this.chunk): Promise<Buffer> {
    return this.client.migDataRead(size);
  }

  /** Reads until a short read: everything the device has saved so far (PRE_COPY) or at all (STOP_COPY). */
  async *chunks(): AsyncGenerator<Buffer> {
    const size = this.chunk;
    for (;;) {
      const data = await this.read(size);
      if (data.length > 0) yield data;
      if (data.length < size) return;
    }
  }

  async readAll(): Promise<Buffer> {
    const parts: Buffer[] = [];
    for await (const part of this.chunks()) parts.push(part);
    return Buffer.concat(parts);
  }

  /** MIG_DATA_WRITE, split at the transfer limit (RESUMING only). */
  async write(data: Uint8Array): Promise<void> {
    for (let at = 0; at < data.length; at += this.chunk) {
      await this.client.migDataWrite(data.subarray(at, at + this.chunk));
    }
  }

  /** DMA_LOGGING_START; `ranges` empty logs all of guest memory. Returns the page size the server logs at. */
  async startDirtyLogging(pageSize: bigint, ranges: DmaLoggingRange[] = []): Promise<bigint> {
    const reply = await this.client.deviceFeature(SET | FeatureIndex.DMA_LOGGING_START, encodeDmaLoggingStart({ pageSize, ranges }));
    return decodeDmaLoggingStart(reply.data).pageSize;
  }

  async stopDirtyLogging(): Promise<void> {
    await this.client.deviceFeature(SET | FeatureIndex.DMA_LOGGING_STOP);
  }

  /**
   * DMA_LOGGING_REPORT: bit n of word n/64 is page n of [iova, iova + length)
   * at `pageSize`. The server forgets what it reports.
   */
  async dirtyReport(iova: bigint, length: bigint, pageSize: bigint): Promise<BigUint64Array> {
    const argsz = DEVICE_FEATURE_SIZE + DMA_LOGGING_REPORT_SIZE + dmaLoggingBitmapSize(length, pageSize);
    const request = encodeDmaLoggingReportRequest({ iova, length, pageSize });
    const reply = await this.client.deviceFeature(GET | FeatureIndex.DMA_LOGGING_REPORT, request, argsz);
    const { bitmap } = decodeDmaLoggingReportReply(reply.data);
    const words = new BigUint64Array(bitmap.length / 8);
    words.forEach((_, i) => { words[i] = bitmap.readBigUInt64LE(i * 8); });
    return words;
  }
}

export interface MigrationResult {
  /** Bytes carried while the source was running (PRE_COPY). */
  precopyBytes: number;
  /** Bytes carried while it was stopped (STOP_COPY). */
  stopCopyBytes: number;
}

/** Pipes the source's data to the destination until a short read; returns the byte count. */
async function pipe(from: MigrationClient, to: MigrationClient): Promise<number> {
  let bytes = 0;
  for await (const part of from.chunks()) {
    await to.write(part);
    bytes += part.length;
  }
  return bytes;
}

/**
 * Moves the device state from the server behind `from` to the one behind
 * `to`. Source: RUNNING → PRE_COPY (if offered; drained) → STOP_COPY
 * (drained) → STOP. Destination: → RESUMING (written) → RUNNING, which loads
 * the data on the way through STOP. Guest memory, and so dirty logging, is
 * the caller's business. If anything fails, the source is set back to
 * RUNNING (best effort) and the error is thrown; the destination is left
 * where it failed.
 */
export async function migrate(from: VfioUserClient, to: VfioUserClient): Promise<MigrationResult> {
  const source = from.migration;
  const destination = to.migration;
  const preCopy = ((await source.flags()) & MigrationFlags.PRE_COPY) !== 0;
  await destination.setState(MigrationState.RESUMING);
  const result: MigrationResult = { precopyBytes: 0, stopCopyBytes: 0 };
  try {
    if (preCopy) {
      await source.setState(MigrationState.PRE_COPY);
      result.precopyBytes = await pipe(source, destination);
    }
    await source.setState(MigrationState.STOP_COPY);
    result.stopCopyBytes = await pipe(source, destination);
    await source.setState(MigrationState.STOP);
    await destination.setState(MigrationState.RUNNING);
  } catch (error) {
    await source.setState(MigrationState.RUNNING).catch(() => undefined);
    throw error;
  }
  return result;
}
