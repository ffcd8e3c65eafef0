import Collectives
import Kernels
import Normalization
import TestSupport
import XCTest

/// ShuffleBN over three in-process ranks with uneven shards (one empty).
final class ShuffleBatchNormTests: XCTestCase {
    let sizes = [3, 0, 4]
    let x = randomTensor([7, 2, 3, 3], seed: 31, mean: 0.4)
    let dy = randomTensor([7, 2, 3, 3], seed: 32)

    /// Runs ShuffleBN on every rank; returns each rank's output and input gradient.
    func shuffled(seed: UInt64 = 9) throws -> [(y: [Double], dx: [Double])] {
        let (x, dy, sizes) = (self.x, self.dy, self.sizes)
        return try InProcessGroup.run(size: 3) { comm -> ([Double], [Double]) in
            let layer = ShuffleBatchNorm<Double>(featureCount: 2, shuffleGroup: comm, seed: seed)
            layer.weight.value.scalars = [1.4, 0.6]
            layer.bias.value.scalars = [0.1, -0.3]
            let start = sizes[..<comm.rank].reduce(0, +), range = start..<(start + sizes[comm.rank])
            let y = try layer.forward(x.slice(samples: range), mode: .training)
            let dx = try layer.backward(dy.slice(samples: range))
            return (y.scalars, dx.scalars)
        }.map { (y: $0.0, dx: $0.1) }
    }

    /// The same in one process from its definition: permute the whole batch, per-rank BN on each
    /// rank's share of the permuted batch, permute back.
    func reference(_ input: Tensor<Double>) throws -> Tensor<Double> {
        let permutation = ShuffleBatchNorm<Double>.permutation(count: 7, seed: 9, step: 0)
        let permuted = Tensor<Double>.concatenate(permutation.map { input.slice(samples: $0..<($0 + 1)) }, sampleShape: [2, 3, 3])
        var pieces: [Tensor<Double>] = []
        var start = 0
        for size in sizes {
            let bn = BatchNorm<Double>(featureCount: 2)
            bn.weight.value.scalars = [1.4, 0.6]
            bn.bias.value.scalars = [0.1, -0.3]
            if size > 0 { pieces.append(try bn.forward(permuted.slice(samples: start..<(start + size)), mode: .training)) }
            start += size
        }
        let normalized = Tensor<Double>.concatenate(pieces, sampleShape: [2, 3, 3])
        var inverse = [Int](repeating: 0, count: 7)
        for (position, sample) in permutation.enumerated() { inverse[sample] = position }
        return Tensor<Double>.concatenate(inverse.map { normalized.slice(samples: $0..<($0 + 1)) }, sampleShape: [2, 3, 3])
    }

    func testOutputIsPerRankBNOfThePermutedBatchPutBack() throws {
        let ranks = try shuffled()
        let expected = try reference(x)
        assertClose(ranks.flatMap(\.y), expected.scalars, relTol: 1e-13, absTol: 1e-14, "outputs")
        // The shuffle matters: without it rank 0's BN would see only its own 3 samples.
        let plain = BatchNorm<Double>(featureCount: 2)
        plain.weight.value.scalars = [1.4, 0.6]
        plain.bias.value.scalars = [0.1, -0.3]
        let own = try plain.forward(x.slice(samples: 0..<3), mode: .training)
        XCTAssertGreaterThan(zip(own.scalars, ranks[0].y).map { abs($0 - $1) }.max()!, 1e-3)
        // The inverse is exact: every sample's output returns to its rank and position.
        let permutation = ShuffleBatchNorm<Double>.permutation(count: 7, seed: 9, step: 0)
        XCTAssertEqual(permutation.sorted(), Array(0..<7))
        XCTAssertNotEqual(permutation, Array(0..<7))
    }

    /// Central differences of L = Σ reference(x)·dy over the whole group's batch against the
    /// ranks' input gradients, concatenated.
    func testInputGradientsMatchFiniteDifferencesOverTheGroup() throws {
        let analytic = try shuffled().flatMap(\.dx)
        var input = x
        let numeric = try numericalGradient(count: input.count, get: { input.scalars[$0] }, set: { input.scalars[$0] = $1 }) {
            dot(try self.reference(input).scalars, self.dy.scalars)
        }
        assertGradient(analytic, numeric, 1e-6, "ShuffleBN input gradient")
    }
}
