import Foundation
import Kernels
import TestSupport
import Training
import XCTest

/// Nothing lost, nothing hung: every subcommand's outputs guarded, one writer per output, every
/// wait watched, resumes that check what they resume. Each case is the failure as it was found,
/// now refused or handled; every process has a watchdog.
final class HardeningTests: XCTestCase {
    var dir = ""

    override func setUpWithError() throws {
        dir = temporaryDirectory("syncbn-hardening")
    }

    override func tearDown() {
        try? FileManager.default.removeItem(atPath: dir)
    }

    func train(_ arguments: [String], timeout: Double = 120) throws -> ProcessResult {
        try runProcess(Harness.train, arguments, timeout: timeout)
    }

    /// One error line naming every part, a non-zero exit, no trace.
    func assertRefused(_ result: ProcessResult, _ parts: [String], status: Int32? = nil, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertFalse(result.timedOut, describe(result), file: file, line: line)
        if let status { XCTAssertEqual(result.status, status, describe(result), file: file, line: line) } else { XCTAssertNotEqual(result.status, 0, describe(result), file: file, line: line) }
        XCTAssertFalse(result.stderr.contains("Fatal error") || result.stderr.contains("Stack dump"), describe(result), file: file, line: line)
        let errors = result.stderr.split(separator: "\n").filter { $0.lowercased().contains("error") }
        XCTAssertEqual(errors.count, 1, "one error line: \(describe(result))", file: file, line: line)
        for part in parts { XCTAssertTrue(errors.first?.contains(part) == true, "'\(errors.first ?? "")' lacks '\(part)'", file: file, line: line) }
    }

    func checkpoint(_ name: String = "a.safetensors", steps: Int = 4, extra: [String] = []) throws -> String {
        let path = dir + "/" + name
        let result = try train(["--steps", String(steps), "--save", path, "--eval-stats", "ema"] + extra)
        XCTAssertEqual(result.status, 0, describe(result))
        return path
    }

    /// A checkpoint trained with sync groups of 2 on 4 ranks reaches every subcommand on one
    /// process: inference uses the stored statistics, so the groups do not have to fit the job.
    func testCheckpointsOfSyncGroupsAreEvaluatedAndExportedOnOneProcess() throws {
        let path = dir + "/groups.safetensors"
        let trained = try train(["--simulate-ranks", "4", "--sync-group-size", "2", "--steps", "4", "--batch-size", "4",
                                 "--data", "synthetic:train=256,heldout=32", "--eval-stats", "ema", "--save", path])
        XCTAssertEqual(trained.status, 0, describe(trained))
        let done = trained.stderr.split(separator: "\n").first { $0.hasPrefix("done:") }.map(String.init) ?? ""
        let accuracy = done.components(separatedBy: "accuracy ").dropFirst().first?.components(separatedBy: " ").first
        XCTAssertNotNil(accuracy, describe(trained))
        for ranks in ["1", "3"] {
            let evaluated = try train(["evaluate", "--resume", path, "--simulate-ranks", ranks])
            XCTAssertEqual(evaluated.status, 0, describe(evaluated))
            XCTAssertTrue(evaluated.stderr.contains("accuracy \(accuracy ?? "?")"), "the training run's own figure on \(ranks) rank(s): \(describe(evaluated))")
        }
        for arguments in [["export-torch", "--out", dir + "/t.safetensors"], ["export-folded", "--out", dir + "/f.safetensors"],
                          ["recompute-stats", "--save", dir + "/r.safetensors"]] {
            let result = try train(Array(arguments.prefix(1)) + ["--resume", path] + Array(arguments.dropFirst()))
            XCTAssertEqual(result.status, 0, describe(result))
            XCTAssertTrue(FileManager.default.fileExists(atPath: arguments[2]), describe(result))
        }
        let recomputed = try train(["recompute-stats", "--resume", path, "--save", dir + "/r3.safetensors", "--simulate-ranks", "3"])
        XCTAssertTrue(recomputed.stderr.contains("--sync-group-size 2 does not fit 3 ranks: batch statistics here span groups of 1"), describe(recomputed))
    }

