import ArgumentParser
import Collectives
import CollectivesMPI
import Foundation
import CommandSupport
import Kernels
import Normalization
import Training

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

    @OptionGroup var watch: CollectiveTimeoutOption
    @OptionGroup var memory: DataMemoryOption

    func validate() throws { try guardOutputs([("--out", out)], resume: resume) }

    func run() throws {
        memory.apply()
        let resumePath = resume, outPath = out
        let prepared = Result { try loadCheckpointRun(resumePath, data: nil, evalData: nil) }
        RankLaunch.run(simulateRanks: nil, command: "syncbn-train export-torch", preflight: prepared.failure, collectiveTimeout: watch.collectiveTimeout) { world in
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
            let stored = try Safetensors.metadata(resumePath)
            var metadata = trainer.inferenceMetadata
            metadata["format"] = "syncbn-torch-1"
            metadata["statistics"] = stored["statistics"] ?? "ema"
            metadata["exported_from"] = URL(fileURLWithPath: resumePath).lastPathComponent
            try Safetensors.write(tensors, metadata: metadata, to: outPath)
            FileHandle.standardError.write(Data("export-torch: \(tensors.count) tensors (\(metadata["statistics"]!) statistics) written to \(outPath)\n".utf8))
        }
    }
}
