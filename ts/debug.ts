/**
 * The library prints nothing unless asked: `DEBUG=vfio-user` (read as the
 * `debug` package reads it) or `vfio-user serve --verbose` installs
 * `messageLogger()`, which prints every message decoded to stderr.
 */
import type { Channel, MessageObserver } from './channel.js';
import { formatMessage, MessageDescriber } from './protocol/describe.js';

/** The channel name for DEBUG. */
export const DEBUG_NAME = 'vfio-user';

/**
 * Whether `debug` (a comma- or space-separated list of names with `*`
 * wildcards, `-name` excluding) asks for `name` (vfio-user by default), e.g.
 * `vfio-user`, `*` or `vfio-*,-express`. Devices name their own traces below
 * it (`vfio-user:nvme`).
 */
export function debugRequested(debug = process.env.DEBUG, name = DEBUG_NAME): boolean {
  let wanted = false;
  for (const item of (debug ?? '').split(/[\s,]+/).filter(Boolean)) {
    const excluded = item.startsWith('-');
    const pattern = new RegExp(`^${(excluded ? item.slice(1) : item).replace(/[.+?^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*')}$`);
    if (!pattern.test(name)) continue;
    if (excluded) return false;
    wanted = true;
  }
  return wanted;
}

/** Colors for a terminal, unless NO_COLOR (https://no-color.org) is set. */
export function colorFor(stream: { isTTY?: boolean }): boolean {
  return stream.isTTY === true && !process.env.NO_COLOR;
}

/** An observer that hands `write` one decoded line per message; by default prints it to stderr (colored on a terminal). */
export function messageLogger(write?: (line: string) => void): MessageObserver {
  const color = write === undefined && colorFor(process.stderr);
  const print = write ?? ((line: string) => process.stderr.write(`${line}\n`));
  const describers = new WeakMap<Channel, MessageDescriber>();
  return ({ channel, from, message, fds }) => {
    let describer = describers.get(channel);
    if (describer === undefined) {
      describer = new MessageDescriber({ twin: channel.twin });
      describers.set(channel, describer);
    }
    // Named by the observing end: a process may hold both ends of one connection.
    print(`${DEBUG_NAME}(${channel.side}): ${formatMessage(describer.describe(from, message, fds), { color })}`);
  };
}
