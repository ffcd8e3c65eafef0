import Collectives
import Kernels

/// Moving Average Batch Normalization (Yan et al. 2020, "Towards Stabilizing Batch Statistics in
/// Backward Propagation of Batch Normalization", ICLR; reference code megvii-model/MABN,
/// `MABN2d`), for small batches. It replaces both batch statistics that BN's gradient depends
/// on by moving averages over the last k iterations:
///
///     forward:   z = x / √(v + ε),  v = the mean of the last k iterations' per-channel E[x²]
///                (no centering), y = γ·r·z + β
///     backward:  g = dy·γ·r,  dx = (g − z·avg E[g·z]) / √(v + ε)
///
/// where avg E[g·z] is the mean over the same k iterations. For the first k iterations, and
/// during a warm-up of `warmup` iterations, both are the batch's own (then this is BN without
/// centering, and dx its exact gradient). r = √(v + ε)/√(running_v + ε) (running_v before this
/// iteration's update) renormalizes towards the population statistic: held at 1 for the first
/// max(`renormHold`, warm-up) iterations (the reference: 1000), then clipped to [1/5, 5], and a
/// constant in backward. running_v ← m·running_v + (1 − m)·v with m = `momentum` (0.98: the
/// reference's convention, the weight of the old value). Inference: y = γ·x/√(running_v + ε) + β,
/// which folds into the convolution before it. Iterations count from 1; the window slot written
/// at iteration t is t mod k (the reference's).
///
/// The reference pairs the layer with weight centralization of the convolution before it
/// (``WeightCentering``). It needs no communication: per rank by default. With a `group`, E[x²]
/// and E[g·z] are over the group's samples (one all-reduce in forward, one in backward), and the
/// windows are then the same on every rank of it.
///
/// Sums over samples follow the exactness contract (per-sample leaves on the pairwise tree), so
/// with a group W ranks × b give the bits of one rank with W·b. State: `weight`, `bias`,
/// `running_var` (C), `iters`, and the two windows as rank-local state `mabn_window`
/// ([E[x²] of k slots; E[g·z] of k slots], k × C each), kept by checkpoints per rank.
public final class MovingAverageBatchNorm<Scalar: BatchNormScalar>: Layer, NormalizationLayer {
    public let featureCount: Int
    /// k: iterations averaged (the reference's real_B / B).
    public let window: Int
    /// Iterations that use the batch's statistics before the moving averages (the reference's
    /// `warmup_iters`, 100 by default).
    public let warmup: Int
    /// r is held at 1 for the first max(renormHold, warmup) iterations (the reference: 1000).
    public let renormHold: Int
    public let epsilon: Double
    public let momentum: Double
    public let group: (any Communicator)?

    public let weight: Parameter<Scalar>
    public let bias: Parameter<Scalar>
    /// The running E[x²] (inference's statistic), by the reference's name.
    public let runningVariance: Buffer<Scalar>
    public let iterations: Counter
    /// [x² slot 0 … k − 1, g·z slot 0 … k − 1], C values each.
    public let windows: RankLocalState

    /// Statistics of the last `.training` or `.batchStatistics` batch over the group (mean and
    /// biased variance), for PreciseBN; nil when the group had no data.
    public private(set) var lastStatistics: BatchStatistics?

    /// The last training forward's v (the E[x²] it normalized with) and r, and the last backward's
    /// avg E[g·z]: for inspection and tests.
    public private(set) var lastVariance: [Double] = []
    public private(set) var lastR: [Double] = []
    public private(set) var lastMeanGZ: [Double] = []

    private var lastInput = Tensor<Scalar>(shape: [0])
    private var lastLayout = ChannelLayout(batch: 0, channels: 0, spatial: 0)
    private var lastCount = 0.0
    private var lastInvStd: [Double] = []
    private var lastIteration = 0

