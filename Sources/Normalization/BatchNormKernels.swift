import Kernels

/// The per-element loops of batch normalization, specialised for Float and Double in this module
/// (see `TensorScalar` for why loops are protocol requirements). Shape legend: `layout.batch`
/// samples N, `layout.channels` channels C, `layout.spatial` positions H·W per channel.
/// Statistics are accumulated in Double.
public protocol BatchNormScalar: TensorScalar {
    /// sums[c] = Σ(x − K_c), sums[C + c] = Σ(x − K_c)² over the N·H·W values of channel c.
    static func shiftedSums(_ x: UnsafeBufferPointer<Self>, layout: ChannelLayout, shift: UnsafeBufferPointer<Double>,
                            into sums: UnsafeMutableBufferPointer<Double>)
    /// x̂ = (x − μ_c)·s_c with the subtraction in Double (|μ| ≫ σ loses every digit in Float),
    /// y = γ_c·x̂ + β_c; x̂ is stored when `normalized` is non-empty.
    static func normalize(_ x: UnsafeBufferPointer<Self>, layout: ChannelLayout, mean: UnsafeBufferPointer<Double>,
                          invStd: UnsafeBufferPointer<Double>, gamma: UnsafeBufferPointer<Self>, beta: UnsafeBufferPointer<Self>,
                          normalized: UnsafeMutableBufferPointer<Self>, output: UnsafeMutableBufferPointer<Self>)
    /// sums[c] = Σ dy, sums[C + c] = Σ dy·x̂ over channel c.
    static func gradientSums(_ dy: UnsafeBufferPointer<Self>, normalized: UnsafeBufferPointer<Self>, layout: ChannelLayout,
                             into sums: UnsafeMutableBufferPointer<Double>)
    /// dx = γ_c/σ_c · (dy − Σdy/M − x̂·Σ(dy·x̂)/M), with the global sums already divided by M.
    static func normalizeBackward(_ dy: UnsafeBufferPointer<Self>, normalized: UnsafeBufferPointer<Self>, layout: ChannelLayout,
                                  scale: UnsafeBufferPointer<Double>, meanGradient: UnsafeBufferPointer<Double>,
                                  meanGradientNormalized: UnsafeBufferPointer<Double>, into dx: UnsafeMutableBufferPointer<Self>)
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

    public static func normalize(_ x: UnsafeBufferPointer<Self>, layout: ChannelLayout, mean: UnsafeBufferPointer<Double>,
                                 invStd: UnsafeBufferPointer<Double>, gamma: UnsafeBufferPointer<Self>, beta: UnsafeBufferPointer<Self>,
                                 normalized: UnsafeMutableBufferPointer<Self>, output: UnsafeMutableBufferPointer<Self>) {
        let C = layout.channels, HW = layout.spatial
        let keep = normalized.count > 0
        for n in 0..<layout.batch {
            for c in 0..<C {
                let base = (n * C + c) * HW
                let mu = mean[c], s = invStd[c], g = Double(gamma[c]), b = Double(beta[c])
                for p in 0..<HW {
                    let xhat = (Double(x[base + p]) - mu) * s
                    if keep { normalized[base + p] = Self(xhat) }
                    output[base + p] = Self(g * xhat + b)
                }
            }
        }
    }

    public static func gradientSums(_ dy: UnsafeBufferPointer<Self>, normalized: UnsafeBufferPointer<Self>, layout: ChannelLayout,
                                    into sums: UnsafeMutableBufferPointer<Double>) {
        let C = layout.channels, HW = layout.spatial
        for c in 0..<C {
            var sumDy = 0.0, sumDyXhat = 0.0
            for n in 0..<layout.batch {
                let base = (n * C + c) * HW
                for p in 0..<HW {
                    let g = Double(dy[base + p])
                    sumDy += g
                    sumDyXhat += g * Double(normalized[base + p])
                }
            }
            sums[c] = sumDy
            sums[C + c] = sumDyXhat
        }
    }

    public static func normalizeBackward(_ dy: UnsafeBufferPointer<Self>, normalized: UnsafeBufferPointer<Self>, layout: ChannelLayout,
                                         scale: UnsafeBufferPointer<Double>, meanGradient: UnsafeBufferPointer<Double>,
                                         meanGradientNormalized: UnsafeBufferPointer<Double>, into dx: UnsafeMutableBufferPointer<Self>) {
        let C = layout.channels, HW = layout.spatial
        for n in 0..<layout.batch {
            for c in 0..<C {
                let base = (n * C + c) * HW
                let s = scale[c], a = meanGradient[c], b = meanGradientNormalized[c]
                for p in 0..<HW {
                    dx[base + p] = Self(s * (Double(dy[base + p]) - a - Double(normalized[base + p]) * b))
                }
            }
        }
    }
}

extension Float: BatchNormScalar {}
extension Double: BatchNormScalar {}
