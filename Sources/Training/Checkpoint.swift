import Foundation
import Kernels

/// A training checkpoint: every parameter, buffer and counter of the model under its dotted name,
/// the optimizer's momentum buffers as `optimizer.momentum_buffer.NAME`, and metadata (format,
/// step, epoch, the run's configuration as JSON, which statistics the running buffers hold).
/// Written by rank 0 only, atomically.
public enum Checkpoint {
    public static let format = "syncbn-checkpoint-1"
    static let momentumPrefix = "optimizer.momentum_buffer."
    static let emaPrefix = "ema."

    /// `emaBuffers`, when the running statistics are PreciseBN's, are the EMA values by buffer
    /// name; they are stored as `ema.NAME` so that resuming continues from the EMA.
    /// `rankLocal` holds, for every rank-local entry, each rank's values (gathered by the caller);
    /// they are stored as `NAME.rankR` (F64).
    public static func save(network: Network, optimizer: SGD?, emaBuffers: [String: [Float]]? = nil,
                            rankLocal: [String: [[Double]]] = [:], metadata: [String: String], to path: String) throws {
        var tensors: [(name: String, tensor: StoredTensor)] = []
        for entry in network.state {
            switch entry {
            case let .parameter(name, p): tensors.append((name, StoredTensor(floats: p.value.scalars, shape: p.value.shape)))
            case let .buffer(name, b): tensors.append((name, StoredTensor(floats: b.value.scalars, shape: b.value.shape)))
            case let .counter(name, c): tensors.append((name, StoredTensor(int64: c.value)))
            case let .rankLocal(name, state):
                for (rank, values) in (rankLocal[name] ?? [state.values]).enumerated() {
                    tensors.append(("\(name).rank\(rank)", StoredTensor(doubles: values, shape: [values.count])))
                }
            }
        }
        if let emaBuffers {
            for (name, buffer) in network.namedBuffers {
                tensors.append((emaPrefix + name, StoredTensor(floats: emaBuffers[name] ?? buffer.value.scalars, shape: buffer.value.shape)))
            }
        }
        if let optimizer {
            for (name, parameter) in network.namedParameters {
                let buffer = optimizer.momentumBuffers[name] ?? [Float](repeating: 0, count: parameter.value.count)
                tensors.append((momentumPrefix + name, StoredTensor(floats: buffer, shape: parameter.value.shape)))
            }
        }
        var meta = metadata
        meta["format"] = format
        try Safetensors.write(tensors, metadata: meta, to: path)
    }

    /// Loads `path` into the model (and optimizer). Every entry the model has must be present with
    /// the same shape, and the file may hold nothing else. Returns the metadata and, when the file
    /// keeps EMA statistics beside PreciseBN's (`ema.NAME`), those by buffer name. With
    /// `preferEMA` the EMA values go into the buffers (what continuing training needs); without,
    /// the stored running statistics do (what inference uses).
    @discardableResult
    ///
    /// Rank-local state (cross-iteration windows) is per rank: this rank continues the copies of
    /// the written ranks `rankLocalSources` (one rank's, or a statistics group's, which must be
    /// equal; ``rankLocalSources(rank:ranks:configuration:metadata:)`` finds them), unless
    /// `resetRankLocal`, which starts every window empty instead.
    /// The written ranks whose rank-local copies rank `rank` of `ranks` continues: itself on as
    /// many ranks; on another number, at the same global batch and the same statistics groups
    /// (``TrainingConfiguration/statisticsGroups(ranks:)``), the ranks of the written run whose
    /// samples form this rank's statistics group — they kept one window, the group's.
    public static func rankLocalSources(rank: Int, ranks: Int, configuration: TrainingConfiguration,
                                        metadata: [String: String], path: String) -> Result<[Int], FileFormatError> {
        let written = metadata["ranks"].flatMap { Int($0) }
        if written == ranks { return .success([rank]) }
        let refusal = FileFormatError(path, "was written by \(written.map(String.init) ?? "an unknown number of") rank(s) and holds each rank's cross-iteration BN window; resume on as many ranks, or at the same global batch with statistics groups that cover the same samples, or pass ⟨resetCrossIterationWindows⟩ to start the windows empty")
        guard let written, written >= 1, let text = metadata["configuration"],
              let stored = try? TrainingConfiguration.decoding(json: text),
              stored.batchSize * written == configuration.batchSize * ranks,
              case .consecutive(let span) = configuration.statisticsGroups(ranks: ranks),
              stored.statisticsGroups(ranks: written) == .consecutive(span),
              span % stored.batchSize == 0, span % configuration.batchSize == 0 else { return .failure(refusal) }
        let group = rank * configuration.batchSize / span
        return .success(Array((group * span / stored.batchSize)..<((group + 1) * span / stored.batchSize)))
    }

