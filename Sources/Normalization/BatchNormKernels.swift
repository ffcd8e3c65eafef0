import Kernels

/// The per-element loops of batch normalization (see `TensorScalar` for why loops are protocol
/// requirements). Shape legend: `layout.batch` samples N, `layout.channels` channels C,
/// `layout.spatial` positions H·W per channel. Statistics and per-element arithmetic are in
/// Double, so |mean| ≫ std costs no precision; Float has SIMD witnesses (`BatchNormFloat.swift`).
///
/// Memory traffic per element: forward reads x twice (sums, then normalize) and writes y;
/// backward reads x and dy twice (sums, then dx) and writes dx. x̂ is never stored: backward
/// recomputes it from x, μ and 1/σ, which costs no extra pass and saves a tensor.
public protocol BatchNormScalar: TensorScalar {
    /// Per sample n and channel c, the plane's sums around its own first value k = x[n, c, 0]:
    /// leaves[n·2C + c] = Σ_p (x − k), leaves[n·2C + C + c] = Σ_p (x − k)². A leaf depends on
    /// that plane alone, so it has the same bits whichever batch or rank holds the sample.
    static func planeShiftedSums(_ x: UnsafeBufferPointer<Self>, layout: ChannelLayout, into leaves: UnsafeMutablePointer<Double>)
    /// y = a_c·x + b_c per element, computed in Double (a = γ/σ, b = β − μ·a: Double keeps
    /// |μ·a| ≈ 1e4 to 1e-12, far below Float's resolution of y).
    static func affine(_ x: UnsafeBufferPointer<Self>, layout: ChannelLayout, scale: UnsafeBufferPointer<Double>,
                       offset: UnsafeBufferPointer<Double>, into y: UnsafeMutableBufferPointer<Self>)
    /// Per sample n and channel c: leaves[n·2C + c] = Σ_p dy, leaves[n·2C + C + c] = Σ_p dy·(x − μ_c).
    static func planeGradientSums(_ dy: UnsafeBufferPointer<Self>, _ x: UnsafeBufferPointer<Self>, layout: ChannelLayout,
                                  mean: UnsafeBufferPointer<Double>, into leaves: UnsafeMutablePointer<Double>)
    /// dx = p_c·dy + q_c·x + r_c per element, in Double.
    static func combine(_ dy: UnsafeBufferPointer<Self>, _ x: UnsafeBufferPointer<Self>, layout: ChannelLayout,
                        dyScale: UnsafeBufferPointer<Double>, xScale: UnsafeBufferPointer<Double>,
                        offset: UnsafeBufferPointer<Double>, into dx: UnsafeMutableBufferPointer<Self>)
    /// Two-pass mean and 1/√(biased variance + ε) of `segments` consecutive runs of `length`
    /// values each (GroupNorm's per-sample groups).
    static func segmentStatistics(_ x: UnsafeBufferPointer<Self>, segments: Int, length: Int, epsilon: Double,
                                  mean: UnsafeMutableBufferPointer<Double>, invStd: UnsafeMutableBufferPointer<Double>)
}

extension BatchNormScalar {
    public static func planeShiftedSums(_ x: UnsafeBufferPointer<Self>, layout: ChannelLayout, into leaves: UnsafeMutablePointer<Double>) {
        let C = layout.channels, HW = layout.spatial
        for n in 0..<layout.batch {
            for c in 0..<C {
                let base = (n * C + c) * HW, k = HW > 0 ? Double(x[base]) : 0
                var s1 = 0.0, s2 = 0.0
                for p in 0..<HW {
                    let d = Double(x[base + p]) - k
                    s1 += d
                    s2 += d * d
                }
                leaves[n * 2 * C + c] = s1
                leaves[n * 2 * C + C + c] = s2
            }
        }
    }

    public static func affine(_ x: UnsafeBufferPointer<Self>, layout: ChannelLayout, scale: UnsafeBufferPointer<Double>,
                              offset: UnsafeBufferPointer<Double>, into y: UnsafeMutableBufferPointer<Self>) {
        let C = layout.channels, HW = layout.spatial
        for n in 0..<layout.batch {
            for c in 0..<C {
                let base = (n * C + c) * HW, a = scale[c], b = offset[c]
                for p in 0..<HW { y[base + p] = Self(a * Double(x[base + p]) + b) }
            }
        }
    }

    public static func planeGradientSums(_ dy: UnsafeBufferPointer<Self>, _ x: UnsafeBufferPointer<Self>, layout: ChannelLayout,
                                         mean: UnsafeBufferPointer<Double>, into leaves: UnsafeMutablePointer<Double>) {
        let C = layout.channels, HW = layout.spatial
        for n in 0..<layout.batch {
            for c in 0..<C {
                let base = (n * C + c) * HW, mu = mean[c]
                var sumDy = 0.0, sumDyX = 0.0
                for p in 0..<HW {
                    let g = Double(dy[base + p])
                    sumDy += g
                    sumDyX += g * (Double(x[base + p]) - mu)
                }
                leaves[n * 2 * C + c] = sumDy
                leaves[n * 2 * C + C + c] = sumDyX
            }
        }
    }

    public static func combine(_ dy: UnsafeBufferPointer<Self>, _ x: UnsafeBufferPointer<Self>, layout: ChannelLayout,
                               dyScale: UnsafeBufferPointer<Double>, xScale: UnsafeBufferPointer<Double>,
                               offset: UnsafeBufferPointer<Double>, into dx: UnsafeMutableBufferPointer<Self>) {
        let C = layout.channels, HW = layout.spatial
        for n in 0..<layout.batch {
            for c in 0..<C {
                let base = (n * C + c) * HW, p1 = dyScale[c], q = xScale[c], r = offset[c]
                for p in 0..<HW { dx[base + p] = Self(p1 * Double(dy[base + p]) + q * Double(x[base + p]) + r) }
            }
        }
    }
}

