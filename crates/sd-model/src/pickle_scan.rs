//! Bounds on how deeply a PyTorch pickle nests its containers and how many objects it
//! builds, found before it is read.
//!
//! burn-store builds a pickle's objects and walks them recursively: a small crafted file of
//! lists in lists (200,000 levels in 400 KB) overflows the stack and aborts the process
//! instead of failing, and one that reads a memoized list back into a new pair of it 40
//! times (1.3 KB) makes 2⁴⁰ objects, since burn-store copies an object at every memo read.
//! Checkpoints nest a handful of levels (a dict of tensors, each rebuilt from a tuple of
//! arguments) and build tens of thousands of objects, so [`check_pickle`] follows the
//! pickle's opcodes with one depth and one object count per stack item, building nothing,
//! and refuses a file past [`MAX_PICKLE_DEPTH`] levels or [`MAX_PICKLE_OBJECTS`] objects
//! before burn-store sees it. A stream it cannot follow to its `STOP` (an unknown opcode,
//! an argument cut short, a memo read of an index never stored) is refused too: a reader
//! that went on past it would be unbounded.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// Containers within containers a pickle may nest: far above any checkpoint's (under 20),
/// far below the depth at which reading one overflows a thread's stack.
pub(crate) const MAX_PICKLE_DEPTH: usize = 1000;

/// Objects one pickle object may hold, all levels counted, memo reads as the copies
/// burn-store makes: far above any checkpoint's (an SDXL checkpoint with EMA weights
/// builds about 10⁵), far below what fills a machine's memory.
pub(crate) const MAX_PICKLE_OBJECTS: u64 = 10_000_000;

/// Why a scan stopped.
enum Scan {
    /// The pickle ended (`STOP`) within the bounds.
    Done,
    /// An opcode the scan does not know, or a malformed stream, at this byte.
    Malformed(u64),
    /// Nested deeper than [`MAX_PICKLE_DEPTH`].
    TooDeep,
    /// An object of more than [`MAX_PICKLE_OBJECTS`] objects.
    TooLarge,
}

/// Refuses a PyTorch file whose pickle nests containers more than [`MAX_PICKLE_DEPTH`]
/// levels deep, builds an object of more than [`MAX_PICKLE_OBJECTS`] objects, or cannot be
/// followed to its end: every `data.pkl` of `torch.save`'s zip archive (burn-store reads
/// one of them), or the older format's consecutive pickles at the start of the file. Err
/// says why (the caller names the file); a file that is neither passes (the reader reports
/// what it is).
pub(crate) fn check_pickle(path: &Path) -> Result<(), String> {
    match file_verdict(path) {
        Scan::Done => Ok(()),
        Scan::TooDeep => Err(format!("its pickle nests containers more than {MAX_PICKLE_DEPTH} levels deep, which no checkpoint does (a damaged or crafted file)")),
        Scan::TooLarge => Err(format!("its pickle builds more than {MAX_PICKLE_OBJECTS} objects, which no checkpoint does (a damaged or crafted file)")),
        Scan::Malformed(at) => Err(format!("its pickle cannot be followed at its byte {at} (an unknown opcode, an argument cut short or a memo read of nothing: a damaged file)")),
    }
}

/// The scan of a file's pickles (see [`check_pickle`]).
fn file_verdict(path: &Path) -> Scan {
    let done = |verdict: &Scan| matches!(verdict, Scan::Done);
    let Ok(file) = File::open(path) else { return Scan::Done };
    // As burn-store decides: a zip archive wherever one parses (its directory is at the
    // end, so a legacy pickle in front does not make it one).
    if let Ok(mut archive) = zip::ZipArchive::new(BufReader::new(file)) {
        let names: Vec<String> = archive.file_names().filter(|n| n.ends_with("data.pkl")).map(str::to_string).collect();
        let mut verdicts = names.iter().map(|name| match archive.by_name(name) {
            Ok(entry) => scan(&mut BufReader::new(entry)),
            Err(_) => Scan::Malformed(0),
        });
        return verdicts.find(|v| !done(v)).unwrap_or(Scan::Done);
    }
    // The pre-1.6 format: magic number, protocol, system info, the object, and the
    // storage keys, each a pickle of its own, then raw storage bytes.
    let Ok(file) = File::open(path) else { return Scan::Done };
    let mut reader = BufReader::new(file);
    let mut verdicts = (0..5).map(|_| scan(&mut reader));
    verdicts.find(|v| !done(v)).unwrap_or(Scan::Done)
}

