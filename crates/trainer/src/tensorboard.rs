//! TensorBoard event files: a run's training curves for `tensorboard --logdir OUTPUT_DIR/logs`.
//!
//! TensorBoard reads a folder of `events.out.tfevents.*` files, each a sequence of TFRecord
//! records (length, masked CRC-32C of the length, data, masked CRC-32C of the data) around
//! serialized `tensorflow.Event` protobuf messages. A training run needs three kinds of
//! event, which [`EventWriter`] encodes itself (a handful of protobuf fields need no
//! protobuf runtime):
//!
//! - the file version, `brain.Event:2`, first in every file;
//! - scalar summaries (`Summary.Value.simple_value`) per step;
//! - a `SessionLog` START at a run's first step: TensorBoard then drops what earlier files
//!   in the folder hold from that step on (an earlier run's curves when a run starts anew;
//!   the steps an interrupted run logged after the state it saved last when it is resumed).
//!   TensorBoard's newer data server ignores the START event but drops a series' later
//!   steps when a step comes again, to the same effect.
//!
//! The bytes match TensorBoard's own writer (`tests/integration/tensorboard.rs` compares them with a
//! file written by the `tensorboard` Python package, `xtask/fixtures/trainer_tensorboard.py`).
//!
//! ```
//! use trainer::tensorboard::EventWriter;
//!
//! let dir = tempfile::tempdir()?;
//! let mut events = EventWriter::create(dir.path(), "demo")?;
//! events.scalars(1, 1_764_547_200.0, &[("loss", 0.125), ("lr/unet", 1e-4)])?;
//! events.flush()?;
//! assert!(events.path().file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents."));
//! # Ok::<(), std::io::Error>(())
//! ```

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Writes one TensorBoard event file.
#[derive(Debug)]
pub struct EventWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `dir` if needed and a new event file in it, named as TensorBoard expects
    /// (`events.out.tfevents.<seconds>.<tag>.<process id>`, a counter added where that
    /// file exists: a later run adds a file beside the earlier ones, never over them), and
    /// writes the file-version event.
    pub fn create(dir: &Path, tag: &str) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let now = wall_time_now();
        let stem = format!("events.out.tfevents.{}.{tag}.{}", now as u64, std::process::id());
        let mut n = 0;
        loop {
            let path = dir.join(if n == 0 { stem.clone() } else { format!("{stem}.{n}") });
            match File::create_new(&path) {
                Ok(file) => return Self::start(file, path, now),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// Creates (or truncates) the event file `path` and writes the file-version event with
    /// `wall_time` (seconds since the Unix epoch).
    pub fn create_file(path: &Path, wall_time: f64) -> std::io::Result<Self> {
        Self::start(File::create(path)?, path.to_path_buf(), wall_time)
    }

    fn start(file: File, path: PathBuf, wall_time: f64) -> std::io::Result<Self> {
        let mut writer = Self { out: BufWriter::new(file), path };
        writer.version(wall_time)?;
        Ok(writer)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a file-version event (`brain.Event:2`, what TensorBoard expects first in a file).
    pub fn version(&mut self, wall_time: f64) -> std::io::Result<()> {
        let mut event = Vec::new();
        wall_time_field(&mut event, wall_time);
        bytes_field(&mut event, 3, b"brain.Event:2");
        self.record(&event)
    }

    /// Writes a `SessionLog` START at `step`: TensorBoard drops the events of earlier
    /// files from `step` on (a resumed run logs those steps again).
    pub fn restart(&mut self, step: u64, wall_time: f64) -> std::io::Result<()> {
        let mut session_log = Vec::new();
        varint_field(&mut session_log, 1, 1); // status: START
        let mut event = Vec::new();
        wall_time_field(&mut event, wall_time);
        step_field(&mut event, step);
        bytes_field(&mut event, 7, &session_log);
        self.record(&event)
    }

    /// Writes one event with a scalar summary per `(tag, value)` at `step`.
    pub fn scalars(&mut self, step: u64, wall_time: f64, values: &[(&str, f32)]) -> std::io::Result<()> {
        let mut summary = Vec::new();
        for (tag, value) in values {
            let mut v = Vec::new();
            bytes_field(&mut v, 1, tag.as_bytes());
            key(&mut v, 2, WIRE_32);
            v.extend_from_slice(&value.to_le_bytes());
            bytes_field(&mut summary, 1, &v);
        }
        let mut event = Vec::new();
        wall_time_field(&mut event, wall_time);
        step_field(&mut event, step);
        bytes_field(&mut event, 5, &summary);
        self.record(&event)
    }

    /// Writes buffered events to the file (TensorBoard sees them from then on).
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    fn record(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.out.write_all(&record(data))
    }
}

/// Seconds since the Unix epoch, as event files store wall times.
pub fn wall_time_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// One TFRecord: the length (u64), its masked CRC, the data, the data's masked CRC, all
/// little-endian.
fn record(data: &[u8]) -> Vec<u8> {
    let length = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&length);
    out.extend_from_slice(&masked_crc(&length).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// TFRecord's masked CRC-32C (rotated and offset, so that a CRC of data holding CRCs is
/// not degenerate).
fn masked_crc(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes).rotate_right(15).wrapping_add(0xa282_ead8)
}

// Protobuf wire types.
const WIRE_VARINT: u32 = 0;
const WIRE_64: u32 = 1;
const WIRE_BYTES: u32 = 2;
const WIRE_32: u32 = 5;

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn key(out: &mut Vec<u8>, field: u32, wire: u32) {
    varint(out, u64::from(field << 3 | wire));
}

fn varint_field(out: &mut Vec<u8>, field: u32, value: u64) {
    key(out, field, WIRE_VARINT);
    varint(out, value);
}

fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    key(out, field, WIRE_BYTES);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// `Event.wall_time` (field 1, a double); proto3 leaves a zero out.
fn wall_time_field(out: &mut Vec<u8>, wall_time: f64) {
    if wall_time != 0.0 {
        key(out, 1, WIRE_64);
        out.extend_from_slice(&wall_time.to_le_bytes());
    }
}

/// `Event.step` (field 2, an int64); proto3 leaves a zero out.
fn step_field(out: &mut Vec<u8>, step: u64) {
    if step != 0 {
        varint_field(out, 2, step);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // The CRC-32C catalogue's check value, and TFRecord's mask of a zero CRC.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(0u32.rotate_right(15).wrapping_add(0xa282_ead8), 0xa282_ead8);
    }

    #[test]
    fn varints_are_little_endian_groups_of_seven_bits() {
        let mut out = Vec::new();
        for v in [0, 1, 127, 128, 300, u64::from(u32::MAX)] {
            varint(&mut out, v);
        }
        assert_eq!(out, [0, 1, 0x7f, 0x80, 0x01, 0xac, 0x02, 0xff, 0xff, 0xff, 0xff, 0x0f]);
    }
}
