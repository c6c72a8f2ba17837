//! Segment files on disk: create, recover (CRC-check, truncate a torn tail),
//! persist epochs and truncations, cut the log for a new writer, and serve
//! pulls that memory no longer holds. Plain
//! syscalls: none of this is on the append path (the flusher is).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use redo_core::checkpoint::{Checkpoint, CHECKPOINT_FORMAT_VERSION};
use redo_core::page_index::{Located, PageIndex};
use redo_core::record::{RecordRef, RECORD_BYTES_MAX};
use redo_core::segment_claim::EpochState;
use redo_core::segment_file::{decode_header, encode_header, scan_records, ScanStop, SEGMENT_HEADER_BYTES};
use redo_core::segment_log::{DiskCut, DiskIndex, DiskRead, LogStart, INDEX_STRIDE_BYTES};
use redo_core::wire::{Truncation, TRUNCATIONS_MAX};
use redo_core::{Epoch, Lsn, PgId, SegmentId};

/// O_DIRECT alignment for offsets, lengths and buffers.
pub const BLOCK_BYTES: u64 = 4096;
const SCAN_CHUNK_BYTES: usize = 8 << 20;

pub fn segment_path(dir: &Path, pg: PgId) -> PathBuf {
    dir.join(format!("pg-{}.seg", pg.0))
}

fn epoch_path(dir: &Path, pg: PgId) -> PathBuf {
    dir.join(format!("pg-{}.epoch", pg.0))
}

fn checkpoint_path(dir: &Path, pg: PgId) -> PathBuf {
    dir.join(format!("pg-{}.ckpt", pg.0))
}

/// The segment's checkpoint (`redo_core::checkpoint`), if it has one.
pub fn read_checkpoint(dir: &Path, pg: PgId) -> Result<Option<Checkpoint>> {
    let path = checkpoint_path(dir, pg);
    match fs::read(&path) {
        Ok(buf) => {
            let c = Checkpoint::decode(&buf)
                .with_context(|| format!("{} is damaged or of another version (this build reads version {CHECKPOINT_FORMAT_VERSION})", path.display()))?;
            if c.pg != pg {
                bail!("{} belongs to pg{}, not pg{}: wrong data directory?", path.display(), c.pg.0, pg.0);
            }
            Ok(Some(c))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// Durably replaces the segment's checkpoint (write, fsync, rename, fsync dir).
pub fn write_checkpoint(dir: &Path, checkpoint: &Checkpoint) -> Result<()> {
    install_file(&checkpoint_path(dir, checkpoint.pg), &checkpoint.encode())
}

/// Removes the segment's checkpoint and page files: its log is gone (a new segment file).
pub fn forget_checkpoint(dir: &Path, pg: PgId) -> Result<()> {
    let path = checkpoint_path(dir, pg);
    match fs::remove_file(&path) {
        Ok(()) => {
            tracing::warn!(path = %path.display(), "the segment file is new: removing the checkpoint and page images of the old one");
            fsync_dir(dir)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("remove {}", path.display())),
    }
}

/// Frees the segment file's blocks below `to` (rounded down to a block), the
/// log there being reclaimed: the file keeps its size and offsets, its disk
/// use shrinks. Freeing blocks already freed costs nothing.
pub fn punch_log(dir: &Path, pg: PgId, to: u64) -> Result<u64> {
    let from = SEGMENT_HEADER_BYTES as u64;
    let to = to / BLOCK_BYTES * BLOCK_BYTES;
    if to <= from {
        return Ok(0);
    }
    let path = segment_path(dir, pg);
    let f = OpenOptions::new().write(true).open(&path).with_context(|| format!("open {} to free reclaimed log", path.display()))?;
    fallocate(&f, PUNCH_HOLE, from, to - from).with_context(|| format!("free blocks of {} below offset {to}", path.display()))?;
    Ok(to - from)
}

/// A segment file after recovery.
pub struct Recovered {
    /// For the flusher (O_DIRECT).
    pub direct: File,
    /// For pulls from disk (page cache).
    pub reader: File,
    pub last_lsn: Lsn,
    pub file_end: u64,
    pub allocated: u64,
    pub index: DiskIndex,
    /// `None`: no epoch file (a new segment, or a wiped one).
    pub epoch: Option<EpochState>,
    /// Bytes of the partial last block, which the flusher rewrites with the next records.
    pub tail: Vec<u8>,
}

pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("fsync directory {}", dir.display()))
}

/// Allocates `[offset, offset + len)` of `file`.
pub const ALLOCATE: libc::c_int = 0;
/// Zeroes `[offset, offset + len)` of `file`, keeping its size and blocks.
const ZERO_RANGE: libc::c_int = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
/// Frees the blocks of `[offset, offset + len)` of `file`, keeping its size: the range reads as zeros.
const PUNCH_HOLE: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

pub fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: plain syscall on an owned, open descriptor.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as libc::off_t, len as libc::off_t) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The first non-zero byte of `file` in `[from, to)`, if any.
fn first_nonzero(file: &File, from: u64, to: u64) -> Result<Option<u64>> {
    let mut buf = vec![0u8; 1 << 20];
    let mut at = from;
    while at < to {
        let n = buf.len().min((to - at) as usize);
        file.read_exact_at(&mut buf[..n], at).context("read segment file")?;
        if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
            return Ok(Some(at + i as u64));
        }
        at += n as u64;
    }
    Ok(None)
}

