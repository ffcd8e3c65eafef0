import CDNNL

/// Which code computes a Float convolution: im2col + OpenBLAS's sgemm, or oneDNN's direct
/// convolutions (JIT-compiled for the CPU). Double convolutions always use im2col (the gradient
/// checks run in Double against the definition).
public enum ConvolutionBackend: String, Codable, CaseIterable, Sendable {
    case im2col
    case onednn
}

/// The layout oneDNN computes in: plain NCHW/OIHW, or the blocked layout its convolution prefers
/// on this CPU (nChw8c on AVX2, nChw16c on AVX-512), reordered from and to plain at the edges.
public enum OneDNNLayout: Int, Sendable {
    case plain = 0
    case preferred = 1
}

/// One oneDNN convolution shape: forward and backward-data primitives for a chunk of
/// `minibatch` samples, and a backward-weights primitive for `weightsMinibatch` samples with
/// `weightsOutputChannels` output channels (the layer's, or 2·C_out + 1 when the patch statistics
/// of cross-iteration BN ride on the weight gradient). Created once per layer and shape. The
/// scratchpads (user-managed) and the blocked copies of arguments whose layout is not the user's
/// are one workspace per thread shared by every primitive (each used only during a call), so a
/// network keeps no blocked copy of its weights between calls.
public final class OneDNNConvolution {
    public struct Shape: Hashable, Sendable {
        public var minibatch: Int, inputChannels: Int, height: Int, width: Int
        public var outputChannels: Int, kernelSize: Int, stride: Int, padding: Int
        public var weightsMinibatch: Int, weightsOutputChannels: Int
        public var layout: OneDNNLayout
        public init(minibatch: Int, inputChannels: Int, height: Int, width: Int, outputChannels: Int, kernelSize: Int,
                    stride: Int, padding: Int, weightsMinibatch: Int, weightsOutputChannels: Int, layout: OneDNNLayout = .preferred) {
            self.minibatch = minibatch; self.inputChannels = inputChannels; self.height = height; self.width = width
            self.outputChannels = outputChannels; self.kernelSize = kernelSize; self.stride = stride; self.padding = padding
            self.weightsMinibatch = weightsMinibatch; self.weightsOutputChannels = weightsOutputChannels; self.layout = layout
        }
    }

    public let shape: Shape
    private let handle: OpaquePointer
    /// The implementations oneDNN chose, forward/backward data/backward weights ("brg:avx512_core", "jit:avx2", "gemm:jit", …).
    public let implementations: String

    public init(_ shape: Shape) throws {
        self.shape = shape
        var message = [CChar](repeating: 0, count: 256)
        guard let pointer = syncbn_dnnl_convolution_create(
            Int32(shape.minibatch), Int32(shape.inputChannels), Int32(shape.height), Int32(shape.width), Int32(shape.outputChannels),
            Int32(shape.kernelSize), Int32(shape.stride), Int32(shape.padding), Int32(shape.weightsMinibatch),
            Int32(shape.weightsOutputChannels), Int32(shape.layout.rawValue), &message, message.count) else {
            throw LayerError("Conv2d: \(String(cString: message))")
        }
        handle = pointer
        implementations = String(cString: syncbn_dnnl_convolution_implementations(pointer))
    }

    deinit { syncbn_dnnl_convolution_destroy(handle) }

    /// y (minibatch × C_out × H_out × W_out) = conv(x, w).
    public func forward(x: UnsafePointer<Float>, weight: UnsafePointer<Float>, into y: UnsafeMutablePointer<Float>) {
        let status = syncbn_dnnl_convolution_forward(handle, x, weight, y)
        precondition(status == 0, "oneDNN convolution forward failed")
    }

    /// dx (minibatch × C_in × H × W) from dy.
    public func backwardData(dy: UnsafePointer<Float>, weight: UnsafePointer<Float>, into dx: UnsafeMutablePointer<Float>) {
        let status = syncbn_dnnl_convolution_backward_data(handle, dy, weight, dx)
        precondition(status == 0, "oneDNN convolution backward data failed")
    }

    /// dw (weightsOutputChannels × C_in × k × k) = Σ over the weightsMinibatch samples of dy ⋆ x.
    public func backwardWeights(x: UnsafePointer<Float>, dy: UnsafePointer<Float>, into dw: UnsafeMutablePointer<Float>) {
        let status = syncbn_dnnl_convolution_backward_weights(handle, x, dy, dw)
        precondition(status == 0, "oneDNN convolution backward weights failed")
    }

    /// Floats of the weight gradient in oneDNN's own layout when that is not the plain one (0
    /// otherwise): the size of a leaf when the leaves are summed before the one reorder.
    public var blockedWeightGradientCount: Int { Int(syncbn_dnnl_convolution_blocked_weights_gradient_floats(handle)) }

    /// dw in oneDNN's layout (``blockedWeightGradientCount`` values), not reordered.
    public func backwardWeightsBlocked(x: UnsafePointer<Float>, dy: UnsafePointer<Float>, into dw: UnsafeMutablePointer<Float>) {
        let status = syncbn_dnnl_convolution_backward_weights_blocked(handle, x, dy, dw)
        precondition(status == 0, "oneDNN convolution backward weights failed")
    }