    func testEverySubcommandRefusesToOverwriteItsInputsByIdentity() throws {
        let a = try checkpoint()
        let before = try Data(contentsOf: URL(fileURLWithPath: a))
        // The same file reached through a symbolic link to its directory, and by a hard link.
        try FileManager.default.createSymbolicLink(atPath: dir + "/link", withDestinationPath: dir)
        XCTAssertEqual(link(a, dir + "/hard.safetensors"), 0)
        let data = dir + "/x.npy", labels = dir + "/y.npy"
        try writeNumpy(Tensor<Float>(shape: [40, 3, 8, 8], repeating: 0.5), to: data)
        try writeNumpy(Tensor<Float>(shape: [40], scalars: (0..<40).map { Float($0 % 4) }), to: labels)
        let cases: [([String], String)] = [
            (["evaluate", "--resume", a, "--logits", a], "--logits"),
            (["evaluate", "--resume", a, "--inputs", dir + "/link/a.safetensors"], "--inputs"),
            (["evaluate", "--resume", a, "--logits", dir + "/hard.safetensors"], "--logits"),
            (["export-torch", "--resume", a, "--out", dir + "/link/a.safetensors"], "--out"),
            (["export-folded", "--resume", a, "--out", a], "--out"),
            (["recompute-stats", "--resume", a, "--save", dir + "/hard.safetensors"], "--save"),
            (["train", "--data", "npy:\(data),\(labels)", "--steps", "2", "--save", dir + "/link/x.npy"], "--save"),
            (["train", "--data", "npy:\(data),\(labels)", "--steps", "2", "--metrics", dir + "/link/y.npy", "--overwrite-metrics"], "--metrics"),
            (["evaluate", "--resume", a, "--logits", "/dev/null"], "a device"),
        ]
        for (arguments, flag) in cases {
            let result = try train(arguments)
            assertRefused(result, [flag], status: 64)
        }
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: a)), before, "the checkpoint is untouched")
        XCTAssertEqual(try NumpyArray(contentsOf: data).shape, [40, 3, 8, 8], "the training data is untouched")
    }

    func testASecondJobOnTheSameOutputIsRefusedNamingTheHolder() throws {
        let save = dir + "/b.safetensors", metrics = dir + "/m.jsonl"
        var second: ProcessResult?
        let first = try runProcess(Harness.train, ["--steps", "100000", "--save", save, "--metrics", metrics, "--eval-stats", "ema"],
                                   timeout: 60, killWhen: {
            guard second == nil, FileManager.default.fileExists(atPath: metrics) else { return second != nil }
            second = try? self.train(["--steps", "5", "--save", save, "--eval-stats", "ema"])
            return true
        })
        XCTAssertFalse(first.timedOut)
        let refused = try XCTUnwrap(second)
        assertRefused(refused, ["--save", save, "another job (PID"], status: 2)
        XCTAssertFalse(FileManager.default.fileExists(atPath: save), "the refused job wrote nothing")
        // Once the holder is gone (here killed), the output is free again.
        let after = try train(["--steps", "3", "--save", save, "--eval-stats", "ema"])
        XCTAssertEqual(after.status, 0, describe(after))
    }

    func testAPartialFileOfALiveWriterIsKeptAndADeadOnesRemoved() throws {
        let save = dir + "/c.safetensors"
        let live = dir + "/.c.safetensors.partial-1"   // PID 1 (init) is always alive
        let dead = dir + "/.c.safetensors.partial-999999999"
        for path in [live, dead] { XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: Data("x".utf8))) }
        let result = try train(["--steps", "2", "--save", save, "--eval-stats", "ema"])
        XCTAssertEqual(result.status, 0, describe(result))
        XCTAssertTrue(FileManager.default.fileExists(atPath: live), "a live process's partial file is its own")
        XCTAssertFalse(FileManager.default.fileExists(atPath: dead))
    }

    func testAResumeChecksTheSettingsItContinues() throws {
        let path = dir + "/r.safetensors"
        XCTAssertEqual(try train(["--steps", "4", "--save", path, "--eval-stats", "ema", "--lr", "0.1"]).status, 0)
        for (flags, setting) in [(["--lr", "0.5"], "--lr"), (["--batch-size", "7"], "--batch-size"), (["--norm", "bn"], "--norm")] {
            let result = try train(["--steps", "8", "--save", path, "--resume", path, "--eval-stats", "ema", "--allow-config-change", "steps"] + flags)
            assertRefused(result, ["--resume", setting, "--allow-config-change"], status: 2)
        }
        // Allowed: the change is printed with the learning rate it gives, and the run continues.
        let allowed = try train(["--steps", "8", "--save", path, "--resume", path, "--eval-stats", "ema", "--lr", "0.5", "--allow-config-change", "lr,steps"])
        XCTAssertEqual(allowed.status, 0, describe(allowed))
        XCTAssertTrue(allowed.stderr.contains("--lr was 0.1, now 0.5") && allowed.stderr.contains("--steps was 4, now 8"), describe(allowed))
        // Settings outside the trajectory (evaluation, logging) may change freely.
        let metrics = dir + "/r.jsonl"
        let free = try train(["--steps", "10", "--save", path, "--resume", path, "--lr", "0.5", "--allow-config-change", "steps",
                              "--eval-stats", "both", "--log-every", "3", "--metrics", metrics])
        XCTAssertEqual(free.status, 0, describe(free))
        // --resume auto on a run that has finished: it says so and succeeds (a scheduler's retry).
        let again = try train(["--steps", "10", "--save", path, "--resume", "auto", "--lr", "0.5", "--eval-stats", "both", "--metrics", metrics])
        XCTAssertEqual(again.status, 0, describe(again))
        XCTAssertTrue(again.stderr.contains("the run is done"), describe(again))
        // An explicit --resume of a finished run is still an error (nothing to train).
        assertRefused(try train(["--steps", "10", "--save", path, "--resume", path, "--lr", "0.5"]), ["nothing to train"], status: 2)
    }

    func testResumedMetricsRepairAPartialLineAndRefuseAnotherRunsHistory() throws {
        let path = dir + "/p.safetensors", metrics = dir + "/p.jsonl"
        XCTAssertEqual(try train(["--steps", "4", "--save", path, "--metrics", metrics, "--eval-stats", "ema"]).status, 0)
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: metrics))
        handle.seekToEndOfFile()
        handle.write(Data("{\"step\": 9, \"lo".utf8))   // a write cut off by a kill
        try handle.close()
        let resumed = try train(["--steps", "6", "--save", path, "--resume", path, "--metrics", metrics, "--eval-stats", "ema",
                                 "--allow-config-change", "steps"])
        XCTAssertEqual(resumed.status, 0, describe(resumed))
        XCTAssertTrue(resumed.stderr.contains("partial line"), describe(resumed))
        let lines = try String(contentsOfFile: metrics, encoding: .utf8).split(separator: "\n")
        for line in lines { XCTAssertNotNil(try? JSONSerialization.jsonObject(with: Data(line.utf8)), "every line is JSON: \(line)") }
        XCTAssertTrue(lines.contains { $0.contains("\"resume\"") })
        // Another run's history: a metrics file from a run with another seed.
        let other = dir + "/other.jsonl"
        XCTAssertEqual(try train(["--steps", "2", "--metrics", other, "--eval-stats", "ema", "--seed", "5"]).status, 0)
        let mixed = try train(["--steps", "8", "--save", path, "--resume", path, "--metrics", other, "--eval-stats", "ema",
                               "--allow-config-change", "steps"])
        assertRefused(mixed, ["--metrics", "history of another run"])
    }

    func testACheckpointWithANegativeVarianceIsAOneLineError() throws {
        let a = try checkpoint()
        let read = try Safetensors.read(a)
        var tensors = read.tensors
        let metadata = read.metadata
        let name = try XCTUnwrap(tensors.keys.first { $0.hasSuffix("running_var") })
        var values = try XCTUnwrap(tensors[name]?.floats)
        values[0] = -0.5
        tensors[name] = StoredTensor(floats: values, shape: tensors[name]!.shape)
        let bad = dir + "/negative.safetensors"
        try Safetensors.write(tensors.map { (name: $0.key, tensor: $0.value) }, metadata: metadata, to: bad)
        for arguments in [["evaluate", "--resume", bad], ["export-folded", "--resume", bad, "--out", dir + "/f.safetensors"]] {
            assertRefused(try train(arguments), ["negative variance", name], status: 2)
        }
    }

    func testAStoppedRankEndsEverySubcommandAfterItsCollectiveTimeout() throws {
        guard let mpirun = Harness.mpirun else { throw XCTSkip("mpirun is not installed (launch/setup installs it)") }
        let a = try checkpoint()
        let tag = "stopped-\(UUID().uuidString.prefix(8))"
        // Each subcommand on 2 ranks; rank 1 stopped as soon as it exists (before or during loading,
        // so the start-up agreement is among the waits the watchdog must cover).
        let cases: [[String]] = [
            ["--steps", "100000", "--eval-stats", "ema", "--save", dir + "/\(tag)-train.safetensors"],
            ["evaluate", "--resume", a, "--precise-bn-samples", "64", "--inputs", dir + "/\(tag)-in.npy"],
            ["recompute-stats", "--resume", a, "--save", dir + "/\(tag)-re.safetensors"],
        ]
        for arguments in cases {
            var stopped: Int32?
            defer { if let stopped { kill(stopped, SIGKILL) } }
            let started = Date()
            let result = try runProcess(mpirun, Harness.mpirunArguments(ranks: 2) + [Harness.train] + arguments + ["--collective-timeout", "5"],
                                        timeout: 90, killWhen: {
                if stopped == nil, let victim = trainProcesses(matching: tag).max(), trainProcesses(matching: tag).count == 2 {
                    kill(victim, SIGSTOP)
                    stopped = victim
                }
                return false
            })
            XCTAssertNotNil(stopped, "a rank was stopped: \(describe(result))")
            XCTAssertFalse(result.timedOut, "the job ended by itself: \(describe(result))")
            XCTAssertNotEqual(result.status, 0, describe(result))
            XCTAssertLessThan(Date().timeIntervalSince(started), 5 + 30, describe(result))
            XCTAssertTrue(result.stderr.contains("no rank answered for") && result.stderr.contains("--collective-timeout 5"), describe(result))
        }
    }

    /// An error every rank meets alike while building the model or reading the checkpoint is
    /// printed once, by rank 0, with no abort banner: the ranks agree on the failure instead of
    /// aborting (`Communicator.agreeing`). Found as: `--norm gn --gn-groups 3` printed per rank
    /// with MPI_ABORT's banner, and a truncated `--resume` whose ranks named different entries.
    func testErrorsEveryRankMeetsArePrintedOnceWithoutAnAbortBanner() throws {
        let a = try checkpoint()
        let bytes = try Data(contentsOf: URL(fileURLWithPath: a))
        let truncated = dir + "/truncated.safetensors"
        try bytes.prefix(bytes.count - 64).write(to: URL(fileURLWithPath: truncated))
        for (arguments, part) in [(["--norm", "gn", "--gn-groups", "3", "--steps", "2"], "--gn-groups 3 does not divide"),
                                  (["--steps", "8", "--resume", truncated, "--eval-stats", "ema"], truncated),
                                  (["evaluate", "--resume", truncated], truncated)] {
            let result = try Harness.mpi(2, Harness.train, arguments, timeout: 60)
            assertRefused(result, [part], status: 2)
            XCTAssertFalse(result.stderr.contains("MPI_ABORT") || result.stderr.contains("rank 1:"), describe(result))
        }
    }

    func testASecondStudyOnTheSameDirectoryIsRefused() throws {
        let out = dir + "/study"
        var second: ProcessResult?
        let first = try runProcess(StudyTests.study, ["--quick", "--simulate", "--out", out, "small-batch"], timeout: 120, killWhen: {
            guard second == nil, FileManager.default.fileExists(atPath: out + "/study.json") else { return second != nil }
            second = try? runProcess(StudyTests.study, ["--quick", "--simulate", "--out", out, "small-batch"], timeout: 30)
            return true
        })
        XCTAssertFalse(first.timedOut)
        let refused = try XCTUnwrap(second)
        XCTAssertEqual(refused.status, 2, describe(refused))
        XCTAssertTrue(refused.stderr.contains("--out") && refused.stderr.contains("another job (PID"), describe(refused))
    }

    func testAnImpossibleStudyRecordIsReportedAsFailedNotTabulated() throws {
        let out = dir + "/records-study"
        let listed = try runProcess(StudyTests.study, ["--quick", "--simulate", "--out", out, "cbn-rho"], timeout: 170)
        XCTAssertEqual(listed.status, 0, describe(listed))
        let records = try FileManager.default.contentsOfDirectory(atPath: out + "/records")
        let path = out + "/records/" + records.sorted()[0]
        var object = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path))) as? [String: Any])
        var result = try XCTUnwrap(object["result"] as? [String: Any])
        result["emaAccuracy"] = 5.0
        object["result"] = result
        try JSONSerialization.data(withJSONObject: object).write(to: URL(fileURLWithPath: path))
        let report = try runProcess(StudyTests.study, ["--quick", "--simulate", "--out", out, "cbn-rho", "--report-only"], timeout: 60)
        XCTAssertEqual(report.status, 1, "a failed job makes the exit non-zero: \(describe(report))")
        let text = try String(contentsOfFile: out + "/report.md", encoding: .utf8)
        XCTAssertFalse(text.contains("-400"), "an accuracy of 5.0 is not an error of −400 %")
        XCTAssertTrue(text.contains("failed"), text)
    }

    /// Rewrites one tensor of checkpoint `path` into a new file.
    func tampered(_ path: String, as name: String, _ change: (inout [String: StoredTensor]) throws -> Void) throws -> String {
        let read = try Safetensors.read(path)
        var tensors = read.tensors
        try change(&tensors)
        let out = dir + "/" + name
        try Safetensors.write(tensors.map { (name: $0.key, tensor: $0.value) }, metadata: read.metadata, to: out)
        return out
    }

    func testNonFiniteLogitsAreAnErrorNotANaNRow() throws {
        let a = try checkpoint()
        let huge = try tampered(a, as: "huge.safetensors") { tensors in
            let name = try XCTUnwrap(tensors.keys.first { $0.hasPrefix("classifier.") && $0.hasSuffix("weight") })
            tensors[name] = StoredTensor(floats: [Float](repeating: 3e38, count: tensors[name]!.floats!.count), shape: tensors[name]!.shape)
        }
        assertRefused(try train(["evaluate", "--resume", huge, "--json"]), ["non-finite"], status: 2)
        assertRefused(try train(["export-folded", "--resume", huge, "--out", dir + "/folded.safetensors"]), ["non-finite"], status: 2)
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/folded.safetensors"), "nothing written")
    }

    func testSizesThatCannotFitAreRefusedBeforeAllocating() throws {
        assertRefused(try train(["--data", "synthetic:train=100000000", "--steps", "1"]), ["synthetic", "GiB"], status: 2)
        let bench = try runProcess(Harness.bench, ["layer", "--shape", "9999999999,9999999999"], timeout: 30)
        assertRefused(bench, ["--shape", "too large"], status: 64)
        // A cross-iteration window whose iteration counter cannot be an Int.
        let cbn = try checkpoint("cbn.safetensors", steps: 4, extra: ["--norm", "cbn", "--lr-schedule", "constant", "--warmup-steps", "0"])
        let counter = try tampered(cbn, as: "counter.safetensors") { tensors in
            let name = try XCTUnwrap(tensors.keys.first { $0.hasSuffix("cbn_window.rank0") })
            var values = try XCTUnwrap(tensors[name]?.doubles)
            values[0] = 1e300
            tensors[name] = StoredTensor(doubles: values, shape: [values.count])
        }
        let resumed = try train(["--steps", "6", "--norm", "cbn", "--lr-schedule", "constant", "--warmup-steps", "0", "--eval-stats", "ema",
                                 "--resume", counter, "--save", dir + "/continued.safetensors"])
        assertRefused(resumed, ["cbn_window", "cross-iteration window"], status: 2)
    }
}
