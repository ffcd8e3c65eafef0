import Collectives
import Kernels

/// Cross-iteration batch normalization (Yao et al. 2020, "Cross-Iteration Batch Normalization",
/// arXiv 2002.05712): statistics averaged over the current and the last k − 1 iterations, each
/// past iteration's statistics moved to the current weights by a first-order Taylor step.
///
/// For a BN that follows a layer computing x_{i,c} = θ_c·patch_i (a convolution via im2col, or a
/// linear layer; θ is its weight, C × K, and carries no bias — β does that job), each rank keeps
/// per past iteration τ its *local* sums S1 = Σx, S2 = Σx² (per channel), their derivatives
///
///     ∂S1_c/∂θ_c = Σ_i patch_i            (the same K-vector for every c)
///     ∂S2_c/∂θ_c = 2·Σ_i x_{i,c}·patch_i  (row c of one C × K GEMM: X·Patchesᵀ)
///
/// (only the block j = c is non-zero; the full Jacobian is never formed) and θ_τ. At iteration t
/// every entry is compensated, S_τ + ρ·∂S_τ/∂θ·(θ_t − θ_τ); since θ is the same on every rank,
/// the compensated local sums add up to the compensated global ones, and the current sums and all
/// compensated ones travel in ONE all-reduce over the statistics group. Then per channel, with
/// μ = S1/M and ν = S2/M per entry: entries whose compensated variance ν − μ² is negative are
/// dropped (the current batch always counts), μ̄ and ν̄ are averaged over the n_c remaining
/// entries, σ² = ν̄ − μ̄², and x̂ = (x − μ̄)/√(σ² + ε). Gradients flow only through the current
/// iteration's statistics, scaled by 1/n_c (past entries are constants): backward is BN's with
/// M replaced by n_c·M, and issues one all-reduce. The running statistics are the EMA of the
/// current batch alone, as in BN.
///
/// Options: `window` k (entries including the current one; the reference code's default 4),
/// `rho` (scale of the Taylor term; 0 = naive averaging of past statistics), `burnIn`
/// (iterations of plain (Sync)BN before the window is used). Departures from the reference code
/// (github.com/Howal/Cross-iterationBatchNorm, CBN.py): ε inside the square root and the biased
/// variance for normalization, as PyTorch's BatchNorm and the rest of this package; a window that
/// is not yet full is used with the entries it has; statistics synchronized over a group.
///
/// In `.batchStatistics` mode (PreciseBN) and inference it behaves exactly as ``BatchNorm``.
public final class CrossIterationBatchNorm<Scalar: BatchNormScalar>: BatchNorm<Scalar> {
    /// One past iteration as this rank saw it.
    public struct WindowEntry: Equatable {
        public var count: Double
        public var sum: [Double]
        public var sumOfSquares: [Double]
        /// ∂S1_c/∂θ_c (K values, shared by all channels).
        public var sumGradient: [Double]
        /// ∂S2_c/∂θ_c, row c of a C × K matrix.
        public var sumOfSquaresGradient: [Double]
        /// θ at that iteration, C × K.
        public var weight: [Double]
    }

    public let window: Int
    public let rho: Double
    public let burnIn: Int
    public let source: any PatchSource<Scalar>
    /// [iterations, entries, entry…] — rank-local: each rank keeps its own local sums.
    let saved: RankLocalState

    public init(featureCount: Int, source: any PatchSource<Scalar>, window: Int = 4, rho: Double = 1, burnIn: Int = 0,
                epsilon: Double = 1e-5, momentum: Double? = 0.1, group: (any Communicator)? = nil) {
        precondition(window >= 1 && burnIn >= 0 && rho.isFinite, "CrossIterationBatchNorm: window ≥ 1, burn-in ≥ 0, finite rho")
        precondition(source.patchWeight.value.shape.first == featureCount, "the source layer must have \(featureCount) output channels")
        self.window = window
        self.rho = rho
        self.burnIn = burnIn
        self.source = source
        let C = featureCount, K = source.patchWeight.value.count / featureCount, width = 1 + 2 * C + K + 2 * C * K
        saved = RankLocalState([0, 0], validate: { values in
            guard values.count >= 2, values.allSatisfy(\.isFinite), values[0] >= 0, values[0] == values[0].rounded(),
                  values[1] >= 0, values[1] <= Double(window - 1), values[1] == values[1].rounded() else {
                return "is not a cross-iteration window of at most \(window - 1) entries"
            }
            let expected = 2 + Int(values[1]) * width
            return values.count == expected ? nil : "holds \(values.count) values where \(Int(values[1])) window entries of this layer take \(expected)"
        }, emptied: { other in [other.first ?? 0, 0] })
        super.init(featureCount: featureCount, epsilon: epsilon, momentum: momentum, group: group)
    }

    public override var state: [StateEntry<Scalar>] { super.state + [.rankLocal("cbn_window", saved)] }

    /// Training forwards seen so far.
    public var iterations: Int { Int(saved.values[0]) }

    var patchSize: Int { source.patchWeight.value.count / featureCount }

    /// The stored past iterations, most recent first.
    public var entries: [WindowEntry] {
        let C = featureCount, K = patchSize, width = 1 + 2 * C + K + 2 * C * K
        let values = saved.values
        return (0..<Int(values[1])).map { j in
            var offset = 2 + j * width
            func take(_ n: Int) -> [Double] { defer { offset += n }; return Array(values[offset..<(offset + n)]) }
            let count = take(1)[0]
            return WindowEntry(count: count, sum: take(C), sumOfSquares: take(C), sumGradient: take(K),
                               sumOfSquaresGradient: take(C * K), weight: take(C * K))
        }
    }

