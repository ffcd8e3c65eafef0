import Collectives
import Kernels

/// Shuffling BN (He et al. 2020, MoCo §3.3): per-rank batch normalization applied to a batch
/// whose samples were permuted across the ranks of `shuffleGroup`, then permuted back. The
/// statistics a rank computes then come from a random mix of the group's samples instead of the
/// ones it was given — breaking what they say about its own samples (information leakage when
/// the samples that share a rank are correlated), at the cost of no synchronized statistics.
///
/// One permutation π of the group's batch per training forward — drawn from (`seed`, the group's
/// largest `num_batches_tracked`), the same on every rank — puts the samples at positions [o_v, o_v + n_v)
/// into rank v's *virtual batch* (each rank keeps its own sample count), which BN normalizes with
/// its own statistics. MoCo moves the activations there and back; here only statistics travel:
/// every rank all-gathers each sample's per-channel plane sums (Σ(x − k), Σ(x − k)², k the plane's
/// first value) with its running mean and counter, computes every virtual batch's statistics
/// along BN's pairwise tree, and normalizes its own samples with those of the batch each one went
/// to. Backward all-gathers each sample's Σdy and Σdy·(x − μ) the same way. That is 2C + C values
/// per sample forward and 2C back instead of the whole activation twice each way, and the numbers
/// are, bit for bit, BN's on the virtual batch moved back: outputs, dx, and on rank v the running
/// statistics and dγ, dβ of virtual batch v. Inference and PreciseBN passes are plain per-rank BN.
/// State: BN's.
public final class ShuffleBatchNorm<Scalar: BatchNormScalar>: BatchNorm<Scalar> {
    public let shuffleGroup: any Communicator
    public let seed: UInt64
    private var route: Route?

    /// What the last training forward computed, for backward.
    struct Route {
        /// Each group sample (in rank order) → its position in the permuted batch, and back.
        var permutation: [Int]
        var offsets: [Int]
        var counts: [Int]
        /// The virtual batch of each of this rank's samples.
        var batchOf: [Int]
        /// Per virtual batch: count M, mean and 1/σ per channel (nil: empty).
        var statistics: [(count: Double, mean: [Double], invStd: [Double])?]
        var input: Tensor<Scalar>
        var layout: ChannelLayout
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

    /// The rank whose part of the group's batch holds each index (a sample or a position).
    static func owners(offsets: [Int], counts: [Int]) -> [Int] {
        var owner = [Int](repeating: 0, count: counts.reduce(0, +))
        for (r, o) in offsets.enumerated() { for i in 0..<counts[r] { owner[o + i] = r } }
        return owner
    }

    /// For every virtual batch v, the group sample at each of its positions as (rank, index).
    static func members(permutation: [Int], offsets: [Int], counts: [Int]) -> [[(rank: Int, index: Int)]] {
        let owner = owners(offsets: offsets, counts: counts)
        return offsets.indices.map { v in
            (offsets[v]..<(offsets[v] + counts[v])).map { p in
                let sample = permutation[p], r = owner[sample]
                return (r, sample - offsets[r])
            }
        }
    }

