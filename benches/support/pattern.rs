//! The seeded byte pattern every bench stream carries.
//!
//! Byte `o` of the stream for `seed` is byte `o % 8` (little-endian) of
//! [`word`]`(seed, o / 8)`. `word` is a bijection of its index for a fixed
//! seed (odd multiply, xor-shifts), so no two words of a stream are equal:
//! a lost, repeated or reordered run of bytes shows as a mismatch, whatever
//! its length. One multiply per 8 bytes keeps the check far cheaper than the
//! copies the relay itself does (the bench prints the check's own speed).

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
const MIX: u64 = 0xbf58_476d_1ce4_e5b9;

/// Word `k` of the stream for `seed`.
#[inline(always)]
pub fn word(seed: u64, k: u64) -> u64 {
    let mut z = k.wrapping_mul(GOLDEN) ^ seed;
    z ^= z >> 29;
    z = z.wrapping_mul(MIX);
    z ^ (z >> 32)
}

/// Byte `off` of the stream for `seed`.
fn byte(seed: u64, off: u64) -> u8 {
    word(seed, off / 8).to_le_bytes()[(off % 8) as usize]
}

/// Splits `len` bytes starting at stream offset `off` into an unaligned
/// head, whole words, and a tail: (head bytes, word bytes).
fn split(off: u64, len: usize) -> (usize, usize) {
    let head = ((8 - off % 8) % 8).min(len as u64) as usize;
    (head, (len - head) / 8 * 8)
}

/// Fills `buf` with stream bytes `off..off + buf.len()`.
pub fn fill(seed: u64, off: u64, buf: &mut [u8]) {
    let (head, words) = split(off, buf.len());
    let (h, rest) = buf.split_at_mut(head);
    let (w, t) = rest.split_at_mut(words);
    for (i, b) in h.iter_mut().enumerate() {
        *b = byte(seed, off + i as u64);
    }
    let k0 = (off + head as u64) / 8;
    for (i, c) in w.chunks_exact_mut(8).enumerate() {
        c.copy_from_slice(&word(seed, k0 + i as u64).to_le_bytes());
    }
    let t0 = off + (head + words) as u64;
    for (i, b) in t.iter_mut().enumerate() {
        *b = byte(seed, t0 + i as u64);
    }
}

/// The stream offset of the first byte of `buf` (stream bytes from
/// `off`) that is not the pattern, if any.
pub fn check(seed: u64, off: u64, buf: &[u8]) -> Option<u64> {
    let (head, words) = split(off, buf.len());
    let k0 = (off + head as u64) / 8;
    // Branch-free over the words; the byte scan runs only on a mismatch.
    let mut diff = 0u64;
    for (i, c) in buf[head..head + words].chunks_exact(8).enumerate() {
        let got = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        diff |= got ^ word(seed, k0 + i as u64);
    }
    let edges_ok = buf[..head]
        .iter()
        .chain(&buf[head + words..])
        .zip((0..head).chain(head + words..buf.len()))
        .all(|(b, i)| *b == byte(seed, off + i as u64));
    if diff == 0 && edges_ok {
        return None;
    }
    buf.iter()
        .enumerate()
        .find(|(i, b)| **b != byte(seed, off + *i as u64))
        .map(|(i, _)| off + i as u64)
}

/// Checks one read of a stream that must carry exactly `bytes` bytes
/// of the pattern: `chunk` holds stream bytes from `off`. An error
/// names the first wrong byte, or the bytes past `bytes`.
pub fn check_read(seed: u64, bytes: u64, off: u64, chunk: &[u8]) -> std::io::Result<()> {
    let want = (bytes - off).min(chunk.len() as u64) as usize;
    if let Some(at) = check(seed, off, &chunk[..want]) {
        return Err(std::io::Error::other(format!(
            "byte {at} of {bytes} is not the pattern (seed {seed:#018x}): lost, duplicated or corrupted data"
        )));
    }
    if want < chunk.len() {
        return Err(std::io::Error::other(format!(
            "more than the {bytes} bytes asked for ({} extra in one read)",
            chunk.len() - want
        )));
    }
    Ok(())
}

/// Bytes per second [`check`] verifies on this machine (one core).
pub fn check_rate() -> f64 {
    let mut buf = vec![0u8; 64 << 20];
    fill(7, 3, &mut buf);
    let t0 = std::time::Instant::now();
    let mut bad = 0;
    for r in 0..4u64 {
        // Shifted each time so the optimiser cannot skip repeats.
        bad += check(7, 3, &buf[r as usize..]).is_some() as u32;
    }
    let rate = 4.0 * buf.len() as f64 / t0.elapsed().as_secs_f64();
    assert_eq!(bad, 3, "pattern check self-test");
    rate
}

/// A run's stream seeds: `word(salt, 1)`, `word(salt, 2)`, ... A fresh
/// seed for each stream, so that bytes of one stream showing up on another
/// are caught too; each bench has its own salt.
pub struct Seeds {
    salt: u64,
    n: std::sync::atomic::AtomicU64,
}

impl Seeds {
    /// The sequence for `salt`, starting at index 1.
    pub const fn new(salt: u64) -> Seeds {
        Seeds {
            salt,
            n: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// The next seed.
    pub fn next(&self) -> u64 {
        word(
            self.salt,
            self.n.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        )
    }
}
