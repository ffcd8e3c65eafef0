import ArgumentParser
import Collectives
import CollectivesMPI
import Foundation
import CommandSupport
import Kernels
import Normalization
import Training

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
    @Option(help: ArgumentHelp("With domain labels and --domain-bn: `pooled` gives every domain the statistics of all domains' samples together (default: per-domain, as the network trained).", valueName: "pooled|per-domain"))
    var preciseBnDomains: PreciseBNDomains?
    @Option(parsing: .unconditional, help: "Run N ranks as threads of this process instead of under mpirun.")
    var simulateRanks: Int?

    @OptionGroup var watch: CollectiveTimeoutOption
    @OptionGroup var memory: DataMemoryOption

    func validate() throws {
        try guardOutputs([("--save", save)], resume: resume, data: data, evalData: evalData)
        if let simulateRanks, !(1...256).contains(simulateRanks) { throw ValidationError("--simulate-ranks must be between 1 and 256, got \(simulateRanks)") }
    }

    func run() throws {
        memory.apply()
        let resumePath = resume, savePath = save, options = precise, domains = preciseBnDomains
        let prepared = Result { () -> (TrainingConfiguration, DataSplit) in
            var (configuration, split) = try loadCheckpointRun(resumePath, data: data, evalData: evalData)
            configuration.preciseBNSamples = options.preciseBnSamples
            configuration.preciseBNBatchSize = options.preciseBnBatchSize
            return (configuration, split)
        }
        RankLaunch.run(simulateRanks: simulateRanks, command: "syncbn-train recompute-stats", preflight: prepared.failure, collectiveTimeout: watch.collectiveTimeout) { world in
            let (stored, split) = try prepared.get()
            let (configuration, note) = nonTrainingConfiguration(stored, ranks: world.size)
            if let note, world.rank == 0 { FileHandle.standardError.write(Data(("recompute-stats: note: " + note + "\n").utf8)) }
            let trainer = try world.agreeing { try Trainer(configuration: configuration, data: split, world: world) }
            try world.agreeing { try trainer.resume(from: resumePath, forTraining: false) }
            if domains == .perDomain && !trainer.network.hasDomainBatchNorm {
                throw CollectiveRunError("--precise-bn-domains per-domain: this network keeps one set of statistics (it trained without --domain-bn); evaluate --precise-bn-domains per-domain evaluates it with per-domain ones")
            }
            let before = try trainer.evaluate()
            let report = domains == .pooled ? try trainer.recomputePopulationStatisticsPooledOverDomains(rememberEMA: true)
                                            : try trainer.recomputePopulationStatistics(rememberEMA: true)
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
