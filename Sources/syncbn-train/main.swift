import ArgumentParser
import Collectives
import CollectivesMPI
import Foundation
import CommandSupport
import Kernels
import Normalization
import Training

/// `syncbn-train`: data-parallel training with synchronized batch normalization.
struct SyncBNTrain: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "syncbn-train",
        abstract: "Train a CNN data-parallel over MPI with batch statistics shared across ranks.",
        discussion: """
        Run under mpirun for several processes (mpirun -n 4 syncbn-train), plainly for one, or with \
        --simulate-ranks N for N ranks as threads of one process. With no options it trains the default \
        convnet with SyncBN on the built-in synthetic data set.
        """,
        subcommands: [Train.self, Evaluate.self, RecomputeStats.self, ExportFolded.self, ExportTorch.self],
        defaultSubcommand: Train.self)
}

struct Train: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "train", abstract: "Train a model (the default subcommand).")

    @Option(help: "Training data: synthetic[:train=N,heldout=N,seed=S], fashion-mnist[:DIR], idx:IMAGES,LABELS (plain or .gz), cifar10:DIR, npy:X,Y[,DOMAINS] or two-domain:SOURCE (SOURCE plus an intensity-inverted copy as domain 1).")
    var data: String = DataSource.defaultSynthetic.description
    @Option(help: "Held-out data for evaluation (same forms as --data); default: the source's test set or the last --holdout-fraction.")
    var evalData: String?
    @Option(parsing: .unconditional, help: "Fraction of --data held out for evaluation when the source has no test set.")
    var holdoutFraction: Double = 0.1
    @Option(parsing: .unconditional, help: "Train on the first N training samples only (a fixed subset, e.g. for studies).")
    var trainSamples: Int?
    @Option(parsing: .unconditional, help: "Evaluate on the first N held-out samples only.")
    var evalSamples: Int?
    @Option(help: "Model: convnet (3 × conv 3×3 → norm → ReLU, 16/32/64 channels, stride 1/2/2, global average pool, linear), mlp (2 × linear → norm → ReLU, 128 units, linear), or the ResNets resnet20, resnet32, resnet56, resnet110 (CIFAR) and resnet18 (torchvision).")
    var model: String = ModelKind.convnet.rawValue
    @Option(parsing: .unconditional, help: "Multiplies every layer's channel count (e.g. 0.5, 2; rounded to nearest, ties to even, at least 1).")
    var width: Double = 1
    @Option(help: "Normalization: bn (per-rank statistics, no collectives), syncbn (statistics over each sync group), cbn (cross-iteration BN over each sync group), gn (GroupNorm), in (InstanceNorm), ln (LayerNorm), brn (Batch Renormalization), rbn (Representative BN), wn (weight normalization with a bias), wn-meanonly (weight normalization with mean-only BN) or ibn (IBN-Net's IBN-a, ResNets only); brn, rbn, wn-meanonly and ibn sync over the sync group.")
    var norm: String = NormalizationKind.syncbn.rawValue
    @Option(parsing: .unconditional, help: "Consecutive ranks that share batch statistics under syncbn, cbn, brn, rbn, wn-meanonly and ibn (1 = per rank; default: all ranks; must divide the ranks); 'node': the ranks of each host (statistics stay inside a machine, gradients cross machines).")
    var syncGroupSize: String?
    @Option(parsing: .unconditional, help: "Samples per rank per step.")
    var batchSize: Int = 32
    @Option(parsing: .unconditional, help: "Passes over the training set (ignored when --steps is given).")
    var epochs: Int = 6
    @Option(parsing: .unconditional, help: "Total optimizer steps (overrides --epochs).")
    var steps: Int?
    @Option(parsing: .unconditional, help: "SGD learning rate (PyTorch's formulation) at the reference batch (--lr-reference-batch); the peak of the schedule.")
    var lr: Double = 0.1
    @Option(help: "Linear scaling rule: the peak rate is --lr × (ranks × --batch-size) / this ('none': --lr as given).")
    var lrReferenceBatch: String = "128"
    @Option(help: "Learning-rate schedule after warm-up: constant, step (×0.1 at each --lr-milestones epoch) or cosine (to 0 at the end).")
    var lrSchedule: String = LearningRateSchedule.cosine.rawValue
    @Option(help: "Epochs at which the step schedule multiplies the rate by 0.1, comma-separated (e.g. 100,150).")
    var lrMilestones: String?
    @Option(parsing: .unconditional, help: "Linear warm-up over this many epochs: step t (from 0) runs at peak·(t+1)/N for N warm-up steps (default: 1 epoch, at most a tenth of the run).")
    var warmupEpochs: Double?
    @Option(parsing: .unconditional, help: "Linear warm-up over this many steps (instead of --warmup-epochs).")
    var warmupSteps: Int?
    @Option(help: "Augmentation: auto (crop,flip for fashion-mnist and cifar10, none otherwise), crop,flip, crop, flip or none.")
    var augment: String = "auto"
    @Option(parsing: .unconditional, help: "Padding with a black pixel before the random crop, in pixels (default: 2 for images up to 28×28, else 4).")
    var pad: Int?
    @Option(parsing: .unconditional, help: "SGD momentum.")
    var momentum: Double = 0.9
    @Option(parsing: .unconditional, help: "Weight decay (L2, applied to every parameter as PyTorch's SGD).")
    var weightDecay: Double = 5e-4
    @Option(parsing: .unconditional, help: "Momentum of the BN running statistics.")
    var bnMomentum: Double = 0.1
    @Option(parsing: .unconditional, help: "Seed for initialisation and the sampling order.")
    var seed: UInt64 = 0
    @Option(parsing: .unconditional, help: "Evaluate on the held-out set every N steps (0: only at the end).")
    var evalEvery: Int = 0
    @Option(help: "Write JSON-lines metrics to this file (rank 0); a resumed run appends to it.")
    var metrics: String?
    @Flag(help: "Replace an existing --metrics file when not resuming (otherwise that is an error).")
    var overwriteMetrics = false
    @Option(help: "Save a safetensors checkpoint here at the end (rank 0, atomic).")
    var save: String?
    @Option(parsing: .unconditional, help: "Also save the --save checkpoint every N steps (atomically: a crash leaves the previous checkpoint).")
    var saveEvery: Int?
    @Option(help: "Resume from a checkpoint written by --save; 'auto': from --save's file when it exists, else start fresh.")
    var resume: String?
    @Option(parsing: .unconditional, help: "Run N ranks as threads of this process instead of under mpirun.")
    var simulateRanks: Int?
    @Flag(help: "Resume a cross-iteration BN checkpoint written by another number of ranks, with every window empty.")
    var resetCbnWindows = false
    @Flag(help: "Debugging: before every collective, check that all ranks issue the same operation, size and sequence number, and name the first divergence.")
    var checkCollectives = false
    @Option(parsing: .unconditional, help: "End the job (exit 3) when a collective has waited this many seconds (a stopped, dead or diverging rank), naming the collective and the step.")
    var collectiveTimeout: Double = 600
    @Option(parsing: .unconditional, help: "Log a metrics line every N steps.")
    var logEvery: Int = 10
    @Option(parsing: .unconditional, help: "Batch Renorm: final clip of r (reached by 28% of the steps after a 3% plain-BN warm-up).")
    var brnRmax: Double = 3
    @Option(parsing: .unconditional, help: "Batch Renorm: final clip of |d| (reached by 19% of the steps).")
    var brnDmax: Double = 5
    @Option(parsing: .unconditional, help: "Ghost BN: normalize each rank's batch in ghost batches of this size (with --norm bn or syncbn; with a sync group, ghost batch j of every rank of the group together).")
    var ghostBatchSize: Int?
    @Option(parsing: .unconditional, help: "GroupNorm: channel groups per layer (capped at the layer's channels).")
    var gnGroups: Int = 8
    @Option(parsing: .unconditional, help: "FrozenBN: from this step on, BN layers use their population statistics (no batch statistics, no updates, no collectives).")
    var freezeBnAfter: Int?
    @Option(parsing: .unconditional, help: "Gradient values per all-reduce bucket; buckets start during backward.")
    var bucketSize: Int = 1 << 16
    @Option(help: "Statistics for evaluation: ema (running averages), precise (PreciseBN) or both.")
    var evalStats: String = EvaluationStatistics.both.rawValue
    @OptionGroup var precise: PreciseBNOptions
    @Option(parsing: .unconditional, help: "Cross-iteration BN: iterations in the window, the current one included.")
    var cbnWindow: Int = 4
    @Option(parsing: .unconditional, help: "Cross-iteration BN: scale of the Taylor compensation (0 = naive averaging).")
    var cbnRho: Double = 1
    @Option(parsing: .unconditional, help: "Cross-iteration BN: steps of plain SyncBN before the window is used.")
    var cbnBurnin: Int = 0
    @Option(help: "Cross-iteration BN: where gradients flow: current (the current batch's statistics only, as the reference code) or compensated (also through the current weight in the Taylor term).")
    var cbnGradient: String = CrossIterationGradient.current.rawValue
    @Flag(help: "InstanceNorm: keep running statistics (the batch average of the instances' means and unbiased variances) and normalize with them at inference, as PyTorch's InstanceNorm2d(track_running_stats=True).")
    var inTrackRunningStats = false
    @Flag(help: "Domain-specific BN (with --norm bn or syncbn): every BN keeps separate batch and running statistics per domain of the data (two-domain:SRC, npy:X,Y,D), synced over the group in one all-reduce; inference and PreciseBN use the sample's domain.")
    var domainBn = false
    @Flag(help: "ShuffleBN (with --norm bn): before every BN, permute the samples across the ranks of each sync group (all ranks by default) and back after, so per-rank statistics come from a random mix of samples.")
    var shuffleBn = false
    @Option(help: "How each global batch is cut into the ranks' batches: random, or class-sorted (ordered by label first, so each rank gets as few classes as possible — for the leakage experiment).")
    var sampler: String = SamplerKind.random.rawValue
    @Flag(help: "With every metrics line, write per-layer diagnostics: norms of γ and of the feeding layer's weight and weight gradient; for cbn also entries kept, fraction dropped, Taylor-term size and window/batch variance ratio.")
    var cbnDiagnostics = false

    func validate() throws {
        // Flags that do nothing with the chosen normalization are mistakes, named here (a value
        // different from the default counts as given).
        if let kind = NormalizationKind(rawValue: norm) {
            let inapplicable: [(String, Bool, Bool)] = [
                ("--cbn-window", cbnWindow != 4, kind == .cbn), ("--cbn-rho", cbnRho != 1, kind == .cbn),
                ("--cbn-burnin", cbnBurnin != 0, kind == .cbn), ("--cbn-gradient", cbnGradient != "current", kind == .cbn),
                ("--reset-cbn-windows", resetCbnWindows, kind == .cbn),
                ("--brn-rmax", brnRmax != 3, kind == .brn), ("--brn-dmax", brnDmax != 5, kind == .brn),
                ("--gn-groups", gnGroups != 8, kind == .gn), ("--in-track-running-stats", inTrackRunningStats, kind == .in),
                ("--ghost-batch-size", ghostBatchSize != nil, kind == .bn || kind == .syncbn),
                ("--freeze-bn-after", freezeBnAfter != nil, !kind.isBatchFree && !kind.isWeightNormalized),
                ("--sync-group-size", syncGroupSize != nil, [.syncbn, .cbn, .brn, .rbn, .wnMeanOnly, .ibn].contains(kind) || shuffleBn),
                ("--shuffle-bn", shuffleBn, kind == .bn), ("--domain-bn", domainBn, kind == .bn || kind == .syncbn),
            ]
            if let (flag, _, _) = inapplicable.first(where: { $0.1 && !$0.2 }) {
                throw ValidationError("\(flag) does not apply to --norm \(norm)")
            }
        }
        if norm == "ibn", let kind = ModelKind(rawValue: model), kind.residualStages == nil {
            throw ValidationError("--norm ibn (IBN-Net's IBN-a blocks) is for the ResNets, not --model \(model)")
        }
        guard ModelKind(rawValue: model) != nil else { throw ValidationError("--model must be one of \(ModelKind.allCases.map(\.rawValue).joined(separator: ", ")), got '\(model)'") }
        guard NormalizationKind(rawValue: norm) != nil else { throw ValidationError("--norm must be one of \(NormalizationKind.allCases.map(\.rawValue).joined(separator: ", ")), got '\(norm)'") }
        guard batchSize >= 1 && batchSize <= 1 << 20 else { throw ValidationError("--batch-size must be between 1 and 1048576, got \(batchSize)") }
        guard (1...1_000_000).contains(epochs) || steps != nil else { throw ValidationError("--epochs must be between 1 and 1000000, got \(epochs)") }
        if let steps, steps > 1_000_000_000 { throw ValidationError("--steps must be at most 1000000000, got \(steps)") }
        if let steps, steps < 1 { throw ValidationError("--steps must be ≥ 1, got \(steps)") }
        guard lr.isFinite && lr > 0 else { throw ValidationError("--lr must be a positive number, got \(lr)") }
        guard momentum.isFinite && (0..<1).contains(momentum) else { throw ValidationError("--momentum must be in [0, 1), got \(momentum)") }
        guard weightDecay.isFinite && weightDecay >= 0 else { throw ValidationError("--weight-decay must be ≥ 0, got \(weightDecay)") }
        guard bnMomentum.isFinite && bnMomentum > 0 && bnMomentum <= 1 else { throw ValidationError("--bn-momentum must be in (0, 1], got \(bnMomentum)") }
        guard evalEvery >= 0 else { throw ValidationError("--eval-every must be ≥ 0, got \(evalEvery)") }
        guard logEvery >= 1 else { throw ValidationError("--log-every must be ≥ 1, got \(logEvery)") }
        guard holdoutFraction > 0 && holdoutFraction < 1 else { throw ValidationError("--holdout-fraction must be in (0, 1), got \(holdoutFraction)") }
        if let trainSamples, !(2...(1 << 31)).contains(trainSamples) { throw ValidationError("--train-samples must be between 2 and 2^31, got \(trainSamples)") }
        if let evalSamples, !(1...(1 << 31)).contains(evalSamples) { throw ValidationError("--eval-samples must be between 1 and 2^31, got \(evalSamples)") }
        if let syncGroupSize, syncGroupSize != "node" {
            guard let size = Int(syncGroupSize), size >= 1 else { throw ValidationError("--sync-group-size must be a group size ≥ 1 or 'node', got '\(syncGroupSize)'") }
        }
        guard brnRmax.isFinite && brnRmax >= 1 && brnRmax <= 100 else { throw ValidationError("--brn-rmax must be between 1 and 100, got \(brnRmax)") }
        guard brnDmax.isFinite && brnDmax >= 0 && brnDmax <= 100 else { throw ValidationError("--brn-dmax must be between 0 and 100, got \(brnDmax)") }
        guard gnGroups >= 1 else { throw ValidationError("--gn-groups must be ≥ 1, got \(gnGroups)") }
        if let freezeBnAfter, freezeBnAfter < 0 { throw ValidationError("--freeze-bn-after must be ≥ 0, got \(freezeBnAfter)") }
        guard bucketSize >= 1 else { throw ValidationError("--bucket-size must be ≥ 1, got \(bucketSize)") }
        guard (1...64).contains(cbnWindow) else { throw ValidationError("--cbn-window must be between 1 and 64, got \(cbnWindow)") }
        guard cbnRho.isFinite && cbnRho >= 0 && cbnRho <= 10 else { throw ValidationError("--cbn-rho must be between 0 and 10, got \(cbnRho)") }
        guard SamplerKind(rawValue: sampler) != nil else { throw ValidationError("--sampler must be random or class-sorted, got '\(sampler)'") }
        guard CrossIterationGradient(rawValue: cbnGradient) != nil else { throw ValidationError("--cbn-gradient must be current or compensated, got '\(cbnGradient)'") }
        if cbnDiagnostics && metrics == nil { throw ValidationError("--cbn-diagnostics writes to --metrics; give --metrics FILE") }
        guard cbnBurnin >= 0 else { throw ValidationError("--cbn-burnin must be ≥ 0, got \(cbnBurnin)") }
        guard EvaluationStatistics(rawValue: evalStats) != nil else { throw ValidationError("--eval-stats must be ema, precise or both, got '\(evalStats)'") }
        if let simulateRanks, !(1...256).contains(simulateRanks) { throw ValidationError("--simulate-ranks must be between 1 and 256, got \(simulateRanks)") }
        // Output paths are checked before anything runs: a directory we can write to, and nothing
        // there that is not ours to replace (a device, a directory, a link, one of the inputs).
        let inputs = Set(([data, evalData].compactMap { $0 }.flatMap(Self.inputFiles) + [resume].compactMap { $0 })
            .map { URL(fileURLWithPath: $0).standardizedFileURL.path })
        for (flag, path) in [("--save", save), ("--metrics", metrics)] {
            guard let path else { continue }
            let directory = URL(fileURLWithPath: path).deletingLastPathComponent().path
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: directory, isDirectory: &isDirectory), isDirectory.boolValue else {
                throw ValidationError("\(flag) \(path): directory \(directory) does not exist")
            }
            guard access(directory, W_OK) == 0 else { throw ValidationError("\(flag) \(path): directory \(directory) is not writable") }
            do { try checkReplaceableOutput(path) } catch let error as FileFormatError { throw ValidationError("\(flag) \(error)") }
            let resolved = URL(fileURLWithPath: path).standardizedFileURL.path
            if inputs.contains(resolved) && !(flag == "--save" && resume == path) {
                throw ValidationError("\(flag) \(path) is one of this run's inputs; refusing to overwrite it")
            }
        }
        if let metrics, resume == nil, !overwriteMetrics, FileManager.default.fileExists(atPath: metrics) {
            throw ValidationError("--metrics \(metrics) already exists; pass --overwrite-metrics to replace it, or --resume to continue its run")
        }
        if let save, let metrics, URL(fileURLWithPath: save).standardizedFileURL == URL(fileURLWithPath: metrics).standardizedFileURL {
            throw ValidationError("--save and --metrics name the same file \(save)")
        }
        if let resume, resume != "auto", !FileManager.default.fileExists(atPath: resume) { throw ValidationError("--resume \(resume): no such file") }
        if resume == "auto" && save == nil { throw ValidationError("--resume auto needs --save (the checkpoint it resumes from)") }
        if let saveEvery {
            guard saveEvery >= 1 else { throw ValidationError("--save-every must be ≥ 1, got \(saveEvery)") }
            guard save != nil else { throw ValidationError("--save-every needs --save (where to write)") }
        }
        guard collectiveTimeout.isFinite && collectiveTimeout >= 1 else { throw ValidationError("--collective-timeout must be at least 1 second, got \(collectiveTimeout)") }
        guard width.isFinite && width > 0 && width <= 64 else { throw ValidationError("--width must be in (0, 64], got \(width)") }
        if lrReferenceBatch != "none" {
            guard let b = Int(lrReferenceBatch), b >= 1 else { throw ValidationError("--lr-reference-batch must be a positive batch size or 'none', got '\(lrReferenceBatch)'") }
        }
        guard let schedule = LearningRateSchedule(rawValue: lrSchedule) else {
            throw ValidationError("--lr-schedule must be constant, step or cosine, got '\(lrSchedule)'")
        }
        let milestones = try parsedMilestones()
        if schedule == .step && milestones.isEmpty { throw ValidationError("--lr-schedule step needs --lr-milestones (epochs, e.g. 100,150)") }
        if schedule != .step && !milestones.isEmpty { throw ValidationError("--lr-milestones applies to --lr-schedule step only") }
        if warmupEpochs != nil && warmupSteps != nil { throw ValidationError("give --warmup-epochs or --warmup-steps, not both") }
        if let warmupEpochs, !(warmupEpochs.isFinite && warmupEpochs >= 0 && warmupEpochs <= 1e6) { throw ValidationError("--warmup-epochs must be ≥ 0, got \(warmupEpochs)") }
        if let warmupSteps, warmupSteps < 0 { throw ValidationError("--warmup-steps must be ≥ 0, got \(warmupSteps)") }
        if augment != "auto" { _ = try augmentation(parsing: augment, padding: pad ?? 4) }
        if let pad, !(0...64).contains(pad) { throw ValidationError("--pad must be between 0 and 64, got \(pad)") }
    }

    /// The files a `--data`/`--eval-data` value reads (for the output-path checks).
    static func inputFiles(_ text: String) -> [String] {
        guard let source = try? DataSource(parsing: text) else { return [] }
        switch source {
        case let .idx(images, labels): return [images, labels]
        case let .npy(samples, labels): return [samples, labels]
        case let .npyWithDomains(samples, labels, domains): return [samples, labels, domains]
        case let .twoDomain(inner): return inputFiles(inner.description)
        default: return []
        }
    }

    func parsedMilestones() throws -> [Double] {
        guard let lrMilestones else { return [] }
        return try lrMilestones.split(separator: ",").map { item in
            guard let value = Double(item), value.isFinite, value >= 0 else {
                throw ValidationError("--lr-milestones must be comma-separated epochs, got '\(lrMilestones)'")
            }
            return value
        }
    }

    func augmentation(parsing text: String, padding: Int) throws -> Augmentation {
        do { return try Augmentation(parsing: text, padding: padding) } catch let error as DataError { throw ValidationError(error.message) }
    }

    var trainingConfiguration: TrainingConfiguration {
        var c = TrainingConfiguration()
        c.data = data
        c.evalData = evalData
        c.heldOutFraction = holdoutFraction
        c.trainSamples = trainSamples
        c.evalSamples = evalSamples
        c.model = ModelKind(rawValue: model)!
        c.norm = NormalizationKind(rawValue: norm)!
        c.syncGroupSize = syncGroupSize.flatMap { Int($0) }
        c.batchSize = batchSize
        c.epochs = epochs
        c.steps = steps
        c.learningRate = lr
        c.lrReferenceBatch = Int(lrReferenceBatch)
        c.lrSchedule = LearningRateSchedule(rawValue: lrSchedule)!
        c.lrMilestones = (try? parsedMilestones()) ?? []
        c.warmupEpochs = warmupEpochs
        c.warmupSteps = warmupSteps
        c.width = width
        c.momentum = momentum
        c.weightDecay = weightDecay
        c.bnMomentum = bnMomentum
        c.seed = seed
        c.evalEvery = evalEvery
        c.logEvery = logEvery
        c.evalStats = EvaluationStatistics(rawValue: evalStats)!
        c.gradientBucketSize = bucketSize
        c.gnGroups = gnGroups
        c.ghostBatchSize = ghostBatchSize
        c.brnRMax = brnRmax
        c.brnDMax = brnDmax
        c.freezeBNAfter = freezeBnAfter
        c.crossIteration = CrossIterationOptions(window: cbnWindow, rho: cbnRho, burnIn: cbnBurnin,
                                                 gradient: CrossIterationGradient(rawValue: cbnGradient) ?? .current)
        c.normalizationDiagnostics = cbnDiagnostics
        c.inTrackRunningStats = inTrackRunningStats
        c.shuffleBN = shuffleBn
        c.domainBN = domainBn
        c.sampler = SamplerKind(rawValue: sampler) ?? .random
        c.preciseBNSamples = precise.preciseBnSamples
        c.preciseBNBatchSize = precise.preciseBnBatchSize
        return c
    }

    func run() throws {
        var configuration = trainingConfiguration
        let loaded = Result { () -> (split: DataSplit, overlap: Int) in
            let split = try configuration.loadData()
            guard split.heldOut.count > 0 else { throw DataError("the held-out set is empty: nothing to evaluate on") }
            let overlap = split.overlap()
            if overlap * 2 >= split.heldOut.count {
                throw DataError("\(overlap) of the \(split.heldOut.count) held-out samples are also training samples: the evaluation would not be held out (use another --eval-data, or another seed for synthetic data)")
            }
            return (split, overlap)
        }
        if let split = try? loaded.get().split, let source = try? DataSource(parsing: data) {
            let shape = split.train.sampleShape
            let padding = pad ?? Augmentation.defaultPadding(sampleShape: shape)
            configuration.augmentation = augment == "auto" ? Augmentation.automatic(for: source, sampleShape: shape)
                                                           : try augmentation(parsing: augment, padding: padding)
            configuration.augmentation.padding = padding
        }
        let metricsPath = metrics, savePath = save, saveEvery = saveEvery
        // --resume auto: the --save file when it exists (a re-run after a crash), else a fresh start.
        let resumePath = resume == "auto" ? savePath.flatMap { FileManager.default.fileExists(atPath: $0) ? $0 : nil } : resume
        let timeout = collectiveTimeout, resetWindows = resetCbnWindows, checked = checkCollectives, nodeGroups = syncGroupSize == "node"
        RankLaunch.run(simulateRanks: simulateRanks, command: "syncbn-train", preflight: loaded.failure) { launched in
            let watched = RankLaunch.watched(launched, timeout: timeout, command: "syncbn-train")
            let world: any Communicator = checked ? CheckedCommunicator(watched) : watched
            let (split, heldOutOverlap) = try loaded.get()
            var configuration = configuration
            // Before any other collective: every rank must run the same job on the same data.
            var agreement = RunAgreement()
            try agreement.add(configuration: configuration)
            agreement.add("--sync-group-size node", nodeGroups ? "yes" : "no")
            agreement.add(data: split.train, as: "--data (the training set)")
            agreement.add(data: split.heldOut, as: "--eval-data (the held-out set)")
            if let resumePath { agreement.add(file: resumePath, as: "--resume") } else { agreement.add("--resume", "unset") }
            agreement.add("--save", savePath == nil ? "unset" : "set")
            agreement.add("--save-every", saveEvery.map(String.init) ?? "unset")
            try agreement.check(world)
            if nodeGroups { configuration.syncGroupSize = try RunAgreement.nodeGroupSize(world) }
            let trainer = try Trainer(configuration: configuration, data: split, world: world)
            trainer.watchdog = watched.watchdog
            if let savePath {
                if world.rank == 0 {
                    removeStalePartialFiles(for: savePath)
                    // A checkpoint that cannot fit is found now, not after the run: values, momentum
                    // and the EMA beside PreciseBN's statistics, 4 bytes each, plus 1 MiB of slack.
                    let floats = trainer.network.state.reduce(0) { total, entry in
                        switch entry {
                        case let .parameter(_, p): return total + 2 * p.value.count
                        case let .buffer(_, b): return total + 2 * b.value.count
                        case let .rankLocal(_, r): return total + 2 * r.values.count * world.size
                        case .counter: return total + 2
                        }
                    }
                    let needed = 4 * floats + (1 << 20)
                    var info = statvfs()
                    let directory = URL(fileURLWithPath: savePath).deletingLastPathComponent().path
                    if statvfs(directory, &info) == 0 {
                        let free = Int(info.f_bavail) * Int(info.f_frsize)
                        guard free >= needed else {
                            throw DataError("--save \(savePath): the checkpoint needs about \(needed / 1024) KiB but \(directory) has \(free / 1024) KiB free")
                        }
                    }
                }
                trainer.checkpointing = (savePath, saveEvery)
            }
            if let resumePath {
                try trainer.resume(from: resumePath, resetCrossIterationWindows: resetWindows)
                guard trainer.step < trainer.totalSteps else {
                    throw CollectiveRunError("\(resumePath) is at step \(trainer.step), at or past this run's \(trainer.totalSteps) steps: nothing to train (raise --steps or --epochs, or use syncbn-train evaluate)")
                }
            }
            if world.rank == 0 {
                if let metricsPath {
                    trainer.metrics = try MetricsWriter(path: metricsPath, append: resumePath != nil)
                    try trainer.metrics?.writeStart(configuration: configuration, ranks: world.size, resumedAt: resumePath.map { _ in trainer.step })
                }
                trainer.progress = ProgressReporter()
                let groups = configuration.norm != .bn ? "statistics over \(configuration.syncGroupSize.map { min($0, world.size) } ?? world.size) rank(s)" : "per-rank statistics"
                let plan = trainer.learningRatePlan
                let scaling = configuration.lrReferenceBatch.map { " = \(configuration.learningRate) × \(configuration.batchSize * world.size)/\($0)" } ?? ""
                trainer.progress?.line("syncbn-train: \(configuration.model.rawValue)\(configuration.width == 1 ? "" : " ×\(configuration.width)") with \(configuration.norm.rawValue) (\(groups)), \(world.size) rank(s) (\(RankLaunch.transportName(world))) × batch \(configuration.batchSize), \(trainer.totalSteps) steps, \(split.train.count) training / \(split.heldOut.count) held-out samples\(heldOutOverlap > 0 ? " (\(heldOutOverlap) of them also in the training set)" : ""), augmentation \(configuration.augmentation)")
                trainer.progress?.line(String(format: "lr: peak %.6g%@, %@ schedule, %d warm-up steps", plan.peak, scaling,
                                              configuration.lrSchedule.rawValue, plan.warmupSteps))
                if let resumePath { trainer.progress?.line("resumed from \(resumePath) at step \(trainer.step)") }
            }
            let summary = try trainer.run()
            if let savePath { try trainer.save(to: savePath) }
            if world.rank == 0 {
                let accuracies = ["ema", "precise"].compactMap { key in
                    summary.evaluations[key].map { String(format: "%.2f%% (%@)", $0.accuracy * 100, key == "ema" ? "EMA" : "PreciseBN") }
                }.joined(separator: ", ")
                trainer.progress?.line(String(format: "done: held-out accuracy %@ after %d steps on %d rank(s), %.1f s, %.0f samples/s%@",
                                              accuracies, summary.steps, world.size, summary.seconds, summary.samplesPerSecond,
                                              savePath.map { ", saved \($0)" } ?? ""))
            }
        }
    }
}

