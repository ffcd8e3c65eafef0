import Collectives
import Kernels
import TestSupport
import Training
import XCTest

/// The main property of the project (DESIGN §3.3): with SyncBN, W ranks × per-rank batch b follow
/// the same trajectory — parameters, running statistics, losses — as 1 rank × batch W·b, up to
/// Float32 rounding, including the short last batch of an epoch with uneven and empty shards.
final class WorldSizeInvarianceTests: XCTestCase {
    static let data = try! DataSource.split(.synthetic(train: 43, heldOut: 16, seed: 3), evaluation: nil, heldOutFraction: 0.1)

    func configuration(model: ModelKind, batch: Int, steps: Int, norm: NormalizationKind = .syncbn) -> TrainingConfiguration {
        var c = TrainingConfiguration()
        c.model = model
        c.norm = norm
        c.batchSize = batch
        c.steps = steps
        c.learningRate = 0.05
        c.seed = 11
        return c
    }

    /// Trains on `ranks` in-process ranks; returns rank 0's state and every step's loss.
    func train(_ c: TrainingConfiguration, ranks: Int) throws -> (state: [String: [Float]], losses: [Double]) {
        let results = try InProcessGroup.run(size: ranks) { comm -> ([String: [Float]], [Double]) in
            let trainer = try Trainer(configuration: c, data: Self.data, world: comm)
            var losses: [Double] = []
            while trainer.step < trainer.totalSteps { losses.append(try trainer.trainStep().loss) }
            try trainer.verifyReplicasAgree()
            return (stateDictionary(trainer.network), losses)
        }
        XCTAssertEqual(results.count, ranks)
        return results[0]
    }

    func assertSameTrajectory(_ a: (state: [String: [Float]], losses: [Double]), _ b: (state: [String: [Float]], losses: [Double]),
                              _ label: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(a.state.keys.sorted(), b.state.keys.sorted(), file: file, line: line)
        for (name, values) in a.state {
            let error = relativeError(values, b.state[name]!)
            XCTAssertLessThan(error, 1e-4, "\(label): \(name)", file: file, line: line)
        }
        assertClose(a.losses, b.losses, relTol: 1e-4, "\(label): losses", file: file, line: line)
    }

    func testConvnetOnTwoThreeAndFourRanksMatchesOneRankWithTheGlobalBatch() throws {
        // 43 samples: G = 10 leaves [2, 1], G = 12 leaves [3, 2, 2], G = 8 leaves [1, 1, 1, 0].
        for (ranks, batch) in [(2, 5), (3, 4), (4, 2)] {
            let steps = 43 / (ranks * batch) + 3   // past the short batch into the next epoch
            let single = try train(configuration(model: .convnet, batch: ranks * batch, steps: steps), ranks: 1)
            let multi = try train(configuration(model: .convnet, batch: batch, steps: steps), ranks: ranks)
            XCTAssertEqual(single.losses.count, steps)
            assertSameTrajectory(multi, single, "\(ranks) ranks × \(batch)")
        }
    }

    func testMLPOnFourRanksMatchesOneRankWithTheGlobalBatch() throws {
        let single = try train(configuration(model: .mlp, batch: 12, steps: 6), ranks: 1)
        let multi = try train(configuration(model: .mlp, batch: 3, steps: 6), ranks: 4)
        assertSameTrajectory(multi, single, "mlp 4 ranks × 3")
    }

    func testCrossIterationBNOnTwoThreeAndFourRanksMatchesOneRank() throws {
        for (ranks, batch, model) in [(2, 5, ModelKind.convnet), (3, 4, .convnet), (4, 2, .convnet), (4, 3, .mlp)] {
            let steps = 43 / (ranks * batch) + 3
            var single = configuration(model: model, batch: ranks * batch, steps: steps, norm: .cbn)
            single.crossIteration = CrossIterationOptions(window: 3, rho: 1, burnIn: 1)
            var multi = single
            multi.batchSize = batch
            assertSameTrajectory(try train(multi, ranks: ranks), try train(single, ranks: 1), "cbn \(model) \(ranks) ranks × \(batch)")
        }
    }

    func testBatchRenormOnThreeRanksMatchesOneRank() throws {
        let single = try train(configuration(model: .convnet, batch: 12, steps: 8, norm: .brn), ranks: 1)
        let multi = try train(configuration(model: .convnet, batch: 4, steps: 8, norm: .brn), ranks: 3)
        assertSameTrajectory(multi, single, "brn 3 ranks × 4")
    }

    func testRepresentativeBNOnFourRanksMatchesOneRank() throws {
        let single = try train(configuration(model: .convnet, batch: 8, steps: 7, norm: .rbn), ranks: 1)
        let multi = try train(configuration(model: .convnet, batch: 2, steps: 7, norm: .rbn), ranks: 4)
        assertSameTrajectory(multi, single, "rbn 4 ranks × 2")
    }

