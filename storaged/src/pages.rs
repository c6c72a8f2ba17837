//! Page images: the per-segment page file `pg-N.pages` that the coalescer
//! appends to (entries `len u32 | crc32c u32 | encoded PageImage`, see
//! `redo_core::page_index`), and materialising a page from an image plus its
//! records. Plain std::fs I/O on blocking threads: the io_uring flusher is
//! for the log only.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use redo_core::page::PageImage;
use redo_core::page_index::{decode_image_entry, image_entry_len, Located, PageBroken, PageIndex, IMAGE_ENTRY_HEADER_BYTES};
use redo_core::record::{RecordRef, Records};
use redo_core::segment_log::{PagePart, PageRead};
use redo_core::{Lsn, PageId, PgId};

use crate::store;

pub fn page_file_path(dir: &Path, pg: PgId) -> PathBuf {
    dir.join(format!("pg-{}.pages", pg.0))
}

/// One segment's page file. Only the segment's coalescer appends; readers
/// read entries the index points at, which are durable before it does.
pub struct PageFile {
    file: File,
    path: PathBuf,
    end: AtomicU64,
}

impl PageFile {
    /// Opens (creating if needed) the page file of `pg` and notes its images
    /// in `index`. A torn or corrupt entry ends the file: it is truncated
    /// there with a warning, as images can always be rebuilt from the log.
    pub fn open(dir: &Path, pg: PgId, index: &mut PageIndex) -> Result<PageFile> {
        let path = page_file_path(dir, pg);
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).with_context(|| format!("open {}", path.display()))?;
        let (end, images, damage) = load(&file, &path, index, Lsn(u64::MAX))?;
        let pages = PageFile { file, path, end: AtomicU64::new(end) };
        if let Some(reason) = damage {
            tracing::warn!(path = %pages.path.display(), offset = end, %reason, "truncating page file at a torn or corrupt entry");
            pages.truncate(end)?;
        }
        tracing::info!(path = %pages.path.display(), images, bytes = end, "loaded page file");
        Ok(pages)
    }

    /// A truncation discarded the records above `above`: cuts the file before
    /// its first image above it (images after that one are dropped too: the
    /// coalescer rebuilds them from the log) and notes the images kept in
    /// `index`. Returns the bytes cut. The coalescer must not be appending
    /// meanwhile.
    pub fn cut_above(&self, above: Lsn, index: &mut PageIndex) -> Result<u64> {
        let (end, kept, _) = load(&self.file, &self.path, index, above)?;
        let size = self.end.load(Ordering::Acquire);
        if end < size {
            self.truncate(end)?;
            tracing::info!(path = %self.path.display(), %above, kept, bytes_cut = size - end, "cut page file for a truncation");
        }
        Ok(size.saturating_sub(end))
    }
}

/// Reads the page file's entries from the start, noting their images in
/// `index`, up to the first damaged entry or image above `above`. Returns
/// where that is, the images noted and the damage, if any.
fn load(file: &File, path: &Path, index: &mut PageIndex, above: Lsn) -> Result<(u64, u64, Option<String>)> {
    {
        let size = file.metadata().with_context(|| format!("stat {}", path.display()))?.len();
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut end = 0u64;
        let mut images = 0u64;
        let damage = loop {
            let mut entry = vec![0u8; IMAGE_ENTRY_HEADER_BYTES];
            if end == size {
                break None;
            }
            if let Err(e) = reader.read_exact(&mut entry) {
                break Some(format!("torn entry header: {e}"));
            }
            let len = match image_entry_len(entry[..].try_into().expect("header bytes"), end as usize) {
                Ok(len) => len,
                Err(e) => break Some(e.to_string()),
            };
            entry.resize(IMAGE_ENTRY_HEADER_BYTES + len, 0);
            if let Err(e) = reader.read_exact(&mut entry[IMAGE_ENTRY_HEADER_BYTES..]) {
                break Some(format!("torn entry of {len} bytes: {e}"));
            }
            let image = match decode_image_entry(&entry, end as usize) {
                Ok(image) => image,
                Err(e) => break Some(e.to_string()),
            };
            if image.lsn > above {
                break None;
            }
            let at = Located { lsn: image.lsn, offset: end, len: entry.len() as u32 };
            if let Err(e) = index.note_image(image.page, at) {
                break Some(e.to_string());
            }
            end += entry.len() as u64;
            images += 1;
        };
        Ok((end, images, damage))
    }
}

