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
public final class Conv2d<Scalar: TensorScalar>: Layer, PatchSource, SampleAligned {
    public let inputChannels: Int, outputChannels: Int, kernelSize: Int, stride: Int, padding: Int
    public let weight: Parameter<Scalar>
    public let bias: Parameter<Scalar>?

    public private(set) var lastGeometry: ConvolutionGeometry?
    /// The shape of the last input, in either mode.
    public private(set) var lastInputShape: [Int]?
    private var lastBatch = 0
    /// Samples in the last training forward whose backward has not run yet; nil otherwise.
    public var pendingTrainingBatch: Int? { lastGeometry == nil ? nil : lastBatch }
    /// Seconds spent inside GEMM calls and the floating-point operations they did (2·m·n·k each),
    /// since creation: lets a benchmark report the GEMM throughput achieved inside this layer.
    public private(set) var gemmSeconds = 0.0
    public private(set) var gemmOperations = 0.0
    /// The leaves the last backward added into the weight gradient's fixed tree (one per
    /// ``weightGradientLeaf`` samples, or per sample): which sum the contract made, not its bits.
    public private(set) var lastWeightGradientLeaves = 0

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

    /// Workspaces reused across steps, allocated once per shape: the im2col matrix of one chunk
    /// of samples (K × c·P, small enough to stay in cache) and a chunk's output or output
    /// gradient with channels outermost (C_out × c·P).
    private var chunkColumns: [Scalar] = []
    private var chunkOutput: [Scalar] = []
    /// One leaf's [dY; Y; 1] ((2·C_out + 1) × L·P) and its GEMM result, when patch statistics ride
    /// along or leaves span several samples: borrowed from the scratch pool for one backward.
    private var sampleRows: [Scalar] = []
    private var sampleResult: [Scalar] = []
    /// The per-sample weight gradients added along the pairwise tree (and, with patch statistics
    /// on im2col, `patchStatisticsTree`: the per-sample Σ y·patch and Σ patch in Double).
    private var weightGradientTree: PairwiseAccumulator<Scalar>?
    /// When the leaves are oneDNN's blocked weight gradients: the primitives that reorder the
    /// total once, and the tree that sums them in oneDNN's layout.
    private var blockedWeightGradient: OneDNNConvolution?
    private var blockedWeightGradientTree: PairwiseAccumulator<Float>?
    private var patchStatisticsTree: PairwiseAccumulator<Double>?
    /// The last training input and output (shared storage, not copies): backward builds the
    /// columns again, a chunk at a time, instead of keeping the whole batch's im2col matrix, and
    /// reads the output for the patch statistics.
    private var lastInput: Tensor<Scalar>?
    private var lastOutput: Tensor<Scalar>?

    /// Set by a layer that needs, besides dW, the patch statistics of the last training batch
    /// (cross-iteration BN): Σ_i patch_i (K values) and Σ_i y_{i,c}·patch_i (C_out × K), y being
    /// this layer's output. While set, the next backward computes all three with the same
    /// per-sample GEMMs, [dY_s; Y_s; 1]·cols_sᵀ, hands the sums over (each added over samples along
    /// the pairwise tree, the statistics in Double), and clears the receiver. The buffers are lent
    /// for the call (scratch memory shared by the layers): a receiver copies what it keeps, and
    /// may issue a collective (an error it throws ends this backward). Only a bias-free
    /// convolution offers this (y = θ·patch exactly).
    public var patchStatisticsReceiver: ((_ patchSum: UnsafeBufferPointer<Double>, _ outputPatchProducts: PatchProducts) throws -> Void)? {
        didSet { precondition(bias == nil || patchStatisticsReceiver == nil, "patch statistics need a bias-free convolution") }
    }
    /// Whether a consumer will ask for patch statistics (set once by it).
    public var providesPatchStatistics = false {
        didSet { precondition(bias == nil || !providesPatchStatistics, "patch statistics need a bias-free convolution") }
    }

    /// The global index of the first sample of the next batch (see ``SampleAligned``).
    public var sampleOffset = 0
    /// Samples per leaf of the weight gradient's pairwise tree: a power of two; leaf j holds the
    /// global samples j·L ..< (j + 1)·L and is one call (one GEMM over L·P columns, or one oneDNN
    /// backward-weights call at minibatch L). 1 (the default) gives every sample its own leaf,
    /// the same bits for any split of the batch; L > 1 needs every batch aligned to L (its first
    /// sample and its size multiples of L: `Trainer` sets it only on such steps) and is as exact
    /// across ranks where every rank's batch is a multiple of L — fewer, bigger calls for layers
    /// whose per-sample weight gradient is large next to the work (ResNet-18's last stage).
    public var weightGradientLeaf = 1 {
        didSet { precondition(weightGradientLeaf > 0 && weightGradientLeaf & (weightGradientLeaf - 1) == 0, "a weight-gradient leaf is a power of two") }
    }