    public static func load(_ path: String, into network: Network, optimizer: SGD?,
                            preferEMA: Bool = true, rankLocalSources: Result<[Int], FileFormatError> = .success([0]),
                            resetRankLocal: Bool = false) throws -> (metadata: [String: String], emaBuffers: [String: [Float]]?) {
        let (tensors, metadata) = try Safetensors.read(path)
        guard metadata["format"] == format else {
            throw FileFormatError(path, "not a syncbn checkpoint (metadata format is \(metadata["format"].map { "'\($0)'" } ?? "missing"))")
        }
        var used = Set<String>()
        var emaBuffers: [String: [Float]] = [:]
        func floats(_ name: String, shape: [Int]) throws -> [Float] {
            guard let stored = tensors[name] else {
                throw FileFormatError(path, "has no '\(name)': the checkpoint was written for another model or normalization")
            }
            guard stored.shape == shape, let values = stored.floats else {
                throw FileFormatError(path, "'\(name)' has shape \(stored.shape) (\(stored.dtype.rawValue)), the model expects \(shape) floats")
            }
            if let bad = values.firstIndex(where: { !$0.isFinite }) {
                throw FileFormatError(path, "'\(name)' holds a non-finite value at index \(bad)")
            }
            // A variance (BN's running_var, MABN's running E[x²]) below zero has no square root.
            if name.hasSuffix("running_var"), let bad = values.firstIndex(where: { $0 < 0 }) {
                throw FileFormatError(path, "'\(name)' holds a negative variance (\(values[bad])) at index \(bad)")
            }
            used.insert(name)
            return values
        }
        // Read everything first, so a bad file leaves the model untouched.
        var assignments: [() -> Void] = []
        for entry in network.state {
            switch entry {
            case let .parameter(name, p):
                let values = try floats(name, shape: p.value.shape)
                assignments.append { p.value.scalars = values }
            case let .buffer(name, b):
                var values = try floats(name, shape: b.value.shape)
                if tensors[emaPrefix + name] != nil {
                    let ema = try floats(emaPrefix + name, shape: b.value.shape)
                    emaBuffers[name] = ema
                    if preferEMA { values = ema }
                }
                assignments.append { [values] in b.value.scalars = values }
            case let .counter(name, c):
                guard let value = tensors[name]?.int64 else { throw FileFormatError(path, "has no integer '\(name)'") }
                used.insert(name)
                assignments.append { c.value = value }
            case let .rankLocal(name, state):
                if resetRankLocal {
                    let emptied = state.emptied(tensors["\(name).rank0"]?.doubles ?? [])
                    assignments.append { state.values = emptied }
                    continue
                }
                let sources = try rankLocalSources.get()
                var copies: [[Double]] = []
                for source in sources {
                    guard let values = tensors["\(name).rank\(source)"]?.doubles else {
                        throw FileFormatError(path, "has no '\(name).rank\(source)': it was written by \(metadata["ranks"] ?? "another number of") rank(s); resume cross-iteration BN on as many ranks")
                    }
                    copies.append(values)
                }
                guard let values = copies.first, let key = sources.first.map({ "\(name).rank\($0)" }) else { continue }
                if let other = copies.firstIndex(where: { $0 != values }) {
                    throw FileFormatError(path, "'\(name).rank\(sources[other])' differs from '\(key)', though both ranks shared one statistics group; the window cannot move to another number of ranks (pass ⟨resetCrossIterationWindows⟩ to start it empty)")
                }
                if let problem = state.validate(values) { throw FileFormatError(path, "'\(key)' \(problem)") }
                assignments.append { state.values = values }
            }
        }
        if let optimizer {
            for (name, parameter) in network.namedParameters {
                let key = momentumPrefix + name
                if tensors[key] == nil { continue }
                let values = try floats(key, shape: parameter.value.shape)
                assignments.append { optimizer.setMomentumBuffer(values, for: name) }
            }
        }
        let rankLocalNames = network.state.compactMap { if case let .rankLocal(name, _) = $0 { return name + ".rank" } else { return nil } }
        let unknown = Set(tensors.keys).subtracting(used).filter { key in
            !key.hasPrefix(momentumPrefix) && !rankLocalNames.contains { key.hasPrefix($0) }
        }
        if let first = unknown.sorted().first {
            throw FileFormatError(path, "has '\(first)'\(unknown.count > 1 ? " and \(unknown.count - 1) more entries" : "") that the model does not: written for another model?")
        }
        assignments.forEach { $0() }
        return (metadata, emaBuffers.isEmpty ? nil : emaBuffers)
    }
}