/// Opens (creating if needed) and recovers the segment file of `id` from
/// `start` (the checkpoint's, else the file's first record), noting every
/// record of the recovered log in `pages` when given. `write_bytes_max` is the largest single flush write: a crash can tear at
/// most that much past the durable end, so damage followed by data further
/// on is corruption, not a torn tail, and recovery refuses to truncate it.
pub fn open_segment(dir: &Path, id: SegmentId, start: LogStart, prealloc: u64, write_bytes_max: u64, mut pages: Option<&mut PageIndex>) -> Result<Recovered> {
    let path = segment_path(dir, id.pg);
    let exists = path.exists();
    if !exists {
        let tmp = path.with_extension("seg.new");
        let mut f = File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        f.write_all(&encode_header(id)).context("write segment header")?;
        fallocate(&f, ALLOCATE, 0, prealloc).with_context(|| format!("preallocate {} bytes for {}", prealloc, tmp.display()))?;
        f.sync_all().context("fsync new segment file")?;
        fs::rename(&tmp, &path).context("install new segment file")?;
        fsync_dir(dir)?;
        tracing::info!(segment = %id, path = %path.display(), "created segment file");
    }
    let reader = File::open(&path).with_context(|| format!("open {}", path.display()))?;
    let mut header = vec![0u8; SEGMENT_HEADER_BYTES];
    reader.read_exact_at(&mut header, 0).with_context(|| format!("read header of {}", path.display()))?;
    let found = decode_header(&header).with_context(|| format!("{} has no valid segment header", path.display()))?;
    if found != id {
        bail!("{} belongs to segment {found}, not {id}: wrong data directory?", path.display());
    }
    let size = reader.metadata().context("stat segment file")?.len();

    // Scan the records, chunk by chunk, carrying a partial record over.
    let mut index = DiskIndex::starting_at(start);
    let mut last_lsn = start.prev;
    let mut offset = start.offset; // file offset of buf[0]
    let mut buf: Vec<u8> = Vec::new();
    let mut records = 0u64;
    let stop = loop {
        let read_at = offset + buf.len() as u64;
        let want = SCAN_CHUNK_BYTES.min(size.saturating_sub(read_at) as usize);
        let at_eof = want == 0;
        if !at_eof {
            let old = buf.len();
            buf.resize(old + want, 0);
            reader.read_exact_at(&mut buf[old..], read_at).context("read segment file")?;
        }
        let (used, stop) = scan_records(&buf, offset, &mut last_lsn, |rec, at| {
            index.note(rec.lsn(), rec.prev_lsn_in_segment(), at);
            if let Some(pages) = pages.as_deref_mut() {
                pages.note_record(rec.header().page, Located { lsn: rec.lsn(), offset: at, len: rec.as_bytes().len() as u32 });
            }
            records += 1;
        });
        offset += used as u64;
        buf.drain(..used);
        match stop {
            ScanStop::NeedMore if !at_eof => continue,
            ScanStop::NeedMore if buf.iter().all(|&b| b == 0) => break ScanStop::End,
            ScanStop::NeedMore => break ScanStop::Corrupt { offset, reason: format!("torn record: {} bytes before end of file", buf.len()) },
            other => break other,
        }
    };
    let file_end = offset;
    let direct =
        OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(&path).with_context(|| format!("open {} with O_DIRECT", path.display()))?;
    // Whatever follows the log must read as zeros, so that the end stays
    // unambiguous once new records are written after it.
    let tail_start = file_end / BLOCK_BYTES * BLOCK_BYTES;
    let mut tail = vec![0u8; (file_end - tail_start) as usize];
    reader.read_exact_at(&mut tail, tail_start).context("read tail block")?;
    if let ScanStop::Corrupt { offset, reason } = &stop {
        let torn_window = write_bytes_max + 2 * BLOCK_BYTES;
        if let Some(at) = first_nonzero(&reader, offset + torn_window, size)? {
            bail!(
                "{}: record at offset {offset} is damaged ({reason}) but the log continues at offset {at}, beyond \
                 what a crash can tear: refusing to truncate flushed records. Move the file aside to rebuild the \
                 segment from its peers.",
                path.display()
            );
        }
        tracing::warn!(segment = %id, offset, %reason, last_lsn = %last_lsn, "truncating segment log at a torn or corrupt tail");
        let f = OpenOptions::new().write(true).open(&path).context("open segment for truncation")?;
        let block_end = tail_start + BLOCK_BYTES;
        f.write_all_at(&vec![0u8; (block_end - file_end) as usize], file_end).context("zero torn tail block")?;
        if size > block_end {
            fallocate(&f, ZERO_RANGE, block_end, size - block_end).context("zero truncated tail")?;
        }
        f.sync_data().context("fsync truncated segment")?;
    }
    let epoch = read_epoch(dir, id.pg)?;
    let (at, truncations) = epoch.as_ref().map_or((Epoch(0), 0), |e| (e.epoch, e.truncations.len()));
    tracing::info!(segment = %id, records, scl = %last_lsn, start_offset = start.offset, file_end, epoch = %at, truncations, epoch_file = epoch.is_some(), "recovered segment");
    Ok(Recovered { direct, reader, last_lsn, file_end, allocated: size.max(file_end), index, epoch, tail })
}

