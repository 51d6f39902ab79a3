/**
 * Live migration (migration v2) for a served device: the state machine of
 * §7, the data stream of MIG_DATA_READ/WRITE, DEVICE_FEATURE (§6.14) and
 * DMA dirty logging. The session only routes commands here; the device only
 * stops, starts, saves and loads (DeviceMigration). See docs/migration.md.
 */
export { migrationPath } from './paths.js';
export { migrationStateOf } from './machine.js';
export { MigrationSession } from './session.js';