    public override func forward(_ input: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        guard mode == .training, !frozen else { return try super.forward(input, mode: mode) }
        route = nil
        let layout = try layout(of: input.shape)
        let C = featureCount, N = layout.batch, P = layout.spatial
        guard P > 0 else { throw LayerError("ShuffleBatchNorm: samples of shape \(Array(input.shape.dropFirst())) are empty") }
        // This rank's message: [counter, running mean (C), per sample Σ(x − k) (C), Σ(x − k)² (C), k (C)].
        var message = [Double](repeating: 0, count: 1 + C + N * 3 * C)
        message[0] = Double(batchesTracked.value)
        let runningMeans = Scalar.widened(runningMean.value.scalars)
        for c in 0..<C { message[1 + c] = runningMeans[c] }
        input.scalars.withUnsafeBufferPointer { x in
            var planeSums = [Double](repeating: 0, count: N * 2 * C)
            planeSums.withUnsafeMutableBufferPointer { Scalar.planeShiftedSums(x, layout: layout, into: $0.baseAddress!) }
            for n in 0..<N {
                let m = 1 + C + n * 3 * C
                for c in 0..<C {
                    message[m + c] = planeSums[n * 2 * C + c]
                    message[m + C + c] = planeSums[n * 2 * C + C + c]
                    message[m + 2 * C + c] = Double(x[(n * C + c) * P])
                }
            }
        }
        let parts = try shuffleGroup.allGather(message)
        guard parts.allSatisfy({ $0.count >= 1 + C && ($0.count - 1 - C) % (3 * C) == 0 }) else {
            throw LayerError("ShuffleBatchNorm: the ranks of the shuffle group disagree on the layer's \(C) channels")
        }
        let counts = parts.map { ($0.count - 1 - C) / (3 * C) }
        let offsets = counts.indices.map { counts[..<$0].reduce(0, +) }
        let total = counts.reduce(0, +), rank = shuffleGroup.rank
        let permutation = Self.permutation(count: total, seed: seed, step: Int64(parts.map { $0[0] }.max()!))
        let members = Self.members(permutation: permutation, offsets: offsets, counts: counts)
        // Every virtual batch's statistics, as BN computes them on its rank: each sample's sums
        // moved exactly to that rank's shift K (its running mean), then the pairwise tree.
        var statistics: [BatchStatistics?] = []
        var leaves = [Double](repeating: 0, count: max(counts.max() ?? 0, 1) * 2 * C)
        for (v, batch) in members.enumerated() {
            let shift = Array(parts[v][1..<(1 + C)])
            for (j, sample) in batch.enumerated() {
                let m = 1 + C + sample.index * 3 * C, source = parts[sample.rank]
                for c in 0..<C {
                    let d = source[m + 2 * C + c] - shift[c], s1 = source[m + c], s2 = source[m + C + c]
                    leaves[j * 2 * C + c] = s1 + Double(P) * d
                    leaves[j * 2 * C + C + c] = s2 + 2 * d * s1 + Double(P) * d * d
                }
            }
            leaves.withUnsafeMutableBufferPointer { Double.pairwiseSumInPlace($0.baseAddress!, count: batch.count, width: 2 * C, stride: 2 * C) }
            let packed = [Double(batch.count * P)] + (batch.isEmpty ? [Double](repeating: 0, count: 2 * C) : Array(leaves[0..<(2 * C)]))
            statistics.append(BatchStatistics(packedSums: packed, shift: shift))
        }
        // Every rank refuses the same too-small virtual batch, not only the rank that holds it.
        for (v, s) in statistics.enumerated() { try requireMoreThanOneValue(s, [counts[v]] + Array(input.shape.dropFirst())) }
        lastStatistics = statistics[rank]
        if let own = statistics[rank] { updateRunningStatistics(own) }
        let normalizers = statistics.map { s in s.map { (count: $0.count, mean: $0.mean, invStd: $0.variance.map { 1 / ($0 + epsilon).squareRoot() }) } }
        var positionOf = [Int](repeating: 0, count: total)
        for (p, sample) in permutation.enumerated() { positionOf[sample] = p }
        let owner = Self.owners(offsets: offsets, counts: counts)
        let batchOf = (0..<N).map { owner[positionOf[offsets[rank] + $0]] }
        route = Route(permutation: permutation, offsets: offsets, counts: counts, batchOf: batchOf, statistics: normalizers,
                      input: input, layout: layout)
        // y = a·x + b per sample and channel with its virtual batch's a = γ/σ, b = β − μ·a (BN's apply).
        let gamma = Scalar.widened(weight.value.scalars), beta = Scalar.widened(bias.value.scalars)
        var scale = [Double](repeating: 0, count: N * C), offset = scale
        for n in 0..<N {
            let s = normalizers[batchOf[n]]!
            for c in 0..<C {
                scale[n * C + c] = gamma[c] * s.invStd[c]
                offset[n * C + c] = beta[c] - s.mean[c] * scale[n * C + c]
            }
        }
        return .affine(input, layout: ChannelLayout(batch: 1, channels: N * C, spatial: P), scale: scale, offset: offset)
    }

