//! The disk pattern of `mode=blk`: every 512-byte sector holds 64 little-endian u64 words
//! `v, v+1, ..., v+63` (wrapping), where `v = splitmix64(sector ^ seed.rotate_left(32))`.
//! Each sector's content depends on its number and the seed, so misplaced, stale, partial or
//! unwritten sectors all fail the check (use a different seed from the disk's previous content).

use crate::blockdev::SECTOR_SIZE;

const WORDS: usize = SECTOR_SIZE / 8;

/// SplitMix64's output function (Steele, Lea, Flood 2014).
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The first word of `sector`.
pub fn sector_value(seed: u64, sector: u64) -> u64 {
    splitmix64(sector ^ seed.rotate_left(32))
}

/// Fills `buf` (whole sectors) with the pattern of the sectors starting at `first_sector`.
pub fn fill(seed: u64, first_sector: u64, buf: &mut [u8]) {
    for (i, sector) in buf.chunks_exact_mut(SECTOR_SIZE).enumerate() {
        let v = sector_value(seed, first_sector + i as u64);
        for (j, word) in sector.chunks_exact_mut(8).enumerate() {
            word.copy_from_slice(&v.wrapping_add(j as u64).to_le_bytes());
        }
    }
}

/// The first place where `buf` differs from the pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub sector: u64,
    /// Byte offset of the differing word inside the sector.
    pub offset: usize,
    pub expected: u64,
    pub found: u64,
}

/// Checks `buf` (whole sectors) against the pattern of the sectors starting at `first_sector`.
pub fn check(seed: u64, first_sector: u64, buf: &[u8]) -> Result<(), Mismatch> {
    for (i, sector) in buf.chunks_exact(SECTOR_SIZE).enumerate() {
        let s = first_sector + i as u64;
        let v = sector_value(seed, s);
        for j in 0..WORDS {
            let mut w = [0u8; 8];
            w.copy_from_slice(&sector[j * 8..j * 8 + 8]);
            let found = u64::from_le_bytes(w);
            let expected = v.wrapping_add(j as u64);
            if found != expected {
                return Err(Mismatch {
                    sector: s,
                    offset: j * 8,
                    expected,
                    found,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn splitmix_reference_values() {
        // splitmix64 with state 0: the generator's first output is splitmix64(0).
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn fill_then_check_passes() {
        let mut buf = vec![0u8; 8 * SECTOR_SIZE];
        fill(7, 100, &mut buf);
        assert_eq!(check(7, 100, &buf), Ok(()));
        // The same data seen as a sub-range at its own offset.
        assert_eq!(check(7, 102, &buf[2 * SECTOR_SIZE..]), Ok(()));
    }

    #[test]
    fn wrong_seed_offset_or_corruption_fails() {
        let mut buf = vec![0u8; 4 * SECTOR_SIZE];
        fill(1, 0, &mut buf);
        assert_eq!(check(2, 0, &buf).map_err(|m| m.sector), Err(0));
        assert_eq!(check(1, 1, &buf).map_err(|m| m.sector), Err(1));
        buf[3 * SECTOR_SIZE + 17] ^= 1;
        let m = check(1, 0, &buf).unwrap_err();
        assert_eq!((m.sector, m.offset), (3, 16));
    }

    #[test]
    fn sectors_differ_and_start_with_their_value() {
        let mut a = vec![0u8; 2 * SECTOR_SIZE];
        fill(1, 5, &mut a);
        assert_ne!(a[..SECTOR_SIZE], a[SECTOR_SIZE..]);
        assert_eq!(a[..8], sector_value(1, 5).to_le_bytes());
        assert_eq!(
            a[SECTOR_SIZE..SECTOR_SIZE + 8],
            sector_value(1, 6).to_le_bytes()
        );
        assert_eq!(a[8..16], sector_value(1, 5).wrapping_add(1).to_le_bytes());
    }
}
