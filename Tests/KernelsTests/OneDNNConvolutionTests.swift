import Foundation
import Kernels
import TestSupport
import XCTest

/// oneDNN's convolutions against the definition (Double), against im2col, and with the patch
/// statistics of cross-iteration BN riding on the weight gradient.
extension LayerTests {
    /// Every ResNet-20 (1×28×28, width 1) and ResNet-18 (3×32×32) convolution shape, stride 1 and 2,
    /// 1×1 projections and 3×3, plus odd sizes and batch 1: forward, input and weight gradients
    /// within 1e-5 of the definition and of im2col.
    func testOneDNNConvolutionMatchesTheDefinitionAndIm2colOverResNetShapes() throws {
        XCTAssertNil(OneDNNConvolution.unavailability())
        let cases: [(batch: Int, c: Int, o: Int, h: Int, w: Int, kernel: Int, stride: Int, padding: Int)] = [
            (2, 1, 16, 28, 28, 3, 1, 1), (2, 16, 16, 28, 28, 3, 1, 1), (2, 16, 32, 28, 28, 3, 2, 1), (2, 16, 32, 28, 28, 1, 2, 0),
            (2, 32, 32, 14, 14, 3, 1, 1), (2, 32, 64, 14, 14, 3, 2, 1), (2, 32, 64, 14, 14, 1, 2, 0), (2, 64, 64, 7, 7, 3, 1, 1),
            (1, 3, 64, 32, 32, 3, 1, 1), (1, 64, 64, 32, 32, 3, 1, 1), (1, 64, 128, 32, 32, 3, 2, 1), (1, 64, 128, 32, 32, 1, 2, 0),
            (1, 128, 128, 16, 16, 3, 1, 1), (1, 128, 256, 16, 16, 3, 2, 1), (1, 128, 256, 16, 16, 1, 2, 0), (1, 256, 256, 8, 8, 3, 1, 1),
            (1, 256, 512, 8, 8, 3, 2, 1), (1, 256, 512, 8, 8, 1, 2, 0), (1, 512, 512, 4, 4, 3, 1, 1),
            (3, 3, 5, 9, 5, 3, 2, 1), (1, 2, 2, 2, 2, 3, 1, 1), (5, 4, 6, 7, 9, 1, 1, 0), (3, 5, 7, 11, 6, 3, 1, 0), (2, 2, 3, 6, 11, 5, 1, 2),
        ]
        for (index, t) in cases.enumerated() {
            let label = "\(t.batch)×\(t.c)×\(t.h)×\(t.w) → \(t.o), \(t.kernel)×\(t.kernel) stride \(t.stride)"
            var random = DeterministicRandom(seed: 300 + UInt64(index))
            let reference = Conv2d<Double>(inputChannels: t.c, outputChannels: t.o, kernelSize: t.kernel, stride: t.stride,
                                           padding: t.padding, bias: false, random: &random)
            let x = randomTensor([t.batch, t.c, t.h, t.w], seed: 400 + UInt64(index))
            let y = naiveConvolution(x, reference.weight.value, nil, stride: t.stride, padding: t.padding)
            let outputShape = [t.batch, t.o, (t.h + 2 * t.padding - t.kernel) / t.stride + 1, (t.w + 2 * t.padding - t.kernel) / t.stride + 1]
            let dy = randomTensor(outputShape, seed: 500 + UInt64(index))
            let gradients = naiveConvolutionGradients(x, reference.weight.value, dy, stride: t.stride, padding: t.padding)
            var results: [ConvolutionBackend: (y: [Float], dx: [Float], dw: [Float])] = [:]
            for backend in ConvolutionBackend.allCases {
                let conv = Conv2d<Float>(weight: reference.weight.value.converted(to: Float.self), bias: nil, stride: t.stride, padding: t.padding)
                conv.backend = backend
                let out = try conv.forward(x.converted(to: Float.self), mode: .training)
                XCTAssertEqual(out.shape, outputShape, label)
                let dx = try conv.backward(dy.converted(to: Float.self))
                results[backend] = (out.scalars, dx.scalars, conv.weight.gradient.scalars)
                if backend == .onednn { XCTAssertFalse(conv.oneDNNImplementations.isEmpty, label) }
            }
            let onednn = results[.onednn]!, im2col = results[.im2col]!
            XCTAssertLessThan(relativeError(onednn.y, y), 1e-5, "forward against the definition, \(label)")
            XCTAssertLessThan(relativeError(onednn.dx, gradients.dx), 1e-5, "input gradient against the definition, \(label)")
            XCTAssertLessThan(relativeError(onednn.dw, gradients.dw), 1e-5, "weight gradient against the definition, \(label)")
            XCTAssertLessThan(relativeError(onednn.y, im2col.y.map(Double.init)), 1e-5, "forward against im2col, \(label)")
            XCTAssertLessThan(relativeError(onednn.dx, im2col.dx.map(Double.init)), 1e-5, "input gradient against im2col, \(label)")
            XCTAssertLessThan(relativeError(onednn.dw, im2col.dw.map(Double.init)), 1e-5, "weight gradient against im2col, \(label)")
        }
    }

