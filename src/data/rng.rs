//! The data stage's seeded randomness: Xoshiro256++ generators keyed by (seed, stream, a, b), so
//! each epoch's order and each example's crop, flip and caption draw are independent of thread
//! timing and of how many other examples were drawn before.

use rand::rngs::Xoshiro256PlusPlus;
use rand::SeedableRng;

/// The generator every data-stage draw uses: Xoshiro256++ (a named, stable algorithm).
pub(crate) type DataRng = Xoshiro256PlusPlus;

/// What a generator is for, so that streams with the same numbers never coincide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Stream {
    /// The subset that `max_samples` keeps.
    Subset = 1,
    /// An epoch's shuffled order (`a` = epoch).
    Order = 2,
    /// One example's crop and flip in one epoch (`a` = epoch, `b` = example index).
    Augment = 3,
    /// One example's caption choice in one epoch (`a` = epoch, `b` = example index).
    Caption = 4,
    /// One example's caption dropout and tag shuffle in one epoch (`a` = epoch, `b` = example).
    CaptionTricks = 5,
    /// The held-out examples of `validation.loss_split`.
    HoldOut = 6,
    /// The order of one aspect-ratio bucket's examples in one epoch (`a` = epoch, `b` = bucket).
    Bucket = 7,
}

/// SplitMix64's finaliser: a bijective mix of 64 bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A generator for `(seed, stream, a, b)`.
pub fn rng_for(seed: u64, stream: Stream, a: u64, b: u64) -> DataRng {
    let key = mix(mix(mix(seed ^ 0x9e37_79b9_7f4a_7c15).wrapping_add(stream as u64)).wrapping_add(a)).wrapping_add(b);
    DataRng::seed_from_u64(mix(key))
}
