import Foundation

// The per-element loops behind the layers, as default implementations of TensorScalar's
// requirements (see the note there on why they are requirements). Shape legend: N samples,
// C channels, H×W positions; "plane" = one channel of one sample.

extension TensorScalar {
    /// The output columns x whose input column x·s − p + j falls inside 0 ..< width: computed
    /// once per kernel offset so the inner loops carry no bounds test.
    @inline(__always)
    static func validColumns(_ g: ConvolutionGeometry, offset j: Int) -> Range<Int> {
        // x·s − p + j ≥ 0  ⇔  x ≥ ⌈(p − j)/s⌉;   x·s − p + j < W  ⇔  x ≤ ⌊(W − 1 + p − j)/s⌋
        let low = max(0, (g.padding - j + g.stride - 1) / g.stride)
        let high = min(g.outputWidth, g.width - 1 + g.padding - j < 0 ? 0 : (g.width - 1 + g.padding - j) / g.stride + 1)
        return low..<max(low, high)
    }

    /// columns[(c, i, j), (oh, ow)] = image[c, oh·s − p + i, ow·s − p + j], 0 outside the image.
    /// Row r of the K × P result starts at `columns + r·rowLength`: with rowLength = N·P and
    /// `columns` advanced by n·P, the samples of a batch fill one K × N·P matrix side by side.
    public static func im2col(_ image: UnsafePointer<Self>, _ g: ConvolutionGeometry, into columns: UnsafeMutablePointer<Self>, rowLength: Int) {
        let oh = g.outputHeight, ow = g.outputWidth
        var row = 0
        for c in 0..<g.inputChannels {
            let plane = c * g.height * g.width
            for i in 0..<g.kernelHeight {
                for j in 0..<g.kernelWidth {
                    let out = columns + row * rowLength
                    let valid = validColumns(g, offset: j)
                    if g.stride == 1 && ow == g.width && g.width > 2 * g.padding {
                        // "Same" padding, stride 1: the valid output rows are the image's rows
                        // shifted by j − p, one contiguous copy, with the column that fell off
                        // the edge of each row set to 0 afterwards.
                        let shift = j - g.padding
                        let y0 = min(max(0, g.padding - i), oh), y1 = min(oh, g.height + g.padding - i)
                        out.update(repeating: 0, count: y0 * ow)
                        if y1 > y0 {
                            let first = y0 * ow, count = (y1 - y0) * ow
                            let source = image + plane + (y0 + i - g.padding) * g.width + shift
                            // Skip the element before the block (shift < 0) or after it (shift > 0).
                            let skipFront = max(0, -shift), skipBack = max(0, shift)
                            (out + first + skipFront).update(from: source + skipFront, count: count - skipFront - skipBack)
                            for y in y0..<y1 {
                                for x in 0..<valid.lowerBound { out[y * ow + x] = 0 }
                                for x in valid.upperBound..<ow { out[y * ow + x] = 0 }
                            }
                        }
                        (out + max(y1, y0) * ow).update(repeating: 0, count: (oh - max(y1, y0)) * ow)
                        row += 1
                        continue
                    }
                    for y in 0..<oh {
                        let iy = y * g.stride - g.padding + i
                        let outRow = out + y * ow
                        if iy < 0 || iy >= g.height || valid.isEmpty {
                            for x in 0..<ow { outRow[x] = 0 }
                            continue
                        }
                        let inRow = image + plane + iy * g.width - g.padding + j
                        for x in 0..<valid.lowerBound { outRow[x] = 0 }
                        if g.stride == 1 {
                            copyRow(from: inRow + valid.lowerBound, to: outRow + valid.lowerBound, count: valid.count)
                        } else {
                            for x in valid { outRow[x] = inRow[x * g.stride] }
                        }
                        for x in valid.upperBound..<ow { outRow[x] = 0 }
                    }
                    row += 1
                }
            }
        }
    }

    /// target[0..<count] = source[0..<count] for short rows (an image row of a few dozen values),
    /// without a call into memmove.
    @inline(__always)
    static func copyRow(from source: UnsafePointer<Self>, to target: UnsafeMutablePointer<Self>, count: Int) {
        var x = 0
        if Self.self == Float.self {
            let s = UnsafeRawPointer(source), t = UnsafeMutableRawPointer(target)
            while x + 8 <= count {
                t.storeBytes(of: s.loadUnaligned(fromByteOffset: x * 4, as: SIMD8<Float>.self), toByteOffset: x * 4, as: SIMD8<Float>.self)
                x += 8
            }
        }
        while x < count { target[x] = source[x]; x += 1 }
    }

