//! Raw N-API helpers for calling JS from a libuv callback, where no N-API
//! call frame exists: a handle scope and a callback scope (so promise jobs
//! and next-tick callbacks run when we leave, as after any Node event).

use crate::uv::check;
use napi::sys;
use std::ptr::null_mut;

/// A strong reference to a JS value, deleted explicitly on the JS thread.
pub struct JsRef(sys::napi_ref);

impl JsRef {
    pub fn new(env: sys::napi_env, value: sys::napi_value) -> napi::Result<JsRef> {
        let mut r = null_mut();
        // SAFETY: env and value come from the current N-API call.
        check(unsafe { sys::napi_create_reference(env, value, 1, &mut r) }, "napi_create_reference")?;
        Ok(JsRef(r))
    }

    pub fn get(&self, env: sys::napi_env) -> sys::napi_value {
        let mut v = null_mut();
        // SAFETY: the reference is alive until `delete`.
        unsafe { sys::napi_get_reference_value(env, self.0, &mut v) };
        v
    }

    pub fn delete(self, env: sys::napi_env) {
        // SAFETY: deleted once, on the JS thread.
        unsafe { sys::napi_delete_reference(env, self.0) };
    }
}

/// The async context every callback of one native object runs in, so
/// async_hooks and AsyncLocalStorage see our events like any other.
pub struct AsyncContext {
    resource: JsRef,
    context: sys::napi_async_context,
}

impl AsyncContext {
    pub fn new(env: sys::napi_env, name: &str) -> napi::Result<AsyncContext> {
        // SAFETY: plain N-API calls inside an N-API call frame.
        unsafe {
            let mut resource = null_mut();
            check(sys::napi_create_object(env, &mut resource), "napi_create_object")?;
            let mut js_name = null_mut();
            check(
                sys::napi_create_string_utf8(env, name.as_ptr().cast(), name.len() as isize, &mut js_name),
                "napi_create_string_utf8",
            )?;
            let mut context = null_mut();
            check(sys::napi_async_init(env, resource, js_name, &mut context), "napi_async_init")?;
            Ok(AsyncContext { resource: JsRef::new(env, resource)?, context })
        }
    }

    pub fn destroy(self, env: sys::napi_env) {
        // SAFETY: destroyed once, on the JS thread.
        unsafe { sys::napi_async_destroy(env, self.context) };
        self.resource.delete(env);
    }
}

/// Handle scope plus callback scope, opened on first use and closed on drop.
pub struct CallbackScope<'a> {
    env: sys::napi_env,
    context: &'a AsyncContext,
    handles: sys::napi_handle_scope,
    callback: sys::napi_callback_scope,
}

impl<'a> CallbackScope<'a> {
    pub fn new(env: sys::napi_env, context: &'a AsyncContext) -> Self {
        CallbackScope { env, context, handles: null_mut(), callback: null_mut() }
    }

    /// Opens the scopes if not yet open; returns the env to call JS with.
    pub fn enter(&mut self) -> sys::napi_env {
        if self.handles.is_null() {
            // SAFETY: on the JS thread, outside any other N-API frame.
            unsafe {
                sys::napi_open_handle_scope(self.env, &mut self.handles);
                let resource = self.context.resource.get(self.env);
                sys::napi_open_callback_scope(self.env, resource, self.context.context, &mut self.callback);
            }
        }
        self.env
    }
}

impl Drop for CallbackScope<'_> {
    fn drop(&mut self) {
        if !self.handles.is_null() {
            // SAFETY: closing what `enter` opened, innermost first.
            unsafe {
                sys::napi_close_callback_scope(self.env, self.callback);
                sys::napi_close_handle_scope(self.env, self.handles);
            }
        }
    }
}

/// Calls `func(...args)`. A throwing callback is reported as an uncaught
/// exception (as a throwing event listener would be), never swallowed.
pub fn call(env: sys::napi_env, func: sys::napi_value, args: &[sys::napi_value]) -> Option<sys::napi_value> {
    let mut result = null_mut();
    // SAFETY: env/func are live values in the current scope.
    unsafe {
        let mut undefined = null_mut();
        sys::napi_get_undefined(env, &mut undefined);
        let status = sys::napi_call_function(env, undefined, func, args.len(), args.as_ptr(), &mut result);
        if status == sys::Status::napi_ok {
            return Some(result);
        }
        let mut pending = false;
        sys::napi_is_exception_pending(env, &mut pending);
        if pending {
            let mut error = null_mut();
            sys::napi_get_and_clear_last_exception(env, &mut error);
            sys::napi_fatal_exception(env, error);
        }
        None
    }
}

