import Foundation
import Kernels
import TestSupport
import Training
import XCTest

/// ResNets, schedules, augmentation and crash-safe checkpoints through the real binaries.
final class ResidualRecipeIntegrationTests: XCTestCase {
    var dir = ""
    override func setUp() { dir = temporaryDirectory("syncbn-recipe") }
    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    /// resnet20 at width 0.25 with SyncBN, crop+flip and the default cosine schedule with warm-up:
    /// 4 MPI ranks × 6 ≡ 1 process × 24 after 10 steps (60 samples: the last global batch of an
    /// epoch has 12 samples, 3 per rank).
    func testResNetWithAugmentationFollowsTheSameTrajectoryUnderMpirun() throws {
        let common = ["--model", "resnet20", "--width", "0.25", "--augment", "crop,flip", "--data", "synthetic:train=60,heldout=16",
                      "--steps", "10", "--seed", "2", "--eval-stats", "ema"]
        let a = dir + "/four.safetensors", b = dir + "/one.safetensors"
        let multi = try Harness.mpi(4, Harness.train, common + ["--batch-size", "6", "--save", a])
        XCTAssertEqual(multi.status, 0, describe(multi))
        XCTAssertTrue(multi.stderr.contains("4 rank(s) (MPI)"), describe(multi))
        XCTAssertTrue(multi.stderr.contains("augmentation crop,flip"), describe(multi))
        let single = try Harness.direct(Harness.train, common + ["--batch-size", "24", "--save", b])
        XCTAssertEqual(single.status, 0, describe(single))
        let left = try checkpointTensors(a), right = try checkpointTensors(b)
        XCTAssertEqual(left.keys.sorted(), right.keys.sorted())
        XCTAssertNotNil(left["layer2.0.downsample.1.running_var"])
        for (name, values) in left {
            XCTAssertLessThan(relativeError(values, right[name]!), 1e-4, name)
        }
    }

