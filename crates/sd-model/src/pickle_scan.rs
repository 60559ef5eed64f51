//! A bound on how deeply a PyTorch pickle nests its containers, found before it is read.
//!
//! burn-store builds a pickle's objects and walks them recursively: a small crafted file of
//! lists in lists (200,000 levels in 400 KB) overflows the stack and aborts the process
//! instead of failing. Checkpoints nest a handful of levels (a dict of tensors, each
//! rebuilt from a tuple of arguments), so [`check_depth`] follows the pickle's opcodes with
//! one depth per stack item, building nothing, and refuses a file past
//! [`MAX_PICKLE_DEPTH`] levels before burn-store sees it. Opcodes it does not know end the
//! scan without a verdict: burn-store then reports the file as it would have.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek};
use std::path::Path;

/// Containers within containers a pickle may nest: far above any checkpoint's (under 20),
/// far below the depth at which reading one overflows a thread's stack.
pub(crate) const MAX_PICKLE_DEPTH: usize = 1000;

/// Why a scan stopped.
enum Scan {
    /// The pickle ended (`STOP`) within the bound.
    Done,
    /// An opcode the scan does not follow, or a malformed stream: burn-store decides.
    Unknown,
    /// Nested deeper than [`MAX_PICKLE_DEPTH`].
    TooDeep,
}

/// Refuses a PyTorch file whose pickle nests containers more than [`MAX_PICKLE_DEPTH`]
/// levels deep: `torch.save`'s zip archive (its `data.pkl`) or the older format's
/// consecutive pickles at the start of the file. Err names the file and the bound;
/// a file that cannot be scanned passes (the reader reports what is wrong with it).
pub(crate) fn check_depth(path: &Path) -> Result<(), String> {
    match file_verdict(path) {
        Scan::TooDeep => Err(format!("its pickle nests containers more than {MAX_PICKLE_DEPTH} levels deep, which no checkpoint does (a damaged or crafted file)")),
        Scan::Done | Scan::Unknown => Ok(()),
    }
}

/// The scan of a file's pickles (see [`check_depth`]).
fn file_verdict(path: &Path) -> Scan {
    let Ok(mut file) = File::open(path) else { return Scan::Unknown };
    let mut magic = [0u8; 4];
    if file.read_exact(&mut magic).is_err() || file.rewind().is_err() {
        return Scan::Unknown;
    }
    if &magic == b"PK\x03\x04" {
        let Ok(mut archive) = zip::ZipArchive::new(BufReader::new(file)) else { return Scan::Unknown };
        let Some(name) = archive.file_names().find(|n| n.ends_with("data.pkl")).map(str::to_string) else { return Scan::Unknown };
        let Ok(entry) = archive.by_name(&name) else { return Scan::Unknown };
        scan(&mut BufReader::new(entry))
    } else {
        // The pre-1.6 format: magic number, protocol, system info, the object, and the
        // storage keys, each a pickle of its own, then raw storage bytes.
        let mut reader = BufReader::new(file);
        let mut verdict = Scan::Done;
        for _ in 0..5 {
            verdict = scan(&mut reader);
            if !matches!(verdict, Scan::Done) {
                break;
            }
        }
        verdict
    }
}

/// One stack item: a mark, or an object of the given container depth (0 for scalars).
#[derive(Clone, Copy)]
enum Item {
    Mark,
    Depth(usize),
}

/// The stack and memo of one pickle, as depths, and the deepest object seen.
#[derive(Default)]
struct Machine {
    stack: Vec<Item>,
    memo: std::collections::HashMap<u32, usize>,
    next_memo: u32,
    deepest: usize,
}

impl Machine {
    fn push(&mut self, depth: usize) {
        self.deepest = self.deepest.max(depth);
        self.stack.push(Item::Depth(depth));
    }

    fn pop(&mut self) -> Option<usize> {
        match self.stack.pop()? {
            Item::Depth(d) => Some(d),
            Item::Mark => None,
        }
    }

    /// The deepest item above the topmost mark, which is removed with them.
    fn pop_to_mark(&mut self) -> Option<usize> {
        let mut deepest = 0;
        loop {
            match self.stack.pop()? {
                Item::Mark => return Some(deepest),
                Item::Depth(d) => deepest = deepest.max(d),
            }
        }
    }

    /// Replaces the top `n` items by a container of them (a tuple, or an object built
    /// from a callable and its arguments).
    fn combine(&mut self, n: usize) -> Option<()> {
        let mut deepest = 0;
        for _ in 0..n {
            deepest = deepest.max(self.pop()?);
        }
        self.push(deepest + 1);
        Some(())
    }

    /// The top item now holds an object of depth `child`.
    fn hold(&mut self, child: usize) -> Option<()> {
        let Some(Item::Depth(d)) = self.stack.last_mut() else { return None };
        *d = (*d).max(child + 1);
        self.deepest = self.deepest.max(*d);
        Some(())
    }

