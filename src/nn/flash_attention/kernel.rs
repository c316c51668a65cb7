//! The CPU flash-attention loops on f32 slices (the algorithm of `mod.rs`): forward and backward
//! parallel with rayon over B·H × query tiles, tile products with the `gemm` crate, row kernels
//! written so the compiler vectorises them, no `[Lq, Lk]` buffer.

use rayon::prelude::*;

use super::{Geometry, Tiling};

/// Forward over all heads: returns the output `[B·H, Lq, dv]` and the logsumexp `[B·H, Lq]`.
pub fn forward(q: &[f32], k: &[f32], v: &[f32], g: Geometry, scale: f32, t: Tiling) -> (Vec<f32>, Vec<f32>) {
    let Geometry { lq, lk, d, dv, .. } = g;
    let mut out = vec![0f32; g.bh * lq * dv];
    let mut lse = vec![0f32; g.bh * lq];
    if lq == 0 || g.bh == 0 {
        return (out, lse);
    }
    out.par_chunks_mut(lq * dv).zip(lse.par_chunks_mut(lq)).enumerate().for_each(|(h, (out_h, lse_h))| {
        let (q_h, k_h, v_h) = (&q[h * lq * d..(h + 1) * lq * d], &k[h * lk * d..(h + 1) * lk * d], &v[h * lk * dv..(h + 1) * lk * dv]);
        out_h.par_chunks_mut(t.q_tile * dv).zip(lse_h.par_chunks_mut(t.q_tile)).enumerate().for_each(|(i, (out_t, lse_t))| {
            let i0 = i * t.q_tile;
            forward_tile(&q_h[i0 * d..(i0 + lse_t.len()) * d], k_h, v_h, out_t, lse_t, g, scale, t.k_tile);
        });
    });
    (out, lse)
}

/// Whether the row loops can run with AVX2 (8 lanes instead of the baseline's 4).
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One query tile (`m = lse.len()` rows) against all key tiles, with the online softmax.
#[allow(clippy::too_many_arguments)]
fn forward_tile(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], lse: &mut [f32], g: Geometry, scale: f32, k_tile: usize) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 (checked above).
        return unsafe { forward_tile_avx2(q, k, v, out, lse, g, scale, k_tile) };
    }
    forward_tile_impl(q, k, v, out, lse, g, scale, k_tile)
}

/// `forward_tile_impl` compiled with AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn forward_tile_avx2(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], lse: &mut [f32], g: Geometry, scale: f32, k_tile: usize) {
    forward_tile_impl(q, k, v, out, lse, g, scale, k_tile)
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn forward_tile_impl(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], lse: &mut [f32], g: Geometry, scale: f32, k_tile: usize) {
    let Geometry { lk, d, dv, .. } = g;
    let m = lse.len();
    let mut s = vec![0f32; m * k_tile.min(lk)];
    let mut row_max = vec![f32::NEG_INFINITY; m];
    let mut row_sum = vec![0f32; m];
    for (jt, j0) in (0..lk).step_by(k_tile).enumerate() {
        let n = k_tile.min(lk - j0);
        let s = &mut s[..m * n];
        // S = scale · Q Kⱼᵀ
        matmul(m, n, d, s, n, false, q, d, 1, &k[j0 * d..], 1, d, scale);
        for r in 0..m {
            let row = &mut s[r * n..(r + 1) * n];
            let new_max = row_max[r].max(max_of(row));
            let sum = exp_sub_sum(row, new_max);
            if jt == 0 {
                row_sum[r] = sum;
            } else {
                let corr = exp(row_max[r] - new_max);
                row_sum[r] = row_sum[r] * corr + sum;
                if corr != 1.0 {
                    out[r * dv..(r + 1) * dv].iter_mut().for_each(|o| *o *= corr);
                }
            }
            row_max[r] = new_max;
        }
        // acc = corr · acc + exp(S − m) Vⱼ
        matmul(m, dv, n, out, dv, jt > 0, s, n, 1, &v[j0 * dv..], dv, 1, 1.0);
    }
    for r in 0..m {
        let inv = 1.0 / row_sum[r];
        out[r * dv..(r + 1) * dv].iter_mut().for_each(|o| *o *= inv);
        lse[r] = row_max[r] + row_sum[r].ln();
    }
}