/// The bytes of a Uint8Array (or Buffer) `value`, valid while it is reachable
/// from the open handle scope; `None` for anything else.
pub fn bytes_of<'a>(env: sys::napi_env, value: sys::napi_value) -> Option<&'a [u8]> {
    let mut is_typed = false;
    // SAFETY: plain N-API queries on a live value.
    unsafe {
        sys::napi_is_typedarray(env, value, &mut is_typed);
        if !is_typed {
            return None;
        }
        let (mut kind, mut length, mut data) = (0, 0usize, null_mut());
        let (mut buffer, mut offset) = (null_mut(), 0usize);
        sys::napi_get_typedarray_info(env, value, &mut kind, &mut length, &mut data, &mut buffer, &mut offset);
        if kind != sys::TypedarrayType::uint8_array || data.is_null() {
            return None;
        }
        Some(std::slice::from_raw_parts(data.cast::<u8>(), length))
    }
}

pub fn is_true(env: sys::napi_env, value: sys::napi_value) -> bool {
    let mut b = false;
    // SAFETY: a non-boolean gives an error status and leaves `b` false.
    unsafe { sys::napi_get_value_bool(env, value, &mut b) };
    b
}

pub fn undefined(env: sys::napi_env) -> sys::napi_value {
    let mut v = null_mut();
    // SAFETY: always succeeds on a live env.
    unsafe { sys::napi_get_undefined(env, &mut v) };
    v
}

pub fn string(env: sys::napi_env, s: &str) -> sys::napi_value {
    let mut v = null_mut();
    // SAFETY: s is valid UTF-8 of the given length.
    unsafe { sys::napi_create_string_utf8(env, s.as_ptr().cast(), s.len() as isize, &mut v) };
    v
}

pub fn int(env: sys::napi_env, n: i32) -> sys::napi_value {
    let mut v = null_mut();
    // SAFETY: always succeeds on a live env.
    unsafe { sys::napi_create_int32(env, n, &mut v) };
    v
}

pub fn double(env: sys::napi_env, n: f64) -> sys::napi_value {
    let mut v = null_mut();
    // SAFETY: always succeeds on a live env.
    unsafe { sys::napi_create_double(env, n, &mut v) };
    v
}

pub fn int_array(env: sys::napi_env, values: &[i32]) -> sys::napi_value {
    let mut arr = null_mut();
    // SAFETY: plain N-API calls in an open handle scope.
    unsafe {
        sys::napi_create_array_with_length(env, values.len(), &mut arr);
        for (i, v) in values.iter().enumerate() {
            sys::napi_set_element(env, arr, i as u32, int(env, *v));
        }
    }
    arr
}

/// JS functions a native object calls back, with the async context they run
/// in; released on the JS thread when the last holder drops them.
pub struct Callbacks {
    env: sys::napi_env,
    funcs: Vec<JsRef>,
    /// Destroyed in `drop`, and only there.
    context: std::mem::ManuallyDrop<AsyncContext>,
}

impl Callbacks {
    pub fn new(env: sys::napi_env, name: &str, funcs: &[sys::napi_value]) -> napi::Result<std::rc::Rc<Callbacks>> {
        let funcs = funcs.iter().map(|f| JsRef::new(env, *f)).collect::<napi::Result<Vec<_>>>()?;
        Ok(std::rc::Rc::new(Callbacks { env, funcs, context: std::mem::ManuallyDrop::new(AsyncContext::new(env, name)?) }))
    }

    pub fn scope(&self) -> CallbackScope<'_> {
        CallbackScope::new(self.env, &self.context)
    }

    /// Calls function `index` with `args` built inside an open scope.
    pub fn call(&self, scope: &mut CallbackScope<'_>, index: usize, args: impl FnOnce(sys::napi_env) -> Vec<sys::napi_value>) -> Option<sys::napi_value> {
        let env = scope.enter();
        let func = self.funcs[index].get(env);
        let args = args(env);
        call(env, func, &args)
    }
}

impl Drop for Callbacks {
    fn drop(&mut self) {
        for r in self.funcs.drain(..) {
            r.delete(self.env);
        }
        // SAFETY: `drop` runs once, and nothing uses the context after it.
        let context = unsafe { std::mem::ManuallyDrop::take(&mut self.context) };
        context.destroy(self.env);
    }
}

pub fn boolean(env: sys::napi_env, b: bool) -> sys::napi_value {
    let mut v = null_mut();
    // SAFETY: always succeeds on a live env.
    unsafe { sys::napi_get_boolean(env, b, &mut v) };
    v
}
