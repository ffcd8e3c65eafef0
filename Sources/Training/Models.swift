import Collectives
import Kernels
import Normalization

/// The architectures `syncbn-train --model` offers.
public enum ModelKind: String, CaseIterable, Codable, Sendable {
    /// Three conv(3×3, no bias)–norm–ReLU blocks of 16, 32, 64 channels, the last two with stride
    /// 2, then global average pooling and a linear classifier.
    case convnet
    /// Flatten, two linear(no bias)–norm–ReLU blocks of 128 units, linear classifier.
    case mlp
}

/// Which normalization layer follows each conv/linear layer.
public enum NormalizationKind: String, CaseIterable, Codable, Sendable {
    /// Per-rank batch statistics, no collectives.
    case bn
    /// Statistics over the ranks of each sync group (DESIGN §3.1–3.2).
    case syncbn
    /// Cross-iteration BN over each sync group: the last `window` iterations, compensated.
    case cbn
    /// GroupNorm: per-sample statistics over channel groups, no batch dependence, no collectives.
    case gn
    /// Batch Renormalization over each sync group, r and d clipped by a warm-up schedule.
    case brn
    /// Representative BN: centering and scaling calibration around (synced) BN.
    case rbn
}

/// Cross-iteration BN's options (see `CrossIterationBatchNorm`).
public struct CrossIterationOptions: Codable, Equatable, Sendable {
    public var window: Int = 4
    public var rho: Double = 1
    public var burnIn: Int = 0
    public init(window: Int = 4, rho: Double = 1, burnIn: Int = 0) {
        self.window = window
        self.rho = rho
        self.burnIn = burnIn
    }
}

/// Builds normalization layers for a model: the kind, and the group that SyncBN synchronizes.
public struct NormalizationFactory {
    public let kind: NormalizationKind
    public let group: (any Communicator)?
    public let epsilon: Double
    public let momentum: Double?
    public let crossIteration: CrossIterationOptions
    /// GroupNorm's groups per layer (capped at the layer's channels; must divide them).
    public let groupNormGroups: Int
    /// Ghost batches (size, count per rank) for `bn`/`syncbn`; nil = the whole per-rank batch.
    public let ghost: (size: Int, count: Int)?

    public init(kind: NormalizationKind, group: (any Communicator)?, epsilon: Double = 1e-5, momentum: Double? = 0.1,
                crossIteration: CrossIterationOptions = CrossIterationOptions(), groupNormGroups: Int = 8,
                ghost: (size: Int, count: Int)? = nil) {
        self.groupNormGroups = groupNormGroups
        self.ghost = ghost
        self.kind = kind
        self.group = group
        self.epsilon = epsilon
        self.momentum = momentum
        self.crossIteration = crossIteration
    }

    /// A normalization layer for the output of `source` (whose weight cross-iteration BN
    /// differentiates its statistics by).
    public func make(featureCount: Int, source: any PatchSource<Float>) throws -> any Layer<Float> {
        if let ghost, kind == .bn || kind == .syncbn {
            return GhostBatchNorm<Float>(featureCount: featureCount, ghostBatchSize: ghost.size, ghostCount: ghost.count,
                                         epsilon: epsilon, momentum: momentum, group: kind == .syncbn ? group : nil)
        }
        switch kind {
        case .rbn:
            return RepresentativeBatchNorm<Float>(featureCount: featureCount, epsilon: epsilon, momentum: momentum, group: group)
        case .brn:
            return BatchRenormalization<Float>(featureCount: featureCount, epsilon: epsilon, momentum: momentum, group: group)
        case .gn:
            let groups = min(groupNormGroups, featureCount)
            guard featureCount % groups == 0 else {
                throw LayerError("--gn-groups \(groupNormGroups) does not divide a layer's \(featureCount) channels")
            }
            return GroupNorm<Float>(featureCount: featureCount, groups: groups, epsilon: epsilon)
        case .cbn:
            return CrossIterationBatchNorm<Float>(featureCount: featureCount, source: source, window: crossIteration.window,
                                                  rho: crossIteration.rho, burnIn: crossIteration.burnIn,
                                                  epsilon: epsilon, momentum: momentum, group: group)
        case .bn:
            return BatchNorm<Float>(featureCount: featureCount, epsilon: epsilon, momentum: momentum)
        case .syncbn:
            guard let group else { return BatchNorm<Float>(featureCount: featureCount, epsilon: epsilon, momentum: momentum) }
            return SyncBatchNorm<Float>(featureCount: featureCount, epsilon: epsilon, momentum: momentum, synchronizing: group)
        }
    }
}

extension Network {
    /// A model for samples of `sampleShape` ([C, H, W], or [F] for the MLP) and `classes`
    /// classes, initialised from `seed` (identically on every rank).
    public static func make(_ kind: ModelKind, sampleShape: [Int], classes: Int, normalization: NormalizationFactory,
                            seed: UInt64) throws -> Network {
        var random = DeterministicRandom(seed: seed, stream: [0x4D4F_4445_4C])
        switch kind {
        case .convnet:
            guard sampleShape.count == 3 else {
                throw LayerError("model convnet needs C×H×W samples, the data has samples of shape \(sampleShape); use --model mlp")
            }
            let widths = [16, 32, 64]
            var layers: [(name: String, layer: any Layer<Float>)] = []
            var channels = sampleShape[0]
            for (i, width) in widths.enumerated() {
                let conv = Conv2d<Float>(inputChannels: channels, outputChannels: width, kernelSize: 3,
                                         stride: i == 0 ? 1 : 2, padding: 1, bias: false, random: &random)
                layers.append(("features.\(i).conv", conv))
                layers.append(("features.\(i).bn", try normalization.make(featureCount: width, source: conv)))
                layers.append(("features.\(i).relu", ReLU<Float>()))
                channels = width
            }
            layers.append(("pool", GlobalAvgPool<Float>()))
            layers.append(("classifier", Linear<Float>(inputFeatures: channels, outputFeatures: classes, random: &random)))
            return Network(layers: layers)
        case .mlp:
            let inputs = sampleShape.reduce(1, *)
            var layers: [(name: String, layer: any Layer<Float>)] = [("flatten", Flatten<Float>())]
            var features = inputs
            for i in 0..<2 {
                let linear = Linear<Float>(inputFeatures: features, outputFeatures: 128, bias: false, random: &random)
                layers.append(("features.\(i).linear", linear))
                layers.append(("features.\(i).bn", try normalization.make(featureCount: 128, source: linear)))
                layers.append(("features.\(i).relu", ReLU<Float>()))
                features = 128
            }
            layers.append(("classifier", Linear<Float>(inputFeatures: features, outputFeatures: classes, random: &random)))
            return Network(layers: layers)
        }
    }
}