    public init(featureCount: Int, window: Int = 1, warmup: Int = 100, renormHold: Int = 1000, epsilon: Double = 1e-5,
                momentum: Double = 0.98, group: (any Communicator)? = nil) {
        precondition(featureCount > 0 && window >= 1 && warmup >= 0 && renormHold >= 0, "MovingAverageBatchNorm: features, window ≥ 1, warm-up ≥ 0")
        precondition(epsilon >= 0 && (0...1).contains(momentum), "MovingAverageBatchNorm: ε ≥ 0 and momentum in [0, 1]")
        self.featureCount = featureCount
        self.window = window
        self.warmup = warmup
        self.renormHold = renormHold
        self.epsilon = epsilon
        self.momentum = momentum
        self.group = group
        weight = Parameter(Tensor(shape: [featureCount], repeating: 1))
        bias = Parameter(Tensor(shape: [featureCount]))
        runningVariance = Buffer(Tensor(shape: [featureCount], repeating: 1))
        iterations = Counter()
        let size = 2 * window * featureCount
        windows = RankLocalState([Double](repeating: 0, count: size), validate: { values in
            guard values.count == size else { return "is not a moving-average window of \(window) × \(featureCount) × 2 values" }
            guard values.allSatisfy(\.isFinite) else { return "holds a non-finite moving-average value" }
            return nil
        }, emptied: { _ in [Double](repeating: 0, count: size) })
    }

    public var state: [StateEntry<Scalar>] {
        [.parameter("weight", weight), .parameter("bias", bias), .buffer("running_var", runningVariance),
         .counter("iters", iterations), .rankLocal("mabn_window", windows)]
    }

    func layout(of shape: [Int]) throws -> ChannelLayout {
        guard let layout = ChannelLayout(shape: shape), layout.channels == featureCount else {
            throw LayerError("MovingAverageBatchNorm: expected N×\(featureCount) or N×\(featureCount)×H×W input, got \(shape)")
        }
        return layout
    }

    /// Whether iteration `t` uses the moving averages (else the batch's statistics).
    func usesWindow(_ t: Int) -> Bool { !(t <= window || t < warmup) }

    /// Stores `values` (C) in slot `t mod k` of window `which` (0: E[x²], 1: E[g·z]) and returns
    /// what iteration `t` normalizes with: the batch's values or the window's mean.
    func record(_ values: [Double], window which: Int, iteration t: Int) -> [Double] {
        let C = featureCount, base = which * window * C, slot = t % window
        for c in 0..<C { windows.values[base + slot * C + c] = values[c] }
        guard usesWindow(t) else { return values }
        return (0..<C).map { c in
            var total = 0.0
            for s in 0..<window { total += windows.values[base + s * C + c] }
            return total / Double(window)
        }
    }

    public func forward(_ input: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        let layout = try layout(of: input.shape), C = featureCount
        let gamma = Scalar.widened(weight.value.scalars), beta = Scalar.widened(bias.value.scalars)
        if mode == .inference {
            let running = Scalar.widened(runningVariance.value.scalars)
            return .affine(input, layout: layout, scale: (0..<C).map { gamma[$0] / (running[$0] + epsilon).squareRoot() }, offset: beta)
        }
        // [M, Σx, Σx²] over the group, per-sample leaves on the pairwise tree (shift 0: no centering).
        let zeros = [Double](repeating: 0, count: C)
        var packed = BatchStatistics.localSums(input, layout: layout, shift: zeros)
        if let group { try group.allReduceSum(&packed) }
        lastStatistics = BatchStatistics(packedSums: packed, shift: zeros)
        let count = packed[0]
        guard count > 0 else {
            if mode == .training { lastCount = 0; lastLayout = layout }
            return Tensor(shape: input.shape)
        }
        let squares = (0..<C).map { packed[1 + C + $0] / count }
        if mode == .batchStatistics {
            return .affine(input, layout: layout, scale: (0..<C).map { gamma[$0] / (squares[$0] + epsilon).squareRoot() }, offset: beta)
        }
        iterations.value += 1
        let t = Int(iterations.value)
        let v = record(squares, window: 0, iteration: t)
        let running = Scalar.widened(runningVariance.value.scalars)
        let holds = t <= max(renormHold, warmup)
        let r = (0..<C).map { c -> Double in
            holds ? 1 : min(max((v[c] + epsilon).squareRoot() / (running[c] + epsilon).squareRoot(), 0.2), 5)
        }
        for c in 0..<C { runningVariance.value.scalars[c] = Scalar(momentum * running[c] + (1 - momentum) * v[c]) }
        lastInvStd = v.map { 1 / ($0 + epsilon).squareRoot() }
        lastVariance = v
        lastR = r
        lastCount = count
        lastLayout = layout
        lastInput = input
        lastIteration = t
        return .affine(input, layout: layout, scale: (0..<C).map { gamma[$0] * r[$0] * lastInvStd[$0] }, offset: beta)
    }

