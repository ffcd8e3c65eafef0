import Foundation
import Kernels
import Normalization

/// Everything that defines a training run; stored as JSON in checkpoint metadata.
public struct TrainingConfiguration: Codable, Equatable, Sendable {
    public var data: String = DataSource.defaultSynthetic.description
    public var evalData: String?
    public var heldOutFraction: Double = 0.1
    /// Train on the first this many training samples only (nil = all).
    public var trainSamples: Int?
    /// Evaluate on the first this many held-out samples only (nil = all).
    public var evalSamples: Int?
    public var model: ModelKind = .convnet
    public var norm: NormalizationKind = .syncbn
    /// Consecutive ranks that share batch statistics; nil = all ranks.
    public var syncGroupSize: Int?
    /// Per-rank batch size.
    public var batchSize: Int = 32
    public var epochs: Int = 6
    /// Total optimizer steps; overrides `epochs` when set.
    public var steps: Int?
    /// The learning rate at the reference batch (`lrReferenceBatch`); with no reference batch,
    /// the peak rate itself.
    public var learningRate: Double = 0.1
    /// Linear scaling rule: the peak rate is `learningRate` × total batch / this. nil = no scaling.
    public var lrReferenceBatch: Int? = 128
    public var lrSchedule: LearningRateSchedule = .cosine
    /// `.step`: epochs at which the rate is multiplied by 0.1.
    public var lrMilestones: [Double] = []
    /// Linear warm-up length; at most one of the two is set. Neither: one epoch, at most a tenth of the run.
    public var warmupEpochs: Double?
    public var warmupSteps: Int?
    /// Channel-count multiplier of every layer.
    public var width: Double = 1
    /// Training-time augmentation; resolved from the data source when the run starts.
    public var augmentation = Augmentation()
    public var momentum: Double = 0.9
    public var weightDecay: Double = 5e-4
    public var bnMomentum: Double = 0.1
    public var bnEpsilon: Double = 1e-5
    /// Cross-iteration BN's window, rho and burn-in (used with `norm == .cbn`).
    public var crossIteration = CrossIterationOptions()
    /// Batch Renormalization's final clips (`norm == .brn`), reached by ``brnLimits(step:totalSteps:)``.
    public var brnRMax: Double = 3
    public var brnDMax: Double = 5
    /// Batch Renormalization's warm-up: the fraction of the steps trained as plain BN before r and
    /// d are relaxed (nil: 3 %).
    public var brnWarmup: Double?
    /// Moving Average BN (`norm == .mabn`): iterations averaged, warm-up iterations of batch
    /// statistics, and iterations with the renormalization r held at 1 (the reference's 1000).
    public var mabnWindow: Int = 4
    public var mabnWarmup: Int = 100
    public var mabnRenormHold: Int = 1000
    /// GroupNorm's groups per layer (`norm == .gn`).
    public var gnGroups: Int = 8
    /// GroupNorm by group width instead: this many channels per group in every layer (nil: by
    /// ``gnGroups``).
    public var gnChannelsPerGroup: Int?
    /// Ghost batch size for `bn`/`syncbn` (nil = the whole per-rank batch).
    public var ghostBatchSize: Int?
    /// From this step on, BN layers normalize with their population statistics (FrozenBN).
    public var freezeBNAfter: Int?
    public var seed: UInt64 = 0
    /// Evaluate every this many steps (0 = only at the end).
    public var evalEvery: Int = 0
    public var evalBatchSize: Int = 256
    /// Which running statistics evaluations use.
    public var evalStats: EvaluationStatistics = .both
    /// PreciseBN's sample budget over all ranks.
    public var preciseBNSamples: Int = 8192
    /// PreciseBN's per-rank batch size; nil = `batchSize`.
    public var preciseBNBatchSize: Int?
    /// Gradients are all-reduced in buckets of at least this many values, each started (without
    /// blocking) as soon as backward has produced it.
    public var gradientBucketSize: Int = 1 << 16
    /// Log a metrics line every this many steps.
    public var logEvery: Int = 10
    /// With every metrics line, a `diagnostics` line: per normalization layer the norms of γ and
    /// of the feeding layer's weight and weight gradient, and cross-iteration BN's window
    /// measurements (rank 0's view).
    public var normalizationDiagnostics = false
    /// InstanceNorm (`norm == .in`) keeps running statistics and uses them for inference.
    public var inTrackRunningStats = false
    /// Per-rank BN (`norm == .bn`) on samples shuffled across the ranks of each sync group (MoCo's ShuffleBN).
    public var shuffleBN = false
    /// BN and SyncBN keep statistics per domain of the data (domain-specific BN).
    public var domainBN = false
    /// How each global batch is cut into the ranks' batches.
    public var sampler: SamplerKind = .random
    /// The Float convolutions' backend: im2col by default here (a run is reproducible without
    /// naming one; runs stored without this setting used im2col); the command line's default is
    /// `auto` (each convolution keeps the faster of im2col and oneDNN, timed at start-up).
    public var convBackend: ConvolutionBackendSetting = .all(.im2col)
    /// Samples per leaf of every convolution's weight-gradient tree (``Conv2d/weightGradientLeaf``):
    /// 1, every sample its own leaf, is exact for any split of the batch; a larger power of two
    /// must divide the per-rank batch, and then W ranks × b is bit-identical to 1 × W·b for every
    /// W whose per-rank batch it divides (a short last batch of an epoch uses leaves of 1 samples
    /// on every layout alike).
    public var weightGradientLeaf: Int = 1

