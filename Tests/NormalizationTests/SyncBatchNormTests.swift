import Collectives
import Kernels
import Normalization
import TestSupport
import XCTest

/// SyncBN over N in-process ranks must equal plain BN on the concatenated batch: statistics,
/// outputs, input gradients, the summed γ/β gradients and the running statistics — for uneven
/// shards and ranks with no samples at all.
final class SyncBatchNormTests: XCTestCase {
    struct RankResult {
        var y: [Double], dx: [Double], dgamma: [Double], dbeta: [Double]
        var runningMean: [Double], runningVariance: [Double], collectives: [String: Int]
        var mean: [Double], variance: [Double]
    }

    /// Runs one SyncBN forward+backward per rank on `pieces` of (x, dy) (Double or Float).
    func runSynced<T: BatchNormScalar>(_ x: Tensor<Double>, _ dy: Tensor<Double>, pieces: [Range<Int>], as _: T.Type,
                                       gamma: [Double], beta: [Double]) throws -> [RankResult] {
        try InProcessGroup.run(size: pieces.count) { base -> RankResult in
            let comm = InstrumentedCommunicator(base)
            let bn = SyncBatchNorm<T>(featureCount: x.shape[1], synchronizing: comm)
            bn.weight.value.scalars = gamma.map { T($0) }
            bn.bias.value.scalars = beta.map { T($0) }
            let range = pieces[base.rank]
            let y = try bn.forward(x.slice(samples: range).converted(to: T.self), mode: .training)
            let dx = try bn.backward(dy.slice(samples: range).converted(to: T.self))
            return RankResult(y: y.scalars.map(Double.init), dx: dx.scalars.map(Double.init),
                              dgamma: bn.weight.gradient.scalars.map(Double.init), dbeta: bn.bias.gradient.scalars.map(Double.init),
                              runningMean: bn.runningMean.value.scalars.map(Double.init),
                              runningVariance: bn.runningVariance.value.scalars.map(Double.init),
                              collectives: comm.ledger.collectiveCounts,
                              mean: bn.lastStatistics?.mean ?? [], variance: bn.lastStatistics?.variance ?? [])
        }
    }

    func piecesFor(sizes: [Int]) -> [Range<Int>] {
        var start = 0
        return sizes.map { size in defer { start += size }; return start..<(start + size) }
    }

    func testSyncedRanksEqualBatchNormOnTheConcatenatedBatch() throws {
        let layouts: [([Int], [Int])] = [
            ([7, 3, 4, 3], [4, 3]),            // 2 ranks, uneven
            ([7, 3, 4, 3], [3, 2, 2]),         // 3 ranks
            ([7, 3, 4, 3], [2, 2, 2, 1]),      // 4 ranks
            ([3, 3, 2, 2], [1, 1, 1, 0]),      // a rank with nothing
            ([9, 5], [0, 4, 0, 5]),            // 2-D input, two empty ranks
        ]
        for (shape, sizes) in layouts {
            let x = randomTensor(shape, seed: 21, mean: 2, std: 3), dy = randomTensor(shape, seed: 22)
            let gamma = (0..<shape[1]).map { 1 + 0.25 * Double($0) }, beta = (0..<shape[1]).map { 0.5 - 0.1 * Double($0) }
            let reference = BatchNorm<Double>(featureCount: shape[1])
            reference.weight.value.scalars = gamma
            reference.bias.value.scalars = beta
            let y = try reference.forward(x, mode: .training)
            let dx = try reference.backward(dy)
            let ranks = try runSynced(x, dy, pieces: piecesFor(sizes: sizes), as: Double.self, gamma: gamma, beta: beta)
            let label = "shape \(shape) over \(sizes)"
            assertClose(ranks.flatMap(\.y), y.scalars, relTol: 1e-12, absTol: 1e-12, "\(label) y")
            assertClose(ranks.flatMap(\.dx), dx.scalars, relTol: 1e-10, absTol: 1e-12, "\(label) dx")
            let dgamma = ranks.map(\.dgamma).reduce([Double](repeating: 0, count: shape[1])) { zip($0, $1).map(+) }
            let dbeta = ranks.map(\.dbeta).reduce([Double](repeating: 0, count: shape[1])) { zip($0, $1).map(+) }
            assertClose(dgamma, reference.weight.gradient.scalars, relTol: 1e-10, absTol: 1e-12, "\(label) Σ dγ")
            assertClose(dbeta, reference.bias.gradient.scalars, relTol: 1e-10, absTol: 1e-12, "\(label) Σ dβ")
            for rank in ranks {
                assertClose(rank.runningMean, reference.runningMean.value.scalars, relTol: 1e-12, absTol: 1e-14, "\(label) running mean")
                assertClose(rank.runningVariance, reference.runningVariance.value.scalars, relTol: 1e-12, "\(label) running var (M = global count)")
            }
        }
    }

