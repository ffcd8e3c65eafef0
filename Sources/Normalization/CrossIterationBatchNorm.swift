import Collectives
import Foundation
import Kernels

/// Cross-iteration batch normalization (Yao et al. 2020, "Cross-Iteration Batch Normalization",
/// arXiv 2002.05712): statistics averaged over the current and the last k − 1 iterations, each
/// past iteration's statistics moved to the current weights by a first-order Taylor step.
///
/// For a BN that follows a layer computing x_{i,c} = θ_c·patch_i (a convolution via im2col, or a
/// linear layer; θ is its weight, C × K, and carries no bias — β does that job), the window keeps
/// per past iteration τ the group's sums S1 = Σx, S2 = Σx² (per channel), their derivatives
///
///     ∂S1_c/∂θ_c = Σ_i patch_i            (the same K-vector for every c)
///     ∂S2_c/∂θ_c = 2·Σ_i x_{i,c}·patch_i  (row c of one C × K GEMM: X·Patchesᵀ)
///
/// (only the block j = c is non-zero; the full Jacobian is never formed) and θ_τ — the same values
/// on every rank of the group. The derivatives come out of the source's backward as this rank's
/// share and are summed over the group in the next forward's single all-reduce, beside the current
/// sums (or before a checkpoint, ``reduceWindowDerivatives()``). At iteration t every entry is
/// compensated, S_τ + ρ·∂S_τ/∂θ·(θ_t − θ_τ), by every rank alike, without communication. Every sum
/// over samples is the pairwise tree of the exactness contract, so the window does not depend on
/// how the batch was split over ranks. Then per channel, with
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
/// Where gradients flow (`gradient`):
/// - `.current` (the reference code): only through the current iteration's statistics, as above;
///   the compensation term ρ·∂S_τ/∂θ·(θ_t − θ_τ) uses a detached θ_t.
/// - `.compensated`: also through θ_t in every past entry's compensation term, with ∂S_τ/∂θ and
///   θ_τ held constant. With G_μ = ∂L/∂μ̄ and G_ν = ∂L/∂ν̄ (computed from the same all-reduced
///   Σdy and Σdy·x̂ the input gradient uses; see `gradientSumsReduced`), the feeding layer's
///   weight gradient gains, per channel c,
///
///       Σ_{τ kept for c} ρ/(n_c·M_τ) · (G_μ,c·∂S1_τ/∂θ_c + G_ν,c·∂S2_τ,c/∂θ_c),
///
///   computed by every rank alike from the group's window and added once, after the gradient
///   exchange (``Parameter/applyPendingGradient()``). This
///   makes the layer's output invariant to the scale of θ in backward as well as in forward, as
///   BN is; with `.current` the gradient sees only 1/n of the statistics' dependence on θ.
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

        /// The entry as the window stores it: count, S1, S2, ∂S1/∂θ, ∂S2/∂θ, θ.
        var storedValues: [Double] { [count] + sum + sumOfSquares + sumGradient + sumOfSquaresGradient + weight }
    }

    public let window: Int
    public let rho: Double
    public let burnIn: Int
    public let gradient: CrossIterationGradient
    public let source: any PatchSource<Scalar>
    /// [iterations, entries, entry…] — rank-local: each rank keeps its own local sums.
    let saved: RankLocalState
    /// What the last training forward used from the window, for `.compensated` backward.
    private var lastWindow: UsedWindow?
    /// The source, when it is a bias-free convolution: then the newest entry's derivatives come
    /// out of that convolution's backward GEMM together with its weight gradient (see
    /// ``Conv2d/patchStatisticsReceiver``) instead of a GEMM of their own in forward.
    private let fusedSource: Conv2d<Scalar>?
    /// The iteration whose entry (the newest) still waits for its derivatives from the source's
    /// backward. An entry whose backward never came (a training forward without backward) is
    /// left out of the window.
    private var pendingIteration: Int?
    /// θ_t widened to Double, for one training forward (borrowed from the scratch pool).
    private var theta: [Double] = []
    /// Window measurements summed over training forwards since the last ``takeDiagnostics()``.
    private var diagnosticSums = CrossIterationDiagnostics()

    struct UsedWindow {
        /// The iteration whose forward used the window.
        var iteration: Int
        /// Past entries 0 ..< retained are still stored, one slot further back (the current entry
        /// went in front); the derivatives of those the push dropped (the oldest, once the window
        /// is full) are kept here: ∂S1/∂θ (K values) and ∂S2/∂θ (C × K) each.
        var retained: Int
        var dropped: [(sum: [Double], sumOfSquares: [Double])]
        /// M_τ over the group, per past entry.
        var counts: [Double]
        /// kept[j][c]: entry j counts for channel c.
        var kept: [[Bool]]
        /// n_c, the current entry included.
        var entryCounts: [Double]
        /// Channels whose window variance ν̄ − μ̄² was negative and clamped to 0.
        var clamped: [Bool]
    }

    public init(featureCount: Int, source: any PatchSource<Scalar>, window: Int = 4, rho: Double = 1, burnIn: Int = 0,
                gradient: CrossIterationGradient = .current,
                epsilon: Double = 1e-5, momentum: Double? = 0.1, group: (any Communicator)? = nil) {
        precondition(window >= 1 && burnIn >= 0 && rho.isFinite, "CrossIterationBatchNorm: window ≥ 1, burn-in ≥ 0, finite rho")
        precondition(source.patchWeight.value.shape.first == featureCount, "the source layer must have \(featureCount) output channels")
        self.window = window
        self.rho = rho
        self.burnIn = burnIn
        self.gradient = gradient
        self.source = source
        let C = featureCount, K = source.patchWeight.value.count / featureCount, width = 1 + 2 * C + K + 2 * C * K
        saved = RankLocalState([0, 0], validate: { values in
            // The iteration counter becomes an Int: beyond 2⁵² it is neither exact nor convertible.
            guard values.count >= 2, values.allSatisfy(\.isFinite), values[0] >= 0, values[0] <= 0x1p52, values[0] == values[0].rounded(),
                  values[1] >= 0, values[1] <= Double(window - 1), values[1] == values[1].rounded() else {
                return "is not a cross-iteration window of at most \(window - 1) entries"
            }
            let expected = 2 + Int(values[1]) * width
            return values.count == expected ? nil : "holds \(values.count) values where \(Int(values[1])) window entries of this layer take \(expected)"
        }, emptied: { other in [other.first ?? 0, 0] })
        if let conv = source as? Conv2d<Scalar>, conv.bias == nil {
            conv.providesPatchStatistics = true
            fusedSource = conv
        } else {
            fusedSource = nil
        }
        super.init(featureCount: featureCount, epsilon: epsilon, momentum: momentum, group: group)
    }

    public override var state: [StateEntry<Scalar>] { super.state + [.rankLocal("cbn_window", saved)] }

    /// Training forwards seen so far.
    public var iterations: Int { Int(saved.values[0]) }

    var patchSize: Int { source.patchWeight.value.count / featureCount }

    /// The stored past iterations, most recent first (without one whose derivatives never came).
    public var entries: [WindowEntry] {
        let C = featureCount, K = patchSize, width = 1 + 2 * C + K + 2 * C * K
        let values = saved.values
        let skip = pendingIteration == iterations ? 1 : 0
        return (skip..<Int(values[1])).map { j in
            var offset = 2 + j * width
            func take(_ n: Int) -> [Double] { defer { offset += n }; return Array(values[offset..<(offset + n)]) }
            let count = take(1)[0]
            return WindowEntry(count: count, sum: take(C), sumOfSquares: take(C), sumGradient: take(K),
                               sumOfSquaresGradient: take(C * K), weight: take(C * K))
        }
    }

    /// An entry's local sums moved to `weight`: S + ρ·∂S/∂θ·(θ − θ_τ), per channel.
    public static func compensate(_ entry: WindowEntry, to weight: [Double], rho: Double) -> (sum: [Double], sumOfSquares: [Double]) {
        let C = entry.sum.count
        var compensated = [Double](repeating: 0, count: 2 * C)
        entry.storedValues.withUnsafeBufferPointer { v in
            weight.withUnsafeBufferPointer { theta in
                compensated.withUnsafeMutableBufferPointer { target in
                    compensate(stored: v.baseAddress!, channels: C, patchSize: entry.sumGradient.count, to: theta.baseAddress!, rho: rho,
                               into: target.baseAddress!)
                }
            }
        }
        return (Array(compensated[..<C]), Array(compensated[C...]))
    }

    /// The same for an entry laid out as the window stores it (``WindowEntry/storedValues``),
    /// read in place: writes the compensated S1 (C values) and then S2 (C values) to `target`.
    static func compensate(stored v: UnsafePointer<Double>, channels C: Int, patchSize K: Int, to theta: UnsafePointer<Double>,
                           rho: Double, into target: UnsafeMutablePointer<Double>) {
        let sumGradient = v + 1 + 2 * C, squaresGradient = sumGradient + K, weight = squaresGradient + C * K
        for c in 0..<C {
            var linear = 0.0, quadratic = 0.0
            for k in 0..<K {
                let delta = theta[c * K + k] - weight[c * K + k]
                linear += sumGradient[k] * delta
                quadratic += squaresGradient[c * K + k] * delta
            }
            target[c] = v[1 + c] + rho * linear
            target[C + c] = v[1 + C + c] + rho * quadratic
        }
    }

    /// This rank's raw sums and their derivatives with respect to θ for the current batch, from
    /// the patches of the source's last forward: per sample n, ∂S1/∂θ_c gets Σ_p patch_{n,p} and
    /// ∂S2/∂θ gets 2·X_n·Patches_nᵀ (one C × K × P GEMM, the same shape for every sample), and the
    /// samples are added along the pairwise tree in Double.
    func currentEntry(_ input: Tensor<Scalar>, layout: ChannelLayout, weight: [Double]) throws -> WindowEntry {
        let C = featureCount, K = patchSize
        guard let patches = source.lastPatches, patches.batch == layout.batch, patches.patchSize == K,
              patches.positions == layout.spatial else {
            throw LayerError("CrossIterationBatchNorm: its source layer must run the training forward that produced this input")
        }
        let packed = BatchStatistics.localSums(input, layout: layout, shift: [Double](repeating: 0, count: C))
        let N = layout.batch, P = layout.spatial, M = N * P
        var tree = PairwiseAccumulator<Double>(width: K + C * K)
        var product = Scalar.filled(C * K, with: 0)
        patches.values.withUnsafeBufferPointer { cols in
            input.scalars.withUnsafeBufferPointer { x in
                product.withUnsafeMutableBufferPointer { g in
                    for n in 0..<N {
                        if patches.positionMajor {
                            // One patch per sample (a linear layer): x_n ⊗ patch_n.
                            for c in 0..<C { for k in 0..<K { g[c * K + k] = x[n * C + c] * cols[n * K + k] } }
                        } else {
                            Scalar.gemm(transposeA: false, transposeB: true, m: C, n: K, k: P, alpha: 1, a: x.baseAddress! + n * C * P, lda: P,
                                        b: cols.baseAddress! + n * P, ldb: M, beta: 0, c: g.baseAddress!, ldc: K)
                        }
                        tree.add { leaf in
                            for k in 0..<K {
                                var total = 0.0
                                if patches.positionMajor {
                                    total = Double(cols[n * K + k])
                                } else {
                                    for p in 0..<P { total += Double(cols[k * M + n * P + p]) }
                                }
                                leaf[k] = total
                            }
                            for i in 0..<(C * K) { leaf[K + i] = 2 * Double(g[i]) }
                        }
                    }
                }
            }
        }
        var derivatives = [Double](repeating: 0, count: K + C * K)
        derivatives.withUnsafeMutableBufferPointer { tree.total(into: $0.baseAddress!) }
        return WindowEntry(count: packed[0], sum: Array(packed[1...C]), sumOfSquares: Array(packed[(C + 1)...]),
                           sumGradient: Array(derivatives[0..<K]), sumOfSquaresGradient: Array(derivatives[K...]), weight: weight)
    }

    /// The iteration whose stored entry (the newest) holds this rank's own derivative sums, not
    /// yet summed over the group; nil when every stored entry is the group's.
    private var localDerivativesIteration: Int?

    /// Sums the newest entry's derivatives over the group if they are still this rank's own, so
    /// that every rank stores the same window (the group's sums, which is what a checkpoint keeps
    /// and a resume on another number of ranks can use). Collective over the group; the trainer
    /// calls it before writing a checkpoint. The next forward does it otherwise.
    public func reduceWindowDerivatives() throws {
        guard let iteration = localDerivativesIteration else { return }
        localDerivativesIteration = nil
        guard let group, iteration == iterations, Int(saved.values[1]) >= 1 else { return }
        let C = featureCount, K = patchSize, base = derivativeOffset(slot: 0)
        var derivatives = Array(saved.values[base..<(base + K + C * K)])
        try group.allReduceSum(&derivatives)
        saved.values.replaceSubrange(base..<(base + K + C * K), with: derivatives)
    }

    /// Values per stored entry: count, S1 (C), S2 (C), ∂S1/∂θ (K), ∂S2/∂θ (C·K), θ (C·K).
    var entryWidth: Int { 1 + 2 * featureCount + patchSize + 2 * featureCount * patchSize }

    /// Where stored entry `slot`'s ∂S1/∂θ starts in the window's values (∂S2/∂θ follows K later).
    func derivativeOffset(slot: Int) -> Int { 2 + slot * entryWidth + 1 + 2 * featureCount }

    /// Removes the newest stored entry when its derivatives never came (no backward ran).
    private func dropUnfinishedEntry() {
        guard pendingIteration == iterations, Int(saved.values[1]) >= 1 else { return }
        let stored = Int(saved.values[1])
        saved.values.removeSubrange(2..<(2 + entryWidth))
        saved.values[1] = Double(stored - 1)
        pendingIteration = nil
    }

    /// The window after this iteration, in place: the entries move one slot back (the oldest
    /// falls off at k − 1) and `write` fills slot 0 — no per-step decoding or re-encoding of
    /// the stored derivatives.
    private func push(iteration: Int, _ write: (UnsafeMutablePointer<Double>) -> Void) {
        let width = entryWidth, old = Int(saved.values[1]), new = min(old + 1, window - 1)
        if saved.values.count < 2 + new * width { saved.values += [Double](repeating: 0, count: 2 + new * width - saved.values.count) }
        saved.values.withUnsafeMutableBufferPointer { v in
            let slot0 = v.baseAddress! + 2
            if new > 1 { memmove(slot0 + width, slot0, (new - 1) * width * MemoryLayout<Double>.stride) }
            write(slot0)
            v[0] = Double(iteration)
            v[1] = Double(new)
        }
    }

    public override func trainingStatistics(_ input: Tensor<Scalar>, layout: ChannelLayout) throws -> TrainingNormalization? {
        let iteration = iterations + 1
        lastWindow = nil
        dropUnfinishedEntry()
        guard window > 1, iteration > burnIn else {
            saved.values[0] = Double(iteration)
            pendingIteration = nil
            return try super.trainingStatistics(input, layout: layout)
        }
        let C = featureCount, K = patchSize, width = entryWidth
        // θ_t in Double (C × K values), in a buffer lent for this forward: the layers take turns.
        theta = Double.scratchArrays.take(atLeast: C * K)
        defer { Double.scratchArrays.giveBack(&theta) }
        source.patchWeight.value.scalars.withUnsafeBufferPointer { w in
            theta.withUnsafeMutableBufferPointer { Scalar.widen(w.baseAddress!, count: C * K, into: $0.baseAddress!) }
        }
        let pastCount = Int(saved.values[1])
        // The current local sums, and their derivatives unless the convolution's backward gives
        // them (receivePatchStatistics writes them into the stored entry then).
        let current: (count: Double, sum: ArraySlice<Double>, sumOfSquares: ArraySlice<Double>)
        var currentDerivatives: WindowEntry?
        if let conv = fusedSource {
            guard conv.pendingTrainingBatch == layout.batch, conv.lastGeometry?.positions == layout.spatial else {
                throw LayerError("CrossIterationBatchNorm: its source layer must run the training forward that produced this input")
            }
            let packed = BatchStatistics.localSums(input, layout: layout, shift: [Double](repeating: 0, count: C))
            current = (packed[0], packed[1...C], packed[(C + 1)...])
        } else {
            let entry = try currentEntry(input, layout: layout, weight: Array(theta[0..<(C * K)]))
            current = (entry.count, entry.sum[...], entry.sumOfSquares[...])
            currentDerivatives = entry
        }

        // One all-reduce: the current sums and, while they are still this rank's own, the newest
        // stored entry's derivatives. Every stored entry is then the group's, and every rank moves
        // it to θ_t alike (θ is the same everywhere), so the compensated sums need no reduction.
        let reduceNewest = group != nil && localDerivativesIteration != nil && localDerivativesIteration == iterations && pastCount >= 1
        localDerivativesIteration = nil
        let derivativeBase = derivativeOffset(slot: 0), derivativeCount = K + C * K
        var packed = [Double](repeating: 0, count: 1 + 2 * C + (reduceNewest ? derivativeCount : 0))
        packed[0] = current.count
        for c in 0..<C {
            packed[1 + c] = current.sum[current.sum.startIndex + c]
            packed[1 + C + c] = current.sumOfSquares[current.sumOfSquares.startIndex + c]
        }
        if reduceNewest {
            packed.replaceSubrange((1 + 2 * C)..., with: saved.values[derivativeBase..<(derivativeBase + derivativeCount)])
        }
        if let group { try group.allReduceSum(&packed) }
        if reduceNewest {
            saved.values.replaceSubrange(derivativeBase..<(derivativeBase + derivativeCount), with: packed[(1 + 2 * C)...])
            packed.removeLast(derivativeCount)
        }
        packed += [Double](repeating: 0, count: (1 + 2 * C) * pastCount)
        var taylorChange = 0.0, taylorSize = 0.0
        saved.values.withUnsafeBufferPointer { v in
            theta.withUnsafeBufferPointer { theta in
                packed.withUnsafeMutableBufferPointer { p in
                    for j in 0..<pastCount {
                        let entry = v.baseAddress! + 2 + j * width, out = p.baseAddress! + (1 + 2 * C) * (j + 1)
                        out[0] = entry[0]
                        Self.compensate(stored: entry, channels: C, patchSize: K, to: theta.baseAddress!, rho: rho, into: out + 1)
                        for c in 0..<C {
                            taylorChange += abs(out[1 + C + c] - entry[1 + C + c])
                            taylorSize += abs(entry[1 + C + c])
                        }
                    }
                }
            }
        }

        let M = packed[0]
        guard M > 0 else {
            lastStatistics = nil
            saved.values[0] = Double(iteration)
            pendingIteration = nil
            return nil
        }
        let mean = (0..<C).map { packed[1 + $0] / M }
        let second = (0..<C).map { packed[1 + C + $0] / M }
        let currentStatistics = BatchStatistics(count: M, mean: mean, variance: (0..<C).map { max(second[$0] - mean[$0] * mean[$0], 0) })
        lastStatistics = currentStatistics
        try requireMoreThanOneValue(currentStatistics, input.shape)

        var meanSum = mean, secondSum = second, valid = [Double](repeating: 1, count: C)
        var kept = [[Bool]](repeating: [Bool](repeating: false, count: C), count: pastCount)
        for j in 0..<pastCount {
            let base = (1 + 2 * C) * (j + 1), m = packed[base]
            guard m > 0 else { continue }
            for c in 0..<C {
                let mu = packed[base + 1 + c] / m, nu = packed[base + 1 + C + c] / m
                guard nu - mu * mu >= 0 else { continue }
                meanSum[c] += mu
                secondSum[c] += nu
                valid[c] += 1
                kept[j][c] = true
            }
        }
        let averageMean = (0..<C).map { meanSum[$0] / valid[$0] }
        let rawVariance = (0..<C).map { secondSum[$0] / valid[$0] - averageMean[$0] * averageMean[$0] }
        let variance = rawVariance.map { max($0, 0) }
        if gradient == .compensated && rho != 0 && pastCount > 0 {
            // Backward reads the past entries' derivatives where they stay stored; only those the
            // push below drops are copied (θ_τ is not needed).
            let retained = min(pastCount, window - 2)
            let dropped = (retained..<pastCount).map { j -> (sum: [Double], sumOfSquares: [Double]) in
                let start = derivativeOffset(slot: j)
                return (Array(saved.values[start..<(start + K)]), Array(saved.values[(start + K)..<(start + K + C * K)]))
            }
            lastWindow = UsedWindow(iteration: iteration, retained: retained, dropped: dropped, counts: (0..<pastCount).map { packed[(1 + 2 * C) * ($0 + 1)] }, kept: kept,
                                    entryCounts: valid, clamped: rawVariance.map { $0 < 0 })
        }
        recordDiagnostics(pastCount: pastCount, taylorFraction: taylorSize > 0 ? taylorChange / taylorSize : 0, kept: valid,
                          variance: variance, current: currentStatistics.variance)
        // The group's sums, the derivatives (zero until the backward brings them) and θ_t.
        push(iteration: iteration) { slot in
            packed.withUnsafeBufferPointer { slot.update(from: $0.baseAddress!, count: 1 + 2 * C) }
            let derivatives = slot + 1 + 2 * C
            if let entry = currentDerivatives {
                entry.sumGradient.withUnsafeBufferPointer { derivatives.update(from: $0.baseAddress!, count: K) }
                entry.sumOfSquaresGradient.withUnsafeBufferPointer { (derivatives + K).update(from: $0.baseAddress!, count: C * K) }
            } else {
                derivatives.update(repeating: 0, count: K + C * K)
            }
            theta.withUnsafeBufferPointer { (derivatives + K + C * K).update(from: $0.baseAddress!, count: C * K) }
        }
        if fusedSource == nil { localDerivativesIteration = iteration }
        if let conv = fusedSource {
            pendingIteration = iteration
            conv.patchStatisticsReceiver = { [weak self] patchSum, products in self?.receivePatchStatistics(patchSum, products, for: iteration) }
        } else {
            pendingIteration = nil
        }
        return TrainingNormalization(mean: averageMean, variance: variance, counts: valid.map { $0 * M }, current: currentStatistics)
    }

    /// `.compensated`: the compensation term's gradient with respect to the feeding layer's
    /// weight, handed to that layer as its pending gradient. For x̂ = (x − μ̄)/√(ν̄ − μ̄² + ε) with
    /// s = 1/√(σ² + ε) and dx̂ = γ·dy summed over the group:
    /// G_μ = −s·Σdx̂ + μ̄·s²·Σdx̂·x̂ and G_ν = −½·s²·Σdx̂·x̂ (G_μ = −s·Σdx̂, G_ν = 0 where σ² was clamped).
    public override func gradientSumsReduced(_ sums: [Double]) throws {
        guard let used = lastWindow else { return }
        lastWindow = nil
        let C = featureCount, K = patchSize
        guard iterations == used.iteration, Int(saved.values[1]) >= used.retained + 1 else {
            throw LayerError("CrossIterationBatchNorm: the window changed between the training forward and its backward")
        }
        let gamma = Scalar.widened(weight.value.scalars)
        var pending = source.patchWeight.pendingGradient ?? [Double](repeating: 0, count: C * K)
        source.patchWeight.pendingGradient = nil   // pending's storage is then its own: no copy
        pending.withUnsafeMutableBufferPointer { pending in saved.values.withUnsafeBufferPointer { v in
            // Past entry j's ∂S1/∂θ and ∂S2/∂θ: in its slot (j + 1 now) or among the dropped.
            func derivatives(_ j: Int, _ body: (UnsafePointer<Double>, UnsafePointer<Double>) -> Void) {
                if j < used.retained {
                    let start = v.baseAddress! + derivativeOffset(slot: j + 1)
                    body(start, start + K)
                } else {
                    let d = used.dropped[j - used.retained]
                    d.sum.withUnsafeBufferPointer { s in d.sumOfSquares.withUnsafeBufferPointer { body(s.baseAddress!, $0.baseAddress!) } }
                }
            }
            for c in 0..<C {
                let s = invStd[c], sumDx = gamma[c] * sums[c], sumDxX = gamma[c] * sums[C + c]
                let gMean = used.clamped[c] ? -s * sumDx : -s * sumDx + lastMean[c] * s * s * sumDxX
                let gSecond = used.clamped[c] ? 0 : -0.5 * s * s * sumDxX
                for j in used.kept.indices where used.kept[j][c] {
                    let factor = rho / (used.entryCounts[c] * used.counts[j])
                    let a = factor * gMean, b = factor * gSecond
                    derivatives(j) { sumGradient, sumOfSquaresGradient in
                        let row = pending.baseAddress! + c * K, squares = sumOfSquaresGradient + c * K
                        for k in 0..<K { row[k] += a * sumGradient[k] + b * squares[k] }
                    }
                }
            }
        } }
        source.patchWeight.pendingGradient = pending
        // Per-rank statistics give every rank its own term, which the gradient exchange sums.
        source.patchWeight.pendingGradientIsLocal = group == nil
    }

    /// The newest entry's derivatives, from the source convolution's backward:
    /// ∂S1/∂θ_c = Σ_i patch_i and ∂S2/∂θ_c = 2·Σ_i x_{i,c}·patch_i, written into the stored window.
    func receivePatchStatistics(_ patchSum: UnsafeBufferPointer<Double>, _ products: UnsafeBufferPointer<Double>, for iteration: Int) {
        guard pendingIteration == iteration, iterations == iteration, Int(saved.values[1]) >= 1 else { return }
        let C = featureCount, K = patchSize
        precondition(patchSum.count == K && products.count == C * K, "patch statistics of the wrong size")
        let base = derivativeOffset(slot: 0)
        saved.values.withUnsafeMutableBufferPointer { v in
            for k in 0..<K { v[base + k] = patchSum[k] }
            for i in 0..<(C * K) { v[base + K + i] = 2 * products[i] }
        }
        pendingIteration = nil
        localDerivativesIteration = iteration
    }

    func recordDiagnostics(pastCount: Int, taylorFraction: Double, kept: [Double], variance: [Double], current: [Double]) {
        let C = featureCount
        diagnosticSums.forwards += 1
        diagnosticSums.entriesKept += kept.reduce(0, +) / Double(C)
        if pastCount > 0 {
            diagnosticSums.windowForwards += 1
            diagnosticSums.droppedFraction += 1 - (kept.reduce(0, +) / Double(C) - 1) / Double(pastCount)
            diagnosticSums.taylorFraction += taylorFraction
        }
        var ratio = 0.0
        for c in 0..<C { ratio += (variance[c] + epsilon) / (current[c] + epsilon) }
        diagnosticSums.varianceRatio += ratio / Double(C)
    }

    public override func settlePendingStatistics() throws { try reduceWindowDerivatives() }

    /// γ's norm and the window measurements since the last call (which this resets).
    public override func diagnostics() -> [String: Double]? {
        (super.diagnostics() ?? [:]).merging(takeDiagnostics().averages) { $1 }
    }

    /// The window measurements averaged over the training forwards since the last call, and reset.
    public func takeDiagnostics() -> CrossIterationDiagnostics {
        defer { diagnosticSums = CrossIterationDiagnostics() }
        return diagnosticSums
    }
}

