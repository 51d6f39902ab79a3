//! `NativeMapping`: an mmap of a peer's fd (guest memory on the server,
//! shared BARs on the client), with bounds-checked, SIGBUS-safe copies,
//! dirty-page tracking, and zero-copy views that are detached before the
//! memory goes away.

use crate::uv::check;
use napi::bindgen_prelude::*;
use napi::sys;
use napi_derive::napi;
use std::cell::RefCell;
use std::os::fd::BorrowedFd;
use std::ptr::null_mut;
use std::rc::Rc;
use std::sync::Arc;
use vfio_user_core::{Mapping, MappingError, Protection, DIRTY_PAGE_SIZE};

/// The mapping, shared with native readers; the `Arc` lets a thread that
/// watches doorbells, or block I/O in flight, keep the memory mapped for as
/// long as it uses it (the munmap waits for them).
pub(crate) type Shared = Rc<RefCell<Option<Arc<Mapping>>>>;

/// A mapping and the buffers handed out over it: what a DMA window holds in
/// the native window table, and what every `NativeMapping` object made for
/// that window shares, so that an unmap from either side detaches the views.
#[derive(Clone)]
pub(crate) struct Backed {
    mapping: Shared,
    views: Rc<RefCell<Views>>,
    size: f64,
    /// Device and inode of the file mapped, kept past unmap.
    file: (u64, u64),
}

impl Backed {
    pub(crate) fn new(env: sys::napi_env, mapping: Mapping) -> Self {
        let (size, file) = (mapping.len() as f64, mapping.file_identity());
        Backed {
            mapping: Rc::new(RefCell::new(Some(Arc::new(mapping)))),
            views: Rc::new(RefCell::new(Views { env, tracked: Vec::new(), prune_at: MIN_PRUNE_AT })),
            size,
            file,
        }
    }

    /// Whether buffers are out over the mapping: detaching them takes N-API
    /// calls, so a caller outside any N-API call opens a handle scope first.
    pub(crate) fn has_views(&self) -> bool {
        !self.views.borrow().tracked.is_empty()
    }

    /// Detaches every view, then unmaps (once native users let go: see
    /// `Shared`). Idempotent.
    pub(crate) fn unmap(&self) {
        self.views.borrow_mut().detach_all();
        self.mapping.borrow_mut().take();
    }
}

impl vfio_user_core::dma::Backing for Backed {
    fn file_identity(&self) -> (u64, u64) {
        self.file
    }
}

/// Weak references to every buffer handed out over one mapping, to detach
/// them on unmap.
struct Views {
    env: sys::napi_env,
    tracked: Vec<Tracked>,
    /// `tracked` is pruned of collected buffers when it grows to this length:
    /// pruning on every view made each one cost O(live views).
    prune_at: usize,
}

impl Views {
    fn detach_all(&mut self) {
        for Tracked { weak, .. } in self.tracked.drain(..) {
            let mut value = null_mut();
            // SAFETY: weak refs created in `external()`, on this thread, inside a handle scope.
            unsafe {
                sys::napi_get_reference_value(self.env, weak, &mut value);
                if !value.is_null() {
                    sys::napi_detach_arraybuffer(self.env, value);
                }
                sys::napi_delete_reference(self.env, weak);
            }
        }
    }

    fn prune(&mut self) {
        let env = self.env;
        self.tracked.retain(|&Tracked { weak, .. }| {
            let mut value = null_mut();
            // SAFETY: weak refs created in `external()`, on this thread.
            unsafe { sys::napi_get_reference_value(env, weak, &mut value) };
            if value.is_null() {
                // SAFETY: the buffer is collected; its reference is deleted once, here.
                unsafe { sys::napi_delete_reference(env, weak) };
            }
            !value.is_null()
        });
    }
}

