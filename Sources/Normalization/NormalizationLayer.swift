import Collectives
import Kernels

/// What the trainer, PreciseBN, folding, the gradient exchange and the diagnostics need from a
/// normalization layer, adopted by the layers themselves: the code around them iterates this
/// protocol instead of casting to concrete types, so a normalization defined outside this module
/// (a ``BatchNorm`` subclass, or any `Layer` that adopts it) takes part in all of it.
///
/// Every requirement has a default (nothing to schedule, no statistics shared, nothing for
/// PreciseBN, not foldable, no diagnostics), so a layer adopts only what it has.
public protocol NormalizationLayer: AnyObject {
    /// Called before every training step (`step` counted from 0, of `totalSteps`) with the
    /// schedule's position: Batch Renorm's clips, FrozenBN's switch.
    func prepare(step: Int, of totalSteps: Int)

    /// The ranks whose batches share this layer's statistics; nil: this rank's batch alone.
    /// The gradient exchange keeps the running statistics of layers whose group is smaller than
    /// the job equal on every rank (it averages them).
    var statisticsGroup: (any Communicator)? { get }

    /// The population statistics inference uses, for PreciseBN to recompute; empty when the
    /// layer has none (GroupNorm) or they are not batch statistics.
    var populations: [PopulationSlot] { get }

    /// Inference as y = (x − mean)·scale + beta per channel, for folding into the convolution or
    /// linear layer before it; nil when inference is not a per-channel affine map (GroupNorm,
    /// domain-specific BN). Throws when the stored statistics cannot define one (a negative
    /// variance).
    func inferenceAffine() throws -> InferenceAffine?

    /// Data-dependent initialisation (weight normalization's): arms the layer to initialise
    /// itself on the next forward from that batch's statistics summed by `allReduce` over all
    /// ranks, with `next` the layer after it (whose bias it may set). Returns whether it armed.
    func armInitialization(next: AnyObject?, allReduce: @escaping (inout [Double]) throws -> Void) -> Bool

    /// The domain label of every sample of the next forward (domain-specific statistics).
    func useDomains(_ domains: [Int32])

    /// Completes state that waits for a later pass before a checkpoint is written (collective; a
    /// hook for layers of a user's own: none of this package's needs it).
    func settlePendingStatistics() throws

    /// Measurements for the metrics' `diagnostics` lines (γ's norm, window measurements), reset
    /// by the call; nil for a layer that reports none.
    func diagnostics() -> [String: Double]?
}

extension NormalizationLayer {
    public func prepare(step: Int, of totalSteps: Int) {}
    public var statisticsGroup: (any Communicator)? { nil }
    public var populations: [PopulationSlot] { [] }
    public func inferenceAffine() throws -> InferenceAffine? { nil }
    public func armInitialization(next: AnyObject?, allReduce: @escaping (inout [Double]) throws -> Void) -> Bool { false }
    public func useDomains(_ domains: [Int32]) {}
    public func settlePendingStatistics() throws {}
    public func diagnostics() -> [String: Double]? { nil }
}

/// y = (x − mean)·scale + beta per channel: a normalization's inference, which folds into the
/// layer before it as W'_c = W_c·scale_c and b'_c = (b_c − mean_c)·scale_c + beta_c.
public struct InferenceAffine: Sendable {
    public var mean: [Double]
    public var scale: [Double]
    public var beta: [Double]

    public init(mean: [Double], scale: [Double], beta: [Double]) {
        precondition(mean.count == scale.count && scale.count == beta.count, "InferenceAffine: one value per channel")
        self.mean = mean
        self.scale = scale
        self.beta = beta
    }
}

/// One set of population statistics that PreciseBN recomputes: the layer's view of it.
public struct PopulationSlot {
    public let featureCount: Int
    /// The ranks whose batches the statistics span (a batch of the group is counted once).
    public let group: (any Communicator)?
    /// The current estimate of the mean (the accumulators' shift, for conditioning).
    public let shift: () -> [Double]
    /// The statistics of the last `.batchStatistics` forward; nil when no sample reached them.
    public let last: () -> BatchStatistics?
    /// Stores the population mean and unbiased variance.
    public let store: (_ mean: [Double], _ variance: [Double]) -> Void
    /// Whether a pass that reaches no sample of this slot leaves it unchanged (a domain absent
    /// from the data) instead of being an error.
    public let mayBeUnreached: Bool

    public init(featureCount: Int, group: (any Communicator)?, shift: @escaping () -> [Double],
                last: @escaping () -> BatchStatistics?, store: @escaping (_ mean: [Double], _ variance: [Double]) -> Void,
                mayBeUnreached: Bool = false) {
        self.featureCount = featureCount
        self.group = group
        self.shift = shift
        self.last = last
        self.store = store
        self.mayBeUnreached = mayBeUnreached
    }
}

