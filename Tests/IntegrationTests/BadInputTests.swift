import Foundation
import Kernels
import TestSupport
import Training
import XCTest

/// Bad input gets a one-line error naming the problem and a non-zero exit: no trace, no hang.
final class BadInputTests: XCTestCase {
    var dir = ""
    override func setUp() { dir = temporaryDirectory("syncbn-bad-input") }
    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func assertOneLineError(_ result: ProcessResult, mentions parts: [String], status: Int32? = 2,
                            file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertFalse(result.timedOut, describe(result), file: file, line: line)
        if let status { XCTAssertEqual(result.status, status, describe(result), file: file, line: line) } else { XCTAssertNotEqual(result.status, 0, file: file, line: line) }
        XCTAssertFalse(result.stderr.contains("Stack dump") || result.stderr.contains("Fatal error"), describe(result), file: file, line: line)
        guard let first = result.stderr.split(separator: "\n").first(where: { $0.lowercased().contains("error") }) else {
            return XCTFail("no error line: \(describe(result))", file: file, line: line)
        }
        for part in parts { XCTAssertTrue(first.contains(part), "'\(first)' lacks '\(part)'", file: file, line: line) }
    }

    func testMissingTruncatedAndMismatchedDataFiles() throws {
        try writeNumpy(Tensor<Float>(shape: [6, 4], repeating: 1), to: dir + "/x.npy")
        try writeNumpy(Tensor<Float>(shape: [5], repeating: 1), to: dir + "/y.npy")
        let cases: [([String], [String])] = [
            (["--data", "idx:\(dir)/none,\(dir)/none2"], ["none", "no such file"]),
            (["--data", "npy:\(dir)/x.npy,\(dir)/y.npy"], ["y.npy", "5 labels", "6 samples"]),
            (["--data", "cifar10:\(dir)"], ["data_batch"]),
            (["--data", "mnist:/tmp/x"], ["unknown source"]),
        ]
        for (args, parts) in cases {
            assertOneLineError(try Harness.direct(Harness.train, args, timeout: 60), mentions: parts)
        }
        var bytes = try Data(contentsOf: URL(fileURLWithPath: dir + "/x.npy"))
        bytes.removeLast(9)
        try bytes.write(to: URL(fileURLWithPath: dir + "/cut.npy"))
        try writeNumpy(Tensor<Float>(shape: [6], repeating: 1), to: dir + "/y6.npy")
        assertOneLineError(try Harness.direct(Harness.train, ["--data", "npy:\(dir)/cut.npy,\(dir)/y6.npy"], timeout: 60), mentions: ["cut.npy", "truncated"])
    }

    func testAbsurdFlagsAreRejectedUpFront() throws {
        for (args, part) in [(["--batch-size", "0"], "--batch-size"), (["--lr", "-1"], "--lr"), (["--model", "resnet"], "--model"),
                             (["--norm", "layernorm"], "--norm"), (["--steps", "0"], "--steps"), (["--lr", "nan"], "--lr"),
                             (["--save", "/no/such/dir/a.safetensors"], "does not exist")] {
            let result = try Harness.direct(Harness.train, args, timeout: 60)
            assertOneLineError(result, mentions: [part], status: nil)
        }
        let result = try Harness.direct(Harness.train, ["--sync-group-size", "3", "--steps", "1", "--data", "synthetic:train=64,heldout=8"], timeout: 60)
        assertOneLineError(result, mentions: ["--sync-group-size 3 exceeds"])
    }

    func testTheDataBudgetIsOneLineBeforeAnythingIsAllocated() throws {
        let small = try Harness.direct(Harness.train, ["--max-data-bytes", "1M", "--data", "synthetic:train=1000,heldout=100", "--steps", "1"], timeout: 60)
        assertOneLineError(small, mentions: ["synthetic: 1000 + 100 samples need 3.2 MiB", "data budget of 1.0 MiB (--max-data-bytes)"])
        let absurd = try Harness.direct(Harness.train, ["--data", "synthetic:train=100000000", "--steps", "1"], timeout: 60)
        assertOneLineError(absurd, mentions: ["synthetic: 100000000 + 2048 samples need", "raise it with --max-data-bytes"])
        XCTAssertLessThan(absurd.seconds, 20)
        for bad in ["0", "-5", "12X", "99999999999T"] {
            assertOneLineError(try Harness.direct(Harness.train, ["--max-data-bytes", bad], timeout: 60), mentions: ["--max-data-bytes"], status: 64)
        }
        let enough = try Harness.direct(Harness.train, ["--max-data-bytes", "4M", "--data", "synthetic:train=1000,heldout=100", "--steps", "1", "--model", "mlp"], timeout: 60)
        XCTAssertEqual(enough.status, 0, describe(enough))
    }

