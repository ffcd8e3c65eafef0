import Collectives
import Foundation
import Kernels
import TestSupport
import Training
import XCTest

final class CheckpointTests: XCTestCase {
    static let data = try! DataSource.split(.synthetic(train: 40, heldOut: 8, seed: 5), evaluation: nil, heldOutFraction: 0.1)

    func configuration(steps: Int, norm: NormalizationKind = .syncbn, model: ModelKind = .convnet) -> TrainingConfiguration {
        var c = TrainingConfiguration()
        c.model = model
        c.norm = norm
        c.batchSize = 4
        c.steps = steps
        c.learningRate = 0.05
        c.seed = 2
        return c
    }

    /// Trains `steps` steps on `ranks` ranks, optionally resuming and saving; returns rank 0's
    /// state and momentum buffers.
    func run(_ c: TrainingConfiguration, ranks: Int, resume: String? = nil, save: String? = nil, stopAt: Int? = nil) throws -> ([String: [Float]], [String: [Float]]) {
        try InProcessGroup.run(size: ranks) { comm -> ([String: [Float]], [String: [Float]]) in
            let trainer = try Trainer(configuration: c, data: Self.data, world: comm)
            if let resume { try trainer.resume(from: resume) }
            while trainer.step < (stopAt ?? trainer.totalSteps) { try trainer.trainStep() }
            if let save { try trainer.save(to: save) }
            return (stateDictionary(trainer.network), trainer.optimizer.momentumBuffers)
        }[0]
    }

    func testResumedRunContinuesBitIdentically() throws {
        let dir = temporaryDirectory()
        for (ranks, norm) in [(1, NormalizationKind.syncbn), (2, .syncbn), (2, .bn), (2, .cbn), (3, .cbn), (2, .brn), (2, .rbn), (2, .gn)] {
            let straight = try run(configuration(steps: 14, norm: norm), ranks: ranks)
            let path = dir + "/half-\(ranks)-\(norm).safetensors"
            // Stopped at step 6 of the same 14-step run (Batch Renorm's schedule depends on the total).
            _ = try run(configuration(steps: 14, norm: norm), ranks: ranks, save: path, stopAt: 6)
            let resumed = try run(configuration(steps: 14, norm: norm), ranks: ranks, resume: path)
            XCTAssertEqual(straight.0.keys.sorted(), resumed.0.keys.sorted())
            for (name, values) in straight.0 {
                XCTAssertEqual(values.map(\.bitPattern), resumed.0[name]!.map(\.bitPattern), "\(ranks) ranks \(norm): \(name)")
            }
            for (name, values) in straight.1 {
                XCTAssertEqual(values.map(\.bitPattern), resumed.1[name]!.map(\.bitPattern), "momentum of \(name)")
            }
            if norm != .gn { XCTAssertEqual(straight.0["features.0.bn.num_batches_tracked"], [14]) }
        }
    }

    /// The later members of the family resume bit-identically too: weight normalization (its
    /// data-dependent initialisation is not run again), InstanceNorm's running statistics,
    /// ShuffleBN (its permutation follows the stored step), domain-specific BN and IBN.
    func testNewerNormalizationsResumeBitIdentically() throws {
        let dir = temporaryDirectory()
        let twoDomain = try DataSource.split(.twoDomain(.synthetic(train: 20, heldOut: 8, seed: 5)), evaluation: nil, heldOutFraction: 0.1)
        var cases: [(String, TrainingConfiguration, DataSplit)] = []
        for norm in [NormalizationKind.wn, .wnMeanOnly] { cases.append((norm.rawValue, configuration(steps: 12, norm: norm), Self.data)) }
        var instance = configuration(steps: 12, norm: .in)
        instance.inTrackRunningStats = true
        var shuffled = configuration(steps: 12, norm: .bn)
        shuffled.shuffleBN = true
        var domains = configuration(steps: 12, norm: .syncbn)
        domains.domainBN = true
        var ibn = configuration(steps: 12, norm: .ibn, model: .resnet20)
        ibn.width = 0.5
        cases += [("in-track", instance, Self.data), ("shuffle", shuffled, Self.data), ("domain", domains, twoDomain), ("ibn", ibn, Self.data)]
        // Moving Average BN with a window, warm-up and renormalization hold short enough that the
        // resumed half uses the windows and clips r: per rank, and over a sync group of both ranks.
        var mabn = configuration(steps: 12, norm: .mabn)
        (mabn.mabnWindow, mabn.mabnWarmup, mabn.mabnRenormHold) = (3, 2, 4)
        var mabnSynced = mabn
        mabnSynced.syncGroupSize = 2
        cases += [("mabn", mabn, Self.data), ("mabn-synced", mabnSynced, Self.data)]
        for (label, c, data) in cases {
            func run(resume: String? = nil, save: String? = nil, stopAt: Int? = nil) throws -> [String: [Float]] {
                try InProcessGroup.run(size: 2) { comm -> [String: [Float]] in
                    let trainer = try Trainer(configuration: c, data: data, world: comm)
                    if let resume { try trainer.resume(from: resume) }
                    while trainer.step < (stopAt ?? trainer.totalSteps) { try trainer.trainStep() }
                    if let save { try trainer.save(to: save) }
                    return stateDictionary(trainer.network).merging(trainer.optimizer.momentumBuffers.map { ("momentum." + $0.key, $0.value) }) { a, _ in a }
                }[0]
            }
            let straight = try run()
            let path = dir + "/half-\(label).safetensors"
            _ = try run(save: path, stopAt: 5)
            let resumed = try run(resume: path)
            XCTAssertEqual(straight.keys.sorted(), resumed.keys.sorted(), label)
            for (name, values) in straight {
                XCTAssertEqual(values.map(\.bitPattern), resumed[name]!.map(\.bitPattern), "\(label): \(name)")
            }
        }
    }

