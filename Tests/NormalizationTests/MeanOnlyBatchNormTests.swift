import Collectives
import Kernels
import Normalization
import TestSupport
import XCTest

final class MeanOnlyBatchNormTests: XCTestCase {
    func testForwardSubtractsTheBatchMeanAndKeepsARunningMean() throws {
        let layer = MeanOnlyBatchNorm<Double>(featureCount: 2, momentum: 0.25)
        layer.bias.value.scalars = [0.5, -1]
        let x = randomTensor([3, 2, 2, 2], seed: 1, mean: 2)
        let y = try layer.forward(x, mode: .training)
        // Reference: per channel mean over N×H×W, in plain loops.
        for c in 0..<2 {
            var values: [Double] = []
            for n in 0..<3 { for p in 0..<4 { values.append(x.scalars[(n * 2 + c) * 4 + p]) } }
            let mean = values.reduce(0, +) / Double(values.count)
            for n in 0..<3 { for p in 0..<4 {
                let i = (n * 2 + c) * 4 + p
                XCTAssertEqual(y.scalars[i], x.scalars[i] - mean + layer.bias.value.scalars[c], accuracy: 1e-12)
            } }
            XCTAssertEqual(layer.runningMean.value.scalars[c], 0.25 * mean, accuracy: 1e-12)
        }
        let inference = try layer.forward(x, mode: .inference)
        XCTAssertEqual(inference.scalars[0], x.scalars[0] - layer.runningMean.value.scalars[0] + 0.5, accuracy: 1e-12)
        XCTAssertEqual(layer.batchesTracked.value, 1)
    }

    func testGradientsMatchFiniteDifferences() throws {
        let layer = MeanOnlyBatchNorm<Double>(featureCount: 3)
        layer.bias.value.scalars = [0.1, -0.2, 0.3]
        try checkGradients(of: layer, input: randomTensor([4, 3, 3, 3], seed: 2), tolerance: 1e-7)
    }

    /// Synced over three ranks with uneven (and one empty) shards: the same outputs, input
    /// gradients, summed β gradients and running mean as one rank with the whole batch.
    func testSyncedOverRanksEqualsOneRankOnTheWholeBatch() throws {
        let sizes = [3, 0, 2]
        let x = randomTensor([5, 2, 3, 3], seed: 3, mean: 1), dy = randomTensor([5, 2, 3, 3], seed: 4)
        let single = MeanOnlyBatchNorm<Double>(featureCount: 2)
        let y = try single.forward(x, mode: .training), dx = try single.backward(dy)
        let ranks = try InProcessGroup.run(size: 3) { comm -> ([Double], [Double], [Double], [Double]) in
            let layer = MeanOnlyBatchNorm<Double>(featureCount: 2, group: comm)
            let start = sizes[..<comm.rank].reduce(0, +), range = start..<(start + sizes[comm.rank])
            let y = try layer.forward(x.slice(samples: range), mode: .training)
            let dx = try layer.backward(dy.slice(samples: range))
            return (y.scalars, dx.scalars, layer.bias.gradient.scalars, layer.runningMean.value.scalars)
        }
        assertClose(ranks.flatMap(\.0), y.scalars, relTol: 1e-12, absTol: 1e-14, "outputs")
        assertClose(ranks.flatMap(\.1), dx.scalars, relTol: 1e-12, absTol: 1e-14, "input gradients")
        assertClose((0..<2).map { c in ranks.map { $0.2[c] }.reduce(0, +) }, single.bias.gradient.scalars, relTol: 1e-12, absTol: 1e-14, "β gradients")
        for rank in ranks { assertClose(rank.3, single.runningMean.value.scalars, relTol: 1e-12, absTol: 1e-14, "running mean") }
    }
}
