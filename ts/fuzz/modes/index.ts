/**
 * The device-class modes `vfio-user fuzz --mode NAME` knows, each a factory
 * (a mode keeps state for one run). The generic 'pci' mode is in every run
 * and not listed.
 */
import type { FuzzMode } from '../mode.js';
import { nvmeMode } from './nvme.js';
import { virtioMode } from '../../virtio/fuzz.js';

export const FUZZ_MODES: Record<string, () => FuzzMode> = { nvme: nvmeMode, virtio: virtioMode as () => FuzzMode };