/// PreciseBN's options, shared by `train` and `recompute-stats`.
struct PreciseBNOptions: ParsableArguments {
    @Option(parsing: .unconditional, help: "PreciseBN: samples over all ranks used to recompute the population statistics.")
    var preciseBnSamples: Int = 8192
    @Option(parsing: .unconditional, help: "PreciseBN: samples per rank per forward pass (default: the training batch size).")
    var preciseBnBatchSize: Int?

    func validate() throws {
        guard preciseBnSamples >= 2 && preciseBnSamples <= 1 << 30 else { throw ValidationError("--precise-bn-samples must be between 2 and 2^30, got \(preciseBnSamples)") }
        if let b = preciseBnBatchSize, !(1...(1 << 20)).contains(b) { throw ValidationError("--precise-bn-batch-size must be between 1 and 1048576, got \(b)") }
    }
}

/// Loads a checkpoint, recomputes PreciseBN statistics on the given data over all ranks and saves
/// a new checkpoint. On data from another domain this is AdaBN (Li et al. 2016, arXiv 1603.04779).
struct RecomputeStats: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "recompute-stats",
        abstract: "Recompute a checkpoint's BN population statistics (PreciseBN; AdaBN on another domain's data).",
        discussion: """
        The model, normalization and sync groups come from the checkpoint's configuration. The statistics \
        are pooled over --precise-bn-samples samples of --data's training split (all ranks together) and \
        the held-out accuracy is reported before and after. Every rank ends with the same statistics.
        """)

    @Option(help: "Checkpoint to start from (written by syncbn-train --save).")
    var resume: String
    @Option(help: "Where to write the checkpoint with the recomputed statistics.")
    var save: String
    @Option(help: "Data to compute the statistics on (default: the checkpoint's training data).")
    var data: String?
    @Option(help: "Held-out data for the before/after accuracy (default: the source's test set or last 10%).")
    var evalData: String?
    @OptionGroup var precise: PreciseBNOptions
    @Option(parsing: .unconditional, help: "Run N ranks as threads of this process instead of under mpirun.")
    var simulateRanks: Int?

    func validate() throws {
        guard FileManager.default.fileExists(atPath: resume) else { throw ValidationError("--resume \(resume): no such file") }
        let directory = URL(fileURLWithPath: save).deletingLastPathComponent().path
        guard FileManager.default.fileExists(atPath: directory) else { throw ValidationError("--save \(save): directory \(directory) does not exist") }
        if let simulateRanks, !(1...256).contains(simulateRanks) { throw ValidationError("--simulate-ranks must be between 1 and 256, got \(simulateRanks)") }
    }

    func run() throws {
        let resumePath = resume, savePath = save, options = precise
        let prepared = Result { () -> (TrainingConfiguration, DataSplit) in
            var (configuration, split) = try loadCheckpointRun(resumePath, data: data, evalData: evalData)
            configuration.preciseBNSamples = options.preciseBnSamples
            configuration.preciseBNBatchSize = options.preciseBnBatchSize
            return (configuration, split)
        }
        RankLaunch.run(simulateRanks: simulateRanks, command: "syncbn-train recompute-stats", preflight: prepared.failure) { world in
            let (configuration, split) = try prepared.get()
            let trainer = try Trainer(configuration: configuration, data: split, world: world)
            try trainer.resume(from: resumePath, forTraining: false)
            let before = try trainer.evaluate()
            let report = try trainer.recomputePopulationStatistics(rememberEMA: true)
            let after = try trainer.evaluate()
            try trainer.verifyReplicasAgree()
            try trainer.save(to: savePath, extraMetadata: ["statistics": "precise", "precise_bn_samples": String(report.samples),
                                                           "precise_bn_data": configuration.data])
            if world.rank == 0 {
                let line = String(format: "recompute-stats: %d samples in %d batches on %d rank(s); held-out accuracy %.2f%% with the checkpoint's statistics, %.2f%% with the recomputed ones; saved %@",
                                  report.samples, report.batches, world.size, before.accuracy * 100, after.accuracy * 100, savePath)
                FileHandle.standardError.write(Data((line + "\n").utf8))
            }
        }
    }
}

