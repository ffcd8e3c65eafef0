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

    /// In Float and in Double (where a different rounding of the statistics would show), over two
    /// steps (the second shifts by running means the first moved, and draws a new permutation),
    /// every number the layer produces is, bit for bit, per-rank BN's on the
    /// rank's share of the permuted batch: outputs and dx moved back, and on rank v the running
    /// statistics, the counter and dγ, dβ of virtual batch v. Only statistics travel between the
    /// ranks, so the equality is what says nothing was lost by not moving the activations.
    func testMatchesPerRankBNOfThePermutedBatchBitForBit() throws {
        try checkBitForBit(Float.self)
        try checkBitForBit(Double.self)
    }

    func checkBitForBit<S: BatchNormScalar>(_: S.Type) throws {
        let sizes = [5, 0, 3, 8], total = 16, shape = [4, 5, 5]
        let steps = (0..<2).map { step in
            (x: Tensor<S>(shape: [total] + shape, scalars: S.narrowed(randomTensor([total] + shape, seed: 40 + UInt64(step), mean: 3).scalars)),
             dy: Tensor<S>(shape: [total] + shape, scalars: S.narrowed(randomTensor([total] + shape, seed: 50 + UInt64(step)).scalars)))
        }
        func configure(_ bn: BatchNorm<S>) {
            bn.weight.value.scalars = [1.4, 0.6, -0.8, 1.1]
            bn.bias.value.scalars = [0.1, -0.3, 0.2, 0]
        }
        typealias Outcome = (y: [[S]], dx: [[S]], state: [[S]], counter: Int64)
        let ranks = try InProcessGroup.run(size: sizes.count) { comm -> Outcome in
            let layer = ShuffleBatchNorm<S>(featureCount: 4, shuffleGroup: comm, seed: 77)
            configure(layer)
            let start = sizes[..<comm.rank].reduce(0, +), range = start..<(start + sizes[comm.rank])
            var outcome: Outcome = ([], [], [], 0)
            for step in steps {
                outcome.y.append(try layer.forward(step.x.slice(samples: range), mode: .training).scalars)
                outcome.dx.append(try layer.backward(step.dy.slice(samples: range)).scalars)
                outcome.state.append(layer.runningMean.value.scalars + layer.runningVariance.value.scalars
                                     + layer.weight.gradient.scalars + layer.bias.gradient.scalars)
            }
            outcome.counter = layer.batchesTracked.value
            return outcome
        }
        // The definition: one BN per rank, fed that rank's share of each step's permuted batch.
        let perRank = sizes.map { _ in BatchNorm<S>(featureCount: 4) }
        perRank.forEach(configure)
        for (t, step) in steps.enumerated() {
            let permutation = ShuffleBatchNorm<S>.permutation(count: total, seed: 77, step: Int64(t))
            var y = [[S]](repeating: [], count: total), dx = y
            var start = 0
            for (v, size) in sizes.enumerated() {
                let samples = Array(permutation[start..<(start + size)])
                start += size
                guard size > 0 else { continue }
                let pick = { (t: Tensor<S>) in Tensor<S>.concatenate(samples.map { t.slice(samples: $0..<($0 + 1)) }, sampleShape: shape) }
                let out = try perRank[v].forward(pick(step.x), mode: .training)
                let back = try perRank[v].backward(pick(step.dy))
                for (j, sample) in samples.enumerated() {
                    y[sample] = Array(out.slice(samples: j..<(j + 1)).scalars)
                    dx[sample] = Array(back.slice(samples: j..<(j + 1)).scalars)
                }
                let bn = perRank[v]
                XCTAssertEqual(ranks[v].state[t], bn.runningMean.value.scalars + bn.runningVariance.value.scalars
                               + bn.weight.gradient.scalars + bn.bias.gradient.scalars, "\(S.self) rank \(v), step \(t): running statistics, dγ, dβ")
            }
            var first = 0
            for (r, size) in sizes.enumerated() {
                XCTAssertEqual(ranks[r].y[t], Array(y[first..<(first + size)].joined()), "\(S.self) rank \(r), step \(t): outputs")
                XCTAssertEqual(ranks[r].dx[t], Array(dx[first..<(first + size)].joined()), "\(S.self) rank \(r), step \(t): dx")
                first += size
            }
        }
        // Rank 1 holds no samples: like BN on an empty batch it counts nothing and keeps its
        // running statistics; the permutation follows the group's largest counter, so it agrees.
        XCTAssertEqual(ranks.map(\.counter), [2, 0, 2, 2])
        XCTAssertEqual(ranks[1].state[1], [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    }
}
