import ArgumentParser
import Collectives
import CollectivesMPI
import Foundation
import CommandSupport
import Kernels
import Normalization
import Training

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

    @OptionGroup var watch: CollectiveTimeoutOption
    @OptionGroup var memory: DataMemoryOption

    func validate() throws { try guardOutputs([("--out", out)], resume: resume, data: data) }

    func run() throws {
        memory.apply()
        let resumePath = resume, outPath = out
        let prepared = Result { try loadCheckpointRun(resumePath, data: data, evalData: nil) }
        RankLaunch.run(simulateRanks: nil, command: "syncbn-train export-folded", preflight: prepared.failure, collectiveTimeout: watch.collectiveTimeout) { world in
            let (configuration, split) = try prepared.get()
            let trainer = try inferenceTrainer(resumePath, configuration: configuration, split: split)
            let folded = try trainer.network.foldingBatchNorm()
            let (x, _) = split.heldOut.batch(0..<min(split.heldOut.count, 512))
            let reference = try trainer.network.forward(x, mode: .inference)
            let logits = try folded.forward(x, mode: .inference)
            var difference = 0.0, scale = 0.0
            for i in 0..<reference.count {
                // max ignores NaN: a non-finite logit on either side is an error, not "differ by 0".
                guard logits.scalars[i].isFinite && reference.scalars[i].isFinite else {
                    throw CollectiveRunError("the \(logits.scalars[i].isFinite ? "unfolded" : "folded") model gives a non-finite logit for held-out sample \(i / max(reference.shape.last ?? 1, 1)); nothing written")
                }
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
            func foldable(_ network: Network) -> Int {
                network.normalizationLayers.filter { ((try? $0.layer.inferenceAffine()) ?? nil) != nil }.count
            }
            let kept = folded.normalizationLayers.filter { !$0.layer.populations.isEmpty }.count
            let line = String(format: "export-folded: %d normalization layers folded%@, %d tensors written to %@; held-out logits of %d samples differ by %.2e relative (max|folded − unfolded| / max|unfolded|)",
                              foldable(trainer.network) - foldable(folded), kept > 0 ? ", \(kept) BN layers kept with their statistics (inside Representative BN or IBN layers)" : "",
                              tensors.count, outPath, x.shape[0], difference / max(scale, 1e-30))
            FileHandle.standardError.write(Data((line + "\n").utf8))
        }
    }
}
