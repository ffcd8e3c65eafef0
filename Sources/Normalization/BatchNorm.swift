import Collectives
import Kernels

/// Batch normalization (Ioffe & Szegedy 2015, arXiv 1502.03167) over N×C or N×C×H×W input,
/// with PyTorch's conventions so numbers compare directly:
///
///     x̂ = (x − μ) / √(σ² + ε),   y = γ·x̂ + β
///
/// where μ and σ² (biased) are per-channel statistics over N, H, W of the batch in training and
/// the running statistics in inference. After each training batch,
///
///     running_mean ← (1 − m)·running_mean + m·μ
///     running_var  ← (1 − m)·running_var  + m·σ²·M/(M − 1)
///
/// with M the number of values per channel that the statistics span. Defaults: ε = 1e-5,
/// momentum m = 0.1 (`nil` = cumulative average, factor 1/num_batches_tracked), γ = 1, β = 0,
/// running statistics 0 and 1 — PyTorch's, so that models and checkpoints carry over.
///
/// With a `group` the statistics span every rank of the group (SyncBN, see ``SyncBatchNorm``):
/// one all-reduce of [m, Σ(x − K), Σ(x − K)²] in forward (``BatchStatistics``) and one of
/// [Σdy, Σdy·x̂] in backward. Without one (`nil`) it is the usual per-process BatchNorm and issues
/// no collective. Inference issues none either way.
open class BatchNorm<Scalar: BatchNormScalar>: Layer {
    public let featureCount: Int
    public let epsilon: Double
    public let momentum: Double?
    /// The ranks whose batches share statistics; nil for this process's batch only.
    public let group: (any Communicator)?

    public let weight: Parameter<Scalar>
    public let bias: Parameter<Scalar>
    public let runningMean: Buffer<Scalar>
    public let runningVariance: Buffer<Scalar>
    public let batchesTracked: Counter

    /// FrozenBN ("train with population statistics", Wu & Johnson 2021 §4): when set, training
    /// forwards normalize with the running statistics, update nothing and issue no collective,
    /// and backward treats μ and σ as constants (dx = γ/σ·dy).
    public var frozen = false
    /// FrozenBN from this training step on (``prepare(step:of:)`` sets ``frozen``); nil: never.
    public var freezeAfterStep: Int?
    private var lastPassFrozen = false
    /// Batch Renormalization's per-channel r and d and the batch mean of the last training pass
    /// (set by ``BatchRenormalization``; nil for plain BN): backward treats r and d as constants.
    public var lastRenorm: (r: [Double], d: [Double], batchMean: [Double])?

    /// Statistics of the last batch seen in `.training` or `.batchStatistics` mode (over the whole
    /// group; nil when the group had no data), for PreciseBN, inspection and tests.
    public var lastStatistics: BatchStatistics?

    /// The last training input (shared storage, not a copy): backward recomputes x̂ from it.
    private var lastInput = Tensor<Scalar>(shape: [0])
    private(set) var lastMean: [Double] = []
    private(set) var invStd: [Double] = []
    private var lastLayout = ChannelLayout(batch: 0, channels: 0, spatial: 0)
    private var lastShape: [Int] = []
    private var backwardCounts: [Double] = []

    public init(featureCount: Int, epsilon: Double = 1e-5, momentum: Double? = 0.1, group: (any Communicator)? = nil) {
        precondition(featureCount > 0, "BatchNorm needs at least one feature")
        precondition(epsilon >= 0 && (momentum.map { (0...1).contains($0) } ?? true), "BatchNorm: ε ≥ 0 and momentum in [0, 1]")
        self.featureCount = featureCount
        self.epsilon = epsilon
        self.momentum = momentum
        self.group = group
        weight = Parameter(Tensor(shape: [featureCount], repeating: 1))
        bias = Parameter(Tensor(shape: [featureCount]))
        runningMean = Buffer(Tensor(shape: [featureCount]))
        runningVariance = Buffer(Tensor(shape: [featureCount], repeating: 1))
        batchesTracked = Counter()
    }

