import ArgumentParser
import Collectives
import CollectivesMPI
import Foundation
import CommandSupport
import Kernels
import Normalization
import Training

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
    @Option(help: ArgumentHelp("With --precise-bn-samples and domain labels: the statistics pooled over the domains or one set per domain (default: as the model trained). The other one is the inconsistent pair of training and inference statistics.", valueName: "pooled|per-domain"))
    var preciseBnDomains: PreciseBNDomains?
    @Flag(help: "Also print the results as one JSON object on standard output.")
    var json = false
    @Option(parsing: .unconditional, help: "Run N ranks as threads of this process instead of under mpirun.")
    var simulateRanks: Int?

    @OptionGroup var watch: CollectiveTimeoutOption
    @OptionGroup var memory: DataMemoryOption

    func validate() throws {
        guard (1...(1 << 20)).contains(limit) else { throw ValidationError("--limit must be between 1 and 1048576, got \(limit)") }
        try guardOutputs([("--inputs", inputs), ("--logits", logits)], resume: resume, evalData: evalData)
        if let simulateRanks, !(1...256).contains(simulateRanks) { throw ValidationError("--simulate-ranks must be between 1 and 256, got \(simulateRanks)") }
        if let preciseBnSamples, !(2...(1 << 30)).contains(preciseBnSamples) { throw ValidationError("--precise-bn-samples must be between 2 and 2^30, got \(preciseBnSamples)") }
        if let b = preciseBnBatchSize {
            guard (1...(1 << 20)).contains(b) else { throw ValidationError("--precise-bn-batch-size must be between 1 and 1048576, got \(b)") }
            guard preciseBnSamples != nil else { throw ValidationError("--precise-bn-batch-size applies with --precise-bn-samples only") }
        }
        if preciseBnDomains != nil && preciseBnSamples == nil { throw ValidationError("--precise-bn-domains applies with --precise-bn-samples only") }
    }

    func run() throws {
        memory.apply()
        let resumePath = resume, inputsPath = inputs, logitsPath = logits, limit = limit, json = json
        let recompute = preciseBnSamples, recomputeBatch = preciseBnBatchSize, recomputeDomains = preciseBnDomains
        let prepared = Result { () -> (TrainingConfiguration, DataSplit) in
            var (configuration, split) = try loadCheckpointRun(resumePath, data: nil, evalData: evalData)
            if let recompute {
                configuration.preciseBNSamples = recompute
                configuration.preciseBNBatchSize = recomputeBatch
            }
            return (configuration, split)
        }
        RankLaunch.run(simulateRanks: simulateRanks, command: "syncbn-train evaluate", preflight: prepared.failure, collectiveTimeout: watch.collectiveTimeout) { world in
            let (checkpointConfiguration, split) = try prepared.get()
            let (configuration, note) = nonTrainingConfiguration(checkpointConfiguration, ranks: world.size)
            if let note, recompute != nil, world.rank == 0 { FileHandle.standardError.write(Data(("evaluate: note: " + note + "\n").utf8)) }
            let trainer = try world.agreeing { try Trainer(configuration: configuration, data: split, world: world) }
            // The EMA statistics first (when the file keeps them beside PreciseBN's), then the stored
            // ones, or ones recomputed now.
            try world.agreeing { try trainer.resume(from: resumePath, forTraining: true, resetCrossIterationWindows: true) }   // windows play no part in inference
            let stored = try Safetensors.metadata(resumePath)["statistics"] ?? "ema"
            var results: [(String, Evaluation)] = []
            if recompute != nil {
                results.append(("EMA", try trainer.evaluate()))
                results.append((recomputeDomains.map { "PreciseBN \($0.rawValue)" } ?? "PreciseBN", try trainer.evaluateWithPopulationStatistics(domains: recomputeDomains, rememberEMA: true)))
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
                    let line = String(format: "evaluate: step %d, held-out loss %.4f, accuracy %.2f%% (%d samples, %@ statistics%@)",
                                      trainer.step, evaluation.loss, evaluation.accuracy * 100, evaluation.count, statistics, evaluation.domainText)
                    FileHandle.standardError.write(Data((line + "\n").utf8))
                }
                if json {
                    var object: [String: Any] = ["step": trainer.step, "samples": results[0].1.count]
                    for (statistics, evaluation) in results {
                        var entry: [String: Any] = ["loss": evaluation.loss, "accuracy": evaluation.accuracy]
                        if let domains = evaluation.domainJSON { entry["domain_accuracy"] = domains }
                        object[statistics == "EMA" ? "ema" : "precise"] = entry
                    }
                    if let recompute { object["precise_bn_samples"] = recompute }
                    if let recomputeDomains { object["precise_bn_domains"] = recomputeDomains.rawValue }
                    let data = try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])
                    FileHandle.standardOutput.write(data + Data("\n".utf8))
                }
            }
        }
    }
}
