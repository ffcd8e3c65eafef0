import Collectives
import Kernels
import Normalization

extension Trainer {
    /// Builds the model `configuration` names and, for synchronized norms with `syncGroupSize` <
    /// ranks, splits the world into groups of consecutive ranks.
    public convenience init(configuration: TrainingConfiguration, data: DataSplit, world base: any Communicator) throws {
        let instrumented = InstrumentedCommunicator(base)
        let ranks = base.size
        if let problem = configuration.problem() { throw CollectiveRunError(problem) }
        if configuration.norm == .in && data.train.sampleShape.count != 3 {
            throw CollectiveRunError("⟨norm⟩ in normalizes each channel over H×W and needs C×H×W samples; the data has samples of shape \(data.train.sampleShape)")
        }
        let groupSize = configuration.syncGroupSize ?? ranks
        // Errors of the configuration itself: every rank finds them alike (the ranks have agreed
        // on the configuration), so they are collective errors, printed once.
        if let ghost = configuration.ghostBatchSize {
            guard configuration.norm == .bn || configuration.norm == .syncbn else {
                throw CollectiveRunError("⟨ghostBatchSize⟩ works with ⟨norm⟩ bn or syncbn, not \(configuration.norm.rawValue)")
            }
            guard ghost >= 1 && ghost <= configuration.batchSize else {
                throw CollectiveRunError("⟨ghostBatchSize⟩ must be between 1 and the per-rank batch \(configuration.batchSize), got \(ghost)")
            }
        }
        guard configuration.batchSize % configuration.weightGradientLeaf == 0 else {
            throw CollectiveRunError("⟨weightGradientLeaf⟩ \(configuration.weightGradientLeaf) does not divide the per-rank batch \(configuration.batchSize) (each rank's weight-gradient leaves must be whole)")
        }
        guard groupSize <= ranks else {
            throw CollectiveRunError("⟨syncGroupSize⟩ \(groupSize) exceeds the \(ranks) rank\(ranks == 1 ? "" : "s") of this job")
        }
        guard ranks % groupSize == 0 else {
            throw CollectiveRunError("⟨syncGroupSize⟩ \(groupSize) does not divide the \(ranks) ranks of this job (groups would differ in size)")
        }
        guard data.train.count >= 2 else { throw CollectiveRunError("the training set has \(data.train.count) sample(s); at least 2 are needed") }
        guard data.heldOut.count >= 1 else { throw CollectiveRunError("the held-out set is empty: nothing to evaluate on") }
        let synced = configuration.norm.synchronizes || (configuration.norm.synchronizesOnRequest && configuration.syncGroupSize != nil)
        // Feature vectors (the MLP) have one value per channel and sample: a BN batch of one
        // sample has no statistics. Caught here rather than after training (PreciseBN).
        if configuration.model == .mlp && !configuration.norm.isBatchFree && configuration.evalStats != .ema {
            let perRank = configuration.preciseBNBatchSize ?? configuration.batchSize
            let shared = synced ? groupSize : 1
            guard perRank * shared >= 2 else {
                throw CollectiveRunError("⟨preciseBNBatchSize⟩ \(perRank) gives PreciseBN batches of one sample, which have no statistics for the MLP's BN layers; use at least 2 (or ⟨evalStats⟩ ema)")
            }
        }
        var group: (any Communicator)?
        if configuration.shuffleBN && configuration.norm != .bn {
            throw CollectiveRunError("⟨shuffleBN⟩ shuffles the samples of per-rank BN; use it with ⟨norm⟩ bn")
        }
        if (synced || configuration.shuffleBN) && ranks > 1 && groupSize > 1 {
            group = groupSize == ranks ? instrumented : try instrumented.split(color: base.rank / groupSize, key: base.rank)
        }
        var factory = try NormalizationFactory(configuration: configuration, group: group)
        if configuration.domainBN {
            guard configuration.norm == .bn || configuration.norm == .syncbn else {
                throw CollectiveRunError("⟨domainBN⟩ keeps per-domain statistics for ⟨norm⟩ bn or syncbn, not \(configuration.norm.rawValue)")
            }
            guard let domains = data.train.domains else {
                throw CollectiveRunError("⟨domainBN⟩ needs data with domain labels: ⟨data⟩ two-domain:SOURCE or npy:X,Y,DOMAINS")
            }
            guard data.heldOut.domains != nil else {
                throw CollectiveRunError("⟨domainBN⟩ needs domain labels for the held-out set too (⟨evalData⟩ two-domain:… or npy:X,Y,DOMAINS)")
            }
            factory.domainCount = max(Int(domains.max() ?? 0), Int(data.heldOut.domains?.max() ?? 0)) + 1
        }
        let network = try Network.make(configuration.model, sampleShape: data.train.sampleShape, classes: data.train.classes,
                                       normalization: factory, width: configuration.width, seed: configuration.seed)
        let optimizer = SGD(learningRate: Float(configuration.learningRate), momentum: Float(configuration.momentum),
                            weightDecay: Float(configuration.weightDecay))
        try self.init(network: network, optimizer: optimizer, data: data, world: instrumented, options: configuration, custom: false)
    }
}