    public func backward(_ outputGradient: Tensor<Scalar>) throws -> Tensor<Scalar> {
        let C = featureCount, layout = lastLayout
        guard outputGradient.count == layout.batch * C * layout.spatial, lastInput.count == outputGradient.count || lastCount == 0 else {
            throw LayerError("MovingAverageBatchNorm: gradient \(outputGradient.shape) does not match the forward input")
        }
        // Σdy and Σdy·x per channel (Double, for the group), per-sample leaves kept for dβ = Σdy
        // and dγ = Σdy·r·z = r/√(v + ε)·Σdy·x, rounded per sample and added along the tree.
        var sums = [Double](repeating: 0, count: 2 * C)
        var leaves = [Double](repeating: 0, count: layout.batch * 2 * C)
        let zeros = [Double](repeating: 0, count: C)
        guard lastCount > 0 else {
            weight.gradient = Tensor(shape: [C])
            bias.gradient = Tensor(shape: [C])
            return Tensor(shape: outputGradient.shape)
        }
        outputGradient.scalars.withUnsafeBufferPointer { dy in
            lastInput.scalars.withUnsafeBufferPointer { x in
                zeros.withUnsafeBufferPointer { mu in
                    sums.withUnsafeMutableBufferPointer { s in
                        leaves.withUnsafeMutableBufferPointer { Scalar.gradientSums(dy, x, layout: layout, mean: mu, into: s, leaves: $0.baseAddress!) }
                    }
                }
            }
        }
        let gradientScale = (0..<C).map { lastR[$0] * lastInvStd[$0] }
        leaves.withUnsafeBufferPointer { l in
            bias.gradient = Tensor(shape: [C], scalars: Scalar.pairwiseSum(ofRounded: l.baseAddress!, count: layout.batch, width: C, stride: 2 * C))
            weight.gradient = Tensor(shape: [C], scalars: Scalar.pairwiseSum(ofRounded: l.baseAddress! + C, count: layout.batch, width: C,
                                                                             stride: 2 * C, scale: gradientScale))
        }
        if let group { try group.allReduceSum(&sums) }
        let gamma = Scalar.widened(weight.value.scalars)
        // E[g·z] = γ·r/√(v + ε)·Σdy·x / M over the group.
        let gz = (0..<C).map { gamma[$0] * gradientScale[$0] * sums[C + $0] / lastCount }
        let meanGZ = record(gz, window: 1, iteration: lastIteration)
        lastMeanGZ = meanGZ
        // dx = (γ·r·dy − x/√(v + ε)·avg E[g·z]) / √(v + ε) = p·dy + q·x.
        let p = (0..<C).map { gamma[$0] * gradientScale[$0] }
        let q = (0..<C).map { -lastInvStd[$0] * lastInvStd[$0] * meanGZ[$0] }
        return .combining(outputGradient, lastInput, layout: layout, dyScale: p, xScale: q, offset: zeros)
    }

