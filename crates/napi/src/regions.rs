//! `NativeRegionReads`: region bytes the device model shares with the
//! native layer, so REGION_READ of them (config space, memory-backed
//! registers) is answered without entering JS. The device model keeps the
//! bytes current; reads never have side effects there.

use napi::bindgen_prelude::*;
use napi_derive::napi;
use std::cell::RefCell;
use std::rc::Rc;

pub struct RegionReads {
    regions: Vec<Option<Buffer>>,
    max_count: u32,
}

impl RegionReads {
    /// The bytes a read of `count` at `offset` returns, if served natively.
    pub fn slice(&self, region: u32, offset: u64, count: u32) -> Option<&[u8]> {
        if count == 0 || count > self.max_count {
            return None;
        }
        let bytes: &[u8] = self.regions.get(region as usize)?.as_ref()?;
        let start = usize::try_from(offset).ok()?;
        bytes.get(start..start.checked_add(count as usize)?)
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

    /// Serves reads of region `index` from `bytes` (kept alive while set).
    #[napi]
    pub fn set(&self, index: u32, bytes: Buffer) {
        let mut reads = self.shared.borrow_mut();
        let i = index as usize;
        if reads.regions.len() <= i {
            reads.regions.resize_with(i + 1, || None);
        }
        reads.regions[i] = Some(bytes);
    }

    #[napi]
    pub fn remove(&self, index: u32) {
        if let Some(slot) = self.shared.borrow_mut().regions.get_mut(index as usize) {
            *slot = None;
        }
    }

    pub(crate) fn shared(&self) -> Rc<RefCell<RegionReads>> {
        self.shared.clone()
    }
}