/// The configuration stored in a checkpoint (with `data`/`evalData` overriding its data) and the
/// data it names, loaded: what a command needs to rebuild the model of a checkpoint.
func loadCheckpointRun(_ path: String, data: String?, evalData: String?) throws -> (TrainingConfiguration, DataSplit) {
    let (_, metadata) = try Safetensors.read(path)
    guard let text = metadata["configuration"],
          var configuration = try? TrainingConfiguration.decoding(json: text) else {
        throw FileFormatError(path, "metadata has no readable 'configuration' (not written by syncbn-train?)")
    }
    if let problem = configuration.problem() { throw FileFormatError(path, "stored configuration is invalid: \(problem)") }
    if let data { configuration.data = data }
    configuration.evalData = evalData ?? (data == nil ? configuration.evalData : nil)
    let split = try configuration.loadData()
    return (configuration, split)
}

/// Evaluates a checkpoint on held-out data with the statistics it stores (and, when it keeps
/// the EMA beside PreciseBN's, with both), optionally writing inputs and logits as .npy.
struct Evaluate: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "evaluate",
        abstract: "Held-out loss and accuracy of a checkpoint, with its EMA and PreciseBN statistics.",
        discussion: """
        The model and data come from the checkpoint's configuration; --eval-data evaluates on another source (its \
        samples are standardized with the training data's moments, as in training). --inputs and --logits write the \
        first --limit held-out samples as the network sees them and the logits it gives them (.npy, Float32), for \
        checking the model elsewhere.
        """)

    @Option(help: "Checkpoint to evaluate (written by syncbn-train --save).")
    var resume: String
    @Option(help: "Held-out data (same forms as --data); default: the checkpoint's.")
    var evalData: String?
    @Option(help: "Write the first --limit standardized held-out inputs here (.npy).")
    var inputs: String?
    @Option(help: "Write the logits of those inputs here (.npy), with the checkpoint's stored statistics.")
    var logits: String?
    @Option(parsing: .unconditional, help: "Samples written by --inputs/--logits.")
    var limit: Int = 256
    @Option(parsing: .unconditional, help: "Recompute the PreciseBN statistics from this many training samples (all ranks together) and evaluate with them, instead of the stored ones.")
    var preciseBnSamples: Int?
    @Option(parsing: .unconditional, help: "With --precise-bn-samples: samples per rank per forward pass (default: the training batch size).")
    var preciseBnBatchSize: Int?
    @Flag(help: "Also print the results as one JSON object on standard output.")
    var json = false
    @Option(parsing: .unconditional, help: "Run N ranks as threads of this process instead of under mpirun.")
    var simulateRanks: Int?

    func validate() throws {
        guard FileManager.default.fileExists(atPath: resume) else { throw ValidationError("--resume \(resume): no such file") }
        guard (1...(1 << 20)).contains(limit) else { throw ValidationError("--limit must be between 1 and 1048576, got \(limit)") }
        for path in [inputs, logits].compactMap({ $0 }) {
            let directory = URL(fileURLWithPath: path).deletingLastPathComponent().path
            guard FileManager.default.fileExists(atPath: directory) else { throw ValidationError("\(path): directory \(directory) does not exist") }
        }
        if let simulateRanks, !(1...256).contains(simulateRanks) { throw ValidationError("--simulate-ranks must be between 1 and 256, got \(simulateRanks)") }
        if let preciseBnSamples, !(2...(1 << 30)).contains(preciseBnSamples) { throw ValidationError("--precise-bn-samples must be between 2 and 2^30, got \(preciseBnSamples)") }
        if let b = preciseBnBatchSize {
            guard (1...(1 << 20)).contains(b) else { throw ValidationError("--precise-bn-batch-size must be between 1 and 1048576, got \(b)") }
            guard preciseBnSamples != nil else { throw ValidationError("--precise-bn-batch-size applies with --precise-bn-samples only") }
        }
    }

    func run() throws {
        let resumePath = resume, inputsPath = inputs, logitsPath = logits, limit = limit, json = json
        let recompute = preciseBnSamples, recomputeBatch = preciseBnBatchSize
        let prepared = Result { () -> (TrainingConfiguration, DataSplit) in
            var (configuration, split) = try loadCheckpointRun(resumePath, data: nil, evalData: evalData)
            if let recompute {
                configuration.preciseBNSamples = recompute
                configuration.preciseBNBatchSize = recomputeBatch
            }
            return (configuration, split)
        }
        RankLaunch.run(simulateRanks: simulateRanks, command: "syncbn-train evaluate", preflight: prepared.failure) { world in
            let (configuration, split) = try prepared.get()
            let trainer = try Trainer(configuration: configuration, data: split, world: world)
            // The EMA statistics first (when the file keeps them beside PreciseBN's), then the stored
            // ones, or ones recomputed now.
            try trainer.resume(from: resumePath, forTraining: true, resetCrossIterationWindows: true)   // windows play no part in inference
            let stored = try Safetensors.read(resumePath).metadata["statistics"] ?? "ema"
            var results: [(String, Evaluation)] = []
            if recompute != nil {
                results.append(("EMA", try trainer.evaluate()))
                _ = try trainer.recomputePopulationStatistics(rememberEMA: true)
                results.append(("PreciseBN", try trainer.evaluate()))
            } else {
                if stored == "precise" {
                    results.append(("EMA", try trainer.evaluate()))
                    try trainer.resume(from: resumePath, forTraining: false, resetCrossIterationWindows: true)
                }
                results.append((stored == "precise" ? "PreciseBN" : "EMA", try trainer.evaluate()))
            }
            if world.rank == 0 {
                let count = min(limit, split.heldOut.count)
                let (x, _) = split.heldOut.batch(0..<count)
                if let inputsPath { try writeNumpy(x, to: inputsPath) }
                if let logitsPath { try writeNumpy(try trainer.network.forward(x, mode: .inference), to: logitsPath) }
                for (statistics, evaluation) in results {
                    let line = String(format: "evaluate: step %d, held-out loss %.4f, accuracy %.2f%% (%d samples, %@ statistics)",
                                      trainer.step, evaluation.loss, evaluation.accuracy * 100, evaluation.count, statistics)
                    FileHandle.standardError.write(Data((line + "\n").utf8))
                }
                if json {
                    var object: [String: Any] = ["step": trainer.step, "samples": results[0].1.count]
                    for (statistics, evaluation) in results {
                        object[statistics == "EMA" ? "ema" : "precise"] = ["loss": evaluation.loss, "accuracy": evaluation.accuracy]
                    }
                    if let recompute { object["precise_bn_samples"] = recompute }
                    let data = try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])
                    FileHandle.standardOutput.write(data + Data("\n".utf8))
                }
            }
        }
    }
}

