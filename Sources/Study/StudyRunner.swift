import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// How jobs are started.
public struct StudyLauncher: Sendable {
    /// `syncbn-train`'s path.
    public var trainBinary: String
    /// Run each job with `--simulate-ranks` in one process instead of under `mpirun`.
    public var simulate = false
    public var mpirun = "mpirun"
    /// Extra `mpirun` arguments (a hostfile, MCA parameters).
    public var mpirunArguments: [String] = []
    /// A job running longer than this is stopped and recorded as failed.
    public var jobTimeout: Double = 4 * 3600
    /// Passed to every job as `--collective-timeout`: a hung rank ends the job instead of the study.
    public var collectiveTimeout: Double = 300

    public init(trainBinary: String) { self.trainBinary = trainBinary }

    /// The command line of `job`, writing its outputs into `directory`.
    public func command(for job: StudyJob, in directory: String, parentDirectory: String?) -> [String] {
        var arguments: [String]
        switch job.kind {
        case .train:
            arguments = ["train"] + job.arguments + [
                "--metrics", directory + "/metrics.jsonl", "--overwrite-metrics",
                "--save", directory + "/model.safetensors",
                "--collective-timeout", StudyCatalog.format(collectiveTimeout),
                // Observation only (it changes no result): weight and γ norms, CBN's window measurements.
                "--cbn-diagnostics",
            ]
        case .precise:
            arguments = ["evaluate", "--resume", (parentDirectory ?? directory) + "/model.safetensors", "--json"] + job.arguments
        }
        if simulate { return [trainBinary] + arguments + ["--simulate-ranks", "\(job.ranks)"] }
        var launch = [mpirun]
        if getuid() == 0 { launch.append("--allow-run-as-root") }
        launch += ["--oversubscribe", "--bind-to", "none", "--mca", "mpi_yield_when_idle", "1", "-x", "OPENBLAS_NUM_THREADS=1"]
        return launch + mpirunArguments + ["-n", "\(job.ranks)", trainBinary] + arguments
    }
}

/// Runs a study's jobs into a directory and keeps one record per job:
///
///     DIR/records/KEY.json   the outcome (written atomically when the job ends)
///     DIR/jobs/KEY/          the job's metrics, log and checkpoint
///     DIR/study.json         the experiments of the last run (grids and job keys)
///     DIR/summary.json       the results per experiment, panel, series and x (for launch/plot)
///     DIR/report.md          the same as Markdown tables
///
/// A job with a record is not run again (unless it failed and `retryFailed`), so an interrupted
/// study resumes where it stopped.
public final class StudyRunner {
    public let directory: String
    public let launcher: StudyLauncher
    public var retryFailed = false
    public var log: (String) -> Void = { FileHandle.standardError.write(Data(($0 + "\n").utf8)) }

    public init(directory: String, launcher: StudyLauncher) throws {
        self.directory = directory
        self.launcher = launcher
        for sub in ["", "/records", "/jobs"] {
            try FileManager.default.createDirectory(atPath: directory + sub, withIntermediateDirectories: true)
        }
    }

    public func recordPath(_ key: String) -> String { directory + "/records/" + key + ".json" }
    public func jobDirectory(_ key: String) -> String { directory + "/jobs/" + key }

    /// The record of job `key`, if any. A record whose numbers cannot be (an accuracy outside
    /// [0, 1], a non-finite loss) is reported as a failed job, not tabulated.
    public func record(_ key: String) -> StudyRecord? {
        guard let data = FileManager.default.contents(atPath: recordPath(key)) else { return nil }
        guard var record = try? JSONDecoder().decode(StudyRecord.self, from: data) else {
            return StudyRecord(key: key, job: StudyJob(ranks: 1, options: [:]), status: .failed, error: "records/\(key).json is not a readable record", seconds: 0)
        }
        if let result = record.result, let problem = result.problem {
            record.status = .failed
            record.error = "records/\(key).json: \(problem)"
            record.result = nil
        }
        return record
    }

    /// Every distinct job of `experiments`, seed by seed (all grid points of seed 1 first), each
    /// parent before the jobs that read its checkpoint.
    public static func schedule(_ experiments: [StudyExperiment]) -> [StudyJob] {
        var seen = Set<String>(), order: [StudyJob] = []
        let points = experiments.flatMap { $0.panels.flatMap(\.points) }
        for seed in Set(points.map(\.seed)).sorted() {
            for point in points where point.seed == seed {
                let jobs = (point.job.parent.map { [$0.job] } ?? []) + [point.job]
                for job in jobs where seen.insert(job.key).inserted { order.append(job) }
            }
        }
        return order
    }