/// Backward over all heads: `(dq, dk, dv)`.
///
/// Work is split per head into `groups` runs of query tiles; each run owns its rows of dQ and
/// accumulates private partial dK and dV for all keys (summed over the runs at the end), so no
/// two threads write the same memory and each tile of scores is computed once.
#[allow(clippy::too_many_arguments)]
pub fn backward(q: &[f32], k: &[f32], v: &[f32], o: &[f32], d_o: &[f32], lse: &[f32], g: Geometry, scale: f32, t: Tiling) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Geometry { bh, lq, lk, d, dv } = g;
    let mut dq = vec![0f32; bh * lq * d];
    if lq == 0 || lk == 0 || bh == 0 {
        return (dq, vec![0f32; bh * lk * d], vec![0f32; bh * lk * dv]);
    }
    if lk == 1 {
        // One key: the softmax is identically 1 and O = v, so dq = dk = 0 exactly (the general
        // path would leave rounding noise from dP − D) and dv = Σ_rows dO.
        let mut dv_total = vec![0f32; bh * dv];
        dv_total.par_chunks_mut(dv).zip(d_o.par_chunks(lq * dv)).for_each(|(total, rows)| {
            for row in rows.chunks(dv) {
                total.iter_mut().zip(row).for_each(|(t, x)| *t += x);
            }
        });
        return (dq, vec![0f32; bh * d], dv_total);
    }
    // D = rowsum(dO ∘ O), one value per query row.
    let dsum: Vec<f32> = o.par_chunks(dv).zip(d_o.par_chunks(dv)).map(|(o, d_o)| dot(o, d_o)).collect();
    let q_tiles = lq.div_ceil(t.q_tile);
    let wanted = (2 * rayon::current_num_threads()).div_ceil(bh).clamp(1, q_tiles);
    let tiles_per_group = q_tiles.div_ceil(wanted);
    let groups = q_tiles.div_ceil(tiles_per_group);
    let rows_per_group = tiles_per_group * t.q_tile;
    let mut dk_parts = vec![0f32; bh * groups * lk * d];
    let mut dv_parts = vec![0f32; bh * groups * lk * dv];
    dq.par_chunks_mut(lq * d)
        .zip(dk_parts.par_chunks_mut(groups * lk * d))
        .zip(dv_parts.par_chunks_mut(groups * lk * dv))
        .enumerate()
        .for_each(|(h, ((dq_h, dk_h), dv_h))| {
            let heads = Head {
                q: &q[h * lq * d..(h + 1) * lq * d],
                k: &k[h * lk * d..(h + 1) * lk * d],
                v: &v[h * lk * dv..(h + 1) * lk * dv],
                d_o: &d_o[h * lq * dv..(h + 1) * lq * dv],
                lse: &lse[h * lq..(h + 1) * lq],
                dsum: &dsum[h * lq..(h + 1) * lq],
            };
            dq_h.par_chunks_mut(rows_per_group * d).zip(dk_h.par_chunks_mut(lk * d)).zip(dv_h.par_chunks_mut(lk * dv)).enumerate().for_each(
                |(grp, ((dq_g, dk_g), dv_g))| {
                    let r0 = grp * rows_per_group;
                    backward_rows(&heads, r0, dq_g, dk_g, dv_g, g, scale, t);
                },
            );
        });
    if groups == 1 {
        return (dq, dk_parts, dv_parts);
    }
    let reduce = |parts: &[f32], width: usize| -> Vec<f32> {
        let mut total = vec![0f32; bh * lk * width];
        total.par_chunks_mut(lk * width).zip(parts.par_chunks(groups * lk * width)).for_each(|(total, parts)| {
            for part in parts.chunks(lk * width) {
                total.iter_mut().zip(part).for_each(|(t, p)| *t += p);
            }
        });
        total
    };
    (dq, reduce(&dk_parts, d), reduce(&dv_parts, dv))
}

