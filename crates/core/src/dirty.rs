//! Dirty-page bitmaps: which 4 KiB pages of a mapping the device wrote
//! through the library, for live migration. One bit per page, in u64 words
//! whose bit `i` is page `64 * word + i` (the layout of VFIO's bitmaps).
//! Atomic words let `&self` writers mark pages from any thread.

use std::sync::atomic::{AtomicU64, Ordering};

/// The tracking granule. Guest page size on every VMM we serve; DMA windows
/// are aligned to it, so page `n` of a mapping is page `n` of its IOVA range.
pub const DIRTY_PAGE_SIZE: u64 = 4096;

#[derive(Debug)]
pub struct DirtyBitmap {
    words: Box<[AtomicU64]>,
    pages: u64,
}

/// Bits `from..to` (to <= 64) of a word.
fn mask(from: u64, to: u64) -> u64 {
    let high = if to >= 64 { u64::MAX } else { (1u64 << to) - 1 };
    high & !((1u64 << from) - 1)
}

impl DirtyBitmap {
    /// A clean bitmap covering `bytes` (a partial last page counts).
    pub fn new(bytes: u64) -> Self {
        let pages = bytes.div_ceil(DIRTY_PAGE_SIZE);
        let words = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        DirtyBitmap { words, pages }
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The words as bytes, for a caller on the owning thread that marks pages
    /// itself (the binding's fast path): little-endian u64 words, so bit
    /// `p % 32` of u32 `p / 32` is page `p`.
    pub fn as_mut_ptr(&self) -> (*mut u8, usize) {
        (self.words.as_ptr() as *mut u8, self.words.len() * 8)
    }

    /// Marks every page that `[offset, offset + len)` touches. The range must
    /// lie inside the covered bytes (the mapping checks accesses first).
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / DIRTY_PAGE_SIZE;
        let end = (offset + len - 1) / DIRTY_PAGE_SIZE + 1;
        assert!(end <= self.pages, "dirty range past the bitmap");
        self.for_words(first, end, |_, word, bits| {
            word.fetch_or(bits, Ordering::Relaxed);
        });
    }

    pub fn is_dirty(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize].load(Ordering::Relaxed) & (1 << (page % 64)) != 0
    }

    /// Reports pages `first..first + pages` into `out` (bit `out_bit + i` is
    /// set when page `first + i` is dirty; other bits are left alone, so
    /// several mappings can fill one report), clearing them when `clear`.
    /// Pages past the bitmap are reported clean.
    pub fn scan(&self, first: u64, pages: u64, clear: bool, out: &mut [u64], out_bit: u64) {
        let end = first.saturating_add(pages).min(self.pages);
        assert!(out_bit + end.saturating_sub(first) <= out.len() as u64 * 64, "report too small");
        self.for_words(first, end, |index, word, bits| {
            let base = index * 64;
            let mut found = if clear { word.fetch_and(!bits, Ordering::Relaxed) } else { word.load(Ordering::Relaxed) } & bits;
            while found != 0 {
                let page = base + found.trailing_zeros() as u64;
                let bit = out_bit + page - first;
                out[(bit / 64) as usize] |= 1 << (bit % 64);
                found &= found - 1;
            }
        });
    }

    /// Calls `f(index, word, bits)` for each word holding pages `first..end`.
    fn for_words(&self, first: u64, end: u64, mut f: impl FnMut(u64, &AtomicU64, u64)) {
        let mut page = first;
        while page < end {
            let word = page / 64;
            let stop = end.min((word + 1) * 64);
            f(word, &self.words[word as usize], mask(page % 64, stop - word * 64));
            page = stop;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(b: &DirtyBitmap, first: u64, pages: u64, clear: bool) -> Vec<u64> {
        let mut out = vec![0u64; pages.div_ceil(64) as usize];
        b.scan(first, pages, clear, &mut out, 0);
        out
    }

    #[test]
    fn marks_every_page_a_range_touches() {
        let b = DirtyBitmap::new(200 * DIRTY_PAGE_SIZE);
        b.mark(4095, 2); // pages 0 and 1
        b.mark(10 * 4096, 4096); // page 10 only
        b.mark(60 * 4096, 10 * 4096); // 60..70, across a word boundary
        let dirty: Vec<u64> = (0..200).filter(|p| b.is_dirty(*p)).collect();
        assert_eq!(dirty, [0, 1, 10].into_iter().chain(60..70).collect::<Vec<_>>());
        b.mark(0, 0);
        assert!(!b.is_dirty(2));
    }

    #[test]
    fn a_partial_last_page_is_tracked() {
        let b = DirtyBitmap::new(4097);
        assert_eq!(b.pages(), 2);
        b.mark(4096, 1);
        assert!(b.is_dirty(1));
    }

    #[test]
    #[should_panic(expected = "past the bitmap")]
    fn marking_past_the_end_is_a_bug() {
        DirtyBitmap::new(4096).mark(4096, 1);
    }

    #[test]
    fn scans_a_subrange_and_clears_only_when_asked() {
        let b = DirtyBitmap::new(300 * DIRTY_PAGE_SIZE);
        for page in [3, 63, 64, 65, 130, 299] {
            b.mark(page * 4096, 1);
        }
        assert_eq!(report(&b, 60, 10, false), vec![0b111000]); // 63, 64, 65
        assert_eq!(report(&b, 0, 300, false), {
            let mut want = vec![0u64; 5];
            for page in [3u64, 63, 64, 65, 130, 299] {
                want[(page / 64) as usize] |= 1 << (page % 64);
            }
            want
        });
        assert_eq!(report(&b, 64, 100, true), vec![0b11, 0b100]);
        assert!(!b.is_dirty(64) && !b.is_dirty(130));
        assert!(b.is_dirty(63) && b.is_dirty(299));
        assert_eq!(report(&b, 64, 100, true), vec![0, 0]);
    }

    #[test]
    fn reports_at_a_bit_offset_and_past_the_end_as_clean() {
        let b = DirtyBitmap::new(4 * DIRTY_PAGE_SIZE);
        b.mark(0, 4 * 4096);
        let mut out = vec![1u64, 0];
        b.scan(2, 10, false, &mut out, 62); // pages 2, 3 -> bits 62, 63; 4.. are past the end
        assert_eq!(out, vec![1 | 3 << 62, 0]);
    }
}