    /// Writes study.json: the settings and grids of `experiments` (what the report covers).
    public func describe(_ experiments: [StudyExperiment], settings: StudySettings) throws {
        try writeJSON(StudyFile(settings: settings, experiments: experiments), to: directory + "/study.json")
    }

    /// Runs every job of `experiments` that has no record yet; returns the number run.
    @discardableResult
    public func run(_ experiments: [StudyExperiment], settings: StudySettings) throws -> Int {
        try describe(experiments, settings: settings)

        let all = Self.schedule(experiments)
        let pending = all.filter { job in
            guard let record = record(job.key) else { return true }
            return retryFailed && record.status == .failed
        }
        log("syncbn-study: \(all.count) jobs, \(all.count - pending.count) already done, \(pending.count) to run in \(directory)")
        let totalWork = pending.map(\.workSamples).reduce(0, +)
        var doneWork = 0.0, elapsed = 0.0
        for (index, job) in pending.enumerated() {
            if let parent = job.parent, record(parent.key)?.status == .ok,
               !FileManager.default.fileExists(atPath: jobDirectory(parent.key) + "/model.safetensors") {
                // The record is kept but the checkpoint is not (job directories stay on the machine
                // that ran them): train the parent again and keep the record of that run, the one
                // whose checkpoint this job evaluates.
                let started = Date()
                let again = runOne(parent.job)
                try writeJSON(again, to: recordPath(parent.key))
                log(String(format: "[%d/%d] %@ trained again for its checkpoint in %.0f s%@", index + 1, pending.count, parent.key,
                           Date().timeIntervalSince(started), again.status == .ok ? "" : ": FAILED: " + (again.error ?? "")))
            }
            if let parent = job.parent, record(parent.key)?.status != .ok {
                let outcome = StudyRecord(key: job.key, job: job, status: .failed, error: "its training job \(parent.key) failed", seconds: 0)
                try writeJSON(outcome, to: recordPath(job.key))
                continue
            }
            let started = Date()
            let outcome = runOne(job)
            try writeJSON(outcome, to: recordPath(job.key))
            let seconds = Date().timeIntervalSince(started)
            elapsed += seconds
            doneWork += job.workSamples
            let remaining = doneWork > 0 ? elapsed / doneWork * (totalWork - doneWork) : 0
            var line = String(format: "[%d/%d] %@ %@ in %.0f s", index + 1, pending.count, job.key, Self.label(job), seconds)
            if let r = outcome.result, let a = r.emaAccuracy ?? r.preciseAccuracy {
                line += String(format: ": accuracy %.2f%%", a * 100)
                if let p = r.preciseAccuracy, r.emaAccuracy != nil { line += String(format: " (EMA), %.2f%% (PreciseBN)", p * 100) }
            } else if let r = outcome.result, let p = r.preciseAccuracy {
                line += String(format: ": accuracy %.2f%%", p * 100)
            }
            if outcome.status == .failed { line += ": FAILED: " + (outcome.error ?? "") }
            if index + 1 < pending.count { line += " — ETA " + Self.duration(remaining) }
            log(line)
        }
        return pending.count
    }

    /// A short description of a job for progress lines.
    public static func label(_ job: StudyJob) -> String {
        let o = job.options
        if job.kind == .precise { return "PreciseBN with \(o["precise-bn-samples"] ?? "?") samples" + (o["precise-bn-domains"].map { ", \($0)" } ?? "") }
        var parts = [o["norm"] ?? "syncbn", "b=\(o["batch-size"] ?? "32")"]
        if let g = o["sync-group-size"] { parts.append("group \(g)") }
        if let g = o["ghost-batch-size"] { parts.append("ghost \(g)") }
        if o["norm"] == "cbn" {
            parts.append("k=\(o["cbn-window"] ?? "4") rho=\(o["cbn-rho"] ?? "1") burn-in=\(o["cbn-burnin"] ?? "0") gradient \(o["cbn-gradient"] ?? "default")")
        }
        if let f = o["freeze-bn-after"] { parts.append("frozen from \(f)") }
        if let lr = o["lr"] { parts.append("lr \(lr)") }
        parts.append("seed \(o["seed"] ?? "0")")
        return parts.joined(separator: " ")
    }

    static func duration(_ seconds: Double) -> String {
        let s = Int(seconds.rounded())
        return s >= 3600 ? String(format: "%dh%02dm", s / 3600, s % 3600 / 60) : String(format: "%dm%02ds", s / 60, s % 60)
    }