/// A reader that counts the bytes read (for the offset of a malformed stream).
struct Counting<R> {
    inner: R,
    read: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

impl<R: BufRead> BufRead for Counting<R> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        self.inner.fill_buf()
    }

    fn consume(&mut self, amt: usize) {
        self.read += amt as u64;
        self.inner.consume(amt);
    }
}

/// An object on the stack: its container depth (0 for scalars) and how many objects it
/// is, itself included.
#[derive(Clone, Copy, Default)]
struct Obj {
    depth: usize,
    size: u64,
}

impl Obj {
    const SCALAR: Obj = Obj { depth: 0, size: 1 };

    /// A container of `children` (their deepest and their sum, as [`Obj::merge`] folds).
    fn holding(children: Obj) -> Obj {
        Obj { depth: children.depth + 1, size: children.size.saturating_add(1) }
    }

    /// The deeper and the sum of two groups of objects.
    fn merge(self, other: Obj) -> Obj {
        Obj { depth: self.depth.max(other.depth), size: self.size.saturating_add(other.size) }
    }
}

/// One stack item: a mark, or an object.
#[derive(Clone, Copy)]
enum Item {
    Mark,
    Obj(Obj),
}

/// The stack and memo of one pickle, as depths and sizes, and the deepest and largest
/// object seen.
#[derive(Default)]
struct Machine {
    stack: Vec<Item>,
    memo: std::collections::HashMap<u32, Obj>,
    deepest: usize,
    largest: u64,
}

impl Machine {
    fn push(&mut self, obj: Obj) {
        self.seen(obj);
        self.stack.push(Item::Obj(obj));
    }

    fn seen(&mut self, obj: Obj) {
        self.deepest = self.deepest.max(obj.depth);
        self.largest = self.largest.max(obj.size);
    }

    fn pop(&mut self) -> Option<Obj> {
        match self.stack.pop()? {
            Item::Obj(o) => Some(o),
            Item::Mark => None,
        }
    }

    /// The items above the topmost mark (which is removed with them), merged.
    fn pop_to_mark(&mut self) -> Option<Obj> {
        let mut all = Obj { depth: 0, size: 0 };
        loop {
            match self.stack.pop()? {
                Item::Mark => return Some(all),
                Item::Obj(o) => all = all.merge(o),
            }
        }
    }

    /// Replaces the top `n` items by a container of them (a tuple, or an object built
    /// from a callable and its arguments).
    fn combine(&mut self, n: usize) -> Option<()> {
        let mut all = Obj { depth: 0, size: 0 };
        for _ in 0..n {
            all = all.merge(self.pop()?);
        }
        self.push(Obj::holding(all));
        Some(())
    }

    /// The top item now also holds `child`.
    fn hold(&mut self, child: Obj) -> Option<()> {
        let Some(Item::Obj(o)) = self.stack.last_mut() else { return None };
        o.depth = o.depth.max(child.depth + 1);
        o.size = o.size.saturating_add(child.size);
        let o = *o;
        self.seen(o);
        Some(())
    }

    fn top(&self) -> Option<Obj> {
        match self.stack.last()? {
            Item::Obj(o) => Some(*o),
            Item::Mark => None,
        }
    }

    fn memo_put(&mut self, idx: u32) -> Option<()> {
        let o = self.top()?;
        self.memo.insert(idx, o);
        Some(())
    }

    /// `MEMOIZE`: the next index is the memo's length, as in CPython and burn-store.
    fn memoize(&mut self) -> Option<()> {
        let idx = u32::try_from(self.memo.len()).ok()?;
        self.memo_put(idx)
    }

    fn memo_get(&mut self, idx: u32) -> Option<()> {
        let o = *self.memo.get(&idx)?;
        self.push(o);
        Some(())
    }
}

