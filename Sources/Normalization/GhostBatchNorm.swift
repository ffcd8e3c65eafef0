import Collectives
import Kernels

/// Ghost batch normalization (Hoffer et al. 2017, "Train longer, generalize better",
/// arXiv 1705.08741): in training, each rank's batch is split into contiguous ghost batches of
/// `ghostBatchSize` samples that are normalized separately; with a sync group, ghost batch j of
/// every rank of the group is normalized together. Normalization batch = ghost size × group size,
/// independent of the SGD batch.
///
/// Every rank uses the same number of ghost batches, `ghostCount` (from the nominal per-rank
/// batch), so that a short last batch leaves some of them empty instead of changing the shape of
/// the collective; all ghost batches' sums travel in one all-reduce in forward and one in backward.
/// The running statistics are updated once per ghost batch, in order (as applying BN to each
/// chunk would). Inference and PreciseBN passes are plain BN.
public final class GhostBatchNorm<Scalar: BatchNormScalar>: BatchNorm<Scalar> {
    public let ghostBatchSize: Int
    public let ghostCount: Int

    private struct Chunk { var range: Range<Int>; var mean: [Double]; var invStd: [Double]; var count: Double }
    private var chunks: [Chunk] = []
    private var savedInput = Tensor<Scalar>(shape: [0])

    public init(featureCount: Int, ghostBatchSize: Int, ghostCount: Int, epsilon: Double = 1e-5, momentum: Double? = 0.1,
                group: (any Communicator)? = nil) {
        precondition(ghostBatchSize > 0 && ghostCount > 0, "GhostBatchNorm: positive ghost batch size and count")
        self.ghostBatchSize = ghostBatchSize
        self.ghostCount = ghostCount
        super.init(featureCount: featureCount, epsilon: epsilon, momentum: momentum, group: group)
    }

    public override func forward(_ input: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        guard mode == .training, !frozen else { return try super.forward(input, mode: mode) }
        let layout = try layout(of: input.shape)
        let n = layout.batch
        guard n <= ghostBatchSize * ghostCount else {
            throw LayerError("GhostBatchNorm: a batch of \(n) exceeds \(ghostCount) ghost batches of \(ghostBatchSize)")
        }
        let shift = Scalar.widened(runningMean.value.scalars)
        let ranges = (0..<ghostCount).map { j in min(j * ghostBatchSize, n)..<min((j + 1) * ghostBatchSize, n) }
        let pieces = ranges.map { input.slice(samples: $0) }
        var packed: [Double] = []
        for (range, piece) in zip(ranges, pieces) {
            packed += BatchStatistics.localSums(piece, layout: ChannelLayout(batch: range.count, channels: featureCount, spatial: layout.spatial), shift: shift)
        }
        if let group { try group.allReduceSum(&packed) }
        let width = 1 + 2 * featureCount
        chunks = []
        var outputs: [Tensor<Scalar>] = []
        for (j, piece) in pieces.enumerated() {
            guard let statistics = BatchStatistics(packedSums: Array(packed[(j * width)..<((j + 1) * width)]), shift: shift) else {
                chunks.append(Chunk(range: ranges[j], mean: [], invStd: [], count: 0))
                outputs.append(piece)
                continue
            }
            try requireMoreThanOneValue(statistics, piece.shape)
            lastStatistics = statistics
            updateRunningStatistics(statistics)
            let invStd = statistics.variance.map { 1 / ($0 + epsilon).squareRoot() }
            chunks.append(Chunk(range: ranges[j], mean: statistics.mean, invStd: invStd, count: statistics.count))
            outputs.append(apply(piece, layout: ChannelLayout(batch: ranges[j].count, channels: featureCount, spatial: layout.spatial),
                                 mean: statistics.mean, invStd: invStd))
        }
        savedInput = input
        return Tensor.concatenate(outputs, sampleShape: Array(input.shape.dropFirst()))
    }

    public override func backward(_ outputGradient: Tensor<Scalar>) throws -> Tensor<Scalar> {
        guard !chunks.isEmpty else { return try super.backward(outputGradient) }
        guard outputGradient.shape == savedInput.shape else {
            throw LayerError("GhostBatchNorm: gradient \(outputGradient.shape) does not match the forward input \(savedInput.shape)")
        }
        let C = featureCount, spatial = ChannelLayout(shape: savedInput.shape)!.spatial
        var local: [Double] = []
        // Per sample [Σdy, Σdy·x̂] with its ghost batch's σ: dβ and dγ along the pairwise tree.
        let N = savedInput.shape[0]
        var leaves = [Double](repeating: 0, count: N * 2 * C)
        for chunk in chunks {
            var sums = [Double](repeating: 0, count: 2 * C)
            if chunk.count > 0 && !chunk.range.isEmpty {
                let dy = outputGradient.slice(samples: chunk.range), x = savedInput.slice(samples: chunk.range)
                dy.scalars.withUnsafeBufferPointer { g in
                    x.scalars.withUnsafeBufferPointer { xp in
                        chunk.mean.withUnsafeBufferPointer { mu in
                            sums.withUnsafeMutableBufferPointer { out in
                                leaves.withUnsafeMutableBufferPointer { l in
                                    Scalar.gradientSums(g, xp, layout: ChannelLayout(batch: chunk.range.count, channels: C, spatial: spatial), mean: mu,
                                                        into: out, leaves: l.baseAddress! + chunk.range.lowerBound * 2 * C)
                                }
                            }
                        }
                    }
                }
                for c in 0..<C {
                    sums[C + c] *= chunk.invStd[c]
                    for n in chunk.range { leaves[n * 2 * C + C + c] *= chunk.invStd[c] }
                }
            }
            local += sums
        }
        leaves.withUnsafeBufferPointer { l in
            bias.gradient = Tensor(shape: [C], scalars: Scalar.pairwiseSum(ofRounded: l.baseAddress!, count: N, width: C, stride: 2 * C))
            weight.gradient = Tensor(shape: [C], scalars: Scalar.pairwiseSum(ofRounded: l.baseAddress! + C, count: N, width: C, stride: 2 * C))
        }
        var global = local
        if let group { try group.allReduceSum(&global) }
        let gamma = Scalar.widened(weight.value.scalars)
        var pieces: [Tensor<Scalar>] = []
        for (j, chunk) in chunks.enumerated() {
            let layout = ChannelLayout(batch: chunk.range.count, channels: C, spatial: spatial)
            let dy = outputGradient.slice(samples: chunk.range)
            guard chunk.count > 0 else { pieces.append(Tensor(shape: dy.shape)); continue }
            var p = [Double](repeating: 0, count: C), q = p, r = p
            for c in 0..<C {
                (p[c], q[c], r[c]) = Self.backwardCoefficients(gamma: gamma[c], invStd: chunk.invStd[c], mean: chunk.mean[c],
                                                                sumDy: global[j * 2 * C + c], sumDyNormalized: global[j * 2 * C + C + c],
                                                                count: chunk.count)
            }
            let x = savedInput.slice(samples: chunk.range)
            pieces.append(.combining(dy, x, layout: layout, dyScale: p, xScale: q, offset: r))
        }
        chunks = []
        return Tensor.concatenate(pieces, sampleShape: Array(savedInput.shape.dropFirst()))
    }
}
