/**
 * A device module imports the library by name (`vfio-user`). Resolved the
 * usual way, that name may reach another copy of the library than the one
 * serving the device: inside this repository tsconfig's `paths` sends tsx to
 * the TypeScript sources while the CLI runs from dist/, and a user's nested
 * node_modules or bundler can do the same. Two copies share no module state
 * (which client's request is running, say), so while `vfio-user serve` loads
 * a device, `vfio-user` and its subpaths resolve to the running copy.
 */
import Module, { register } from 'node:module';
import { existsSync } from 'node:fs';
import { extname, join } from 'node:path';

const NAME = 'vfio-user';

/** The running copy's file for `specifier` (`vfio-user` or `vfio-user/SUB`), or undefined when it names no such file. */
function ownFile(specifier: string): string | undefined {
  if (specifier !== NAME && !specifier.startsWith(`${NAME}/`)) return undefined;
  // This file sits in cli/ of the running copy: dist/ts/cli/*.js, or ts/cli/*.ts under tsx.
  const file = join(__dirname, '..', specifier.slice(NAME.length + 1), `index${extname(__filename)}`);
  return existsSync(file) ? file : undefined;
}

type ResolveFilename = (request: string, ...rest: unknown[]) => string;
const modules = Module as unknown as { _resolveFilename: ResolveFilename };

/** Runs `load` (a `require` of a device module) with `vfio-user` resolving to this copy. */
export function requireWithOwnCopy<T>(load: () => T): T {
  // CommonJS has no public resolve hook in Node 20: wrap the resolver, as tsx itself does.
  const resolve = modules._resolveFilename;
  modules._resolveFilename = function (this: unknown, request, ...rest) {
    return resolve.call(this, ownFile(request) ?? request, ...rest);
  };
  try {
    return load();
  } finally {
    modules._resolveFilename = resolve;
  }
}

/**
 * The same for ES modules: a resolve hook, registered once (Node cannot
 * unregister hooks; mapping our own name to ourselves is harmless after).
 * The hook runs on the loaders' thread, so it gets the running copy's root
 * and extension as data.
 */
let hooked = false;
export function importWithOwnCopy(): void {
  if (hooked) return;
  hooked = true;
  const hook = `
    import { existsSync } from 'node:fs';
    import { join } from 'node:path';
    import { pathToFileURL } from 'node:url';
    let own;
    export function initialize(data) { own = data; }
    export function resolve(specifier, context, next) {
      if (specifier === ${JSON.stringify(NAME)} || specifier.startsWith(${JSON.stringify(`${NAME}/`)})) {
        const file = join(own.root, specifier.slice(${NAME.length + 1}), 'index' + own.extension);
        if (existsSync(file)) return { url: pathToFileURL(file).href, shortCircuit: true };
      }
      return next(specifier, context);
    }`;
  register(`data:text/javascript,${encodeURIComponent(hook)}`, { data: { root: join(__dirname, '..'), extension: extname(__filename) } });
}
