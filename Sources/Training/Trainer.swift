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
    public var description: String { SettingNames.render(message) }
}

extension Communicator {
    /// Runs `body`, which every rank runs at the same point (building the model, reading a
    /// checkpoint), and agrees on how it went: when it throws on any rank, every rank throws a
    /// ``CollectiveRunError`` with the message of the lowest rank that failed, so the job ends
    /// cleanly with one line instead of one per rank and an abort. Two collectives: one
    /// all-gather always, a broadcast of the message after a failure.
    public func agreeing<T>(_ body: () throws -> T) throws -> T {
        var result: Result<T, Error>
        do { result = .success(try body()) } catch { result = .failure(error) }
        var message: [Int64] = []
        if case let .failure(error) = result {
            message = String(describing: error).utf8.prefix(4096).map { Int64($0) }
        }
        var failed = false
        if case .failure = result { failed = true }
        let lengths = try allGather([Int64(message.count), failed ? 1 : 0])
        guard let first = lengths.firstIndex(where: { $0[1] == 1 }) else { return try result.get() }
        var text = rank == first ? message : [Int64](repeating: 0, count: Int(lengths[first][0]))
        try broadcast(&text, root: first)
        let everyRank = lengths.allSatisfy { $0[1] == 1 }
        throw CollectiveRunError((everyRank || size == 1 ? "" : "rank \(first): ") + String(decoding: text.map { UInt8(clamping: $0) }, as: UTF8.self))
    }
}

/// How PreciseBN's statistics treat data with domain labels: one set over all domains, or one
/// per domain.
public enum PreciseBNDomains: String, CaseIterable, Sendable {
    case pooled
    case perDomain = "per-domain"
}

/// Held-out loss and accuracy over all ranks.
public struct Evaluation: Equatable, Sendable {
    public let loss: Double
    public let accuracy: Double
    public let count: Int
    /// For held-out data with domain labels: the accuracy on each domain's samples (domain order;
    /// nan for a domain with no held-out sample).
    public var domainAccuracies: [Double]? = nil

    /// "; by domain 91.20% / 88.05%" for the progress and evaluate lines ("" without domains).
    public var domainText: String {
        domainAccuracies.map { "; by domain " + $0.map { $0.isNaN ? "–" : String(format: "%.2f%%", $0 * 100) }.joined(separator: " / ") } ?? ""
    }

    /// The domain accuracies as JSON values (null for a domain without held-out samples).
    public var domainJSON: [Any]? { domainAccuracies.map { $0.map { $0.isNaN ? NSNull() as Any : $0 as Any } } }

    public init(loss: Double, accuracy: Double, count: Int, domainAccuracies: [Double]? = nil) {
        self.loss = loss
        self.accuracy = accuracy
        self.count = count
        self.domainAccuracies = domainAccuracies
    }
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

/// Data-parallel training of one `Network` replica per rank (DESIGN §3.3): any network, built by
/// ``init(configuration:data:world:)`` from a configuration or handed over to
/// ``init(network:optimizer:data:world:options:)``.
///
/// Per step: this rank's piece of the global batch, forward in training mode, softmax
/// cross-entropy scaled by 1/(global batch size), backward with the gradient exchange of
/// ``DataParallel`` (buckets all-reduced as backward produces them, the running statistics of
/// per-rank layers averaged, the loss and correct count riding in the last bucket as integers),
/// and an SGD step. Before each step every ``NormalizationLayer`` is told where the schedule is
/// (``NormalizationLayer/prepare(step:of:)``); before the first, layers with a data-dependent
/// initialisation are initialised from the first batch over all ranks.
public final class Trainer {
    public let configuration: TrainingConfiguration
    public let world: any Communicator
    public let ledger: InstrumentedCommunicator.Ledger
    public let network: Network
    public let optimizer: SGD
    public let data: DataSplit
    /// The gradient exchange.
    public let parallel: DataParallel
    /// Whether the network was handed over (not built from ``configuration``): its checkpoints
    /// say so, and only code that builds the same network can load them.
    public let isCustomNetwork: Bool
    public private(set) var step = 0
    /// Seconds spent assembling batches (sampling and gathering samples), since creation.
    public private(set) var dataSeconds = 0.0
    public var metrics: MetricsWriter?
    public var progress: ProgressReporter?