    /// target[0..<count] += source[0..<count], eight Float lanes at a time (the rows never overlap,
    /// which the compiler cannot know).
    @inline(__always)
    static func accumulateRow(_ source: UnsafePointer<Self>, into target: UnsafeMutablePointer<Self>, count: Int) {
        var x = 0
        if Self.self == Float.self {
            let s = UnsafeRawPointer(source), t = UnsafeMutableRawPointer(target)
            while x + 8 <= count {
                let sum = t.loadUnaligned(fromByteOffset: x * 4, as: SIMD8<Float>.self) + s.loadUnaligned(fromByteOffset: x * 4, as: SIMD8<Float>.self)
                t.storeBytes(of: sum, toByteOffset: x * 4, as: SIMD8<Float>.self)
                x += 8
            }
        }
        while x < count { target[x] += source[x]; x += 1 }
    }

    /// The adjoint of im2col: image[c, y, x] += every column entry that was read from it (the
    /// same `rowLength` convention).
    public static func col2imAccumulate(_ columns: UnsafePointer<Self>, _ g: ConvolutionGeometry, rowLength: Int, into image: UnsafeMutablePointer<Self>) {
        let oh = g.outputHeight, ow = g.outputWidth
        var row = 0
        for c in 0..<g.inputChannels {
            let plane = c * g.height * g.width
            for i in 0..<g.kernelHeight {
                for j in 0..<g.kernelWidth {
                    let out = columns + row * rowLength
                    let valid = validColumns(g, offset: j)
                    for y in 0..<oh {
                        let iy = y * g.stride - g.padding + i
                        if iy < 0 || iy >= g.height { continue }
                        let inRow = image + plane + iy * g.width - g.padding + j
                        let outRow = out + y * ow
                        if g.stride == 1 {
                            accumulateRow(outRow + valid.lowerBound, into: inRow + valid.lowerBound, count: valid.count)
                        } else {
                            for x in valid { inRow[x * g.stride] += outRow[x] }
                        }
                    }
                    row += 1
                }
            }
        }
    }

    /// target[b, a, :] = source[a, b, :] for an A × B × `block` source: NCHW ⇄ CNHW with
    /// block = H·W, so one GEMM can cover every sample of a batch.
    public static func swapOuterAxes(_ source: UnsafePointer<Self>, _ a: Int, _ b: Int, block: Int, into target: UnsafeMutablePointer<Self>) {
        for i in 0..<a {
            for j in 0..<b {
                (target + (j * a + i) * block).update(from: source + (i * b + j) * block, count: block)
            }
        }
    }

    /// output[n, c, p] += bias[c].
    public static func addChannelBias(_ bias: UnsafeBufferPointer<Self>, to output: UnsafeMutableBufferPointer<Self>, layout: ChannelLayout) {
        for n in 0..<layout.batch {
            for c in 0..<layout.channels {
                let base = (n * layout.channels + c) * layout.spatial
                let b = bias[c]
                for p in 0..<layout.spatial { output[base + p] += b }
            }
        }
    }

    /// sums[c] = Σ_{n,p} values[n, c, p]: each sample's plane summed in Double and rounded, then
    /// the samples added along the pairwise tree (PairwiseSum.swift), so the sum is a function of
    /// the samples alone, however the batch is split.
    public static func channelSums(_ values: UnsafeBufferPointer<Self>, layout: ChannelLayout, into sums: UnsafeMutableBufferPointer<Self>) {
        let C = layout.channels, N = layout.batch
        guard N > 0 else { for c in 0..<C { sums[c] = 0 }; return }
        var leaves = filled(N * C, with: 0)
        leaves.withUnsafeMutableBufferPointer { l in
            for n in 0..<N {
                for c in 0..<C {
                    let base = (n * C + c) * layout.spatial
                    var total = 0.0
                    for p in 0..<layout.spatial { total += Double(values[base + p]) }
                    l[n * C + c] = Self(total)
                }
            }
            pairwiseSumInPlace(l.baseAddress!, count: N, width: C, stride: C)
            for c in 0..<C { sums[c] = l[c] }
        }
    }

