import Collectives
import Foundation
import Kernels
import Normalization

/// An error raised identically on every rank at the same point of the run (a non-finite loss
/// seen through the all-reduced value, ranks that disagree): every rank can stop cleanly without
/// aborting the job. Other errors may be raised by one rank alone.
public struct CollectiveRunError: Error, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// Held-out loss and accuracy over all ranks.
public struct Evaluation: Equatable, Sendable {
    public let loss: Double
    public let accuracy: Double
    public let count: Int
}

/// What a finished run reports.
public struct TrainingSummary: Sendable {
    public let steps: Int
    /// The final evaluation with the statistics the model ends with (PreciseBN's when computed).
    public let evaluation: Evaluation
    /// Every final evaluation by statistics (`ema`, `precise`).
    public let evaluations: [String: Evaluation]
    public let seconds: Double
    public let samplesPerSecond: Double
}

/// Data-parallel training of one `Network` replica per rank (DESIGN §3.3).
///
/// Per step: this rank's piece of the global batch, forward in training mode, softmax
/// cross-entropy scaled by 1/(global batch size), backward (SyncBN layers issue their own
/// collectives) with the flattened gradients all-reduced(SUM) in buckets started without
/// blocking as backward produces them — afterwards they are the gradients of the global mean
/// loss on every rank — and an SGD step. The last bucket carries the step's loss sum and correct
/// count, and, when batch statistics are not shared by all ranks
/// (`--norm bn`, or sync groups smaller than the job), each rank's running statistics divided by
/// the number of ranks, so the buffers stay the rank average and identical everywhere.
public final class Trainer {
    public let configuration: TrainingConfiguration
    public let world: any Communicator
    public let ledger: InstrumentedCommunicator.Ledger
    public let network: Network
    public let optimizer: SGD
    public let data: DataSplit
    public private(set) var step = 0
    /// Seconds spent assembling batches (sampling and gathering samples), since creation.
    public private(set) var dataSeconds = 0.0
    public var metrics: MetricsWriter?
    public var progress: ProgressReporter?

    private var sampler: ShardedSampler
    private lazy var plan = learningRatePlan
    private let averageRunningStatistics: Bool
    /// The EMA running statistics by buffer name while the model holds PreciseBN's instead
    /// (after the final evaluation); saved beside them so that a resumed run continues from the EMA.
    public private(set) var emaBuffers: [String: [Float]]?
    /// Set once weight normalization's data-dependent initialisation has run (or a checkpoint was loaded).
    private var weightNormInitialized = false