    private var sampler: ShardedSampler
    private lazy var plan = learningRatePlan
    private let parameters: [(name: String, parameter: Parameter<Float>)]
    /// The EMA running statistics by buffer name while the model holds PreciseBN's instead
    /// (after the final evaluation); saved beside them so that a resumed run continues from the EMA.
    public private(set) var emaBuffers: [String: [Float]]?
    /// Set once the data-dependent initialisation has run (or a checkpoint was loaded).
    private var dataInitialized = false

    /// The backend of each convolution of ``network`` (``Network/convolutions``' order), once
    /// chosen: from ``TrainingConfiguration/convBackend``, by timing for `auto`, or from the
    /// checkpoint a run resumes (so that a resumed run computes what the original did).
    public private(set) var convolutionBackends: [ConvolutionBackend]?
    /// How ``convolutionBackends`` was decided, for the log: "set", "timed at batch 32", "from the checkpoint".
    public private(set) var convolutionBackendOrigin = ""
    /// With `auto`: each convolution's forward + backward seconds with [im2col, onednn] on this rank.
    public private(set) var convolutionBackendSeconds: [[Double]] = []

    /// Trains `network` (one replica per rank, built alike on every rank) with `optimizer` on
    /// `data` over the ranks of `world`. `options` gives everything but the model: batch size,
    /// steps or epochs, learning-rate schedule, sampler, evaluation, PreciseBN, bucket size, seed
    /// (its model and normalization fields only describe the run). `world` is wrapped to count
    /// collectives and their time unless it is an ``InstrumentedCommunicator`` already.
    public convenience init(network: Network, optimizer: SGD, data: DataSplit, world: any Communicator,
                            options: TrainingConfiguration) throws {
        try self.init(network: network, optimizer: optimizer, data: data, world: world, options: options, custom: true)
    }

    /// The designated initializer; `custom` says whether the network was handed over.
    init(network: Network, optimizer: SGD, data: DataSplit, world base: any Communicator,
         options configuration: TrainingConfiguration, custom: Bool) throws {
        let instrumented = base as? InstrumentedCommunicator ?? InstrumentedCommunicator(base)
        if let problem = configuration.problem() { throw CollectiveRunError(problem) }
        guard data.train.count >= 2 else { throw CollectiveRunError("the training set has \(data.train.count) sample(s); at least 2 are needed") }
        guard data.heldOut.count >= 1 else { throw CollectiveRunError("the held-out set is empty: nothing to evaluate on") }
        if network.hasDomainBatchNorm && (data.train.domains == nil || data.heldOut.domains == nil) {
            throw CollectiveRunError("the network keeps per-domain statistics and needs domain labels for the training and held-out sets")
        }
        self.configuration = configuration
        self.world = instrumented
        self.ledger = instrumented.ledger
        self.network = network
        self.optimizer = optimizer
        self.data = data
        self.isCustomNetwork = custom
        parallel = DataParallel(network: network, world: instrumented, bucketSize: configuration.gradientBucketSize)
        parameters = network.namedParameters
        sampler = ShardedSampler(sampleCount: data.train.count, globalBatchSize: configuration.batchSize * base.size,
                                 seed: configuration.seed, ranks: base.size, rank: base.rank,
                                 classSortedLabels: configuration.sampler == .classSorted ? data.train.labels : nil)
    }

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
    /// Cross-iteration windows move to another number of ranks when their statistics groups
    /// cover the same samples (the group's window spans every rank); otherwise, with
    /// `resetCrossIterationWindows`, every window starts empty.
    public func resume(from path: String, forTraining: Bool = true, resetCrossIterationWindows: Bool = false) throws {
        dataInitialized = true   // the checkpoint holds trained (or initialised) parameters
        let sources = Checkpoint.rankLocalSources(rank: world.rank, ranks: world.size, configuration: configuration,
                                                  metadata: try Safetensors.metadata(path), path: path)
        let (metadata, ema) = try Checkpoint.load(path, into: network, optimizer: optimizer, preferEMA: forTraining,
                                                  rankLocalSources: sources, resetRankLocal: resetCrossIterationWindows)
        emaBuffers = forTraining ? nil : ema
        guard let text = metadata["step"], let saved = Int(text), saved >= 0 else {
            throw FileFormatError(path, "metadata has no valid 'step'")
        }
        step = saved
        // `auto` continues with the checkpoint's backends (one written before oneDNN used im2col).
        if configuration.convBackend == .auto {
            var backends = Array(repeating: ConvolutionBackend.im2col, count: network.convolutions.count)
            if let stored = metadata["conv_backends"] {
                guard let listed = stored.isEmpty ? [] : ConvolutionBackendSetting(stored)?.listed else {
                    throw FileFormatError(path, "metadata 'conv_backends' is not a list of im2col/onednn")
                }
                backends = listed
            }
            guard backends.count == network.convolutions.count else {
                throw FileFormatError(path, "metadata 'conv_backends' names \(backends.count) backend(s) for the model's \(network.convolutions.count) convolution(s)")
            }
            try applyConvolutionBackends(backends, origin: "from the checkpoint")
        }
    }