/// Follows one pickle up to its `STOP`.
fn scan<R: BufRead>(r: &mut R) -> Scan {
    let mut r = Counting { inner: r, read: 0 };
    let mut m = Machine::default();
    loop {
        let at = r.read;
        let Some(op) = byte(&mut r) else { return Scan::Malformed(at) };
        let flow = step(&mut m, op, &mut r);
        if m.deepest > MAX_PICKLE_DEPTH {
            return Scan::TooDeep;
        }
        if m.largest > MAX_PICKLE_OBJECTS {
            return Scan::TooLarge;
        }
        match flow {
            Some(Flow::Stop) => return Scan::Done,
            Some(Flow::Continue) => {}
            None => return Scan::Malformed(at),
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
        b'N' | 0x88 | 0x89 | 0x97 => m.push(Obj::SCALAR),
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
            m.push(Obj::SCALAR);
        }
        b'Q' => {
            let d = m.pop()?;
            m.push(d);
        }
        // Memo: depths are remembered with the objects.
        b'p' => m.memo_put(line_number(r)?)?,
        b'q' => m.memo_put(u32::from(byte(r)?))?,
        b'r' => m.memo_put(u32::from_le_bytes(bytes4(r)?))?,
        0x94 => m.memoize()?,
        b'g' => m.memo_get(line_number(r)?)?,
        b'h' => m.memo_get(u32::from(byte(r)?))?,
        b'j' => m.memo_get(u32::from_le_bytes(bytes4(r)?))?,
        // Empty containers.
        b']' | b'}' | b')' | 0x8f => m.push(Obj { depth: 1, size: 1 }),
        // Containers and objects from the items above a mark (INST names its class first).
        b'l' | b't' | b'd' | 0x91 | b'o' | b'i' => {
            if op == b'i' {
                line(r)?;
                line(r)?;
            }
            let children = m.pop_to_mark()?;
            m.push(Obj::holding(children));
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
            m.hold(v.merge(k))?;
        }
        b'e' | b'u' | 0x90 => {
            let children = m.pop_to_mark()?;
            m.hold(children)?;
        }
        _ => return None,
    }
    Some(Flow::Continue)
}

