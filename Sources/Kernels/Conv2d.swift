import Foundation

/// 2-D convolution (cross-correlation, as PyTorch) of N×C_in×H×W input with a
/// C_out×C_in×k_h×k_w weight, by im2col and GEMM, a cache-sized chunk of samples per GEMM.
///
/// Forward: cols = [im2col(x_0) … im2col(x_{N−1})] (K × N·P, K = C_in·k_h·k_w,
/// P = H_out·W_out), y = W·cols (+ b) with samples moved back outermost; backward: dW = dY'·colsᵀ,
/// dx = col2im(Wᵀ·dY') (dY' = dy as C_out × N·P). The columns are built a chunk of samples at a
/// time into a cache-sized workspace, in forward and again in backward, never for the whole batch
/// at once. A 1×1 stride-1 conv's columns are its input with two axes swapped.
/// Init: PyTorch's default, U(±1/√K) for weight and bias. A conv followed by BatchNorm takes
/// `bias: false` (β does that job).
public final class Conv2d<Scalar: TensorScalar>: Layer, PatchSource {
    public let inputChannels: Int, outputChannels: Int, kernelSize: Int, stride: Int, padding: Int
    public let weight: Parameter<Scalar>
    public let bias: Parameter<Scalar>?

    public private(set) var lastGeometry: ConvolutionGeometry?
    private var lastBatch = 0
    /// Samples in the last training forward whose backward has not run yet; nil otherwise.
    public var pendingTrainingBatch: Int? { lastGeometry == nil ? nil : lastBatch }
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

    /// A 1×1 convolution with stride 1 and no padding: its im2col matrix is the input with
    /// samples and channels swapped, so no im2col or col2im runs.
    public var isPointwise: Bool { kernelSize == 1 && stride == 1 && padding == 0 }

    /// Workspaces reused across steps, allocated once per shape: the im2col matrix of a chunk of
    /// samples (small enough to stay in cache) and the output or output gradient with channels
    /// outermost (C_out × N·P).
    private var chunkColumns: [Scalar] = []
    private var channelMajor: [Scalar] = []
    /// Backward's GEMM result when patch statistics ride along: (2·C_out + 1) × K.
    private var fusedResult: [Scalar] = []
    /// The last training input (shared storage, not a copy): backward builds its columns again,
    /// a chunk at a time, instead of keeping the whole batch's im2col matrix.
    private var lastInput: Tensor<Scalar>?

    /// Set by a layer that needs, besides dW, the patch statistics of the last training batch
    /// (cross-iteration BN): Σ_i patch_i (K values) and Σ_i y_{i,c}·patch_i (C_out × K), y being
    /// this layer's output. While set, the workspace keeps forward's output channel-major and the
    /// next backward computes all three with the same GEMMs, [dY'; Y'; 1]·colsᵀ (the columns are
    /// built and packed once for the three), hands them over, and clears the receiver. Only a
    /// bias-free convolution offers this (y = θ·patch exactly).
    public var patchStatisticsReceiver: ((_ patchSum: [Double], _ outputPatchProducts: [Double]) -> Void)? {
        didSet { precondition(bias == nil || patchStatisticsReceiver == nil, "patch statistics need a bias-free convolution") }
    }
    /// Whether forward keeps room for the fused backward (set once by the consumer).
    public var providesPatchStatistics = false {
        didSet { precondition(bias == nil || !providesPatchStatistics, "patch statistics need a bias-free convolution") }
    }
    private var channelMajorOutputBatch: Int?

    /// Samples per chunk: the chunk's im2col matrix holds at most 128 Ki values (512 KiB of Float).
    func chunkSize(batch n: Int, _ g: ConvolutionGeometry) -> Int {
        max(1, min(n, (1 << 17) / max(g.patchSize * g.positions, 1)))
    }

    /// im2col of samples start ..< start + count of `x` side by side into `target` (K × count·P).
    func columns(of x: UnsafePointer<Scalar>, _ g: ConvolutionGeometry, start: Int, count: Int, into target: UnsafeMutablePointer<Scalar>) {
        let P = g.positions, plane = inputChannels * g.height * g.width
        if isPointwise {
            Scalar.swapOuterAxes(x + start * plane, count, inputChannels, block: P, into: target)
        } else {
            for s in 0..<count { Scalar.im2col(x + (start + s) * plane, g, into: target + s * P, rowLength: count * P) }
        }
    }

