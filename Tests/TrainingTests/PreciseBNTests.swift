import Collectives
import Kernels
import Normalization
import TestSupport
import Training
import XCTest

final class PreciseBNTests: XCTestCase {
    /// 48 samples of 2×3×3 with per-channel means 5 and −2 and different spreads.
    static let data: Dataset = {
        var random = DeterministicRandom(seed: 77)
        let samples = (0..<(48 * 18)).map { i -> Float in
            let channel = (i / 9) % 2
            return Float((channel == 0 ? 5 : -2) + (channel == 0 ? 3 : 0.5) * random.normal())
        }
        return Dataset(sampleShape: [2, 3, 3], classes: 2, samples: samples, labels: [Int32](repeating: 0, count: 48))
    }()

    /// The exact unbiased population statistics of `data`, in Double.
    func exactStatistics() -> (mean: [Double], variance: [Double]) {
        var values: [[Double]] = [[], []]
        for i in 0..<Self.data.samples.count { values[(i / 9) % 2].append(Double(Self.data.samples[i])) }
        let mean = values.map { $0.reduce(0, +) / Double($0.count) }
        let variance = zip(values, mean).map { v, m in v.reduce(0) { $0 + ($1 - m) * ($1 - m) } / Double(v.count - 1) }
        return (mean, variance)
    }

    /// A network whose first (and only) BN layer sees the data directly.
    func bareNetwork(group: (any Communicator)?) -> (Network, BatchNorm<Float>) {
        let bn = group.map { SyncBatchNorm<Float>(featureCount: 2, synchronizing: $0) } ?? BatchNorm<Float>(featureCount: 2)
        return (Network(layers: [("bn", bn)]), bn)
    }

    func testRecomputedStatisticsAreTheExactPopulationStatisticsOnEveryRank() throws {
        let (mean, variance) = exactStatistics()
        for (ranks, synced, batch) in [(1, false, 6), (3, false, 4), (3, true, 4), (4, true, 3)] {
            let results = try InProcessGroup.run(size: ranks) { base -> ([Float], [Float], Int, Int) in
                let comm = InstrumentedCommunicator(base)
                let (network, bn) = self.bareNetwork(group: synced ? comm : nil)
                let report = try PreciseBN.recompute(network: network, data: Self.data, sampleBudget: 48, batchSize: batch, seed: 1, world: comm)
                return (bn.runningMean.value.scalars, bn.runningVariance.value.scalars, comm.ledger.totalCollectives, report.batches)
            }
            let label = "\(ranks) ranks, \(synced ? "SyncBN" : "BN"), batch \(batch)"
            for (rank, result) in results.enumerated() {
                XCTAssertEqual(result.0.map(\.bitPattern), results[0].0.map(\.bitPattern), "\(label): rank \(rank) mean")
                XCTAssertEqual(result.1.map(\.bitPattern), results[0].1.map(\.bitPattern), "\(label): rank \(rank) var")
                let batches = result.3
                XCTAssertEqual(batches, 48 / (batch * ranks))
                XCTAssertEqual(result.2, 1 + (synced ? batches : 0), "\(label): one aggregation collective plus SyncBN's")
            }
            assertClose(results[0].0, mean, relTol: 1e-6, absTol: 1e-6, "\(label) mean")
            assertClose(results[0].1, variance, relTol: 1e-6, "\(label) unbiased variance")
        }
    }

