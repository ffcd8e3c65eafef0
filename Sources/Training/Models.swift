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
    /// The CIFAR ResNets of He et al. 2016 §4.2: a 16-channel 3×3 stem, three stages of
    /// n = (depth − 2)/6 BasicBlocks at 16/32/64 channels, global average pool, linear.
    case resnet20, resnet32, resnet56, resnet110
    /// torchvision's ResNet-18 for small images: a 64-channel 3×3 stem (stride 1, no max-pool),
    /// four stages of 2 BasicBlocks at 64/128/256/512 channels.
    case resnet18

    /// The residual layout, for the ResNets.
    public var residualStages: (stem: Int, stages: [(channels: Int, blocks: Int, stride: Int)])? {
        func cifar(_ depth: Int) -> (stem: Int, stages: [(channels: Int, blocks: Int, stride: Int)]) {
            let n = (depth - 2) / 6
            return (16, [(16, n, 1), (32, n, 2), (64, n, 2)])
        }
        switch self {
        case .convnet, .mlp: return nil
        case .resnet20: return cifar(20)
        case .resnet32: return cifar(32)
        case .resnet56: return cifar(56)
        case .resnet110: return cifar(110)
        case .resnet18: return (64, [(64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)])
        }
    }
}

/// A channel count scaled by `--width` (at least 1).
public func scaledChannels(_ channels: Int, width: Double) -> Int {
    max(1, Int((Double(channels) * width).rounded(.toNearestOrEven)))   // as Python's round()
}

/// Builds the residual networks, generically so that gradient checks can run them in Double.
public enum ResNet {
    /// The layers of a ResNet with torchvision's names: `conv1`, `bn1`, `relu`, `layerS.B`
    /// (BasicBlocks: `conv1`, `bn1`, `relu`, `conv2`, `bn2`, and `downsample.0`/`downsample.1`, a
    /// 1×1 conv and its norm, where the shape changes), `avgpool`, `fc`. `norm` makes the
    /// normalization that follows a convolution. Convolutions have no bias and torchvision's
    /// kaiming-normal (fan-out) initialisation; `fc` has PyTorch's default.
    /// torchvision's BasicBlock: conv3×3(stride)–norm–ReLU–conv3×3–norm, plus the identity, or a
    /// 1×1 conv(stride)–norm projection where the shape changes, then ReLU.
    public static func basicBlock<Scalar: TensorScalar>(
        inputChannels: Int, outputChannels: Int, stride: Int,
        norm: (Int, Conv2d<Scalar>) throws -> any Layer<Scalar>, firstNorm: ((Int, Conv2d<Scalar>) throws -> any Layer<Scalar>)? = nil,
        wrap: (Conv2d<Scalar>) -> any Layer<Scalar> = { $0 }, random: inout DeterministicRandom
    ) throws -> ResidualBlock<Scalar> {
        let conv1: Conv2d<Scalar> = convolution(inputChannels, outputChannels, kernel: 3, stride: stride, random: &random)
        let norm1 = try firstNorm.map { try $0(outputChannels, conv1) } ?? norm(outputChannels, conv1)
        let conv2: Conv2d<Scalar> = convolution(outputChannels, outputChannels, kernel: 3, stride: 1, random: &random)
        let norm2 = try norm(outputChannels, conv2)
        let residual = Sequential<Scalar>([("conv1", wrap(conv1)), ("bn1", norm1), ("relu", ReLU<Scalar>()),
                                           ("conv2", wrap(conv2)), ("bn2", norm2)])
        var shortcut: Sequential<Scalar>?
        if stride != 1 || inputChannels != outputChannels {
            let projection: Conv2d<Scalar> = convolution(inputChannels, outputChannels, kernel: 1, stride: stride, random: &random)
            shortcut = Sequential<Scalar>([("0", wrap(projection)), ("1", try norm(outputChannels, projection))])
        }
        return ResidualBlock<Scalar>(residual: residual, shortcut: shortcut)
    }

