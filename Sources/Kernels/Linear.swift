/// Fully connected layer on N×in input: y = x·Wᵀ + b, W of shape out×in (PyTorch's layout).
/// Backward: dW = dyᵀ·x, db = Σ_n dy, dx = dy·W. Init U(±1/√in) as PyTorch.
public final class Linear<Scalar: TensorScalar>: Layer, PatchSource, SampleAligned {
    public let inputFeatures: Int, outputFeatures: Int
    public let weight: Parameter<Scalar>
    public let bias: Parameter<Scalar>?
    private var lastInput: Tensor<Scalar>?

    public init(inputFeatures: Int, outputFeatures: Int, bias: Bool = true, random: inout DeterministicRandom) {
        precondition(inputFeatures > 0 && outputFeatures > 0, "invalid Linear configuration")
        self.inputFeatures = inputFeatures
        self.outputFeatures = outputFeatures
        let bound = 1 / Double(inputFeatures).squareRoot()
        weight = Parameter(.uniform(shape: [outputFeatures, inputFeatures], bound: bound, using: &random))
        self.bias = bias ? Parameter(.uniform(shape: [outputFeatures], bound: bound, using: &random)) : nil
    }

    /// A linear layer with the given weight (out × in) and optional bias.
    public init(weight: Tensor<Scalar>, bias: Tensor<Scalar>?) {
        precondition(weight.rank == 2 && bias.map { $0.shape == [weight.shape[0]] } ?? true, "Linear(weight:bias:) shapes")
        outputFeatures = weight.shape[0]
        inputFeatures = weight.shape[1]
        self.weight = Parameter(weight)
        self.bias = bias.map { Parameter($0) }
    }

    public var patchWeight: Parameter<Scalar> { weight }

    public var lastPatches: PatchMatrix<Scalar>? {
        lastInput.map { PatchMatrix(values: $0.scalars, batch: $0.shape[0], patchSize: inputFeatures, positions: 1, positionMajor: true) }
    }

    public var state: [StateEntry<Scalar>] {
        [.parameter("weight", weight)] + (bias.map { [.parameter("bias", $0)] } ?? [])
    }

    /// The global index of the first sample of the next batch (see ``SampleAligned``).
    public var sampleOffset = 0
    private var lastOffset = 0
    /// Rows per GEMM: chunks of 16 samples aligned to the global sample index, absent rows zero,
    /// so that every GEMM of the layer has one shape and a sample always sits in the same row.
    public static var chunkSize: Int { 16 }
    private var chunkInput: [Scalar] = []
    private var chunkResult: [Scalar] = []
    private var weightGradientTree: PairwiseAccumulator<Scalar>?

    /// rows of `source` (row length `width`) for the chunk's samples into slots firstSlot… of
    /// `target` (c rows), the other rows zero.
    private func gather(_ source: UnsafePointer<Scalar>, width: Int, samples: Range<Int>, firstSlot: Int, into target: UnsafeMutablePointer<Scalar>) {
        let c = Self.chunkSize
        if samples.count < c { target.update(repeating: 0, count: c * width) }
        (target + firstSlot * width).update(from: source + samples.lowerBound * width, count: samples.count * width)
    }

    /// target = source·Wᵀ (`transposeWeight`, forward) or source·W (the input gradient) for the
    /// rows of `source` (row length `width`), one chunk of c rows at a time: every GEMM has the
    /// shape c × outputWidth × width.
    private func chunkedProduct(_ source: UnsafePointer<Scalar>, batch n: Int, offset: Int, width: Int, transposeWeight: Bool,
                                outputWidth: Int, into target: UnsafeMutablePointer<Scalar>) {
        let c = Self.chunkSize
        if chunkInput.count < c * width { chunkInput = Scalar.filled(c * width, with: 0) }
        if chunkResult.count < c * outputWidth { chunkResult = Scalar.filled(c * outputWidth, with: 0) }
        weight.value.scalars.withUnsafeBufferPointer { w in
            chunkInput.withUnsafeMutableBufferPointer { a in
                chunkResult.withUnsafeMutableBufferPointer { r in
                    for (samples, firstSlot) in Conv2d<Scalar>.chunks(batch: n, offset: offset, size: c) {
                        gather(source, width: width, samples: samples, firstSlot: firstSlot, into: a.baseAddress!)
                        Scalar.gemm(transposeA: false, transposeB: transposeWeight, m: c, n: outputWidth, k: width, alpha: 1,
                                    a: a.baseAddress!, lda: width, b: w.baseAddress!, ldb: transposeWeight ? width : outputWidth,
                                    beta: 0, c: r.baseAddress!, ldc: outputWidth)
                        (target + samples.lowerBound * outputWidth).update(from: r.baseAddress! + firstSlot * outputWidth,
                                                                           count: samples.count * outputWidth)
                    }
                }
            }
        }
    }

