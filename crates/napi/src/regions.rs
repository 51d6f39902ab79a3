//! `NativeRegionReads`: region bytes the device model shares with the
//! native layer, so REGION_READ of them (config space, memory-backed
//! registers, shared BARs) is answered without entering JS. The device model
//! keeps the bytes current; reads never have side effects there.

use crate::mapping::{NativeMapping, Shared};
use napi::bindgen_prelude::*;
use napi_derive::napi;
use std::cell::RefCell;
use std::rc::Rc;

enum Source {
    /// JS-owned bytes (kept alive while set; the TS side makes their
    /// ArrayBuffer untransferable, so they cannot move under us).
    Bytes(Buffer),
    /// A mapping the device may unmap at any time (`SharedMemory.close()`):
    /// checked on every read, never touched once unmapped.
    Mapping(Shared),
}

pub struct RegionReads {
    regions: Vec<Option<Source>>,
    max_count: u32,
}

impl RegionReads {
    /// Appends the bytes a read of `count` at `offset` returns to `out`;
    /// false (nothing appended) if the read is not served natively.
    pub fn read_into(&self, region: u32, offset: u64, count: u32, out: &mut Vec<u8>) -> bool {
        if count == 0 || count > self.max_count {
            return false;
        }
        match self.regions.get(region as usize) {
            Some(Some(Source::Bytes(bytes))) => {
                let Some(slice) = usize::try_from(offset)
                    .ok()
                    .and_then(|start| bytes.get(start..start.checked_add(count as usize)?))
                else {
                    return false;
                };
                out.extend_from_slice(slice);
                true
            }
            Some(Some(Source::Mapping(shared))) => {
                let guard = shared.borrow();
                let Some(mapping) = guard.as_ref() else { return false };
                let at = out.len();
                out.resize(at + count as usize, 0);
                if mapping.read_at(offset, &mut out[at..]).is_err() {
                    out.truncate(at);
                    return false;
                }
                true
            }
            _ => false,
        }
    }
}

#[napi]
pub struct NativeRegionReads {
    shared: Rc<RefCell<RegionReads>>,
}

#[napi]
impl NativeRegionReads {
    /// `maxCount` is the largest read answered natively (the negotiated
    /// max_data_xfer_size); larger ones go to JS, which rejects them.
    #[napi(constructor)]
    pub fn new(max_count: u32) -> Self {
        NativeRegionReads { shared: Rc::new(RefCell::new(RegionReads { regions: Vec::new(), max_count })) }
    }

    /// Serves reads of region `index` from `bytes` (kept alive while set;
    /// their ArrayBuffer must be untransferable).
    #[napi]
    pub fn set(&self, index: u32, bytes: Buffer) {
        self.put(index, Some(Source::Bytes(bytes)));
    }

    /// Serves reads of region `index` from `mapping` (offset 0 is the
    /// region's start) for as long as it stays mapped; after its unmap the
    /// reads go to JS.
    #[napi]
    pub fn set_mapping(&self, index: u32, mapping: &NativeMapping) {
        self.put(index, Some(Source::Mapping(mapping.shared())));
    }

    #[napi]
    pub fn remove(&self, index: u32) {
        self.put(index, None);
    }

    fn put(&self, index: u32, source: Option<Source>) {
        let mut reads = self.shared.borrow_mut();
        let i = index as usize;
        if reads.regions.len() <= i {
            reads.regions.resize_with(i + 1, || None);
        }
        reads.regions[i] = source;
    }

    pub(crate) fn shared(&self) -> Rc<RefCell<RegionReads>> {
        self.shared.clone()
    }
}
