import ArgumentParser
import Collectives
import CollectivesMPI
import Foundation
import CommandSupport
import Kernels
import Normalization
import Training

struct Train: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "train", abstract: "Train a model (the default subcommand).")

    @Option(help: "Training data: synthetic[:train=N,heldout=N,seed=S], fashion-mnist[:DIR], idx:IMAGES,LABELS (plain or .gz), cifar10:DIR, npy:X,Y[,DOMAINS], or SOURCE plus a changed copy as domain 1: two-domain:SOURCE (intensity-inverted), two-domain-contrast:SOURCE (a third of the contrast) or two-domain-shrunk:SOURCE (half the size, centred).")
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
    var model: ModelKind = .convnet
    @Option(parsing: .unconditional, help: "Multiplies every layer's channel count (e.g. 0.5, 2; rounded to nearest, ties to even, at least 1).")
    var width: Double = 1
    @Option(help: "Normalization: bn (per-rank statistics, no collectives), syncbn (statistics over each sync group), cbn (cross-iteration BN over each sync group), gn (GroupNorm), in (InstanceNorm), ln (LayerNorm), brn (Batch Renormalization), rbn (Representative BN), wn (weight normalization with a bias), wn-meanonly (weight normalization with mean-only BN), ibn (IBN-Net's IBN-a, ResNets only) or mabn (Moving Average BN, per rank unless --sync-group-size is given); brn, rbn, wn-meanonly and ibn sync over the sync group.")
    var norm: NormalizationKind = .syncbn
    @Option(parsing: .unconditional, help: "Consecutive ranks that share batch statistics under syncbn, cbn, brn, rbn, wn-meanonly and ibn (1 = per rank; default: all ranks) and mabn (default: per rank); it must divide the ranks; 'node': the ranks of each host (statistics stay inside a machine, gradients cross machines); 'all': every rank (the default made explicit, e.g. to keep launch/slurm.sbatch from adding 'node').")
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
    var lrSchedule: LearningRateSchedule = .cosine
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
    @Option(help: "With --resume: settings (flag names without dashes, comma-separated, e.g. lr,steps) that may differ from the checkpoint's run; each change and its effect on the learning rate are printed. Other differences are an error.")
    var allowConfigChange: String?
    @Option(parsing: .unconditional, help: "Run N ranks as threads of this process instead of under mpirun.")
    var simulateRanks: Int?
    @Flag(help: "Resume a cross-iteration BN checkpoint written by another number of ranks, with every window empty.")
    var resetCbnWindows = false
    @Flag(help: "Debugging: before every collective, check that all ranks issue the same operation, size and sequence number, and name the first divergence.")
    var checkCollectives = false
    @OptionGroup var watch: CollectiveTimeoutOption
    @OptionGroup var memory: DataMemoryOption
    @Option(parsing: .unconditional, help: "Log a metrics line every N steps.")
    var logEvery: Int = 10
    @Option(parsing: .unconditional, help: "Batch Renorm: the fraction of the steps trained as plain BN before r and d are relaxed (default 0.03).")
    var brnWarmup: Double?
    @Option(parsing: .unconditional, help: "Batch Renorm: final clip of r (reached 25% of the steps after the warm-up).")
    var brnRmax: Double = 3
    @Option(parsing: .unconditional, help: "Batch Renorm: final clip of |d| (reached 16% of the steps after the warm-up).")
    var brnDmax: Double = 5
    @Option(parsing: .unconditional, help: "Ghost BN: normalize each rank's batch in ghost batches of this size (with --norm bn or syncbn; with a sync group, ghost batch j of every rank of the group together).")
    var ghostBatchSize: Int?
    @Option(parsing: .unconditional, help: "Moving Average BN: iterations whose E[x²] and E[g·z] are averaged (the reference's real_B / B).")
    var mabnWindow: Int = 4
    @Option(parsing: .unconditional, help: "Moving Average BN: iterations of batch statistics before the moving averages.")
    var mabnWarmup: Int = 100
    @Option(parsing: .unconditional, help: "Moving Average BN: iterations with the renormalization r held at 1 (the reference's 1000).")
    var mabnRenormHold: Int = 1000
    @Option(parsing: .unconditional, help: "GroupNorm: channel groups per layer (capped at the layer's channels).")
    var gnGroups: Int = 8
    @Option(parsing: .unconditional, help: "GroupNorm: channels per group in every layer instead of a number of groups (a narrower layer is one group).")
    var gnChannelsPerGroup: Int?
    @Option(parsing: .unconditional, help: "FrozenBN: from this step on, BN layers use their population statistics (no batch statistics, no updates, no collectives).")
    var freezeBnAfter: Int?
    @Option(parsing: .unconditional, help: "Gradient values per all-reduce bucket; buckets start during backward.")
    var bucketSize: Int = 1 << 16
    @Option(help: "Statistics for evaluation: ema (running averages), precise (PreciseBN) or both.")
    var evalStats: EvaluationStatistics = .both
    @OptionGroup var precise: PreciseBNOptions
    @Option(parsing: .unconditional, help: "Cross-iteration BN: iterations in the window, the current one included.")
    var cbnWindow: Int = 4
    @Option(parsing: .unconditional, help: "Cross-iteration BN: scale of the Taylor compensation (0 = naive averaging).")
    var cbnRho: Double = 1
    @Option(parsing: .unconditional, help: "Cross-iteration BN: steps of plain SyncBN before the window is used.")
    var cbnBurnin: Int = 0
    @Option(help: "Cross-iteration BN: where gradients flow: compensated (the default: also through the current weight in the Taylor term, the exact derivative) or current (the current batch's statistics only, as the reference code).")
    var cbnGradient: CrossIterationGradient = .compensated
    @Flag(help: "InstanceNorm: keep running statistics (the batch average of the instances' means and unbiased variances) and normalize with them at inference, as PyTorch's InstanceNorm2d(track_running_stats=True).")
    var inTrackRunningStats = false
    @Flag(help: "Domain-specific BN (with --norm bn or syncbn): every BN keeps separate batch and running statistics per domain of the data (two-domain:SRC, npy:X,Y,D), synced over the group in one all-reduce; inference and PreciseBN use the sample's domain.")
    var domainBn = false
    @Flag(help: "ShuffleBN (with --norm bn): before every BN, permute the samples across the ranks of each sync group (all ranks by default) and back after, so per-rank statistics come from a random mix of samples.")
    var shuffleBn = false
    @Option(help: "How each global batch is cut into the ranks' batches: random, or class-sorted (ordered by label first, so each rank gets as few classes as possible — for the leakage experiment).")
    var sampler: SamplerKind = .random
    @Option(help: "Convolutions: auto (each times im2col and oneDNN on its shapes at start-up and keeps the faster; rank 0 decides; a resume keeps the checkpoint's choice), im2col, onednn, or one per convolution in model order (the comma-separated list auto prints, to repeat its choice). Default: auto, or SYNCBN_CONV_BACKEND when set.")
    var convBackend: ConvolutionBackendSetting?
    @Option(parsing: .unconditional, help: "Samples per leaf of each convolution's weight-gradient sum (a power of two dividing --batch-size): 1 (the default) is exact for any split of the batch; 8 is faster on large late layers (ResNet-18) and exact between layouts whose per-rank batches it divides.")
    var weightGradientLeaf: Int = 1
    @Flag(help: "With every metrics line, write per-layer diagnostics: norms of γ and of the feeding layer's weight and weight gradient; for cbn also entries kept, fraction dropped, Taylor-term size and window/batch variance ratio.")
    var cbnDiagnostics = false

    func validate() throws {
        if convBackend == nil { _ = try ConvolutionBackendSetting.commandLineDefault() }
        // Flags that do nothing with the chosen normalization are mistakes, named here (a value
        // different from the default counts as given).
        do {
            let kind = norm
            let inapplicable: [(String, Bool, Bool)] = [
                ("--cbn-window", cbnWindow != 4, kind == .cbn), ("--cbn-rho", cbnRho != 1, kind == .cbn),
                ("--cbn-burnin", cbnBurnin != 0, kind == .cbn), ("--cbn-gradient", cbnGradient != .compensated, kind == .cbn),
                ("--reset-cbn-windows", resetCbnWindows, kind == .cbn || kind == .mabn),
                ("--brn-rmax", brnRmax != 3, kind == .brn), ("--brn-dmax", brnDmax != 5, kind == .brn),
                ("--gn-groups", gnGroups != 8, kind == .gn && gnChannelsPerGroup == nil),
                ("--gn-channels-per-group", gnChannelsPerGroup != nil, kind == .gn), ("--brn-warmup", brnWarmup != nil, kind == .brn),
                ("--mabn-window", mabnWindow != 4, kind == .mabn), ("--mabn-warmup", mabnWarmup != 100, kind == .mabn),
                ("--mabn-renorm-hold", mabnRenormHold != 1000, kind == .mabn),
                ("--in-track-running-stats", inTrackRunningStats, kind == .in),
                ("--ghost-batch-size", ghostBatchSize != nil, kind == .bn || kind == .syncbn),
                ("--freeze-bn-after", freezeBnAfter != nil, !kind.isBatchFree && !kind.isWeightNormalized),
                ("--sync-group-size", syncGroupSize != nil, kind.synchronizes || kind.synchronizesOnRequest || shuffleBn),
                ("--shuffle-bn", shuffleBn, kind == .bn), ("--domain-bn", domainBn, kind == .bn || kind == .syncbn),
            ]
            if let (flag, _, _) = inapplicable.first(where: { $0.1 && !$0.2 }) {
                throw ValidationError("\(flag) does not apply to --norm \(norm.rawValue)")
            }
        }
        if norm == .ibn, model.residualStages == nil {
            throw ValidationError("--norm ibn (IBN-Net's IBN-a blocks) is for the ResNets, not --model \(model.rawValue)")
        }
        if let syncGroupSize, syncGroupSize != "node", syncGroupSize != "all" {
            guard let size = Int(syncGroupSize), size >= 1 else { throw ValidationError("--sync-group-size must be a group size ≥ 1, 'node' or 'all', got '\(syncGroupSize)'") }
        }
        if cbnDiagnostics && metrics == nil { throw ValidationError("--cbn-diagnostics writes to --metrics; give --metrics FILE") }
        if allowConfigChange != nil {
            guard resume != nil else { throw ValidationError("--allow-config-change applies with --resume only") }
            let known = Set(TrainingConfiguration.settingFields.map { RunAgreement.flagName($0) })
            for flag in allowedChangeFlags where !known.contains(flag) {
                throw ValidationError("--allow-config-change: '\(flag.dropFirst(2))' is not a setting of a run (give flag names, e.g. lr,steps)")
            }
        }
        // The ranges of every setting: written once, in the configuration.
        try trainingConfiguration.validateAsOptions()
        if let simulateRanks, !(1...256).contains(simulateRanks) { throw ValidationError("--simulate-ranks must be between 1 and 256, got \(simulateRanks)") }
        // Output paths are checked before anything runs: a directory we can write to, and nothing
        // there that is not ours to replace (a device, a directory, a link, one of the inputs: by
        // device and inode). --save may be the checkpoint it resumes from.
        let dataFiles = [data, evalData].compactMap { $0 }.flatMap(Self.inputFiles)
        let resumed = resume.flatMap { $0 == "auto" ? nil : $0 }
        do {
            if let save {
                let continuing = resumed.map { FileIdentity($0) != nil && FileIdentity($0) == FileIdentity(save) } ?? false
                try OutputGuard.check(save, flag: "--save", inputs: dataFiles + (continuing ? [] : resumed.map { [$0] } ?? []))
            }
            if let metrics { try OutputGuard.check(metrics, flag: "--metrics", inputs: dataFiles + (resumed.map { [$0] } ?? []) + (save.map { [$0] } ?? [])) }
            try OutputGuard.requireDistinct([("--save", save), ("--metrics", metrics)])
        } catch let error as LayerError { throw ValidationError(error.description) }
        if save?.isEmpty == true { throw ValidationError("--save needs a file name, got an empty one") }
        if let metrics, resume == nil, !overwriteMetrics, FileManager.default.fileExists(atPath: metrics) {
            throw ValidationError("--metrics \(metrics) already exists; pass --overwrite-metrics to replace it, or --resume to continue its run")
        }
        if let resume, resume != "auto", !FileManager.default.fileExists(atPath: resume) { throw ValidationError("--resume \(resume): no such file") }
        if resume == "auto" && save == nil { throw ValidationError("--resume auto needs --save (the checkpoint it resumes from)") }
        if let saveEvery {
            guard saveEvery >= 1 else { throw ValidationError("--save-every must be ≥ 1, got \(saveEvery)") }
            guard save != nil else { throw ValidationError("--save-every needs --save (where to write)") }
        }
        if lrReferenceBatch != "none" {
            guard let b = Int(lrReferenceBatch), b >= 1 else { throw ValidationError("--lr-reference-batch must be a positive batch size or 'none', got '\(lrReferenceBatch)'") }
        }
        let schedule = lrSchedule
        let milestones = try parsedMilestones()
        if schedule == .step && milestones.isEmpty { throw ValidationError("--lr-schedule step needs --lr-milestones (epochs, e.g. 100,150)") }
        if schedule != .step && !milestones.isEmpty { throw ValidationError("--lr-milestones applies to --lr-schedule step only") }
        if warmupEpochs != nil && warmupSteps != nil { throw ValidationError("give --warmup-epochs or --warmup-steps, not both") }
        if augment != "auto" { _ = try augmentation(parsing: augment, padding: pad ?? 4) }
        if let pad, !(0...64).contains(pad) { throw ValidationError("--pad must be between 0 and 64, got \(pad)") }
    }

    /// `--allow-config-change`'s items as flags (`lr` → `--lr`).
    var allowedChangeFlags: Set<String> {
        Set((allowConfigChange ?? "").split(separator: ",").map {
            "--" + $0.trimmingCharacters(in: .whitespaces).trimmingCharacters(in: CharacterSet(charactersIn: "-"))
        })
    }

    /// The files a `--data`/`--eval-data` value reads (for the output-path checks).
    static func inputFiles(_ text: String) -> [String] {
        guard let source = try? DataSource(parsing: text) else { return [] }
        switch source {
        case let .idx(images, labels): return [images, labels]
        case let .npy(samples, labels): return [samples, labels]
        case let .npyWithDomains(samples, labels, domains): return [samples, labels, domains]
        case let .twoDomain(inner): return inputFiles(inner.description)
        case let .shiftedDomain(inner, _): return inputFiles(inner.description)
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
        do { return try Augmentation(parsing: text, padding: padding) } catch let error as DataError { throw ValidationError(error.description) }
    }

    var trainingConfiguration: TrainingConfiguration {
        var c = TrainingConfiguration()
        c.data = data
        c.evalData = evalData
        c.heldOutFraction = holdoutFraction
        c.trainSamples = trainSamples
        c.evalSamples = evalSamples
        c.model = model
        c.norm = norm
        c.syncGroupSize = syncGroupSize.flatMap { Int($0) }
        c.batchSize = batchSize
        c.epochs = epochs
        c.steps = steps
        c.learningRate = lr
        c.lrReferenceBatch = Int(lrReferenceBatch)
        c.lrSchedule = lrSchedule
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
        c.evalStats = evalStats
        c.gradientBucketSize = bucketSize
        c.gnGroups = gnGroups
        c.gnChannelsPerGroup = gnChannelsPerGroup
        c.mabnWindow = mabnWindow
        c.mabnWarmup = mabnWarmup
        c.mabnRenormHold = mabnRenormHold
        c.brnWarmup = brnWarmup
        c.ghostBatchSize = ghostBatchSize
        c.brnRMax = brnRmax
        c.brnDMax = brnDmax
        c.freezeBNAfter = freezeBnAfter
        c.crossIteration = CrossIterationOptions(window: cbnWindow, rho: cbnRho, burnIn: cbnBurnin,
                                                 gradient: cbnGradient)
        c.normalizationDiagnostics = cbnDiagnostics
        c.inTrackRunningStats = inTrackRunningStats
        c.shuffleBN = shuffleBn
        c.domainBN = domainBn
        c.sampler = sampler
        c.weightGradientLeaf = weightGradientLeaf
        c.convBackend = convBackend ?? (try? ConvolutionBackendSetting.commandLineDefault()) ?? .auto
        c.preciseBNSamples = precise.preciseBnSamples
        c.preciseBNBatchSize = precise.preciseBnBatchSize
        return c
    }

    func run() throws {
        memory.apply()
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
        let timeout = watch.collectiveTimeout, resetWindows = resetCbnWindows, checked = checkCollectives, nodeGroups = syncGroupSize == "node"
        let allGroups = syncGroupSize == "all"
        let automatic = resume == "auto", overwrite = overwriteMetrics
        let allowed = allowedChangeFlags
        // One writer per output: the launcher's rank 0 (the one that writes) holds an advisory lock
        // on --save and --metrics for the job's life; a second job on either stops here.
        var locks: [WriterLock] = []
        var lockFailure: Error?
        if MPICommunicator.launcherRank == 0 {
            do {
                for case let (flag, path?) in [("--save", savePath), ("--metrics", metricsPath)] { locks.append(try WriterLock(for: path, flag: flag)) }
            } catch { lockFailure = error }
        }
        withExtendedLifetime(locks) {
        RankLaunch.run(simulateRanks: simulateRanks, command: "syncbn-train", preflight: lockFailure ?? loaded.failure, collectiveTimeout: timeout) { launched in
            let watched = launched as! WatchdogCommunicator
            let world: any Communicator = checked ? CheckedCommunicator(watched) : watched
            let (split, heldOutOverlap) = try loaded.get()
            var configuration = configuration
            // Before any other collective: every rank must run the same job on the same data.
            var agreement = RunAgreement()
            try agreement.add(configuration: configuration)
            agreement.add("--sync-group-size node", nodeGroups ? "yes" : "no")
            agreement.add("--sync-group-size all", allGroups ? "yes" : "no")
            agreement.add(data: split.train, as: "--data (the training set)")
            agreement.add(data: split.heldOut, as: "--eval-data (the held-out set)")
            if let resumePath { agreement.add(file: resumePath, as: "--resume") } else { agreement.add("--resume", "unset") }
            agreement.add("--save", savePath == nil ? "unset" : "set")
            agreement.add("--save-every", saveEvery.map(String.init) ?? "unset")
            agreement.add("--resume auto", automatic ? "yes" : "no")
            agreement.add("--reset-cbn-windows", resetWindows ? "yes" : "no")
            agreement.add("--overwrite-metrics", overwrite ? "yes" : "no")
            agreement.add("--check-collectives", checked ? "yes" : "no")
            agreement.add("--collective-timeout", "\(timeout)")
            agreement.add("--allow-config-change", allowed.sorted().joined(separator: ","))
            assert(Set(RunAgreement.comparedFlags).isSubset(of: agreement.settings.map(\.name)), "a compared flag is not added")
            // Over the unchecked communicator: --check-collectives on some ranks only is itself a
            // difference to report, not a mismatch in the check's own collective.
            try agreement.check(watched)
            if nodeGroups { configuration.syncGroupSize = try RunAgreement.nodeGroupSize(world) }
            // 'all' is the default of the norms that synchronize; MABN's default is per rank.
            if allGroups && configuration.norm.synchronizesOnRequest { configuration.syncGroupSize = world.size }
            let trainer = try world.agreeing { try Trainer(configuration: configuration, data: split, world: world) }
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
            // A resume continues the checkpoint's run: a setting that changes the trajectory must be
            // the same, unless --allow-config-change names it (the ranks and the per-rank batch may
            // change together, at the same global batch). More steps or epochs are the same run
            // when the learning rate of every step already trained is the same under both.
            var allowedChanges: [String] = [], allowedFields: [String] = []
            if let resumePath {
                let metadata = try Safetensors.metadata(resumePath)
                if let text = metadata["configuration"], let stored = try? TrainingConfiguration.decoding(json: text) {
                    let storedRanks = metadata["ranks"].flatMap { Int($0) }
                    var differences = stored.trajectoryDifferences(from: configuration, ranks: storedRanks, otherRanks: world.size)
                    if let trained = metadata["step"].flatMap({ Int($0) }), let storedRanks,
                       stored.batchSize * storedRanks == configuration.batchSize * world.size {
                        let perEpoch = trainer.stepsPerEpoch
                        let old = stored.learningRatePlan(ranks: storedRanks, stepsPerEpoch: perEpoch,
                                                          totalSteps: stored.steps ?? stored.epochs * perEpoch)
                        let new = trainer.learningRatePlan
                        if (0..<trained).allSatisfy({ old.rate(at: $0) == new.rate(at: $0) }) {
                            differences.removeAll { $0.field == "steps" || $0.field == "epochs" }
                        }
                    }
                    if let refused = differences.first(where: { !allowed.contains(RunAgreement.flagName($0.field)) }) {
                        throw CollectiveRunError("--resume \(resumePath) continues a run with other settings: \(refused.text); resume with the checkpoint's settings, or pass --allow-config-change \(RunAgreement.flagName(refused.field).dropFirst(2)) to continue with the new one")
                    }
                    allowedChanges = differences.map(\.text)
                    allowedFields = differences.map(\.field) + ["steps", "epochs"]
                }
            }
            if let resumePath {
                try world.agreeing { try trainer.resume(from: resumePath, resetCrossIterationWindows: resetWindows) }
                guard trainer.step < trainer.totalSteps || automatic else {
                    throw CollectiveRunError("\(resumePath) is at step \(trainer.step), at or past this run's \(trainer.totalSteps) steps: nothing to train (raise --steps or --epochs, or use syncbn-train evaluate)")
                }
            }
            if automatic && trainer.step >= trainer.totalSteps {
                // A scheduler's retry of a finished job: nothing to do, and that is success.
                if world.rank == 0 { FileHandle.standardError.write(Data("syncbn-train: \(resumePath ?? "") is at step \(trainer.step) of \(trainer.totalSteps): the run is done, nothing to train\n".utf8)) }
                return
            }
            try trainer.chooseConvolutionBackends()
            if world.rank == 0 {
                for change in allowedChanges {
                    let plan = trainer.learningRatePlan
                    FileHandle.standardError.write(Data("syncbn-train: resuming with a changed setting (--allow-config-change): \(SettingNames.render(change)); the learning rate from step \(trainer.step) follows the new settings (\(String(format: "%.6g", plan.rate(at: trainer.step))) there, peak \(String(format: "%.6g", plan.peak)))\n".utf8))
                }
                if let metricsPath {
                    trainer.metrics = try MetricsWriter(path: metricsPath, append: resumePath != nil,
                                                        history: resumePath != nil && !overwrite ? configuration : nil, ranks: world.size,
                                                        allowing: Set(allowedFields), purgingAfter: resumePath.map { _ in trainer.step })
                    if trainer.metrics?.repairedPartialLine == true {
                        FileHandle.standardError.write(Data("syncbn-train: \(metricsPath) ended in a partial line (an interrupted write); it was cut off\n".utf8))
                    }
                    if let purged = trainer.metrics?.purgedLines, purged > 0 {
                        FileHandle.standardError.write(Data("syncbn-train: \(metricsPath): \(purged) line(s) after step \(trainer.step), the steps this resume replays, removed\n".utf8))
                    }
                    try trainer.metrics?.writeStart(configuration: configuration, ranks: world.size, resumedAt: resumePath.map { _ in trainer.step },
                                                    convolutionBackends: trainer.convolutionBackends)
                }
                trainer.progress = ProgressReporter()
                let groups: String
                if configuration.norm.isBatchFree || configuration.norm == .wn {
                    groups = "no batch statistics"
                } else if configuration.norm == .bn || (configuration.norm.synchronizesOnRequest && configuration.syncGroupSize == nil) {
                    groups = "per-rank statistics"
                } else {
                    groups = "statistics over \(configuration.syncGroupSize.map { min($0, world.size) } ?? world.size) rank(s)"
                }
                let plan = trainer.learningRatePlan
                let scaling = configuration.lrReferenceBatch.map { " = \(configuration.learningRate) × \(configuration.batchSize * world.size)/\($0)" } ?? ""
                trainer.progress?.line("syncbn-train: \(configuration.model.rawValue)\(configuration.width == 1 ? "" : " ×\(configuration.width)") with \(configuration.norm.rawValue) (\(groups)), \(world.size) rank(s) (\(RankLaunch.transportName(world))) × batch \(configuration.batchSize), \(trainer.totalSteps) steps, \(split.train.count) training / \(split.heldOut.count) held-out samples\(heldOutOverlap > 0 ? " (\(heldOutOverlap) of them also in the training set)" : ""), augmentation \(configuration.augmentation)")
                trainer.progress?.line(String(format: "lr: peak %.6g%@, %@ schedule, %d warm-up steps", plan.peak, scaling,
                                              configuration.lrSchedule.rawValue, plan.warmupSteps))
                if let resumePath { trainer.progress?.line("resumed from \(resumePath) at step \(trainer.step)") }
                if let line = convolutionBackendLine(trainer) { trainer.progress?.line(line) }
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
}

/// The convolutions' backends for the log: the counts, how they were decided, and with `auto` the
/// timing and the list that repeats the choice (`--conv-backend LIST`).
func convolutionBackendLine(_ trainer: Trainer) -> String? {
    guard let summary = trainer.convolutionBackendSummary, let backends = trainer.convolutionBackends else { return nil }
    var line = "convolutions: " + summary
    if !trainer.convolutionBackendSeconds.isEmpty {
        let total = trainer.convolutionBackendSeconds.reduce((0.0, 0.0)) { ($0.0 + $1[0], $0.1 + $1[1]) }
        let chosen = zip(trainer.convolutionBackendSeconds, backends).reduce(0.0) { $0 + ($1.1 == .onednn ? $1.0[1] : $1.0[0]) }
        line += String(format: ": %.1f ms per step against %.1f (im2col) and %.1f (onednn); repeat with --conv-backend %@",
                       chosen * 1e3, total.0 * 1e3, total.1 * 1e3, backends.listText)
    }
    return line
}