    func testThePassChangesNothingButTheRunningStatisticsForBNSyncBNAndCBN() throws {
        let plain = try DataSource.split(.synthetic(train: 64, heldOut: 16, seed: 1), evaluation: nil, heldOutFraction: 0.1)
        let twoDomain = try DataSource.split(.twoDomain(.synthetic(train: 32, heldOut: 8, seed: 1)), evaluation: nil, heldOutFraction: 0.1)
        // Every --norm (IBN on a small ResNet), and domain-specific BN with per-rank and synced statistics.
        let cases = NormalizationKind.allCases.map { ($0, false) } + [(.bn, true), (.syncbn, true)]
        for (norm, domains) in cases {
            var c = TrainingConfiguration()
            c.batchSize = 4
            c.steps = 3
            c.norm = norm
            c.preciseBNSamples = 64
            c.domainBN = domains
            if norm == .ibn {
                c.model = .resnet20
                c.width = 0.5
            }
            let split = domains ? twoDomain : plain
            try InProcessGroup.run(size: 2) { comm in
                let trainer = try Trainer(configuration: c, data: split, world: comm)
                for _ in 0..<3 { try trainer.trainStep() }
                let windows = { trainer.network.state.compactMap { entry -> [Double]? in
                    if case let .rankLocal(_, state) = entry { return state.values } else { return nil } } }
                let before = stateDictionary(trainer.network), momentum = trainer.optimizer.momentumBuffers, window = windows()
                try trainer.recomputePopulationStatistics()
                let after = stateDictionary(trainer.network)
                for (name, values) in before {
                    if name.hasSuffix("running_mean") || name.hasSuffix("running_var") {
                        XCTAssertNotEqual(values, after[name], "\(norm): \(name) should be recomputed")
                    } else {
                        XCTAssertEqual(values, after[name], "\(norm): \(name) changed (num_batches_tracked included)")
                    }
                }
                XCTAssertEqual(trainer.optimizer.momentumBuffers, momentum)
                XCTAssertEqual(windows(), window, "\(norm): cross-iteration windows are untouched")
                if norm == .cbn { XCTAssertFalse(window.isEmpty) }
            }
        }
    }

    func testEvaluationReportsBothStatisticsAndTheCheckpointKeepsTheEMA() throws {
        let split = try DataSource.split(.synthetic(train: 96, heldOut: 32, seed: 2), evaluation: nil, heldOutFraction: 0.1)
        var c = TrainingConfiguration()
        c.batchSize = 8
        c.steps = 6
        c.preciseBNSamples = 96
        let dir = temporaryDirectory()
        let trainer = try Trainer(configuration: c, data: split, world: SingleProcessCommunicator())
        trainer.metrics = try MetricsWriter(path: dir + "/m.jsonl")
        let emaState = { () -> [String: [Float]] in
            while trainer.step < trainer.totalSteps { try! trainer.trainStep() }
            return stateDictionary(trainer.network)
        }()
        let summary = try trainer.run()
        XCTAssertEqual(Set(summary.evaluations.keys), ["ema", "precise"])
        try trainer.save(to: dir + "/c.safetensors")
        let lines = try String(contentsOfFile: dir + "/m.jsonl", encoding: .utf8).split(separator: "\n")
        XCTAssertTrue(lines.contains { $0.contains("\"stats\":\"ema\"") })
        XCTAssertTrue(lines.contains { $0.contains("\"stats\":\"precise\"") })
        let (tensors, metadata) = try Safetensors.read(dir + "/c.safetensors")
        XCTAssertEqual(metadata["statistics"], "precise")
        let name = "features.1.bn.running_var"
        XCTAssertEqual(tensors["ema." + name]?.floats, emaState[name], "EMA kept beside the PreciseBN statistics")
        XCTAssertEqual(tensors[name]?.floats, stateDictionary(trainer.network)[name])
        XCTAssertNotEqual(tensors[name]?.floats, emaState[name])
        // Resuming for training restores the EMA; for inference keeps PreciseBN's.
        let resumed = try Trainer(configuration: c, data: split, world: SingleProcessCommunicator())
        try resumed.resume(from: dir + "/c.safetensors")
        XCTAssertEqual(stateDictionary(resumed.network)[name], emaState[name])
        try resumed.resume(from: dir + "/c.safetensors", forTraining: false)
        XCTAssertEqual(stateDictionary(resumed.network)[name], tensors[name]?.floats)
    }

