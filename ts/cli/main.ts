#!/usr/bin/env node
/**
 * The `vfio-user` command.
 *   vfio-user serve MODULE (--socket PATH | --socket-path=PATH | --fd=N) [--mode 0600] [-- ARGS...]
 * serves the device a module exports (TS or JS) until SIGINT or SIGTERM, so
 * any vfio-user client (QEMU, libvfio-user's samples) can be pointed at it;
 * ARGS reach the module's factory.
 *   vfio-user lspci SOCKET [--json]
 * describes the device any vfio-user server offers, like `lspci -vv`.
 */
import { parseArgs } from 'node:util';
import { serve } from './serve.js';
import { lspci } from './lspci.js';

const USAGE = `usage:
  vfio-user serve MODULE (--socket PATH | --socket-path=PATH | --fd=N) [--mode MODE] [-- ARGS...]
      Serve the device MODULE exports until SIGINT or SIGTERM, on a new
      socket at PATH (owner-only unless --mode) or on the listening socket
      fd N. MODULE is a .ts or .js file, or a folder with an index module;
      its default export is a device, or a factory (args: string[]) =>
      device that is called with the ARGS after --.
  vfio-user lspci SOCKET [--json]
      Connect to the vfio-user server at SOCKET and describe its device like
      lspci -vv (IDs, command/status, BARs, capabilities, extended
      capabilities), then its regions and IRQs. Read-only: BAR sizes come
      from the region info, not from sizing writes. --json prints one JSON
      object instead; 64-bit values (sizes, offsets, addresses, serial
      numbers) are "0x..." hex strings, everything else plain numbers.`;

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (command === 'serve') {
    // Everything after the first `--` belongs to the module, not to us.
    const end = rest.indexOf('--');
    const moduleArgs = end < 0 ? [] : rest.slice(end + 1);
    const { values, positionals } = parseArgs({
      args: end < 0 ? rest : rest.slice(0, end),
      allowPositionals: true,
      options: {
        socket: { type: 'string', short: 's' },
        // The vhost-user style backend conventions (§2 of the protocol digest).
        'socket-path': { type: 'string' },
        fd: { type: 'string' },
        mode: { type: 'string' },
      },
    });
    const path = values.socket ?? values['socket-path'];
    const fd = values.fd === undefined ? undefined : Number(values.fd);
    if (positionals.length !== 1 || (path === undefined) === (fd === undefined) || (fd !== undefined && !Number.isInteger(fd))) {
      console.error(USAGE);
      return 2;
    }
    const mode = values.mode === undefined ? undefined : parseInt(values.mode, 8);
    await serve(positionals[0], path ?? { fd: fd! }, { mode, args: moduleArgs });
    return 0;
  }
  if (command === 'lspci') {
    const { values, positionals } = parseArgs({ args: rest, allowPositionals: true, options: { json: { type: 'boolean' } } });
    if (positionals.length !== 1) {
      console.error(USAGE);
      return 2;
    }
    process.stdout.write(await lspci(positionals[0], { json: values.json }));
    return 0;
  }
  console.error(command && command !== '--help' && command !== '-h' ? `unknown command: ${command}\n${USAGE}` : USAGE);
  return command === '--help' || command === '-h' ? 0 : 2;
}

main(process.argv.slice(2)).then(
  (code) => {
    if (code !== 0) process.exitCode = code;
  },
  (error: Error) => {
    console.error(`vfio-user: ${error.message}`);
    process.exitCode = 1;
  },
);
