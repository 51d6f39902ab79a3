/**
 * Imported first by the `vfio-user` command, so that every module loaded
 * after it has its source map read: stack traces of device errors then name
 * .ts files and lines, the library's (maps shipped in dist/, with their
 * sources) and the device module's (tsx's). A program of one's own gets the
 * same with `node --enable-source-maps`.
 */
process.setSourceMapsEnabled(true);
