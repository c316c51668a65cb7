//! TensorBoard event files (`events.out.tfevents.*`), written directly: each record is
//! `u64 length, u32 masked-crc32c(length), bytes, u32 masked-crc32c(bytes)`, and each payload a
//! hand-encoded `tensorflow.Event` protobuf holding scalar or image summaries. No TensorFlow
//! needed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use anyhow::{Context, Result};

/// CRC-32C (Castagnoli), bitwise with a 256-entry table built at first use.
fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0x82F6_3B78 ^ (c >> 1) } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masked CRC.
fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(field: u32, wire: u32, out: &mut Vec<u8>) {
    varint(((field << 3) | wire) as u64, out);
}

fn len_delimited(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    key(field, 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// `Event { wall_time = 1 (double), step = 2 (int64), file_version = 3 | summary = 5 }`.
fn event(wall_time: f64, step: i64, body: EventBody<'_>) -> Vec<u8> {
    let mut e = Vec::new();
    key(1, 1, &mut e);
    e.extend_from_slice(&wall_time.to_le_bytes());
    key(2, 0, &mut e);
    varint(step as u64, &mut e);
    match body {
        EventBody::FileVersion(v) => len_delimited(3, v.as_bytes(), &mut e),
        EventBody::Images(values) => {
            // Value { tag = 1, image = 4 }, Image { height = 1, width = 2, colorspace = 3,
            // encoded_image_string = 4 } (colorspace 3: RGB).
            let mut summary = Vec::new();
            for img in values {
                let mut im = Vec::new();
                key(1, 0, &mut im);
                varint(img.height as u64, &mut im);
                key(2, 0, &mut im);
                varint(img.width as u64, &mut im);
                key(3, 0, &mut im);
                varint(3, &mut im);
                len_delimited(4, img.png, &mut im);
                let mut v = Vec::new();
                len_delimited(1, img.tag.as_bytes(), &mut v);
                len_delimited(4, &im, &mut v);
                len_delimited(1, &v, &mut summary);
            }
            len_delimited(5, &summary, &mut e);
        }
        EventBody::Scalars(values) => {
            // Summary { repeated Value value = 1 }, Value { tag = 1, simple_value = 2 (float) }
            let mut summary = Vec::new();
            for (tag, value) in values {
                let mut v = Vec::new();
                len_delimited(1, tag.as_bytes(), &mut v);
                key(2, 5, &mut v);
                v.extend_from_slice(&(*value as f32).to_le_bytes());
                len_delimited(1, &v, &mut summary);
            }
            len_delimited(5, &summary, &mut e);
        }
    }
    e
}

enum EventBody<'a> {
    FileVersion(&'a str),
    Scalars(&'a [(&'a str, f64)]),
    Images(&'a [ImageValue<'a>]),
}

/// One image summary: an encoded PNG of `height` x `width` RGB pixels under `tag`.
pub(crate) struct ImageValue<'a> {
    pub tag: &'a str,
    pub height: u32,
    pub width: u32,
    pub png: &'a [u8],
}

/// Appends summaries to one event file; every record is flushed as written. Clones share the
/// file (see [`EventWriter::for_dir`]).
#[derive(Clone)]
pub(crate) struct EventWriter {
    file: Arc<Mutex<std::fs::File>>,
    pub path: PathBuf,
}

/// The writers open in this process, by folder: validation while training appends its images
/// to the trainer's file rather than starting a second one (TensorBoard polls only the newest
/// file of a folder, so a second file would hide the scalars logged after it).
#[allow(clippy::type_complexity)]
static OPEN: Mutex<Vec<(PathBuf, PathBuf, Weak<Mutex<std::fs::File>>)>> = Mutex::new(Vec::new());

