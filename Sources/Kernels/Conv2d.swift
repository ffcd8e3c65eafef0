import Foundation

/// 2-D convolution (cross-correlation, as PyTorch) of N×C_in×H×W input with a
/// C_out×C_in×k_h×k_w weight, by im2col and one GEMM per sample.
///
/// Forward, per sample n: cols_n = im2col(x_n) (K × P, K = C_in·k_h·k_w, P = H_out·W_out),
/// y_n = W·cols_n (+ b). The columns are kept for backward, which needs them for
/// dW = Σ_n dy_n·cols_nᵀ; dx_n = col2im(Wᵀ·dy_n).
/// Init: PyTorch's default, U(±1/√K) for weight and bias. A conv followed by BatchNorm takes
/// `bias: false` (β does that job).
public final class Conv2d<Scalar: TensorScalar>: Layer, PatchSource {
    public let inputChannels: Int, outputChannels: Int, kernelSize: Int, stride: Int, padding: Int
    public let weight: Parameter<Scalar>
    public let bias: Parameter<Scalar>?

    /// im2col of the last training batch, N × K × P; read by backward and by layers that need
    /// the patches (cross-iteration BN).
    public private(set) var columns: [Scalar] = []
    public private(set) var lastGeometry: ConvolutionGeometry?
    private var lastBatch = 0
    /// Seconds spent inside GEMM calls and the floating-point operations they did (2·m·n·k each),
    /// since creation: lets a benchmark report the GEMM throughput achieved inside this layer.
    public private(set) var gemmSeconds = 0.0
    public private(set) var gemmOperations = 0.0

    @inline(__always)
    private func timedGEMM(m: Int, n: Int, k: Int, _ body: () -> Void) {
        let start = DispatchTime.now().uptimeNanoseconds
        body()
        gemmSeconds += Double(DispatchTime.now().uptimeNanoseconds - start) * 1e-9
        gemmOperations += 2 * Double(m * n * k)
    }

    /// How a new convolution's weight is drawn.
    public enum Initialization: Sendable {
        /// PyTorch's default: U(±1/√K), K = C_in·k·k (kaiming_uniform with a = √5).
        case pytorchDefault
        /// N(0, 2/(C_out·k·k)): kaiming_normal_(mode='fan_out', nonlinearity='relu'), what
        /// torchvision's ResNets use.
        case kaimingNormalFanOut
    }

    public init(inputChannels: Int, outputChannels: Int, kernelSize: Int, stride: Int = 1, padding: Int = 0,
                bias: Bool = true, initialization: Initialization = .pytorchDefault, random: inout DeterministicRandom) {
        precondition(inputChannels > 0 && outputChannels > 0 && kernelSize > 0 && stride > 0 && padding >= 0,
                     "invalid Conv2d configuration")
        self.inputChannels = inputChannels
        self.outputChannels = outputChannels
        self.kernelSize = kernelSize
        self.stride = stride
        self.padding = padding
        let bound = 1 / Double(inputChannels * kernelSize * kernelSize).squareRoot()
        let shape = [outputChannels, inputChannels, kernelSize, kernelSize]
        switch initialization {
        case .pytorchDefault:
            weight = Parameter(.uniform(shape: shape, bound: bound, using: &random))
        case .kaimingNormalFanOut:
            weight = Parameter(.normal(shape: shape, std: (2 / Double(outputChannels * kernelSize * kernelSize)).squareRoot(), using: &random))
        }
        self.bias = bias ? Parameter(.uniform(shape: [outputChannels], bound: bound, using: &random)) : nil
    }