    func testCrossIterationWindowsAreTheGroupsOnEveryRankAndNeedTheSameRankCount() throws {
        let path = temporaryDirectory() + "/cbn.safetensors"
        _ = try run(configuration(steps: 5, norm: .cbn), ranks: 2, save: path)
        let (tensors, _) = try Safetensors.read(path)
        let rank0 = tensors["features.1.bn.cbn_window.rank0"]?.doubles, rank1 = tensors["features.1.bn.cbn_window.rank1"]?.doubles
        XCTAssertNotNil(rank0)
        XCTAssertEqual(rank0?.count, rank1?.count)
        XCTAssertEqual(rank0, rank1, "every rank keeps the group's sums")
        XCTAssertEqual(rank0?.prefix(2), [5, 3], "5 iterations, window of 4 keeps 3 past entries")
        for ranks in [1, 3] {
            XCTAssertThrowsError(try run(configuration(steps: 6, norm: .cbn), ranks: ranks, resume: path)) { error in
                XCTAssertTrue("\(error)".contains("written by 2 rank(s)") && "\(error)".contains("resetCrossIterationWindows"), "\(error)")
            }
        }
        // Explicitly allowed: every window starts empty, the iteration count is kept.
        let resumed = try InProcessGroup.run(size: 1) { comm -> [Double] in
            let trainer = try Trainer(configuration: self.configuration(steps: 6, norm: .cbn), data: Self.data, world: comm)
            try trainer.resume(from: path, resetCrossIterationWindows: true)
            let window = trainer.network.state.compactMap { entry -> [Double]? in
                if case let .rankLocal(name, state) = entry, name == "features.1.bn.cbn_window" { return state.values } else { return nil }
            }.first!
            try trainer.trainStep()
            return window
        }[0]
        XCTAssertEqual(resumed, [5, 0])
        // Malformed window data is an error that names the entry, not a crash.
        var file = try Safetensors.read(path)
        file.tensors["features.1.bn.cbn_window.rank1"] = StoredTensor(doubles: [5, 3, 1, 2], shape: [4])
        let broken = path + "-broken.safetensors"
        try Safetensors.write(file.tensors.sorted { $0.key < $1.key }.map { ($0.key, $0.value) }, metadata: file.metadata, to: broken)
        XCTAssertThrowsError(try run(configuration(steps: 6, norm: .cbn), ranks: 2, resume: broken)) { error in
            XCTAssertTrue("\(error)".contains("cbn_window.rank1") && "\(error)".contains("values"), "\(error)")
        }
    }

