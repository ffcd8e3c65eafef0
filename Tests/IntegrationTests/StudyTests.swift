import Foundation
import Study
import TestSupport
import XCTest

/// syncbn-study: keys, resuming, failures, the quick study under mpirun and its figures.
final class StudyTests: XCTestCase {
    static var study: String { productsDirectory + "/syncbn-study" }
    var repositoryRoot: String { Harness.repositoryRoot }

    /// A runner whose jobs run as in-process ranks of one syncbn-train each (no mpirun).
    func simulatedRunner(in directory: String) throws -> StudyRunner {
        var launcher = StudyLauncher(trainBinary: Harness.train)
        launcher.simulate = true
        launcher.jobTimeout = 120
        return try StudyRunner(directory: directory, launcher: launcher)
    }

    func temporaryDirectory() throws -> String {
        let path = NSTemporaryDirectory() + "syncbn-study-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(atPath: path) }
        return path
    }

    func testJobsAreKeyedByTheirFullConfiguration() {
        let a = StudyJob(ranks: 4, options: ["norm": "bn", "batch-size": "4", "seed": "1"])
        let reordered = StudyJob(ranks: 4, options: ["seed": "1", "batch-size": "4", "norm": "bn"])
        XCTAssertEqual(a.key, reordered.key)
        XCTAssertEqual(a.key.count, 16)
        var changed = [StudyJob(ranks: 2, options: a.options)]
        for (key, value) in [("norm", "syncbn"), ("batch-size", "8"), ("seed", "2"), ("lr", "0.1")] {
            var options = a.options
            options[key] = value
            changed.append(StudyJob(ranks: 4, options: options))
        }
        changed.append(StudyJob(kind: .precise, ranks: 4, options: ["precise-bn-samples": "128"], parent: a))
        XCTAssertEqual(Set(changed.map(\.key)).count, changed.count)
        XCTAssertFalse(changed.map(\.key).contains(a.key))
    }

    func testTheReportsStatisticsMatchKnownValues() throws {
        // Against numpy: t intervals (t₀.₉₇₅ with 4 and 2 degrees of freedom) and a least-squares slope.
        let mean = try XCTUnwrap(StudyStatistics.mean([1, 2, 3, 4, 5]))
        XCTAssertEqual(mean.estimate, 3, accuracy: 1e-12)
        XCTAssertEqual(mean.low, 1.0370716, accuracy: 1e-6)
        XCTAssertEqual(mean.high, 4.9629284, accuracy: 1e-6)
        XCTAssertFalse(mean.withinNoise)
        let paired = try XCTUnwrap(StudyStatistics.paired([1: 10, 2: 12, 3: 11, 4: 50], [1: 9, 2: 10, 3: 10]))
        XCTAssertEqual(paired.n, 3, "only the seeds both arms have")
        XCTAssertEqual(paired.estimate, 4.0 / 3, accuracy: 1e-12)
        XCTAssertEqual(paired.low, -0.101, accuracy: 1e-3)
        XCTAssertEqual(paired.high, 2.7676667, accuracy: 1e-6)
        XCTAssertTrue(paired.withinNoise)
        XCTAssertTrue(paired.text.hasSuffix("within noise"), paired.text)
        let slope = try XCTUnwrap(StudyStatistics.slope(x: [1, 2, 3, 4], y: [2, 4.1, 5.9, 8.2]))
        XCTAssertEqual(slope.estimate, 2.04, accuracy: 1e-12)
        XCTAssertEqual(slope.low, 1.7611337, accuracy: 1e-6)
        XCTAssertEqual(slope.high, 2.3188663, accuracy: 1e-6)
        XCTAssertNil(StudyStatistics.slope(x: [1, 1], y: [2, 3]))
        XCTAssertEqual(StudyStatistics.t975(40), 2.021, accuracy: 1e-3)
    }