    /// In-process ranks are threads: several layers creating their primitives and running them at
    /// the same moment on different threads give bit for bit what each gives alone (one engine for
    /// the process, a stream per thread; a stream shared by the threads failed calls now and then).
    func testOneDNNConvolutionsOnConcurrentThreadsGiveTheirSequentialResults() throws {
        let threads = 4, rounds = 12
        var random = DeterministicRandom(seed: 71)
        let reference = Conv2d<Float>(inputChannels: 8, outputChannels: 16, kernelSize: 3, stride: 1, padding: 1, bias: false, random: &random)
        let inputs = (0..<threads).map { randomTensor([4, 8, 12, 12], seed: 80 + UInt64($0)).converted(to: Float.self) }
        let gradients = (0..<threads).map { randomTensor([4, 16, 12, 12], seed: 90 + UInt64($0)).converted(to: Float.self) }
        func run(_ t: Int) -> [[Float]] {
            let conv = Conv2d<Float>(weight: reference.weight.value, bias: nil, stride: 1, padding: 1)
            conv.backend = .onednn
            var outputs: [[Float]] = []
            for _ in 0..<rounds {
                conv.weight.gradient = Tensor(shape: conv.weight.value.shape)
                guard let y = try? conv.forward(inputs[t], mode: .training), let dx = try? conv.backward(gradients[t]) else { return [] }
                outputs = [y.scalars, dx.scalars, conv.weight.gradient.scalars]
            }
            return outputs
        }
        let sequential = (0..<threads).map(run)
        let results = UnsafeMutableBufferPointer<[[Float]]>.allocate(capacity: threads)
        results.initialize(repeating: [])
        defer { results.deallocate() }
        DispatchQueue.concurrentPerform(iterations: threads) { t in results[t] = run(t) }
        for t in 0..<threads {
            XCTAssertEqual(sequential[t].count, 3)
            XCTAssertEqual(results[t].map { $0.map(\.bitPattern) }, sequential[t].map { $0.map(\.bitPattern) }, "thread \(t)")
        }
    }

    /// Both layouts oneDNN can compute in, and chunk sizes from 1 to beyond the batch, give the
    /// definition's results (a partial chunk goes through the zero-padded chunk buffers).
    func testOneDNNLayoutsAndChunkSizesAgreeWithTheDefinition() throws {
        var random = DeterministicRandom(seed: 600)
        let reference = Conv2d<Double>(inputChannels: 8, outputChannels: 12, kernelSize: 3, stride: 2, padding: 1, bias: true, random: &random)
        let x = randomTensor([5, 8, 9, 9], seed: 601)
        let y = naiveConvolution(x, reference.weight.value, reference.bias!.value.scalars, stride: 2, padding: 1)
        let dy = randomTensor([5, 12, 5, 5], seed: 602)
        let gradients = naiveConvolutionGradients(x, reference.weight.value, dy, stride: 2, padding: 1)
        for layout in [OneDNNLayout.plain, .preferred] {
            for chunk in [1, 2, 4, 8] {
                let label = "layout \(layout), chunk \(chunk)"
                let conv = Conv2d<Float>(weight: reference.weight.value.converted(to: Float.self), bias: reference.bias!.value.converted(to: Float.self),
                                         stride: 2, padding: 1)
                conv.backend = .onednn
                conv.oneDNNLayout = layout
                conv.oneDNNChunkOverride = chunk
                conv.sampleOffset = 3
                let out = try conv.forward(x.converted(to: Float.self), mode: .training)
                let dx = try conv.backward(dy.converted(to: Float.self))
                XCTAssertLessThan(relativeError(out.scalars, y), 1e-5, label)
                XCTAssertLessThan(relativeError(dx.scalars, gradients.dx), 1e-5, label)
                XCTAssertLessThan(relativeError(conv.weight.gradient.scalars, gradients.dw), 1e-5, label)
                var db = [Double](repeating: 0, count: 12)
                for s in 0..<5 { for o in 0..<12 { for p in 0..<25 { db[o] += dy.scalars[(s * 12 + o) * 25 + p] } } }
                XCTAssertLessThan(relativeError(conv.bias!.gradient.scalars, db), 1e-5, label)
            }
        }
    }

