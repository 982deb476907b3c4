//! Dirty pages as they travel in a checkpoint: a zero page as a mark, a page the standby already
//! holds an earlier copy of as the bytes that changed since (runs of unchanged and changed bytes,
//! as QEMU's XBZRLE encodes them: a page whose counter moved is a few bytes), anything else whole.
//!
//! The primary remembers what it last sent of each page in a bounded cache ([`SentPages`], one per
//! protection session). The standby's base is its own memory: it reads a checkpoint only after the
//! previous one is applied, so its memory then holds exactly what the primary last sent of every
//! page. Each delta carries the CRC32C of the base it was made against, and the standby refuses a
//! delta whose base it does not hold, so a delta can never be applied to the wrong contents.

use std::collections::HashMap;

use vmm::memory::PAGE_SIZE;

use crate::wire::{EncodedPage, PageEncoding};

/// What the primary remembers of the pages it sent, at most: 64 MiB.
pub(super) const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// A delta is sent only if it is at most this many bytes; otherwise the page goes whole (frame
/// compression still applies).
const DELTA_LIMIT: usize = PAGE_SIZE / 2;
/// Unchanged gaps up to this long inside a changed stretch are sent as changed bytes: a new run's
/// two varints would cost as much.
const GAP_NOT_WORTH_A_RUN: usize = 4;

/// The last copy of each page the primary sent, for as many pages as the cache holds; pages past
/// its capacity are sent whole or as zero marks.
pub(super) struct SentPages {
    copies: HashMap<u64, Box<[u8]>>,
    capacity_pages: usize,
}

impl SentPages {
    pub(super) fn new(capacity_bytes: usize) -> Self {
        Self {
            copies: HashMap::new(),
            capacity_pages: capacity_bytes / PAGE_SIZE,
        }
    }

    /// How `page` (the contents at `gpa` now) travels; remembers it as the standby's next base.
    pub(super) fn encode(&mut self, gpa: u64, page: &[u8]) -> EncodedPage {
        debug_assert_eq!(page.len(), PAGE_SIZE);
        let encoding = if is_zero(page) {
            PageEncoding::Zero
        } else {
            let delta = self.copies.get(&gpa).and_then(|base| {
                changes(page, base).map(|changes| PageEncoding::Delta {
                    base_crc: crc32c::crc32c(base),
                    changes,
                })
            });
            delta.unwrap_or_else(|| PageEncoding::Whole(page.to_vec()))
        };
        let room = self.copies.len() < self.capacity_pages;
        match self.copies.get_mut(&gpa) {
            Some(copy) => copy.copy_from_slice(page),
            None if room => {
                self.copies.insert(gpa, page.into());
            }
            None => {}
        }
        EncodedPage { gpa, encoding }
    }
}

/// Whether `page` is all zeros (a word at a time).
pub(super) fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(8)
        .all(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")) == 0)
}

/// Where `a` and `b` first differ from `at` on (their length if nowhere): whole words at a time.
fn next_difference(a: &[u8], b: &[u8], mut at: usize) -> usize {
    while !at.is_multiple_of(8) && at < a.len() && a[at] == b[at] {
        at += 1;
    }
    while at + 8 <= a.len() && a[at..at + 8] == b[at..at + 8] {
        at += 8;
    }
    while at < a.len() && a[at] == b[at] {
        at += 1;
    }
    at
}

/// The runs of `page` that differ from `base`, if they fit in [`DELTA_LIMIT`] bytes. Short unchanged
/// gaps ([`GAP_NOT_WORTH_A_RUN`]) are sent as changed bytes (fewer, longer runs).
fn changes(page: &[u8], base: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < page.len() {
        let changed_from = next_difference(page, base, at);
        if changed_from == page.len() {
            break;
        }
        let mut changed_to = changed_from;
        loop {
            while changed_to < page.len() && page[changed_to] != base[changed_to] {
                changed_to += 1;
            }
            let next = next_difference(page, base, changed_to);
            if next == page.len() || next - changed_to > GAP_NOT_WORTH_A_RUN {
                break;
            }
            changed_to = next;
        }
        put_varint(&mut out, changed_from - at);
        put_varint(&mut out, changed_to - changed_from);
        out.extend_from_slice(&page[changed_from..changed_to]);
        if out.len() > DELTA_LIMIT {
            return None;
        }
        at = changed_to;
    }
    Some(out)
}