    /// Decides every convolution's backend (``convolutionBackends``) unless decided already, and
    /// sets it in the layers. Collective with `auto`: every rank times, rank 0's choice is kept.
    /// ``trainStep()`` and ``evaluate()`` call it; a caller that wants to report the choice before
    /// training calls it first.
    public func chooseConvolutionBackends() throws {
        guard convolutionBackends == nil else { return }
        let count = network.convolutions.count
        switch configuration.convBackend {
        case .all(let backend):
            try applyConvolutionBackends(Array(repeating: backend, count: count), origin: "set")
        case .perLayer(let list):
            try applyConvolutionBackends(list, origin: "set")
        case .auto:
            watchdog?.context = "timing the convolution backends"
            let (backends, seconds) = try ConvolutionBackendTiming.choose(for: network, sampleShape: data.train.sampleShape,
                                                                       batch: configuration.batchSize, domains: network.hasDomainBatchNorm,
                                                                       weightGradientLeaf: configuration.weightGradientLeaf, world: world)
            convolutionBackendSeconds = seconds
            try applyConvolutionBackends(backends, origin: "timed at batch \(configuration.batchSize)")
        }
    }

    /// "im2col for 1, onednn for 20 of 21 (timed at batch 32; CPU avx2)", once chosen.
    public var convolutionBackendSummary: String? {
        guard let backends = convolutionBackends, !backends.isEmpty else { return nil }
        let counts = ConvolutionBackend.allCases.compactMap { backend -> String? in
            let n = backends.filter { $0 == backend }.count
            return n == 0 ? nil : "\(backend.rawValue) for \(n)"
        }.joined(separator: ", ")
        return "\(counts) of \(backends.count) (\(convolutionBackendOrigin); CPU \(OneDNNConvolution.cpuISA))"
    }

    /// Sets `backends` in the convolutions, in order.
    private func applyConvolutionBackends(_ backends: [ConvolutionBackend], origin: String) throws {
        let convolutions = network.convolutions
        guard backends.count == convolutions.count else {
            throw CollectiveRunError("⟨convBackend⟩ lists \(backends.count) backend(s), but the model has \(convolutions.count) convolution(s); give one per convolution, or one for all")
        }
        for (conv, backend) in zip(convolutions, backends) { conv.layer.backend = backend }
        convolutionBackends = backends
        convolutionBackendOrigin = origin
    }

