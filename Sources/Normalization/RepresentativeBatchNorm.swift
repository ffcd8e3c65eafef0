import Collectives
import Foundation
import Kernels

/// Representative batch normalization (Gao et al. 2021, "Representative Batch Normalization with
/// Feature Calibration", CVPR; code ShangHua-Gao/RBN): BN between two per-instance calibrations.
///
///     centering:  X_cm = X + w_m ⊙ K(X)                     (K = per-instance, per-channel mean over H×W)
///     normalize:  X̂ = BN(X_cm)                               (batch or running statistics, synced over the group)
///     scaling:    X_cs = X̂ ⊙ sigmoid(w_v ⊙ K(X̂) + w_b)
///     affine:     Y = γ ⊙ X_cs + β
///
/// with learnable per-channel w_m, w_v, w_b initialised to 0, 0, 1 (the paper's), so training
/// starts from BN with every output scaled by sigmoid(1). The calibrations use the instance's own
/// features in training and in inference alike. For N×C input K(X) = X. The inner BN carries no
/// affine of its own; its running statistics are this layer's.
public final class RepresentativeBatchNorm<Scalar: BatchNormScalar>: Layer {
    public let featureCount: Int
    public let normalization: BatchNorm<Scalar>
    public let weight: Parameter<Scalar>
    public let bias: Parameter<Scalar>
    public let centeringWeight: Parameter<Scalar>
    public let scalingWeight: Parameter<Scalar>
    public let scalingBias: Parameter<Scalar>

    private var saved: (shape: [Int], spatial: Int, centerMean: [Double], normalized: [Double], instanceMean: [Double], gate: [Double])?

    public init(featureCount: Int, epsilon: Double = 1e-5, momentum: Double? = 0.1, group: (any Communicator)? = nil) {
        self.featureCount = featureCount
        normalization = BatchNorm(featureCount: featureCount, epsilon: epsilon, momentum: momentum, group: group)
        weight = Parameter(Tensor(shape: [featureCount], repeating: 1))
        bias = Parameter(Tensor(shape: [featureCount]))
        centeringWeight = Parameter(Tensor(shape: [featureCount]))
        scalingWeight = Parameter(Tensor(shape: [featureCount]))
        scalingBias = Parameter(Tensor(shape: [featureCount], repeating: 1))
    }

    public var state: [StateEntry<Scalar>] {
        [.parameter("weight", weight), .parameter("bias", bias), .parameter("centering_weight", centeringWeight),
         .parameter("scaling_weight", scalingWeight), .parameter("scaling_bias", scalingBias)]
            + normalization.state.filter { if case .parameter = $0 { return false } else { return true } }
    }

    /// Per (sample, channel) mean over the spatial positions.
    static func instanceMeans(_ x: [Double], planes: Int, spatial: Int) -> [Double] {
        (0..<planes).map { plane in
            var total = 0.0
            for p in 0..<spatial { total += x[plane * spatial + p] }
            return total / Double(spatial)
        }
    }

    public func forward(_ input: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        guard let layout = ChannelLayout(shape: input.shape), layout.channels == featureCount else {
            throw LayerError("RepresentativeBatchNorm: expected N×\(featureCount) or N×\(featureCount)×H×W input, got \(input.shape)")
        }
        let C = featureCount, HW = layout.spatial, planes = layout.batch * C
        let x = Scalar.widened(input.scalars)
        let wm = Scalar.widened(centeringWeight.value.scalars), wv = Scalar.widened(scalingWeight.value.scalars)
        let wb = Scalar.widened(scalingBias.value.scalars), gamma = Scalar.widened(weight.value.scalars), beta = Scalar.widened(bias.value.scalars)
        let centerMean = Self.instanceMeans(x, planes: planes, spatial: HW)
        var centered = x
        for i in 0..<x.count { centered[i] += wm[(i / HW) % C] * centerMean[i / HW] }
        let normalizedTensor = try normalization.forward(Tensor(shape: input.shape, scalars: Scalar.narrowed(centered)), mode: mode)
        let normalized = Scalar.widened(normalizedTensor.scalars)
        let instanceMean = Self.instanceMeans(normalized, planes: planes, spatial: HW)
        let gate = (0..<planes).map { plane -> Double in
            let c = plane % C
            return 1 / (1 + (-(wv[c] * instanceMean[plane] + wb[c])).exp())
        }
        var y = [Double](repeating: 0, count: x.count)
        for i in 0..<x.count {
            let c = (i / HW) % C
            y[i] = gamma[c] * normalized[i] * gate[i / HW] + beta[c]
        }
        if mode == .training { saved = (input.shape, HW, centerMean, normalized, instanceMean, gate) }
        return Tensor(shape: input.shape, scalars: Scalar.narrowed(y))
    }