impl Drop for Views {
    fn drop(&mut self) {
        // Views still alive keep the memory mapped through their own count.
        for Tracked { weak, .. } in self.tracked.drain(..) {
            // SAFETY: the last owner goes on the JS thread (a finalizer or an N-API call), with a live env.
            unsafe { sys::napi_delete_reference(self.env, weak) };
        }
    }
}

#[napi]
pub struct NativeMapping {
    backed: Backed,
}

/// A buffer handed out: a weak reference to it, and for a user view its
/// `(offset, length)`, which counts as dirty in every report while the view
/// is alive (stores through it cannot be observed). The fast-access buffers
/// have no range: the library marks what it writes through them.
struct Tracked {
    weak: sys::napi_ref,
    dirty: Option<(u64, u64)>,
}

fn mapping_error(e: impl std::fmt::Display) -> Error {
    Error::new(Status::GenericFailure, e.to_string())
}

fn offset_of(offset: f64) -> Result<u64> {
    if offset >= 0.0 && offset.fract() == 0.0 && offset <= 9007199254740991.0 {
        Ok(offset as u64)
    } else {
        Err(Error::new(Status::InvalidArg, format!("offset {offset} is not a non-negative safe integer")))
    }
}

#[napi]
impl NativeMapping {
    /// Maps `size` bytes of `fd` from `offset`. The fd may be closed after.
    #[napi(constructor)]
    pub fn new(env: Env, fd: i32, offset: BigInt, size: BigInt, readable: bool, writable: bool) -> Result<Self> {
        let (_, offset, exact_offset) = offset.get_u64();
        let (_, size, exact_size) = size.get_u64();
        if fd < 0 || !exact_offset || !exact_size {
            return Err(Error::new(Status::InvalidArg, "fd, offset and size must be non-negative and fit in 64 bits"));
        }
        // SAFETY: the caller keeps fd open for the duration of the call.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let mapping = Mapping::new(fd, offset, size, Protection { read: readable, write: writable }).map_err(mapping_error)?;
        Ok(NativeMapping { backed: Backed::new(env.raw(), mapping) })
    }

    /// Another handle on a window the native table mapped.
    pub(crate) fn of(backed: &Backed) -> Self {
        NativeMapping { backed: backed.clone() }
    }

    /// Which file is mapped, as "device:inode" (the form `fileIdentity(fd)` gives).
    #[napi(getter)]
    pub fn file(&self) -> String {
        crate::identity_string(self.backed.file)
    }

    #[napi(getter)]
    pub fn size(&self) -> f64 {
        self.backed.size
    }

    /// The mapping, or none once unmapped, for native readers to check.
    pub(crate) fn shared(&self) -> Shared {
        self.backed.mapping.clone()
    }

    #[napi(getter)]
    pub fn mapped(&self) -> bool {
        self.backed.mapping.borrow().is_some()
    }

    /// Copies `length` bytes at `offset` into a new Buffer.
    #[napi]
    pub fn read(&self, offset: f64, length: u32) -> Result<Buffer> {
        let guard = self.backed.mapping.borrow();
        let m = guard.as_ref().ok_or_else(unmapped)?;
        let mut out = vec![0u8; length as usize];
        m.read_at(offset_of(offset)?, &mut out).map_err(mapping_error)?;
        Ok(out.into())
    }

    /// Copies `data` to `offset`.
    #[napi]
    pub fn write(&self, offset: f64, data: Uint8ArraySlice<'_>) -> Result<()> {
        let guard = self.backed.mapping.borrow();
        let m = guard.as_ref().ok_or_else(unmapped)?;
        let (ptr, len) = raw_bytes(&data);
        // SAFETY: the typed array's bytes stay valid while JS waits for this call.
        unsafe { m.write_from_ptr(offset_of(offset)?, ptr, len) }.map_err(mapping_error)
    }

    // The three copies below are the DMA hot path. They return an errno (0
    // on success) instead of throwing: building a JS exception costs more
    // than a small copy, and the caller (ts/dma) raises a typed error that
    // names the IOVA, which this layer does not know.