    func testTheNewOptionsReachTheJobCommandLines() {
        var settings = StudySettings.full
        settings.model = "resnet32"
        settings.width = 0.5
        settings.learningRate = 0.2
        settings.ranks = 8
        settings.trainSamples = 20_000
        settings.sampleBudget = 64_000
        settings.brnWarmup = 0.25
        settings.gnChannelsPerGroup = 4
        XCTAssertEqual(StudySettings.full.seeds, 3, "three seeds by default")
        // E1's cells set their own width, data and length (its grid is over them); E2 and E7 run
        // in E1's passing cell (ResNet-56), whatever the settings' model.
        // E6 fixes its own width, data and length too (full width, 10k images, 30 epochs).
        let cells = Set(["e1-collapse", "e6-ushape"].flatMap { StudyCatalog.experiment($0, settings)!.jobs.map(\.options) })
        XCTAssertEqual(Set(StudyCatalog.experiment("e6-ushape", settings)!.jobs.map { [$0.options["width"]!, $0.options["train-samples"]!, $0.options["steps"]!] }),
                       [["1", "10000", "\(300_000 / (8 * 128))"]])
        let inCollapseCell = ["e2-matched", "e7-frozen"].flatMap { StudyCatalog.experiment($0, settings)!.jobs }
        XCTAssertEqual(Set(inCollapseCell.map { $0.options["model"] }), ["resnet56"])
        let jobs = StudyCatalog.experiments(settings).flatMap(\.jobs).filter { $0.kind == .train }
        XCTAssertFalse(jobs.isEmpty)
        for job in jobs {
            XCTAssertEqual(job.ranks, 8)
            if cells.contains(job.options) { continue }
            XCTAssertEqual(job.options["model"], inCollapseCell.contains { $0.key == job.key } ? "resnet56" : "resnet32")
            XCTAssertEqual(job.options["width"], "0.5")
            XCTAssertEqual(job.options["train-samples"], "20000")
            let steps = Int(job.options["steps"]!)!, batch = Int(job.options["batch-size"]!)!
            XCTAssertEqual(steps, 64_000 / (8 * batch), "the sample budget sets the steps")
            if job.options["norm"] == "brn" { XCTAssertEqual(job.options["brn-warmup"], "0.25") }
            if job.options["norm"] == "gn" { XCTAssertEqual(job.options["gn-channels-per-group"], "4") }
            if job.options["norm"] == "cbn" { XCTAssertNotNil(job.options["cbn-gradient"], "the CBN gradient is always named") }
        }
        XCTAssertTrue(jobs.contains { $0.options["brn-warmup"] != nil } && jobs.contains { $0.options["gn-channels-per-group"] != nil })
        // E3's peak rates at b = 4 on 8 ranks: lr = peak × 128 / 32.
        let e3 = StudyCatalog.experiment("e3-compensation", settings)!.jobs.map { Double($0.options["lr"]!)! }
        XCTAssertEqual(Set(e3), [0.05, 0.2])
        // E1: an SGD batch of 128 (16 per rank on 8 ranks), ghost batches of 2 against none, in
        // four cells of width × data and length of the study's model, and ResNet-56 in the first.
        let e1 = StudyCatalog.experiment("e1-collapse", settings)!.jobs
        XCTAssertEqual(Set(e1.map { $0.options["batch-size"] }), ["16"])
        XCTAssertEqual(Set(e1.map { $0.options["ghost-batch-size"] ?? "none" }), ["2", "none"])
        XCTAssertEqual(Set(e1.map { [$0.options["model"]!, $0.options["width"]!, $0.options["train-samples"]!, $0.options["steps"]!] }),
                       [["resnet32", "0.25", "10000", "312"], ["resnet32", "1", "10000", "312"], ["resnet32", "0.25", "60000", "2343"],
                        ["resnet32", "1", "60000", "2343"], ["resnet56", "0.25", "10000", "312"]])
    }

