/**
 * Power Management capability (ID 0x01, 8 bytes, §10.3): PMC says version 3
 * and which of D1/D2 exist; PMCSR holds the power state. PME is not
 * supported (PME_Support 0), so PME_En and PME_Status stay 0.
 */
import type { ConfigSpace, ConfigWrite } from './config.js';
import type { PowerManagementCapability, PowerState } from './description.js';
import { Pm } from './spec.js';

const STATES: readonly PowerState[] = ['D0', 'D1', 'D2', 'D3hot'];

export class PowerManagement {
  private readonly supported: ReadonlySet<PowerState>;

  constructor(
    private readonly config: ConfigSpace,
    private readonly at: number,
    description: PowerManagementCapability,
    /** A reset is due once the write completes (D3hot to D0 without No_Soft_Reset). */
    requestReset: () => void,
  ) {
    this.supported = new Set<PowerState>(['D0', 'D3hot', ...(description.d1 ? ['D1' as const] : []), ...(description.d2 ? ['D2' as const] : [])]);
    const noSoftReset = description.noSoftReset ?? true;
    config.define(at + Pm.PMC, 2, Pm.PMC_VERSION_3 | (description.d1 ? Pm.PMC_D1 : 0) | (description.d2 ? Pm.PMC_D2 : 0));
    config.define(at + Pm.PMCSR, 2, noSoftReset ? Pm.PMCSR_NO_SOFT_RESET : 0, Pm.STATE_MASK);
    config.onWrite({
      start: at + Pm.PMCSR,
      end: at + Pm.PMCSR + 1,
      apply: (write) => {
        if (this.stateWritten(write) === 'reset' && !noSoftReset) requestReset();
      },
    });
  }

  get state(): PowerState {
    return STATES[this.config.u16(this.at + Pm.PMCSR) & Pm.STATE_MASK];
  }

  /** Discards a write of a state the device lacks (the spec's rule); reports D3hot to D0. */
  private stateWritten(write: ConfigWrite): 'reset' | undefined {
    const before = STATES[write.previous(this.at + Pm.PMCSR, 2) & Pm.STATE_MASK];
    if (!this.supported.has(this.state)) {
      const pmcsr = this.config.u16(this.at + Pm.PMCSR);
      this.config.setU16(this.at + Pm.PMCSR, (pmcsr & ~Pm.STATE_MASK) | STATES.indexOf(before));
      return undefined;
    }
    return before === 'D3hot' && this.state === 'D0' ? 'reset' : undefined;
  }
}
