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
    let metadata = try Safetensors.metadata(path)
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

/// The configuration of a checkpoint run for `ranks` ranks that do not train: a sync group the
/// job cannot form (larger than the job, or not dividing it) becomes the greatest group size that
/// divides both. Inference uses the stored statistics, not the groups; PreciseBN's batches are then
/// normalized over the smaller groups (`note` says so). Nil note: the stored groups fit.
func nonTrainingConfiguration(_ stored: TrainingConfiguration, ranks: Int) -> (configuration: TrainingConfiguration, note: String?) {
    guard let size = stored.syncGroupSize, size > 1, ranks % size != 0 else { return (stored, nil) }
    func gcd(_ a: Int, _ b: Int) -> Int { b == 0 ? a : gcd(b, a % b) }
    var configuration = stored
    configuration.syncGroupSize = gcd(size, ranks)
    return (configuration, "the checkpoint's --sync-group-size \(size) does not fit \(ranks) rank\(ranks == 1 ? "" : "s"): batch statistics here span groups of \(configuration.syncGroupSize!)")
}

/// A checkpoint's model in inference mode on one process, with the statistics it stores.
func inferenceTrainer(_ path: String, configuration stored: TrainingConfiguration, split: DataSplit) throws -> Trainer {
    let configuration = nonTrainingConfiguration(stored, ranks: 1).configuration
    let trainer = try Trainer(configuration: configuration, data: split, world: SingleProcessCommunicator())
    try trainer.resume(from: path, forTraining: false, resetCrossIterationWindows: true)   // windows play no part in inference
    return trainer
}

/// The files a run on a checkpoint reads: the checkpoint and the data its stored configuration
/// names (or the `data`/`evalData` given instead), for the output guard.
func checkpointInputs(_ resume: String, data: String?, evalData: String?) -> [String] {
    var files = [resume]
    let stored = (try? Safetensors.metadata(resume))?["configuration"].flatMap { try? TrainingConfiguration.decoding(json: $0) }
    for source in [data ?? stored?.data, evalData ?? stored?.evalData].compactMap({ $0 }) { files += Train.inputFiles(source) }
    return files
}

/// The output guard of a subcommand that reads a checkpoint: every output is new or a regular
/// file, none of them is the checkpoint or the data it names (by device and inode), no two are one file.
func guardOutputs(_ outputs: [(flag: String, path: String?)], resume: String, data: String? = nil, evalData: String? = nil) throws {
    guard FileManager.default.fileExists(atPath: resume) else { throw ValidationError("--resume \(resume): no such file") }
    do { try OutputGuard.check(outputs, inputs: checkpointInputs(resume, data: data, evalData: evalData)) } catch { throw ValidationError("\(error)") }
}

/// `--collective-timeout`, the same in every subcommand.
struct CollectiveTimeoutOption: ParsableArguments {
    @Option(parsing: .unconditional, help: "End the job (exit 3) when a collective has waited this many seconds (a stopped, dead or diverging rank), naming the collective (and, in training, the step).")
    var collectiveTimeout: Double = 600

    func validate() throws {
        guard collectiveTimeout.isFinite && collectiveTimeout >= 1 else {
            throw ValidationError("--collective-timeout must be at least 1 second, got \(collectiveTimeout)")
        }
    }
}

struct DataMemoryOption: ParsableArguments {
    @Option(help: "The most memory the loaded data may take, in bytes or with a K, M, G or T suffix (powers of 1024); checked from each file's header before the samples are allocated. Default: half of this machine's memory divided by the ranks mpirun starts on it.")
    var maxDataBytes: String?

    static func bytes(_ text: String) -> Int? {
        let units: [Character: Int] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40]
        var digits = Substring(text.uppercased())
        var unit = 1
        if digits.hasSuffix("IB") { digits = digits.dropLast(2) } else if digits.hasSuffix("B") { digits = digits.dropLast() }
        if let last = digits.last, let scale = units[last] { unit = scale; digits = digits.dropLast() }
        guard let value = Int(digits), value > 0 else { return nil }
        let (product, overflow) = value.multipliedReportingOverflow(by: unit)
        return overflow ? nil : product
    }

    func validate() throws {
        if let maxDataBytes, Self.bytes(maxDataBytes) == nil {
            throw ValidationError("--max-data-bytes must be a positive size such as 2000000000, 512M or 8G, got '\(maxDataBytes)'")
        }
    }

    /// Sets the budget the data loaders check.
    func apply() { DataMemory.budget = maxDataBytes.flatMap(Self.bytes) }
}