    open var state: [StateEntry<Scalar>] {
        [.parameter("weight", weight), .parameter("bias", bias), .buffer("running_mean", runningMean),
         .buffer("running_var", runningVariance), .counter("num_batches_tracked", batchesTracked)]
    }

    /// The schedule's hook (``NormalizationLayer``): FrozenBN from ``freezeAfterStep`` on.
    /// Subclasses with schedules of their own (Batch Renorm) override it and call this.
    open func prepare(step: Int, of totalSteps: Int) {
        if let freezeAfterStep { frozen = step >= freezeAfterStep }
    }

    /// Before a checkpoint: completes state that waits for a later pass (subclasses).
    open func settlePendingStatistics() throws {}

    /// γ's norm for the metrics' diagnostics; subclasses add their own measurements.
    open func diagnostics() -> [String: Double]? {
        ["gamma_norm": Self.norm(weight)]
    }

    public func layout(of shape: [Int]) throws -> ChannelLayout {
        guard let layout = ChannelLayout(shape: shape), layout.channels == featureCount else {
            throw LayerError("\(Self.self): expected N×\(featureCount) or N×\(featureCount)×H×W input, got \(shape)")
        }
        return layout
    }

    open func forward(_ input: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        let layout = try layout(of: input.shape)
        switch mode {
        case .inference:
            let mean = Scalar.widened(runningMean.value.scalars)
            let invStd = Scalar.widened(runningVariance.value.scalars).map { 1 / ($0 + epsilon).squareRoot() }
            return apply(input, layout: layout, mean: mean, invStd: invStd)
        case .batchStatistics:
            guard let statistics = try batchStatistics(input, layout: layout) else { return Tensor(shape: input.shape) }
            let inverse = statistics.variance.map { 1 / ($0 + epsilon).squareRoot() }
            return apply(input, layout: layout, mean: statistics.mean, invStd: inverse)
        case .training:
            lastLayout = layout
            lastShape = input.shape
            lastPassFrozen = frozen
            if frozen {
                // FrozenBN: population statistics, no update, no collective; backward is affine.
                lastMean = Scalar.widened(runningMean.value.scalars)
                invStd = Scalar.widened(runningVariance.value.scalars).map { 1 / ($0 + epsilon).squareRoot() }
                lastInput = input
                return apply(input, layout: layout, mean: lastMean, invStd: invStd)
            }
            lastRenorm = nil
            guard let normalization = try trainingStatistics(input, layout: layout) else {
                // No rank of the group has data this step: nothing to normalize, nothing to learn.
                invStd = Array(repeating: 0, count: featureCount)
                lastMean = invStd
                lastInput = input
                return Tensor(shape: input.shape)
            }
            updateRunningStatistics(normalization.current)
            invStd = normalization.variance.map { 1 / ($0 + epsilon).squareRoot() }
            backwardCounts = normalization.counts
            lastMean = normalization.mean
            lastInput = input
            return apply(input, layout: layout, mean: normalization.mean, invStd: invStd)
        }
    }

    /// The statistics a training forward normalizes with: `mean` and (biased) `variance` per
    /// channel, `current` the batch's own statistics (for the running statistics), and `counts`
    /// per channel, the number of values the mean effectively averages over (M for BN; the
    /// backward pass divides the gradient sums by it).
    public struct TrainingNormalization {
        public var mean: [Double]
        public var variance: [Double]
        public var counts: [Double]
        public var current: BatchStatistics

        public init(mean: [Double], variance: [Double], counts: [Double], current: BatchStatistics) {
            self.mean = mean
            self.variance = variance
            self.counts = counts
            self.current = current
        }
    }

    /// Batch statistics over the group (one all-reduce); nil when the group has no data. Records
    /// them as ``lastStatistics``.
    public func batchStatistics(_ input: Tensor<Scalar>, layout: ChannelLayout) throws -> BatchStatistics? {
        let shift = Scalar.widened(runningMean.value.scalars)
        let statistics = try BatchStatistics.compute(input, layout: layout, shift: shift, group: group)
        lastStatistics = statistics
        try requireMoreThanOneValue(statistics, input.shape)
        return statistics
    }