/// Where cross-iteration BN's gradients flow; see ``CrossIterationBatchNorm``.
public enum CrossIterationGradient: String, Codable, CaseIterable, Sendable {
    /// Through the current iteration's statistics only (the reference code).
    case current
    /// Also through the current weight in every past entry's Taylor compensation.
    case compensated
}

/// Sums of cross-iteration BN's window measurements over training forwards (this rank's view).
public struct CrossIterationDiagnostics: Sendable {
    public var forwards = 0
    /// Forwards that had past entries (after the burn-in, with a window longer than 1).
    public var windowForwards = 0
    /// Σ over forwards of the mean (over channels) number of entries used, the current one included.
    public var entriesKept = 0.0
    /// Σ over window forwards of the fraction of past entries dropped (negative compensated variance).
    public var droppedFraction = 0.0
    /// Σ over window forwards of Σ|ρ·∂S2/∂θ·Δθ| / Σ|S2| over past entries and channels (local sums).
    public var taylorFraction = 0.0
    /// Σ over forwards of the mean over channels of (window variance + ε) / (current-batch variance + ε).
    public var varianceRatio = 0.0

    public init() {}

    /// Averages per forward: entries_kept, dropped_fraction, taylor_fraction, window_variance_ratio.
    public var averages: [String: Double] {
        guard forwards > 0 else { return [:] }
        var result = ["entries_kept": entriesKept / Double(forwards), "window_variance_ratio": varianceRatio / Double(forwards)]
        if windowForwards > 0 {
            result["dropped_fraction"] = droppedFraction / Double(windowForwards)
            result["taylor_fraction"] = taylorFraction / Double(windowForwards)
        }
        return result
    }
}
