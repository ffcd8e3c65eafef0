import Collectives
import Kernels
import TestSupport
import XCTest

/// Naive float64 references and finite-difference gradient checks for every basic layer.
final class LayerTests: XCTestCase {
    // MARK: Conv2d

    /// y[n,o,i,j] = b[o] + Σ_{c,u,v} W[o,c,u,v]·x[n,c,i·s−p+u, j·s−p+v], by the definition.
    func naiveConvolution(_ x: Tensor<Double>, _ w: Tensor<Double>, _ b: [Double]?, stride: Int, padding: Int) -> [Double] {
        let (N, C, H, W) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3])
        let (O, K) = (w.shape[0], w.shape[2])
        let OH = (H + 2 * padding - K) / stride + 1, OW = (W + 2 * padding - K) / stride + 1
        var y = [Double](repeating: 0, count: N * O * OH * OW)
        for n in 0..<N { for o in 0..<O { for i in 0..<OH { for j in 0..<OW {
            var total = b?[o] ?? 0
            for c in 0..<C { for u in 0..<K { for v in 0..<K {
                let yy = i * stride - padding + u, xx = j * stride - padding + v
                if yy >= 0 && yy < H && xx >= 0 && xx < W {
                    total += w.scalars[((o * C + c) * K + u) * K + v] * x.scalars[((n * C + c) * H + yy) * W + xx]
                }
            } } }
            y[((n * O + o) * OH + i) * OW + j] = total
        } } } }
        return y
    }

    func testConv2dForwardMatchesTheDefinitionWithStrideAndPadding() throws {
        for (stride, padding, kernel) in [(1, 0, 3), (1, 1, 3), (2, 1, 3), (2, 0, 1), (1, 0, 1), (3, 2, 5)] {
            var random = DeterministicRandom(seed: 1)
            let conv = Conv2d<Double>(inputChannels: 3, outputChannels: 4, kernelSize: kernel, stride: stride, padding: padding, random: &random)
            let x = randomTensor([2, 3, 7, 6], seed: 2)
            let y = try conv.forward(x, mode: .inference)
            let expected = naiveConvolution(x, conv.weight.value, conv.bias!.value.scalars, stride: stride, padding: padding)
            XCTAssertEqual(y.shape, [2, 4, (7 + 2 * padding - kernel) / stride + 1, (6 + 2 * padding - kernel) / stride + 1])
            assertClose(y.scalars, expected, relTol: 1e-12, absTol: 1e-12, "stride \(stride) padding \(padding) kernel \(kernel)")
        }
    }

    /// dx and dW of y = conv(x) for an output gradient dy, by the definition (scatter loops).
    func naiveConvolutionGradients(_ x: Tensor<Double>, _ w: Tensor<Double>, _ dy: Tensor<Double>, stride: Int, padding: Int) -> (dx: [Double], dw: [Double]) {
        let (N, C, H, W) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3])
        let (O, K, OH, OW) = (w.shape[0], w.shape[2], dy.shape[2], dy.shape[3])
        var dx = [Double](repeating: 0, count: x.count), dw = [Double](repeating: 0, count: w.count)
        for n in 0..<N { for o in 0..<O { for i in 0..<OH { for j in 0..<OW {
            let g = dy.scalars[((n * O + o) * OH + i) * OW + j]
            for c in 0..<C { for u in 0..<K { for v in 0..<K {
                let yy = i * stride - padding + u, xx = j * stride - padding + v
                guard yy >= 0 && yy < H && xx >= 0 && xx < W else { continue }
                let xi = ((n * C + c) * H + yy) * W + xx, wi = ((o * C + c) * K + u) * K + v
                dx[xi] += w.scalars[wi] * g
                dw[wi] += x.scalars[xi] * g
            } } }
        } } } }
        return (dx, dw)
    }

    /// The batched im2col/GEMM path against the definition, forward and both gradients: 1×1 and
    /// 3×3 kernels, stride 1 and 2, odd and non-square sizes, batch 1 and more.
    func testConv2dForwardAndGradientsMatchTheDefinitionOverShapes() throws {
        let cases: [(batch: Int, c: Int, o: Int, h: Int, w: Int, kernel: Int, stride: Int, padding: Int)] = [
            (1, 3, 5, 7, 7, 3, 1, 1), (1, 3, 5, 7, 7, 3, 2, 1), (3, 2, 4, 9, 5, 3, 2, 1), (2, 4, 3, 5, 7, 1, 1, 0),
            (3, 4, 6, 7, 9, 1, 2, 0), (1, 5, 2, 3, 3, 1, 1, 0), (2, 3, 4, 11, 6, 3, 1, 0), (1, 1, 1, 1, 1, 1, 1, 0),
            (2, 3, 4, 9, 5, 3, 1, 1), (2, 2, 3, 6, 11, 5, 1, 2), (1, 2, 2, 2, 2, 3, 1, 1),
        ]
        for (index, t) in cases.enumerated() {
            var random = DeterministicRandom(seed: 50 + UInt64(index))
            let conv = Conv2d<Double>(inputChannels: t.c, outputChannels: t.o, kernelSize: t.kernel, stride: t.stride, padding: t.padding,
                                      bias: false, random: &random)
            let x = randomTensor([t.batch, t.c, t.h, t.w], seed: 60 + UInt64(index))
            let y = try conv.forward(x, mode: .training)
            assertClose(y.scalars, naiveConvolution(x, conv.weight.value, nil, stride: t.stride, padding: t.padding),
                        relTol: 1e-12, absTol: 1e-12, "forward, case \(t)")
            let dy = randomTensor(y.shape, seed: 70 + UInt64(index))
            let dx = try conv.backward(dy)
            let expected = naiveConvolutionGradients(x, conv.weight.value, dy, stride: t.stride, padding: t.padding)
            XCTAssertEqual(dx.shape, x.shape)
            assertClose(dx.scalars, expected.dx, relTol: 1e-12, absTol: 1e-12, "input gradient, case \(t)")
            assertClose(conv.weight.gradient.scalars, expected.dw, relTol: 1e-12, absTol: 1e-12, "weight gradient, case \(t)")
        }
    }

    /// A sample's output does not depend on which other samples share its batch — bit for bit —
    /// so W ranks × batch b compute the same activations as 1 rank × batch W·b.
    /// The exactness contract for a convolution: a piece of a batch, told where it starts in the
    /// whole (`sampleOffset`), gives its samples' outputs and input gradients bit for bit, and the
    /// weight gradients of aligned power-of-two pieces, added along the rank tree, are the whole
    /// batch's bit for bit. Nothing here depends on which BLAS kernel runs: each comparison is
    /// between calls of one shape.
    func testConv2dPiecesOfABatchGiveTheWholeBatchsResultsBitForBit() throws {
        for backend in ConvolutionBackend.allCases {
        for (c, o, h, w, kernel, stride, padding) in [(16, 16, 16, 16, 3, 1, 1), (16, 32, 16, 16, 3, 2, 1), (3, 16, 9, 5, 3, 1, 1), (8, 8, 5, 5, 1, 1, 0), (4, 8, 7, 7, 3, 1, 1)] {
            var random = DeterministicRandom(seed: 80)
            let conv = Conv2d<Float>(inputChannels: c, outputChannels: o, kernelSize: kernel, stride: stride, padding: padding, bias: true, random: &random)
            conv.backend = backend
            let x = randomTensor([32, c, h, w], seed: 81).converted(to: Float.self)
            let label = "\(c)→\(o) k\(kernel) s\(stride) \(backend)"
            conv.sampleOffset = 0
            let whole = try conv.forward(x, mode: .training)
            let dy = randomTensor(whole.shape, seed: 82).converted(to: Float.self)
            let wholeDx = try conv.backward(dy)
            let wholeDw = conv.weight.gradient.scalars, wholeDb = conv.bias!.gradient.scalars
            let plane = whole.count / 32, inputPlane = x.count / 32
            for (start, count) in [(0, 8), (8, 8), (29, 3), (5, 1), (3, 17)] {
                conv.sampleOffset = start
                let part = try conv.forward(x.slice(samples: start..<(start + count)), mode: .training)
                XCTAssertEqual(part.scalars.map(\.bitPattern), whole.scalars[(start * plane)..<((start + count) * plane)].map(\.bitPattern),
                               "outputs of samples \(start)..<\(start + count), \(label)")
                let dx = try conv.backward(dy.slice(samples: start..<(start + count)))
                XCTAssertEqual(dx.scalars.map(\.bitPattern), wholeDx.scalars[(start * inputPlane)..<((start + count) * inputPlane)].map(\.bitPattern),
                               "input gradients of samples \(start)..<\(start + count), \(label)")
            }
            for ranks in [2, 4, 8] {
                var dw: [[Float]] = [], db: [[Float]] = []
                let b = 32 / ranks
                for r in 0..<ranks {
                    conv.sampleOffset = r * b
                    _ = try conv.forward(x.slice(samples: (r * b)..<((r + 1) * b)), mode: .training)
                    _ = try conv.backward(dy.slice(samples: (r * b)..<((r + 1) * b)))
                    dw.append(conv.weight.gradient.scalars)
                    db.append(conv.bias!.gradient.scalars)
                }
                XCTAssertEqual(rankTreeSum(dw).map(\.bitPattern), wholeDw.map(\.bitPattern), "weight gradient over \(ranks) pieces, \(label)")
                XCTAssertEqual(rankTreeSum(db).map(\.bitPattern), wholeDb.map(\.bitPattern), "bias gradient over \(ranks) pieces, \(label)")
            }
        }
        }
    }

    func testLinearPiecesOfABatchGiveTheWholeBatchsResultsBitForBit() throws {
        var random = DeterministicRandom(seed: 90)
        let linear = Linear<Float>(inputFeatures: 37, outputFeatures: 11, random: &random)
        let x = randomTensor([32, 37], seed: 91).converted(to: Float.self)
        let whole = try linear.forward(x, mode: .training)
        let dy = randomTensor(whole.shape, seed: 92).converted(to: Float.self)
        let wholeDx = try linear.backward(dy)
        let wholeDw = linear.weight.gradient.scalars
        for (start, count) in [(0, 8), (13, 5), (31, 1)] {
            linear.sampleOffset = start
            let part = try linear.forward(x.slice(samples: start..<(start + count)), mode: .training)
            XCTAssertEqual(part.scalars.map(\.bitPattern), whole.scalars[(start * 11)..<((start + count) * 11)].map(\.bitPattern))
            let dx = try linear.backward(dy.slice(samples: start..<(start + count)))
            XCTAssertEqual(dx.scalars.map(\.bitPattern), wholeDx.scalars[(start * 37)..<((start + count) * 37)].map(\.bitPattern))
        }
        var dw: [[Float]] = []
        for r in 0..<4 {
            linear.sampleOffset = r * 8
            _ = try linear.forward(x.slice(samples: (r * 8)..<((r + 1) * 8)), mode: .training)
            _ = try linear.backward(dy.slice(samples: (r * 8)..<((r + 1) * 8)))
            dw.append(linear.weight.gradient.scalars)
        }
        XCTAssertEqual(rankTreeSum(dw).map(\.bitPattern), wholeDw.map(\.bitPattern))
    }

    func testPairwiseAccumulatorIsTheCanonicalTree() {
        for count in [0, 1, 2, 3, 5, 8, 13, 32, 33] {
            var leaves: [[Float]] = []
            for i in 0..<count {
                let sign: Float = i % 2 == 0 ? 1e6 : -0.999e6
                leaves.append((0..<7).map { (j: Int) -> Float in Float(1 + (i * 5 + j) % 9) * sign + Float(i) * 0.31 })
            }
            Float.scratchArrays.releaseFree()
            let allocations = Float.scratchArrays.allocations
            var accumulator = PairwiseAccumulator<Float>(width: 7)
            for leaf in leaves { accumulator.add { $0.update(from: leaf, count: 7) } }
            var total = [Float](repeating: 0, count: 7)
            total.withUnsafeMutableBufferPointer { accumulator.total(into: $0.baseAddress!) }
            // The carry and one buffer per occupied level, at the leaf that occupies the most.
            let peak = count == 0 ? 0 : (1...count).map(\.nonzeroBitCount).max()! + 1
            XCTAssertEqual(Float.scratchArrays.allocations - allocations, peak, "\(count) leaves: buffers borrowed")
            var flat = leaves.flatMap { $0 }
            if count > 0 { flat.withUnsafeMutableBufferPointer { Float.pairwiseSumInPlace($0.baseAddress!, count: count, width: 7, stride: 7) } }
            let expected = count == 0 ? [Float](repeating: 0, count: 7) : rankTreeSum(leaves)
            let expectedBits: [UInt32] = expected.map { $0.bitPattern }
            XCTAssertEqual(total.map { $0.bitPattern }, expectedBits, "\(count) leaves")
            if count > 0 { XCTAssertEqual(flat[0..<7].map { $0.bitPattern }, expectedBits, "\(count) leaves in place") }
        }
    }

    func testScratchArraysLendTheSmallestFitAndSettle() {
        let pool = ScratchArrays<Float>()
        var a = pool.take(atLeast: 100), b = pool.take(atLeast: 10)
        XCTAssertEqual([a.count, b.count, pool.allocations], [100, 10, 2])
        pool.giveBack(&a)
        pool.giveBack(&b)
        XCTAssertTrue(a.isEmpty && b.isEmpty, "a given-back array is the pool's")
        XCTAssertEqual(pool.freeCount, 110)
        // The smallest free array that is big enough.
        var c = pool.take(atLeast: 5)
        XCTAssertEqual([c.count, pool.allocations], [10, 2])
        pool.giveBack(&c)
        // Nothing big enough: the smaller free ones go, and one new array serves from then on.
        var d = pool.take(atLeast: 1000)
        XCTAssertEqual([d.count, pool.allocations, pool.freeCount], [1000, 3, 0])
        pool.giveBack(&d)
        for _ in 0..<3 {
            var e = pool.take(atLeast: 1000), f = pool.take(atLeast: 7)
            pool.giveBack(&e)
            pool.giveBack(&f)
        }
        XCTAssertEqual([pool.allocations, pool.freeCount], [4, 1007])
    }

    func testConvolutionsShareTheirTreeBuffersAndSettle() throws {
        // Two layers of different sizes, trained in turn: after the first steps their weight-
        // gradient trees borrow only what the pool holds, which is what the larger layer needs, not
        // the sum of both.
        for backend in [ConvolutionBackend.im2col, .onednn] {
            Float.scratchArrays.releaseFree()
            var random = DeterministicRandom(seed: 41)
            let big = Conv2d<Float>(inputChannels: 8, outputChannels: 32, kernelSize: 3, stride: 1, padding: 1, bias: false, random: &random)
            let small = Conv2d<Float>(inputChannels: 4, outputChannels: 8, kernelSize: 3, stride: 1, padding: 1, bias: false, random: &random)
            big.backend = backend
            small.backend = backend
            let xBig = randomTensor([16, 8, 6, 6], seed: 42).converted(to: Float.self)
            let xSmall = randomTensor([16, 4, 6, 6], seed: 43).converted(to: Float.self)
            func step() throws {
                for (conv, x) in [(big, xBig), (small, xSmall)] {
                    let y = try conv.forward(x, mode: .training)
                    _ = try conv.backward(y)
                }
            }
            for _ in 0..<2 { try step() }
            let allocations = Float.scratchArrays.allocations, held = Float.scratchArrays.freeCount
            var expected: [Float] = []
            for i in 0..<3 {
                try step()
                XCTAssertEqual(Float.scratchArrays.allocations, allocations, "\(backend): step \(i + 3) allocated")
                XCTAssertEqual(Float.scratchArrays.freeCount, held, "\(backend): every buffer is back after a step")
                if i > 0 { XCTAssertEqual(big.weight.gradient.scalars.map(\.bitPattern), expected.map(\.bitPattern), "\(backend): reused buffers change no bit") }
                expected = big.weight.gradient.scalars
            }
            // 16 one-sample leaves: at most 4 occupied levels and the carry, each at least the
            // larger layer's weight.
            let largest = 32 * 8 * 9, smallest = 8 * 4 * 9
            XCTAssertGreaterThanOrEqual(held, 5 * largest, "\(backend)")
            XCTAssertLessThan(held, 5 * largest + 5 * smallest + (backend == .onednn ? 5 * largest : 0), "\(backend): both layers' trees kept apart")
        }
    }

    func testAddingWidenedFloatLeavesHasTheBitsOfAddingTheirDoubles() {
        let width = 300
        for count in [0, 1, 2, 3, 7, 8, 32, 33] {
            var random = DeterministicRandom(seed: UInt64(count))
            let leaves = (0..<(count * width)).map { _ in Float(random.normal() * 1e3) }
            var written = PairwiseAccumulator<Double>(width: width), widened = PairwiseAccumulator<Double>(width: width)
            leaves.withUnsafeBufferPointer { l in
                for i in 0..<count {
                    written.add { Float.widen(l.baseAddress! + i * width, count: width, into: $0) }
                    widened.add(widening: l.baseAddress! + i * width)
                }
            }
            var expected = [Double](repeating: .nan, count: width), total = [Double](repeating: .nan, count: width)
            expected.withUnsafeMutableBufferPointer { written.total(into: $0.baseAddress!) }
            total.withUnsafeMutableBufferPointer { widened.total(into: $0.baseAddress!) }
            XCTAssertEqual(total.map(\.bitPattern), expected.map(\.bitPattern), "\(count) leaves")
            XCTAssertEqual(widened.count, count)
        }
    }

    func testConv2dGradientsMatchFiniteDifferences() throws {
        for (stride, padding, bias) in [(1, 1, true), (2, 1, false), (2, 0, true)] {
            var random = DeterministicRandom(seed: 3)
            let conv = Conv2d<Double>(inputChannels: 2, outputChannels: 3, kernelSize: 3, stride: stride, padding: padding, bias: bias, random: &random)
            try checkGradients(of: conv, input: randomTensor([2, 2, 5, 5], seed: 4))
        }
    }

    func testPointwiseConvolutionSkipsIm2colAndMatchesFiniteDifferences() throws {
        var random = DeterministicRandom(seed: 31)
        let conv = Conv2d<Double>(inputChannels: 3, outputChannels: 4, kernelSize: 1, bias: true, random: &random)
        XCTAssertTrue(conv.isPointwise)
        try checkGradients(of: conv, input: randomTensor([2, 3, 3, 4], seed: 32))
    }

    func testReusedBuffersFollowChangingBatchSizes() throws {
        var random = DeterministicRandom(seed: 33)
        let conv = Conv2d<Double>(inputChannels: 2, outputChannels: 3, kernelSize: 3, padding: 1, random: &random)
        for (n, seed) in [(4, 34), (1, 35), (3, 36)] as [(Int, UInt64)] {
            let x = randomTensor([n, 2, 5, 5], seed: seed)
            for mode in [Mode.training, .inference] {
                let y = try conv.forward(x, mode: mode)
                assertClose(y.scalars, naiveConvolution(x, conv.weight.value, conv.bias!.value.scalars, stride: 1, padding: 1),
                            relTol: 1e-12, absTol: 1e-12, "batch \(n) \(mode)")
            }
        }
        try checkGradients(of: conv, input: randomTensor([2, 2, 4, 4], seed: 37))
    }

    func testConv2dInFloatAgreesWithDouble() throws {
        var r1 = DeterministicRandom(seed: 5), r2 = DeterministicRandom(seed: 5)
        let convF = Conv2d<Float>(inputChannels: 3, outputChannels: 8, kernelSize: 3, padding: 1, random: &r1)
        let convD = Conv2d<Double>(inputChannels: 3, outputChannels: 8, kernelSize: 3, padding: 1, random: &r2)
        let x = randomTensor([4, 3, 8, 8], seed: 6)
        let yF = try convF.forward(x.converted(to: Float.self), mode: .training)
        let yD = try convD.forward(x, mode: .training)
        XCTAssertLessThan(relativeError(yF.scalars, yD.scalars), 1e-6)
        let dy = randomTensor(yD.shape, seed: 7)
        let dxF = try convF.backward(dy.converted(to: Float.self)), dxD = try convD.backward(dy)
        XCTAssertLessThan(relativeError(dxF.scalars, dxD.scalars), 1e-6)
        XCTAssertLessThan(relativeError(convF.weight.gradient.scalars, convD.weight.gradient.scalars), 1e-6)
    }

    func testConv2dRejectsAWrongChannelCountAndTooSmallInputs() {
        var random = DeterministicRandom(seed: 1)
        let conv = Conv2d<Double>(inputChannels: 3, outputChannels: 2, kernelSize: 5, random: &random)
        XCTAssertThrowsError(try conv.forward(Tensor(shape: [1, 2, 8, 8]), mode: .training)) { error in
            XCTAssertTrue("\(error)".contains("expected N×3×H×W"), "\(error)")
        }
        XCTAssertThrowsError(try conv.forward(Tensor(shape: [1, 3, 4, 4]), mode: .training))
    }

    func testConv2dHandlesAnEmptyBatch() throws {
        var random = DeterministicRandom(seed: 1)
        let conv = Conv2d<Double>(inputChannels: 2, outputChannels: 3, kernelSize: 3, padding: 1, random: &random)
        let y = try conv.forward(Tensor(shape: [0, 2, 4, 4]), mode: .training)
        XCTAssertEqual(y.shape, [0, 3, 4, 4])
        let dx = try conv.backward(y)
        XCTAssertEqual(dx.shape, [0, 2, 4, 4])
        XCTAssertEqual(conv.weight.gradient.scalars, [Double](repeating: 0, count: conv.weight.value.count))
    }

    // MARK: Linear

    func testLinearForwardMatchesTheDefinition() throws {
        var random = DeterministicRandom(seed: 8)
        let linear = Linear<Double>(inputFeatures: 5, outputFeatures: 3, random: &random)
        let x = randomTensor([4, 5], seed: 9)
        let y = try linear.forward(x, mode: .inference)
        var expected = [Double]()
        for n in 0..<4 { for o in 0..<3 {
            expected.append(linear.bias!.value.scalars[o] + (0..<5).reduce(0) { $0 + linear.weight.value.scalars[o * 5 + $1] * x.scalars[n * 5 + $1] })
        } }
        assertClose(y.scalars, expected, relTol: 1e-12, absTol: 1e-12)
    }

    func testLinearGradientsMatchFiniteDifferences() throws {
        var random = DeterministicRandom(seed: 10)
        try checkGradients(of: Linear<Double>(inputFeatures: 6, outputFeatures: 4, random: &random), input: randomTensor([5, 6], seed: 11))
        try checkGradients(of: Linear<Double>(inputFeatures: 3, outputFeatures: 2, bias: false, random: &random), input: randomTensor([2, 3], seed: 12))
    }

    func testLinearHandlesAnEmptyBatch() throws {
        var random = DeterministicRandom(seed: 10)
        let linear = Linear<Double>(inputFeatures: 3, outputFeatures: 2, random: &random)
        let y = try linear.forward(Tensor(shape: [0, 3]), mode: .training)
        XCTAssertEqual(y.shape, [0, 2])
        XCTAssertEqual(try linear.backward(y).shape, [0, 3])
        XCTAssertEqual(linear.bias!.gradient.scalars, [0, 0])
    }

    // MARK: Activations and pooling

    func testReLUForwardAndGradient() throws {
        let relu = ReLU<Double>()
        let x = Tensor<Double>(shape: [1, 4], scalars: [-1, 0.5, 2, -0.25])
        XCTAssertEqual(try relu.forward(x, mode: .inference).scalars, [0, 0.5, 2, 0])
        // The Float path (SIMD, 8 lanes plus a tail) agrees, and NaN propagates as in PyTorch.
        let values: [Float] = (0..<19).map { Float($0 % 5) - 2.5 } + [.nan]
        let floatReLU = ReLU<Float>()
        let y = try floatReLU.forward(Tensor(shape: [1, 20], scalars: values), mode: .training)
        XCTAssertEqual(Array(y.scalars.prefix(19)), values.prefix(19).map { max($0, 0) })
        XCTAssertTrue(y.scalars[19].isNaN)
        let dx = try floatReLU.backward(Tensor(shape: [1, 20], repeating: 1))
        XCTAssertEqual(Array(dx.scalars.prefix(19)), values.prefix(19).map { $0 > 0 ? 1 : 0 })
        // Finite differences are exact away from the kink at 0.
        try checkGradients(of: relu, input: randomTensor([3, 4, 2, 2], seed: 13))
    }

    func testMaxPoolForwardPicksTheWindowMaximumAndGradientsMatch() throws {
        let pool = MaxPool2d<Double>(kernelSize: 2)
        let x = Tensor<Double>(shape: [1, 1, 2, 4], scalars: [1, 5, 2, 0, 3, 4, 8, -1])
        XCTAssertEqual(try pool.forward(x, mode: .inference).scalars, [5, 8])
        try checkGradients(of: MaxPool2d<Double>(kernelSize: 3, stride: 2, padding: 1), input: randomTensor([2, 2, 5, 5], seed: 14))
        try checkGradients(of: MaxPool2d<Double>(kernelSize: 2), input: randomTensor([1, 3, 4, 6], seed: 15))
    }

    func testAveragePoolingForwardAndGradients() throws {
        let pool = AvgPool2d<Double>(kernelSize: 2)
        let x = Tensor<Double>(shape: [1, 1, 2, 4], scalars: [1, 5, 2, 0, 3, 4, 8, -1])
        XCTAssertEqual(try pool.forward(x, mode: .inference).scalars, [3.25, 2.25])
        try checkGradients(of: AvgPool2d<Double>(kernelSize: 3, stride: 2, padding: 1), input: randomTensor([2, 2, 5, 5], seed: 16))
        let gap = GlobalAvgPool<Double>()
        XCTAssertEqual(try gap.forward(x, mode: .inference).scalars, [2.75])
        try checkGradients(of: gap, input: randomTensor([3, 4, 3, 2], seed: 17))
    }

    func testFlattenRoundTripsShapes() throws {
        let flatten = Flatten<Double>()
        let x = randomTensor([2, 3, 2, 2], seed: 18)
        let y = try flatten.forward(x, mode: .training)
        XCTAssertEqual(y.shape, [2, 12])
        XCTAssertEqual(try flatten.backward(y), x)
    }

    // MARK: Loss

    func testSoftmaxCrossEntropyMatchesTheDefinitionAndFiniteDifferences() throws {
        var logits = randomTensor([5, 4], seed: 19, std: 3)
        let labels: [Int32] = [0, 3, 1, 1, 2]
        let (lossSum, correct, gradient, _) = try softmaxCrossEntropy(logits: logits, labels: labels, scale: 0.2)
        var expectedLoss = 0.0, expectedCorrect = 0
        for n in 0..<5 {
            let row = Array(logits.scalars[(n * 4)..<(n * 4 + 4)])
            expectedLoss += log(row.map(exp).reduce(0, +)) - row[Int(labels[n])]
            if row.firstIndex(of: row.max()!) == Int(labels[n]) { expectedCorrect += 1 }
        }
        XCTAssertEqual(lossSum, expectedLoss, accuracy: 1e-12)
        XCTAssertEqual(correct, expectedCorrect)
        let numeric = try numericalGradient(count: logits.count, get: { logits.scalars[$0] }, set: { logits.scalars[$0] = $1 }) { try softmaxCrossEntropy(logits: logits, labels: labels, scale: 0).lossSum * 0.2 }
        assertGradient(gradient.scalars, numeric, 1e-7, "logit gradient")
    }

    func testCrossEntropyRejectsLabelsOutsideTheClasses() {
        XCTAssertThrowsError(try softmaxCrossEntropy(logits: Tensor<Double>(shape: [1, 3]), labels: [3], scale: 1)) { error in
            XCTAssertTrue("\(error)".contains("label 3"), "\(error)")
        }
    }
}
