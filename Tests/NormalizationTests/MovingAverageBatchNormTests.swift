import Collectives
import Kernels
import Normalization
import TestSupport
import XCTest

/// Moving Average BN against the reference layer's semantics (megvii-model/MABN `MABN2d`, in
/// float64 on Float32 inputs: Fixtures/mabn, whose README names the iteration rules it pins),
/// finite differences where its backward is an exact gradient, and its behaviour over ranks.
final class MovingAverageBatchNormTests: XCTestCase {
    struct Settings: Decodable {
        let T: Int, C: Int, window: Int, warmup_iters: Int, r_hold: Int, eps: Double, momentum: Double
    }

    func fixture(_ name: String) throws -> NumpyArray {
        try NumpyArray(contentsOf: fixturesDirectory() + "/mabn/\(name).npy")
    }

    func checkReference<T: BatchNormScalar>(as _: T.Type, tolerance: Double) throws {
        let settings = try JSONDecoder().decode(Settings.self, from: Data(contentsOf: URL(fileURLWithPath: fixturesDirectory() + "/mabn/settings.json")))
        let layer = MovingAverageBatchNorm<T>(featureCount: settings.C, window: settings.window, warmup: settings.warmup_iters,
                                              renormHold: settings.r_hold, epsilon: settings.eps, momentum: settings.momentum)
        layer.weight.value.scalars = try fixture("gamma").doubles().map { T($0) }
        layer.bias.value.scalars = try fixture("beta").doubles().map { T($0) }
        var usedWindow = false, renormalized = false
        for t in 0..<settings.T {
            let x = try fixture("x.\(t)").tensor(as: T.self)
            let y = try layer.forward(x, mode: .training)
            let dx = try layer.backward(try fixture("dy.\(t)").tensor(as: T.self))
            let results: [(String, [Double])] = [
                ("var", layer.lastVariance), ("r", layer.lastR), ("y", y.scalars.map(Double.init)),
                ("running_var", layer.runningVariance.value.scalars.map(Double.init)), ("mean_gz", layer.lastMeanGZ),
                ("dx", dx.scalars.map(Double.init)), ("dgamma", layer.weight.gradient.scalars.map(Double.init)),
                ("dbeta", layer.bias.gradient.scalars.map(Double.init)),
            ]
            for (name, actual) in results {
                let error = relativeError(actual, try fixture("\(name).\(t)").doubles())
                XCTAssertLessThan(error, tolerance, "iteration \(t + 1) \(name) in \(T.self): max|out − ref|/max|ref| = \(error)")
            }
            usedWindow = usedWindow || t + 1 > settings.window
            renormalized = renormalized || layer.lastR.contains { $0 != 1 }
        }
        XCTAssertTrue(usedWindow, "the sequence never reached the moving averages")
        XCTAssertTrue(renormalized, "r was never released from 1: the renormalization is not pinned")
        let inference = try layer.forward(try fixture("x.0").tensor(as: T.self), mode: .inference)
        XCTAssertLessThan(relativeError(inference.scalars, try fixture("y_inference").doubles()), tolerance, "inference")
    }

    func testEightIterationsMatchTheReferenceLayer() throws {
        try checkReference(as: Double.self, tolerance: 1e-12)
        try checkReference(as: Float.self, tolerance: 2e-6)
    }

    func testBackwardIsTheExactGradientWhileBatchStatisticsAreUsed() throws {
        // Within the first k iterations (here all of them) with r held at 1 the layer is
        // y = γ·x/√(E[x²] + ε) + β of the batch, and dx its exact gradient.
        let layer = MovingAverageBatchNorm<Double>(featureCount: 3, window: 1_000_000, warmup: 0, renormHold: 1_000_000)
        layer.weight.value.scalars = [1.3, -0.7, 0.9]
        layer.bias.value.scalars = [0.2, 0.1, -0.4]
        try checkGradients(of: layer, input: randomTensor([4, 3, 2, 3], seed: 11, mean: 0.3), tolerance: 1e-6)
        try checkGradients(of: MovingAverageBatchNorm<Double>(featureCount: 5, window: 1_000_000, warmup: 0, renormHold: 1_000_000),
                           input: randomTensor([6, 5], seed: 12), tolerance: 1e-6)
    }

    func testWindowAveragesThePastIterationsAndTheirGradients() throws {
        // k = 2: from iteration 3 on, v is the mean of the last two batches' E[x²] (slot t mod 2).
        let layer = MovingAverageBatchNorm<Double>(featureCount: 1, window: 2, warmup: 0, renormHold: 100)
        var squares: [Double] = [], products: [Double] = []
        for t in 0..<4 {
            let x = randomTensor([3, 1, 2, 2], seed: UInt64(20 + t), std: Double(t + 1))
            let dy = randomTensor(x.shape, seed: UInt64(40 + t))
            _ = try layer.forward(x, mode: .training)
            squares.append(x.scalars.reduce(0) { $0 + $1 * $1 } / Double(x.count))
            let expectedV = t < 2 ? squares[t] : (squares[t] + squares[t - 1]) / 2
            XCTAssertEqual(layer.lastVariance[0], expectedV, accuracy: 1e-12 * expectedV, "iteration \(t + 1)")
            _ = try layer.backward(dy)
            let z = x.scalars.map { $0 / (expectedV + 1e-5).squareRoot() }
            products.append(zip(dy.scalars, z).reduce(0) { $0 + $1.0 * $1.1 } / Double(x.count))
            let expectedGZ = t < 2 ? products[t] : (products[t] + products[t - 1]) / 2
            XCTAssertEqual(layer.lastMeanGZ[0], expectedGZ, accuracy: 1e-12 * (1 + abs(expectedGZ)), "iteration \(t + 1)")
        }
        XCTAssertEqual(layer.iterations.value, 4)
    }

