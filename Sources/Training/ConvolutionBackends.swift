import Collectives
import Dispatch
import Kernels

/// Which backend a run's Float convolutions use: `auto` (each convolution times both on its own
/// shapes at the run's per-rank batch and keeps the faster; rank 0 decides for all ranks), one
/// backend for all, or one per convolution in model order (the list `auto` prints, to repeat a
/// choice exactly).
public enum ConvolutionBackendSetting: Equatable, Sendable, Codable, LosslessStringConvertible {
    case auto
    case all(ConvolutionBackend)
    case perLayer([ConvolutionBackend])

    /// "auto", "im2col", "onednn", or a comma-separated list of im2col/onednn.
    public init?(_ text: String) {
        if text == "auto" { self = .auto; return }
        let parts = text.split(separator: ",", omittingEmptySubsequences: false).map { ConvolutionBackend(rawValue: String($0)) }
        guard !parts.isEmpty, !parts.contains(where: { $0 == nil }) else { return nil }
        self = parts.count == 1 ? .all(parts[0]!) : .perLayer(parts.map { $0! })
    }

    public var description: String {
        switch self {
        case .auto: return "auto"
        case .all(let backend): return backend.rawValue
        case .perLayer(let list): return list.listText
        }
    }

    /// The backends the text names, in order (nil for `auto`): how a stored list is read back.
    public var listed: [ConvolutionBackend]? {
        switch self {
        case .auto: return nil
        case .all(let backend): return [backend]
        case .perLayer(let list): return list
        }
    }

    public init(from decoder: Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        guard let value = ConvolutionBackendSetting(text) else {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "convBackend '\(text)' is not auto, im2col, onednn or a list of them"))
        }
        self = value
    }

    public func encode(to encoder: Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}

extension Array where Element == ConvolutionBackend {
    /// "im2col,onednn,…": how a list of backends is written (`--conv-backend LIST`, the
    /// checkpoint's and the metrics' `conv_backends`).
    public var listText: String { map(\.rawValue).joined(separator: ",") }
}

extension Network {
    /// The model's convolutions in order, including those inside weight normalization or weight
    /// centering, under their layers' names.
    public var convolutions: [(name: String, layer: Conv2d<Float>)] {
        leaves.compactMap { entry in
            if let conv = entry.layer as? Conv2d<Float> { return (entry.name, conv) }
            if let wrapper = entry.layer as? ReparameterizedWeight, let conv = wrapper.wrappedLayer as? Conv2d<Float> { return (entry.name, conv) }
            return nil
        }
    }
}

/// The timing behind `auto`.
public enum ConvolutionBackendTiming {
    /// Seconds of one forward + backward of a layer like `conv` on `inputShape` with `backend`:
    /// the best of `repeats` after one warm-up (a copy of the layer: the model is not touched).
    /// With `patchStatistics` the backward also computes cross-iteration BN's patch sums; the
    /// weight gradient uses leaves of `weightGradientLeaf` samples, as training will.
    public static func seconds(like conv: Conv2d<Float>, inputShape: [Int], backend: ConvolutionBackend,
                               patchStatistics: Bool, weightGradientLeaf: Int = 1, repeats: Int = 3) throws -> Double {
        let copy = Conv2d<Float>(weight: conv.weight.value, bias: conv.bias?.value, stride: conv.stride, padding: conv.padding)
        copy.backend = backend
        copy.weightGradientLeaf = weightGradientLeaf
        copy.providesPatchStatistics = patchStatistics && conv.bias == nil
        var random = DeterministicRandom(seed: 17)
        let x = Tensor<Float>.normal(shape: inputShape, using: &random)
        let g = try copy.geometry(for: inputShape)
        let dy = Tensor<Float>.normal(shape: [inputShape[0], conv.outputChannels, g.outputHeight, g.outputWidth], using: &random)
        var best = Double.infinity
        for iteration in 0...repeats {
            let start = DispatchTime.now().uptimeNanoseconds
            _ = try copy.forward(x, mode: .training)
            if copy.providesPatchStatistics { copy.patchStatisticsReceiver = { _, _ in } }
            _ = try copy.backward(dy)
            let elapsed = Double(DispatchTime.now().uptimeNanoseconds - start) * 1e-9
            if iteration > 0 { best = min(best, elapsed) }
        }
        return best
    }

    /// One backend per convolution of `network`: each distinct shape timed with both backends at
    /// `batch` samples on every rank at once (so the timing sees the job's contention), and rank
    /// 0's choices broadcast. oneDNN is kept only where it is at least 3 % faster, so a tie
    /// stays on im2col. `sampleShape` is one input sample's shape.
    public static func choose(for network: Network, sampleShape: [Int], batch: Int, domains: Bool, weightGradientLeaf: Int = 1,
                              world: any Communicator) throws -> (backends: [ConvolutionBackend], seconds: [[Double]]) {
        let convolutions = network.convolutions
        guard !convolutions.isEmpty else { return ([], []) }
        // The convolutions' input shapes: one inference forward of a zero sample (no statistics change).
        if domains { network.setDomains([0]) }
        _ = try network.forward(Tensor<Float>(shape: [1] + sampleShape), mode: .inference)
        var timed: [String: [Double]] = [:]
        var seconds: [[Double]] = []
        for (name, conv) in convolutions {
            guard let shape = conv.lastInputShape else { throw CollectiveRunError("convolution \(name) was not reached by a forward pass") }
            let inputShape = [batch] + shape.dropFirst()
            let key = "\(inputShape) \(conv.outputChannels) \(conv.kernelSize) \(conv.stride) \(conv.padding) \(conv.bias != nil) \(conv.providesPatchStatistics)"
            if timed[key] == nil {
                timed[key] = try ConvolutionBackend.allCases.map {
                    try Self.seconds(like: conv, inputShape: inputShape, backend: $0, patchStatistics: conv.providesPatchStatistics,
                                     weightGradientLeaf: weightGradientLeaf)
                }
            }
            seconds.append(timed[key]!)
        }
        var codes = seconds.map { $0[1] < 0.97 * $0[0] ? 1.0 : 0.0 }
        try world.broadcast(&codes, root: 0)
        return (codes.map { $0 == 1 ? .onednn : .im2col }, seconds)
    }
}
