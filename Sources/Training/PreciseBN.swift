import Collectives
import Kernels
import Normalization

/// PreciseBN: replaces every normalization layer's running (EMA) statistics (each
/// ``PopulationSlot`` of a ``NormalizationLayer``) with population statistics
/// computed over a budget of samples (Wu & Johnson 2021, arXiv 2105.07576 §3; the paper finds
/// 10³–10⁴ samples enough, hence the default 8192).
///
/// The model is frozen: every forward runs in `.batchStatistics` mode, which normalizes with the
/// batch statistics (synchronized over the layer's group for SyncBN, exactly as in training) and
/// changes no parameter, buffer, counter or optimizer state. Per layer, a Double
/// ``PopulationStatistics`` accumulates each batch; at the end ONE all-reduce over the packed
/// accumulators of all layers combines the ranks, so every rank writes bitwise the same running
/// statistics (fvcore's PreciseBN does no such reduction and leaves ranks disagreeing). A SyncBN
/// batch is counted once: only rank 0 of each statistics group contributes it. `num_batches_tracked`
/// is left unchanged.
public enum PreciseBN {
    public struct Report: Equatable, Sendable {
        /// Samples the pass covered, over all ranks.
        public let samples: Int
        /// Forward passes (global batches).
        public let batches: Int
    }

    /// Recomputes the population statistics of `network`'s BN layers from `data`.
    ///
    /// - Parameters:
    ///   - sampleBudget: samples over all ranks; rounded down to whole global batches of
    ///     `batchSize × ranks` (at least one), and capped at the data set.
    ///   - batchSize: samples per rank per forward, chosen independently of training.
    ///   - seed: the order of the samples (one permutation, the same on every rank).
    @discardableResult
    public static func recompute(network: Network, data: Dataset, sampleBudget: Int, batchSize: Int,
                                 seed: UInt64, world: any Communicator) throws -> Report {
        precondition(sampleBudget > 0 && batchSize > 0, "PreciseBN needs a positive budget and batch size")
        let slots = network.normalizationLayers.flatMap { $0.layer.populations }
        guard !slots.isEmpty else { return Report(samples: 0, batches: 0) }
        let globalBatch = batchSize * world.size
        guard data.count >= 2 else { throw DataError("PreciseBN needs at least 2 samples, the data has \(data.count)") }
        let covered = min(sampleBudget, data.count)
        let batches = max(covered / globalBatch, 1)
        let order = ShardedSampler.permutation(count: data.count, seed: seed, epoch: 0x5052_4543)

        var accumulators = slots.map { PopulationStatistics(shift: $0.shift()) }
        // A batch of a statistics group is counted once: by the group's rank 0.
        let contributes = slots.map { ($0.group?.rank ?? 0) == 0 }
        var samples = 0
        for b in 0..<batches {
            let start = b * globalBatch, end = min(start + globalBatch, data.count)
            let piece = contiguousPiece(of: end - start, parts: world.size, index: world.rank)
            let indices = order[(start + piece.lowerBound)..<(start + piece.upperBound)]
            let (x, _) = data.batch(indices)
            network.setDomains(data.domains(of: indices))
            network.sampleOffset = piece.lowerBound
            _ = try network.forward(x, mode: .batchStatistics)
            for (index, slot) in slots.enumerated() where contributes[index] {
                if let statistics = slot.last() { accumulators[index].add(statistics) }
            }
            samples += end - start
        }

        var packed = accumulators.flatMap(\.packed)
        try world.allReduceSum(&packed)
        var offset = 0
        for (index, slot) in slots.enumerated() {
            let width = 1 + 2 * slot.featureCount
            let total = PopulationStatistics(packed: packed[offset..<(offset + width)], shift: accumulators[index].shift)
            offset += width
            guard let mean = total.mean, let variance = total.unbiasedVariance else {
                // A domain PreciseBN's samples did not reach keeps its running statistics.
                if slot.mayBeUnreached { continue }
                throw DataError("PreciseBN: a normalization layer saw fewer than 2 values per channel; raise ⟨preciseBNSamples⟩")
            }
            slot.store(mean, variance)
        }
        return Report(samples: samples, batches: batches)
    }
}
