/// max(x, 0), element-wise. Keeps its output for backward (dx = dy where y > 0).
public final class ReLU<Scalar: TensorScalar>: Layer {
    private var lastOutput: Tensor<Scalar>?
    public init() {}

    public func forward(_ input: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        var output = Tensor<Scalar>(shape: input.shape)
        input.scalars.withUnsafeBufferPointer { x in
            output.scalars.withUnsafeMutableBufferPointer { y in Scalar.reluForward(x, y) }
        }
        if mode == .training { lastOutput = output }
        return output
    }

    public func backward(_ outputGradient: Tensor<Scalar>) throws -> Tensor<Scalar> {
        guard let y = lastOutput else { preconditionFailure("ReLU.backward before a training forward") }
        try requireShape(outputGradient.shape == y.shape, "ReLU", "gradient \(outputGradient.shape) does not match output \(y.shape)")
        var inputGradient = Tensor<Scalar>(shape: y.shape)
        y.scalars.withUnsafeBufferPointer { yp in
            outputGradient.scalars.withUnsafeBufferPointer { dy in
                inputGradient.scalars.withUnsafeMutableBufferPointer { dx in Scalar.reluBackward(yp, dy, dx) }
            }
        }
        return inputGradient
    }
}

/// N×C×H×W → N×(C·H·W).
public final class Flatten<Scalar: TensorScalar>: Layer {
    private var lastShape: [Int] = []
    public init() {}

    public func forward(_ input: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        try requireShape(input.rank >= 2, "Flatten", "expected at least 2 dimensions, got \(input.shape)")
        if mode == .training { lastShape = input.shape }
        return input.reshaped([input.shape[0], input.shape.dropFirst().reduce(1, *)])
    }

    public func backward(_ outputGradient: Tensor<Scalar>) throws -> Tensor<Scalar> {
        outputGradient.reshaped(lastShape)
    }
}