    func store(iterations: Int, entries: [WindowEntry]) {
        var values: [Double] = [Double(iterations), Double(entries.count)]
        for e in entries {
            values.append(e.count)
            values += e.sum + e.sumOfSquares + e.sumGradient + e.sumOfSquaresGradient + e.weight
        }
        saved.values = values
    }

    /// An entry's local sums moved to `weight`: S + ρ·∂S/∂θ·(θ − θ_τ), per channel.
    public static func compensate(_ entry: WindowEntry, to weight: [Double], rho: Double) -> (sum: [Double], sumOfSquares: [Double]) {
        let C = entry.sum.count, K = entry.sumGradient.count
        var sum = entry.sum, squares = entry.sumOfSquares
        for c in 0..<C {
            var linear = 0.0, quadratic = 0.0
            for k in 0..<K {
                let delta = weight[c * K + k] - entry.weight[c * K + k]
                linear += entry.sumGradient[k] * delta
                quadratic += entry.sumOfSquaresGradient[c * K + k] * delta
            }
            sum[c] += rho * linear
            squares[c] += rho * quadratic
        }
        return (sum, squares)
    }

    /// This rank's raw sums and their derivatives with respect to θ for the current batch.
    func currentEntry(_ input: Tensor<Scalar>, layout: ChannelLayout, weight: [Double]) throws -> WindowEntry {
        let C = featureCount, K = patchSize
        guard let patches = source.lastPatches, patches.batch == layout.batch, patches.patchSize == K,
              patches.positions == layout.spatial else {
            throw LayerError("CrossIterationBatchNorm: its source layer must run the training forward that produced this input")
        }
        let packed = BatchStatistics.localSums(input, layout: layout, shift: [Double](repeating: 0, count: C))
        var sumGradient = Scalar.filled(K, with: 0)
        var squaresGradient = Scalar.filled(C * K, with: 0)
        let P = layout.spatial
        patches.values.withUnsafeBufferPointer { cols in
            sumGradient.withUnsafeMutableBufferPointer { g in
                Scalar.channelSums(cols, layout: ChannelLayout(batch: layout.batch, channels: K, spatial: P), into: g)
            }
            input.scalars.withUnsafeBufferPointer { x in
                squaresGradient.withUnsafeMutableBufferPointer { g in
                    for n in 0..<layout.batch {
                        // ∂S2/∂θ += 2·X_n (C × P) · cols_nᵀ (P × K)
                        Scalar.gemm(transposeA: false, transposeB: true, m: C, n: K, k: P, alpha: 2,
                                    a: x.baseAddress! + n * C * P, lda: P, b: cols.baseAddress! + n * K * P, ldb: P,
                                    beta: 1, c: g.baseAddress!, ldc: K)
                    }
                }
            }
        }
        return WindowEntry(count: packed[0], sum: Array(packed[1...C]), sumOfSquares: Array(packed[(C + 1)...]),
                           sumGradient: Scalar.widened(sumGradient), sumOfSquaresGradient: Scalar.widened(squaresGradient),
                           weight: weight)
    }

    override func trainingStatistics(_ input: Tensor<Scalar>, layout: ChannelLayout) throws -> TrainingNormalization? {
        let iteration = iterations + 1
        guard window > 1, iteration > burnIn else {
            store(iterations: iteration, entries: entries)
            return try super.trainingStatistics(input, layout: layout)
        }
        let C = featureCount
        let weight = Scalar.widened(source.patchWeight.value.scalars)
        let current = try currentEntry(input, layout: layout, weight: weight)
        let past = entries

        // One all-reduce: the current sums and every compensated past entry.
        var packed = [current.count] + current.sum + current.sumOfSquares
        for entry in past {
            let (sum, squares) = Self.compensate(entry, to: weight, rho: rho)
            packed += [entry.count] + sum + squares
        }
        if let group { try group.allReduceSum(&packed) }

        let M = packed[0]
        var stored = [current] + past
        stored.removeLast(max(stored.count - (window - 1), 0))
        guard M > 0 else {
            lastStatistics = nil
            store(iterations: iteration, entries: past)
            return nil
        }
        let mean = (0..<C).map { packed[1 + $0] / M }
        let second = (0..<C).map { packed[1 + C + $0] / M }
        let currentStatistics = BatchStatistics(count: M, mean: mean, variance: (0..<C).map { max(second[$0] - mean[$0] * mean[$0], 0) })
        lastStatistics = currentStatistics
        try requireMoreThanOneValue(currentStatistics, input.shape)

        var meanSum = mean, secondSum = second, valid = [Double](repeating: 1, count: C)
        for j in 0..<past.count {
            let base = (1 + 2 * C) * (j + 1), m = packed[base]
            guard m > 0 else { continue }
            for c in 0..<C {
                let mu = packed[base + 1 + c] / m, nu = packed[base + 1 + C + c] / m
                guard nu - mu * mu >= 0 else { continue }
                meanSum[c] += mu
                secondSum[c] += nu
                valid[c] += 1
            }
        }
        let averageMean = (0..<C).map { meanSum[$0] / valid[$0] }
        let variance = (0..<C).map { max(secondSum[$0] / valid[$0] - averageMean[$0] * averageMean[$0], 0) }
        store(iterations: iteration, entries: stored)
        return TrainingNormalization(mean: averageMean, variance: variance, counts: valid.map { $0 * M }, current: currentStatistics)
    }
}