    /// The last training batch's whole im2col matrix, K × N·P, built on request (cross-iteration
    /// BN behind a source that is not a Conv2d, and tests); nil before the first training forward
    /// and once backward has run.
    public var lastPatches: PatchMatrix<Scalar>? {
        guard let g = lastGeometry, let input = lastInput else { return nil }
        let n = lastBatch, M = n * g.positions, K = g.patchSize
        var values = Scalar.filled(K * M, with: 0)
        if M > 0 {
            input.scalars.withUnsafeBufferPointer { x in
                values.withUnsafeMutableBufferPointer { columns(of: x.baseAddress!, g, start: 0, count: n, into: $0.baseAddress!) }
            }
        }
        return PatchMatrix(values: values, batch: n, patchSize: K, positions: g.positions, positionMajor: false)
    }

    /// Forward, a chunk of samples at a time: cols = [im2col(x_s) …] for the chunk (K × chunk·P,
    /// in cache), Y'[:, chunk] = W·cols (C_out × N·P over the chunks), y = Y' with its two outer
    /// axes swapped (+ b). A sample's output is the same whatever the chunk (tested bit for bit).
    public func forward(_ input: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        let g = try geometry(for: input.shape)
        let n = input.shape[0], K = g.patchSize, P = g.positions, M = n * P, C = outputChannels
        // With patch statistics the workspace is [dY' (C rows); Y' (C rows); ones (1 row)] and
        // forward writes Y' to its middle.
        let fused = providesPatchStatistics && mode == .training
        let rows = providesPatchStatistics ? 2 * C + 1 : C, outputRow = fused ? C : 0
        if channelMajor.count < rows * M { channelMajor = Scalar.filled(rows * M, with: 0) }
        let chunk = chunkSize(batch: n, g)
        if chunkColumns.count < K * chunk * P { chunkColumns = Scalar.filled(K * chunk * P, with: 0) }
        let output = Tensor<Scalar>(shape: [n, C, g.outputHeight, g.outputWidth]) { y in
            guard M > 0 else { return }
            input.scalars.withUnsafeBufferPointer { x in
                weight.value.scalars.withUnsafeBufferPointer { w in
                    chunkColumns.withUnsafeMutableBufferPointer { cc in
                        channelMajor.withUnsafeMutableBufferPointer { t in
                            let target = t.baseAddress! + outputRow * M
                            var start = 0
                            while start < n {
                                let count = min(chunk, n - start), width = count * P
                                columns(of: x.baseAddress!, g, start: start, count: count, into: cc.baseAddress!)
                                timedGEMM(m: C, n: width, k: K) {
                                    Scalar.gemm(transposeA: false, transposeB: false, m: C, n: width, k: K, alpha: 1, a: w.baseAddress!, lda: K,
                                                b: cc.baseAddress!, ldb: width, beta: 0, c: target + start * P, ldc: M)
                                }
                                start += count
                            }
                            Scalar.swapOuterAxes(target, C, n, block: P, into: y.baseAddress!)
                        }
                    }
                }
            }
            if let bias {
                bias.value.scalars.withUnsafeBufferPointer { b in
                    Scalar.addChannelBias(b, to: y, layout: ChannelLayout(batch: n, channels: C, spatial: P))
                }
            }
        }
        if mode == .training {
            lastInput = input
            lastGeometry = g
            lastBatch = n
            channelMajorOutputBatch = fused ? n : nil
        }
        return output
    }