    public init() {}
}

/// How a global batch is divided between the ranks.
public enum SamplerKind: String, Codable, CaseIterable, Sendable {
    /// Contiguous pieces of the randomly ordered global batch.
    case random
    /// The global batch ordered by label first: each rank's batch holds as few classes as
    /// possible, so per-rank statistics carry label information (the leakage experiment).
    case classSorted = "class-sorted"
}

/// The statistics an evaluation normalizes with.
public enum EvaluationStatistics: String, Codable, CaseIterable, Sendable {
    /// The running (EMA) statistics kept during training.
    case ema
    /// Population statistics recomputed by PreciseBN before evaluating.
    case precise
    /// Both, reported side by side.
    case both
}

extension TrainingConfiguration {
    /// The data this configuration names, loaded, cut to `trainSamples`/`evalSamples` and standardized.
    public func loadData() throws -> DataSplit {
        try DataSource.split(try DataSource(parsing: data), evaluation: try evalData.map(DataSource.init(parsing:)),
                             heldOutFraction: heldOutFraction, trainLimit: trainSamples, evalLimit: evalSamples)
    }
}

extension TrainingConfiguration {
    /// Batch Renormalization's schedule (``BatchRenormalization/Schedule``) with this run's clips
    /// and warm-up.
    public var brnSchedule: BatchRenormalization<Float>.Schedule {
        .init(rMax: brnRMax, dMax: brnDMax, warmup: brnWarmup ?? 0.03)
    }

    public func brnLimits(step: Int, totalSteps: Int) -> (rMax: Double, dMax: Double) {
        brnSchedule.limits(step: step, of: totalSteps)
    }
}