    /// Copies `target.length` bytes at `offset` into `target`; 0 or an errno
    /// (EFAULT: out of bounds, unmapped or truncated; EPERM: not readable).
    #[napi]
    pub fn read_into(&self, offset: f64, target: Uint8ArraySlice<'_>) -> i32 {
        let (ptr, len) = raw_bytes(&target);
        // SAFETY: the typed array's bytes stay valid while JS waits for this call.
        self.with(offset, |m, at| unsafe { m.read_to_ptr(at, ptr, len) })
    }

    /// Copies `data` to `offset` and marks the pages dirty; 0 or an errno.
    #[napi]
    pub fn write_from(&self, offset: f64, data: Uint8ArraySlice<'_>) -> i32 {
        let (ptr, len) = raw_bytes(&data);
        // SAFETY: the typed array's bytes stay valid while JS waits for this call.
        self.with(offset, |m, at| unsafe { m.write_from_ptr(at, ptr, len) })
    }

    /// Copies `length` bytes at `offset` to `targetOffset` of `target` (this
    /// mapping or another; overlapping ranges are fine); 0 or an errno.
    #[napi]
    pub fn copy_to(&self, offset: f64, target: &NativeMapping, target_offset: f64, length: u32) -> i32 {
        let Ok(to_offset) = offset_of(target_offset) else { return EFAULT };
        let to_guard = target.backed.mapping.borrow();
        let Some(to) = to_guard.as_ref() else { return EFAULT };
        self.with(offset, |m, at| m.copy_to(at, to, to_offset, length as usize))
    }

    /// ORs the dirty bits of the pages in `[offset, offset + length)` into
    /// `report`, page `i` of the range at bit `bit + i` (LE u64 words, as
    /// VFIO bitmaps are); clears them when `clear`. `offset` and `length`
    /// are multiples of 4096. Pages under a live view always report dirty.
    #[napi]
    pub fn dirty_scan(&mut self, offset: f64, length: f64, clear: bool, mut report: BigUint64ArraySlice<'_>, bit: f64) -> Result<()> {
        // SAFETY: JS cannot run during the scan.
        let report = unsafe { report.as_mut() };
        let mut views = self.backed.views.borrow_mut();
        views.prune();
        let guard = self.backed.mapping.borrow();
        let m = guard.as_ref().ok_or_else(unmapped)?;
        let (offset, length, bit) = (offset_of(offset)?, offset_of(length)?, offset_of(bit)?);
        if offset % DIRTY_PAGE_SIZE != 0 || length % DIRTY_PAGE_SIZE != 0 {
            return Err(Error::new(Status::InvalidArg, "dirty ranges are whole 4 KiB pages"));
        }
        let pages = length / DIRTY_PAGE_SIZE;
        if bit + pages > report.len() as u64 * 64 {
            return Err(Error::new(Status::InvalidArg, "the report is too small for the range"));
        }
        // Views still alive may have been stored through since the last scan.
        for (start, len) in views.tracked.iter().filter_map(|v| v.dirty) {
            let (lo, hi) = (start.max(offset), (start + len).min(offset + length));
            if lo < hi {
                m.dirty().mark(lo, hi - lo);
            }
        }
        m.dirty().scan(offset / DIRTY_PAGE_SIZE, pages, clear, report, bit);
        Ok(())
    }

    fn with(&self, offset: f64, copy: impl FnOnce(&Mapping, u64) -> std::result::Result<(), MappingError>) -> i32 {
        let guard = self.backed.mapping.borrow();
        let (Some(m), Ok(at)) = (guard.as_ref(), offset_of(offset)) else { return EFAULT };
        match copy(m, at) {
            Ok(()) => 0,
            Err(e) => e.errno().raw_os_error(),
        }
    }