    fn top(&self) -> Option<usize> {
        match self.stack.last()? {
            Item::Depth(d) => Some(*d),
            Item::Mark => None,
        }
    }

    fn memo_put(&mut self, idx: u32) -> Option<()> {
        let d = self.top()?;
        self.memo.insert(idx, d);
        self.next_memo = self.next_memo.max(idx.saturating_add(1));
        Some(())
    }

    fn memo_get(&mut self, idx: u32) -> Option<()> {
        let d = *self.memo.get(&idx)?;
        self.push(d);
        Some(())
    }
}

/// Follows one pickle up to its `STOP`.
fn scan(r: &mut impl BufRead) -> Scan {
    let mut m = Machine::default();
    loop {
        let Some(op) = byte(r) else { return Scan::Unknown };
        let flow = step(&mut m, op, r);
        if m.deepest > MAX_PICKLE_DEPTH {
            return Scan::TooDeep;
        }
        match flow {
            Some(Flow::Stop) => return Scan::Done,
            Some(Flow::Continue) => {}
            None => return Scan::Unknown,
        }
    }
}

enum Flow {
    Stop,
    Continue,
}

/// One opcode (pickle protocols 0 to 5, as in CPython's `pickletools`); `None` for one
/// this scan does not follow or a malformed stream.
fn step(m: &mut Machine, op: u8, r: &mut impl BufRead) -> Option<Flow> {
    match op {
        b'.' => return Some(Flow::Stop),
        // PROTO, FRAME: no object.
        0x80 => skip(r, 1)?,
        0x95 => skip(r, 8)?,
        // Marks.
        b'(' => m.stack.push(Item::Mark),
        b'0' => {
            m.stack.pop()?;
        }
        b'1' => {
            m.pop_to_mark()?;
        }
        b'2' => m.push(m.top()?),
        // Scalars, with their argument bytes skipped.
        b'N' | 0x88 | 0x89 | 0x97 => m.push(0),
        b'J' | 0x84 => scalar(m, skip(r, 4))?,
        b'K' | 0x82 => scalar(m, skip(r, 1))?,
        b'M' | 0x83 => scalar(m, skip(r, 2))?,
        b'G' => scalar(m, skip(r, 8))?,
        0x8a => scalar(m, skip_len(r, 1))?,
        0x8b => scalar(m, skip_len(r, 4))?,
        b'I' | b'L' | b'F' | b'S' | b'V' | b'P' => scalar(m, line(r))?,
        b'T' | b'X' | b'B' => scalar(m, skip_len(r, 4))?,
        b'U' | 0x8c | b'C' => scalar(m, skip_len(r, 1))?,
        0x8d | 0x8e | 0x96 => scalar(m, skip_len(r, 8))?,
        b'c' => scalar(m, line(r).and_then(|()| line(r)))?,
        0x98 => {
            m.top()?;
        }
        0x93 => {
            m.pop()?;
            m.pop()?;
            m.push(0);
        }
        b'Q' => {
            let d = m.pop()?;
            m.push(d);
        }
        // Memo: depths are remembered with the objects.
        b'p' => m.memo_put(line_number(r)?)?,
        b'q' => m.memo_put(u32::from(byte(r)?))?,
        b'r' => m.memo_put(u32::from_le_bytes(bytes4(r)?))?,
        0x94 => m.memo_put(m.next_memo)?,
        b'g' => m.memo_get(line_number(r)?)?,
        b'h' => m.memo_get(u32::from(byte(r)?))?,
        b'j' => m.memo_get(u32::from_le_bytes(bytes4(r)?))?,
        // Empty containers.
        b']' | b'}' | b')' | 0x8f => m.push(1),
        // Containers and objects from the items above a mark (INST names its class first).
        b'l' | b't' | b'd' | 0x91 | b'o' | b'i' => {
            if op == b'i' {
                line(r)?;
                line(r)?;
            }
            let d = m.pop_to_mark()?;
            m.push(d + 1);
        }
        // Tuples of 1 to 3, and objects built from a callable and arguments (their depth:
        // the arguments' plus one).
        0x85 => m.combine(1)?,
        0x86 | b'R' | 0x81 => m.combine(2)?,
        0x87 | 0x92 => m.combine(3)?,
        // Adding to the container below (APPEND, BUILD's state, SETITEM, the batch forms).
        b'a' | b'b' => {
            let v = m.pop()?;
            m.hold(v)?;
        }
        b's' => {
            let (v, k) = (m.pop()?, m.pop()?);
            m.hold(v.max(k))?;
        }
        b'e' | b'u' | 0x90 => {
            let d = m.pop_to_mark()?;
            m.hold(d)?;
        }
        _ => return None,
    }
    Some(Flow::Continue)
}

/// A scalar whose argument `read` was skipped.
fn scalar(m: &mut Machine, read: Option<()>) -> Option<()> {
    read?;
    m.push(0);
    Some(())
}