fn put_varint(out: &mut Vec<u8>, mut v: usize) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(input: &mut &[u8]) -> Option<usize> {
    let mut v = 0usize;
    for shift in (0..21).step_by(7) {
        let (&byte, rest) = input.split_first()?;
        *input = rest;
        v |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Why an encoded page cannot be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PageDecodeError {
    #[error("page {gpa:#x}: {len} bytes where a whole page was due")]
    NotAPage { gpa: u64, len: usize },
    #[error(
        "page {gpa:#x}: a delta made against a copy (CRC32C {sent:#010x}) this standby does not \
         hold ({held:#010x})"
    )]
    WrongBase { gpa: u64, sent: u32, held: u32 },
    #[error("page {gpa:#x}: a malformed delta (at byte {at} of its changes)")]
    BadDelta { gpa: u64, at: usize },
}

/// The contents `page` stands for. `base` reads the standby's current copy of that page; it is
/// called for deltas only, and the delta is applied to that copy in place.
pub fn decode_page(
    page: EncodedPage,
    base: impl FnOnce() -> Vec<u8>,
) -> Result<Vec<u8>, PageDecodeError> {
    let gpa = page.gpa;
    match page.encoding {
        PageEncoding::Zero => Ok(vec![0; PAGE_SIZE]),
        PageEncoding::Whole(data) if data.len() == PAGE_SIZE => Ok(data),
        PageEncoding::Whole(data) => Err(PageDecodeError::NotAPage {
            gpa,
            len: data.len(),
        }),
        PageEncoding::Delta { base_crc, changes } => {
            let mut out = base();
            let held = crc32c::crc32c(&out);
            if held != base_crc || out.len() != PAGE_SIZE {
                return Err(PageDecodeError::WrongBase {
                    gpa,
                    sent: base_crc,
                    held,
                });
            }
            let mut input = &changes[..];
            let mut at = 0usize;
            while !input.is_empty() {
                let bad = |input: &[u8]| PageDecodeError::BadDelta {
                    gpa,
                    at: changes.len() - input.len(),
                };
                let unchanged = get_varint(&mut input).ok_or_else(|| bad(input))?;
                let changed = get_varint(&mut input).ok_or_else(|| bad(input))?;
                let from = at
                    .checked_add(unchanged)
                    .filter(|f| *f <= PAGE_SIZE)
                    .ok_or_else(|| bad(input))?;
                let to = from
                    .checked_add(changed)
                    .filter(|t| *t <= PAGE_SIZE && changed <= input.len())
                    .ok_or_else(|| bad(input))?;
                out[from..to].copy_from_slice(&input[..changed]);
                input = &input[changed..];
                at = to;
            }
            Ok(out)
        }
    }
}