    /// A zero-copy ArrayBuffer over `length` bytes at `offset`. It is
    /// detached when the mapping is unmapped, so a stale view throws rather
    /// than touching freed memory. Read-only mappings give no views: a store
    /// through one would kill the process. Stores through the view cannot be
    /// observed, so its whole range counts as dirty in every report until it
    /// is detached or collected.
    #[napi(ts_return_type = "ArrayBuffer")]
    pub fn view(&mut self, env: Env, offset: f64, length: f64) -> Result<Unknown<'_>> {
        let guard = self.backed.mapping.borrow();
        let m = guard.as_ref().ok_or_else(unmapped)?;
        if !m.protection().write || !m.protection().read {
            return Err(Error::new(Status::GenericFailure, "views need a readable and writable mapping"));
        }
        let start = offset_of(offset)?;
        let len = offset_of(length)?;
        if start.checked_add(len).is_none_or(|end| end > m.len() as u64) {
            return Err(Error::new(Status::InvalidArg, format!("view of {len} bytes at {start} is outside the {}-byte mapping", m.len())));
        }
        // SAFETY: in bounds.
        let ptr = unsafe { m.as_ptr().add(start as usize) };
        m.dirty().mark(start, len);
        drop(guard);
        let value = self.external(env.raw(), ptr, len as usize, Some((start, len)))?;
        // SAFETY: `value` is the ArrayBuffer just made in this env.
        Ok(unsafe { Unknown::from_raw_unchecked(env.raw(), value) })
    }

    /// Whether the backing file was sealed against shrinking when mapped.
    #[napi(getter)]
    pub fn size_sealed(&self) -> bool {
        self.backed.mapping.borrow().as_ref().is_some_and(|m| m.size_sealed())
    }

    /// For the library's own copies: the whole mapping and its dirty bitmap
    /// as ArrayBuffers, so small and large copies cost no native call. Only
    /// for readable, writable mappings whose file cannot shrink (no access
    /// can fault); `null` otherwise, and the SIGBUS-safe copies are used.
    /// The caller marks the pages it writes (bit `p % 32` of u32 `p / 32`).
    /// Both buffers are detached on unmap like any view.
    #[napi(ts_return_type = "{ bytes: ArrayBuffer; dirty: ArrayBuffer } | null")]
    pub fn fast_access(&mut self, env: Env) -> Result<Unknown<'_>> {
        let raw = env.raw();
        let guard = self.backed.mapping.borrow();
        let m = guard.as_ref().ok_or_else(unmapped)?;
        // Windows too large for one ArrayBuffer keep the native copies.
        let usable = m.size_sealed() && m.protection().read && m.protection().write && m.len() <= MAX_EXTERNAL;
        if !usable {
            let mut null = null_mut();
            // SAFETY: always succeeds on a live env.
            unsafe { sys::napi_get_null(raw, &mut null) };
            // SAFETY: `null` is a value of this env.
            return Ok(unsafe { Unknown::from_raw_unchecked(raw, null) });
        }
        let (bytes_ptr, bytes_len) = (m.as_ptr(), m.len());
        let (dirty_ptr, dirty_len) = m.dirty().as_mut_ptr();
        drop(guard);
        let bytes = self.external(raw, bytes_ptr, bytes_len, None)?;
        let dirty = self.external(raw, dirty_ptr, dirty_len, None)?;
        let mut object = null_mut();
        // SAFETY: plain N-API calls on values of this env, in the current call's scope.
        unsafe {
            sys::napi_create_object(raw, &mut object);
            sys::napi_set_named_property(raw, object, c"bytes".as_ptr(), bytes);
            sys::napi_set_named_property(raw, object, c"dirty".as_ptr(), dirty);
        }
        // SAFETY: `object` is the object just made in this env.
        Ok(unsafe { Unknown::from_raw_unchecked(raw, object) })
    }

    /// An external ArrayBuffer over memory this mapping owns, tracked so that
    /// unmap() detaches it; its finalizer keeps the mapping alive until then.
    /// `dirty` is the mapping range a user view covers (see `Tracked`).
    fn external(&mut self, raw: sys::napi_env, ptr: *mut u8, len: usize, dirty: Option<(u64, u64)>) -> Result<sys::napi_value> {
        if len > MAX_EXTERNAL {
            return Err(Error::new(Status::InvalidArg, format!("{len} bytes exceed the {MAX_EXTERNAL}-byte ArrayBuffer limit; view a smaller window")));
        }
        let hint = Box::into_raw(Box::new(self.backed.mapping.clone()));
        let mut value = null_mut();
        // SAFETY: `ptr` covers `len` bytes of a live mapping, which `hint` (a
        // count on the mapping) keeps mapped until the finalizer frees it.
        let status = unsafe {
            sys::napi_create_external_arraybuffer(raw, ptr.cast(), len, Some(release_view), hint.cast(), &mut value)
        };
        if status != sys::Status::napi_ok {
            // The hint is not freed here: Node may already have run the
            // finalizer (it does when V8 refuses the buffer), and a double free
            // is worse than keeping one mapping alive in a path that fails.
            // Electron and other runtimes without external buffers land here:
            // a copy would silently lose device writes, so refuse instead.
            return Err(Error::new(Status::GenericFailure, "this runtime refuses external ArrayBuffers; zero-copy views are unavailable"));
        }
        let mut views = self.backed.views.borrow_mut();
        if views.tracked.len() >= views.prune_at {
            views.prune();
            views.prune_at = MIN_PRUNE_AT.max(2 * views.tracked.len());
        }
        let mut weak = null_mut();
        // SAFETY: `value` is live in the current scope; a weak reference (count 0).
        check(unsafe { sys::napi_create_reference(raw, value, 0, &mut weak) }, "napi_create_reference")?;
        views.tracked.push(Tracked { weak, dirty });
        Ok(value)
    }

    /// Detaches every view, then unmaps. Idempotent.
    #[napi]
    pub fn unmap(&mut self) {
        self.backed.unmap();
    }
}

