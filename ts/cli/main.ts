#!/usr/bin/env node
/** The `vfio-user` program: runs the command line (commands.ts) and sets the exit status. */
import './source-maps.js';
import { Exit, main } from './commands.js';

main(process.argv.slice(2)).then(
  (code) => {
    if (code !== Exit.OK) process.exitCode = code;
  },
  (error: Error) => {
    process.stderr.write(`vfio-user: ${error.message}\n`);
    process.exitCode = Exit.FAILURE;
  },
);
