/**
 * Identities that hold across copies of the library. A bundler or loader
 * that loads the package twice (a device importing `vfio-user` by a path the
 * server's copy did not come from) gives each copy its own classes, and a
 * plain `instanceof` would not recognise a `DmaAccessError` or a
 * `ProtocolError` made by the other copy. A branded class marks its
 * prototype with a `Symbol.for` key, which is one symbol per process whatever
 * the copy, and answers `instanceof` by that mark.
 */

/** Brands `cls` as `name` (the class's name, spelled out so minifiers keep it). */
export function brand(cls: abstract new (...args: never[]) => object, name: string): void {
  const key = Symbol.for(`vfio-user.${name}`);
  Object.defineProperty(cls.prototype, key, { value: true });
  Object.defineProperty(cls, Symbol.hasInstance, {
    value(this: unknown, value: unknown): boolean {
      // A subclass declared outside the library inherits this method but has no brand of its own.
      if (this !== cls) return Function.prototype[Symbol.hasInstance].call(this, value);
      return typeof value === 'object' && value !== null && (value as Record<symbol, unknown>)[key] === true;
    },
  });
}