extension BatchNormScalar {
    /// sums[c] = Σ(x − K_c), sums[C + c] = Σ(x − K_c)² over the N·H·W values of channel c: each
    /// sample's plane summed around its own first value k and moved exactly to K
    /// (Σ(x − K) = s1 + P·d, Σ(x − K)² = s2 + 2d·s1 + P·d², d = k − K), then the samples added
    /// along the pairwise tree. The local shift keeps the squares of the order of the spread, not
    /// of the mean: a batch with mean 1e4 and K = 0 loses ~1e-8 of σ² to rounding, not ~3e-7.
    public static func shiftedSums(_ x: UnsafeBufferPointer<Self>, layout: ChannelLayout, shift: UnsafeBufferPointer<Double>,
                                   into sums: UnsafeMutableBufferPointer<Double>) {
        let C = layout.channels, N = layout.batch, P = Double(layout.spatial)
        guard N > 0, layout.spatial > 0 else { for i in 0..<(2 * C) { sums[i] = 0 }; return }
        var leaves = [Double](repeating: 0, count: N * 2 * C)
        leaves.withUnsafeMutableBufferPointer { l in
            planeShiftedSums(x, layout: layout, into: l.baseAddress!)
            for n in 0..<N {
                for c in 0..<C {
                    let d = Double(x[(n * C + c) * layout.spatial]) - shift[c]
                    let s1 = l[n * 2 * C + c], s2 = l[n * 2 * C + C + c]
                    l[n * 2 * C + c] = s1 + P * d
                    l[n * 2 * C + C + c] = s2 + 2 * d * s1 + P * d * d
                }
            }
            Double.pairwiseSumInPlace(l.baseAddress!, count: N, width: 2 * C, stride: 2 * C)
            for i in 0..<(2 * C) { sums[i] = l[i] }
        }
    }

    /// sums[c] = Σ dy, sums[C + c] = Σ dy·(x − μ_c) over channel c: per-sample plane sums added
    /// along the pairwise tree. With `leaves` (N·2C values) the per-sample sums are kept there,
    /// for parameter gradients that need a tree of their own type.
    public static func gradientSums(_ dy: UnsafeBufferPointer<Self>, _ x: UnsafeBufferPointer<Self>, layout: ChannelLayout,
                                    mean: UnsafeBufferPointer<Double>, into sums: UnsafeMutableBufferPointer<Double>,
                                    leaves kept: UnsafeMutablePointer<Double>? = nil) {
        let C = layout.channels, N = layout.batch
        guard N > 0 else { for i in 0..<(2 * C) { sums[i] = 0 }; return }
        var leaves = [Double](repeating: 0, count: N * 2 * C)
        leaves.withUnsafeMutableBufferPointer { l in
            planeGradientSums(dy, x, layout: layout, mean: mean, into: l.baseAddress!)
            kept?.update(from: l.baseAddress!, count: N * 2 * C)
            Double.pairwiseSumInPlace(l.baseAddress!, count: N, width: 2 * C, stride: 2 * C)
            for i in 0..<(2 * C) { sums[i] = l[i] }
        }
    }
}

extension BatchNormScalar {
    public static func segmentStatistics(_ x: UnsafeBufferPointer<Self>, segments: Int, length: Int, epsilon: Double,
                                         mean: UnsafeMutableBufferPointer<Double>, invStd: UnsafeMutableBufferPointer<Double>) {
        for s in 0..<segments {
            let base = s * length
            var total = 0.0
            for i in 0..<length { total += Double(x[base + i]) }
            let mu = total / Double(length)
            var squares = 0.0
            for i in 0..<length { let d = Double(x[base + i]) - mu; squares += d * d }
            mean[s] = mu
            invStd[s] = 1 / (squares / Double(length) + epsilon).squareRoot()
        }
    }
}

extension Double: BatchNormScalar {}

extension Tensor where Scalar: BatchNormScalar {
    /// y = a_c·x + b_c per element (`layout` names the channels of `x`), through the specialised kernel.
    static func affine(_ x: Tensor, layout: ChannelLayout, scale: [Double], offset: [Double]) -> Tensor {
        Tensor(shape: x.shape) { y in
            x.scalars.withUnsafeBufferPointer { xp in
                scale.withUnsafeBufferPointer { a in
                    offset.withUnsafeBufferPointer { b in Scalar.affine(xp, layout: layout, scale: a, offset: b, into: y) }
                }
            }
        }
    }

    /// dx = p_c·dy + q_c·x + r_c per element, through the specialised kernel.
    static func combining(_ dy: Tensor, _ x: Tensor, layout: ChannelLayout, dyScale p: [Double], xScale q: [Double], offset r: [Double]) -> Tensor {
        Tensor(shape: dy.shape) { dx in
            dy.scalars.withUnsafeBufferPointer { g in
                x.scalars.withUnsafeBufferPointer { xp in
                    p.withUnsafeBufferPointer { pp in
                        q.withUnsafeBufferPointer { qq in
                            r.withUnsafeBufferPointer { rr in
                                Scalar.combine(g, xp, layout: layout, dyScale: pp, xScale: qq, offset: rr, into: dx)
                            }
                        }
                    }
                }
            }
        }
    }
}