/// A scalar whose argument `read` was skipped.
fn scalar(m: &mut Machine, read: Option<()>) -> Option<()> {
    read?;
    m.push(Obj::SCALAR);
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
            Scan::Malformed(_) => "malformed",
            Scan::TooDeep => "too deep",
            Scan::TooLarge => "too large",
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
        // What the scan cannot follow is refused: a reader going on past it is unbounded.
        assert_eq!(verdict(b"\x80\x02\xff."), "malformed");
        assert_eq!(verdict(b"\x80\x02]"), "malformed", "no STOP");
        assert_eq!(verdict(b"\x80\x02h\x05."), "malformed", "a memo read of nothing");
        // A string whose length runs past the end (burn-store allocates the length first).
        assert_eq!(verdict(b"\x80\x04\x8d\x00\x00\x00\x00\x00\x01\x00\x00abc."), "malformed");
    }

    /// A memoized list read back into a new pair of itself `n` times: 2ⁿ objects from a
    /// file of a few bytes per level (burn-store copies an object at every memo read).
    fn doubling(n: usize) -> Vec<u8> {
        doubling_after(b"\x80\x04]\x94", 0, n)
    }

    /// [`doubling`] after `prefix`, whose list is memoized at `first`.
    fn doubling_after(prefix: &[u8], first: u32, n: usize) -> Vec<u8> {
        let mut p = prefix.to_vec();
        for i in first..first + n as u32 {
            // GET i, GET i, TUPLE2, MEMOIZE (as i + 1)
            p.extend([b'j']);
            p.extend(i.to_le_bytes());
            p.extend([b'j']);
            p.extend(i.to_le_bytes());
            p.extend([0x86, 0x94]);
        }
        p.push(b'.');
        p
    }

    #[test]
    fn objects_are_bounded() {
        assert_eq!(verdict(&doubling(20)), "done", "about a million objects");
        assert_eq!(verdict(&doubling(40)), "too large");
        // MEMOIZE numbers from the memo's length: a PUT at 1000 first does not shift it (a
        // scan that numbered from the highest index lost track of the object and passed).
        let p = doubling_after(b"\x80\x04]r\xe8\x03\x00\x00\x94", 1, 40);
        assert_eq!(verdict(&p), "too large");
    }

    /// Every `data.pkl` of an archive is scanned (burn-store reads `data.pkl`, else
    /// `archive/data.pkl`, else the first such name), and a file that parses as a zip
    /// archive is one whatever it starts with.
    #[test]
    fn every_pickle_burn_store_may_read_is_scanned() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let archive = |path: &Path, prefix: &[u8], entries: &[(&str, &[u8])]| {
            let mut file = File::create(path).unwrap();
            file.write_all(prefix).unwrap();
            let mut zip = zip::ZipWriter::new(file);
            let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
            for (name, data) in entries {
                zip.start_file(*name, stored).unwrap();
                zip.write_all(data).unwrap();
            }
            zip.finish().unwrap();
        };
        let deep = nested_lists(5000);
        let two = dir.path().join("two.pt");
        archive(&two, b"", &[("a/data.pkl", b"\x80\x02]."), ("data.pkl", &deep)]);
        assert!(check_pickle(&two).unwrap_err().contains("levels deep"));
        let behind = dir.path().join("behind.pt");
        archive(&behind, b"\x80\x02].", &[("data.pkl", &deep)]);
        assert!(check_pickle(&behind).unwrap_err().contains("levels deep"));
        let fine = dir.path().join("fine.pt");
        archive(&fine, b"", &[("archive/data.pkl", b"\x80\x02]."), ("archive/version", b"3\n")]);
        check_pickle(&fine).unwrap();
    }

    /// The reader refuses a crafted raw pickle by name instead of overflowing the stack.
    #[test]
    fn a_crafted_deep_file_is_refused_by_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deep.pt");
        std::fs::write(&path, nested_lists(200_000)).unwrap();
        let err = crate::torch_file::read_pytorch(&path).unwrap_err().to_string();
        assert!(err.contains("deep.pt") && err.contains("1000 levels deep"), "{err}");
        std::fs::write(&path, doubling(40)).unwrap();
        let err = crate::torch_file::read_pytorch(&path).unwrap_err().to_string();
        assert!(err.contains("deep.pt") && err.contains("objects"), "{err}");
    }

    /// A tensor whose shape is larger than the whole file (burn-store would allocate it
    /// when read) is refused by name: `myemb.pt`'s 2x32 embedding made 10⁶ x 10⁶.
    #[test]
    fn a_shape_larger_than_the_file_is_refused() {
        use std::io::Write;
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pickles/myemb.pt");
        let mut source = zip::ZipArchive::new(File::open(&fixture).unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.pt");
        let mut zip = zip::ZipWriter::new(File::create(&path).unwrap());
        let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        for i in 0..source.len() {
            let mut entry = source.by_index(i).unwrap();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            if entry.name().ends_with("data.pkl") {
                let (from, to): (&[u8], &[u8]) = (b"K\x02K\x20\x86", b"J\x40\x42\x0f\x00J\x40\x42\x0f\x00\x86");
                let at = data.windows(from.len()).position(|w| w == from).unwrap();
                data.splice(at..at + from.len(), to.iter().copied());
            }
            zip.start_file(entry.name(), stored).unwrap();
            zip.write_all(&data).unwrap();
        }
        zip.finish().unwrap();
        let err = crate::torch_file::read_pytorch(&path).unwrap_err().to_string();
        assert!(err.contains("huge.pt") && err.contains("[1000000, 1000000]"), "{err}");
        crate::torch_file::read_pytorch(&fixture).unwrap();
    }

    /// Files written by `torch.save` (the zip archive and the legacy format: a tiny SD1
    /// checkpoint and a textual-inversion embedding) are followed to their end, not
    /// given up on, and pass.
    #[test]
    fn torch_files_are_followed_to_the_end() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pickles");
        for name in ["sd1.ckpt", "sd1_legacy.ckpt", "myemb.pt"] {
            assert!(matches!(file_verdict(&dir.join(name)), Scan::Done), "{name}");
            check_pickle(&dir.join(name)).unwrap();
        }
    }
}
