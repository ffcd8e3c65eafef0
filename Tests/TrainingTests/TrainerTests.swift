import Collectives
import Kernels
import Normalization
import TestSupport
import Training
import XCTest

final class TrainerTests: XCTestCase {
    func testTheDefaultConvnetLearnsTheSyntheticData() throws {
        let data = try DataSource.split(.synthetic(train: 1024, heldOut: 256, seed: 0), evaluation: nil, heldOutFraction: 0.1)
        var c = TrainingConfiguration()
        // 7.5 epochs of the default recipe (peak lr 0.1 × 32/128, one-epoch warm-up, cosine).
        c.steps = 240
        let trainer = try Trainer(configuration: c, data: data, world: SingleProcessCommunicator())
        let before = try trainer.evaluate()
        let summary = try trainer.run()
        XCTAssertLessThan(before.accuracy, 0.3)
        XCTAssertGreaterThan(summary.evaluation.accuracy, 0.7, "240 steps of SGD should be far above chance (10%)")
        XCTAssertEqual(summary.evaluation.count, 256)
    }

    func testDivergenceIsReportedOnEveryRankAsOneCollectiveError() throws {
        let data = try DataSource.split(.synthetic(train: 64, heldOut: 8, seed: 0), evaluation: nil, heldOutFraction: 0.1)
        var c = TrainingConfiguration()
        c.steps = 50
        c.learningRate = 1e30
        c.model = .mlp
        XCTAssertThrowsError(try InProcessGroup.run(size: 2) { comm -> Int in
            let trainer = try Trainer(configuration: c, data: data, world: comm)
            _ = try trainer.run()
            return 0
        }) { error in
            XCTAssertTrue(error is CollectiveRunError, "\(error)")
            XCTAssertTrue("\(error)".contains("lower learningRate"), "the library names the setting: \(error)")
        }
    }

    func testGradientBucketsStartedDuringBackwardGiveBitwiseTheSameTrajectory() throws {
        let data = try DataSource.split(.synthetic(train: 48, heldOut: 8, seed: 0), evaluation: nil, heldOutFraction: 0.1)
        func run(bucket: Int) throws -> ([String: [Float]], [Int]) {
            var c = TrainingConfiguration()
            c.batchSize = 4
            c.steps = 4
            c.norm = .bn
            c.gradientBucketSize = bucket
            return try InProcessGroup.run(size: 3) { comm -> ([String: [Float]], [Int]) in
                let trainer = try Trainer(configuration: c, data: data, world: comm)
                var counts: [Int] = []
                for _ in 0..<4 {
                    trainer.ledger.reset()
                    try trainer.trainStep()
                    counts.append(trainer.ledger.collectiveCounts["startAllReduceSum"] ?? 0)
                }
                return (stateDictionary(trainer.network), counts)
            }[0]
        }
        let one = try run(bucket: 1 << 20), many = try run(bucket: 2000)
        XCTAssertEqual(one.1, [1, 1, 1, 1])
        XCTAssertGreaterThanOrEqual(many.1[0], 3, "several buckets per step")
        for (name, values) in one.0 { XCTAssertEqual(values.map(\.bitPattern), many.0[name]!.map(\.bitPattern), name) }
    }

    func testFrozenBNStopsBatchStatisticsUpdatesAndCollectivesFromTheGivenStep() throws {
        let data = try DataSource.split(.synthetic(train: 48, heldOut: 8, seed: 0), evaluation: nil, heldOutFraction: 0.1)
        var c = TrainingConfiguration()
        c.batchSize = 4
        c.steps = 5
        c.freezeBNAfter = 2
        let results = try InProcessGroup.run(size: 2) { comm -> ([Int], [Float], [Float], Int64) in
            let trainer = try Trainer(configuration: c, data: data, world: comm)
            var counts: [Int] = []
            var afterFreeze: [Float] = []
            for step in 0..<5 {
                trainer.ledger.reset()
                try trainer.trainStep()
                counts.append(trainer.ledger.totalCollectives)
                if step == 1 { afterFreeze = stateDictionary(trainer.network)["features.1.bn.running_var"]! }
            }
            let state = stateDictionary(trainer.network)
            return (counts, afterFreeze, state["features.1.bn.running_var"]!, trainer.network.batchNormLayers[0].batchesTracked.value)
        }
        XCTAssertEqual(results[0].0, [7, 7, 1, 1, 1], "3 SyncBN layers × 2 + gradients, then gradients only")
        XCTAssertEqual(results[0].1, results[0].2, "running statistics frozen")
        XCTAssertEqual(results[0].3, 2)
    }