    /// What a model needs outside syncbn: the architecture and the input standardization
    /// (JSON values in checkpoint metadata).
    public var inferenceMetadata: [String: String] {
        func json(_ values: [Double]) -> String { "[" + values.map { String($0) }.joined(separator: ",") + "]" }
        let architecture = "{\"model\":\"\(isCustomNetwork ? "custom" : configuration.model.rawValue)\",\"width\":\(configuration.width),\"norm\":\"\(configuration.norm.rawValue)\",\"input_shape\":[\(data.train.sampleShape.map(String.init).joined(separator: ","))],\"classes\":\(data.train.classes)}"
        return ["input_mean": json(data.inputMean), "input_std": json(data.inputStd), "architecture": architecture]
    }

    /// Writes a checkpoint. Collective: rank-local state (cross-iteration BN windows) is
    /// gathered from every rank, then rank 0 writes the file.
    public func save(to path: String, extraMetadata: [String: String] = [:]) throws {
        watchdog?.context = "checkpoint at step \(step)"
        try network.finishPendingStatistics()
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
        if isCustomNetwork { metadata["network"] = "custom" }
        if let convolutionBackends { metadata["conv_backends"] = convolutionBackends.listText }
        metadata.merge(extraMetadata) { $1 }
        try Checkpoint.save(network: network, optimizer: optimizer, emaBuffers: emaBuffers, rankLocal: rankLocal,
                            metadata: metadata, to: path)
    }

    /// One optimizer step; returns the global mean loss and accuracy of the batch.
    @discardableResult
    public func trainStep() throws -> (loss: Double, accuracy: Double, samples: Int, learningRate: Double) {
        try chooseConvolutionBackends()
        network.prepare(step: step, of: totalSteps)
        watchdog?.context = "training step \(step + 1)"
        let dataStart = DispatchTime.now().uptimeNanoseconds
        let (indices, globalCount, epoch) = sampler.batch(step: step)
        let (x, labels) = data.train.batch(indices, augmentation: configuration.augmentation, seed: configuration.seed, epoch: epoch)
        network.setDomains(data.train.domains(of: indices))
        dataSeconds += Double(DispatchTime.now().uptimeNanoseconds - dataStart) * 1e-9
        network.sampleOffset = contiguousPiece(of: globalCount, parts: world.size, index: world.rank).lowerBound
        // Leaves of L samples only on full global batches (every rank's piece then a multiple of
        // L); a short last batch uses single-sample leaves, whatever the layout, so it stays exact.
        let leaf = globalCount == world.size * configuration.batchSize ? configuration.weightGradientLeaf : 1
        for (_, conv) in network.convolutions where conv.weightGradientLeaf != leaf { conv.weightGradientLeaf = leaf }
        if step == 0 && !dataInitialized {
            watchdog?.context = "data-dependent initialisation"
            let world = self.world
            try network.initializeFromData(x) { try world.allReduceSum(&$0) }
            watchdog?.context = "training step \(step + 1)"
        }
        dataInitialized = true
        let logits = try network.forward(x, mode: .training)
        let (_, correct, gradient, fixedLoss) = try softmaxCrossEntropy(logits: logits, labels: labels, scale: 1 / Float(globalCount))

        let totals = try parallel.backward(gradient, summing: [fixedLoss.units, fixedLoss.outOfRange, Int64(correct)])
        var lossTotal = FixedPointLoss()
        lossTotal.units = totals[0]
        lossTotal.outOfRange = totals[1]
        let loss = lossTotal.value / Double(globalCount)
        let accuracy = Double(totals[2]) / Double(globalCount)
        guard loss.isFinite else {
            throw CollectiveRunError("loss is \(loss) at step \(step + 1) (epoch \(epoch)): training diverged; lower ⟨learningRate⟩")
        }
        let rate = plan.rate(at: step)
        optimizer.learningRate = Float(rate)
        optimizer.step(parameters)
        step += 1
        return (loss, accuracy, globalCount, rate)
    }