    /// A convolution with the given weight (C_out × C_in × k × k) and optional bias.
    public init(weight: Tensor<Scalar>, bias: Tensor<Scalar>?, stride: Int = 1, padding: Int = 0) {
        precondition(weight.rank == 4 && weight.shape[2] == weight.shape[3] && bias.map { $0.shape == [weight.shape[0]] } ?? true,
                     "Conv2d(weight:bias:) needs a C_out×C_in×k×k weight and C_out biases")
        outputChannels = weight.shape[0]
        inputChannels = weight.shape[1]
        kernelSize = weight.shape[2]
        self.stride = stride
        self.padding = padding
        self.weight = Parameter(weight)
        self.bias = bias.map { Parameter($0) }
    }

    public var patchWeight: Parameter<Scalar> { weight }

    public var lastPatches: (values: [Scalar], batch: Int, patchSize: Int, positions: Int)? {
        lastGeometry.map { (columns, lastBatch, $0.patchSize, $0.positions) }
    }

    public var state: [StateEntry<Scalar>] {
        [.parameter("weight", weight)] + (bias.map { [.parameter("bias", $0)] } ?? [])
    }

    public func geometry(for shape: [Int]) throws -> ConvolutionGeometry {
        try requireShape(shape.count == 4 && shape[1] == inputChannels, "Conv2d",
                         "expected N×\(inputChannels)×H×W input, got \(shape)")
        let g = ConvolutionGeometry(inputChannels: inputChannels, height: shape[2], width: shape[3],
                                    kernelHeight: kernelSize, kernelWidth: kernelSize, stride: stride, padding: padding)
        try requireShape(g.outputHeight > 0 && g.outputWidth > 0, "Conv2d",
                         "input \(shape[2])×\(shape[3]) is smaller than the \(kernelSize)×\(kernelSize) kernel")
        return g
    }

    /// A 1×1 convolution with stride 1 and no padding: the input sample already is its im2col
    /// matrix (K = C_in rows, P = H·W columns), so neither im2col nor col2im runs.
    public var isPointwise: Bool { kernelSize == 1 && stride == 1 && padding == 0 }

    /// im2col storage reused across steps (`columns` in training, this in inference) and the
    /// backward pass's column gradient: allocated once per shape, not once per step.
    private var inferenceColumns: [Scalar] = []
    private var columnGradient: [Scalar] = []

    public func forward(_ input: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        let g = try geometry(for: input.shape)
        let n = input.shape[0], K = g.patchSize, P = g.positions
        var output = Tensor<Scalar>(shape: [n, outputChannels, g.outputHeight, g.outputWidth])
        let inputPlane = inputChannels * g.height * g.width
        func multiply(_ cols: UnsafeBufferPointer<Scalar>) {
            weight.value.scalars.withUnsafeBufferPointer { w in
                output.scalars.withUnsafeMutableBufferPointer { y in
                    for sample in 0..<n {
                        timedGEMM(m: outputChannels, n: P, k: K) {
                            Scalar.gemm(transposeA: false, transposeB: false, m: outputChannels, n: P, k: K, alpha: 1,
                                        a: w.baseAddress!, lda: K, b: cols.baseAddress! + sample * K * P, ldb: P,
                                        beta: 0, c: y.baseAddress! + sample * outputChannels * P, ldc: P)
                        }
                    }
                }
            }
        }
        if isPointwise {
            input.scalars.withUnsafeBufferPointer { multiply($0) }
            if mode == .training { columns = input.scalars }   // shares storage, no copy
        } else {
            var cols = mode == .training ? columns : inferenceColumns
            if mode == .training { columns = [] } else { inferenceColumns = [] }   // keep the buffer uniquely referenced
            if cols.count != n * K * P { cols = Scalar.filled(n * K * P, with: 0) }
            input.scalars.withUnsafeBufferPointer { x in
                cols.withUnsafeMutableBufferPointer { c in
                    for sample in 0..<n {
                        Scalar.im2col(UnsafeBufferPointer(rebasing: x[(sample * inputPlane)..<((sample + 1) * inputPlane)]), g,
                                      into: UnsafeMutableBufferPointer(rebasing: c[(sample * K * P)..<((sample + 1) * K * P)]))
                    }
                }
            }
            cols.withUnsafeBufferPointer { multiply($0) }
            if mode == .training { columns = cols } else { inferenceColumns = cols }
        }
        if let bias {
            bias.value.scalars.withUnsafeBufferPointer { b in
                output.scalars.withUnsafeMutableBufferPointer { y in
                    Scalar.addChannelBias(b, to: y, layout: ChannelLayout(batch: n, channels: outputChannels, spatial: P))
                }
            }
        }
        if mode == .training {
            lastGeometry = g
            lastBatch = n
        }
        return output
    }