    /// Which code computes this layer when Scalar is Float (Double always uses im2col): see
    /// ``ConvolutionBackend``. Every rank of a job must use the same backend for a layer (the
    /// exactness contract: one call shape and one kernel per layer).
    public var backend: ConvolutionBackend = .im2col
    /// The layout oneDNN computes in: by default its preferred (blocked) one, reordered at the
    /// call's edges; plain NCHW sends oneDNN to its own im2col (docs/performance.md).
    public var oneDNNLayout: OneDNNLayout = .preferred {
        didSet { if oneDNNLayout != oldValue { oneDNNPrimitives.removeAll() } }
    }
    /// oneDNN's chunk of samples for forward and backward data; nil: ``oneDNNChunkSize(_:)``.
    public var oneDNNChunkOverride: Int?
    /// Whether oneDNN reorders the weights once per forward and per backward for all the chunks,
    /// and a unit of samples' dY (and x, and Y for patch statistics) once for backward data and
    /// every weight-gradient leaf to read as slices, where the primitives' layouts allow it (else
    /// each call reorders its own). The same bits either way; off only to compare the two.
    public var oneDNNChunkSharing = true
    /// Chunks of the last oneDNN backward whose reorders its leaves shared.
    public private(set) var oneDNNSharedChunks = 0
    /// The backend that runs: oneDNN only for Float.
    public var effectiveBackend: ConvolutionBackend { Scalar.self == Float.self ? backend : .im2col }
    /// oneDNN primitives by shape, created on first use (a handful per layer: training and
    /// evaluation share them when their image sizes agree).
    private var oneDNNPrimitives: [OneDNNConvolution.Shape: OneDNNConvolution] = [:]
    /// oneDNN's chunk input and output when a chunk is not whole in this batch (absent slots zero).
    private var oneDNNChunkInput: [Float] = []
    private var oneDNNChunkOutput: [Float] = []
    /// Cross-iteration BN's patch statistics on oneDNN: one leaf's Σ y·patch as the weight-gradient
    /// primitive computes it (in its layout; borrowed from the scratch pool for one backward), and
    /// the per-column sums of the input rows one kernel row reads (``PatchSumPlan``, made once per
    /// geometry).
    private var oneDNNLeafProduct: [Float] = []
    private var patchSumScratch: [Double] = []
    private var patchSumPlan: PatchSumPlan?
    /// The primitive whose blocked layout the patch statistics of the last backward are in (Σ y·patch
    /// is summed in that layout and mapped back at the end).
    private var statisticsPrimitive: OneDNNConvolution?
    /// Cross-iteration BN's statistics on oneDNN, added as the leaves come: Σ patch, and Σ y·patch
    /// widened from its weight-gradient call's Float as it is added (no widened copy), in oneDNN's
    /// layout of the weight gradient.
    /// For a backward that fills them, whether they are in oneDNN's blocked layout; nil otherwise
    /// (im2col's statistics use `patchStatisticsTree`).
    private var oneDNNStatisticsInBlocks: Bool?
    private var patchSumTree: PairwiseAccumulator<Double>?
    private var productTree: PairwiseAccumulator<Double>?

    /// Samples per oneDNN chunk: a power of two that depends on the layer's shape alone, the
    /// largest (up to 8) whose chunk input and output hold at most 256 Ki values (1 MiB of Float).
    /// Measured on ResNet-20's layers (docs/performance.md): forward gains little past 8 samples,
    /// and a smaller chunk wastes less on the zero slots of a per-rank batch below it.
    public func oneDNNChunkSize(_ g: ConvolutionGeometry) -> Int {
        if let oneDNNChunkOverride { return oneDNNChunkOverride }
        let perSample = inputChannels * g.height * g.width + outputChannels * g.positions
        var c = 1
        while c < 8 && 2 * c * perSample <= (1 << 18) { c *= 2 }
        return c
    }

    /// The primitives for one shape, created once.
    private func oneDNN(_ g: ConvolutionGeometry, minibatch: Int, weightsMinibatch: Int = 0, weightsOutputChannels: Int = 0) throws -> OneDNNConvolution {
        let shape = OneDNNConvolution.Shape(minibatch: minibatch, inputChannels: inputChannels, height: g.height, width: g.width,
                                            outputChannels: outputChannels, kernelSize: kernelSize, stride: stride, padding: padding,
                                            weightsMinibatch: weightsMinibatch, weightsOutputChannels: weightsOutputChannels,
                                            layout: oneDNNLayout)
        if let existing = oneDNNPrimitives[shape] { return existing }
        let created = try OneDNNConvolution(shape)
        oneDNNPrimitives[shape] = created
        return created
    }

    /// The implementations oneDNN chose for this layer's last shape ("forward/data/weights"); nil before oneDNN ran.
    public var oneDNNImplementations: [String] { oneDNNPrimitives.keys.sorted { $0.weightsOutputChannels < $1.weightsOutputChannels }.map { oneDNNPrimitives[$0]!.implementations } }

    /// Samples per chunk, c: a power of two that depends on the layer's shape alone, the largest
    /// with at most 2,048 GEMM columns (c·P) whose im2col matrix holds at most 128 Ki values
    /// (512 KiB of Float), so that every GEMM of the layer has one shape on any rank and batch.
    public func chunkSize(_ g: ConvolutionGeometry) -> Int {
        var c = 1
        while c < 64 && 2 * c * g.positions <= 2048 && 2 * c * g.positions * g.patchSize <= (1 << 17) { c *= 2 }
        return c
    }

    /// The chunks of a batch of `n` samples whose first sample has global index `offset`: chunk j
    /// holds global samples j·c ..< (j + 1)·c, so each yields the local samples it holds and the
    /// slot (position in the chunk) of the first of them.
    static func chunks(batch n: Int, offset: Int, size c: Int) -> [(samples: Range<Int>, firstSlot: Int)] {
        guard n > 0 else { return [] }
        var result: [(Range<Int>, Int)] = []
        var start = 0, slot = offset % c
        while start < n {
            let count = min(c - slot, n - start)
            result.append((start..<(start + count), slot))
            start += count
            slot = 0
        }
        return result
    }