    func testACorruptCheckpointIsRejectedAndADivergingRunStops() throws {
        FileManager.default.createFile(atPath: dir + "/bad.safetensors", contents: Data([1, 2, 3]))
        assertOneLineError(try Harness.direct(Harness.train, ["--resume", dir + "/bad.safetensors", "--steps", "1"], timeout: 60),
                           mentions: ["bad.safetensors"])
        let diverging = try Harness.direct(Harness.train, ["--lr", "1e30", "--steps", "50", "--model", "mlp", "--data", "synthetic:train=64,heldout=8"], timeout: 60)
        assertOneLineError(diverging, mentions: ["diverged"])
    }

    func testErrorsUnderMpirunEndEveryRankWithOneMessage() throws {
        let missing = try Harness.mpi(4, Harness.train, ["--data", "idx:\(dir)/none,\(dir)/none2"], timeout: 60)
        XCTAssertFalse(missing.timedOut, describe(missing))
        XCTAssertNotEqual(missing.status, 0)
        XCTAssertEqual(missing.stderr.components(separatedBy: "syncbn-train: error:").count - 1, 1, describe(missing))
        let diverging = try Harness.mpi(2, Harness.train, ["--lr", "1e30", "--steps", "50", "--model", "mlp", "--data", "synthetic:train=64,heldout=8"], timeout: 60)
        XCTAssertFalse(diverging.timedOut, describe(diverging))
        XCTAssertNotEqual(diverging.status, 0)
        XCTAssertEqual(diverging.stderr.components(separatedBy: "syncbn-train: error:").count - 1, 1, describe(diverging))
        let flag = try Harness.mpi(4, Harness.train, ["--batch-size", "0"], timeout: 60)
        XCTAssertNotEqual(flag.status, 0)
        XCTAssertEqual(flag.stderr.components(separatedBy: "--batch-size must be").count - 1, 1, "one message per job: \(describe(flag))")
        let bench = try Harness.mpi(2, Harness.bench, ["layer", "--input", dir + "/none.npy"], timeout: 60)
        XCTAssertNotEqual(bench.status, 0)
        XCTAssertTrue(bench.stderr.contains("none.npy: no such file"), describe(bench))
    }

    /// A checkpoint whose stored configuration is out of range is rejected like the flag would be.
    func testAnInvalidStoredConfigurationIsAnErrorNotACrash() throws {
        let path = dir + "/c.safetensors"
        let train = try Harness.direct(Harness.train, ["--data", "synthetic:train=64,heldout=16", "--steps", "2", "--save", path], timeout: 60)
        XCTAssertEqual(train.status, 0, describe(train))
        for (field, value, flag) in [("batchSize", "0", "--batch-size"), ("gnGroups", "0", "--gn-groups"), ("epochs", "99999999999", "--epochs")] {
            var file = try Safetensors.read(path)
            var configuration = try JSONSerialization.jsonObject(with: Data(file.metadata["configuration"]!.utf8)) as! [String: Any]
            configuration[field] = Int(value)!
            file.metadata["configuration"] = String(decoding: try JSONSerialization.data(withJSONObject: configuration), as: UTF8.self)
            let broken = dir + "/broken-\(field).safetensors"
            try Safetensors.write(file.tensors.sorted { $0.key < $1.key }.map { ($0.key, $0.value) }, metadata: file.metadata, to: broken)
            for command in [["evaluate"], ["recompute-stats", "--save", dir + "/out.safetensors"], ["export-folded", "--out", dir + "/out.safetensors"]] {
                assertOneLineError(try Harness.direct(Harness.train, command + ["--resume", broken], timeout: 60),
                                   mentions: ["broken-\(field)", "stored configuration is invalid", flag])
            }
        }
    }