    /// Held-out loss and accuracy with the running statistics (inference mode: no BN collectives).
    /// Each rank evaluates its contiguous piece; one all-reduce combines them.
    public func evaluate(on dataset: Dataset? = nil) throws -> Evaluation {
        try chooseConvolutionBackends()
        watchdog?.context = "evaluation after step \(step)"
        let heldOut = dataset ?? data.heldOut
        let piece = contiguousPiece(of: heldOut.count, parts: world.size, index: world.rank)
        var loss = FixedPointLoss(), correct = 0
        // With domain labels: correct and all samples per domain, the same first-maximum rule.
        let domainCount = heldOut.domains == nil ? 0 : heldOut.domainCount
        var perDomain = [Int64](repeating: 0, count: 2 * domainCount)
        var start = piece.lowerBound
        while start < piece.upperBound {
            let end = min(start + configuration.evalBatchSize, piece.upperBound)
            let (x, labels) = heldOut.batch(start..<end)
            let domains = heldOut.domains(of: start..<end)
            network.setDomains(domains)
            network.sampleOffset = start
            let logits = try network.forward(x, mode: .inference)
            let (_, batchCorrect, _, batchLoss) = try softmaxCrossEntropy(logits: logits, labels: labels, scale: 0)
            loss.units += batchLoss.units
            loss.outOfRange += batchLoss.outOfRange
            correct += batchCorrect
            if let domains {
                let classes = logits.shape[1]
                logits.scalars.withUnsafeBufferPointer { z in
                    for row in 0..<labels.count {
                        var best = 0
                        for k in 1..<classes where z[row * classes + k] > z[row * classes + best] { best = k }
                        let domain = Int(domains[row])
                        perDomain[2 * domain + 1] += 1
                        if best == Int(labels[row]) { perDomain[2 * domain] += 1 }
                    }
                }
            }
            start = end
        }
        var totals = [loss.units, loss.outOfRange, Int64(correct), Int64(piece.count)] + perDomain
        try world.allReduceSum(&totals)
        loss.units = totals[0]
        loss.outOfRange = totals[1]
        // Every rank sees the same totals: a non-finite loss is a collective error, not a NaN row.
        guard loss.outOfRange == 0 else {
            throw CollectiveRunError("evaluation after step \(step): \(loss.outOfRange) of \(totals[3]) held-out samples have a non-finite (or ≥ 2²⁴) loss: the model's logits are not finite")
        }
        var domainAccuracies: [Double]?
        if domainCount > 0 {
            var accuracies: [Double] = []
            for d in 0..<domainCount {
                let right = Double(totals[4 + 2 * d]), all = Double(totals[5 + 2 * d])
                accuracies.append(all == 0 ? Double.nan : right / all)
            }
            domainAccuracies = accuracies
        }
        return Evaluation(loss: loss.value / Double(totals[3]), accuracy: Double(totals[2]) / Double(totals[3]), count: Int(totals[3]),
                          domainAccuracies: domainAccuracies)
    }

    /// The running statistics by buffer name.
    var runningStatistics: [String: [Float]] {
        Dictionary(uniqueKeysWithValues: network.namedBuffers.map { ($0.name, $0.buffer.value.scalars) })
    }

    /// Replaces the running statistics with PreciseBN's, computed on the training set with the
    /// configured budget and batch size (the model is otherwise untouched). With `rememberEMA`
    /// the EMA values are kept in ``emaBuffers`` (and so in the next checkpoint).
    @discardableResult
    public func recomputePopulationStatistics(on dataset: Dataset? = nil, sampleBudget: Int? = nil, rememberEMA: Bool = false) throws -> PreciseBN.Report {
        watchdog?.context = "PreciseBN after step \(step)"
        if rememberEMA && emaBuffers == nil { emaBuffers = runningStatistics }
        return try PreciseBN.recompute(network: network, data: dataset ?? data.train, sampleBudget: sampleBudget ?? configuration.preciseBNSamples,
                                batchSize: configuration.preciseBNBatchSize ?? configuration.batchSize,
                                seed: configuration.seed, world: world)
    }

