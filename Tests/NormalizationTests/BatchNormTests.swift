import Collectives
import Kernels
import Normalization
import TestSupport
import XCTest

/// Two-pass float64 per-channel mean and biased variance over N, H, W.
func referenceStatistics<T: BinaryFloatingPoint>(_ x: [T], shape: [Int]) -> (mean: [Double], variance: [Double]) {
    let layout = ChannelLayout(shape: shape)!
    var mean = [Double](repeating: 0, count: layout.channels), variance = mean
    for c in 0..<layout.channels {
        var values: [Double] = []
        for n in 0..<layout.batch { for p in 0..<layout.spatial { values.append(Double(x[(n * layout.channels + c) * layout.spatial + p])) } }
        mean[c] = values.reduce(0, +) / Double(values.count)
        variance[c] = values.reduce(0) { $0 + ($1 - mean[c]) * ($1 - mean[c]) } / Double(values.count)
    }
    return (mean, variance)
}

/// y = γ(x − μ)/√(σ² + ε) + β by the definition, in Double.
func referenceForward<T: BinaryFloatingPoint>(_ x: [T], shape: [Int], mean: [Double], variance: [Double], gamma: [Double], beta: [Double], epsilon: Double = 1e-5) -> [Double] {
    let layout = ChannelLayout(shape: shape)!
    return x.indices.map { i in
        let c = (i / layout.spatial) % layout.channels
        return gamma[c] * (Double(x[i]) - mean[c]) / (variance[c] + epsilon).squareRoot() + beta[c]
    }
}

final class BatchNormTests: XCTestCase {
    func testTrainingForwardMatchesATwoPassFloat64Reference() throws {
        for shape in [[6, 3, 4, 5], [10, 4]] {
            let bn = BatchNorm<Double>(featureCount: shape[1])
            bn.weight.value.scalars = (0..<shape[1]).map { 0.5 + Double($0) }
            bn.bias.value.scalars = (0..<shape[1]).map { -Double($0) }
            let x = randomTensor(shape, seed: 1, mean: 3, std: 2)
            let y = try bn.forward(x, mode: .training)
            let (mean, variance) = referenceStatistics(x.scalars, shape: shape)
            assertClose(bn.lastStatistics!.mean, mean, relTol: 1e-12, absTol: 1e-12)
            assertClose(bn.lastStatistics!.variance, variance, relTol: 1e-12)
            assertClose(y.scalars, referenceForward(x.scalars, shape: shape, mean: mean, variance: variance,
                                                    gamma: bn.weight.value.scalars, beta: bn.bias.value.scalars), relTol: 1e-10, absTol: 1e-12)
        }
    }

    func testInferenceBeforeTrainingIsXOverSqrtOnePlusEpsilon() throws {
        let bn = BatchNorm<Float>(featureCount: 3)
        let x = randomTensor([4, 3, 2, 2], seed: 2).converted(to: Float.self)
        let y = try bn.forward(x, mode: .inference)
        assertClose(y.scalars, x.scalars.map { Double($0) / (1 + 1e-5).squareRoot() }, relTol: 1e-6)
        XCTAssertEqual(bn.batchesTracked.value, 0, "inference leaves the running statistics alone")
        XCTAssertEqual(bn.runningMean.value.scalars, [0, 0, 0])
    }

    func testRunningStatisticsFollowTheMomentumWithTheUnbiasedVariance() throws {
        let bn = BatchNorm<Double>(featureCount: 2, momentum: 0.25)
        let x = randomTensor([5, 2, 3, 1], seed: 3, mean: 1, std: 3)
        _ = try bn.forward(x, mode: .training)
        let (mean, variance) = referenceStatistics(x.scalars, shape: x.shape)
        let m = 15.0
        assertClose(bn.runningMean.value.scalars, mean.map { 0.25 * $0 }, relTol: 1e-12)
        assertClose(bn.runningVariance.value.scalars, variance.map { 0.75 + 0.25 * $0 * m / (m - 1) }, relTol: 1e-12)
        XCTAssertEqual(bn.batchesTracked.value, 1)
    }