    /// Backward with dY' = dy's outer axes swapped (C_out × N·P), a chunk of samples at a time:
    /// the chunk's columns are built again (in cache), dW += dY'_s·cols_sᵀ sample by sample in
    /// sample order (so the sum rounds the same way whatever the batch size), then the same
    /// workspace takes dcols = Wᵀ·dY' for the chunk and col2im scatters it into dx.
    public func backward(_ outputGradient: Tensor<Scalar>) throws -> Tensor<Scalar> {
        guard let g = lastGeometry, let input = lastInput else { preconditionFailure("Conv2d.backward needs a training forward") }
        let n = lastBatch, K = g.patchSize, P = g.positions, M = n * P, C = outputChannels
        try requireShape(outputGradient.shape == [n, C, g.outputHeight, g.outputWidth], "Conv2d",
                         "output gradient \(outputGradient.shape) does not match the forward output")
        lastGeometry = nil
        lastInput = nil
        let pointwise = isPointwise
        let inputPlane = inputChannels * g.height * g.width
        var weightGradient = Tensor<Scalar>(shape: weight.value.shape)
        let receiver = patchStatisticsReceiver
        patchStatisticsReceiver = nil
        // The fused GEMMs read forward's Y' from the workspace; when forward did not keep it
        // (the receiver came after that forward), Y' = W·cols is computed again here.
        let fused = receiver != nil
        let recompute = fused && !(providesPatchStatistics && channelMajorOutputBatch == n)
        channelMajorOutputBatch = nil
        let rows = fused ? 2 * C + 1 : C
        if fused && fusedResult.count != rows * K { fusedResult = Scalar.filled(rows * K, with: 0) }
        if channelMajor.count < rows * M { channelMajor += Scalar.filled(rows * M - channelMajor.count, with: 0) }
        let chunk = chunkSize(batch: n, g)
        if chunkColumns.count < K * chunk * P { chunkColumns = Scalar.filled(K * chunk * P, with: 0) }

        func run(dx d: UnsafeMutablePointer<Scalar>) {
            input.scalars.withUnsafeBufferPointer { x in
                outputGradient.scalars.withUnsafeBufferPointer { dy in
                    weight.value.scalars.withUnsafeBufferPointer { w in
                        channelMajor.withUnsafeMutableBufferPointer { t in
                            chunkColumns.withUnsafeMutableBufferPointer { cc in
                                weightGradient.scalars.withUnsafeMutableBufferPointer { dw in
                                    fusedResult.withUnsafeMutableBufferPointer { r in
                                        Scalar.swapOuterAxes(dy.baseAddress!, n, C, block: P, into: t.baseAddress!)
                                        if fused { (t.baseAddress! + 2 * C * M).update(repeating: 1, count: M) }
                                        // [dW; Σ y·patch; Σ patch] = [dY'; Y'; 1]·colsᵀ, or dW = dY'·colsᵀ alone.
                                        let target = fused ? r.baseAddress! : dw.baseAddress!
                                        var start = 0
                                        while start < n {
                                            let count = min(chunk, n - start), width = count * P
                                            columns(of: x.baseAddress!, g, start: start, count: count, into: cc.baseAddress!)
                                            if recompute {
                                                Scalar.gemm(transposeA: false, transposeB: false, m: C, n: width, k: K, alpha: 1, a: w.baseAddress!,
                                                            lda: K, b: cc.baseAddress!, ldb: width, beta: 0, c: t.baseAddress! + C * M + start * P, ldc: M)
                                            }
                                            timedGEMM(m: rows, n: K, k: width) {
                                                for s in 0..<count {
                                                    Scalar.gemm(transposeA: false, transposeB: true, m: rows, n: K, k: P, alpha: 1,
                                                                a: t.baseAddress! + (start + s) * P, lda: M, b: cc.baseAddress! + s * P, ldb: width,
                                                                beta: start + s == 0 ? 0 : 1, c: target, ldc: K)
                                                }
                                            }
                                            // The chunk's column gradient over its columns, then into dx.
                                            timedGEMM(m: K, n: width, k: C) {
                                                Scalar.gemm(transposeA: true, transposeB: false, m: K, n: width, k: C, alpha: 1, a: w.baseAddress!, lda: K,
                                                            b: t.baseAddress! + start * P, ldb: M, beta: 0, c: cc.baseAddress!, ldc: width)
                                            }
                                            if pointwise {
                                                Scalar.swapOuterAxes(cc.baseAddress!, inputChannels, count, block: P, into: d + start * inputPlane)
                                            } else {
                                                for s in 0..<count {
                                                    Scalar.col2imAccumulate(cc.baseAddress! + s * P, g, rowLength: width, into: d + (start + s) * inputPlane)
                                                }
                                            }
                                            start += count
                                        }
                                        if fused { dw.baseAddress!.update(from: r.baseAddress!, count: C * K) }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        let inputShape = [n, inputChannels, g.height, g.width]
        let inputGradient: Tensor<Scalar>
        if pointwise {
            inputGradient = Tensor(shape: inputShape) { dx in if M > 0 { run(dx: dx.baseAddress!) } }
        } else {
            var dx = Tensor<Scalar>(shape: inputShape)
            if M > 0 { dx.scalars.withUnsafeMutableBufferPointer { run(dx: $0.baseAddress!) } }
            inputGradient = dx
        }
        if let receiver {
            if M == 0 {
                receiver([Double](repeating: 0, count: K), [Double](repeating: 0, count: C * K))
            } else if fused {
                let widened = Scalar.widened(fusedResult)
                receiver(Array(widened[(2 * C * K)...]), Array(widened[(C * K)..<(2 * C * K)]))
            }
        }
        weight.addPendingGradient(to: &weightGradient)
        weight.gradient = weightGradient
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