    /// PreciseBN's statistics pooled over the domains: for a network with domain-specific BN, one
    /// set over every domain's samples (the same samples and order as its per-domain pass), given
    /// to every domain; for any other network its own (pooled) pass.
    @discardableResult
    public func recomputePopulationStatisticsPooledOverDomains(rememberEMA: Bool = false) throws -> PreciseBN.Report {
        guard network.hasDomainBatchNorm else { return try recomputePopulationStatistics(rememberEMA: rememberEMA) }
        var pooled = data.train
        pooled.domains = pooled.domains.map { [Int32](repeating: 0, count: $0.count) }
        let report = try recomputePopulationStatistics(on: pooled, rememberEMA: rememberEMA)
        for entry in network.leaves { (entry.layer as? DomainBatchNorm<Float>)?.shareStatistics(of: 0) }
        return report
    }

    /// Recomputes PreciseBN's statistics pooled over the domains or per domain, which need not be
    /// what the network trained with (Wu & Johnson 2021 §5's inconsistent pairs), and evaluates with
    /// them; nil recomputes them the network's own way, as ``recomputePopulationStatistics(on:rememberEMA:)``.
    ///
    /// - `.pooled` on a network with domain-specific BN: one set of statistics over every domain's
    ///   samples, given to every domain (``recomputePopulationStatisticsPooledOverDomains(rememberEMA:)``).
    /// - `.perDomain` on a network with one set of statistics: for each domain, the statistics of
    ///   its own training samples, used for its own held-out samples (AdaBN per domain); the network
    ///   keeps the last domain's statistics afterwards, so this is for evaluation, not for saving.
    ///   The sample budget is shared by the domains in proportion to their training samples, as
    ///   in a pooled pass.
    public func evaluateWithPopulationStatistics(domains: PreciseBNDomains?, rememberEMA: Bool = false) throws -> Evaluation {
        let own: PreciseBNDomains = network.hasDomainBatchNorm ? .perDomain : .pooled
        guard let domains, domains != own else {
            try recomputePopulationStatistics(rememberEMA: rememberEMA)
            return try evaluate()
        }
        guard data.train.domains != nil, data.heldOut.domains != nil else {
            throw CollectiveRunError("PreciseBN statistics \(domains.rawValue) need domain labels for the training and held-out sets")
        }
        switch domains {
        case .pooled:
            try recomputePopulationStatisticsPooledOverDomains(rememberEMA: rememberEMA)
            return try evaluate()
        case .perDomain:
            var loss = 0.0, correct = 0.0, count = 0
            var accuracies: [Double] = []
            for d in 0..<max(data.train.domainCount, data.heldOut.domainCount) {
                let heldOut = data.heldOut.subset(domain: Int32(d)), train = data.train.subset(domain: Int32(d))
                guard heldOut.count > 0 else { accuracies.append(.nan); continue }
                guard train.count >= 2 else {
                    throw CollectiveRunError("PreciseBN statistics per domain: domain \(d) has \(train.count) training sample(s), fewer than 2")
                }
                // The budget is shared by the domains as in the pooled pass: each its share of the samples.
                let budget = max(2, Int((Double(configuration.preciseBNSamples) * Double(train.count) / Double(data.train.count)).rounded()))
                try recomputePopulationStatistics(on: train, sampleBudget: budget, rememberEMA: rememberEMA)
                let e = try evaluate(on: heldOut)
                loss += e.loss * Double(e.count)
                correct += (e.accuracy * Double(e.count)).rounded()
                count += e.count
                accuracies.append(e.accuracy)
            }
            return Evaluation(loss: loss / Double(count), accuracy: correct / Double(count), count: count, domainAccuracies: accuracies)
        }
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
        var line: [String: Any] = ["event": "eval", "stats": statistics, "step": step, "loss": evaluation.loss, "accuracy": evaluation.accuracy]
        if let domains = evaluation.domainJSON { line["domain_accuracy"] = domains }
        try metrics?.write(line)
        progress?.line(String(format: "eval  step %d  held-out loss %.4f  accuracy %.2f%% (%d samples, %@ statistics%@)",
                              step, evaluation.loss, evaluation.accuracy * 100, evaluation.count,
                              statistics == "ema" ? "EMA" : "PreciseBN", evaluation.domainText))
    }
}