    /// Cross-iteration BN's patch statistics through oneDNN (Σ y·patch from the layer's own
    /// backward-weights primitive with Y as the output gradient, Σ patch from the input's rows)
    /// against the per-sample definition: Σ_i patch_i and Σ_i y_{i,c}·patch_i, and the weight
    /// gradient computed beside them.
    func testOneDNNPatchStatisticsMatchThePerSampleDefinition() throws {
        for (c, o, h, kernel, stride, padding) in [(4, 6, 9, 3, 1, 1), (8, 16, 14, 3, 2, 1), (6, 5, 7, 1, 1, 0)] {
            let label = "\(c)→\(o) \(kernel)×\(kernel) stride \(stride)"
            var random = DeterministicRandom(seed: 700)
            let reference = Conv2d<Double>(inputChannels: c, outputChannels: o, kernelSize: kernel, stride: stride, padding: padding, bias: false, random: &random)
            let x = randomTensor([3, c, h, h], seed: 701)
            let conv = Conv2d<Float>(weight: reference.weight.value.converted(to: Float.self), bias: nil, stride: stride, padding: padding)
            conv.backend = .onednn
            conv.providesPatchStatistics = true
            let y = try conv.forward(x.converted(to: Float.self), mode: .training)
            let dy = randomTensor(y.shape, seed: 702)
            var received: (patchSum: [Double], products: [Double])?
            conv.patchStatisticsReceiver = { received = (Array($0), $1.values) }
            _ = try conv.backward(dy.converted(to: Float.self))
            let g = try reference.geometry(for: x.shape)
            let P = g.positions, K = g.patchSize
            _ = try reference.forward(x, mode: .training)
            let patches = reference.lastPatches!   // K × N·P, sample-major columns
            var patchSum = [Double](repeating: 0, count: K), products = [Double](repeating: 0, count: o * K)
            let yd = y.scalars.map(Double.init)
            for s in 0..<3 {
                for p in 0..<P {
                    for k in 0..<K {
                        let v = patches.values[k * 3 * P + s * P + p]
                        patchSum[k] += v
                        for co in 0..<o { products[co * K + k] += yd[(s * o + co) * P + p] * v }
                    }
                }
            }
            let r = try XCTUnwrap(received, label)
            XCTAssertLessThan(relativeError(r.patchSum, patchSum), 1e-6, "Σ patch, \(label)")
            XCTAssertLessThan(relativeError(r.products, products), 1e-5, "Σ y·patch, \(label)")
            let gradients = naiveConvolutionGradients(x, reference.weight.value, dy, stride: stride, padding: padding)
            XCTAssertLessThan(relativeError(conv.weight.gradient.scalars, gradients.dw), 1e-5, "weight gradient, \(label)")
        }
    }