    /// PreciseBN per domain or pooled where it cannot be: without domain labels, without
    /// --precise-bn-samples, and saved into a network that keeps one set of statistics.
    func testDomainStatisticsThatCannotBeAreOneLineErrors() throws {
        let path = dir + "/plain.safetensors"
        let train = try Harness.direct(Harness.train, ["--data", "synthetic:train=64,heldout=16", "--steps", "2", "--save", path], timeout: 60)
        XCTAssertEqual(train.status, 0, describe(train))
        assertOneLineError(try Harness.direct(Harness.train, ["evaluate", "--resume", path, "--precise-bn-samples", "32", "--precise-bn-domains", "per-domain"], timeout: 60),
                           mentions: ["per-domain", "domain labels"])
        let usage = try Harness.direct(Harness.train, ["evaluate", "--resume", path, "--precise-bn-domains", "pooled"], timeout: 60)
        XCTAssertEqual(usage.status, 64, describe(usage))
        XCTAssertTrue(usage.stderr.contains("--precise-bn-domains applies with --precise-bn-samples only"), describe(usage))
        let twoDomain = dir + "/two.safetensors"
        let shared = try Harness.direct(Harness.train, ["--data", "two-domain:synthetic:train=64,heldout=16", "--steps", "2", "--save", twoDomain], timeout: 60)
        XCTAssertEqual(shared.status, 0, describe(shared))
        assertOneLineError(try Harness.direct(Harness.train, ["recompute-stats", "--resume", twoDomain, "--save", dir + "/out.safetensors",
                                                              "--precise-bn-domains", "per-domain"], timeout: 60),
                           mentions: ["per-domain", "one set of statistics", "evaluate"])
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/out.safetensors"), "nothing written")
    }