    func testRenormalizationIsHeldThenClippedToAFifthAndFive() throws {
        // E[x²] = 100 against running_v = 1: r = 10 is clipped to 5; E[x²] = 0.0001: r → 1/5.
        for (scale, expected) in [(10.0, 5.0), (0.01, 0.2)] {
            let layer = MovingAverageBatchNorm<Double>(featureCount: 1, window: 1, warmup: 0, renormHold: 1)
            let x = Tensor<Double>(shape: [4, 1], scalars: [1, -1, 1, -1].map { $0 * scale })
            _ = try layer.forward(x, mode: .training)
            XCTAssertEqual(layer.lastR, [1], "held at 1 for the first iteration")
            layer.runningVariance.value.scalars = [1]
            _ = try layer.forward(x, mode: .training)
            XCTAssertEqual(layer.lastR, [expected])
        }
    }

    func testOverASyncGroupRanksTimesBatchGiveTheBitsOfOneRankWithTheWholeBatch() throws {
        // Per rank (the default) the layer is a function of each rank's own batches; with a group
        // its E[x²] and E[g·z] span the group, and W ranks × b reproduce 1 × W·b bit for bit.
        let C = 3, steps = 5
        let batches = (0..<steps).map { randomTensor([8, C, 3, 3], seed: UInt64(60 + $0), mean: 0.2).scalars.map { Float($0) } }
        let gradients = (0..<steps).map { randomTensor([8, C, 3, 3], seed: UInt64(80 + $0)).scalars.map { Float($0) } }
        func run(ranks: Int) throws -> [[Float]] {
            try InProcessGroup.run(size: ranks) { comm -> [Float] in
                let layer = MovingAverageBatchNorm<Float>(featureCount: C, window: 2, warmup: 0, renormHold: 2, group: ranks > 1 ? comm : nil)
                let per = 8 / ranks, plane = C * 9
                var out: [Float] = []
                for t in 0..<steps {
                    let piece = (comm.rank * per * plane)..<((comm.rank + 1) * per * plane)
                    let y = try layer.forward(Tensor(shape: [per, C, 3, 3], scalars: Array(batches[t][piece])), mode: .training)
                    let dx = try layer.backward(Tensor(shape: [per, C, 3, 3], scalars: Array(gradients[t][piece])))
                    out += y.scalars + dx.scalars
                }
                return out + layer.runningVariance.value.scalars + layer.windows.values.map(Float.init)
            }
        }
        let one = try run(ranks: 1)[0]
        let statistics = C + 2 * 2 * C, outputs = one.count - statistics
        for ranks in [2, 4, 8] {
            let results = try run(ranks: ranks)
            // Each rank's outputs are its slice of the single rank's; the statistics are identical.
            for rank in 0..<ranks {
                XCTAssertEqual(Array(results[rank].suffix(statistics)), Array(one.suffix(statistics)), "\(ranks) ranks: rank \(rank)'s statistics")
            }
            var joined: [Float] = []
            let stepValues = 2 * 8 / ranks * C * 9
            for t in 0..<steps {
                for part in 0..<2 {
                    for rank in 0..<ranks {
                        let start = t * stepValues + part * stepValues / 2
                        joined += results[rank][start..<(start + stepValues / 2)]
                    }
                }
            }
            XCTAssertEqual(joined, Array(one[..<outputs]), "\(ranks) ranks × \(8 / ranks) against 1 × 8")
        }
    }

    func testWeightCenteringCentersEachFilterAndItsGradient() throws {
        var random = DeterministicRandom(seed: 5)
        let conv = Conv2d<Double>(inputChannels: 2, outputChannels: 3, kernelSize: 3, padding: 1, bias: false, random: &random)
        let centered = WeightCentering<Double, Conv2d<Double>>(conv)
        try checkGradients(of: centered, input: randomTensor([2, 2, 4, 4], seed: 3), tolerance: 1e-6)
        _ = centered.materializedLayer()
        for c in 0..<3 {
            let row = conv.weight.value.scalars[(c * 18)..<((c + 1) * 18)]
            XCTAssertEqual(row.reduce(0, +), 0, accuracy: 1e-12, "filter \(c) of the computed weight has mean 0")
        }
        XCTAssertEqual(centered.state.map(\.name), ["weight"], "v under the reference's name, the inner weight hidden")
    }
}