impl PageFile {
    /// Cuts the file to `len` bytes, durably.
    pub fn truncate(&self, len: u64) -> Result<()> {
        self.file.set_len(len).with_context(|| format!("truncate {}", self.path.display()))?;
        self.file.sync_all().with_context(|| format!("fsync {}", self.path.display()))?;
        self.end.store(len, Ordering::Release);
        Ok(())
    }

    /// Appends `entries` (encoded entries back to back) durably; returns the offset they start at.
    pub fn append(&self, entries: &[u8]) -> Result<u64> {
        let at = self.end.load(Ordering::Acquire);
        self.file.write_all_at(entries, at).with_context(|| format!("write {} bytes to {}", entries.len(), self.path.display()))?;
        self.file.sync_data().with_context(|| format!("fsync {}", self.path.display()))?;
        self.end.store(at + entries.len() as u64, Ordering::Release);
        Ok(at)
    }

    fn read(&self, at: Located) -> Result<PageImage> {
        let mut entry = vec![0u8; at.len as usize];
        self.file.read_exact_at(&mut entry, at.offset).with_context(|| format!("read {} at offset {}", self.path.display(), at.offset))?;
        decode_image_entry(&entry, at.offset as usize).with_context(|| format!("{} at offset {}", self.path.display(), at.offset))
    }
}

#[derive(Debug)]
pub enum PageError {
    /// A record does not apply; carries the page as of the record before it.
    Broken(PageBroken, PageImage),
    Io(anyhow::Error),
}

/// Whether materialising `read` touches the disk (else it runs inline).
pub fn needs_io(read: &PageRead) -> bool {
    read.base.is_some() || read.parts.iter().any(|p| !matches!(p, PagePart::Memory(_)))
}

/// Materialises `page` from `read` (`SegmentLog::page_read`): its base image,
/// then its records in order. Blocking I/O when `needs_io`.
pub fn materialise(page_file: &PageFile, segment: &File, page: PageId, read: &PageRead) -> Result<PageImage, PageError> {
    let mut image = match read.base {
        Some(at) => page_file.read(at).map_err(PageError::Io)?,
        None => PageImage::empty(page),
    };
    if image.page != page {
        return Err(PageError::Io(anyhow::anyhow!("page file entry at offset {} holds {}, not {page}", read.base.map_or(0, |b| b.offset), image.page)));
    }
    let apply = |image: &mut PageImage, rec: RecordRef| image.apply(rec).map_err(|e| PageBroken { page, at: rec.lsn(), reason: e.to_string() });
    for part in &read.parts {
        let applied = match part {
            PagePart::Memory(bytes) => apply(&mut image, RecordRef::decode(bytes, 0).map_err(|e| PageError::Io(e.into()))?),
            PagePart::Disk(at) => {
                let bytes = store::read_record(segment, *at).map_err(PageError::Io)?;
                apply(&mut image, RecordRef::decode(&bytes, at.offset as usize).map_err(|e| PageError::Io(e.into()))?)
            }
            PagePart::Scan(scan) => {
                let (bytes, _) = store::read_from_disk(segment, *scan, usize::MAX, |r| r.header().page == page).map_err(PageError::Io)?;
                Records::new(&bytes, 0).try_for_each(|rec| apply(&mut image, rec.expect("records read from the segment file were checked")))
            }
        };
        if let Err(broken) = applied {
            return Err(PageError::Broken(broken, image));
        }
    }
    Ok(image)
}

/// The LSN a page read starts from.
pub fn base_lsn(read: &PageRead) -> Lsn {
    read.base.map_or(Lsn::ZERO, |b| b.lsn)
}
