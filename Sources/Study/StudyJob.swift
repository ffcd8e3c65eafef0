import Foundation

/// One run of a study: a training job (`syncbn-train train`) or a PreciseBN re-evaluation of a
/// training job's checkpoint with a given sample budget (`syncbn-train evaluate
/// --precise-bn-samples`). A job is identified by a hash of everything that determines its
/// result, so that experiments sharing a grid point share its job, and a re-run of a study finds
/// the jobs it has already finished.
public struct StudyJob: Codable, Hashable, Sendable {
    public enum Kind: String, Codable, Sendable {
        case train
        /// `evaluate --precise-bn-samples` on the checkpoint of the train job `parent`.
        case precise
    }

    public var kind: Kind
    public var ranks: Int
    /// `syncbn-train` options without the leading dashes; "" for a flag without a value.
    public var options: [String: String]
    /// For `.precise`: the train job whose checkpoint is evaluated.
    public var parent: StudyJobParent?

    public init(kind: Kind = .train, ranks: Int, options: [String: String], parent: StudyJob? = nil) {
        self.kind = kind
        self.ranks = ranks
        self.options = options
        self.parent = parent.map { StudyJobParent($0) }
    }

    /// The options as command-line arguments, in a fixed (sorted) order.
    public var arguments: [String] {
        options.keys.sorted().flatMap { key -> [String] in
            let value = options[key]!
            return value.isEmpty ? ["--" + key] : ["--" + key, value]
        }
    }

    /// Everything the result depends on, as text: the kind, the ranks, the options, the parent's
    /// key and the version of syncbn (a new version may compute differently).
    public var canonicalDescription: String {
        var parts = ["kind=\(kind.rawValue)", "ranks=\(ranks)", "version=\(studyVersion)"]
        parts += options.keys.sorted().map { "\($0)=\(options[$0]!)" }
        if let parent { parts.append("parent=\(parent.key)") }
        return parts.joined(separator: "\n")
    }

    /// 16 hex digits of a 64-bit FNV-1a hash of ``canonicalDescription``.
    public var key: String {
        var hash: UInt64 = 0xCBF2_9CE4_8422_2325
        for byte in canonicalDescription.utf8 { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01B3 }
        let text = String(hash, radix: 16)
        return String(repeating: "0", count: 16 - text.count) + text
    }

    /// Samples the job processes, for progress estimates.
    public var workSamples: Double {
        switch kind {
        case .train:
            let steps = Double(options["steps"] ?? "") ?? 1000
            let batch = Double(options["batch-size"] ?? "") ?? 32
            return steps * batch * Double(ranks)
        case .precise:
            return Double(options["precise-bn-samples"] ?? "") ?? 8192
        }
    }
}

/// A precise job's parent, by key (the parent job itself is kept for running it first).
public struct StudyJobParent: Codable, Hashable, Sendable {
    public var key: String
    public var ranks: Int
    public var options: [String: String]

    init(_ job: StudyJob) {
        key = job.key
        ranks = job.ranks
        options = job.options
    }

    public var job: StudyJob { StudyJob(kind: .train, ranks: ranks, options: options) }
}

/// The version of the result format and of the code that produced it (part of every job's key).
public let studyVersion = "1"

/// The outcome of a job, stored as `records/KEY.json` in the study directory once the job has
/// ended (successfully or not).
public struct StudyRecord: Codable, Sendable {
    public var key: String
    public var job: StudyJob
    public var status: Status
    /// For a failed job: the error it printed (its last line of output naming an error), or why it
    /// was stopped.
    public var error: String?
    public var seconds: Double
    public var finished: String
    public var result: StudyResult?

    public enum Status: String, Codable, Sendable { case ok, failed }

    public init(key: String, job: StudyJob, status: Status, error: String? = nil, seconds: Double, result: StudyResult? = nil) {
        self.key = key
        self.job = job
        self.status = status
        self.error = error
        self.seconds = seconds
        self.finished = ISO8601DateFormatter().string(from: Date())
        self.result = result
    }
}

/// What a job measured.
public struct StudyResult: Codable, Sendable {
    public struct Evaluation: Codable, Sendable {
        public var step: Int
        public var statistics: String
        public var accuracy: Double
        public var loss: Double
        /// Each domain's accuracy, for data with domain labels (nil for a domain without samples).
        public var domainAccuracies: [Double?]?
    }