    /// max(x, 0); NaN stays NaN (as PyTorch), so a diverging run is noticed.
    public static func reluForward(_ x: UnsafeBufferPointer<Self>, _ y: UnsafeMutableBufferPointer<Self>) {
        for i in 0..<x.count { y[i] = x[i] <= 0 ? 0 : x[i] }
    }

    /// dx = dy where the output was not ≤ 0 (the subgradient 0 is taken at 0).
    public static func reluBackward(_ y: UnsafeBufferPointer<Self>, _ dy: UnsafeBufferPointer<Self>, _ dx: UnsafeMutableBufferPointer<Self>) {
        for i in 0..<y.count { dx[i] = y[i] <= 0 ? 0 : dy[i] }
    }

    public static func addReLU(_ s: UnsafeBufferPointer<Self>, into y: UnsafeMutableBufferPointer<Self>) {
        for i in 0..<y.count { let v = y[i] + s[i]; y[i] = v <= 0 ? 0 : v }
    }

    public static func add(_ s: UnsafeBufferPointer<Self>, into y: UnsafeMutableBufferPointer<Self>) {
        for i in 0..<y.count { y[i] += s[i] }
    }

    /// Max over each window; padding never wins. argmax holds the flat index within the plane.
    public static func maxPoolForward(_ x: UnsafeBufferPointer<Self>, _ g: PoolingGeometry, planes: Int, _ y: UnsafeMutableBufferPointer<Self>, argmax: UnsafeMutableBufferPointer<Int32>) {
        let oh = g.outputHeight, ow = g.outputWidth, inPlane = g.height * g.width
        for plane in 0..<planes {
            let inBase = plane * inPlane, outBase = plane * oh * ow
            for oy in 0..<oh {
                for ox in 0..<ow {
                    var best = -Self.infinity, bestIndex = -1
                    for i in 0..<g.kernel {
                        let iy = oy * g.stride - g.padding + i
                        if iy < 0 || iy >= g.height { continue }
                        for j in 0..<g.kernel {
                            let ix = ox * g.stride - g.padding + j
                            if ix < 0 || ix >= g.width { continue }
                            let v = x[inBase + iy * g.width + ix]
                            if v > best || bestIndex < 0 || v.isNaN { best = v; bestIndex = iy * g.width + ix }
                        }
                    }
                    y[outBase + oy * ow + ox] = best
                    argmax[outBase + oy * ow + ox] = Int32(bestIndex)
                }
            }
        }
    }

    /// dx (zeroed here) receives each dy at the position that won its window.
    public static func maxPoolBackward(_ dy: UnsafeBufferPointer<Self>, argmax: UnsafeBufferPointer<Int32>, _ g: PoolingGeometry, planes: Int, _ dx: UnsafeMutableBufferPointer<Self>) {
        let outPlane = g.outputHeight * g.outputWidth, inPlane = g.height * g.width
        for i in 0..<dx.count { dx[i] = 0 }
        for plane in 0..<planes {
            for o in 0..<outPlane {
                dx[plane * inPlane + Int(argmax[plane * outPlane + o])] += dy[plane * outPlane + o]
            }
        }
    }

    /// Mean over each window, dividing by k² (padding counts, as PyTorch's default).
    public static func averagePoolForward(_ x: UnsafeBufferPointer<Self>, _ g: PoolingGeometry, planes: Int, _ y: UnsafeMutableBufferPointer<Self>) {
        let oh = g.outputHeight, ow = g.outputWidth, inPlane = g.height * g.width
        let scale = 1 / Self(g.kernel * g.kernel)
        for plane in 0..<planes {
            let inBase = plane * inPlane, outBase = plane * oh * ow
            for oy in 0..<oh {
                for ox in 0..<ow {
                    var total: Self = 0
                    for i in 0..<g.kernel {
                        let iy = oy * g.stride - g.padding + i
                        if iy < 0 || iy >= g.height { continue }
                        for j in 0..<g.kernel {
                            let ix = ox * g.stride - g.padding + j
                            if ix >= 0 && ix < g.width { total += x[inBase + iy * g.width + ix] }
                        }
                    }
                    y[outBase + oy * ow + ox] = total * scale
                }
            }
        }
    }