    func testGroupNormOnFourRanksMatchesOneRank() throws {
        // Batch-independent normalization: the invariance holds by the loss scaling alone.
        let single = try train(configuration(model: .convnet, batch: 8, steps: 7, norm: .gn), ranks: 1)
        let multi = try train(configuration(model: .convnet, batch: 2, steps: 7, norm: .gn), ranks: 4)
        assertSameTrajectory(multi, single, "gn 4 ranks × 2")
    }

    func testWeightNormOnFourRanksMatchesOneRank() throws {
        // The data-dependent initialisation and mean-only BN's batch mean span all ranks; shards
        // of 43 samples in batches of 8 end uneven.
        for model in [ModelKind.convnet, .mlp] {
            for norm in [NormalizationKind.wn, .wnMeanOnly] {
                let single = try train(configuration(model: model, batch: 8, steps: 7, norm: norm), ranks: 1)
                let multi = try train(configuration(model: model, batch: 2, steps: 7, norm: norm), ranks: 4)
                assertSameTrajectory(multi, single, "\(model) \(norm)")
                XCTAssertTrue(single.state.keys.contains("features.0.\(model == .mlp ? "linear" : "conv").weight_g"))
            }
        }
    }

    func testInstanceNormWithRunningStatisticsOnFourRanksMatchesOneRank() throws {
        // Equal shards (4 steps of 4 × 2 within the 43 training samples): the ranks' running
        // statistics, averaged, are the single rank's.
        var single = configuration(model: .convnet, batch: 8, steps: 4, norm: .in)
        single.inTrackRunningStats = true
        var multi = single
        multi.batchSize = 2
        let a = try train(multi, ranks: 4), b = try train(single, ranks: 1)
        assertSameTrajectory(a, b, "IN with running statistics")
        XCTAssertTrue(a.state.keys.contains("features.0.bn.running_var"))
    }

    /// Per-rank domain-specific BN where a rank's batch holds one domain only (one sample per
    /// rank): the replicas still agree (train() verifies it) — counters and averaged running
    /// statistics included.
    func testPerRankDomainBNKeepsReplicasEqualWhenARankMissesADomain() throws {
        let twoDomain = try DataSource.split(.twoDomain(.synthetic(train: 20, heldOut: 8, seed: 3)), evaluation: nil, heldOutFraction: 0.1)
        var c = configuration(model: .convnet, batch: 1, steps: 5, norm: .bn)
        c.domainBN = true
        let results = try InProcessGroup.run(size: 4) { comm -> [String: [Float]] in
            let trainer = try Trainer(configuration: c, data: twoDomain, world: comm)
            while trainer.step < trainer.totalSteps { _ = try trainer.trainStep() }
            try trainer.verifyReplicasAgree()
            return stateDictionary(trainer.network)
        }
        XCTAssertNotNil(results[0]["features.0.bn.domains.1.running_mean"])
    }

    func testCompensatedCBNOnFourRanksMatchesOneRank() throws {
        var single = configuration(model: .convnet, batch: 8, steps: 9, norm: .cbn)
        single.crossIteration = CrossIterationOptions(window: 3, rho: 1, burnIn: 1, gradient: .compensated)
        var multi = single
        multi.batchSize = 2
        assertSameTrajectory(try train(multi, ranks: 4), try train(single, ranks: 1), "compensated CBN")
    }

    func testPerRankStatisticsDoDiffer() throws {
        // The invariance is a property of SyncBN, not an accident of the test: per-rank BN breaks it.
        let single = try train(configuration(model: .convnet, batch: 8, steps: 3, norm: .bn), ranks: 1)
        let multi = try train(configuration(model: .convnet, batch: 2, steps: 3, norm: .bn), ranks: 4)
        let name = "features.0.conv.weight"
        XCTAssertGreaterThan(relativeError(multi.state[name]!, single.state[name]!), 1e-3)
    }

    func testSyncGroupsOfTwoOnFourRanksMatchTwoRanksOfDoubleBatch() throws {
        // Groups {0,1} and {2,3} with batch b each see what 2 ranks with batch 2b see per rank.
        var grouped = configuration(model: .convnet, batch: 2, steps: 4)
        grouped.syncGroupSize = 2
        var perPair = configuration(model: .convnet, batch: 4, steps: 4)
        perPair.syncGroupSize = 1
        assertSameTrajectory(try train(grouped, ranks: 4), try train(perPair, ranks: 2), "groups of 2")
    }
}

func stateDictionary(_ network: Network) -> [String: [Float]] {
    var state: [String: [Float]] = [:]
    for entry in network.state {
        switch entry {
        case let .parameter(name, p): state[name] = p.value.scalars
        case let .buffer(name, b): state[name] = b.value.scalars
        case let .counter(name, c): state[name] = [Float(c.value)]
        case .rankLocal: continue
        }
    }
    return state
}