    /// The weights reordered once for all chunks, and a unit of samples' dY, x and Y reordered
    /// once (a chunk of backward data's, or a leaf when the leaf is the larger) and read by
    /// backward data and every leaf as slices, give the bits of each call reordering its own
    /// arguments: output, input and weight gradients and cross-iteration BN's patch statistics, for leaves of 1, 2 and 4 samples, chunks of 1, 2 and 4, batches whose
    /// first and last chunks are partial, padded channels and ResNet shapes.
    func testSamplesReorderedOnceForSeveralCallsGiveTheCallsOwnBits() throws {
        for (index, (c, o, h, kernel, stride)) in [(1, 16, 12, 3, 1), (3, 5, 9, 3, 2), (16, 32, 14, 1, 2), (32, 32, 7, 3, 1)].enumerated() {
            var random = DeterministicRandom(seed: 740 + UInt64(index))
            let reference = Conv2d<Float>(inputChannels: c, outputChannels: o, kernelSize: kernel, stride: stride, padding: kernel / 2,
                                          bias: false, random: &random)
            // (leaf, chunk, statistics, first sample, samples): chunks of 4 from sample 2 are
            // 2–3, 4–7 (whole), 8–9 of 2…9.
            for (leaf, chunk, statistics, offset, batch) in [(1, 2, false, 2, 6), (1, 4, true, 2, 6), (2, 4, false, 2, 6), (2, 2, true, 2, 6),
                                                             (4, 2, true, 4, 8), (2, 1, false, 2, 6)] {
                let label = "\(c)→\(o) \(kernel)×\(kernel) stride \(stride), leaf \(leaf), chunk \(chunk), statistics \(statistics)"
                let x = randomTensor([batch, c, h, h], seed: 750 + UInt64(index)).converted(to: Float.self)
                var runs: [[[UInt64]]] = []
                for sharing in [false, true] {
                    let conv = Conv2d<Float>(weight: reference.weight.value, bias: nil, stride: stride, padding: kernel / 2)
                    conv.backend = .onednn
                    conv.oneDNNChunkOverride = chunk
                    conv.oneDNNChunkSharing = sharing
                    conv.weightGradientLeaf = leaf
                    conv.sampleOffset = offset
                    conv.providesPatchStatistics = statistics
                    let y = try conv.forward(x, mode: .training)
                    let dy = randomTensor(y.shape, seed: 760 + UInt64(index)).converted(to: Float.self)
                    var received: [Double] = []
                    if statistics { conv.patchStatisticsReceiver = { received = Array($0) + $1.values } }
                    let dx = try conv.backward(dy)
                    if sharing { XCTAssertGreaterThan(conv.oneDNNSharedChunks, 0, "no unit shared its reorders, \(label)") } else { XCTAssertEqual(conv.oneDNNSharedChunks, 0, label) }
                    XCTAssertEqual(received.isEmpty, !statistics, label)
                    runs.append([dx.scalars.map { UInt64($0.bitPattern) }, conv.weight.gradient.scalars.map { UInt64($0.bitPattern) },
                                 received.map(\.bitPattern), y.scalars.map { UInt64($0.bitPattern) }])
                }
                XCTAssertEqual(runs[1][3], runs[0][3], "output, \(label)")
                XCTAssertEqual(runs[1][0], runs[0][0], "input gradient, \(label)")
                XCTAssertEqual(runs[1][1], runs[0][1], "weight gradient, \(label)")
                XCTAssertEqual(runs[1][2], runs[0][2], "patch statistics, \(label)")
            }
        }
    }

    /// The gather of a Double sum in oneDNN's blocked weight layout, in ranges that cut rows and
    /// channels anywhere, gives the reorder's values (a reorder only moves values: a Float leaf
    /// widened and gathered equals the leaf reordered and widened), for padded layouts (3 input
    /// channels, 6 and 5 output channels) and ResNet-18's largest weight.
    func testGatheringFromTheBlockedWeightLayoutIsItsReorder() throws {
        var blockedShapes = 0
        for (c, o, h, kernel, stride) in [(3, 64, 8, 3, 1), (6, 5, 7, 1, 1), (64, 128, 8, 1, 2), (512, 512, 4, 3, 1)] {
            let label = "\(c)→\(o) \(kernel)×\(kernel)"
            let padding = kernel / 2
            let primitive = try OneDNNConvolution(.init(minibatch: 0, inputChannels: c, height: h, width: h, outputChannels: o, kernelSize: kernel,
                                                        stride: stride, padding: padding, weightsMinibatch: 2, weightsOutputChannels: o))
            let blockedCount = primitive.blockedWeightGradientCount
            guard blockedCount > 0 else { continue }   // oneDNN computes this one in the plain layout
            blockedShapes += 1
            let out = (h + 2 * padding - kernel) / stride + 1
            let x = randomTensor([2, c, h, h], seed: 710).converted(to: Float.self).scalars
            let dy = randomTensor([2, o, out, out], seed: 711).converted(to: Float.self).scalars
            var leaf = [Float](repeating: 0, count: blockedCount), plain = [Float](repeating: 0, count: o * c * kernel * kernel)
            leaf.withUnsafeMutableBufferPointer { l in primitive.backwardWeightsBlocked(x: x, dy: dy, into: l.baseAddress!) }
            plain.withUnsafeMutableBufferPointer { primitive.weightGradientToPlain(leaf, into: $0.baseAddress!) }
            let widened = leaf.map(Double.init)
            var gathered = [Double](repeating: .nan, count: plain.count)
            var start = 0, piece = 1
            widened.withUnsafeBufferPointer { b in
                gathered.withUnsafeMutableBufferPointer { g in
                    while start < plain.count {
                        let end = min(start + piece, plain.count)
                        primitive.gatherWeightGradient(b.baseAddress!, range: start..<end, into: g.baseAddress! + start)
                        start = end
                        piece = piece * 3 + 1
                    }
                }
            }
            let differing = zip(gathered, plain).filter { $0.bitPattern != Double($1).bitPattern }.count
            XCTAssertEqual(differing, 0, "values of \(plain.count) gathered with other bits, \(label)")
        }
        XCTAssertGreaterThan(blockedShapes, 0, "oneDNN chose a blocked weight layout for none of the shapes")
    }