    /// Builds the model and, for SyncBN with `syncGroupSize` < ranks, splits the world into
    /// groups of consecutive ranks. `world` is wrapped to count collectives and their time.
    public init(configuration: TrainingConfiguration, data: DataSplit, world base: any Communicator) throws {
        let instrumented = InstrumentedCommunicator(base)
        self.configuration = configuration
        self.world = instrumented
        self.ledger = instrumented.ledger
        self.data = data
        let ranks = base.size
        if let problem = configuration.problem() { throw CollectiveRunError(problem) }
        if configuration.norm == .in && data.train.sampleShape.count != 3 {
            throw CollectiveRunError("--norm in normalizes each channel over H×W and needs C×H×W samples; the data has samples of shape \(data.train.sampleShape)")
        }
        let groupSize = configuration.syncGroupSize ?? ranks
        // Errors of the configuration itself: every rank finds them alike (the ranks have agreed
        // on the configuration), so they are collective errors, printed once.
        if let ghost = configuration.ghostBatchSize {
            guard configuration.norm == .bn || configuration.norm == .syncbn else {
                throw CollectiveRunError("--ghost-batch-size works with --norm bn or syncbn, not \(configuration.norm.rawValue)")
            }
            guard ghost >= 1 && ghost <= configuration.batchSize else {
                throw CollectiveRunError("--ghost-batch-size must be between 1 and the per-rank batch \(configuration.batchSize), got \(ghost)")
            }
        }
        guard groupSize <= ranks else {
            throw CollectiveRunError("--sync-group-size \(groupSize) exceeds the \(ranks) rank\(ranks == 1 ? "" : "s") of this job")
        }
        guard ranks % groupSize == 0 else {
            throw CollectiveRunError("--sync-group-size \(groupSize) does not divide the \(ranks) ranks of this job (groups would differ in size)")
        }
        guard data.train.count >= 2 else { throw CollectiveRunError("the training set has \(data.train.count) sample(s); at least 2 are needed") }
        guard data.heldOut.count >= 1 else { throw CollectiveRunError("the held-out set is empty: nothing to evaluate on") }
        let synced = [.syncbn, .cbn, .brn, .rbn, .wnMeanOnly, .ibn].contains(configuration.norm)
        // Feature vectors (the MLP) have one value per channel and sample: a BN batch of one
        // sample has no statistics. Caught here rather than after training (PreciseBN).
        if configuration.model == .mlp && !configuration.norm.isBatchFree && configuration.evalStats != .ema {
            let perRank = configuration.preciseBNBatchSize ?? configuration.batchSize
            let shared = synced ? groupSize : 1
            guard perRank * shared >= 2 else {
                throw CollectiveRunError("--precise-bn-batch-size \(perRank) gives PreciseBN batches of one sample, which have no statistics for the MLP's BN layers; use at least 2 (or --eval-stats ema)")
            }
        }
        var group: (any Communicator)?
        if configuration.shuffleBN && configuration.norm != .bn {
            throw CollectiveRunError("--shuffle-bn shuffles the samples of per-rank BN; use it with --norm bn")
        }
        if (synced || configuration.shuffleBN) && ranks > 1 && groupSize > 1 {
            group = groupSize == ranks ? instrumented : try instrumented.split(color: base.rank / groupSize, key: base.rank)
        }
        let sharesAll = synced && groupSize == ranks
        averageRunningStatistics = ranks > 1 && !sharesAll && (!configuration.norm.isBatchFree || configuration.inTrackRunningStats)
        var factory = NormalizationFactory(kind: configuration.norm, group: group, epsilon: configuration.bnEpsilon,
                                           momentum: configuration.bnMomentum, crossIteration: configuration.crossIteration,
                                           groupNormGroups: configuration.gnGroups,
                                           ghost: configuration.ghostBatchSize.map { size in (size, (configuration.batchSize + size - 1) / size) })
        factory.instanceNormRunningStatistics = configuration.inTrackRunningStats
        if configuration.shuffleBN { factory.shuffle = group.map { ($0, configuration.seed) } }
        if configuration.domainBN {
            guard configuration.norm == .bn || configuration.norm == .syncbn else {
                throw CollectiveRunError("--domain-bn keeps per-domain statistics for --norm bn or syncbn, not \(configuration.norm.rawValue)")
            }
            guard let domains = data.train.domains else {
                throw CollectiveRunError("--domain-bn needs data with domain labels: --data two-domain:SOURCE or npy:X,Y,DOMAINS")
            }
            guard data.heldOut.domains != nil else {
                throw CollectiveRunError("--domain-bn needs domain labels for the held-out set too (--eval-data two-domain:… or npy:X,Y,DOMAINS)")
            }
            factory.domainCount = max(Int(domains.max() ?? 0), Int(data.heldOut.domains?.max() ?? 0)) + 1
        }
        network = try Network.make(configuration.model, sampleShape: data.train.sampleShape, classes: data.train.classes,
                                   normalization: factory, width: configuration.width, seed: configuration.seed)
        optimizer = SGD(learningRate: Float(configuration.learningRate), momentum: Float(configuration.momentum),
                        weightDecay: Float(configuration.weightDecay))
        sampler = ShardedSampler(sampleCount: data.train.count, globalBatchSize: configuration.batchSize * ranks,
                                 seed: configuration.seed, ranks: ranks, rank: base.rank,
                                 classSortedLabels: configuration.sampler == .classSorted ? data.train.labels : nil)
    }