    func testOneCollectiveInForwardAndOneInBackwardNoneInInference() throws {
        let x = randomTensor([6, 2, 2, 2], seed: 23), dy = randomTensor([6, 2, 2, 2], seed: 24)
        let ranks = try runSynced(x, dy, pieces: piecesFor(sizes: [3, 3]), as: Float.self, gamma: [1, 1], beta: [0, 0])
        for rank in ranks { XCTAssertEqual(rank.collectives, ["allReduceSum": 2]) }
        let inference = try InProcessGroup.run(size: 2) { base -> Int in
            let comm = InstrumentedCommunicator(base)
            let bn = SyncBatchNorm<Float>(featureCount: 2, synchronizing: comm)
            _ = try bn.forward(x.slice(samples: 0..<3).converted(to: Float.self), mode: .inference)
            return comm.ledger.totalCollectives
        }
        XCTAssertEqual(inference, [0, 0])
    }

    func testGradientsAcrossRanksMatchFiniteDifferencesOfTheGlobalLoss() throws {
        // L = Σ_ranks Σ y·dy with every rank's y depending on every rank's x through the statistics.
        let shape = [5, 2, 2, 2], sizes = [2, 0, 3]
        var x = randomTensor(shape, seed: 25, mean: 1, std: 2)
        let dy = randomTensor(shape, seed: 26)
        var gamma = [1.3, 0.7], beta = [0.2, -0.4]
        let pieces = piecesFor(sizes: sizes)
        let analytic = try runSynced(x, dy, pieces: pieces, as: Double.self, gamma: gamma, beta: beta)
        func loss() throws -> Double {
            let ranks = try runSynced(x, dy, pieces: pieces, as: Double.self, gamma: gamma, beta: beta)
            return zip(ranks, pieces).reduce(0) { $0 + dot($1.0.y, Array(dy.scalars[($1.1.lowerBound * 8)..<($1.1.upperBound * 8)])) }
        }
        let numericX = try numericalGradient(count: x.count, get: { x.scalars[$0] }, set: { x.scalars[$0] = $1 }, loss)
        assertGradient(analytic.flatMap(\.dx), numericX, 1e-6, "dx across ranks")
        let numericGamma = try numericalGradient(count: 2, get: { gamma[$0] }, set: { gamma[$0] = $1 }, loss)
        let numericBeta = try numericalGradient(count: 2, get: { beta[$0] }, set: { beta[$0] = $1 }, loss)
        assertGradient(analytic.map(\.dgamma).reduce([0, 0]) { zip($0, $1).map(+) }, numericGamma, 1e-6, "Σ dγ")
        assertGradient(analytic.map(\.dbeta).reduce([0, 0]) { zip($0, $1).map(+) }, numericBeta, 1e-6, "Σ dβ")
    }

    func testLargeMeanAcrossUnevenRanksStaysWithinTheTargets() throws {
        // Per-channel mean 1e4, std 1, 13 samples over 4 ranks: mean and var to 1e-6, y and dx to 1e-4.
        let x = randomTensor([13, 8, 5, 5], seed: 27, mean: 1e4, std: 1).converted(to: Float.self).converted(to: Double.self)
        let dy = randomTensor([13, 8, 5, 5], seed: 28)
        let ones = [Double](repeating: 1, count: 8), zeros = [Double](repeating: 0, count: 8)
        let ranks = try runSynced(x, dy, pieces: piecesFor(sizes: [4, 3, 3, 3]), as: Float.self, gamma: ones, beta: zeros)
        let (mean, variance) = referenceStatistics(x.scalars, shape: x.shape)
        let reference = BatchNorm<Double>(featureCount: 8)
        let y = try reference.forward(x, mode: .training), dx = try reference.backward(dy)
        XCTAssertLessThan(relativeError(reference.lastStatistics!.mean, mean), 1e-12)
        XCTAssertLessThan(relativeError(reference.lastStatistics!.variance, variance), 1e-7)
        for rank in ranks {
            XCTAssertLessThan(relativeError(rank.mean, mean), 1e-6)
            XCTAssertLessThan(relativeError(rank.variance, variance), 1e-6)
        }
        XCTAssertLessThan(relativeError(ranks.flatMap(\.y), y.scalars), 1e-4)
        XCTAssertLessThan(relativeError(ranks.flatMap(\.dx), dx.scalars), 1e-4)
        // running_mean = 0.1·μ: its relative error is μ's.
        XCTAssertLessThan(relativeError(ranks[0].runningMean, mean.map { 0.1 * $0 }), 1e-6)
    }

    func testSubGroupsSynchronizeOnlyAmongThemselves() throws {
        let shape = [8, 2, 3, 3]
        let x = randomTensor(shape, seed: 29, std: 2), dy = randomTensor(shape, seed: 30)
        let pieces = piecesFor(sizes: [3, 1, 2, 2])
        let results = try InProcessGroup.run(size: 4) { comm -> [Double] in
            let group = try comm.split(color: comm.rank / 2, key: comm.rank)
            let bn = SyncBatchNorm<Double>(featureCount: 2, synchronizing: group)
            let y = try bn.forward(x.slice(samples: pieces[comm.rank]), mode: .training)
            _ = try bn.backward(dy.slice(samples: pieces[comm.rank]))
            return y.scalars
        }
        for (groupIndex, samples) in [(0, 0..<4), (1, 4..<8)] {
            let reference = BatchNorm<Double>(featureCount: 2)
            let y = try reference.forward(x.slice(samples: samples), mode: .training)
            assertClose(results[2 * groupIndex] + results[2 * groupIndex + 1], y.scalars, relTol: 1e-12, absTol: 1e-12, "group \(groupIndex)")
        }
    }
}
