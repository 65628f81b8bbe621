// Numerically careful scalar helpers (WGSL has no log1p, isnan or a total pow).

// log(1 + x) for x ≥ 0, accurate for small x.
fn log1p_pos(x: f32) -> f32 {
    let u = 1.0 + x;
    if u == 1.0 {
        return x;
    }
    return log(u) * x / (u - 1.0);
}

// softplus(x) = log(1 + eˣ) without overflow.
fn softplus(x: f32) -> f32 {
    return max(x, 0.0) + log1p_pos(exp(-abs(x)));
}

// σ(x) without overflow for any sign.
fn sigmoid(x: f32) -> f32 {
    let e = exp(-abs(x));
    let s = 1.0 / (1.0 + e);
    return select(e * s, s, x >= 0.0);
}

// x / d as x · (1 / d), for a division by a pixel's Σe in a loop over its classes: the
// reciprocal is then one expression for every class, computed once, where LLVM keeps each
// division (it does not trade one for a product without fast-math). A division costs about
// five multiplies' throughput on x86, and at 21 classes with a tempered term the stats and
// grad stages each divided 42 times a pixel (BENCHMARKS.md, "Uniform coefficients").
fn over(x: f32, d: f32) -> f32 {
    return x * (1.0 / d);
}

// Finite (neither NaN nor ±∞), from the bits.
fn finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

// xʸ with 0⁰ = 1 and 0ʸ = 0 (WGSL's pow leaves both undefined).
fn safe_pow(x: f32, y: f32) -> f32 {
    if y == 0.0 {
        return 1.0;
    }
    if x <= 0.0 {
        return 0.0;
    }
    return pow(x, y);
}
