import Collectives
import Kernels

/// Batch Renormalization (Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch
/// Dependence in Batch-Normalized Models", arXiv 1702.03275).
///
/// In training, with the (synchronized) batch statistics μ_B, σ_B = √(σ_B² + ε) and the running
/// statistics μ, σ = √(running_var + ε):
///
///     r = clip(σ_B/σ, 1/r_max, r_max),   d = clip((μ_B − μ)/σ, −d_max, d_max)
///     x̂ = (x − μ_B)/σ_B · r + d,        y = γ·x̂ + β
///
/// r and d are treated as constants in backward. With r_max = 1 and d_max = 0 it is exactly BN;
/// the paper starts there and relaxes the limits (``rMax`` and ``dMax``, set before every step
/// from ``schedule`` by ``prepare(step:of:)``). Running statistics are updated as BN's; inference
/// uses them.
public final class BatchRenormalization<Scalar: BatchNormScalar>: BatchNorm<Scalar> {
    /// Upper clip of r (≥ 1); 1 = plain BN.
    public var rMax: Double = 1
    /// Clip of |d| (≥ 0); 0 = plain BN.
    public var dMax: Double = 0
    /// How the clips relax over the run; nil: ``rMax`` and ``dMax`` are left as set.
    public var schedule: Schedule?

    /// The paper's shape scaled to the run: plain BN (r_max = 1, d_max = 0) for the warm-up
    /// fraction of the steps, then r_max relaxed linearly to `rMax` over the next 25 % and d_max to
    /// `dMax` over the next 16 % (Ioffe 2017: 5k warm-up steps, r_max 1→3 over 40k and d_max 0→5
    /// over 25k, of a ~160k-step run).
    public struct Schedule: Sendable, Equatable {
        public var rMax: Double
        public var dMax: Double
        public var warmup: Double

        public init(rMax: Double = 3, dMax: Double = 5, warmup: Double = 0.03) {
            self.rMax = rMax
            self.dMax = dMax
            self.warmup = warmup
        }

        public func limits(step: Int, of totalSteps: Int) -> (rMax: Double, dMax: Double) {
            let t = Double(step) / Double(max(totalSteps, 1))
            guard t >= warmup else { return (1, 0) }
            return (1 + (rMax - 1) * min(1, (t - warmup) / 0.25), dMax * min(1, (t - warmup) / 0.16))
        }
    }

    public override func prepare(step: Int, of totalSteps: Int) {
        super.prepare(step: step, of: totalSteps)
        if let schedule { (rMax, dMax) = schedule.limits(step: step, of: totalSteps) }
    }

    public override init(featureCount: Int, epsilon: Double = 1e-5, momentum: Double? = 0.1, group: (any Communicator)? = nil) {
        super.init(featureCount: featureCount, epsilon: epsilon, momentum: momentum, group: group)
    }

    public override func trainingStatistics(_ input: Tensor<Scalar>, layout: ChannelLayout) throws -> TrainingNormalization? {
        guard var normalization = try super.trainingStatistics(input, layout: layout) else { return nil }
        let C = featureCount
        let runningMean = Scalar.widened(self.runningMean.value.scalars)
        let runningStd = Scalar.widened(runningVariance.value.scalars).map { ($0 + epsilon).squareRoot() }
        var r = [Double](repeating: 1, count: C), d = [Double](repeating: 0, count: C)
        var mean = normalization.mean, variance = normalization.variance
        for c in 0..<C {
            let batchStd = (normalization.variance[c] + epsilon).squareRoot()
            r[c] = min(max(batchStd / runningStd[c], 1 / rMax), rMax)
            d[c] = min(max((normalization.mean[c] - runningMean[c]) / runningStd[c], -dMax), dMax)
            // Express y = γ(r(x − μ_B)/σ_B + d) + β as BN's γ(x − m)/√(v + ε) + β.
            let scale = r[c] / batchStd
            variance[c] = 1 / (scale * scale) - epsilon
            mean[c] = normalization.mean[c] - d[c] / scale
        }
        lastRenorm = (r, d, normalization.mean)
        normalization.mean = mean
        normalization.variance = variance
        return normalization
    }
}
