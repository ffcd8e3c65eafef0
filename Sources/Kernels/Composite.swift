/// A layer made of named child layers. `leaves` walks the tree down to the layers that do the
/// work, under their full dotted names (what checkpoints, PreciseBN and folding look for).
public protocol LayerContainer<Scalar>: Layer {
    /// The direct children under their names relative to this layer.
    var children: [(name: String, layer: any Layer<Scalar>)] { get }
}

/// Every non-container layer under `layers`, depth first, with full dotted names.
public func leafLayers<Scalar>(_ layers: [(name: String, layer: any Layer<Scalar>)]) -> [(name: String, layer: any Layer<Scalar>)] {
    layers.flatMap { entry -> [(name: String, layer: any Layer<Scalar>)] in
        guard let container = entry.layer as? any LayerContainer<Scalar> else { return [entry] }
        return leafLayers(container.children).map { (entry.name + "." + $0.name, $0.layer) }
    }
}

/// Layers applied one after another (PyTorch's `nn.Sequential`); children keep their own names.
public final class Sequential<Scalar: TensorScalar>: LayerContainer {
    public let children: [(name: String, layer: any Layer<Scalar>)]

    public init(_ children: [(name: String, layer: any Layer<Scalar>)]) {
        self.children = children
    }

    public func forward(_ input: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        var x = input
        for (_, layer) in children { x = try layer.forward(x, mode: mode) }
        return x
    }

    public func backward(_ outputGradient: Tensor<Scalar>) throws -> Tensor<Scalar> {
        var g = outputGradient
        for (_, layer) in children.reversed() { g = try layer.backward(g) }
        return g
    }

    public var state: [StateEntry<Scalar>] {
        children.flatMap { child in child.layer.state.map { $0.prefixed(child.name) } }
    }
}

/// y = ReLU(residual(x) + shortcut(x)), the shortcut being the identity when absent (He et al.
/// 2016). The sum and the ReLU are one pass, and so is their backward: the gradient that reaches
/// both branches is dy where y > 0, and dx is the sum of the branches' input gradients.
///
/// Checkpoint names follow torchvision's BasicBlock: the residual branch's children under their
/// own names (`conv1`, `bn1`, `conv2`, `bn2`), the shortcut's under `downsample.`.
public final class ResidualBlock<Scalar: TensorScalar>: LayerContainer {
    public let residual: Sequential<Scalar>
    public let shortcut: Sequential<Scalar>?
    private var lastOutput: Tensor<Scalar>?

    public init(residual: Sequential<Scalar>, shortcut: Sequential<Scalar>?) {
        self.residual = residual
        self.shortcut = shortcut
    }

    public var children: [(name: String, layer: any Layer<Scalar>)] {
        residual.children + (shortcut.map { [("downsample", $0 as any Layer<Scalar>)] } ?? [])
    }

    public var state: [StateEntry<Scalar>] {
        residual.state + (shortcut.map { s in s.state.map { $0.prefixed("downsample") } } ?? [])
    }

    public func forward(_ input: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        var output = try residual.forward(input, mode: mode)
        let skip = try shortcut?.forward(input, mode: mode) ?? input
        try requireShape(skip.shape == output.shape, "ResidualBlock",
                         "residual branch gives \(output.shape) but the shortcut gives \(skip.shape)")
        output.scalars.withUnsafeMutableBufferPointer { y in
            skip.scalars.withUnsafeBufferPointer { s in Scalar.addReLU(s, into: y) }
        }
        if mode == .training { lastOutput = output }
        return output
    }

    public func backward(_ outputGradient: Tensor<Scalar>) throws -> Tensor<Scalar> {
        guard let y = lastOutput else { preconditionFailure("ResidualBlock.backward before a training forward") }
        try requireShape(outputGradient.shape == y.shape, "ResidualBlock", "gradient \(outputGradient.shape) does not match output \(y.shape)")
        var gate = Tensor<Scalar>(shape: y.shape)
        y.scalars.withUnsafeBufferPointer { yp in
            outputGradient.scalars.withUnsafeBufferPointer { dy in
                gate.scalars.withUnsafeMutableBufferPointer { g in Scalar.reluBackward(yp, dy, g) }
            }
        }
        var inputGradient = try residual.backward(gate)
        let skipGradient = try shortcut?.backward(gate) ?? gate
        try requireShape(skipGradient.shape == inputGradient.shape, "ResidualBlock", "branch input gradients differ in shape")
        inputGradient.scalars.withUnsafeMutableBufferPointer { dx in
            skipGradient.scalars.withUnsafeBufferPointer { s in Scalar.add(s, into: dx) }
        }
        return inputGradient
    }
}