/// A checkpoint's model in inference mode on one process, with the statistics it stores.
func inferenceTrainer(_ path: String, configuration: TrainingConfiguration, split: DataSplit) throws -> Trainer {
    let trainer = try Trainer(configuration: configuration, data: split, world: SingleProcessCommunicator())
    try trainer.resume(from: path, forTraining: false, resetCrossIterationWindows: true)   // windows play no part in inference
    return trainer
}

/// Checks an export's `--out`: an existing directory, nothing there that is not ours, not the input.
func validateExport(_ out: String, from resume: String) throws {
    guard FileManager.default.fileExists(atPath: resume) else { throw ValidationError("--resume \(resume): no such file") }
    let directory = URL(fileURLWithPath: out).deletingLastPathComponent().path
    guard FileManager.default.fileExists(atPath: directory) else { throw ValidationError("--out \(out): directory \(directory) does not exist") }
    do { try checkReplaceableOutput(out) } catch let error as FileFormatError { throw ValidationError("--out \(error)") }
    guard URL(fileURLWithPath: out).standardizedFileURL != URL(fileURLWithPath: resume).standardizedFileURL else {
        throw ValidationError("--out \(out) is the checkpoint being exported; refusing to overwrite it")
    }
}

/// Writes a checkpoint's model alone — the entries a torch.nn model with the same names has in
/// its state_dict, with the statistics the checkpoint stores — for `load_state_dict(strict=True)`.
struct ExportTorch: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export-torch",
        abstract: "Save a checkpoint's model state only (parameters, running statistics, num_batches_tracked) for PyTorch.",
        discussion: """
        Drops the optimizer's momentum buffers, the EMA kept beside PreciseBN's statistics and cross-iteration \
        windows. The metadata keeps the architecture and the input standardization (input_mean, input_std per channel).
        """)

    @Option(help: "Checkpoint to export (written by syncbn-train --save).")
    var resume: String
    @Option(help: "Where to write the model state (safetensors).")
    var out: String

    func validate() throws { try validateExport(out, from: resume) }

    func run() throws {
        let resumePath = resume, outPath = out
        let prepared = Result { try loadCheckpointRun(resumePath, data: nil, evalData: nil) }
        RankLaunch.run(simulateRanks: nil, command: "syncbn-train export-torch", preflight: prepared.failure) { world in
            let (configuration, split) = try prepared.get()
            let trainer = try inferenceTrainer(resumePath, configuration: configuration, split: split)
            guard world.rank == 0 else { return }
            var tensors: [(name: String, tensor: StoredTensor)] = []
            for entry in trainer.network.state {
                switch entry {
                case let .parameter(name, p): tensors.append((name, StoredTensor(floats: p.value.scalars, shape: p.value.shape)))
                case let .buffer(name, b): tensors.append((name, StoredTensor(floats: b.value.scalars, shape: b.value.shape)))
                case let .counter(name, c): tensors.append((name, StoredTensor(int64: c.value)))
                case .rankLocal: continue
                }
            }
            let stored = try Safetensors.read(resumePath).metadata
            var metadata = trainer.inferenceMetadata
            metadata["format"] = "syncbn-torch-1"
            metadata["statistics"] = stored["statistics"] ?? "ema"
            metadata["exported_from"] = URL(fileURLWithPath: resumePath).lastPathComponent
            try Safetensors.write(tensors, metadata: metadata, to: outPath)
            FileHandle.standardError.write(Data("export-torch: \(tensors.count) tensors (\(metadata["statistics"]!) statistics) written to \(outPath)\n".utf8))
        }
    }
}

