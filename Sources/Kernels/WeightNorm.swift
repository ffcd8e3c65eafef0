/// Weight normalization (Salimans & Kingma 2016, arXiv 1602.07868) of a convolution or linear
/// layer: its weight is w = g·v/‖v‖ with one g per output channel and ‖v‖ the norm of that
/// channel's row of v — PyTorch's `weight_norm(module, dim=0)`, parameters `weight_g` (shape
/// C_out × 1 × … × 1 there, C_out here) and `weight_v`.
///
/// Forward computes w into the wrapped layer and runs it; backward turns the layer's dL/dw into
///
///     dL/dg_c = Σ_k dw_ck·v_ck/‖v_c‖,    dL/dv_c = (g_c/‖v_c‖)·(dw_c − (dL/dg_c/‖v_c‖)·v_c)
///
/// in Double per channel. The wrapped layer's bias, if any, stays an ordinary parameter.
public final class WeightNorm<Scalar: TensorScalar, Wrapped: Layer & PatchSource>: Layer, SampleAligned, ExchangedGradients, ReparameterizedWeight where Wrapped.Scalar == Scalar {
    public let layer: Wrapped
    public var wrappedLayer: AnyObject { layer }

    /// Passed on to the wrapped layer.
    public var sampleOffset: Int {
        get { (layer as? SampleAligned)?.sampleOffset ?? 0 }
        set { (layer as? SampleAligned)?.sampleOffset = newValue }
    }
    public let direction: Parameter<Scalar>
    public let magnitude: Parameter<Scalar>
    private var norms: [Double] = []
    fileprivate var pendingInitialization: (bias: Parameter<Scalar>?, allReduce: (inout [Double]) throws -> Void)?

    /// Wraps `layer` with v = its current weight and g = ‖v‖ per channel (so w is unchanged).
    public init(_ layer: Wrapped) {
        self.layer = layer
        direction = Parameter(layer.patchWeight.value)
        let v = layer.patchWeight.value, channels = v.shape[0], width = v.count / channels
        magnitude = Parameter(Tensor(shape: [channels], scalars: (0..<channels).map { c in
            Scalar(v.scalars[(c * width)..<((c + 1) * width)].reduce(0.0) { $0 + Double($1) * Double($1) }.squareRoot())
        }))
    }

    public var state: [StateEntry<Scalar>] {
        // v and g under PyTorch's names, then the wrapped layer's own entries except its weight.
        let own: [StateEntry<Scalar>] = [.parameter("weight_g", magnitude), .parameter("weight_v", direction)]
        return own + layer.state.filter {
            if case let .parameter(_, p) = $0 { return p !== layer.patchWeight } else { return true }
        }
    }

    var channels: Int { magnitude.value.count }
    var width: Int { direction.value.count / channels }

    /// Writes w = g·v/‖v‖ into the wrapped layer.
    public func materializedLayer() -> AnyObject {
        materializeWeight()
        return layer
    }

    public func materializeWeight() {
        let C = channels, K = width
        norms = (0..<C).map { c in
            direction.value.scalars[(c * K)..<((c + 1) * K)].reduce(0.0) { $0 + Double($1) * Double($1) }.squareRoot()
        }
        for c in 0..<C {
            let scale = Double(magnitude.value.scalars[c]) / max(norms[c], 1e-30)
            for k in 0..<K { layer.patchWeight.value.scalars[c * K + k] = Scalar(Double(direction.value.scalars[c * K + k]) * scale) }
        }
    }

    public func forward(_ input: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        guard let (bias, allReduce) = pendingInitialization else {
            materializeWeight()
            return try layer.forward(input, mode: mode)
        }
        pendingInitialization = nil
        let C = channels
        magnitude.value.scalars = [Scalar](repeating: 1, count: C)
        materializeWeight()
        var t = try layer.forward(input, mode: mode)
        guard let layout = ChannelLayout(shape: t.shape) else { throw LayerError("WeightNorm: unexpected output shape \(t.shape)") }
        // Per sample [Σt, Σt²] per channel, added along the pairwise tree over the batch.
        let N = layout.batch
        var leaves = [Double](repeating: 0, count: max(N, 1) * 2 * C)
        for n in 0..<N {
            for c in 0..<C {
                let base = (n * C + c) * layout.spatial
                var s1 = 0.0, s2 = 0.0
                for p in 0..<layout.spatial {
                    let value = Double(t.scalars[base + p])
                    s1 += value
                    s2 += value * value
                }
                leaves[n * 2 * C + c] = s1
                leaves[n * 2 * C + C + c] = s2
            }
        }
        leaves.withUnsafeMutableBufferPointer { Double.pairwiseSumInPlace($0.baseAddress!, count: N, width: 2 * C, stride: 2 * C) }
        var sums = [Double(N * layout.spatial)] + leaves[0..<(2 * C)]
        try allReduce(&sums)
        guard sums[0] > 0 else { return t }
        for c in 0..<C {
            let mean = sums[1 + c] / sums[0], variance = max(sums[1 + C + c] / sums[0] - mean * mean, 0)
            let scale = 1 / (variance + 1e-5).squareRoot()
            magnitude.value.scalars[c] = Scalar(scale)
            bias?.value.scalars[c] = Scalar(-mean * scale)
        }
        materializeWeight()
        let scales = magnitude.value.scalars
        for n in 0..<layout.batch {
            for c in 0..<C {
                let base = (n * C + c) * layout.spatial
                for p in 0..<layout.spatial { t.scalars[base + p] *= scales[c] }
            }
        }
        return t
    }