    /// Layers whose gradients are finished after the exchange (``ExchangedGradients``).
    private lazy var deferringLayers: [ExchangedGradients] = {
        let layers = network.leaves.compactMap { $0.layer as? ExchangedGradients }
        for layer in layers { layer.defersGradients = true }
        return layers
    }()

    public var stepsPerEpoch: Int { sampler.stepsPerEpoch }
    public var totalSteps: Int { configuration.steps ?? configuration.epochs * sampler.stepsPerEpoch }

    /// The learning rate of every step: warm-up, schedule and the linear scaling rule.
    public var learningRatePlan: LearningRatePlan {
        configuration.learningRatePlan(ranks: world.size, stepsPerEpoch: sampler.stepsPerEpoch, totalSteps: totalSteps)
    }

    /// The watchdog of the job's collectives, if any: told which step is running, so that a
    /// timeout can say where it happened.
    public var watchdog: CollectiveWatchdog? {
        didSet {
            guard let watchdog else { network.trace = nil; return }
            network.trace = { pass, layer in watchdog.mark(pass, layer) }
        }
    }

    /// Periodic checkpoints written by ``run()`` to `path` every `every` steps before the last
    /// (the checkpoint at the end of the run is the caller's, after the final evaluation).
    public var checkpointing: (path: String, every: Int?)?

    /// Continues from a checkpoint written by ``save(to:)``: with the EMA statistics when the file
    /// keeps them beside PreciseBN's (`forTraining`), otherwise with the statistics it stores.
    /// With `resetCrossIterationWindows` a checkpoint written by another number of ranks may be
    /// resumed: every cross-iteration BN window starts empty.
    public func resume(from path: String, forTraining: Bool = true, resetCrossIterationWindows: Bool = false) throws {
        weightNormInitialized = true   // the checkpoint holds trained (or initialised) g and v
        let (metadata, ema) = try Checkpoint.load(path, into: network, optimizer: optimizer, preferEMA: forTraining, rank: world.rank,
                                                  ranks: world.size, resetRankLocal: resetCrossIterationWindows)
        emaBuffers = forTraining ? nil : ema
        guard let text = metadata["step"], let saved = Int(text), saved >= 0 else {
            throw FileFormatError(path, "metadata has no valid 'step'")
        }
        step = saved
    }

    /// What a model needs outside syncbn: the architecture and the input standardization
    /// (JSON values in checkpoint metadata).
    public var inferenceMetadata: [String: String] {
        func json(_ values: [Double]) -> String { "[" + values.map { String($0) }.joined(separator: ",") + "]" }
        let architecture = "{\"model\":\"\(configuration.model.rawValue)\",\"width\":\(configuration.width),\"norm\":\"\(configuration.norm.rawValue)\",\"input_shape\":[\(data.train.sampleShape.map(String.init).joined(separator: ","))],\"classes\":\(data.train.classes)}"
        return ["input_mean": json(data.inputMean), "input_std": json(data.inputStd), "architecture": architecture]
    }

    /// Writes a checkpoint. Collective: rank-local state (cross-iteration BN windows) is
    /// gathered from every rank, then rank 0 writes the file.
    public func save(to path: String, extraMetadata: [String: String] = [:]) throws {
        watchdog?.context = "checkpoint at step \(step)"
        for case let cbn as CrossIterationBatchNorm<Float> in network.leaves.map(\.layer) { try cbn.reduceWindowDerivatives() }
        var rankLocal: [String: [[Double]]] = [:]
        for entry in network.state {
            if case let .rankLocal(name, state) = entry { rankLocal[name] = try world.allGather(state.values) }
        }
        guard world.rank == 0 else { return }
        let configurationJSON = String(decoding: try sortedJSONEncoder().encode(configuration), as: UTF8.self)
        var metadata = ["step": String(step), "epoch": String(step / max(sampler.stepsPerEpoch, 1)),
                        "configuration": configurationJSON, "ranks": String(world.size),
                        "statistics": emaBuffers == nil ? "ema" : "precise"]
        metadata.merge(inferenceMetadata) { $1 }
        metadata.merge(extraMetadata) { $1 }
        try Checkpoint.save(network: network, optimizer: optimizer, emaBuffers: emaBuffers, rankLocal: rankLocal,
                            metadata: metadata, to: path)
    }

