import Collectives
import Kernels

/// Mean-only batch normalization (Salimans & Kingma 2016, §3.2), the companion of weight
/// normalization: y = x − μ_B + β per channel, with μ_B the batch mean over the group (one
/// all-reduce of count and sums, as SyncBN's forward) and no division by a standard deviation —
/// weight normalization's g sets the scale. A running mean (EMA with `momentum`, in Double)
/// replaces μ_B for inference. Backward: dx = dy − Σdy/M with Σdy over the group (one
/// all-reduce), dβ = Σdy (local; the gradient exchange sums it).
///
/// State, by PyTorch's names: `bias`, `running_mean`, `num_batches_tracked`.
public final class MeanOnlyBatchNorm<Scalar: BatchNormScalar>: Layer {
    public let featureCount: Int
    public let momentum: Double
    public let group: (any Communicator)?
    public let bias: Parameter<Scalar>
    public let runningMean: Buffer<Scalar>
    public let batchesTracked: Counter
    private var lastLayout = ChannelLayout(batch: 0, channels: 0, spatial: 0)
    private var lastCount = 0.0
    /// Statistics of the last training or `.batchStatistics` batch over the group (PreciseBN uses
    /// the mean); nil when the group had no data.
    public private(set) var lastStatistics: BatchStatistics?

    public init(featureCount: Int, momentum: Double = 0.1, group: (any Communicator)? = nil) {
        precondition(featureCount > 0 && (0...1).contains(momentum), "MeanOnlyBatchNorm: features > 0, momentum in [0, 1]")
        self.featureCount = featureCount
        self.momentum = momentum
        self.group = group
        bias = Parameter(Tensor(shape: [featureCount]))
        runningMean = Buffer(Tensor(shape: [featureCount]))
        batchesTracked = Counter()
    }

    public var state: [StateEntry<Scalar>] {
        [.parameter("bias", bias), .buffer("running_mean", runningMean), .counter("num_batches_tracked", batchesTracked)]
    }

    func layout(of shape: [Int]) throws -> ChannelLayout {
        guard let layout = ChannelLayout(shape: shape), layout.channels == featureCount else {
            throw LayerError("MeanOnlyBatchNorm: expected N×\(featureCount) or N×\(featureCount)×H×W input, got \(shape)")
        }
        return layout
    }

    func shifted(_ input: Tensor<Scalar>, layout: ChannelLayout, mean: [Double]) -> Tensor<Scalar> {
        let beta = Scalar.widened(bias.value.scalars)
        return .affine(input, layout: layout, scale: [Double](repeating: 1, count: featureCount),
                       offset: (0..<featureCount).map { beta[$0] - mean[$0] })
    }

    public func forward(_ input: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        let layout = try layout(of: input.shape)
        if mode == .inference { return shifted(input, layout: layout, mean: Scalar.widened(runningMean.value.scalars)) }
        let statistics = try BatchStatistics.compute(input, layout: layout, shift: Scalar.widened(runningMean.value.scalars), group: group)
        lastStatistics = statistics
        guard let statistics else {
            lastCount = 0
            lastLayout = layout
            return Tensor(shape: input.shape)
        }
        if mode == .training {
            lastLayout = layout
            lastCount = statistics.count
            batchesTracked.value += 1
            for c in 0..<featureCount {
                runningMean.value.scalars[c] = Scalar((1 - momentum) * Double(runningMean.value.scalars[c]) + momentum * statistics.mean[c])
            }
        }
        return shifted(input, layout: layout, mean: statistics.mean)
    }

    public func backward(_ outputGradient: Tensor<Scalar>) throws -> Tensor<Scalar> {
        let C = featureCount, layout = lastLayout
        guard outputGradient.count == layout.batch * C * layout.spatial else {
            throw LayerError("MeanOnlyBatchNorm: gradient \(outputGradient.shape) does not match the forward input")
        }
        // Σdy per channel in Double for the group (per-sample sums along the pairwise tree), and
        // dβ from the same per-sample sums rounded to Scalar and added along the tree.
        var global = [Double](repeating: 0, count: 2 * C)
        var leaves = [Double](repeating: 0, count: layout.batch * 2 * C)
        let zeros = [Double](repeating: 0, count: C)
        outputGradient.scalars.withUnsafeBufferPointer { dy in
            zeros.withUnsafeBufferPointer { mu in
                global.withUnsafeMutableBufferPointer { sums in
                    leaves.withUnsafeMutableBufferPointer { Scalar.gradientSums(dy, dy, layout: layout, mean: mu, into: sums, leaves: $0.baseAddress!) }
                }
            }
        }
        global.removeLast(C)
        bias.gradient = leaves.withUnsafeBufferPointer {
            Tensor(shape: [C], scalars: Scalar.pairwiseSum(ofRounded: $0.baseAddress!, count: layout.batch, width: C, stride: 2 * C))
        }
        if let group { try group.allReduceSum(&global) }
        guard lastCount > 0 else { return Tensor(shape: outputGradient.shape) }
        return .affine(outputGradient, layout: layout, scale: [Double](repeating: 1, count: C),
                       offset: global.map { -$0 / lastCount })
    }
}
