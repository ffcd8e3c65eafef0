import Collectives
import Kernels
import Normalization
import TestSupport
import XCTest

/// Presents a convolution's patches with a weight of its own choosing, so that a test can hold
/// the compensation target fixed while it perturbs the real weight.
final class FrozenWeightSource: PatchSource {
    let conv: Conv2d<Double>
    let patchWeight: Parameter<Double>
    init(_ conv: Conv2d<Double>) {
        self.conv = conv
        patchWeight = Parameter(conv.weight.value)
    }
    var lastPatches: PatchMatrix<Double>? { conv.lastPatches }
}

/// conv → CBN as one layer whose every forward starts from the same window and running
/// statistics: what a finite-difference check of one iteration needs.
final class ConvCBNPair: Layer {
    let conv: Conv2d<Double>
    let cbn: CrossIterationBatchNorm<Double>
    private var snapshot: [String: [Double]] = [:]

    init(conv: Conv2d<Double>, cbn: CrossIterationBatchNorm<Double>) {
        self.conv = conv
        self.cbn = cbn
        for entry in cbn.state {
            switch entry {
            case let .buffer(name, b): snapshot[name] = b.value.scalars
            case let .rankLocal(name, r): snapshot[name] = r.values
            default: break
            }
        }
    }

    var state: [StateEntry<Double>] { conv.state + cbn.state.filter { if case .parameter = $0 { return true } else { return false } } }

    func forward(_ input: Tensor<Double>, mode: Mode) throws -> Tensor<Double> {
        for entry in cbn.state {
            switch entry {
            case let .buffer(name, b): b.value.scalars = snapshot[name]!
            case let .rankLocal(name, r): r.values = snapshot[name]!
            default: break
            }
        }
        return try cbn.forward(try conv.forward(input, mode: mode), mode: mode)
    }

    func backward(_ outputGradient: Tensor<Double>) throws -> Tensor<Double> {
        let dx = try conv.backward(try cbn.backward(outputGradient))
        conv.weight.applyPendingGradient()   // what the trainer does after the gradient exchange
        return dx
    }
}

final class CrossIterationBatchNormTests: XCTestCase {
    /// One training iteration of conv → CBN, backward included: a convolution source hands CBN
    /// the window entry's derivatives from its backward GEMM.
    @discardableResult
    func iterate(_ conv: Conv2d<Double>, _ cbn: CrossIterationBatchNorm<Double>, _ input: Tensor<Double>, seed: UInt64 = 99) throws -> Tensor<Double> {
        let y = try cbn.forward(try conv.forward(input, mode: .training), mode: .training)
        _ = try conv.backward(try cbn.backward(randomTensor(y.shape, seed: seed)))
        conv.weight.applyPendingGradient()
        return y
    }

    func makeConv(seed: UInt64 = 1, channels: Int = 3) -> Conv2d<Double> {
        var random = DeterministicRandom(seed: seed)
        return Conv2d<Double>(inputChannels: 2, outputChannels: channels, kernelSize: 3, padding: 1, bias: false, random: &random)
    }

    func perturb(_ conv: Conv2d<Double>, by scale: Double, seed: UInt64) {
        let direction = randomTensor(conv.weight.value.shape, seed: seed)
        for i in 0..<conv.weight.value.count { conv.weight.value.scalars[i] += scale * direction.scalars[i] }
    }

    func testTrainingStepsSettleOnTheScratchPool() throws {
        // θ_t, the derivative trees and their totals are lent for a step and given back: once the
        // window is full, a step allocates none of them again.
        for gradient in [CrossIterationGradient.current, .compensated] {
            Double.scratchArrays.releaseFree()
            let conv = makeConv(seed: 5, channels: 4)
            let cbn = CrossIterationBatchNorm<Double>(featureCount: 4, source: conv, window: 3, gradient: gradient)
            var settled: (allocations: Int, held: Int)?
            for step in 0..<7 {
                try iterate(conv, cbn, randomTensor([4, 2, 5, 5], seed: UInt64(60 + step), mean: 0.5), seed: UInt64(80 + step))
                let now = (Double.scratchArrays.allocations, Double.scratchArrays.freeCount)
                if step >= 4, let settled { XCTAssertTrue(now == settled, "\(gradient), step \(step): \(now) after \(settled)") }
                if step >= 3 { settled = now }
            }
            XCTAssertEqual(cbn.entries.count, 2)
            XCTAssertGreaterThanOrEqual(settled!.held, 4 * 18, "\(gradient): θ_t and the trees come from the pool")
        }
    }