    /// Weight normalization's data-dependent initialisation on the first training batch: one
    /// forward in which every weight-normalized layer, in order, sets g (and the bias after it)
    /// from its pre-activation statistics over all ranks (one all-reduce per layer), so that every
    /// replica starts alike and the result does not depend on how the batch is split.
    func initializeWeightNorm(with x: Tensor<Float>) throws {
        let leaves = network.leaves, world = self.world
        for (index, entry) in leaves.enumerated() {
            let bias = index + 1 < leaves.count ? (leaves[index + 1].layer as? ChannelBias<Float>)?.bias : nil
            let allReduce: (inout [Double]) throws -> Void = { try world.allReduceSum(&$0) }
            if let layer = entry.layer as? WeightNorm<Float, Conv2d<Float>> { layer.initializeOnNextForward(bias: bias, allReduce: allReduce) }
            if let layer = entry.layer as? WeightNorm<Float, Linear<Float>> { layer.initializeOnNextForward(bias: bias, allReduce: allReduce) }
        }
        watchdog?.context = "weight-norm initialisation"
        _ = try network.forward(x, mode: .batchStatistics)
        weightNormInitialized = true
    }

    /// One optimizer step; returns the global mean loss and accuracy of the batch.
    @discardableResult
    public func trainStep() throws -> (loss: Double, accuracy: Double, samples: Int, learningRate: Double) {
        if configuration.norm == .brn {
            let (rMax, dMax) = configuration.brnLimits(step: step, totalSteps: totalSteps)
            for case let layer as BatchRenormalization<Float> in network.batchNormLayers {
                layer.rMax = rMax
                layer.dMax = dMax
            }
        }
        if let freeze = configuration.freezeBNAfter {
            for layer in network.batchNormLayers { layer.frozen = step >= freeze }
        }
        watchdog?.context = "training step \(step + 1)"
        _ = deferringLayers
        let dataStart = DispatchTime.now().uptimeNanoseconds
        let (indices, globalCount, epoch) = sampler.batch(step: step)
        let (x, labels) = data.train.batch(indices, augmentation: configuration.augmentation, seed: configuration.seed, epoch: epoch)
        network.setDomains(data.train.domains(of: indices))
        dataSeconds += Double(DispatchTime.now().uptimeNanoseconds - dataStart) * 1e-9
        network.sampleOffset = contiguousPiece(of: globalCount, parts: world.size, index: world.rank).lowerBound
        if configuration.norm.isWeightNormalized && step == 0 && !weightNormInitialized {
            try initializeWeightNorm(with: x)
        }
        let logits = try network.forward(x, mode: .training)
        let (_, correct, gradient, fixedLoss) = try softmaxCrossEntropy(logits: logits, labels: labels, scale: 1 / Float(globalCount))

        // Gradient buckets: as soon as backward has finished enough layers to fill a bucket, its
        // all-reduce starts without blocking and overlaps the rest of backward. The last bucket
        // also carries the running statistics (when ranks keep their own) and the loss and correct
        // count as integers (a fixed-point loss, in Float pieces that add exactly), whose sum does
        // not depend on the order of addition. Every rank forms the same buckets in the same order.
        var pending: [Parameter<Float>] = []
        var pendingCount = 0
        var inFlight: [(request: AllReduceRequest<Float>, parameters: [Parameter<Float>])] = []
        func startBucket(extra: [Float] = []) throws {
            var flat: [Float] = []
            flat.reserveCapacity(pendingCount + extra.count)
            for p in pending { flat.append(contentsOf: p.gradient.scalars) }
            flat.append(contentsOf: extra)
            inFlight.append((try world.startAllReduceSum(flat), pending))
            pending = []
            pendingCount = 0
        }
        let bucketSize = max(configuration.gradientBucketSize, 1)
        try network.backward(gradient) { layer in
            for p in layer.parameters.reversed() {
                pending.append(p)
                pendingCount += p.gradient.count
            }
            if pendingCount >= bucketSize { try startBucket() }
        }
        let buffers = averageRunningStatistics ? network.namedBuffers : []
        let share = 1 / Float(world.size)
        var extra: [Float] = []
        for (_, b) in buffers { extra.append(contentsOf: b.value.scalars.map { $0 * share }) }
        let counts = [fixedLoss.units, fixedLoss.outOfRange, Int64(correct)]
        let countsRide = world.size <= IntegerPieces.maximumRanks
        if countsRide { extra += counts.flatMap(IntegerPieces.encode) }
        try startBucket(extra: extra)
        let totalsRequest = countsRide ? nil : try world.startAllReduceSum(counts)

        var flat: [Float] = []
        for (request, parameters) in inFlight {
            flat = try request.wait()
            var offset = 0
            for p in parameters {
                p.gradient.scalars.replaceSubrange(0..<p.gradient.count, with: flat[offset..<(offset + p.gradient.count)])
                offset += p.gradient.count
            }
            flat.removeFirst(offset)
        }
        var offset = 0
        for (_, b) in buffers {
            b.value.scalars.replaceSubrange(0..<b.value.count, with: flat[offset..<(offset + b.value.count)])
            offset += b.value.count
        }
        // Gradients that are functions of the summed ones (weight normalization's), and
        // contributions that every rank computed alike from group-wide statistics (the
        // compensated cross-iteration BN gradient), once, after the exchange.
        for layer in deferringLayers { layer.finishExchangedGradients() }
        for (_, p) in network.namedParameters { p.applyPendingGradient() }
        let totals = try totalsRequest?.wait()
            ?? (0..<3).map { IntegerPieces.decode(flat[(offset + $0 * IntegerPieces.count)..<(offset + ($0 + 1) * IntegerPieces.count)]) }
        var lossTotal = FixedPointLoss()
        lossTotal.units = totals[0]
        lossTotal.outOfRange = totals[1]
        let loss = lossTotal.value / Double(globalCount)
        let accuracy = Double(totals[2]) / Double(globalCount)
        guard loss.isFinite else {
            throw CollectiveRunError("loss is \(loss) at step \(step + 1) (epoch \(epoch)): training diverged; lower --lr")
        }
        let rate = plan.rate(at: step)
        optimizer.learningRate = Float(rate)
        optimizer.step(network.namedParameters)
        step += 1
        return (loss, accuracy, globalCount, rate)
    }