    /// A run killed with SIGKILL right after a periodic checkpoint, then started again with the
    /// same command line and `--resume auto`, ends bit-identical to an uninterrupted run; no
    /// partial file is left behind.
    func testKilledRunResumesAutomaticallyAndBitIdentically() throws {
        let common = ["--model", "resnet20", "--width", "0.25", "--augment", "crop,flip", "--data", "synthetic:train=300,heldout=32",
                      "--batch-size", "6", "--steps", "60", "--seed", "4", "--eval-stats", "ema", "--simulate-ranks", "2"]
        let straight = dir + "/straight.safetensors", crashed = dir + "/crashed.safetensors"
        let full = try Harness.direct(Harness.train, common + ["--save", straight])
        XCTAssertEqual(full.status, 0, describe(full))
        // Without a file, --resume auto starts fresh.
        let metrics = dir + "/metrics.jsonl"
        let args = common + ["--save", crashed, "--save-every", "7", "--resume", "auto", "--metrics", metrics]
        let killed = try runProcess(Harness.train, args, timeout: 120, killWhen: {
            FileManager.default.fileExists(atPath: crashed)
        })
        XCTAssertNotEqual(killed.status, 0, "the run was killed: \(describe(killed))")
        XCTAssertFalse(killed.stderr.contains("resumed from"), describe(killed))
        let (_, metadata) = try Safetensors.read(crashed)   // complete and readable
        let savedAt = Int(metadata["step"] ?? "") ?? -1
        XCTAssertTrue(savedAt > 0 && savedAt < 60 && savedAt % 7 == 0, "checkpoint at step \(savedAt)")
        // A partial file as a kill during a write would leave it.
        let stale = dir + "/.crashed.safetensors.partial-999999"
        FileManager.default.createFile(atPath: stale, contents: Data([1, 2, 3]))
        let again = try Harness.direct(Harness.train, args)
        XCTAssertEqual(again.status, 0, describe(again))
        XCTAssertTrue(again.stderr.contains("resumed from \(crashed) at step \(savedAt)"), describe(again))
        XCTAssertFalse(FileManager.default.fileExists(atPath: stale), "stale partial files are removed at start")
        let leftovers = try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.contains(".partial-") }
        XCTAssertEqual(leftovers, [])
        let left = try checkpointTensors(straight), right = try checkpointTensors(crashed)
        XCTAssertEqual(left.keys.sorted(), right.keys.sorted())
        for (name, values) in left { XCTAssertEqual(values.map(\.bitPattern), right[name]!.map(\.bitPattern), name) }
        // The metrics file kept the killed run's lines and continued after a "resume" line.
        let events = try String(contentsOfFile: metrics, encoding: .utf8).split(separator: "\n")
            .compactMap { (try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any])?["event"] as? String }
        XCTAssertEqual(events.first, "start")
        XCTAssertTrue(events.contains("resume"), "\(events)")
        // Without --resume, an existing metrics file is not replaced unless asked.
        let refused = try Harness.direct(Harness.train, ["--data", "synthetic:train=64,heldout=16", "--steps", "2", "--metrics", metrics])
        XCTAssertNotEqual(refused.status, 0)
        XCTAssertTrue(refused.stderr.contains("already exists") && refused.stderr.contains("--overwrite-metrics"), describe(refused))
        let replaced = try Harness.direct(Harness.train, ["--data", "synthetic:train=64,heldout=16", "--steps", "2", "--metrics", metrics,
                                                          "--overwrite-metrics"])
        XCTAssertEqual(replaced.status, 0, describe(replaced))
    }

    /// SIGKILL while a checkpoint is being written (its partial file exists): the previous
    /// checkpoint is intact, and the next start removes the partial file.
    func testAKillDuringASaveLeavesThePreviousCheckpointIntact() throws {
        let path = dir + "/big.safetensors", partialPrefix = ".big.safetensors.partial-"
        // resnet18: ~90 MB per checkpoint (weights and momentum), written every step.
        let args = ["--model", "resnet18", "--width", "0.75", "--data", "synthetic:train=64,heldout=16", "--batch-size", "2",
                    "--steps", "400", "--save", path, "--save-every", "1", "--eval-stats", "ema"]
        var sawPartial = false
        let killed = try runProcess(Harness.train, args, timeout: 120, killWhen: {
            guard FileManager.default.fileExists(atPath: path) else { return false }
            sawPartial = ((try? FileManager.default.contentsOfDirectory(atPath: self.dir)) ?? []).contains { $0.hasPrefix(partialPrefix) }
            return sawPartial
        })
        XCTAssertTrue(sawPartial, "killed while writing: \(describe(killed))")
        XCTAssertNotEqual(killed.status, 0)
        let (_, metadata) = try Safetensors.read(path)   // the previous checkpoint, complete
        XCTAssertNotNil(Int(metadata["step"] ?? ""))
        let leftovers = try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasPrefix(partialPrefix) }
        XCTAssertEqual(leftovers.count, 1, "the killed write left its partial file")
        let again = try Harness.direct(Harness.train, args.map { $0 == "400" ? "1" : $0 } + ["--resume", "auto"])
        XCTAssertNotEqual(again.status, 0, "resuming past --steps is not silent")
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasPrefix(partialPrefix) }, [],
                       "stale partial files are removed at start")
    }

    /// PreciseBN, recompute-stats and export-folded on a ResNet checkpoint.
    func testResNetCheckpointsWorkWithRecomputeStatsAndExport() throws {
        let trained = dir + "/trained.safetensors", recomputed = dir + "/recomputed.safetensors", folded = dir + "/folded.safetensors"
        let train = try Harness.mpi(2, Harness.train, ["--model", "resnet20", "--width", "0.25", "--data", "synthetic:train=128,heldout=32",
                                                      "--steps", "6", "--batch-size", "8", "--precise-bn-samples", "64", "--save", trained])
        XCTAssertEqual(train.status, 0, describe(train))
        XCTAssertTrue(train.stderr.contains("PreciseBN"), describe(train))
        let recompute = try Harness.mpi(2, Harness.train, ["recompute-stats", "--resume", trained, "--save", recomputed,
                                                          "--precise-bn-samples", "64"])
        XCTAssertEqual(recompute.status, 0, describe(recompute))
        XCTAssertNotNil(try checkpointTensors(recomputed)["layer3.0.downsample.1.running_var"])
        let export = try Harness.direct(Harness.train, ["export-folded", "--resume", trained, "--out", folded])
        XCTAssertEqual(export.status, 0, describe(export))
        XCTAssertTrue(export.stderr.contains("21 normalization layers folded"), describe(export))
        let reported = export.stderr.components(separatedBy: "differ by ").last?.split(separator: " ").first.flatMap { Double($0) }
        XCTAssertLessThan(reported ?? 1, 1e-5, describe(export))
        XCTAssertNotNil(try checkpointTensors(folded)["layer1.0.conv2.bias"])
    }

    func testRecipeFlagsAreCheckedBeforeAnythingRuns() throws {
        for (args, expected) in [
            (["--lr-schedule", "linear"], "--lr-schedule"),
            (["--lr-schedule", "step"], "--lr-milestones"),
            (["--lr-milestones", "3", "--lr-schedule", "cosine"], "--lr-milestones"),
            (["--warmup-epochs", "1", "--warmup-steps", "3"], "not both"),
            (["--augment", "crop,rotate"], "rotate"),
            (["--lr-reference-batch", "0"], "--lr-reference-batch"),
            (["--width", "0"], "--width"),
            (["--model", "resnet21"], "--model"),
            (["--save-every", "5"], "--save"),
            (["--resume", "auto"], "--save"),
            (["--data", "fashion-mnist:\(dir)/none"], "no such directory"),
        ] {
            let result = try Harness.direct(Harness.train, args + ["--steps", "1"])
            XCTAssertNotEqual(result.status, 0, "\(args): \(describe(result))")
            XCTAssertTrue(result.stderr.contains(expected), "\(args): \(describe(result))")
            XCTAssertFalse(result.stderr.contains("Fatal error"), describe(result))
        }
    }
}