    func testABackwardWhoseWindowWasReplacedSinceItsForwardIsAnError() throws {
        // Backward reads the past entries' derivatives from the stored window: a window loaded
        // between a training forward and its backward must not give a silently wrong gradient.
        let conv = makeConv(seed: 7)
        let cbn = CrossIterationBatchNorm<Double>(featureCount: 3, source: conv, window: 3, gradient: .compensated)
        for step in 0..<3 { try iterate(conv, cbn, randomTensor([3, 2, 4, 4], seed: UInt64(90 + step), mean: 0.5)) }
        var window: RankLocalState?
        for case let .rankLocal(_, r) in cbn.state { window = r }
        let earlier = window!.values
        try iterate(conv, cbn, randomTensor([3, 2, 4, 4], seed: 94, mean: 0.5))
        let y = try cbn.forward(try conv.forward(randomTensor([3, 2, 4, 4], seed: 95, mean: 0.5), mode: .training), mode: .training)
        window!.values = earlier
        XCTAssertThrowsError(try cbn.backward(randomTensor(y.shape, seed: 96))) { error in
            XCTAssertTrue("\(error)".contains("window changed"), "\(error)")
        }
    }

    func testGradientsThroughConvAndCBNMatchFiniteDifferencesWithPastEntriesConstant() throws {
        let conv = makeConv()
        let source = FrozenWeightSource(conv)
        let cbn = CrossIterationBatchNorm<Double>(featureCount: 3, source: source, window: 4)
        cbn.weight.value.scalars = [1.2, 0.8, -0.5]
        cbn.bias.value.scalars = [0.1, 0.2, 0.3]
        // Three past iterations with different batches and weights fill the window.
        for step in 0..<3 {
            perturb(conv, by: 0.05, seed: UInt64(100 + step))
            source.patchWeight.value = conv.weight.value
            _ = try cbn.forward(try conv.forward(randomTensor([3, 2, 4, 4], seed: UInt64(10 + step), mean: 0.5), mode: .training), mode: .training)
        }
        XCTAssertEqual(cbn.entries.count, 3)
        perturb(conv, by: 0.05, seed: 200)
        source.patchWeight.value = conv.weight.value
        try checkGradients(of: ConvCBNPair(conv: conv, cbn: cbn), input: randomTensor([2, 2, 4, 4], seed: 20, mean: 0.3), tolerance: 1e-6)
    }

    /// conv → CBN with the conv itself as the source: perturbing the weight moves the Taylor
    /// target too, so finite differences see the compensation's dependence on θ_t.
    func makeFilledCompensatedPair(gradient: CrossIterationGradient, rho: Double = 1) throws -> ConvCBNPair {
        let conv = makeConv(seed: 3)
        let cbn = CrossIterationBatchNorm<Double>(featureCount: 3, source: conv, window: 4, rho: rho, gradient: gradient)
        cbn.weight.value.scalars = [1.2, 0.8, -0.5]
        cbn.bias.value.scalars = [0.1, 0.2, 0.3]
        for step in 0..<3 {
            perturb(conv, by: 0.3, seed: UInt64(300 + step))
            try iterate(conv, cbn, randomTensor([3, 2, 4, 4], seed: UInt64(30 + step), mean: 0.5))
        }
        XCTAssertEqual(cbn.entries.count, 3)
        perturb(conv, by: 0.3, seed: 400)
        return ConvCBNPair(conv: conv, cbn: cbn)
    }