    /// y = x·Wᵀ a chunk at a time, (c × out) = (c × in)·(in × out).
    public func forward(_ input: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        try requireShape(input.rank == 2 && input.shape[1] == inputFeatures, "Linear",
                         "expected N×\(inputFeatures) input, got \(input.shape)")
        let n = input.shape[0], offset = sampleOffset
        var output = Tensor<Scalar>(shape: [n, outputFeatures])
        if mode == .training { lastInput = input; lastOffset = offset }
        guard n > 0 else { return output }
        output.scalars.withUnsafeMutableBufferPointer { y in
            input.scalars.withUnsafeBufferPointer { x in
                chunkedProduct(x.baseAddress!, batch: n, offset: offset, width: inputFeatures, transposeWeight: true,
                               outputWidth: outputFeatures, into: y.baseAddress!)
            }
        }
        if let bias {
            output.scalars.withUnsafeMutableBufferPointer { y in
                bias.value.scalars.withUnsafeBufferPointer { b in
                    Scalar.addChannelBias(b, to: y, layout: ChannelLayout(batch: n, channels: outputFeatures, spatial: 1))
                }
            }
        }
        return output
    }

    /// dx = dy·W a chunk at a time; dW = Σ_n dy_nᵀ·x_n, each sample's outer product added along
    /// the pairwise tree; db = Σ_n dy_n (the same tree).
    public func backward(_ outputGradient: Tensor<Scalar>) throws -> Tensor<Scalar> {
        guard let input = lastInput else { preconditionFailure("Linear.backward before a training forward") }
        let n = input.shape[0], In = inputFeatures, Out = outputFeatures
        try requireShape(outputGradient.shape == [n, Out], "Linear",
                         "output gradient \(outputGradient.shape) does not match the forward output")
        var inputGradient = Tensor<Scalar>(shape: input.shape)
        var weightGradient = Tensor<Scalar>(shape: weight.value.shape)
        if weightGradientTree?.width != Out * In { weightGradientTree = PairwiseAccumulator(width: Out * In) }
        weightGradientTree!.reset()
        outputGradient.scalars.withUnsafeBufferPointer { dy in
            input.scalars.withUnsafeBufferPointer { x in
                for s in 0..<n {
                    weightGradientTree!.add { Scalar.outerProduct(dy.baseAddress! + s * Out, m: Out, x.baseAddress! + s * In, n: In, into: $0) }
                }
            }
            weightGradient.scalars.withUnsafeMutableBufferPointer { weightGradientTree!.total(into: $0.baseAddress!) }
            inputGradient.scalars.withUnsafeMutableBufferPointer { dx in
                chunkedProduct(dy.baseAddress!, batch: n, offset: lastOffset, width: Out, transposeWeight: false, outputWidth: In, into: dx.baseAddress!)
            }
        }
        weight.addLocalPendingGradient(to: &weightGradient)
        weight.gradient = weightGradient
        if let bias {
            var biasGradient = Tensor<Scalar>(shape: [Out])
            outputGradient.scalars.withUnsafeBufferPointer { dy in
                biasGradient.scalars.withUnsafeMutableBufferPointer { db in
                    Scalar.channelSums(dy, layout: ChannelLayout(batch: n, channels: Out, spatial: 1), into: db)
                }
            }
            bias.gradient = biasGradient
        }
        return inputGradient
    }
}