    // MARK: NormalizationLayer

    public var statisticsGroup: (any Communicator)? { group }

    /// PreciseBN's population E[x²] = mean² + variance (of all the samples it saw).
    public var populations: [PopulationSlot] {
        [PopulationSlot(featureCount: featureCount, group: group, shift: { [featureCount] in [Double](repeating: 0, count: featureCount) },
                        last: { [unowned self] in lastStatistics },
                        store: { [unowned self] mean, variance in
                            runningVariance.value.scalars = Scalar.narrowed((0..<featureCount).map { mean[$0] * mean[$0] + variance[$0] })
                        })]
    }

    public func inferenceAffine() throws -> InferenceAffine? {
        try affine(mean: [Double](repeating: 0, count: featureCount), variance: Scalar.widened(runningVariance.value.scalars),
                   epsilon: epsilon, gamma: Scalar.widened(weight.value.scalars), beta: Scalar.widened(bias.value.scalars))
    }

    public func diagnostics() -> [String: Double]? { ["gamma_norm": Self.norm(weight)] }
}

/// Weight centralization (the reference MABN code's `CenConv2d`): the wrapped convolution or
/// linear layer computes with each output filter's weight minus its mean, w = v − mean(v_c),
/// and dL/dv_c = dw_c − mean(dw_c). Paired with ``MovingAverageBatchNorm``, whose normalization
/// does not center. As weight normalization, it leaves dL/dw for the gradient exchange to sum and
/// finishes dL/dv after it (``ExchangedGradients``), so the result does not depend on the ranks.
/// State: `weight` (v), then the wrapped layer's other entries.
public final class WeightCentering<Scalar: TensorScalar, Wrapped: Layer & PatchSource>: Layer, SampleAligned, ExchangedGradients,
    ReparameterizedWeight where Wrapped.Scalar == Scalar {
    public let layer: Wrapped
    public var wrappedLayer: AnyObject { layer }
    public let direction: Parameter<Scalar>
    public var defersGradients = false

    public var sampleOffset: Int {
        get { (layer as? SampleAligned)?.sampleOffset ?? 0 }
        set { (layer as? SampleAligned)?.sampleOffset = newValue }
    }

    /// Wraps `layer` with v = its current weight.
    public init(_ layer: Wrapped) {
        self.layer = layer
        direction = Parameter(layer.patchWeight.value)
    }

    public var state: [StateEntry<Scalar>] {
        [.parameter("weight", direction)] + layer.state.filter {
            if case let .parameter(_, p) = $0 { return p !== layer.patchWeight } else { return true }
        }
    }

    var channels: Int { direction.value.shape[0] }

    /// Each row minus its mean, in Double.
    static func centered(_ values: [Scalar], rows: Int) -> [Scalar] {
        let width = values.count / rows
        var out = values
        for c in 0..<rows {
            var total = 0.0
            for k in 0..<width { total += Double(values[c * width + k]) }
            let mean = total / Double(width)
            for k in 0..<width { out[c * width + k] = Scalar(Double(values[c * width + k]) - mean) }
        }
        return out
    }

    public func materializedLayer() -> AnyObject {
        layer.patchWeight.value.scalars = Self.centered(direction.value.scalars, rows: channels)
        return layer
    }

    public func forward(_ input: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        _ = materializedLayer()
        return try layer.forward(input, mode: mode)
    }

    public func backward(_ outputGradient: Tensor<Scalar>) throws -> Tensor<Scalar> {
        let dx = try layer.backward(outputGradient)
        let dw = layer.patchWeight.gradient.scalars
        direction.gradient = Tensor(shape: direction.value.shape, scalars: defersGradients ? dw : Self.centered(dw, rows: channels))
        return dx
    }

    public func finishExchangedGradients() {
        guard defersGradients else { return }
        direction.gradient.scalars = Self.centered(direction.gradient.scalars, rows: channels)
    }
}
