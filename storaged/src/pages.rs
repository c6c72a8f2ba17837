//! Page images: the per-segment page file `pg-N.pages` that the coalescer
//! appends to (entries `len u32 | crc32c u32 | encoded PageImage`, see
//! `redo_core::page_index`), and materialising a page from an image plus its
//! records. Plain std::fs I/O on blocking threads: the io_uring flusher is
//! for the log only.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use anyhow::{Context, Result};
use redo_core::checkpoint::Checkpoint;
use redo_core::page::PageImage;
use redo_core::page_index::{decode_image_entry, image_entry_len, verify_image_entry, Located, PageBroken, PageIndex, IMAGE_ENTRY_HEADER_BYTES};
use redo_core::record::{RecordRef, Records};
use redo_core::segment_log::{PagePart, PageRead};
use redo_core::{Lsn, PageId, PgId};

use crate::store;

/// The page file of generation `gen`: compaction writes the next generation
/// beside the current one, and the checkpoint says which is in use.
pub fn page_file_path(dir: &Path, pg: PgId, gen: u64) -> PathBuf {
    match gen {
        0 => dir.join(format!("pg-{}.pages", pg.0)),
        _ => dir.join(format!("pg-{}.pages.{gen}", pg.0)),
    }
}

/// One segment's page file. Only the segment's coalescer appends (and
/// compacts); readers read entries the index points at, which are durable
/// before it does.
pub struct PageFile {
    dir: PathBuf,
    pg: PgId,
    current: RwLock<Current>,
    end: AtomicU64,
}

struct Current {
    file: File,
    gen: u64,
    path: PathBuf,
}

/// The live images copied to the next generation of the page file (`PageFile::compact`).
pub struct Compacted {
    current: Current,
    end: u64,
    /// Old offset to new offset of every image copied.
    pub moved: HashMap<u64, u64>,
}

impl Compacted {
    pub fn gen(&self) -> u64 {
        self.current.gen
    }
    pub fn end(&self) -> u64 {
        self.end
    }
}

fn open_rw(path: &Path, create: bool) -> Result<File> {
    OpenOptions::new().read(true).write(true).create(create).truncate(false).open(path).with_context(|| format!("open {}", path.display()))
}

impl PageFile {
    /// Opens the page file of `pg` and notes its images in `index`: those the
    /// checkpoint lists and those appended after it, or without a checkpoint,
    /// every one (creating generation 0 if needed). Other generations are
    /// leftovers of an interrupted compaction and are removed. A torn or
    /// corrupt entry ends the file: it is truncated there with a warning, as
    /// images can be rebuilt from the log above the checkpoint's start.
    pub fn open(dir: &Path, pg: PgId, checkpoint: Option<&Checkpoint>, index: &mut PageIndex) -> Result<PageFile> {
        let (gen, from) = checkpoint.map_or((0, 0), |c| (c.page_gen, c.page_end));
        remove_other_generations(dir, pg, gen)?;
        let path = page_file_path(dir, pg, gen);
        let file = open_rw(&path, checkpoint.is_none())?;
        if let Some(c) = checkpoint {
            for &(page, at) in &c.images {
                index.note_image(page, at).with_context(|| format!("checkpoint of pg{}", pg.0))?;
            }
        }
        let (end, images, damage) = load(&file, &path, index, from, Lsn(u64::MAX))?;
        let pages = PageFile { dir: dir.to_path_buf(), pg, current: RwLock::new(Current { file, gen, path }), end: AtomicU64::new(end) };
        if let Some(reason) = damage {
            tracing::warn!(path = %pages.path().display(), offset = end, %reason, "truncating page file at a torn or corrupt entry");
            pages.truncate(end)?;
        }
        tracing::info!(path = %pages.path().display(), checkpointed = checkpoint.map_or(0, |c| c.images.len()), images, bytes = end - from, "loaded page file");
        Ok(pages)
    }

    fn path(&self) -> PathBuf {
        self.current.read().expect("page file lock").path.clone()
    }

    pub fn gen(&self) -> u64 {
        self.current.read().expect("page file lock").gen
    }

    pub fn end(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }

    /// Whether a file of `end` bytes holding `live` bytes of kept images is
    /// worth compacting: once its dead bytes (images the index no longer keeps)
    /// reach twice its live ones, and a quarter of the log a segment retains
    /// (`--log-retain-bytes`), so that small files are not rewritten over and
    /// over. The file stays within three times its live images; compaction
    /// copies at most one byte for every two bytes of images written.
    pub fn worth_compacting(end: u64, live: u64, log_retain_bytes: u64) -> bool {
        let dead = end.saturating_sub(live);
        dead >= 2 * live && dead >= log_retain_bytes / 4
    }

    /// A truncation discarded the records above `above`: cuts the file before
    /// its first image above it (images after that one are dropped too: the
    /// coalescer rebuilds them from the log) and notes the images kept in
    /// `index`. Returns the bytes cut. The coalescer must not be appending
    /// meanwhile.
    pub fn cut_above(&self, above: Lsn, index: &mut PageIndex) -> Result<u64> {
        let (end, kept, _) = {
            let cur = self.current.read().expect("page file lock");
            load(&cur.file, &cur.path, index, 0, above)?
        };
        let size = self.end();
        if end < size {
            self.truncate(end)?;
            tracing::info!(path = %self.path().display(), %above, kept, bytes_cut = size - end, "cut page file for a truncation");
        }
        Ok(size.saturating_sub(end))
    }

