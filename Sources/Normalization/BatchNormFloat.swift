import Kernels

// Float witnesses of BatchNormScalar: the same arithmetic as the generic loops (every element
// widened to Double), eight elements at a time with SIMD, so the layer runs at memory speed.

extension Float: BatchNormScalar {
    @inline(__always)
    static func load8(_ base: UnsafePointer<Float>, _ i: Int) -> (SIMD4<Double>, SIMD4<Double>) {
        let v = UnsafeRawPointer(base + i).loadUnaligned(as: SIMD8<Float>.self)
        return (SIMD4<Double>(v.lowHalf), SIMD4<Double>(v.highHalf))
    }

    @inline(__always)
    static func store8(_ base: UnsafeMutablePointer<Float>, _ i: Int, _ lo: SIMD4<Double>, _ hi: SIMD4<Double>) {
        UnsafeMutableRawPointer(base + i).storeBytes(of: SIMD8<Float>(lowHalf: SIMD4<Float>(lo), highHalf: SIMD4<Float>(hi)), as: SIMD8<Float>.self)
    }

    // The leaves walk memory in order (sample-major, then channel), one plane at a time, so the
    // hardware prefetcher streams; each plane's SIMD partial sums are folded in a fixed order.
    public static func planeShiftedSums(_ x: UnsafeBufferPointer<Float>, layout: ChannelLayout, into leaves: UnsafeMutablePointer<Double>) {
        let C = layout.channels, HW = layout.spatial
        guard let xp = x.baseAddress, HW > 0 else {
            leaves.update(repeating: 0, count: layout.batch * 2 * C)
            return
        }
        for n in 0..<layout.batch {
            for c in 0..<C {
                let plane = xp + (n * C + c) * HW
                let k = Double(plane[0]), kv = SIMD4<Double>(repeating: k)
                var a1 = SIMD4<Double>(), b1 = SIMD4<Double>(), a2 = SIMD4<Double>(), b2 = SIMD4<Double>()
                var s1 = 0.0, s2 = 0.0
                var p = 0
                while p + 8 <= HW {
                    let (lo, hi) = load8(plane, p)
                    let dl = lo - kv, dh = hi - kv
                    a1 += dl; b1 += dh
                    a2 += dl * dl; b2 += dh * dh
                    p += 8
                }
                while p < HW {
                    let d = Double(plane[p]) - k
                    s1 += d; s2 += d * d
                    p += 1
                }
                leaves[n * 2 * C + c] = (a1 + b1).sum() + s1
                leaves[n * 2 * C + C + c] = (a2 + b2).sum() + s2
            }
        }
    }

    public static func affine(_ x: UnsafeBufferPointer<Float>, layout: ChannelLayout, scale: UnsafeBufferPointer<Double>,
                              offset: UnsafeBufferPointer<Double>, into y: UnsafeMutableBufferPointer<Float>) {
        guard let xp = x.baseAddress, let yp = y.baseAddress else { return }
        let C = layout.channels, HW = layout.spatial
        for n in 0..<layout.batch {
            for c in 0..<C {
                let base = (n * C + c) * HW, a = scale[c], b = offset[c]
                let av = SIMD4<Double>(repeating: a), bv = SIMD4<Double>(repeating: b)
                var p = 0
                while p + 8 <= HW {
                    let (lo, hi) = load8(xp + base, p)
                    store8(yp + base, p, av * lo + bv, av * hi + bv)
                    p += 8
                }
                while p < HW { yp[base + p] = Float(a * Double(xp[base + p]) + b); p += 1 }
            }
        }
    }

    public static func planeGradientSums(_ dy: UnsafeBufferPointer<Float>, _ x: UnsafeBufferPointer<Float>, layout: ChannelLayout,
                                         mean: UnsafeBufferPointer<Double>, into leaves: UnsafeMutablePointer<Double>) {
        let C = layout.channels, HW = layout.spatial
        guard let gp = dy.baseAddress, let xp = x.baseAddress else {
            leaves.update(repeating: 0, count: layout.batch * 2 * C)
            return
        }
        for n in 0..<layout.batch {
            for c in 0..<C {
                let base = (n * C + c) * HW
                let mu = mean[c], mv = SIMD4<Double>(repeating: mu)
                var a1 = SIMD4<Double>(), b1 = SIMD4<Double>(), a2 = SIMD4<Double>(), b2 = SIMD4<Double>()
                var s1 = 0.0, s2 = 0.0
                var p = 0
                while p + 8 <= HW {
                    let (gl, gh) = load8(gp + base, p)
                    let (xl, xh) = load8(xp + base, p)
                    a1 += gl; b1 += gh
                    a2 += gl * (xl - mv); b2 += gh * (xh - mv)
                    p += 8
                }
                while p < HW {
                    let g = Double(gp[base + p])
                    s1 += g; s2 += g * (Double(xp[base + p]) - mu)
                    p += 1
                }
                leaves[n * 2 * C + c] = (a1 + b1).sum() + s1
                leaves[n * 2 * C + C + c] = (a2 + b2).sum() + s2
            }
        }
    }

    public static func combine(_ dy: UnsafeBufferPointer<Float>, _ x: UnsafeBufferPointer<Float>, layout: ChannelLayout,
                               dyScale: UnsafeBufferPointer<Double>, xScale: UnsafeBufferPointer<Double>,
                               offset: UnsafeBufferPointer<Double>, into dx: UnsafeMutableBufferPointer<Float>) {
        guard let gp = dy.baseAddress, let xp = x.baseAddress, let dp = dx.baseAddress else { return }
        let C = layout.channels, HW = layout.spatial
        for n in 0..<layout.batch {
            for c in 0..<C {
                let base = (n * C + c) * HW, p1 = dyScale[c], q = xScale[c], r = offset[c]
                let pv = SIMD4<Double>(repeating: p1), qv = SIMD4<Double>(repeating: q), rv = SIMD4<Double>(repeating: r)
                var p = 0
                while p + 8 <= HW {
                    let (gl, gh) = load8(gp + base, p)
                    let (xl, xh) = load8(xp + base, p)
                    store8(dp + base, p, pv * gl + qv * xl + rv, pv * gh + qv * xh + rv)
                    p += 8
                }
                while p < HW { dp[base + p] = Float(p1 * Double(gp[base + p]) + q * Double(xp[base + p]) + r); p += 1 }
            }
        }
    }
}
