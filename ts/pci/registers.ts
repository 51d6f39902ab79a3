/**
 * Device-defined registers inside a vendor capability (standard ID 0x09 or
 * extended VSEC 0x000B): the library stores the bytes and the writable mask,
 * and calls the device's hooks with offsets relative to the registers.
 */
import type { ConfigSpace } from './config.js';
import { encodeValue, InvalidDeviceError, type DeviceRegisters } from './description.js';

export function checkRegisters(r: DeviceRegisters, field: string, maxBytes: number): void {
  if (!(r.data instanceof Uint8Array)) throw new InvalidDeviceError(`${field}.data`, 'must be a Uint8Array');
  if (r.data.length > maxBytes) throw new InvalidDeviceError(`${field}.data`, `${r.data.length} bytes exceed the ${maxBytes} the capability's length field can describe`);
  if (r.writable instanceof Uint8Array && r.writable.length !== r.data.length) {
    throw new InvalidDeviceError(`${field}.writable`, `${r.writable.length} mask bytes for ${r.data.length} data bytes`);
  }
}

/** Defines `r` (described at `field`) at [start, start + r.data.length) and wires its hooks. */
export function defineRegisters(config: ConfigSpace, start: number, r: DeviceRegisters, field: string): void {
  const end = start + r.data.length;
  const writable = r.writable === true ? Buffer.alloc(r.data.length, 0xff) : r.writable;
  config.defineBytes(start, r.data, writable);
  // Only the part of an access that falls inside the registers reaches the hooks.
  const clip = (offset: number, count: number) => ({ from: Math.max(offset, start), to: Math.min(offset + count, end) });
  if (r.write) {
    const write = r.write;
    config.onWrite({
      start,
      end,
      apply: (w) => {
        const { from, to } = clip(w.offset, w.data.length);
        write(from - start, w.data.subarray(from - w.offset, to - w.offset));
      },
    });
  }
  if (r.read) {
    const read = r.read;
    config.onRead({
      start,
      end,
      refresh: (offset, count) => {
        const { from, to } = clip(offset, count);
        config.bytes.set(encodeValue(read(from - start, to - from), to - from, `${field}.read`, from - start), from);
      },
    });
  }
}