    public func backward(_ outputGradient: Tensor<Scalar>) throws -> Tensor<Scalar> {
        guard let saved, outputGradient.shape == saved.shape else {
            throw LayerError("RepresentativeBatchNorm: backward without a matching training forward")
        }
        let C = featureCount, HW = saved.spatial, planes = saved.gate.count
        let dy = Scalar.widened(outputGradient.scalars)
        let gamma = Scalar.widened(weight.value.scalars), wm = Scalar.widened(centeringWeight.value.scalars)
        let wv = Scalar.widened(scalingWeight.value.scalars)
        // Per sample and channel: [dγ, dβ, dw_v, dw_b, dw_m] (5C values a sample), added over the
        // samples along the pairwise tree in Scalar.
        let N = planes / C
        var leaves = [Double](repeating: 0, count: N * 5 * C)
        func leaf(_ k: Int, _ plane: Int) -> Int { (plane / C) * 5 * C + k * C + plane % C }
        // Through the affine and the scaling gate s = sigmoid(z), z = w_v·K(X̂) + w_b.
        var dnormalized = [Double](repeating: 0, count: dy.count)
        for plane in 0..<planes {
            let c = plane % C, s = saved.gate[plane]
            var gateGradient = 0.0, dgamma = 0.0, dbeta = 0.0
            for p in 0..<HW {
                let i = plane * HW + p
                dbeta += dy[i]
                dgamma += dy[i] * saved.normalized[i] * s
                let dScaled = dy[i] * gamma[c]
                gateGradient += dScaled * saved.normalized[i]
                dnormalized[i] = dScaled * s
            }
            let dz = gateGradient * s * (1 - s)
            leaves[leaf(0, plane)] = dgamma
            leaves[leaf(1, plane)] = dbeta
            leaves[leaf(2, plane)] = dz * saved.instanceMean[plane]
            leaves[leaf(3, plane)] = dz
            let share = dz * wv[c] / Double(HW)   // ∂z/∂X̂ through the instance mean
            for p in 0..<HW { dnormalized[plane * HW + p] += share }
        }
        let dcentered = Scalar.widened(try normalization.backward(Tensor(shape: saved.shape, scalars: Scalar.narrowed(dnormalized))).scalars)
        // Through the centering X + w_m·K(X).
        var dx = dcentered
        for plane in 0..<planes {
            let c = plane % C
            var total = 0.0
            for p in 0..<HW { total += dcentered[plane * HW + p] }
            leaves[leaf(4, plane)] = total * saved.centerMean[plane]
            let share = wm[c] * total / Double(HW)
            for p in 0..<HW { dx[plane * HW + p] += share }
        }
        leaves.withUnsafeBufferPointer { l in
            for (k, parameter) in [weight, bias, scalingWeight, scalingBias, centeringWeight].enumerated() {
                parameter.gradient = Tensor(shape: [C], scalars: Scalar.pairwiseSum(ofRounded: l.baseAddress! + k * C, count: N, width: C, stride: 5 * C))
            }
        }
        return Tensor(shape: saved.shape, scalars: Scalar.narrowed(dx))
    }
}

private extension Double {
    func exp() -> Double { Foundation.exp(self) }
}
