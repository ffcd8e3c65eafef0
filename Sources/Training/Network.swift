import Kernels
import Normalization

/// A model: top-level layers under dotted names (`features.0.conv`, `layer1.0`, `fc`), the
/// names its parameters and buffers have in checkpoints. A layer may be a container (a residual
/// block, a `Sequential`); ``leaves`` lists the layers inside under their full names.
public final class Network {
    public let layers: [(name: String, layer: any Layer<Float>)]

    public init(layers: [(name: String, layer: any Layer<Float>)]) {
        self.layers = layers
    }

    /// Called with the pass ("forward", "backward") and the layer's name before each top-level
    /// layer runs: lets a watchdog say where a hung collective was issued.
    public var trace: ((StaticString, String) -> Void)?

    /// The global index of the next batch's first sample (a rank's offset in the global batch):
    /// handed to every layer that computes on chunks aligned to it (``SampleAligned``), so that
    /// a sample's results do not depend on which rank holds it.
    public var sampleOffset = 0 {
        didSet {
            if alignedLayers == nil { alignedLayers = leaves.compactMap { $0.layer as? SampleAligned } }
            for layer in alignedLayers! { layer.sampleOffset = sampleOffset }
        }
    }
    private var alignedLayers: [SampleAligned]?

    public func forward(_ input: Tensor<Float>, mode: Mode) throws -> Tensor<Float> {
        var x = input
        for (name, layer) in layers {
            trace?("forward", name)
            x = try layer.forward(x, mode: mode)
        }
        return x
    }

    /// Back-propagates the gradient of the loss with respect to the logits; writes every
    /// parameter's gradient.
    public func backward(_ outputGradient: Tensor<Float>) throws {
        try backward(outputGradient) { _ in }
    }

    /// Back-propagates, calling `finished` with each layer right after its backward (last layer
    /// first): from then on that layer's parameter gradients are final, which lets the trainer
    /// start their all-reduce while earlier layers are still computing.
    public func backward(_ outputGradient: Tensor<Float>, finished: (any Layer<Float>) throws -> Void) throws {
        var g = outputGradient
        for (name, layer) in layers.reversed() {
            trace?("backward", name)
            g = try layer.backward(g)
            try finished(layer)
        }
    }

    /// Every non-container layer, depth first, under its full dotted name (`layer1.0.bn1`).
    public var leaves: [(name: String, layer: any Layer<Float>)] { leafLayers(layers) }

    /// Every parameter, buffer and counter under its full dotted name, in layer order.
    public var state: [StateEntry<Float>] {
        layers.flatMap { entry in entry.layer.state.map { $0.prefixed(entry.name) } }
    }

    /// Trainable parameters under their full names, in layer order.
    public var namedParameters: [(name: String, parameter: Parameter<Float>)] {
        state.compactMap { if case let .parameter(name, p) = $0 { return (name, p) } else { return nil } }
    }

    /// Floating-point buffers (running statistics) under their full names.
    public var namedBuffers: [(name: String, buffer: Buffer<Float>)] {
        state.compactMap { if case let .buffer(name, b) = $0 { return (name, b) } else { return nil } }
    }

    /// The batch-normalization layers, in order (including the BN inside Representative BN).
    public var batchNormLayers: [BatchNorm<Float>] {
        leaves.compactMap { ($0.layer as? BatchNorm<Float>) ?? ($0.layer as? RepresentativeBatchNorm<Float>)?.normalization }
    }

    public var parameterCount: Int { namedParameters.reduce(0) { $0 + $1.parameter.value.count } }
}

extension Network {
    /// Per normalization layer (by its name): the L2 norms of γ and of the weight and weight
    /// gradient of the conv or linear layer that feeds it, and for cross-iteration BN its window
    /// measurements since the last call (``CrossIterationDiagnostics``, which this resets).
    public func normalizationDiagnostics() -> [String: [String: Double]] {
        func norm(_ values: [Float]) -> Double { values.reduce(0) { $0 + Double($1) * Double($1) }.squareRoot() }
        var result: [String: [String: Double]] = [:]
        var feeder: (any PatchSource<Float>)?
        for (name, layer) in leaves {
            if let source = layer as? any PatchSource<Float> {
                feeder = source
                continue
            }
            let isNorm = layer is BatchNorm<Float> || layer is GroupNorm<Float> || layer is RepresentativeBatchNorm<Float>
            guard isNorm, let gamma = layer.parameters.first else { continue }
            var entry: [String: Double] = ["gamma_norm": norm(gamma.value.scalars)]
            if let feeder {
                entry["weight_norm"] = norm(feeder.patchWeight.value.scalars)
                entry["weight_grad_norm"] = norm(feeder.patchWeight.gradient.scalars)
            }
            if let cbn = layer as? CrossIterationBatchNorm<Float> {
                entry.merge(cbn.takeDiagnostics().averages) { $1 }
            }
            result[name] = entry
            feeder = nil
        }
        return result
    }
}

extension Network {
    /// Hands the domain labels of the next forward's samples to every domain-specific BN layer.
    public func setDomains(_ domains: [Int32]?) {
        guard let domains else { return }
        for case let layer as DomainBatchNorm<Float> in leaves.map(\.layer) { layer.domains = domains }
    }

    /// Whether the model has domain-specific BN layers (which need domain labels with every batch).
    public var hasDomainBatchNorm: Bool { leaves.contains { $0.layer is DomainBatchNorm<Float> } }
}
