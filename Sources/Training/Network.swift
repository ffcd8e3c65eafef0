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

    /// Every layer that adopts ``NormalizationLayer``, depth first, under its full name.
    public var normalizationLayers: [(name: String, layer: NormalizationLayer)] {
        leaves.compactMap { entry in (entry.layer as? NormalizationLayer).map { (entry.name, $0) } }
    }

    /// Tells every normalization layer where the schedule is before training step `step`.
    public func prepare(step: Int, of totalSteps: Int) {
        for (_, layer) in normalizationLayers { layer.prepare(step: step, of: totalSteps) }
    }

    /// The data-dependent initialisation (weight normalization's): when a layer asks for one,
    /// one forward of `x` in which every such layer, in order, initialises itself from its
    /// pre-activation statistics summed over all ranks by `allReduce` (one all-reduce per layer),
    /// so that every replica starts alike whatever the split of the batch. Returns whether it ran.
    @discardableResult
    public func initializeFromData(_ x: Tensor<Float>, allReduce: @escaping (inout [Double]) throws -> Void) throws -> Bool {
        let leaves = self.leaves
        var armed = false
        for (index, entry) in leaves.enumerated() {
            guard let layer = entry.layer as? NormalizationLayer else { continue }
            let next: AnyObject? = index + 1 < leaves.count ? leaves[index + 1].layer : nil
            if layer.armInitialization(next: next, allReduce: allReduce) { armed = true }
        }
        guard armed else { return false }
        _ = try forward(x, mode: .batchStatistics)
        return true
    }

    /// Before a checkpoint: state that waits for a later pass, completed (collective).
    public func finishPendingStatistics() throws {
        for (_, layer) in normalizationLayers { try layer.settlePendingStatistics() }
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
            guard let normalization = layer as? NormalizationLayer, var entry = normalization.diagnostics() else { continue }
            if let feeder {
                entry["weight_norm"] = norm(feeder.patchWeight.value.scalars)
                entry["weight_grad_norm"] = norm(feeder.patchWeight.gradient.scalars)
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
        for (_, layer) in normalizationLayers { layer.useDomains(domains) }
    }

    /// Whether the model has domain-specific BN layers (which need domain labels with every batch).
    public var hasDomainBatchNorm: Bool { leaves.contains { $0.layer is DomainBatchNorm<Float> } }
}
