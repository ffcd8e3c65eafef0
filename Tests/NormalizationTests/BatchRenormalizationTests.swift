import Collectives
import Kernels
import Normalization
import TestSupport
import XCTest

/// A layer whose every forward starts from the running statistics it had when wrapped (BRN's
/// output depends on them, and each training forward updates them).
final class FixedRunningStatistics: Layer {
    let inner: BatchNorm<Double>
    let mean: [Double], variance: [Double]
    init(_ inner: BatchNorm<Double>) {
        self.inner = inner
        mean = inner.runningMean.value.scalars
        variance = inner.runningVariance.value.scalars
    }
    var state: [StateEntry<Double>] { inner.state }
    func forward(_ input: Tensor<Double>, mode: Mode) throws -> Tensor<Double> {
        inner.runningMean.value.scalars = mean
        inner.runningVariance.value.scalars = variance
        return try inner.forward(input, mode: mode)
    }
    func backward(_ outputGradient: Tensor<Double>) throws -> Tensor<Double> { try inner.backward(outputGradient) }
}

final class BatchRenormalizationTests: XCTestCase {
    func layer(rMax: Double, dMax: Double, group: (any Communicator)? = nil) -> BatchRenormalization<Double> {
        let brn = BatchRenormalization<Double>(featureCount: 3, group: group)
        brn.runningMean.value.scalars = [0.5, 2, -1]
        brn.runningVariance.value.scalars = [4, 0.25, 1]
        brn.weight.value.scalars = [1.1, 0.6, -0.8]
        brn.bias.value.scalars = [0.1, 0.2, 0.3]
        brn.rMax = rMax
        brn.dMax = dMax
        return brn
    }

    func testForwardMatchesTheDefinitionWithClippedAndFreeRAndD() throws {
        let x = randomTensor([5, 3, 2, 2], seed: 100, mean: 1, std: 1.5)
        let (mean, variance) = referenceStatistics(x.scalars, shape: x.shape)
        for (rMax, dMax) in [(1.0, 0.0), (1.2, 0.3), (10.0, 10.0)] {
            let brn = layer(rMax: rMax, dMax: dMax)
            let runningMean = brn.runningMean.value.scalars, runningStd = brn.runningVariance.value.scalars.map { ($0 + 1e-5).squareRoot() }
            let y = try brn.forward(x, mode: .training)
            let expected = x.scalars.indices.map { i -> Double in
                let c = (i / 4) % 3, batchStd = (variance[c] + 1e-5).squareRoot()
                let r = min(max(batchStd / runningStd[c], 1 / rMax), rMax)
                let d = min(max((mean[c] - runningMean[c]) / runningStd[c], -dMax), dMax)
                return brn.weight.value.scalars[c] * ((x.scalars[i] - mean[c]) / batchStd * r + d) + brn.bias.value.scalars[c]
            }
            assertClose(y.scalars, expected, relTol: 1e-10, absTol: 1e-12, "r_max \(rMax), d_max \(dMax)")
        }
    }

    func testWithRMaxOneAndDMaxZeroItIsBatchNorm() throws {
        let x = randomTensor([4, 3, 3, 3], seed: 101, mean: 2)
        let brn = layer(rMax: 1, dMax: 0), bn = BatchNorm<Double>(featureCount: 3)
        bn.runningMean.value = brn.runningMean.value
        bn.runningVariance.value = brn.runningVariance.value
        bn.weight.value = brn.weight.value
        bn.bias.value = brn.bias.value
        assertClose(try brn.forward(x, mode: .training).scalars, try bn.forward(x, mode: .training).scalars, relTol: 1e-12, absTol: 1e-12)
        let dy = randomTensor(x.shape, seed: 102)
        assertClose(try brn.backward(dy).scalars, try bn.backward(dy).scalars, relTol: 1e-10, absTol: 1e-12)
        assertClose(brn.runningVariance.value.scalars, bn.runningVariance.value.scalars, relTol: 1e-14)
    }

    func testGradientsMatchFiniteDifferencesWhereRAndDAreClipped() throws {
        // Clipped r and d do not move with x, which is exactly the "constants in backward" rule.
        let x = randomTensor([4, 3, 2, 2], seed: 103, mean: 3, std: 0.3)
        let brn = layer(rMax: 1.1, dMax: 0.2)
        try checkGradients(of: FixedRunningStatistics(brn), input: x)
    }

    func testSyncedOverRanksEqualsOneRankOnTheConcatenatedBatch() throws {
        let x = randomTensor([7, 3, 2, 2], seed: 104, mean: 1), dy = randomTensor([7, 3, 2, 2], seed: 105)
        let single = layer(rMax: 2, dMax: 1)
        let y = try single.forward(x, mode: .training), dx = try single.backward(dy)
        let pieces = [0..<3, 3..<5, 5..<7]
        let ranks = try InProcessGroup.run(size: 3) { comm -> ([Double], [Double]) in
            let brn = self.layer(rMax: 2, dMax: 1, group: comm)
            let out = try brn.forward(x.slice(samples: pieces[comm.rank]), mode: .training)
            return (out.scalars, try brn.backward(dy.slice(samples: pieces[comm.rank])).scalars)
        }
        assertClose(ranks.flatMap(\.0), y.scalars, relTol: 1e-10, absTol: 1e-12)
        assertClose(ranks.flatMap(\.1), dx.scalars, relTol: 1e-9, absTol: 1e-12)
    }
}
