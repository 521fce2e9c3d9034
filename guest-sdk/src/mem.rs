//! Byte comparison for the WebAssembly build.
//!
//! wasi-libc's `memcmp` compares one byte per loop iteration, and under the host's time
//! budget every WebAssembly loop iteration also checks the epoch. Plugins compare short
//! byte strings all the time (hash-map keys, JSON member names), so the SDK links this
//! `memcmp` (and `bcmp`) into every plugin instead: eight bytes per step, the tail as one
//! overlapping word. The comparison itself is plain Rust, tested natively against the
//! slice ordering.

/// An unaligned little-endian load of 8 bytes at `p`.
///
/// # Safety
/// `p..p + 8` must be readable.
#[inline(always)]
unsafe fn word(p: *const u8) -> u64 {
    // SAFETY: the caller guarantees eight readable bytes.
    u64::from_le(unsafe { p.cast::<u64>().read_unaligned() })
}

/// An unaligned little-endian load of 4 bytes at `p`.
///
/// # Safety
/// `p..p + 4` must be readable.
#[inline(always)]
unsafe fn half(p: *const u8) -> u32 {
    // SAFETY: the caller guarantees four readable bytes.
    u32::from_le(unsafe { p.cast::<u32>().read_unaligned() })
}

/// The order of two unequal little-endian words read from the same position: decided by
/// their lowest differing byte, the first in memory.
#[inline(always)]
fn order(x: u64, y: u64) -> i32 {
    let shift = (x ^ y).trailing_zeros() & !7;
    ((x >> shift) as u8) as i32 - ((y >> shift) as u8) as i32
}

/// `memcmp`: compare `n` bytes at `a` and `b`; negative, zero or positive as the bytes of
/// `a` order before, equal to or after those of `b` (as unsigned bytes).
///
/// # Safety
/// `a..a + n` and `b..b + n` must be readable (any pointers when `n` is 0).
#[inline(never)]
pub unsafe fn compare(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY (all reads below): every offset read stays below `n`.
    unsafe {
        if n >= 8 {
            let mut i = 0;
            while i + 8 < n {
                let (x, y) = (word(a.add(i)), word(b.add(i)));
                if x != y {
                    return order(x, y);
                }
                i += 8;
            }
            // The last eight bytes, overlapping what was compared equal already.
            let (x, y) = (word(a.add(n - 8)), word(b.add(n - 8)));
            return if x == y { 0 } else { order(x, y) };
        }
        if n >= 4 {
            let (x, y) = (half(a), half(b));
            if x != y {
                return order(x as u64, y as u64);
            }
            let (x, y) = (half(a.add(n - 4)), half(b.add(n - 4)));
            return if x == y { 0 } else { order(x as u64, y as u64) };
        }
        let mut i = 0;
        while i < n {
            let (x, y) = (*a.add(i), *b.add(i));
            if x != y {
                return x as i32 - y as i32;
            }
            i += 1;
        }
        0
    }
}

#[cfg(target_arch = "wasm32")]
mod exports {
    /// The C library's `memcmp`, for everything linked into the plugin.
    ///
    /// # Safety
    /// As [`super::compare`].
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
        // SAFETY: the C contract of memcmp is compare's.
        unsafe { super::compare(a, b, n) }
    }

    /// The C library's `bcmp` (zero when equal), which compilers call for equality tests.
    ///
    /// # Safety
    /// As [`super::compare`].
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
        // SAFETY: the C contract of bcmp is compare's.
        unsafe { super::compare(a, b, n) }
    }
}

#[cfg(test)]
mod tests {
    use super::compare;
    use std::cmp::Ordering;

    fn sign(a: &[u8], b: &[u8]) -> Ordering {
        assert_eq!(a.len(), b.len());
        // SAFETY: both slices hold a.len() bytes.
        unsafe { compare(a.as_ptr(), b.as_ptr(), a.len()) }.cmp(&0)
    }

    #[test]
    fn orders_like_slices_at_every_length_and_position() {
        // Every length up to 40 and every position of a single differing byte, with the
        // difference both ways and across the signed/unsigned boundary.
        for n in 0..=40usize {
            let a: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(sign(&a, &a), Ordering::Equal, "n={n}");
            for at in 0..n {
                for (x, y) in [(0x00u8, 0x01u8), (0x7f, 0x80), (0xff, 0x00), (b'a', b'b')] {
                    let (mut l, mut r) = (a.clone(), a.clone());
                    l[at] = x;
                    r[at] = y;
                    assert_eq!(sign(&l, &r), l.cmp(&r), "n={n} at={at} {x}/{y}");
                    assert_eq!(sign(&r, &l), r.cmp(&l), "n={n} at={at} {y}/{x}");
                }
            }
        }
    }

    #[test]
    fn first_difference_decides_when_several_bytes_differ() {
        let mut rng = crate::test_rng::TestRng::new(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let n = rng.below(48);
            let a: Vec<u8> = (0..n).map(|_| rng.below(4) as u8).collect();
            let b: Vec<u8> = (0..n).map(|_| rng.below(4) as u8).collect();
            assert_eq!(sign(&a, &b), a.cmp(&b), "{a:?} {b:?}");
        }
    }

    #[test]
    fn zero_length_reads_nothing() {
        // SAFETY: with n = 0 nothing is read, whatever the pointers.
        assert_eq!(unsafe { compare(std::ptr::null(), std::ptr::null(), 0) }, 0);
    }
}
