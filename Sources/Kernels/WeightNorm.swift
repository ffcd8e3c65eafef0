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
public final class WeightNorm<Scalar: TensorScalar, Wrapped: Layer & PatchSource>: Layer where Wrapped.Scalar == Scalar {
    public let layer: Wrapped
    public let direction: Parameter<Scalar>
    public let magnitude: Parameter<Scalar>
    private var norms: [Double] = []

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
        materializeWeight()
        return try layer.forward(input, mode: mode)
    }

    public func backward(_ outputGradient: Tensor<Scalar>) throws -> Tensor<Scalar> {
        let dx = try layer.backward(outputGradient)
        let C = channels, K = width
        let dw = layer.patchWeight.gradient.scalars
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
        return dx
    }
}