    public static func averagePoolBackward(_ dy: UnsafeBufferPointer<Self>, _ g: PoolingGeometry, planes: Int, _ dx: UnsafeMutableBufferPointer<Self>) {
        let oh = g.outputHeight, ow = g.outputWidth, inPlane = g.height * g.width
        let scale = 1 / Self(g.kernel * g.kernel)
        for i in 0..<dx.count { dx[i] = 0 }
        for plane in 0..<planes {
            let inBase = plane * inPlane, outBase = plane * oh * ow
            for oy in 0..<oh {
                for ox in 0..<ow {
                    let share = dy[outBase + oy * ow + ox] * scale
                    for i in 0..<g.kernel {
                        let iy = oy * g.stride - g.padding + i
                        if iy < 0 || iy >= g.height { continue }
                        for j in 0..<g.kernel {
                            let ix = ox * g.stride - g.padding + j
                            if ix >= 0 && ix < g.width { dx[inBase + iy * g.width + ix] += share }
                        }
                    }
                }
            }
        }
    }

    /// y[plane] = mean of the plane's `spatial` values.
    public static func globalAveragePoolForward(_ x: UnsafeBufferPointer<Self>, planes: Int, spatial: Int, _ y: UnsafeMutableBufferPointer<Self>) {
        for plane in 0..<planes {
            var total = 0.0
            for p in 0..<spatial { total += Double(x[plane * spatial + p]) }
            y[plane] = Self(total / Double(spatial))
        }
    }

    public static func globalAveragePoolBackward(_ dy: UnsafeBufferPointer<Self>, planes: Int, spatial: Int, _ dx: UnsafeMutableBufferPointer<Self>) {
        let scale = 1 / Self(spatial)
        for plane in 0..<planes {
            let share = dy[plane] * scale
            for p in 0..<spatial { dx[plane * spatial + p] = share }
        }
    }

    /// Per row: loss = logsumexp(z) − z[label] (in Double), gradient = scale·(softmax(z) − onehot).
    /// Returns the summed loss, how many rows have their label as the first maximum, and the loss
    /// summed in fixed point (see ``FixedPointLoss``).
    public static func softmaxCrossEntropy(_ logits: UnsafeBufferPointer<Self>, labels: UnsafeBufferPointer<Int32>, classes: Int,
                                           gradientScale: Self, gradient: UnsafeMutableBufferPointer<Self>) -> (lossSum: Double, correct: Int, fixedPoint: FixedPointLoss) {
        var lossSum = 0.0, correct = 0
        var fixed = FixedPointLoss()
        for row in 0..<labels.count {
            let base = row * classes
            var maximum = Double(logits[base]), best = 0
            for k in 1..<max(classes, 1) where Double(logits[base + k]) > maximum {
                maximum = Double(logits[base + k]); best = k
            }
            var total = 0.0
            for k in 0..<classes { total += Foundation.exp(Double(logits[base + k]) - maximum) }
            let label = Int(labels[row])
            let loss = Foundation.log(total) + maximum - Double(logits[base + label])
            lossSum += loss
            fixed.add(loss)
            if best == label { correct += 1 }
            if gradient.count > 0 {
                for k in 0..<classes {
                    let p = Foundation.exp(Double(logits[base + k]) - maximum) / total
                    gradient[base + k] = Self((p - (k == label ? 1 : 0)) * Double(gradientScale))
                }
            }
        }
        return (lossSum, correct, fixed)
    }

    public static func widen(_ source: UnsafePointer<Self>, count: Int, into target: UnsafeMutablePointer<Double>) {
        for i in 0..<count { target[i] = Double(source[i]) }
    }

    public static func outerProduct(_ a: UnsafePointer<Self>, m: Int, _ b: UnsafePointer<Self>, n: Int, into target: UnsafeMutablePointer<Self>) {
        for o in 0..<m {
            let g = a[o], row = target + o * n
            for i in 0..<n { row[i] = g * b[i] }
        }
    }

    public static func filled(_ count: Int, with value: Self) -> [Self] { [Self](repeating: value, count: count) }
    public static func widened(_ values: [Self]) -> [Double] { values.map { Double($0) } }
    public static func narrowed(_ values: [Double]) -> [Self] { values.map { Self($0) } }

    public static func narrow(_ source: UnsafePointer<Double>, count: Int, into target: UnsafeMutablePointer<Self>) {
        for i in 0..<count { target[i] = Self(source[i]) }
    }

    public static func allFinite(_ x: UnsafeBufferPointer<Self>) -> Bool {
        for v in x where !v.isFinite { return false }
        return true
    }
}