/// One head's inputs to the backward.
struct Head<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    d_o: &'a [f32],
    lse: &'a [f32],
    dsum: &'a [f32],
}

/// The backward for query rows `r0 .. r0 + dq.len() / d` of one head: writes their dQ and adds
/// their contribution to the (partial) dK and dV of every key.
#[allow(clippy::too_many_arguments)]
fn backward_rows(h: &Head, r0: usize, dq: &mut [f32], dk: &mut [f32], dv_acc: &mut [f32], g: Geometry, scale: f32, t: Tiling) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 (checked above).
        return unsafe { backward_rows_avx2(h, r0, dq, dk, dv_acc, g, scale, t) };
    }
    backward_rows_impl(h, r0, dq, dk, dv_acc, g, scale, t)
}

/// `backward_rows_impl` compiled with AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn backward_rows_avx2(h: &Head, r0: usize, dq: &mut [f32], dk: &mut [f32], dv_acc: &mut [f32], g: Geometry, scale: f32, t: Tiling) {
    backward_rows_impl(h, r0, dq, dk, dv_acc, g, scale, t)
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_rows_impl(h: &Head, r0: usize, dq: &mut [f32], dk: &mut [f32], dv_acc: &mut [f32], g: Geometry, scale: f32, t: Tiling) {
    let Geometry { lk, d, dv, .. } = g;
    let rows = dq.len() / d;
    let width = t.k_tile.min(lk);
    let mut p = vec![0f32; t.q_tile * width];
    let mut dp = vec![0f32; t.q_tile * width];
    for i in (0..rows).step_by(t.q_tile) {
        let m = t.q_tile.min(rows - i);
        let a = r0 + i;
        let q_i = &h.q[a * d..(a + m) * d];
        let do_i = &h.d_o[a * dv..(a + m) * dv];
        let dq_i = &mut dq[i * d..(i + m) * d];
        for j0 in (0..lk).step_by(t.k_tile) {
            let n = t.k_tile.min(lk - j0);
            let (p, dp) = (&mut p[..m * n], &mut dp[..m * n]);
            // P = exp(scale · Q Kⱼᵀ − lse)
            matmul(m, n, d, p, n, false, q_i, d, 1, &h.k[j0 * d..], 1, d, scale);
            for r in 0..m {
                exp_sub(&mut p[r * n..(r + 1) * n], h.lse[a + r]);
            }
            // dVⱼ += Pᵀ dO
            matmul(n, dv, m, &mut dv_acc[j0 * dv..], dv, true, p, 1, n, do_i, dv, 1, 1.0);
            // dP = dO Vⱼᵀ
            matmul(m, n, dv, dp, n, false, do_i, dv, 1, &h.v[j0 * dv..], 1, dv, 1.0);
            // dS = P ∘ (dP − D)
            for r in 0..m {
                softmax_grad(&mut dp[r * n..(r + 1) * n], &p[r * n..(r + 1) * n], h.dsum[a + r]);
            }
            // dQ += scale · dS Kⱼ;  dKⱼ += scale · dSᵀ Q
            matmul(m, d, n, dq_i, d, true, dp, n, 1, &h.k[j0 * d..], d, 1, scale);
            matmul(n, d, m, &mut dk[j0 * d..], d, true, dp, 1, n, q_i, d, 1, scale);
        }
    }
}