    func testGhostBatchesKeepOneCollectivePerLayerAndPass() throws {
        let data = try DataSource.split(.synthetic(train: 48, heldOut: 8, seed: 0), evaluation: nil, heldOutFraction: 0.1)
        var c = TrainingConfiguration()
        c.batchSize = 8
        c.steps = 2
        c.ghostBatchSize = 2
        let counts = try InProcessGroup.run(size: 2) { comm -> Int in
            let trainer = try Trainer(configuration: c, data: data, world: comm)
            XCTAssertTrue(trainer.network.batchNormLayers.allSatisfy { $0 is GhostBatchNorm<Float> })
            trainer.ledger.reset()
            try trainer.trainStep()
            return trainer.ledger.totalCollectives
        }
        XCTAssertEqual(counts, [7, 7])
        c.norm = .cbn
        XCTAssertThrowsError(try Trainer(configuration: c, data: data, world: SingleProcessCommunicator()))
    }

    func testGroupNormTrainsWithoutNormalizationCollectives() throws {
        let data = try DataSource.split(.synthetic(train: 48, heldOut: 8, seed: 0), evaluation: nil, heldOutFraction: 0.1)
        var c = TrainingConfiguration()
        c.batchSize = 4
        c.steps = 2
        c.norm = .gn
        let counts = try InProcessGroup.run(size: 2) { comm -> Int in
            let trainer = try Trainer(configuration: c, data: data, world: comm)
            trainer.ledger.reset()
            try trainer.trainStep()
            return trainer.ledger.totalCollectives
        }
        XCTAssertEqual(counts, [1, 1])
        c.gnGroups = 3
        XCTAssertThrowsError(try Trainer(configuration: c, data: data, world: SingleProcessCommunicator())) {
            XCTAssertTrue("\($0)".contains("does not divide"), "\($0)")
        }
    }

    func testSyncGroupLargerThanTheJobIsRejected() throws {
        let data = try DataSource.split(.synthetic(train: 16, heldOut: 8, seed: 0), evaluation: nil, heldOutFraction: 0.1)
        var c = TrainingConfiguration()
        c.syncGroupSize = 3
        XCTAssertThrowsError(try InProcessGroup.run(size: 2) { comm in try Trainer(configuration: c, data: data, world: comm) }) {
            XCTAssertTrue("\($0)".contains("exceeds the 2 ranks"), "\($0)")
        }
    }

    func testOneGradientCollectivePerStepPlusTwoPerSyncBNAndThreePerCBNLayer() throws {
        let data = try DataSource.split(.synthetic(train: 32, heldOut: 8, seed: 0), evaluation: nil, heldOutFraction: 0.1)
        for norm in [NormalizationKind.syncbn, .cbn] {
            var c = TrainingConfiguration()
            c.batchSize = 4
            c.steps = 6
            c.norm = norm
            let counts = try InProcessGroup.run(size: 2) { comm -> [Int] in
                let trainer = try Trainer(configuration: c, data: data, world: comm)
                return try (0..<5).map { _ in
                    trainer.ledger.reset()
                    try trainer.trainStep()
                    return trainer.ledger.totalCollectives
                }
            }
            // CBN's layers also sum the newest window entry's derivatives in their convolution's
            // backward (one all-reduce per 2¹⁸ values; these layers have fewer).
            let perLayer = norm == .cbn ? 3 : 2
            XCTAssertEqual(counts[0], [Int](repeating: 1 + perLayer * 3, count: 5),
                           "\(norm): 3 layers × (forward + backward\(norm == .cbn ? " + derivatives" : "")) + 1 gradient all-reduce")
        }
    }
}
