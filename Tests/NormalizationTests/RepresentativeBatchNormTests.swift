import Collectives
import Kernels
import Normalization
import TestSupport
import XCTest

final class RepresentativeBatchNormTests: XCTestCase {
    func makeLayer(group: (any Communicator)? = nil) -> RepresentativeBatchNorm<Double> {
        let rbn = RepresentativeBatchNorm<Double>(featureCount: 3, group: group)
        rbn.weight.value.scalars = [1.2, 0.8, -0.6]
        rbn.bias.value.scalars = [0.1, -0.2, 0.3]
        rbn.centeringWeight.value.scalars = [0.5, -0.3, 0.2]
        rbn.scalingWeight.value.scalars = [0.7, -1.1, 0.4]
        rbn.scalingBias.value.scalars = [0.9, 1.2, -0.3]
        return rbn
    }

    func testForwardMatchesTheDefinition() throws {
        let rbn = makeLayer()
        let x = randomTensor([4, 3, 2, 3], seed: 120, mean: 1, std: 2)
        let y = try rbn.forward(x, mode: .training)
        // By the definition, in Double.
        let HW = 6
        var centered = x.scalars
        for plane in 0..<12 {
            let k = x.scalars[(plane * HW)..<((plane + 1) * HW)].reduce(0, +) / 6
            for p in 0..<HW { centered[plane * HW + p] += rbn.centeringWeight.value.scalars[plane % 3] * k }
        }
        let (mean, variance) = referenceStatistics(centered, shape: x.shape)
        let normalized = referenceForward(centered, shape: x.shape, mean: mean, variance: variance, gamma: [1, 1, 1], beta: [0, 0, 0])
        var expected = [Double](repeating: 0, count: x.count)
        for plane in 0..<12 {
            let c = plane % 3
            let k = normalized[(plane * HW)..<((plane + 1) * HW)].reduce(0, +) / 6
            let gate = 1 / (1 + exp(-(rbn.scalingWeight.value.scalars[c] * k + rbn.scalingBias.value.scalars[c])))
            for p in 0..<HW {
                expected[plane * HW + p] = rbn.weight.value.scalars[c] * normalized[plane * HW + p] * gate + rbn.bias.value.scalars[c]
            }
        }
        assertClose(y.scalars, expected, relTol: 1e-10, absTol: 1e-12)
    }

    func testInitialisationIsBatchNormScaledBySigmoidOfOne() throws {
        let rbn = RepresentativeBatchNorm<Double>(featureCount: 2)
        let bn = BatchNorm<Double>(featureCount: 2)
        let x = randomTensor([3, 2, 2, 2], seed: 121)
        let gate = 1 / (1 + exp(-1.0))
        assertClose(try rbn.forward(x, mode: .training).scalars, try bn.forward(x, mode: .training).scalars.map { $0 * gate }, relTol: 1e-12, absTol: 1e-12)
    }

    func testGradientsMatchFiniteDifferencesForImagesAndFeatures() throws {
        try checkGradients(of: makeLayer(), input: randomTensor([3, 3, 2, 2], seed: 122, mean: 0.5))
        try checkGradients(of: makeLayer(), input: randomTensor([5, 3], seed: 123, mean: 0.5))
    }

    func testSyncedOverRanksEqualsOneRankOnTheConcatenatedBatch() throws {
        let x = randomTensor([6, 3, 2, 2], seed: 124), dy = randomTensor([6, 3, 2, 2], seed: 125)
        let single = makeLayer()
        let y = try single.forward(x, mode: .training), dx = try single.backward(dy)
        let ranks = try InProcessGroup.run(size: 2) { comm -> ([Double], [Double], [Double]) in
            let rbn = self.makeLayer(group: comm)
            let range = (3 * comm.rank)..<(3 * comm.rank + 3)
            let out = try rbn.forward(x.slice(samples: range), mode: .training)
            return (out.scalars, try rbn.backward(dy.slice(samples: range)).scalars, rbn.centeringWeight.gradient.scalars)
        }
        assertClose(ranks.flatMap(\.0), y.scalars, relTol: 1e-10, absTol: 1e-12)
        assertClose(ranks.flatMap(\.1), dx.scalars, relTol: 1e-9, absTol: 1e-12)
        assertClose(zip(ranks[0].2, ranks[1].2).map(+), single.centeringWeight.gradient.scalars, relTol: 1e-9, absTol: 1e-12)
    }
}