    public func requireMoreThanOneValue(_ statistics: BatchStatistics?, _ shape: [Int]) throws {
        if let statistics, statistics.count <= 1 {
            throw LayerError("\(Self.self): batch statistics need more than 1 value per channel, got 1 (input \(shape)); use a larger batch or sync over more ranks")
        }
    }

    /// What a training forward normalizes with: the extension point of a BN variant (cross-iteration
    /// BN, Batch Renorm, ghost and shuffled BN override it, as may a subclass outside this module).
    open func trainingStatistics(_ input: Tensor<Scalar>, layout: ChannelLayout) throws -> TrainingNormalization? {
        guard let statistics = try batchStatistics(input, layout: layout) else { return nil }
        return TrainingNormalization(mean: statistics.mean, variance: statistics.variance,
                                     counts: Array(repeating: statistics.count, count: featureCount), current: statistics)
    }

    /// Called by a training backward with Σdy (first C values) and Σdy·x̂ (next C) over the
    /// group; subclasses whose statistics depend on more than the input (cross-iteration BN's
    /// compensation term) pass gradients on from here.
    open func gradientSumsReduced(_ sums: [Double]) throws {}

    /// The EMA (or cumulative average) update, in Double, with the unbiased variance over M.
    public func updateRunningStatistics(_ statistics: BatchStatistics) {
        batchesTracked.value += 1
        let factor = momentum ?? 1 / Double(batchesTracked.value)
        let correction = statistics.count / (statistics.count - 1)
        for c in 0..<featureCount {
            let mean = Double(runningMean.value.scalars[c]), variance = Double(runningVariance.value.scalars[c])
            runningMean.value.scalars[c] = Scalar((1 - factor) * mean + factor * statistics.mean[c])
            runningVariance.value.scalars[c] = Scalar((1 - factor) * variance + factor * statistics.variance[c] * correction)
        }
    }

    /// y = γ(x − μ)/σ + β as y = a·x + b per channel, in Double.
    public func apply(_ input: Tensor<Scalar>, layout: ChannelLayout, mean: [Double], invStd: [Double]) -> Tensor<Scalar> {
        let gamma = Scalar.widened(weight.value.scalars), beta = Scalar.widened(bias.value.scalars)
        let scale = (0..<featureCount).map { gamma[$0] * invStd[$0] }
        let offset = (0..<featureCount).map { beta[$0] - mean[$0] * scale[$0] }
        return .affine(input, layout: layout, scale: scale, offset: offset)
    }

