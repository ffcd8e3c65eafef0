import Collectives
import Kernels

/// The data-parallel sampling rule (DESIGN §3.3).
///
/// One permutation of the training set per epoch, drawn from (seed, epoch) and identical on every
/// rank. Global batch t of an epoch is the slice [t·G, (t+1)·G) of it, with G = ranks × per-rank
/// batch; the last batch of an epoch may be short. Rank r takes the r-th contiguous piece of the
/// global batch (``contiguousPiece(of:parts:index:)``: sizes differ by at most one, and a rank may
/// get nothing). A last batch of one sample is dropped. A W-rank run with per-rank batch b therefore sees exactly the global batches of a
/// 1-rank run with batch W·b.
public struct ShardedSampler {
    public let sampleCount: Int
    public let globalBatchSize: Int
    public let seed: UInt64
    public let ranks: Int
    public let rank: Int
    /// `--sampler class-sorted`: the labels by which each global batch is ordered before it is cut
    /// into the ranks' pieces, so that each rank's batch holds as few classes as possible (the
    /// global batch is unchanged). nil: the random order.
    public let classSortedLabels: [Int32]?
    private var cachedEpoch = -1
    private var permutation: [Int] = []

    public init(sampleCount: Int, globalBatchSize: Int, seed: UInt64, ranks: Int, rank: Int, classSortedLabels: [Int32]? = nil) {
        precondition(sampleCount > 0 && globalBatchSize > 0 && ranks > 0 && (0..<ranks).contains(rank), "invalid sampler")
        precondition(classSortedLabels.map { $0.count == sampleCount } ?? true, "one label per sample")
        self.classSortedLabels = classSortedLabels
        self.sampleCount = sampleCount
        self.globalBatchSize = globalBatchSize
        self.seed = seed
        self.ranks = ranks
        self.rank = rank
    }

    /// ⌈samples / G⌉, except that a last batch of a single sample is dropped: batch statistics
    /// of one sample are undefined for N×C input (PyTorch raises there too).
    public var stepsPerEpoch: Int {
        let remainder = sampleCount % globalBatchSize
        return max(sampleCount / globalBatchSize + (remainder >= 2 ? 1 : 0), 1)
    }

    /// The epoch's permutation of 0 ..< sampleCount (Fisher–Yates).
    public static func permutation(count: Int, seed: UInt64, epoch: Int) -> [Int] {
        var random = DeterministicRandom(seed: seed, stream: [0x5348_5546, UInt64(epoch)])
        var order = Array(0..<count)
        for i in stride(from: count - 1, to: 0, by: -1) { order.swapAt(i, random.integer(below: i + 1)) }
        return order
    }

    /// What optimizer step `step` (counted from 0 over the whole run) feeds this rank: its sample
    /// indices, the size of the global batch, and the epoch.
    public mutating func batch(step: Int) -> (indices: ArraySlice<Int>, globalCount: Int, epoch: Int) {
        let epoch = step / stepsPerEpoch, within = step % stepsPerEpoch
        if epoch != cachedEpoch {
            permutation = Self.permutation(count: sampleCount, seed: seed, epoch: epoch)
            cachedEpoch = epoch
        }
        let start = within * globalBatchSize, end = min(start + globalBatchSize, sampleCount)
        let piece = contiguousPiece(of: end - start, parts: ranks, index: rank)
        if let labels = classSortedLabels {
            // Stable: equal labels keep the random order.
            let sorted = permutation[start..<end].enumerated().sorted { a, b in
                labels[a.element] != labels[b.element] ? labels[a.element] < labels[b.element] : a.offset < b.offset
            }.map(\.element)
            return (sorted[piece], end - start, epoch)
        }
        return (permutation[(start + piece.lowerBound)..<(start + piece.upperBound)], end - start, epoch)
    }
}