/// Bytes of page data an encoded page puts on the wire (before frame compression).
pub(super) fn encoded_bytes(page: &EncodedPage) -> usize {
    match &page.encoding {
        PageEncoding::Zero => 0,
        PageEncoding::Whole(data) => data.len(),
        PageEncoding::Delta { changes, .. } => changes.len() + 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zeros() -> Vec<u8> {
        vec![0; PAGE_SIZE]
    }

    fn page(fill: impl FnMut(usize) -> u8) -> Vec<u8> {
        (0..PAGE_SIZE).map(fill).collect()
    }

    fn noise(seed: u32) -> Vec<u8> {
        let mut seed = seed;
        page(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed as u8
        })
    }

    #[test]
    fn a_page_changed_in_a_few_places_travels_as_a_small_delta() {
        let mut sent = SentPages::new(DEFAULT_CACHE_BYTES);
        let first = noise(7);
        let standby = decode_page(sent.encode(0x5000, &first), zeros).unwrap();
        assert_eq!(standby, first, "an unknown page goes whole");
        let mut second = first.clone();
        second[0] ^= 0xff;
        second[100] ^= 0xff;
        second[102] ^= 0x01;
        second[4000..4010].copy_from_slice(&[9; 10]);
        second[PAGE_SIZE - 1] ^= 0x80;
        let encoded = sent.encode(0x5000, &second);
        assert!(
            matches!(encoded.encoding, PageEncoding::Delta { .. }),
            "{encoded:?}"
        );
        assert!(encoded_bytes(&encoded) < 40, "{}", encoded_bytes(&encoded));
        assert_eq!(decode_page(encoded, || standby.clone()).unwrap(), second);
        // Unchanged since: an empty delta.
        let same = sent.encode(0x5000, &second);
        assert_eq!(encoded_bytes(&same), 4);
        assert_eq!(decode_page(same, || second.clone()).unwrap(), second);
    }

    #[test]
    fn zero_pages_are_marks_and_pages_that_changed_everywhere_go_whole() {
        let mut sent = SentPages::new(DEFAULT_CACHE_BYTES);
        let zero = sent.encode(0x1000, &[0; PAGE_SIZE]);
        assert_eq!(zero.encoding, PageEncoding::Zero);
        assert_eq!(encoded_bytes(&zero), 0);
        let encoded = sent.encode(0x1000, &noise(3));
        assert!(matches!(encoded.encoding, PageEncoding::Whole(_)));
        assert_eq!(decode_page(encoded, zeros).unwrap(), noise(3));
        let encoded = sent.encode(0x1000, &noise(4));
        assert!(
            matches!(encoded.encoding, PageEncoding::Whole(_)),
            "a delta would be larger"
        );
    }

    #[test]
    fn a_delta_against_another_base_or_malformed_is_refused() {
        let mut sent = SentPages::new(DEFAULT_CACHE_BYTES);
        let first = noise(11);
        sent.encode(0x2000, &first);
        let mut second = first.clone();
        second[0] ^= 0xaa;
        let encoded = sent.encode(0x2000, &second);
        // The standby missed the first copy (it holds zeros there): the delta must not apply.
        let err = decode_page(encoded, zeros).unwrap_err();
        assert!(
            matches!(err, PageDecodeError::WrongBase { gpa: 0x2000, .. }),
            "{err}"
        );
        let torn = EncodedPage {
            gpa: 0x3000,
            encoding: PageEncoding::Whole(vec![1; 100]),
        };
        assert!(matches!(
            decode_page(torn, zeros),
            Err(PageDecodeError::NotAPage { len: 100, .. })
        ));
        let zero_crc = crc32c::crc32c(&[0; PAGE_SIZE]);
        for changes in [
            vec![0x80],                   // a varint cut short
            vec![0xff, 0xff, 0xff, 0x7f], // a varint too long
            vec![0x80, 0x20, 1, 1],       // past the end of the page
            vec![0, 5, 1, 2],             // fewer bytes than it says
        ] {
            let bad = EncodedPage {
                gpa: 0x3000,
                encoding: PageEncoding::Delta {
                    base_crc: zero_crc,
                    changes: changes.clone(),
                },
            };
            assert!(
                matches!(
                    decode_page(bad, zeros),
                    Err(PageDecodeError::BadDelta { .. })
                ),
                "{changes:?}"
            );
        }
    }

    #[test]
    fn deltas_round_trip_whatever_changed() {
        let mut seed = 0x2545_f491u32;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed as usize
        };
        for _ in 0..200 {
            let base = noise(next() as u32 | 1);
            let mut changed = base.clone();
            for _ in 0..next() % 64 {
                let at = next() % PAGE_SIZE;
                let len = (next() % 16).min(PAGE_SIZE - at);
                for b in &mut changed[at..at + len] {
                    *b = b.wrapping_add(1 + (next() % 255) as u8);
                }
            }
            if let Some(changes) = changes(&changed, &base) {
                let encoded = EncodedPage {
                    gpa: 0,
                    encoding: PageEncoding::Delta {
                        base_crc: crc32c::crc32c(&base),
                        changes,
                    },
                };
                assert_eq!(decode_page(encoded, || base.clone()).unwrap(), changed);
            }
        }
    }

    #[test]
    fn the_cache_is_bounded() {
        let mut sent = SentPages::new(2 * PAGE_SIZE);
        let p = noise(5);
        for gpa in 0..4u64 {
            sent.encode(gpa * PAGE_SIZE as u64, &p);
        }
        assert_eq!(sent.copies.len(), 2);
        // A page past the cache's capacity goes whole again.
        let again = sent.encode(3 * PAGE_SIZE as u64, &p);
        assert!(matches!(again.encoding, PageEncoding::Whole(_)));
    }
}