    /// A checkpoint of 4 ranks × 4 continues on 2 ranks × 8 and on 1 × 16 (the same global
    /// batch) bit for bit, cross-iteration windows included: they are a statistics group's, and
    /// move to the ranks whose samples form the same group — every rank's when the group is all
    /// of them; the first two ranks' and the last two's when 4 ranks in groups of 2 become 2
    /// ranks of one each. Statistics over other samples (groups of 2 on 2 ranks × 8) are refused.
    func testACheckpointContinuesOnAnotherNumberOfRanksAtTheSameGlobalBatch() throws {
        let dir = temporaryDirectory()
        func on(_ ranks: Int, _ norm: NormalizationKind, group: Int? = nil) -> TrainingConfiguration {
            var c = configuration(steps: 8, norm: norm)
            c.batchSize = 16 / ranks
            c.syncGroupSize = group
            return c
        }
        for (norm, group, after, groupAfter) in [(NormalizationKind.syncbn, Int?.none, 2, Int?.none), (.cbn, nil, 2, nil), (.cbn, nil, 1, nil),
                                                 (.cbn, 2, 2, 1), (.mabn, 2, 2, 1), (.brn, nil, 2, nil), (.rbn, nil, 2, nil),
                                                 (.gn, nil, 1, nil)] {
            let what = "\(norm) groups \(group.map(String.init) ?? "all") → \(after) rank(s), groups \(groupAfter.map(String.init) ?? "all")"
            let straight = try run(on(4, norm, group: group), ranks: 4)
            let path = dir + "/four-\(norm)-\(group ?? 0)-\(after).safetensors"
            _ = try run(on(4, norm, group: group), ranks: 4, save: path, stopAt: 4)
            let resumed = try run(on(after, norm, group: groupAfter), ranks: after, resume: path)
            XCTAssertEqual(straight.0.keys.sorted(), resumed.0.keys.sorted(), what)
            for (name, values) in straight.0 {
                XCTAssertEqual(values.map(\.bitPattern), resumed.0[name]!.map(\.bitPattern), "\(what): \(name)")
            }
        }
        // Groups of 2 on 2 ranks × 8 cover 16 samples, not the 8 the windows were summed over.
        let path = dir + "/four-cbn-2-2.safetensors"
        XCTAssertThrowsError(try run(on(2, .cbn, group: 2), ranks: 2, resume: path)) { error in
            XCTAssertTrue("\(error)".contains("written by 4 rank(s)") && "\(error)".contains("resetCrossIterationWindows"), "\(error)")
        }
        // The configuration's own account of it, which the command line's resume check uses.
        XCTAssertEqual(on(4, .cbn, group: 2).statisticsGroups(ranks: 4), on(2, .cbn, group: 1).statisticsGroups(ranks: 2))
        XCTAssertNotEqual(on(4, .bn).statisticsGroups(ranks: 4), on(2, .bn).statisticsGroups(ranks: 2))
        XCTAssertEqual(on(4, .gn).statisticsGroups(ranks: 4), .none)
    }