    public func backward(_ outputGradient: Tensor<Scalar>) throws -> Tensor<Scalar> {
        guard let g = lastGeometry else { preconditionFailure("Conv2d.backward before a training forward") }
        let n = lastBatch, K = g.patchSize, P = g.positions
        try requireShape(outputGradient.shape == [n, outputChannels, g.outputHeight, g.outputWidth], "Conv2d",
                         "output gradient \(outputGradient.shape) does not match the forward output")
        var inputGradient = Tensor<Scalar>(shape: [n, inputChannels, g.height, g.width])
        var weightGradient = Tensor<Scalar>(shape: weight.value.shape)
        var dcols = columnGradient
        columnGradient = []
        if dcols.count != K * P { dcols = Scalar.filled(K * P, with: 0) }
        let pointwise = isPointwise
        let inputPlane = inputChannels * g.height * g.width
        outputGradient.scalars.withUnsafeBufferPointer { dy in
            columns.withUnsafeBufferPointer { c in
                weight.value.scalars.withUnsafeBufferPointer { w in
                    weightGradient.scalars.withUnsafeMutableBufferPointer { dw in
                        inputGradient.scalars.withUnsafeMutableBufferPointer { dx in
                            dcols.withUnsafeMutableBufferPointer { dc in
                                for sample in 0..<n {
                                    let dySample = dy.baseAddress! + sample * outputChannels * P
                                    // dW += dy_n (C_out × P) · cols_nᵀ (P × K)
                                    timedGEMM(m: outputChannels, n: K, k: P) {
                                        Scalar.gemm(transposeA: false, transposeB: true, m: outputChannels, n: K, k: P, alpha: 1,
                                                    a: dySample, lda: P, b: c.baseAddress! + sample * K * P, ldb: P,
                                                    beta: sample == 0 ? 0 : 1, c: dw.baseAddress!, ldc: K)
                                    }
                                    // dcols = Wᵀ (K × C_out) · dy_n (C_out × P)
                                    // dcols = Wᵀ·dy_n, written straight into dx_n for a pointwise conv.
                                    let target = pointwise ? dx.baseAddress! + sample * inputPlane : dc.baseAddress!
                                    timedGEMM(m: K, n: P, k: outputChannels) {
                                        Scalar.gemm(transposeA: true, transposeB: false, m: K, n: P, k: outputChannels, alpha: 1,
                                                    a: w.baseAddress!, lda: K, b: dySample, ldb: P,
                                                    beta: 0, c: target, ldc: P)
                                    }
                                    if !pointwise {
                                        Scalar.col2imAccumulate(UnsafeBufferPointer(dc), g,
                                                                into: UnsafeMutableBufferPointer(rebasing: dx[(sample * inputPlane)..<((sample + 1) * inputPlane)]))
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        weight.addPendingGradient(to: &weightGradient)
        weight.gradient = weightGradient
        columnGradient = dcols
        if let bias {
            var biasGradient = Tensor<Scalar>(shape: [outputChannels])
            outputGradient.scalars.withUnsafeBufferPointer { dy in
                biasGradient.scalars.withUnsafeMutableBufferPointer { db in
                    Scalar.channelSums(dy, layout: ChannelLayout(batch: n, channels: outputChannels, spatial: P), into: db)
                }
            }
            bias.gradient = biasGradient
        }
        return inputGradient
    }
}