    public override func backward(_ outputGradient: Tensor<Scalar>) throws -> Tensor<Scalar> {
        guard let route else { return try super.backward(outputGradient) }
        self.route = nil
        let layout = route.layout, C = featureCount, N = layout.batch, P = layout.spatial, rank = shuffleGroup.rank
        guard outputGradient.shape == route.input.shape else {
            throw LayerError("ShuffleBatchNorm: gradient \(outputGradient.shape) does not match the forward input \(route.input.shape)")
        }
        // Per own sample and channel Σdy and Σdy·(x − μ), μ the mean of the sample's virtual batch.
        let planes = ChannelLayout(batch: 1, channels: N * C, spatial: P)
        let planeMeans = (0..<(N * C)).map { route.statistics[route.batchOf[$0 / C]]!.mean[$0 % C] }
        var planeSums = [Double](repeating: 0, count: 2 * N * C)
        outputGradient.scalars.withUnsafeBufferPointer { dy in
            route.input.scalars.withUnsafeBufferPointer { x in
                planeMeans.withUnsafeBufferPointer { mu in
                    planeSums.withUnsafeMutableBufferPointer { Scalar.planeGradientSums(dy, x, layout: planes, mean: mu, into: $0.baseAddress!) }
                }
            }
        }
        let parts = try shuffleGroup.allGather(planeSums)
        guard parts.indices.allSatisfy({ parts[$0].count == 2 * C * route.counts[$0] }) else {
            throw LayerError("ShuffleBatchNorm: a rank's gradient does not match its forward batch")
        }
        let members = Self.members(permutation: route.permutation, offsets: route.offsets, counts: route.counts)
        let gamma = Scalar.widened(weight.value.scalars)
        // Per virtual batch that one of this rank's samples went to (and this rank's own, for
        // dγ and dβ): its per-sample leaves in position order, summed along BN's tree.
        var coefficients = [(p: [Double], q: [Double], r: [Double])?](repeating: nil, count: members.count)
        for v in Set(route.batchOf + [rank]) {
            let batch = members[v], count = route.counts[v]
            var leaves = [Double](repeating: 0, count: max(count, 1) * 2 * C)
            for (j, sample) in batch.enumerated() {
                let source = parts[sample.rank], n = sample.index, K = route.counts[sample.rank]
                for c in 0..<C {
                    leaves[j * 2 * C + c] = source[n * C + c]
                    leaves[j * 2 * C + C + c] = source[K * C + n * C + c]
                }
            }
            guard let s = route.statistics[v] else {
                if v == rank {
                    bias.gradient = Tensor(shape: [C])
                    weight.gradient = Tensor(shape: [C])
                }
                continue
            }
            if v == rank {
                leaves.withUnsafeBufferPointer { l in
                    bias.gradient = Tensor(shape: [C], scalars: Scalar.pairwiseSum(ofRounded: l.baseAddress!, count: count, width: C, stride: 2 * C))
                    weight.gradient = Tensor(shape: [C], scalars: Scalar.pairwiseSum(ofRounded: l.baseAddress! + C, count: count, width: C,
                                                                                     stride: 2 * C, scale: s.invStd))
                }
            }
            leaves.withUnsafeMutableBufferPointer { Double.pairwiseSumInPlace($0.baseAddress!, count: count, width: 2 * C, stride: 2 * C) }
            var p = [Double](repeating: 0, count: C), q = p, r = p
            for c in 0..<C {
                (p[c], q[c], r[c]) = Self.backwardCoefficients(gamma: gamma[c], invStd: s.invStd[c], mean: s.mean[c], sumDy: leaves[c],
                                                                sumDyNormalized: leaves[C + c] * s.invStd[c], count: s.count)
            }
            coefficients[v] = (p, q, r)
        }
        var p = [Double](repeating: 0, count: N * C), q = p, r = p
        for n in 0..<N {
            let k = coefficients[route.batchOf[n]]!
            for c in 0..<C { (p[n * C + c], q[n * C + c], r[n * C + c]) = (k.p[c], k.q[c], k.r[c]) }
        }
        return .combining(outputGradient, route.input, layout: planes, dyScale: p, xScale: q, offset: r)
    }
}