    /// A disk that fills up while a checkpoint is written: one line, the previous file kept, no
    /// partial file left. Needs a small tmpfs (root); skipped where it cannot be mounted.
    func testAFullDiskKeepsThePreviousCheckpoint() throws {
        let mountPoint = dir + "/small"
        try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
        let mount = try runProcess("/bin/mount", ["-t", "tmpfs", "-o", "size=1280k", "tmpfs", mountPoint], timeout: 30)
        guard mount.status == 0 else { throw XCTSkip("cannot mount a tmpfs here (\(mount.stderr.trimmingCharacters(in: .whitespacesAndNewlines))); full-disk test not run") }
        defer { _ = try? runProcess("/bin/umount", [mountPoint], timeout: 30) }
        let target = mountPoint + "/model.safetensors"
        FileManager.default.createFile(atPath: target, contents: Data("the previous checkpoint".utf8))
        // The convnet's checkpoint (weights and momentum) is about 200 KB: more than the disk holds.
        // Found before training: with 200 KiB taken, the checkpoint (about 200 KiB plus 1 MiB of
        // slack) cannot fit.
        let filler = mountPoint + "/filler"
        FileManager.default.createFile(atPath: filler, contents: Data(count: 200 * 1024))
        let early = try Harness.direct(Harness.train, ["--data", "synthetic:train=64,heldout=16", "--steps", "2", "--save", target], timeout: 60)
        assertOneLineError(early, mentions: ["model.safetensors", "KiB free"])
        XCTAssertFalse(early.stderr.contains("step 1/"), "refused before training: \(describe(early))")
        try FileManager.default.removeItem(atPath: filler)
        // The disk fills during the run (another program writes 1150 KiB once training has
        // begun): the periodic save fails with one line.
        let metrics = dir + "/metrics.jsonl"
        let result = try runProcess(Harness.train, ["--data", "synthetic:train=4096,heldout=16", "--steps", "400", "--save", target,
                                                    "--save-every", "100", "--eval-stats", "ema", "--metrics", metrics], timeout: 60, killWhen: {
            if !FileManager.default.fileExists(atPath: filler),
               ((try? String(contentsOfFile: metrics, encoding: .utf8)) ?? "").contains("\"step\":") {
                FileManager.default.createFile(atPath: filler, contents: Data(count: 1150 * 1024))
            }
            return false
        })
        try? FileManager.default.removeItem(atPath: filler)
        assertOneLineError(result, mentions: ["model.safetensors", "No space left on device"])
        XCTAssertEqual(try String(contentsOfFile: target, encoding: .utf8), "the previous checkpoint")
        // The writer's lock file (.model.safetensors.lock) stays; no partial checkpoint does.
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: mountPoint).filter { !$0.hasSuffix(".lock") }, ["model.safetensors"],
                       "no partial file left")
    }

    /// Mistakes that used to surface late or not at all are one-line errors at the start.
    func testConfigurationMistakesFailAtTheStart() throws {
        try writeNumpy(Tensor<Float>(shape: [8, 4], repeating: 1), to: dir + "/x.npy")
        try writeNumpy(Tensor<Float>(shape: [8], scalars: [0, 1, 0, 1, 0, 1, 0, 1]), to: dir + "/y.npy")
        try writeNumpy(Tensor<Float>(shape: [0, 4]), to: dir + "/x0.npy")
        try writeNumpy(Tensor<Float>(shape: [0]), to: dir + "/y0.npy")
        let small = ["--data", "synthetic:train=64,heldout=16", "--steps", "2"]
        let cases: [([String], [String], Int32?)] = [
            (["--lr", "-0.1"], ["--lr", "-0.1"], 64),
            (["--momentum", "-1"], ["--momentum"], 64),
            (["--norm", "bn", "--cbn-window", "8"], ["--cbn-window", "does not apply to --norm bn"], 64),
            (["--eval-data", "synthetic"], ["8192 of the 8192 held-out samples are also training samples"], 2),
            (["--norm", "gn", "--sync-group-size", "2"], ["--sync-group-size", "does not apply to --norm gn"], 64),
            (small + ["--simulate-ranks", "4", "--sync-group-size", "3"], ["--sync-group-size 3", "does not divide"], 2),
            (small + ["--model", "mlp", "--precise-bn-batch-size", "1"], ["--precise-bn-batch-size 1"], 2),
            (["--data", "npy:\(dir)/x.npy,\(dir)/y.npy", "--eval-data", "npy:\(dir)/x0.npy,\(dir)/y0.npy", "--model", "mlp", "--steps", "2"],
             ["held-out set is empty"], 2),
        ]
        for (args, parts, status) in cases {
            let result = try Harness.direct(Harness.train, args, timeout: 60)
            assertOneLineError(result, mentions: parts, status: status)
            XCTAssertEqual(result.stderr.lowercased().components(separatedBy: "error").count - 1, 1, "printed once: \(describe(result))")
            XCTAssertFalse(result.stderr.contains("step 1/"), describe(result))
        }
    }

    /// Output paths that are not ours to replace are refused before anything runs, and left as they were.
    func testOutputPathsThatAreNotOursAreRefusedAndLeftAlone() throws {
        try writeNumpy(Tensor<Float>(shape: [8, 4], repeating: 1), to: dir + "/x.npy")
        try writeNumpy(Tensor<Float>(shape: [8], scalars: [0, 1, 0, 1, 0, 1, 0, 1]), to: dir + "/y.npy")
        let target = dir + "/precious.txt"
        FileManager.default.createFile(atPath: target, contents: Data("keep me".utf8))
        try FileManager.default.createSymbolicLink(atPath: dir + "/link", withDestinationPath: target)
        try FileManager.default.createDirectory(atPath: dir + "/folder", withIntermediateDirectories: false)
        let data = "npy:\(dir)/x.npy,\(dir)/y.npy"
        let cases: [([String], [String])] = [
            (["--save", "/dev/full"], ["/dev/full", "device"]),
            (["--metrics", "/dev/null"], ["/dev/null", "device"]),
            (["--save", dir + "/link"], ["link", "symbolic link"]),
            (["--metrics", dir + "/link"], ["link", "symbolic link"]),
            (["--save", dir + "/folder"], ["folder", "directory"]),
            (["--metrics", dir + "/x.npy"], ["x.npy", "inputs"]),
            (["--save", dir + "/y.npy"], ["y.npy", "inputs"]),
        ]
        for (args, parts) in cases {
            let result = try Harness.direct(Harness.train, ["--data", data, "--model", "mlp", "--steps", "1"] + args, timeout: 60)
            assertOneLineError(result, mentions: parts, status: nil)
            XCTAssertFalse(result.stderr.contains("step 1/1"), "refused before training: \(describe(result))")
        }
        XCTAssertEqual(try String(contentsOfFile: target, encoding: .utf8), "keep me")
        XCTAssertEqual(try FileManager.default.destinationOfSymbolicLink(atPath: dir + "/link"), target)
        XCTAssertEqual(try NumpyArray(contentsOf: dir + "/x.npy").shape, [8, 4])
        var info = stat()
        XCTAssertEqual(stat("/dev/full", &info), 0)
        XCTAssertEqual(info.st_mode & S_IFMT, S_IFCHR, "/dev/full is still a device")
    }
}