    static func convolution<Scalar: TensorScalar>(_ input: Int, _ output: Int, kernel: Int, stride: Int,
                                                  random: inout DeterministicRandom) -> Conv2d<Scalar> {
        Conv2d<Scalar>(inputChannels: input, outputChannels: output, kernelSize: kernel, stride: stride,
                       padding: kernel / 2, bias: false, initialization: .kaimingNormalFanOut, random: &random)
    }

    public static func layers<Scalar: TensorScalar>(
        stem: Int, stages: [(channels: Int, blocks: Int, stride: Int)], inputChannels: Int, classes: Int, width: Double,
        norm: (Int, Conv2d<Scalar>) throws -> any Layer<Scalar>,
        firstNormOfEarlyBlocks: ((Int, Conv2d<Scalar>) throws -> any Layer<Scalar>)? = nil,
        wrap: (Conv2d<Scalar>) -> any Layer<Scalar> = { $0 }, random: inout DeterministicRandom
    ) throws -> [(name: String, layer: any Layer<Scalar>)] {
        var channels = scaledChannels(stem, width: width)
        let stemConv: Conv2d<Scalar> = convolution(inputChannels, channels, kernel: 3, stride: 1, random: &random)
        var layers: [(name: String, layer: any Layer<Scalar>)] = [
            ("conv1", wrap(stemConv)), ("bn1", try norm(channels, stemConv)), ("relu", ReLU<Scalar>()),
        ]
        for (s, stage) in stages.enumerated() {
            let out = scaledChannels(stage.channels, width: width)
            for b in 0..<stage.blocks {
                layers.append(("layer\(s + 1).\(b)", try basicBlock(inputChannels: channels, outputChannels: out,
                                                                    stride: b == 0 ? stage.stride : 1, norm: norm,
                                                                    firstNorm: s < 3 ? firstNormOfEarlyBlocks : nil, wrap: wrap,
                                                                    random: &random)))
                channels = out
            }
        }
        layers.append(("avgpool", GlobalAvgPool<Scalar>()))
        layers.append(("fc", Linear<Scalar>(inputFeatures: channels, outputFeatures: classes, random: &random)))
        return layers
    }
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
    /// InstanceNorm (Ulyanov et al. 2016): per sample and channel over H×W, affine per channel,
    /// no running statistics (PyTorch's InstanceNorm2d(affine=True)) — GroupNorm with C groups.
    case `in`
    /// LayerNorm over C×H×W (Ba et al. 2016) with per-channel affine — GroupNorm with one group.
    case ln
    /// Weight normalization (w = g·v/‖v‖) of every conv/linear layer that would feed a norm, with a
    /// learned bias in place of the norm and the paper's data-dependent initialisation.
    case wn
    /// Weight normalization with the paper's mean-only BN (batch mean synced over the sync group,
    /// running mean for inference) in place of the norm.
    case wnMeanOnly = "wn-meanonly"
    /// IBN-Net's IBN-a (ResNets): in the first norm of every block of the first three stages, half
    /// the channels use InstanceNorm and the rest (Sync)BN over the sync group; elsewhere (Sync)BN.
    case ibn
    /// Moving Average BN (Yan et al. 2020): E[x²] and E[g·z] averaged over the last iterations,
    /// no centering, after weight-centralized convolutions; per rank unless a sync group is given.
    case mabn

    /// Statistics of each sample alone: no batch dependence, no collectives, no running statistics.
    public var isBatchFree: Bool { self == .gn || self == .in || self == .ln || self == .wn }

    /// Weight-normalized convolutions and linear layers.
    public var isWeightNormalized: Bool { self == .wn || self == .wnMeanOnly }

    /// Norms whose statistics span a sync group (all ranks by default; `--sync-group-size`).
    public var synchronizes: Bool { [.syncbn, .cbn, .brn, .rbn, .wnMeanOnly, .ibn].contains(self) }