    /// oneDNN's blocked copies of arguments and its scratchpads live in one workspace per thread
    /// that every primitive shares: layers of different shapes run in turn (one with padded
    /// channels in its blocked layout) give the bits each gives alone.
    func testPrimitivesSharingTheWorkspaceGiveTheirOwnResults() throws {
        var random = DeterministicRandom(seed: 720)
        let convs = [(3, 16, 12), (32, 64, 6), (5, 7, 9)].map { c, o, h in
            (Conv2d<Float>(inputChannels: c, outputChannels: o, kernelSize: 3, stride: 1, padding: 1, bias: false, random: &random),
             randomTensor([4, c, h, h], seed: UInt64(721 + c)).converted(to: Float.self))
        }
        func run(_ conv: Conv2d<Float>, _ x: Tensor<Float>) throws -> [[UInt32]] {
            conv.backend = .onednn
            let y = try conv.forward(x, mode: .training)
            let dx = try conv.backward(y)
            return [y.scalars, dx.scalars, conv.weight.gradient.scalars].map { $0.map(\.bitPattern) }
        }
        let alone = try convs.map { try run($0.0, $0.1) }
        for round in 0..<2 {
            for (i, (conv, x)) in convs.enumerated().reversed() {
                XCTAssertEqual(try run(conv, x), alone[i], "layer \(i), round \(round)")
            }
        }
    }

    /// Weight-gradient leaves of L samples (one GEMM over L·P columns, or one oneDNN call at
    /// minibatch L) give the definition's dW with either backend, for leaves inside an im2col chunk
    /// and leaves spanning several (a big layer's chunk holds fewer samples than a leaf), with
    /// and without cross-iteration BN's patch statistics; dx does not depend on L at all; and a
    /// batch not aligned to L is refused, not summed in another order.
    func testWeightGradientLeavesMatchTheDefinitionWithEitherBackend() throws {
        for (c, o, h) in [(4, 6, 9), (128, 32, 4)] {
            var random = DeterministicRandom(seed: 800)
            let reference = Conv2d<Double>(inputChannels: c, outputChannels: o, kernelSize: 3, stride: 1, padding: 1, bias: false, random: &random)
            let x = randomTensor([8, c, h, h], seed: 801), dy = randomTensor([8, o, h, h], seed: 802)
            let gradients = naiveConvolutionGradients(x, reference.weight.value, dy, stride: 1, padding: 1)
            let chunk = try reference.chunkSize(reference.geometry(for: x.shape))
            for backend in ConvolutionBackend.allCases {
                var perSample: (dx: [Float], dw: [Float], patches: [Double])?
                for leaf in [1, 2, 4, 8] {
                    let label = "\(c)→\(o) @\(h)×\(h) (im2col chunk \(chunk)), \(backend), leaf \(leaf)"
                    let conv = Conv2d<Float>(weight: reference.weight.value.converted(to: Float.self), bias: nil, stride: 1, padding: 1)
                    conv.backend = backend
                    conv.weightGradientLeaf = leaf
                    conv.providesPatchStatistics = true
                    conv.sampleOffset = 16
                    _ = try conv.forward(x.converted(to: Float.self), mode: .training)
                    var patches: [Double] = []
                    conv.patchStatisticsReceiver = { patches = Array($0) + $1.values }
                    let dx = try conv.backward(dy.converted(to: Float.self))
                    XCTAssertLessThan(relativeError(conv.weight.gradient.scalars, gradients.dw), 1e-5, "fused dW, \(label)")
                    // Without the patch statistics (the plain weight-gradient path).
                    _ = try conv.forward(x.converted(to: Float.self), mode: .training)
                    _ = try conv.backward(dy.converted(to: Float.self))
                    XCTAssertLessThan(relativeError(conv.weight.gradient.scalars, gradients.dw), 1e-5, "dW, \(label)")
                    // The sum the contract makes (not its bits, which depend on the kernels): one leaf per L samples.
                    XCTAssertEqual(conv.lastWeightGradientLeaves, 8 / leaf, "leaves summed, \(label)")
                    if let perSample {
                        XCTAssertEqual(dx.scalars, perSample.dx, "dx does not depend on the leaf, \(label)")
                        XCTAssertLessThan(relativeError(patches, perSample.patches), 1e-5, "patch statistics against leaves of 1, \(label)")
                    } else {
                        perSample = (dx.scalars, conv.weight.gradient.scalars, patches)
                    }
                }
            }
            // Double (im2col) to the definition's precision.
            let double = Conv2d<Double>(weight: reference.weight.value, bias: nil, stride: 1, padding: 1)
            double.weightGradientLeaf = 4
            double.sampleOffset = 4
            _ = try double.forward(x, mode: .training)
            _ = try double.backward(dy)
            XCTAssertLessThan(relativeError(double.weight.gradient.scalars, gradients.dw), 1e-12, "Double, leaf 4, \(c)→\(o)")
            // A batch that starts inside a leaf.
            double.sampleOffset = 2
            _ = try double.forward(x, mode: .training)
            XCTAssertThrowsError(try double.backward(dy)) { XCTAssertTrue("\($0)".contains("weight-gradient leaves of 4 samples"), "\($0)") }
        }
    }