    /// Held-out loss and accuracy with the running statistics (inference mode: no BN collectives).
    /// Each rank evaluates its contiguous piece; one all-reduce combines them.
    public func evaluate() throws -> Evaluation {
        watchdog?.context = "evaluation after step \(step)"
        let piece = contiguousPiece(of: data.heldOut.count, parts: world.size, index: world.rank)
        var loss = FixedPointLoss(), correct = 0
        var start = piece.lowerBound
        while start < piece.upperBound {
            let end = min(start + configuration.evalBatchSize, piece.upperBound)
            let (x, labels) = data.heldOut.batch(start..<end)
            network.setDomains(data.heldOut.domains(of: start..<end))
            network.sampleOffset = start
            let logits = try network.forward(x, mode: .inference)
            let (_, batchCorrect, _, batchLoss) = try softmaxCrossEntropy(logits: logits, labels: labels, scale: 0)
            loss.units += batchLoss.units
            loss.outOfRange += batchLoss.outOfRange
            correct += batchCorrect
            start = end
        }
        var totals = [loss.units, loss.outOfRange, Int64(correct), Int64(piece.count)]
        try world.allReduceSum(&totals)
        loss.units = totals[0]
        loss.outOfRange = totals[1]
        return Evaluation(loss: loss.value / Double(totals[3]), accuracy: Double(totals[2]) / Double(totals[3]), count: Int(totals[3]))
    }

