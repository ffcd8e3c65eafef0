import Kernels

/// Group normalization (Wu & He 2018, arXiv 1803.08494): each sample's channels are split into
/// `groups` groups, and each group is normalized with its own mean and biased variance over its
/// (C/G)·H·W values, then scaled and shifted per channel:
///
///     x̂ = (x − μ_{n,g}) / √(σ²_{n,g} + ε),   y = γ_c·x̂ + β_c
///
/// No batch statistics: the output of a sample does not depend on the rest of the batch, so it
/// needs no collective, no running statistics, and behaves the same in training and inference —
/// the batch-independent baseline for the BN family. Defaults: ε = 1e-5, γ = 1, β = 0 (PyTorch's).
public final class GroupNorm<Scalar: BatchNormScalar>: Layer {
    public let featureCount: Int
    public let groups: Int
    public let epsilon: Double
    public let weight: Parameter<Scalar>
    public let bias: Parameter<Scalar>

    private var lastInput = Tensor<Scalar>(shape: [0])
    private var lastMean: [Double] = []
    private var lastInvStd: [Double] = []

    /// InstanceNorm's optional running statistics (PyTorch's `InstanceNorm2d(track_running_stats=True)`):
    /// training updates them with the batch average of the instances' means and unbiased variances
    /// (momentum as BN's), and inference normalizes with them instead of each instance's own.
    public struct RunningStatistics {
        public let mean: Buffer<Scalar>
        public let variance: Buffer<Scalar>
        public let batchesTracked: Counter
        public let momentum: Double
    }
    public let running: RunningStatistics?

    public init(featureCount: Int, groups: Int, epsilon: Double = 1e-5, trackRunningStatistics momentum: Double? = nil) {
        precondition(featureCount > 0 && groups > 0 && featureCount % groups == 0, "GroupNorm: groups must divide the channels")
        precondition(momentum == nil || groups == featureCount, "running statistics are InstanceNorm's (one group per channel)")
        self.featureCount = featureCount
        self.groups = groups
        self.epsilon = epsilon
        weight = Parameter(Tensor(shape: [featureCount], repeating: 1))
        bias = Parameter(Tensor(shape: [featureCount]))
        running = momentum.map {
            RunningStatistics(mean: Buffer(Tensor(shape: [featureCount])), variance: Buffer(Tensor(shape: [featureCount], repeating: 1)),
                              batchesTracked: Counter(), momentum: $0)
        }
    }

    public var state: [StateEntry<Scalar>] {
        var entries: [StateEntry<Scalar>] = [.parameter("weight", weight), .parameter("bias", bias)]
        if let running {
            entries += [.buffer("running_mean", running.mean), .buffer("running_var", running.variance),
                        .counter("num_batches_tracked", running.batchesTracked)]
        }
        return entries
    }

    public func forward(_ input: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        guard let layout = ChannelLayout(shape: input.shape), layout.channels == featureCount else {
            throw LayerError("GroupNorm: expected N×\(featureCount) or N×\(featureCount)×H×W input, got \(input.shape)")
        }
        if let running, mode == .inference {
            let mean = Scalar.widened(running.mean.value.scalars)
            let invStd = Scalar.widened(running.variance.value.scalars).map { 1 / ($0 + epsilon).squareRoot() }
            let gamma = Scalar.widened(weight.value.scalars), beta = Scalar.widened(bias.value.scalars)
            let scale = (0..<featureCount).map { gamma[$0] * invStd[$0] }
            return .affine(input, layout: layout, scale: scale, offset: (0..<featureCount).map { beta[$0] - mean[$0] * scale[$0] })
        }
        let span = featureCount / groups * layout.spatial
        var mean = [Double](repeating: 0, count: layout.batch * groups), invStd = mean
        input.scalars.withUnsafeBufferPointer { x in
            mean.withUnsafeMutableBufferPointer { m in
                invStd.withUnsafeMutableBufferPointer { s in
                    Scalar.segmentStatistics(x, segments: layout.batch * groups, length: span, epsilon: epsilon, mean: m, invStd: s)
                }
            }
        }
        let gamma = Scalar.widened(weight.value.scalars), beta = Scalar.widened(bias.value.scalars)
        let perGroup = featureCount / groups
        // y = a·x + b per (sample, channel): a = γ_c/σ_{n,g}, b = β_c − μ_{n,g}·a.
        var scale = [Double](repeating: 0, count: layout.batch * featureCount), offset = scale
        for n in 0..<layout.batch {
            for c in 0..<featureCount {
                let g = n * groups + c / perGroup
                scale[n * featureCount + c] = gamma[c] * invStd[g]
                offset[n * featureCount + c] = beta[c] - mean[g] * scale[n * featureCount + c]
            }
        }
        if mode == .training {
            lastInput = input
            lastMean = mean
            lastInvStd = invStd
            if let running, layout.batch > 0 {
                // Instances' statistics averaged over the batch; variance unbiased over H×W.
                let n = Double(layout.spatial), correction = n > 1 ? n / (n - 1) : 1, m = running.momentum
                running.batchesTracked.value += 1
                for c in 0..<featureCount {
                    var meanSum = 0.0, varianceSum = 0.0
                    for i in 0..<layout.batch {
                        let k = i * featureCount + c
                        meanSum += mean[k]
                        varianceSum += max(1 / (invStd[k] * invStd[k]) - epsilon, 0) * correction
                    }
                    let batch = Double(layout.batch)
                    running.mean.value.scalars[c] = Scalar((1 - m) * Double(running.mean.value.scalars[c]) + m * meanSum / batch)
                    running.variance.value.scalars[c] = Scalar((1 - m) * Double(running.variance.value.scalars[c]) + m * varianceSum / batch)
                }
            }
        }
        let planes = ChannelLayout(batch: 1, channels: layout.batch * featureCount, spatial: layout.spatial)
        return .affine(input, layout: planes, scale: scale, offset: offset)
    }