    func testCheckpointHoldsEveryEntryUnderItsDottedNameAndMetadata() throws {
        let path = temporaryDirectory() + "/c.safetensors"
        let (state, _) = try run(configuration(steps: 3), ranks: 1, save: path)
        let (tensors, metadata) = try Safetensors.read(path)
        for name in ["features.0.conv.weight", "features.0.bn.weight", "features.0.bn.bias", "features.0.bn.running_mean",
                     "features.0.bn.running_var", "features.2.bn.num_batches_tracked", "classifier.weight", "classifier.bias",
                     "optimizer.momentum_buffer.features.0.conv.weight"] {
            XCTAssertNotNil(tensors[name], name)
        }
        XCTAssertEqual(tensors["features.0.bn.num_batches_tracked"]?.int64, 3)
        XCTAssertEqual(tensors["features.0.conv.weight"]?.shape, [16, 3, 3, 3])
        XCTAssertEqual(tensors["classifier.bias"]?.floats, state["classifier.bias"])
        XCTAssertEqual(metadata["step"], "3")
        XCTAssertEqual(metadata["format"], Checkpoint.format)
        let saved = try JSONDecoder().decode(TrainingConfiguration.self, from: Data(metadata["configuration"]!.utf8))
        XCTAssertEqual(saved, configuration(steps: 3))
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: URL(fileURLWithPath: path).deletingLastPathComponent().path),
                       ["c.safetensors"], "no temporary file is left behind")
    }

    func testBadCheckpointsAreRejectedWithTheFileAndProblemAndLeaveTheModelUntouched() throws {
        let dir = temporaryDirectory()
        let good = dir + "/good.safetensors"
        _ = try run(configuration(steps: 2), ranks: 1, save: good)
        let bytes = try Data(contentsOf: URL(fileURLWithPath: good))
        try bytes.prefix(bytes.count - 100).write(to: URL(fileURLWithPath: dir + "/truncated.safetensors"))
        try Data("not a checkpoint at all".utf8).write(to: URL(fileURLWithPath: dir + "/garbage.safetensors"))
        let mlp = dir + "/mlp.safetensors"
        _ = try run(configuration(steps: 1, model: .mlp), ranks: 1, save: mlp)

        for (file, problem) in [("truncated.safetensors", "truncated"), ("garbage.safetensors", "safetensors"),
                                ("mlp.safetensors", "another model"), ("missing.safetensors", "no such file")] {
            let trainer = try Trainer(configuration: configuration(steps: 2), data: Self.data, world: SingleProcessCommunicator())
            let before = stateDictionary(trainer.network)
            XCTAssertThrowsError(try trainer.resume(from: dir + "/" + file)) { error in
                XCTAssertTrue("\(error)".contains(file) && "\(error)".contains(problem), "\(file): \(error)")
            }
            XCTAssertEqual(stateDictionary(trainer.network), before, "\(file) changed the model")
        }
    }

    func testSafetensorsRoundTripAndPadding() throws {
        let path = temporaryDirectory() + "/t.safetensors"
        try Safetensors.write([("a", StoredTensor(floats: [1, 2, 3], shape: [3])), ("n", StoredTensor(int64: -7))],
                              metadata: ["k": "v \"quoted\""], to: path)
        let bytes = try Data(contentsOf: URL(fileURLWithPath: path))
        let headerLength = bytes.prefix(8).enumerated().reduce(0) { $0 | Int($1.element) << (8 * $1.offset) }
        XCTAssertEqual(headerLength % 8, 0, "header padded to 8 bytes")
        let (tensors, metadata) = try Safetensors.read(path)
        XCTAssertEqual(tensors["a"]?.floats, [1, 2, 3])
        XCTAssertEqual(tensors["n"]?.int64, -7)
        XCTAssertEqual(metadata["k"], "v \"quoted\"")
    }

    /// Crafted files: entries that overlap, a name given twice, gaps, absurd shapes.
    func testCraftedSafetensorsAreRejected() throws {
        let dir = temporaryDirectory()
        func file(_ header: String, dataBytes: Int) -> String {
            var padded = Array(header.utf8)
            while padded.count % 8 != 0 { padded.append(0x20) }
            var bytes = withUnsafeBytes(of: UInt64(padded.count).littleEndian) { Array($0) } + padded
            bytes += [UInt8](repeating: 0, count: dataBytes)
            let path = dir + "/f\(UUID().uuidString).safetensors"
            FileManager.default.createFile(atPath: path, contents: Data(bytes))
            return path
        }
        let cases: [(String, Int, String)] = [
            (#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#, 12, "overlaps"),
            (#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, 8, "overlaps"),
            (#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#, 8, "unclaimed"),
            (#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#, 12, "after the last entry"),
            (#"{"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,4]}}"#, 4, "larger than the file"),
            (#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#, 4, "larger than the file"),
        ]
        for (header, size, problem) in cases {
            XCTAssertThrowsError(try Safetensors.read(file(header, dataBytes: size)), header) { error in
                XCTAssertTrue("\(error)".contains(problem), "\(header): \(error)")
            }
        }
        // A well-formed file of the same kind is read.
        let good = file(#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#, dataBytes: 12)
        XCTAssertEqual(try Safetensors.read(good).tensors.count, 2)
    }

    /// A configuration stored before later settings existed reads with their defaults.
    func testAConfigurationWithoutNewerSettingsReadsWithTheirDefaults() throws {
        var c = TrainingConfiguration()
        c.batchSize = 12
        c.crossIteration.window = 6
        var object = try XCTUnwrap(JSONSerialization.jsonObject(with: try sortedJSONEncoder().encode(c)) as? [String: Any])
        for key in ["normalizationDiagnostics", "inTrackRunningStats", "trainSamples"] { object.removeValue(forKey: key) }
        var cross = try XCTUnwrap(object["crossIteration"] as? [String: Any])
        cross.removeValue(forKey: "gradient")
        object["crossIteration"] = cross
        let text = String(decoding: try JSONSerialization.data(withJSONObject: object), as: UTF8.self)
        XCTAssertThrowsError(try JSONDecoder().decode(TrainingConfiguration.self, from: Data(text.utf8)), "the plain decoder needs every key")
        XCTAssertEqual(try TrainingConfiguration.decoding(json: text), c)
        XCTAssertThrowsError(try TrainingConfiguration.decoding(json: "[1, 2]"))
    }
}