    /// The running statistics by buffer name.
    var runningStatistics: [String: [Float]] {
        Dictionary(uniqueKeysWithValues: network.namedBuffers.map { ($0.name, $0.buffer.value.scalars) })
    }

    /// Replaces the running statistics with PreciseBN's, computed on the training set with the
    /// configured budget and batch size (the model is otherwise untouched). With `rememberEMA`
    /// the EMA values are kept in ``emaBuffers`` (and so in the next checkpoint).
    @discardableResult
    public func recomputePopulationStatistics(on dataset: Dataset? = nil, rememberEMA: Bool = false) throws -> PreciseBN.Report {
        watchdog?.context = "PreciseBN after step \(step)"
        if rememberEMA && emaBuffers == nil { emaBuffers = runningStatistics }
        return try PreciseBN.recompute(network: network, data: dataset ?? data.train, sampleBudget: configuration.preciseBNSamples,
                                batchSize: configuration.preciseBNBatchSize ?? configuration.batchSize,
                                seed: configuration.seed, world: world)
    }

    /// Evaluates with the statistics `--eval-stats` asks for. PreciseBN's statistics replace the
    /// EMA only for the evaluation, unless `keepPrecise` (the end of a run), in which case the
    /// EMA values are kept in ``emaBuffers`` for the checkpoint.
    public func evaluations(keepPrecise: Bool = false) throws -> [(statistics: String, evaluation: Evaluation)] {
        var results: [(statistics: String, evaluation: Evaluation)] = []
        if configuration.evalStats != .precise { results.append(("ema", try evaluate())) }
        if configuration.evalStats != .ema {
            let ema = runningStatistics
            try recomputePopulationStatistics(rememberEMA: keepPrecise)
            results.append(("precise", try evaluate()))
            if !keepPrecise {
                for (name, buffer) in network.namedBuffers { buffer.value.scalars = ema[name]! }
            }
        }
        for (statistics, evaluation) in results { try report(evaluation, statistics: statistics) }
        return results
    }

    /// Verifies that every rank holds bitwise the same parameters and buffers (they must: all
    /// ranks apply the same all-reduced update). One all-gather of a checksum.
    public func verifyReplicasAgree() throws {
        var hash: UInt64 = 0xCBF2_9CE4_8422_2325
        for entry in network.state {
            let values: [Float]
            switch entry {
            case let .parameter(_, p): values = p.value.scalars
            case let .buffer(_, b): values = b.value.scalars
            case let .counter(_, c): values = [Float(c.value)]
            case .rankLocal: continue   // differs between ranks by design
            }
            for v in values { hash = (hash ^ UInt64(v.bitPattern)) &* 0x100_0000_01B3 }
        }
        let all = try world.allGather([Int64(bitPattern: hash)])
        guard all.allSatisfy({ $0 == all[0] }) else {
            throw CollectiveRunError("model replicas differ between ranks after step \(step) (checksums \(all.map { $0[0] }))")
        }
    }