/// A segment's persisted epoch state, `pg-N.epoch`: the epoch on the first
/// line, then one line `truncation <epoch> <above>` per recorded truncation,
/// oldest first (at most `TRUNCATIONS_MAX`). Files of one line (written
/// before truncations existed) hold the epoch alone.
fn parse_epoch_state(text: &str) -> Option<EpochState> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let epoch = Epoch(lines.next()?.parse().ok()?);
    let mut truncations = Vec::new();
    for line in lines {
        let mut words = line.split_whitespace();
        if words.next()? != "truncation" {
            return None;
        }
        let (e, above) = (words.next()?.parse().ok()?, words.next()?.parse().ok()?);
        if words.next().is_some() {
            return None;
        }
        truncations.push(Truncation { epoch: Epoch(e), above: Lsn(above) });
    }
    Some(EpochState { epoch, truncations })
}

fn render_epoch_state(state: &EpochState) -> String {
    let mut out = format!("{}\n", state.epoch.0);
    let skip = state.truncations.len().saturating_sub(TRUNCATIONS_MAX);
    for t in &state.truncations[skip..] {
        out.push_str(&format!("truncation {} {}\n", t.epoch.0, t.above.0));
    }
    out
}

fn read_epoch(dir: &Path, pg: PgId) -> Result<Option<EpochState>> {
    let path = epoch_path(dir, pg);
    match fs::read_to_string(&path) {
        Ok(s) => parse_epoch_state(&s).map(Some).with_context(|| format!("{} does not hold an epoch state", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// Durably records a segment's epoch state.
pub fn write_epoch(dir: &Path, pg: PgId, state: &EpochState) -> Result<()> {
    install_file(&epoch_path(dir, pg), render_epoch_state(state).as_bytes())
}

/// Durably replaces `path` by `bytes`: write a new file, fsync, rename over, fsync the directory.
fn install_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    f.write_all(bytes).with_context(|| format!("write {}", tmp.display()))?;
    f.sync_all().with_context(|| format!("fsync {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("install {}", path.display()))?;
    fsync_dir(path.parent().expect("a file in the data dir"))
}

/// Reads the records in `(read.after, read.upto]` that `keep` accepts from
/// the segment file, about `bytes_max` at most (at least one record).
/// Returns the bytes and the last LSN served.
pub fn read_from_disk(reader: &File, read: DiskRead, bytes_max: usize, keep: impl Fn(&RecordRef) -> bool) -> Result<(Vec<u8>, Lsn)> {
    let mut out = Vec::new();
    let mut last = read.after;
    let mut prev = read.prev;
    let mut offset = read.offset;
    let mut buf = Vec::new();
    // Enough for the reply plus the index stride it may start before; grown
    // to the largest record when one does not fit.
    let mut chunk = bytes_max.min(SCAN_CHUNK_BYTES) + INDEX_STRIDE_BYTES as usize;
    while offset < read.end_offset {
        let want = chunk.min((read.end_offset - offset) as usize);
        buf.resize(want, 0);
        reader.read_exact_at(&mut buf, offset).context("read segment file")?;
        let mut full = false;
        let (used, stop) = scan_records(&buf, offset, &mut prev, |rec, _| {
            let lsn = rec.lsn();
            if full || lsn <= read.after || lsn > read.upto || !keep(&rec) {
                full |= lsn > read.upto;
                return;
            }
            if !out.is_empty() && out.len() + rec.as_bytes().len() > bytes_max {
                full = true;
                return;
            }
            out.extend_from_slice(rec.as_bytes());
            last = lsn;
        });
        match stop {
            _ if full => break,
            ScanStop::NeedMore if used > 0 => offset += used as u64,
            ScanStop::NeedMore if want == chunk && chunk < RECORD_BYTES_MAX => chunk = RECORD_BYTES_MAX,
            ScanStop::End | ScanStop::NeedMore => break,
            ScanStop::Corrupt { offset, reason } => bail!("segment file corrupt at offset {offset}: {reason}"),
        }
    }
    Ok((out, last))
}

/// Reads the one record at `at` (from the page index), CRC-checked.
pub fn read_record(reader: &File, at: Located) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; at.len as usize];
    reader.read_exact_at(&mut buf, at.offset).with_context(|| format!("read record {} at offset {}", at.lsn, at.offset))?;
    let rec = RecordRef::decode(&buf, at.offset as usize).with_context(|| format!("record {} at offset {}", at.lsn, at.offset))?;
    if rec.lsn() != at.lsn || rec.as_bytes().len() != buf.len() {
        bail!("offset {} holds record {}, not {}", at.offset, rec.lsn(), at.lsn);
    }
    Ok(buf)
}

/// Calls `on_record` for every record of the segment file in `[from, end)`,
/// the first of which links back to `prev`. CRC- and backlink-checked.
fn scan_file(reader: &File, from: u64, mut prev: Lsn, end: u64, mut on_record: impl FnMut(RecordRef, u64)) -> Result<()> {
    let mut offset = from;
    let mut buf: Vec<u8> = Vec::new();
    while offset < end {
        let old = buf.len();
        let want = SCAN_CHUNK_BYTES.min((end - offset) as usize - old);
        if want == 0 {
            bail!("segment file ends inside a record at offset {offset}");
        }
        buf.resize(old + want, 0);
        reader.read_exact_at(&mut buf[old..], offset + old as u64).context("read segment file")?;
        let (used, stop) = scan_records(&buf, offset, &mut prev, &mut on_record);
        offset += used as u64;
        buf.drain(..used);
        match stop {
            ScanStop::NeedMore => continue,
            ScanStop::End if offset == end => break,
            ScanStop::End => bail!("segment file ends at offset {offset}, before the flushed end {end}"),
            ScanStop::Corrupt { offset, reason } => bail!("segment file corrupt at offset {offset}: {reason}"),
        }
    }
    Ok(())
}

/// Scans the file as `SegmentLog::truncate_above` asked (`read`): where the
/// first record above `read.after` starts, and how many records lie in
/// `(read.after, read.upto]`.
pub fn find_cut(reader: &File, read: DiskRead) -> Result<DiskCut> {
    let mut cut = DiskCut { last_lsn: read.prev, offset: read.offset, records: 0 };
    scan_file(reader, read.offset, read.prev, read.end_offset, |rec, at| {
        if rec.lsn() <= read.after {
            (cut.last_lsn, cut.offset) = (rec.lsn(), at + rec.as_bytes().len() as u64);
        } else if rec.lsn() <= read.upto {
            cut.records += 1;
        }
    })?;
    Ok(cut)
}

/// Zeroes the segment file of `pg` from `offset` to its end and fdatasyncs:
/// after a restart, recovery finds the log ending at `offset`.
pub fn cut_segment(dir: &Path, pg: PgId, offset: u64) -> Result<()> {
    let path = segment_path(dir, pg);
    let f = OpenOptions::new().write(true).open(&path).with_context(|| format!("open {} to cut it", path.display()))?;
    let size = f.metadata().context("stat segment file")?.len();
    let block_end = (offset / BLOCK_BYTES + 1) * BLOCK_BYTES;
    let zeros = block_end.min(size).saturating_sub(offset);
    f.write_all_at(&vec![0u8; zeros as usize], offset).context("zero the cut block")?;
    if size > block_end {
        fallocate(&f, ZERO_RANGE, block_end, size - block_end).context("zero the cut log")?;
    }
    f.sync_data().with_context(|| format!("fdatasync {}", path.display()))
}

/// Notes every record of the segment file from `start` to `end` in `pages`.
pub fn index_pages(reader: &File, start: LogStart, end: u64, pages: &mut PageIndex) -> Result<()> {
    scan_file(reader, start.offset, start.prev, end, |rec, at| {
        pages.note_record(rec.header().page, Located { lsn: rec.lsn(), offset: at, len: rec.as_bytes().len() as u32 })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_state_reads_old_files_and_round_trips() {
        assert_eq!(parse_epoch_state("42\n"), Some(EpochState { epoch: Epoch(42), truncations: vec![] }));
        let state = EpochState {
            epoch: Epoch(9 << 32),
            truncations: vec![Truncation { epoch: Epoch(5 << 32), above: Lsn(7) }, Truncation { epoch: Epoch(9 << 32), above: Lsn(12) }],
        };
        assert_eq!(parse_epoch_state(&render_epoch_state(&state)), Some(state));
        assert_eq!(parse_epoch_state("7\ntruncation 7\n"), None);
        assert_eq!(parse_epoch_state("x"), None);
    }
}
