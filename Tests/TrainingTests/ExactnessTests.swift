import Collectives
import Kernels
import Normalization
import TestSupport
import Training
import XCTest

/// The exactness contract (docs/design.md, "Exact on any number of ranks"): W ranks × b is bit
/// for bit 1 rank × W·b when b is a power of two. In-process ranks here; the same under mpirun in
/// MPIIntegrationTests. Every comparison is between two runs on this machine, so nothing depends
/// on which BLAS kernel the CPU gets.
final class ExactnessTests: XCTestCase {
    static let data = try! DataSource.split(.synthetic(train: 1024, heldOut: 64, seed: 5), evaluation: nil, heldOutFraction: 0.1)
    static let twoDomain = try! DataSource.split(.twoDomain(.synthetic(train: 512, heldOut: 64, seed: 5)), evaluation: nil, heldOutFraction: 0.1)

    struct Outcome {
        var state: [String: [UInt32]]
        var windows: [String: [UInt64]]
        var losses: [UInt64]
        var precise: [String: [UInt32]]
        var evaluation: [UInt64]
        /// Per convolution, the weight-gradient leaves of the last training step.
        var leaves: [Int]
    }

    func bits(_ network: Network) -> (state: [String: [UInt32]], windows: [String: [UInt64]]) {
        var state: [String: [UInt32]] = [:], windows: [String: [UInt64]] = [:]
        for entry in network.state {
            switch entry {
            case let .parameter(name, p): state[name] = p.value.scalars.map(\.bitPattern)
            case let .buffer(name, b): state[name] = b.value.scalars.map(\.bitPattern)
            case let .counter(name, c): state[name] = [UInt32(truncatingIfNeeded: c.value)]
            case let .rankLocal(name, r): windows[name] = r.values.map(\.bitPattern)
            }
        }
        return (state, windows)
    }

    /// Trains `steps` steps on `ranks` in-process ranks of `batch` samples; every rank's outcome.
    func train(_ c: TrainingConfiguration, data: DataSplit, ranks: Int) throws -> [Outcome] {
        try InProcessGroup.run(size: ranks) { comm -> Outcome in
            let trainer = try Trainer(configuration: c, data: data, world: comm)
            var losses: [UInt64] = []
            while trainer.step < trainer.totalSteps { losses.append(try trainer.trainStep().loss.bitPattern) }
            let leaves = trainer.network.leaves.compactMap { ($0.layer as? Conv2d<Float>)?.lastWeightGradientLeaves }
            let (state, windows) = self.bits(trainer.network)
            let evaluation = try trainer.evaluate()
            try trainer.recomputePopulationStatistics()
            return Outcome(state: state, windows: windows, losses: losses, precise: self.bits(trainer.network).state,
                           evaluation: [evaluation.loss.bitPattern, evaluation.accuracy.bitPattern], leaves: leaves)
        }
    }

    func configuration(_ norm: NormalizationKind, batch: Int) -> TrainingConfiguration {
        var c = TrainingConfiguration()
        c.model = .resnet20
        c.width = 0.25
        c.norm = norm
        c.batchSize = batch
        c.steps = 60   // well into the second epoch (1,024 training samples, 32 per step)
        c.seed = 13
        c.augmentation = Augmentation(crop: true, flip: true)
        c.preciseBNSamples = 256
        return c
    }

    func testPowerOfTwoSplitsOfTheBatchAreBitIdenticalToOneRank() throws {
        var cbn = configuration(.cbn, batch: 32)
        cbn.crossIteration = CrossIterationOptions(window: 4)
        var domain = configuration(.syncbn, batch: 32)
        domain.domainBN = true
        var oneDNN = configuration(.syncbn, batch: 32)
        oneDNN.convBackend = .all(.onednn)
        // Weight-gradient leaves of 4 samples (each rank's batch a multiple of them; the epoch's
        // short last batch falls back to single-sample leaves on every layout alike).
        var leaves = oneDNN
        leaves.weightGradientLeaf = 4
        var cbnLeaves = cbn
        cbnLeaves.weightGradientLeaf = 4
        cbnLeaves.convBackend = .all(.onednn)   // the patch statistics' own oneDNN call per leaf
        let cases: [(String, TrainingConfiguration, DataSplit, [Int])] = [
            ("syncbn", configuration(.syncbn, batch: 32), Self.data, [2, 4, 8]), ("cbn", cbn, Self.data, [2, 4, 8]),
            ("brn", configuration(.brn, batch: 32), Self.data, [2, 4, 8]), ("gn", configuration(.gn, batch: 32), Self.data, [2, 4, 8]),
            ("domain", domain, Self.twoDomain, [2, 4, 8]), ("ibn", configuration(.ibn, batch: 32), Self.data, [2, 4, 8]),
            // oneDNN's convolutions, in-process ranks being threads (OpenMP's setting is per thread).
            // (CBN with oneDNN: under mpirun, MPIIntegrationTests.)
            ("syncbn-onednn", oneDNN, Self.data, [8]),
            ("syncbn-onednn-leaf4", leaves, Self.data, [8]), ("cbn-onednn-leaf4", cbnLeaves, Self.data, [4]),
        ]
        for (label, single, data, worlds) in cases {
            let reference = try train(single, data: data, ranks: 1)[0]
            // The leaves are used: each convolution's last (full) step summed 32 / L leaves.
            XCTAssertFalse(reference.leaves.isEmpty, label)
            XCTAssertEqual(Set(reference.leaves), [32 / single.weightGradientLeaf], "\(label): weight-gradient leaves per step")
            XCTAssertEqual(reference.losses.count, single.steps!)
            XCTAssertGreaterThan(Set(reference.losses).count, single.steps! / 2, "\(label): the run must actually train")
            for ranks in worlds {
                var multi = single
                multi.batchSize = 32 / ranks
                let outcomes = try train(multi, data: data, ranks: ranks)
                for (rank, outcome) in outcomes.enumerated() {
                    let where_ = "\(label), \(ranks) × \(32 / ranks), rank \(rank)"
                    XCTAssertEqual(outcome.losses, reference.losses, "\(where_): losses")
                    XCTAssertEqual(outcome.state.keys.sorted(), reference.state.keys.sorted(), where_)
                    let differing = reference.state.keys.sorted().filter { outcome.state[$0] != reference.state[$0] }
                    XCTAssertEqual(differing, [], "\(where_): tensors that differ")
                    let differingPrecise = reference.precise.keys.sorted().filter { outcome.precise[$0] != reference.precise[$0] }
                    XCTAssertEqual(differingPrecise, [], "\(where_): PreciseBN statistics that differ")
                    XCTAssertEqual(outcome.windows, reference.windows, "\(where_): cross-iteration windows")
                    XCTAssertEqual(outcome.evaluation, reference.evaluation, "\(where_): held-out loss and accuracy")
                }
            }
            if label.hasPrefix("cbn") { XCTAssertFalse(reference.windows.isEmpty) }
        }
    }

    /// The other side of the contract, so the test above cannot pass by accident: per-rank BN
    /// differs, and a split that is not aligned to powers of two is within rounding only.
    func testPerRankStatisticsAreNotWorldSizeInvariant() throws {
        var single = configuration(.bn, batch: 32)
        single.steps = 5
        var multi = single
        multi.batchSize = 8
        let a = try train(single, data: Self.data, ranks: 1)[0], b = try train(multi, data: Self.data, ranks: 4)[0]
        XCTAssertNotEqual(a.state["conv1.weight"], b.state["conv1.weight"])
    }
}
