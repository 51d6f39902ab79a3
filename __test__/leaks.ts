/** Leak detection for the soak and stress tests: the trend of samples, not their spread. */

/** The least-squares slope of `samples` taken at equal steps: how much each step adds. */
export function bytesPerStep(samples: readonly number[]): number {
  const n = samples.length;
  const meanX = (n - 1) / 2;
  const meanY = samples.reduce((a, b) => a + b, 0) / n;
  let num = 0;
  let den = 0;
  samples.forEach((y, x) => {
    num += (x - meanX) * (y - meanY);
    den += (x - meanX) ** 2;
  });
  return num / den;
}