    /// When set (data-parallel training sets it), backward leaves dL/dw, the wrapped layer's
    /// weight gradient, in `direction.gradient` (and 0 in `magnitude.gradient`) for the gradient
    /// exchange to sum over ranks; ``finishExchangedGradients()`` then turns the summed dL/dw into
    /// dL/dg and dL/dv, the same bits on every rank. (Summing per-rank dL/dg and dL/dv instead
    /// would round differently from one process computing them from the whole batch's dL/dw.)
    public var defersGradients = false

    public func backward(_ outputGradient: Tensor<Scalar>) throws -> Tensor<Scalar> {
        let dx = try layer.backward(outputGradient)
        if defersGradients {
            magnitude.gradient = Tensor(shape: [channels])
            direction.gradient = Tensor(shape: direction.value.shape, scalars: layer.patchWeight.gradient.scalars)
        } else {
            reparametrize(layer.patchWeight.gradient.scalars)
        }
        return dx
    }

    public func finishExchangedGradients() {
        guard defersGradients else { return }
        reparametrize(direction.gradient.scalars)
    }

    /// dL/dg and dL/dv from dL/dw.
    private func reparametrize(_ dw: [Scalar]) {
        let C = channels, K = width
        var dg = [Scalar](repeating: 0, count: C), dv = [Scalar](repeating: 0, count: C * K)
        for c in 0..<C {
            let n = max(norms[c], 1e-30), g = Double(magnitude.value.scalars[c])
            var dot = 0.0
            for k in 0..<K { dot += Double(dw[c * K + k]) * Double(direction.value.scalars[c * K + k]) }
            let gradG = dot / n
            dg[c] = Scalar(gradG)
            for k in 0..<K {
                dv[c * K + k] = Scalar(g / n * (Double(dw[c * K + k]) - gradG / n * Double(direction.value.scalars[c * K + k])))
            }
        }
        magnitude.gradient = Tensor(shape: [C], scalars: dg)
        direction.gradient = Tensor(shape: direction.value.shape, scalars: dv)
    }
}

extension WeightNorm {
    /// The paper's data-dependent initialisation (§2.2), run by the next forward: with g = 1 the
    /// pre-activations t = v·x/‖v‖ get their per-channel mean μ and standard deviation σ over the
    /// batch — summed over every rank by `allReduce` so that all replicas agree — and then
    /// g ← 1/σ and `bias` (the per-channel bias after this layer, if any) ← −μ/σ, so that the
    /// layer's outputs start with zero mean and unit variance.
    public func initializeOnNextForward(bias: Parameter<Scalar>?, allReduce: @escaping (inout [Double]) throws -> Void) {
        pendingInitialization = (bias, allReduce)
    }
}

/// A learned per-channel bias, y = x + b (the bias of a weight-normalized layer that has no
/// normalization after it). State: `bias`.
public final class ChannelBias<Scalar: TensorScalar>: Layer {
    public let bias: Parameter<Scalar>
    private var lastLayout = ChannelLayout(batch: 0, channels: 0, spatial: 0)

    public init(featureCount: Int) { bias = Parameter(Tensor(shape: [featureCount])) }

    public var state: [StateEntry<Scalar>] { [.parameter("bias", bias)] }

    public func forward(_ input: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        guard let layout = ChannelLayout(shape: input.shape), layout.channels == bias.value.count else {
            throw LayerError("ChannelBias: expected N×\(bias.value.count)(×H×W) input, got \(input.shape)")
        }
        lastLayout = layout
        var output = input
        let C = layout.channels, P = layout.spatial
        for n in 0..<layout.batch {
            for c in 0..<C {
                let b = bias.value.scalars[c], base = (n * C + c) * P
                for p in 0..<P { output.scalars[base + p] += b }
            }
        }
        return output
    }

    public func backward(_ outputGradient: Tensor<Scalar>) throws -> Tensor<Scalar> {
        var sums = Scalar.filled(bias.value.count, with: 0)
        outputGradient.scalars.withUnsafeBufferPointer { dy in
            sums.withUnsafeMutableBufferPointer { Scalar.channelSums(dy, layout: lastLayout, into: $0) }
        }
        bias.gradient = Tensor(shape: [bias.value.count], scalars: sums)
        return outputGradient
    }
}
