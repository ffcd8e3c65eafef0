import ArgumentParser
import Foundation
import Kernels
import Study

/// `syncbn-study`: the literature's batch-normalization experiments as grids of real training jobs.
struct SyncBNStudy: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "syncbn-study",
        abstract: "Run the literature's batch-normalization experiments as grids of real training jobs.",
        discussion: """
        Each job is a real syncbn-train run under mpirun (or, with --simulate, with --simulate-ranks). Every job's \
        outcome is kept in --out as records/KEY.json, KEY a hash of the job's full configuration; a re-run skips \
        finished jobs, so an interrupted study resumes where it stopped. At the end the results are written as \
        summary.json (for launch/plot) and report.md (tables, mean ± std over seeds). --list shows the experiments \
        and their grids.
        """)

    @Argument(help: "Experiments to run (default: all): \(StudyCatalog.names.joined(separator: ", ")).")
    var experiments: [String] = []
    @Option(help: "Directory for the records, job outputs, summary and report (created when missing).")
    var out: String?
    @Flag(help: "List the experiments and their grids, then exit.")
    var list = false
    @Flag(help: "The small version: synthetic data, tiny grids, one seed.")
    var quick = false
    @Option(parsing: .unconditional, help: "Seeds per grid point (default: 3; 1 with --quick).")
    var seeds: Int?
    @Option(parsing: .unconditional, help: "Ranks per job.")
    var ranks: Int = 4
    @Option(help: "Training data of every job (default: fashion-mnist; synthetic with --quick).")
    var data: String?
    @Option(parsing: .unconditional, help: "Training subset: the first N samples (default: 10000; all with --quick).")
    var trainSamples: Int?
    @Option(name: [.customLong("samples-per-job"), .customLong("sample-budget")], parsing: .unconditional,
            help: "Training samples each job processes over all ranks (default: 40000; 1024 with --quick).")
    var sampleBudget: Int?
    @Option(help: "Model of every job (default: resnet20).")
    var model: String?
    @Option(parsing: .unconditional, help: "Channel-width multiplier of every job (default: 0.25; 0.125 with --quick).")
    var width: Double?
    @Option(parsing: .unconditional, help: "--lr of every job, at the reference batch 128 (default: 0.1).")
    var lr: Double?
    @Option(parsing: .unconditional, help: "Batch Renorm's plain-BN warm-up as a fraction of each run (default: the trainer's 0.03).")
    var brnWarmup: Double?
    @Option(parsing: .unconditional, help: "GroupNorm jobs with this many channels per group instead of 8 groups.")
    var gnChannelsPerGroup: Int?
    @Flag(help: "Run jobs with --simulate-ranks in one process each instead of under mpirun.")
    var simulate = false
    @Option(help: "Extra mpirun arguments, space-separated (e.g. '--hostfile hosts').")
    var mpirunArgs: String?
    @Flag(help: "Run jobs recorded as failed again.")
    var retryFailed = false
    @Flag(help: "Only rewrite summary.json and report.md from the records.")
    var reportOnly = false
    @Option(parsing: .unconditional, help: "Stop a job after this many seconds and record it as failed.")
    var jobTimeout: Double = 4 * 3600

    var settings: StudySettings {
        var s = quick ? StudySettings.quickSettings : StudySettings.full
        if let seeds { s.seeds = seeds }
        s.ranks = ranks
        if let data { s.data = data }
        if let trainSamples { s.trainSamples = trainSamples }
        if let sampleBudget { s.sampleBudget = sampleBudget }
        if let model { s.model = model }
        if let width { s.width = width }
        if let lr { s.learningRate = lr }
        s.brnWarmup = brnWarmup
        s.gnChannelsPerGroup = gnChannelsPerGroup
        return s
    }

    func validate() throws {
        for name in experiments where !StudyCatalog.names.contains(name) {
            throw ValidationError("unknown experiment '\(name)' (\(StudyCatalog.names.joined(separator: ", ")))")
        }
        if let seeds, !(1...100).contains(seeds) { throw ValidationError("--seeds must be between 1 and 100, got \(seeds)") }
        guard (1...1024).contains(ranks) else { throw ValidationError("--ranks must be between 1 and 1024, got \(ranks)") }
        if let trainSamples, trainSamples < 2 { throw ValidationError("--train-samples must be ≥ 2, got \(trainSamples)") }
        if let sampleBudget, sampleBudget < 1 { throw ValidationError("--sample-budget must be ≥ 1, got \(sampleBudget)") }
        if let width, !(width.isFinite && width > 0 && width <= 16) { throw ValidationError("--width must be in (0, 16], got \(width)") }
        if let lr, !(lr.isFinite && lr > 0 && lr <= 100) { throw ValidationError("--lr must be in (0, 100], got \(lr)") }
        if let brnWarmup, !(brnWarmup.isFinite && (0...0.99).contains(brnWarmup)) {
            throw ValidationError("--brn-warmup must be a fraction in [0, 0.99], got \(brnWarmup)")
        }
        if let gnChannelsPerGroup, gnChannelsPerGroup < 1 { throw ValidationError("--gn-channels-per-group must be ≥ 1, got \(gnChannelsPerGroup)") }
        if let model, model.isEmpty || model.contains(" ") { throw ValidationError("--model needs a model name, got '\(model)'") }
        guard jobTimeout.isFinite && jobTimeout >= 1 else { throw ValidationError("--job-timeout must be at least 1 second, got \(jobTimeout)") }
        if !list && out == nil { throw ValidationError("--out DIR is required (where the results go)") }
        if let out {
            var isDirectory: ObjCBool = false
            if FileManager.default.fileExists(atPath: out, isDirectory: &isDirectory) && !isDirectory.boolValue {
                throw ValidationError("--out \(out) exists and is not a directory")
            }
        }
    }

    func run() throws {
        let settings = settings
        let chosen = (experiments.isEmpty ? StudyCatalog.names : experiments).compactMap { StudyCatalog.experiment($0, settings) }
        if list {
            for experiment in chosen {
                let jobs = Set(experiment.jobs.map(\.key)).count
                print("\(experiment.name): \(experiment.title) — \(jobs) jobs")
                print("  claim: \(experiment.claim)")
                for panel in experiment.panels where panel.kind != .diagnostics {
                    var series: [String] = []
                    for point in panel.points where !series.contains(point.series) { series.append(point.series) }
                    let xs = Array(Set(panel.points.map(\.x))).sorted().map { StudyCatalog.format($0) }
                    print("  \(panel.name): \(panel.xLabel) ∈ {\(xs.joined(separator: ", "))}; series: \(series.joined(separator: "; "))")
                }
            }
            let total = StudyRunner.schedule(chosen)
            print("\(total.count) distinct jobs (\(settings.seeds) seed(s), \(settings.ranks) ranks, \(settings.sampleBudget) samples each, \(settings.data))")
            return
        }
        // One study per directory: a second process on the same --out stops here (it would run every
        // job twice and delete the metrics the first one is writing).
        try FileManager.default.createDirectory(atPath: out!, withIntermediateDirectories: true)
        let lock: WriterLock
        do { lock = try WriterLock(for: out!, directory: true, flag: "--out") } catch {
            FileHandle.standardError.write(Data("syncbn-study: error: \(error)\n".utf8))
            throw ExitCode(2)
        }
        defer { withExtendedLifetime(lock) {} }
        var launcher = StudyLauncher(trainBinary: Self.siblingBinary("syncbn-train"))
        launcher.simulate = simulate
        launcher.jobTimeout = jobTimeout
        launcher.mpirunArguments = mpirunArgs.map { $0.split(separator: " ").map(String.init) } ?? []
        let runner = try StudyRunner(directory: out!, launcher: launcher)
        runner.retryFailed = retryFailed
        if reportOnly { try runner.describe(chosen, settings: settings) } else { try runner.run(chosen, settings: settings) }
        let summary = StudySummary(settings: settings, experiments: chosen, record: runner.record)
        try writeJSON(summary, to: out! + "/summary.json")
        try Data(summary.markdown.utf8).write(to: URL(fileURLWithPath: out! + "/report.md"), options: .atomic)
        let keys = StudyRunner.schedule(chosen).map(\.key)
        let failed = keys.filter { runner.record($0)?.status == .failed }.count
        let pending = keys.filter { runner.record($0) == nil }.count
        FileHandle.standardError.write(Data("syncbn-study: \(keys.count - failed - pending) jobs done, \(failed) failed, \(pending) not run; \(out!)/report.md, \(out!)/summary.json\n".utf8))
        if failed > 0 { throw ExitCode(1) }
    }

    /// A binary installed beside this one.
    static func siblingBinary(_ name: String) -> String {
        let me = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        return URL(fileURLWithPath: me).deletingLastPathComponent().appendingPathComponent(name).path
    }
}

SyncBNStudy.main()
