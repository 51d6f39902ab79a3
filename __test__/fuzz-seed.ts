/**
 * The seed of CI's fuzz runs: FUZZ_SEED when set (to replay a failure),
 * else the CI run's number, else the day, so every run tries new sequences
 * and a failure names the seed that replays it.
 */
export function rotatingSeed(): number {
  if (process.env.FUZZ_SEED) return Number(process.env.FUZZ_SEED) >>> 0;
  if (process.env.GITHUB_RUN_ID) return Number(process.env.GITHUB_RUN_ID) >>> 0;
  return Math.floor(Date.now() / 86_400_000) >>> 0;
}