    /// Norms that keep statistics per rank unless a sync group is given (`--sync-group-size`).
    public var synchronizesOnRequest: Bool { self == .mabn }
}

/// Cross-iteration BN's options (see `CrossIterationBatchNorm`).
public struct CrossIterationOptions: Codable, Equatable, Sendable {
    public var window: Int = 4
    public var rho: Double = 1
    public var burnIn: Int = 0
    public var gradient: CrossIterationGradient = .current
    public init(window: Int = 4, rho: Double = 1, burnIn: Int = 0, gradient: CrossIterationGradient = .current) {
        self.window = window
        self.rho = rho
        self.burnIn = burnIn
        self.gradient = gradient
    }

    // Configurations written before `gradient` existed read as `.current`, what they ran.
    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        window = try container.decode(Int.self, forKey: .window)
        rho = try container.decode(Double.self, forKey: .rho)
        burnIn = try container.decode(Int.self, forKey: .burnIn)
        gradient = try container.decodeIfPresent(CrossIterationGradient.self, forKey: .gradient) ?? .current
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
    /// GroupNorm by group width: channels per group (a layer narrower than that is one group).
    public var groupNormChannelsPerGroup: Int?
    /// Ghost batches (size, count per rank) for `bn`/`syncbn`; nil = the whole per-rank batch.
    public let ghost: (size: Int, count: Int)?
    /// InstanceNorm keeps running statistics for inference.
    public var instanceNormRunningStatistics = false
    /// ShuffleBN: per-rank BN on samples shuffled over this group, with this seed.
    public var shuffle: (group: any Communicator, seed: UInt64)?
    /// Domain-specific BN with this many domains (for `bn` and `syncbn`).
    public var domainCount: Int?
    /// Moving Average BN's window, warm-up and renormalization hold (iterations).
    public var movingAverage = (window: 1, warmup: 100, renormHold: 1000)
    /// FrozenBN from this training step on, for every BN layer.
    public var freezeAfterStep: Int?
    /// Batch Renormalization's schedule of its clips.
    public var batchRenormSchedule = BatchRenormalization<Float>.Schedule()

    /// The factory of a run's configuration, with the group synchronized norms share (nil: per
    /// rank). Domain-specific BN's domain count comes from the data (``domainCount``).
    public init(configuration c: TrainingConfiguration, group: (any Communicator)?) throws {
        self.init(kind: c.norm, group: group, epsilon: c.bnEpsilon, momentum: c.bnMomentum, crossIteration: c.crossIteration,
                  groupNormGroups: c.gnGroups,
                  ghost: c.ghostBatchSize.map { size in (size, (c.batchSize + size - 1) / size) })
        instanceNormRunningStatistics = c.inTrackRunningStats
        groupNormChannelsPerGroup = c.gnChannelsPerGroup
        if c.shuffleBN { shuffle = group.map { ($0, c.seed) } }
        freezeAfterStep = c.freezeBNAfter
        batchRenormSchedule = c.brnSchedule
        movingAverage = (c.mabnWindow, c.mabnWarmup, c.mabnRenormHold)
    }

    /// Hands the run's schedules to the BN layers inside `layer`.
    func scheduled(_ layer: any Layer<Float>) -> any Layer<Float> {
        func configure(_ bn: BatchNorm<Float>) {
            bn.freezeAfterStep = freezeAfterStep
            (bn as? BatchRenormalization<Float>)?.schedule = batchRenormSchedule
        }
        if let bn = layer as? BatchNorm<Float> { configure(bn) }
        if let rbn = layer as? RepresentativeBatchNorm<Float> { configure(rbn.normalization) }
        if let container = layer as? any LayerContainer<Float> {
            for (_, child) in leafLayers(container.children) { if let bn = child as? BatchNorm<Float> { configure(bn) } }
        }
        return layer
    }

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