extension TrainingConfiguration {
    /// Checks every value as the command line does, so that a configuration read from a
    /// checkpoint (or built in code) with, say, a batch size of 0 is a clear error, not a crash.
    /// Returns the first problem, naming the flag.
    public func problem() -> String? {
        func outside<T: Comparable>(_ value: T, _ range: ClosedRange<T>, _ flag: String) -> String? {
            range.contains(value) ? nil : "\(flag) must be between \(range.lowerBound) and \(range.upperBound), got \(value)"
        }
        let checks: [String?] = [
            outside(batchSize, 1...(1 << 20), "⟨batchSize⟩"),
            outside(epochs, 1...1_000_000, "⟨epochs⟩"),
            steps.flatMap { outside($0, 1...1_000_000_000, "⟨steps⟩") },
            learningRate.isFinite && learningRate > 0 ? nil : "⟨learningRate⟩ must be a positive number, got \(learningRate)",
            momentum.isFinite && momentum >= 0 && momentum < 1 ? nil : "⟨momentum⟩ must be in [0, 1), got \(momentum)",
            weightDecay.isFinite && weightDecay >= 0 ? nil : "⟨weightDecay⟩ must be ≥ 0, got \(weightDecay)",
            bnMomentum.isFinite && bnMomentum > 0 && bnMomentum <= 1 ? nil : "⟨bnMomentum⟩ must be in (0, 1], got \(bnMomentum)",
            bnEpsilon.isFinite && bnEpsilon > 0 ? nil : "BN epsilon must be positive, got \(bnEpsilon)",
            heldOutFraction > 0 && heldOutFraction < 1 ? nil : "⟨heldOutFraction⟩ must be in (0, 1), got \(heldOutFraction)",
            syncGroupSize.flatMap { outside($0, 1...(1 << 20), "⟨syncGroupSize⟩") },
            trainSamples.flatMap { outside($0, 2...(1 << 31), "⟨trainSamples⟩") },
            evalSamples.flatMap { outside($0, 1...(1 << 31), "⟨evalSamples⟩") },
            outside(crossIteration.window, 1...64, "⟨crossIteration.window⟩"),
            crossIteration.rho.isFinite && (0...10).contains(crossIteration.rho) ? nil : "⟨crossIteration.rho⟩ must be between 0 and 10, got \(crossIteration.rho)",
            outside(crossIteration.burnIn, 0...Int.max / 2, "⟨crossIteration.burnIn⟩"),
            brnRMax.isFinite && (1...100).contains(brnRMax) ? nil : "⟨brnRMax⟩ must be between 1 and 100, got \(brnRMax)",
            brnDMax.isFinite && (0...100).contains(brnDMax) ? nil : "⟨brnDMax⟩ must be between 0 and 100, got \(brnDMax)",
            outside(gnGroups, 1...(1 << 20), "⟨gnGroups⟩"),
            outside(mabnWindow, 1...1024, "⟨mabnWindow⟩"),
            outside(mabnWarmup, 0...Int.max / 2, "⟨mabnWarmup⟩"),
            outside(mabnRenormHold, 0...Int.max / 2, "⟨mabnRenormHold⟩"),
            gnChannelsPerGroup.flatMap { outside($0, 1...(1 << 20), "⟨gnChannelsPerGroup⟩") },
            brnWarmup.flatMap { $0.isFinite && (0...0.99).contains($0) ? nil : "⟨brnWarmup⟩ must be a fraction of the run in [0, 0.99], got \($0)" },
            ghostBatchSize.flatMap { outside($0, 1...(1 << 20), "⟨ghostBatchSize⟩") },
            freezeBNAfter.flatMap { outside($0, 0...Int.max / 2, "⟨freezeBNAfter⟩") },
            outside(evalEvery, 0...Int.max / 2, "⟨evalEvery⟩"),
            outside(evalBatchSize, 1...(1 << 20), "evaluation batch size"),
            outside(preciseBNSamples, 2...(1 << 30), "⟨preciseBNSamples⟩"),
            preciseBNBatchSize.flatMap { outside($0, 1...(1 << 20), "⟨preciseBNBatchSize⟩") },
            outside(gradientBucketSize, 1...Int.max / 2, "⟨gradientBucketSize⟩"),
            outside(logEvery, 1...Int.max / 2, "⟨logEvery⟩"),
            lrReferenceBatch.flatMap { outside($0, 1...(1 << 30), "⟨lrReferenceBatch⟩") },
            lrMilestones.allSatisfy { $0.isFinite && $0 >= 0 } ? nil : "⟨lrMilestones⟩ must be epochs ≥ 0",
            warmupEpochs.flatMap { $0.isFinite && $0 >= 0 && $0 <= 1e6 ? nil : "⟨warmupEpochs⟩ must be between 0 and 1e6, got \($0)" },
            warmupSteps.flatMap { outside($0, 0...Int.max / 2, "⟨warmupSteps⟩") },
            width.isFinite && width > 0 && width <= 64 ? nil : "⟨width⟩ must be in (0, 64], got \(width)",
            outside(augmentation.padding, 0...64, "⟨augmentation.padding⟩"),
            (1...64).contains(weightGradientLeaf) && weightGradientLeaf & (weightGradientLeaf - 1) == 0 ? nil
                : "⟨weightGradientLeaf⟩ must be a power of two between 1 and 64, got \(weightGradientLeaf)",
        ]
        return checks.compactMap { $0 }.first.map { SettingNames.render($0) }
    }
}