/// `dst[m×n] (+)= beta · lhs[m×k] · rhs[k×n]`, each operand given by its row and column strides
/// (so transposes are free); `dst` is row-major with row stride `dst_rs`. Single-threaded: the
/// callers are already parallel.
#[allow(clippy::too_many_arguments)]
fn matmul(m: usize, n: usize, k: usize, dst: &mut [f32], dst_rs: usize, accumulate: bool, lhs: &[f32], lhs_rs: usize, lhs_cs: usize, rhs: &[f32], rhs_rs: usize, rhs_cs: usize, beta: f32) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            (0..m).for_each(|r| dst[r * dst_rs..r * dst_rs + n].fill(0.0));
        }
        return;
    }
    // The raw-pointer call below reads and writes only inside these bounds.
    assert!(dst.len() >= (m - 1) * dst_rs + n, "flash attention: dst tile out of bounds");
    assert!(lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs, "flash attention: lhs tile out of bounds");
    assert!(rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs, "flash attention: rhs tile out of bounds");
    // SAFETY: the asserts above keep every index gemm forms (i·rs + j·cs for i < rows, j < cols)
    // inside the slices; dst is borrowed mutably and does not alias lhs or rhs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

// Row kernels. Eight independent accumulators so the compiler vectorises the reductions
// (f32 addition is not reassociated otherwise); `exp` is branch-free so the loops vectorise.

const LANES: usize = 8;

#[inline(always)]
fn max_of(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            // A compare-and-select (one `maxps`), not `f32::max`'s NaN handling.
            if *x > *a {
                *a = *x;
            }
        }
    }
    let tail = chunks.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
    acc.iter().copied().fold(tail, f32::max)
}

/// `row = exp(row − m)` and returns the sum.
#[inline(always)]
fn exp_sub_sum(row: &mut [f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c.iter_mut()) {
            *x = exp(*x - m);
            *a += *x;
        }
    }
    let mut tail = 0f32;
    for x in chunks.into_remainder() {
        *x = exp(*x - m);
        tail += *x;
    }
    acc.iter().sum::<f32>() + tail
}

/// `row = exp(row − m)`.
#[inline(always)]
fn exp_sub(row: &mut [f32], m: f32) {
    row.iter_mut().for_each(|x| *x = exp(*x - m));
}

/// `dp = p ∘ (dp − dsum)`.
#[inline(always)]
fn softmax_grad(dp: &mut [f32], p: &[f32], dsum: f32) {
    dp.iter_mut().zip(p).for_each(|(g, p)| *g = p * (*g - dsum));
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `eˣ` in f32 without branches (so loops of it vectorise): `x = n·ln 2 + r` with
/// `|r| ≤ ln 2 / 2`, `eʳ` from Cephes' degree-6 minimax polynomial (relative error about 2e-7),
/// `2ⁿ` built in the exponent bits. Inputs are clamped to [-87, 88] (results below ~1e-38 and
/// above ~1.6e38 saturate there); `exp(-inf)` gives ~1e-38 instead of 0, which no softmax here
/// can tell apart.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2²³: adding it rounds to an integer in the low bits
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let bits = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    // ln 2 split in two so n · LN2_HI is exact.
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 0.166_666_65) * r + 0.5;
    let er = p * (r * r) + r + 1.0;
    er * f32::from_bits(((bits + 127) << 23) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The polynomial exp against std's, over the softmax's range: 4e-7 relative (2 ulp of f32
    /// beyond std's own rounding).
    #[test]
    fn exp_matches_std() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (ours, std) = (exp(x), x.exp());
            worst = worst.max(((ours - std) / std).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert!(exp(f32::NEG_INFINITY) < 1e-37 && exp(f32::NEG_INFINITY) >= 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn row_kernels() {
        let row: Vec<f32> = (0..21).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        assert_eq!(max_of(&row), row.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        let mut e = row.clone();
        let sum = exp_sub_sum(&mut e, 1.5);
        let expect: f32 = row.iter().map(|x| (x - 1.5).exp()).sum();
        assert!((sum - expect).abs() < 1e-5 * expect);
        let b: Vec<f32> = (0..21).map(|i| i as f32).collect();
        assert!((dot(&row, &b) - row.iter().zip(&b).map(|(x, y)| x * y).sum::<f32>()).abs() < 1e-4);
    }
}