    /// IBN-a's first norm of a block: InstanceNorm on the first half of the channels, (Sync)BN
    /// over the group on the rest.
    public func makeInstanceBatchNorm(featureCount: Int) throws -> any Layer<Float> {
        guard featureCount >= 2 else { throw LayerError("⟨norm⟩ ibn needs blocks of at least 2 channels, got \(featureCount) (raise ⟨width⟩)") }
        return scheduled(InstanceBatchNorm<Float>(featureCount: featureCount, batchNorm: { channels in
            group.map { SyncBatchNorm<Float>(featureCount: channels, epsilon: epsilon, momentum: momentum, synchronizing: $0) }
                ?? BatchNorm<Float>(featureCount: channels, epsilon: epsilon, momentum: momentum)
        }, epsilon: epsilon))
    }

    /// The layer that computes a norm's input: `layer` itself, or weight-normalized for `wn` and
    /// `wn-meanonly`.
    public func wrap<Source: Layer & PatchSource>(_ layer: Source) -> any Layer<Float> where Source.Scalar == Float {
        if kind == .mabn { return WeightCentering<Float, Source>(layer) }
        return kind.isWeightNormalized ? WeightNorm<Float, Source>(layer) : layer
    }

    /// A normalization layer for the output of `source` (whose weight cross-iteration BN
    /// differentiates its statistics by).
    public func make(featureCount: Int, source: any PatchSource<Float>) throws -> any Layer<Float> {
        scheduled(try makeLayer(featureCount: featureCount, source: source))
    }

    func makeLayer(featureCount: Int, source: any PatchSource<Float>) throws -> any Layer<Float> {
        if let ghost, kind == .bn || kind == .syncbn {
            return GhostBatchNorm<Float>(featureCount: featureCount, ghostBatchSize: ghost.size, ghostCount: ghost.count,
                                         epsilon: epsilon, momentum: momentum, group: kind == .syncbn ? group : nil)
        }
        if let domainCount, kind == .bn || kind == .syncbn {
            return DomainBatchNorm<Float>(featureCount: featureCount, domainCount: domainCount, epsilon: epsilon, momentum: momentum,
                                          group: kind == .syncbn ? group : nil)
        }
        switch kind {
        case .mabn:
            return MovingAverageBatchNorm<Float>(featureCount: featureCount, window: movingAverage.window, warmup: movingAverage.warmup,
                                                 renormHold: movingAverage.renormHold, epsilon: epsilon, group: group)
        case .rbn:
            return RepresentativeBatchNorm<Float>(featureCount: featureCount, epsilon: epsilon, momentum: momentum, group: group)
        case .brn:
            return BatchRenormalization<Float>(featureCount: featureCount, epsilon: epsilon, momentum: momentum, group: group)
        case .in:
            return GroupNorm<Float>(featureCount: featureCount, groups: featureCount, epsilon: epsilon,
                                    trackRunningStatistics: instanceNormRunningStatistics ? (momentum ?? 0.1) : nil)
        case .ln:
            return GroupNorm<Float>(featureCount: featureCount, groups: 1, epsilon: epsilon)
        case .gn:
            if let width = groupNormChannelsPerGroup {
                guard featureCount <= width || featureCount % width == 0 else {
                    throw LayerError("\(width) channels per group do not divide a layer's \(featureCount) channels")
                }
                return GroupNorm<Float>(featureCount: featureCount, groups: max(1, featureCount / width), epsilon: epsilon)
            }
            let groups = min(groupNormGroups, featureCount)
            guard featureCount % groups == 0 else {
                throw LayerError("⟨gnGroups⟩ \(groupNormGroups) does not divide a layer's \(featureCount) channels")
            }
            return GroupNorm<Float>(featureCount: featureCount, groups: groups, epsilon: epsilon)
        case .cbn:
            return CrossIterationBatchNorm<Float>(featureCount: featureCount, source: source, window: crossIteration.window,
                                                  rho: crossIteration.rho, burnIn: crossIteration.burnIn, gradient: crossIteration.gradient,
                                                  epsilon: epsilon, momentum: momentum, group: group)
        case .wn:
            return ChannelBias<Float>(featureCount: featureCount)
        case .wnMeanOnly:
            return MeanOnlyBatchNorm<Float>(featureCount: featureCount, momentum: momentum ?? 0.1, group: group)
        case .bn:
            if let shuffle {
                return ShuffleBatchNorm<Float>(featureCount: featureCount, shuffleGroup: shuffle.group, seed: shuffle.seed,
                                               epsilon: epsilon, momentum: momentum)
            }
            return BatchNorm<Float>(featureCount: featureCount, epsilon: epsilon, momentum: momentum)
        case .syncbn, .ibn:
            guard let group else { return BatchNorm<Float>(featureCount: featureCount, epsilon: epsilon, momentum: momentum) }
            return SyncBatchNorm<Float>(featureCount: featureCount, epsilon: epsilon, momentum: momentum, synchronizing: group)
        }
    }
}