    func testCompensatedGradientMatchesFiniteDifferencesThroughTheTaylorTerm() throws {
        for rho in [1.0, 0.6] {
            try checkGradients(of: try makeFilledCompensatedPair(gradient: .compensated, rho: rho),
                               input: randomTensor([2, 2, 4, 4], seed: 40, mean: 0.3), tolerance: 1e-6)
        }
    }

    func testCurrentGradientOmitsTheTaylorTermsDependenceOnTheWeight() throws {
        // The same finite differences disagree with the reference behaviour's weight gradient: the
        // check above would fail for it, and the two modes differ by the compensation term only.
        let input = randomTensor([2, 2, 4, 4], seed: 40, mean: 0.3)
        var gradients: [CrossIterationGradient: (dx: [Double], dw: [Double])] = [:]
        for mode in CrossIterationGradient.allCases {
            let pair = try makeFilledCompensatedPair(gradient: mode)
            let y = try pair.forward(input, mode: .training)
            let dx = try pair.backward(randomTensor(y.shape, seed: 7))
            gradients[mode] = (dx.scalars, pair.conv.weight.gradient.scalars)
        }
        let current = gradients[.current]!, compensated = gradients[.compensated]!
        let difference = zip(current.dw, compensated.dw).map { abs($0 - $1) }.max()!
        let scale = compensated.dw.map(abs).max()!
        XCTAssertGreaterThan(difference, 1e-3 * scale, "the compensation term must change the weight gradient")
        assertClose(current.dx, compensated.dx, relTol: 1e-12, absTol: 1e-14, "input gradients do not depend on the mode")
    }

    func testWithUnchangedWeightsTheLayerIsBatchNormOverTheUnionOfTheWindow() throws {
        let conv = makeConv(seed: 2)
        let cbn = CrossIterationBatchNorm<Double>(featureCount: 3, source: conv, window: 4)
        var outputs: [Tensor<Double>] = []
        var y = Tensor<Double>(shape: [0])
        for step in 0..<4 {
            let x = try conv.forward(randomTensor([2, 2, 3, 3], seed: UInt64(30 + step), mean: Double(step)), mode: .training)
            outputs.append(x)
            if step == 3 {
                for entry in cbn.entries {
                    let (sum, squares) = CrossIterationBatchNorm<Double>.compensate(entry, to: conv.weight.value.scalars, rho: 1)
                    XCTAssertEqual(sum, entry.sum, "θ unchanged: compensation is the identity")
                    XCTAssertEqual(squares, entry.sumOfSquares)
                }
            }
            y = try cbn.forward(x, mode: .training)
            _ = try conv.backward(try cbn.backward(randomTensor(y.shape, seed: 7)))
        }
        let union = Tensor.concatenate(outputs, sampleShape: [3, 3, 3])
        let (mean, variance) = referenceStatistics(union.scalars, shape: union.shape)
        let expected = referenceForward(outputs[3].scalars, shape: outputs[3].shape, mean: mean, variance: variance,
                                        gamma: [1, 1, 1], beta: [0, 0, 0])
        assertClose(y.scalars, expected, relTol: 1e-9, absTol: 1e-10)
        // The running statistics follow the current batch only.
        assertClose(cbn.lastStatistics!.mean, referenceStatistics(outputs[3].scalars, shape: outputs[3].shape).mean, relTol: 1e-12)
    }

