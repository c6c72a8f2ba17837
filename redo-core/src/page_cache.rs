//! Page images in memory, bounded in bytes: the writer's and the replica's
//! caches. Pages leave least recently used first, and only those the owner
//! says storage can give back with GetPage@LSN.

use std::collections::{BTreeMap, HashMap};

use crate::ids::{Lsn, PageId};
use crate::page::PageImage;

pub struct PageCache {
    bytes_max: usize,
    /// `memory_bytes` of the cached images.
    bytes: usize,
    /// Each cached page with its last use.
    pages: HashMap<PageId, (u64, PageImage)>,
    /// Cached pages by last use, oldest first: the eviction order (deterministic, unlike a HashMap's).
    order: BTreeMap<u64, PageId>,
    clock: u64,
    /// The clean point at which `evict` found nothing more to evict: until it moves or a page
    /// is inserted, another call would scan the same pages for nothing (the writer calls it on
    /// every transaction while VDL stands still).
    exhausted_at: Option<Lsn>,
}

impl PageCache {
    pub fn new(bytes_max: usize) -> Self {
        PageCache { bytes_max, bytes: 0, pages: HashMap::new(), order: BTreeMap::new(), clock: 0, exhausted_at: None }
    }

    pub fn len(&self) -> usize {
        self.pages.len()
    }
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }
    /// Memory the cached images take (`PageImage::memory_bytes`).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    pub fn contains(&self, page: PageId) -> bool {
        self.pages.contains_key(&page)
    }

    /// The page's image, without counting it as a use.
    pub fn peek(&self, page: PageId) -> Option<&PageImage> {
        self.pages.get(&page).map(|(_, img)| img)
    }

    /// The page's image, counted as a use.
    pub fn get(&mut self, page: PageId) -> Option<&PageImage> {
        self.touch(page);
        self.peek(page)
    }

    /// Changes a cached page in place (a use); the caller then `evict`s if it grew.
    pub fn update<R>(&mut self, page: PageId, f: impl FnOnce(&mut PageImage) -> R) -> Option<R> {
        self.touch(page);
        let (_, img) = self.pages.get_mut(&page)?;
        let before = img.memory_bytes();
        let r = f(img);
        self.bytes = self.bytes - before + img.memory_bytes();
        Some(r)
    }

    /// Caches `img` in place of any image of its page (a use); the caller then `evict`s.
    /// An image larger than the whole cache is not kept.
    pub fn insert(&mut self, img: PageImage) {
        self.remove(img.page);
        if img.memory_bytes() > self.bytes_max {
            return;
        }
        self.clock += 1;
        self.exhausted_at = None;
        self.bytes += img.memory_bytes();
        self.order.insert(self.clock, img.page);
        self.pages.insert(img.page, (self.clock, img));
    }

    pub fn remove(&mut self, page: PageId) -> Option<PageImage> {
        let (used, img) = self.pages.remove(&page)?;
        self.order.remove(&used);
        self.bytes -= img.memory_bytes();
        Some(img)
    }

    /// Drops least recently used pages whose LSN is at or below `clean_upto`
    /// (storage serves them) until the cache is within its bound. Pages above
    /// it stay, past the bound if need be, until a later call.
    pub fn evict(&mut self, clean_upto: Lsn) {
        let mut over = self.bytes.saturating_sub(self.bytes_max);
        if over == 0 || self.exhausted_at == Some(clean_upto) {
            return;
        }
        let mut victims = Vec::new();
        for (&used, page) in &self.order {
            if over == 0 {
                break;
            }
            let img = &self.pages[page].1;
            if img.lsn <= clean_upto {
                over = over.saturating_sub(img.memory_bytes());
                victims.push(used);
            }
        }
        if over > 0 {
            self.exhausted_at = Some(clean_upto);
        }
        for used in victims {
            let page = self.order[&used];
            self.remove(page);
        }
    }

    fn touch(&mut self, page: PageId) {
        if let Some((used, _)) = self.pages.get_mut(&page) {
            let page = self.order.remove(used).expect("ordered");
            self.clock += 1;
            *used = self.clock;
            self.order.insert(self.clock, page);
        }
    }

    /// Panics unless the byte count and the eviction order match the pages cached.
    pub fn check_invariants(&self) {
        assert_eq!(self.bytes, self.pages.values().map(|(_, img)| img.memory_bytes()).sum::<usize>(), "cached bytes");
        assert_eq!(self.order.len(), self.pages.len(), "pages in the eviction order");
        assert!(self.pages.iter().all(|(page, (used, _))| self.order.get(used) == Some(page)), "eviction order out of step");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::PageOp;

    fn image(page: u64, lsn: u64, value_bytes: usize) -> PageImage {
        let mut img = PageImage::empty(PageId(page));
        img.apply_op(Lsn(lsn), PageOp::Put { key: b"k".to_vec(), value: vec![0; value_bytes] });
        img
    }

    #[test]
    fn the_least_recently_used_clean_pages_leave_first_until_within_the_bound() {
        let size = image(0, 1, 1000).memory_bytes();
        let mut c = PageCache::new(3 * size);
        for p in 0..3 {
            c.insert(image(p, p + 1, 1000));
        }
        c.get(PageId(0)); // used: now the newest
        c.insert(image(3, 4, 1000));
        c.evict(Lsn(10));
        assert_eq!((c.len(), c.contains(PageId(1))), (3, false), "page 1 was the least recently used");
        // Page 2 is above what storage holds: page 0 goes instead, though used later.
        c.insert(image(4, 5, 1000));
        c.evict(Lsn(2));
        assert!(c.contains(PageId(2)) && !c.contains(PageId(0)));
        c.check_invariants();
        // Only pages above the clean point left: the cache stays over its bound until they are clean.
        c.insert(image(5, 6, 1000));
        c.evict(Lsn(2));
        assert_eq!(c.len(), 4);
        assert!(c.bytes() > 3 * size);
        c.evict(Lsn(6));
        assert!(c.bytes() <= 3 * size);
        c.check_invariants();
    }

    #[test]
    fn growth_in_place_is_counted_and_a_page_larger_than_the_cache_is_not_kept() {
        let mut c = PageCache::new(9_500);
        c.insert(image(0, 1, 100));
        c.insert(image(1, 2, 100));
        c.update(PageId(0), |img| img.apply_op(Lsn(3), PageOp::Put { key: b"k2".to_vec(), value: vec![0; 9000] }));
        c.check_invariants();
        c.evict(Lsn(3));
        assert!(c.contains(PageId(0)) && !c.contains(PageId(1)), "the grown page was used last");
        c.insert(image(2, 4, 20_000));
        assert!(!c.contains(PageId(2)));
        assert!(c.contains(PageId(0)), "a page too large to keep evicts nothing");
        c.check_invariants();
    }
}