/// A JSON encoder with sorted keys: the same configuration is the same bytes in every file.
public func sortedJSONEncoder() -> JSONEncoder {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys]
    return encoder
}

extension TrainingConfiguration {
    /// A configuration stored by this or an earlier version (checkpoint metadata): fields the
    /// stored JSON lacks — settings added since — take their defaults, which are what that
    /// version ran.
    public static func decoding(json text: String) throws -> TrainingConfiguration {
        guard let stored = try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any],
              let defaults = try JSONSerialization.jsonObject(with: try sortedJSONEncoder().encode(TrainingConfiguration())) as? [String: Any] else {
            throw DataError("the stored configuration is not a JSON object")
        }
        func merged(_ base: [String: Any], _ over: [String: Any]) -> [String: Any] {
            var result = base
            for (key, value) in over {
                if let inner = value as? [String: Any], let baseInner = base[key] as? [String: Any] {
                    result[key] = merged(baseInner, inner)
                } else {
                    result[key] = value
                }
            }
            return result
        }
        let data = try JSONSerialization.data(withJSONObject: merged(defaults, stored))
        return try JSONDecoder().decode(TrainingConfiguration.self, from: data)
    }
}

extension TrainingConfiguration {
    /// Settings that do not change the training trajectory (what is evaluated, logged or
    /// measured, and how gradients are bucketed, which changes no bit): a resume may change them
    /// freely. Every other setting is part of the run.
    public static let outsideTheTrajectory: Set<String> = [
        "evalData", "evalSamples", "evalEvery", "evalBatchSize", "evalStats", "logEvery", "normalizationDiagnostics",
        "gradientBucketSize", "preciseBNSamples", "preciseBNBatchSize",
        // The backend changes no formula, only how the last bits round; `auto` on a resume keeps
        // the checkpoint's backends, so a resumed run stays bit-identical.
        "convBackend",
    ]

    /// The first setting in which `other` would continue this run differently, as "⟨field⟩ was A,
    /// now B" (nil when none does). The per-rank batch may differ when the global batch is the
    /// same (`ranks` and `otherRanks`, when known): that is the same run on another number of ranks.
    public func trajectoryDifference(from other: TrainingConfiguration, ranks: Int? = nil, otherRanks: Int? = nil,
                                     allowing allowed: Set<String> = []) -> String? {
        trajectoryDifferences(from: other, ranks: ranks, otherRanks: otherRanks).first { !allowed.contains($0.field) }?.text
    }

    /// Which samples one normalization's batch statistics are computed over, in a training step.
    /// Two runs with the same global batch and the same groups are one trajectory on different
    /// numbers of ranks (the exactness contract makes them bit-identical where it holds).
    public enum StatisticsGroups: Equatable, Sendable {
        /// No statistics over samples (GN, LN, IN, WN): any split of the batch.
        case none
        /// Consecutive runs of this many samples of the global batch, aligned to its start.
        case consecutive(Int)
        /// Groups that depend on how the samples sit on the ranks (ShuffleBN's exchange, ghost
        /// batches across a sync group, a ghost batch that does not divide the per-rank batch).
        case placement(ranks: Int, batchSize: Int)