/// `evaluate` and an independent NumPy forward pass of the checkpoint (PyTorch's layer
/// definitions, torchvision's names).
final class EvaluateIntegrationTests: XCTestCase {
    var dir = ""
    override func setUp() { dir = temporaryDirectory("syncbn-evaluate") }
    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    var referenceScript: String { Harness.repositoryRoot + "/tools/reference_forward.py" }

    func accuracies(_ text: String, pattern: String) -> [String] {
        let regex = try! NSRegularExpression(pattern: pattern)
        return regex.matches(in: text, range: NSRange(text.startIndex..., in: text)).map { String(text[Range($0.range(at: 1), in: text)!]) }
    }

    /// On data with domains, training's evaluation and `evaluate` report each domain's accuracy,
    /// the same numbers (the progress line, the metrics and --json), and with equal domain sizes
    /// their mean is the overall accuracy.
    func testEvaluateReportsEachDomainsAccuracy() throws {
        let path = dir + "/domains.safetensors", metrics = dir + "/m.jsonl"
        let trained = try Harness.direct(Harness.train, ["--data", "two-domain-shrunk:synthetic:train=256,heldout=64", "--steps", "10",
                                                         "--batch-size", "16", "--domain-bn", "--eval-stats", "ema", "--save", path, "--metrics", metrics])
        XCTAssertEqual(trained.status, 0, describe(trained))
        let evaluated = try Harness.direct(Harness.train, ["evaluate", "--resume", path, "--json"])
        XCTAssertEqual(evaluated.status, 0, describe(evaluated))
        let object = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(evaluated.stdout.utf8)) as? [String: Any])
        let ema = try XCTUnwrap(object["ema"] as? [String: Any])
        let domains = try XCTUnwrap(ema["domain_accuracy"] as? [Double])
        XCTAssertEqual(domains.count, 2)
        XCTAssertEqual((domains[0] + domains[1]) / 2, try XCTUnwrap(ema["accuracy"] as? Double), accuracy: 1e-12)
        let logged = try String(contentsOfFile: metrics, encoding: .utf8).split(separator: "\n").compactMap {
            try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]
        }.last { $0["event"] as? String == "eval" }
        XCTAssertEqual(logged?["domain_accuracy"] as? [Double], domains, "the training run's last evaluation")
        XCTAssertTrue(evaluated.stderr.contains(String(format: "by domain %.2f%% / %.2f%%", domains[0] * 100, domains[1] * 100)), describe(evaluated))
    }

    func testEvaluateReproducesTheFinalEvaluationAndNumPyAgreesWithTheLogits() throws {
        for (model, extra) in [("resnet20", ["--width", "0.25"]), ("convnet", [])] {
            let checkpoint = dir + "/\(model).safetensors", inputs = dir + "/\(model)-x.npy", logits = dir + "/\(model)-logits.npy"
            let train = try Harness.mpi(2, Harness.train, ["--model", model, "--data", "synthetic:train=256,heldout=64", "--steps", "12",
                                                          "--batch-size", "8", "--precise-bn-samples", "128", "--save", checkpoint] + extra)
            XCTAssertEqual(train.status, 0, describe(train))
            let evaluate = try Harness.direct(Harness.train, ["evaluate", "--resume", checkpoint, "--inputs", inputs, "--logits", logits,
                                                              "--limit", "40"])
            XCTAssertEqual(evaluate.status, 0, describe(evaluate))
            // The same accuracies as the end of training, EMA and PreciseBN.
            let trained = accuracies(train.stderr, pattern: #"accuracy ([0-9.]+%) \(\d+ samples, (?:EMA|PreciseBN) statistics\)"#).suffix(2)
            let evaluated = accuracies(evaluate.stderr, pattern: #"accuracy ([0-9.]+%) \(\d+ samples"#)
            XCTAssertEqual(Array(trained), evaluated, "\(model): \(describe(train))\n\(describe(evaluate))")
            XCTAssertEqual(try NumpyArray(contentsOf: logits).shape, [40, 10])
            guard try runProcess("/usr/bin/env", ["python3", "-c", "import numpy"], timeout: 30).status == 0 else {
                throw XCTSkip("python3 with numpy is not installed: the NumPy reference forward pass was not run")
            }
            // export-torch: the model state alone, with the input standardization and architecture.
            let exported = dir + "/\(model)-torch.safetensors"
            let export = try Harness.direct(Harness.train, ["export-torch", "--resume", checkpoint, "--out", exported])
            XCTAssertEqual(export.status, 0, describe(export))
            let (tensors, metadata) = try Safetensors.read(exported)
            XCTAssertFalse(tensors.keys.contains { $0.hasPrefix("optimizer.") || $0.hasPrefix("ema.") || $0.contains("cbn_window") })
            XCTAssertEqual(metadata["format"], "syncbn-torch-1")
            XCTAssertEqual((try JSONSerialization.jsonObject(with: Data((metadata["input_std"] ?? "").utf8)) as? [Double])?.count, 3)
            XCTAssertTrue(metadata["architecture"]?.contains("\"model\":\"\(model)\"") ?? false)
            for file in [checkpoint, exported] {
                let reference = try runProcess("/usr/bin/env", ["python3", referenceScript, file, inputs, logits, "--tolerance", "1e-5"], timeout: 120)
                XCTAssertEqual(reference.status, 0, "\(model): \(describe(reference))")
                XCTAssertTrue(reference.stdout.contains("same predicted class for 100.00%"), describe(reference))
            }
        }
    }

    /// Weight-normalized and IBN checkpoints mean what PyTorch's weight_norm (g·v/‖v‖), mean-only
    /// BN and IBN-Net's IBN (InstanceNorm2d(affine) beside BatchNorm2d) compute: NumPy reproduces
    /// their logits.
    func testNumPyAgreesWithWeightNormalizedAndIBNResNets() throws {
        guard try runProcess("/usr/bin/env", ["python3", "-c", "import numpy"], timeout: 30).status == 0 else {
            throw XCTSkip("python3 with numpy is not installed")
        }
        for norm in ["wn", "wn-meanonly", "ibn"] {
            let checkpoint = dir + "/\(norm).safetensors", inputs = dir + "/\(norm)-x.npy", logits = dir + "/\(norm)-logits.npy"
            let train = try Harness.mpi(2, Harness.train, ["--model", "resnet20", "--width", "0.25", "--norm", norm, "--steps", "10",
                                                          "--batch-size", "8", "--data", "synthetic:train=256,heldout=64", "--save", checkpoint])
            XCTAssertEqual(train.status, 0, describe(train))
            XCTAssertTrue(try checkpointTensors(checkpoint).keys.contains(norm == "ibn" ? "layer3.2.bn1.IN.weight" : "layer2.0.downsample.0.weight_g"))
            let evaluate = try Harness.direct(Harness.train, ["evaluate", "--resume", checkpoint, "--inputs", inputs, "--logits", logits, "--limit", "32"])
            XCTAssertEqual(evaluate.status, 0, describe(evaluate))
            let reference = try runProcess("/usr/bin/env", ["python3", referenceScript, checkpoint, inputs, logits, "--tolerance", "1e-5"], timeout: 120)
            XCTAssertEqual(reference.status, 0, "\(norm): \(describe(reference))")
        }
    }

    /// The stored input standardization round-trips: NumPy, given the raw gzipped IDX test images
    /// of Fashion-MNIST and only the checkpoint, standardizes them itself and reaches the accuracy
    /// `evaluate` reports with the stored statistics.
    func testTheStoredStandardizationEvaluatesRawImages() throws {
        let directory = DataSource.fashionMNISTDirectory
        guard FileManager.default.fileExists(atPath: directory + "/t10k-images-idx3-ubyte.gz") else {
            throw XCTSkip("dataset-fashion-mnist is not installed (launch/setup installs it)")
        }
        guard try runProcess("/usr/bin/env", ["python3", "-c", "import numpy"], timeout: 30).status == 0 else {
            throw XCTSkip("python3 with numpy is not installed")
        }
        let checkpoint = dir + "/fm.safetensors"
        let train = try Harness.direct(Harness.train, ["--data", "fashion-mnist", "--train-samples", "2000", "--eval-samples", "600",
                                                       "--steps", "30", "--save", checkpoint])
        XCTAssertEqual(train.status, 0, describe(train))
        let evaluate = try Harness.direct(Harness.train, ["evaluate", "--resume", checkpoint])
        let stored = try XCTUnwrap(accuracies(evaluate.stderr, pattern: #"accuracy ([0-9.]+%) \(600 samples, PreciseBN"#).first, describe(evaluate))
        let reference = try runProcess("/usr/bin/env", ["python3", referenceScript, checkpoint, "--idx", directory + "/t10k-images-idx3-ubyte.gz",
                                                        directory + "/t10k-labels-idx1-ubyte.gz", "--limit", "600"], timeout: 300)
        XCTAssertEqual(reference.status, 0, describe(reference))
        XCTAssertTrue(reference.stdout.contains("600 raw images"), reference.stdout)
        XCTAssertEqual(accuracies(reference.stdout, pattern: #"accuracy ([0-9.]+%)"#), [stored], "\(describe(evaluate))\n\(reference.stdout)")
    }

    /// tools/load_in_pytorch.py loads checkpoints strictly into torch.nn and reproduces the logits;
    /// runs only where torch is installed (it is large and not part of the project's setup).
    func testPyTorchLoadsTheCheckpointsStrictly() throws {
        guard try runProcess("/usr/bin/env", ["python3", "-c", "import torch, safetensors, numpy"], timeout: 60).status == 0 else {
            throw XCTSkip("torch (with safetensors and numpy) is not installed: tools/load_in_pytorch.py was not run")
        }
        let script = referenceScript.replacingOccurrences(of: "reference_forward.py", with: "load_in_pytorch.py")
        for (model, extra) in [("resnet20", ["--width", "0.25"]), ("convnet", []), ("mlp", [])] {
            let checkpoint = dir + "/\(model).safetensors", exported = dir + "/\(model)-torch.safetensors"
            let inputs = dir + "/\(model)-x.npy", logits = dir + "/\(model)-logits.npy"
            XCTAssertEqual(try Harness.direct(Harness.train, ["--model", model, "--data", "synthetic:train=128,heldout=32", "--steps", "4",
                                                             "--batch-size", "8", "--save", checkpoint] + extra).status, 0)
            XCTAssertEqual(try Harness.direct(Harness.train, ["evaluate", "--resume", checkpoint, "--inputs", inputs, "--logits", logits]).status, 0)
            XCTAssertEqual(try Harness.direct(Harness.train, ["export-torch", "--resume", checkpoint, "--out", exported]).status, 0)
            for file in [checkpoint, exported] {
                let result = try runProcess("/usr/bin/env", ["python3", script, file, inputs, logits, "--tolerance", "1e-5"], timeout: 300)
                XCTAssertEqual(result.status, 0, "\(model): \(describe(result))")
            }
        }
    }
}
