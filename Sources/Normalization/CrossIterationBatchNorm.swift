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
/// (only the block j = c is non-zero; the full Jacobian is never formed) and, in place of θ_τ,
/// their projections on it, L_c = ∂S1_c/∂θ_c·θ_τ,c and Q_c = ∂S2_c/∂θ_c·θ_τ,c — the same values on
/// every rank of the group. The derivatives come out of the source's backward as this rank's
/// share and are summed over the group there, in all-reduces of Doubles of 2¹⁸ values each (a
/// source whose derivatives come in forward sends them with the current sums); the sums of the window are
/// Doubles, the derivatives are kept at the model's precision, which their leaves were computed
/// at. At iteration t every entry is compensated, S_τ + ρ·(∂S_τ/∂θ·θ_t − L or Q), by every rank
/// alike, without communication; where θ_t = θ_τ the term is exactly zero (both products are the
/// same loop over the same values). Every sum over samples is the pairwise tree of the exactness
/// contract, so the window does not depend on how the batch was split over ranks. Then per
/// channel, with μ = S1/M and ν = S2/M per entry: entries whose compensated variance ν − μ² is
/// negative are dropped (the current batch always counts), μ̄ and ν̄ are averaged over the n_c
/// remaining entries, σ² = ν̄ − μ̄², and x̂ = (x − μ̄)/√(σ² + ε). Gradients flow only through the
/// current iteration's statistics, scaled by 1/n_c (past entries are constants): backward is BN's
/// with M replaced by n_c·M, and issues one all-reduce. The running statistics are the EMA of the
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
///   the compensation term uses a detached θ_t.
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
    /// One past iteration as the window holds it (the group's sums).
    public struct WindowEntry: Equatable {
        public var count: Double
        public var sum: [Double]
        public var sumOfSquares: [Double]
        /// ∂S1_c/∂θ_c (K values, shared by all channels).
        public var sumGradient: [Double]
        /// ∂S2_c/∂θ_c, row c of a C × K matrix.
        public var sumOfSquaresGradient: [Double]
        /// L_c = ∂S1_c/∂θ_c·θ_τ,c at that iteration's weight θ_τ (C values).
        public var sumAtWeight: [Double]
        /// Q_c = ∂S2_c/∂θ_c·θ_τ,c (C values).
        public var sumOfSquaresAtWeight: [Double]
    }

    public let window: Int
    public let rho: Double
    public let burnIn: Int
    public let gradient: CrossIterationGradient
    public let source: any PatchSource<Scalar>
    /// The window — rank-local: each rank keeps its own (with a group, the group's sums).
    let saved: CrossIterationWindow<Scalar>
    /// What the last training forward used from the window, for `.compensated` backward.
    private var lastWindow: UsedWindow?
    /// The source, when it is a bias-free convolution: then the newest entry's derivatives come
    /// out of that convolution's backward GEMM together with its weight gradient (see
    /// ``Conv2d/patchStatisticsReceiver``) instead of a GEMM of their own in forward.
    private let fusedSource: Conv2d<Scalar>?
    /// θ_t widened to Double, for one training forward (borrowed from the scratch pool).
    private var theta: [Double] = []
    /// Window measurements summed over training forwards since the last ``takeDiagnostics()``.
    private var diagnosticSums = CrossIterationDiagnostics()

    struct UsedWindow {
        /// The iteration whose forward used the window.
        var iteration: Int
        /// Where past entry j is now: slot j + slotOffset (1 when the forward pushed its own entry,
        /// a full window's oldest then in the spare slot; 0 when the entry waits for the backward).
        var slotOffset: Int
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
        saved = CrossIterationWindow(channels: featureCount, patchSize: source.patchWeight.value.count / featureCount, window: window)
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
    public var iterations: Int { saved.iterations }

    var patchSize: Int { saved.patchSize }

    /// The stored past iterations, most recent first (one whose derivatives have not come yet is
    /// not among them).
    public var entries: [WindowEntry] { saved.entries }

    /// An entry's sums moved to `weight`: S + ρ·(∂S/∂θ·θ − L or Q), per channel.
    public static func compensate(_ entry: WindowEntry, to weight: [Double], rho: Double) -> (sum: [Double], sumOfSquares: [Double]) {
        let C = entry.sum.count, K = entry.sumGradient.count
        var sum = entry.sum, squares = entry.sumOfSquares
        entry.sumGradient.withUnsafeBufferPointer { g1 in
            entry.sumOfSquaresGradient.withUnsafeBufferPointer { g2 in
                weight.withUnsafeBufferPointer { theta in
                    for c in 0..<C {
                        let linear = dot(g1.baseAddress!, theta.baseAddress! + c * K, K)
                        let quadratic = dot(g2.baseAddress! + c * K, theta.baseAddress! + c * K, K)
                        sum[c] += rho * (linear - entry.sumAtWeight[c])
                        squares[c] += rho * (quadratic - entry.sumOfSquaresAtWeight[c])
                    }
                }
            }
        }
        return (sum, squares)
    }

    /// Σ_k a_k·b_k in one fixed order: eight running sums (k mod 8, the products not fused into
    /// the additions), added pairwise at the end, then the last n mod 8 terms in order — the one
    /// loop for the projections and the compensation, so that θ_t = θ_τ gives a term of exactly
    /// zero, and the same bits on every CPU. (One running sum waited on each addition: 1.6 ms of
    /// a ResNet-20 step.)
    @inline(__always)
    static func dot(_ a: UnsafePointer<Double>, _ b: UnsafePointer<Double>, _ n: Int) -> Double {
        let ra = UnsafeRawPointer(a), rb = UnsafeRawPointer(b)
        var partial = SIMD8<Double>()
        var k = 0
        while k &+ 8 <= n {
            let offset = k &* MemoryLayout<Double>.stride
            partial += ra.loadUnaligned(fromByteOffset: offset, as: SIMD8<Double>.self) * rb.loadUnaligned(fromByteOffset: offset, as: SIMD8<Double>.self)
            k = k &+ 8
        }
        var total = ((partial[0] + partial[4]) + (partial[2] + partial[6])) + ((partial[1] + partial[5]) + (partial[3] + partial[7]))
        while k < n {
            total += a[k] * b[k]
            k = k &+ 1
        }
        return total
    }

    /// This rank's raw sums and their derivatives with respect to θ for the current batch, from
    /// the patches of the source's last forward: per sample n, ∂S1/∂θ_c gets Σ_p patch_{n,p} and
    /// ∂S2/∂θ gets 2·X_n·Patches_nᵀ (one C × K × P GEMM, the same shape for every sample), and the
    /// samples are added along the pairwise tree in Double into `derivatives` (K + C·K values).
    func currentSums(_ input: Tensor<Scalar>, layout: ChannelLayout, derivatives: UnsafeMutablePointer<Double>) throws -> [Double] {
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
        tree.total(into: derivatives)
        return packed
    }

    /// θ (the source's weight, C × K values) widened to Double, in a buffer of the scratch pool
    /// (the caller gives it back).
    private func borrowWidenedWeight() -> [Double] {
        let count = source.patchWeight.value.count
        var theta = Double.scratchArrays.take(atLeast: count)
        source.patchWeight.value.scalars.withUnsafeBufferPointer { w in
            theta.withUnsafeMutableBufferPointer { Scalar.widen(w.baseAddress!, count: count, into: $0.baseAddress!) }
        }
        return theta
    }

    public override func trainingStatistics(_ input: Tensor<Scalar>, layout: ChannelLayout) throws -> TrainingNormalization? {
        let iteration = iterations + 1
        lastWindow = nil
        saved.dropUnfinishedEntry()
        guard window > 1, iteration > burnIn else {
            saved.iterations = iteration
            return try super.trainingStatistics(input, layout: layout)
        }
        let C = featureCount, K = patchSize, sumsCount = 1 + 2 * C
        // θ_t in Double (C × K values), in a buffer lent for this forward: the layers take turns.
        theta = borrowWidenedWeight()
        defer { Double.scratchArrays.giveBack(&theta) }
        let pastCount = saved.count
        // The current local sums, and (unless the convolution's backward gives them) their
        // derivatives, which then travel in the same all-reduce.
        var packed: [Double]
        if let conv = fusedSource {
            guard conv.pendingTrainingBatch == layout.batch, conv.lastGeometry?.positions == layout.spatial else {
                throw LayerError("CrossIterationBatchNorm: its source layer must run the training forward that produced this input")
            }
            packed = BatchStatistics.localSums(input, layout: layout, shift: [Double](repeating: 0, count: C))
        } else {
            var derivatives = [Double](repeating: 0, count: K + C * K)
            packed = try derivatives.withUnsafeMutableBufferPointer { try currentSums(input, layout: layout, derivatives: $0.baseAddress!) }
            packed += derivatives
        }
        if let group { try group.allReduceSum(&packed) }
        let forwardDerivatives = fusedSource == nil ? Array(packed[sumsCount...]) : nil
        packed.removeLast(packed.count - sumsCount)
        // The past entries moved to θ_t, after the current sums.
        packed += repeatElement(0.0, count: sumsCount * pastCount)
        var taylorChange = 0.0, taylorSize = 0.0
        theta.withUnsafeBufferPointer { theta in
            packed.withUnsafeMutableBufferPointer { p in
                for j in 0..<pastCount {
                    let out = p.baseAddress! + sumsCount * (j + 1)
                    let taylor = saved.compensate(slot: j, theta: theta.baseAddress!, rho: rho, into: out)
                    taylorChange += taylor.change
                    taylorSize += taylor.size
                }
            }
        }

        let M = packed[0]
        guard M > 0 else {
            lastStatistics = nil
            saved.iterations = iteration
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
            let base = sumsCount * (j + 1), m = packed[base]
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
        let compensatedBackward = gradient == .compensated && rho != 0 && pastCount > 0
        if compensatedBackward {
            // Backward reads the past entries' derivatives where they are stored.
            lastWindow = UsedWindow(iteration: iteration, slotOffset: fusedSource == nil ? 1 : 0, counts: (0..<pastCount).map { packed[sumsCount * ($0 + 1)] }, kept: kept,
                                    entryCounts: valid, clamped: rawVariance.map { $0 < 0 })
        }
        recordDiagnostics(pastCount: pastCount, taylorFraction: taylorSize > 0 ? taylorChange / taylorSize : 0, kept: valid,
                          variance: variance, current: currentStatistics.variance)
        // The group's sums and derivatives enter the window now (from forward), or with the
        // derivatives from the source's backward, after this layer's backward read the window.
        saved.iterations = iteration
        if let derivatives = forwardDerivatives {
            saved.push(keepingOldest: compensatedBackward, sums: packed)
            derivatives.withUnsafeBufferPointer { saved.storeDerivatives($0.baseAddress!, count: K + C * K, at: 0) }
            theta.withUnsafeBufferPointer { saved.project(slot: 0, theta: $0.baseAddress!) }
        } else if let conv = fusedSource {
            saved.incoming = Array(packed[0..<sumsCount])
            conv.patchStatisticsReceiver = { [weak self] patchSum, products in try self?.receivePatchStatistics(patchSum, products, for: iteration) }
        }
        return TrainingNormalization(mean: averageMean, variance: variance, counts: valid.map { $0 * M }, current: currentStatistics)
    }

    /// `.compensated`: the compensation term's gradient with respect to the feeding layer's
    /// weight, handed to that layer as its pending gradient. For x̂ = (x − μ̄)/√(ν̄ − μ̄² + ε) with
    /// s = 1/√(σ² + ε) and dx̂ = γ·dy summed over the group:
    /// G_μ = −s·Σdx̂ + μ̄·s²·Σdx̂·x̂ and G_ν = −½·s²·Σdx̂·x̂ (G_μ = −s·Σdx̂, G_ν = 0 where σ² was clamped).
    /// Each row is summed in Double and rounded once to the weight's precision.
    public override func gradientSumsReduced(_ sums: [Double]) throws {
        guard let used = lastWindow else { return }
        lastWindow = nil
        let C = featureCount, K = patchSize
        guard iterations == used.iteration, saved.count >= used.counts.count + used.slotOffset else {
            throw LayerError("CrossIterationBatchNorm: the window changed between the training forward and its backward")
        }
        let gamma = Scalar.widened(weight.value.scalars)
        var pending = source.patchWeight.pendingGradient ?? Scalar.filled(C * K, with: 0)
        source.patchWeight.pendingGradient = nil   // pending's storage is then its own: no copy
        var row = Double.scratchArrays.take(atLeast: 3 * K)
        defer { Double.scratchArrays.giveBack(&row) }
        row.withUnsafeMutableBufferPointer { row in
            let total = row.baseAddress!, sumGradient = total + K, squares = total + 2 * K
            pending.withUnsafeMutableBufferPointer { pending in
                for c in 0..<C {
                    let s = invStd[c], sumDx = gamma[c] * sums[c], sumDxX = gamma[c] * sums[C + c]
                    let gMean = used.clamped[c] ? -s * sumDx : -s * sumDx + lastMean[c] * s * s * sumDxX
                    let gSecond = used.clamped[c] ? 0 : -0.5 * s * s * sumDxX
                    Scalar.widen(pending.baseAddress! + c * K, count: K, into: total)
                    for j in used.kept.indices where used.kept[j][c] {
                        let factor = rho / (used.entryCounts[c] * used.counts[j])
                        let a = factor * gMean, b = factor * gSecond
                        saved.widenDerivatives(slot: j + used.slotOffset, channel: c, sum: sumGradient, squares: squares)
                        for k in 0..<K { total[k] += a * sumGradient[k] + b * squares[k] }
                    }
                    Scalar.narrow(total, count: K, into: pending.baseAddress! + c * K)
                }
            }
        }
        source.patchWeight.pendingGradient = pending
        // Per-rank statistics give every rank its own term, which the gradient exchange sums.
        source.patchWeight.pendingGradientIsLocal = group == nil
    }

    /// Values per all-reduce of the newest entry's derivatives (2 MiB of Doubles).
    static var reductionPiece: Int { 1 << 18 }

    /// The newest entry's derivatives, from the source convolution's backward (this rank's
    /// share): ∂S1/∂θ_c = Σ_i patch_i and ∂S2/∂θ_c = 2·Σ_i x_{i,c}·patch_i, summed over the group
    /// in Double and stored with their projections on θ, which is still the weight of that forward.
    func receivePatchStatistics(_ patchSum: UnsafeBufferPointer<Double>, _ products: PatchProducts, for iteration: Int) throws {
        guard let incoming = saved.incoming, iterations == iteration else { return }
        saved.incoming = nil
        saved.push(keepingOldest: false, sums: incoming)
        let C = featureCount, K = patchSize
        precondition(patchSum.count == K && products.count == C * K, "patch statistics of the wrong size")
        // [Σ patch, 2·Σ y·patch] in pieces: each piece's all-reduce gives the same sums per value
        // as one of the whole, and no Double copy of the whole is ever held (three or four of
        // them, with the reduction's buffers, for the largest layers).
        let total = K + C * K
        var piece = [Double](repeating: 0, count: min(Self.reductionPiece, total))
        var start = 0
        while start < total {
            let end = min(start + Self.reductionPiece, total)
            if piece.count != end - start { piece = [Double](repeating: 0, count: end - start) }
            piece.withUnsafeMutableBufferPointer { p in
                let split = min(max(start, K), end)
                for i in start..<split { p[i - start] = patchSum[i] }
                guard split < end else { return }
                products.copy((split - K)..<(end - K), into: p.baseAddress! + (split - start))
                for j in (split - start)..<(end - start) { p[j] *= 2 }
            }
            if let group { try group.allReduceSum(&piece) }
            piece.withUnsafeBufferPointer { saved.storeDerivatives($0.baseAddress!, count: end - start, at: start) }
            start = end
        }
        var theta = borrowWidenedWeight()
        defer { Double.scratchArrays.giveBack(&theta) }
        theta.withUnsafeBufferPointer { saved.project(slot: 0, theta: $0.baseAddress!) }
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

/// Cross-iteration BN's window in memory, most recent entry in slot 0: per entry the group's
/// count, S1, S2 and the projections L, Q (C values each) in Double, and ∂S1/∂θ (K values) and
/// ∂S2/∂θ (C × K) at the model's precision. An entry whose derivatives come from the source's
/// backward enters the window then, after the layer's own backward has read the window; one
/// whose derivatives come in forward enters at once, and a `.compensated` forward then keeps a
/// full window's oldest entry in a spare slot until its backward has read it.
///
/// Checkpoints see it as [iterations, entries, entry…], each entry count, S1, S2, ∂S1/∂θ,
/// ∂S2/∂θ, L, Q (1 + 4·C + K + C·K values). Windows written with θ_τ in place of L and Q
/// (count, S1, S2, ∂S1/∂θ, ∂S2/∂θ, θ: 1 + 2·C + K + 2·C·K values) are read too, L and Q
/// computed from their θ.
final class CrossIterationWindow<Scalar: BatchNormScalar>: RankLocalState {
    let channels: Int, patchSize: Int, window: Int
    var iterations = 0
    /// Stored entries.
    private(set) var count = 0
    /// The last training forward's count, S1 and S2, while its derivatives are still to come from
    /// the source's backward (then it becomes slot 0; without a backward it is dropped).
    var incoming: [Double]?
    private(set) var sums: [Double] = []
    private(set) var derivatives: [Scalar] = []

    /// Values of a checkpoint's entry: count, S1, S2, ∂S1/∂θ, ∂S2/∂θ, L, Q; and of one with θ_τ.
    static func entryWidth(channels C: Int, patchSize K: Int) -> Int { 1 + 4 * C + K + C * K }
    static func legacyEntryWidth(channels C: Int, patchSize K: Int) -> Int { 1 + 2 * C + K + 2 * C * K }

    var sumsWidth: Int { 1 + 4 * channels }
    var derivativeWidth: Int { patchSize + channels * patchSize }
    /// Slots with storage (the spare one included).
    private var slotsHeld: Int { sums.count / sumsWidth }

    init(channels C: Int, patchSize K: Int, window: Int) {
        channels = C
        patchSize = K
        self.window = window
        let width = Self.entryWidth(channels: C, patchSize: K), legacy = Self.legacyEntryWidth(channels: C, patchSize: K)
        super.init([0, 0], validate: { values in
            // The iteration counter becomes an Int: beyond 2⁵² it is neither exact nor convertible.
            guard values.count >= 2, values.allSatisfy(\.isFinite), values[0] >= 0, values[0] <= 0x1p52, values[0] == values[0].rounded(),
                  values[1] >= 0, values[1] <= Double(window - 1), values[1] == values[1].rounded() else {
                return "is not a cross-iteration window of at most \(window - 1) entries"
            }
            let n = Int(values[1]), expected = 2 + n * width
            return values.count == expected || values.count == 2 + n * legacy ? nil
                : "holds \(values.count) values where \(n) window entries of this layer take \(expected)"
        }, emptied: { other in [other.first ?? 0, 0] })
    }

    override var values: [Double] {
        get { exported }
        set { restore(newValue) }
    }

    private var exported: [Double] {
        let C = channels
        var values = [Double(iterations), Double(count)]
        values.reserveCapacity(2 + count * Self.entryWidth(channels: C, patchSize: patchSize))
        for slot in 0..<count {
            let s = slot * sumsWidth
            values += sums[s..<(s + 1 + 2 * C)]
            values += Scalar.widened(Array(derivatives[(slot * derivativeWidth)..<((slot + 1) * derivativeWidth)]))
            values += sums[(s + 1 + 2 * C)..<(s + sumsWidth)]
        }
        return values
    }

    private func restore(_ values: [Double]) {
        precondition(validate(values) == nil, "a cross-iteration window that does not fit its layer")
        let C = channels, K = patchSize, D = derivativeWidth, n = Int(values[1])
        let legacy = values.count != 2 + n * Self.entryWidth(channels: C, patchSize: K)
        let width = legacy ? Self.legacyEntryWidth(channels: C, patchSize: K) : Self.entryWidth(channels: C, patchSize: K)
        sums = [Double](repeating: 0, count: n * sumsWidth)
        derivatives = Scalar.filled(n * D, with: 0)
        for slot in 0..<n {
            let v = 2 + slot * width
            sums.replaceSubrange((slot * sumsWidth)..<(slot * sumsWidth + 1 + 2 * C), with: values[v..<(v + 1 + 2 * C)])
            let narrowed = Scalar.narrowed(Array(values[(v + 1 + 2 * C)..<(v + 1 + 2 * C + D)]))
            derivatives.replaceSubrange((slot * D)..<((slot + 1) * D), with: narrowed)
            if legacy {
                let theta = Array(values[(v + 1 + 2 * C + D)..<(v + width)])
                theta.withUnsafeBufferPointer { project(slot: slot, theta: $0.baseAddress!) }
            } else {
                sums.replaceSubrange((slot * sumsWidth + 1 + 2 * C)..<((slot + 1) * sumsWidth), with: values[(v + 1 + 2 * C + D)..<(v + width)])
            }
        }
        count = n
        iterations = Int(values[0])
        incoming = nil
    }

    /// The stored entries, most recent first.
    var entries: [CrossIterationBatchNorm<Scalar>.WindowEntry] {
        let C = channels, K = patchSize, D = derivativeWidth
        return (0..<count).map { slot in
            let s = slot * sumsWidth
            func take(_ offset: Int, _ n: Int) -> [Double] { Array(sums[(s + offset)..<(s + offset + n)]) }
            let d = Scalar.widened(Array(derivatives[(slot * D)..<((slot + 1) * D)]))
            return .init(count: sums[s], sum: take(1, C), sumOfSquares: take(1 + C, C), sumGradient: Array(d[..<K]),
                         sumOfSquaresGradient: Array(d[K...]), sumAtWeight: take(1 + 2 * C, C), sumOfSquaresAtWeight: take(1 + 3 * C, C))
        }
    }

    /// Moves `slots` slots from `from` to `to` in both arrays (overlapping ranges allowed).
    private func moveSlots(from: Int, to: Int, slots: Int) {
        guard slots > 0 else { return }
        let S = sumsWidth, D = derivativeWidth
        sums.withUnsafeMutableBufferPointer { _ = memmove($0.baseAddress! + to * S, $0.baseAddress! + from * S, slots * S * MemoryLayout<Double>.stride) }
        derivatives.withUnsafeMutableBufferPointer {
            _ = memmove($0.baseAddress! + to * D, $0.baseAddress! + from * D, slots * D * MemoryLayout<Scalar>.stride)
        }
    }

    /// Forgets the last forward's entry when its derivatives never came (no backward ran).
    func dropUnfinishedEntry() { incoming = nil }

    /// The window with a new entry, in place: the entries move one slot back (the oldest falls
    /// off at k − 1, or into the spare slot with `keepingOldest`) and slot 0 takes the count, S1
    /// and S2 in `newest` (its derivatives and projections follow).
    func push(keepingOldest: Bool, sums newest: [Double]) {
        let C = channels, new = min(count + 1, window - 1), moved = keepingOldest ? count : new - 1
        if slotsHeld < moved + 1 {
            sums += repeatElement(0.0, count: (moved + 1 - slotsHeld) * sumsWidth)
            derivatives += Scalar.filled((moved + 1) * derivativeWidth - derivatives.count, with: 0)
        }
        moveSlots(from: 0, to: 1, slots: moved)
        sums.withUnsafeMutableBufferPointer { s in
            newest.withUnsafeBufferPointer { s.baseAddress!.update(from: $0.baseAddress!, count: 1 + 2 * C) }
            (s.baseAddress! + 1 + 2 * C).update(repeating: 0, count: 2 * C)
        }
        count = new
    }

    /// Per channel c the two products of `slot`'s derivatives with θ's row c (`theta`, C × K
    /// Doubles), written by `body` (c, ∂S1/∂θ·θ_c, ∂S2_c/∂θ_c·θ_c).
    private func products(slot: Int, theta: UnsafePointer<Double>, _ body: (Int, Double, Double) -> Void) {
        let C = channels, K = patchSize
        var rows = Double.scratchArrays.take(atLeast: 2 * K)
        defer { Double.scratchArrays.giveBack(&rows) }
        rows.withUnsafeMutableBufferPointer { rows in
            derivatives.withUnsafeBufferPointer { d in
                let base = d.baseAddress! + slot * derivativeWidth, g1 = rows.baseAddress!, g2 = g1 + K
                Scalar.widen(base, count: K, into: g1)
                for c in 0..<C {
                    Scalar.widen(base + K + c * K, count: K, into: g2)
                    body(c, CrossIterationBatchNorm<Scalar>.dot(g1, theta + c * K, K), CrossIterationBatchNorm<Scalar>.dot(g2, theta + c * K, K))
                }
            }
        }
    }

    /// L and Q of `slot` at the weight `theta` its derivatives were taken at.
    func project(slot: Int, theta: UnsafePointer<Double>) {
        let C = channels, s = slot * sumsWidth
        var projections = [Double](repeating: 0, count: 2 * C)
        products(slot: slot, theta: theta) { c, linear, quadratic in
            projections[c] = linear
            projections[C + c] = quadratic
        }
        sums.replaceSubrange((s + 1 + 2 * C)..<(s + sumsWidth), with: projections)
    }

    /// `slot`'s count and its sums moved to θ_t (`theta`) into `out` (count, S1, S2); returns
    /// Σ|ΔS2| and Σ|S2| over the channels, for the diagnostics.
    func compensate(slot: Int, theta: UnsafePointer<Double>, rho: Double, into out: UnsafeMutablePointer<Double>) -> (change: Double, size: Double) {
        let C = channels, s = slot * sumsWidth
        var change = 0.0, size = 0.0
        sums.withUnsafeBufferPointer { v in
            let entry = v.baseAddress! + s
            out[0] = entry[0]
            products(slot: slot, theta: theta) { c, linear, quadratic in
                out[1 + c] = entry[1 + c] + rho * (linear - entry[1 + 2 * C + c])
                out[1 + C + c] = entry[1 + C + c] + rho * (quadratic - entry[1 + 3 * C + c])
                change += abs(out[1 + C + c] - entry[1 + C + c])
                size += abs(entry[1 + C + c])
            }
        }
        return (change, size)
    }

    /// Slot 0's derivatives from `count` of the group's Double sums, rounded to the model's
    /// precision, from value `offset` on (∂S1/∂θ at 0, ∂S2/∂θ at K).
    func storeDerivatives(_ group: UnsafePointer<Double>, count: Int, at offset: Int) {
        derivatives.withUnsafeMutableBufferPointer { Scalar.narrow(group, count: count, into: $0.baseAddress! + offset) }
    }

    /// ∂S1/∂θ (K values) and row `channel` of ∂S2/∂θ of `slot`, widened into `sum` and `squares`.
    func widenDerivatives(slot: Int, channel: Int, sum: UnsafeMutablePointer<Double>, squares: UnsafeMutablePointer<Double>) {
        let K = patchSize
        derivatives.withUnsafeBufferPointer { d in
            let base = d.baseAddress! + slot * derivativeWidth
            Scalar.widen(base, count: K, into: sum)
            Scalar.widen(base + K + channel * K, count: K, into: squares)
        }
    }
}