    func testMomentumNilKeepsTheCumulativeAverage() throws {
        let bn = BatchNorm<Double>(featureCount: 1, momentum: nil)
        var means: [Double] = [], variances: [Double] = []
        for seed in 0..<3 {
            let x = randomTensor([4, 1], seed: UInt64(10 + seed), mean: Double(seed), std: 1)
            _ = try bn.forward(x, mode: .training)
            let (mean, variance) = referenceStatistics(x.scalars, shape: x.shape)
            means.append(mean[0])
            variances.append(variance[0] * 4 / 3)
        }
        XCTAssertEqual(bn.runningMean.value.scalars[0], means.reduce(0, +) / 3, accuracy: 1e-12)
        XCTAssertEqual(bn.runningVariance.value.scalars[0], variances.reduce(0, +) / 3, accuracy: 1e-12)
    }

    func testGradientsMatchFiniteDifferencesForImagesAndFeatures() throws {
        for shape in [[3, 2, 3, 2], [6, 3]] {
            let bn = BatchNorm<Double>(featureCount: shape[1])
            bn.weight.value.scalars = (0..<shape[1]).map { 1.5 - 0.7 * Double($0) }
            bn.bias.value.scalars = (0..<shape[1]).map { 0.3 * Double($0) }
            try checkGradients(of: bn, input: randomTensor(shape, seed: 4, mean: 2, std: 1.5))
        }
    }

    func testFrozenBatchNormUsesPopulationStatisticsAndItsGradientsMatchFiniteDifferences() throws {
        let bn = BatchNorm<Double>(featureCount: 3)
        bn.runningMean.value.scalars = [0.5, -1, 2]
        bn.runningVariance.value.scalars = [2, 0.5, 1.5]
        bn.weight.value.scalars = [1.2, 0.7, -0.4]
        bn.frozen = true
        let x = randomTensor([4, 3, 2, 2], seed: 93, mean: 1)
        let y = try bn.forward(x, mode: .training)
        assertClose(y.scalars, try bn.forward(x, mode: .inference).scalars, relTol: 1e-14, absTol: 1e-14, "frozen training = inference")
        XCTAssertEqual(bn.batchesTracked.value, 0, "no update")
        XCTAssertEqual(bn.runningMean.value.scalars, [0.5, -1, 2])
        try checkGradients(of: bn, input: x)
    }

    func testOneValuePerChannelIsAnErrorNamingTheFix() {
        let bn = BatchNorm<Float>(featureCount: 2)
        XCTAssertThrowsError(try bn.forward(Tensor(shape: [1, 2]), mode: .training)) { error in
            XCTAssertTrue("\(error)".contains("more than 1 value per channel"), "\(error)")
        }
    }

    func testWrongChannelCountIsAnError() {
        let bn = BatchNorm<Float>(featureCount: 3)
        XCTAssertThrowsError(try bn.forward(Tensor(shape: [4, 2, 2, 2]), mode: .training)) { error in
            XCTAssertTrue("\(error)".contains("expected N×3"), "\(error)")
        }
        XCTAssertThrowsError(try bn.forward(Tensor(shape: [4, 3, 2]), mode: .training))
    }

    func testShiftedStatisticsStayExactWhenTheMeanDwarfsTheSpread() throws {
        // |mean|/std = 1e4: Float E[x²] − E[x]² would lose every digit here.
        for offset in [1e3, 1e4] {
            let x = randomTensor([13, 8, 5, 5], seed: 5, mean: offset, std: 1).converted(to: Float.self)
            let bn = BatchNorm<Float>(featureCount: 8)
            let y = try bn.forward(x, mode: .training)
            let (mean, variance) = referenceStatistics(x.scalars, shape: x.shape)
            assertClose(bn.lastStatistics!.mean, mean, relTol: 1e-6)
            assertClose(bn.lastStatistics!.variance, variance, relTol: 1e-6)
            let expected = referenceForward(x.scalars, shape: x.shape, mean: mean, variance: variance,
                                            gamma: [Double](repeating: 1, count: 8), beta: [Double](repeating: 0, count: 8))
            XCTAssertLessThan(relativeError(y.scalars, expected), 1e-6)
        }
    }
}
