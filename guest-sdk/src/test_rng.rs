//! A fixed-seed generator for the SDK's randomized unit tests (xorshift64).

/// Deterministic pseudo-random numbers: the same seed gives the same sequence.
pub(crate) struct TestRng(u64);

impl TestRng {
    /// A generator starting from `seed` (not zero).
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A number in `0..n` (`n > 0`).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}