    /// Runs one job to its end and returns its record (never throws: a failure is a record).
    func runOne(_ job: StudyJob) -> StudyRecord {
        let started = Date()
        let dir = jobDirectory(job.key)
        func failed(_ message: String) -> StudyRecord {
            StudyRecord(key: job.key, job: job, status: .failed, error: message, seconds: Date().timeIntervalSince(started))
        }
        do {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            try? FileManager.default.removeItem(atPath: dir + "/metrics.jsonl")
            let command = launcher.command(for: job, in: dir, parentDirectory: job.parent.map { jobDirectory($0.key) })
            try Data((command.map(Self.shellQuoted).joined(separator: " ") + "\n").utf8).write(to: URL(fileURLWithPath: dir + "/command.sh"))
            let (status, output, timedOut) = try Self.execute(command, log: dir + "/log.txt", timeout: launcher.jobTimeout)
            if timedOut { return failed(String(format: "stopped after %.0f s (--job-timeout)", launcher.jobTimeout)) }
            guard status == 0 else { return failed(Self.errorLine(in: dir + "/log.txt") ?? "exit status \(status)") }
            let result: StudyResult
            switch job.kind {
            case .train:
                result = try StudyResult.parse(metrics: dir + "/metrics.jsonl")
            case .precise:
                guard let line = output.split(separator: "\n").last(where: { $0.hasPrefix("{") }),
                      let object = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
                    return failed("evaluate printed no JSON result")
                }
                var r = StudyResult()
                let ema = object["ema"] as? [String: Any], precise = object["precise"] as? [String: Any]
                r.emaAccuracy = ema?["accuracy"] as? Double
                r.emaLoss = ema?["loss"] as? Double
                r.emaDomainAccuracies = StudyResult.domainAccuracies(ema?["domain_accuracy"])
                r.preciseAccuracy = precise?["accuracy"] as? Double
                r.preciseLoss = precise?["loss"] as? Double
                r.preciseDomainAccuracies = StudyResult.domainAccuracies(precise?["domain_accuracy"])
                result = r
            }
            return StudyRecord(key: job.key, job: job, status: .ok, seconds: Date().timeIntervalSince(started), result: result)
        } catch {
            return failed("\(error)")
        }
    }

    /// The job's error: its last output line that says "error", else its last line.
    static func errorLine(in path: String) -> String? {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return nil }
        let lines = text.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty && !$0.hasPrefix("---") }
        return lines.last { $0.lowercased().contains("error") } ?? lines.last
    }

    static func shellQuoted(_ word: String) -> String {
        word.allSatisfy { $0.isLetter || $0.isNumber || "-_./=:,+".contains($0) } ? word : "'" + word.replacingOccurrences(of: "'", with: "'\\''") + "'"
    }

    /// Runs `command` with stderr (and stdout) appended to `log`; returns the exit status, the
    /// standard output and whether the timeout stopped it.
    static func execute(_ command: [String], log: String, timeout: Double) throws -> (Int32, String, Bool) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = command
        // A study started under mpirun itself must not hand its own MPI identity to the jobs.
        process.environment = ProcessInfo.processInfo.environment.filter {
            !($0.key.hasPrefix("OMPI_") || $0.key.hasPrefix("PMIX_") || $0.key.hasPrefix("PMI_"))
        }
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        let logHandle = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        defer { try? logHandle.close() }
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = logHandle
        process.standardInput = FileHandle.nullDevice
        try process.run()
        let deadline = DispatchTime.now() + timeout
        let timer = DispatchSource.makeTimerSource(queue: .global())
        nonisolated(unsafe) var timedOut = false
        timer.schedule(deadline: deadline)
        timer.setEventHandler {
            timedOut = true
            process.terminate()
            DispatchQueue.global().asyncAfter(deadline: .now() + 10) { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }
        }
        timer.resume()
        let output = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        timer.cancel()
        logHandle.write(output)
        return (process.terminationStatus, String(decoding: output, as: UTF8.self), timedOut)
    }
}

/// `study.json`: the settings and grids of the last run.
public struct StudyFile: Codable, Sendable {
    public var settings: StudySettings
    public var experiments: [StudyExperiment]
}

/// Writes `value` as JSON to `path` atomically (a temporary file renamed over it).
public func writeJSON<T: Encodable>(_ value: T, to path: String) throws {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
    try encoder.encode(value).write(to: URL(fileURLWithPath: path), options: .atomic)
}