/// Ranks started with different settings (an MPMD launch) are caught before training: one line
/// from rank 0 names the setting and the ranks holding each value, every rank exits non-zero.
final class MismatchedLaunchTests: XCTestCase {
    func mpmd(_ a: [String], _ b: [String]) throws -> ProcessResult {
        guard let mpirun = Harness.mpirun else { throw XCTSkip("mpirun is not installed (launch/setup installs it)") }
        var global = ["--bind-to", "none", "-x", "OPENBLAS_NUM_THREADS=1", "--oversubscribe", "--mca", "mpi_yield_when_idle", "1"]
        if getuid() == 0 { global.append("--allow-run-as-root") }
        let common = ["--data", "synthetic:train=256,heldout=32", "--steps", "4", "--batch-size", "4", "--eval-stats", "ema"]
        return try runProcess(mpirun, global + ["-n", "2", Harness.train] + common + a + [":", "-n", "2", Harness.train] + common + b,
                              timeout: 60)
    }

    /// "Every flag is compared but the listed ones": each flag of `train --help` is a field of the
    /// training configuration, a flag the command compares by name, or one of the rank-local
    /// exceptions — and the README names exactly those exceptions.
    func testEveryFlagIsComparedOrAListedException() throws {
        let help = try runProcess(Harness.train, ["train", "--help"], timeout: 30)
        XCTAssertEqual(help.status, 0, describe(help))
        let flags = Set(help.stdout.split(separator: "\n").compactMap { line -> String? in
            let text = line.trimmingCharacters(in: .whitespaces)
            guard line.hasPrefix("  "), !line.hasPrefix("   "), text.hasPrefix("--") else { return nil }
            return String(text.prefix { $0 != " " && $0 != "<" })
        }).subtracting(["--help", "--version"])
        XCTAssertGreaterThan(flags.count, 50, help.stdout)
        // A field's flag, without the part of it the field is ("--augment (crop)" is --augment).
        let settings = Set(TrainingConfiguration.settingFields.map { RunAgreement.flagName($0).components(separatedBy: " (")[0] })
        let compared = Set(RunAgreement.comparedFlags), exceptions = Set(RunAgreement.rankLocalFlags.keys)
        XCTAssertEqual(flags.subtracting(settings).subtracting(compared).subtracting(exceptions), [], "flags neither compared nor listed as exceptions")
        XCTAssertEqual(exceptions.subtracting(flags), [], "exceptions that are not flags")
        let readme = try String(contentsOfFile: Harness.repositoryRoot + "/README.md", encoding: .utf8).replacingOccurrences(of: "\n", with: " ")
        guard let start = readme.range(of: "Every flag of `train` is compared except these"),
              let end = readme.range(of: "Hashing the contents", range: start.upperBound..<readme.endIndex) else {
            return XCTFail("the README's list of exceptions was not found")
        }
        let named = Set(readme[start.upperBound..<end.lowerBound].components(separatedBy: "`").enumerated()
            .filter { $0.offset % 2 == 1 && $0.element.hasPrefix("--") }.map(\.element))
        XCTAssertEqual(named, exceptions, "the README lists the exceptions")
    }

    func testCheckedCollectivesChangeNothingWhenRanksAgree() throws {
        let args = ["--data", "synthetic:train=256,heldout=32", "--steps", "6", "--batch-size", "4", "--norm", "cbn"]
        let plain = try Harness.mpi(3, Harness.train, args)
        let checked = try Harness.mpi(3, Harness.train, args + ["--check-collectives"])
        XCTAssertEqual(checked.status, 0, describe(checked))
        let summary = { (r: ProcessResult) in r.stderr.split(separator: "\n").first { $0.hasPrefix("done:") }?.components(separatedBy: " after ").first }
        XCTAssertNotNil(summary(plain))
        XCTAssertEqual(summary(plain), summary(checked), "same accuracies with and without the checks")
    }