    /// The arguments a chunk's blocked copy can be shared by: the layout of the source x, or
    /// that of the output gradient dY (also Y's, when Y is read as an output gradient).
    public enum ChunkArgument: Int32 {
        case source = 0
        case outputGradient = 1
        /// The weights in the forward's layout, and in backward data's.
        case forwardWeights = 2
        case dataWeights = 3
    }

    /// Samples reordered once into oneDNN's layout of `argument` (this primitive's chunk of
    /// `minibatch` samples, or its `weightsMinibatch` when it has backward weights alone), in this
    /// thread's chunk buffer `buffer` (0–3), valid until the next copy into that buffer; nil when
    /// that argument is not blocked.
    public func blockChunk(_ argument: ChunkArgument, _ plain: UnsafePointer<Float>, buffer: Int) -> UnsafePointer<Float>? {
        syncbn_dnnl_convolution_block_chunk(handle, argument.rawValue, plain, Int32(buffer)).map { UnsafePointer($0) }
    }

    /// Floats per sample of this primitive's ``blockChunk(_:_:buffer:)`` copy of `argument` when
    /// `reader` reads that argument in the same layout (its backward weights, or backward data's
    /// output gradient when it has no backward weights): the reader's samples are then one
    /// stretch of the copy. nil otherwise.
    public func chunkSliceStride(_ argument: ChunkArgument, reader: OneDNNConvolution) -> Int? {
        let stride = syncbn_dnnl_convolution_chunk_slice_stride(handle, reader.handle, argument.rawValue)
        return stride > 0 ? stride : nil
    }

    /// ``forward(x:weight:into:)`` with the weights in oneDNN's layout when `blockedWeight` (a
    /// ``blockChunk(_:_:buffer:)`` copy of ``ChunkArgument/forwardWeights``).
    public func forward(x: UnsafePointer<Float>, weight: UnsafePointer<Float>, blockedWeight: Bool, into y: UnsafeMutablePointer<Float>) {
        let status = syncbn_dnnl_convolution_forward_prepared(handle, x, weight, blockedWeight ? 2 : 0, y)
        precondition(status == 0, "oneDNN convolution forward failed")
    }

    /// ``backwardData(dy:weight:into:)`` with dy and/or the weights in oneDNN's layout, as
    /// `blockedDy` and `blockedWeight` say (``blockChunk(_:_:buffer:)`` copies).
    public func backwardData(dy: UnsafePointer<Float>, blockedDy: Bool, weight: UnsafePointer<Float>, blockedWeight: Bool,
                             into dx: UnsafeMutablePointer<Float>) {
        let status = syncbn_dnnl_convolution_backward_data_prepared(handle, dy, weight, (blockedDy ? 1 : 0) | (blockedWeight ? 2 : 0), dx)
        precondition(status == 0, "oneDNN convolution backward data failed")
    }

    /// ``backwardWeightsBlocked(x:dy:into:)`` with x and/or dy already in oneDNN's layout
    /// (slices of chunks' blocked copies) as `blockedX` and `blockedDy` say.
    public func backwardWeightsBlocked(x: UnsafePointer<Float>, blockedX: Bool, dy: UnsafePointer<Float>, blockedDy: Bool,
                                       into dw: UnsafeMutablePointer<Float>) {
        let status = syncbn_dnnl_convolution_backward_weights_prepared(handle, x, dy, (blockedX ? 1 : 0) | (blockedDy ? 2 : 0), dw)
        precondition(status == 0, "oneDNN convolution backward weights failed")
    }

    /// A weight gradient in oneDNN's layout reordered into the plain C_out × C_in × k × k one.
    public func weightGradientToPlain(_ blocked: UnsafePointer<Float>, into dw: UnsafeMutablePointer<Float>) {
        let status = syncbn_dnnl_convolution_weights_gradient_to_plain(handle, blocked, dw)
        precondition(status == 0, "oneDNN weight-gradient reorder failed")
    }

    /// Values `range` of the plain C_out × C_in × k × k order gathered from `blocked`, Doubles in
    /// oneDNN's layout of the weight gradient (a sum of blocked leaves widened): a range of the
    /// reorder at a time, with no plain copy of the whole.
    public func gatherWeightGradient(_ blocked: UnsafePointer<Double>, range: Range<Int>, into plain: UnsafeMutablePointer<Double>) {
        let status = syncbn_dnnl_convolution_gather_weights_gradient(handle, blocked, range.lowerBound, range.count, plain)
        precondition(status == 0, "oneDNN's weight-gradient layout is not a blocked one")
    }

    /// This thread's seconds in oneDNN convolution calls so far, and within them the reorders of
    /// activations and of weights between the plain and the blocked layout.
    public static var timings: (total: Double, activationReorders: Double, weightReorders: Double) {
        var total = 0.0, activations = 0.0, weights = 0.0
        syncbn_dnnl_timings(&total, &activations, &weights)
        return (total, activations, weights)
    }

    /// The instruction set oneDNN dispatches to on this CPU ("avx2", "avx512_core", …; DNNL_MAX_CPU_ISA lowers it).
    public static var cpuISA: String { String(cString: syncbn_dnnl_cpu_isa()) }

    /// nil when oneDNN loads and creates its CPU engine, else why not.
    public static func unavailability() -> String? {
        var message = [CChar](repeating: 0, count: 256)
        return syncbn_dnnl_available(&message, message.count) == 0 ? nil : String(cString: message)
    }
}