    /// Trains until ``totalSteps``, evaluating every `evalEvery` steps and at the end; rank 0
    /// reports progress and metrics.
    public func run() throws -> TrainingSummary {
        let total = totalSteps
        let started = Date()
        // The interval since the last log line: loss and accuracy are sample-weighted means over
        // its steps (each step's value is the global batch mean), samples/s counts training only.
        var intervalStart = Date(), intervalSamples = 0, intervalSteps = 0, intervalComm = ledger.blockedSeconds
        var intervalLoss = 0.0, intervalCorrect = 0.0
        var trained = 0
        while step < total {
            let (loss, accuracy, samples, rate) = try trainStep()
            intervalSamples += samples
            intervalSteps += 1
            intervalLoss += loss * Double(samples)
            intervalCorrect += accuracy * Double(samples)
            trained += samples
            let logNow = step % max(configuration.logEvery, 1) == 0 || step == total
            if world.rank == 0 {
                let elapsed = Date().timeIntervalSince(intervalStart)
                let samplesPerSecond = Double(intervalSamples) / max(elapsed, 1e-9)
                let meanLoss = intervalLoss / Double(max(intervalSamples, 1)), meanAccuracy = intervalCorrect / Double(max(intervalSamples, 1))
                let epoch = (step - 1) / max(sampler.stepsPerEpoch, 1)
                let text = String(format: "step %d/%d  epoch %d  loss %.4f  acc %.1f%%  lr %.4g  %.0f samples/s",
                                  step, total, epoch, meanLoss, meanAccuracy * 100, rate, samplesPerSecond)
                progress?.step(text, milestone: logNow, final: step == total)
                if logNow {
                    try metrics?.write(["step": step, "epoch": epoch, "steps": intervalSteps, "loss": meanLoss, "accuracy": meanAccuracy,
                                    "lr": rate, "samples_per_s": samplesPerSecond, "comm_s": ledger.blockedSeconds - intervalComm])
                    if configuration.normalizationDiagnostics {
                        try metrics?.write(["event": "diagnostics", "step": step, "layers": network.normalizationDiagnostics()])
                    }
                }
            }
            if configuration.evalEvery > 0 && step % configuration.evalEvery == 0 && step < total {
                _ = try evaluations()
            }
            if let (path, every) = checkpointing, let every, step % every == 0 && step < total {
                try save(to: path)
            }
            if logNow {
                intervalStart = Date(); intervalSamples = 0; intervalSteps = 0; intervalComm = ledger.blockedSeconds
                intervalLoss = 0; intervalCorrect = 0
            }
        }
        let seconds = Date().timeIntervalSince(started)
        let final = try evaluations(keepPrecise: true)
        try verifyReplicasAgree()
        return TrainingSummary(steps: step, evaluation: final.last!.evaluation,
                               evaluations: Dictionary(uniqueKeysWithValues: final.map { ($0.statistics, $0.evaluation) }),
                               seconds: seconds, samplesPerSecond: Double(trained) / max(seconds, 1e-9))
    }

    private func report(_ evaluation: Evaluation, statistics: String) throws {
        guard world.rank == 0 else { return }
        try metrics?.write(["event": "eval", "stats": statistics, "step": step, "loss": evaluation.loss, "accuracy": evaluation.accuracy])
        progress?.line(String(format: "eval  step %d  held-out loss %.4f  accuracy %.2f%% (%d samples, %@ statistics)",
                              step, evaluation.loss, evaluation.accuracy * 100, evaluation.count,
                              statistics == "ema" ? "EMA" : "PreciseBN"))
    }
}

/// Non-negative integers carried exactly by a Float all-reduce: 12 bits per Float, so each
/// piece's sum over up to 4,096 ranks stays below 2²⁴, where every Float sum of integers is exact
/// in any order.
enum IntegerPieces {
    static let count = 6
    static let maximumRanks = 4096

    static func encode(_ value: Int64) -> [Float] {
        precondition(value >= 0, "IntegerPieces carries non-negative integers")
        return (0..<count).map { Float((value >> (12 * $0)) & 0xFFF) }
    }

    static func decode(_ pieces: ArraySlice<Float>) -> Int64 {
        pieces.enumerated().reduce(Int64(0)) { $0 &+ (Int64($1.element) << (12 * $1.offset)) }
    }
}