extension NormalizationLayer {
    /// The L2 norm of a parameter's values (for diagnostics).
    public static func norm<Scalar: TensorScalar>(_ parameter: Parameter<Scalar>) -> Double {
        Scalar.widened(parameter.value.scalars).reduce(0) { $0 + $1 * $1 }.squareRoot()
    }
}

/// A per-channel affine inference from running statistics, checked.
func affine(mean: [Double], variance: [Double], epsilon: Double, gamma: [Double], beta: [Double]) throws -> InferenceAffine {
    if let bad = variance.firstIndex(where: { !($0 + epsilon > 0) || !$0.isFinite }) {
        throw LayerError("its running variance of channel \(bad) is \(variance[bad]); a variance must be ≥ 0")
    }
    return InferenceAffine(mean: mean, scale: (0..<gamma.count).map { gamma[$0] / (variance[$0] + epsilon).squareRoot() }, beta: beta)
}

// MARK: - The layers of this module

extension BatchNorm: NormalizationLayer {
    public var statisticsGroup: (any Communicator)? { group }

    public var populations: [PopulationSlot] {
        [PopulationSlot(featureCount: featureCount, group: group, shift: { [unowned self] in Scalar.widened(runningMean.value.scalars) },
                        last: { [unowned self] in lastStatistics },
                        store: { [unowned self] mean, variance in
                            runningMean.value.scalars = Scalar.narrowed(mean)
                            runningVariance.value.scalars = Scalar.narrowed(variance)
                        })]
    }

    public func inferenceAffine() throws -> InferenceAffine? {
        try affine(mean: Scalar.widened(runningMean.value.scalars), variance: Scalar.widened(runningVariance.value.scalars),
                   epsilon: epsilon, gamma: Scalar.widened(weight.value.scalars), beta: Scalar.widened(bias.value.scalars))
    }
}

extension MeanOnlyBatchNorm: NormalizationLayer {
    public var statisticsGroup: (any Communicator)? { group }

    public var populations: [PopulationSlot] {
        [PopulationSlot(featureCount: featureCount, group: group, shift: { [unowned self] in Scalar.widened(runningMean.value.scalars) },
                        last: { [unowned self] in lastStatistics },
                        store: { [unowned self] mean, _ in runningMean.value.scalars = Scalar.narrowed(mean) })]
    }

    public func inferenceAffine() throws -> InferenceAffine? {
        InferenceAffine(mean: Scalar.widened(runningMean.value.scalars), scale: [Double](repeating: 1, count: featureCount),
                        beta: Scalar.widened(bias.value.scalars))
    }
}

extension ChannelBias: NormalizationLayer {
    public func inferenceAffine() throws -> InferenceAffine? {
        let beta = Scalar.widened(bias.value.scalars)
        return InferenceAffine(mean: [Double](repeating: 0, count: beta.count), scale: [Double](repeating: 1, count: beta.count), beta: beta)
    }
}

extension WeightNorm: NormalizationLayer {
    public func armInitialization(next: AnyObject?, allReduce: @escaping (inout [Double]) throws -> Void) -> Bool {
        initializeOnNextForward(bias: (next as? ChannelBias<Scalar>)?.bias, allReduce: allReduce)
        return true
    }
}

extension GroupNorm: NormalizationLayer {
    public func diagnostics() -> [String: Double]? { ["gamma_norm": Self.norm(weight)] }
}

extension RepresentativeBatchNorm: NormalizationLayer {
    public func prepare(step: Int, of totalSteps: Int) { normalization.prepare(step: step, of: totalSteps) }
    public var statisticsGroup: (any Communicator)? { normalization.group }
    public var populations: [PopulationSlot] { normalization.populations }
    public func diagnostics() -> [String: Double]? { ["gamma_norm": Self.norm(weight)] }
}

extension DomainBatchNorm: NormalizationLayer {
    public var statisticsGroup: (any Communicator)? { group }

    public var populations: [PopulationSlot] {
        (0..<domainCount).map { d in
            PopulationSlot(featureCount: featureCount, group: group, shift: { [unowned self] in Scalar.widened(runningMeans[d].value.scalars) },
                           last: { [unowned self] in d < lastStatistics.count ? lastStatistics[d] : nil },
                           store: { [unowned self] mean, variance in setPopulation(domain: d, mean: mean, variance: variance) },
                           mayBeUnreached: true)
        }
    }

    public func useDomains(_ domains: [Int32]) { self.domains = domains }
    public func diagnostics() -> [String: Double]? { ["gamma_norm": Self.norm(weight)] }
}
