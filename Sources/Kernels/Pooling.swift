/// Max pooling over k×k windows with the given stride and padding (padding never wins).
public final class MaxPool2d<Scalar: TensorScalar>: Layer {
    public let window: PoolingWindow
    private var argmax: [Int32] = []
    private var lastShape: [Int] = []

    public init(kernelSize: Int, stride: Int? = nil, padding: Int = 0) {
        window = PoolingWindow(kernelSize: kernelSize, stride: stride, padding: padding, layer: "MaxPool2d")
    }

    func geometry(_ shape: [Int]) throws -> PoolingGeometry { try window.geometry(shape) }

    public func forward(_ input: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        let g = try geometry(input.shape)
        let planes = input.shape[0] * input.shape[1]
        var output = Tensor<Scalar>(shape: [input.shape[0], input.shape[1], g.outputHeight, g.outputWidth])
        var indices = [Int32](repeating: 0, count: output.count)
        input.scalars.withUnsafeBufferPointer { x in
            output.scalars.withUnsafeMutableBufferPointer { y in
                indices.withUnsafeMutableBufferPointer { a in Scalar.maxPoolForward(x, g, planes: planes, y, argmax: a) }
            }
        }
        if mode == .training { argmax = indices; lastShape = input.shape }
        return output
    }

    public func backward(_ outputGradient: Tensor<Scalar>) throws -> Tensor<Scalar> {
        let g = try geometry(lastShape)
        try requireShape(outputGradient.count == argmax.count, "MaxPool2d", "gradient \(outputGradient.shape) does not match the forward output")
        var inputGradient = Tensor<Scalar>(shape: lastShape)
        outputGradient.scalars.withUnsafeBufferPointer { dy in
            argmax.withUnsafeBufferPointer { a in
                inputGradient.scalars.withUnsafeMutableBufferPointer { dx in
                    Scalar.maxPoolBackward(dy, argmax: a, g, planes: lastShape[0] * lastShape[1], dx)
                }
            }
        }
        return inputGradient
    }
}

/// Average pooling over k×k windows (divides by k², padding included, as PyTorch's default).
public final class AvgPool2d<Scalar: TensorScalar>: Layer {
    public let window: PoolingWindow
    private var lastShape: [Int] = []

    public init(kernelSize: Int, stride: Int? = nil, padding: Int = 0) {
        window = PoolingWindow(kernelSize: kernelSize, stride: stride, padding: padding, layer: "AvgPool2d")
    }

    func geometry(_ shape: [Int]) throws -> PoolingGeometry { try window.geometry(shape) }

    public func forward(_ input: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        let g = try geometry(input.shape)
        var output = Tensor<Scalar>(shape: [input.shape[0], input.shape[1], g.outputHeight, g.outputWidth])
        input.scalars.withUnsafeBufferPointer { x in
            output.scalars.withUnsafeMutableBufferPointer { y in Scalar.averagePoolForward(x, g, planes: input.shape[0] * input.shape[1], y) }
        }
        if mode == .training { lastShape = input.shape }
        return output
    }

    public func backward(_ outputGradient: Tensor<Scalar>) throws -> Tensor<Scalar> {
        let g = try geometry(lastShape)
        try requireShape(outputGradient.shape == [lastShape[0], lastShape[1], g.outputHeight, g.outputWidth], "AvgPool2d",
                         "gradient \(outputGradient.shape) does not match the forward output")
        var inputGradient = Tensor<Scalar>(shape: lastShape)
        outputGradient.scalars.withUnsafeBufferPointer { dy in
            inputGradient.scalars.withUnsafeMutableBufferPointer { dx in Scalar.averagePoolBackward(dy, g, planes: lastShape[0] * lastShape[1], dx) }
        }
        return inputGradient
    }
}

/// N×C×H×W → N×C, the mean over H×W.
public final class GlobalAvgPool<Scalar: TensorScalar>: Layer {
    private var lastShape: [Int] = []
    public init() {}

    public func forward(_ input: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        try requireShape(input.rank == 4, "GlobalAvgPool", "expected N×C×H×W input, got \(input.shape)")
        let planes = input.shape[0] * input.shape[1], spatial = input.shape[2] * input.shape[3]
        var output = Tensor<Scalar>(shape: [input.shape[0], input.shape[1]])
        input.scalars.withUnsafeBufferPointer { x in
            output.scalars.withUnsafeMutableBufferPointer { y in Scalar.globalAveragePoolForward(x, planes: planes, spatial: spatial, y) }
        }
        if mode == .training { lastShape = input.shape }
        return output
    }

    public func backward(_ outputGradient: Tensor<Scalar>) throws -> Tensor<Scalar> {
        try requireShape(outputGradient.shape == Array(lastShape.prefix(2)), "GlobalAvgPool",
                         "gradient \(outputGradient.shape) does not match the forward output")
        var inputGradient = Tensor<Scalar>(shape: lastShape)
        outputGradient.scalars.withUnsafeBufferPointer { dy in
            inputGradient.scalars.withUnsafeMutableBufferPointer { dx in
                Scalar.globalAveragePoolBackward(dy, planes: lastShape[0] * lastShape[1], spatial: lastShape[2] * lastShape[3], dx)
            }
        }
        return inputGradient
    }
}

/// A k×k pooling window with stride (default k) and padding (at most k/2), shared by the pooling
/// layers.
public struct PoolingWindow: Equatable {
    public let kernelSize: Int, stride: Int, padding: Int
    let layer: String

    init(kernelSize: Int, stride: Int?, padding: Int, layer: String) {
        precondition(kernelSize > 0 && (stride ?? kernelSize) > 0 && padding >= 0 && padding * 2 <= kernelSize, "invalid \(layer) configuration")
        self.kernelSize = kernelSize
        self.stride = stride ?? kernelSize
        self.padding = padding
        self.layer = layer
    }

    func geometry(_ shape: [Int]) throws -> PoolingGeometry {
        try requireShape(shape.count == 4, layer, "expected N×C×H×W input, got \(shape)")
        let g = PoolingGeometry(height: shape[2], width: shape[3], kernel: kernelSize, stride: stride, padding: padding)
        try requireShape(g.outputHeight > 0 && g.outputWidth > 0, layer, "input \(shape[2])×\(shape[3]) is smaller than the window")
        return g
    }
}