    /// Per group: dx = (1/σ)·(g − mean(g) − x̂·mean(g·x̂)) with g = γ_c·dy; dγ_c = Σ dy·x̂, dβ_c = Σ dy.
    public func backward(_ outputGradient: Tensor<Scalar>) throws -> Tensor<Scalar> {
        let input = lastInput
        guard outputGradient.shape == input.shape, let layout = ChannelLayout(shape: input.shape) else {
            throw LayerError("GroupNorm: gradient \(outputGradient.shape) does not match the forward input \(input.shape)")
        }
        let C = featureCount, HW = layout.spatial, perGroup = C / groups
        let N = layout.batch
        // Per (sample, channel): Σdy and Σdy·(x − μ_{n,g}).
        var sums = [Double](repeating: 0, count: 2 * N * C)
        let means = (0..<(N * C)).map { lastMean[($0 / C) * groups + ($0 % C) / perGroup] }
        let planes = ChannelLayout(batch: 1, channels: N * C, spatial: HW)
        outputGradient.scalars.withUnsafeBufferPointer { dy in
            input.scalars.withUnsafeBufferPointer { x in
                means.withUnsafeBufferPointer { mu in
                    sums.withUnsafeMutableBufferPointer { Scalar.gradientSums(dy, x, layout: planes, mean: mu, into: $0) }
                }
            }
        }
        let gamma = Scalar.widened(weight.value.scalars)
        // Per sample: [dβ (C), dγ (C)], added over samples along the pairwise tree in Scalar.
        var parameterLeaves = [Double](repeating: 0, count: N * 2 * C)
        var p = [Double](repeating: 0, count: N * C), q = p, r = p
        let count = Double(perGroup * HW)
        for n in 0..<N {
            for g in 0..<groups {
                let s = lastInvStd[n * groups + g]
                var meanG = 0.0, meanGX = 0.0
                for c in (g * perGroup)..<((g + 1) * perGroup) {
                    let sumDy = sums[n * C + c], sumDyX = sums[N * C + n * C + c] * s
                    parameterLeaves[n * 2 * C + c] = sumDy
                    parameterLeaves[n * 2 * C + C + c] = sumDyX
                    meanG += gamma[c] * sumDy / count
                    meanGX += gamma[c] * sumDyX / count
                }
                for c in (g * perGroup)..<((g + 1) * perGroup) {
                    let i = n * C + c
                    p[i] = gamma[c] * s
                    q[i] = -s * s * meanGX
                    r[i] = -s * meanG - q[i] * lastMean[n * groups + g]
                }
            }
        }
        parameterLeaves.withUnsafeBufferPointer { l in
            bias.gradient = Tensor(shape: [C], scalars: Scalar.pairwiseSum(ofRounded: l.baseAddress!, count: N, width: C, stride: 2 * C))
            weight.gradient = Tensor(shape: [C], scalars: Scalar.pairwiseSum(ofRounded: l.baseAddress! + C, count: N, width: C, stride: 2 * C))
        }
        return .combining(outputGradient, input, layout: planes, dyScale: p, xScale: q, offset: r)
    }
}
