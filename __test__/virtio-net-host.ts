/**
 * A host TAP interface for tests of examples/virtio-net `--tap`: persistent
 * (`ip tuntap add`), with the host's address on it, up, IPv6 off (so the
 * host sends nothing unasked: no router solicitations). Names are unique per
 * process and subnets unused, so runs in other worktrees do not collide.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { TapError, TapInterface } from '../ts/index.js';

/** Why a TAP cannot be made here (no `ip`, no /dev/net/tun, no CAP_NET_ADMIN), or undefined. */
export function tapMissing(): string | undefined {
  if (spawnSync('ip', ['-V']).status !== 0) return 'no iproute2 `ip` command';
  try {
    TapInterface.open('vfuprobe%d').close();
    return undefined;
  } catch (error) {
    if (error instanceof TapError) return `cannot create a TAP (${error.message}): needs /dev/net/tun and CAP_NET_ADMIN`;
    throw error;
  }
}

export interface HostTap {
  name: string;
  /** The host's end: its MAC and address (`.1` of a /24). */
  mac: Buffer;
  hostIp: string;
  /** An address for the guest's end (`.2`). */
  guestIp: string;
  /** Packets the host received from the TAP so far. */
  received(): number;
  /** Deletes the interface (idempotent). */
  remove(): void;
}

const ip = (...args: string[]) => execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] });

/** The first /24 of 198.18.0.0/16 (benchmarking addresses) that no interface of the host uses. */
function freeSubnet(): string {
  const used = execFileSync('ip', ['-o', '-4', 'addr', 'show'], { encoding: 'utf8' });
  for (let i = 0; i < 256; i++) if (!used.includes(` 198.18.${i}.`)) return `198.18.${i}`;
  throw new Error('every /24 of 198.18.0.0/16 is in use on this host');
}

/** Makes TAP `index` of this process, on a subnet of its own. */
export function makeHostTap(index = 0): HostTap {
  const name = `vfut${process.pid}${index}`;
  const net = freeSubnet();
  const remove = () => void spawnSync('ip', ['link', 'del', name]);
  remove(); // left over from a killed run
  ip('tuntap', 'add', 'dev', name, 'mode', 'tap');
  try {
    const ipv6 = `/proc/sys/net/ipv6/conf/${name}/disable_ipv6`;
    if (existsSync(ipv6)) writeFileSync(ipv6, '1');
    ip('addr', 'add', `${net}.1/24`, 'dev', name);
    ip('link', 'set', name, 'up');
  } catch (error) {
    remove();
    throw error;
  }
  const sys = `/sys/class/net/${name}`;
  return {
    name,
    mac: Buffer.from(readFileSync(`${sys}/address`, 'utf8').trim().replaceAll(':', ''), 'hex'),
    hostIp: `${net}.1`,
    guestIp: `${net}.2`,
    received: () => Number(readFileSync(`${sys}/statistics/rx_packets`, 'utf8')),
    remove,
  };
}
