//! FNV-1a, 64-bit: the checksum of the key-value log (kvlog). Not cryptographic; it detects torn
//! and stale sectors, which is all the log needs.

const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64 of `data`.
pub fn fnv1a64(data: &[u8]) -> u64 {
    fnv1a64_continue(OFFSET_BASIS, data)
}

/// Continues an FNV-1a 64 hash `h` over `data` (so that a hash can cover several pieces).
pub fn fnv1a64_continue(mut h: u64, data: &[u8]) -> u64 {
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        // Reference values of FNV-1a 64.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn continuing_equals_hashing_the_concatenation() {
        let h = fnv1a64_continue(fnv1a64(b"foo"), b"bar");
        assert_eq!(h, fnv1a64(b"foobar"));
    }
}