extension Network {
    /// A model for samples of `sampleShape` ([C, H, W], or [F] for the MLP) and `classes`
    /// classes, initialised from `seed` (identically on every rank).
    public static func make(_ kind: ModelKind, sampleShape: [Int], classes: Int, normalization: NormalizationFactory,
                            width: Double = 1, seed: UInt64) throws -> Network {
        var random = DeterministicRandom(seed: seed, stream: [0x4D4F_4445_4C])
        if let (stem, stages) = kind.residualStages {
            guard sampleShape.count == 3 else {
                throw LayerError("model \(kind.rawValue) needs C×H×W samples, the data has samples of shape \(sampleShape); use ⟨model⟩ mlp")
            }
            return Network(layers: try ResNet.layers(stem: stem, stages: stages, inputChannels: sampleShape[0], classes: classes,
                                                     width: width, norm: { try normalization.make(featureCount: $0, source: $1) },
                                                     firstNormOfEarlyBlocks: normalization.kind == .ibn
                                                         ? { channels, _ in try normalization.makeInstanceBatchNorm(featureCount: channels) } : nil,
                                                     wrap: { normalization.wrap($0) }, random: &random))
        }
        if normalization.kind == .ibn {
            throw LayerError("⟨norm⟩ ibn (IBN-Net's IBN-a blocks) is for the ResNets; use ⟨model⟩ resnet20 (or another ResNet)")
        }
        switch kind {
        case .resnet20, .resnet32, .resnet56, .resnet110, .resnet18:
            preconditionFailure("residual models are built above")
        case .convnet:
            guard sampleShape.count == 3 else {
                throw LayerError("model convnet needs C×H×W samples, the data has samples of shape \(sampleShape); use ⟨model⟩ mlp")
            }
            let widths = [16, 32, 64].map { scaledChannels($0, width: width) }
            var layers: [(name: String, layer: any Layer<Float>)] = []
            var channels = sampleShape[0]
            for (i, width) in widths.enumerated() {
                let conv = Conv2d<Float>(inputChannels: channels, outputChannels: width, kernelSize: 3,
                                         stride: i == 0 ? 1 : 2, padding: 1, bias: false, random: &random)
                layers.append(("features.\(i).conv", normalization.wrap(conv)))
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
            let units = scaledChannels(128, width: width)
            for i in 0..<2 {
                let linear = Linear<Float>(inputFeatures: features, outputFeatures: units, bias: false, random: &random)
                layers.append(("features.\(i).linear", normalization.wrap(linear)))
                layers.append(("features.\(i).bn", try normalization.make(featureCount: units, source: linear)))
                layers.append(("features.\(i).relu", ReLU<Float>()))
                features = units
            }
            layers.append(("classifier", Linear<Float>(inputFeatures: features, outputFeatures: classes, random: &random)))
            return Network(layers: layers)
        }
    }
}
