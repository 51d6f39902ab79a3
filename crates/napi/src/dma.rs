//! `NativeDmaTable`: one client's DMA window table (vfio_user_core::dma),
//! shared by the connection's reader, which answers DMA_MAP and DMA_UNMAP
//! with it without entering JS, and by the `DmaSpace` that mirrors it for
//! device code. The mirror learns of changes through a counter in a
//! SharedArrayBuffer it reads before every lookup, and takes them in one
//! batch (`takeChanges`) when the counter moved.

use crate::connection::errno_error;
use crate::js::JsRef;
use crate::mapping::{Backed, NativeMapping};
use napi::bindgen_prelude::*;
use napi::sys;
use napi_derive::napi;
use std::cell::RefCell;
use std::os::fd::BorrowedFd;
use std::ptr::null_mut;
use std::rc::Rc;
use vfio_user_core::dma::{Change, DmaTable, MapRequest, Refusal, Window};
use vfio_user_core::Mapping;

pub(crate) type Table = Rc<RefCell<TableState>>;

pub(crate) struct TableState {
    table: DmaTable<Backed>,
    env: sys::napi_env,
    /// The mirror's change counter: a u32 in a SharedArrayBuffer, whose
    /// memory never moves and cannot be detached; `counter_ref` keeps it alive.
    counter: *mut u32,
    counter_ref: Option<JsRef>,
}

impl TableState {
    /// Applies a DMA_MAP or DMA_UNMAP message; returns the reply's payload.
    /// Removed windows are released (views detached, then unmapped) before
    /// this returns, so before any reply is sent. `enter` opens a handle
    /// scope, which detaching views needs when no N-API call is under way.
    pub(crate) fn apply_message(
        &mut self,
        command: u16,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
        enter: impl FnOnce(),
    ) -> std::result::Result<Vec<u8>, Refusal> {
        let env = self.env;
        let applied = self.table.apply_message(command, payload, fds, |fd, offset, size, prot| {
            Mapping::new(fd, offset, size, prot).map(|m| Backed::new(env, m))
        });
        self.changed();
        let applied = applied?;
        release(applied.removed, enter);
        Ok(applied.reply)
    }

    /// Moves the mirror's counter when changes wait for it.
    fn changed(&mut self) {
        if self.table.has_changes() {
            // SAFETY: `counter` points into the SharedArrayBuffer `counter_ref` keeps alive;
            // only this thread (the JS thread) touches it.
            unsafe { *self.counter = (*self.counter).wrapping_add(1) };
        }
    }
}

/// Releases removed windows: each one's views are detached, then it is unmapped.
fn release(removed: Vec<Window<Backed>>, enter: impl FnOnce()) {
    let mut enter = Some(enter);
    for backed in removed.into_iter().filter_map(|w| w.backing) {
        if backed.has_views() {
            if let Some(enter) = enter.take() {
                enter();
            }
        }
        backed.unmap();
    }
}

impl Drop for TableState {
    fn drop(&mut self) {
        if let Some(r) = self.counter_ref.take() {
            r.delete(self.env);
        }
    }
}

/// One change to the table, in the order the mirror applies them.
#[napi(object, object_from_js = false)]
pub struct DmaChange {
    /// 'map', 'unmap' (the window at `iova`) or 'unmapAll'.
    #[napi(ts_type = "'map' | 'unmap' | 'unmapAll'")]
    pub kind: String,
    pub iova: Option<BigInt>,
    pub size: Option<BigInt>,
    pub readable: Option<bool>,
    pub writable: Option<bool>,
    pub file_offset: Option<BigInt>,
    /// The window's mapping; absent for a window without an fd.
    pub mapping: Option<NativeMapping>,
}

fn refusal_error(r: Refusal) -> Error<String> {
    errno_error(r.errno, &r.reason)
}

fn u64_of(value: BigInt, what: &str) -> Result<u64, String> {
    match value.get_u64() {
        (false, v, true) => Ok(v),
        _ => Err(Error::new(Status::InvalidArg.as_ref().to_string(), format!("{what} must fit in 64 bits"))),
    }
}

#[napi]
pub struct NativeDmaTable {
    state: Table,
}