/// The bytes of a Uint8Array as a pointer and length, never as a Rust
/// slice: the array may be a view of guest memory (a DMA view, a shared BAR),
/// which the guest writes while we copy, and a `&[u8]` or `&mut [u8]` over
/// memory that changes under it is undefined behaviour.
fn raw_bytes(array: &Uint8ArraySlice<'_>) -> (*mut u8, usize) {
    let value = array.value();
    let (mut kind, mut length, mut data) = (0, 0usize, null_mut());
    let (mut buffer, mut offset) = (null_mut(), 0usize);
    // SAFETY: a query on a live typed array of the current call.
    let status = unsafe { sys::napi_get_typedarray_info(value.env, value.value, &mut kind, &mut length, &mut data, &mut buffer, &mut offset) };
    if status != sys::Status::napi_ok || data.is_null() {
        return (std::ptr::NonNull::dangling().as_ptr(), 0);
    }
    (data.cast(), length)
}

/// Views tracked before the first pruning.
const MIN_PRUNE_AT: usize = 64;

const EFAULT: i32 = rustix::io::Errno::FAULT.raw_os_error();

/// The largest ArrayBuffer Node 20 makes (buffer.constants.MAX_LENGTH, 4 GiB);
/// larger views are refused up front rather than by V8.
const MAX_EXTERNAL: usize = 1 << 32;

fn unmapped() -> Error {
    Error::new(Status::GenericFailure, "the mapping has been unmapped")
}

unsafe extern "C" fn release_view(_env: sys::napi_env, _data: *mut std::ffi::c_void, hint: *mut std::ffi::c_void) {
    // SAFETY: `hint` is the Box `external()` leaked for this buffer; V8 finalizes a buffer once.
    drop(unsafe { Box::from_raw(hint.cast::<Shared>()) });
}