    /// The inconsistent pairs of training and inference statistics: a domain-BN network evaluated
    /// with statistics pooled over the domains is the shared-statistics network with the same
    /// weights evaluated its own way, and the shared network evaluated with per-domain statistics
    /// is the domain-BN network evaluated its own way. With one PreciseBN batch covering the whole
    /// training set both sides see exactly the same samples in each normalization, so the two
    /// agree to rounding (they run different kernels: BN's and domain BN's).
    func testInconsistentDomainStatisticsAreTheOtherNetworksOwn() throws {
        let split = try DataSource.split(.twoDomain(.synthetic(train: 48, heldOut: 16, seed: 3)), evaluation: nil, heldOutFraction: 0.1)
        XCTAssertEqual(split.train.domainCount, 2)
        var c = TrainingConfiguration()
        c.batchSize = 4
        c.norm = .syncbn
        c.preciseBNSamples = 1 << 20
        c.preciseBNBatchSize = 1 << 10
        var perDomain = c
        perDomain.domainBN = true
        let results = try InProcessGroup.run(size: 2) { comm -> [String: Evaluation] in
            let domainTrainer = try Trainer(configuration: perDomain, data: split, world: comm)
            for _ in 0..<4 { try domainTrainer.trainStep() }
            let sharedTrainer = try Trainer(configuration: c, data: split, world: comm)
            var copied = 0
            let weights = Dictionary(uniqueKeysWithValues: domainTrainer.network.state.compactMap { entry -> (String, Parameter<Float>)? in
                if case let .parameter(name, p) = entry { return (name, p) } else { return nil } })
            for case let .parameter(name, p) in sharedTrainer.network.state {
                p.value.scalars = try XCTUnwrap(weights[name], name).value.scalars
                copied += 1
            }
            XCTAssertEqual(copied, weights.count, "both networks have the same parameters")
            var out: [String: Evaluation] = [:]
            out["domain, own"] = try domainTrainer.evaluateWithPopulationStatistics(domains: nil)
            out["domain, per-domain"] = try domainTrainer.evaluateWithPopulationStatistics(domains: .perDomain)
            out["domain, pooled"] = try domainTrainer.evaluateWithPopulationStatistics(domains: .pooled)
            let layers = domainTrainer.network.leaves.compactMap { $0.layer as? DomainBatchNorm<Float> }
            XCTAssertFalse(layers.isEmpty)
            for layer in layers {
                XCTAssertEqual(layer.runningMeans[1].value.scalars, layer.runningMeans[0].value.scalars, "pooled: one set for every domain")
                XCTAssertEqual(layer.runningVariances[1].value.scalars, layer.runningVariances[0].value.scalars)
            }
            out["shared, own"] = try sharedTrainer.evaluateWithPopulationStatistics(domains: nil)
            out["shared, pooled"] = try sharedTrainer.evaluateWithPopulationStatistics(domains: .pooled)
            out["shared, per-domain"] = try sharedTrainer.evaluateWithPopulationStatistics(domains: .perDomain)
            return out
        }
        XCTAssertEqual(results[0], results[1], "every rank reports the same evaluation")
        let r = results[0]
        XCTAssertEqual(r["domain, own"], r["domain, per-domain"], "per-domain is a domain-BN network's own way")
        XCTAssertEqual(r["shared, own"], r["shared, pooled"], "pooled is a shared network's own way")
        func assertSame(_ a: Evaluation?, _ b: Evaluation?, _ label: String) throws {
            let a = try XCTUnwrap(a), b = try XCTUnwrap(b)
            XCTAssertEqual(a.count, b.count, label)
            XCTAssertEqual(a.loss, b.loss, accuracy: 1e-4 * max(1, abs(b.loss)), label)
            // Logits agree to rounding; at most a sample at a near-tie may change its class.
            XCTAssertEqual(a.accuracy, b.accuracy, accuracy: 1.5 / Double(b.count), label)
            let da = try XCTUnwrap(a.domainAccuracies, label), db = try XCTUnwrap(b.domainAccuracies, label)
            XCTAssertEqual(da.count, db.count, label)
            for (x, y) in zip(da, db) { XCTAssertEqual(x, y, accuracy: 1.5 / Double(b.count) * Double(da.count), label) }
        }
        try assertSame(r["domain, pooled"], r["shared, own"], "domain BN with pooled statistics")
        try assertSame(r["shared, per-domain"], r["domain, own"], "shared statistics replaced per domain")
        XCTAssertNotEqual(r["shared, own"]?.loss, r["domain, own"]?.loss, "the two ways differ on this data")
    }
}