    /// dx = γ/σ·(dy − Σdy/M − x̂·Σ(dy·x̂)/M) with x̂ = (x − μ)/σ recomputed from the saved input;
    /// the sums come from one all-reduce over the group (M per channel: see `backwardCounts`).
    /// dγ = Σdy·x̂ and dβ = Σdy stay local: the data-parallel gradient exchange sums them.
    open func backward(_ outputGradient: Tensor<Scalar>) throws -> Tensor<Scalar> {
        guard outputGradient.shape == lastShape else {
            throw LayerError("\(Self.self): gradient \(outputGradient.shape) does not match the forward input \(lastShape)")
        }
        let C = featureCount, layout = lastLayout, input = lastInput
        // Σdy and Σdy·(x − μ) per channel (Double, for the group's all-reduce); dβ = Σdy and
        // dγ = Σdy·x̂ from the same per-sample sums, rounded per sample and added along the pairwise
        // tree in Scalar, the type in which the gradient exchange goes on adding them over ranks.
        var local = [Double](repeating: 0, count: 2 * C)
        var leaves = [Double](repeating: 0, count: layout.batch * 2 * C)
        outputGradient.scalars.withUnsafeBufferPointer { dy in
            input.scalars.withUnsafeBufferPointer { x in
                lastMean.withUnsafeBufferPointer { mu in
                    local.withUnsafeMutableBufferPointer { sums in
                        leaves.withUnsafeMutableBufferPointer {
                            Scalar.gradientSums(dy, x, layout: layout, mean: mu, into: sums, leaves: $0.baseAddress!)
                        }
                    }
                }
            }
        }
        for c in 0..<C { local[C + c] *= invStd[c] }   // Σdy·(x − μ) → Σdy·x̂
        leaves.withUnsafeBufferPointer { l in
            bias.gradient = Tensor(shape: [C], scalars: Scalar.pairwiseSum(ofRounded: l.baseAddress!, count: layout.batch, width: C, stride: 2 * C))
            weight.gradient = Tensor(shape: [C], scalars: Scalar.pairwiseSum(ofRounded: l.baseAddress! + C, count: layout.batch, width: C,
                                                                             stride: 2 * C, scale: invStd))
        }
        var global = local
        if let group, !lastPassFrozen { try group.allReduceSum(&global) }
        guard lastPassFrozen || lastStatistics != nil else { return Tensor(shape: lastShape) }
        if !lastPassFrozen { try gradientSumsReduced(global) }
        let gamma = Scalar.widened(weight.value.scalars)
        // dx = p·dy + q·x + r per channel.
        var p = [Double](repeating: 0, count: C), q = p, r = p
        for c in 0..<C {
            p[c] = gamma[c] * invStd[c]
            guard !lastPassFrozen else { continue }   // μ, σ constants: dx = γ/σ·dy
            if let renorm = lastRenorm {
                // x̂ = r·x̂_B + d with x̂_B = (x − μ_B)/σ_B and r, d constant:
                // dx = γr/σ_B·(dy − Σdy/M − x̂_B·Σ(dy·x̂_B)/M), Σ(dy·x̂_B) = (Σdy·x̂ − d·Σdy)/r.
                let sumDyBatch = (global[C + c] - renorm.d[c] * global[c]) / renorm.r[c]
                let batchInvStd = invStd[c] / renorm.r[c]
                q[c] = -p[c] * batchInvStd * sumDyBatch / backwardCounts[c]
                r[c] = -p[c] * global[c] / backwardCounts[c] - q[c] * renorm.batchMean[c]
                continue
            }
            (p[c], q[c], r[c]) = Self.backwardCoefficients(gamma: gamma[c], invStd: invStd[c], mean: lastMean[c], sumDy: global[c],
                                                            sumDyNormalized: global[C + c], count: backwardCounts[c])
        }
        return .combining(outputGradient, input, layout: layout, dyScale: p, xScale: q, offset: r)
    }
}

extension BatchNorm {
    /// One channel's dx = p·dy + q·x + r for dx = γ/σ·(dy − Σdy/M − x̂·Σ(dy·x̂)/M), x̂ = (x − μ)/σ,
    /// in Double (|q·μ| ≈ |q·x| does not cancel there).
    static func backwardCoefficients(gamma: Double, invStd: Double, mean: Double, sumDy: Double, sumDyNormalized: Double,
                                     count: Double) -> (Double, Double, Double) {
        let p = gamma * invStd
        let q = -p * invStd * sumDyNormalized / count
        return (p, q, -p * sumDy / count - q * mean)
    }
}

/// Synchronized batch normalization: ``BatchNorm`` whose statistics span every rank of `group`
/// (all ranks of the job by default, or a sub-group from `Communicator.split`), as PyTorch's
/// `SyncBatchNorm`. Exact for uneven and empty shards: the global count M comes out of the same
/// single all-reduce as the sums.
public final class SyncBatchNorm<Scalar: BatchNormScalar>: BatchNorm<Scalar> {
    public init(featureCount: Int, epsilon: Double = 1e-5, momentum: Double? = 0.1, synchronizing group: any Communicator) {
        super.init(featureCount: featureCount, epsilon: epsilon, momentum: momentum, group: group)
    }
}