    /// The final held-out accuracy with EMA and with PreciseBN statistics (when evaluated).
    public var emaAccuracy: Double?
    public var preciseAccuracy: Double?
    public var emaLoss: Double?
    public var preciseLoss: Double?
    /// Each domain's final held-out accuracy (data with domain labels).
    public var emaDomainAccuracies: [Double?]?
    public var preciseDomainAccuracies: [Double?]?
    /// Mean training loss and accuracy over the last tenth of the logged steps.
    public var finalTrainLoss: Double?
    public var finalTrainAccuracy: Double?
    /// Every evaluation of the run, in order.
    public var evaluations: [Evaluation] = []
    /// Per-layer diagnostics from the metrics' last `diagnostics` line, when the run wrote any.
    public var diagnostics: [String: [String: Double]]?
    /// The first normalization layer's feeding weight norm at every diagnostics line: [step, norm].
    public var weightNormCurve: [[Double]]?
    public var samplesPerSecond: Double?

    public init() {}

    /// What makes these numbers impossible (an accuracy outside [0, 1], a non-finite loss), or nil.
    public var problem: String? {
        for (name, value) in [("EMA accuracy", emaAccuracy), ("PreciseBN accuracy", preciseAccuracy), ("training accuracy", finalTrainAccuracy)] {
            if let value, !(value.isFinite && (0...1).contains(value)) { return "its \(name) is \(value), outside [0, 1]" }
        }
        for (name, values) in [("EMA", emaDomainAccuracies), ("PreciseBN", preciseDomainAccuracies)] {
            for case let (domain, value?) in (values ?? []).enumerated() where !(value.isFinite && (0...1).contains(value)) {
                return "its \(name) accuracy on domain \(domain) is \(value), outside [0, 1]"
            }
        }
        for (name, value) in [("EMA loss", emaLoss), ("PreciseBN loss", preciseLoss), ("training loss", finalTrainLoss)] {
            if let value, !value.isFinite { return "its \(name) is \(value)" }
        }
        return nil
    }

    /// A JSON `domain_accuracy` array (null for a domain without samples) as accuracies.
    static func domainAccuracies(_ value: Any?) -> [Double?]? { (value as? [Any]).map { $0.map { $0 as? Double } } }

    /// Reads a `syncbn-train --metrics` file.
    public static func parse(metrics path: String) throws -> StudyResult {
        let text = try String(contentsOfFile: path, encoding: .utf8)
        var result = StudyResult()
        var intervals: [(step: Int, steps: Int, loss: Double, accuracy: Double)] = []
        var speeds: [Double] = []
        for line in text.split(separator: "\n") {
            guard let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else { continue }
            let event = object["event"] as? String
            if event == "eval", let step = object["step"] as? Int, let stats = object["stats"] as? String,
               let accuracy = object["accuracy"] as? Double, let loss = object["loss"] as? Double {
                let domains = domainAccuracies(object["domain_accuracy"])
                result.evaluations.append(.init(step: step, statistics: stats, accuracy: accuracy, loss: loss, domainAccuracies: domains))
            } else if event == "diagnostics", let layers = object["layers"] as? [String: [String: Double]] {
                result.diagnostics = layers
                if let step = object["step"] as? Int, let first = layers.keys.sorted().first, let norm = layers[first]?["weight_norm"] {
                    result.weightNormCurve = (result.weightNormCurve ?? []) + [[Double(step), norm]]
                }
            } else if event == nil, let step = object["step"] as? Int, let loss = object["loss"] as? Double,
                      let accuracy = object["accuracy"] as? Double {
                intervals.append((step, object["steps"] as? Int ?? 1, loss, accuracy))
                if let speed = object["samples_per_s"] as? Double { speeds.append(speed) }
            }
        }
        if let last = result.evaluations.last?.step {
            for evaluation in result.evaluations where evaluation.step == last {
                if evaluation.statistics == "ema" {
                    result.emaAccuracy = evaluation.accuracy; result.emaLoss = evaluation.loss; result.emaDomainAccuracies = evaluation.domainAccuracies
                }
                if evaluation.statistics == "precise" {
                    result.preciseAccuracy = evaluation.accuracy; result.preciseLoss = evaluation.loss; result.preciseDomainAccuracies = evaluation.domainAccuracies
                }
            }
        }
        if let lastStep = intervals.last?.step {
            let tail = intervals.filter { $0.step > lastStep - max(1, lastStep / 10) }
            let steps = Double(tail.map(\.steps).reduce(0, +))
            result.finalTrainLoss = tail.map { $0.loss * Double($0.steps) }.reduce(0, +) / steps
            result.finalTrainAccuracy = tail.map { $0.accuracy * Double($0.steps) }.reduce(0, +) / steps
        }
        if !speeds.isEmpty { result.samplesPerSecond = speeds.sorted()[speeds.count / 2] }
        return result
    }
}