/// Folds every inference-mode BN of a checkpoint into the conv/linear layer before it and writes
/// the resulting BN-free model.
struct ExportFolded: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export-folded",
        abstract: "Fold BatchNorm into the preceding conv/linear layers and save a model without BN layers.",
        discussion: """
        W' = W·γ/√(var+ε), b' = (b − mean)·γ/√(var+ε) + β with the checkpoint's running statistics. The output is a \
        safetensors file of the folded parameters (metadata format syncbn-folded-1). The held-out logits of the folded \
        and the unfolded model are compared and the difference printed.
        """)

    @Option(help: "Checkpoint to fold (written by syncbn-train --save).")
    var resume: String
    @Option(help: "Where to write the folded model.")
    var out: String
    @Option(help: "Data for the comparison (default: the checkpoint's).")
    var data: String?

    func validate() throws { try validateExport(out, from: resume) }

    func run() throws {
        let resumePath = resume, outPath = out
        let prepared = Result { try loadCheckpointRun(resumePath, data: data, evalData: nil) }
        RankLaunch.run(simulateRanks: nil, command: "syncbn-train export-folded", preflight: prepared.failure) { world in
            let (configuration, split) = try prepared.get()
            let trainer = try inferenceTrainer(resumePath, configuration: configuration, split: split)
            let folded = try trainer.network.foldingBatchNorm()
            let (x, _) = split.heldOut.batch(0..<min(split.heldOut.count, 512))
            let reference = try trainer.network.forward(x, mode: .inference)
            let logits = try folded.forward(x, mode: .inference)
            var difference = 0.0, scale = 0.0
            for i in 0..<reference.count {
                difference = max(difference, abs(Double(logits.scalars[i]) - Double(reference.scalars[i])))
                scale = max(scale, abs(Double(reference.scalars[i])))
            }
            guard world.rank == 0 else { return }
            var tensors: [(name: String, tensor: StoredTensor)] = []
            // Parameters and the buffers of layers that stay (Representative BN keeps its statistics).
            for entry in folded.state {
                switch entry {
                case let .parameter(name, p): tensors.append((name, StoredTensor(floats: p.value.scalars, shape: p.value.shape)))
                case let .buffer(name, b): tensors.append((name, StoredTensor(floats: b.value.scalars, shape: b.value.shape)))
                case .counter, .rankLocal: continue
                }
            }
            let configurationJSON = String(decoding: try sortedJSONEncoder().encode(configuration), as: UTF8.self)
            try Safetensors.write(tensors, metadata: ["format": "syncbn-folded-1", "configuration": configurationJSON,
                                                      "folded_from": URL(fileURLWithPath: resumePath).lastPathComponent], to: outPath)
            let kept = folded.batchNormLayers.count
            func foldable(_ network: Network) -> Int {
                network.batchNormLayers.count + network.leaves.filter { $0.layer is ChannelBias<Float> || $0.layer is MeanOnlyBatchNorm<Float> }.count
            }
            let line = String(format: "export-folded: %d normalization layers folded%@, %d tensors written to %@; held-out logits of %d samples differ by %.2e relative (max|folded − unfolded| / max|unfolded|)",
                              foldable(trainer.network) - foldable(folded), kept > 0 ? ", \(kept) BN layers kept with their statistics (inside Representative BN or IBN layers)" : "",
                              tensors.count, outPath, x.shape[0], difference / max(scale, 1e-30))
            FileHandle.standardError.write(Data((line + "\n").utf8))
        }
    }
}

SyncBNTrain.mainOnce()