        var text: String {
            switch self {
            case .none: return "no batch statistics"
            case .consecutive(let n): return "statistics over \(n) consecutive samples"
            case let .placement(ranks, batchSize): return "statistics over groups laid out by \(ranks) rank(s) × \(batchSize)"
            }
        }
    }

    /// The statistics groups of this run on `ranks` ranks.
    public func statisticsGroups(ranks: Int) -> StatisticsGroups {
        if norm.isBatchFree { return .none }
        let synced = norm.synchronizes || (norm.synchronizesOnRequest && syncGroupSize != nil)
        let group = synced ? min(syncGroupSize ?? ranks, ranks) : 1
        if shuffleBN && ranks > 1 && min(syncGroupSize ?? ranks, ranks) > 1 { return .placement(ranks: ranks, batchSize: batchSize) }
        if let ghost = ghostBatchSize, norm == .bn || norm == .syncbn {
            if group == 1 && batchSize % ghost == 0 { return .consecutive(ghost) }
            return .placement(ranks: ranks, batchSize: batchSize)
        }
        return .consecutive(group * batchSize)
    }

    /// Every setting's field path (`batchSize`, `crossIteration.window`), from the defaults.
    public static var settingFields: [String] {
        func fields(_ value: Any, _ prefix: String) -> [String] {
            Mirror(reflecting: value).children.flatMap { child -> [String] in
                guard let label = child.label else { return [] }
                let path = prefix.isEmpty ? label : prefix + "." + label
                if child.value is CrossIterationOptions || child.value is Augmentation { return fields(child.value, path) }
                return [path]
            }
        }
        return fields(TrainingConfiguration(), "")
    }

    /// Every setting in which `other` differs from this run's trajectory, in field order.
    public func trajectoryDifferences(from other: TrainingConfiguration, ranks: Int? = nil,
                                      otherRanks: Int? = nil, includingEqual: Bool = false) -> [(field: String, text: String)] {
        func flattened(_ c: TrainingConfiguration) -> [String: String] {
            guard let data = try? sortedJSONEncoder().encode(c), let object = try? JSONSerialization.jsonObject(with: data) else { return [:] }
            var out: [String: String] = [:]
            func walk(_ value: Any, _ path: String) {
                if let dictionary = value as? [String: Any] {
                    for (key, inner) in dictionary { walk(inner, path.isEmpty ? key : path + "." + key) }
                } else if let data = try? JSONSerialization.data(withJSONObject: [value], options: [.sortedKeys]) {
                    out[path] = String(decoding: data.dropFirst().dropLast(), as: UTF8.self)
                }
            }
            walk(object, "")
            return out
        }
        let mine = flattened(self), theirs = flattened(other)
        var differences: [(field: String, text: String)] = []
        for field in Set(mine.keys).union(theirs.keys).sorted() where !Self.outsideTheTrajectory.contains(field.split(separator: ".").first.map(String.init) ?? field) {
            let a = mine[field] ?? "unset", b = theirs[field] ?? "unset"
            guard a != b || includingEqual else { continue }
            if field == "batchSize", let ranks, let otherRanks, batchSize * ranks == other.batchSize * otherRanks {
                let mine = statisticsGroups(ranks: ranks), theirs = other.statisticsGroups(ranks: otherRanks)
                if mine == theirs { continue }
                differences.append((field, "⟨\(field)⟩ was \(a) on \(ranks) rank(s), now \(b) on \(otherRanks): the same global batch, but \(mine.text) would become \(theirs.text)"))
                continue
            }
            differences.append((field, "⟨\(field)⟩ was \(a), now \(b)"))
        }
        return differences
    }
}