    func testRanksWithDifferentSettingsStopBeforeTraining() throws {
        let cases: [([String], [String], String)] = [
            (["--batch-size", "4"], ["--batch-size", "8"], "--batch-size is 4 on ranks 0,1 but 8 on ranks 2,3"),
            (["--data", "synthetic:train=256,heldout=32,seed=1"], [], "--data (the training set) is 256 samples of [3, 16, 16], 10 classes, content"),
            (["--norm", "brn"], ["--norm", "syncbn"], "--norm is brn on ranks 0,1 but syncbn on ranks 2,3"),
            (["--norm", "syncbn"], ["--norm", "bn"], "--norm"),
            (["--norm", "cbn", "--cbn-rho", "0.5"], ["--norm", "cbn"], "--cbn-rho"),
            (["--norm", "brn", "--brn-rmax", "2"], ["--norm", "brn"], "--brn-rmax"),
            (["--eval-data", "synthetic:train=64,heldout=32,seed=9"], [], "--eval-data (the held-out set)"),
            (["--sync-group-size", "2"], [], "--sync-group-size is 2 on ranks 0,1 but unset on ranks 2,3"),
            (["--freeze-bn-after", "2"], [], "--freeze-bn-after"),
            (["--eval-stats", "both"], [], "--eval-stats"),
            (["--seed", "1"], ["--seed", "2"], "--seed"),
            (["--lr", "0.05"], [], "--lr"),
            (["--momentum", "0.5"], [], "--momentum"),
            (["--norm", "cbn", "--reset-cbn-windows"], ["--norm", "cbn"], "--reset-cbn-windows is yes on ranks 0,1 but no on ranks 2,3"),
            (["--check-collectives"], [], "--check-collectives is yes on ranks 0,1 but no on ranks 2,3"),
        ]
        for (a, b, expected) in cases {
            let result = try mpmd(a, b)
            XCTAssertFalse(result.timedOut, describe(result))
            XCTAssertNotEqual(result.status, 0, "\(a) vs \(b): \(describe(result))")
            XCTAssertLessThan(result.seconds, 30)
            let errors = result.stderr.split(separator: "\n").filter { $0.contains("error:") }
            XCTAssertEqual(errors.count, 1, "one line per job: \(describe(result))")
            XCTAssertTrue(errors.first?.contains("ranks were started with different settings") ?? false, describe(result))
            XCTAssertTrue(errors.first?.contains(expected) ?? false, "\(a) vs \(b): expected '\(expected)' in \(describe(result))")
            XCTAssertFalse(result.stderr.contains("step 1/"), "stopped before training: \(describe(result))")
        }
    }
}

/// A rank that stops answering (SIGSTOP) ends the job through the collective watchdog.
final class StoppedRankTests: XCTestCase {
    func testAStoppedRankEndsTheJobAfterTheCollectiveTimeout() throws {
        guard Harness.mpirun != nil else { throw XCTSkip("mpirun is not installed (launch/setup installs it)") }
        let dir = temporaryDirectory("syncbn-stopped")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let metrics = dir + "/metrics.jsonl"
        var stopped: Int32?
        // The ranks are the syncbn-train processes whose command line names this test's directory.
        func ranks() -> [Int32] { trainProcesses(matching: dir) }
        defer { if let stopped { kill(stopped, SIGKILL) } }
        let started = Date()
        let result = try runProcess(Harness.mpirun!, Harness.mpirunArguments(ranks: 3) + [
            Harness.train, "--data", "synthetic:train=2048,heldout=64", "--steps", "100000", "--batch-size", "4", "--log-every", "1",
            "--eval-stats", "ema", "--metrics", metrics, "--collective-timeout", "10",
        ], timeout: 90, killWhen: {
            let logged = ((try? String(contentsOfFile: metrics, encoding: .utf8)) ?? "").split(separator: "\n").compactMap {
                (try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any])?["step"] as? Int
            }
            if stopped == nil, (logged.max() ?? 0) >= 5, let victim = ranks().max() {
                kill(victim, SIGSTOP)
                stopped = victim
            }
            return false
        })
        XCTAssertNotNil(stopped, "a rank was stopped: \(describe(result))")
        XCTAssertFalse(result.timedOut, describe(result))
        XCTAssertNotEqual(result.status, 0, describe(result))
        XCTAssertLessThan(Date().timeIntervalSince(started), 40, describe(result))
        XCTAssertTrue(result.stderr.contains("no rank answered for") && result.stderr.contains("--collective-timeout 10"), describe(result))
        XCTAssertTrue(result.stderr.contains("training step"), describe(result))
        XCTAssertTrue(result.stderr.contains("ward features.") || result.stderr.contains("ward classifier"), "names the layer: \(describe(result))")
    }
}
