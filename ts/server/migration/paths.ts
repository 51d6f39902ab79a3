/** The arcs of §7 and the path search over them. */
import { MigrationState } from '../../protocol/index.js';

const S = MigrationState;

/**
 * The arcs a server implements directly (§7). Every other transition is a
 * path over these. PRE_COPY's arcs exist only when the device offers it.
 */
const ARCS: ReadonlyMap<MigrationState, readonly MigrationState[]> = new Map<MigrationState, MigrationState[]>([
  [S.RUNNING, [S.STOP, S.PRE_COPY]],
  [S.STOP, [S.RUNNING, S.STOP_COPY, S.RESUMING]],
  [S.STOP_COPY, [S.STOP]],
  [S.RESUMING, [S.STOP]],
  [S.PRE_COPY, [S.RUNNING, S.STOP_COPY]],
]);

const isSaving = (state: MigrationState) => state === S.PRE_COPY || state === S.STOP_COPY;

/**
 * The states a transition from `from` to `to` passes through, `to` last
 * ([] when they are equal), or undefined when it is not allowed: the
 * shortest path over ARCS whose inner states are not saving states (a path
 * through one would start or end a data session nobody asked for).
 * STOP_COPY→PRE_COPY has such a path (via STOP and RUNNING) but §7 forbids
 * it: the precopy stream it would start cannot follow a finished stop-copy.
 */
export function migrationPath(from: MigrationState, to: MigrationState, preCopy: boolean): MigrationState[] | undefined {
  const usable = (s: MigrationState) => ARCS.has(s) && (preCopy || s !== S.PRE_COPY);
  if (!usable(from) || !usable(to)) return undefined;
  if (from === to) return [];
  if (from === S.STOP_COPY && to === S.PRE_COPY) return undefined;
  // Breadth-first: the first time `to` is reached is along a shortest path.
  const previous = new Map<MigrationState, MigrationState>([[from, from]]);
  const queue = [from];
  while (queue.length > 0) {
    const state = queue.shift()!;
    if (state !== from && isSaving(state)) continue;
    for (const next of ARCS.get(state)!) {
      if (!usable(next) || previous.has(next)) continue;
      previous.set(next, state);
      if (next === to) {
        const path = [to];
        for (let at = state; at !== from; at = previous.get(at)!) path.unshift(at);
        return path;
      }
      queue.push(next);
    }
  }
  return undefined;
}
