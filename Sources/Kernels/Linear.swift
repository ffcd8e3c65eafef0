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

    /// y = x·Wᵀ a chunk at a time, (c × out) = (c × in)·(in × out).
    public func forward(_ input: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        try requireShape(input.rank == 2 && input.shape[1] == inputFeatures, "Linear",
                         "expected N×\(inputFeatures) input, got \(input.shape)")
        let n = input.shape[0], c = Self.chunkSize, offset = sampleOffset
        var output = Tensor<Scalar>(shape: [n, outputFeatures])
        if mode == .training { lastInput = input; lastOffset = offset }
        guard n > 0 else { return output }
        if chunkInput.count < c * inputFeatures { chunkInput = Scalar.filled(c * inputFeatures, with: 0) }
        if chunkResult.count < c * max(inputFeatures, outputFeatures) { chunkResult = Scalar.filled(c * max(inputFeatures, outputFeatures), with: 0) }
        input.scalars.withUnsafeBufferPointer { x in
            weight.value.scalars.withUnsafeBufferPointer { w in
                output.scalars.withUnsafeMutableBufferPointer { y in
                    chunkInput.withUnsafeMutableBufferPointer { a in
                        chunkResult.withUnsafeMutableBufferPointer { r in
                            for (samples, firstSlot) in Conv2d<Scalar>.chunks(batch: n, offset: offset, size: c) {
                                gather(x.baseAddress!, width: inputFeatures, samples: samples, firstSlot: firstSlot, into: a.baseAddress!)
                                Scalar.gemm(transposeA: false, transposeB: true, m: c, n: outputFeatures, k: inputFeatures, alpha: 1,
                                            a: a.baseAddress!, lda: inputFeatures, b: w.baseAddress!, ldb: inputFeatures,
                                            beta: 0, c: r.baseAddress!, ldc: outputFeatures)
                                (y.baseAddress! + samples.lowerBound * outputFeatures).update(from: r.baseAddress! + firstSlot * outputFeatures,
                                                                                              count: samples.count * outputFeatures)
                            }
                        }
                    }
                    if let bias {
                        bias.value.scalars.withUnsafeBufferPointer { b in
                            Scalar.addChannelBias(b, to: y, layout: ChannelLayout(batch: n, channels: outputFeatures, spatial: 1))
                        }
                    }
                }
            }
        }
        return output
    }

    /// dx = dy·W a chunk at a time; dW = Σ_n dy_nᵀ·x_n, each sample's outer product added along
    /// the pairwise tree; db = Σ_n dy_n (the same tree).
    public func backward(_ outputGradient: Tensor<Scalar>) throws -> Tensor<Scalar> {
        guard let input = lastInput else { preconditionFailure("Linear.backward before a training forward") }
        let n = input.shape[0], c = Self.chunkSize, In = inputFeatures, Out = outputFeatures
        try requireShape(outputGradient.shape == [n, Out], "Linear",
                         "output gradient \(outputGradient.shape) does not match the forward output")
        var inputGradient = Tensor<Scalar>(shape: input.shape)
        var weightGradient = Tensor<Scalar>(shape: weight.value.shape)
        if weightGradientTree?.width != Out * In { weightGradientTree = PairwiseAccumulator(width: Out * In) }
        weightGradientTree!.reset()
        if chunkInput.count < c * Out { chunkInput = Scalar.filled(c * max(Out, In), with: 0) }
        if chunkResult.count < c * In { chunkResult = Scalar.filled(c * max(In, Out), with: 0) }
        outputGradient.scalars.withUnsafeBufferPointer { dy in
            input.scalars.withUnsafeBufferPointer { x in
                weight.value.scalars.withUnsafeBufferPointer { w in
                    for s in 0..<n {
                        weightGradientTree!.add { Scalar.outerProduct(dy.baseAddress! + s * Out, m: Out, x.baseAddress! + s * In, n: In, into: $0) }
                    }
                    weightGradient.scalars.withUnsafeMutableBufferPointer { weightGradientTree!.total(into: $0.baseAddress!) }
                    inputGradient.scalars.withUnsafeMutableBufferPointer { dx in
                        chunkInput.withUnsafeMutableBufferPointer { a in
                            chunkResult.withUnsafeMutableBufferPointer { r in
                                for (samples, firstSlot) in Conv2d<Scalar>.chunks(batch: n, offset: lastOffset, size: c) {
                                    gather(dy.baseAddress!, width: Out, samples: samples, firstSlot: firstSlot, into: a.baseAddress!)
                                    Scalar.gemm(transposeA: false, transposeB: false, m: c, n: In, k: Out, alpha: 1,
                                                a: a.baseAddress!, lda: Out, b: w.baseAddress!, ldb: In,
                                                beta: 0, c: r.baseAddress!, ldc: In)
                                    (dx.baseAddress! + samples.lowerBound * In).update(from: r.baseAddress! + firstSlot * In, count: samples.count * In)
                                }
                            }
                        }
                    }
                }
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
