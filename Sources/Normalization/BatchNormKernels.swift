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
    /// sums[c] = Σ(x − K_c), sums[C + c] = Σ(x − K_c)² over the N·H·W values of channel c.
    static func shiftedSums(_ x: UnsafeBufferPointer<Self>, layout: ChannelLayout, shift: UnsafeBufferPointer<Double>,
                            into sums: UnsafeMutableBufferPointer<Double>)
    /// y = a_c·x + b_c per element, computed in Double (a = γ/σ, b = β − μ·a: Double keeps
    /// |μ·a| ≈ 1e4 to 1e-12, far below Float's resolution of y).
    static func affine(_ x: UnsafeBufferPointer<Self>, layout: ChannelLayout, scale: UnsafeBufferPointer<Double>,
                       offset: UnsafeBufferPointer<Double>, into y: UnsafeMutableBufferPointer<Self>)
    /// sums[c] = Σ dy, sums[C + c] = Σ dy·(x − μ_c) over channel c.
    static func gradientSums(_ dy: UnsafeBufferPointer<Self>, _ x: UnsafeBufferPointer<Self>, layout: ChannelLayout,
                             mean: UnsafeBufferPointer<Double>, into sums: UnsafeMutableBufferPointer<Double>)
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
    public static func shiftedSums(_ x: UnsafeBufferPointer<Self>, layout: ChannelLayout, shift: UnsafeBufferPointer<Double>,
                                   into sums: UnsafeMutableBufferPointer<Double>) {
        let C = layout.channels, HW = layout.spatial
        for c in 0..<C {
            let k = shift[c]
            var s1 = 0.0, s2 = 0.0
            for n in 0..<layout.batch {
                let base = (n * C + c) * HW
                for p in 0..<HW {
                    let d = Double(x[base + p]) - k
                    s1 += d
                    s2 += d * d
                }
            }
            sums[c] = s1
            sums[C + c] = s2
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

    public static func gradientSums(_ dy: UnsafeBufferPointer<Self>, _ x: UnsafeBufferPointer<Self>, layout: ChannelLayout,
                                    mean: UnsafeBufferPointer<Double>, into sums: UnsafeMutableBufferPointer<Double>) {
        let C = layout.channels, HW = layout.spatial
        for c in 0..<C {
            var sumDy = 0.0, sumDyX = 0.0
            let mu = mean[c]
            for n in 0..<layout.batch {
                let base = (n * C + c) * HW
                for p in 0..<HW {
                    let g = Double(dy[base + p])
                    sumDy += g
                    sumDyX += g * (Double(x[base + p]) - mu)
                }
            }
            sums[c] = sumDy
            sums[C + c] = sumDyX
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