fn dir_key(dir: &Path) -> PathBuf {
    dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf())
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl EventWriter {
    /// Create `dir/events.out.tfevents.<seconds>.lora.<pid>` (with `.<n>` when a file of that
    /// name exists: never truncate another writer's file). The directory is created.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let base = format!("events.out.tfevents.{}.lora.{}", now() as u64, std::process::id());
        let mut n = 0;
        let (file, path) = loop {
            let path = dir.join(if n == 0 { base.clone() } else { format!("{base}.{n}") });
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => break (f, path),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
        };
        let w = Self { file: Arc::new(Mutex::new(file)), path };
        w.record(&event(now(), 0, EventBody::FileVersion("brain.Event:2")))?;
        let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|(_, _, f)| f.strong_count() > 0);
        open.push((dir_key(dir), w.path.clone(), Arc::downgrade(&w.file)));
        Ok(w)
    }

    /// The writer open on `dir` in this process (the trainer's, while it trains), else a new
    /// file in `dir`.
    pub(crate) fn for_dir(dir: &Path) -> Result<Self> {
        let key = dir_key(dir);
        let live = {
            let open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
            open.iter().rev().filter(|(d, _, _)| *d == key).find_map(|(_, p, f)| Some((f.upgrade()?, p.clone())))
        };
        match live {
            Some((file, path)) => Ok(Self { file, path }),
            None => Self::create(dir),
        }
    }

    fn record(&self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut buf = Vec::with_capacity(data.len() + 16);
        buf.extend_from_slice(&len);
        buf.extend_from_slice(&masked_crc(&len).to_le_bytes());
        buf.extend_from_slice(data);
        buf.extend_from_slice(&masked_crc(data).to_le_bytes());
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.write_all(&buf).with_context(|| format!("writing {}", self.path.display()))?;
        file.flush()?;
        Ok(())
    }

    /// Write `(tag, value)` scalars at `step`.
    pub fn scalars(&self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        self.record(&event(now(), step as i64, EventBody::Scalars(values)))
    }

    /// Write image summaries (PNG) at `step`, one record for all of them.
    pub fn images(&self, step: u64, values: &[ImageValue<'_>]) -> Result<()> {
        self.record(&event(now(), step as i64, EventBody::Images(values)))
    }
}

