import Collectives
import Kernels

/// Shuffling BN (He et al. 2020, MoCo §3.3): per-rank batch normalization applied to a batch
/// whose samples were permuted across the ranks of `shuffleGroup`, then permuted back. The
/// statistics a rank computes then come from a random mix of the group's samples instead of the
/// ones it was given — breaking what they say about its own samples (information leakage when
/// the samples that share a rank are correlated), at the cost of no synchronized statistics.
///
/// In a training forward every rank gathers the group's batch (all-gather), takes the positions
/// [o_r, o_r + n_r) of one permutation π of it — drawn from (`seed`, the layer's
/// `num_batches_tracked`), the same on every rank, each rank keeping its own sample count — runs
/// BN on them, and a second all-gather brings every output back to the rank and position of its
/// sample. Backward applies the same two permutations to the gradients in reverse (two
/// all-gathers), so dx is exact. Inference and PreciseBN passes are plain per-rank BN. State: BN's.
public final class ShuffleBatchNorm<Scalar: BatchNormScalar>: BatchNorm<Scalar> {
    public let shuffleGroup: any Communicator
    public let seed: UInt64
    private var route: Route?

    /// Where the samples went: π over the group's batch, its inverse, each rank's offset and count.
    struct Route {
        var permutation: [Int]
        var inverse: [Int]
        var offsets: [Int]
        var counts: [Int]
        var sampleSize: Int
        var sampleShape: [Int]
    }

    public init(featureCount: Int, shuffleGroup: any Communicator, seed: UInt64, epsilon: Double = 1e-5, momentum: Double? = 0.1) {
        self.shuffleGroup = shuffleGroup
        self.seed = seed
        super.init(featureCount: featureCount, epsilon: epsilon, momentum: momentum, group: nil)
    }

    /// The permutation of a group batch of `count` samples at BN step `step`.
    public static func permutation(count: Int, seed: UInt64, step: Int64) -> [Int] {
        var random = DeterministicRandom(seed: seed, stream: [0x5348_5546_4C42_4E, UInt64(bitPattern: step)])
        var order = Array(0..<count)
        for i in stride(from: count - 1, to: 0, by: -1) { order.swapAt(i, random.integer(below: i + 1)) }
        return order
    }

    /// All ranks' values of `tensor`, concatenated in rank order (moved, not computed on: Float
    /// travels as Float).
    func gathered(_ tensor: Tensor<Scalar>) throws -> [[Scalar]] {
        if Scalar.self == Float.self { return try shuffleGroup.allGather(tensor.scalars as! [Float]) as! [[Scalar]] }
        return try shuffleGroup.allGather(Scalar.widened(tensor.scalars)).map { Scalar.narrowed($0) }
    }

    /// The samples at `positions` of the group's batch `all` (each rank's part sample-major,
    /// `sampleSize` values per sample; `offsets` the first sample of each part).
    func picking(_ all: [[Scalar]], offsets: [Int], _ positions: [Int], sampleSize: Int, sampleShape: [Int]) -> Tensor<Scalar> {
        Tensor(shape: [positions.count] + sampleShape) { out in
            for (i, p) in positions.enumerated() {
                let part = offsets.lastIndex { $0 <= p }!
                all[part].withUnsafeBufferPointer { source in
                    (out.baseAddress! + i * sampleSize).update(from: source.baseAddress! + (p - offsets[part]) * sampleSize, count: sampleSize)
                }
            }
        }
    }

    public override func forward(_ input: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        guard mode == .training, !frozen else { return try super.forward(input, mode: mode) }
        let sampleShape = Array(input.shape.dropFirst()), sampleSize = sampleShape.reduce(1, *)
        guard sampleSize > 0 else { throw LayerError("ShuffleBatchNorm: samples of shape \(sampleShape) are empty") }
        let counts = try shuffleGroup.allGather([Int64(input.shape[0])]).map { Int($0[0]) }
        let offsets = counts.indices.map { counts[..<$0].reduce(0, +) }
        let total = counts.reduce(0, +), rank = shuffleGroup.rank
        let permutation = Self.permutation(count: total, seed: seed, step: batchesTracked.value)
        var inverse = [Int](repeating: 0, count: total)
        for (position, sample) in permutation.enumerated() { inverse[sample] = position }
        let all = try gathered(input)
        let mine = Array(permutation[offsets[rank]..<(offsets[rank] + counts[rank])])
        let normalized = try super.forward(picking(all, offsets: offsets, mine, sampleSize: sampleSize, sampleShape: sampleShape), mode: .training)
        route = Route(permutation: permutation, inverse: inverse, offsets: offsets, counts: counts, sampleSize: sampleSize, sampleShape: sampleShape)
        // Back to the original samples: the output of sample i sits at position inverse[i].
        let outputs = try gathered(normalized)
        let own = (offsets[rank]..<(offsets[rank] + counts[rank])).map { inverse[$0] }
        return picking(outputs, offsets: offsets, own, sampleSize: sampleSize, sampleShape: sampleShape)
    }

    public override func backward(_ outputGradient: Tensor<Scalar>) throws -> Tensor<Scalar> {
        guard let route else { return try super.backward(outputGradient) }
        self.route = nil
        let rank = shuffleGroup.rank, range = route.offsets[rank]..<(route.offsets[rank] + route.counts[rank])
        // dy of the samples this rank normalized: position p holds sample permutation[p].
        let dy = try gathered(outputGradient)
        let shuffled = picking(dy, offsets: route.offsets, range.map { route.permutation[$0] }, sampleSize: route.sampleSize,
                               sampleShape: route.sampleShape)
        let dz = try gathered(try super.backward(shuffled))
        return picking(dz, offsets: route.offsets, range.map { route.inverse[$0] }, sampleSize: route.sampleSize, sampleShape: route.sampleShape)
    }
}
