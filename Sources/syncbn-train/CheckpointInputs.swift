import ArgumentParser
import Collectives
import CollectivesMPI
import Foundation
import CommandSupport
import Kernels
import Normalization
import Training

/// The configuration stored in a checkpoint (with `data`/`evalData` overriding its data) and the
/// data it names, loaded: what a command needs to rebuild the model of a checkpoint.
func loadCheckpointRun(_ path: String, data: String?, evalData: String?) throws -> (TrainingConfiguration, DataSplit) {
    let (_, metadata) = try Safetensors.read(path)
    if metadata["network"] == "custom" {
        throw FileFormatError(path, "holds a custom network built by its own program; load it with that program (Trainer.resume), not from its stored configuration")
    }
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