/// The records of an event file that frame and checksum correctly, up to the first that does
/// not (a record a killed run half wrote).
fn read_records(bytes: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + 12 <= bytes.len() {
        let len_bytes = &bytes[pos..pos + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        if u32::from_le_bytes(bytes[pos + 8..pos + 12].try_into().expect("4 bytes")) != masked_crc(len_bytes) {
            break;
        }
        let Some(end) = (pos + 12).checked_add(len).filter(|e| e + 4 <= bytes.len()) else { break };
        let data = &bytes[pos + 12..end];
        if u32::from_le_bytes(bytes[end..end + 4].try_into().expect("4 bytes")) != masked_crc(data) {
            break;
        }
        out.push(data);
        pos = end + 4;
    }
    out
}

fn read_varint(data: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *data.get(*pos)?;
        *pos += 1;
        v |= ((b & 0x7f) as u64) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// `(step, is_summary)` of an `Event` payload.
fn event_step(data: &[u8]) -> Option<(u64, bool)> {
    let (mut pos, mut step, mut summary) = (0, 0, false);
    while pos < data.len() {
        let key = read_varint(data, &mut pos)?;
        match key & 7 {
            0 => {
                let v = read_varint(data, &mut pos)?;
                if key >> 3 == 2 {
                    step = v;
                }
            }
            1 => pos += 8,
            5 => pos += 4,
            2 => {
                let len = read_varint(data, &mut pos)? as usize;
                summary |= key >> 3 == 5;
                pos += len;
            }
            _ => return None,
        }
    }
    Some((step, summary))
}

/// Drop from every event file in `dir` the summaries past `step` (and damaged trailing
/// records), so a resumed run logs every step once; files left with no summary are removed.
pub(crate) fn keep_steps_up_to(dir: &Path, step: u64) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    for entry in entries.flatten() {
        let path = entry.path();
        if !entry.file_name().to_string_lossy().starts_with("events.out.tfevents.") {
            continue;
        }
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let records = read_records(&bytes);
        let kept: Vec<&[u8]> = records.iter().copied().filter(|r| event_step(r).is_some_and(|(s, summary)| !summary || s <= step)).collect();
        if !kept.iter().any(|r| event_step(r).is_some_and(|(_, summary)| summary)) {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            continue;
        }
        let mut out = Vec::with_capacity(bytes.len());
        for data in kept {
            let len = (data.len() as u64).to_le_bytes();
            out.extend_from_slice(&len);
            out.extend_from_slice(&masked_crc(&len).to_le_bytes());
            out.extend_from_slice(data);
            out.extend_from_slice(&masked_crc(data).to_le_bytes());
        }
        if out != bytes {
            crate::util::fs::write_atomic(&path, &out).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_answers() {
        // RFC 3720 test vectors.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    /// Read the records back and check framing, CRCs and the scalar payload bytes.
    #[test]
    fn records_frame_and_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let w = EventWriter::create(dir.path()).unwrap();
        w.scalars(3, &[("train/loss", 0.5)]).unwrap();
        let bytes = std::fs::read(&w.path).unwrap();
        let mut pos = 0;
        let mut payloads = Vec::new();
        while pos < bytes.len() {
            let len_bytes = &bytes[pos..pos + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            assert_eq!(u32::from_le_bytes(bytes[pos + 8..pos + 12].try_into().unwrap()), masked_crc(len_bytes));
            let data = &bytes[pos + 12..pos + 12 + len];
            assert_eq!(u32::from_le_bytes(bytes[pos + 12 + len..pos + 16 + len].try_into().unwrap()), masked_crc(data));
            payloads.push(data.to_vec());
            pos += 16 + len;
        }
        assert_eq!(payloads.len(), 2);
        assert!(payloads[0].windows(13).any(|w| w == b"brain.Event:2"));
        let tag_at = payloads[1].windows(10).position(|w| w == b"train/loss").expect("tag present");
        // tag, then key 0x15 (field 2, fixed32) and the f32 value.
        assert_eq!(payloads[1][tag_at + 10], 0x15);
        assert_eq!(&payloads[1][tag_at + 11..tag_at + 15], &0.5f32.to_le_bytes());
    }

    /// Validation while training writes into the trainer's open file (same path, records in
    /// order); once it is closed a new writer starts another file and leaves the old one whole.
    #[test]
    fn for_dir_shares_the_open_writer_and_never_truncates() {
        let dir = tempfile::tempdir().unwrap();
        let trainer = EventWriter::create(dir.path()).unwrap();
        trainer.scalars(1, &[("train_loss", 0.5)]).unwrap();
        let shared = EventWriter::for_dir(dir.path()).unwrap();
        assert_eq!(shared.path, trainer.path);
        let png = [0x89u8, b'P', b'N', b'G'];
        shared.images(1, &[ImageValue { tag: "validation/prompt0", height: 2, width: 3, png: &png }]).unwrap();
        trainer.scalars(2, &[("train_loss", 0.4)]).unwrap();
        let first = trainer.path.clone();
        drop((trainer, shared));
        let later = EventWriter::for_dir(dir.path()).unwrap();
        assert_ne!(later.path, first, "a new file once the trainer's is closed");
        let bytes = std::fs::read(&first).unwrap();
        let recs = read_records(&bytes);
        assert_eq!(recs.iter().map(|r| event_step(r).unwrap()).collect::<Vec<_>>(), vec![(0, false), (1, true), (1, true), (2, true)]);
        // The image record: tag, then Image { height 2, width 3, colorspace 3, the PNG bytes }.
        let img = recs[2];
        let tag_at = img.windows(18).position(|w| w == b"validation/prompt0").unwrap();
        assert_eq!(&img[tag_at + 18..], &[0x22, 12, 0x08, 2, 0x10, 3, 0x18, 3, 0x22, 4, 0x89, b'P', b'N', b'G']);
    }

    /// After a resume from step 2 the file holds steps 1 and 2 once; a half-written record is
    /// dropped; a file left without summaries is removed.
    #[test]
    fn keep_steps_up_to_trims_past_steps() {
        let dir = tempfile::tempdir().unwrap();
        let w = EventWriter::create(dir.path()).unwrap();
        for s in 1..=4 {
            w.scalars(s, &[("train_loss", s as f64)]).unwrap();
        }
        let path = w.path.clone();
        drop(w);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(&[7, 0, 0]);
        std::fs::write(&path, &bytes).unwrap();
        keep_steps_up_to(dir.path(), 2).unwrap();
        let back = std::fs::read(&path).unwrap();
        let steps: Vec<(u64, bool)> = read_records(&back).iter().map(|r| event_step(r).unwrap()).collect();
        assert_eq!(steps, vec![(0, false), (1, true), (2, true)]);
        keep_steps_up_to(dir.path(), 0).unwrap();
        assert!(!path.exists());
    }
}