    func testMeanCompensationIsExactAndSecondMomentErrorShrinksQuadratically() throws {
        let conv = makeConv(seed: 3)
        let cbn = CrossIterationBatchNorm<Double>(featureCount: 3, source: conv, window: 2)
        let batch = randomTensor([3, 2, 5, 5], seed: 40, mean: 0.7)
        try iterate(conv, cbn, batch)
        let entry = cbn.entries[0]
        let original = conv.weight.value
        var errors: [Double] = []
        for epsilon in [1e-1, 5e-2, 2.5e-2] {
            conv.weight.value = original
            perturb(conv, by: epsilon, seed: 41)
            let (sum, squares) = CrossIterationBatchNorm<Double>.compensate(entry, to: conv.weight.value.scalars, rho: 1)
            // Recompute the past batch with the current weights.
            let recomputed = try conv.forward(batch, mode: .inference)
            let layout = ChannelLayout(shape: recomputed.shape)!
            let exact = BatchStatistics.localSums(recomputed, layout: layout, shift: [0, 0, 0])
            assertClose(sum, Array(exact[1...3]), relTol: 1e-10, absTol: 1e-10, "mean compensation is exact (μ is linear in θ)")
            errors.append(zip(squares, exact[4...]).map { abs($0 - $1) }.max()!)
        }
        XCTAssertGreaterThan(errors[0], 1e-8, "the second moment is not linear in θ")
        for i in 1..<errors.count {
            let ratio = errors[i - 1] / errors[i]
            XCTAssertEqual(ratio, 4, accuracy: 0.05, "halving Δθ quarters the E[x²] error (\(errors))")
        }
    }

