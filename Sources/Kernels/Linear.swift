/// Fully connected layer on N×in input: y = x·Wᵀ + b, W of shape out×in (PyTorch's layout).
/// Backward: dW = dyᵀ·x, db = Σ_n dy, dx = dy·W. Init U(±1/√in) as PyTorch.
public final class Linear<Scalar: TensorScalar>: Layer, PatchSource {
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

    public func forward(_ input: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        try requireShape(input.rank == 2 && input.shape[1] == inputFeatures, "Linear",
                         "expected N×\(inputFeatures) input, got \(input.shape)")
        let n = input.shape[0]
        var output = Tensor<Scalar>(shape: [n, outputFeatures])
        if mode == .training { lastInput = input }
        guard n > 0 else { return output }
        input.scalars.withUnsafeBufferPointer { x in
            weight.value.scalars.withUnsafeBufferPointer { w in
                output.scalars.withUnsafeMutableBufferPointer { y in
                    Scalar.gemm(transposeA: false, transposeB: true, m: n, n: outputFeatures, k: inputFeatures, alpha: 1,
                                a: x.baseAddress!, lda: inputFeatures, b: w.baseAddress!, ldb: inputFeatures,
                                beta: 0, c: y.baseAddress!, ldc: outputFeatures)
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

    public func backward(_ outputGradient: Tensor<Scalar>) throws -> Tensor<Scalar> {
        guard let input = lastInput else { preconditionFailure("Linear.backward before a training forward") }
        let n = input.shape[0]
        try requireShape(outputGradient.shape == [n, outputFeatures], "Linear",
                         "output gradient \(outputGradient.shape) does not match the forward output")
        var inputGradient = Tensor<Scalar>(shape: input.shape)
        var weightGradient = Tensor<Scalar>(shape: weight.value.shape)
        guard n > 0 else {
            weight.addPendingGradient(to: &weightGradient)
            weight.gradient = weightGradient
            bias?.gradient = Tensor(shape: [outputFeatures])
            return inputGradient
        }
        outputGradient.scalars.withUnsafeBufferPointer { dy in
            input.scalars.withUnsafeBufferPointer { x in
                weight.value.scalars.withUnsafeBufferPointer { w in
                    weightGradient.scalars.withUnsafeMutableBufferPointer { dw in
                        Scalar.gemm(transposeA: true, transposeB: false, m: outputFeatures, n: inputFeatures, k: n, alpha: 1,
                                    a: dy.baseAddress!, lda: outputFeatures, b: x.baseAddress!, ldb: inputFeatures,
                                    beta: 0, c: dw.baseAddress!, ldc: inputFeatures)
                    }
                    inputGradient.scalars.withUnsafeMutableBufferPointer { dx in
                        Scalar.gemm(transposeA: false, transposeB: false, m: n, n: inputFeatures, k: outputFeatures, alpha: 1,
                                    a: dy.baseAddress!, lda: outputFeatures, b: w.baseAddress!, ldb: inputFeatures,
                                    beta: 0, c: dx.baseAddress!, ldc: inputFeatures)
                    }
                }
            }
        }
        weight.addPendingGradient(to: &weightGradient)
        weight.gradient = weightGradient
        if let bias {
            var biasGradient = Tensor<Scalar>(shape: [outputFeatures])
            outputGradient.scalars.withUnsafeBufferPointer { dy in
                biasGradient.scalars.withUnsafeMutableBufferPointer { db in
                    Scalar.channelSums(dy, layout: ChannelLayout(batch: n, channels: outputFeatures, spatial: 1), into: db)
                }
            }
            bias.gradient = biasGradient
        }
        return inputGradient
    }
}