    /// im2col of samples `samples` of `x` into slots firstSlot… of the chunk matrix `target`
    /// (K × c·P); the slots of samples this batch does not hold are zero.
    func chunkColumns(of x: UnsafePointer<Scalar>, _ g: ConvolutionGeometry, samples: Range<Int>, firstSlot: Int, chunk c: Int,
                      into target: UnsafeMutablePointer<Scalar>) {
        let P = g.positions, K = g.patchSize, width = c * P, plane = inputChannels * g.height * g.width
        if samples.count < c {
            for k in 0..<K {
                let row = target + k * width
                if firstSlot > 0 { row.update(repeating: 0, count: firstSlot * P) }
                let end = (firstSlot + samples.count) * P
                if end < width { (row + end).update(repeating: 0, count: width - end) }
            }
        }
        for (i, s) in samples.enumerated() {
            let column = target + (firstSlot + i) * P
            if isPointwise {
                for k in 0..<K { (column + k * width).update(from: x + s * plane + k * P, count: P) }
            } else {
                Scalar.im2col(x + s * plane, g, into: column, rowLength: width)
            }
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
                values.withUnsafeMutableBufferPointer {
                    chunkColumns(of: x.baseAddress!, g, samples: 0..<n, firstSlot: 0, chunk: n, into: $0.baseAddress!)
                }
            }
        }
        return PatchMatrix(values: values, batch: n, patchSize: K, positions: g.positions, positionMajor: false)
    }

    /// Forward, a chunk of c samples at a time, chunks aligned to the global sample index
    /// (``sampleOffset``): cols = [im2col(x_s) …] for the chunk's slots (K × c·P, absent samples'
    /// slots zero), Y'_chunk = W·cols (C_out × c·P), and each sample's columns copied to its place
    /// in y (+ b). Every GEMM of the layer has the same shape, and a sample always sits in the same
    /// slot of the same chunk, so its output is the same bits whatever batch or rank holds it.
    public func forward(_ input: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        let g = try geometry(for: input.shape)
        let n = input.shape[0], K = g.patchSize, P = g.positions, C = outputChannels
        let c = chunkSize(g), width = c * P
        let offset = sampleOffset
        let primitives = effectiveBackend == .onednn && n > 0 ? try oneDNN(g, minibatch: oneDNNChunkSize(g)) : nil
        if primitives == nil {
            if chunkColumns.count < K * width { chunkColumns = Scalar.filled(K * width, with: 0) }
            if chunkOutput.count < C * width { chunkOutput = Scalar.filled(C * width, with: 0) }
        }
        let output = Tensor<Scalar>(shape: [n, C, g.outputHeight, g.outputWidth]) { y in
            guard n > 0 else { return }
            if let primitives {
                oneDNNForward(primitives, input: input, offset: offset, g, into: y)
            } else {
            input.scalars.withUnsafeBufferPointer { x in
                weight.value.scalars.withUnsafeBufferPointer { w in
                    chunkColumns.withUnsafeMutableBufferPointer { cc in
                        chunkOutput.withUnsafeMutableBufferPointer { t in
                            for (samples, firstSlot) in Self.chunks(batch: n, offset: offset, size: c) {
                                chunkColumns(of: x.baseAddress!, g, samples: samples, firstSlot: firstSlot, chunk: c, into: cc.baseAddress!)
                                timedGEMM(m: C, n: width, k: K) {
                                    Scalar.gemm(transposeA: false, transposeB: false, m: C, n: width, k: K, alpha: 1, a: w.baseAddress!, lda: K,
                                                b: cc.baseAddress!, ldb: width, beta: 0, c: t.baseAddress!, ldc: width)
                                }
                                for (i, s) in samples.enumerated() {
                                    for co in 0..<C {
                                        (y.baseAddress! + (s * C + co) * P).update(from: t.baseAddress! + co * width + (firstSlot + i) * P, count: P)
                                    }
                                }
                            }
                        }
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
        lastInputShape = input.shape
        if mode == .training {
            lastInput = input
            lastOutput = output
            lastGeometry = g
            lastBatch = n
            lastOffset = offset
        }
        return output
    }
    private var lastOffset = 0

    /// Backward over the same chunks as forward: the chunk's columns are built again (in cache);
    /// each sample's weight gradient dY_s·cols_sᵀ (one C_out × K × P GEMM, the same shape for every
    /// sample) is added along the pairwise tree over the batch; the chunk's output gradient
    /// (C_out × c·P, absent slots zero) gives dcols = Wᵀ·dY' in the same workspace, and col2im
    /// scatters each sample's columns into its dx.
    public func backward(_ outputGradient: Tensor<Scalar>) throws -> Tensor<Scalar> {
        guard let g = lastGeometry, let input = lastInput, let output = lastOutput else {
            preconditionFailure("Conv2d.backward needs a training forward")
        }
        let n = lastBatch, K = g.patchSize, P = g.positions, C = outputChannels
        try requireShape(outputGradient.shape == [n, C, g.outputHeight, g.outputWidth], "Conv2d",
                         "output gradient \(outputGradient.shape) does not match the forward output")
        lastGeometry = nil
        lastInput = nil
        lastOutput = nil
        let c = chunkSize(g), width = c * P
        let inputPlane = inputChannels * g.height * g.width
        var weightGradient = Tensor<Scalar>(shape: weight.value.shape)
        let receiver = patchStatisticsReceiver
        patchStatisticsReceiver = nil
        let fused = receiver != nil
        oneDNNStatisticsInBlocks = nil
        let rows = fused ? 2 * C + 1 : C
        let useOneDNN = effectiveBackend == .onednn && n > 0
        let L = weightGradientLeaf
        try requireShape(L == 1 || (lastOffset % L == 0 && n % L == 0), "Conv2d",
                         "weight-gradient leaves of \(L) samples need a batch aligned to them, got samples \(lastOffset)..<\(lastOffset + n)")
        if !useOneDNN {
            if chunkColumns.count < K * width { chunkColumns = Scalar.filled(K * width, with: 0) }
            if chunkOutput.count < C * width { chunkOutput = Scalar.filled(C * width, with: 0) }
        }
        // The plain tree, unless oneDNN sums the leaves in its own layout (it decides below).
        if !useOneDNN { preparePlainTree(width: C * K) }
        if !useOneDNN && (fused || L > 1) {
            sampleRows = Scalar.scratchArrays.take(atLeast: rows * L * P)
            sampleResult = Scalar.scratchArrays.take(atLeast: rows * K)
        }
        defer {
            Scalar.scratchArrays.giveBack(&sampleRows)
            Scalar.scratchArrays.giveBack(&sampleResult)
        }
        if fused && !useOneDNN {
            if patchStatisticsTree?.width != (C + 1) * K { patchStatisticsTree = PairwiseAccumulator(width: (C + 1) * K) }
            patchStatisticsTree!.reset()
        }
        var dx = Tensor<Scalar>(shape: [n, inputChannels, g.height, g.width])
        let offset = lastOffset
        if useOneDNN {
            try oneDNNBackward(g, input: input, output: output, outputGradient: outputGradient, offset: offset, fused: fused, into: &dx)
        } else {
        input.scalars.withUnsafeBufferPointer { x in
            outputGradient.scalars.withUnsafeBufferPointer { dy in
                output.scalars.withUnsafeBufferPointer { yp in
                    weight.value.scalars.withUnsafeBufferPointer { w in
                        chunkColumns.withUnsafeMutableBufferPointer { cc in
                            chunkOutput.withUnsafeMutableBufferPointer { t in
                                dx.scalars.withUnsafeMutableBufferPointer { d in
                                    for (samples, firstSlot) in Self.chunks(batch: n, offset: offset, size: c) {
                                        chunkColumns(of: x.baseAddress!, g, samples: samples, firstSlot: firstSlot, chunk: c, into: cc.baseAddress!)
                                        timedGEMM(m: rows, n: K, k: samples.count * P) {
                                            if L > 1 {
                                                addLeafParts(samples: samples, firstSlot: firstSlot, offset: offset, dy: dy.baseAddress!,
                                                             y: fused ? yp.baseAddress! : nil, columns: cc.baseAddress!, ldb: width, K: K, P: P)
                                                return
                                            }
                                            for (i, s) in samples.enumerated() {
                                                let columns = cc.baseAddress! + (firstSlot + i) * P
                                                if fused {
                                                    addFusedLeaf(dy: dy.baseAddress! + s * C * P, y: yp.baseAddress! + s * C * P, columns: columns,
                                                                 ldb: width, rows: rows, K: K, P: P)
                                                } else {
                                                    weightGradientTree!.add { leaf in
                                                        Scalar.gemm(transposeA: false, transposeB: true, m: C, n: K, k: P, alpha: 1,
                                                                    a: dy.baseAddress! + s * C * P, lda: P, b: columns, ldb: width, beta: 0, c: leaf, ldc: K)
                                                    }
                                                }
                                            }
                                        }
                                        // The chunk's output gradient, channels outermost, absent slots zero.
                                        if samples.count < c { t.baseAddress!.update(repeating: 0, count: C * width) }
                                        for (i, s) in samples.enumerated() {
                                            for co in 0..<C {
                                                (t.baseAddress! + co * width + (firstSlot + i) * P).update(from: dy.baseAddress! + (s * C + co) * P, count: P)
                                            }
                                        }
                                        timedGEMM(m: K, n: width, k: C) {
                                            Scalar.gemm(transposeA: true, transposeB: false, m: K, n: width, k: C, alpha: 1, a: w.baseAddress!, lda: K,
                                                        b: t.baseAddress!, ldb: width, beta: 0, c: cc.baseAddress!, ldc: width)
                                        }
                                        for (i, s) in samples.enumerated() {
                                            let columns = cc.baseAddress! + (firstSlot + i) * P
                                            if isPointwise {
                                                for k in 0..<K { (d.baseAddress! + s * inputPlane + k * P).update(from: columns + k * width, count: P) }
                                            } else {
                                                Scalar.col2imAccumulate(columns, g, rowLength: width, into: d.baseAddress! + s * inputPlane)
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        }
        lastWeightGradientLeaves = blockedWeightGradient != nil ? blockedWeightGradientTree!.count : weightGradientTree!.count
        if let blocked = blockedWeightGradient {
            // The leaves were summed in oneDNN's layout; one reorder (which only moves values)
            // gives the same bits as summing the reordered leaves.
            blockedWeightGradient = nil
            blockedWeightGradientTree!.withTotal { t in
                weightGradient.scalars.withUnsafeMutableBufferPointer {
                    $0.withMemoryRebound(to: Float.self) { blocked.weightGradientToPlain(t, into: $0.baseAddress!) }
                }
            }
        } else {
            weightGradient.scalars.withUnsafeMutableBufferPointer { weightGradientTree!.total(into: $0.baseAddress!) }
        }
        if let receiver, let blocked = oneDNNStatisticsInBlocks {
            try deliverOneDNNStatistics(K: K, blocked: blocked, to: receiver)
        } else if let receiver {
            try patchStatisticsTree!.withTotal { t in
                try receiver(UnsafeBufferPointer(start: t + C * K, count: K), PatchProducts(plain: t, count: C * K))
            }
        }
        weight.addLocalPendingGradient(to: &weightGradient)
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
        return dx
    }

    /// One leaf's cross-iteration BN statistics on oneDNN: Σ y·patch from the weight gradient's
    /// own primitive with Y as the output gradient (in its layout), widened into the Double tree
    /// as it is added, and Σ patch from the patch-sum plan.
    private func addStatisticsLeaf(_ perLeaf: OneDNNConvolution, blocked: Bool, x: UnsafePointer<Float>, y: UnsafePointer<Float>, samples L: Int,
                                   shared: (x: UnsafePointer<Float>?, y: UnsafePointer<Float>)? = nil) {
        oneDNNLeafProduct.withUnsafeMutableBufferPointer { product in
            if let shared {
                perLeaf.backwardWeightsBlocked(x: shared.x ?? x, blockedX: shared.x != nil, dy: shared.y, blockedDy: true,
                                               into: product.baseAddress!)
            } else if blocked {
                perLeaf.backwardWeightsBlocked(x: x, dy: y, into: product.baseAddress!)
            } else {
                perLeaf.backwardWeights(x: x, dy: y, into: product.baseAddress!)
            }
            productTree!.add(widening: product.baseAddress!)
        }
        patchSumScratch.withUnsafeMutableBufferPointer { scratch in
            patchSumTree!.add { patchSumPlan!.sums(x, samples: L, into: $0, scratch: scratch.baseAddress!) }
        }
    }

    /// The totals of ``addStatisticsLeaf(_:blocked:x:y:samples:)`` to `receiver`: Σ patch (K
    /// values) and Σ y·patch, read in the plain C_out × K order (gathered from oneDNN's layout as
    /// they are read when it is blocked: no plain copy, no index map).
    private func deliverOneDNNStatistics(K: Int, blocked: Bool,
                                         to receiver: (UnsafeBufferPointer<Double>, PatchProducts) throws -> Void) throws {
        var patchSum = Double.scratchArrays.take(atLeast: K)
        defer { Double.scratchArrays.giveBack(&patchSum) }
        let primitive = statisticsPrimitive
        statisticsPrimitive = nil
        try patchSum.withUnsafeMutableBufferPointer { sums in
            patchSumTree!.total(into: sums.baseAddress!)
            let patchSums = UnsafeBufferPointer(start: sums.baseAddress!, count: K)
            let plainCount = outputChannels * K
            try productTree!.withTotal { total in
                guard blocked, let primitive else { return try receiver(patchSums, PatchProducts(plain: total, count: plainCount)) }
                try receiver(patchSums, PatchProducts(blocked: total, count: plainCount, layout: primitive))
            }
        }
    }

    private func preparePlainTree(width: Int) {
        if weightGradientTree?.width != width { weightGradientTree = PairwiseAccumulator(width: width) }
        weightGradientTree!.reset()
    }

    /// One sample's [dW; Σ y·patch; Σ patch] = [dY_s; Y_s; 1]·cols_sᵀ: dW into the Scalar tree, the
    /// patch statistics widened into the Double tree (the type cross-iteration BN reduces them in).
    private func addFusedLeaf(dy: UnsafePointer<Scalar>, y: UnsafePointer<Scalar>, columns: UnsafePointer<Scalar>, ldb: Int,
                              rows: Int, K: Int, P: Int) {
        addFusedLeaf(dy: dy, y: y, K: K, P: P) { a, r in
            Scalar.gemm(transposeA: false, transposeB: true, m: rows, n: K, k: P, alpha: 1, a: a, lda: P,
                        b: columns, ldb: ldb, beta: 0, c: r, ldc: K)
        }
    }

    /// The fused leaf of one sample with its product computed by `product(rows, result)`: rows =
    /// [dY_s; Y_s; 1] ((2·C_out + 1) × P), result = rows·cols_sᵀ ((2·C_out + 1) × K).
    private func addFusedLeaf(dy: UnsafePointer<Scalar>, y: UnsafePointer<Scalar>, K: Int, P: Int,
                              product: (UnsafePointer<Scalar>, UnsafeMutablePointer<Scalar>) -> Void) {
        sampleRows.withUnsafeMutableBufferPointer { a in
            fillLeafRows(a.baseAddress!, dy: dy, y: y, count: 1, P: P, sampleMajor: true)
            sampleResult.withUnsafeMutableBufferPointer { r in
                product(a.baseAddress!, r.baseAddress!)
            }
        }
        pushLeaf(K: K, fused: true)
    }

    /// The rows of a leaf's product for `count` consecutive samples: dY (C_out rows), and with `y`
    /// Y and a row of ones; sample-major (each sample's rows × P block in turn) or channel-major
    /// (each row spanning the samples' P positions in turn: the GEMM operand over count·P columns).
    private func fillLeafRows(_ a: UnsafeMutablePointer<Scalar>, dy: UnsafePointer<Scalar>, y: UnsafePointer<Scalar>?,
                              count: Int, P: Int, sampleMajor: Bool) {
        let C = outputChannels, rows = y == nil ? C : 2 * C + 1
        for i in 0..<count {
            let block = sampleMajor ? a + i * rows * P : a + i * P, rowStride = sampleMajor ? P : count * P
            for co in 0..<C {
                (block + co * rowStride).update(from: dy + (i * C + co) * P, count: P)
                if let y { (block + (C + co) * rowStride).update(from: y + (i * C + co) * P, count: P) }
            }
            if y != nil { (block + (rows - 1) * rowStride).update(repeating: 1, count: P) }
        }
    }

    /// The finished leaf in ``sampleResult`` into the trees: dW (C_out × K) into the Scalar one,
    /// with `fused` the patch statistics ((C_out + 1) × K) widened into the Double one.
    private func pushLeaf(K: Int, fused: Bool) {
        let C = outputChannels
        sampleResult.withUnsafeBufferPointer { r in
            weightGradientTree!.add { $0.update(from: r.baseAddress!, count: C * K) }
            if fused { patchStatisticsTree!.add { Scalar.widen(r.baseAddress! + C * K, count: (C + 1) * K, into: $0) } }
        }
    }

    /// im2col's weight gradient with leaves of L = ``weightGradientLeaf`` samples, over one chunk:
    /// a leaf inside the chunk is one GEMM over its L·P columns; a leaf wider than the chunk (the
    /// chunks of big layers hold one or two samples) is accumulated over its chunks in order
    /// (β = 1 after the first), and goes into the tree when its last sample is in.
    private func addLeafParts(samples: Range<Int>, firstSlot: Int, offset: Int, dy: UnsafePointer<Scalar>, y: UnsafePointer<Scalar>?,
                              columns: UnsafePointer<Scalar>, ldb: Int, K: Int, P: Int) {
        let L = weightGradientLeaf, rows = y == nil ? outputChannels : 2 * outputChannels + 1, C = outputChannels
        var i = 0
        while i < samples.count {
            let s = samples.lowerBound + i, global = offset + s, leafEnd = (global / L + 1) * L
            let m = min(leafEnd - global, samples.count - i)
            sampleRows.withUnsafeMutableBufferPointer { a in
                fillLeafRows(a.baseAddress!, dy: dy + s * C * P, y: y.map { $0 + s * C * P }, count: m, P: P, sampleMajor: false)
                sampleResult.withUnsafeMutableBufferPointer { r in
                    Scalar.gemm(transposeA: false, transposeB: true, m: rows, n: K, k: m * P, alpha: 1, a: a.baseAddress!, lda: m * P,
                                b: columns + (firstSlot + i) * P, ldb: ldb, beta: global % L == 0 ? 0 : 1, c: r.baseAddress!, ldc: K)
                }
            }
            if global + m == leafEnd { pushLeaf(K: K, fused: y != nil) }
            i += m
        }
    }

    /// oneDNN's forward over the index-aligned chunks: a chunk this batch holds whole is computed
    /// in place (input read from x, output written into y); a partial one goes through the chunk
    /// buffers with absent slots zero, so every call has the layer's one shape.
    private func oneDNNForward(_ primitives: OneDNNConvolution, input: Tensor<Scalar>, offset: Int, _ g: ConvolutionGeometry,
                               into y: UnsafeMutableBufferPointer<Scalar>) {
        let n = input.shape[0], c = primitives.shape.minibatch
        let inPlane = inputChannels * g.height * g.width, outPlane = outputChannels * g.positions
        if oneDNNChunkInput.count < c * inPlane { oneDNNChunkInput = [Float](repeating: 0, count: c * inPlane) }
        if oneDNNChunkOutput.count < c * outPlane { oneDNNChunkOutput = [Float](repeating: 0, count: c * outPlane) }
        input.scalars.withUnsafeBufferPointer { xs in
            weight.value.scalars.withUnsafeBufferPointer { ws in
                xs.withMemoryRebound(to: Float.self) { x in
                    ws.withMemoryRebound(to: Float.self) { w in
                        y.withMemoryRebound(to: Float.self) { y in
                            // The weights reordered once for all the chunks.
                            let blockedW = oneDNNChunkSharing ? primitives.blockChunk(.forwardWeights, w.baseAddress!, buffer: 3) : nil
                            let weights = blockedW ?? UnsafePointer(w.baseAddress!)
                            for (samples, firstSlot) in Self.chunks(batch: n, offset: offset, size: c) {
                                timedGEMM(m: outputChannels, n: c * g.positions, k: g.patchSize) {
                                    if samples.count == c {
                                        primitives.forward(x: x.baseAddress! + samples.lowerBound * inPlane, weight: weights, blockedWeight: blockedW != nil,
                                                           into: y.baseAddress! + samples.lowerBound * outPlane)
                                    } else {
                                        oneDNNPartialChunk(samples: samples, firstSlot: firstSlot, chunk: c, source: x.baseAddress!,
                                                           sourcePlane: inPlane, target: y.baseAddress!, targetPlane: outPlane) { i, o in
                                            primitives.forward(x: i, weight: weights, blockedWeight: blockedW != nil, into: o)
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// A partial chunk: samples copied into their slots of the chunk input (the rest zero), the
    /// call run on the whole chunk, and the samples' results copied out of the chunk output.
    private func oneDNNPartialChunk(samples: Range<Int>, firstSlot: Int, chunk c: Int, source: UnsafePointer<Float>, sourcePlane: Int,
                                    target: UnsafeMutablePointer<Float>, targetPlane: Int,
                                    _ call: (UnsafePointer<Float>, UnsafeMutablePointer<Float>) -> Void) {
        oneDNNChunkInput.withUnsafeMutableBufferPointer { i in
            oneDNNChunkOutput.withUnsafeMutableBufferPointer { o in
                i.baseAddress!.update(repeating: 0, count: c * sourcePlane)
                (i.baseAddress! + firstSlot * sourcePlane).update(from: source + samples.lowerBound * sourcePlane,
                                                                 count: samples.count * sourcePlane)
                call(i.baseAddress!, o.baseAddress!)
                (target + samples.lowerBound * targetPlane).update(from: o.baseAddress! + firstSlot * targetPlane,
                                                                  count: samples.count * targetPlane)
            }
        }
    }

    /// oneDNN's backward: each leaf's weight gradient (one backward-weights call at minibatch L =
    /// ``weightGradientLeaf``, 1 by default, the same shape for every leaf, summed in oneDNN's
    /// layout where it has its own) added along the pairwise tree, and the input gradient over the
    /// forward's chunks. With patch statistics each leaf also gives Σ y·patch as a second call of
    /// the same primitive with Y as the output gradient (y = θ·patch, so Σ_p y·patch is the weight
    /// gradient of dY = Y) and Σ patch from the input directly, widened into the Double tree.
    private func oneDNNBackward(_ g: ConvolutionGeometry, input: Tensor<Scalar>, output: Tensor<Scalar>, outputGradient: Tensor<Scalar>,
                                offset: Int, fused: Bool, into dx: inout Tensor<Scalar>) throws {
        defer { Float.scratchArrays.giveBack(&oneDNNLeafProduct) }
        let n = input.shape[0], C = outputChannels, K = g.patchSize, P = g.positions
        let c = oneDNNChunkSize(g)
        let data = try oneDNN(g, minibatch: c)
        let L = weightGradientLeaf
        let perLeaf = try oneDNN(g, minibatch: 0, weightsMinibatch: L, weightsOutputChannels: C)
        // The weight-gradient leaves stay in oneDNN's layout, reordered once at the end.
        let blockedCount = perLeaf.blockedWeightGradientCount
        // Cross-iteration BN's patch statistics: Σ y·patch from the weight gradient's own primitive
        // run again with Y as the output gradient, kept in its layout like the weight gradient
        // (primitives with C_out + 1 or 2·C_out + 1 channels pad them to oneDNN's blocks and ran
        // 2–4 times slower; one with 2·C_out channels on [dY; Y], dW being its first half, ran no
        // faster than the two calls: docs/performance.md), then Σ patch (K values).
        let productCount = blockedCount > 0 ? blockedCount : C * K
        if fused {
            oneDNNLeafProduct = Float.scratchArrays.take(atLeast: productCount)
            if patchSumPlan?.geometry != g { patchSumPlan = PatchSumPlan(g) }
            if patchSumScratch.count < patchSumPlan!.scratchCount { patchSumScratch = [Double](repeating: 0, count: patchSumPlan!.scratchCount) }
            statisticsPrimitive = blockedCount > 0 ? perLeaf : nil
        }
        if blockedCount > 0 {
            if blockedWeightGradientTree?.width != blockedCount { blockedWeightGradientTree = PairwiseAccumulator(width: blockedCount) }
            blockedWeightGradientTree!.reset()
            blockedWeightGradient = perLeaf
        } else {
            preparePlainTree(width: C * K)
        }
        if fused {
            oneDNNStatisticsInBlocks = blockedCount > 0
            if patchSumTree?.width != K { patchSumTree = PairwiseAccumulator(width: K) }
            patchSumTree!.reset()
            if productTree?.width != productCount { productTree = PairwiseAccumulator(width: productCount) }
            productTree!.reset()
        }
        let inPlane = inputChannels * g.height * g.width, outPlane = C * P
        // Units of max(c, L) samples (both powers of two) whose dY, x and Y are reordered once
        // by the primitive of the larger, for backward data and the leaves to read as slices
        // where the layouts agree (dY's decides; x's is then shared where it agrees too).
        let unit = max(c, L), owner = L > c ? perLeaf : data
        let sharesUnits = blockedCount > 0 && unit % c == 0 && unit % L == 0 && oneDNNChunkSharing
        let sharedGradientStride = sharesUnits ? owner.chunkSliceStride(.outputGradient, reader: L > c ? data : perLeaf) : nil
        let sharedSourceStride = sharedGradientStride != nil ? owner.chunkSliceStride(.source, reader: perLeaf) : nil
        if oneDNNChunkInput.count < c * outPlane { oneDNNChunkInput = [Float](repeating: 0, count: c * outPlane) }
        if oneDNNChunkOutput.count < c * inPlane { oneDNNChunkOutput = [Float](repeating: 0, count: c * inPlane) }
        input.scalars.withUnsafeBufferPointer { xs in
            outputGradient.scalars.withUnsafeBufferPointer { dys in
                output.scalars.withUnsafeBufferPointer { ys in
                    weight.value.scalars.withUnsafeBufferPointer { ws in
                        dx.scalars.withUnsafeMutableBufferPointer { dxs in
                            let x = UnsafeRawPointer(xs.baseAddress!).assumingMemoryBound(to: Float.self)
                            let dy = UnsafeRawPointer(dys.baseAddress!).assumingMemoryBound(to: Float.self)
                            let w = UnsafeRawPointer(ws.baseAddress!).assumingMemoryBound(to: Float.self)
                            let d = UnsafeMutableRawPointer(dxs.baseAddress!).assumingMemoryBound(to: Float.self)
                            // The leaves of samples `leaves` with their own reorders.
                            func weightLeaves(_ leaves: Range<Int>) {
                                timedGEMM(m: C, n: K, k: leaves.count * P) {
                                    for s in Swift.stride(from: leaves.lowerBound, to: leaves.upperBound, by: L) {
                                        if fused {
                                            let y = UnsafeRawPointer(ys.baseAddress! + s * outPlane).assumingMemoryBound(to: Float.self)
                                            addStatisticsLeaf(perLeaf, blocked: blockedCount > 0, x: x + s * inPlane, y: y, samples: L)
                                        }
                                        if blockedCount > 0 {
                                            blockedWeightGradientTree!.add { leaf in
                                                perLeaf.backwardWeightsBlocked(x: x + s * inPlane, dy: dy + s * outPlane, into: leaf)
                                            }
                                        } else {
                                            weightGradientTree!.add { leaf in
                                                perLeaf.backwardWeights(x: x + s * inPlane, dy: dy + s * outPlane,
                                                                        into: UnsafeMutableRawPointer(leaf).assumingMemoryBound(to: Float.self))
                                            }
                                        }
                                    }
                                }
                            }
                            // The weights reordered once for all the chunks.
                            let blockedW = oneDNNChunkSharing ? data.blockChunk(.dataWeights, w, buffer: 3) : nil
                            let weights = blockedW ?? w
                            func dataChunk(_ samples: Range<Int>, firstSlot: Int) {
                                timedGEMM(m: K, n: c * P, k: C) {
                                    if samples.count == c {
                                        data.backwardData(dy: dy + samples.lowerBound * outPlane, blockedDy: false, weight: weights,
                                                          blockedWeight: blockedW != nil, into: d + samples.lowerBound * inPlane)
                                    } else {
                                        oneDNNPartialChunk(samples: samples, firstSlot: firstSlot, chunk: c, source: dy, sourcePlane: outPlane,
                                                           target: d, targetPlane: inPlane) { i, o in
                                            data.backwardData(dy: i, blockedDy: false, weight: weights, blockedWeight: blockedW != nil, into: o)
                                        }
                                    }
                                }
                            }
                            let chunks = Self.chunks(batch: n, offset: offset, size: c)
                            oneDNNSharedChunks = 0
                            guard let gradientStride = sharedGradientStride else {
                                weightLeaves(0..<n)
                                for (samples, firstSlot) in chunks { dataChunk(samples, firstSlot: firstSlot) }
                                return
                            }
                            // A whole unit's dY (and Y, and x where the layouts agree) reordered
                            // once, read by backward data and by each leaf as slices: the values
                            // of the calls' own reorders, so the same bits. A unit this batch
                            // does not hold whole (at its ends) goes the calls' own way.
                            var nextChunk = 0
                            for (samples, _) in Self.chunks(batch: n, offset: offset, size: unit) {
                                let lo = samples.lowerBound
                                guard samples.count == unit, let blockedDy = owner.blockChunk(.outputGradient, dy + lo * outPlane, buffer: 0) else {
                                    weightLeaves(samples)
                                    while nextChunk < chunks.count && chunks[nextChunk].samples.lowerBound < samples.upperBound {
                                        dataChunk(chunks[nextChunk].samples, firstSlot: chunks[nextChunk].firstSlot)
                                        nextChunk += 1
                                    }
                                    continue
                                }
                                let blockedX = sharedSourceStride.flatMap { _ in owner.blockChunk(.source, x + lo * inPlane, buffer: 1) }
                                let yUnit = UnsafeRawPointer(ys.baseAddress! + lo * outPlane).assumingMemoryBound(to: Float.self)
                                let blockedY = fused ? owner.blockChunk(.outputGradient, yUnit, buffer: 2) : nil
                                timedGEMM(m: C, n: K, k: unit * P) {
                                    for j in Swift.stride(from: 0, to: unit, by: L) {
                                        let s = lo + j
                                        let leafX = blockedX.map { $0 + j * sharedSourceStride! }
                                        if fused {
                                            let y = UnsafeRawPointer(ys.baseAddress! + s * outPlane).assumingMemoryBound(to: Float.self)
                                            addStatisticsLeaf(perLeaf, blocked: true, x: x + s * inPlane, y: y, samples: L,
                                                              shared: blockedY.map { (leafX, $0 + j * gradientStride) })
                                        }
                                        blockedWeightGradientTree!.add { leaf in
                                            perLeaf.backwardWeightsBlocked(x: leafX ?? x + s * inPlane, blockedX: leafX != nil,
                                                                           dy: blockedDy + j * gradientStride, blockedDy: true, into: leaf)
                                        }
                                    }
                                }
                                timedGEMM(m: K, n: unit * P, k: C) {
                                    for j in Swift.stride(from: 0, to: unit, by: c) {
                                        data.backwardData(dy: blockedDy + j * gradientStride, blockedDy: true, weight: weights,
                                                          blockedWeight: blockedW != nil, into: d + (lo + j) * inPlane)
                                    }
                                }
                                while nextChunk < chunks.count && chunks[nextChunk].samples.lowerBound < samples.upperBound { nextChunk += 1 }
                                oneDNNSharedChunks += 1
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Σ_i y_{i,c}·patch_i of a convolution's last training batch, for cross-iteration BN: C_out × K
/// Doubles in the plain order, read a range at a time — gathered from oneDNN's blocked layout of
/// the weight gradient as they are read when the sum was made in it. Valid only during the
/// receiver's call (it reads a buffer the convolution lends).
public struct PatchProducts {
    public let count: Int
    private let base: UnsafePointer<Double>
    private let layout: OneDNNConvolution?

    init(plain: UnsafePointer<Double>, count: Int) {
        base = plain
        self.count = count
        layout = nil
    }

    init(blocked: UnsafePointer<Double>, count: Int, layout: OneDNNConvolution) {
        base = blocked
        self.count = count
        self.layout = layout
    }

    /// Values `range` (of 0 ..< count) into `target`.
    public func copy(_ range: Range<Int>, into target: UnsafeMutablePointer<Double>) {
        precondition(range.lowerBound >= 0 && range.upperBound <= count, "patch products \(range) of \(count)")
        guard !range.isEmpty else { return }
        if let layout {
            layout.gatherWeightGradient(base, range: range, into: target)
        } else {
            target.update(from: base + range.lowerBound, count: range.count)
        }
    }

    /// All of them, in a new array.
    public var values: [Double] {
        var all = [Double](repeating: 0, count: count)
        all.withUnsafeMutableBufferPointer { copy(0..<count, into: $0.baseAddress!) }
        return all
    }
}
