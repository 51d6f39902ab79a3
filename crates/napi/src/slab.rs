//! Message bytes for JS, copied into shared 64 KiB ArrayBuffers the way
//! Node's own Buffer pool works: a message becomes a view (buffer, offset,
//! length) instead of a Buffer of its own, which spares an allocation and a
//! prototype switch per message. Views keep their slab alive; a full slab is
//! simply replaced.

use crate::js::JsRef;
use napi::sys;
use std::ptr::null_mut;

const SLAB: usize = 64 * 1024;
/// Larger messages get an ArrayBuffer of their own rather than a slab's tail.
const OWN_BUFFER: usize = SLAB / 8;

pub struct Slab {
    env: sys::napi_env,
    current: Option<JsRef>,
    data: *mut u8,
    used: usize,
}

impl Slab {
    pub fn new(env: sys::napi_env) -> Slab {
        Slab { env, current: None, data: null_mut(), used: SLAB }
    }

    /// Copies `bytes` out; returns the ArrayBuffer and the offset they sit at,
    /// or `None` when V8 gives no ArrayBuffer (out of memory, or an exception
    /// pending): this runs under libuv callbacks, where a panic would abort.
    /// Needs an open handle scope.
    pub fn copy(&mut self, env: sys::napi_env, bytes: &[u8]) -> Option<(sys::napi_value, usize)> {
        if bytes.len() > OWN_BUFFER {
            let (buffer, data) = new_array_buffer(env, bytes.len())?;
            // SAFETY: `data` has room for bytes.len() bytes.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), data, bytes.len()) };
            return Some((buffer, 0));
        }
        if self.used + bytes.len() > SLAB {
            let (buffer, data) = new_array_buffer(env, SLAB)?;
            let fresh = JsRef::new(env, buffer).ok()?;
            if let Some(old) = self.current.replace(fresh) {
                old.delete(env);
            }
            self.data = data;
            self.used = 0;
        }
        let current = self.current.as_ref()?;
        let offset = self.used;
        // SAFETY: offset + len <= SLAB, and the slab is alive (referenced).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.data.add(offset), bytes.len()) };
        // Keep views 8-byte aligned.
        self.used = (offset + bytes.len() + 7) & !7;
        Some((current.get(env), offset))
    }
}

impl Drop for Slab {
    fn drop(&mut self) {
        if let Some(r) = self.current.take() {
            r.delete(self.env);
        }
    }
}

fn new_array_buffer(env: sys::napi_env, len: usize) -> Option<(sys::napi_value, *mut u8)> {
    let mut value = null_mut();
    let mut data = null_mut();
    // SAFETY: a plain allocation in the open handle scope.
    let status = unsafe { sys::napi_create_arraybuffer(env, len, &mut data, &mut value) };
    (status == sys::Status::napi_ok && !data.is_null()).then_some((value, data.cast()))
}