    /// Σ of each im2col row over positions and samples, from the input's rows, against the
    /// definition (every patch element read directly, padding zero): 1×1, 3×3 and 5×5, strides 1 to
    /// 3, odd and even sizes, images smaller than the kernel, one sample and several.
    func testPatchSumsMatchTheDefinition() {
        for (c, h, w, k, stride, padding, n) in [(3, 7, 5, 3, 1, 1, 2), (2, 9, 9, 3, 2, 1, 3), (4, 6, 6, 1, 1, 0, 1),
                                                 (2, 8, 7, 1, 2, 0, 2), (1, 5, 6, 3, 2, 0, 1), (2, 4, 4, 5, 1, 2, 2),
                                                 (2, 3, 3, 5, 1, 2, 1), (1, 7, 7, 5, 2, 1, 2), (2, 5, 5, 3, 3, 1, 1), (1, 3, 9, 3, 1, 0, 1),
                                                 (1, 3, 3, 5, 2, 1, 1), (1, 4, 3, 5, 2, 1, 2)] {
            let g = ConvolutionGeometry(inputChannels: c, height: h, width: w, kernelHeight: k, kernelWidth: k, stride: stride, padding: padding)
            var random = DeterministicRandom(seed: 900)
            let x = (0..<(n * c * h * w)).map { _ in Float(random.normal()) }
            var expected = [Double](repeating: 0, count: g.patchSize)
            for i in 0..<n {
                for ci in 0..<c {
                    for a in 0..<k {
                        for b in 0..<k {
                            for oh in 0..<g.outputHeight {
                                for ow in 0..<g.outputWidth {
                                    let r = oh * stride - padding + a, q = ow * stride - padding + b
                                    if r >= 0 && r < h && q >= 0 && q < w { expected[(ci * k + a) * k + b] += Double(x[((i * c + ci) * h + r) * w + q]) }
                                }
                            }
                        }
                    }
                }
            }
            let plan = PatchSumPlan(g)
            var sums = [Double](repeating: .nan, count: g.patchSize), scratch = [Double](repeating: .nan, count: plan.scratchCount)
            x.withUnsafeBufferPointer { xp in
                sums.withUnsafeMutableBufferPointer { sp in
                    scratch.withUnsafeMutableBufferPointer { plan.sums(xp.baseAddress!, samples: n, into: sp.baseAddress!, scratch: $0.baseAddress!) }
                }
            }
            XCTAssertLessThan(relativeError(sums, expected), 1e-12, "\(n)×\(c)×\(h)×\(w), \(k)×\(k) stride \(stride) pad \(padding)")
        }
    }
}