fn byte(r: &mut impl BufRead) -> Option<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b).ok()?;
    Some(b[0])
}

fn bytes4(r: &mut impl BufRead) -> Option<[u8; 4]> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).ok()?;
    Some(b)
}

/// Skips `n` bytes; `None` when they were not there.
fn skip(r: &mut impl BufRead, n: u64) -> Option<()> {
    let copied = std::io::copy(&mut r.by_ref().take(n), &mut std::io::sink()).ok()?;
    (copied == n).then_some(())
}

/// Skips a length-prefixed argument whose little-endian length takes `width` bytes.
fn skip_len(r: &mut impl BufRead, width: usize) -> Option<()> {
    let mut len = [0u8; 8];
    r.read_exact(&mut len[..width]).ok()?;
    skip(r, u64::from_le_bytes(len))
}

/// Skips a newline-terminated argument.
fn line(r: &mut impl BufRead) -> Option<()> {
    let mut buf = Vec::new();
    r.read_until(b'\n', &mut buf).ok()?;
    (buf.last() == Some(&b'\n')).then_some(())
}

/// A newline-terminated decimal memo index (`PUT`, `GET`).
fn line_number(r: &mut impl BufRead) -> Option<u32> {
    let mut buf = Vec::new();
    r.read_until(b'\n', &mut buf).ok()?;
    std::str::from_utf8(&buf).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(pickle: &[u8]) -> &'static str {
        match scan(&mut std::io::Cursor::new(pickle)) {
            Scan::Done => "done",
            Scan::Unknown => "unknown",
            Scan::TooDeep => "too deep",
        }
    }

    /// `[[[...]]]` `n` levels deep, as protocol 2 writes it.
    fn nested_lists(n: usize) -> Vec<u8> {
        let mut p = b"\x80\x02".to_vec();
        p.extend(std::iter::repeat_n(b']', n));
        p.extend(std::iter::repeat_n(b'a', n - 1));
        p.push(b'.');
        p
    }

    #[test]
    fn depth_is_bounded() {
        assert_eq!(verdict(&nested_lists(MAX_PICKLE_DEPTH)), "done");
        assert_eq!(verdict(&nested_lists(MAX_PICKLE_DEPTH + 1)), "too deep");
        assert_eq!(verdict(&nested_lists(200_000)), "too deep");
        // The helper's crafted dict: {"a": [[[...]]]} 200,000 levels deep.
        let mut dict = b"\x80\x02}X\x01\x00\x00\x00a".to_vec();
        dict.extend(std::iter::repeat_n(b']', 200_000));
        dict.extend(std::iter::repeat_n(b'a', 199_999));
        dict.extend(b"s.");
        assert_eq!(verdict(&dict), "too deep");
    }

    /// A checkpoint-like pickle (protocol 2, as `torch.save` writes): a dict of a tensor
    /// rebuilt by `_rebuild_tensor_v2` from a persistent storage id and argument tuples,
    /// with memo puts and gets, bytes that look like opcodes inside strings, and marks.
    #[test]
    fn a_checkpoint_like_pickle_passes() {
        let mut p = b"\x80\x02}q\x00(X\x06\x00\x00\x00we]]]]q\x01".to_vec();
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\nq\x02((X\x07\x00\x00\x00storageq\x03ctorch\nFloatStorage\nq\x04X\x01\x00\x00\x000q\x05X\x03\x00\x00\x00cpuq\x06K\x04tq\x07Q");
        p.extend(b"K\x00K\x02K\x02\x86q\x08K\x02K\x01\x86q\x09\x89h\x08\x8a\x01\x00tq\x0aRq\x0bu.");
        assert_eq!(verdict(&p), "done");
        // An opcode the scan does not know leaves the verdict to the reader.
        assert_eq!(verdict(b"\x80\x02\xff."), "unknown");
        assert_eq!(verdict(b"\x80\x02]"), "unknown", "no STOP");
    }

    /// The reader refuses a crafted raw pickle by name instead of overflowing the stack.
    #[test]
    fn a_crafted_deep_file_is_refused_by_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deep.pt");
        std::fs::write(&path, nested_lists(200_000)).unwrap();
        let err = crate::torch_file::read_pytorch(&path).unwrap_err().to_string();
        assert!(err.contains("deep.pt") && err.contains("1000 levels deep"), "{err}");
    }

    /// Files written by `torch.save` (the zip archive and the legacy format: a tiny SD1
    /// checkpoint and a textual-inversion embedding) are followed to their end, not
    /// given up on, and pass.
    #[test]
    fn torch_files_are_followed_to_the_end() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pickles");
        for name in ["sd1.ckpt", "sd1_legacy.ckpt", "myemb.pt"] {
            assert!(matches!(file_verdict(&dir.join(name)), Scan::Done), "{name}");
            check_depth(&dir.join(name)).unwrap();
        }
    }
}