    /// The window entry's derivatives, computed for the whole batch at once, against the
    /// per-sample, per-position definition ∂S1_c/∂θ_c = Σ_{n,p} patch_{n,p} and
    /// ∂S2_c/∂θ_c = 2·Σ_{n,p} x_{n,c,p}·patch_{n,p}: from a convolution's backward GEMM (a strided
    /// conv with odd sizes and a pointwise one; also when the CBN arrived after the conv's forward,
    /// so the conv's output is recomputed), from CBN's own GEMM in forward (the same convs behind
    /// a source that is not a Conv2d), and for a linear layer.
    func testBatchedWindowDerivativesEqualThePerSampleDefinition() throws {
        func check(_ layer: some Layer<Double>, source: any PatchSource<Double>, input: Tensor<Double>, patch: (Int, Int) -> [Double],
                   createdAfterForward: Bool = false, _ what: String) throws {
            let channels = source.patchWeight.value.shape[0]
            var cbn = createdAfterForward ? nil : CrossIterationBatchNorm<Double>(featureCount: channels, source: source, window: 2)
            let x = try layer.forward(input, mode: .training)
            let C = x.shape[1], N = x.shape[0], P = x.shape.dropFirst(2).reduce(1, *)
            if cbn == nil { cbn = CrossIterationBatchNorm<Double>(featureCount: channels, source: source, window: 2) }
            let y = try cbn!.forward(x, mode: .training)
            _ = try layer.backward(try cbn!.backward(randomTensor(y.shape, seed: 94)))
            let entry = cbn!.entries[0]
            let K = entry.sumGradient.count
            var sumGradient = [Double](repeating: 0, count: K), squaresGradient = [Double](repeating: 0, count: C * K)
            for n in 0..<N {
                for p in 0..<P {
                    let row = patch(n, p)
                    for k in 0..<K {
                        sumGradient[k] += row[k]
                        for c in 0..<C { squaresGradient[c * K + k] += 2 * x.scalars[(n * C + c) * P + p] * row[k] }
                    }
                }
            }
            assertClose(entry.sumGradient, sumGradient, relTol: 1e-12, absTol: 1e-12, "∂S1/∂θ, \(what)")
            assertClose(entry.sumOfSquaresGradient, squaresGradient, relTol: 1e-12, absTol: 1e-12, "∂S2/∂θ, \(what)")
        }
        for (kernel, stride, padding) in [(3, 2, 1), (1, 1, 0)] {
            let input = randomTensor([3, 2, 7, 5], seed: 91, mean: 0.4)
            let OW = (5 + 2 * padding - kernel) / stride + 1
            func patch(_ n: Int, _ p: Int) -> [Double] {
                let (i, j) = (p / OW, p % OW)
                var row: [Double] = []
                for c in 0..<2 { for u in 0..<kernel { for v in 0..<kernel {
                    let yy = i * stride - padding + u, xx = j * stride - padding + v
                    row.append(yy >= 0 && yy < 7 && xx >= 0 && xx < 5 ? input.scalars[((n * 2 + c) * 7 + yy) * 5 + xx] : 0)
                } } }
                return row
            }
            for (fused, late) in [(true, false), (true, true), (false, false)] {
                var random = DeterministicRandom(seed: 90)
                let conv = Conv2d<Double>(inputChannels: 2, outputChannels: 3, kernelSize: kernel, stride: stride, padding: padding, bias: false, random: &random)
                try check(conv, source: fused ? conv : FrozenWeightSource(conv), input: input, patch: patch, createdAfterForward: late,
                          "conv \(kernel)×\(kernel) stride \(stride), \(fused ? "from the conv's backward" : "in forward")\(late ? ", output recomputed" : "")")
            }
        }
        var random = DeterministicRandom(seed: 92)
        let linear = Linear<Double>(inputFeatures: 5, outputFeatures: 4, bias: false, random: &random)
        let features = randomTensor([6, 5], seed: 93, mean: 0.3)
        try check(linear, source: linear, input: features, patch: { n, _ in Array(features.scalars[(n * 5)..<(n * 5 + 5)]) }, "linear")
    }

    /// A window stored with θ_τ in each entry (the layout before L and Q replaced it) is read,
    /// L and Q computed from that θ_τ: the same entries as the window that was never stored, and
    /// written back in the current layout.
    func testAWindowStoredWithThetaInsteadOfItsProjectionsIsRead() throws {
        let conv = makeConv(seed: 8)
        let cbn = CrossIterationBatchNorm<Double>(featureCount: 3, source: conv, window: 4, gradient: .compensated)
        var weights: [[Double]] = []
        for step in 0..<3 {
            perturb(conv, by: 0.2, seed: UInt64(500 + step))
            weights.insert(conv.weight.value.scalars, at: 0)   // most recent first, as the window
            try iterate(conv, cbn, randomTensor([3, 2, 4, 4], seed: UInt64(510 + step), mean: 0.5))
        }
        let entries = cbn.entries, K = entries[0].sumGradient.count
        XCTAssertEqual(entries.count, 3)
        var legacy = [Double(cbn.iterations), 3]
        for (entry, theta) in zip(entries, weights) {
            legacy += [entry.count] + entry.sum + entry.sumOfSquares + entry.sumGradient + entry.sumOfSquaresGradient + theta
        }
        let restored = CrossIterationBatchNorm<Double>(featureCount: 3, source: makeConv(seed: 9), window: 4)
        var window: RankLocalState?
        for case let .rankLocal(_, r) in restored.state { window = r }
        XCTAssertNil(window!.validate(legacy))
        XCTAssertNotNil(window!.validate(Array(legacy.dropLast())), "a length that fits neither layout")
        window!.values = legacy
        XCTAssertEqual(restored.iterations, 3)
        XCTAssertEqual(restored.entries, entries)
        XCTAssertEqual(window!.values.count, 2 + 3 * (1 + 4 * 3 + K + 3 * K))
        for case let .rankLocal(_, r) in cbn.state { XCTAssertEqual(window!.values, r.values) }
    }

    /// A Float model's window keeps the derivatives as Floats: each is the Double sum over the
    /// batch rounded once, within Float's rounding of the Double model's definition.
    func testAFloatModelKeepsItsWindowDerivativesAsFloats() throws {
        var random = DeterministicRandom(seed: 12)
        let conv = Conv2d<Float>(inputChannels: 2, outputChannels: 3, kernelSize: 3, padding: 1, bias: false, random: &random)
        let reference = Conv2d<Double>(inputChannels: 2, outputChannels: 3, kernelSize: 3, padding: 1, bias: false, random: &random)
        reference.weight.value.scalars = conv.weight.value.scalars.map(Double.init)
        let input = randomTensor([3, 2, 5, 5], seed: 13, mean: 0.4)
        func entry<S: BatchNormScalar>(_ conv: Conv2d<S>, _ x: Tensor<S>) throws -> CrossIterationBatchNorm<S>.WindowEntry {
            let cbn = CrossIterationBatchNorm<S>(featureCount: 3, source: conv, window: 2)
            let y = try cbn.forward(try conv.forward(x, mode: .training), mode: .training)
            _ = try conv.backward(try cbn.backward(y))
            return cbn.entries[0]
        }
        let single = try entry(conv, Tensor<Float>(shape: input.shape, scalars: input.scalars.map(Float.init)))
        let double = try entry(reference, Tensor<Double>(shape: input.shape, scalars: input.scalars.map { Double(Float($0)) }))
        for v in single.sumGradient + single.sumOfSquaresGradient { XCTAssertEqual(Double(Float(v)), v, "a Float value") }
        assertClose(single.sumOfSquaresGradient, double.sumOfSquaresGradient, relTol: 1e-5, absTol: 1e-5)
        assertClose(single.sumGradient, double.sumGradient, relTol: 1e-6, absTol: 1e-6)
        assertClose(single.sumOfSquaresAtWeight, double.sumOfSquaresAtWeight, relTol: 1e-5, absTol: 1e-5)
    }

    /// With a convolution source the newest entry's derivatives arrive with the conv's backward;
    /// an iteration whose backward never ran does not enter the window.
    func testATrainingForwardWithoutBackwardStaysOutOfTheWindow() throws {
        let conv = makeConv(seed: 6)
        let cbn = CrossIterationBatchNorm<Double>(featureCount: 3, source: conv, window: 3)
        try iterate(conv, cbn, randomTensor([2, 2, 4, 4], seed: 95, mean: 0.2))
        XCTAssertEqual(cbn.entries.count, 1)
        let kept = cbn.entries[0]
        XCTAssertFalse(kept.sumGradient.allSatisfy { $0 == 0 }, "the derivatives arrived")
        _ = try cbn.forward(try conv.forward(randomTensor([2, 2, 4, 4], seed: 96, mean: 0.2), mode: .training), mode: .training)
        XCTAssertEqual(cbn.entries, [kept], "no backward: the new iteration is not a window entry")
        try iterate(conv, cbn, randomTensor([2, 2, 4, 4], seed: 97, mean: 0.2))
        XCTAssertEqual(cbn.entries.count, 2)
        XCTAssertEqual(cbn.entries[1], kept)
    }

    func testNegativeCompensatedVarianceDropsTheEntry() throws {
        // A huge weight change makes the linear compensation of S2 overshoot below S1²/m.
        let conv = makeConv(seed: 4, channels: 2)
        let cbn = CrossIterationBatchNorm<Double>(featureCount: 2, source: conv, window: 2)
        try iterate(conv, cbn, randomTensor([2, 2, 3, 3], seed: 50, mean: 2))
        for i in 0..<conv.weight.value.count { conv.weight.value.scalars[i] *= -3 }
        let past = cbn.entries[0]
        let x = try conv.forward(randomTensor([2, 2, 3, 3], seed: 51, mean: 2), mode: .training)
        let y = try cbn.forward(x, mode: .training)
        let (sum, squares) = CrossIterationBatchNorm<Double>.compensate(past, to: conv.weight.value.scalars, rho: 1)
        let (mean, variance) = referenceStatistics(x.scalars, shape: x.shape)
        for c in 0..<2 {
            let mu = sum[c] / past.count, nu = squares[c] / past.count
            let kept = nu - mu * mu >= 0
            let expectedMean = kept ? (mean[c] + mu) / 2 : mean[c]
            let expectedSecond = kept ? (variance[c] + mean[c] * mean[c] + nu) / 2 : variance[c] + mean[c] * mean[c]
            let expectedVariance = expectedSecond - expectedMean * expectedMean
            let spatial = 9
            for n in 0..<2 {
                for p in 0..<spatial {
                    let i = (n * 2 + c) * spatial + p
                    XCTAssertEqual(y.scalars[i], (x.scalars[i] - expectedMean) / (expectedVariance + 1e-5).squareRoot(), accuracy: 1e-9)
                }
            }
        }
        XCTAssertTrue((0..<2).contains { c in squares[c] / past.count - pow(sum[c] / past.count, 2) < 0 }, "the test must exercise the mask")
    }

    func testOneCollectivePerForwardAndBackwardWithAFullWindow() throws {
        let counts = try InProcessGroup.run(size: 2) { base -> [Int] in
            let comm = InstrumentedCommunicator(base)
            let conv = self.makeConv(seed: 5)
            let cbn = CrossIterationBatchNorm<Double>(featureCount: 3, source: conv, window: 3, group: comm)
            var perStep: [Int] = []
            for step in 0..<4 {
                comm.ledger.reset()
                let y = try cbn.forward(try conv.forward(randomTensor([2, 2, 3, 3], seed: UInt64(60 + step + 10 * comm.rank)), mode: .training), mode: .training)
                _ = try cbn.backward(y)
                perStep.append(comm.ledger.totalCollectives)
            }
            return perStep
        }
        XCTAssertEqual(counts, [[2, 2, 2, 2], [2, 2, 2, 2]])
    }

    func testSyncedCBNOverRanksEqualsOneRankOnTheConcatenatedBatches() throws {
        // Three iterations; each rank holds part of every batch, weights change between steps.
        let sizes = [2, 0, 3]
        func batches(_ step: Int) -> Tensor<Double> { randomTensor([5, 2, 3, 3], seed: UInt64(70 + step), mean: 0.2 * Double(step)) }
        // Input gradients and conv weight gradients (summed over ranks, as the gradient exchange
        // does, and then the compensation term, the same on every rank, added once).
        func run(_ x: Tensor<Double>, conv: Conv2d<Double>, cbn: CrossIterationBatchNorm<Double>, step: Int) throws -> (dx: [Double], dw: [Double], pending: [Double]) {
            conv.weight.value = makeConv(seed: UInt64(80 + step)).weight.value
            let y = try cbn.forward(try conv.forward(x, mode: .training), mode: .training)
            let dx = try conv.backward(try cbn.backward(y)).scalars
            defer { conv.weight.pendingGradient = nil }
            return (dx, conv.weight.gradient.scalars, conv.weight.pendingGradient ?? [Double](repeating: 0, count: conv.weight.value.count))
        }
        for mode in CrossIterationGradient.allCases {
            let single = try { () -> [(dx: [Double], dw: [Double], pending: [Double])] in
                let conv = makeConv()
                let cbn = CrossIterationBatchNorm<Double>(featureCount: 3, source: conv, window: 3, rho: 0.7, gradient: mode)
                return try (0..<3).map { try run(batches($0), conv: conv, cbn: cbn, step: $0) }
            }()
            let ranks = try InProcessGroup.run(size: 3) { comm -> [(dx: [Double], dw: [Double], pending: [Double])] in
                let conv = self.makeConv()
                let cbn = CrossIterationBatchNorm<Double>(featureCount: 3, source: conv, window: 3, rho: 0.7, gradient: mode, group: comm)
                let start = sizes[..<comm.rank].reduce(0, +)
                return try (0..<3).map { try run(batches($0).slice(samples: start..<(start + sizes[comm.rank])), conv: conv, cbn: cbn, step: $0) }
            }
            for step in 0..<3 {
                assertClose(ranks.map { $0[step].dx }.flatMap { $0 }, single[step].dx, relTol: 1e-9, absTol: 1e-12, "\(mode) step \(step) input gradients")
                let summed = (0..<single[step].dw.count).map { i in ranks.map { $0[step].dw[i] }.reduce(0, +) + ranks[0][step].pending[i] }
                assertClose(summed, zip(single[step].dw, single[step].pending).map { $0 + $1 }, relTol: 1e-9, absTol: 1e-12, "\(mode) step \(step) weight gradients")
                for rank in 1..<3 { XCTAssertEqual(ranks[rank][step].pending, ranks[0][step].pending, "\(mode): the compensation term is the same on every rank") }
            }
        }
    }
}