#[napi]
impl NativeDmaTable {
    /// At most `maxWindows` windows; `counter[0]` moves whenever changes wait
    /// for `takeChanges`. It must be a view of a SharedArrayBuffer: written
    /// through a pointer kept from here, its memory must never move nor be
    /// detached, which only a SharedArrayBuffer promises.
    #[napi(constructor)]
    pub fn new(env: Env, max_windows: u32, counter: Uint32ArraySlice<'_>) -> Result<Self> {
        let value = counter.value();
        let (mut kind, mut length, mut data) = (0, 0usize, null_mut());
        let (mut buffer, mut offset) = (null_mut(), 0usize);
        // SAFETY: a query on a live typed array of the current call.
        let status = unsafe { sys::napi_get_typedarray_info(value.env, value.value, &mut kind, &mut length, &mut data, &mut buffer, &mut offset) };
        if status != sys::Status::napi_ok || data.is_null() || length < 1 {
            return Err(Error::new(Status::InvalidArg, "counter must be a non-empty Uint32Array"));
        }
        let counter_ref = JsRef::new(env.raw(), value.value)?;
        Ok(NativeDmaTable {
            state: Rc::new(RefCell::new(TableState {
                table: DmaTable::new(max_windows as usize),
                env: env.raw(),
                counter: data.cast(),
                counter_ref: Some(counter_ref),
            })),
        })
    }

    pub(crate) fn shared(&self) -> Table {
        self.state.clone()
    }

    /// Applies a DMA_MAP or DMA_UNMAP message (the payload after the header;
    /// `fds` borrowed) as the connection's reader does; returns the reply's
    /// payload. A refusal throws an Error whose `code` is the errno in decimal.
    #[napi]
    pub fn apply_message(&self, command: u32, payload: &[u8], fds: Vec<i32>) -> Result<Buffer, String> {
        if fds.iter().any(|fd| *fd < 0) || command > u32::from(u16::MAX) {
            return Err(Error::new(Status::InvalidArg.as_ref().to_string(), "fds must be non-negative, command a u16".to_string()));
        }
        // SAFETY: the caller keeps these fds open for the duration of the call.
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|fd| unsafe { BorrowedFd::borrow_raw(*fd) }).collect();
        // An N-API call is under way: its handle scope serves.
        let reply = self.state.borrow_mut().apply_message(command as u16, payload, &borrowed, || {});
        reply.map(Buffer::from).map_err(refusal_error)
    }

    /// Adds a window (see `DmaSpace.map`); `fd` is borrowed.
    #[napi]
    pub fn map(&self, iova: BigInt, size: BigInt, readable: bool, writable: bool, fd: Option<i32>, file_offset: BigInt) -> Result<(), String> {
        if fd.is_some_and(|fd| fd < 0) {
            return Err(Error::new(Status::InvalidArg.as_ref().to_string(), "fd must be non-negative".to_string()));
        }
        // SAFETY: the caller keeps fd open for the duration of the call.
        let fd = fd.map(|fd| unsafe { BorrowedFd::borrow_raw(fd) });
        let req = MapRequest { iova: u64_of(iova, "iova")?, size: u64_of(size, "size")?, readable, writable, fd, file_offset: u64_of(file_offset, "fileOffset")? };
        let mut state = self.state.borrow_mut();
        let env = state.env;
        let mapped = state.table.map(&req, |fd, offset, size, prot| Mapping::new(fd, offset, size, prot).map(|m| Backed::new(env, m)));
        state.changed();
        mapped.map_err(refusal_error)
    }

    /// Removes the window that matches exactly (ENOENT otherwise), detaching its views first.
    #[napi]
    pub fn unmap(&self, iova: BigInt, size: BigInt) -> Result<(), String> {
        let (iova, size) = (u64_of(iova, "iova")?, u64_of(size, "size")?);
        let mut state = self.state.borrow_mut();
        let removed = state.table.unmap(iova, size);
        state.changed();
        drop(state);
        release(vec![removed.map_err(refusal_error)?], || {});
        Ok(())
    }

    /// Removes every window, detaching their views first.
    #[napi]
    pub fn unmap_all(&self) {
        let mut state = self.state.borrow_mut();
        let removed = state.table.unmap_all();
        state.changed();
        drop(state);
        release(removed, || {});
    }

    /// The changes since the last call, in order (a window mapped and
    /// unmapped in between is left out).
    #[napi]
    pub fn take_changes(&self) -> Vec<DmaChange> {
        let mut out = Vec::new();
        self.state.borrow_mut().table.take_changes(|change| {
            out.push(match change {
                Change::Mapped(w) => DmaChange {
                    kind: "map".into(),
                    iova: Some(w.iova.into()),
                    size: Some(w.size.into()),
                    readable: Some(w.readable),
                    writable: Some(w.writable),
                    file_offset: Some(w.file_offset.into()),
                    mapping: w.backing.as_ref().map(NativeMapping::of),
                },
                Change::Unmapped { iova } => DmaChange { iova: Some(iova.into()), ..bare("unmap") },
                Change::UnmappedAll => bare("unmapAll"),
            })
        });
        out
    }
}

fn bare(kind: &str) -> DmaChange {
    DmaChange { kind: kind.into(), iova: None, size: None, readable: None, writable: None, file_offset: None, mapping: None }
}