    /// Cuts the file to `len` bytes, durably.
    pub fn truncate(&self, len: u64) -> Result<()> {
        let cur = self.current.read().expect("page file lock");
        cur.file.set_len(len).with_context(|| format!("truncate {}", cur.path.display()))?;
        cur.file.sync_all().with_context(|| format!("fsync {}", cur.path.display()))?;
        self.end.store(len, Ordering::Release);
        Ok(())
    }

    /// Appends `entries` (encoded entries back to back) durably; returns the offset they start at.
    pub fn append(&self, entries: &[u8]) -> Result<u64> {
        let cur = self.current.read().expect("page file lock");
        let at = self.end();
        cur.file.write_all_at(entries, at).with_context(|| format!("write {} bytes to {}", entries.len(), cur.path.display()))?;
        cur.file.sync_data().with_context(|| format!("fsync {}", cur.path.display()))?;
        self.end.store(at + entries.len() as u64, Ordering::Release);
        Ok(at)
    }

    fn read(&self, at: Located) -> Result<PageImage> {
        let entry = self.read_entry(at)?;
        decode_image_entry(&entry, at.offset as usize).with_context(|| format!("{} at offset {}", self.path().display(), at.offset))
    }

    fn read_entry(&self, at: Located) -> Result<Vec<u8>> {
        let cur = self.current.read().expect("page file lock");
        let mut entry = vec![0u8; at.len as usize];
        cur.file.read_exact_at(&mut entry, at.offset).with_context(|| format!("read {} at offset {}", cur.path.display(), at.offset))?;
        Ok(entry)
    }

    /// Copies the entries of `images` (CRC-checked) to the next generation of
    /// the file, durably. Nothing changes for readers until `install`.
    pub fn compact(&self, images: &[Located]) -> Result<Compacted> {
        let gen = self.gen() + 1;
        let path = page_file_path(&self.dir, self.pg, gen);
        let file = File::create(&path).with_context(|| format!("create {}", path.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, &file);
        let mut moved = HashMap::with_capacity(images.len());
        let mut end = 0u64;
        for &at in images {
            let entry = self.read_entry(at)?;
            verify_image_entry(&entry, at.offset as usize).with_context(|| format!("{} at offset {}", self.path().display(), at.offset))?;
            out.write_all(&entry).with_context(|| format!("write {}", path.display()))?;
            moved.insert(at.offset, end);
            end += entry.len() as u64;
        }
        out.flush().with_context(|| format!("write {}", path.display()))?;
        drop(out);
        file.sync_all().with_context(|| format!("fsync {}", path.display()))?;
        store::fsync_dir(&self.dir)?;
        Ok(Compacted { current: Current { file: open_rw(&path, false)?, gen, path }, end, moved })
    }

    /// Makes the compacted file the current one (the checkpoint naming it is
    /// durable) and removes the old one. The caller holds the segment's
    /// `files` exclusively: no reader holds an offset into the old file.
    pub fn install(&self, compacted: Compacted) -> Result<()> {
        let old = std::mem::replace(&mut *self.current.write().expect("page file lock"), compacted.current);
        self.end.store(compacted.end, Ordering::Release);
        fs::remove_file(&old.path).with_context(|| format!("remove {}", old.path.display()))
    }

    /// Removes a compaction that will not be installed.
    pub fn discard(compacted: Compacted) {
        let _ = fs::remove_file(&compacted.current.path);
    }
}

/// Removes the page files of `pg` other than generation `gen`.
fn remove_other_generations(dir: &Path, pg: PgId, gen: u64) -> Result<()> {
    let prefix = format!("pg-{}.pages", pg.0);
    let keep = page_file_path(dir, pg, gen);
    for entry in fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        let path = entry.context("list data dir")?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let other_gen = name == prefix || name.strip_prefix(&prefix).and_then(|g| g.strip_prefix('.')).is_some_and(|g| g.parse::<u64>().is_ok());
        if other_gen && path != keep {
            tracing::warn!(path = %path.display(), "removing a page file the checkpoint does not name (an interrupted compaction)");
            fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
        }
    }
    Ok(())
}

/// Reads the page file's entries from `from`, noting their images in
/// `index`, up to the first damaged entry or image above `above`. Returns
/// where that is, the images noted and the damage, if any.
fn load(file: &File, path: &Path, index: &mut PageIndex, from: u64, above: Lsn) -> Result<(u64, u64, Option<String>)> {
    let size = file.metadata().with_context(|| format!("stat {}", path.display()))?.len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    reader.seek(SeekFrom::Start(from)).with_context(|| format!("seek {}", path.display()))?;
    let mut end = from;
    let mut images = 0u64;
    let damage = loop {
        let mut entry = vec![0u8; IMAGE_ENTRY_HEADER_BYTES];
        if end >= size {
            break (end > size).then(|| format!("the checkpoint says the file is {end} bytes, it is {size}"));
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
    Ok((end.min(size), images, damage))
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
