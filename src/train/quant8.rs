//! bitsandbytes' blockwise dynamic 8-bit quantization of optimizer state (Dettmers et al. 2022,
//! "8-bit Optimizers via Block-wise Quantization"): the dynamic maps of
//! `bitsandbytes.functional.create_dynamic_map` (signed for the first moment, unsigned for the
//! second), blocks of 256 values each scaled by its largest magnitude, every value stored as the
//! index of the nearest map entry (the rule of bnb's CUDA kernels).

/// Values per block of state: bitsandbytes' 8-bit optimizers use 256 (`BLOCKSIZE_2STATE`), not the
/// 2048 of the paper's text or the 4096 of `quantize_blockwise`'s default.
pub const BLOCK: usize = 256;

/// `create_dynamic_map(signed, max_exponent_bits = 7, total_bits = 8)`: for each exponent
/// `i` in 0..7, the midpoints of `linspace(0.1, 1, 2^i + 1)` (signed; `2^(i+1) + 1` unsigned) in
/// f32, times `10^(i − 6)`, and their negatives when signed; then 0 and 1; sorted. 256 values.
pub fn dynamic_map(signed: bool) -> Vec<f32> {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7i32 {
        let items = if signed { (1usize << i) + 1 } else { (1usize << (i + 1)) + 1 };
        let bounds = linspace_f32(0.1, 1.0, items);
        let scale = 10f64.powi(i - 6) as f32;
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
        }
        if signed {
            for w in bounds.windows(2) {
                let mean = (w[0] + w[1]) / 2.0;
                data.push(-scale * mean);
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.resize(256, 0.0);
    data.sort_by(f32::total_cmp);
    data
}

/// torch's f32 `linspace` on the CPU: `start + step·i` for the first half and `end − step·(n − 1 − i)`
/// for the rest, `step = (end − start) / (n − 1)` in f32.
fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    // torch's vectorised kernel computes each value with one rounding (a fused multiply-add).
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n).map(|i| if i < half { step.mul_add(i as f32, start) } else { (-step).mul_add((n - 1 - i) as f32, end) }).collect()
}

/// The index of the map entry nearest `y` (the map sorted ascending).
pub fn nearest(map: &[f32], y: f32) -> u8 {
    let i = map.partition_point(|&c| c < y);
    if i == 0 {
        return 0;
    }
    if i >= map.len() {
        return (map.len() - 1) as u8;
    }
    // Between map[i - 1] < y <= map[i]: the closer one (the lower on a tie, as an argmin).
    if (y - map[i - 1]) <= (map[i] - y) { (i - 1) as u8 } else { i as u8 }
}

/// Quantize `values` in blocks of `block`: each block's absmax, then every value's nearest code of
/// `value / absmax` (a block of zeros keeps absmax 0, which decodes to 0 whatever the codes). With
/// `signed_fix`, a code of the wrong sign moves one step toward the value's sign, as bnb's kernel
/// does for the first moment.
pub fn quantize(map: &[f32], values: &[f32], block: usize, codes: &mut [u8], absmax: &mut [f32], signed_fix: bool) {
    for ((block, out), amax) in values.chunks(block).zip(codes.chunks_mut(block)).zip(absmax.iter_mut()) {
        let m = block.iter().fold(0f32, |a, &v| a.max(v.abs()));
        *amax = m;
        for (v, c) in block.iter().zip(out.iter_mut()) {
            let y = if m > 0.0 { v / m } else { 0.0 };
            let mut q = nearest(map, y);
            if signed_fix && map[q as usize].is_sign_negative() != v.is_sign_negative() {
                // bnb compares sign bits: a positive zero code for a negative value moves down too.
                if *v > 0.0 && (q as usize) + 1 < map.len() {
                    q += 1;
                } else if *v <= 0.0 && q > 0 {
                    q -= 1;
                }
            }
            *c = q;
        }
    }
}

/// `map[code] · absmax` of each value's block of `block`.
pub fn dequantize(map: &[f32], codes: &[u8], block: usize, absmax: &[f32], out: &mut [f32]) {
    for ((block, o), &m) in codes.chunks(block).zip(out.chunks_mut(block)).zip(absmax) {
        for (c, v) in block.iter().zip(o.iter_mut()) {
            *v = map[*c as usize] * m;
        }
    }
}

/// Number of optimizer-state blocks for `n` values.
pub fn blocks(n: usize) -> usize {
    n.div_ceil(BLOCK)
}