    func testTheCommittedReportIsTheOneItsCommittedRecordsGive() throws {
        // docs/study/runs holds every finished job's record and the report made from them: the
        // report must be recomputable by anyone from the records alone.
        let runs = repositoryRoot + "/docs/study/runs"
        let study = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: runs + "/study.json"))) as? [String: Any]
        let names = try XCTUnwrap((study?["experiments"] as? [[String: Any]])?.compactMap { $0["name"] as? String })
        XCTAssertFalse(names.isEmpty)
        let records = try FileManager.default.contentsOfDirectory(atPath: runs + "/records").filter { $0.hasSuffix(".json") }
        XCTAssertFalse(records.isEmpty, "no committed records")
        let dir = try temporaryDirectory()
        try FileManager.default.copyItem(atPath: runs + "/records", toPath: dir + "/records")
        let result = try runProcess(Self.study, names + ["--out", dir, "--report-only"], timeout: 60)
        XCTAssertTrue(result.status == 0 || result.status == 1, describe(result))   // 1: some job failed, still reported
        let recomputed = try String(contentsOfFile: dir + "/report.md", encoding: .utf8)
        let committed = try String(contentsOfFile: runs + "/report.md", encoding: .utf8)
        XCTAssertEqual(recomputed, committed, "docs/study/runs/report.md is not what its records give (re-run --report-only)")
    }

    func testExperimentsShareTheJobsOfTheirCommonGridPoints() {
        let settings = StudySettings.full
        let all = StudyCatalog.experiments(settings)
        let distinct = StudyRunner.schedule(all)
        XCTAssertEqual(Set(distinct.map(\.key)).count, distinct.count)
        XCTAssertLessThan(distinct.count, all.map(\.jobs.count).reduce(0, +), "CBN at b = 4, k = 8, rho 1, burn-in 25 % is one job")
        // Parents run before the PreciseBN evaluations of their checkpoints.
        for (index, job) in distinct.enumerated() {
            if let parent = job.parent {
                XCTAssertTrue(distinct[..<index].contains { $0.key == parent.key })
            }
        }
        // Seed by seed: every job of seed 1 before any job of seed 2.
        let seeds = distinct.filter { $0.kind == .train }.map { $0.options["seed"]! }
        XCTAssertEqual(seeds, seeds.sorted())
        XCTAssertEqual(StudyCatalog.window(forBatch: 2), 16)
        XCTAssertEqual(StudyCatalog.window(forBatch: 32), 1)
    }

    /// Two jobs, one with an invalid option: the failure is recorded with the job's own error and
    /// the other job still runs; a re-run runs nothing, `retryFailed` re-runs only the failure.
    func testAFailedJobIsRecordedAndTheStudyGoesOn() throws {
        let directory = try temporaryDirectory()
        func job(_ batch: String) -> StudyJob {
            StudyJob(ranks: 2, options: ["data": "synthetic:train=64,heldout=32,seed=1", "batch-size": batch, "steps": "3",
                                         "width": "0.25", "log-every": "1"])
        }
        let bad = job("0"), good = job("4")
        let experiment = StudyExperiment(name: "t", title: "t", claim: "t", panels: [
            StudyPanel(name: "p", title: "p", kind: .final, xLabel: "x", xScale: "linear", points: [
                StudyPoint(series: "s", x: 0, seed: 1, job: bad), StudyPoint(series: "s", x: 4, seed: 1, job: good),
            ]),
        ])
        let runner = try simulatedRunner(in: directory)
        var lines: [String] = []
        runner.log = { lines.append($0) }
        XCTAssertEqual(try runner.run([experiment], settings: .quickSettings), 2)
        let failed = try XCTUnwrap(runner.record(bad.key))
        XCTAssertEqual(failed.status, .failed)
        XCTAssertTrue(failed.error?.contains("--batch-size") ?? false, failed.error ?? "no error")
        let ok = try XCTUnwrap(runner.record(good.key))
        XCTAssertEqual(ok.status, .ok)
        XCTAssertNotNil(ok.result?.emaAccuracy)
        XCTAssertTrue(lines.contains { $0.contains("FAILED") }, lines.joined(separator: "\n"))

        XCTAssertEqual(try runner.run([experiment], settings: .quickSettings), 0, "finished and failed jobs are not run again")
        runner.retryFailed = true
        XCTAssertEqual(try runner.run([experiment], settings: .quickSettings), 1)

        let summary = StudySummary(settings: .quickSettings, experiments: [experiment], record: runner.record)
        let points = summary.experiments[0].panels[0].series[0].points
        XCTAssertEqual(points.map(\.failures.count), [1, 0])
        XCTAssertTrue(summary.markdown.contains("(1 failed)"))
    }

    /// E8's inconsistent pairs are PreciseBN jobs on a training job's checkpoint. Job directories
    /// are not committed, so a study resumed elsewhere lacks the checkpoint: the parent is trained
    /// again (its record replaced by that run's) and the evaluations read the new checkpoint. The
    /// evaluation that recomputes the statistics the way the network trained gives the training
    /// run's own final PreciseBN numbers; the other way gives different ones.
    func testAPreciseJobWhoseCheckpointIsGoneTrainsItsParentAgain() throws {
        let directory = try temporaryDirectory()
        let parent = StudyJob(ranks: 2, options: ["data": "two-domain-contrast:synthetic:train=96,heldout=32,seed=2", "batch-size": "8",
                                                  "steps": "6", "width": "0.25", "log-every": "1", "norm": "syncbn", "domain-bn": "",
                                                  "eval-stats": "both", "conv-backend": "im2col"])
        let own = StudyJob(kind: .precise, ranks: 2, options: ["precise-bn-samples": "8192", "precise-bn-domains": "per-domain"], parent: parent)
        let other = StudyJob(kind: .precise, ranks: 2, options: ["precise-bn-samples": "8192", "precise-bn-domains": "pooled"], parent: parent)
        let experiment = StudyExperiment(name: "t", title: "t", claim: "t", panels: [
            StudyPanel(name: "p", title: "p", kind: .crossed, xLabel: "x", xScale: "linear", points: [
                StudyPoint(series: "own", x: 1, seed: 1, job: own), StudyPoint(series: "other", x: 1, seed: 1, job: other),
            ], domain: 1),
        ])
        let runner = try simulatedRunner(in: directory)
        var lines: [String] = []
        runner.log = { lines.append($0) }
        XCTAssertEqual(try runner.run([experiment], settings: .quickSettings), 3)
        func assertFinished(_ jobs: [StudyJob]) {
            for job in jobs {
                XCTAssertEqual(runner.record(job.key)?.status, .ok, "\(job.key): " + (runner.record(job.key)?.error ?? "no error") + "\n" +
                               ((try? String(contentsOfFile: runner.jobDirectory(job.key) + "/log.txt", encoding: .utf8)) ?? "no log"))
            }
        }
        assertFinished([parent, own, other])
        let trained = try XCTUnwrap(runner.record(parent.key)?.result)
        let ownResult = try XCTUnwrap(runner.record(own.key)?.result), otherResult = try XCTUnwrap(runner.record(other.key)?.result)
        XCTAssertEqual(ownResult.preciseAccuracy, trained.preciseAccuracy)
        XCTAssertEqual(try XCTUnwrap(ownResult.preciseDomainAccuracies), try XCTUnwrap(trained.preciseDomainAccuracies))
        XCTAssertEqual(ownResult.emaAccuracy, trained.emaAccuracy, "the checkpoint's stored statistics are the EMA")
        XCTAssertNotEqual(otherResult.preciseLoss, ownResult.preciseLoss)

        // Elsewhere: the records without the job directories; the evaluations to run again.
        try FileManager.default.removeItem(atPath: runner.jobDirectory(parent.key))
        for job in [own, other] { try FileManager.default.removeItem(atPath: runner.recordPath(job.key)) }
        lines = []
        XCTAssertEqual(try runner.run([experiment], settings: .quickSettings), 2)
        assertFinished([parent, own, other])
        XCTAssertEqual(lines.filter { $0.contains("\(parent.key) trained again for its checkpoint") }.count, 1, lines.joined(separator: "\n"))
        XCTAssertTrue(FileManager.default.fileExists(atPath: runner.jobDirectory(parent.key) + "/model.safetensors"))
        let again = try XCTUnwrap(runner.record(own.key)?.result)
        XCTAssertEqual(again.preciseAccuracy, try XCTUnwrap(runner.record(parent.key)?.result).preciseAccuracy)
        let summary = StudySummary(settings: .quickSettings, experiments: [experiment], record: runner.record)
        XCTAssertTrue(summary.markdown.contains("| series \\ x | 1 |"), summary.markdown)
        XCTAssertTrue(summary.markdown.contains("Paired differences (PreciseBN error"), summary.markdown)
    }

    /// The quick study end to end under mpirun; then an interrupted study (records removed)
    /// runs only its missing jobs, and launch/plot draws every experiment.
    func testQuickStudyUnderMPIResumesAndPlots() throws {
        guard Harness.mpirun != nil else { throw XCTSkip("mpirun is not installed (launch/setup installs it)") }
        let directory = try temporaryDirectory()
        let first = try runProcess(Self.study, ["--quick", "--out", directory], timeout: 300)
        XCTAssertEqual(first.status, 0, describe(first))
        let jobs = StudyRunner.schedule(StudyCatalog.experiments(.quickSettings))
        let records = try FileManager.default.contentsOfDirectory(atPath: directory + "/records")
        XCTAssertEqual(Set(records), Set(jobs.map { $0.key + ".json" }))
        let report = try String(contentsOfFile: directory + "/report.md", encoding: .utf8)
        for name in StudyCatalog.names { XCTAssertTrue(report.contains("## \(name):"), name) }
        XCTAssertFalse(report.contains("pending") || report.contains("failed"), report)
        // Every train job ran under mpirun on 4 ranks and recorded both statistics.
        for job in jobs where job.kind == .train {
            let command = try String(contentsOfFile: directory + "/jobs/\(job.key)/command.sh", encoding: .utf8)
            XCTAssertTrue(command.contains("mpirun") && command.contains("-n 4"), command)
        }

        // Interrupt: three records gone. The re-run runs exactly those and leaves the rest alone.
        let removed = jobs.filter { $0.kind == .train }.prefix(3).map(\.key)
        for key in removed { try FileManager.default.removeItem(atPath: directory + "/records/\(key).json") }
        let keptPath = directory + "/records/\(jobs.first { !removed.contains($0.key) }!.key).json"
        let keptBefore = try Data(contentsOf: URL(fileURLWithPath: keptPath))
        let second = try runProcess(Self.study, ["--quick", "--out", directory], timeout: 300)
        XCTAssertEqual(second.status, 0, describe(second))
        XCTAssertTrue(second.stderr.contains("\(jobs.count) jobs, \(jobs.count - 3) already done, 3 to run"), second.stderr)
        XCTAssertEqual(second.stderr.components(separatedBy: "\n").filter { $0.hasPrefix("[") }.count, 3)
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: keptPath)), keptBefore)

        // Figures.
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/python3"),
              (try? runProcess("/usr/bin/python3", ["-c", "import matplotlib"], timeout: 60).status) == 0 else {
            throw XCTSkip("python3-matplotlib is not installed (launch/setup installs it)")
        }
        let plot = try runProcess(repositoryRoot + "/launch/plot", [directory], timeout: 300)
        XCTAssertEqual(plot.status, 0, describe(plot))
        for name in StudyCatalog.names {
            for ext in ["svg", "png"] {
                let size = (try? FileManager.default.attributesOfItem(atPath: "\(directory)/figures/\(name).\(ext)")[.size] as? Int) ?? 0
                XCTAssertGreaterThan(size, 1000, "\(name).\(ext)")
            }
        }
        XCTAssertFalse(plot.stdout.contains("no results yet"), plot.stdout)
        let metrics = directory + "/jobs/\(jobs[0].key)/metrics.jsonl"
        let curves = try runProcess(repositoryRoot + "/launch/plot", ["--curves", metrics, "--out", directory + "/curves"], timeout: 300)
        XCTAssertEqual(curves.status, 0, describe(curves))
        XCTAssertGreaterThan((try? FileManager.default.attributesOfItem(atPath: directory + "/curves/curves.png")[.size] as? Int) ?? 0, 1000)
        // One run's figure, through the system's python3 whatever python3 comes first on PATH.
        let single = try runProcess(repositoryRoot + "/launch/plot", ["--metrics", metrics, directory + "/run.png"], timeout: 300)
        XCTAssertEqual(single.status, 0, describe(single))
        XCTAssertGreaterThan((try? FileManager.default.attributesOfItem(atPath: directory + "/run.png")[.size] as? Int) ?? 0, 1000)
    }

    /// tools/variance_ratio.py (E5's per-layer EMA / PreciseBN variance ratio) against the same
    /// ratios computed here from the checkpoint's tensors; a checkpoint without PreciseBN's
    /// statistics is one line.
    func testTheVarianceRatioToolReadsBothStatisticsOfACheckpoint() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let both = directory + "/both.safetensors", ema = directory + "/ema.safetensors"
        for (path, stats) in [(both, "both"), (ema, "ema")] {
            let trained = try runProcess(Harness.train, ["--steps", "20", "--batch-size", "4", "--data", "synthetic:train=256,heldout=32",
                                                          "--eval-stats", stats, "--precise-bn-samples", "128", "--save", path], timeout: 120)
            XCTAssertEqual(trained.status, 0, describe(trained))
        }
        let tool = repositoryRoot + "/tools/variance_ratio.py"
        let result = try runProcess("/usr/bin/env", ["python3", tool, both, "--json"], timeout: 60)
        XCTAssertEqual(result.status, 0, describe(result))
        let summary = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: [String: Double]])
        let tensors = try checkpointTensors(both)
        let layers = tensors.keys.filter { $0.hasSuffix(".running_var") && !$0.hasPrefix("ema.") }.map { String($0.dropLast(".running_var".count)) }
        XCTAssertEqual(Set(summary.keys), Set(layers))
        for layer in layers {
            let ratios = zip(tensors["ema.\(layer).running_var"]!, tensors["\(layer).running_var"]!).map { Double($0) / Double($1) }.sorted()
            let median = ratios.count % 2 == 1 ? ratios[ratios.count / 2] : (ratios[ratios.count / 2 - 1] + ratios[ratios.count / 2]) / 2
            XCTAssertEqual(summary[layer]?["median"] ?? .nan, median, accuracy: 1e-6 * median, layer)
            XCTAssertEqual(summary[layer]?["min"] ?? .nan, ratios.first!, accuracy: 1e-6 * ratios.first!, layer)
            XCTAssertEqual(summary[layer]?["channels"], Double(ratios.count), layer)
        }
        XCTAssertNotEqual(summary.values.compactMap { $0["median"] }.filter { abs($0 - 1) > 1e-3 }.count, 0, "the two statistics differ")
        let refused = try runProcess("/usr/bin/env", ["python3", tool, ema], timeout: 60)
        XCTAssertEqual(refused.status, 1, describe(refused))
        XCTAssertTrue(refused.stderr.contains("ema.safetensors holds EMA statistics only"), describe(refused))
    }

    func testBadArgumentsAreOneLineErrors() throws {
        for (arguments, expected) in [(["--list", "nonsense"], "unknown experiment 'nonsense'"), (["--quick"], "--out DIR is required"),
                                      (["--out", "/tmp", "--seeds", "0"], "--seeds must be between 1 and 100")] {
            let result = try runProcess(Self.study, arguments, timeout: 60)
            XCTAssertEqual(result.status, 64, describe(result))
            XCTAssertTrue(result.stderr.contains(expected), result.stderr)
        }
        let list = try runProcess(Self.study, ["--list"], timeout: 60)
        XCTAssertEqual(list.status, 0)
        for name in StudyCatalog.names { XCTAssertTrue(list.stdout.contains(name + ":"), name) }
    }
}
