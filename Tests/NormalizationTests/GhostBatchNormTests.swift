import Collectives
import Kernels
import Normalization
import TestSupport
import XCTest

final class GhostBatchNormTests: XCTestCase {
    func testGhostBatchesAreNormalizedSeparatelyAndUpdateTheRunningStatisticsInOrder() throws {
        let x = randomTensor([7, 2, 2, 2], seed: 110, mean: 1, std: 2), dy = randomTensor([7, 2, 2, 2], seed: 111)
        let ghost = GhostBatchNorm<Double>(featureCount: 2, ghostBatchSize: 3, ghostCount: 3)
        ghost.weight.value.scalars = [1.5, -0.5]
        let y = try ghost.forward(x, mode: .training), dx = try ghost.backward(dy)
        let reference = BatchNorm<Double>(featureCount: 2)
        reference.weight.value.scalars = [1.5, -0.5]
        var ys: [Double] = [], dxs: [Double] = [], dgamma = [0.0, 0.0]
        // The last ghost batch has one sample of 2×2 positions: 4 values per channel, still valid.
        for range in [0..<3, 3..<6, 6..<7] {
            ys += try reference.forward(x.slice(samples: range), mode: .training).scalars
            dxs += try reference.backward(dy.slice(samples: range)).scalars
            dgamma = zip(dgamma, reference.weight.gradient.scalars).map(+)
        }
        assertClose(y.scalars, ys, relTol: 1e-12, absTol: 1e-12)
        assertClose(dx.scalars, dxs, relTol: 1e-10, absTol: 1e-12)
        assertClose(ghost.weight.gradient.scalars, dgamma, relTol: 1e-10)
        assertClose(ghost.runningVariance.value.scalars, reference.runningVariance.value.scalars, relTol: 1e-12)
        XCTAssertEqual(ghost.batchesTracked.value, 3)
    }

    func testGradientsMatchFiniteDifferences() throws {
        try checkGradients(of: GhostBatchNorm<Double>(featureCount: 3, ghostBatchSize: 2, ghostCount: 3), input: randomTensor([5, 3, 2, 1], seed: 112, mean: 1))
    }

    func testSyncedGhostBatchesSpanTheSameChunkOfEveryRankInOneCollectiveEach() throws {
        let x = randomTensor([8, 2, 3, 1], seed: 113), dy = randomTensor([8, 2, 3, 1], seed: 114)
        let results = try InProcessGroup.run(size: 2) { base -> ([Double], [Double], Int) in
            let comm = InstrumentedCommunicator(base)
            let ghost = GhostBatchNorm<Double>(featureCount: 2, ghostBatchSize: 2, ghostCount: 2, group: comm)
            let mine = x.slice(samples: (4 * base.rank)..<(4 * base.rank + 4))
            let y = try ghost.forward(mine, mode: .training)
            let dx = try ghost.backward(dy.slice(samples: (4 * base.rank)..<(4 * base.rank + 4)))
            return (y.scalars, dx.scalars, comm.ledger.totalCollectives)
        }
        XCTAssertEqual(results.map(\.2), [2, 2])
        // Ghost batch j = samples [2j, 2j+2) of rank 0 and of rank 1.
        for j in 0..<2 {
            let reference = BatchNorm<Double>(featureCount: 2)
            let union = Tensor.concatenate([x.slice(samples: (2 * j)..<(2 * j + 2)), x.slice(samples: (4 + 2 * j)..<(4 + 2 * j + 2))], sampleShape: [2, 3, 1])
            let y = try reference.forward(union, mode: .training).scalars
            let perSample = 6
            assertClose(Array(results[0].0[(2 * j * perSample)..<((2 * j + 2) * perSample)]) + Array(results[1].0[(2 * j * perSample)..<((2 * j + 2) * perSample)]),
                        y, relTol: 1e-12, absTol: 1e-12, "ghost batch \(j)")
        }
    }
}
