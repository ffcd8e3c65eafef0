/// A dense, row-major tensor: NCHW for images, N×C for features.
///
/// A value type over a Swift array, so layers can hand tensors around without aliasing surprises;
/// hot loops reach the storage through `withUnsafe…BufferPointer`.
public struct Tensor<Scalar: TensorScalar>: Equatable {
    public private(set) var shape: [Int]
    public var scalars: [Scalar]

    /// A tensor of `shape` filled with `value`.
    public init(shape: [Int], repeating value: Scalar = 0) {
        precondition(shape.allSatisfy { $0 >= 0 }, "negative dimension in \(shape)")
        self.shape = shape
        self.scalars = Scalar.filled(shape.reduce(1, *), with: value)
    }

    /// A tensor of `shape` whose every element `fill` writes (no zero-fill pass first: kernels
    /// that write every output element use this).
    public init(shape: [Int], filling fill: (UnsafeMutableBufferPointer<Scalar>) -> Void) {
        let count = shape.reduce(1, *)
        self.shape = shape
        self.scalars = [Scalar](unsafeUninitializedCapacity: count) { buffer, initialized in
            fill(buffer)
            initialized = count
        }
    }

    /// A tensor of `shape` over `scalars` (their count must be the product of `shape`).
    public init(shape: [Int], scalars: [Scalar]) {
        precondition(shape.reduce(1, *) == scalars.count, "\(scalars.count) scalars do not fill shape \(shape)")
        self.shape = shape
        self.scalars = scalars
    }

    public var count: Int { scalars.count }
    public var rank: Int { shape.count }

    /// The same scalars under another shape with the same element count.
    public func reshaped(_ newShape: [Int]) -> Tensor {
        Tensor(shape: newShape, scalars: scalars)
    }

    /// The tensor converted element-wise to another scalar type.
    public func converted<Other: TensorScalar>(to _: Other.Type = Other.self) -> Tensor<Other> {
        Tensor<Other>(shape: shape, scalars: scalars.map { Other($0) })
    }

    /// Samples `range` along the first dimension.
    public func slice(samples range: Range<Int>) -> Tensor {
        precondition(!shape.isEmpty && range.lowerBound >= 0 && range.upperBound <= shape[0], "slice \(range) outside \(shape)")
        let stride = shape.dropFirst().reduce(1, *)
        var newShape = shape
        newShape[0] = range.count
        return Tensor(shape: newShape, scalars: Array(scalars[(range.lowerBound * stride)..<(range.upperBound * stride)]))
    }

    /// Concatenation along the first dimension (all other dimensions must agree).
    public static func concatenate(_ parts: [Tensor], sampleShape: [Int]) -> Tensor {
        var scalars: [Scalar] = []
        scalars.reserveCapacity(parts.reduce(0) { $0 + $1.count })
        for part in parts {
            precondition(Array(part.shape.dropFirst()) == sampleShape, "cannot concatenate \(part.shape) with samples of \(sampleShape)")
            scalars.append(contentsOf: part.scalars)
        }
        return Tensor(shape: [scalars.count / max(sampleShape.reduce(1, *), 1)] + sampleShape, scalars: scalars)
    }
}

/// The interpretation of an N×C or N×C×H×W tensor that normalization and convolution use:
/// `batch` samples, `channels` channels, `spatial` = H·W positions per channel (1 for N×C).
public struct ChannelLayout: Equatable {
    public let batch: Int
    public let channels: Int
    public let spatial: Int

    public init(batch: Int, channels: Int, spatial: Int) {
        self.batch = batch
        self.channels = channels
        self.spatial = spatial
    }

    /// The layout of `shape` if it is N×C or N×C×H×W, otherwise nil.
    public init?(shape: [Int]) {
        switch shape.count {
        case 2: self.init(batch: shape[0], channels: shape[1], spatial: 1)
        case 4: self.init(batch: shape[0], channels: shape[1], spatial: shape[2] * shape[3])
        default: return nil
        }
    }

    /// Elements reduced per channel: N·H·W.
    public var perChannel: Int { batch * spatial }
}
